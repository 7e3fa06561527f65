"""The library must also run on PyPy 3.9 (Debian's pypy3), the workers'
second interpreter."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPY = shutil.which("pypy3")


@pytest.mark.skipif(PYPY is None, reason="pypy3 is not installed (apt-get install pypy3)")
def test_library_round_trip_under_pypy():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([PYPY, os.path.join(ROOT, "tests", "pypy_smoke.py")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("ok pypy (3, 9)")
