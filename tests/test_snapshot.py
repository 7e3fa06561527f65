"""The queue snapshot: its wire form, its version check, and a worker
applying the Device's snapshots idempotently over random request sequences."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shardvu import eventfd, protocol as P
from shardvu.device import Device
from shardvu.net import NetIface
from shardvu.protocol import Message, ProtocolFeature as PF, Request as R
from shardvu.snapshot import (SNAPSHOT_VERSION, InflightPart, LogPart, PortPart, QueueSnapshot,
                              RegionPart, SnapshotError)
from shardvu.workers import ctl
from shardvu.workers.ports import resolve
from shardvu.workers.worker import Worker

from util import memfd

UVA = 0x7F00_0000_0000
MEM = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def full_snapshot(fds) -> QueueSnapshot:
    return QueueSnapshot(
        index=3, features=(1 << 32) | 1, num=256, addr=(3, 1, 0x1000, 0x3000, 0x2000, 0x9000),
        base=17, base_serial=5, generation=2, enabled=True, in_order=True,
        regions=(RegionPart(0, MEM, UVA, 0), RegionPart(MEM, MEM, UVA + MEM, 4096)),
        region_fds=(fds[0], fds[1]), kick_fd=fds[2], call_fd=fds[3], err_fd=fds[4],
        log=LogPart(4096, 0), log_fd=fds[5], log_call_fd=fds[6],
        inflight=InflightPart(8192, 0, 4, 256), inflight_fd=fds[7],
        port=PortPart("tap", {"ifname": "sv0"}), port_fds=(fds[8],))


def test_round_trip_through_the_channel():
    fds = [memfd(4096) for _ in range(9)]
    snap = full_snapshot(fds)
    obj, out = snap.encode()
    assert out == fds == snap.fds() and obj["version"] == SNAPSHOT_VERSION
    a, b = ctl.socketpair()
    try:
        ctl.send(a, {"cmd": "apply", "snapshot": obj}, out)
        msg, got = ctl.recv(b)
    finally:
        a.close()
        b.close()
    back = QueueSnapshot.decode(msg["snapshot"], got)
    assert len(got) == 9 and not set(got) & set(fds)        # copies, not the sender's fds
    for mine, theirs in zip(fds, back.fds()):
        assert os.path.samestat(os.fstat(mine), os.fstat(theirs))
    renumbered = dict(zip(got, fds))
    fields = {k: getattr(back, k) for k in back.__dataclass_fields__}
    for k in ("region_fds", "port_fds"):
        fields[k] = tuple(renumbered[fd] for fd in fields[k])
    for k in ("kick_fd", "call_fd", "err_fd", "log_fd", "log_call_fd", "inflight_fd"):
        fields[k] = renumbered[fields[k]]
    assert QueueSnapshot(**fields) == snap
    for fd in fds + got:
        os.close(fd)


def test_more_fds_than_one_datagram_carries():
    """509 regions (CONFIGURE_MEM_SLOTS' maximum) travel in one message."""
    fds = [eventfd.eventfd() for _ in range(509)]
    a, b = ctl.socketpair()
    try:
        ctl.send(a, {"x": 1}, fds)
        msg, got = ctl.recv(b)
    finally:
        a.close()
        b.close()
    assert msg == {"x": 1} and len(got) == 509
    for fd in fds + got:
        os.close(fd)


def test_another_version_is_refused_clearly():
    obj, _ = QueueSnapshot(0).encode()
    for version in (SNAPSHOT_VERSION + 1, 0, None, "1"):
        obj["version"] = version
        with pytest.raises(SnapshotError, match="cannot be read here"):
            QueueSnapshot.decode(obj, [])


@pytest.mark.parametrize("mutate", [
    lambda o: o.pop("num"),
    lambda o: o.update(num=-1),
    lambda o: o.update(num=1 << 64),
    lambda o: o.update(kick=5),                   # no such fd
    lambda o: o.update(kick=0, call=0),           # one fd named twice
    lambda o: o.update(addr=[1, 2]),
    lambda o: o.update(regions=[[0, 1, 2]]),
    lambda o: o.update(port={"kind": 3, "meta": {}, "fds": []}),
])
def test_malformed_snapshots_are_refused(mutate):
    obj, _ = QueueSnapshot(0, kick_fd=10).encode()
    mutate(obj)
    with pytest.raises(SnapshotError):
        QueueSnapshot.decode(obj, [10])


def test_every_received_fd_must_be_named():
    obj, _ = QueueSnapshot(0).encode()
    with pytest.raises(SnapshotError, match="1 fds received, 0 named"):
        QueueSnapshot.decode(obj, [10])


def test_inconsistent_parts_are_refused():
    with pytest.raises(SnapshotError):
        QueueSnapshot(0, regions=(RegionPart(0, 1, 0, 0),))
    with pytest.raises(SnapshotError):
        QueueSnapshot(0, log=LogPart(4096, 0))
    with pytest.raises(SnapshotError):
        QueueSnapshot(0, port_fds=(4,))


# -- the Device's snapshots applied by a worker, over random request sequences ----
class Guest:
    """A Device (the sharded control's kind: memory unmapped) and one worker
    applying its snapshots of queue 1, in-process."""

    def __init__(self):
        self.dev = Device(2, NetIface(1, in_order=True), map_memory=False)
        self.mine, self.theirs = ctl.socketpair()
        self.worker = Worker(1, self.theirs, resolve("sink"), 64, None)
        self.mem = [memfd(MEM), memfd(MEM)]
        self.eventfds = [eventfd.eventfd() for _ in range(3)]

    def send(self, req: int, payload: bytes = b"", fds=()) -> None:
        outcome = self.dev.handle(Message(req, P.VERSION | P.FLAG_NEED_REPLY, payload,
                                          [os.dup(fd) for fd in fds]))
        self.changed = outcome.changed

    def apply(self) -> dict:
        obj, fds = self.dev.queue_snapshot(1).encode()
        return self.worker.handle({"cmd": "apply", "snapshot": obj}, [os.dup(fd) for fd in fds])

    def close(self) -> None:
        self.dev.close()
        self.worker.release()
        self.mine.close()
        self.theirs.close()
        for fd in self.mem + self.eventfds:
            os.close(fd)


def _ring_addr(q: int, shift: int) -> bytes:
    base = UVA + 0x10000 * (q + 1) + shift
    return P.VringAddr(q, 0, base, base + 0x2000, base + 0x1000, 0).pack()


requests = st.one_of(
    st.tuples(st.just("features"), st.sampled_from([0, P.bit(P.VIRTIO_F_VERSION_1),
                                                     P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)])),
    st.tuples(st.just("mem"), st.integers(1, 2)),
    st.tuples(st.just("num"), st.sampled_from([64, 256])),
    st.tuples(st.just("addr"), st.sampled_from([0, 0x4000, 0x7FFFFFF00])),  # the last: outside
    st.tuples(st.just("base"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("kick"), st.integers(-1, 2)),
    st.tuples(st.just("call"), st.integers(-1, 2)),
    st.tuples(st.just("enable"), st.integers(0, 1)),
    st.tuples(st.just("get_base"), st.just(0)),
    st.tuples(st.just("status0"), st.just(0)),
    st.tuples(st.just("reset"), st.just(0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests, min_size=1, max_size=25))
def test_applying_the_devices_snapshots_is_idempotent(seq):
    before = open_fds()
    g = Guest()
    try:
        g.send(R.SET_PROTOCOL_FEATURES, P.pack_u64(P.bit(PF.REPLY_ACK) | P.bit(PF.RESET_DEVICE)
                                                   | P.bit(PF.STATUS)))
        prev = g.dev.queue_snapshot(1)
        for kind, arg in seq:
            if kind == "features":
                g.send(R.SET_FEATURES, P.pack_u64(arg))
            elif kind == "mem":
                regions = tuple(P.MemoryRegion(i * MEM, MEM, UVA + i * MEM, 0) for i in range(arg))
                g.send(R.SET_MEM_TABLE, P.MemoryTable(regions).pack(), g.mem[:arg])
            elif kind == "num":
                g.send(R.SET_VRING_NUM, P.VringState(1, arg).pack())
            elif kind == "addr":
                g.send(R.SET_VRING_ADDR, _ring_addr(1, arg))
            elif kind == "base":
                g.send(R.SET_VRING_BASE, P.VringState(1, arg).pack())
            elif kind in ("kick", "call"):
                req = R.SET_VRING_KICK if kind == "kick" else R.SET_VRING_CALL
                if arg < 0:
                    g.send(req, P.pack_u64(1 | P.VRING_NOFD_MASK))
                else:
                    g.send(req, P.pack_u64(1), [g.eventfds[arg]])
            elif kind == "enable":
                g.send(R.SET_VRING_ENABLE, P.VringState(1, arg).pack())
            elif kind == "get_base":
                g.send(R.GET_VRING_BASE, P.VringState(1, 0).pack())
            elif kind == "status0":
                g.send(R.SET_STATUS, P.pack_u64(0))
            else:
                g.send(R.RESET_DEVICE)
            snap = g.dev.queue_snapshot(1)
            # the Device reports every change of queue 1's configuration
            assert (snap != prev) <= (1 in g.changed), (kind, arg)
            prev = snap
            assert g.apply()["ok"]
            w = g.worker
            vq = w.vq
            state = (vq.num, vq.addr, vq.enable, vq.features, vq.last_avail_idx, vq.mapped,
                     [r for r in w.mem.regions], vq.kick_fd, vq.call_fd)
            fds = open_fds()
            assert g.apply()["ok"]                      # the same snapshot again: no change
            assert (vq.num, vq.addr, vq.enable, vq.features, vq.last_avail_idx, vq.mapped,
                    [r for r in w.mem.regions]) == state[:7]
            assert open_fds() == fds
            # what the worker holds is the Device's configuration
            assert (vq.num, vq.enable, vq.features) == (snap.num, snap.enabled, snap.features)
            assert [(r.gpa, r.size, r.uva, r.mmap_offset) for r in w.mem.regions] == \
                [(r.gpa, r.size, r.uva, r.mmap_offset) for r in snap.regions]
            assert (vq.kick_fd >= 0) == (snap.kick_fd >= 0)
            assert (vq.call_fd >= 0) == (snap.call_fd >= 0)
            if snap.call_fd >= 0:
                assert os.path.samestat(os.fstat(vq.call_fd), os.fstat(snap.call_fd))
            assert not g.dev.mem.regions or g.dev.mem.regions[0].view is None   # never mapped
    finally:
        g.close()
    assert open_fds() == before


# -- the same sequences through a ShardedDevice and real worker processes ---------
_POOL = {}


def _sharded():
    """One pool of 2 forked workers for every example (started once; the
    pair's loopback ring, held for the pool's life, attached)."""
    if "dev" not in _POOL:
        from shardvu.control.pool import WorkerPool
        from shardvu.control.sharded import ShardedDevice
        pool = WorkerPool(2, "loopback")
        pool.start()
        dev = ShardedDevice(pool, NetIface(1, in_order=True))
        dev.handle(Message(R.GET_FEATURES))      # a first session: the pair's ring attached
        dev.close()
        _POOL["pool"], _POOL["dev"] = pool, dev
    return _POOL["pool"], _POOL["dev"]


@pytest.fixture(scope="module", autouse=True)
def _stop_pool():
    yield
    if "pool" in _POOL:
        _POOL["pool"].stop()


def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests, min_size=1, max_size=20))
def test_sharded_sessions_leave_no_fd_behind_in_any_process(seq):
    pool, dev = _sharded()
    before = (open_fds(), [_proc_fds(w.pid) for w in pool.workers])
    mem = [memfd(MEM), memfd(MEM)]
    efds = [eventfd.eventfd() for _ in range(3)]
    try:
        def send(req, payload=b"", fds=()):
            out = dev.handle(Message(req, P.VERSION | P.FLAG_NEED_REPLY, payload,
                                     [os.dup(fd) for fd in fds]))
            assert out.ok or out.reason
            assert len(out.replies) == 1                # every NEED_REPLY answered
        send(R.SET_PROTOCOL_FEATURES, P.pack_u64(P.bit(PF.REPLY_ACK) | P.bit(PF.RESET_DEVICE)
                                                 | P.bit(PF.STATUS)))
        for kind, arg in seq:
            if kind == "features":
                send(R.SET_FEATURES, P.pack_u64(arg))
            elif kind == "mem":
                regions = tuple(P.MemoryRegion(i * MEM, MEM, UVA + i * MEM, 0) for i in range(arg))
                send(R.SET_MEM_TABLE, P.MemoryTable(regions).pack(), mem[:arg])
            elif kind == "num":
                send(R.SET_VRING_NUM, P.VringState(1, arg).pack())
            elif kind == "addr":
                send(R.SET_VRING_ADDR, _ring_addr(1, arg))
            elif kind == "base":
                send(R.SET_VRING_BASE, P.VringState(1, arg).pack())
            elif kind in ("kick", "call"):
                req = R.SET_VRING_KICK if kind == "kick" else R.SET_VRING_CALL
                if arg < 0:
                    send(req, P.pack_u64(1 | P.VRING_NOFD_MASK))
                else:
                    send(req, P.pack_u64(1), [efds[arg]])
            elif kind == "enable":
                send(R.SET_VRING_ENABLE, P.VringState(1, arg).pack())
            elif kind == "get_base":
                send(R.GET_VRING_BASE, P.VringState(1, 0).pack())
            elif kind == "status0":
                send(R.SET_STATUS, P.pack_u64(0))
            else:
                send(R.RESET_DEVICE)
        for w in pool.workers:
            assert w.stats()["ok"]                      # every worker still answers
    finally:
        dev.close()
        for fd in mem + efds:
            os.close(fd)
    assert (open_fds(), [_proc_fds(w.pid) for w in pool.workers]) == before
