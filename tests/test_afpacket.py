"""workers/afpacket.py against the real kernel, over a veth pair whose far
end lives in a namespace each test creates (tests/afnet.py)."""
from __future__ import annotations

import select
import socket
import struct
import threading
import time

import dpkt
import pytest

from afnet import A_IP, entered, raw_socket, veth, drain
from nsutil import can_netns, sh
from shardvu.reasons import DropReason
from shardvu.workers import afpacket as AF

pytestmark = pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok")

VERSION_1 = 1 << 32
GUEST_CSUM, GUEST_TSO4, GUEST_TSO6 = 1 << 1, 1 << 7, 1 << 8
MARK = 0x88B5
SMALL = AF.Geometry(block_size=1 << 16, frame_size=4096, rx_blocks=16, tx_blocks=16)


def marked(seq: int, size: int = 100, dst: bytes = b"\x02\x00\x00\x00\x00\xbb",
           src: bytes = b"\x02\x00\x00\x00\x00\xaa") -> bytes:
    body = struct.pack(">I", seq) + bytes(size - 18)
    return dst + src + struct.pack(">H", MARK) + body


def is_marked(f: bytes) -> bool:
    return f[12:14] == struct.pack(">H", MARK)


class Counted:
    """A port's drop callback that keeps counts by reason."""

    def __init__(self):
        self.by = {}

    def __call__(self, reason, n):
        self.by[reason] = self.by.get(reason, 0) + n


def ports(ctl, pair: int, features: int = VERSION_1):
    """The TX and RX port objects of ``pair``, as the workers build them."""
    out = []
    for tx in (True, False):
        p = AF.AfPacketPort(pair, tx, ctl.fds(pair), ctl.meta(pair))
        p.drop = Counted()
        p.configure(features, 12)
        out.append(p)
    return out


def close_all(*ps):
    import os
    for p in ps:
        p.close()
        for fd in p.fds:
            os.close(fd)


