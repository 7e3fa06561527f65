"""Hostile or broken front-ends and guests: each gets a clear error, the
back-end keeps serving, and no fd leaks (the ``served`` fixture counts
/proc/self/fd before and after every test)."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from shardvu import protocol as P
from shardvu.testing.driver import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from shardvu.testing.frontend import Frontend, FrontendError
from shardvu.protocol import Request as R
from util import memfd, wait_for




def still_serves(fe: Frontend, pair: int = 0) -> None:
    fe.post_rx(pair, 4)
    fe.send(pair, [b"ok" * 32])
    assert fe.receive(pair, timeout=5) == [b"ok" * 32]




def expect_nack(fe: Frontend, caplog, req, payload=b"", fds=(), reason: str = "") -> None:
    """The request fails with a REPLY_ACK failure and a log line naming it."""
    caplog.clear()
    with pytest.raises(FrontendError) as exc:
        fe.request(req, payload, fds, need_reply=True)
    assert exc.value.code != 0
    assert P.request_name(req) in caplog.text
    if reason:
        assert reason in caplog.text


# --- the message stream --------------------------------------------------------
def test_truncated_header_then_disconnect(served, caplog):
    b = served()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b.path)
    s.sendall(P.encode(R.GET_FEATURES)[:5])
    s.close()
    wait_for(lambda: "truncated" in caplog.text)
    with Frontend(b.path) as fe:
        fe.negotiate()
        still_serves(fe)


def test_truncated_payload_with_fds_then_disconnect(served, caplog):
    b = served()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b.path)
    fd = memfd()
    msg = P.encode(R.SET_MEM_TABLE, P.MemoryTable((P.MemoryRegion(0, 1 << 20, 0, 0),)).pack())
    s.sendmsg([msg[:20]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
    os.close(fd)
    s.close()
    wait_for(lambda: "truncated" in caplog.text)
    with Frontend(b.path) as fe:
        fe.negotiate()


@pytest.mark.parametrize("req,size", [
    (R.SET_FEATURES, 4), (R.SET_VRING_NUM, 16), (R.SET_VRING_ADDR, 8), (R.GET_VRING_BASE, 4),
    (R.SET_LOG_BASE, 8), (R.ADD_MEM_REG, 32), (R.SET_CONFIG, 2), (R.SET_OWNER, 8),
])
def test_size_field_not_matching_the_payload_type(served, caplog, req, size):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        caplog.clear()
        reply = fe.request(req, bytes(size), need_reply=True, check=False)
        assert reply.request == req and reply.payload in (b"", P.pack_u64(1))
        assert f"{req.name}: " in caplog.text and "size" in caplog.text
        still_serves(fe)


def test_oversized_size_field_drops_the_connection_but_not_the_server(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.send_raw(P.HEADER.pack(R.SET_FEATURES, P.VERSION, 1 << 30))
        assert fe.wait_closed(2.0)
        assert "exceeds" in caplog.text
    with Frontend(b.path) as fe:
        fe.negotiate()
        still_serves(fe)


def test_unknown_request_code(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        expect_nack(fe, caplog, 99, b"", reason="UNKNOWN(99)")
        still_serves(fe)


# --- memory ---------------------------------------------------------------------
def test_region_whose_fd_cannot_be_mapped(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        r, w = os.pipe()
        try:
            table = P.MemoryTable((P.MemoryRegion(0, 1 << 20, 0x10000000, 0),)).pack()
            expect_nack(fe, caplog, R.SET_MEM_TABLE, table, [r], reason="mmap")
        finally:
            os.close(r)
            os.close(w)
        assert len(b.device.mem) == 0


def test_region_of_size_zero(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        fd = memfd()
        try:
            table = P.MemoryTable((P.MemoryRegion(0, 0, 0x10000000, 0),)).pack()
            expect_nack(fe, caplog, R.SET_MEM_TABLE, table, [fd], reason="zero")
            expect_nack(fe, caplog, R.ADD_MEM_REG, P.MemRegMsg(P.MemoryRegion(0, 0, 0, 0)).pack(),
                        [fd], reason="zero")
        finally:
            os.close(fd)


def test_ring_addresses_outside_every_region(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        good = fe.queues[0]
        uva = fe.gpa_to_uva
        for desc, avail, used in [
            (0xdead0000000, uva(good.avail_gpa), uva(good.used_gpa)),
            (uva(good.desc_gpa), 0xdead0000000, uva(good.used_gpa)),
            (uva(good.desc_gpa), uva(good.avail_gpa), 0xdead0000000),
            (uva(fe.region_descs[0].gpa + fe.region_descs[0].size - 64), uva(good.avail_gpa), uva(good.used_gpa)),
        ]:
            addr = P.VringAddr(0, 0, desc, used, avail, 0).pack()
            expect_nack(fe, caplog, R.SET_VRING_ADDR, addr, reason="outside")
        still_serves(fe)     # the old, valid addresses are kept


@pytest.mark.parametrize("num", [0, 3, 100, 2048])
def test_bad_vring_num(served, caplog, num):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        expect_nack(fe, caplog, R.SET_VRING_NUM, P.VringState(0, num).pack(), reason="power of two")
        assert b.device.vqs[0].num == 256


def test_vring_index_beyond_the_queues(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        expect_nack(fe, caplog, R.SET_VRING_NUM, P.VringState(2, 256).pack(), reason="out of range")
        expect_nack(fe, caplog, R.SET_VRING_ENABLE, P.VringState(7, 1).pack(), reason="out of range")
        fd = memfd(4096)
        try:
            expect_nack(fe, caplog, R.SET_VRING_KICK, P.pack_u64(9), [fd], reason="out of range")
        finally:
            os.close(fd)
        reply = fe.request(R.GET_VRING_BASE, P.VringState(200, 0).pack(), check=False)
        assert reply.payload == b""
        still_serves(fe)


def test_extra_fds_and_missing_fds(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        fd1, fd2 = memfd(4096), memfd(4096)
        try:
            expect_nack(fe, caplog, R.SET_FEATURES, P.pack_u64(fe.features), [fd1], reason="unexpected 1 fd")
            expect_nack(fe, caplog, R.SET_VRING_CALL, P.pack_u64(0), [fd1, fd2], reason="expected 1 fd")
            expect_nack(fe, caplog, R.SET_VRING_KICK, P.pack_u64(1), [], reason="expected 1 fd")
            table = P.MemoryTable(tuple(fe.region_descs)).pack()
            expect_nack(fe, caplog, R.SET_MEM_TABLE, table, [], reason="expected 1 fd")
            expect_nack(fe, caplog, R.SET_MEM_TABLE, table, [fd1, fd2], reason="expected 1 fd")
            reply = fe.request(R.SET_LOG_BASE, P.LogArea(4096, 0).pack(), [], check=False)
            assert reply.payload == P.pack_u64(1) and "SET_LOG_BASE: expected 1 fd" in caplog.text
        finally:
            os.close(fd1)
            os.close(fd2)
        # a refused SET_MEM_TABLE left no memory; the front-end sets it again
        fe.request(R.SET_MEM_TABLE, P.MemoryTable(tuple(fe.region_descs)).pack(), fe.region_fds)
        for q in range(2):
            fe.set_vring_addr(q)
        fe.request(R.SET_VRING_KICK, P.pack_u64(1), [fe.kick_fds[1]])
        fe.request(R.SET_VRING_KICK, P.pack_u64(0), [fe.kick_fds[0]])
        still_serves(fe)


def test_features_not_offered_are_refused(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        expect_nack(fe, caplog, R.SET_FEATURES, P.pack_u64(fe.features | P.bit(P.VIRTIO_F_RING_PACKED)),
                    reason="not offered")
        reply = fe.request(R.SET_PROTOCOL_FEATURES, P.pack_u64(P.bit(8)), need_reply=True, check=False)
        assert reply.payload == P.pack_u64(1)


# --- out of order -------------------------------------------------------------------
def test_messages_out_of_order(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.request(R.GET_FEATURES)
        fe.request(R.SET_PROTOCOL_FEATURES, P.pack_u64(P.bit(P.ProtocolFeature.REPLY_ACK)))
        fe._reply_ack = True
        # ring addresses before any memory table
        fe.request(R.SET_VRING_NUM, P.VringState(0, 256).pack())
        expect_nack(fe, caplog, R.SET_VRING_ADDR, P.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0).pack(),
                    reason="outside")
        # GET_VRING_BASE on a ring that never started
        assert fe.get_vring_base(1) == 0
        # a kick before the memory table: accepted, the ring just has nothing mapped
        fe.request(R.SET_VRING_KICK, P.pack_u64(1), [fe.kick_fds[1]])
        fe.kick(1)
        time.sleep(0.1)
        assert not b.device.vqs[1].broken
    with Frontend(b.path) as fe:
        fe.negotiate()
        still_serves(fe)


# --- hostile guests -----------------------------------------------------------------
def hostile_tx(fe: Frontend, write) -> None:
    """Write a hostile chain on pair 0's TX queue with ``write(q)`` and kick."""
    q = fe.queues[1]
    head = write(q)
    q.push_avail(head)
    q.write_avail_idx(q.avail_idx)
    fe.kick(1)


