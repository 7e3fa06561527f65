"""workers/spsc.py: the shared-memory frame ring of the loopback port."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from shardvu import eventfd as efd
from shardvu.workers import spsc
from shardvu.workers.spsc import HEADER_SIZE, SpscRing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "tests", "spsc_peer.py")
PYPY = shutil.which("pypy3")
M64 = (1 << 64) - 1


def fds() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def ring():
    r = SpscRing.create(8, 64)
    yield r
    r.close()


def test_push_pop_fifo(ring):
    assert ring.pending() == 0 and ring.free() == 8
    assert ring.pop_batch(4) == [] and ring.peek(4) == []
    assert ring.push_batch([b"a", b"", bytearray(b"ccc"), memoryview(b"dddd")]) == 4
    assert ring.pending() == 4 and ring.free() == 4
    assert ring.pop_batch(3) == [b"a", b"", b"ccc"]
    assert ring.pop_batch(10) == [b"dddd"]
    assert ring.pending() == 0


def test_full_ring(ring):
    frames = [bytes([i]) * (i + 1) for i in range(12)]
    assert ring.push_batch(frames) == 8
    assert ring.free() == 0 and ring.pending() == 8
    assert ring.push_batch(frames[8:]) == 0
    assert ring.pop_batch(3) == frames[:3]
    assert ring.push_batch(frames[8:]) == 3
    assert ring.pop_batch(100) == frames[3:11]


def test_oversize_dropped_and_counted(ring):
    assert ring.max_frame == 48
    ok = b"x" * 48
    frames = [b"y" * 49, ok, memoryview(b"z" * 1000), b"w"]
    assert ring.push_batch(frames) == 4
    assert ring.oversize == 2
    assert ring.pop_batch(10) == [ok, b"w"]
    # Oversize frames past a full ring are not consumed either.
    ring.push_batch([b"."] * 8)
    assert ring.push_batch([b"y" * 49, b"a"]) == 1 and ring.oversize == 3


@pytest.mark.parametrize("start", [0, M64 - 37, (1 << 32) - 5])
def test_many_wraps(start):
    """Hundreds of wraps of the slot index and, from near 2**64, of the
    u64 counters themselves, with batches of every size."""
    with SpscRing.create(16, 48, initial_index=start) as r:
        seq = 0
        got = 0
        k = 0
        while got < 5000:
            k = k % 17 + 1
            frames = [seq.to_bytes(8, "little") + bytes(seq % 20) for seq in range(seq, seq + k)]
            n = r.push_batch(frames)
            seq += n
            out = r.pop_batch((k * 7) % 16 + 1)
            for fr in out:
                assert int.from_bytes(fr[:8], "little") == got and len(fr) == 8 + got % 20
                got += 1
            assert 0 <= r.pending() <= 16
        if start > M64 - 5000:
            assert r._prod < start and r._cons < start      # the counters wrapped


def test_peek_release(ring):
    ring.push_batch([b"one", b"two", b"three"])
    v = ring.peek(2)
    assert [bytes(x) for x in v] == [b"one", b"two"]
    assert ring.free() == 5                     # peeked is not released
    assert [bytes(x) for x in ring.peek(5)] == [b"three"]   # continues after the peeked
    with pytest.raises(RuntimeError):
        ring.pop_batch(1)
    guest = bytearray(8)
    guest[0:3] = v[0]                           # zero-copy into a "guest buffer"
    assert guest[:3] == b"one"
    ring.release(1)
    assert ring.free() == 6 and ring.pending() == 2
    with pytest.raises(ValueError):
        ring.release(3)
    ring.release(2)
    assert ring.pending() == 0 and ring.peek(4) == []
    del v


def test_attach_shares_memory_and_close_closes_fds():
    before = fds()
    r = SpscRing.create(4, 64)
    peer = SpscRing.attach(os.dup(r.fd), os.dup(r.doorbell_fd))
    assert (peer.slots, peer.slot_size) == (4, 64)
    r.push_batch([b"hello", b"world"])
    assert peer.pending() == 2
    assert peer.pop_batch(1) == [b"hello"]
    assert r.free() == 3
    # A re-attached consumer resumes where the first one stopped.
    peer2 = SpscRing.attach(os.dup(r.fd), os.dup(r.doorbell_fd))
    assert peer2.pop_batch(5) == [b"world"]
    view = r.peek(1)        # empty: no view; then one outstanding view at close
    r.push_batch([b"x"])
    view = peer2.peek(1)
    for x in (r, peer, peer2):
        x.close()
        x.close()           # idempotent
    assert bytes(view[0]) == b"x"               # still mapped while the view lives
    del view
    assert fds() == before


def _memfd(data: bytes, size: int = None) -> int:
    fd = os.memfd_create("garbage")
    os.ftruncate(fd, size if size is not None else len(data))
    os.pwrite(fd, data, 0)
    return fd


def _good_image(slots=4, slot_size=64, prod=0, cons=0, magic=spsc.MAGIC, version=spsc.VERSION) -> bytes:
    img = bytearray(HEADER_SIZE + slots * slot_size)
    spsc._HDR.pack_into(img, 0, magic, version, slots, slot_size)
    spsc._U64.pack_into(img, 64, prod)
    spsc._U64.pack_into(img, 128, cons)
    return bytes(img)


@pytest.mark.parametrize("case", [
    "random", "zeros", "small", "bad_magic", "bad_version", "slots_not_pow2", "slot_size_odd",
    "size_mismatch", "bad_indices", "pipe", "eventfd", "closed_fd", "closed_bell"])
def test_attach_garbage_raises_and_closes_nothing(case):
    bell = efd.eventfd()
    own = [bell]
    if case == "random":
        fd = _memfd(os.urandom(HEADER_SIZE + 1024 * 2048))
    elif case == "zeros":
        fd = _memfd(b"", 1 << 20)
    elif case == "small":
        fd = _memfd(spsc.MAGIC)
    elif case == "bad_magic":
        fd = _memfd(_good_image(magic=b"SHVUSPSX"))
    elif case == "bad_version":
        fd = _memfd(_good_image(version=spsc.VERSION + 1))
    elif case == "slots_not_pow2":
        fd = _memfd(_good_image(slots=3))
    elif case == "slot_size_odd":
        fd = _memfd(_good_image(slot_size=60))
    elif case == "size_mismatch":
        fd = _memfd(_good_image() + b"\0" * 64)
    elif case == "bad_indices":
        fd = _memfd(_good_image(prod=10, cons=2))
    elif case == "pipe":
        fd, w = os.pipe()
        own.append(w)
    elif case == "eventfd":
        fd = efd.eventfd()
    elif case == "closed_fd":
        fd = 1000
    elif case == "closed_bell":
        fd = _memfd(_good_image())
        os.close(bell)
        own.remove(bell)
        bell = 1001
    if fd != 1000:
        own.append(fd)
    before = fds()
    with pytest.raises(ValueError):
        SpscRing.attach(fd, bell)
    assert fds() == before                       # nothing closed, nothing leaked
    for x in own:
        os.fstat(x)
        os.close(x)


def test_good_image_attaches():
    fd = _memfd(_good_image(prod=1, cons=M64 - 1))
    r = SpscRing.attach(fd, efd.eventfd())
    assert r.pending() == 3 and r.free() == 1
    r.close()


def test_create_rejects_bad_geometry():
    for slots, size in [(0, 64), (3, 64), (4, 8), (4, 24), (4, 65), (1 << 21, 64)]:
        with pytest.raises(ValueError):
            SpscRing.create(slots, size)


def test_doorbell_single_process(ring):
    assert ring.consumer_prepare_sleep() is True       # empty: may sleep
    assert efd.drain(ring.doorbell_fd) == 0
    ring.push_batch([b"a"])
    assert ring.producer_notify() is True               # consumer was asleep
    assert efd.drain(ring.doorbell_fd) == 1
    ring.consumer_woke()
    ring.push_batch([b"b"])
    assert ring.producer_notify() is False              # awake: no syscall
    assert ring.consumer_prepare_sleep() is False       # frames pending: don't sleep
    assert ring.producer_notify() is False              # flag was withdrawn
    assert ring.wait(0) is True
    ring.pop_batch(5)
    t = time.monotonic()
    assert ring.wait(0.05) is False and time.monotonic() - t >= 0.04


def _spawn(exe, *args, fds_):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([exe, PEER, *map(str, args)], pass_fds=fds_, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout=120):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _two_process(producer_exe, consumer_exe, count, mode, slots=256):
    with SpscRing.create(slots, 256) as r:
        fds_ = (r.fd, r.doorbell_fd)
        c = _spawn(consumer_exe, "consume", r.fd, r.doorbell_fd, count, mode, fds_=fds_)
        p = _spawn(producer_exe, "produce", r.fd, r.doorbell_fd, count, 7, fds_=fds_)
        outs = _finish([p, c])
        assert outs[0].startswith("ok produced"), outs
        assert outs[1].startswith("ok consumed"), outs
        assert r.pending() == 0
    return outs


@pytest.mark.parametrize("mode", ["pop", "peek"])
def test_two_processes_200k_in_order(mode):
    """Every one of 200k frames arrives exactly once, in order, with the
    consumer sleeping on the doorbell whenever the ring runs dry."""
    _two_process(sys.executable, sys.executable, 200_000, mode)


def _pingpong(exe, count=2000):
    """Round trips through two rings; both sides sleep on every wait, so a
    lost wake-up would show as a 2 s stall (counted by the peer/here)."""
    a = SpscRing.create(16, 64)      # here -> peer
    b = SpscRing.create(16, 64)      # peer -> here
    try:
        p = _spawn(exe, "pingpong", a.fd, a.doorbell_fd, b.fd, b.doorbell_fd, count,
                   fds_=(a.fd, a.doorbell_fd, b.fd, b.doorbell_fd))
        import select
        lost = 0
        t0 = time.monotonic()
        for i in range(count):
            assert a.push_batch([i.to_bytes(4, "little")]) == 1
            a.producer_notify()
            while True:
                got = b.pop_batch(1)
                if got:
                    assert got == [i.to_bytes(4, "little")]
                    break
                if b.consumer_prepare_sleep():
                    r, _, _ = select.select([b.doorbell_fd], [], [], 2.0)
                    if not r and b.pending():
                        lost += 1
                    b.consumer_woke()
        out = _finish([p])[0]
        assert out.startswith("ok echoed"), out
        assert lost == 0
        return time.monotonic() - t0
    finally:
        a.close()
        b.close()


def test_doorbell_no_lost_wakeup():
    _pingpong(sys.executable)


def _torn(writer, reader):
    """The shared indices are loaded and stored with single 8-byte moves:
    a reader never sees a mix of two values' bytes, nor a transient value
    (CPython's struct.pack_into zero-fills before writing, which is why the
    ring uses ctypes for them)."""
    fd = os.memfd_create("torn")
    os.ftruncate(fd, 4096)
    os.pwrite(fd, (0x00FF00FF00FF00FF).to_bytes(8, "little"), 64)
    try:
        r = _spawn(reader, "tornread", fd, fds_=(fd,))
        w = _spawn(writer, "torn", fd, 0.5, fds_=(fd,))
        outs = _finish([w, r])
        assert outs[0].startswith("ok") and outs[1].startswith("ok"), outs
    finally:
        os.close(fd)


def test_index_store_not_torn():
    _torn(sys.executable, sys.executable)


pypy = pytest.mark.skipif(PYPY is None, reason="pypy3 is not installed (apt-get install pypy3)")


@pypy
@pytest.mark.parametrize("producer,consumer", [("pypy", "pypy"), ("pypy", "cpython"), ("cpython", "pypy")])
def test_two_processes_pypy(producer, consumer):
    exe = {"pypy": PYPY, "cpython": sys.executable}
    _two_process(exe[producer], exe[consumer], 200_000, "peek" if consumer == "pypy" else "pop")


@pypy
def test_doorbell_no_lost_wakeup_pypy():
    _pingpong(PYPY)


@pypy
@pytest.mark.parametrize("writer,reader", [("pypy", "pypy"), ("pypy", "cpython"), ("cpython", "pypy")])
def test_index_store_not_torn_pypy(writer, reader):
    exe = {"pypy": PYPY, "cpython": sys.executable}
    _torn(exe[writer], exe[reader])


def test_unpeek_returns_undelivered_frames_again():
    ring = SpscRing.create(slots=8, slot_size=64)
    try:
        ring.push_batch([b"a", b"b", b"c"])
        views = ring.peek(3)
        assert [bytes(v) for v in views] == [b"a", b"b", b"c"]
        del views
        ring.release(1)            # only "a" was delivered
        ring.unpeek()
        assert [bytes(v) for v in ring.peek(8)] == [b"b", b"c"]
    finally:
        ring.release(0)
        ring.close()


def test_headroom_prefix_sits_right_before_each_frame(ring):
    """set_headroom() lays a prefix down in every slot, right-aligned
    before the data, and pushes never overwrite it."""
    ring.set_headroom(b"HDR")
    ring.push_batch([b"one", b"two"])
    ring.pop_batch(2)
    ring.push_batch([b"three"])
    for k in range(ring.slots):
        data = spsc.HEADER_SIZE + k * ring.slot_size + spsc.DATA_OFF
        assert bytes(ring.buf[data - 3:data]) == b"HDR"
        assert bytes(ring.buf[data - spsc.HEADROOM:data - 3]) == bytes(spsc.HEADROOM - 3)
    assert [bytes(v) for v in ring.peek(4)] == [b"three"]
    with pytest.raises(ValueError):
        ring.set_headroom(bytes(spsc.HEADROOM + 1))


def test_fused_windows_publish_and_release(ring):
    """produce_window/publish and consume_window/consumed: the producer
    sees the room the consumer gave back, indices wrap the slots."""
    prod, room = ring.produce_window()
    assert room == ring.slots
    for i in range(5):
        ring.len32[(spsc.HEADER_SIZE + ((prod + i) & ring.mask) * ring.slot_size) >> 2] = 1
    ring.publish(prod + 5)
    cons, n = ring.consume_window(3)
    assert (cons, n) == (prod, 3) and ring.ready()
    ring.consumed(cons + 3)
    assert ring.produce_window() == (prod + 5, ring.slots - 2)
    assert ring.consume_window(10) == (prod + 3, 2)
