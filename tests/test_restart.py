"""The control process dies (issue 12 §6), driven by shardvu's own front-end:
kill -9 of ``shardvu run`` leaves nothing running, a restarted instance
offers exactly what the first one offered (or a front-end that reconnects,
QEMU included, refuses it), a front-end gets traffic through again in both
connection modes, and buffers the dead back-end left in flight are
resubmitted from the front-end's inflight region.  QEMU guests doing the
same are tests/test_restart_qemu.py."""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from typing import Dict, List

import psutil
import pytest

from shardvu import protocol as P
from shardvu.inflight import InflightBuffer
from shardvu.protocol import ProtocolFeature as PF, Request as R
from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime
from util import wait_for

PYPY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-pypy", "bin", "python")
INTERPRETERS = [pytest.param((), id="cpython"),
                pytest.param(("--worker-python", PYPY), id="pypy",
                             marks=pytest.mark.skipif(not os.path.exists(PYPY),
                                                      reason="no PyPy venv at .venv-pypy"))]


MARK = "SHARDVU_RESTART_TEST"


def _marked(mark: str) -> List[psutil.Process]:
    """Every live process (but this one) whose environment carries ``mark``:
    whatever a runtime started, wherever it was reparented to."""
    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """Runtimes on one socket path; at the end every runtime still running
    is stopped (exit 0) and no process any of them started is left.  Each
    test's runtimes inherit a mark in their environment, so that a process
    that escaped (reparented away from the control) is found too."""
    made: List[Runtime] = []
    everyone: List[psutil.Process] = []
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv(MARK, mark)

    class Lab:
        sock = str(tmp_path / "vu.sock")

        def runtime(self, queues=1, port="sink", *extra, **kw):
            rt = Runtime(self.sock, queues, port, *extra,
                         log_path=str(tmp_path / f"rt{len(made)}.log"), **kw)
            made.append(rt)
            return rt

        def kill(self, rt: Runtime, timeout: float = 20.0) -> None:
            """kill -9 the control process; every process it started (the
            zygote, its spares, the workers) must end by itself within
            ``timeout`` seconds."""
            family = rt._children()
            everyone.extend(family)
            rt.proc.send_signal(signal.SIGKILL)
            assert rt.proc.wait(10) == -signal.SIGKILL
            _, alive = psutil.wait_procs(family, timeout=timeout)
            for p in alive:
                p.kill()
            assert not alive, f"left running after kill -9 of the control: {_names(alive)}"
            self.kill_done(family, timeout)

        def kill_done(self, family: List[psutil.Process], timeout: float = 20.0) -> None:
            """After a kill -9 of the control: nothing it started is left."""
            everyone.extend(family)
            try:
                wait_for(lambda: not _marked(mark), timeout=timeout, interval=0.1)
            except AssertionError:
                raise AssertionError(f"escaped: {_names(_marked(mark))}") from None
    try:
        yield Lab()
    finally:
        for rt in made:
            if rt.proc.poll() is None:
                everyone.extend(rt._children())
                assert rt.stop() == 0
            elif not rt._log.closed:
                rt._log.close()
        left = [p for p in everyone if _running(p)] + _marked(mark)
        assert not left, f"processes left behind: {_names(left)}"


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _names(procs) -> list:
    out = []
    for p in procs:
        try:
            out.append((p.pid, p.name()))
        except psutil.Error:
            out.append((p.pid, "?"))
    return out


def _numbered(start: int, n: int, size: int = 60) -> list:
    return [struct.pack("<I", start + i) + bytes(size - 4) for i in range(n)]


def _tx_counted(rt: Runtime, pair: int = 0):
    s = rt.queue_stats()[2 * pair + 1]
    return s["packets"], s["bytes"]


