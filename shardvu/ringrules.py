"""The ring rules: one specification of what a split-ring walker accepts
from the guest and what it does with everything else.

Two parts, both normative for every walker (``VirtQueue`` with
:func:`shardvu.net.pop_tx_frames`/:func:`shardvu.net.push_rx_frames`,
``workers/split_loop.py``, ``workers/split_fast.py`` and
``workers/split_fast_struct.py``):

* :data:`POLICY`, the table of bad-input classes and their outcomes: the
  queue is marked broken (a :class:`~shardvu.reasons.BrokenReason`, err
  eventfd signalled) or the frame is dropped and counted (a
  :class:`~shardvu.reasons.DropReason`).  The docs quote it
  (:func:`policy_markdown`, ``python -m shardvu.ringrules``).
* A reference walker (:func:`reference_tx`, :func:`reference_rx`): plain,
  slow, spec-shaped code that reads the ring through guest-physical
  copies (so a buffer spanning adjacent regions is one buffer) and says
  what the outcome of a batch must be.  ``tests/test_conformance.py``
  holds every walker to it, on CPython and PyPy.

Order of checks, per descriptor in chain order (the first failing check
decides): index < table size; chain not longer than the table (and 1024
inside an indirect table); indirect rules; running total <= 2**32-1; no
device-readable descriptor after a device-writable one; every byte of the
buffer inside guest memory (a zero-length buffer addresses no byte and is
not checked).  Then, per chain: the direction the queue needs (TX: only
device-readable; RX: only device-writable).  Only then the frame-level
rules (short, oversize, too small), which drop and count.

Batch rule (one walker call = one batch; see :data:`BATCH_RULE`).

Runs on CPython >= 3.9 and PyPy 3.9 (worker code): standard library only.
"""
from __future__ import annotations

import struct
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from .reasons import BrokenReason, DropReason

__all__ = ["POLICY", "Rule", "BATCH_RULE", "MAX_FRAME", "MAX_CHAIN_BYTES", "MAX_INDIRECT",
           "DropTally", "Violation", "RingLayout", "Outcome", "covered", "read_chain",
           "reference_tx", "reference_rx", "policy_markdown"]

#: Longest frame (without its virtio-net header) a walker accepts by default:
#: longer TX frames and RX frames are dropped (OVERSIZE_FRAME).  Walkers that
#: feed a smaller sink (the loopback ring's slots) take that sink's limit.
MAX_FRAME = 65536
#: A chain's total length must fit the used element's 32-bit length.
MAX_CHAIN_BYTES = 0xFFFFFFFF
#: Most descriptors one indirect table may chain (libvhost-user's limit).
MAX_INDIRECT = 1024

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")


class Rule(NamedTuple):
    """One row of :data:`POLICY`: ``outcome`` is ``"broken"`` (the queue is
    marked broken with ``reason``) or ``"drop"`` (the frame is dropped and
    counted under ``reason``, the queue goes on)."""
    outcome: str
    reason: Union[BrokenReason, DropReason]
    detail: str


B, D = BrokenReason, DropReason

