"""Crash isolation: kill -9 of workers under load, from shardvu's own
front-end, which numbers its frames.  Every drill is bounded in time and
counts the control process's fds and child processes before and after; no
zombie may be left.  (Latency is bench/respawn.py's business, not a test's.)"""
from __future__ import annotations

import gc
import importlib
import os
import select
import signal
import struct
import subprocess
import sys
import time

import psutil
import pytest

from shardvu import protocol as P
from shardvu.control.zygote import CPYTHON, Zygote
from shardvu.memory import GuestMemory
from shardvu.protocol import MemoryRegion
from shardvu.snapshot import PortPart, QueueSnapshot, RegionPart
from shardvu.testing.driver import DriverQueue
from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime
from shardvu.workers import ctl, progress, worker
from shardvu.workers.ports import resolve
from shardvu.workers.spsc import SpscRing
from util import wait_for

PYPY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-pypy", "bin", "python")
INTERPRETERS = [pytest.param((), id="cpython"),
                pytest.param(("--worker-python", PYPY), id="pypy",
                             marks=pytest.mark.skipif(not os.path.exists(PYPY),
                                                      reason="no PyPy venv at .venv-pypy"))]


def _spares(rt: Runtime) -> int:
    n = 0
    for p in rt._children():
        try:
            n += p.name() == "shardvu-spare"
        except psutil.Error:
            pass
    return n


def _numbered(start: int, n: int) -> list:
    return [struct.pack("<I", start + i) + bytes(60) for i in range(n)]


def _seq(frame: bytes) -> int:
    return struct.unpack_from("<I", frame)[0]


def _pid(rt: Runtime, q: int) -> int:
    return rt.queue_stats()[q]["worker_pid"]


def _replaced(rt: Runtime, q: int, old: int) -> bool:
    pid = rt.queue_stats()[q]["worker_pid"]
    return pid is not None and pid != old and psutil.pid_exists(pid)


