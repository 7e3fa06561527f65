"""An independent peer for the udp port: a QEMU guest on QEMU's own
``-netdev dgram`` (one Ethernet frame per datagram, 127.0.0.1) pings the
other side of ``shardvu run --port udp:...``, whose "guest" is shardvu's
Python front-end answering ICMP echo requests."""
from __future__ import annotations

import threading

import dpkt
import pytest

from shardvu.testing.frontend import Frontend
from shardvu.testing.qemu import Guest
from test_qemu import _guest_ok, _guest_why, _qemu_ok, _qemu_why, errors, guest_image, lab  # noqa: F401
from test_udp_port import _free_base

pytestmark = [
    pytest.mark.skipif(not _qemu_ok, reason=_qemu_why),
    pytest.mark.skipif(_qemu_ok and not _guest_ok, reason=_guest_why),
]

QEMU_IP, FE_IP = "10.88.0.2", "10.88.0.1"
FE_IP_RAW = bytes(map(int, FE_IP.split(".")))
FE_MAC = bytes.fromhex("020000000001")


class DgramGuest(Guest):
    """A Guest whose NIC is QEMU's ``-netdev dgram`` (no vhost-user)."""

    def __init__(self, *a, local: int, remote: int, **kw):
        super().__init__(*a, **kw)
        self.local, self.remote = local, remote

    def argv(self):
        argv = super().argv()
        i = argv.index("-chardev")
        del argv[i:i + 4]                   # -chardev ... -netdev vhost-user,...
        argv[i:i] = ["-netdev", f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,"
                                f"local.port={self.local},remote.type=inet,"
                                f"remote.host=127.0.0.1,remote.port={self.remote}"]
        argv[argv.index("-device") + 1] = argv[argv.index("-device") + 1].replace(",mq=on", "")
        return argv


def _responder(fe: Frontend, stop: threading.Event, seen: list) -> threading.Thread:
    """Answer ARP requests for FE_IP and ICMP echo requests to it on pair 0."""
    def run():
        try:
            serve()
        except BaseException as exc:       # reported by the test
            seen.append(exc)

    def serve():
        while not stop.is_set():
            for raw in fe.receive(0, timeout=0.2):
                eth = dpkt.ethernet.Ethernet(raw)
                ip = eth.data
                if isinstance(ip, dpkt.arp.ARP) and ip.op == dpkt.arp.ARP_OP_REQUEST \
                        and ip.tpa == FE_IP_RAW:
                    arp = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REPLY, sha=FE_MAC, spa=FE_IP_RAW,
                                       tha=ip.sha, tpa=ip.spa)
                    fe.send(0, [bytes(dpkt.ethernet.Ethernet(dst=eth.src, src=FE_MAC,
                                                             type=eth.type, data=arp))])
                    fe.reclaim_tx(0)
                    continue
                if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.icmp.ICMP):
                    continue
                if ip.dst != FE_IP_RAW or ip.data.type != 8:
                    continue
                seen.append(raw)
                icmp = dpkt.icmp.ICMP(type=0, code=0, data=ip.data.data)
                reply = dpkt.ip.IP(src=ip.dst, dst=ip.src, p=1, ttl=64, id=ip.id, data=icmp)
                reply.len = len(reply)
                fe.send(0, [bytes(dpkt.ethernet.Ethernet(dst=eth.src, src=FE_MAC,
                                                         type=eth.type, data=reply))])
                fe.reclaim_tx(0)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_qemu_dgram_guest_pings_through_the_udp_port(lab, guest_image):
    a, b = _free_base(n=1), _free_base(n=1)
    while a == b:
        b = _free_base(n=1)
    rt = lab.runtime(1, f"udp:127.0.0.1:{a},127.0.0.1:{b}")
    kernel, initramfs = guest_image
    g = DgramGuest(lab.sock, 1, "ping", f"shardvu.ip={QEMU_IP}/24 shardvu.peer={FE_IP} "
                   f"shardvu.count=5",
                   kernel=kernel, initramfs=initramfs, local=b, remote=a)
    seen: list = []
    stop = threading.Event()
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 128)
        t = _responder(fe, stop, seen)
        try:
            g.start()
            res = g.wait_done(timeout=300)
        finally:
            stop.set()
            t.join(2)
            g.cleanup()
    assert "error" not in res, res
    ping = res["ping"][0]
    assert ping["transmitted"] == 5 and ping["received"] == 5, (ping, seen)
    assert len(seen) == 5
    assert not errors(rt), errors(rt)
