"""The Device driven by shardvu.testing.frontend over a real Unix socket."""
from __future__ import annotations

import os
import threading
import time

import pytest

from shardvu import protocol as P
from shardvu.device import Device
from shardvu.testing.frontend import DEFAULT_FEATURES, DEFAULT_PROTOCOL_FEATURES, Frontend, FrontendError
from shardvu.net import NetIface
from shardvu.protocol import ProtocolFeature as PF, Request as R, bit
from shardvu.runner import Runner
from util import wait_for


def frames_for(pair: int, n: int, size: int = 60) -> list:
    return [bytes([pair, i % 256]) + bytes([(pair + i) % 256]) * (size - 2) for i in range(n)]




def test_negotiation(served):
    b = served(queue_pairs=2)
    with Frontend(b.path, queue_pairs=2, backend_req=True) as fe:
        fe.negotiate()
        dev = b.device
        assert dev.features == fe.features
        assert fe.features & bit(P.VIRTIO_RING_F_EVENT_IDX)
        assert dev.protocol_features == fe.protocol_features
        assert fe.protocol_features & bit(PF.REPLY_ACK) and fe.protocol_features & bit(PF.MQ)
        assert fe.max_queues == 4 and dev.owner and dev.backend is not None
        assert dev.status & 0x4               # DRIVER_OK
        for vq in dev.vqs:
            assert vq.started and vq.enabled and vq.ready() and vq.num == 256
        offered = fe.offered_protocol_features
        for unsupported in (PF.RARP, PF.CROSS_ENDIAN, PF.CRYPTO_SESSION, PF.PAGEFAULT):
            assert not offered & bit(unsupported)
        assert not fe.offered_features & bit(P.VIRTIO_F_RING_PACKED)
        assert not fe.offered_features & bit(P.VIRTIO_F_IOMMU_PLATFORM)


def test_traffic_both_ways_on_8_queue_pairs(served):
    b = served(queue_pairs=8)
    with Frontend(b.path, queue_pairs=8, mem_size=128 << 20) as fe:
        fe.negotiate()
        for pair in range(8):
            fe.post_rx(pair, 64)
        for pair in range(8):
            assert fe.send(pair, frames_for(pair, 40)) == 40
        for pair in range(8):
            got = fe.receive(pair, timeout=5, min_frames=40)
            assert got == frames_for(pair, 40), f"pair {pair}"
            wait_for(lambda: fe.reclaim_tx(pair) == 0 and fe.queues[2 * pair + 1].outstanding == 0)
        assert b.echo.echoed == 320 and b.echo.dropped == 0


def test_large_frames_use_indirect_chains_and_merged_rx_buffers(served):
    b = served()
    with Frontend(b.path, tx_buf_size=1024) as fe:
        fe.negotiate()
        assert fe.has_feature(P.VIRTIO_RING_F_INDIRECT_DESC)
        fe.post_rx(0, 32, buf_size=1024)
        frames = [bytes([i]) * 3000 for i in range(5)]
        fe.send(0, frames, indirect=True)
        assert fe.receive(0, timeout=5, min_frames=5) == frames


def _one_by_one(fe, n: int) -> None:
    txq = fe.queues[1]
    for i in range(n):
        fe.send(0, [b"x" * 60])
        wait_for(lambda: txq.used_idx == i + 1)


@pytest.mark.parametrize("event_idx", [True, False])
def test_event_idx_suppresses_calls(served, event_idx):
    b = served()
    feats = DEFAULT_FEATURES if event_idx else DEFAULT_FEATURES & ~bit(P.VIRTIO_RING_F_EVENT_IDX)
    with Frontend(b.path, features=feats) as fe:
        fe.negotiate()
        assert fe.has_feature(P.VIRTIO_RING_F_EVENT_IDX) == event_idx
        fe.post_rx(0, 64)
        _one_by_one(fe, 20)
        txq = b.device.vqs[1]
        if event_idx:
            # used_event stays 0: only the first used entry crosses it.
            assert fe.calls(1) == 1
            assert txq.calls_sent == 1 and txq.notifications_suppressed == 19
        else:
            assert fe.calls(1) == 20
            assert txq.calls_sent == 20


