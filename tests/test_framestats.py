"""Size bins (DPDK vhost xstats' size_*_packets) and broadcast / multicast
counts, exact, for every ring-loop family: the CPython fast loops, the PyPy
(struct-style) fast loops under PyPy, the general VirtQueue path, the
two-way port paths, and end to end through ``shardvu run`` (stats snapshot
and Prometheus scrape).  Frames sit at every bin edge (60, 64, 65, 127,
128, 255, 256, 511, 512, 1023, 1024, 1522, 1523, 9000, and a 4-byte runt
with no destination) with broadcast, multicast, unicast and
ff:ff:ff:ff:ff:fe (multicast) destinations."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

import framestats_cases as fc
from shardvu.workers import split_fast
from shardvu.framestats import SIZE_BINS
from shardvu.workers.ports import PortRx
from shardvu.workers.stats import COUNTER_FIELDS, Counters
from shardvu.workers.worker import Worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPY = os.path.join(ROOT, ".venv-pypy", "bin", "python")
BINS = tuple(b[0] for b in SIZE_BINS)


def _want(name: str, fs) -> dict:
    want = fc.expected(fs=fs)
    if ".tx_sink." in name:          # count only: casts not counted (workers/stats.py)
        want.update(broadcast_packets=0, multicast_packets=0)
    return want


def _check(cases: dict, fs) -> None:
    assert cases
    for name, got in cases.items():
        assert got == _want(name, fs), name


def test_expected_counts_are_the_definitions():
    want = fc.expected(True)
    assert [want[b] for b in BINS] == [3, 2, 2, 2, 2, 2, 2]     # 4/60/64, 65/127, ... 1523/9000
    assert (want["broadcast_packets"], want["multicast_packets"]) == (3, 7)
    assert fc.expected(False)["size_64_packets"] == 2
    uniform = fc.expected(fs=fc.SETS["uniform"])
    assert (uniform["size_64_packets"], uniform["broadcast_packets"], uniform["multicast_packets"]) == (16, 4, 8)


@pytest.mark.parametrize("name", sorted(fc.SETS))
def test_cpython_fast_loops_general_path_and_deliver(name):
    """split_fast (batch and per-buffer paths), split_fast_struct run by
    CPython, split_loop's TX and RX general paths on chained buffers, and
    ports.deliver."""
    fs = fc.SETS[name]
    cases = fc.run_cases(fs=fs)
    assert {n.split(".")[0] for n in cases} == {"split_fast", "split_fast_struct", "general", "ports"}
    _check(cases, fs)


@pytest.mark.skipif(not os.path.exists(PYPY), reason="no PyPy worker venv (.venv-pypy)")
def test_pypy_fast_loops():
    out = subprocess.run([PYPY, os.path.join(ROOT, "tests", "framestats_cases.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["implementation"] == "pypy"
    assert [run["set"] for run in report["runs"]] == list(fc.SETS)
    for run in report["runs"]:
        fs = fc.SETS[run["set"]]
        assert run["expected"] == fc.expected(fs=fs)
        _check(run["cases"], fs)


class _Port:
    """A two-way port stand-in: records what the TX worker sends, hands the
    RX worker a batch of frames (each with its virtio-net header)."""

    hdr_len = fc.HDR

    def __init__(self, rx_frames=()):
        self.sent = []
        self.rx_frames = list(rx_frames)

    def send(self, frames) -> None:
        self.sent.extend(bytes(f) for f in frames)

    def receive(self, budget: int):
        out, self.rx_frames = self.rx_frames[:budget], self.rx_frames[budget:]
        return out

    def fileno(self) -> int:
        return -1


@pytest.mark.parametrize("chained", [False, True])
def test_two_way_port_tx_counts_the_frames_sent(chained):
    r = fc.Ring(1)
    try:
        fs = fc.frames()
        r.send(fs, chained=chained)
        w = Worker.__new__(Worker)          # only the data side's attributes
        w.vq, w.counters, w.hdr_len, w.batch = r.vq, Counters(), fc.HDR, 64
        w.cache = split_fast.RegionCache(r.mem)
        w.twoway = _Port()
        n, nbytes = w._tx_two_way()
        assert n == len(fs) and nbytes == sum(map(len, fs))
        assert [f[fc.HDR:] for f in w.twoway.sent] == fs
        assert fc.counts(w.counters) == fc.expected(True)
    finally:
        r.close()


@pytest.mark.parametrize("chained", [False, True])
def test_two_way_port_rx_counts_the_frames_delivered(chained):
    r = fc.Ring(0)
    try:
        fs = fc.frames()
        hdr = split_fast.rx_header(fc.HDR)
        port = _Port([hdr + f for f in fs])
        drops = []
        rx = PortRx(port, lambda reason, n: drops.append((reason, n)))
        rx.counts = Counters()
        r.post_rx(len(fs) - 3, chained=chained)      # room for all but 3
        consumed, delivered, _ = rx.pass_once(r.vq, 64, split_fast.RegionCache(r.mem), split_fast, False)
        assert consumed == delivered == len(fs) - 3 and not drops
        # the 3 frames still waiting for buffers are not counted
        assert fc.counts(rx.counts) == fc.expected(fs=fs[:-3])
        assert len(rx.pending) == 3
    finally:
        r.close()


# -- end to end: shardvu run, stats snapshot and Prometheus --------------------

from test_ops_cli import NET, env, needs_net, runtime_dir, start, stop, wait_stats  # noqa: E402,F401
from test_ops_metrics import metrics_url, sample, scrape, settled, traffic  # noqa: E402

#: loopback slots hold 2 KiB: the jumbo frame stays in the unit tests
E2E = [f for f in fc.frames() if len(f) <= 1523]


@needs_net
@pytest.mark.parametrize("workers", ["cpython", "pypy"])
def test_run_reports_size_bins_and_casts_in_stats_and_metrics(tmp_path, env, runtime_dir, workers):
    from shardvu.statsapi import name_endpoints
    extra = []
    if workers == "pypy":
        if not os.path.exists(PYPY):
            pytest.skip("no PyPy worker venv (.venv-pypy)")
        extra = ["--worker-python", PYPY]
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([NET, "--socket-path", sock, "--queues", "1", "--port", "loopback",
                  "--name", "bins", "--metrics", "127.0.0.1:0"] + extra, env=env, log=log)
    try:
        endpoint = name_endpoints("bins")[1]
        wait_stats(endpoint, proc, log, timeout=60)
        url = metrics_url(log)
        rounds = 3
        assert traffic(sock, rounds, E2E) == rounds * len(E2E)
        snap = settled(endpoint)
        want = {f: rounds * v for f, v in fc.expected(fs=E2E).items()}
        assert want["size_1523_to_max_packets"] == rounds and want["broadcast_packets"] > 0
        samples = scrape(url)
        for q in snap["queues"]:            # queue 0: RX (delivered), 1: TX (taken)
            assert {f: q[f] for f in want} == want, q
            assert sum(q[b] for b in BINS) == q["packets"] == rounds * len(E2E)
            lab = dict(name="bins", queue=q["index"], direction=q["direction"])
            for b in BINS:
                label = b[len("size_"):-len("_packets")]
                assert sample(samples, "shardvu_size_packets_total", size=label, **lab) == want[b]
            assert sample(samples, "shardvu_broadcast_packets_total", **lab) == want["broadcast_packets"]
            assert sample(samples, "shardvu_multicast_packets_total", **lab) == want["multicast_packets"]
        assert set(COUNTER_FIELDS) >= set(want)
    finally:
        stop(proc)
