"""``shardvu run --port tap:IFNAME`` end to end, driven by shardvu's own
front-end; the tap lives in a network namespace the test creates, and
traffic goes only to addresses inside it."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import dpkt
import pytest

from nsutil import can_netns, netns, sh
from shardvu import protocol as P
from shardvu.testing.frontend import DEFAULT_FEATURES, Frontend
from shardvu.testing.runtime import Runtime
from shardvu.workers import tap as T
from util import wait_for

pytestmark = pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok")

HOST_IP, GUEST_IP, FAR_IP = "10.77.0.1", "10.77.0.2", "10.77.1.2"
GUEST_MAC, FAR_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000003")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFF = {"CSUM": 0, "GUEST_CSUM": 1, "GUEST_TSO4": 7, "HOST_TSO4": 11}
_HDR = struct.Struct("<BBHHHHH")      # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers


def bits(*names: str) -> int:
    return sum(1 << OFF[n] for n in names)


@pytest.fixture
def ns(tmp_path):
    """A namespace and a factory of runtimes inside it (stopped after)."""
    made = []

    def start(ifname: str, queues: int = 1, *extra: str) -> Runtime:
        rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), queues, f"tap:{ifname}", *extra)
        made.append(rt)
        return rt
    with netns("shvtr"):
        # no IPv6 autoconfiguration chatter on the taps: exact counts
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        yield start
        for rt in made:
            if rt.proc.poll() is None:
                assert rt.stop() == 0, rt.log()


def _addresses(ifname: str) -> None:
    sh(f"ip addr add {HOST_IP}/24 dev {ifname}")
    sh(f"ip neigh replace {GUEST_IP} lladdr 02:00:00:00:00:02 dev {ifname} nud permanent")


def _frame(dst: bytes, n: int, size: int = 64) -> bytes:
    """An IPv4 frame; to a MAC address other than the tap's, the host
    stack discards it without counting it as a drop."""
    head = dst + GUEST_MAC + b"\x08\x00"
    ip = dpkt.ip.IP(src=socket.inet_aton(GUEST_IP), dst=socket.inet_aton(FAR_IP), p=253,
                    ttl=64, data=struct.pack(">I", n) + bytes(size - len(head) - 24))
    return head + bytes(ip)


OTHER_MAC = bytes.fromhex("0200000000aa")


def _detail(ifname: str) -> str:
    return sh(f"ip -d link show {ifname}")


def test_guest_to_tap_counted_exactly(ns):
    rt = ns("shvt0", 2)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        mac = OTHER_MAC
        before = T.link_stats("shvt0")
        sent = 0
        for rnd in range(5):
            for pair in (0, 1):
                sent += fe.send(pair, [_frame(mac, rnd * 1000 + i) for i in range(100)])
                fe.reclaim_tx(pair)
        assert sent == 1000

        def settled() -> bool:
            st = T.link_stats("shvt0")
            return st["rx_packets"] + st["rx_dropped"] - before["rx_packets"] - before["rx_dropped"] >= sent
        wait_for(settled, timeout=5, interval=0.1)
        time.sleep(0.2)
        st = T.link_stats("shvt0")
        assert st["rx_packets"] - before["rx_packets"] + st["rx_dropped"] - before["rx_dropped"] == sent
        wait_for(lambda: sum(rt.queue_stats()[q]["packets"] for q in (1, 3)) == sent, timeout=5, interval=0.1)
        assert all(rt.queue_stats()[q]["drops"] == 0 for q in (1, 3))


def test_tap_to_guest_on_every_pair_with_clean_headers(ns):
    rt = ns("shvt1", 2)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        assert not fe.features & bits("GUEST_CSUM")
        _addresses("shvt1")
        for pair in (0, 1):
            fe.post_rx(pair, 200)
        before = T.link_stats("shvt1")["tx_packets"]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for port in range(9000, 9064):              # 64 flows: the kernel spreads them
            for _ in range(3):
                s.sendto(b"to the guest", (GUEST_IP, port))
        s.close()
        got = {0: [], 1: []}
        deadline = time.monotonic() + 10
        while sum(map(len, got.values())) < 192 and time.monotonic() < deadline:
            for pair in (0, 1):
                got[pair] += fe.receive(pair, timeout=0.2, keep_header=True)
        udp = {pair: [f for f in frames if f[12 + 12:12 + 14] == b"\x08\x00"
                      and f[12 + 23] == 17] for pair, frames in got.items()}
        assert sum(map(len, udp.values())) == 192
        assert udp[0] and udp[1], "every pair carries traffic"
        for frames in udp.values():
            for f in frames:
                flags, gso, _, _, _, _, nbuf = _HDR.unpack(f[:12])
                assert (flags, gso, nbuf) == (0, 0, 1)
                assert f[12:18] == GUEST_MAC and f.endswith(b"to the guest")
        tx = T.link_stats("shvt1")["tx_packets"] - before
        delivered = sum(map(len, got.values()))
        drops = sum(rt.queue_stats()[q]["drops"] for q in (0, 2))
        assert tx == delivered + drops


def test_vring_enable_maps_to_tunsetqueue(ns):
    rt = ns("shvt2", 2)
    assert "numqueues 0 numdisabled 2" in _detail("shvt2")      # nothing enabled yet
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        assert "numqueues 2 numdisabled 0" in _detail("shvt2")
        fe.set_vring_enable(2, False)
        assert "numqueues 2" in _detail("shvt2")               # TX ring 3 still enabled
        fe.set_vring_enable(3, False)
        assert "numqueues 1 numdisabled 1" in _detail("shvt2")
        fe.set_vring_enable(3, True)
        assert "numqueues 2 numdisabled 0" in _detail("shvt2")


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg_rxbuf", "big_buffers"])
def test_offloads_negotiated_and_gso_frames_reach_the_guest(ns, mrg):
    """The guest sends one 20 KB TSO frame (HOST_TSO4) to an address the
    namespace routes back out of the tap; the kernel hands it back to the
    guest in one piece (GUEST_TSO4), with its GSO header: across several
    2 KiB buffers with MRG_RXBUF, into one 64 KiB buffer without it."""
    rt = ns("shvt3", 1)
    want = DEFAULT_FEATURES | bits("CSUM", "GUEST_CSUM", "GUEST_TSO4", "HOST_TSO4")
    if not mrg:
        want &= ~(1 << P.VIRTIO_NET_F_MRG_RXBUF)
    with Frontend(rt.sock, queue_pairs=1, features=want) as fe:
        fe.negotiate()
        off = bits("CSUM", "GUEST_CSUM", "GUEST_TSO4", "HOST_TSO4")
        assert fe.features & off == off
        _addresses("shvt3")
        sh("sysctl -qw net.ipv4.ip_forward=1")
        sh("ip route add 10.77.1.0/24 dev shvt3")
        sh(f"ip neigh replace {FAR_IP} lladdr 02:00:00:00:00:03 dev shvt3 nud permanent")
        k = sh("ethtool -k shvt3")
        assert "tcp-segmentation-offload: on" in k and "tx-checksumming: on" in k
        if mrg:
            fe.post_rx(0, 128)
        else:
            fe.post_rx(0, 4, buf_size=65536 + 64)
        payload = bytes(range(256)) * 80                       # 20480 bytes
        tcp = dpkt.tcp.TCP(sport=40000, dport=5001, seq=1, flags=dpkt.tcp.TH_ACK, data=payload)
        ip = dpkt.ip.IP(src=socket.inet_aton(GUEST_IP), dst=socket.inet_aton(FAR_IP),
                        p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=tcp)
        eth = bytes(dpkt.ethernet.Ethernet(dst=T.link_address("shvt3"), src=GUEST_MAC,
                                           type=dpkt.ethernet.ETH_TYPE_IP, data=ip))
        # NEEDS_CSUM at the TCP checksum, TCPV4 segments of 1448 bytes
        hdr = _HDR.pack(1, 1, 14 + 20 + 20, 1448, 34, 16, 0)
        before = T.link_stats("shvt3")
        assert fe.send(0, [eth], header=hdr) == 1
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            got = [f for f in fe.receive(0, timeout=0.2, keep_header=True)
                   if len(f) > 12 + 1500]
        assert got, "no large frame came back"
        f = got[0]
        flags, gso, _, gso_size, _, _, nbuf = _HDR.unpack(f[:12])
        assert gso == 1 and gso_size > 0 and flags & 1           # TCPV4, NEEDS_CSUM
        assert nbuf >= 10 if mrg else nbuf == 1              # ~20 KB in 2 KiB buffers, or one
        back = dpkt.ethernet.Ethernet(f[12:])
        assert back.dst == FAR_MAC and bytes(back.data.data.data) == payload
        st = T.link_stats("shvt3")
        assert st["rx_bytes"] - before["rx_bytes"] >= len(eth)   # one > MTU frame each way


def _run_cli(*args: str, pre=()) -> subprocess.CompletedProcess:
    cmd = [*pre, sys.executable, "-m", "shardvu.cli", "run", "--socket", "/tmp/shv-never.sock", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30)


@pytest.mark.parametrize("ifname,needle", [
    ("a" * 16, "16 bytes long; the limit is 15"), ("bad/name", "invalid interface name"),
    ("", "empty interface name"),
])
def test_bad_ifname_one_line_and_exit(ns, ifname, needle):
    r = _run_cli("--port", f"tap:{ifname}")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_existing_tap_without_vnet_hdr_refused(ns):
    sh("ip tuntap add dev shvt4 mode tap multi_queue")
    r = _run_cli("--port", "tap:shvt4")
    assert r.returncode != 0
    assert "shvt4 was not made as a multi_queue vnet_hdr tap" in r.stderr
    assert T.interface_exists("shvt4")                       # left alone


def test_missing_cap_net_admin(ns):
    cmd = (f"{sys.executable} -m shardvu.cli run --socket /tmp/shv-never.sock --port tap:shvt5")
    r = subprocess.run(["capsh", "--drop=cap_net_admin", "--", "-c", cmd],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode != 0
    assert "no permission to create shvt5 (needs CAP_NET_ADMIN)" in r.stderr
    assert not T.interface_exists("shvt5")


def test_interface_deleted_under_traffic(ns):
    rt = ns("shvt6", 2)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        mac = T.link_address("shvt6")
        assert fe.send(0, [_frame(mac, i) for i in range(50)]) == 50
        wait_for(lambda: rt.queue_stats()[1]["packets"] == 50, timeout=5, interval=0.1)
        sh("ip link del shvt6")
        for pair in (0, 1):
            fe.reclaim_tx(pair)
            assert fe.send(pair, [_frame(mac, i) for i in range(30)]) == 30
        wait_for(lambda: all(rt.queue_stats()[q]["drops_by_reason"]["port_error"] == 30
                             for q in (1, 3)), timeout=5, interval=0.1)
        assert rt.proc.poll() is None                          # the control keeps serving
        assert "tap shvt6 queue failed" in rt.log()
    with Frontend(rt.sock, queue_pairs=2) as fe:               # and takes the next front-end
        fe.negotiate()


def test_frame_larger_than_rx_buffers_dropped_and_counted(ns):
    """Without MRG_RXBUF a frame larger than the posted buffer is dropped
    (RX_BUFFER_TOO_SMALL), the buffer kept for the next frame."""
    rt = ns("shvt7", 1)
    feats = DEFAULT_FEATURES & ~(1 << P.VIRTIO_NET_F_MRG_RXBUF)
    with Frontend(rt.sock, queue_pairs=1, features=feats) as fe:
        fe.negotiate()
        _addresses("shvt7")
        fe.post_rx(0, 8, buf_size=512)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"B" * 1000, (GUEST_IP, 9100))                 # does not fit 512 bytes
        s.sendto(b"small", (GUEST_IP, 9101))
        s.close()
        got = []
        deadline = time.monotonic() + 5
        while not any(g.endswith(b"small") for g in got) and time.monotonic() < deadline:
            got += fe.receive(0, timeout=0.2)
        assert any(g.endswith(b"small") for g in got)
        assert not any(b"B" * 100 in g for g in got)
        wait_for(lambda: rt.queue_stats()[0]["drops_by_reason"]["rx_buffer_too_small"] >= 1,
                 timeout=5, interval=0.1)


def test_header_the_kernel_refuses_is_a_counted_drop(ns):
    """A GSO type the kernel does not know makes the tap write fail with
    EINVAL: that frame is dropped (PORT_ERROR), the next one goes through."""
    rt = ns("shvt8", 1)
    want = DEFAULT_FEATURES | bits("CSUM", "HOST_TSO4")
    with Frontend(rt.sock, queue_pairs=1, features=want) as fe:
        fe.negotiate()
        before = T.link_stats("shvt8")["rx_packets"]
        bad = _HDR.pack(0, 0x55, 0, 0, 0, 0, 0)                 # no such gso_type
        assert fe.send(0, [_frame(OTHER_MAC, 1)], header=bad) == 1
        assert fe.send(0, [_frame(OTHER_MAC, 2)]) == 1
        wait_for(lambda: rt.queue_stats()[1]["drops_by_reason"]["port_error"] == 1
                 and rt.queue_stats()[1]["packets"] == 1, timeout=5, interval=0.1)
        assert T.link_stats("shvt8")["rx_packets"] - before == 1
        assert rt.proc.poll() is None


PYPY = os.path.join(ROOT, ".venv-pypy", "bin", "python")


@pytest.mark.skipif(not os.path.exists(PYPY), reason="no PyPy venv (.venv-pypy)")
def test_pypy_workers_both_ways(ns):
    """The same port with PyPy workers (split_fast_struct loops, cffi)."""
    rt = ns("shvt9", 2, "--worker-python", PYPY)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        _addresses("shvt9")
        before = T.link_stats("shvt9")
        for pair in (0, 1):
            assert fe.send(pair, [_frame(OTHER_MAC, i) for i in range(200)]) == 200
            fe.post_rx(pair, 128)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for port in range(9200, 9232):
            s.sendto(b"pypy", (GUEST_IP, port))
        s.close()
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 32 and time.monotonic() < deadline:
            for pair in (0, 1):
                got += [f for f in fe.receive(pair, timeout=0.2) if f.endswith(b"pypy")]
        assert len(got) == 32
        wait_for(lambda: T.link_stats("shvt9")["rx_packets"] - before["rx_packets"] == 400,
                 timeout=5, interval=0.1)


def _worker_fds(rt) -> dict:
    return {p.name(): len(os.listdir(f"/proc/{p.pid}/fd")) for p in rt.workers()}


def test_sessions_leak_no_fds_and_keep_the_tap(ns):
    """Front-ends come and go: the control process and the workers end each
    session with the fds they started it with; the tap (owned by the
    control) stays, its queues detached between sessions."""
    rt = ns("shvta", 2)
    counts = []
    for _ in range(3):
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            assert fe.send(1, [_frame(OTHER_MAC, i) for i in range(20)]) == 20
            assert "numqueues 2" in _detail("shvta")
        time.sleep(0.5)
        counts.append((rt.fds(), _worker_fds(rt)))
        assert T.interface_exists("shvta")
        assert "numqueues 0 numdisabled 2" in _detail("shvta")
    assert counts[0] == counts[1] == counts[2], counts


def test_dead_worker_neither_detaches_nor_destroys_the_tap(ns):
    """The control process owns the queue fds: SIGKILL on a pair's workers
    leaves the (non-persistent) tap and its attached queues in place, and
    the replacement workers carry traffic on the same queue."""
    import signal
    rt = ns("shvtb", 1)
    with Frontend(rt.sock, queue_pairs=1) as fe:
        fe.negotiate()
        assert "numqueues 1 numdisabled 0" in _detail("shvtb")
        victims = [p for p in rt.workers() if p.name() in ("shardvu-w0", "shardvu-w1")]
        assert len(victims) == 2
        for p in victims:
            os.kill(p.pid, signal.SIGKILL)
        for p in victims:
            p.wait(5)
        assert T.interface_exists("shvtb")
        assert "numqueues 1 numdisabled 0" in _detail("shvtb")
        wait_for(lambda: {p.name() for p in rt.workers()} >= {"shardvu-w0", "shardvu-w1"}
                 and all(p.pid not in {v.pid for v in victims} for p in rt.workers()),
                 timeout=10, interval=0.1)
        before = T.link_stats("shvtb")["rx_packets"]
        fe.reclaim_tx(0)
        assert fe.send(0, [_frame(OTHER_MAC, i) for i in range(30)]) == 30
        wait_for(lambda: T.link_stats("shvtb")["rx_packets"] - before == 30, timeout=10, interval=0.1)