@pytest.mark.parametrize("case,reason", [
    ("loop", "loop"),
    ("index", "index"),
    ("address", "guest memory"),
    ("overflow", "overflow"),
    ("nested", "nested"),
])
def test_hostile_descriptor_table_breaks_only_that_queue(served, caplog, case, reason):
    b = served(queue_pairs=2)
    with Frontend(b.path, queue_pairs=2) as fe:
        fe.negotiate()
        buf = fe.alloc(4096)

        def write(q):
            if case == "loop":
                q.write_desc(0, buf, 64, VRING_DESC_F_NEXT, 1)
                q.write_desc(1, buf, 64, VRING_DESC_F_NEXT, 0)
                return 0
            if case == "index":
                q.write_desc(0, buf, 64, VRING_DESC_F_NEXT, 999)
                return 0
            if case == "address":
                q.write_desc(0, 1 << 50, 64, 0, 0)
                return 0
            if case == "overflow":
                # 200 in-bounds buffers of 32 MiB: more than 2**32 bytes in all
                for i in range(200):
                    q.write_desc(i, 0, 32 << 20, VRING_DESC_F_NEXT if i < 199 else 0, i + 1)
                return 0
            table = fe.alloc(16)
            inner = fe.alloc(16)
            fe.write(table, struct.pack("<QIHH", inner, 16, VRING_DESC_F_INDIRECT, 0))
            q.write_desc(0, table, 16, VRING_DESC_F_INDIRECT, 0)
            return 0

        hostile_tx(fe, write)
        vq = b.device.vqs[1]
        wait_for(lambda: vq.broken)
        assert reason in vq.broken_reason
        assert "queue 1 broken" in caplog.text
        wait_for(lambda: fe.errors(1) >= 1)          # the err eventfd was signalled
        # the other pair is untouched, and the control channel still serves
        still_serves(fe, pair=1)
        assert fe.get_vring_base(3) >= 1


