"""A worker's command handling, in-process (the barrier protocol's other end):
the whole command set is apply (a QueueSnapshot), start, stop, stats, exit."""
from __future__ import annotations

import os

import pytest

from shardvu.snapshot import LogPart, QueueSnapshot, RegionPart, SNAPSHOT_VERSION
from shardvu.workers import ctl
from shardvu.workers.ports import resolve
from shardvu.workers.worker import Worker

from util import fd_is_open, memfd

ADDR = (1, 0, 0x10000, 0x12000, 0x11000, 0)      # index, flags, desc, used, avail, log


@pytest.fixture
def worker():
    mine, theirs = ctl.socketpair()
    w = Worker(1, theirs, resolve("sink"), 64, None)
    yield w
    w.release()
    mine.close()
    theirs.close()


def apply(w: Worker, snap: QueueSnapshot) -> dict:
    """Apply ``snap`` as the channel would deliver it: with fresh copies of its fds."""
    obj, fds = snap.encode()
    return w.handle({"cmd": "apply", "snapshot": obj}, [os.dup(fd) for fd in fds])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_command_set_is_small_and_named(worker):
    assert Worker.COMMANDS == ("apply", "start", "stop", "stats", "exit")
    for old in ("ring", "fd", "mem_add", "mem_clear", "mem_rem", "features", "enable",
                "log", "log_call", "inflight", "spsc", "reset"):
        assert not hasattr(worker, "_cmd_" + old)
        assert not worker.handle({"cmd": old}, [])["ok"]


def test_unknown_command_is_refused_and_its_fds_closed(worker):
    fd = memfd(4096)
    reply = worker.handle({"cmd": "bogus"}, [fd])
    assert reply == {"ok": False, "error": "bogus: unknown command 'bogus'"}
    assert not fd_is_open(fd)


def test_fds_a_command_does_not_take_are_closed(worker):
    fd = memfd(4096)
    assert worker.handle({"cmd": "stats"}, [fd])["ok"]
    assert not fd_is_open(fd)


def test_a_snapshot_of_another_version_is_refused_with_its_fds_closed(worker):
    obj, _ = QueueSnapshot(1).encode()
    obj["version"] = SNAPSHOT_VERSION + 1
    fd = memfd(4096)
    obj["kick"] = 0
    reply = worker.handle({"cmd": "apply", "snapshot": obj}, [fd])
    assert not reply["ok"] and "version" in reply["error"] and "cannot be read" in reply["error"]
    assert not fd_is_open(fd)


def test_a_snapshot_for_another_queue_is_refused(worker):
    reply = apply(worker, QueueSnapshot(3))
    assert not reply["ok"] and "queue 3" in reply["error"]


def test_applying_replaces_the_fd_copies_and_closes_the_old_ones(worker):
    a, b = memfd(8), memfd(8)
    assert apply(worker, QueueSnapshot(1, call_fd=a))["ok"]
    first = worker.vq.call_fd
    assert first >= 0 and os.path.samestat(os.fstat(first), os.fstat(a))
    assert apply(worker, QueueSnapshot(1, call_fd=b))["ok"]
    assert not fd_is_open(first) and os.path.samestat(os.fstat(worker.vq.call_fd), os.fstat(b))
    second = worker.vq.call_fd
    assert apply(worker, QueueSnapshot(1))["ok"]          # none
    assert worker.vq.call_fd == -1 and not fd_is_open(second)
    os.close(a)
    os.close(b)


def test_memory_is_remapped_only_when_the_region_set_changes(worker):
    fd = memfd(1 << 20)
    snap = QueueSnapshot(1, regions=(RegionPart(0, 1 << 20, 0x10000, 0),), region_fds=(fd,),
                         num=256, addr=ADDR)
    assert apply(worker, snap)["ok"]
    region = worker.mem.regions[0]
    assert worker.vq.mapped
    before = open_fds()
    for _ in range(5):
        assert apply(worker, snap)["ok"]
    assert worker.mem.regions[0] is region and open_fds() == before
    other = memfd(1 << 20)                   # same layout, another file: remapped
    assert apply(worker, QueueSnapshot(1, regions=snap.regions, region_fds=(other,),
                                       num=256, addr=ADDR))["ok"]
    assert worker.mem.regions[0] is not region and region.fd == -1
    os.close(fd)
    os.close(other)


