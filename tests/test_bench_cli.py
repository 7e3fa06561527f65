"""The README's main job, `shardvu bench`, runs end to end."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("port", ["loopback", "generator", "sink"])
def test_shardvu_bench_runs(port):
    out = subprocess.run([sys.executable, "-m", "shardvu.cli", "bench", "--seconds", "1",
                          "--queues", "1", "--port", port],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shardvu bench: 1 queue pair(s)" in out.stdout
    total = [line for line in out.stdout.splitlines() if line.strip().startswith("all")]
    assert total and int(total[0].split()[1]) > 0, out.stdout + out.stderr


def test_bench_connects_to_a_running_instance(tmp_path):
    """`shardvu bench --connect` drives a shardvu started by hand (the
    README's way to watch traffic in top and the metrics)."""
    import os
    import signal

    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    sock = str(tmp_path / "demo.sock")
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "shardvu", "run", "--socket-path", sock,
                             "--port", "loopback", "--name", "demo"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        out = None
        for _ in range(50):                     # until it listens and its stats answer
            out = subprocess.run([sys.executable, "-m", "shardvu", "bench", "--connect", sock,
                                  "--name", "demo", "--seconds", "1", "--queues", "1"],
                                 capture_output=True, text=True, env=env, timeout=120)
            if out.returncode == 0:
                break
        assert out.returncode == 0, out.stdout + out.stderr
        assert "shardvu at " + sock in out.stdout
        total = [line for line in out.stdout.splitlines() if line.strip().startswith("all")]
        assert total and int(total[0].split()[1]) > 0, out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        log.close()
