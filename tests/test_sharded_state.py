"""One ring state in the sharded runtime: regressions of the defects the two
copies of it had (issue 10), on ``shardvu run`` and on the ShardedDevice
in-process, with shardvu's Python front-end."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from shardvu import protocol as P
from shardvu.control.pool import WorkerPool
from shardvu.control.server import ControlRunner
from shardvu.control.sharded import ShardedDevice
from shardvu.net import NetIface
from shardvu.protocol import ProtocolFeature as PF, Request as R
from shardvu.testing.driver import VRING_DESC_F_NEXT
from shardvu.testing.frontend import Frontend, FrontendError

from util import wait_for


def frames(pair: int, n: int, size: int = 64):
    return [bytes([pair, i & 0xFF]) + bytes(size - 2) for i in range(n)]


def test_set_status_0_then_set_vring_kick_keeps_guest_notifications(runtime):
    """A virtio reset (SET_STATUS 0) stops every ring; a new kick fd restarts
    one.  The call fd was never replaced, so the guest must still be told
    about used buffers (the worker's own copy once closed it at the stop,
    while the control process kept it)."""
    rt = runtime(1)
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        assert fe.has_protocol(PF.STATUS)
        fe.send(0, frames(0, 3))
        wait_for(lambda: fe.queues[1].used_idx == 3)
        wait_for(lambda: fe.calls(1) >= 1)
        assert fe.reclaim_tx(0) == 3
        fe.queues[1].enable_interrupts()         # a call for the next used entry, please
        fe.set_status(0)
        fe.request(R.SET_VRING_KICK, P.pack_u64(1), [fe.kick_fds[1]])
        calls = fe.calls(1)
        fe.send(0, frames(0, 3))
        wait_for(lambda: fe.queues[1].used_idx == 6)
        wait_for(lambda: fe.calls(1) > calls)


def test_broken_reason_does_not_outlive_a_new_connection(runtime):
    rt = runtime(1, "loopback")
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        q = fe.queues[1]
        q.write_desc(0, fe.alloc(64), 64, VRING_DESC_F_NEXT, 0)     # a loop
        q.push_avail(0)
        q.write_avail_idx(q.avail_idx)
        fe.kick(1)
        wait_for(lambda: rt.queue_stats()[1]["state"] == "broken", interval=0.1)
        assert rt.queue_stats()[1]["broken_reason"]
    wait_for(lambda: rt.queue_stats()[1]["state"] != "broken", interval=0.1)
    assert rt.queue_stats()[1]["broken_reason"] is None
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 8)
        fe.send(0, frames(0, 3))
        assert len(fe.receive(0, timeout=5, min_frames=3)) == 3
        wait_for(lambda: rt.queue_stats()[1]["state"] == "running", interval=0.1)
        assert rt.queue_stats()[1]["broken_reason"] is None


def test_a_truncated_region_does_not_kill_the_control_process(runtime):
    """The front-end shrinks a region's memfd after SET_MEM_TABLE.  The
    control process never maps guest memory, and a worker re-checks the
    file (fstat) before it maps: the request is refused, nothing dies."""
    rt = runtime(1)
    children = {p.pid for p in rt.workers()}
    with Frontend(rt.sock) as fe:
        fe.request(R.GET_FEATURES)
        fe.request(R.SET_PROTOCOL_FEATURES, P.pack_u64(P.bit(PF.REPLY_ACK)))
        fe._reply_ack = True
        fe.request(R.SET_FEATURES, P.pack_u64(P.bit(P.VIRTIO_F_VERSION_1)
                                              | P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)))
        fe.request(R.SET_MEM_TABLE, P.MemoryTable(tuple(fe.region_descs)).pack(), fe.region_fds)
        os.ftruncate(fe.region_fds[0], 0)        # (this process no longer touches it)
        uva = fe.region_descs[0].uva
        with pytest.raises(FrontendError):       # the worker finds the file shrunk
            fe.request(R.SET_VRING_NUM, P.VringState(1, 256).pack())
        with pytest.raises(FrontendError):
            fe.request(R.SET_VRING_ADDR, P.VringAddr(1, 0, uva + 0x1000, uva + 0x3000,
                                                     uva + 0x2000, 0).pack())
        time.sleep(0.3)
        assert rt.proc.poll() is None, rt.log()
    assert rt.proc.poll() is None
    assert "SET_VRING_ADDR" in rt.log()
    with Frontend(rt.sock) as fe:               # and the next front-end is served
        fe.negotiate()
        fe.send(0, frames(0, 2))
        wait_for(lambda: fe.queues[1].used_idx == 2)
    assert len(rt.workers()) == 2
    assert {p.pid for p in rt.workers()} == children or rt.proc.poll() is None


# -- in-process: a dead worker is replaced for the next connection ----------------
@pytest.fixture
def served(tmp_path):
    path = str(tmp_path / "sharded.sock")
    pool = WorkerPool(2, "loopback")
    pool.start()
    dev = ShardedDevice(pool, NetIface(1, in_order=True))
    runner = ControlRunner(dev, None)
    t = threading.Thread(target=runner.serve, args=(path,), daemon=True)
    t.start()
    wait_for(lambda: os.path.exists(path))
    yield path, pool, dev
    runner.stop()
    t.join(5)
    pool.stop()


def control_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_killed_worker_is_replaced_for_the_next_connection(served):
    path, pool, dev = served
    with Frontend(path) as fe:
        fe.negotiate()
        fe.post_rx(0, 8)
        fe.send(0, frames(0, 2))
        assert len(fe.receive(0, timeout=5, min_frames=2)) == 2
    time.sleep(0.3)
    fds = control_fds()
    victim = pool[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.process.join(5)
    with Frontend(path) as fe:                   # no "worker 1 is dead": a fresh worker
        fe.negotiate()
        assert pool[1].pid != victim.pid and pool[1].alive
        fe.post_rx(0, 8)
        fe.send(0, frames(0, 3))
        assert len(fe.receive(0, timeout=5, min_frames=3)) == 3
    time.sleep(0.3)
    assert control_fds() == fds                  # the dead worker's channel went with it


def test_a_worker_killed_mid_session_is_replaced_at_the_reset(served):
    path, pool, dev = served
    with Frontend(path) as fe:
        fe.negotiate()
        victim = pool[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.join(5)
        fe.reset_device()                        # RESET_DEVICE: dead workers replaced
        assert pool[0].pid != victim.pid and pool[0].alive
        fe.negotiate()
        fe.post_rx(0, 8)
        fe.send(0, frames(0, 3))
        assert len(fe.receive(0, timeout=5, min_frames=3)) == 3


def test_the_control_process_never_maps_guest_memory(runtime):
    rt = runtime(1, "loopback")
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 8)
        fe.send(0, frames(0, 2))
        assert len(fe.receive(0, timeout=5, min_frames=2)) == 2

        def guest_maps(pid: int) -> int:
            with open(f"/proc/{pid}/maps") as f:
                return sum("shardvu-guest" in line for line in f)
        assert guest_maps(rt.proc.pid) == 0
        assert all(guest_maps(w.pid) > 0 for w in rt.workers())


def worker_fds(pool) -> dict:
    return {w.index: len(os.listdir(f"/proc/{w.pid}/fd")) for w in pool.workers}


def test_a_session_leaves_no_fd_behind_in_the_control_or_the_workers(served):
    path, pool, dev = served
    with Frontend(path) as fe:              # a first session: lazily opened things exist
        fe.negotiate()
    time.sleep(0.3)
    control, workers = control_fds(), worker_fds(pool)
    for _ in range(2):
        with Frontend(path, regions=3) as fe:
            fe.negotiate()
            fe.set_log_base()
            fe.get_inflight_fd()
            fe.set_vring_addr(1)
            fe.post_rx(0, 8)
            fe.send(0, frames(0, 4))
            assert len(fe.receive(0, timeout=5, min_frames=4)) == 4
            assert worker_fds(pool)[1] > workers[1]     # the session's fds, in the worker
        time.sleep(0.3)
        assert control_fds() == control
        assert worker_fds(pool) == workers


def test_a_dead_worker_fails_only_the_requests_for_its_queue(served):
    path, pool, dev = served
    dev.replaces_dead_workers = False          # as under a respawning supervisor
    with Frontend(path) as fe:
        fe.negotiate()
        victim = pool[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.join(5)
        with pytest.raises(FrontendError):
            fe.set_vring_enable(0, False)      # queue 0's barrier cannot pass
        fe.set_vring_enable(1, False)          # queue 1's can
        fe.set_vring_enable(1, True)
        fe.send(0, frames(0, 2))
        wait_for(lambda: fe.queues[1].used_idx == 2)


def test_memory_slots_added_and_removed_while_running(runtime):
    """CONFIGURE_MEM_SLOTS: each ADD_MEM_REG / REM_MEM_REG reaches the
    workers as a new region set (QEMU 7.2 adds every region once per queue
    pair: the repeats change nothing)."""
    rt = runtime(2, "loopback")
    with Frontend(rt.sock, queue_pairs=2, regions=2, use_mem_slots=True) as fe:
        fe.negotiate()
        again = fe.region_descs[0]
        fe.request(R.ADD_MEM_REG, P.MemRegMsg(again).pack(), [fe.region_fds[0]])   # a repeat
        extra = fe.add_mem_region(1 << 20)
        for pair in range(2):
            fe.post_rx(pair, 8)
            fe.send(pair, frames(pair, 3))
            assert len(fe.receive(pair, timeout=5, min_frames=3)) == 3
        fe.remove_mem_region(extra)
        fe.request(R.REM_MEM_REG, P.MemRegMsg(again).pack())      # the repeat's reference
        fe.send(1, frames(1, 2))
        assert len(fe.receive(1, timeout=5, min_frames=2)) == 2


def test_a_kick_fd_that_cannot_be_read_is_refused_and_kills_no_worker(runtime):
    """Found by the protocol fuzzer: SET_VRING_KICK with a pipe's write end
    crashed the worker reading it (EBADF)."""
    rt = runtime(1)
    children = {p.pid for p in rt.workers()}
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        r, w = os.pipe()
        try:
            with pytest.raises(FrontendError):
                fe.request(R.SET_VRING_KICK, P.pack_u64(1), [w])
        finally:
            os.close(r)
            os.close(w)
        fe.request(R.SET_VRING_KICK, P.pack_u64(1), [fe.kick_fds[1]])
        fe.send(0, frames(0, 2))
        wait_for(lambda: fe.queues[1].used_idx == 2)
    assert {p.pid for p in rt.workers()} == children
    assert "not an eventfd" in rt.log()


def _tx_accounted(rt):
    s = rt.queue_stats()[1]
    return s["packets"], s["drops_by_reason"]["ring_disabled"]


@pytest.mark.parametrize("port", ["sink", "loopback"])
def test_a_ring_started_before_its_enable_keeps_its_tx_for_the_enable(runtime, port):
    """Front-ends enable a ring after SET_VRING_KICK (QEMU; DPDK's
    virtio-user transmits before the back-end has taken the enable, its
    testpmd --tx-first burst was lost on pairs > 0): what the driver queued
    in between stays in the ring, untouched, and is served at the enable.
    A ring the driver disables after enabling it discards its TX, counted
    as ring_disabled (the spec's rule for a disabled ring)."""
    rt = runtime(1, port)
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 64)
        fe.get_vring_base(1)                    # stop the TX ring,
        fe.set_vring_enable(1, False)           # disable it,
        fe.request(R.SET_VRING_KICK, P.pack_u64(1), [fe.kick_fds[1]])    # start it again
        assert fe.send(0, frames(0, 8)) == 8
        time.sleep(1.0)
        assert fe.queues[1].used_idx == 0 and _tx_accounted(rt) == (0, 0)
        fe.set_vring_enable(1, True)
        wait_for(lambda: _tx_accounted(rt) == (8, 0), timeout=10)
        if port == "loopback":
            assert len(fe.receive(0, timeout=10, min_frames=8)) == 8
        fe.reclaim_tx(0)
        fe.set_vring_enable(1, False)           # enabled since it started: now discards
        assert fe.send(0, frames(0, 5)) == 5
        wait_for(lambda: _tx_accounted(rt) == (8, 5), timeout=10)
        wait_for(lambda: fe.queues[1].used_idx == 13)


def test_frames_left_in_the_pair_ring_do_not_reach_the_next_session(runtime):
    """Frames the TX worker handed to the pair's ring while the guest had
    no RX buffers belong to that guest: after a reconnect (a ring reset)
    the RX worker drops them, counted as ring_disabled, and the new guest
    receives only its own frames."""
    rt = runtime(1, "loopback")
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        assert fe.send(0, frames(0, 6)) == 6            # no RX buffers posted
        wait_for(lambda: rt.queue_stats()[1]["packets"] == 6, timeout=10)
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 16)
        want = [bytes([0xAA, i]) + bytes(62) for i in range(4)]
        assert fe.send(0, want) == 4
        got = fe.receive(0, timeout=10, min_frames=4)
        time.sleep(0.5)
        got += fe.receive(0, timeout=0.2, min_frames=0)
        assert got == want
    wait_for(lambda: rt.queue_stats()[0]["drops_by_reason"]["ring_disabled"] == 6, timeout=10)
