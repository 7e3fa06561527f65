"""The configuration of one virtqueue as a worker needs it: a typed,
versioned snapshot.

The sharded runtime splits a ring's state by owner.  The control process's
:class:`~shardvu.device.Device` owns the *configuration* and every
transition of it (memory table, ring size and addresses, the base the
front-end set, features, fds, log, inflight buffer).  The worker owns the
*progress* (last avail index, used index, EVENT_IDX state), which it
recovers from the rings themselves (``used->idx``; the inflight region
where negotiated), never from a stale copy.  A :class:`QueueSnapshot` is
the configuration of one queue; the worker applies it idempotently
(``workers/worker.py``), and a replacement worker starts from the same
snapshot.

Wire form: :meth:`QueueSnapshot.encode` gives a JSON-able dict and the fd
list that travels with it (SCM_RIGHTS duplicates them into the receiver);
:meth:`QueueSnapshot.decode` turns them back, refusing with
:class:`SnapshotError` a snapshot whose ``version`` it cannot read (a
worker of another release must say so, not guess) or whose fd slots do
not match the fds received.

Contracts:

* A snapshot only *names* fds; it owns none.  On the control side they are
  the Device's (sending duplicates them); on the worker side they are the
  received copies, which the worker keeps or closes.
* ``base`` is applied only when ``base_serial`` differs from the one the
  worker last applied: the serial changes only when the front-end sets a
  base (SET_VRING_BASE), so re-applying a snapshot never rewinds progress.
  ``generation`` changes only when the ring is reset (RESET_DEVICE, a new
  connection): the worker then also clears its progress and broken state.
* ``port`` is the per-pair part the control process owns for the data
  path's far side (the loopback ring between a pair's workers, a tap
  queue fd, ...): ``kind``, JSON-able ``meta`` and ``port_fds``.

Python 3.9 and PyPy 3.9 compatible (workers import it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["SNAPSHOT_VERSION", "SnapshotError", "RegionPart", "LogPart", "InflightPart",
           "PortPart", "QueueSnapshot", "fd_identity"]

#: The snapshot layout this code writes and reads.
SNAPSHOT_VERSION = 1


def _version_under_test(default: int) -> int:
    """Tests only: ``SHARDVU_TEST_SNAPSHOT_VERSION_FILE`` names a file; if it
    exists when this module is imported, its number is this code's version
    (a reload test makes the code "installed now" another release)."""
    path = os.environ.get("SHARDVU_TEST_SNAPSHOT_VERSION_FILE")
    if not path:
        return default
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


SNAPSHOT_VERSION = _version_under_test(SNAPSHOT_VERSION)


class SnapshotError(ValueError):
    """A snapshot that cannot be read: another version, or malformed."""


@dataclass(frozen=True)
class RegionPart:
    """One guest memory region (its fd travels beside it)."""
    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(frozen=True)
class LogPart:
    """The dirty log (SET_LOG_BASE): mapping size and offset in its fd."""
    size: int
    offset: int


@dataclass(frozen=True)
class InflightPart:
    """The inflight buffer (GET/SET_INFLIGHT_FD) geometry."""
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class PortPart:
    """The pair's port part: what the control process hands the pair's
    workers for the far side of the data path.  ``kind`` names it (e.g.
    "spsc": the loopback ring memfd and its doorbell eventfd; "tap": a tap
    queue fd); ``meta`` is JSON-able detail for the port code.
    ``serial`` changes whenever the owner replaces the part's fds (eventfds
    and tun fds cannot be told apart by ``fstat``), so a worker re-applying
    the same part keeps the fds it has."""
    kind: str
    meta: Dict[str, Any] = field(default_factory=dict)
    serial: int = 0

    def __hash__(self) -> int:
        return hash(self.kind)


@dataclass(frozen=True)
class QueueSnapshot:
    """Everything worker ``index`` needs for its queue (see the module
    docstring for the serial and fd rules).  fd fields are -1 when unset;
    ``region_fds[i]`` belongs to ``regions[i]``."""
    index: int
    features: int = 0
    num: int = 0
    #: SET_VRING_ADDR's (index, flags, desc, used, avail, log), or None
    addr: Optional[Tuple[int, int, int, int, int, int]] = None
    base: int = 0
    base_serial: int = 0
    generation: int = 0
    enabled: bool = False
    #: VirtQueue.discard_disabled: a disabled ring discards its TX (it was
    #: enabled since it started), or is left alone until its first enable
    discard_disabled: bool = False
    in_order: bool = False
    regions: Tuple[RegionPart, ...] = ()
    region_fds: Tuple[int, ...] = ()
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    log: Optional[LogPart] = None
    log_fd: int = -1
    log_call_fd: int = -1
    inflight: Optional[InflightPart] = None
    inflight_fd: int = -1
    port: Optional[PortPart] = None
    port_fds: Tuple[int, ...] = ()
    version: int = SNAPSHOT_VERSION

    def __post_init__(self) -> None:
        if len(self.regions) != len(self.region_fds):
            raise SnapshotError(f"{len(self.regions)} regions with {len(self.region_fds)} fds")
        if (self.log is None) != (self.log_fd < 0):
            raise SnapshotError("a log needs exactly its fd")
        if (self.inflight is None) != (self.inflight_fd < 0):
            raise SnapshotError("an inflight buffer needs exactly its fd")
        if self.port is None and self.port_fds:
            raise SnapshotError("port fds without a port part")

    # -- wire form ------------------------------------------------------------
    def fds(self) -> List[int]:
        """Every fd the snapshot names, in :meth:`encode`'s order."""
        out = list(self.region_fds)
        for fd in (self.kick_fd, self.call_fd, self.err_fd, self.log_fd, self.log_call_fd,
                   self.inflight_fd):
            if fd >= 0:
                out.append(fd)
        out += self.port_fds
        return out

    def encode(self) -> Tuple[Dict[str, Any], List[int]]:
        """``(obj, fds)``: a JSON-able dict whose fd fields are slots
        (indices into ``fds``, or -1), and the fds to send with it."""
        fds: List[int] = []

        def slot(fd: int) -> int:
            if fd < 0:
                return -1
            fds.append(fd)
            return len(fds) - 1
        regions = [[r.gpa, r.size, r.uva, r.mmap_offset, slot(fd)]
                   for r, fd in zip(self.regions, self.region_fds)]
        obj: Dict[str, Any] = {
            "version": self.version, "index": self.index, "features": self.features,
            "num": self.num, "addr": list(self.addr) if self.addr is not None else None,
            "base": self.base, "base_serial": self.base_serial, "generation": self.generation,
            "enabled": self.enabled, "discard_disabled": self.discard_disabled,
            "in_order": self.in_order, "regions": regions,
            "kick": slot(self.kick_fd), "call": slot(self.call_fd), "err": slot(self.err_fd),
            "log": [self.log.size, self.log.offset, slot(self.log_fd)] if self.log else None,
            "log_call": slot(self.log_call_fd),
            "inflight": ([self.inflight.mmap_size, self.inflight.mmap_offset,
                          self.inflight.num_queues, self.inflight.queue_size, slot(self.inflight_fd)]
                         if self.inflight else None),
            "port": ({"kind": self.port.kind, "meta": self.port.meta, "serial": self.port.serial,
                      "fds": [slot(fd) for fd in self.port_fds]} if self.port else None),
        }
        return obj, fds

    @classmethod
    def decode(cls, obj: Any, fds: List[int]) -> "QueueSnapshot":
        """The snapshot ``obj`` describes, naming fds from ``fds``.  Raises
        SnapshotError (fds untouched: the caller still owns and closes
        them) for another version, a malformed dict, or fd slots that do not
        use every received fd exactly once."""
        if not isinstance(obj, dict):
            raise SnapshotError("a snapshot is a JSON object")
        version = obj.get("version")
        if version != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version {version!r} cannot be read here "
                                f"(this worker reads version {SNAPSHOT_VERSION})")
        used: List[int] = []

        def fd_at(s: Any) -> int:
            if s == -1:
                return -1
            if type(s) is not int or not 0 <= s < len(fds) or s in used:
                raise SnapshotError(f"bad fd slot {s!r} ({len(fds)} fds received)")
            used.append(s)
            return fds[s]
        try:
            regions, region_fds = [], []
            for r in obj["regions"]:
                gpa, size, uva, off, s = r
                regions.append(RegionPart(_u64(gpa), _u64(size), _u64(uva), _u64(off)))
                region_fds.append(fd_at(s))
            log = log_fd = None
            if obj["log"] is not None:
                size, off, s = obj["log"]
                log, log_fd = LogPart(_u64(size), _u64(off)), fd_at(s)
            inflight = inflight_fd = None
            if obj["inflight"] is not None:
                size, off, nq, qs, s = obj["inflight"]
                inflight, inflight_fd = InflightPart(_u64(size), _u64(off), _u64(nq), _u64(qs)), fd_at(s)
            port, port_fds = None, []
            if obj["port"] is not None:
                p = obj["port"]
                if not isinstance(p["kind"], str) or not isinstance(p["meta"], dict):
                    raise SnapshotError("bad port part")
                port = PortPart(p["kind"], dict(p["meta"]), _u64(p["serial"]))
                port_fds = [fd_at(s) for s in p["fds"]]
            addr = obj["addr"]
            if addr is not None:
                if len(addr) != 6:
                    raise SnapshotError("addr needs 6 fields")
                addr = tuple(_u64(a) for a in addr)
            snap = cls(
                index=_u64(obj["index"]), features=_u64(obj["features"]), num=_u64(obj["num"]),
                addr=addr, base=_u64(obj["base"]), base_serial=_u64(obj["base_serial"]),
                generation=_u64(obj["generation"]), enabled=bool(obj["enabled"]),
                discard_disabled=bool(obj.get("discard_disabled", True)),
                in_order=bool(obj["in_order"]), regions=tuple(regions),
                region_fds=tuple(region_fds), kick_fd=fd_at(obj["kick"]),
                call_fd=fd_at(obj["call"]), err_fd=fd_at(obj["err"]), log=log,
                log_fd=-1 if log_fd is None else log_fd, log_call_fd=fd_at(obj["log_call"]),
                inflight=inflight, inflight_fd=-1 if inflight_fd is None else inflight_fd,
                port=port, port_fds=tuple(port_fds))
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"malformed snapshot: {type(exc).__name__}: {exc}") from None
        if len(used) != len(fds):
            raise SnapshotError(f"{len(fds)} fds received, {len(used)} named")
        return snap


def _u64(v: Any) -> int:
    if type(v) is not int or not 0 <= v < 1 << 64:
        raise SnapshotError(f"{v!r} is not an unsigned 64-bit integer")
    return v


def fd_identity(fd: int) -> Tuple[int, int, int]:
    """``(st_dev, st_ino, st_size)`` of ``fd``: two fds with equal identity
    are copies of the same file (for memfds, shm and hugetlbfs files; all
    eventfds share one anonymous inode, so this says nothing about them)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size
