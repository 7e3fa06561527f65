"""``shardvu top`` in a real terminal (tmux, read back with capture-pane),
and its rendering of rates."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

from shardvu import top
from shardvu.statsapi import name_endpoints
from shardvu.testing.frontend import Frontend
from shardvu.workers.stats import COUNTER_FIELDS

from test_ops_cli import FRAME, NET, env, needs_net, runtime_dir, start, stop, wait_stats  # noqa: F401

TMUX = shutil.which("tmux")


def row(index, **kw):
    q = {"index": index, "direction": "rx" if index % 2 == 0 else "tx",
         **dict.fromkeys(COUNTER_FIELDS, 0), "state": "running", "broken_reason": None,
         "exitcode": None, "worker_pid": 10 + index, "restarts": 0, "cpu_seconds": 0.0,
         "cpu_percent": 12.5, "rss_bytes": 30_000_000, "private_bytes": 20_000_000, "age_s": 0.1}
    q.update(kw)
    return q


def snapshot(t, queues):
    totals = {f: sum(q[f] for q in queues) for f in COUNTER_FIELDS}
    totals.update(cpu_percent=25.0, rss_bytes=60_000_000, private_bytes=40_000_000, restarts=0)
    return {"time": t, "socket": "", "name": "demo", "queues": queues, "totals": totals}


def test_render_rates_states_and_memory():
    prev = snapshot(100.0, [row(0), row(1)])
    snap = snapshot(102.0, [row(0, packets=4_000_000, bytes=256_000_000),
                            row(1, state="broken", broken_reason="outside_memory", restarts=2,
                                drops_by_reason={"port_full": 7, "no_rx_buffer": 0})])
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(top.render(snap, prev))
    text = console.file.getvalue()
    assert "shardvu top demo" in text
    assert "2.00M" in text              # 4 M packets in 2 s
    assert "128.0 MB/s" in text         # 256 MB in 2 s
    assert "broken" in text and "queue 1: broken: outside_memory" in text
    assert "20.0 MB" in text and "12.5" in text
    assert "queue 1 drops: port_full 7" in text and "no_rx_buffer" not in text
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(top.render(snap))     # no baseline: no rates
    assert "2.00M" not in console.file.getvalue()


@needs_net
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_top_in_tmux(tmp_path, env, runtime_dir):
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([NET, "--socket-path", sock, "--queues", "2", "--port", "loopback",
                  "--name", "topdemo"], env=env, log=log)
    tmux = [TMUX, "-S", str(tmp_path / "tmux.sock")]     # a tmux server of our own
    stop_traffic = threading.Event()

    def traffic():
        with Frontend(sock, queue_pairs=2) as fe:
            fe.negotiate()
            for p in range(2):
                fe.post_rx(p, 200)
            while not stop_traffic.is_set():
                for p in range(2):
                    fe.send(p, [FRAME] * 16)
                    fe.receive(p, timeout=0, min_frames=0)
                    fe.post_rx(p, 16, kick=True)
                time.sleep(0.005)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        wait_stats(name_endpoints("topdemo")[1], proc, log)
        sender.start()
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "180", "-y", "30",
                        f"XDG_RUNTIME_DIR={runtime_dir} {sys.executable} -m shardvu top "
                        f"--name topdemo --interval 0.5"], check=True, timeout=30,
                       env={**env, "TERM": "xterm-256color"})
        deadline = time.monotonic() + 30
        while True:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True,
                                    text=True, timeout=30).stdout
            lines = screen.splitlines()
            rows = [ln.split() for ln in lines if ln.split()[:2] in (["0", "rx"], ["1", "tx"])]
            if len(rows) >= 2 and all(r[3] != "-" for r in rows):
                break
            assert time.monotonic() < deadline, screen
            time.sleep(0.3)
        assert "shardvu top topdemo" in screen and "pkt/s" in screen and "Ctrl-C quits" in screen
        assert any(r[2] == "running" for r in rows), screen
        # Ctrl-C ends it, and the alternate screen is left.
        subprocess.run([*tmux, "send-keys", "-t", "top", "C-c"], check=True, timeout=30)
        deadline = time.monotonic() + 15
        while subprocess.run([*tmux, "has-session", "-t", "top"], capture_output=True,
                             timeout=30).returncode == 0:
            assert time.monotonic() < deadline, "shardvu top did not quit on Ctrl-C"
            time.sleep(0.2)
    finally:
        stop_traffic.set()
        sender.join(10) if sender.is_alive() else None
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)
        stop(proc)
    assert not os.path.exists(sock)


def test_top_without_instance_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "shardvu", "top", "--name", "absent", "--timeout", "0.2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no control process" in out.stderr
