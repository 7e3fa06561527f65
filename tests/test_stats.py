"""Stats channel: worker publisher -> control collector -> ``shardvu stats``."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

from shardvu import statscli
from shardvu.control.stats import StatsCollector, endpoints
from shardvu.workers.stats import COUNTER_FIELDS, Counters, StatsPublisher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUEUE_KEYS = {"index", "direction", *COUNTER_FIELDS, "drops_by_reason", "state", "broken_reason",
              "exitcode", "worker_pid", "restarts", "last_exit_code", "last_exit_signal",
              "last_recovery_s", "cpu_seconds", "cpu_percent", "rss_bytes", "private_bytes", "age_s"}
TOTAL_KEYS = {*COUNTER_FIELDS, "drops_by_reason", "restarts", "cpu_seconds", "cpu_percent",
              "rss_bytes", "private_bytes"}


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vu.sock")


@pytest.fixture
def collector(sock_path, fd_guard):
    pub, query = endpoints(sock_path)
    c = StatsCollector(pub, query, socket_path=sock_path)
    yield c
    c.close()
    assert not os.path.exists(pub[len("ipc://"):])
    assert not os.path.exists(query[len("ipc://"):])


def wait_for(pred, collector=None, timeout=10.0, tick=None):
    """Poll (driving ``collector`` if given, calling ``tick`` each round)
    until ``pred()`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if tick:
            tick()
        if collector is not None:
            collector.poll(20)
        else:
            time.sleep(0.02)
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")


def queue(snap, index):
    return next(q for q in snap["queues"] if q["index"] == index)


def check_shape(snap):
    assert set(snap) == {"queues", "totals", "time", "socket", "name", "control_pid"}
    assert isinstance(snap["time"], float)
    for q in snap["queues"]:
        assert set(q) == QUEUE_KEYS
        assert q["direction"] == ("rx" if q["index"] % 2 == 0 else "tx")
        for f in COUNTER_FIELDS + ("rss_bytes", "private_bytes"):
            assert isinstance(q[f], int)
        assert 0 <= q["private_bytes"] <= q["rss_bytes"]
        assert isinstance(q["cpu_percent"], float) and isinstance(q["age_s"], float)
        assert isinstance(q["state"], str)
    assert set(snap["totals"]) == TOTAL_KEYS
    for f in COUNTER_FIELDS:
        assert snap["totals"][f] == sum(q[f] for q in snap["queues"])
    # Process figures are summed once per live worker process.
    for key in ("rss_bytes", "private_bytes"):
        per_pid = {q["worker_pid"]: q[key] for q in snap["queues"] if q["state"] != "dead"}
        assert snap["totals"][key] == sum(per_pid.values())


def test_endpoints_convention(tmp_path):
    p = str(tmp_path / "x.sock")
    assert endpoints(p) == (f"ipc://{p}.pub", f"ipc://{p}.stats")
    rel = endpoints("rel.sock")
    assert rel[0] == "ipc://" + os.path.abspath("rel.sock") + ".pub"
    with pytest.raises(ValueError):
        endpoints("/" + "a" * 120)


def test_counters_plain_attributes():
    c = Counters()
    c.packets += 3
    c.bytes += 180
    assert c.as_dict() == dict.fromkeys(COUNTER_FIELDS, 0) | {"packets": 3, "bytes": 180}
    assert c.state == "idle" and c.broken_reason is None
    with pytest.raises(AttributeError):
        c.pakets = 1       # __slots__ catches typos in the hot loop


def test_in_process_round_trip(collector, sock_path):
    pub_ep, query_ep = endpoints(sock_path)
    collector.set_workers({0: os.getpid(), 1: os.getpid()})
    c0 = Counters()
    c0.packets, c0.bytes, c0.kicks, c0.calls, c0.batches = 10, 640, 2, 3, 4
    c0.state = "running"
    c1 = Counters()
    c1.state, c1.broken_reason, c1.ring_errors = "broken", "descriptor loop", 1
    with StatsPublisher(pub_ep, 0, "rx") as p0, StatsPublisher(pub_ep, 1, "tx") as p1:
        def tick():
            p0.publish(c0)
            p1.publish(c1)
        snap = wait_for(lambda: (lambda s: s if queue(s, 0)["packets"] == 10
                                 and queue(s, 1)["state"] == "broken" else None)(collector.snapshot()),
                        collector, tick=tick)
    check_shape(snap)
    q0, q1 = queue(snap, 0), queue(snap, 1)
    assert (q0["bytes"], q0["kicks"], q0["calls"], q0["batches"]) == (640, 2, 3, 4)
    assert q0["state"] == "running" and q0["worker_pid"] == os.getpid()
    assert q0["rss_bytes"] > 0 and q0["private_bytes"] > 0 and q0["exitcode"] is None
    assert q1["broken_reason"] == "descriptor loop" and q1["ring_errors"] == 1
    assert snap["totals"]["packets"] == 10 and snap["socket"] == sock_path
    assert q0["age_s"] < 5

    # The query socket answers any request with the same snapshot, as JSON.
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(query_ep)
        req.send(b"anything")
        wait_for(lambda: req.poll(0), collector)
        answer = json.loads(req.recv())
        req.close()
    finally:
        ctx.term()
    check_shape(answer)
    assert queue(answer, 0)["packets"] == 10
    assert collector.queries == 1


def test_queues_named_before_first_message(collector):
    collector.set_workers({0: os.getpid(), 1: os.getpid(), 2: os.getpid(), 3: os.getpid()})
    snap = collector.snapshot()
    check_shape(snap)
    assert [q["index"] for q in snap["queues"]] == [0, 1, 2, 3]
    assert [q["direction"] for q in snap["queues"]] == ["rx", "tx", "rx", "tx"]
    assert all(q["state"] == "starting" and q["packets"] == 0 for q in snap["queues"])


def test_malformed_messages_are_counted_not_fatal(collector, sock_path):
    pub_ep, _ = endpoints(sock_path)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(pub_ep)
        wait_for(lambda: collector.bad_messages, collector,
                 tick=lambda: (s.send(b"not json"), s.send(b'{"index": 0}')))
        s.close()
    finally:
        ctx.term()
    assert collector.snapshot()["queues"] == []


CHILD = textwrap.dedent("""
    import sys, time
    from shardvu.workers.stats import Counters, StatsPublisher
    endpoint, index, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pub = StatsPublisher(endpoint, index, "rx", interval=0.02)
    c = Counters()
    c.state = "running"
    # Run until the parent tells us to exit (stdin closes), counting "packets".
    import select
    while not select.select([sys.stdin], [], [], 0)[0]:
        c.packets += 32; c.bytes += 32 * 64; c.batches += 1
        pub.maybe_publish(c, time.monotonic())
        time.sleep(0.002)
    pub.close()
    sys.exit(rc)
""")


def test_child_process_publisher_and_dead_worker(collector, sock_path):
    pub_ep, _ = endpoints(sock_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, pub_ep, "0", "3"],
                             stdin=subprocess.PIPE, env=env)
    try:
        collector.set_workers({0: child.pid, 1: child.pid + 10**6})   # 1: never reports
        collector.start()      # the background-thread mode
        snap = wait_for(lambda: (lambda s: s if queue(s, 0)["packets"] > 0 else None)(
            collector.snapshot()))
        check_shape(snap)
        q0 = queue(snap, 0)
        assert q0["state"] == "running" and q0["worker_pid"] == child.pid
        assert q0["bytes"] == q0["packets"] * 64 and q0["rss_bytes"] > 0
        assert queue(snap, 1)["state"] == "starting"
        # Counters keep moving while the worker runs.
        wait_for(lambda: queue(collector.snapshot(), 0)["packets"] > q0["packets"])
        child.stdin.close()
        assert child.wait(10) == 3
        collector.mark_dead(0, child.returncode)
        snap = collector.snapshot()
        check_shape(snap)
        q0 = queue(snap, 0)
        assert q0["state"] == "dead" and q0["exitcode"] == 3
        assert q0["packets"] > 0                  # last counters kept
        assert q0["cpu_percent"] == 0.0 and q0["rss_bytes"] == 0
        # A restarted worker (new pid) clears the dead mark; the old
        # worker's counters stay in (monotonic), and a restart is counted.
        packets = q0["packets"]
        collector.set_workers({0: os.getpid()})
        q0 = queue(collector.snapshot(), 0)
        assert q0["state"] == "starting" and q0["exitcode"] is None
        assert q0["packets"] == packets and q0["restarts"] == 1
    finally:
        collector.stop()
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdin and not child.stdin.closed:
            child.stdin.close()


def test_publisher_never_blocks_without_listener(tmp_path, fd_guard):
    pub_ep, _ = endpoints(str(tmp_path / "nobody.sock"))
    c = Counters()
    p = StatsPublisher(pub_ep, 0, "rx")
    try:
        for _ in range(10000):
            p.publish(c)
        # Every call returned; each message was either queued or dropped.
        assert p.sent + p.dropped == 10000
        # maybe_publish honours the interval on the caller's clock.
        before = p.sent + p.dropped
        assert p.maybe_publish(c, 100.0) is True
        assert p.maybe_publish(c, 100.3) is False
        assert p.maybe_publish(c, 100.5) is True
        assert p.sent + p.dropped == before + 2
    finally:
        p.close()
    assert p.publish(c) is False       # closed: a no-op, not an error
    p.close()                          # idempotent


def _args(sock_path, **kw):
    ap = argparse.ArgumentParser()
    statscli.add_arguments(ap)
    argv = ["--socket-path", sock_path]
    for k, v in kw.items():
        argv.append("--" + k.replace("_", "-"))
        if v is not True:
            argv.append(str(v))
    return ap.parse_args(argv)


def test_cli_json_and_table_against_live_collector(collector, sock_path):
    pub_ep, _ = endpoints(sock_path)
    collector.set_workers({0: os.getpid(), 1: os.getpid()})
    c = Counters()
    c.packets, c.bytes, c.state = 123, 123 * 64, "running"
    with StatsPublisher(pub_ep, 0, "rx") as p:
        wait_for(lambda: queue(collector.snapshot(), 0)["packets"] == 123, collector,
                 tick=lambda: p.publish(c))
    collector.mark_dead(1, -9)
    collector.start()
    try:
        out, err = io.StringIO(), io.StringIO()
        assert statscli.command(_args(sock_path, json=True), out, err) == 0
        snap = json.loads(out.getvalue())
        check_shape(snap)
        assert queue(snap, 0)["packets"] == 123 and queue(snap, 1)["state"] == "dead"

        out = io.StringIO()
        assert statscli.command(_args(sock_path), out, err) == 0
        text = out.getvalue()
        assert "packets" in text and "123" in text and "dead(-9)" in text and "all" in text
        assert err.getvalue() == ""
    finally:
        collector.stop()


def test_cli_default_stdout(collector, sock_path, capsys):
    collector.start()
    try:
        assert statscli.command(_args(sock_path, json=True)) == 0
    finally:
        collector.stop()
    assert json.loads(capsys.readouterr().out)["socket"] == sock_path


def test_cli_rate_column():
    snap0 = {"time": 100.0, "socket": "s", "queues": [
        {"index": 0, "direction": "rx", **dict.fromkeys(COUNTER_FIELDS, 0), "state": "running",
         "broken_reason": None, "exitcode": None, "worker_pid": 1, "cpu_percent": 0.0,
         "rss_bytes": 0, "age_s": 0.1}], "totals": {**dict.fromkeys(COUNTER_FIELDS, 0),
                                                  "cpu_percent": 0.0, "rss_bytes": 0}}
    snap1 = json.loads(json.dumps(snap0))
    snap1["time"] = 102.0
    snap1["queues"][0]["packets"] = snap1["totals"]["packets"] = 3_000_000
    table = statscli.format_table(snap1, snap0)
    assert "1.500" in table                       # 3 M packets over 2 s
    assert "1.500" not in statscli.format_table(snap1)


def test_cli_clean_error_when_nothing_listens(tmp_path, fd_guard):
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    rc = statscli.command(_args(str(tmp_path / "none.sock"), json=True, timeout=0.2), out, err)
    assert rc == 1
    assert out.getvalue() == ""
    assert "no control process answered" in err.getvalue()
    assert "none.sock.stats" in err.getvalue()
    assert time.monotonic() - t0 < 30               # sanity: it gave up


@pytest.mark.skipif(shutil.which("pypy3") is None, reason="pypy3 is not installed")
def test_worker_stats_compiles_under_pypy(tmp_path):
    # pyzmq is not installed for pypy here, so check syntax only.
    out = subprocess.run([shutil.which("pypy3"), "-c",
                          "import py_compile, sys; py_compile.compile(sys.argv[1], "
                          "cfile=sys.argv[2], doraise=True)",
                          os.path.join(ROOT, "workers", "stats.py"), str(tmp_path / "s.pyc")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
