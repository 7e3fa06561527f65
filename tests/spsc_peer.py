"""The other process of tests/test_spsc.py, run under CPython or PyPy 3.9.

    spsc_peer.py produce  MEMFD BELLFD COUNT SEED
    spsc_peer.py consume  MEMFD BELLFD COUNT MODE     (MODE: pop | peek)
    spsc_peer.py pingpong IN_MEM IN_BELL OUT_MEM OUT_BELL COUNT
    spsc_peer.py torn     MEMFD SECONDS
    spsc_peer.py tornread MEMFD

Frames carry a u64 sequence number followed by filler whose length and
bytes derive from it, so the receiver can check each one exactly.  Prints
one result line ("ok ..." or an error) on stdout.
"""
from __future__ import annotations

import os
import random
import select
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    from shardvu.workers.spsc import SpscRing
    from shardvu.workers import spsc as spsc_mod
except ImportError:      # PYTHONPATH=ROOT (no install): shardvu.workers is workers/
    import importlib.util
    spec = importlib.util.spec_from_file_location("shardvu_workers_spsc", os.path.join(ROOT, "workers", "spsc.py"))
    spsc_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spsc_mod)
    SpscRing = spsc_mod.SpscRing

SEQ = struct.Struct("<Q")


def make_frame(seq: int) -> bytes:
    n = seq % 97
    return SEQ.pack(seq) + bytes([seq & 0xFF]) * n


def check_frame(seq: int, fr) -> None:
    if bytes(fr) != make_frame(seq):
        got = SEQ.unpack_from(fr)[0] if len(fr) >= 8 else None
        raise AssertionError(f"frame {seq}: got seq {got} len {len(fr)}")


def produce(ring: SpscRing, count: int, seed: int) -> str:
    rnd = random.Random(seed)
    seq = 0
    full = 0
    while seq < count:
        k = min(rnd.randint(1, 64), count - seq)
        batch = [make_frame(s) for s in range(seq, seq + k)]
        if rnd.random() < 0.3:
            batch = [memoryview(b) for b in batch]
        while batch:
            n = ring.push_batch(batch)
            if n:
                ring.producer_notify()
                seq += n
                batch = batch[n:]
            else:
                full += 1
                time.sleep(0)
    return f"ok produced {count} full={full}"


def consume(ring: SpscRing, count: int, mode: str) -> str:
    seq = 0
    sleeps = 0
    lost = 0
    buf = bytearray(2048)
    while seq < count:
        if mode == "pop":
            frames = ring.pop_batch(128)
            for fr in frames:
                check_frame(seq, fr)
                seq += 1
        else:
            views = ring.peek(128)
            for fr in views:           # copy out like into a guest buffer
                n = len(fr)
                buf[:n] = fr
                check_frame(seq, memoryview(buf)[:n])
                seq += 1
            frames = len(views)
            views = fr = None
            ring.release(frames)
        if not frames and ring.consumer_prepare_sleep():
            sleeps += 1
            r, _, _ = select.select([ring.doorbell_fd], [], [], 2.0)
            if not r and ring.pending():
                lost += 1
            ring.consumer_woke()
    if lost:
        return f"LOST {lost} wake-ups"
    return f"ok consumed {count} sleeps={sleeps}"


def pingpong(rx: SpscRing, tx: SpscRing, count: int) -> str:
    """Echo every frame of ``rx`` to ``tx``, sleeping whenever rx is empty."""
    done = lost = 0
    while done < count:
        frames = rx.pop_batch(16)
        if frames:
            while tx.push_batch(frames) == 0:
                time.sleep(0)
            tx.producer_notify()
            done += len(frames)
            continue
        if rx.consumer_prepare_sleep():
            r, _, _ = select.select([rx.doorbell_fd], [], [], 2.0)
            if not r and rx.pending():
                lost += 1
            rx.consumer_woke()
    return f"LOST {lost} wake-ups" if lost else f"ok echoed {done}"


def torn(fd: int, seconds: float) -> str:
    """Alternate two index values whose every byte differs, as the ring
    stores its indices; 1 at the end tells the reader to stop.  (A
    ``struct.pack_into`` writer fails this: CPython zero-fills the target
    before writing the value, so readers see transient zeroes.)"""
    import mmap
    mm = mmap.mmap(fd, 4096)
    idx = spsc_mod._C64.from_buffer(mm, 64)
    a, b = (spsc_mod._s64(v) for v in (0x00FF00FF00FF00FF, 0xFF00FF00FF00FF00))   # as stored
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(1000):
            idx.value = a
            idx.value = b
        n += 2000
    idx.value = 1
    del idx
    return f"ok stored {n}"


def tornread(fd: int) -> str:
    """Load the index as the ring does until the writer's 1; report the
    values that are neither of the writer's."""
    import mmap
    mm = mmap.mmap(fd, 4096)
    idx = spsc_mod._C64.from_buffer(mm, 64)
    allowed = {spsc_mod._s64(v) for v in (1, 0x00FF00FF00FF00FF, 0xFF00FF00FF00FF00)}   # as stored; no 0
    seen = set()
    end = time.monotonic() + 30
    reads = 0
    while time.monotonic() < end:
        for _ in range(1000):
            seen.add(idx.value)
        reads += 1000
        if 1 in seen:
            break
    bad = seen - allowed
    if bad:
        return "TORN " + " ".join(hex(spsc_mod._u64(x)) for x in sorted(bad)[:5])
    if len(seen) < 2:
        return f"NOOVERLAP {sorted(seen)}"
    return f"ok read {reads}"


def main(argv) -> int:
    cmd = argv[0]
    if cmd == "produce":
        ring = SpscRing.attach(int(argv[1]), int(argv[2]))
        out = produce(ring, int(argv[3]), int(argv[4]))
    elif cmd == "consume":
        ring = SpscRing.attach(int(argv[1]), int(argv[2]))
        out = consume(ring, int(argv[3]), argv[4])
    elif cmd == "pingpong":
        rx = SpscRing.attach(int(argv[1]), int(argv[2]))
        tx = SpscRing.attach(int(argv[3]), int(argv[4]))
        out = pingpong(rx, tx, int(argv[5]))
        rx.close()
        ring = tx
    elif cmd == "torn":
        print(torn(int(argv[1]), float(argv[2])), sys.implementation.name, flush=True)
        return 0
    elif cmd == "tornread":
        print(tornread(int(argv[1])), sys.implementation.name, flush=True)
        return 0
    else:
        raise SystemExit(f"unknown command {cmd}")
    ring.close()
    print(out, sys.implementation.name, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
