"""``shardvu run --port udp:...`` end to end on the loopback addresses:
two shardvu instances linked by the tunnel, each driven by shardvu's own
front-end, and a plain UDP socket as a peer for IPv6 and bad datagrams."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import pytest

from shardvu import protocol as P
from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime
from util import wait_for

OFFLOAD_BITS = sum(1 << b for b in (0, 1, 7, 8, 9, 10, 11, 12, 13, 14))


def _free_base(family=socket.AF_INET, host="127.0.0.1", n: int = 2) -> int:
    """A port number P with P..P+n-1 free for UDP on ``host``."""
    for _ in range(50):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((host, 0))
        base = s.getsockname()[1]
        s.close()
        if base + n > 65535:
            continue
        try:
            held = []
            for i in range(n):
                t = socket.socket(family, socket.SOCK_DGRAM)
                held.append(t)
                t.bind((host, base + i))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no free UDP ports")


def frames(pair: int, n: int, size: int = 100):
    return [b"\x02\x00\x00\x00\x00\xbb\x02\x00\x00\x00\x00\xaa\x88\xb5"
            + struct.pack(">HI", pair, i) + bytes(size - 20) for i in range(n)]


@pytest.fixture
def runtimes(tmp_path):
    made = []

    def start(port: str, queues: int = 2) -> Runtime:
        rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), queues, port)
        made.append(rt)
        return rt
    yield start
    for rt in made:
        if rt.proc.poll() is None:
            assert rt.stop() == 0, rt.log()


def test_two_instances_linked_both_ways_per_pair(runtimes):
    a, b = _free_base(n=2), _free_base(n=2)
    while abs(a - b) < 2:
        b = _free_base(n=2)
    ra = runtimes(f"udp:127.0.0.1:{a},127.0.0.1:{b}")
    rb = runtimes(f"udp:127.0.0.1:{b},127.0.0.1:{a}")
    with Frontend(ra.sock, queue_pairs=2) as fa, Frontend(rb.sock, queue_pairs=2) as fb:
        fa.negotiate()
        fb.negotiate()
        for fe in (fa, fb):
            assert fe.offered_features & P.bit(P.VIRTIO_NET_F_MTU)
            assert not fe.offered_features & OFFLOAD_BITS
            mtu = struct.unpack("<H", fe.get_config(10, 2))[0]
            assert mtu == 1500 - 28 - 14
            for pair in (0, 1):
                fe.post_rx(pair, 200)
        for pair in (0, 1):
            assert fa.send(pair, frames(pair, 100)) == 100
            assert fb.send(pair, frames(pair + 10, 100)) == 100
        for pair in (0, 1):
            assert fb.receive(pair, timeout=10, min_frames=100) == frames(pair, 100)
            assert fa.receive(pair, timeout=10, min_frames=100) == frames(pair + 10, 100)
        wait_for(lambda: [ra.queue_stats()[q]["packets"] for q in range(4)] == [100] * 4,
                 timeout=5, interval=0.1)
        assert all(ra.queue_stats()[q]["drops"] == 0 for q in range(4))


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_plain_socket_peer_wrong_peer_and_not_ethernet_counted(runtimes, family, host):
    a = _free_base(family, host, 2)
    b = _free_base(family, host, 2)
    while abs(a - b) < 2:
        b = _free_base(family, host, 2)
    txt = f"[{host}]" if family == socket.AF_INET6 else host
    rt = runtimes(f"udp:{txt}:{a},{txt}:{b}")
    peers = []
    for i in range(2):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((host, b + i))
        s.settimeout(5)
        peers.append(s)
    stranger = socket.socket(family, socket.SOCK_DGRAM)
    stranger.bind((host, 0))
    try:
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            mtu = struct.unpack("<H", fe.get_config(10, 2))[0]
            assert mtu == 1500 - (48 if family == socket.AF_INET6 else 28) - 14
            for pair in (0, 1):
                fe.post_rx(pair, 64)
                fe.send(pair, frames(pair, 5))
            for pair in (0, 1):
                got = [peers[pair].recvfrom(2048) for _ in range(5)]
                assert [d for d, _ in got] == frames(pair, 5)       # raw: no virtio-net header
                assert all(addr[1] == a + pair for _, addr in got)
            for _ in range(3):
                stranger.sendto(frames(1, 1)[0], (host, a + 1))      # not pair 1's peer
            peers[1].sendto(b"short", (host, a + 1))                 # not an Ethernet frame
            peers[1].sendto(frames(7, 1)[0], (host, a + 1))
            assert fe.receive(1, timeout=5) == frames(7, 1)
            wait_for(lambda: rt.queue_stats()[2]["drops_by_reason"]["wrong_peer"] == 3
                     and rt.queue_stats()[2]["drops_by_reason"]["not_ethernet"] == 1,
                     timeout=5, interval=0.1)
            assert rt.queue_stats()[0]["drops"] == 0
            assert "not the peer" in rt.log()
    finally:
        for s in peers + [stranger]:
            s.close()


@pytest.mark.parametrize("spec,needle", [
    ("udp:127.0.0.1:7000", "expected LOCAL_IP:PORT,REMOTE_IP:PORT"),
    ("udp:::1:7000,::1:7001", "in brackets"),
    ("udp:127.0.0.1:7000,[::1]:7001", "different families"),
    ("udp:10.0.0.300:1,127.0.0.1:2", "not an IP address"),
])
def test_bad_spec_one_line_exit(tmp_path, spec, needle):
    r = subprocess.run([sys.executable, "-m", "shardvu.cli", "run", "--socket",
                        str(tmp_path / "s.sock"), "--port", spec], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_bind_conflict_one_line_exit(tmp_path):
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "-m", "shardvu.cli", "run", "--socket",
                            str(tmp_path / "s.sock"), "--port",
                            f"udp:127.0.0.1:{port},127.0.0.1:9"], capture_output=True, text=True,
                           timeout=60)
    finally:
        held.close()
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot bind" in err[0], r.stderr


PYPY = os.environ.get("SHARDVU_WORKER_PYTHON",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".venv-pypy", "bin", "python"))


@pytest.mark.skipif(not os.path.exists(PYPY), reason=f"no PyPy worker environment at {PYPY}")
def test_pypy_workers_linked_and_captured(tmp_path):
    """The udp port, the capture rings and the pcap hook run on PyPy workers."""
    from test_pcap import read_pcapng
    a, b = _free_base(n=1), _free_base(n=1)
    while a == b:
        b = _free_base(n=1)
    pcap = str(tmp_path / "p.pcapng")
    # (wait=False: Runtime.workers() does not yet see zygote-spawned PyPy workers)
    ra = Runtime(str(tmp_path / "a.sock"), 1, f"udp:127.0.0.1:{a},127.0.0.1:{b}",
                 "--worker-python", PYPY, "--pcap", pcap, wait=False)
    rb = Runtime(str(tmp_path / "b.sock"), 1, f"udp:127.0.0.1:{b},127.0.0.1:{a}",
                 "--worker-python", PYPY, wait=False)
    for rt in (ra, rb):
        wait_for(lambda: os.path.exists(rt.sock) and rt.stats_ready(), timeout=30, interval=0.2)
    try:
        with Frontend(ra.sock) as fa, Frontend(rb.sock) as fb:
            fa.negotiate()
            fb.negotiate()
            fa.post_rx(0, 128)
            fb.post_rx(0, 128)
            fa.send(0, frames(0, 50))
            assert fb.receive(0, timeout=10, min_frames=50) == frames(0, 50)
            fb.send(0, frames(1, 30))
            assert fa.receive(0, timeout=10, min_frames=30) == frames(1, 30)
    finally:
        assert rb.stop() == 0, rb.log()
        assert ra.stop() == 0, ra.log()
    _, recs = read_pcapng(pcap)
    assert [r[4] for r in recs if r[1] == "out"] == frames(0, 50)
    assert [r[4] for r in recs if r[1] == "in"] == frames(1, 30)
