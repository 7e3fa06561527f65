"""workers/tap.py against the real kernel: every test runs in a network
namespace of its own (tests/nsutil.py), traffic only inside it."""
from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import subprocess
import sys
import time

import dpkt
import pytest

from nsutil import can_netns, netns, sh
from shardvu.workers import tap as T

pytestmark = pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok")

GUEST_MAC = bytes.fromhex("020000000002")
HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"


@pytest.fixture
def ns():
    with netns("shvtap") as name:
        yield name


def _ip_detail(name: str) -> str:
    return sh(f"ip -d link show {name}")


def _mac(name: str) -> bytes:
    return T.link_address(name)


def udp_frame(dst_mac: bytes, payload: bytes, sport: int = 4000, dport: int = 5000) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=socket.inet_aton(GUEST_IP), dst=socket.inet_aton(HOST_IP),
                    p=dpkt.ip.IP_PROTO_UDP, data=udp, ttl=64)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(dst=dst_mac, src=GUEST_MAC,
                                        type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def _addr(name: str) -> None:
    sh(f"ip addr add {HOST_IP}/24 dev {name}")
    sh(f"ip neigh replace {GUEST_IP} lladdr 02:00:00:00:00:02 dev {name} nud permanent")


def test_create_up_and_gone_at_close(ns):
    tap = T.Tap.open("shv0", 4)
    try:
        assert tap.created
        assert len(tap.fds) == 4 and len(set(tap.fds)) == 4
        d = _ip_detail("shv0")
        assert "UP" in d.split(">")[0]
        assert "vnet_hdr on" in d and "multi_queue" in d and "numqueues 4" in d
        for fd in tap.fds:
            assert os.get_blocking(fd) is False
    finally:
        tap.close()
    assert not T.interface_exists("shv0")       # not persistent: gone with its fds


def test_attach_existing_left_in_place(ns):
    sh("ip tuntap add dev shv1 mode tap multi_queue vnet_hdr")
    tap = T.Tap.open("shv1", 2)
    assert not tap.created
    assert "numqueues 2" in _ip_detail("shv1")
    tap.close()
    assert T.interface_exists("shv1")
    assert "numqueues 0" in _ip_detail("shv1")


@pytest.mark.parametrize("how,needle", [
    ("mode tap multi_queue", "not made as a multi_queue vnet_hdr tap"),
    ("mode tap vnet_hdr", "not made as a multi_queue vnet_hdr tap"),
    ("mode tun multi_queue vnet_hdr", "not made as a multi_queue vnet_hdr tap"),
])
def test_existing_with_wrong_flags_refused(ns, how, needle):
    sh(f"ip tuntap add dev shv2 {how}")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(T.TapError, match=needle) as info:
        T.Tap.open("shv2", 2)
    assert "\n" not in str(info.value)
    assert set(os.listdir("/proc/self/fd")) == before
    assert "shv2" in str(info.value)


def test_not_a_tap_refused(ns):
    with pytest.raises(T.TapError, match="lo exists and is not a tap"):
        T.Tap.open("lo", 1)


@pytest.mark.parametrize("name,needle", [
    ("", "empty"), ("a" * 16, "16 bytes long; the limit is 15"), ("a/b", "invalid"),
    ("a b", "invalid"), ("..", "invalid"), ("tap%d", "invalid"), ("x:1", "invalid"),
])
def test_bad_names(name, needle):
    with pytest.raises(T.TapError, match=needle):
        T.check_ifname(name)


def test_fifteen_bytes_is_fine(ns):
    tap = T.Tap.open("a" * 15, 1)
    tap.close()


def test_without_cap_net_admin_one_line(ns):
    """capsh drops CAP_NET_ADMIN from the bounding set before exec."""
    code = ("import sys; from shardvu.workers import tap as T\n"
            "try:\n    T.Tap.open('shv3', 1)\n"
            "except T.TapError as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run(["capsh", "--drop=cap_net_admin", "--", "-c",
                        f"{sys.executable} -c \"{code}\""],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip() == "tap: no permission to create shv3 (needs CAP_NET_ADMIN)"
    assert not T.interface_exists("shv3")


def test_offload_flag_mapping():
    bit = lambda *b: sum(1 << x for x in b)    # noqa: E731
    assert T.tun_offload_flags(0) == 0
    assert T.tun_offload_flags(bit(7, 8)) == 0                    # TSO without CSUM: nothing
    assert T.tun_offload_flags(bit(1)) == T.TUN_F_CSUM
    assert T.tun_offload_flags(bit(1, 7, 8, 9, 10)) == (
        T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6 | T.TUN_F_TSO_ECN | T.TUN_F_UFO)
    assert T.tun_offload_flags(bit(1, 9)) == T.TUN_F_CSUM        # ECN needs a TSO


def test_configure_and_kernel_refuses_tso_without_csum(ns):
    tap = T.Tap.open("shv4", 1)
    try:
        tap.configure(sum(1 << b for b in (1, 7, 8)), 12)
        assert tap.offload == T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6
        with pytest.raises(OSError) as info:
            fcntl.ioctl(tap.fds[0], T.TUNSETOFFLOAD, T.TUN_F_TSO4)
        assert info.value.errno == errno.EINVAL
        tap.configure(0, 10)
        assert tap.offload == 0 and tap.hdr_size == 10
    finally:
        tap.close()


def test_detach_and_attach(ns):
    tap = T.Tap.open("shv5", 2)
    try:
        tap.set_queue_attached(1, False)
        tap.set_queue_attached(1, False)          # idempotent
        d = _ip_detail("shv5")
        assert "numqueues 1" in d and "numdisabled 1" in d
        tap.configure(0, 12)
        _addr("shv5")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for port in range(7000, 7032):          # 32 flows: all hashed to queue 0
            s.sendto(b"f", (GUEST_IP, port))
        s.close()
        assert _drain(tap.fds[1]) == 0
        assert _drain(tap.fds[0]) >= 32
        tap.set_queue_attached(1, True)
        assert "numqueues 2" in _ip_detail("shv5")
    finally:
        tap.close()


def _drain(fd: int) -> int:
    """Frames waiting on queue fd ``fd`` (read and discarded)."""
    n = 0
    time.sleep(0.05)
    while True:
        try:
            os.read(fd, 65536)
        except BlockingIOError:
            return n
        n += 1


def test_guest_to_host_frame_with_header(ns):
    tap = T.Tap.open("shv6", 2)
    try:
        tap.configure(0, 12)
        _addr("shv6")
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind((HOST_IP, 5000))
        rx.settimeout(2)
        frame = udp_frame(_mac("shv6"), b"hello tap")
        hdr = bytes(12)
        before = T.link_stats("shv6")["rx_packets"]
        assert T.writev(tap.fds[1], [hdr, frame[:20], frame[20:]]) == 12 + len(frame)
        data, peer = rx.recvfrom(100)
        assert data == b"hello tap" and peer == (GUEST_IP, 4000)
        assert T.link_stats("shv6")["rx_packets"] == before + 1
        rx.close()
    finally:
        tap.close()


def test_host_to_guest_frame_read(ns):
    tap = T.Tap.open("shv7", 2)
    try:
        tap.configure(0, 12)
        _addr("shv7")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"to the guest", (GUEST_IP, 6000))
        s.close()
        got = None
        deadline = time.monotonic() + 2
        while got is None and time.monotonic() < deadline:
            ready, _, _ = select.select(tap.fds, [], [], 0.2)
            for fd in ready:
                hdr, body = bytearray(12), bytearray(2048)
                try:
                    n = T.readv(fd, [hdr, body])
                except BlockingIOError:
                    continue
                eth = dpkt.ethernet.Ethernet(bytes(body[:n - 12]))
                if isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.udp.UDP):
                    got = (bytes(hdr), eth)
        assert got is not None, "no frame read from any queue"
        hdr, eth = got
        assert hdr[0] == 0 and hdr[1] == 0      # no offloads set: no flags, no GSO
        assert eth.dst == GUEST_MAC and eth.data.data.data == b"to the guest"
    finally:
        tap.close()


PYPY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    ".venv-pypy", "bin", "python")


@pytest.mark.skipif(not os.path.exists(PYPY), reason="no PyPy venv (.venv-pypy)")
def test_readv_writev_on_pypy():
    """PyPy 3.9 has no os.readv/os.writev: the cffi versions, on a pipe."""
    code = ("import os; from shardvu.workers import tap as T\n"
            "assert not hasattr(os, 'writev')\n"
            "r, w = os.pipe()\n"
            "assert T.writev(w, [b'ab', memoryview(b'cdef')[1:], bytearray(b'g')]) == 6\n"
            "a, b = bytearray(2), bytearray(10)\n"
            "n = T.readv(r, [a, memoryview(b)])\n"
            "assert n == 6 and bytes(a) == b'ab' and bytes(b[:4]) == b'defg', (a, b)\n"
            "os.set_blocking(r, False)\n"
            "try:\n    T.readv(r, [a])\nexcept BlockingIOError:\n    print('ok')\n")
    r = subprocess.run([PYPY, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
