"""A veth pair for the af_packet tests: one end (``va``) in the test's own
namespace, the other (``vb``) in a second namespace the test creates, so
the far side has a network stack of its own.  Traffic stays inside."""
from __future__ import annotations

import contextlib
import os
import socket
import uuid

import nsutil
from nsutil import sh
from shardvu.testing.netns import _setns

A_IP, B_IP = "10.77.0.1", "10.77.0.2"


@contextlib.contextmanager
def entered(ns: str):
    """Run the calling thread inside namespace ``ns`` for the block."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(fd)
        yield
    finally:
        _setns(home)
        os.close(fd)
        os.close(home)


@contextlib.contextmanager
def veth(prefix: str = "shvaf", addresses: bool = False):
    """Inside a fresh namespace A: yields ``(ns_a, ns_b)`` with ``va`` up in
    A and its peer ``vb`` up in B; IPv6 off on both (no stray ND/MLD
    frames); with ``addresses`` A_IP on va, B_IP on vb."""
    with nsutil.netns(prefix) as ns_a:
        ns_b = f"{prefix}b-{uuid.uuid4().hex[:6]}"
        sh(f"ip netns add {ns_b}")
        try:
            sh("ip link add va type veth peer name vb")
            sh(f"ip link set vb netns {ns_b}")
            sh(f"ip netns exec {ns_a} sysctl -qw net.ipv6.conf.va.disable_ipv6=1")
            sh(f"ip netns exec {ns_b} sysctl -qw net.ipv6.conf.vb.disable_ipv6=1")
            sh(f"ip netns exec {ns_b} ip link set lo up")
            if addresses:
                sh(f"ip addr add {A_IP}/24 dev va")
                sh(f"ip netns exec {ns_b} ip addr add {B_IP}/24 dev vb")
            sh("ip link set va up")
            sh(f"ip netns exec {ns_b} ip link set vb up")
            yield ns_a, ns_b
        finally:
            sh(f"ip netns del {ns_b}", check=False)


def raw_socket(ns: str, ifname: str) -> socket.socket:
    """A non-blocking AF_PACKET socket on ``ifname`` in namespace ``ns``."""
    with entered(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        s.bind((ifname, 3))
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)     # SO_RCVBUFFORCE: hold a whole test's frames
    s.setblocking(False)
    return s


def drain(s: socket.socket, want=None, timeout: float = 2.0, count: int = 0) -> list:
    """Frames read from ``s`` (those ``want(frame)`` accepts) until
    ``count`` arrived or ``timeout`` passed with nothing new."""
    import select
    out = []
    p = select.poll()
    p.register(s, select.POLLIN)
    while not count or len(out) < count:
        if not p.poll(timeout * 1000):
            break
        while True:
            try:
                f = s.recv(70000)
            except BlockingIOError:
                break
            if want is None or want(f):
                out.append(f)
    return out
