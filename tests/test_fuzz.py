"""The fuzzers as part of the suite: a hostile front-end and a hostile guest
against `shardvu run --port loopback` with its workers, within a CI budget
(at least 2*10**4 mutated messages), with zero findings and every cell of
the coverage matrix (request code x fd kind x connection phase) reached.

The seed is random unless SHARDVU_FUZZ_SEED is set; it is printed, and
`python3 bench/fuzz.py --seed S --replay N` replays connection N of a
finding.  `bench/fuzz.py --messages 1000000` is the long run."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from shardvu.testing.fuzz import (CELLS_PER_PHASE, NUM_CODES, SCHEDULED, Coverage, FdKind,
                                  GuestFuzzer, Phase, ProtocolFuzzer, Target, _schedule,
                                  loops_back, run_campaign)
from shardvu.testing.runtime import Runtime

CI_MESSAGES = 20000
CI_GUEST_ROUNDS = 2000


def seed() -> int:
    env = os.environ.get("SHARDVU_FUZZ_SEED")
    value = int(env) if env else random.SystemRandom().randrange(1 << 32)
    print(f"fuzz seed {value} (replay: SHARDVU_FUZZ_SEED={value}, "
          f"python3 bench/fuzz.py --seed {value} --replay N)")
    return value


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(str(tmp_path / "vu.sock"), 1, "loopback")
    yield rt
    if rt.proc.poll() is None:
        assert rt.stop() == 0


def describe(findings) -> str:
    seen, out = set(), []
    for f in findings:
        key = (f.fuzzer, f.what, f.detail.splitlines()[-1][:80] if f.detail else "")
        if key not in seen:
            seen.add(key)
            out.append(str(f))
    return f"{len(findings)} findings, {len(out)} distinct:\n" + "\n\n".join(out[:20])


def test_campaign_within_the_ci_budget(runtime):
    """The whole campaign: >= 2*10**4 mutated messages and 2*10**3 hostile
    ring rounds; no process dies, every NEED_REPLY is answered, fd and
    process counts hold, frames loop back before and after."""
    s = seed()
    target = Target(runtime.proc.pid, runtime.log_path)
    start = time.monotonic()
    report = run_campaign(runtime.sock, target, s, CI_MESSAGES, CI_GUEST_ROUNDS)
    took = time.monotonic() - start
    print(f"seed {s}: {report.messages} messages ({report.prefix_messages} in valid prefixes), "
          f"{report.connections} connections, {report.guest_rounds} ring rounds, {took:.0f} s, "
          f"{report.rate:.0f} messages/s, coverage min {report.coverage.minimum()}")
    assert report.messages >= CI_MESSAGES
    assert report.guest_rounds >= CI_GUEST_ROUNDS
    assert not report.findings, f"seed {s}: " + describe(report.findings)
    assert report.coverage.empty_cells() == []
    assert report.coverage.minimum() > 0


def test_a_connection_replays_from_its_seed(runtime):
    """The same seed and connection send the same messages."""
    target = Target(runtime.proc.pid, runtime.log_path)
    traces = []
    for _ in range(2):
        fz = ProtocolFuzzer(runtime.sock, 1234, target)
        fz.run_connection(7)
        traces.append(fz.last_trace)
        assert not fz.findings, describe(fz.findings)
    assert traces[0] == traces[1] and len(traces[0]) > SCHEDULED
    other = ProtocolFuzzer(runtime.sock, 1235, target)
    other.run_connection(7)
    assert other.last_trace != traces[0]
    g = [GuestFuzzer(runtime.sock, 99, target) for _ in range(2)]
    for fz in g:
        fz.run_connection(3)
        assert not fz.findings, describe(fz.findings)
    assert g[0].last_trace == g[1].last_trace


def test_the_schedule_reaches_every_cell():
    """Connection n of phase n % 4 takes the next SCHEDULED cells of that
    phase's permutation: 4 * CELLS_PER_PHASE / SCHEDULED connections cover
    the whole matrix, whatever the random messages do."""
    cov = Coverage()
    for conn in range(len(Phase) * CELLS_PER_PHASE // SCHEDULED):
        phase = Phase(conn % len(Phase))
        sched = _schedule(42, phase)
        start = (conn // len(Phase)) * SCHEDULED
        for i in range(SCHEDULED):
            code, kind = sched[(start + i) % len(sched)]
            cov.add(code, kind, phase)
    assert cov.empty_cells() == []
    assert cov.total == NUM_CODES * len(FdKind) * len(Phase)
    assert len(cov.matrix()) == NUM_CODES and len(cov.matrix()[0]) == len(FdKind) * len(Phase)


CRASHING_BACKEND = """
import sys
from shardvu import protocol as P
from shardvu.echo import EchoBackend
real = P.validate_size
def validate_size(msg):          # the old KeyError on request code 0
    if msg.request == 0:
        raise KeyError(msg.request)
    return real(msg)
