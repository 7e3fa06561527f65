"""A worker's command handling, in-process (the barrier protocol's other end)."""
from __future__ import annotations

import os

import pytest

from shardvu.workers import ctl
from shardvu.workers.ports import resolve
from shardvu.workers.worker import Worker

from util import fd_is_open, memfd


@pytest.fixture
def worker():
    mine, theirs = ctl.socketpair()
    w = Worker(1, theirs, resolve("sink"), 64, None)
    yield w
    w.handle({"cmd": "reset"}, [])
    mine.close()
    theirs.close()


def test_unknown_command_is_refused_and_its_fds_closed(worker):
    fd = memfd(4096)
    reply = worker.handle({"cmd": "bogus"}, [fd])
    assert reply == {"ok": False, "error": "bogus: unknown command 'bogus'"}
    assert not fd_is_open(fd)


def test_fds_a_command_does_not_take_are_closed(worker):
    fd = memfd(4096)
    assert worker.handle({"cmd": "enable", "on": True}, [fd])["ok"]
    assert not fd_is_open(fd)


def test_mem_add_with_mismatched_fds_fails_cleanly(worker):
    fd = memfd(1 << 20)
    reply = worker.handle({"cmd": "mem_add", "regions": [[0, 1 << 20, 0x10000, 0], [1 << 20, 4096, 0, 0]]}, [fd])
    assert not reply["ok"] and "2 regions with 1 fds" in reply["error"]
    assert not fd_is_open(fd) and len(worker.mem) == 0


def test_fd_commands_replace_and_close_the_old_fd(worker):
    a, b = memfd(8), memfd(8)
    assert worker.handle({"cmd": "fd", "kind": "call"}, [a])["ok"]
    kept = worker.vq.call_fd
    assert kept == a
    assert worker.handle({"cmd": "fd", "kind": "call"}, [b])["ok"]
    assert not fd_is_open(a) and worker.vq.call_fd == b
    assert worker.handle({"cmd": "fd", "kind": "call"}, [])["ok"]     # NOFD
    assert worker.vq.call_fd == -1 and not fd_is_open(b)


def test_stop_reports_the_base(worker):
    assert worker.handle({"cmd": "ring", "num": 256, "addr": None, "base": 42,
                          "features": 0, "enable": True}, [])["ok"]
    assert worker.handle({"cmd": "stop"}, []) == {"ok": True, "base": 42}


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
    assert cmd({"cmd": "mem_add", "regions": [[0, MEM, UVA, 0]]}, [fd])["ok"]
    assert cmd({"cmd": "ring", "num": 64, "base": 0, "features": features, "enable": True,
                "addr": [0, 0, UVA + drv.desc_gpa, UVA + drv.used_gpa, UVA + drv.avail_gpa, 0]})["ok"]
    assert cmd({"cmd": "fd", "kind": "kick"}, [os.dup(kick)])["ok"]
    assert cmd({"cmd": "fd", "kind": "call"}, [os.dup(call)])["ok"]
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