#: Every class of bad input and its outcome.  Keys name the input class.
POLICY: Dict[str, Rule] = {
    "buffer_address_outside_memory": Rule(
        "broken", B.OUTSIDE_MEMORY, "a descriptor's address lies in no memory region"),
    "buffer_length_outside_memory": Rule(
        "broken", B.OUTSIDE_MEMORY, "address + length runs past the end of guest memory "
        "(0xFFFFFFFF, or past a region with no adjacent one); a buffer spanning two "
        "adjacent regions is fine"),
    "indirect_table_outside_memory": Rule(
        "broken", B.OUTSIDE_MEMORY, "an indirect table not wholly inside guest memory"),
    "tx_writable_descriptor": Rule(
        "broken", B.WRONG_DIRECTION, "a device-writable descriptor in a TX chain"),
    "rx_readable_descriptor": Rule(
        "broken", B.WRONG_DIRECTION, "a device-readable descriptor in an RX chain"),
    "readable_after_writable": Rule(
        "broken", B.WRONG_DIRECTION, "a device-readable descriptor after a device-writable one"),
    "chain_loop": Rule(
        "broken", B.CHAIN_LOOP, "a chain longer than its table (a loop), or than "
        f"{MAX_INDIRECT} descriptors in an indirect table"),
    "chain_too_long_in_bytes": Rule(
        "broken", B.CHAIN_LOOP, f"a chain whose lengths add up to more than {MAX_CHAIN_BYTES}"),
    "indirect_not_negotiated": Rule(
        "broken", B.INDIRECT_MISUSE, "INDIRECT without VIRTIO_RING_F_INDIRECT_DESC"),
    "indirect_nested": Rule(
        "broken", B.INDIRECT_MISUSE, "an INDIRECT descriptor inside an indirect table"),
    "indirect_with_next": Rule(
        "broken", B.INDIRECT_MISUSE, "a descriptor with both INDIRECT and NEXT"),
    "indirect_bad_length": Rule(
        "broken", B.INDIRECT_MISUSE, "an indirect table length 0 or not a multiple of 16"),
    "avail_idx_jump": Rule(
        "broken", B.AVAIL_IDX_JUMP, "avail->idx more than the queue size ahead of the "
        "last index the device took"),
    "too_many_in_flight": Rule(
        "broken", B.AVAIL_IDX_JUMP, "more chains taken and not yet used than the queue size "
        "(VirtQueue's general API, where a caller holds chains across batches)"),
    "head_out_of_range": Rule(
        "broken", B.INDEX_OUT_OF_RANGE, "an avail ring entry >= the queue size"),
    "next_out_of_range": Rule(
        "broken", B.INDEX_OUT_OF_RANGE, "a next index >= the size of its table"),
    "tx_short_frame": Rule(
        "drop", D.SHORT_FRAME, "a TX chain shorter than the virtio-net header: consumed "
        "(used length 0), not forwarded"),
    "tx_oversize_frame": Rule(
        "drop", D.OVERSIZE_FRAME, "a TX frame longer than the sink takes (MAX_FRAME, or "
        "the loopback ring's slot): consumed (used length 0), not forwarded"),
    "rx_oversize_frame": Rule(
        "drop", D.OVERSIZE_FRAME, "a frame for the guest longer than MAX_FRAME: dropped "
        "when its turn comes (with an RX buffer available); the buffer stays posted"),
    "rx_buffer_too_small": Rule(
        "drop", D.RX_BUFFER_TOO_SMALL, "without MRG_RXBUF, an RX chain shorter than "
        "header + frame: the frame is dropped, the buffer stays posted for the next frame "
        "(never returned with used length 0); with MRG_RXBUF further buffers are used"),
}
del B, D

#: The batch rule every walker follows, quoted by the conformance test.
BATCH_RULE = (
    "A batch takes the available chains in ring order.  Chains before the first "
    "bad chain (one that breaks the queue) are completed exactly as without it: "
    "their frames are forwarded or delivered, their used elements written and "
    "published with the batch's single used->idx store.  The bad chain and every "
    "chain after it are not consumed (last_avail_idx stops at the bad chain, no "
    "used element for it), the queue is marked broken with the first bad chain's "
    "reason and nothing is notified (the err eventfd is).  For RX, a frame whose "
    "buffers include the bad chain is not delivered and the buffers it took are "
    "not used.  Dropped frames are not bad chains: a dropped TX frame's chain is "
    "consumed (used length 0), a dropped RX frame leaves its buffer posted, and "
    "the batch goes on.  A frame that finds no (or, with MRG_RXBUF, not enough) "
    "RX buffers ends the batch undelivered and stays with the caller.")


class DropTally:
    """Dropped frames by reason, for callers without worker counters: the
    walkers call ``drop(reason, n)`` on whatever they are given (this, or
    ``workers.stats.Counters``)."""

    __slots__ = ("total", "by_reason")

    def __init__(self) -> None:
        self.total = 0
        self.by_reason: Dict[DropReason, int] = {r: 0 for r in DropReason}

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.total += n
        self.by_reason[reason] += n

    def as_dict(self) -> Dict[str, int]:
        """``{reason value: count}`` for every reason (zeros included)."""
        return {r.value: n for r, n in self.by_reason.items()}