def test_a_region_its_fd_cannot_back_is_refused(worker):
    fd = memfd(4096)
    reply = apply(worker, QueueSnapshot(1, regions=(RegionPart(0, 1 << 20, 0x10000, 0),),
                                        region_fds=(fd,)))
    assert not reply["ok"] and "needed" in reply["error"]
    assert len(worker.mem) == 0
    os.close(fd)


def test_stop_reports_progress_and_reapplying_does_not_rewind_it(worker):
    fd = memfd(1 << 20)
    snap = QueueSnapshot(1, regions=(RegionPart(0, 1 << 20, 0x10000, 0),), region_fds=(fd,),
                         num=256, addr=ADDR, base=42, base_serial=7, enabled=True)
    assert apply(worker, snap)["ok"]
    assert worker.handle({"cmd": "stop"}, []) == {"ok": True, "last_avail_idx": 42, "used_idx": 0}
    worker.vq.last_avail_idx = 50           # progress made since
    assert apply(worker, snap)["ok"]
    assert worker.vq.last_avail_idx == 50
    new_base = QueueSnapshot(1, regions=snap.regions, region_fds=(fd,), num=256, addr=ADDR,
                             base=42, base_serial=8, enabled=True)
    assert apply(worker, new_base)["ok"]     # the front-end set a base: taken
    assert worker.vq.last_avail_idx == 42
    os.close(fd)


def test_a_new_generation_clears_progress_and_broken_state(worker):
    snap = QueueSnapshot(1, base=5, base_serial=1, generation=1)
    assert apply(worker, snap)["ok"]
    worker.vq.mark_broken("descriptor loop")
    worker._sync_counters()
    assert worker.counters.state == "broken" and worker.counters.broken_reason
    assert apply(worker, snap)["ok"]                  # same generation: still broken
    assert worker.vq.broken
    assert apply(worker, QueueSnapshot(1, generation=2))["ok"]
    worker._sync_counters()
    assert not worker.vq.broken and worker.vq.last_avail_idx == 0
    stats = worker.handle({"cmd": "stats"}, [])
    assert stats["state"] == "idle" and stats["broken_reason"] is None


def test_log_is_mapped_once_per_file_and_release_closes_everything(worker):
    before = open_fds()
    log_fd, call, mem = memfd(4096), memfd(8), memfd(1 << 20)
    snap = QueueSnapshot(1, regions=(RegionPart(0, 1 << 20, 0x10000, 0),), region_fds=(mem,),
                         log=LogPart(4096, 0), log_fd=log_fd, log_call_fd=call,
                         kick_fd=call, err_fd=call)
    assert apply(worker, snap)["ok"]
    dlog = worker.dlog
    assert dlog is not None and dlog.call_fd == worker._log_call_fd >= 0
    held = open_fds()
    assert apply(worker, snap)["ok"]
    assert worker.dlog is dlog and open_fds() == held
    worker.release()
    for fd in (log_fd, call, mem):
        os.close(fd)
    assert open_fds() == before


# -- the ring loop: never spin without looking at the command channel ---------

import threading  # noqa: E402
import time  # noqa: E402

from shardvu import eventfd  # noqa: E402
from shardvu import protocol as P  # noqa: E402
from shardvu.testing.driver import DriverQueue  # noqa: E402
from shardvu.memory import GuestMemory  # noqa: E402
from shardvu.protocol import MemoryRegion  # noqa: E402

UVA = 0x7F00_0000_0000
MEM = 1 << 20


