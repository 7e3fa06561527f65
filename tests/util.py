"""Small helpers shared by the tests."""
from __future__ import annotations

import os
import time


def memfd(size: int = 1 << 20, fill: bytes = b"") -> int:
    """A close-on-exec memfd of ``size`` bytes starting with ``fill``."""
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def wait_for(cond, timeout: float = 5.0, interval: float = 0.002) -> None:
    """Poll ``cond()`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(interval)
