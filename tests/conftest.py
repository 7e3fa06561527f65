"""Shared fixtures: an in-process back-end served over a real Unix socket,
and fd accounting (both ends live in this process, so /proc/self/fd sees
every fd either side forgets to close)."""
from __future__ import annotations

import gc
import os
import threading
import time

import pytest

from shardvu.echo import EchoBackend


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


class ServedBackend:
    """An :class:`EchoBackend` whose runner serves ``path`` in a thread."""

    def __init__(self, path: str, queue_pairs: int, **kw):
        self.path = path
        self.echo = EchoBackend(queue_pairs, **kw)
        self.device = self.echo.device
        self.thread = threading.Thread(target=self.echo.serve, args=(path,), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError("back-end did not start listening")
            time.sleep(0.01)

    def stop(self) -> None:
        self.echo.runner.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "runner did not stop"


@pytest.fixture
def fd_guard():
    """Fails the test if it leaves fds open."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leaked = None
    for _ in range(50):          # the runner thread may still be closing
        leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
        if not leaked:
            break
        time.sleep(0.05)
    assert not leaked, "leaked fds: " + ", ".join(
        f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}" for fd in sorted(leaked) if os.path.exists(f"/proc/self/fd/{fd}"))


@pytest.fixture
def served(tmp_path, fd_guard):
    """Factory: ``served(queue_pairs=1, **EchoBackend kwargs)`` → ServedBackend."""
    made = []

    def make(queue_pairs: int = 1, **kw) -> ServedBackend:
        b = ServedBackend(str(tmp_path / f"vu{len(made)}.sock"), queue_pairs, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.stop()


@pytest.fixture
def runtime(tmp_path):
    """``runtime(queues=1, port="sink", *extra, **kw)`` starts ``shardvu run``
    (:class:`shardvu.testing.runtime.Runtime`) on a socket in ``tmp_path``.
    At the end each one still running must stop with exit code 0, leave no
    socket file and no unreaped child behind."""
    from shardvu.testing.runtime import Runtime
    made = []

    def make(queues=1, port="sink", *extra, **kw):
        rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), queues, port, *extra, **kw)
        made.append(rt)
        return rt
    yield make
    for rt in made:
        assert not rt.zombies(), "zombies left behind"
        if rt.proc.poll() is None:
            assert rt.stop() == 0
            assert not os.path.exists(rt.sock), "socket left behind"
