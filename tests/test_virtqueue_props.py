"""Property: whatever the driver writes into the rings, pop/fill/flush and
friends never raise, every buffer handed out lies inside one guest memory
region, and memory outside the regions (guard bytes) is never modified."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, event, given, settings, strategies as st

from shardvu.protocol import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from shardvu.virtqueue import VirtQueue

from ringutil import DriverRing, bit, guard_bytes, make_memory

GUARD = 512
LAYOUT = [(0x0, 0x4000), (0x4000, 0x2000), (0x10000, 0x1000)]   # R0|R1 adjacent, R2 apart
DESC_AT, AVAIL_AT, USED_AT = 0x0, 0x200, 0x300
TABLE_AT = 0x1000          # a random indirect table lives here
TABLE_MAX = 24

INTERESTING = [0, 0x1000, 0x3FF0, 0x3FFF, 0x4000, 0x5FF8, 0x6000, 0x8000, 0x10000,
               0x10FF0, 0x11000, 1 << 32, (1 << 64) - 8, (1 << 64) - 1]

in_memory = st.one_of(st.integers(0, 0x6000), st.integers(0x10000, 0x11000))
addrs = st.one_of(in_memory, in_memory, in_memory,
                  st.sampled_from(INTERESTING),
                  st.integers(0, TABLE_MAX - 1).map(lambda k: TABLE_AT + 16 * k),
                  st.integers(0, (1 << 64) - 1))
lens = st.one_of(st.integers(0, 0x100), st.integers(0, 0x100), st.integers(0, 0x3000),
                 st.sampled_from([16, 32, 64, 0x2000, 0x7FFFFFFF, 0xFFFFFFFF]))
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
flag_values = st.one_of(st.sampled_from([0, F_WRITE, F_NEXT, F_NEXT | F_WRITE, F_INDIRECT]),
                        st.integers(0, 7))


sane_desc_flags = st.sampled_from([0, F_WRITE, F_NEXT, F_NEXT | F_WRITE, 0, F_WRITE])


@st.composite
def scenarios(draw):
    """Half the scenarios are "mostly sane" (addresses in memory, short
    lengths, few flags) so that pops succeed; the rest are anything goes."""
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    sane = draw(st.booleans())
    if sane:
        indirect_desc = st.tuples(st.just(TABLE_AT), st.integers(1, TABLE_MAX).map(lambda k: 16 * k),
                                  st.just(F_INDIRECT), st.just(0))
        desc = st.one_of(st.tuples(in_memory, st.integers(0, 0x200), sane_desc_flags,
                                   st.integers(0, num - 1)), indirect_desc)
        tdesc = st.tuples(in_memory, st.integers(0, 0x200), sane_desc_flags,
                          st.integers(0, TABLE_MAX - 1))
        heads = st.integers(0, num - 1)
        delta = st.integers(1, num)
    else:
        desc = st.tuples(addrs, lens, flag_values, st.one_of(st.integers(0, num - 1),
                                                             st.integers(0, num + 2)))
        tdesc = st.tuples(addrs, lens, flag_values, st.integers(0, TABLE_MAX + 1))
        heads = st.one_of(st.integers(0, num - 1), st.integers(0, num + 1))
        delta = st.one_of(st.integers(0, num), st.integers(0, 0xFFFF))
    descs = draw(st.lists(desc, min_size=num, max_size=num))
    table = draw(st.lists(tdesc, max_size=TABLE_MAX))
    if sane:     # linear chains: next is the following entry
        descs = [(a, n, f, (i + 1) % num if f != F_INDIRECT else 0)
                 for i, (a, n, f, _) in enumerate(descs)]
        table = [(a, n, f, i + 1) for i, (a, n, f, _) in enumerate(table)]
    return dict(
        num=num,
        descs=descs,
        table=table,
        avail=draw(st.lists(heads, min_size=num, max_size=num)),
        base=draw(st.integers(0, 0xFFFF)),
        delta=draw(delta),
        used_off=draw(st.integers(0, 3)),
        indirect=sane or draw(st.booleans()),
        event_idx=draw(st.booleans()),
        avail_flags=draw(st.integers(0, 0xFFFF)),
        used_event=draw(st.integers(0, 0xFFFF)),
        complete=draw(st.lists(st.booleans(), min_size=num + 2, max_size=num + 2)),
    )


def _check_views(mem, views, addrs_, writable):
    assert len(views) == len(addrs_)
    for view, (gpa, n) in zip(views, addrs_):
        assert n > 0 and len(view) == n
        found = mem.gpa_range(gpa, n)
        assert found is not None, (hex(gpa), n)
        region, _ = found
        assert view.obj is region._mm
        assert view.readonly == (not writable)
        assert bytes(view) == mem.read(gpa, n)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_hostile_rings_never_escape_guest_memory(sc):
    mem, files = make_memory(LAYOUT, guard=GUARD)
    try:
        num = sc["num"]
        ring = DriverRing(mem, num, DESC_AT, AVAIL_AT, USED_AT)
        for i, d in enumerate(sc["descs"]):
            ring.set_desc(i, *d)
        if sc["table"]:
            ring.write_table(TABLE_AT, sc["table"])
        base = sc["base"]
        for k, head in enumerate(sc["avail"]):
            mem.write(AVAIL_AT + 4 + 2 * ((base + k) % num), head.to_bytes(2, "little"))
        ring.set_avail_idx(base + sc["delta"])
        ring.set_avail_flags(sc["avail_flags"])
        ring.set_used_event(sc["used_event"])
        ring.set_used_idx(base - sc["used_off"])

        vq = VirtQueue(0)
        vq.num, vq.mem, vq.addr = num, mem, ring.vring_addr()
        vq.features = ((bit(VIRTIO_RING_F_INDIRECT_DESC) if sc["indirect"] else 0)
                       | (bit(VIRTIO_RING_F_EVENT_IDX) if sc["event_idx"] else 0))
        vq.set_base(base)
        vq.map_rings()
        vq.started = True

        vq.get_avail_bytes(1 << 20, 1 << 20)
        vq.set_notification(False)
        popped = []
        for _ in range(num + 2):
            e = vq.pop()
            if e is None:
                break
            _check_views(mem, e.out_sg, e.out_addr, False)
            _check_views(mem, e.in_sg, e.in_addr, True)
            for view in e.in_sg:
                view[:] = b"\xee" * len(view)
            popped.append(e)
        event(f"popped {min(len(popped), 2)}+")
        event("broken: " + vq.broken_reason.split(" ")[0] if vq.broken else "healthy")
        if any(len(e.in_sg) + len(e.out_sg) > 1 for e in popped):
            event("multi-buffer element")
        if vq.broken:
            assert vq.pop() is None and vq.empty()
        vq.set_notification(True)
        done = 0
        for e, ok in zip(popped, sc["complete"]):
            if ok:
                vq.fill(e, min(e.in_len, 0xFFFFFFFF), done)
                done += 1
            else:
                vq.unpop(e) if e is popped[-1] else None
        vq.flush(done)
        vq.notify()
        vq.notify_sync()
        vq.empty()
        vq.unmap_rings()
        del popped
        assert guard_bytes(files) == [bytes(2 * GUARD)] * len(LAYOUT)
    finally:
        for fd, _, _ in files:
            os.close(fd)
        mem.close()