class Violation(Exception):
    """A ring rule broken by the guest: ``kind`` and a human ``detail``."""

    def __init__(self, kind: BrokenReason, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class RingLayout(NamedTuple):
    """Guest-physical addresses of one split ring's parts, and its size."""
    desc: int
    avail: int
    used: int
    num: int


class Outcome(NamedTuple):
    """What one batch did.  ``frames``: TX frames forwarded (header
    stripped), or RX frames delivered (the header is in guest memory, not
    here).  ``consumed``: RX frames taken from the caller (delivered or
    dropped, a prefix); for TX the chains taken.  ``used``: the published
    used elements ``(id, len)``.  ``broken``: the reason, or None.
    ``drops``: ``{DropReason value: n}``, zeros included.  ``last_avail``:
    the device's next avail index."""
    frames: Tuple[bytes, ...]
    consumed: int
    used: Tuple[Tuple[int, int], ...]
    broken: Optional[BrokenReason]
    drops: Dict[str, int]
    last_avail: int


def covered(mem, addr: int, length: int) -> bool:
    """True when every byte of ``[addr, addr+length)`` lies in some region
    of ``mem`` (adjacent regions may share the range); True for length 0."""
    end = addr + length
    while addr < end:
        r = mem.find_gpa(addr)
        if r is None:
            return False
        addr = r.gpa_end
    return True


def _read(mem, gpa: int, n: int) -> bytes:
    try:
        return mem.read(gpa, n)
    except ValueError:
        raise Violation(BrokenReason.OUTSIDE_MEMORY, f"{gpa:#x}+{n:#x} is outside guest memory") from None


def read_chain(mem, ring: RingLayout, head: int, indirect_ok: bool) -> List[Tuple[int, int, bool]]:
    """The chain at ``head`` as ``(gpa, len, device-writable)`` per
    descriptor (an indirect descriptor replaced by its table's), after every
    per-descriptor rule in the order of the module docstring.  Raises
    :class:`Violation`."""
    B = BrokenReason
    segs: List[Tuple[int, int, bool]] = []
    table, size, in_indirect = ring.desc, ring.num, False
    i, count, total, seen_write = head, 0, 0, False
    while True:
        if i >= size:
            raise Violation(B.INDEX_OUT_OF_RANGE, f"next index {i} >= table size {size}")
        count += 1
        if count > size or count > MAX_INDIRECT:
            raise Violation(B.CHAIN_LOOP, f"descriptor loop: chain longer than {size} entries")
        addr, length, flags, nxt = _DESC.unpack(_read(mem, table + 16 * i, 16))
        if flags & F_INDIRECT:
            if not indirect_ok:
                raise Violation(B.INDIRECT_MISUSE, "indirect descriptor not negotiated")
            if in_indirect:
                raise Violation(B.INDIRECT_MISUSE, "nested indirect descriptor")
            if flags & F_NEXT:
                raise Violation(B.INDIRECT_MISUSE, "indirect descriptor with NEXT")
            if length == 0 or length % 16:
                raise Violation(B.INDIRECT_MISUSE, f"indirect table length {length}")
            if not covered(mem, addr, length):
                raise Violation(B.OUTSIDE_MEMORY, "indirect table is outside guest memory")
            table, size, in_indirect = addr, length // 16, True
            i, count = 0, 0
            continue
        total += length
        if total > MAX_CHAIN_BYTES:
            raise Violation(B.CHAIN_LOOP, f"chain length overflow: {total} bytes")
        writable = bool(flags & F_WRITE)
        if not writable and seen_write:
            raise Violation(B.WRONG_DIRECTION, "device-readable descriptor after a writable one")
        seen_write = seen_write or writable
        if not covered(mem, addr, length):
            raise Violation(B.OUTSIDE_MEMORY, f"buffer {addr:#x}+{length:#x} is outside guest memory")
        segs.append((addr, length, writable))
        if not flags & F_NEXT:
            return segs
        i = nxt


class _Batch:
    """The avail side of one batch: heads in order, the jump check once."""

    def __init__(self, mem, ring: RingLayout, last_avail: int):
        self.mem, self.ring = mem, ring
        self.next = last_avail
        avail_idx = _U16.unpack(mem.read(ring.avail + 2, 2))[0]
        self.left = (avail_idx - last_avail) & 0xFFFF
        if self.left > ring.num:
            raise Violation(BrokenReason.AVAIL_IDX_JUMP, f"avail idx moved by {self.left}")

    def peek_head(self) -> int:
        ring = self.ring
        head = _U16.unpack(self.mem.read(ring.avail + 4 + 2 * (self.next % ring.num), 2))[0]
        if head >= ring.num:
            raise Violation(BrokenReason.INDEX_OUT_OF_RANGE, f"head index {head} >= {ring.num}")
        return head


def _outcome(frames, consumed, used, broken, tally, last_avail) -> Outcome:
    return Outcome(tuple(frames), consumed, tuple(used), broken, tally.as_dict(), last_avail & 0xFFFF)


def reference_tx(mem, ring: RingLayout, last_avail: int, hdr_len: int, budget: int,
                 indirect_ok: bool = False, max_frame: int = MAX_FRAME) -> Outcome:
    """The outcome of one TX batch of at most ``budget`` chains starting at
    avail index ``last_avail``.  Reads guest memory only."""
    tally = DropTally()
    frames: List[bytes] = []
    used: List[Tuple[int, int]] = []
    try:
        batch = _Batch(mem, ring, last_avail)
    except Violation as v:
        return _outcome((), 0, (), v.kind, tally, last_avail)
    broken = None
    while len(used) < budget and batch.left:
        try:
            head = batch.peek_head()
            segs = read_chain(mem, ring, head, indirect_ok)
            if any(w for _a, _n, w in segs):
                raise Violation(BrokenReason.WRONG_DIRECTION, "device-writable descriptor in TX")
        except Violation as v:
            broken = v.kind
            break
        data = b"".join(mem.read(a, n) for a, n, _w in segs)
        if len(data) < hdr_len:
            tally.drop(DropReason.SHORT_FRAME)
        elif len(data) - hdr_len > max_frame:
            tally.drop(DropReason.OVERSIZE_FRAME)
        else:
            frames.append(data[hdr_len:])
        used.append((head, 0))
        batch.next += 1
        batch.left -= 1
    return _outcome(frames, len(used), used, broken, tally, batch.next)


def _scatter(mem, segs: List[Tuple[int, int, bool]], data: bytes) -> None:
    pos = 0
    for addr, n, _w in segs:
        if pos >= len(data):
            break
        take = min(n, len(data) - pos)
        mem.write(addr, data[pos:pos + take])
        pos += take


def reference_rx(mem, ring: RingLayout, last_avail: int, frames: Sequence[bytes], hdr_len: int,
                 mergeable: bool, indirect_ok: bool = False, max_frame: int = MAX_FRAME) -> Outcome:
    """The outcome of delivering ``frames`` (in order) into the RX ring from
    avail index ``last_avail``: each after a zeroed ``hdr_len``-byte header
    whose ``num_buffers`` (12-byte layout) is the number of buffers used.
    Writes the delivered bytes into ``mem`` (the reference's own copy of
    guest memory), as the walkers must."""
    tally = DropTally()
    used: List[Tuple[int, int]] = []
    delivered: List[bytes] = []
    consumed = 0
    if not frames:
        return _outcome((), 0, (), None, tally, last_avail)
    try:
        batch = _Batch(mem, ring, last_avail)
    except Violation as v:
        return _outcome((), 0, (), v.kind, tally, last_avail)

    def take_chain(k: int):
        """Chain at avail position ``batch.next + k``: (head, segs, room)."""
        save = batch.next
        batch.next += k
        try:
            head = batch.peek_head()
        finally:
            batch.next = save
        segs = read_chain(mem, ring, head, indirect_ok)
        if not all(w for _a, _n, w in segs):
            raise Violation(BrokenReason.WRONG_DIRECTION, "device-readable descriptor in RX")
        return head, segs, sum(n for _a, n, _w in segs)

    broken = None
    for frame in frames:
        if not batch.left:
            break
        data = bytes(hdr_len) + bytes(frame)
        try:
            head, segs, room = take_chain(0)
        except Violation as v:
            broken = v.kind
            break
        if len(frame) > max_frame:
            tally.drop(DropReason.OVERSIZE_FRAME)
            consumed += 1
            continue
        if not mergeable:
            if room < len(data):
                tally.drop(DropReason.RX_BUFFER_TOO_SMALL)
                consumed += 1
                continue
            bufs = [(head, segs, len(data))]
        else:
            bufs, pos, k = [], 0, 0
            try:
                while True:
                    take = min(room, len(data) - pos)
                    bufs.append((head, segs, take))
                    pos += take
                    k += 1
                    if pos == len(data):
                        break
                    if k == batch.left:
                        bufs = []           # not enough buffers: the frame waits
                        break
                    head, segs, room = take_chain(k)
            except Violation as v:
                broken = v.kind
                break
            if not bufs:
                break
        if hdr_len == 12:
            data = data[:10] + _U16.pack(len(bufs)) + data[12:]
        pos = 0
        for h, s, take in bufs:
            _scatter(mem, s, data[pos:pos + take])
            used.append((h, take))
            pos += take
        batch.next += len(bufs)
        batch.left -= len(bufs)
        delivered.append(bytes(frame))
        consumed += 1
    return _outcome(delivered, consumed, used, broken, tally, batch.next)


def policy_markdown() -> str:
    """:data:`POLICY` as a Markdown table (what the docs quote)."""
    rows = ["| bad input | outcome | reason | detail |", "|---|---|---|---|"]
    for case, rule in POLICY.items():
        out = "queue broken" if rule.outcome == "broken" else "frame dropped, counted"
        rows.append(f"| {case} | {out} | `{rule.reason.value}` | {rule.detail} |")
    return "\n".join(rows)


if __name__ == "__main__":      # pragma: no cover - docs helper
    print(policy_markdown())
    print()
    print(BATCH_RULE)


def refuse_wrong_direction(vq, elem, tx: bool) -> None:
    """Apply the ``tx_writable_descriptor`` / ``rx_readable_descriptor``
    rows of :data:`POLICY` to a popped chain ``elem`` of ``vq``: give it
    back unconsumed (:data:`BATCH_RULE`) and break the queue.  The walkers
    call it only on the bad path."""
    vq.unpop(elem)
    if tx:
        vq.mark_broken(f"descriptor chain {elem.index} has a device-writable buffer "
                       "in a TX queue", BrokenReason.WRONG_DIRECTION)
    else:
        vq.mark_broken(f"descriptor chain {elem.index} has a device-readable buffer "
                       "in an RX queue", BrokenReason.WRONG_DIRECTION)