# -- the same offer on every start -------------------------------------------------------------
def _offer(path: str, queue_pairs: int) -> Dict[str, object]:
    """Everything a front-end reads before it commits to a back-end: the
    virtio and protocol feature offers, the queue count, the memory slots
    and the whole config space.  Read on a connection that negotiates
    nothing else (it is reset when it closes)."""
    with Frontend(path, queue_pairs=queue_pairs) as fe:
        features = fe._get_u64(R.GET_FEATURES)
        pf = fe._get_u64(R.GET_PROTOCOL_FEATURES)
        fe._set_u64(R.SET_PROTOCOL_FEATURES, pf & ~P.bit(PF.REPLY_ACK))
        offer = {"features": features, "protocol_features": pf,
                 "queue_num": fe._get_u64(R.GET_QUEUE_NUM),
                 "max_mem_slots": fe._get_u64(R.GET_MAX_MEM_SLOTS)}
        # the config space: MAC, status, max queue pairs, MTU (12 bytes);
        # the first 6 bytes alone as QEMU's virtio-net reads the MAC too
        offer["config"] = fe.get_config(0, 12)
        offer["config_mac"] = fe.get_config(0, 6)
    return offer


@pytest.mark.parametrize("args", [
    (2, "sink"),
    (1, "loopback", "--mtu", "9000", "--mac", "52:54:00:12:34:56", "--queue-size", "512"),
    (4, "generator", "--frame-size", "128", "--cpus", "0"),
    (1, "udp:127.0.0.1:40210,127.0.0.1:41210"),        # a port that sets the MTU itself
], ids=["sink", "loopback-mtu-mac", "generator-4", "udp"])
def test_a_restart_offers_what_the_first_start_offered(lab, monkeypatch, tmp_path, args):
    """QEMU refuses a reconnected back-end that lacks a feature the guest
    acknowledged ("vhost lacks feature mask"): the offer must be a function
    of the command line only.  Two starts, the second with another working
    directory, another hash seed, locale and time zone, and after a kill -9
    of the first (its stale socket and stats endpoints still there)."""
    queues, port, *extra = args
    rt1 = lab.runtime(queues, port, *extra)
    first = _offer(lab.sock, queues)
    lab.kill(rt1)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    monkeypatch.setenv("PYTHONHASHSEED", "4242")
    monkeypatch.setenv("TZ", "Pacific/Chatham")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    lab.runtime(queues, port, *extra)
    second = _offer(lab.sock, queues)
    assert second == first
    assert first["features"] & P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
    assert first["protocol_features"] & P.bit(PF.INFLIGHT_SHMFD)
    assert first["queue_num"] == 2 * queues


def _loop_32(fe: Frontend) -> None:
    """Negotiate, then 32 numbered frames through pair 0 and back (loopback)."""
    fe.negotiate()
    fe.post_rx(0, 64)
    fe.send(0, _numbered(0, 32))
    assert len(fe.receive(0, timeout=10, min_frames=32)) == 32


# -- nothing outlives a killed control ----------------------------------------------------------
@pytest.mark.parametrize("interp", INTERPRETERS)
def test_kill9_of_the_control_takes_zygote_spares_and_workers_with_it(lab, interp):
    """The zygote and its spares die with the control (PR_SET_PDEATHSIG);
    the workers, which outlive a dead zygote by design, end when the
    control's end of their command channel closes.  Under traffic, with a
    replacement worker (a spare that became a worker) among them."""
    rt = lab.runtime(2, "loopback", *interp)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        _loop_32(fe)
        victim = rt.queue_stats()[1]["worker_pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: rt.queue_stats()[1]["worker_pid"] not in (None, victim),
                 timeout=30, interval=0.05)
        names = [p.name() for p in rt._children() if _running(p)]
        assert "shardvu-zygote" in names and "shardvu-spare" in names, names
        fe.send(0, _numbered(32, 32))
        lab.kill(rt)
        assert fe.wait_closed(5)


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_the_front_end_sees_a_killed_control_go_only_after_its_workers(lab, interp):
    """Every worker holds a copy of the front-end's connection, so the
    front-end learns of the control's death only once no process can write
    to its rings any more: QEMU reads ``used->idx`` at the disconnect and
    completes TX buffers itself from there while the link is down, and a
    worker still completing buffers after that made the guest's driver see
    a used id that was not a head (tests/test_restart_qemu.py).  Here one
    worker is stopped (SIGSTOP) across the kill: the connection stays open
    while it lives, and closes once it resumes and exits."""
    rt = lab.runtime(2, "loopback", *interp)
    with Frontend(rt.sock, queue_pairs=2) as fe:
        _loop_32(fe)
        stats = rt.queue_stats()
        pids = [stats[q]["worker_pid"] for q in range(4)]
        held = psutil.Process(pids[1])
        held.suspend()
        try:
            wait_for(lambda: held.status() == psutil.STATUS_STOPPED, timeout=5, interval=0.01)
            family = rt._children()
            rt.proc.send_signal(signal.SIGKILL)
            assert rt.proc.wait(10) == -signal.SIGKILL
            others = [psutil.Process(p) for p in pids if p != held.pid]
            psutil.wait_procs(others, timeout=20)
            assert not [p.pid for p in others if _running(p)]
            assert held.status() == psutil.STATUS_STOPPED, held.status()
            assert not fe.wait_closed(1.0), "closed while a worker could still write to its ring"
        finally:
            held.resume()
        assert fe.wait_closed(20)
        # its files are closed after its memory is gone (do_exit): exiting
        psutil.wait_procs([held], timeout=10)
        assert not _running(held)
        psutil.wait_procs(family, timeout=20)
    lab.kill_done(family)


