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
On a shared, noisy machine use ``--against DIR`` (DIR: a checkout of the
revision to compare with, e.g. ``git worktree add /tmp/base REV``): both
revisions' passes run in this one process, batch by batch in turn, and
their medians are compared.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402

from shardvu.testing.driver import VRING_DESC_F_WRITE  # noqa: E402

UVA = 0x7F00_0000_0000


def code(pkg: str = "shardvu") -> types.SimpleNamespace:
    """The modules the passes use, from package ``pkg`` (this checkout's
    ``shardvu``, or a copy of another revision: see :func:`load_other`)."""
    m = lambda name: importlib.import_module(f"{pkg}.{name}")  # noqa: E731
    framestats = counters = None
    # revisions whose loops count size bins and casts (shardvu/framestats.py;
    # workers/framestats.py in the revision that introduced them)
    for name in ("framestats", "workers.framestats"):
        try:
            framestats, counters = m(name), m("workers.stats").Counters()
            break
        except ImportError:
            pass
    return types.SimpleNamespace(
        framestats=framestats, counters=counters,
        P=m("protocol"), DriverQueue=m("testing.driver").DriverQueue,
        GuestMemory=m("memory").GuestMemory, VirtQueue=m("virtqueue").VirtQueue,
        split_fast=m("workers.split_fast"), split_fast_struct=m("workers.split_fast_struct"),
        split_loop=m("workers.split_loop"), SpscRing=m("workers.spsc").SpscRing)


def load_other(root: str) -> types.SimpleNamespace:
    """Another revision's code (``root``: a checkout, e.g. ``git worktree add
    /tmp/base REV``), importable beside this one: its ``shardvu`` and
    ``workers`` are copied into a temporary package ``shardvu_base`` whose
    absolute imports are rewritten to it."""
    tmp = tempfile.mkdtemp(prefix="ringloop-ab-")
    dst = os.path.join(tmp, "shardvu_base")
    shutil.copytree(os.path.join(root, "shardvu"), dst)
    shutil.copytree(os.path.join(root, "workers"), os.path.join(dst, "workers"))
    pat = re.compile(r"\b(from|import) shardvu\b")
    for base, _dirs, files in os.walk(dst):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(pat.sub(r"\1 shardvu_base", text))
    sys.path.insert(0, tmp)
    return code("shardvu_base")


def setup(size: int, frame: int, writable: bool, k: types.SimpleNamespace = None):
    k = k or code()
    mem_size = 64 << 20
    fd = os.memfd_create("ringloop")
    os.ftruncate(fd, mem_size)
    mem = k.GuestMemory()
    mem.add(k.P.MemoryRegion(0, mem_size, UVA, 0), fd)
    drv = k.DriverQueue(mem, 0x10000, size, used_align=4096)
    buf0 = 1 << 20
    flags = VRING_DESC_F_WRITE if writable else 0
    for i in range(size):
        drv.write_desc(i, buf0 + i * 2048, 2048 if writable else frame + 12, flags, 0)
        drv.push_avail(i)
    vq = k.VirtQueue(0)
    vq.mem = mem
    vq.num = size
    vq.features = k.P.bit(k.P.VIRTIO_F_VERSION_1) | k.P.bit(k.P.VIRTIO_NET_F_MRG_RXBUF)
    vq.addr = k.P.VringAddr(0, 0, UVA + drv.desc_gpa, UVA + drv.used_gpa, UVA + drv.avail_gpa, 0)
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


def passes(k: types.SimpleNamespace, size: int, frame: int):
    """The whole passes: ``(name, writable, style, body(vq, cache, ring))``;
    ``ring`` is an SPSC ring (headroom set) for the loopback hops, else None."""
    fast, struct_, loop = k.split_fast, k.split_fast_struct, k.split_loop
    frames = [bytes(frame)] * size
    hdr = fast.rx_header(12)
    joined = [hdr + f for f in frames]
    sink = []
    # Where the loops count size bins and casts, they count as the worker
    # has them count (into its Counters; RX fill, the generator's: the
    # worker counts its one frame times the frames delivered, after the
    # call): the A/B includes that cost.
    cnt = k.counters
    kw = {} if cnt is None else {"counts": cnt}

    def rx(fn, fr, h):
        if cnt is None:
            return lambda vq, c, r: fn(vq, fr, h, c)
        add_same = k.framestats.add_same

        def body(vq, c, r):
            n = fn(vq, fr, h, c)[0]
            if n:
                add_same(cnt, frames[0], 0, n)
        return body

    def copy_out(vq, c, r):
        fast.tx_pass(vq, 12, size, c, lambda views: sink.extend(bytes(v) for v in views), **kw)
        sink.clear()

    def drained(fn):        # TX hop: empty the ring again after each batch
        def body(vq, c, ring):
            fn(vq, 12, size, c, ring, **kw)
            ring.consumed(ring.produce_window()[0])
        return body

    def refilled(fn):       # RX hop: republish the same `size` frames each batch
        def body(vq, c, ring):              # (the slots were filled once: _Pass)
            ring.publish(ring.produce_window()[0] + size)
            fn(vq, ring, 12, size, c, **kw)
        return body
    return [
        ("general API: TX pop/fill/flush", False, fast,
         lambda vq, c, r: loop.tx_pass(vq, 12, size, False, **kw)),
        ("fast: TX sink (count only)", False, fast, lambda vq, c, r: fast.tx_pass(vq, 12, size, c, **kw)),
        ("fast: TX copy out", False, fast, copy_out),
        ("fast (struct style): TX sink", False, struct_,
         lambda vq, c, r: struct_.tx_pass(vq, 12, size, c, **kw)),
        ("general API: RX fill", True, fast, lambda vq, c, r: loop.rx_pass(vq, frames, 12, True, **kw)),
        ("fast: RX fill", True, fast, rx(fast.rx_pass, frames, hdr)),
        ("fast (struct style): RX fill", True, struct_, rx(struct_.rx_pass, frames, hdr)),
        ("fast: RX fill, header pre-joined", True, fast, rx(fast.rx_pass, joined, b"")),
        ("fast (struct style): RX pre-joined", True, struct_, rx(struct_.rx_pass, joined, b"")),
        ("loopback: TX -> ring", False, fast, drained(fast.tx_to_ring)),
        ("loopback (struct style): TX -> ring", False, struct_, drained(struct_.tx_to_ring)),
        ("loopback: ring -> RX", True, fast, refilled(fast.rx_from_ring)),
        ("loopback (struct style): ring -> RX", True, struct_, refilled(struct_.rx_from_ring)),
    ]