P.validate_size = validate_size
EchoBackend(1).serve(sys.argv[1])
"""


def test_the_fuzzer_finds_a_control_process_crash(tmp_path):
    """Against a back-end that still dies of request code 0, the fuzzer
    reports the death (with the connection that replays it)."""
    script = tmp_path / "crashing.py"
    script.write_text(CRASHING_BACKEND)
    sock = str(tmp_path / "crash.sock")
    log = open(tmp_path / "crash.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), sock], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        target = Target(proc.pid, str(tmp_path / "crash.log"))
        fz = ProtocolFuzzer(sock, 5, target, reply_timeout=3)
        conn = 0
        while not any(f.what == "process died" for f in fz.findings):
            assert conn < 400, "the fuzzer never sent request code 0"
            fz.run_connection(conn)
            conn += 1
        died = next(f for f in fz.findings if f.what == "process died")
        assert "control process" in died.detail and died.seed == 5
        # the dying process's last output may land just after the death is seen
        logged = [f.detail for f in fz.findings if f.what == "exception logged"]
        deadline = time.monotonic() + 5
        while not any("KeyError" in t for t in logged) and time.monotonic() < deadline:
            time.sleep(0.1)
            logged += target.log_errors()
        assert any("KeyError" in t for t in logged), logged
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_single_process_echo_backend(tmp_path):
    """The library's own single-process loop (Device and VirtQueue in one
    process) under the same fuzzers, a smaller amount."""
    sock = str(tmp_path / "echo.sock")
    log = open(tmp_path / "echo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "shardvu.echo", "--socket", sock],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        s = seed()
        report = run_campaign(sock, Target(proc.pid, str(tmp_path / "echo.log")), s, 3000, 300)
        assert not report.findings, f"seed {s}: " + describe(report.findings)
        assert loops_back(sock) is None
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPY = os.environ.get("SHARDVU_WORKER_PYTHON", os.path.join(ROOT, ".venv-pypy", "bin", "python"))


@pytest.mark.skipif(not os.path.exists(PYPY), reason=(
    f"no PyPy worker environment at {PYPY} (pypy3 -m venv .venv-pypy && "
    ".venv-pypy/bin/pip install pyzmq multiprocess && .venv-pypy/bin/pip install --no-deps -e .)"))
def test_campaign_with_pypy_workers(tmp_path):
    """The PyPy workers run their own ring loop (split_fast_struct): the
    same fuzzers, a smaller amount."""
    rt = Runtime(str(tmp_path / "vu.sock"), 1, "loopback", "--worker-python", PYPY)
    try:
        s = seed()
        report = run_campaign(rt.sock, Target(rt.proc.pid, rt.log_path), s, 5000, 800)
        assert not report.findings, f"seed {s}: " + describe(report.findings)
    finally:
        if rt.proc.poll() is None:
            assert rt.stop() == 0
