"""Workers on PyPy: `shardvu run --worker-python <pypy venv python>`.

Needs a PyPy 3.9 environment with pyzmq, multiprocess and shardvu
(``.ci/run`` makes ``.venv-pypy``; see the README).  Skipped, saying why,
where there is none."""
from __future__ import annotations

import os

import psutil
import pytest

from shardvu.testing.runtime import Runtime
from shardvu.testing.frontend import Frontend

from util import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPY = os.environ.get("SHARDVU_WORKER_PYTHON", os.path.join(ROOT, ".venv-pypy", "bin", "python"))

pytestmark = pytest.mark.skipif(not os.path.exists(PYPY), reason=(
    f"no PyPy worker environment at {PYPY} (pypy3 -m venv .venv-pypy && "
    ".venv-pypy/bin/pip install pyzmq multiprocess && .venv-pypy/bin/pip install --no-deps -e .)"))


@pytest.fixture
def pypy_runtime(tmp_path):
    rts = []

    def make(queues, port):
        rt = Runtime(str(tmp_path / f"pypy{len(rts)}.sock"), queues, port, "--worker-python", PYPY)
        rts.append(rt)
        return rt
    yield make
    for rt in rts:
        assert rt.stop() == 0


def test_workers_run_on_pypy(pypy_runtime):
    rt = pypy_runtime(2, "loopback")
    for w in rt.workers():
        assert "pypy" in os.path.basename(os.path.realpath(w.exe())).lower() or \
            "pypy" in " ".join(w.cmdline()).lower()
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        for pair in range(2):
            fe.post_rx(pair, 64)
            frames = [bytes([pair, i]) * 32 for i in range(40)]
            fe.send(pair, frames)
            assert fe.receive(pair, timeout=10, min_frames=40) == frames
        wait_for(lambda: rt.queue_stats()[3]["packets"] == 40, interval=0.2)


def test_pypy_workers_generator_and_sink(pypy_runtime):
    rt = pypy_runtime(1, "generator")
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 64)
        assert len(fe.receive(0, timeout=10, min_frames=100)) >= 100
        fe.send(0, [bytes(64)] * 10)
        wait_for(lambda: fe.queues[1].used_idx == 10)
    procs = rt.workers()
    assert rt.stop() == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
