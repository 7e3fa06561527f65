"""Prometheus metrics (``--metrics``): the names and labels, values that
match ``shardvu stats --json`` once traffic has stopped, counters that stay
monotonic across front-end reconnections and worker replacements, and
worker imports free of prometheus_client and rich."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardvu.control.stats import DROP_REASONS, StatsCollector
from shardvu.metrics import SIZE_LABELS, parse_address
from shardvu.reasons import DropReason
from shardvu.statsapi import endpoints, name_endpoints
from shardvu.testing.frontend import Frontend
from shardvu.workers.stats import COUNTER_FIELDS

from test_ops_cli import FRAME, NET, env, needs_net, runtime_dir, start, stats, stop, wait_stats  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scrape(url: str) -> dict:
    """``{(name, frozenset(labels.items())): value}`` of every sample."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: dict, metric: str, **labels) -> float:
    return samples[(metric, frozenset({k: str(v) for k, v in labels.items()}.items()))]


def settled(endpoint: str, timeout: float = 15.0) -> dict:
    """A stats snapshot once the counters stopped moving (two snapshots a
    publish period apart agree)."""
    deadline = time.monotonic() + timeout
    prev = None
    while True:
        snap = stats(endpoint)
        counts = [[q[f] for f in COUNTER_FIELDS] for q in snap["queues"]]
        if counts == prev:
            return snap
        assert time.monotonic() < deadline, "counters never settled"
        prev = counts
        time.sleep(1.2)


def metrics_url(log: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"metrics on (http://\S+/metrics)", open(log).read())
        if m:
            return m.group(1)
        assert time.monotonic() < deadline, open(log).read()
        time.sleep(0.05)


def traffic(sock: str, rounds: int, frames=(FRAME,)) -> int:
    """Loop ``rounds`` batches through pair 0; returns frames received."""
    got = 0
    with Frontend(sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 128)
        for _ in range(rounds):
            fe.send(0, list(frames))
            got += len(fe.receive(0, timeout=10, min_frames=len(frames)))
            fe.post_rx(0, len(frames))
    return got


