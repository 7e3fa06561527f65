"""Hostile or broken front-ends and guests: each gets a clear error, the
back-end keeps serving, and no fd leaks (the ``served`` fixture counts
/proc/self/fd before and after every test)."""
from __future__ import annotations

import os
import signal
import socket
import struct
import time
from typing import Optional

import pytest

from shardvu import protocol as P
from shardvu.testing.driver import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from shardvu.testing.frontend import Frontend, FrontendError
from shardvu.protocol import Request as R
from util import fd_is_open, memfd, wait_for




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
            expect_nack(fe, caplog, R.SET_MEM_TABLE, table, [r], reason="not a file that can be mapped")
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


# --- the control process of `shardvu run` --------------------------------------------
# Each of these killed the whole back-end (every queue of the guest with it).
# They run against `shardvu run --port loopback` with its workers: the control
# process and every worker keep their pids, the control's fd count is what
# it was, and a well-formed frame still loops back.

from shardvu.backend import BackendChannel
from shardvu.eventfd import eventfd
from shardvu.testing.fuzz import Target, loops_back
from shardvu.testing.runtime import Runtime


class _Control:
    """One `shardvu run` shared by the tests of this module; a test that
    killed it gets it replaced for the next one (so each fails on its own)."""

    def __init__(self, path: str):
        self.path = path
        self.rt: Optional[Runtime] = None

    def ensure(self) -> Runtime:
        if self.rt is not None and (self.rt.proc.poll() is not None or loops_back(self.path)):
            self.rt.stop(signal.SIGKILL)
            self.rt = None
        if self.rt is None:
            if os.path.exists(self.path):
                os.unlink(self.path)
            self.rt = Runtime(self.path, 1, "loopback")
        return self.rt


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    ctl = _Control(str(tmp_path_factory.mktemp("control") / "vu.sock"))
    yield ctl
    if ctl.rt is not None:
        assert ctl.rt.stop() == 0


@pytest.fixture
def survivor(control):
    """The runtime, checked after the test: same processes, same fds,
    frames still loop back, no traceback logged."""
    rt = control.ensure()
    assert loops_back(rt.sock) is None      # also the warm-up the fd baseline needs
    target = Target(rt.proc.pid, rt.log_path)
    yield rt
    assert loops_back(rt.sock) is None
    assert target.deaths() == []
    assert target.log_errors() == []
    assert target.leaks() == []


def runtime_nack(rt: Runtime, fe: Frontend, req: int, payload: bytes = b"", fds=(),
                 reason: str = "") -> None:
    """A REPLY_ACK failure, and a log line naming the request and ``reason``."""
    before = len(rt.log())
    with pytest.raises(FrontendError) as exc:
        fe.request(req, payload, fds, need_reply=True)
    assert exc.value.code != 0
    wait_for(lambda: f"{P.request_name(req)}: " in rt.log()[before:], timeout=5)
    line = next(l for l in rt.log()[before:].splitlines() if f"{P.request_name(req)}: " in l)
    assert reason in line, line


@pytest.mark.parametrize("code", [0, 41, 63, 255, 0xFFFFFFFF])
def test_request_code_without_a_payload_size(survivor, code):
    with Frontend(survivor.sock, mem_size=4 << 20) as fe:
        fe.negotiate()
        runtime_nack(survivor, fe, code, b"", reason="request")
        runtime_nack(survivor, fe, code, bytes(8), reason="request")
        assert len(fe.request(R.GET_FEATURES).payload) == 8         # still answering


def test_request_code_0_names_the_code_in_the_log(survivor):
    with Frontend(survivor.sock, mem_size=4 << 20) as fe:
        fe.negotiate()
        runtime_nack(survivor, fe, 0, reason="request code 0")


@pytest.mark.parametrize("desc,fd_size,reason", [
    (P.InflightDesc(4096, 0, 2, 3), 4096, "power of two"),            # queue size 3
    (P.InflightDesc(4096, 0, 2, 0), 4096, "power of two"),
    (P.InflightDesc(1 << 20, 0, 2, 256), 4096, "bytes"),               # size beyond the fd
    (P.InflightDesc(4096, 1 << 20, 2, 64), 1 << 20, "bytes"),          # offset + size beyond it
    (P.InflightDesc(4096, (1 << 64) - 4096, 2, 64), 1 << 20, "offset"),
    (P.InflightDesc(64, 0, 2, 256), 1 << 20, "needed"),                # too small for 2 queues
])
def test_inflight_geometry_the_back_end_refuses(survivor, desc, fd_size, reason):
    with Frontend(survivor.sock, mem_size=4 << 20) as fe:
        fe.negotiate()
        fd = memfd(fd_size)
        try:
            runtime_nack(survivor, fe, R.SET_INFLIGHT_FD, desc.pack(), [fd], reason=reason)
        finally:
            os.close(fd)
        fe.get_inflight_fd()            # a good one still works
        fe.set_inflight_fd()


@pytest.mark.parametrize("kind", ["eventfd", "pipe", "memfd"])
def test_inflight_fd_that_is_no_file(survivor, kind):
    with Frontend(survivor.sock, mem_size=4 << 20) as fe:
        fe.negotiate()
        fds = {"eventfd": lambda: [eventfd()], "pipe": lambda: list(os.pipe()),
               "memfd": lambda: [memfd(0)]}[kind]()
        try:
            runtime_nack(survivor, fe, R.SET_INFLIGHT_FD, P.InflightDesc(4096, 0, 2, 64).pack(),
                         fds[:1], reason="inflight")
        finally:
            for fd in fds:
                os.close(fd)


