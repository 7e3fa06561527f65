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
