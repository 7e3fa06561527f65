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