def not_a_channel(kind: str):
    """(fd to send, fds to close afterwards)."""
    if kind == "eventfd":
        fd = eventfd()
        return fd, [fd]
    if kind == "pipe":
        r, w = os.pipe()
        return w, [r, w]
    if kind == "memfd":
        fd = memfd(4096)
        return fd, [fd]
    if kind == "listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"\0shardvu-test-{os.getpid()}-{time.monotonic_ns()}")
        s.listen(1)
        fd = s.detach()
        return fd, [fd]
    if kind == "unconnected":
        fd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()
        return fd, [fd]
    if kind == "datagram":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return a.fileno(), [a.detach(), b.detach()]
    if kind == "inet":
        fd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()
        return fd, [fd]
    raise ValueError(kind)


CHANNEL_KINDS = ["eventfd", "pipe", "memfd", "listening", "unconnected", "datagram", "inet"]


@pytest.mark.parametrize("kind", CHANNEL_KINDS)
def test_backend_request_fd_that_is_not_a_connected_unix_stream_socket(survivor, kind):
    with Frontend(survivor.sock, mem_size=4 << 20, backend_req=True) as fe:
        fe.negotiate()
        fd, close = not_a_channel(kind)
        try:
            runtime_nack(survivor, fe, R.SET_BACKEND_REQ_FD, b"", [fd], reason="back-end request fd")
        finally:
            for c in close:
                os.close(c)
        fe._setup_backend_channel()          # a proper channel is still taken


@pytest.mark.parametrize("kind", CHANNEL_KINDS)
def test_backend_channel_closes_what_it_refuses(kind, fd_guard):
    fd, close = not_a_channel(kind)
    dup = os.dup(fd)
    try:
        with pytest.raises(ValueError):
            BackendChannel(dup)
        assert not fd_is_open(dup)          # closed once, by the channel
    finally:
        for c in close:
            os.close(c)


@pytest.mark.parametrize("fds,size,offset,reason", [
    (lambda: [memfd(4096)], 8192, 0, "bytes"),
    (lambda: [memfd(8192)], 4096, 8192, "bytes"),
    (lambda: [memfd(8192)], 0, 0, "zero"),
    (lambda: [eventfd()], 4096, 0, "anonymous inode"),
    (lambda: list(os.pipe()), 4096, 0, "pipe"),
])
def test_dirty_log_fd_checked_before_it_is_mapped(survivor, fds, size, offset, reason):
    with Frontend(survivor.sock, mem_size=4 << 20) as fe:
        fe.negotiate()
        made = fds()
        before = len(survivor.log())
        try:
            reply = fe.request(R.SET_LOG_BASE, P.LogArea(size, offset).pack(), made[:1])
        finally:
            for fd in made:
                os.close(fd)
        assert reply is not None and reply.u64() != 0          # SET_LOG_BASE's own status
        wait_for(lambda: "SET_LOG_BASE: " in survivor.log()[before:])
        assert reason in survivor.log()[before:]
        fe.set_log_base()


def test_region_memfd_truncated_after_set_mem_table(tmp_path):
    """The front-end's own violation: its memfd shrinks under the mappings.
    The control process never touches guest memory, so it does not die: it
    keeps answering, even requests about the rings in that memory, and the
    next connection is served.  (A worker that touches the ring dies of
    SIGBUS: the crash-isolation case, so workers are not counted here.)"""
    rt = Runtime(str(tmp_path / "vu.sock"), 1, "loopback")
    try:
        control = rt.proc.pid
        with Frontend(rt.sock, mem_size=4 << 20) as fe:
            fe.negotiate()
            os.ftruncate(fe.region_fds[0], 0)
            for q in range(fe.num_queues):      # requests about the rings
                vq = fe.queues[q]
                addr = P.VringAddr(q, 0, fe.gpa_to_uva(vq.desc_gpa), fe.gpa_to_uva(vq.used_gpa),
                                   fe.gpa_to_uva(vq.avail_gpa), vq.used_gpa)
                fe.request(R.SET_VRING_ADDR, addr.pack(), check=False)
                fe.request(R.GET_VRING_BASE, P.VringState(q, 0).pack(), check=False)
                fe.request(R.SET_VRING_KICK, P.pack_u64(q), [fe.kick_fds[q]], check=False)
                fe.kick(q)
            fe.request(R.SET_MEM_TABLE, P.MemoryTable(tuple(fe.region_descs)).pack(),
                       fe.region_fds, check=False)
            assert len(fe.request(R.GET_FEATURES).payload) == 8
        assert rt.proc.poll() is None and rt.proc.pid == control
        # Workers that touched the shrunk memory died of SIGBUS and are being
        # replaced: a request that reaches a queue before its replacement
        # has applied the snapshot fails (REPLY_ACK), and the next try is
        # served.
        for attempt in range(10):
            with Frontend(rt.sock, mem_size=4 << 20) as fe:
                try:
                    fe.negotiate()
                except FrontendError:
                    time.sleep(0.5)
                    continue
                assert len(fe.request(R.GET_FEATURES).payload) == 8
                break
        else:
            raise AssertionError("no connection was served after the memfd was truncated")
    finally:
        assert rt.stop() == 0