@pytest.mark.parametrize("when", ["during", "after"])
def test_kill9_around_a_reload_leaves_nothing(lab, when):
    """A reload (SIGHUP) executes a new zygote and replaces every worker;
    kill -9 while it runs, or after it, still takes the old zygote, the
    new one, their spares and the new workers along."""
    rt = lab.runtime(1, "sink")
    os.kill(rt.proc.pid, signal.SIGHUP)
    if when == "after":
        wait_for(lambda: "workers replaced" in rt.log(), timeout=30, interval=0.05)
    else:
        time.sleep(0.05)
    lab.kill(rt)


def test_kill9_with_pcap_leaves_no_capture_process_nor_its_rings(lab, tmp_path):
    """--pcap adds a capture process and per-queue rings in /dev/shm: after
    kill -9 of the control the process ends and removes the rings."""
    rt = lab.runtime(1, "udp:127.0.0.1:40190,127.0.0.1:41190", "--pcap", str(tmp_path / "c.pcapng"))
    capture = [p for p in rt._children() if "shardvu.control.capture" in p.cmdline()]
    assert len(capture) == 1
    rings = capture[0].cmdline()[capture[0].cmdline().index("shardvu.control.capture") + 1]
    assert os.path.isdir(rings)
    lab.kill(rt)
    assert not os.path.exists(rings), os.listdir(rings)


# -- the front-end comes back -----------------------------------------------------------------------
@pytest.mark.parametrize("interp", INTERPRETERS)
def test_server_mode_a_restarted_instance_serves_the_front_end_again(lab, interp):
    """kill -9 mid-traffic, a new ``shardvu run`` on the same path (the
    killed one's socket file is still there), the front-end reconnects
    keeping its memory and rings (QEMU's reconnect=1) and resumes at the
    used index: every frame sent after the reconnect is counted once by
    the new instance, and nothing sent before it is counted again."""
    rt1 = lab.runtime(1, "sink", *interp)
    with Frontend(rt1.sock) as fe:
        fe.negotiate()
        assert fe.send(0, _numbered(0, 100)) == 100
        wait_for(lambda: _tx_counted(rt1) == (100, 6000), timeout=10, interval=0.05)
        lab.kill(rt1)
        assert os.path.exists(lab.sock)          # stale: nobody cleaned up
        rt2 = lab.runtime(1, "sink", *interp)
        fe.reconnect(lab.sock)
        fe.reclaim_tx(0)
        sent = 0
        for round_ in range(5):
            sent += fe.send(0, _numbered(100 + sent, 50))
            fe.reclaim_tx(0)
        assert sent == 250
        wait_for(lambda: _tx_counted(rt2) == (250, 250 * 60), timeout=10, interval=0.05)
        time.sleep(0.6)         # a repeat would be published late
        assert _tx_counted(rt2) == (250, 250 * 60)
        assert fe.queues[1].used_idx == 350