def receive_all(rxs, want=is_marked, count: int = 0, timeout: float = 2.0):
    """Frames (header + Ethernet) read from every RX port, by port index."""
    got = [[] for _ in rxs]
    poll = select.poll()
    for p in rxs:
        poll.register(p.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (not count or sum(map(len, got)) < count):
        poll.poll(50)
        for i, p in enumerate(rxs):
            got[i] += [f for f in p.receive(64) if want(f[12:])]
    return got


def test_absent_interface_and_not_ethernet_refused():
    with veth():
        with pytest.raises(AF.AfPacketError, match="no interface nosuch0"):
            AF.AfPacketControl("nosuch0", 1)
        with pytest.raises(AF.AfPacketError, match="lo is not an Ethernet interface"):
            AF.AfPacketControl("lo", 1)
        with pytest.raises(ValueError, match="no interface nosuch0"):
            AF.AfPacketPort.open_control("nosuch0", 2)


def test_fanout_id_unique_and_shared_by_pairs():
    with veth():
        a = AF.AfPacketControl("va", 2, SMALL)
        b = AF.AfPacketControl("va", 2, SMALL)
        try:
            assert a.fanout != b.fanout
            assert [AF.fanout_id(s) for s in a.socks] == [a.fanout] * 2
            assert [AF.fanout_id(s) for s in b.socks] == [b.fanout] * 2
        finally:
            a.close()
            b.close()


def test_tx_batch_reaches_the_peer_and_does_not_come_back():
    with veth() as (_, nsb):
        peer = raw_socket(nsb, "vb")
        ctl = AF.AfPacketControl("va", 2, SMALL)
        tx, rx = ports(ctl, 0)
        tx1, rx1 = ports(ctl, 1)
        try:
            frames = [marked(i) for i in range(100)]
            tx.send([bytes(12) + f for f in frames[:60]])
            tx1.send([bytes(12) + f for f in frames[60:]])
            got = drain(peer, is_marked, count=100)
            assert sorted(got) == sorted(frames)
            # each pair's frames leave in the order the guest sent them
            assert [f for f in got if f in frames[:60]] == frames[:60]
            assert [f for f in got if f in frames[60:]] == frames[60:]
            # PACKET_IGNORE_OUTGOING: nothing we sent shows up on RX
            assert receive_all([rx, rx1], timeout=0.5) == [[], []]
            assert not tx.drop.by
        finally:
            close_all(tx, rx, tx1, rx1)
            ctl.close()
            peer.close()


def test_rx_fanout_spreads_flows_and_every_frame_arrives_once():
    with veth(addresses=True) as (_, nsb):
        ctl = AF.AfPacketControl("va", 2, SMALL)
        ps = [ports(ctl, p) for p in range(2)]
        rxs = [p[1] for p in ps]
        try:
            with entered(nsb):
                sh("ip neigh replace 10.77.0.9 lladdr 02:00:00:00:00:09 dev vb nud permanent")
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(200):
                s.sendto(struct.pack(">I", i) + bytes(40), ("10.77.0.9", 6000 + i % 50))
            s.close()

            def udp9(f):
                return f[12:14] == b"\x08\x00" and f[30:34] == socket.inet_aton("10.77.0.9")
            got = receive_all(rxs, udp9, count=200)
            seqs = sorted(struct.unpack(">I", bytes(f[12 + 42:12 + 46]))[0]
                          for part in got for f in part)
            assert seqs == list(range(200))
            assert all(got), "fanout gave one pair every flow"
        finally:
            for tx, rx in ps:
                close_all(tx, rx)
            ctl.close()


def test_vlan_tag_reinserted():
    with veth() as (_, nsb):
        peer = raw_socket(nsb, "vb")
        ctl = AF.AfPacketControl("va", 1, SMALL)
        tx, rx = ports(ctl, 0)
        try:
            inner = marked(7, 80)
            tagged = inner[:12] + struct.pack(">HH", 0x8100, 0x2005) + inner[12:]
            peer.send(tagged)

            def vlan(f):
                return f[12:14] == b"\x81\x00"
            got = receive_all([rx], vlan, count=1)[0]
            assert [bytes(f[12:]) for f in got] == [tagged]
        finally:
            close_all(tx, rx)
            ctl.close()
            peer.close()


def _udp_from_b(nsb: str, payload: bytes) -> None:
    with entered(nsb):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(payload, (A_IP, 7000))
    s.close()


def _is_udp_to_a(f: bytes) -> bool:
    return f[12:14] == b"\x08\x00" and f[23] == 17 and f[30:34] == socket.inet_aton(A_IP)


@pytest.mark.parametrize("features", [VERSION_1 | GUEST_CSUM, VERSION_1])
def test_partial_checksum_passed_or_completed(features):
    with veth(addresses=True) as (_, nsb):
        ctl = AF.AfPacketControl("va", 1, SMALL)
        tx, rx = ports(ctl, 0, features)
        try:
            _udp_from_b(nsb, b"checksum me" * 20)
            got = receive_all([rx], _is_udp_to_a, count=1)[0]
            assert len(got) == 1
            hdr, eth = got[0][:12], got[0][12:]
            flags, _gso, _hl, _gs, cstart, coff, nbuf = struct.unpack("<BBHHHHH", hdr)
            assert nbuf == 1
            frame = bytearray(eth)
            if features & GUEST_CSUM:
                assert flags & 1 and (cstart, coff) == (34, 6)     # partial: the guest finishes it
                AF.csum_complete(frame, cstart, coff)
            else:
                assert flags == 0                                  # completed in software
            ip = dpkt.ethernet.Ethernet(bytes(frame)).data
            udp = ip.data
            want = udp.sum
            udp.sum = 0
            assert dpkt.in_cksum(dpkt.struct.pack(">4s4sxBH", ip.src, ip.dst, 17, len(udp))
                                 + bytes(udp)) == want
        finally:
            close_all(tx, rx)
            ctl.close()


def _tcp_burst(nsa: str, nsb: str, nbytes: int) -> threading.Thread:
    """A TCP transfer from B to a listener in A; returns the server thread."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((A_IP, 7001))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        left = nbytes
        while left > 0:
            d = c.recv(1 << 16)
            if not d:
                break
            left -= len(d)
        c.close()
        srv.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with entered(nsb):
        cl = socket.socket()
    cl.connect((A_IP, 7001))
    cl.sendall(bytes(nbytes))
    cl.close()
    return t


def _is_tcp_to_a(f: bytes) -> bool:
    return f[12:14] == b"\x08\x00" and f[23] == 6 and f[30:34] == socket.inet_aton(A_IP)


@pytest.mark.parametrize("features", [VERSION_1 | GUEST_CSUM | GUEST_TSO4, VERSION_1 | GUEST_CSUM])
def test_gso_frames_need_the_guest_feature(features):
    with veth(addresses=True) as (nsa, nsb):
        ctl = AF.AfPacketControl("va", 1)
        tx, rx = ports(ctl, 0, features)
        try:
            t = _tcp_burst(nsa, nsb, 4 << 20)
            got = receive_all([rx], _is_tcp_to_a, timeout=3)[0]
            t.join(5)
            big = [f for f in got if len(f) > 12 + 1514]
            if features & GUEST_TSO4:
                assert big, "no GSO frame reached the guest"
                for f in big:
                    flags, gso, _hl, gsize, _cs, _co = struct.unpack("<BBHHHH", f[:10])
                    assert gso == 1 and 0 < gsize <= 1500 and flags & 1
                assert DropReason.OFFLOAD_NOT_NEGOTIATED not in rx.drop.by
            else:
                assert not big
                assert rx.drop.by.get(DropReason.OFFLOAD_NOT_NEGOTIATED, 0) > 0
        finally:
            close_all(tx, rx)
            ctl.close()


def test_bad_tx_frames_skipped_ring_keeps_going():
    with veth() as (_, nsb):
        peer = raw_socket(nsb, "vb")
        ctl = AF.AfPacketControl("va", 1, SMALL)
        tx, rx = ports(ctl, 0)
        try:
            bad_gso = struct.pack("<BBHHHHH", 0, 0x42, 0, 0, 0, 0, 0)      # unknown gso_type
            batch = [bytes(12) + b"\x01" * 5]                              # shorter than Ethernet
            for i in range(3 * len(tx.slots)):
                batch.append((bad_gso if i % 2 else bytes(12)) + marked(i))
                if len(batch) == 32:
                    tx.send(batch)
                    batch = []
                    time.sleep(0.01)
            tx.send(batch)
            good = [marked(i) for i in range(0, 3 * len(tx.slots), 2)]
            got = drain(peer, is_marked, count=len(good))
            assert got == good
            assert tx.drop.by == {DropReason.SHORT_FRAME: 1}
        finally:
            close_all(tx, rx)
            ctl.close()
            peer.close()


def test_interface_vanishing_is_logged_and_counted(caplog):
    with veth() as (_, nsb):
        ctl = AF.AfPacketControl("va", 1, SMALL)
        tx, rx = ports(ctl, 0)
        try:
            sh("ip link del va")
            assert select.select([rx.fileno()], [], [], 2)[0]
            assert rx.receive(64) == []
            assert rx.gone and rx.fileno() == -1
            tx.send([bytes(12) + marked(1)])
            tx.send([bytes(12) + marked(2)] * 3)
            assert tx.gone
            assert tx.drop.by == {DropReason.PORT_ERROR: 4}
            assert "interface is gone" in caplog.text
        finally:
            close_all(tx, rx)
            ctl.close()


def _wait_user(rx, n: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for o in rx.slots if struct.unpack_from("I", rx.mm, o)[0] & 1) < n:
        assert time.monotonic() < deadline, "frames did not reach the ring"
        time.sleep(0.01)


@pytest.mark.parametrize("after", [2, 0])
def test_a_slot_the_kernel_never_fills_is_skipped_and_counted(after):
    """A ring slot left empty while the kernel moved on (seen under load)
    must not stall the ring: after HOLE_S it is skipped, counted as
    PORT_ERROR, and the frames after it (or arriving later) flow."""
    with veth() as (_, nsb):
        peer = raw_socket(nsb, "vb")
        ctl = AF.AfPacketControl("va", 1, SMALL)
        tx, rx = ports(ctl, 0)
        try:
            for i in range(1 + after):
                peer.send(marked(i))
            _wait_user(rx, 1 + after)
            struct.pack_into("I", rx.mm, rx.slots[0], 0)        # the hole
            assert rx.receive(64) == []
            time.sleep(AF.HOLE_S * 2)
            got = [bytes(f[12:]) for f in rx.receive(64) if is_marked(f[12:])]
            assert got == [marked(i) for i in range(1, 1 + after)]
            assert rx.drop.by == {DropReason.PORT_ERROR: 1}
            peer.send(marked(99))
            assert [bytes(f[12:]) for f in receive_all([rx], count=1)[0]] == [marked(99)]
        finally:
            close_all(tx, rx)
            ctl.close()
            peer.close()


def test_promiscuous_while_open():
    """Each pair's socket holds a PACKET_MR_PROMISC membership; closing
    the port releases them."""
    with veth():
        assert "promiscuity 0" in sh("ip -d link show va")
        ctl = AF.AfPacketControl("va", 2, SMALL)
        try:
            assert "promiscuity 2" in sh("ip -d link show va")
        finally:
            ctl.close()
        assert "promiscuity 0" in sh("ip -d link show va")
