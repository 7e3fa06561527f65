"""SEND_RARP (protocol feature RARP) and VIRTIO_NET_F_GUEST_ANNOUNCE, driven
by shardvu's own front-end; the announcement is caught on the port's far
side: the udp port's peer socket on 127.0.0.1, the af_packet port's veth
peer in a namespace the test creates, the tap's host side."""
from __future__ import annotations

import socket

import dpkt
import pytest

from afnet import drain, raw_socket, veth
from nsutil import can_netns, netns, sh
from shardvu import protocol as P
from shardvu.protocol import ProtocolFeature as PF
from shardvu.protocol import Request as R
from shardvu.testing.frontend import DEFAULT_PROTOCOL_FEATURES, Frontend, FrontendError
from shardvu.testing.runtime import Runtime
from test_udp_port import _free_base

MAC = bytes.fromhex("525400abcdef")
GUEST_ANNOUNCE = 21
netns_only = pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok")


def rarp_payload(mac: bytes) -> bytes:
    return mac + b"\0\0"                  # QEMU: the MAC in the u64's first 6 bytes


def check_rarp(frame: bytes, mac: bytes = MAC) -> None:
    eth = dpkt.ethernet.Ethernet(frame)
    assert len(frame) == 60
    assert eth.dst == b"\xff" * 6 and eth.src == mac and eth.type == 0x8035
    arp = dpkt.arp.ARP(bytes(eth.data))
    assert (arp.hrd, arp.pro, arp.hln, arp.pln, arp.op) == (1, 0x0800, 6, 4, 3)
    assert arp.sha == arp.tha == mac and arp.spa == arp.tpa == bytes(4)


def fe_with_rarp(path: str, pairs: int = 1) -> Frontend:
    fe = Frontend(path, queue_pairs=pairs,
                  protocol_features=DEFAULT_PROTOCOL_FEATURES | P.bit(PF.RARP))
    fe.negotiate()
    return fe


@pytest.fixture
def udp_runtime(tmp_path):
    a, b = _free_base(n=2), _free_base(n=2)
    while abs(a - b) < 2:
        b = _free_base(n=2)
    rt = Runtime(str(tmp_path / "rt.sock"), 2, f"udp:127.0.0.1:{a},127.0.0.1:{b}")
    peers = []
    for i in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", b + i))
        s.settimeout(5)
        peers.append(s)
    yield rt, peers
    for s in peers:
        s.close()
    assert rt.stop() == 0, rt.log()


def test_udp_announcement_on_pair_0_and_guest_announce_offered(udp_runtime):
    rt, peers = udp_runtime
    with fe_with_rarp(rt.sock, 2) as fe:
        assert fe.protocol_features & P.bit(PF.RARP)
        assert fe.offered_features & P.bit(GUEST_ANNOUNCE)
        fe.request(R.SEND_RARP, rarp_payload(MAC))
        data, _ = peers[0].recvfrom(2048)
        check_rarp(data)
        peers[1].settimeout(0.3)
        with pytest.raises(socket.timeout):
            peers[1].recvfrom(2048)                      # pair 0 only
        assert "SEND_RARP: announced 52:54:00:ab:cd:ef" in rt.log()


@pytest.mark.parametrize("mac,needle", [
    (bytes(6), "no MAC address"),
    (bytes.fromhex("010203040506"), "group address"),
])
def test_rarp_without_a_mac_refused_clearly(udp_runtime, mac, needle):
    rt, peers = udp_runtime
    with fe_with_rarp(rt.sock, 2) as fe:
        with pytest.raises(FrontendError):
            fe.request(R.SEND_RARP, rarp_payload(mac), need_reply=True)
        assert needle in rt.log()
        fe.request(R.SEND_RARP, rarp_payload(MAC))       # the device still serves
        check_rarp(peers[0].recvfrom(2048)[0])


def test_rarp_not_negotiated_refused(udp_runtime):
    rt, peers = udp_runtime
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        assert not fe.protocol_features & P.bit(PF.RARP)
        with pytest.raises(FrontendError):
            fe.request(R.SEND_RARP, rarp_payload(MAC), need_reply=True)
    assert "protocol feature RARP not negotiated" in rt.log()


def test_sink_port_does_not_offer_rarp(tmp_path):
    rt = Runtime(str(tmp_path / "rt.sock"), 1, "sink")
    try:
        with Frontend(rt.sock) as fe:
            fe.negotiate()
            assert not fe.offered_protocol_features & P.bit(PF.RARP)
    finally:
        assert rt.stop() == 0


@netns_only
def test_af_packet_announcement_seen_on_the_veth_peer(tmp_path):
    with veth() as (_, nsb):
        peer = raw_socket(nsb, "vb")
        rt = Runtime(str(tmp_path / "rt.sock"), 1, "af_packet:va")
        try:
            with fe_with_rarp(rt.sock) as fe:
                fe.request(R.SEND_RARP, rarp_payload(MAC))
                got = drain(peer, lambda f: f[12:14] == b"\x80\x35", count=1, timeout=5)
                assert len(got) == 1
                check_rarp(got[0])
        finally:
            peer.close()
            assert rt.stop() == 0, rt.log()


@netns_only
def test_tap_announcement_seen_on_the_host_side(tmp_path):
    with netns("shvrp"):
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        rt = Runtime(str(tmp_path / "rt.sock"), 1, "tap:shvrp0")
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            s.bind(("shvrp0", 3))
            s.setblocking(False)
            with fe_with_rarp(rt.sock) as fe:
                fe.request(R.SEND_RARP, rarp_payload(MAC))
                got = drain(s, lambda f: f[12:14] == b"\x80\x35", count=1, timeout=5)
                assert len(got) == 1
                check_rarp(got[0])
            s.close()
        finally:
            assert rt.stop() == 0, rt.log()