def test_client_mode_retries_until_the_front_end_listens_again(lab, tmp_path):
    """``shardvu run --client``: the front-end listens; after kill -9 of the
    control it listens again (QEMU's server=on), a new ``--client``
    instance started before the listener exists keeps retrying, connects
    once it appears, and traffic resumes."""
    accepted: list = []

    def accept_one():
        accepted.append(Frontend.accept(lab.sock, timeout=60))
    t = threading.Thread(target=accept_one, daemon=True)
    t.start()
    wait_for(lambda: os.path.exists(lab.sock), timeout=5, interval=0.01)
    rt1 = lab.runtime(1, "sink", "--client")
    t.join(60)
    fe = Frontend(sock=accepted.pop())
    try:
        fe.negotiate()
        assert fe.send(0, _numbered(0, 40)) == 40
        wait_for(lambda: _tx_counted(rt1)[0] == 40, timeout=10, interval=0.05)
        lab.kill(rt1)
        assert fe.wait_closed(5)
        # the new instance starts while nobody listens: it retries
        rt2 = lab.runtime(1, "sink", "--client")
        time.sleep(1.5)
        assert rt2.proc.poll() is None
        t = threading.Thread(target=accept_one, daemon=True)
        t.start()
        t.join(30)
        assert accepted, "the restarted --client instance did not connect"
        fe.reconnect(sock=accepted.pop())
        fe.reclaim_tx(0)
        assert fe.send(0, _numbered(40, 60)) == 60
        wait_for(lambda: _tx_counted(rt2) == (60, 3600), timeout=10, interval=0.05)
        assert fe.queues[1].used_idx == 100
    finally:
        fe.close()


# -- inflight buffers are resubmitted ---------------------------------------------------------------
def test_inflight_buffers_of_a_killed_control_are_resubmitted(lab):
    """INFLIGHT_SHMFD end to end through the sharded runtime: the front-end
    keeps the inflight region across the back-end's death and hands it to
    the new one with SET_INFLIGHT_FD; the new TX worker resubmits what the
    region says was in flight and skips what was completed.

    The state the dead back-end left is written the way a back-end that
    completes out of order leaves it (shardvu's own workers complete in
    order, so a kill leaves at most a run of heads in flight): it had
    popped A, B, C, completed B only (used ring: B; region: A and C in
    flight).  Resuming from the used index alone would send B twice and
    lose A; with the region the new instance completes A and C, then D
    and E, which nobody had popped: each exactly once, in that order.
    Frame sizes tell them apart at the sink."""
    size = {"A": 61, "B": 62, "C": 63, "D": 64, "E": 65}
    rt1 = lab.runtime(1, "sink")
    with Frontend(rt1.sock, inflight=True) as fe:
        fe.negotiate()
        assert fe.has_protocol(PF.INFLIGHT_SHMFD) and fe.inflight_fd >= 0
        assert fe.send(0, _numbered(0, 10)) == 10
        wait_for(lambda: _tx_counted(rt1) == (10, 600), timeout=10, interval=0.05)
        desc = fe.inflight_desc
        region = InflightBuffer.map(os.dup(fe.inflight_fd), desc.mmap_size, desc.mmap_offset,
                                    desc.num_queues, desc.queue_size)
        try:
            txq = region.queue(1)
            wait_for(lambda: txq.used_idx == 10, timeout=5, interval=0.02)
            assert txq.version == 1 and txq.inflight_heads() == []
            lab.kill(rt1)
            fe.reclaim_tx(0)
            vq = fe.queues[1]
            for name in "ABCDE":
                assert fe.send(0, _numbered(ord(name), 1, size[name]), kick=False) == 1
            head = {name: vq.avail_entry(10 + i) for i, name in enumerate("ABCDE")}
            # what the dead back-end did: popped A B C (counters 10 11 12),
            # completed B (used slot 10, used->idx 11, its batch finished)
            for n, name in enumerate("ABC"):
                txq.set_counter(head[name], 10 + n)
                txq.set_inflight(head[name], name != "B")
            fe.write(vq.used_gpa + 4 + 8 * (10 % vq.size),
                     struct.pack("<II", head["B"], 0))
            fe.write(vq.used_gpa + 2, struct.pack("<H", 11))
            txq.last_batch_head = head["B"]
            txq.used_idx = 11
            assert [h for _, h in txq.inflight_heads()] == [head["A"], head["C"]]

            rt2 = lab.runtime(1, "sink")
            fe.reconnect(lab.sock)          # SET_VRING_BASE = used idx (11), SET_INFLIGHT_FD
            fe.kick(1)
            wait_for(lambda: vq.used_idx == 15, timeout=10, interval=0.02)
            used = [h for h, _ in fe._get_used(1)]
            assert used == [head["B"], head["A"], head["C"], head["D"], head["E"]]
            assert txq.used_idx == 15 and txq.inflight_heads() == []
            # The rings start at SET_VRING_KICK and are enabled right after
            # (QEMU's order too): a ring not yet enabled since it started is
            # left alone until the enable, so nothing is discarded.
            want = size["A"] + size["C"] + size["D"] + size["E"]

            def accounted():
                s = rt2.queue_stats()[1]
                return s["packets"], s["drops_by_reason"].get("ring_disabled", 0), s["bytes"]
            wait_for(lambda: sum(accounted()[:2]) == 4, timeout=10, interval=0.05)
            time.sleep(0.6)         # a repeat would be published late
            assert accounted() == (4, 0, want)
        finally:
            region.close()


