"""``shardvu run --port af_packet:va`` end to end, driven by shardvu's own
front-end, over a veth pair whose far end (vb) is in a namespace the test
creates; traffic stays inside the two namespaces."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from afnet import A_IP, drain, entered, raw_socket, veth
from nsutil import can_netns, sh
from shardvu.testing.frontend import DEFAULT_FEATURES, Frontend
from shardvu.testing.runtime import Runtime
from shardvu.workers.tap import link_stats
from util import wait_for

pytestmark = pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok")

GUEST_CSUM, GUEST_TSO4 = 1 << 1, 1 << 7
MARK = b"\x88\xb5"


def frames(pair: int, n: int, size: int = 64):
    return [b"\x02\x00\x00\x00\x00\xbb\x02\x00\x00\x00\x00\xaa" + MARK
            + struct.pack(">HI", pair, i) + bytes(size - 20) for i in range(n)]


@pytest.fixture
def net(tmp_path):
    """(namespace A, namespace B, start(queues, *extra) -> Runtime on va)."""
    made = []
    with veth(addresses=True) as (nsa, nsb):
        def start(queues: int = 2, *extra: str) -> Runtime:
            rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), queues, "af_packet:va", *extra)
            made.append(rt)
            return rt
        yield nsa, nsb, start
        for rt in made:
            if rt.proc.poll() is None:
                assert rt.stop() == 0, rt.log()


def test_guest_to_veth_counted_exactly_on_the_peer(net):
    nsa, nsb, start = net
    rt = start(2)
    peer = raw_socket(nsb, "vb")
    try:
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            with entered(nsb):
                before = link_stats("vb")["rx_packets"]
            sent = {0: frames(0, 300), 1: frames(1, 300)}
            for rnd in range(3):
                for pair in (0, 1):
                    assert fe.send(pair, sent[pair][rnd * 100:(rnd + 1) * 100]) == 100
                    fe.reclaim_tx(pair)
            got = drain(peer, lambda f: f[12:14] == MARK, count=600, timeout=5)
            for pair in (0, 1):
                assert [f for f in got if f[14:16] == struct.pack(">H", pair)] == sent[pair]
            with entered(nsb):
                assert link_stats("vb")["rx_packets"] - before == 600
            wait_for(lambda: rt.queue_stats()[1]["packets"] + rt.queue_stats()[3]["packets"]
                     == 600, timeout=5, interval=0.1)
    finally:
        peer.close()


def test_veth_to_guest_spread_over_pairs(net):
    nsa, nsb, start = net
    rt = start(2)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        for pair in (0, 1):
            fe.post_rx(pair, 256)
        with entered(nsb):
            sh("ip neigh replace 10.77.0.9 lladdr 02:00:00:00:00:09 dev vb nud permanent")
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(300):
            s.sendto(struct.pack(">I", i) + b"to the guest", ("10.77.0.9", 9000 + i % 64))
            if i % 50 == 49:
                time.sleep(0.02)
        s.close()
        got = {0: [], 1: []}
        deadline = time.monotonic() + 10
        while sum(map(len, got.values())) < 300 and time.monotonic() < deadline:
            for pair in (0, 1):
                got[pair] += [f for f in fe.receive(pair, timeout=0.1)
                              if f[30:34] == socket.inet_aton("10.77.0.9")]
        seqs = sorted(struct.unpack(">I", f[42:46])[0] for g in got.values() for f in g)
        assert seqs == list(range(300))
        assert got[0] and got[1]


def test_tcp_gso_frames_reach_a_guest_with_tso(net):
    nsa, nsb, start = net
    rt = start(1)
    feats = DEFAULT_FEATURES | GUEST_CSUM | GUEST_TSO4
    with Frontend(rt.sock, queue_pairs=1, features=feats) as fe:
        fe.negotiate()
        assert fe.features & GUEST_TSO4
        fe.post_rx(0, 256)
        import threading
        srv = socket.socket()
        srv.bind((A_IP, 7002))
        srv.listen(1)
        done = []

        def serve():
            c, _ = srv.accept()
            while c.recv(1 << 16):
                pass
            c.close()
            done.append(1)
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with entered(nsb):
            cl = socket.socket()
        cl.connect((A_IP, 7002))
        cl.sendall(bytes(2 << 20))
        cl.close()
        t.join(10)
        srv.close()
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            more = fe.receive(0, timeout=0.3, keep_header=True)
            if not more and got:
                break
            got += more
        big = [f for f in got if len(f) > 12 + 1514 and f[12 + 23] == 6]
        assert big, "no GSO frame reached the guest"
        flags, gso, _hl, gsize, cstart, coff = struct.unpack("<BBHHHH", big[0][:10])
        assert gso == 1 and flags & 1 and 0 < gsize <= 1500 and (cstart, coff) == (34, 16)


def test_absent_interface_one_line_exit(tmp_path):
    with veth():
        r = subprocess.run([sys.executable, "-m", "shardvu.cli", "run", "--socket",
                            str(tmp_path / "s.sock"), "--port", "af_packet:nosuch0"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "no interface nosuch0" in err[0], r.stderr


def test_interface_deleted_under_traffic(net):
    nsa, nsb, start = net
    rt = start(2)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        for pair in (0, 1):
            fe.post_rx(pair, 64)
        assert fe.send(0, frames(0, 50)) == 50
        wait_for(lambda: rt.queue_stats()[1]["packets"] == 50, timeout=5, interval=0.1)
        sh("ip link del va")
        for pair in (0, 1):
            fe.reclaim_tx(pair)
            assert fe.send(pair, frames(pair, 30)) == 30
        wait_for(lambda: all(rt.queue_stats()[q]["drops_by_reason"]["port_error"] == 30
                             for q in (1, 3)), timeout=5, interval=0.1)
        wait_for(lambda: "interface is gone" in rt.log(), timeout=5, interval=0.1)
        assert rt.proc.poll() is None
    with Frontend(rt.sock, queue_pairs=2) as fe:      # the control keeps serving
        fe.negotiate()


PYPY = os.environ.get("SHARDVU_WORKER_PYTHON",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".venv-pypy", "bin", "python"))


@pytest.mark.skipif(not os.path.exists(PYPY), reason=f"no PyPy worker environment at {PYPY}")
def test_pypy_workers_both_ways(tmp_path):
    """The rings, fanout socket and TX flush on PyPy workers."""
    with veth(addresses=True) as (nsa, nsb):
        # (wait=False: Runtime.workers() does not yet see zygote-spawned PyPy workers)
        rt = Runtime(str(tmp_path / "pypy.sock"), 1, "af_packet:va", "--worker-python", PYPY,
                     wait=False)
        peer = raw_socket(nsb, "vb")
        try:
            wait_for(lambda: os.path.exists(rt.sock) and rt.stats_ready(), timeout=30,
                     interval=0.2)
            with Frontend(rt.sock) as fe:
                fe.negotiate()
                fe.post_rx(0, 256)
                assert fe.send(0, frames(0, 100)) == 100
                got = drain(peer, lambda f: f[12:14] == MARK, count=100, timeout=5)
                assert got == frames(0, 100)
                for f in frames(1, 50):
                    peer.send(f)
                back = []
                deadline = time.monotonic() + 10
                while len(back) < 50 and time.monotonic() < deadline:
                    back += [f for f in fe.receive(0, timeout=0.2) if f[12:14] == MARK]
                assert back == frames(1, 50)
        finally:
            peer.close()
            assert rt.stop() == 0, rt.log()
