"""The split-ring data path of a worker: one pass over a guest TX ring, one
pass filling a guest RX ring.  Kept short and separate on purpose: this is
the loop to profile (bench/ringloop.py measures it).

Each pass is one batch: at most ``budget`` elements, then a single used-idx
store (``flush``) and at most one notification.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from shardvu.net import push_rx_frames
from shardvu.virtqueue import VirtQueue


def tx_pass(vq: VirtQueue, hdr_len: int, budget: int, copy: bool) -> Tuple[int, int, Optional[List[bytes]]]:
    """Consume up to ``budget`` frames the guest sent on ``vq``.

    Returns ``(frames, payload bytes, copies)``: with ``copy`` the frames
    (without the virtio-net header) are returned as bytes for forwarding;
    without, they are only counted.  Used buffers are returned to the guest
    (length 0) with one flush and one notify."""
    pop = vq.pop
    fill = vq.fill
    out: Optional[List[bytes]] = [] if copy else None
    n = nbytes = 0
    while n < budget:
        elem = pop()
        if elem is None:
            break
        sg = elem.out_sg
        if out is not None:
            data = b"".join(sg) if len(sg) > 1 else bytes(sg[0])
            out.append(data[hdr_len:])
            nbytes += len(data) - hdr_len
        else:
            for v in sg:
                nbytes += len(v)
            nbytes -= hdr_len
        fill(elem, 0, n)
        n += 1
    if n:
        vq.flush(n)
        vq.notify()
    return n, nbytes, out


def rx_pass(vq: VirtQueue, frames: Sequence, hdr_len: int, mergeable: bool) -> Tuple[int, int]:
    """Write ``frames`` into the guest's RX buffers on ``vq`` (one flush, one
    notify).  Returns ``(delivered, payload bytes)``; frames beyond the
    buffers the guest posted are not delivered (the caller keeps or drops
    them)."""
    if not frames:
        return 0, 0
    n = push_rx_frames(vq, frames, hdr_len, mergeable)
    if n:
        vq.notify()
    nbytes = 0
    for f in frames[:n]:
        nbytes += len(f)
    return n, nbytes
