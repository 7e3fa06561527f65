"""Network namespaces for tests and benchmarks: create one, run the
calling thread inside it (and the processes it starts), remove it after.

Traffic to a tap, veth or bridge made inside stays inside the namespace.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import uuid
from typing import Iterator

__all__ = ["can_netns", "netns", "sh"]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def can_netns() -> str:
    """'' when namespaces and taps can be used here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, taps)"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return ""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sh(cmd: str, check: bool = True) -> str:
    """Run ``cmd`` (in the current namespace) and return its stdout;
    RuntimeError with its stderr if it fails and ``check``."""
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r.stdout


@contextlib.contextmanager
def netns(prefix: str = "shvt") -> Iterator[str]:
    """A fresh namespace named ``prefix-XXXXXX`` with ``lo`` up; the calling
    thread lives in it inside the block (``/sys`` still shows the old one:
    read interfaces with rtnetlink, e.g. :func:`shardvu.workers.tap.link_stats`)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    sh(f"ip netns add {name}")
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        try:
            sh("ip link set lo up")
            yield name
        finally:
            _setns(home)
    finally:
        os.close(home)
        sh(f"ip netns del {name}", check=False)
