"""eventfd helpers that also work on Python 3.9 (``os.eventfd`` is 3.10+).

An eventfd (or, as the spec allows, a pipe) is signalled by writing an
8-byte value and drained by reading 8 bytes; the value carries no meaning.
"""
from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["eventfd", "signal", "drain", "EFD_NONBLOCK", "EFD_CLOEXEC"]

EFD_CLOEXEC = 0o2000000
EFD_NONBLOCK = 0o4000
_ONE = (1).to_bytes(8, "little")


def eventfd(initval: int = 0, flags: int = EFD_CLOEXEC | EFD_NONBLOCK) -> int:
    """Create an eventfd; non-blocking and close-on-exec unless told otherwise."""
    if hasattr(os, "eventfd"):
        return os.eventfd(initval, flags)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.eventfd(initval, flags)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def signal(fd: int) -> None:
    """Add 1 to the counter.  A full counter (EAGAIN) already wakes the reader."""
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass


def drain(fd: int) -> int:
    """Read and reset the counter; 0 if nothing was pending (non-blocking fd)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return 0
        raise