def test_avail_index_jump_breaks_the_queue(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        fe.queues[1].write_avail_idx(1000)
        fe.kick(1)
        wait_for(lambda: b.device.vqs[1].broken)
        assert "avail" in b.device.vqs[1].broken_reason
        # a reset (GET_VRING_BASE + fresh setup) recovers the queue
        fe.get_vring_base(1)


# --- front-ends that vanish -------------------------------------------------------------
def test_frontend_vanishing_mid_traffic(served):
    b = served(queue_pairs=2)
    fe = Frontend(b.path, queue_pairs=2)
    fe.negotiate()
    fe.post_rx(0, 32)
    fe.send(0, [b"v" * 64] * 20)
    fe.close()                                        # gone, without a word
    wait_for(lambda: len(b.device.mem) == 0)
    assert all(vq.kick_fd == -1 and vq.call_fd == -1 for vq in b.device.vqs)
    with Frontend(b.path, queue_pairs=2) as fe:
        fe.negotiate()
        still_serves(fe, pair=1)


def test_frontend_vanishing_mid_negotiation(served):
    b = served()
    fe = Frontend(b.path)
    fe.request(R.GET_FEATURES)
    fe.request(R.SET_MEM_TABLE, P.MemoryTable(tuple(fe.region_descs)).pack(), fe.region_fds)
    fe.close()
    wait_for(lambda: len(b.device.mem) == 0)
    with Frontend(b.path) as fe:
        fe.negotiate()
        still_serves(fe)