class Traffic:
    """Numbered frames through a loopback pair, in rounds: send a batch,
    take what came back.  ``got`` is every sequence number received."""

    def __init__(self, fe: Frontend, pair: int = 0):
        self.fe, self.pair = fe, pair
        self.sent = 0
        self.got: list = []
        fe.post_rx(pair, 256)

    def round(self, n: int = 32) -> None:
        frames = _numbered(self.sent, n)
        done = 0
        deadline = time.monotonic() + 10
        while done < n:
            done += self.fe.send(self.pair, frames[done:])
            if done < n:
                self.fe.reclaim_tx(self.pair)
                self._take(0.01)
            assert time.monotonic() < deadline, "TX ring stayed full"
        self.sent += n
        self._take(0)

    def _take(self, timeout: float) -> None:
        self.got += [_seq(f) for f in self.fe.receive(self.pair, timeout=timeout, min_frames=1)]

    def drain(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < self.sent and time.monotonic() < deadline:
            self._take(0.2)
        time.sleep(0.2)         # a duplicate would arrive late
        self._take(0.05)


def _exactly_once(t: Traffic) -> None:
    lost = sorted(set(range(t.sent)) - set(t.got))
    dups = len(t.got) - len(set(t.got))
    assert not lost and not dups, f"{len(lost)} lost (first {lost[:5]}), {dups} repeated, of {t.sent}"


# -- the zygote on its own ---------------------------------------------------------------
def test_zygote_hands_out_warm_spares_and_reaps_them():
    before = len(os.listdir("/proc/self/fd"))
    z = Zygote([CPYTHON], spares=2)
    z.start()
    try:
        zyg = psutil.Process(z.pid)
        # warm spares name themselves (a fork starts as "shardvu-zygote")
        wait_for(lambda: [p.name() for p in zyg.children()] == ["shardvu-spare"] * 2,
                 timeout=10, interval=0.05)
        taken = z.take(CPYTHON)
        ctl.send(taken.chan, {"cmd": "become", "index": 1, "port": "sink", "frame_size": 64,
                              "stats_endpoint": None, "log_level": "WARNING", "cpu": 0})
        ctl.send(taken.chan, {"cmd": "stats"})        # become has no answer: this is the barrier
        assert ctl.recv(taken.chan)[0]["ok"]
        assert psutil.Process(taken.pid).cpu_affinity() == [0]
        assert psutil.Process(taken.pid).name() == "shardvu-w1"
        wait_for(lambda: len(zyg.children()) == 3, timeout=10, interval=0.05)     # refilled
        os.kill(taken.pid, signal.SIGKILL)
        assert select.select([taken.pidfd], [], [], 5)[0], "pidfd did not report the death"
        wait_for(lambda: any(e["pid"] == taken.pid for e in _events(z)), timeout=5, interval=0.02)
        assert not psutil.pid_exists(taken.pid) or \
            psutil.Process(taken.pid).status() != psutil.STATUS_ZOMBIE
        os.close(taken.pidfd)
        taken.chan.close()
    finally:
        z.stop()
    assert not psutil.pid_exists(z.pid)
    assert len(os.listdir("/proc/self/fd")) == before


_seen: list = []


def _events(z: Zygote) -> list:
    _seen.extend(z.poll_events())
    return _seen


# -- the RX resume rule, in-process -------------------------------------------------------
# A loopback RX worker (queue 0) runs real passes over a driver's ring and
# "dies" at a chosen consumer-index store of the pair's ring (an exception
# before the store: the shared memory is then what a kill leaves), or after
# a pass and before its record.  A replacement on the same progress page
# must release exactly the slots of the frames delivered.  (With MRG_RXBUF
# negotiated, as the front-ends do, resume used to release none: after a
# kill between a pass's used store and its release, where the call signal
# in between wakes the front-end and kills often land, the frames were
# delivered again: the rx kill drill's repeated round.)
_UVA = 0x7F00_0000_0000


class _Killed(Exception):
    pass


class _RxQueue:
    """Guest memory, the driver's RX ring, the pair's ring (the test is its
    producer), the queue's progress page and snapshot."""

    def __init__(self, mergeable: bool, style: str, monkeypatch):
        fast = importlib.import_module("shardvu.workers." + style)
        monkeypatch.setattr(worker, "split_fast", fast)     # both loops run on CPython
        size = 4 << 20
        self.fd = os.memfd_create("rx-resume")
        os.ftruncate(self.fd, size)
        self.mem = GuestMemory()
        self.mem.add(MemoryRegion(0, size, _UVA, 0), os.dup(self.fd))
        self.drv = DriverQueue(self.mem, 0x1000, 64, used_align=4096)
        self.ring = SpscRing.create(slots=64, slot_size=2048)
        self.ring.set_headroom(fast.rx_header(12))
        self.page = progress.create()
        self.sent = 0
        self.bufs = 0
        d = self.drv
        features = P.bit(P.VIRTIO_F_VERSION_1) | (P.bit(P.VIRTIO_NET_F_MRG_RXBUF) if mergeable else 0)
        self.snap = QueueSnapshot(0, features=features, num=64, enabled=True, in_order=True,
                                  addr=(0, 0, _UVA + d.desc_gpa, _UVA + d.used_gpa, _UVA + d.avail_gpa, 0),
                                  regions=(RegionPart(0, size, _UVA, 0),), region_fds=(self.fd,),
                                  port=PortPart("spsc"), port_fds=(self.ring.fd, self.ring.doorbell_fd))
        self.workers = []

    def worker(self):
        """A worker of the queue, started (carry, apply, start: resume)."""
        mine, theirs = ctl.socketpair()
        w = worker.Worker(0, theirs, resolve("loopback"), 64, None,
                          progress=progress.ProgressPage(os.dup(self.page)))
        self.workers.append((w, mine, theirs))
        progress.carry(w)
        obj, fds = self.snap.encode()
        assert w.handle({"cmd": "apply", "snapshot": obj}, [os.dup(fd) for fd in fds])["ok"]
        assert w.handle({"cmd": "start"}, [])["ok"]
        if hasattr(gc, "unfreeze"):
            gc.unfreeze()           # start's, for a worker process
        return w

    def send(self, n: int) -> None:
        assert self.ring.push_batch(_numbered(self.sent, n)) == n
        self.sent += n

    def post(self, n: int, size: int) -> None:
        for _ in range(n):
            self.drv.add([], [(0x200000 + self.bufs * 2048, size)])
            self.bufs += 1
        self.drv.publish()

    def close(self) -> None:
        for w, mine, theirs in self.workers:
            w.release()
            w.progress.close()
            mine.close()
            theirs.close()
        self.ring.close()
        os.close(self.page)
        self.drv.close()
        self.mem.close()
        os.close(self.fd)


def _die_at_release(w, which: int) -> None:
    """``w`` dies just before its ``which``-th consumer-index store."""
    real, calls = w.spsc.consumed, []

    def consumed(cons):
        calls.append(cons)
        if len(calls) == which:
            raise _Killed
        real(cons)
    w.spsc.consumed = consumed


@pytest.mark.parametrize("style", ["split_fast", "split_fast_struct"])
@pytest.mark.parametrize("case, mergeable", [
    ("fast", False), ("fast", True), ("merged", True), ("fast_then_merged", True),
    ("merged_released", True), ("fast_then_merged_released", True), ("first_pass", True)])
def test_rx_resume_releases_exactly_the_frames_delivered(monkeypatch, style, case, mergeable):
    """After a recorded pass, one of 16 frames: fast: a fast-loop batch (a
    frame a buffer); merged: the general path's, each frame over two
    64-byte MRG_RXBUF buffers; fast_then_merged: both in one pass.  Killed
    at the pass's last release, or (released) after it and before its
    record, with more frames waiting.  first_pass: fast, the worker's
    first pass."""
    q = _RxQueue(mergeable, style, monkeypatch)
    try:
        old = q.worker()
        if case != "first_pass":
            q.send(4)
            q.post(4, 2048)
            assert old.pass_once() == 4
            progress.note(old)                  # what the run loop does after a pass
        before = q.sent
        q.send(16)
        big = {"fast": 16, "first_pass": 16, "fast_then_merged": 8,
               "fast_then_merged_released": 8}.get(case, 0)
        q.post(big, 2048)
        q.post(2 * (16 - big), 64)
        if not case.endswith("released"):
            _die_at_release(old, 1 if big in (0, 16) else 2)
            with pytest.raises(_Killed):
                old.pass_once()
        else:
            assert old.pass_once() == 16        # no record after it: the kill
            q.send(16)                          # the producer went on
        assert q.ring.pending() == (8 if case == "fast_then_merged" else 16)
        new = q.worker()
        assert new.spsc._cons == before + 16, "released a frame not delivered, or kept one delivered"
        assert new.counters.packets == before + 16
        assert new.counters.bytes == (before + 16) * 64
        q.post(q.sent - new.spsc._cons, 2048)
        assert new.pass_once() == q.sent - before - 16
        assert new.counters.packets == q.sent and q.ring.pending() == 0
    finally:
        q.close()


def test_rx_resume_leaves_a_frame_it_cannot_match(monkeypatch):
    """Used lengths that do not tell which frames were delivered: what
    matches is released, the rest is delivered again (never lost)."""
    q = _RxQueue(True, "split_fast", monkeypatch)
    try:
        old = q.worker()
        q.send(4)
        q.post(4, 2048)
        _die_at_release(old, 1)
        with pytest.raises(_Killed):
            old.pass_once()
        old.vq.rings.used32[2 + 2 * 2] = 50        # element 2's length: no frame's
        new = q.worker()
        assert new.spsc._cons == 2 and q.ring.pending() == 2
    finally:
        q.close()


# -- kill drills ------------------------------------------------------------------------
@pytest.mark.parametrize("interp", INTERPRETERS)
@pytest.mark.parametrize("victims", [(1,), (0,), (0, 1)], ids=["tx", "rx", "pair"])
def test_kill_under_load_loopback_exactly_once(runtime, interp, victims):
    rt = runtime(1, "loopback", *interp)
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        t = Traffic(fe)
        for _ in range(4):
            t.round()
        # the zygote's 2 spares and the one the control holds ready
        wait_for(lambda: _spares(rt) == 3, timeout=60, interval=0.1)
        fds, children = rt.fds(), len(rt._children())
        counts = []
        for drill in range(3):
            old = {q: _pid(rt, q) for q in victims}
            for _ in range(2):
                t.round()
            for q in victims:
                os.kill(old[q], signal.SIGKILL)
            for _ in range(6):          # keep sending while the queue comes back
                t.round()
            for q in victims:
                wait_for(lambda: _replaced(rt, q, old[q]), timeout=30, interval=0.05)
            wait_for(lambda: len(rt._children()) == children, timeout=60, interval=0.1)
            counts.append(rt.fds())
        for _ in range(4):
            t.round()
        t.drain()
        _exactly_once(t)
        # counters carried across every kill: each side counted each frame once
        counted = lambda: [rt.queue_stats()[q]["packets"] for q in (0, 1)]    # noqa: E731
        try:
            wait_for(lambda: counted() == [t.sent] * 2, timeout=5, interval=0.1)
        except AssertionError:
            raise AssertionError(f"packets rx/tx {counted()}, sent {t.sent}") from None
        info = rt.queue_stats()
        for q in victims:
            assert info[q]["restarts"] == 3
            assert info[q].get("last_exit_signal", signal.SIGKILL) == signal.SIGKILL
        # every other counter is carried too: the 64-byte frames' size bin
        # holds every frame, and the drops by reason add up to the drops
        for q in (0, 1):
            assert info[q]["size_64_packets"] == t.sent, (q, info[q])
            assert sum(info[q]["drops_by_reason"].values()) == info[q]["drops"], (q, info[q])
    assert "replaced by pid" in rt.log()
    # A worker the pool started holds one fd more in the control (its
    # multiprocess sentinel) than a replacement: the count may drop once.
    assert counts[0] <= fds and counts[1] == counts[0] and counts[2] == counts[0], (fds, counts)
    assert not rt.zombies()


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_kill_sink_tx_worker_every_frame_consumed_once(runtime, interp):
    rt = runtime(1, "sink", *interp)
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fds = rt.fds()
        total = 0
        for round_ in range(12):
            if round_ == 4:
                old = _pid(rt, 1)
                os.kill(old, signal.SIGKILL)
            n = 0
            deadline = time.monotonic() + 10
            while n < 64:
                n += fe.send(0, _numbered(total + n, 64 - n))
                fe.reclaim_tx(0)
                assert time.monotonic() < deadline
            total += 64
        wait_for(lambda: fe.queues[1].used_idx == total & 0xFFFF, timeout=15, interval=0.02)
        assert _replaced(rt, 1, old)
        # counted exactly once at the sink, across the kill (progress page)
        wait_for(lambda: rt.queue_stats()[1]["packets"] == total, timeout=5, interval=0.1)
        assert rt.queue_stats()[1]["bytes"] == total * 64
        assert rt.fds() <= fds      # the pool's worker had a multiprocess sentinel more


def test_crash_loop_gives_the_queue_up_and_leaves_the_others(runtime):
    rt = runtime(2, "loopback")
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        for _ in range(6):              # default policy: more than 5 deaths in 10 s
            old = _pid(rt, 3)
            try:
                os.kill(old, signal.SIGKILL)
            except ProcessLookupError:
                raise AssertionError(f"worker {old} gone before its kill:\n{rt.log()}") from None
            wait_for(lambda: _replaced(rt, 3, old) or "broken: crash_loop" in rt.log(), timeout=10,
                     interval=0.02)
        wait_for(lambda: "queue 3 broken: crash_loop" in rt.log(), timeout=10, interval=0.05)
        wait_for(lambda: fe.errors(3) >= 1, timeout=5)
        q3 = rt.queue_stats()[3]
        if "last_exit_signal" in q3:            # stats carry the supervisor's facts
            assert q3["state"] == "broken" and q3["broken_reason"] == "crash_loop"
        # pair 0 is untouched
        t = Traffic(fe, 0)
        for _ in range(3):
            t.round()
        t.drain()
        _exactly_once(t)
    # a new session gets the queue back
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        t = Traffic(fe, 1)
        t.round()
        t.drain()
        _exactly_once(t)


# -- DPDK testpmd as the front-end -----------------------------------------------------
def _testpmd():
    from shardvu.testing import testpmd
    return testpmd


@pytest.mark.skipif(not _testpmd().have_testpmd(), reason="dpdk-testpmd not installed (apt-get install dpdk-dev)")
def test_testpmd_txonly_stays_connected_and_the_sink_counts_exactly(runtime):
    tp = _testpmd()
    rt = runtime(1, "sink")
    pmd = tp.TestPmd(tp.virtio_user_vdev(rt.sock, 1), queues=1, mode="txonly", tx_first=False)
    pmd.start()
    try:
        pmd.wait_started(15)
        time.sleep(0.5)
        for _ in range(3):              # kill -9 of the TX worker at full load
            old = _pid(rt, 1)
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: _replaced(rt, 1, old), timeout=10, interval=0.02)
            time.sleep(0.5)
        before_stop = rt.log()
    finally:
        stats = pmd.stop(10)
        text = pmd.log()
        pmd.cleanup_log()
    assert stats is not None and pmd.returncode == 0, text[-2000:]
    assert "disconnected" not in before_stop         # the front-end never noticed
    deadline = time.monotonic() + 10
    while rt.queue_stats()[1]["packets"] != stats["tx_packets"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rt.queue_stats()[1]["packets"] == stats["tx_packets"] > 0
    assert rt.queue_stats()[1]["restarts"] == 3
    assert not tp.leftover_testpmds()


def test_zygote_death_leaves_the_workers_and_a_new_zygote_serves(runtime):
    rt = runtime(1, "loopback")
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        t = Traffic(fe)
        t.round()
        zygote = next(p for p in rt._children() if p.name() == "shardvu-zygote")
        workers = {p.pid for p in rt.workers()}
        zygote.kill()
        wait_for(lambda: "zygote restarted" in rt.log(), timeout=10, interval=0.05)
        t.round()
        # they outlive the zygote (init's children now, until replaced)
        assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers)
        old = _pid(rt, 1)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: _replaced(rt, 1, old), timeout=15, interval=0.05)
        for _ in range(3):
            t.round()
        t.drain()
        _exactly_once(t)
    assert not rt.zombies()


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_sighup_replaces_every_worker_without_losing_a_frame(runtime, interp):
    rt = runtime(1, "loopback", *interp)
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        t = Traffic(fe)
        for _ in range(3):
            t.round()
        before = {q: _pid(rt, q) for q in (0, 1)}
        if interp:          # PyPy: through the CLI; CPython: the signal itself
            out = subprocess.run([sys.executable, "-m", "shardvu.cli", "reload", "--socket", rt.sock],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0 and str(rt.proc.pid) in out.stdout, out.stderr
        else:
            os.kill(rt.proc.pid, signal.SIGHUP)
        for _ in range(4):          # traffic while the workers are replaced
            t.round()
        wait_for(lambda: "reload: 2 of 2 workers replaced" in rt.log(), timeout=60, interval=0.05)
        for q in (0, 1):
            wait_for(lambda: _replaced(rt, q, before[q]), timeout=10, interval=0.05)
            assert not psutil.pid_exists(before[q]) or \
                psutil.Process(before[q]).status() == psutil.STATUS_ZOMBIE
        for _ in range(3):
            t.round()
        t.drain()
        _exactly_once(t)
        counted = lambda: [rt.queue_stats()[q]["packets"] for q in (0, 1)]    # noqa: E731
        wait_for(lambda: counted() == [t.sent] * 2, timeout=5, interval=0.1)
    assert "died" not in rt.log()           # a replacement, not a crash
    assert not rt.zombies()


def test_reload_refused_by_another_snapshot_version_keeps_the_old_workers(runtime, tmp_path, monkeypatch):
    """The code installed now reads snapshot version N+1 (the test hook in
    shardvu/snapshot.py, read when the reload's fresh zygote imports it):
    every new worker refuses the running control's snapshot, the old
    workers keep serving with every frame counted exactly once, and a
    death after it is still replaced by a worker of the running code."""
    from shardvu.snapshot import SNAPSHOT_VERSION
    version_file = tmp_path / "snapshot-version"
    monkeypatch.setenv("SHARDVU_TEST_SNAPSHOT_VERSION_FILE", str(version_file))
    rt = runtime(1, "loopback")
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        t = Traffic(fe)
        for _ in range(3):
            t.round()
        before = {q: _pid(rt, q) for q in (0, 1)}
        fds0, kids0 = rt.fds(), {p.pid for p in rt.workers()}
        version_file.write_text(str(SNAPSHOT_VERSION + 1))
        os.kill(rt.proc.pid, signal.SIGHUP)
        for _ in range(4):          # traffic while the new workers are refused
            t.round()
        wait_for(lambda: "reload: 0 of 2 workers replaced" in rt.log(), timeout=60, interval=0.05)
        refusals = [line for line in rt.log().splitlines() if "keeps its worker" in line]
        assert len(refusals) == 2 and all(f"version {SNAPSHOT_VERSION}" in r for r in refusals), refusals
        assert {q: _pid(rt, q) for q in (0, 1)} == before
        for _ in range(3):
            t.round()
        wait_for(lambda: rt.fds() == fds0, timeout=5, interval=0.1)
        assert {p.pid for p in rt.workers()} == kids0
        os.kill(before[1], signal.SIGKILL)      # replaced from the running code's zygote
        wait_for(lambda: _replaced(rt, 1, before[1]), timeout=15, interval=0.05)
        for _ in range(3):
            t.round()
        t.drain()
        _exactly_once(t)
        counted = lambda: [rt.queue_stats()[q]["packets"] for q in (0, 1)]    # noqa: E731
        wait_for(lambda: counted() == [t.sent] * 2, timeout=5, interval=0.1)
        assert rt.queue_stats()[1]["state"] != "broken"
    assert not rt.zombies()