def test_no_interrupt_flag_suppresses_calls_without_event_idx(served):
    b = served()
    with Frontend(b.path, features=DEFAULT_FEATURES & ~bit(P.VIRTIO_RING_F_EVENT_IDX)) as fe:
        fe.negotiate()
        fe.queues[1].disable_interrupts()
        _one_by_one(fe, 5)
        assert fe.calls(1) == 0


def test_dirty_log_marks_exactly_the_pages_written(served):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        fe.post_rx(0, 8)
        dlog = fe.set_log_base()
        fe.set_features(fe.features | bit(P.VHOST_F_LOG_ALL))
        fe.set_vring_addr(0, log=True)
        fe.set_vring_addr(1, log=True)
        dlog.clear()
        fe.send(0, [b"\xab" * 100])
        rxq = fe.queues[0]
        wait_for(lambda: rxq.used_idx == 1 and fe.queues[1].used_idx == 1)
        head, length = rxq.used_elem(0)
        assert length == fe.hdr_len + 100
        gpa = fe._rx_bufs[(0, head)][0]
        expected = {p for p in range(gpa // 4096, (gpa + length - 1) // 4096 + 1)}
        expected |= {fe.queues[0].used_gpa // 4096, fe.queues[1].used_gpa // 4096}
        assert set(dlog.dirty_pages()) == expected
        # Logging off again: nothing more is marked.
        fe.set_features(fe.features & ~bit(P.VHOST_F_LOG_ALL))
        dlog.clear()
        fe.send(0, [b"\xcd" * 100])
        wait_for(lambda: rxq.used_idx == 2)
        assert dlog.dirty_pages() == []


def test_config_space_round_trip_and_config_change(served):
    b = served()
    with Frontend(b.path, backend_req=True) as fe:
        fe.negotiate()
        assert fe.has_protocol(PF.CONFIG)
        cfg = fe.get_config(0, 12)
        assert cfg[:6] == b.echo.iface.mac and cfg[6:8] == b"\x01\x00" and cfg[8:10] == b"\x01\x00"
        fe.set_config(0, b"\x02\x00\x00\xaa\xbb\xcc")
        assert fe.get_config(0, 6) == b"\x02\x00\x00\xaa\xbb\xcc"
        with pytest.raises(FrontendError):
            fe.set_config(6, b"\x00\x00")          # status is read-only
        with pytest.raises(FrontendError):
            fe.get_config(0, 64)                    # beyond config space
        assert b.device.config_changed()
        assert fe.backend_request_count(P.BackendRequest.CONFIG_CHANGE_MSG) == 1


def test_host_notifier_request(served):
    b = served()
    pf = DEFAULT_PROTOCOL_FEATURES | bit(PF.BACKEND_REQ) | bit(PF.HOST_NOTIFIER) | bit(PF.BACKEND_SEND_FD)
    with Frontend(b.path, protocol_features=pf) as fe:
        fe.negotiate()
        fd = os.memfd_create("notify")
        os.ftruncate(fd, 4096)
        try:
            assert b.device.set_queue_host_notifier(0, fd, 4096, 0)
            assert b.device.set_queue_host_notifier(0, -1, 0, 0)
        finally:
            os.close(fd)
        wait_for(lambda: fe.backend_request_count(P.BackendRequest.VRING_HOST_NOTIFIER_MSG) == 2)


def test_inband_notifications(served):
    b = served()
    pf = (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.BACKEND_REQ) | bit(PF.INBAND_NOTIFICATIONS))
    with Frontend(b.path, protocol_features=pf) as fe:
        fe.negotiate()
        assert fe.has_protocol(PF.INBAND_NOTIFICATIONS)
        # no call eventfd on the RX queue: calls must come as messages
        fe.request(R.SET_VRING_CALL, P.pack_u64(0 | P.VRING_NOFD_MASK))
        fe.post_rx(0, 8, kick=False)
        fe.send(0, [b"y" * 60], kick=False)
        fe.request(R.VRING_KICK, P.VringState(1, 0).pack())
        assert fe.receive(0, timeout=5) == [b"y" * 60]
        # the calls came in-band, on the back-end channel
        wait_for(lambda: fe.backend_request_count(P.BackendRequest.VRING_CALL) >= 1)


def test_inband_without_backend_req_closes_the_connection(served):
    b = served()
    with Frontend(b.path) as fe:
        fe.request(R.GET_FEATURES)
        pf = bit(PF.INBAND_NOTIFICATIONS) | bit(PF.REPLY_ACK)
        fe.request(R.SET_PROTOCOL_FEATURES, P.pack_u64(pf))
        assert fe.wait_closed(2.0)
    with Frontend(b.path) as fe:           # and the back-end serves the next one
        fe.negotiate()


def test_ring_states(served):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        fe.post_rx(0, 64)
        fe.send(0, frames_for(0, 5))
        assert len(fe.receive(0, timeout=5, min_frames=5)) == 5
        # GET_VRING_BASE stops the ring and returns the next avail index.
        assert fe.get_vring_base(1) == 5
        assert not b.device.vqs[1].started
        fe.send(0, frames_for(0, 3))
        time.sleep(0.2)
        assert fe.queues[1].used_idx == 5           # a stopped ring is not processed
        assert b.device.vqs[1].last_avail_idx == 5


def test_disabled_tx_ring_is_drained_and_dropped(served):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        fe.post_rx(0, 16)
        fe.set_vring_enable(1, False)
        assert b.device.vqs[1].started and not b.device.vqs[1].enabled
        fe.send(0, frames_for(0, 4))
        wait_for(lambda: fe.queues[1].used_idx == 4)
        assert fe.receive(0, timeout=0.3) == []
        assert b.echo.dropped == 4
        fe.set_vring_enable(1, True)
        fe.send(0, frames_for(0, 2))
        assert len(fe.receive(0, timeout=5, min_frames=2)) == 2


def test_rings_start_enabled_without_protocol_features(served):
    b = served()
    feats = DEFAULT_FEATURES & ~bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
    with Frontend(b.path, features=feats) as fe:
        fe.negotiate()
        assert not fe.has_feature(P.VHOST_USER_F_PROTOCOL_FEATURES)
        assert all(vq.enabled for vq in b.device.vqs)
        fe.post_rx(0, 8)
        fe.send(0, [b"z" * 70])
        assert fe.receive(0, timeout=5) == [b"z" * 70]


def test_status_and_reset_device(served):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        assert fe.get_status() == 0xF        # ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK
        fe.set_status(0x3)
        assert fe.get_status() == 0x3
        fe.reset_device()
        dev = b.device
        assert len(dev.mem) == 0 and dev.features == 0
        assert not any(vq.started or vq.enabled for vq in dev.vqs)
        assert all(vq.kick_fd == vq.call_fd == vq.err_fd == -1 for vq in dev.vqs)
        fe.negotiate()                               # and it can be set up again
        fe.post_rx(0, 4)
        fe.send(0, [b"r" * 64])
        assert fe.receive(0, timeout=5) == [b"r" * 64]


def test_memory_slots_and_several_regions(served):
    b = served()
    with Frontend(b.path, regions=3, mem_size=48 << 20, use_mem_slots=True) as fe:
        fe.negotiate()
        assert fe.max_mem_slots == 509 and len(b.device.mem) == 3
        fe.post_rx(0, 64)
        frames = frames_for(0, 50, size=1500)
        fe.send(0, frames)
        assert fe.receive(0, timeout=5, min_frames=50) == frames
        extra = fe.add_mem_region(4 << 20)
        assert len(b.device.mem) == 4
        fe.remove_mem_region(extra)
        assert len(b.device.mem) == 3


@pytest.mark.parametrize("req,payload", [
    (R.CREATE_CRYPTO_SESSION, b"\0" * 16), (R.CLOSE_CRYPTO_SESSION, P.pack_u64(1)),
    (R.IOTLB_MSG, P.IotlbMsg(0, 4096, 0, 3, 2).pack()), (R.SET_VRING_ENDIAN, P.VringState(0, 1).pack()),
    (R.POSTCOPY_ADVISE, b""), (R.POSTCOPY_LISTEN, b""), (R.SEND_RARP, P.pack_u64(0)),
])
def test_unsupported_requests_are_refused_cleanly(served, caplog, req, payload):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        reply = fe.request(req, payload, need_reply=True, check=False)
        assert reply is not None and reply.request == req
        assert reply.payload in (b"", P.pack_u64(1))
        assert req.name in caplog.text
        fe.post_rx(0, 4)                             # still serving
        fe.send(0, [b"k" * 64])
        assert fe.receive(0, timeout=5) == [b"k" * 64]


def test_gpu_socket_is_refused_and_its_fd_closed(served, caplog):
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        r, w = os.pipe()
        try:
            with pytest.raises(FrontendError):
                fe.request(R.GPU_SET_SOCKET, b"", [r], need_reply=True)
        finally:
            os.close(r)
            os.close(w)
        assert "GPU_SET_SOCKET" in caplog.text


def test_inflight_resubmission_after_reconnect(tmp_path, fd_guard):
    path = str(tmp_path / "inflight.sock")
    dev = Device(2, NetIface(1))
    held = []
    state = {"hold": True, "completed": []}

    def on_tx(d, q):
        vq = d.vqs[q]
        while True:
            elem = vq.pop()
            if elem is None:
                break
            if state["hold"]:
                held.append(elem.index)
                continue
            state["completed"].append(bytes(b"".join(elem.out_sg))[12:])
            vq.push(elem, 0)
        vq.notify()

    dev.set_queue_handler(1, on_tx)
    runner = Runner(dev)
    t = threading.Thread(target=runner.serve, args=(path,), daemon=True)
    t.start()
    wait_for(lambda: os.path.exists(path))
    try:
        with Frontend(path, inflight=True) as fe:
            fe.negotiate()
            assert fe.inflight_fd >= 0
            frames = frames_for(0, 6)
            fe.send(0, frames)
            wait_for(lambda: len(held) == 6)
            # the back-end "crashes": the connection drops with 6 requests inflight
            state["hold"] = False
            fe.reconnect(path)
            fe.kick(1)
            wait_for(lambda: len(state["completed"]) == 6)
            # resubmitted in the order they were first fetched, each exactly once
            assert state["completed"] == frames
            wait_for(lambda: fe.queues[1].used_idx == 6)
            fe.send(0, frames_for(0, 2))
            wait_for(lambda: len(state["completed"]) == 8)
    finally:
        runner.stop()
        t.join(5)


def test_log_fd_is_kicked_when_the_log_changes(served):
    from shardvu.eventfd import drain, eventfd
    b = served()
    with Frontend(b.path) as fe:
        fe.negotiate()
        fe.post_rx(0, 8)
        efd = eventfd()
        try:
            fe.request(R.SET_LOG_FD, b"", [efd])
            fe.set_log_base()
            fe.set_features(fe.features | bit(P.VHOST_F_LOG_ALL))
            drain(efd)
            fe.send(0, [b"l" * 80])
            assert fe.receive(0, timeout=5) == [b"l" * 80]
            assert drain(efd) >= 1
        finally:
            os.close(efd)


def test_inband_error_notification(served):
    from shardvu.testing.driver import VRING_DESC_F_NEXT
    b = served()
    pf = (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.BACKEND_REQ) | bit(PF.INBAND_NOTIFICATIONS))
    with Frontend(b.path, protocol_features=pf) as fe:
        fe.negotiate()
        fe.request(R.SET_VRING_ERR, P.pack_u64(1 | P.VRING_NOFD_MASK))
        q = fe.queues[1]
        q.write_desc(0, fe.alloc(64), 64, VRING_DESC_F_NEXT, 0)
        q.push_avail(0)
        q.write_avail_idx(q.avail_idx)
        fe.kick(1)
        wait_for(lambda: fe.backend_request_count(P.BackendRequest.VRING_ERR) == 1)


class _InOrder(NetIface):
    def queue_is_processed_in_order(self, dev, qidx):
        return True


@pytest.mark.parametrize("in_order", [True, False])
def test_processed_in_order_resumes_at_the_used_index(tmp_path, fd_guard, in_order):
    path = str(tmp_path / "order.sock")
    dev = Device(2, _InOrder(1) if in_order else NetIface(1))
    runner = Runner(dev)
    t = threading.Thread(target=runner.serve, args=(path,), daemon=True)
    t.start()
    wait_for(lambda: os.path.exists(path))
    try:
        with Frontend(path) as fe:
            # a stale base (7) while the used ring says 0
            fe.negotiate(vring_bases={0: 7, 1: 7})
            assert dev.vqs[1].last_avail_idx == (0 if in_order else 7)
    finally:
        runner.stop()
        t.join(5)


def test_qemu_style_duplicate_add_mem_reg_and_early_enable(served):
    """QEMU 7.2 sends ADD_MEM_REG once per queue pair and SET_VRING_ENABLE
    before SET_FEATURES: both must be accepted."""
    b = served(queue_pairs=2)
    with Frontend(b.path, queue_pairs=2, use_mem_slots=True) as fe:
        fe.request(R.GET_FEATURES)
        fe.request(R.GET_PROTOCOL_FEATURES)
        fe.request(R.SET_PROTOCOL_FEATURES, P.pack_u64(bit(PF.REPLY_ACK) | bit(PF.CONFIGURE_MEM_SLOTS)
                                                       | bit(PF.MQ)))
        fe._reply_ack = True
        fe.request(R.SET_VRING_ENABLE, P.VringState(0, 1).pack())     # before SET_FEATURES
        for _ in range(2):
            fe.request(R.ADD_MEM_REG, P.MemRegMsg(fe.region_descs[0]).pack(), [fe.region_fds[0]])
        assert len(b.device.mem) == 1 and b.device.mem.regions[0].refs == 2
        fe.request(R.REM_MEM_REG, P.MemRegMsg(fe.region_descs[0]).pack())
        assert len(b.device.mem) == 1


# -- Device.handle's typed outcome ----------------------------------------------------
from shardvu.device import Outcome, Unwatch, Watch  # noqa: E402
from shardvu.protocol import Message, MemoryRegion  # noqa: E402
from shardvu import eventfd  # noqa: E402
from util import fd_is_open, memfd  # noqa: E402

UVA = 0x7F00_0000_0000


def _msg(req, payload=b"", fds=(), need_reply=True):
    return Message(req, P.VERSION | (P.FLAG_NEED_REPLY if need_reply else 0), payload, list(fds))


def _acked_device(**kw) -> Device:
    dev = Device(2, NetIface(1), **kw)
    assert dev.handle(_msg(R.SET_PROTOCOL_FEATURES, P.pack_u64(bit(PF.REPLY_ACK)))).ok
    return dev


def test_outcome_of_success_and_of_failure():
    dev = _acked_device()
    out = dev.handle(_msg(R.GET_FEATURES))
    assert isinstance(out, Outcome) and out.ok and out.reason == "" and out.changed == ()
    assert len(out.replies) == 1 and P.unpack_u64(out.replies[0].data[12:]) == dev.offered_features()
    out = dev.handle(_msg(R.SET_VRING_NUM, P.VringState(1, 3).pack()))
    assert not out.ok and "power of two" in out.reason and out.changed == ()
    assert [P.unpack_u64(r.data[12:]) for r in out.replies] == [1]      # REPLY_ACK failure
    out = dev.handle(_msg(R.SET_VRING_NUM, P.VringState(1, 256).pack()))
    assert out.ok and out.changed == (1,)
    assert [P.unpack_u64(r.data[12:]) for r in out.replies] == [0]
    dev.close()


def test_outcome_names_the_fd_actions_and_the_changed_queues():
    dev = _acked_device()
    kick = eventfd.eventfd()
    out = dev.handle(_msg(R.SET_VRING_KICK, P.pack_u64(0), [os.dup(kick)]))
    assert out.ok and out.changed == (0,)
    assert [type(a) for a in out.actions] == [Watch] and out.actions[0].qidx == 0
    watched = out.actions[0].fd
    out = dev.handle(_msg(R.GET_VRING_BASE, P.VringState(0, 0).pack()))
    assert out.ok and out.changed == (0,)
    assert [(type(a), a.fd) for a in out.actions] == [(Unwatch, watched)]
    fd = memfd(1 << 20)
    table = P.MemoryTable((MemoryRegion(0, 1 << 20, UVA, 0),)).pack()
    out = dev.handle(_msg(R.SET_MEM_TABLE, table, [fd]))
    assert out.ok and out.changed == (0, 1)          # device-wide: every queue
    dev.close()
    os.close(kick)


def test_refuse_turns_an_applied_request_into_a_failure():
    dev = _acked_device()
    msg = _msg(R.SET_VRING_NUM, P.VringState(0, 64).pack())
    out = dev.handle(msg)
    errors = dev.errors
    refused = dev.refuse(msg, out, "worker 0 is gone")
    assert not refused.ok and refused.reason == "worker 0 is gone" and refused.changed == (0,)
    assert [P.unpack_u64(r.data[12:]) for r in refused.replies] == [1]
    assert dev.errors == errors + 1
    dev.close()


def test_an_unmapped_device_checks_ring_addresses_by_arithmetic():
    """The sharded control's Device: regions kept, never mapped; ring
    addresses checked against the table alone."""
    dev = _acked_device(map_memory=False)
    fd = memfd(1 << 20)
    table = P.MemoryTable((MemoryRegion(0, 1 << 20, UVA, 0),)).pack()
    assert dev.handle(_msg(R.SET_MEM_TABLE, table, [fd])).ok
    assert dev.mem.regions[0].view is None
    assert dev.handle(_msg(R.SET_VRING_NUM, P.VringState(0, 256).pack())).ok
    inside = P.VringAddr(0, 0, UVA + 0x1000, UVA + 0x3000, UVA + 0x2000, 0).pack()
    assert dev.handle(_msg(R.SET_VRING_ADDR, inside)).ok
    assert not dev.vqs[0].mapped
    outside = P.VringAddr(0, 0, UVA + (1 << 20) - 16, UVA + 0x3000, UVA + 0x2000, 0).pack()
    out = dev.handle(_msg(R.SET_VRING_ADDR, outside))
    assert not out.ok and "descriptor table" in out.reason and "not inside one memory region" in out.reason
    snap = dev.queue_snapshot(0)
    assert snap.addr == tuple(P.VringAddr.unpack(inside)) and snap.region_fds == (dev.mem.regions[0].fd,)
    dev.close()
    assert not fd_is_open(fd)


def test_base_serial_changes_only_when_the_front_end_sets_a_base():
    dev = _acked_device()
    s0 = dev.queue_snapshot(1)
    dev.handle(_msg(R.SET_VRING_NUM, P.VringState(1, 64).pack()))
    assert dev.queue_snapshot(1).base_serial == s0.base_serial
    dev.handle(_msg(R.SET_VRING_BASE, P.VringState(1, 9).pack()))
    s1 = dev.queue_snapshot(1)
    assert s1.base == 9 and s1.base_serial != s0.base_serial and s1.generation == s0.generation
    dev.handle(_msg(R.SET_VRING_BASE, P.VringState(1, 9).pack()))
    assert dev.queue_snapshot(1).base_serial != s1.base_serial
    dev.close()
    assert dev.queue_snapshot(1).generation != s1.generation


@pytest.mark.parametrize("kind", ["pipe_write_end", "memfd", "socket"])
def test_kick_call_err_and_log_fds_must_be_eventfds(kind):
    """A pipe's write end cannot be read, a file is always readable: such a
    kick fd would crash or spin the ring's reader.  Refused, fd closed."""
    import socket as socketlib
    dev = _acked_device()
    for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_LOG_FD):
        keep = []
        if kind == "pipe_write_end":
            r, w = os.pipe()
            keep, fd = [r], w
        elif kind == "memfd":
            fd = memfd(4096)
        else:
            a, b = socketlib.socketpair()
            keep, fd = [a], b.detach()
        payload = b"" if req == R.SET_LOG_FD else P.pack_u64(1)
        out = dev.handle(_msg(req, payload, [fd]))
        assert not out.ok and "not an eventfd" in out.reason, out
        assert not fd_is_open(fd)
        for k in keep:
            k.close() if hasattr(k, "close") else os.close(k)
    efd = eventfd.eventfd()
    assert dev.handle(_msg(R.SET_VRING_CALL, P.pack_u64(1), [efd])).ok
    dev.close()