# -- socket activation: the listening socket outlives the control -------------------------------
def _family_gone(pid: int, timeout: float = 20.0) -> None:
    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.kill(pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"left running after kill -9 of the control: {_names(alive)}"


def test_socket_activation_keeps_the_socket_across_a_restart(tmp_path):
    """What systemd's socket unit does (docs/restart.md): it owns the
    listening socket and hands it to each start of the service
    (``LISTEN_FDS``/``LISTEN_PID``).  After kill -9 of the control the path
    still accepts: a front-end that reconnects at once is queued in the
    socket's backlog, not refused, and is served when the next instance
    starts.  Loopback: the front-end gets each numbered frame back once."""
    import subprocess
    import sys
    path = str(tmp_path / "vu.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(8)
    fd = lst.fileno()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    # the wrapper execs shardvu under its own pid (LISTEN_PID names it),
    # the socket on fd 3 (SD_LISTEN_FDS_START)
    wrapper = ("import os, sys\n"
               f"os.dup2({fd}, 3)\nos.close({fd})\n"
               "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
               "os.execv(sys.executable, [sys.executable, '-m', 'shardvu.cli', 'run', '--queues', '1',"
               " '--port', 'loopback', '--name', 'act', '--log-level', 'INFO'])\n")

    def start(n: int) -> subprocess.Popen:
        log = open(tmp_path / f"act{n}.log", "w")
        try:
            return subprocess.Popen([sys.executable, "-c", wrapper], pass_fds=[fd], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def round_trip(fe: Frontend, start_seq: int, n: int) -> None:
        assert fe.send(0, _numbered(start_seq, n)) == n
        got = []
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            got += [struct.unpack_from("<I", f)[0] for f in fe.receive(0, timeout=0.5)]
        fe.reclaim_tx(0)
        assert got == list(range(start_seq, start_seq + n))

    procs = []
    fe = None
    try:
        procs.append(start(0))
        fe = Frontend(path, timeout=30)     # answered once the service is up
        fe.negotiate()
        fe.post_rx(0, 128)
        round_trip(fe, 0, 32)
        _family_gone(procs[0].pid)
        assert procs[0].wait(10) == -signal.SIGKILL
        assert fe.wait_closed(5)
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        early.connect(path)                 # nobody serves it now: queued, not refused
        procs.append(start(1))
        fe.reconnect(sock=early)
        round_trip(fe, 32, 64)
    finally:
        if fe is not None:
            fe.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                assert p.wait(15) == 0
        lst.close()