@pytest.fixture
def running_rx():
    """An RX generator worker running its loop in a thread; the test holds
    the command channel and a driver view of the same guest memory."""
    mine, theirs = ctl.socketpair()
    w = Worker(0, theirs, resolve("generator"), 64, None)
    fd = memfd(MEM)
    view = GuestMemory()
    view.add(MemoryRegion(0, MEM, UVA, 0), os.dup(fd))
    drv = DriverQueue(view, 0x1000, 64, used_align=4096)
    features = P.bit(P.VIRTIO_F_VERSION_1) | P.bit(P.VIRTIO_NET_F_MRG_RXBUF)
    kick, call = eventfd.eventfd(), eventfd.eventfd()

    def cmd(obj, fds=(), timeout=5.0):
        mine.settimeout(timeout)
        ctl.send(mine, obj, list(fds))
        reply, _ = ctl.recv(mine)
        return reply
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    snap = QueueSnapshot(0, features=features, num=64, enabled=True,
                         addr=(0, 0, UVA + drv.desc_gpa, UVA + drv.used_gpa, UVA + drv.avail_gpa, 0),
                         regions=(RegionPart(0, MEM, UVA, 0),), region_fds=(fd,),
                         kick_fd=kick, call_fd=call)
    obj, fds = snap.encode()
    assert cmd({"cmd": "apply", "snapshot": obj}, fds)["ok"]
    assert cmd({"cmd": "start"})["ok"]
    yield w, drv, cmd, kick
    cmd({"cmd": "exit"})
    t.join(5)
    assert not t.is_alive()
    mine.close()
    theirs.close()
    drv.close()
    view.close()
    for x in (fd, kick, call):
        os.close(x)


def test_work_a_pass_cannot_move_does_not_lock_out_commands(running_rx):
    """Buffers the guest posted, too few for one 76-byte frame under
    MRG_RXBUF: every pass moves nothing while the ring is not empty.  The
    worker must still answer (once it had looped on has_work forever)."""
    w, drv, cmd, kick = running_rx
    for i in range(2):
        drv.add([], [(0x80000 + i * 2048, 32)])
    drv.publish()
    eventfd.signal(kick)
    for _ in range(3):
        assert cmd({"cmd": "stats"}, timeout=3)["ok"]
    assert drv.get_used() == []


def test_stop_while_busy_with_buffers_left_is_answered(running_rx):
    """The guest keeps the RX ring full; the queue is stopped while the
    worker is busy: it must not spin on the ring it may no longer serve."""
    w, drv, cmd, kick = running_rx
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline or not w.counters.packets:
        drv.get_used()
        while drv.num_free:
            drv.add([], [(0x80000 + (drv.avail_idx % 64) * 2048, 2048)])
        drv.publish()
        eventfd.signal(kick)
    assert cmd({"cmd": "stop"}, timeout=3)["ok"]
    drv.get_used()
    while drv.num_free:
        drv.add([], [(0x80000 + (drv.avail_idx % 64) * 2048, 2048)])
    drv.publish()
    assert not w.probe()
    for _ in range(3):
        assert cmd({"cmd": "stats"}, timeout=3)["ok"]


def test_a_port_part_is_kept_until_its_serial_changes(worker):
    from shardvu import eventfd
    from shardvu.snapshot import PortPart
    before = open_fds()
    efd = eventfd.eventfd()
    part = QueueSnapshot(1, port=PortPart("tap", {"queue": 0}, 1), port_fds=(efd,))
    assert apply(worker, part)["ok"]
    (held,) = worker.port_fds
    assert worker.port_kind == "tap" and worker.port_meta == {"queue": 0}
    fds = open_fds()
    assert apply(worker, part)["ok"]
    assert worker.port_fds == [held] and open_fds() == fds
    assert apply(worker, QueueSnapshot(1, port=PortPart("tap", {"queue": 0}, 2),
                                       port_fds=(efd,)))["ok"]
    assert worker.port_fds != [held] and not fd_is_open(held)
    worker.release()
    assert worker.port_fds == [] and worker.port_kind is None
    os.close(efd)
    assert open_fds() == before
