"""The split-ring data path of a worker: one pass over a guest TX ring, one
pass filling a guest RX ring.  Kept short and separate on purpose: this is
the loop to profile (bench/ringloop.py measures it).

Each pass is one batch: at most ``budget`` elements, then a single used-idx
store (``flush``) and at most one notification.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple

from shardvu.net import push_rx_frames_counted
from shardvu.reasons import DropReason
from shardvu.ringrules import MAX_FRAME, refuse_wrong_direction
from shardvu.virtqueue import VirtQueue

from shardvu.framestats import BIN, add_frame_cast

_PYPY = sys.implementation.name == "pypy"


def tx_pass(vq: VirtQueue, hdr_len: int, budget: int, copy: bool, drops=None,
            max_frame: int = MAX_FRAME, counts=None) -> Tuple[int, int, Optional[List[bytes]]]:
    """Consume up to ``budget`` chains the guest sent on ``vq``, by the
    rules of :mod:`shardvu.ringrules` (as :func:`shardvu.net.pop_tx_frames`).

    Returns ``(chains taken, payload bytes, copies)``: with ``copy`` the
    frames (without the virtio-net header) are returned as bytes for
    forwarding; without, they are only counted.  A short or oversize frame
    is taken (its buffer comes back), not counted in the bytes nor copied,
    and recorded with ``drops.drop(reason)``.  With ``counts``
    (:class:`.stats.Counters`) every frame taken (not the dropped ones) is
    counted in its size bin and cast.  Used buffers are returned to the
    guest (length 0) with one flush and one notify."""
    pop = vq.pop
    fill = vq.fill
    out: Optional[List[bytes]] = [] if copy else None
    maxlen = hdr_len + max_frame
    n = nbytes = 0
    while n < budget:
        elem = pop()
        if elem is None:
            break
        if elem.in_descs:
            refuse_wrong_direction(vq, elem, tx=True)
            break
        if _PYPY:                   # (its JIT likes the loop better than the attribute)
            length = 0
            for v in elem.out_sg:
                length += len(v)
        else:
            length = elem.out_len
        if hdr_len <= length <= maxlen:
            if out is not None:
                sg = elem.out_sg
                data = bytes(sg[0]) if len(sg) == 1 else b"".join(sg)
                out.append(data[hdr_len:])
            if counts is not None:
                flen = length - hdr_len
                counts.sizes[BIN[flen] if flen < 1523 else 6] += 1
                first = elem.out_sg[0]
                if len(first) >= hdr_len + 6:
                    if first[hdr_len] & 1:
                        add_frame_cast(counts, first[hdr_len:hdr_len + 6])
                elif flen >= 6:         # the destination is split across buffers
                    add_frame_cast(counts, b"".join(bytes(v) for v in elem.out_sg)[hdr_len:hdr_len + 6])
            nbytes += length - hdr_len
        elif drops is not None:
            drops.drop(DropReason.SHORT_FRAME if length < hdr_len else DropReason.OVERSIZE_FRAME)
        fill(elem, 0, n)
        n += 1
    if n:
        vq.flush(n)
        vq.notify()
    return n, nbytes, out


def rx_pass(vq: VirtQueue, frames: Sequence, hdr_len: int, mergeable: bool, drops=None,
            max_frame: int = MAX_FRAME, counts=None) -> Tuple[int, int]:
    """Write ``frames`` into the guest's RX buffers on ``vq`` (one flush, one
    notify), by :func:`shardvu.net.push_rx_frames`.  Returns ``(frames
    consumed, payload bytes delivered)``: consumed frames (a prefix) were
    delivered or dropped (recorded with ``drops.drop(reason)``); frames
    beyond the buffers the guest posted are not consumed (the caller keeps
    or drops them).  With ``counts``, each frame delivered is counted in its
    size bin and cast."""
    if not frames:
        return 0, 0
    used0 = vq.used_idx
    n, nbytes = push_rx_frames_counted(vq, frames, hdr_len, mergeable, drops, max_frame, counts)
    if vq.used_idx != used0:
        vq.notify()
    return n, nbytes