@needs_net
def test_scrape_matches_stats_json_and_survives_reconnect(tmp_path, env, runtime_dir):
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([NET, "--socket-path", sock, "--queues", "1", "--port", "loopback",
                  "--name", "metr", "--metrics", "127.0.0.1:0"], env=env, log=log)
    try:
        endpoint = name_endpoints("metr")[1]
        wait_stats(endpoint, proc, log)
        url = metrics_url(log)
        assert url.startswith("http://127.0.0.1:")            # the default: loopback only
        sizes = [FRAME, FRAME + bytes(100), FRAME + bytes(1000)]
        assert traffic(sock, 20, sizes) == 60

        snap = settled(endpoint)
        out = subprocess.run([sys.executable, "-m", "shardvu", "stats", "--name", "metr", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        cli = json.loads(out.stdout)
        assert [[q[f] for f in COUNTER_FIELDS] for q in cli["queues"]] == \
            [[q[f] for f in COUNTER_FIELDS] for q in snap["queues"]]
        samples = scrape(url)
        # No pid label anywhere: a respawned worker keeps its series.
        assert not any("pid" in dict(labels) for _, labels in samples)
        assert sample(samples, "shardvu_build_info", name="metr",
                      version=__import__("shardvu").__version__) == 1
        for q in cli["queues"]:
            lab = dict(name="metr", queue=q["index"], direction=q["direction"])
            for metric, field in (("shardvu_packets_total", "packets"), ("shardvu_bytes_total", "bytes"),
                                  ("shardvu_errors_total", "ring_errors"), ("shardvu_drops_total", "drops"),
                                  ("shardvu_kicks_total", "kicks"), ("shardvu_calls_total", "calls"),
                                  ("shardvu_calls_suppressed_total", "suppressed"),
                                  ("shardvu_broadcast_packets_total", "broadcast_packets"),
                                  ("shardvu_multicast_packets_total", "multicast_packets"),
                                  ("shardvu_worker_restarts_total", "restarts")):
                assert sample(samples, metric, **lab) == q[field], (metric, q)
            for reason in DropReason:
                assert sample(samples, "shardvu_drops_by_reason_total", reason=reason.value, **lab) == \
                    q["drops_by_reason"][reason.value]
            for label, field in SIZE_LABELS:
                assert sample(samples, "shardvu_size_packets_total", size=label, **lab) == q[field]
            assert sample(samples, "shardvu_worker_cpu_seconds_total", **lab) > 0
            assert sample(samples, "shardvu_worker_private_memory_bytes", **lab) > 0
            assert sample(samples, "shardvu_queue_broken", **lab) == 0
        assert sample(samples, "shardvu_packets_total", name="metr", queue=1, direction="tx") == 60
        assert sample(samples, "shardvu_packets_total", name="metr", queue=0, direction="rx") == 60

        # A second front-end: the counters go on from where they were.
        before = {k: v for k, v in samples.items() if k[0].endswith("_total")}
        assert traffic(sock, 5) == 5
        settled(endpoint)
        after = scrape(url)
        for key, value in before.items():
            assert after[key] >= value, key
        assert sample(after, "shardvu_packets_total", name="metr", queue=1, direction="tx") == 65
    finally:
        took = stop(proc)
    assert took < 5


def test_collector_counters_are_monotonic(tmp_path):
    """Counters fold into a base when a worker is replaced (new pid) and,
    field by field, when a worker resets one (it went down)."""
    pub, query = endpoints(str(tmp_path / "m.sock"))
    with StatsCollector(pub, query) as c:
        def msg(pid, **counters):
            return json.dumps({"index": 0, "pid": pid, "state": "running",
                               "counters": counters,
                               "drops_by_reason": {"no_rx_buffer": counters.get("drops", 0)}}).encode()
        c.set_workers({0: 100})
        c._ingest(msg(100, packets=10, calls=4, drops=2))
        c._ingest(msg(100, packets=15, calls=1, drops=2))       # calls reset on its own
        row = c.snapshot()["queues"][0]
        assert (row["packets"], row["calls"], row["drops"]) == (15, 5, 2)
        c.set_workers({0: 200})                                  # worker replaced
        c._ingest(msg(100, packets=99))                          # late message of the old one
        c._ingest(msg(200, packets=3, drops=1))
        row = c.snapshot()["queues"][0]
        assert (row["packets"], row["calls"], row["drops"], row["restarts"]) == (18, 5, 3, 1)
        assert row["drops_by_reason"]["no_rx_buffer"] == 3
        assert set(row["drops_by_reason"]) == set(DROP_REASONS)
        assert c.snapshot()["totals"]["drops_by_reason"]["no_rx_buffer"] == 3
        # The supervisor's view of respawns goes over the collector's.
        c.set_supervision(0, {"restarts": 4, "last_exit_code": None, "last_exit_signal": 9,
                              "last_recovery_s": 0.012, "state": "broken",
                              "broken_reason": "crash_loop"})
        row = c.snapshot()["queues"][0]
        assert (row["restarts"], row["last_exit_signal"], row["state"], row["broken_reason"]) == \
            (4, 9, "broken", "crash_loop")
        assert row["packets"] == 18


def test_metrics_address_parsing():
    assert parse_address("9310") == ("127.0.0.1", 9310)
    assert parse_address(":9310") == ("127.0.0.1", 9310)
    assert parse_address("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_address("[::1]:9310") == ("::1", 9310)
    for bad in ("x", "1.2.3.4:70000", "::1:80", "[zz]:80"):
        with pytest.raises(ValueError):
            parse_address(bad)


@pytest.mark.parametrize("python", [sys.executable, os.path.join(ROOT, ".venv-pypy", "bin", "python")])
def test_workers_import_neither_prometheus_nor_rich(python):
    if not os.path.exists(python):
        pytest.skip(f"{python} is not installed (.ci/run makes the PyPy venv)")
    code = ("import sys, shardvu.workers.worker, shardvu.workers.stats, shardvu.logsetup; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('rich', 'prometheus_client', 'psutil')); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_net
def test_counters_monotonic_across_a_worker_respawn(tmp_path, env, runtime_dir):
    """SIGKILL a worker: its replacement continues the queue's series (no
    pid label) from where the dead one left them, and a restart is counted."""
    import signal as sig

    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([NET, "--socket-path", sock, "--port", "loopback", "--name", "resp",
                  "--metrics", "127.0.0.1:0"], env=env, log=log)
    try:
        endpoint = name_endpoints("resp")[1]
        wait_stats(endpoint, proc, log)
        url = metrics_url(log)
        assert traffic(sock, 10) == 10
        before_snap = settled(endpoint)
        before = {k: v for k, v in scrape(url).items() if k[0].endswith("_total")}
        tx = next(q for q in before_snap["queues"] if q["direction"] == "tx")
        os.kill(tx["worker_pid"], sig.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            q = next(q for q in stats(endpoint)["queues"] if q["index"] == tx["index"])
            if q["worker_pid"] != tx["worker_pid"] and q["state"] != "starting" and q["restarts"] >= 1:
                break
            assert time.monotonic() < deadline, (q, open(log).read())
            time.sleep(0.1)
        after = scrape(url)
        for key, value in before.items():
            assert after[key] >= value, key
        lab = dict(name="resp", queue=tx["index"], direction="tx")
        assert sample(after, "shardvu_worker_restarts_total", **lab) >= 1
        assert sample(after, "shardvu_packets_total", **lab) == tx["packets"]
    finally:
        stop(proc)
