"""``--pcap FILE``: the capture process, which alone writes the pcapng file.

The control process calls :meth:`Capture.start` before the workers exist:
it opens FILE (an unwritable path is a one-line startup error), makes one
capture ring per queue in a private directory under /dev/shm
(:mod:`shardvu.workers.pcap`), puts the directory in ``SHARDVU_PCAP_DIR``
for the workers to inherit, and starts this module as a process of its
own.  That process polls the rings every few milliseconds and writes each
record as an Enhanced Packet Block.

The file: one Interface Description Block per queue pair (interface *i* =
pair *i*, named ``pairI``, nanosecond timestamps), and each frame's
``epb_flags`` direction: *outbound* for frames the guest sent (TX queue
``2i+1``), *inbound* for frames handed to the guest (RX queue ``2i``).  So
queue = 2 x interface + (1 if outbound else 0).

Never blocking traffic: the process runs at a lower priority (``NICE``)
than the workers, and a worker whose ring is full drops capture records
and counts them (:data:`shardvu.workers.pcap.DROPPED_OFF`); the counts are
logged when capture ends (a warning when any record was lost).  ``--pcap-limit BYTES`` stops writing before the
file would exceed BYTES, says so in the log, and goes on draining the rings
(their records are discarded, not counted as drops).

:meth:`Capture.stop` (after the workers stopped) signals the process, which
drains what is left, logs its totals and exits; the directory is removed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

__all__ = ["Capture", "CaptureError", "main"]

log = logging.getLogger("shardvu.capture")

_IF_TSRESOL = 9
#: the capture process's niceness increment: where it shares a CPU with the
#: ring loops it gets what they leave (its rings overflow, counted; traffic
#: keeps its CPU)
NICE = 10
_EPB_FLAGS = 2
_INBOUND, _OUTBOUND = 1, 2


class CaptureError(Exception):
    """Capture cannot start; the message is one line."""


class Capture:
    """The control process's handle on the capture process."""

    def __init__(self, proc: subprocess.Popen, directory: str):
        self.proc = proc
        self.directory = directory

    @classmethod
    def start(cls, path: str, num_queues: int, limit: int = 0,
              log_level: str = "INFO") -> "Capture":
        """Open ``path``, make the rings, export ``SHARDVU_PCAP_DIR`` and
        start the writer.  Raises CaptureError (one line)."""
        from shardvu.workers.pcap import ENV, create_ring, ring_path
        if limit < 0:
            raise CaptureError("--pcap-limit must not be negative")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CaptureError(f"--pcap {path}: cannot write it: {exc.strerror}") from None
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        directory = tempfile.mkdtemp(prefix="shardvu-pcap-", dir=base)
        try:
            for q in range(num_queues):
                create_ring(ring_path(directory, q))
            cmd = [sys.executable, "-m", "shardvu.control.capture", directory, str(fd),
                   str(num_queues), str(limit), log_level, str(os.getpid())]
            proc = subprocess.Popen(cmd, pass_fds=(fd,))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            os.close(fd)
        os.environ[ENV] = directory
        return cls(proc, directory)

    def stop(self, timeout: float = 10.0) -> int:
        """Let the writer drain and exit; returns its exit status."""
        from shardvu.workers.pcap import ENV
        os.environ.pop(ENV, None)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
        return rc


class _Writer:
    """The pcapng file (dpkt's block classes) with a size limit."""

    def __init__(self, fileobj, pairs: int, limit: int):
        import dpkt.pcapng as ng
        from shardvu.workers.pcap import SNAPLEN
        self.ng = ng
        self.f = fileobj
        self.limit = limit
        self.stopped = False
        idbs = [ng.InterfaceDescriptionBlockLE(
            snaplen=SNAPLEN, linktype=ng.DLT_EN10MB if hasattr(ng, "DLT_EN10MB") else 1,
            opts=[ng.PcapngOptionLE(code=ng.PCAPNG_OPT_IF_NAME, data=f"pair{i}".encode()),
                  ng.PcapngOptionLE(code=ng.PCAPNG_OPT_IF_TSRESOL, data=bytes([_IF_TSRESOL])),
                  ng.PcapngOptionLE(code=ng.PCAPNG_OPT_ENDOFOPT)])
            for i in range(pairs)]
        self.w = ng.Writer(fileobj, idb=idbs)
        self.size = fileobj.tell()
        self.written = 0
        self._flags = [[ng.PcapngOptionLE(code=_EPB_FLAGS, data=struct.pack("<I", d)),
                        ng.PcapngOptionLE(code=ng.PCAPNG_OPT_ENDOFOPT)]
                       for d in (_INBOUND, _OUTBOUND)]

    def write(self, queue: int, ts_ns: int, length: int, data: bytes) -> None:
        if self.stopped:
            return
        ng = self.ng
        epb = ng.EnhancedPacketBlockLE(iface_id=queue // 2, ts_high=ts_ns >> 32,
                                       ts_low=ts_ns & 0xFFFFFFFF, caplen=len(data),
                                       pkt_len=length, pkt_data=data,
                                       opts=self._flags[queue & 1])
        raw = bytes(epb)
        if self.limit and self.size + len(raw) > self.limit:
            self.stopped = True
            self.f.flush()
            log.warning("pcap: --pcap-limit %d bytes reached after %d frames: capture stopped",
                        self.limit, self.written)
            return
        self.f.write(raw)
        self.size += len(raw)
        self.written += 1


def _drain(rings, writer: _Writer, per_queue: List[int]) -> int:
    from shardvu.workers.pcap import REC
    moved = 0
    hdr = REC.size
    for q, ring in enumerate(rings):
        while True:
            recs = ring.pop_batch(256)
            if not recs:
                break
            moved += len(recs)
            per_queue[q] += len(recs)
            for r in recs:
                ts, length = REC.unpack_from(r, 0)
                writer.write(q, ts, length, r[hdr:])
    return moved


def main(argv: Optional[List[str]] = None) -> int:
    """The capture process: ``DIR FD QUEUES LIMIT LOG_LEVEL PARENT_PID``."""
    from shardvu import logsetup
    from shardvu.workers.pcap import DROPPED_OFF, open_ring, ring_path
    directory, fd, queues, limit, level, parent = (argv or sys.argv[1:])[:6]
    queues, limit, parent = int(queues), int(limit), int(parent)
    logsetup.setup(level, role="capture")
    try:
        os.nice(NICE)       # on a CPU it shares with a worker, the worker goes first
    except OSError:
        pass
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the control process decides
    rings = [open_ring(ring_path(directory, q)) for q in range(queues)]
    per_queue = [0] * queues
    with os.fdopen(int(fd), "wb", buffering=1 << 20) as f:
        writer = _Writer(f, (queues + 1) // 2, limit)
        while not stop and os.getppid() == parent:
            if not _drain(rings, writer, per_queue):
                f.flush()
                time.sleep(0.005)
        _drain(rings, writer, per_queue)
        f.flush()
    dropped = [ctypes.c_int64.from_buffer(r.mm, DROPPED_OFF).value for r in rings]
    # a capture that lost records says so at WARNING (shown at every usual level)
    log.log(logging.WARNING if any(dropped) else logging.INFO,
            "pcap: %d frames written%s; dropped (ring full) by queue: %s",
            writer.written, " (limit reached)" if writer.stopped else "",
            ", ".join(f"{q}:{n}" for q, n in enumerate(dropped)) or "none")
    if os.getppid() != parent:      # the control process died (kill -9): nobody else removes the rings
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
