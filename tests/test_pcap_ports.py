"""``--pcap FILE`` on the ports that are not two-way: sink, loopback,
generator and ``module:function``, with CPython and PyPy workers, through
the Python front-end on 2 queue pairs.  The file is read back with dpkt's
pcapng blocks: exact frame counts (and bytes) per queue pair and
direction, checked against the queues' own counters.  Also: the
``--pcap-limit`` log line, and a capture ring that overflows (the capture
process stopped) counts its lost records without touching traffic."""
from __future__ import annotations

import os
import re
import signal

import pytest

from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime, _is_capture
from test_pcap import read_pcapng
from util import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPY = os.environ.get("SHARDVU_WORKER_PYTHON", os.path.join(ROOT, ".venv-pypy", "bin", "python"))
INTERPRETERS = [
    pytest.param(None, id="cpython"),
    pytest.param(PYPY, id="pypy", marks=pytest.mark.skipif(
        not os.access(PYPY, os.X_OK), reason=f"no PyPy worker environment at {PYPY} "
        "(pypy3 -m venv .venv-pypy && .venv-pypy/bin/pip install pyzmq multiprocess && "
        ".venv-pypy/bin/pip install --no-deps -e .)")),
]
#: the module:function case: a port function written into the test's
#: directory (control and workers import it through PYTHONPATH)
FUNCTION_PORT = "pcapfn:reverse"


def frames(pair: int, n: int, size: int = 64):
    """``n`` distinct frames of ``size`` bytes for ``pair``."""
    return [bytes([pair, i & 0xFF, i >> 8]) + bytes((pair + i + k) & 0xFF for k in range(size - 3))
            for i in range(n)]


def _start(tmp_path, port: str, python, *extra, queues: int = 2) -> Runtime:
    args = ["--pcap", str(tmp_path / "cap.pcapng"), *extra]
    if python:
        args += ["--worker-python", python]
    (tmp_path / "pcapfn.py").write_text("def reverse(frames):\n"
                                        "    return [bytes(f)[::-1] for f in frames]\n")
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tmp_path) + (os.pathsep + env_path if env_path else "")
    try:
        # PyPy workers come from the zygote: Runtime.workers() may not see
        # them, so wait for the socket and the stats instead
        rt = Runtime(str(tmp_path / "rt.sock"), queues, port, *args, wait=False)
    finally:
        if env_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_path
    wait_for(lambda: os.path.exists(rt.sock) and rt.stats_ready(), timeout=60, interval=0.2)
    return rt


def _send_all(fe: Frontend, pair: int, todo) -> None:
    """Queue every frame of ``todo`` on ``pair``'s TX ring, reclaiming as it goes."""
    todo = list(todo)
    while todo:
        n = fe.send(pair, todo[:128])
        todo = todo[n:]
        if todo:
            wait_for(lambda: fe.reclaim_tx(pair) or fe.queues[2 * pair + 1].num_free, timeout=10,
                     interval=0.01)


def _stopped(rt: Runtime):
    log = rt.log()
    if rt.proc.poll() is None:
        assert rt.stop() == 0
    return rt.log() or log


def _by(recs, pair: int, direction: str):
    return [r[4] for r in recs if r[:2] == (pair, direction)]


def _written(log: str):
    """(frames written, {queue: dropped}) from the capture's last log line."""
    m = re.search(r"pcap: (\d+) frames written.*dropped \(ring full\) by queue: (.*)", log)
    assert m, log
    return int(m.group(1)), {int(q): int(n) for q, n in
                             (x.split(":") for x in m.group(2).split(", "))}


@pytest.mark.parametrize("python", INTERPRETERS)
def test_sink(tmp_path, python):
    rt = _start(tmp_path, "sink", python)
    try:
        sent = {0: frames(0, 300), 1: frames(1, 70, size=1400)}
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            for pair in (0, 1):
                _send_all(fe, pair, sent[pair])
            for pair in (0, 1):
                wait_for(lambda: rt.queue_stats()[2 * pair + 1]["packets"] == len(sent[pair]),
                         timeout=20, interval=0.1)
            qs = rt.queue_stats()
        log = _stopped(rt)
        names, recs = read_pcapng(str(tmp_path / "cap.pcapng"))
        assert names == [b"pair0", b"pair1"]
        for pair in (0, 1):
            assert _by(recs, pair, "out") == sent[pair]
            assert not _by(recs, pair, "in")
            assert qs[2 * pair + 1]["drops"] == 0
        assert all(r[2] == r[3] for r in recs)
        assert _written(log) == (370, {0: 0, 1: 0, 2: 0, 3: 0})
    finally:
        if rt.proc.poll() is None:
            rt.stop()


