"""Packaging: the wheel builds from a clean copy of the source, carries the
licence, ``py.typed`` and both console scripts, installs into a fresh
virtual environment and runs ``shardvu bench`` from there."""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import shardvu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_source(dst: str) -> None:
    """The tracked-looking part of the tree (no venvs, caches, build output)."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
        "bench", "docs", "tests"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = str(tmp / "src")
    _copy_source(src)
    # pip's build isolation fetches the build requirement (setuptools>=77).
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "-w", str(tmp / "dist"), src],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "Could not find a version that satisfies" in out.stderr:
        pytest.skip("no package index to fetch setuptools>=77 from: " + out.stderr.strip()[-200:])
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = [os.path.join(tmp / "dist", f) for f in os.listdir(tmp / "dist")]
    return path


def test_wheel_contents(wheel):
    assert os.path.basename(wheel) == f"shardvu-{shardvu.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist = f"shardvu-{shardvu.__version__}.dist-info"
        meta = email.message_from_bytes(z.read(f"{dist}/METADATA"))
        entry_points = z.read(f"{dist}/entry_points.txt").decode()
    assert "shardvu/py.typed" in names and "shardvu/__main__.py" in names
    assert f"{dist}/licenses/LICENSE" in names
    assert {"shardvu/control/server.py", "shardvu/workers/worker.py",
            "shardvu/testing/frontend.py", "shardvu/metrics.py", "shardvu/top.py"} <= set(names)
    assert meta["License-Expression"] == "MIT" and meta["Version"] == shardvu.__version__
    assert any(c == "Programming Language :: Python :: Implementation :: PyPy"
               for c in meta.get_all("Classifier"))
    assert meta.get_all("Project-URL")
    assert "shardvu = shardvu.cli:main" in entry_points
    assert "shardvu-net = shardvu.cli:net_main" in entry_points


def test_wheel_in_fresh_venv_runs_bench(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The dependencies come from this interpreter's site-packages (no
    # network needed); shardvu itself only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    py, bindir = str(venv / "bin" / "python"), venv / "bin"
    out = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([py, "-c", "import shardvu; print(shardvu.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=60).stdout.strip()
    assert where.startswith(str(venv)), where       # not the source tree
    caps = subprocess.run([str(bindir / "shardvu-net"), "--print-capabilities"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=60)
    assert caps.stdout.strip() == '{"type": "net"}', caps.stderr
    out = subprocess.run([str(bindir / "shardvu"), "bench", "--seconds", "1", "--queues", "1"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    total = [ln.split() for ln in out.stdout.splitlines() if ln.strip().startswith("all")]
    assert total and int(total[0][1]) > 0, out.stdout
    out = subprocess.run([py, "-m", "shardvu", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.stdout.strip() == f"shardvu {shardvu.__version__}"
