"""The bounded vocabulary of bad outcomes: why a frame was dropped, and why a
queue was marked broken.

One enum each, shared by every ring walker, the worker counters, the stats
snapshot, the log lines and the Prometheus metrics, so that a reason reads
the same everywhere.  The value (a short snake_case string) is what stats,
logs and metric labels carry.

The policy -- which bad input breaks the queue and which only drops a frame
-- is the table :data:`shardvu.ringrules.POLICY`, which quotes these names.

Runs on CPython >= 3.9 and PyPy 3.9 (worker code): standard library only.
"""
from __future__ import annotations

import enum

__all__ = ["DropReason", "BrokenReason"]


class DropReason(str, enum.Enum):
    """Why one frame was dropped (and counted) while the queue goes on."""

    #: TX frame shorter than the virtio-net header
    SHORT_FRAME = "short_frame"
    #: frame longer than the device accepts (TX), or than any RX chain can hold
    OVERSIZE_FRAME = "oversize_frame"
    #: RX buffer chain too small for header + frame, without MRG_RXBUF
    RX_BUFFER_TOO_SMALL = "rx_buffer_too_small"
    #: no RX buffer posted by the guest when the frame had to be delivered
    NO_RX_BUFFER = "no_rx_buffer"
    #: the ring is started but disabled (after an enable since it started):
    #: its frames are consumed and dropped
    RING_DISABLED = "ring_disabled"
    #: the port (or the pair's shared ring) had no room
    PORT_FULL = "port_full"
    #: the port refused the frame (e.g. the kernel rejected a tap write)
    PORT_ERROR = "port_error"
    #: an offloaded (GSO / partial checksum) frame for a guest that did not
    #: negotiate the matching GUEST_* feature
    OFFLOAD_NOT_NEGOTIATED = "offload_not_negotiated"
    #: a datagram from an address other than the configured peer
    WRONG_PEER = "wrong_peer"
    #: a datagram or port frame that is not an Ethernet frame
    NOT_ETHERNET = "not_ethernet"

    def __str__(self) -> str:
        return self.value


class BrokenReason(str, enum.Enum):
    """Why a queue was marked broken (its err eventfd signalled): the
    guest's driver violated the ring rules, so nothing more is trusted."""

    #: a buffer (its address or its length) outside guest memory
    OUTSIDE_MEMORY = "outside_memory"
    #: a device-writable descriptor in a TX chain, or a read-only one in RX
    WRONG_DIRECTION = "wrong_direction"
    #: a descriptor chain that loops or is longer than the queue size
    CHAIN_LOOP = "chain_loop"
    #: an indirect table inside an indirect table, an indirect descriptor
    #: with NEXT, or an indirect table whose length is not a multiple of 16
    INDIRECT_MISUSE = "indirect_misuse"
    #: a head or ``next`` index at or beyond the queue size
    INDEX_OUT_OF_RANGE = "index_out_of_range"
    #: ``avail->idx`` moved by more than the queue size
    AVAIL_IDX_JUMP = "avail_idx_jump"
    #: the port function raised, or the port failed for good
    PORT_FAILED = "port_failed"
    #: the worker serving the queue died too often (crash loop)
    CRASH_LOOP = "crash_loop"

    def __str__(self) -> str:
        return self.value