class _Pass:
    """One whole pass set up on its own guest memory and ring."""

    def __init__(self, k, spec, size: int, frame: int):
        self.name, writable, style, body = spec
        self.mem, self.drv, self.vq = setup(size, frame, writable, k)
        self.ring = None
        if "loopback" in self.name:
            self.ring = k.SpscRing.create(size, 2048)
            self.ring.set_headroom(k.split_fast.rx_header(12))
            if "-> RX" in self.name:
                self.ring.push_batch([bytes(frame)] * size)
                self.ring.consumed(self.ring.produce_window()[0])
        cache = style.RegionCache(self.mem)
        self.size, self.idx = size, 0
        self.run = lambda: body(self.vq, cache, self.ring)

    def post(self) -> None:
        self.idx = (self.idx + self.size) & 0xFFFF
        self.drv.write_avail_idx(self.idx)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.vq.unmap_rings()
        self.drv.close()
        self.mem.close()


def interleaved(a, b, batches: int, size: int):
    """Median ns/pkt of ``a`` and ``b``, timed batch by batch in turn (the
    order alternating), so both see the same machine; the first fifth of
    the batches is warm-up (PyPy's JIT) and not counted."""
    times = ([], [])
    for i in range(batches):
        for j in ((0, 1) if i & 1 else (1, 0)):
            p = (a, b)[j]
            p.post()
            t = time.perf_counter()
            p.run()
            times[j].append(time.perf_counter() - t)
    skip = batches // 5
    return tuple(statistics.median(t[skip:]) / size * 1e9 for t in times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--frame", type=int, default=64)
    ap.add_argument("--against", metavar="DIR",
                    help="A/B against the checkout DIR (e.g. git worktree add /tmp/base REV): "
                    "each whole pass of DIR's code (A) and of this one (B) timed batch by batch "
                    "in turn, in this process; prints the median ns/pkt of each and B/A")
    ap.add_argument("--only", metavar="TEXT", default="",
                    help="run only the whole passes whose name contains TEXT")
    ap.add_argument("--no-counts", action="store_true",
                    help="call the loops without a Counters (no size bins nor casts counted "
                    "where a loop counts only when given one): separates the cost of that "
                    "counting from the rest of an A/B against a revision without it")
    args = ap.parse_args()
    size, frame, batches = args.size, args.frame, args.batches
    print(f"{platform.python_implementation()} {platform.python_version()}  ring {size}, "
          f"{frame}-byte frames, {batches} batches")
    if args.against:
        other, this = load_other(args.against), code()
        if args.no_counts:
            other.counters = this.counters = None
        print(f"interleaved A/B: A = {args.against}, B = this checkout (medians, ns/pkt)")
        for spec_a, spec_b in zip(passes(other, size, frame), passes(this, size, frame)):
            if args.only not in spec_b[0]:
                continue
            a, b = _Pass(other, spec_a, size, frame), _Pass(this, spec_b, size, frame)
            try:
                ma, mb = interleaved(a, b, batches, size)
            finally:
                a.close()
                b.close()
            print(f"  {spec_b[0]:<38} A {ma:8.1f}  B {mb:8.1f}  B/A {mb / ma:6.3f}", flush=True)
        return
    print("whole passes:")
    for spec in passes(code(), size, frame):
        if args.only not in spec[0]:
            continue
        p = _Pass(code(), spec, size, frame)
        try:
            ns = timed(p.run, batches, size, p.post)
        finally:
            p.close()
        print(f"  {spec[0]:<34} {ns:8.1f} ns/pkt  ({1e3 / ns:6.2f} Mpps)", flush=True)

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
