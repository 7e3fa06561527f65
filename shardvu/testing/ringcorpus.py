"""A corpus of edge and hostile split rings, and every ring walker run over it.

The conformance suite (``tests/test_conformance.py``) holds each walker to
the reference walker of :mod:`shardvu.ringrules`: for each :class:`Case`
it builds a fresh guest memory (several regions, two of them adjacent),
lays the ring out with :class:`~shardvu.testing.driver.DriverQueue`, runs
one batch and records an :class:`~shardvu.ringrules.Outcome` plus a digest
of guest memory outside the ring.  Walkers:

* ``virtqueue``: ``VirtQueue`` through :func:`shardvu.net.pop_tx_frames` /
  :func:`shardvu.net.push_rx_frames`;
* ``split_loop``: ``workers/split_loop.py``;
* ``split_fast``, ``split_fast_struct``: the fast loops, finished by the
  general path when they hand over (``more``), as the worker composes them;
* ``*_ring``: the loopback hops (``tx_to_ring``, ``rx_from_ring``) of both
  styles, through an SPSC ring.

Runs on CPython and PyPy (worker code only: no hypothesis here).
``python -m shardvu.testing.ringcorpus [--random N --seed S]`` prints every
case's outcomes as JSON, which the test uses to compare the interpreters.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from shardvu import net
from shardvu import protocol as P
from shardvu.memory import GuestMemory
from shardvu.protocol import MemoryRegion, VringAddr
from shardvu.ringrules import MAX_FRAME, DropTally, Outcome, RingLayout, reference_rx, reference_tx
from shardvu.testing.driver import DriverQueue
from shardvu.virtqueue import VirtQueue
from shardvu.workers import split_fast, split_fast_struct, split_loop
from shardvu.workers.spsc import DATA_OFF, SpscRing

__all__ = ["Case", "CORPUS", "WALKERS", "random_cases", "run_case", "run_reference", "outcome_json"]

NEXT, WRITE, INDIRECT = 1, 2, 4
UVA = 0x7F00_0000_0000
#: two adjacent regions, a gap, a third one
REGIONS = ((0x0, 0x10000), (0x10000, 0x10000), (0x40000, 0x8000))
RING_GPA = 0x1000
#: the loopback ring's geometry (its max_frame is the TX corpus's)
SLOT_SIZE = 2048
TX_MAX_FRAME = SLOT_SIZE - DATA_OFF
BOUNDARY = 0x10000            # R0 | R1
END = 0x48000                 # end of the last region


class Case(NamedTuple):
    """One ring and one batch.  ``descs``: ``(index, addr, len, flags,
    next)`` written into the descriptor table; ``writes``: raw ``(gpa,
    bytes)`` (indirect tables); ``heads``: avail ring entries; ``avail_idx``:
    the published idx (None: ``len(heads)``); ``frames``: RX frames to
    deliver; ``max_frame``: the frame limit the walkers get."""
    name: str
    direction: str
    descs: Tuple[Tuple[int, int, int, int, int], ...]
    heads: Tuple[int, ...]
    avail_idx: Optional[int] = None
    writes: Tuple[Tuple[int, bytes], ...] = ()
    frames: Tuple[bytes, ...] = ()
    num: int = 16
    hdr_len: int = 12
    mergeable: bool = False
    indirect: bool = True
    budget: int = 64
    max_frame: int = -1          # -1: TX_MAX_FRAME for TX, MAX_FRAME for RX

    def limit(self) -> int:
        if self.max_frame >= 0:
            return self.max_frame
        return TX_MAX_FRAME if self.direction == "tx" else MAX_FRAME


def _table(*descs: Tuple[int, int, int, int]) -> bytes:
    import struct
    return b"".join(struct.pack("<QIHH", *d) for d in descs)


def _tx(name: str, descs, heads=None, **kw) -> Case:
    descs = tuple(descs)
    if heads is None:
        heads = tuple(d[0] for d in descs)
    return Case(name, "tx", descs, tuple(heads), **kw)


def _rx(name: str, descs, frames, heads=None, **kw) -> Case:
    descs = tuple(descs)
    if heads is None:
        heads = tuple(d[0] for d in descs)
    return Case(name, "rx", descs, tuple(heads), frames=tuple(frames), **kw)


def _bufs(n: int, size: int, flags: int, base: int = 0x4000, stride: int = 0x800):
    return [(i, base + i * stride, size, flags, 0) for i in range(n)]


F = [bytes([i]) * (60 + 3 * i) for i in range(8)]      # RX frames
IT = 0x18000                                           # indirect tables live here (R1)


def _corpus() -> List[Case]:
    c: List[Case] = []
    # -- TX: good batches, the policy's drops, hostile chains in a batch ------
    c.append(_tx("tx_batch_ok", _bufs(8, 12 + 60, 0)))
    c.append(_tx("tx_batch_nonconsecutive", _bufs(6, 100, 0), heads=(5, 1, 3, 0, 4, 2)))
    c.append(_tx("tx_budget", _bufs(8, 80, 0), budget=3))
    c.append(_tx("tx_two_desc_chain", [(0, 0x4000, 12, NEXT, 1), (1, 0x5000, 64, 0, 0)], heads=(0,)))
    c.append(_tx("tx_short_frame", [(0, 0x4000, 80, 0, 0), (1, 0x4800, 5, 0, 0), (2, 0x5000, 80, 0, 0)]))
    c.append(_tx("tx_zero_length", [(0, 0x4000, 80, 0, 0), (1, 0x4800, 0, 0, 0)]))
    c.append(_tx("tx_zero_length_unmapped", [(0, 0x30000, 0, 0, 0), (1, 0x4000, 80, 0, 0)]))
    c.append(_tx("tx_header_only", [(0, 0x4000, 12, 0, 0)]))
    c.append(_tx("tx_oversize_frame", [(0, 0x4000, 80, 0, 0), (1, 0x4800, 12 + TX_MAX_FRAME + 1, 0, 0),
                                       (2, 0x8000, 12 + TX_MAX_FRAME, 0, 0)]))
    c.append(_tx("tx_len_ffffffff", [(0, 0x4000, 80, 0, 0), (1, 0x4800, 0xFFFFFFFF, 0, 0),
                                     (2, 0x5000, 80, 0, 0)]))
    c.append(_tx("tx_len_past_end", [(0, 0x4000, 80, 0, 0), (1, END - 40, 80, 0, 0)]))
    c.append(_tx("tx_len_past_gap", [(0, 0x1F000, 0x1800, 0, 0)]))
    c.append(_tx("tx_addr_outside", [(0, 0x4000, 80, 0, 0), (1, 0x30000, 80, 0, 0),
                                     (2, 0x5000, 80, 0, 0)]))
    c.append(_tx("tx_addr_top", [(0, (1 << 64) - 64, 60, 0, 0)]))
    c.append(_tx("tx_short_and_outside", [(0, 0x30000, 5, 0, 0)]))
    c.append(_tx("tx_oversize_and_outside", [(0, 0x30000, 0x100000, 0, 0)]))
    c.append(_tx("tx_spans_regions", [(0, 0x4000, 80, 0, 0), (1, BOUNDARY - 30, 100, 0, 0),
                                      (2, 0x5000, 80, 0, 0)]))
    c.append(_tx("tx_spans_regions_first", [(0, BOUNDARY - 100, 300, 0, 0), (1, 0x5000, 80, 0, 0)]))
    c.append(_tx("tx_writable_desc", [(0, 0x4000, 80, 0, 0), (1, 0x4800, 80, WRITE, 0),
                                      (2, 0x5000, 80, 0, 0)]))
    c.append(_tx("tx_writable_zero_length", [(0, 0x4800, 0, WRITE, 0)]))
    c.append(_tx("tx_writable_in_chain", [(0, 0x4000, 12, NEXT, 1), (1, 0x4800, 80, WRITE, 0)], heads=(0,)))
    c.append(_tx("tx_readable_after_writable", [(0, 0x4000, 12, WRITE | NEXT, 1), (1, 0x4800, 80, 0, 0)],
                 heads=(0,)))
    c.append(_tx("tx_loop", [(0, 0x4000, 80, 0, 0), (1, 0x4800, 12, NEXT, 2), (2, 0x5000, 12, NEXT, 1)],
                 heads=(0, 1)))
    c.append(_tx("tx_self_loop", [(0, 0x4000, 12, NEXT, 0)]))
    c.append(_tx("tx_next_out_of_range", [(0, 0x4000, 80, 0, 0), (1, 0x4800, 12, NEXT, 99)]))
    c.append(_tx("tx_head_out_of_range", _bufs(3, 80, 0), heads=(0, 1, 16, 2)))
    c.append(_tx("tx_head_ffff", _bufs(2, 80, 0), heads=(0xFFFF,)))
    c.append(_tx("tx_avail_jump", _bufs(4, 80, 0), avail_idx=17))
    c.append(_tx("tx_avail_jump_far", _bufs(4, 80, 0), avail_idx=0x8000))
    c.append(_tx("tx_avail_full_ring", _bufs(16, 80, 0)))
    c.append(_tx("tx_indirect_ok", [(0, 0x4000, 80, 0, 0), (1, IT, 32, INDIRECT, 0)],
                 writes=((IT, _table((0x5000, 12, NEXT, 1), (0x5800, 70, 0, 0))),)))
    c.append(_tx("tx_indirect_not_negotiated", [(0, IT, 16, INDIRECT, 0)],
                 writes=((IT, _table((0x5000, 80, 0, 0))),), indirect=False))
    c.append(_tx("tx_indirect_nested", [(0, IT, 16, INDIRECT, 0)],
                 writes=((IT, _table((IT + 0x100, 16, INDIRECT, 0))),)))
    c.append(_tx("tx_indirect_with_next", [(0, IT, 16, INDIRECT | NEXT, 1), (1, 0x4000, 80, 0, 0)],
                 heads=(0,), writes=((IT, _table((0x5000, 80, 0, 0))),)))
    c.append(_tx("tx_indirect_len_not_16", [(0, 0x4000, 80, 0, 0), (1, IT, 24, INDIRECT, 0)],
                 writes=((IT, _table((0x5000, 80, 0, 0), (0, 0, 0, 0))),)))
    c.append(_tx("tx_indirect_len_zero", [(0, IT, 0, INDIRECT, 0)]))
    c.append(_tx("tx_indirect_outside", [(0, 0x30000, 32, INDIRECT, 0)]))
    c.append(_tx("tx_indirect_spans_regions", [(0, BOUNDARY - 16, 32, INDIRECT, 0)],
                 writes=((BOUNDARY - 16, _table((0x5000, 12, NEXT, 1), (0x5800, 70, 0, 0))),)))
    c.append(_tx("tx_indirect_loop", [(0, IT, 32, INDIRECT, 0)],
                 writes=((IT, _table((0x5000, 12, NEXT, 1), (0x5800, 12, NEXT, 0))),)))
    c.append(_tx("tx_indirect_next_out_of_range", [(0, IT, 32, INDIRECT, 0)],
                 writes=((IT, _table((0x5000, 12, NEXT, 5), (0x5800, 12, 0, 0))),)))
    c.append(_tx("tx_chain_bytes_overflow", [(0, 0x4000, 0xFFFFFFF0, NEXT, 1), (1, 0x4800, 0x20, 0, 0)],
                 heads=(0,)))
    c.append(_tx("tx_hdr10", _bufs(4, 70, 0), hdr_len=10))
    c.append(_tx("tx_far_region", [(0, 0x40000, 80, 0, 0), (1, 0x4000, 80, 0, 0), (2, 0x47F00, 0x100, 0, 0)]))
    # -- RX ---------------------------------------------------------------------
    c.append(_rx("rx_batch_ok", _bufs(8, 2048, WRITE), F))
    c.append(_rx("rx_fewer_buffers", _bufs(3, 2048, WRITE), F))
    c.append(_rx("rx_no_frames", _bufs(3, 2048, WRITE), ()))
    c.append(_rx("rx_nonconsecutive", _bufs(6, 2048, WRITE), F[:6], heads=(4, 1, 5, 0, 2, 3)))
    c.append(_rx("rx_too_small", [(0, 0x4000, 2048, WRITE, 0), (1, 0x4800, 40, WRITE, 0),
                                  (2, 0x5000, 2048, WRITE, 0)], F[:4]))
    c.append(_rx("rx_too_small_mergeable", [(0, 0x4000, 2048, WRITE, 0), (1, 0x4800, 40, WRITE, 0),
                                            (2, 0x5000, 2048, WRITE, 0), (3, 0x5800, 2048, WRITE, 0)],
                 F[:4], mergeable=True))
    c.append(_rx("rx_mergeable_span", [(i, 0x4000 + i * 0x100, 30, WRITE, 0) for i in range(12)],
                 F[:2], mergeable=True))
    c.append(_rx("rx_mergeable_runs_out", [(0, 0x4000, 50, WRITE, 0), (1, 0x4800, 50, WRITE, 0)],
                 F[:2], mergeable=True))
    c.append(_rx("rx_header_straddles", [(0, 0x4000, 11, WRITE, 0), (1, 0x4800, 2048, WRITE, 0)],
                 F[:1], mergeable=True))
    c.append(_rx("rx_tiny_buffer", [(0, 0x4000, 4, WRITE, 0)], F[:3]))
    c.append(_rx("rx_readonly", [(0, 0x4000, 2048, WRITE, 0), (1, 0x4800, 2048, 0, 0),
                                 (2, 0x5000, 2048, WRITE, 0)], F[:3]))
    c.append(_rx("rx_readonly_mergeable_second", [(0, 0x4000, 40, WRITE, 0), (1, 0x4800, 2048, 0, 0)],
                 F[:2], mergeable=True))
    c.append(_rx("rx_readable_then_writable", [(0, 0x4000, 12, NEXT, 1), (1, 0x4800, 2048, WRITE, 0)],
                 F[:1], heads=(0,)))
    c.append(_rx("rx_chain", [(0, 0x4000, 12, WRITE | NEXT, 1), (1, 0x4800, 2048, WRITE, 0),
                              (2, 0x5000, 2048, WRITE, 0)], F[:3], heads=(0, 2)))
    c.append(_rx("rx_addr_outside", [(0, 0x4000, 2048, WRITE, 0), (1, 0x30000, 2048, WRITE, 0)], F[:2]))
    c.append(_rx("rx_len_ffffffff", [(0, 0x4000, 2048, WRITE, 0), (1, 0x4800, 0xFFFFFFFF, WRITE, 0)], F[:2]))
    c.append(_rx("rx_len_past_end", [(0, END - 100, 2048, WRITE, 0)], F[:1]))
    c.append(_rx("rx_spans_regions", [(0, 0x4000, 2048, WRITE, 0), (1, BOUNDARY - 50, 2048, WRITE, 0),
                                      (2, 0x5000, 2048, WRITE, 0)], F[:3]))
    c.append(_rx("rx_head_out_of_range", _bufs(3, 2048, WRITE), F[:4], heads=(0, 1, 33, 2)))
    c.append(_rx("rx_avail_jump", _bufs(3, 2048, WRITE), F[:3], avail_idx=40))
    c.append(_rx("rx_loop", [(0, 0x4000, 12, WRITE | NEXT, 0)], F[:1]))
    c.append(_rx("rx_indirect_ok", [(0, IT, 32, INDIRECT, 0)], F[:1],
                 writes=((IT, _table((0x5000, 12, WRITE | NEXT, 1), (0x5800, 2048, WRITE, 0))),)))
    c.append(_rx("rx_indirect_bad_len", [(0, 0x4000, 2048, WRITE, 0), (1, IT, 40, INDIRECT, 0)], F[:2]))
    c.append(_rx("rx_oversize_frame", _bufs(3, 2048, WRITE), (F[0], b"O" * 1500, F[1]), max_frame=1000))
    c.append(_rx("rx_hdr10", _bufs(3, 2048, WRITE), F[:3], hdr_len=10))
    c.append(_rx("rx_full_ring_mergeable", _bufs(16, 2048, WRITE), F * 2, mergeable=True))
    return c


CORPUS: Tuple[Case, ...] = tuple(_corpus())

_ADDRS = (0x4000, 0x4800, 0x8000, BOUNDARY - 40, BOUNDARY - 8, 0x1F000, 0x30000, 0x40000,
          END - 60, END, (1 << 64) - 32, 0)
_LENS = (0, 4, 11, 12, 40, 76, 200, 2048, 0x1800, TX_MAX_FRAME + 12, TX_MAX_FRAME + 13,
         0xFFFFFFFF)


def random_case(rng: random.Random, k: int) -> Case:
    """One random ring of 8 entries: descriptors drawn from interesting
    addresses, lengths and flags, an indirect table, random heads and
    sometimes an avail-index jump."""
    direction = rng.choice(("tx", "rx"))
    descs = []
    for i in range(10):
        if rng.random() < 0.15:
            flags, addr, length = INDIRECT | (NEXT if rng.random() < 0.2 else 0), IT + 0x200 * (i % 3), \
                rng.choice((16, 32, 48, 24, 0))
        else:
            flags = rng.choice((0, WRITE)) if rng.random() < 0.3 else (WRITE if direction == "rx" else 0)
            if rng.random() < 0.3:
                flags |= NEXT
            addr, length = rng.choice(_ADDRS), rng.choice(_LENS)
        descs.append((i % 8, addr, length, flags, rng.randrange(10)))
    writes = []
    for t in range(3):
        tab = []
        for _ in range(3):
            tab.append((rng.choice(_ADDRS[:6]), rng.choice(_LENS[:8]),
                        rng.choice((0, WRITE, NEXT, WRITE | NEXT, INDIRECT)), rng.randrange(4)))
        writes.append((IT + 0x200 * t, _table(*tab)))
    heads = tuple(rng.randrange(9) for _ in range(rng.randrange(1, 9)))
    avail = None if rng.random() < 0.9 else rng.choice((9, 100, 0xFFFF))
    frames = tuple(bytes([j]) * rng.choice((1, 30, 60, 300, 1500)) for j in range(rng.randrange(0, 6)))
    return Case(f"random_{k}", direction, tuple(descs), heads, avail, tuple(writes), frames, num=8,
                hdr_len=rng.choice((12, 12, 10)), mergeable=rng.random() < 0.4,
                indirect=rng.random() < 0.8, budget=rng.choice((64, 64, 2)))


def random_cases(seed: int, n: int) -> List[Case]:
    rng = random.Random(seed)
    return [random_case(rng, k) for k in range(n)]


# -- building one case ----------------------------------------------------------

_PATTERNS: Dict[int, bytes] = {}


def _pattern(gpa: int, size: int) -> bytes:
    """The initial contents of a region: distinct bytes, so a wrong offset shows."""
    if gpa not in _PATTERNS:
        _PATTERNS[gpa] = bytes(((gpa + i) * 7 + ((gpa + i) >> 8)) & 0xFF for i in range(size))
    return _PATTERNS[gpa]


class _Env:
    def __init__(self, case: Case):
        self.mem = GuestMemory()
        for k, (gpa, size) in enumerate(REGIONS):
            fd = os.memfd_create(f"corpus{k}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.mem.add(MemoryRegion(gpa, size, UVA + (k << 32) + gpa, 0), fd)
        for gpa, size in REGIONS:
            self.mem.write(gpa, _pattern(gpa, size))
        self.drv = DriverQueue(self.mem, RING_GPA, case.num)
        for gpa, data in case.writes:
            self.mem.write(gpa, data)
        for i, addr, length, flags, nxt in case.descs:
            self.drv.write_desc(i, addr, length, flags, nxt)
        for h in case.heads:
            self.drv.push_avail(h)
        self.drv.write_avail_idx(len(case.heads) if case.avail_idx is None else case.avail_idx)
        self.layout = RingLayout(self.drv.desc_gpa, self.drv.avail_gpa, self.drv.used_gpa, case.num)
        self.ring_bytes = self.drv.layout.total
        vq = VirtQueue(case.direction == "tx")
        vq.mem = self.mem
        vq.num = case.num
        uva = UVA                     # region 0's uva - gpa (the ring is in it)
        vq.addr = VringAddr(0, 0, uva + self.drv.desc_gpa, uva + self.drv.used_gpa,
                            uva + self.drv.avail_gpa, 0)
        feats = P.bit(P.VIRTIO_F_VERSION_1)
        if case.mergeable:
            feats |= P.bit(P.VIRTIO_NET_F_MRG_RXBUF)
        if case.indirect:
            feats |= P.bit(P.VIRTIO_RING_F_INDIRECT_DESC)
        vq.features = feats
        vq.map_rings()
        vq.started = vq.enable = True
        self.vq = vq

    def digest(self) -> str:
        """Guest memory outside the ring."""
        h = hashlib.sha256()
        for gpa, size in REGIONS:
            data = bytearray(self.mem.read(gpa, size))
            lo, hi = max(RING_GPA, gpa), min(RING_GPA + self.ring_bytes, gpa + size)
            if lo < hi:
                data[lo - gpa:hi - gpa] = bytes(hi - lo)
            h.update(data)
        return h.hexdigest()[:16]

    def used(self) -> Tuple[Tuple[int, int], ...]:
        return tuple(self.drv.used_elem(k) for k in range(self.drv.used_idx))

    def close(self) -> None:
        self.vq.unmap_rings()
        self.drv.close()
        self.mem.close()


Result = Tuple[Outcome, str]


def _finish(env: _Env, case: Case, frames, consumed: int, tally: DropTally) -> Result:
    vq = env.vq
    out = Outcome(tuple(bytes(f) for f in frames) if case.direction == "tx" else (), consumed,
                  env.used(), vq.broken_kind if vq.broken else None, tally.as_dict(),
                  vq.last_avail_idx)
    return out, env.digest()


# -- the walkers ------------------------------------------------------------------

def _tx_virtqueue(env: _Env, case: Case, tally: DropTally):
    frames = net.pop_tx_frames(env.vq, case.hdr_len, case.budget, tally, case.limit())
    return frames, env.vq.used_idx


def _tx_split_loop(env: _Env, case: Case, tally: DropTally):
    n, _nb, frames = split_loop.tx_pass(env.vq, case.hdr_len, case.budget, True, tally, case.limit())
    return frames or [], n


def _tx_fast(style):
    def walk(env: _Env, case: Case, tally: DropTally):
        got: List[bytes] = []
        n, _nb, more = style.tx_pass(env.vq, case.hdr_len, case.budget, style.RegionCache(env.mem),
                                     lambda views: got.extend(bytes(v) for v in views), tally,
                                     case.limit())
        if more:
            n2, _b2, frames = split_loop.tx_pass(env.vq, case.hdr_len, case.budget - n, True, tally,
                                                 case.limit())
            got.extend(frames or [])
            n += n2
        return got, n
    return walk


def _tx_ring(style):
    def walk(env: _Env, case: Case, tally: DropTally):
        with SpscRing.create(64, SLOT_SIZE) as ring:
            n, _nb, _d, more = style.tx_to_ring(env.vq, case.hdr_len, case.budget,
                                                style.RegionCache(env.mem), ring, tally)
            if more:
                n2, _b2, frames = split_loop.tx_pass(env.vq, case.hdr_len, case.budget - n, True,
                                                     tally, ring.max_frame)
                assert ring.push_batch(frames or []) == len(frames or [])
                n += n2
            return [bytes(f) for f in ring.pop_batch(64)], n
    return walk


def _rx_virtqueue(env: _Env, case: Case, tally: DropTally):
    return None, net.push_rx_frames(env.vq, list(case.frames), case.hdr_len, case.mergeable,
                                    tally, case.limit())


def _rx_split_loop(env: _Env, case: Case, tally: DropTally):
    return None, split_loop.rx_pass(env.vq, list(case.frames), case.hdr_len, case.mergeable,
                                    tally, case.limit())[0]


def _rx_fast(style):
    def walk(env: _Env, case: Case, tally: DropTally):
        frames = list(case.frames)
        n, more = 0, True
        if frames:
            n, _nb, more = style.rx_pass(env.vq, frames, split_fast.rx_header(case.hdr_len),
                                         style.RegionCache(env.mem), case.hdr_len + case.limit())
        if more:
            n += split_loop.rx_pass(env.vq, frames[n:], case.hdr_len, case.mergeable, tally,
                                    case.limit())[0]
        return None, n
    return walk


def _rx_ring(style):
    def walk(env: _Env, case: Case, tally: DropTally):
        with SpscRing.create(64, SLOT_SIZE) as ring:
            ring.set_headroom(split_fast.rx_header(case.hdr_len))
            assert ring.push_batch(list(case.frames)) == len(case.frames)
            budget = 64                 # RX takes as many frames as it is given
            n, _nb, more = style.rx_from_ring(env.vq, ring, case.hdr_len, budget,
                                              style.RegionCache(env.mem))
            if more:
                views = ring.peek(budget - n)
                n2 = split_loop.rx_pass(env.vq, views, case.hdr_len, case.mergeable, tally,
                                        case.limit())[0]
                del views
                ring.release(n2)
                n += n2
            return None, n
    return walk


def _ring_applies(case: Case) -> bool:
    if case.direction == "tx":
        return case.limit() == TX_MAX_FRAME
    return case.limit() == MAX_FRAME and all(len(f) <= TX_MAX_FRAME for f in case.frames)


#: name -> (direction, walker, applies(case))
WALKERS: Dict[str, Tuple[str, Callable, Callable[[Case], bool]]] = {
    "virtqueue": ("tx", _tx_virtqueue, lambda c: True),
    "split_loop": ("tx", _tx_split_loop, lambda c: True),
    "split_fast": ("tx", _tx_fast(split_fast), lambda c: True),
    "split_fast_struct": ("tx", _tx_fast(split_fast_struct), lambda c: True),
    "split_fast_ring": ("tx", _tx_ring(split_fast), _ring_applies),
    "split_fast_struct_ring": ("tx", _tx_ring(split_fast_struct), _ring_applies),
    "rx:virtqueue": ("rx", _rx_virtqueue, lambda c: True),
    "rx:split_loop": ("rx", _rx_split_loop, lambda c: True),
    "rx:split_fast": ("rx", _rx_fast(split_fast), lambda c: True),
    "rx:split_fast_struct": ("rx", _rx_fast(split_fast_struct), lambda c: True),
    "rx:split_fast_ring": ("rx", _rx_ring(split_fast), _ring_applies),
    "rx:split_fast_struct_ring": ("rx", _rx_ring(split_fast_struct), _ring_applies),
}


def walkers_for(case: Case) -> List[str]:
    return [name for name, (d, _w, ok) in WALKERS.items() if d == case.direction and ok(case)]


def run_case(case: Case, walker: str) -> Result:
    """Run ``walker`` over a fresh build of ``case``."""
    _d, walk, _ok = WALKERS[walker]
    env = _Env(case)
    try:
        tally = DropTally()
        frames, consumed = walk(env, case, tally)
        return _finish(env, case, frames or (), consumed, tally)
    finally:
        env.close()


def run_reference(case: Case) -> Result:
    """The reference walker over a fresh build of ``case``."""
    env = _Env(case)
    try:
        if case.direction == "tx":
            out = reference_tx(env.mem, env.layout, 0, case.hdr_len, case.budget, case.indirect,
                               case.limit())
        else:
            out = reference_rx(env.mem, env.layout, 0, list(case.frames), case.hdr_len,
                               case.mergeable, case.indirect, case.limit())
            out = out._replace(frames=())
        return out, env.digest()
    finally:
        env.close()


def outcome_json(result: Result) -> dict:
    out, digest = result
    return {"frames": [hashlib.sha256(f).hexdigest()[:12] for f in out.frames],
            "consumed": out.consumed, "used": [list(u) for u in out.used],
            "broken": out.broken.value if out.broken is not None else None,
            "drops": out.drops, "last_avail": out.last_avail, "memory": digest}


def main(argv: Sequence[str] = ()) -> None:
    args = list(argv)
    cases = list(CORPUS)
    if "--random" in args:
        n = int(args[args.index("--random") + 1])
        seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 1
        cases += random_cases(seed, n)
    report = {}
    for case in cases:
        report[case.name] = {"reference": outcome_json(run_reference(case))}
        for w in walkers_for(case):
            report[case.name][w] = outcome_json(run_case(case, w))
    json.dump({"implementation": sys.implementation.name, "cases": report}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