@pytest.mark.parametrize("python", INTERPRETERS)
@pytest.mark.parametrize("port", ["loopback", FUNCTION_PORT])
def test_loopback_and_function(tmp_path, python, port):
    back = (lambda f: f[::-1]) if port == FUNCTION_PORT else (lambda f: f)
    if python and port == FUNCTION_PORT:
        # PyPy spares do not inherit PYTHONPATH (control/zygote.py: the other
        # interpreter's own sys.path): a port function both can import
        port, back = "shardvu.workers.ports:_loopback", (lambda f: f)
    rt = _start(tmp_path, port, python)
    try:
        sent = {0: frames(0, 200), 1: frames(1, 90, size=1000)}
        got = {}
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            for pair in (0, 1):
                fe.post_rx(pair, 256)
            for pair in (0, 1):
                got[pair] = []
                for i in range(0, len(sent[pair]), 50):
                    chunk = sent[pair][i:i + 50]
                    _send_all(fe, pair, chunk)
                    got[pair] += fe.receive(pair, timeout=10, min_frames=len(chunk))
            wait_for(lambda: all(rt.queue_stats()[q]["packets"] == len(sent[q // 2])
                                 for q in range(4)), timeout=10, interval=0.1)
            qs = rt.queue_stats()
        log = _stopped(rt)
        _, recs = read_pcapng(str(tmp_path / "cap.pcapng"))
        for pair in (0, 1):
            expect_in = [back(f) for f in sent[pair]]
            assert got[pair] == expect_in
            assert _by(recs, pair, "out") == sent[pair]
            assert _by(recs, pair, "in") == expect_in
            assert qs[2 * pair + 1]["packets"] == qs[2 * pair]["packets"] == len(sent[pair])
            assert qs[2 * pair]["drops"] == qs[2 * pair + 1]["drops"] == 0
        assert _written(log) == (2 * 290, {0: 0, 1: 0, 2: 0, 3: 0})
    finally:
        if rt.proc.poll() is None:
            rt.stop()


@pytest.mark.parametrize("python", INTERPRETERS)
def test_generator(tmp_path, python):
    rt = _start(tmp_path, "generator", python, "--frame-size", "128")
    try:
        posted = {0: 100, 1: 37}
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            for pair in (0, 1):
                assert fe.post_rx(pair, posted[pair]) == posted[pair]
            for pair in (0, 1):   # no re-posting: the generator fills exactly what was posted
                wait_for(lambda: rt.queue_stats()[2 * pair]["packets"] == posted[pair],
                         timeout=20, interval=0.1)
            qs = rt.queue_stats()
            used = [fe.queues[2 * pair].used_idx for pair in (0, 1)]   # (receive() would re-post)
        log = _stopped(rt)
        _, recs = read_pcapng(str(tmp_path / "cap.pcapng"))
        for pair in (0, 1):
            inbound = _by(recs, pair, "in")
            assert len(inbound) == posted[pair] == used[pair] == qs[2 * pair]["packets"]
            assert {len(f) for f in inbound} == {128}
            assert not _by(recs, pair, "out")
        assert _written(log)[0] == 137
    finally:
        if rt.proc.poll() is None:
            rt.stop()


def test_limit_says_so_on_loopback(tmp_path):
    rt = _start(tmp_path, "loopback", None, "--pcap-limit", "8192")
    try:
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            fe.post_rx(0, 256)
            sent = frames(0, 100, size=200)
            _send_all(fe, 0, sent)
            assert fe.receive(0, timeout=10, min_frames=100) == sent
            wait_for(lambda: "--pcap-limit 8192 bytes reached" in rt.log(), timeout=10,
                     interval=0.1)
        log = _stopped(rt)
        assert os.path.getsize(tmp_path / "cap.pcapng") <= 8192
        _, recs = read_pcapng(str(tmp_path / "cap.pcapng"))
        assert 0 < len(recs) < 200
        line = next(ln for ln in log.splitlines() if "--pcap-limit 8192 bytes reached" in ln)
        assert f"after {len(recs)} frames: capture stopped" in line
        assert _written(log)[0] == len(recs)
    finally:
        if rt.proc.poll() is None:
            rt.stop()


def test_overflow_counted_traffic_untouched(tmp_path):
    """The capture process is stopped (SIGSTOP) while 3000 frames go into a
    sink: the TX worker's capture ring (2048 records) fills, the rest are
    counted as capture drops; the queue's packets are all 3000, no drop."""
    from shardvu.workers.pcap import SLOTS
    rt = _start(tmp_path, "sink", None)
    cap = None
    try:
        cap = next(p for p in rt._children() if _is_capture(p))
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            cap.send_signal(signal.SIGSTOP)
            sent = frames(0, 3000)
            _send_all(fe, 0, sent)
            wait_for(lambda: rt.queue_stats()[1]["packets"] == 3000, timeout=30, interval=0.1)
            qs = rt.queue_stats()
            cap.send_signal(signal.SIGCONT)
        log = _stopped(rt)
        assert qs[1]["packets"] == 3000 and qs[1]["drops"] == 0
        written, dropped = _written(log)
        assert dropped == {0: 0, 1: 3000 - SLOTS, 2: 0, 3: 0}
        assert written == SLOTS
        _, recs = read_pcapng(str(tmp_path / "cap.pcapng"))
        assert _by(recs, 0, "out") == sent[:SLOTS]      # the first ones, in order
    finally:
        if cap is not None:
            try:
                cap.send_signal(signal.SIGCONT)
            except Exception:
                pass
        if rt.proc.poll() is None:
            rt.stop()
