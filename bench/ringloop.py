"""Ring-loop micro-benchmark: nanoseconds per packet for each step of the
workers' split-ring loops, in one process, no front-end process involved.

    python3 bench/ringloop.py [--size 256] [--batches 2000] [--frame 64]
    .venv-pypy/bin/python bench/ringloop.py     # shardvu installed there (.ci/run)

A driver-side ring (shardvu.testing.driver) is laid out in a memfd once; every
"batch" the driver just advances avail->idx by the ring size (the avail
entries and descriptors stay valid), so the timings are the back-end's
work only.  Reports, per packet:

- whole passes: the general VirtQueue API path (pop/fill/flush) and the
  fast paths of workers/split_fast.py (TX sink, TX copy, RX fill);
- the loopback port's fused hops through its SPSC ring (both styles):
  guest TX ring -> ring slots, ring slots -> guest RX ring;
- single steps on the same views: avail entry load, descriptor loads,
  used element stores, payload copy.

Run it before and after touching a loop; compare the same interpreter only.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardvu import protocol as P  # noqa: E402
from shardvu.testing.driver import VRING_DESC_F_WRITE, DriverQueue  # noqa: E402
from shardvu.memory import GuestMemory  # noqa: E402
from shardvu.protocol import MemoryRegion, VringAddr  # noqa: E402
from shardvu.virtqueue import VirtQueue  # noqa: E402

from shardvu.workers import split_fast, split_fast_struct, split_loop  # noqa: E402
from shardvu.workers.spsc import SpscRing  # noqa: E402

UVA = 0x7F00_0000_0000


def setup(size: int, frame: int, writable: bool):
    mem_size = 64 << 20
    fd = os.memfd_create("ringloop")
    os.ftruncate(fd, mem_size)
    mem = GuestMemory()
    mem.add(MemoryRegion(0, mem_size, UVA, 0), fd)
    drv = DriverQueue(mem, 0x10000, size, used_align=4096)
    buf0 = 1 << 20
    flags = VRING_DESC_F_WRITE if writable else 0
    for i in range(size):
        drv.write_desc(i, buf0 + i * 2048, 2048 if writable else frame + 12, flags, 0)
        drv.push_avail(i)
    vq = VirtQueue(0)
    vq.mem = mem
    vq.num = size
    vq.features = P.bit(P.VIRTIO_F_VERSION_1) | P.bit(P.VIRTIO_NET_F_MRG_RXBUF)
    vq.addr = VringAddr(0, 0, UVA + drv.desc_gpa, UVA + drv.used_gpa, UVA + drv.avail_gpa, 0)
    vq.map_rings()
    vq.started = vq.enable = True
    return mem, drv, vq


def timed(fn, batches: int, size: int, post) -> float:
    """ns per packet of ``fn()`` over ``batches`` full rings."""
    total = 0.0
    for _ in range(batches):
        post()
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
    return total / (batches * size) * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--frame", type=int, default=64)
    args = ap.parse_args()
    size, frame, batches = args.size, args.frame, args.batches
    print(f"{platform.python_implementation()} {platform.python_version()}  ring {size}, "
          f"{frame}-byte frames, {batches} batches")
    results = []

    def bench(name, writable, body):
        # the struct-style loops need their own cache class (cffi pointers)
        style = split_fast_struct if "struct" in name else split_fast
        mem, drv, vq = setup(size, frame, writable)
        idx = [0]

        def post():
            idx[0] = (idx[0] + size) & 0xFFFF
            drv.write_avail_idx(idx[0])
        cache = style.RegionCache(mem)
        ns = timed(lambda: body(vq, cache), batches, size, post)
        results.append((name, ns))
        print(f"  {name:<34} {ns:8.1f} ns/pkt  ({1e3 / ns:6.2f} Mpps)", flush=True)
        vq.unmap_rings()
        drv.close()
        mem.close()

    frames = [bytes(frame)] * size
    hdr = split_fast.rx_header(12)
    print("whole passes:")
    bench("general API: TX pop/fill/flush", False,
          lambda vq, c: split_loop.tx_pass(vq, 12, size, False))
    bench("fast: TX sink (count only)", False,
          lambda vq, c: split_fast.tx_pass(vq, 12, size, c))
    sink = []
    bench("fast: TX copy out", False,
          lambda vq, c: split_fast.tx_pass(vq, 12, size, c, lambda views: sink.extend(bytes(v) for v in views)))
    sink.clear()
    bench("fast (struct style): TX sink", False,
          lambda vq, c: split_fast_struct.tx_pass(vq, 12, size, c))
    bench("general API: RX fill", True,
          lambda vq, c: split_loop.rx_pass(vq, frames, 12, True))
    bench("fast: RX fill", True,
          lambda vq, c: split_fast.rx_pass(vq, frames, hdr, c))
    bench("fast (struct style): RX fill", True,
          lambda vq, c: split_fast_struct.rx_pass(vq, frames, hdr, c))
    joined = [hdr + f for f in frames]
    bench("fast: RX fill, header pre-joined", True,
          lambda vq, c: split_fast.rx_pass(vq, joined, b"", c))
    bench("fast (struct style): RX pre-joined", True,
          lambda vq, c: split_fast_struct.rx_pass(vq, joined, b"", c))

    ring = SpscRing.create(size, 2048)
    ring.set_headroom(hdr)

    def drained(fn):        # TX hop: empty the ring again after each batch
        def body(vq, c):
            fn(vq, 12, size, c, ring)
            ring.consumed(ring.produce_window()[0])
        return body

    def refilled(fn):       # RX hop: republish the same `size` frames each batch
        ring.push_batch(frames)
        ring.consumed(ring.produce_window()[0])

        def body(vq, c):
            ring.publish(ring.produce_window()[0] + size)
            fn(vq, ring, 12, size, c)
        return body
    bench("loopback: TX -> ring", False, drained(split_fast.tx_to_ring))
    bench("loopback (struct style): TX -> ring", False, drained(split_fast_struct.tx_to_ring))
    bench("loopback: ring -> RX", True, refilled(split_fast.rx_from_ring))
    bench("loopback (struct style): ring -> RX", True, refilled(split_fast_struct.rx_from_ring))
    ring.close()

    print("single steps (same typed views):")
    mem, drv, vq = setup(size, frame, False)
    r = vq.rings
    mask = size - 1
    region_view = mem.regions[0].view
    payload = bytes(frame)

    def step(name, body):
        t = time.perf_counter()
        for _ in range(batches):
            body()
        ns = (time.perf_counter() - t) / (batches * size) * 1e9
        print(f"  {name:<34} {ns:8.1f} ns/pkt", flush=True)

    def loop_empty():
        for i in range(size):
            pass

    def avail_entry():
        a = r.avail16
        for i in range(size):
            a[2 + (i & mask)]

    def desc_fields():
        d16, d32, d64 = r.desc16, r.desc32, r.desc64
        for i in range(size):
            d16[(i << 3) + 6]
            d32[(i << 2) + 2]
            d64[i << 1]

    def used_store():
        u = r.used32
        for i in range(size):
            s = (i & mask) << 1
            u[s + 1] = i
            u[s + 2] = 0

    def copy_in():
        v = region_view
        for i in range(size):
            off = (1 << 20) + i * 2048
            v[off:off + frame] = payload

    step("loop overhead", loop_empty)
    step("avail entry load", avail_entry)
    step("descriptor flags+len+addr", desc_fields)
    step("used element store (id, len)", used_store)
    step(f"payload copy in ({frame} B)", copy_in)
    vq.unmap_rings()
    drv.close()
    mem.close()


if __name__ == "__main__":
    main()
