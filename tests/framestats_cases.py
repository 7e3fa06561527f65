"""Size-bin and cast counting of every ring-loop family, on frames at every
bin edge with broadcast, multicast and unicast destinations.  Runs under
CPython (imported by tests/test_framestats.py) and under PyPy, as

    .venv-pypy/bin/python tests/framestats_cases.py

which prints ``{"implementation": ..., "cases": {name: counts}}`` as JSON
(counts: the size bins and casts of a fresh Counters after the case)."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardvu import protocol as P  # noqa: E402
from shardvu.memory import GuestMemory  # noqa: E402
from shardvu.protocol import MemoryRegion, VringAddr  # noqa: E402
from shardvu.testing.driver import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, DriverQueue  # noqa: E402
from shardvu.virtqueue import VirtQueue  # noqa: E402
from shardvu.workers import split_fast, split_fast_struct, split_loop  # noqa: E402
from shardvu.framestats import CAST_FIELDS, SIZE_BINS, add_batch  # noqa: E402
from shardvu.workers.ports import deliver  # noqa: E402
from shardvu.workers.spsc import SpscRing  # noqa: E402
from shardvu.workers.stats import Counters  # noqa: E402

UVA = 0x7F00_0000_0000
#: every bin edge, a runt and a jumbo frame
SIZES = (4, 60, 64, 65, 127, 128, 255, 256, 511, 512, 1023, 1024, 1522, 1523, 9000)
#: destinations, in turn: broadcast, multicast, unicast, "almost broadcast"
#: (first byte 0xff, group bit set: multicast)
DESTS = (b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01", b"\x02\x00\x00\x00\x00\x01",
         b"\xff\xff\xff\xff\xff\xfe")
HDR = 12
STRIDE = 16384


def frames(runt: bool = True):
    """The test frames: frame i is SIZES[i] bytes, destination DESTS[i % 4]
    (cut to the frame's length: the 4-byte runt has no destination).
    Without ``runt``, the 4-byte frame is left out (every frame then has a
    destination: the batch loops' one-slice path)."""
    fs = [(DESTS[i % 4] + bytes([i]) * n)[:n] for i, n in enumerate(SIZES)]
    return fs if runt else fs[1:]


def expected(runt: bool = True, fs=None):
    """The counts the frames (default: :func:`frames`) must give, from the
    definitions (not the code)."""
    out = {name: 0 for name, _, _ in SIZE_BINS}
    edges = [("size_64_packets", 64), ("size_65_to_127_packets", 127), ("size_128_to_255_packets", 255),
             ("size_256_to_511_packets", 511), ("size_512_to_1023_packets", 1023),
             ("size_1024_to_1522_packets", 1522), ("size_1523_to_max_packets", 1 << 30)]
    out.update(broadcast_packets=0, multicast_packets=0)
    for f in frames(runt) if fs is None else fs:
        out[next(name for name, top in edges if len(f) <= top)] += 1
        if len(f) >= 6 and f[0] & 1:
            out["broadcast_packets" if f[:6] == b"\xff" * 6 else "multicast_packets"] += 1
    return out


def counts(c: Counters):
    return {f: getattr(c, f) for f in tuple(b[0] for b in SIZE_BINS) + CAST_FIELDS}


class Ring:
    """A 64-entry split ring in its own guest memory, driven raw."""

    def __init__(self, index: int = 1):
        size = 4 << 20
        fd = os.memfd_create("bins")
        os.ftruncate(fd, size)
        self.mem = GuestMemory()
        self.mem.add(MemoryRegion(0, size, UVA, 0), fd)
        self.drv = DriverQueue(self.mem, 0x1000, 64, used_align=4096)
        vq = VirtQueue(index)
        vq.mem = self.mem
        vq.num = 64
        vq.features = P.bit(P.VIRTIO_F_VERSION_1)
        d = self.drv
        vq.addr = VringAddr(index, 0, UVA + d.desc_gpa, UVA + d.used_gpa, UVA + d.avail_gpa, 0)
        vq.map_rings()
        vq.started = vq.enable = True
        self.vq = vq

    def post(self, bufs, reverse: bool = False, chained: bool = False) -> None:
        """Descriptor i <- bufs[i] ``(gpa, len, flags)``; avail entries in
        order, or reversed (heads not consecutive ascending: the per-buffer
        loops).  ``chained``: each buffer split in two descriptors after 8
        bytes (the general path)."""
        heads = list(range(len(bufs)))
        for i, (gpa, length, flags) in enumerate(bufs):
            if chained:
                self.drv.write_desc(2 * i, gpa, 8, flags | VRING_DESC_F_NEXT, 2 * i + 1)
                self.drv.write_desc(2 * i + 1, gpa + 8, length - 8, flags, 0)
                heads[i] = 2 * i
            else:
                self.drv.write_desc(i, gpa, length, flags, 0)
        if reverse:
            heads.reverse()
        for slot, head in enumerate(heads):
            self.drv.write_avail_entry(slot, head)
        self.drv.write_avail_idx(len(heads))

    def send(self, fs, **kw) -> None:
        bufs = []
        for i, f in enumerate(fs):
            gpa = 0x100000 + i * STRIDE
            self.mem.write(gpa, bytes([0xEE]) * HDR + f)
            bufs.append((gpa, HDR + len(f), 0))
        self.post(bufs, **kw)

    def post_rx(self, count: int, **kw) -> None:
        self.post([(0x100000 + i * STRIDE, STRIDE, VRING_DESC_F_WRITE) for i in range(count)], **kw)

    def close(self) -> None:
        self.vq.unmap_rings()
        self.drv.close()
        self.mem.close()


#: the frame sets: every edge (with the runt, without it) and one length
#: for the whole batch (the loops' O(1) path), destinations in turn
SETS = {"edges": frames(True), "edges_no_runt": frames(False),
        "uniform": [DESTS[i % 4] + bytes([i]) * 58 for i in range(16)]}


def _wrapped_ring() -> SpscRing:
    """A 16-slot ring whose indices stand at 10: 16 frames wrap past slot 15."""
    ring = SpscRing.create(16, STRIDE)
    ring.push_batch([b"x" * 60] * 10)
    ring.consumed(ring.produce_window()[0])
    return ring


def run_cases(styles=None, runt: bool = True, fs=None):
    """``{case name: counts}`` for every loop family of this interpreter, on
    ``fs`` (default :func:`frames`)."""
    styles = styles or [split_fast, split_fast_struct]
    out = {}
    fs = frames(runt) if fs is None else fs

    def case(name, body):
        r, c = Ring(), Counters()
        try:
            body(r, c)
        finally:
            r.close()
        out[name] = counts(c)

    for st in styles:
        tag = st.__name__.rsplit(".", 1)[1]
        for rev in (False, True):
            how = "scattered" if rev else "in_order"

            def tx_sink(r, c, rev=rev, st=st):
                r.send(fs, reverse=rev)
                assert st.tx_pass(r.vq, HDR, 64, st.RegionCache(r.mem), None, None, 65536, c)[0] == len(fs)

            def tx_copy(r, c, rev=rev, st=st):
                r.send(fs, reverse=rev)
                got = []
                st.tx_pass(r.vq, HDR, 64, st.RegionCache(r.mem), lambda v: got.extend(map(bytes, v)),
                           None, 65536, c)
                assert got == (fs[::-1] if rev else fs)

            def tx_ring(r, c, rev=rev, st=st):
                ring = SpscRing.create(64, STRIDE)
                try:
                    r.send(fs, reverse=rev)
                    n, _b, dropped, _m = st.tx_to_ring(r.vq, HDR, 64, st.RegionCache(r.mem), ring, None, c)
                    assert (n, dropped) == (len(fs), 0)
                finally:
                    ring.close()

            def rx_ring(r, c, rev=rev, st=st):
                ring = SpscRing.create(64, STRIDE)
                try:
                    ring.set_headroom(split_fast.rx_header(HDR))
                    assert ring.push_batch(fs) == len(fs)
                    r.post_rx(len(fs), reverse=rev)
                    n, _b, _m = st.rx_from_ring(r.vq, ring, HDR, 64, st.RegionCache(r.mem), c)
                    assert n == len(fs)
                finally:
                    ring.close()

            def rx_ring_hdr(r, c, rev=rev, st=st):
                # loopback with offloads: each slot holds the header, then the frame
                ring = SpscRing.create(64, STRIDE)
                try:
                    assert ring.push_batch([split_fast.rx_header(HDR) + f for f in fs]) == len(fs)
                    r.post_rx(len(fs), reverse=rev)
                    n, _b, _m = st.rx_from_ring(r.vq, ring, 0, 64, st.RegionCache(r.mem), c, HDR)
                    assert n == len(fs)
                finally:
                    ring.close()

            def tx_ring_wrap(r, c, rev=rev, st=st):
                ring = _wrapped_ring()      # the frames wrap past the ring's end
                try:
                    r.send(fs, reverse=rev)
                    n, _b, dropped, _m = st.tx_to_ring(r.vq, HDR, 64, st.RegionCache(r.mem), ring, None, c)
                    assert (n, dropped) == (len(fs), 0)
                finally:
                    ring.close()

            def rx_ring_wrap(r, c, rev=rev, st=st):
                ring = _wrapped_ring()
                try:
                    ring.set_headroom(split_fast.rx_header(HDR))
                    assert ring.push_batch(fs) == len(fs)
                    r.post_rx(len(fs), reverse=rev)
                    total = 0
                    while total < len(fs):  # (the batch path stops at the wrap)
                        n = st.rx_from_ring(r.vq, ring, HDR, 64, st.RegionCache(r.mem), c)[0]
                        assert n
                        total += n
                finally:
                    ring.close()

            def rx_fill(r, c, rev=rev, st=st):
                r.post_rx(len(fs), reverse=rev)
                n = st.rx_pass(r.vq, fs, split_fast.rx_header(HDR), st.RegionCache(r.mem))[0]
                assert n == len(fs)
                add_batch(c, fs, n)         # the worker counts the delivered prefix

            for name, body in (("tx_sink", tx_sink), ("tx_copy", tx_copy), ("tx_to_ring", tx_ring),
                               ("rx_from_ring", rx_ring), ("rx_from_ring_with_header", rx_ring_hdr),
                               ("tx_to_ring_wrapped", tx_ring_wrap), ("rx_from_ring_wrapped", rx_ring_wrap),
                               ("rx_fill", rx_fill)):
                case(f"{tag}.{name}.{how}", body)

    def general_tx(r, c):
        r.send(fs, chained=True)
        n, _b, got = split_loop.tx_pass(r.vq, HDR, 64, False, None, 65536, c)
        assert n == len(fs)

    def general_rx(r, c):
        r.post_rx(len(fs), chained=True)
        assert split_loop.rx_pass(r.vq, fs, HDR, False, None, 65536, c)[0] == len(fs)

    def port_deliver(r, c):
        r.post_rx(len(fs), chained=True)
        hdr = split_fast.rx_header(HDR)
        consumed, delivered, _b = deliver(r.vq, [hdr + f for f in fs], HDR, False, lambda *a: None, c)
        assert consumed == delivered == len(fs)

    case("general.tx_pass", general_tx)
    case("general.rx_pass", general_rx)
    case("ports.deliver", port_deliver)
    return out


if __name__ == "__main__":
    print(json.dumps({"implementation": sys.implementation.name,
                      "runs": [{"set": name, "expected": expected(fs=fs), "cases": run_cases(fs=fs)}
                               for name, fs in SETS.items()]}))
