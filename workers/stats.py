"""Worker side of the stats channel: hot-loop counters and a publisher.

A worker owns one :class:`Counters` (plain attributes, incremented inline by
the ring loop) and one :class:`StatsPublisher`, which sends a JSON snapshot
over a zmq PUB socket *connected* to the control process's SUB endpoint
(see ``shardvu.control.stats.endpoints``).

Contracts:

* Publishing never blocks and never raises on back-pressure: sends use
  ``zmq.NOBLOCK`` with a tiny send high-water mark, and a message that
  cannot be queued is dropped (and counted).  A stats message is only a
  sample; the next one supersedes it.
* :meth:`StatsPublisher.maybe_publish` is a single float comparison when no
  snapshot is due, so the ring loop may call it once per batch.
* The publisher creates its own zmq Context; construct it *in* the worker
  process (after fork/spawn), never inherit one across a fork.

Runs on CPython >= 3.9 and PyPy 3.9; imports nothing but the standard
library and pyzmq (no psutil here).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import zmq

from shardvu.reasons import DropReason

# Size bins and casts (DPDK vhost xstats names), counted by the ring loops
# with the helpers of .framestats.  Which frames count:
#
# * TX queue (guest -> back-end): every frame the ring loop takes from the
#   guest, when it takes it, whatever the port does with it next (forwarded,
#   or dropped as port_full, ring_disabled or by the port itself), as DPDK's
#   vhost PMD counts every frame rte_vhost_dequeue_burst returned, before
#   the application sees it.  Chains the ring rules drop (short_frame,
#   oversize_frame: shorter than the virtio-net header, longer than the
#   path's limit) are not frames taken and count only in drops.  So on TX,
#   sum(size bins) = packets + the drops after the take.
# * RX queue (back-end -> guest): every frame delivered into the guest's RX
#   buffers (used element written), as DPDK counts tx_size_* for the frames
#   rte_vhost_enqueue_burst took; sum(size bins) = packets.  Casts count the
#   same frames.  (DPDK also counts, per RFC 2863, the frames it could not
#   enqueue in tx_broadcast/multicast; shardvu's RX frames that find no
#   buffer are not lost there: they wait in the port, the loopback ring or
#   the generator, and are counted when delivered.)
# * Every path counts the size bins: the CPython and PyPy fast loops, the
#   general VirtQueue path, the two-way ports (counted on the frames handed
#   to the port's send and delivered from its receive), the generator.
# * Casts are counted wherever frame bytes are read or copied.  One path
#   does not count them: a TX queue whose frames go nowhere (--port sink,
#   split_fast*.tx_pass without on_frames), which reads only descriptors;
#   reading each frame's first byte there touches one more cache line per
#   frame and cost 10-50 % of that pass (bench/ringloop.py A/B), so a sink's
#   TX queue reports broadcast_packets = multicast_packets = 0.
# * Under --pcap, workers/pcap.py's capture-aware batch paths replace the
#   worker's: they count what they route through Worker._rx_batch (the
#   generator, the loopback ring's general path) and nothing else until
#   they pass counts= to the loops as the worker does.
from shardvu.framestats import CAST_FIELDS, SIZE_BINS  # noqa: E402  (re-exported)

#: Counter attribute names, in display order; shared with the control side.
COUNTER_FIELDS = ("packets", "bytes", "drops", "kicks", "calls", "suppressed",
                  "batches", "ring_errors") + tuple(b[0] for b in SIZE_BINS) + CAST_FIELDS

#: Worker states a publisher usually reports ("exited": final message on a
#: clean shutdown).  The collector passes any string through and adds
#: "starting" (no message yet) and "dead" (exit noticed by the control side).
STATES = ("idle", "running", "stopped", "broken", "exited")


class Counters:
    """Per-queue counters, cheap to bump from a hot loop (``c.packets += n``).

    All counters are monotonically increasing ints for the life of the worker.
    ``drops`` is the total of ``drops_by_reason`` (one entry per
    :class:`~shardvu.reasons.DropReason`, zeros included): count a drop with
    :meth:`drop`, which the ring walkers call.  ``state`` is one of
    :data:`STATES`; ``broken_reason`` (a :class:`~shardvu.reasons.BrokenReason`
    value) and ``broken_detail`` (the text) are set together with ``state =
    "broken"`` (else None).
    """

    __slots__ = COUNTER_FIELDS[:8] + CAST_FIELDS + (
        "sizes", "state", "broken_reason", "broken_detail", "drops_by_reason")

    def __init__(self) -> None:
        self.packets = 0        # descriptor chains (frames) completed
        self.bytes = 0          # payload bytes moved
        self.drops = 0          # frames dropped (e.g. no RX buffers)
        self.kicks = 0          # kick eventfd wake-ups consumed
        self.calls = 0          # call eventfd writes (interrupts sent)
        self.suppressed = 0     # interrupts skipped (EVENT_IDX / NO_INTERRUPT)
        self.batches = 0        # ring-loop iterations that did work
        self.ring_errors = 0    # malformed descriptors / ring violations
        #: frames per size bin, SIZE_BINS order (read as attributes too:
        #: ``c.size_64_packets``)
        self.sizes = [0] * len(SIZE_BINS)
        self.broadcast_packets = 0
        self.multicast_packets = 0
        self.state = "idle"
        self.broken_reason: Optional[str] = None
        self.broken_detail: Optional[str] = None
        self.drops_by_reason: Dict[DropReason, int] = {r: 0 for r in DropReason}

    def drop(self, reason: DropReason, n: int = 1) -> None:
        """Count ``n`` frames dropped for ``reason`` (and in ``drops``)."""
        self.drops += n
        self.drops_by_reason[reason] += n

    def drops_dict(self) -> Dict[str, int]:
        """``{reason value: count}`` for every DropReason (zeros included)."""
        return {r.value: n for r, n in self.drops_by_reason.items()}

    def as_dict(self) -> Dict[str, int]:
        """The counters (not state) as a fresh dict."""
        return {f: getattr(self, f) for f in COUNTER_FIELDS}

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)}" for f in COUNTER_FIELDS)
        return f"Counters({inner}, state={self.state!r})"


def _size_field(i: int) -> property:
    return property(lambda self: self.sizes[i], doc=f"frames in size bin {SIZE_BINS[i][0]}")


for _i, (_name, _lo, _hi) in enumerate(SIZE_BINS):
    setattr(Counters, _name, _size_field(_i))


class StatsPublisher:
    """Publishes :class:`Counters` snapshots for queue ``queue_index``.

    ``endpoint`` is the control process's SUB address (``ipc://...``), which
    it binds; we connect, so start order does not matter (messages sent
    before the control side is up are simply lost).  ``direction`` is
    carried verbatim ("rx"/"tx").  ``interval`` is the minimum spacing, in
    seconds of the caller's monotonic clock, between :meth:`maybe_publish`
    sends.

    Attributes: ``sent`` (messages handed to zmq) and ``dropped`` (messages
    refused with ``zmq.Again``).  Note that a PUB socket normally discards
    over-HWM messages itself without reporting it, so ``dropped`` is a
    lower bound on loss, not an exact count.
    """

    def __init__(self, endpoint: str, queue_index: int, direction: str,
                 interval: float = 0.5) -> None:
        self.endpoint = endpoint
        self.queue_index = queue_index
        self.direction = direction
        self.interval = interval
        self.pid = os.getpid()
        self.sent = 0
        self.dropped = 0
        self._due = float("-inf")       # first maybe_publish() sends at once
        self._ctx: Optional[zmq.Context] = zmq.Context(io_threads=1)
        self._sock: Optional[zmq.Socket] = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def maybe_publish(self, counters: Counters, now: float) -> bool:
        """Publish if ``interval`` has passed since the last timed publish.

        ``now`` is a monotonic timestamp the caller already has.  Returns
        True if a send was attempted.  Costs one comparison when not due.
        """
        if now < self._due:
            return False
        self._due = now + self.interval
        self.publish(counters)
        return True

    def publish(self, counters: Counters) -> bool:
        """Send a snapshot now.  Never blocks; returns False if dropped
        (or if the publisher is closed)."""
        sock = self._sock
        if sock is None:
            return False
        msg = json.dumps({
            "index": self.queue_index,
            "direction": self.direction,
            "pid": self.pid,
            "time": time.time(),
            "counters": counters.as_dict(),
            "drops_by_reason": counters.drops_dict(),
            "state": counters.state,
            "broken_reason": counters.broken_reason,
            "broken_detail": counters.broken_detail,
        }).encode()
        try:
            sock.send(msg, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self, flush_ms: int = 0) -> None:
        """Close the socket and terminate the context.  Idempotent.

        With the default ``flush_ms=0`` messages still queued are discarded
        (a final "stopped" publish right before close may be lost); pass a
        small ``flush_ms`` to give them that long to leave.
        """
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=flush_ms)
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.term()

    def __enter__(self) -> "StatsPublisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
