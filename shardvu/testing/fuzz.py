"""Fuzzers for a vhost-user back-end: a hostile front-end and a hostile guest.

Both drive a back-end over its Unix socket with shardvu's own front-end
(:class:`~shardvu.testing.frontend.Frontend`) and check what must hold
whatever they send:

* no process of the back-end dies (:class:`Target` compares pids);
* every NEED_REPLY is answered while REPLY_ACK is negotiated; a
  connection the back-end closes after a framing error (which the spec
  allows) counts as answered;
* the back-end's fds and child processes are as many after as before;
* a well-formed frame still loops back afterwards (``--port loopback``).

:class:`ProtocolFuzzer` opens one connection after another.  Each gets a
valid prefix of the negotiation of varying length (cut inside one of the
four :class:`Phase` values), then mutated messages: request codes 0-63,
flags, sizes, edge field values, 0-8 fds of one :class:`FdKind` (now and
then 40: more than the back-end's recvmsg takes), headers and payloads sent
in pieces, several messages per write; a connection may
end with a truncated header, a close in the middle of a payload, a bad
version or an oversized ``size`` field.  Each message is followed by a
GET_FEATURES probe, so that its replies can be told apart without waiting.

:class:`GuestFuzzer` negotiates correctly, then writes random descriptor
tables, indirect tables and avail-index games into the rings and kicks,
and chains valid but for one broken ring rule (one per class: a loop, an
over-long or nested indirect chain, a wrong direction, a short or oversize
frame, a buffer past the end of memory, one spanning two regions).

:func:`run_campaign` runs both with the before/after checks, as the suite
(``tests/test_fuzz.py``) and ``bench/fuzz.py`` do.

Everything is drawn from ``random.Random`` seeded with ``(seed,
connection)``: ``ProtocolFuzzer(...).run_connection(n)`` replays connection
``n`` of a run alone.  :class:`Coverage` counts request code × fd kind ×
phase of every message delivered; the fuzzer's schedule reaches every cell
within ``4 * CELLS_PER_PHASE / SCHEDULED`` connections.

Contract: a fuzzer never raises for what the back-end does; every
violation becomes a :class:`Finding` (with the seed and connection to
replay it).  It closes every fd it made; child processes are the caller's.
"""
from __future__ import annotations

import enum
import os
import random
import socket
import struct
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from .. import protocol as P
from ..eventfd import eventfd
from ..protocol import (InflightDesc, IotlbMsg, LogArea, MemoryRegion, MemoryTable,
                        ProtocolFeature as PF, Request as R, VringAddr, VringState, bit)
from ..transport import send_with_fds
from .driver import (DESC_SIZE, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
                     VRING_DESC_F_NEXT, VRING_DESC_F_WRITE)
from .frontend import (DEFAULT_FEATURES, DEFAULT_PROTOCOL_FEATURES, BackendClosed, Frontend,
                       FrontendError)

__all__ = [
    "Phase", "FdKind", "Coverage", "Finding", "Target", "ProtocolFuzzer", "GuestFuzzer",
    "loops_back", "run_campaign", "Report", "NUM_CODES", "SCHEDULED",
]

#: Request codes the fuzzer sends (0-63: every defined code and then some).
NUM_CODES = 64
#: Scheduled (code, fd kind) cells per connection (plus random messages).
SCHEDULED = 8
_U64_MAX = (1 << 64) - 1


class Phase(enum.IntEnum):
    """How far the valid prefix of a connection got."""
    #: nothing sent, or some of GET_FEATURES / protocol features / queue num
    BEFORE_OWNER = 0
    #: SET_OWNER and SET_FEATURES sent (status, back-end channel, inflight
    #: may follow), no memory table yet
    FEATURES = 1
    #: the memory table sent, no ring started (no SET_VRING_KICK yet)
    MEM_TABLE = 2
    #: the whole negotiation done: every ring started, DRIVER_OK
    RINGS = 3


class FdKind(enum.IntEnum):
    """The kind of the fds a message carries (all of one kind)."""
    NONE = 0
    EVENTFD = 1
    MEMFD = 2
    PIPE = 3
    SOCKET = 4


CELLS_PER_PHASE = NUM_CODES * len(FdKind)


class Coverage:
    """Messages delivered, counted by request code × fd kind × phase."""

    def __init__(self) -> None:
        self.counts: Dict[Tuple[int, int, int], int] = {}

    def add(self, code: int, kind: FdKind, phase: Phase) -> None:
        key = (code, int(kind), int(phase))
        self.counts[key] = self.counts.get(key, 0) + 1

    def merge(self, other: "Coverage") -> None:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n

    def count(self, code: int, kind: FdKind, phase: Phase) -> int:
        return self.counts.get((code, int(kind), int(phase)), 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def empty_cells(self) -> List[Tuple[int, FdKind, Phase]]:
        """Every (code, kind, phase) never reached."""
        return [(c, k, p) for p in Phase for k in FdKind for c in range(NUM_CODES)
                if not self.count(c, k, p)]

    def minimum(self) -> int:
        return min(self.count(c, k, p) for p in Phase for k in FdKind for c in range(NUM_CODES))

    def matrix(self) -> List[List[int]]:
        """Rows: codes 0..63; columns: phase-major, fd kind minor."""
        return [[self.count(c, k, p) for p in Phase for k in FdKind] for c in range(NUM_CODES)]

    def to_json(self) -> Dict[str, object]:
        return {"columns": [f"{p.name}/{k.name}" for p in Phase for k in FdKind],
                "rows": [P.request_name(c) for c in range(NUM_CODES)],
                "matrix": self.matrix(), "total": self.total, "minimum": self.minimum()}


class Finding(NamedTuple):
    """One property violated.  ``connection`` and ``seed`` replay it;
    ``trace`` lists what the connection sent, in order."""
    fuzzer: str
    seed: int
    connection: int
    what: str
    detail: str
    trace: Tuple[str, ...]

    def __str__(self) -> str:
        shown = self.trace if len(self.trace) <= 14 else self.trace[:3] + ("...",) + self.trace[-10:]
        tail = "\n    ".join(shown)
        return (f"[{self.fuzzer} seed={self.seed} connection={self.connection}] "
                f"{self.what}: {self.detail}\n    {tail}")


# --- the back-end's processes ------------------------------------------------------
def _state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _alive(pid: int) -> bool:
    st = _state(pid)
    return st is not None and st not in ("Z", "X")


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _direct_children(pid: int) -> Set[int]:
    out: Set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _children(pid: int) -> Set[int]:
    """Every descendant of ``pid`` (workers, and their spares if any)."""
    out: Set[int] = set()
    todo = [pid]
    while todo:
        for child in _direct_children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class Target:
    """The processes of the back-end under test: ``control_pid`` and its
    children (the workers).  :meth:`deaths` reports a process gone or
    replaced since :meth:`baseline`; :meth:`leaks` compares fd counts and
    children.  ``log_path`` (optional) is scanned for tracebacks."""

    def __init__(self, control_pid: int, log_path: Optional[str] = None):
        self.control_pid = control_pid
        self.log_path = log_path
        self._log_pos = 0
        self.children: Set[int] = set()
        self.fds: Dict[int, int] = {}
        #: whether :meth:`deaths` saw any change since the baseline
        self.changed = False
        self.baseline()

    def baseline(self) -> None:
        """Take the current processes and fd counts as the reference."""
        self.changed = False
        self.children = self._settled_children()
        self.fds = self._settled_fds()
        if self.log_path:
            try:
                self._log_pos = os.path.getsize(self.log_path)
            except OSError:
                self._log_pos = 0

    def _settled_children(self, settle: float = 0.5, timeout: float = 20.0) -> Set[int]:
        """The descendants, once the set held still for ``settle`` seconds:
        a back-end that keeps warm spares (shardvu's zygote) may still be
        starting or refilling them."""
        deadline = time.monotonic() + timeout
        last = _children(self.control_pid)
        while True:
            time.sleep(settle)
            now = _children(self.control_pid)
            if now == last or time.monotonic() > deadline:
                return now
            last = now

    def _settled_fds(self, settle: float = 0.2, timeout: float = 5.0) -> Dict[int, int]:
        """fd counts of the control and every child, once they held still
        for ``settle`` seconds (a stats query leaves a socket a moment)."""
        deadline = time.monotonic() + timeout
        last: Dict[int, int] = {}
        while True:
            now = {pid: _fd_count(pid) for pid in [self.control_pid, *sorted(_children(self.control_pid))]}
            if now == last or time.monotonic() > deadline:
                return now
            last = now
            time.sleep(settle)

    def control_alive(self) -> bool:
        return _alive(self.control_pid)

    def deaths(self) -> List[str]:
        """Processes that died or appeared since the baseline or the last
        call (each change is reported once: the set seen becomes the
        reference)."""
        out = []
        if not _alive(self.control_pid):
            out.append(f"control process {self.control_pid} died")
            return out
        now = _children(self.control_pid)
        for pid in sorted(self.children - now):
            out.append(f"worker {pid} died")
        for pid in sorted(now - self.children):
            out.append(f"new child process {pid}")
        for pid in sorted(self.children & now):
            if not _alive(pid):
                out.append(f"worker {pid} died (zombie)")
        self.children = now
        self.changed = self.changed or bool(out)
        return out

    def leaks(self, timeout: float = 10.0) -> List[str]:
        """fd counts that differ from the baseline (the control's, and the
        workers' unless :meth:`deaths` saw a change), waiting up to
        ``timeout`` for teardown to finish, and a child process count that
        differs (a died worker's replacement restores it; which pids
        changed, :meth:`deaths` says)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self._settled_fds()
            # After a death, a spare may have become a worker under the same
            # pid: then only the control's count still means something.
            same = [self.control_pid] if self.changed else list(now)
            diff = [f"pid {pid}: {self.fds[pid]} fds before, {now[pid]} after"
                    for pid in sorted(same) if pid in self.fds and pid in now
                    and self.fds[pid] != now[pid]]
            if len(now) != len(self.fds):
                diff.append(f"{len(self.fds) - 1} child processes before, {len(now) - 1} after")
            if not diff or time.monotonic() > deadline:
                return diff
            time.sleep(0.2)

    def log_errors(self) -> List[str]:
        """Tracebacks and dead-worker lines logged since the last call."""
        if not self.log_path:
            return []
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_pos)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        cut = text.rfind("\n") + 1
        out = []
        lines = text[:cut].splitlines(keepends=True)
        for i, line in enumerate(lines):
            if "died with exit code" in line or "Fatal Python" in line:
                out.append(line.rstrip("\n"))
            elif line.startswith("Traceback"):
                end = i + 1             # through the exception line (the first unindented)
                while end < len(lines) and lines[end][:1] in (" ", "\t"):
                    end += 1
                if end >= len(lines):
                    # still being written: read the block again next time
                    cut = len("".join(lines[:max(0, i - 1)]))
                    break
                block = [b.rstrip("\n") for b in lines[max(0, i - 1):end + 1]]
                out.append("\n".join(block[:2] + ["..."] + block[-6:] if len(block) > 10 else block))
        self._log_pos += len(text[:cut].encode())
        return out


def loops_back(path: str, timeout: float = 10.0, frames: int = 4) -> Optional[str]:
    """Negotiate a fresh connection, send ``frames`` well-formed frames and
    expect them back (``--port loopback``).  None on success, else why not."""
    want = [bytes([0x02, i]) + bytes(62) for i in range(frames)]
    try:
        with Frontend(path, mem_size=4 << 20, queue_size=64, timeout=timeout) as fe:
            fe.negotiate()
            fe.post_rx(0, 16)
            fe.send(0, want)
            got = fe.receive(0, timeout=timeout, min_frames=frames)
    except (FrontendError, OSError, ValueError) as exc:
        return f"loopback connection failed: {exc}"
    if got != want:
        return f"loopback returned {len(got)} frames, {len(want)} sent ({got[:2]!r}...)"
    return None


# --- fds ---------------------------------------------------------------------------
class _Fds:
    """The fds one connection made: the ends it sends and the ends it keeps
    (closed at :meth:`close`)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.kept: List[object] = []

    def make(self, kind: FdKind, n: int, size_hint: int = 0) -> List[int]:
        return [self._one(kind, size_hint) for _ in range(n)]

    def _one(self, kind: FdKind, size_hint: int) -> int:
        rng = self.rng
        if kind == FdKind.EVENTFD:
            return eventfd(rng.choice((0, 0, 1, 0xFFFFFFFE)))
        if kind == FdKind.MEMFD:
            fd = os.memfd_create("shardvu-fuzz", os.MFD_CLOEXEC)
            size = rng.choice((0, 4096, 1 << 16, 1 << 20, size_hint or 4096, size_hint or 8192))
            os.ftruncate(fd, size)
            return fd
        if kind == FdKind.PIPE:
            r, w = os.pipe()
            send, keep = (r, w) if rng.random() < 0.5 else (w, r)
            if rng.random() < 0.25:
                os.close(keep)          # the back-end's end sees EOF / EPIPE
            else:
                self.kept.append(keep)
            return send
        pick = rng.random()
        if pick < 0.7:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        elif pick < 0.85:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        else:
            a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b = None
            if rng.random() < 0.5:
                a.bind(f"\0shardvu-fuzz-{os.getpid()}-{rng.getrandbits(48):x}")
                a.listen(1)
        if b is not None:
            self.kept.append(b)
        return a.detach()

    def close(self) -> None:
        for obj in self.kept:
            if isinstance(obj, socket.socket):
                obj.close()
            else:
                try:
                    os.close(obj)           # type: ignore[arg-type]
                except OSError:
                    pass
        self.kept = []


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- payloads ----------------------------------------------------------------------
def _edge(rng: random.Random, bits: int) -> int:
    top = (1 << bits) - 1
    return rng.choice((0, 1, 2, 3, 7, 8, 255, 256, 1 << (bits - 1), top, top - 1,
                       rng.getrandbits(bits), rng.randrange(4096)))


_STATE_CODES = {R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE,
                R.SET_VRING_ENDIAN, R.VRING_KICK}
_VRING_FD_CODES = {R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR}
_FEATURE_CODES = {R.SET_FEATURES, R.SET_PROTOCOL_FEATURES}


class _Context:
    """What the payload generator knows of the connection's front-end."""

    def __init__(self, fe: Frontend):
        self.fe = fe
        self.nq = fe.num_queues
        self.qsize = fe.queue_size
        self.regions = list(fe.region_descs)

    def queue_index(self, rng: random.Random) -> int:
        return rng.choice((0, 1, self.nq - 1, self.nq, self.nq + 1, 255, 256, 0xFFFF,
                           0xFFFFFFFF, rng.randrange(self.nq)))

    def uva(self, rng: random.Random, aligned: int = 16) -> int:
        r = rng.choice(self.regions)
        return rng.choice((r.uva, r.uva + r.size - aligned, r.uva + r.size, r.uva - aligned,
                           r.uva + 1, 0, _U64_MAX, _U64_MAX - 15,
                           r.uva + rng.randrange(r.size) // aligned * aligned))

    def gpa(self, rng: random.Random) -> int:
        r = rng.choice(self.regions)
        return rng.choice((r.gpa, r.gpa + r.size - 1, r.gpa + r.size, 0, _U64_MAX,
                           r.gpa + rng.randrange(r.size)))

    def region(self, rng: random.Random) -> MemoryRegion:
        if rng.random() < 0.3:
            return rng.choice(self.regions)
        r = rng.choice(self.regions)
        gpa = rng.choice((r.gpa, r.gpa + r.size, _U64_MAX - 4095, 1 << 40, rng.getrandbits(64)))
        size = rng.choice((0, 4096, r.size, 1 << 20, _U64_MAX, _U64_MAX - gpa + 1 & _U64_MAX))
        uva = rng.choice((r.uva, r.uva + r.size, _U64_MAX - 4095, 0, rng.getrandbits(64)))
        off = rng.choice((0, 0, 4096, 1 << 20, 1 << 63, _U64_MAX, rng.getrandbits(32)))
        return MemoryRegion(gpa, size & _U64_MAX, uva, off)


def _structured(code: int, rng: random.Random, ctx: _Context) -> Tuple[bytes, int]:
    """A payload of the request's own layout with edge field values, and a
    size hint for memfds (bytes the request would map)."""
    fe = ctx.fe
    if code in _STATE_CODES:
        num = rng.choice((0, 1, 2, 3, ctx.qsize, ctx.qsize + 1, 1024, 1025, 0x7FFF, 0xFFFF,
                          0x10000, 0xFFFFFFFF, rng.getrandbits(32)))
        return VringState(ctx.queue_index(rng), num).pack(), 0
    if code in _VRING_FD_CODES:
        idx = ctx.queue_index(rng) & 0xFF if rng.random() < 0.8 else ctx.queue_index(rng)
        extra = rng.choice((0, 0, 0, P.VRING_NOFD_MASK, 1 << 9, 1 << 63))
        return P.pack_u64((idx | extra) & _U64_MAX), 0
    if code in _FEATURE_CODES:
        if code == R.SET_FEATURES:
            base = fe.offered_features or DEFAULT_FEATURES
        else:
            base = fe.offered_protocol_features or DEFAULT_PROTOCOL_FEATURES
        value = rng.choice((base, base & rng.getrandbits(64), 0, _U64_MAX,
                            base | bit(rng.randrange(64)), base & ~bit(rng.randrange(64))))
        return P.pack_u64(value), 0
    if code == R.SET_VRING_ADDR:
        flags = rng.choice((0, 0, 1, 2, 0xFFFFFFFF))
        addr = VringAddr(ctx.queue_index(rng), flags, ctx.uva(rng), ctx.uva(rng, 4),
                         ctx.uva(rng, 2), ctx.gpa(rng))
        return addr.pack(), 0
    if code == R.SET_MEM_TABLE:
        n = rng.choice((0, 1, 1, 1, 2, 8, 9))
        regions = tuple(ctx.region(rng) for _ in range(n))
        raw = MemoryTable(regions).pack() if n <= 8 else (
            struct.pack("<II", n, 0) + b"".join(r.pack() for r in regions))
        if rng.random() < 0.1:
            raw = raw[:4] + struct.pack("<I", rng.getrandbits(32)) + raw[8:]   # padding
        hint = max((r.size + r.mmap_offset for r in regions), default=0)
        return raw, hint if hint < 1 << 24 else 0
    if code in (R.ADD_MEM_REG, R.REM_MEM_REG):
        r = ctx.region(rng)
        pad = 0 if rng.random() < 0.8 else rng.getrandbits(64)
        hint = r.size + r.mmap_offset
        return P.pack_u64(pad) + r.pack(), hint if hint < 1 << 24 else 0
    if code == R.SET_LOG_BASE:
        size = rng.choice((0, 1, 8, 4096, 1 << 16, 1 << 20, _U64_MAX, rng.getrandbits(32)))
        off = rng.choice((0, 0, 1, 4096, 1 << 20, _U64_MAX, rng.getrandbits(32)))
        return LogArea(size, off).pack(), (size + off) if size + off < 1 << 24 else 0
    if code in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD):
        nq = rng.choice((0, 1, 2, ctx.nq, ctx.nq + 1, 256, 1024, 1025, 0xFFFF))
        qs = rng.choice((0, 1, 3, 64, ctx.qsize, 1024, 1025, 0x8000, 0xFFFF))
        size = rng.choice((0, 64, 4096, 4160, 1 << 16, 1 << 20, _U64_MAX, rng.getrandbits(20)))
        off = rng.choice((0, 0, 64, 4096, 1 << 62, _U64_MAX))
        desc = InflightDesc(size, off, nq, qs)
        return desc.pack(), (size + off) if size + off < 1 << 24 else 0
    if code in (R.GET_CONFIG, R.SET_CONFIG):
        off = rng.choice((0, 0, 1, 6, 8, 255, 256, 0xFFFFFFFF))
        size = rng.choice((0, 1, 2, 6, 8, 12, 256, 257))
        data = bytes(rng.getrandbits(8) for _ in range(min(size, 256)))
        if rng.random() < 0.15:
            data = data[:-1] if data else b"\0"          # size field not matching
        return struct.pack("<III", off, size, rng.choice((0, 0, 1, 0xFFFFFFFF))) + data, 0
    if code == R.IOTLB_MSG:
        return IotlbMsg(ctx.gpa(rng), _edge(rng, 64), ctx.uva(rng), _edge(rng, 8) & 0xFF,
                        rng.choice((1, 2, 3, 4, 0, 255))).pack(), 0
    if code == R.SET_STATUS:
        return P.pack_u64(rng.choice((0, 1, 3, 0xB, 0xF, 0x40, 0x80, 0xFF, 0x100, _U64_MAX))), 0
    if code == R.NET_SET_MTU:
        return P.pack_u64(rng.choice((0, 67, 68, 1500, 9000, 65535, 65536, _U64_MAX))), 0
    size = P.PAYLOAD_SIZE.get(code) if 0 <= code < 256 and code in R._value2member_map_ else None
    if size == 8:
        return P.pack_u64(_edge(rng, 64)), 0
    if size == 0:
        return b"", 0
    n = rng.choice((0, 0, 4, 8, 16, 24, 40, rng.randrange(64)))
    return bytes(rng.getrandbits(8) for _ in range(n)), 0


def _payload(code: int, rng: random.Random, ctx: _Context) -> Tuple[bytes, int]:
    raw, hint = _structured(code, rng, ctx)
    roll = rng.random()
    if roll < 0.75:
        return raw, hint
    if roll < 0.85:                                      # a few bytes short or long
        d = rng.choice((-8, -4, -1, 1, 4, 8))
        return (raw[:len(raw) + d] if d < 0 else raw + bytes(d)), hint
    if roll < 0.97:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(80))), hint
    return bytes(rng.choice((P.MAX_PAYLOAD, P.MAX_PAYLOAD - 1))), hint


# --- the protocol fuzzer -----------------------------------------------------------
class _Msg(NamedTuple):
    code: int
    flags: int
    payload: bytes
    kind: FdKind
    nfds: int
    size_hint: int
    split: int           # 0: one write; 1: header then payload (fds first); 2: fds with payload


#: Codes the back-end must answer whatever NEED_REPLY says (they have a reply body).
_HAS_BODY = frozenset({R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE,
                       R.GET_QUEUE_NUM, R.GET_CONFIG, R.GET_INFLIGHT_FD, R.GET_MAX_MEM_SLOTS,
                       R.GET_STATUS})
_TAILS = ("none", "none", "truncated_header", "mid_payload", "bad_version", "oversize",
          "shutdown", "close_running")


def _schedule(seed: int, phase: Phase) -> List[Tuple[int, FdKind]]:
    cells = [(c, k) for c in range(NUM_CODES) for k in FdKind]
    random.Random(f"shardvu-fuzz-schedule:{seed}:{int(phase)}").shuffle(cells)
    return cells


class ProtocolFuzzer:
    """A hostile front-end: see the module docstring.

    ``path``: the back-end's socket; ``target``: its processes (checked
    after every connection; None skips that).  ``max_messages`` bounds the
    random messages added per connection to the :data:`SCHEDULED` ones.
    ``reply_timeout``: how long an answer may take (longer than the
    back-end's own worker timeout)."""

    name = "protocol"

    def __init__(self, path: str, seed: int, target: Optional[Target] = None, *,
                 max_messages: int = 24, reply_timeout: float = 12.0,
                 loopback_every: int = 0):
        self.path = path
        self.seed = seed
        self.target = target
        self.max_messages = max_messages
        self.reply_timeout = reply_timeout
        self.loopback_every = loopback_every
        self.coverage = Coverage()
        self.findings: List[Finding] = []
        self.messages = 0            # mutated messages delivered or attempted
        #: what the last connection sent (a replay sends the same)
        self.last_trace: List[str] = []
        self.prefix_messages = 0
        self.connections = 0
        self._schedules = {p: _schedule(seed, p) for p in Phase}

    # -- campaign -----------------------------------------------------------------
    def run(self, messages: int, first: int = 0,
            progress: Optional[Callable[["ProtocolFuzzer"], None]] = None) -> None:
        """Connections ``first, first+1, ...`` until ``messages`` mutated
        messages were sent."""
        conn = first
        while self.messages < messages:
            self.run_connection(conn)
            conn += 1
            if progress is not None:
                progress(self)

    def run_connection(self, index: int) -> None:
        """Connection ``index`` of this seed (replayable on its own)."""
        rng = random.Random(f"shardvu-fuzz:{self.seed}:{index}")
        phase = Phase(index % len(Phase))
        trace: List[str] = [f"phase {phase.name}"]
        self.last_trace = trace
        self.connections += 1
        fds = _Fds(rng)
        fe: Optional[Frontend] = None
        try:
            fe = self._frontend(rng)
            trace.append(f"front-end: features {fe.wanted_features:#x} protocol "
                         f"{fe.wanted_protocol_features:#x} qsize {fe.queue_size} "
                         f"regions {len(fe.region_descs)} slots {fe.use_mem_slots} "
                         f"inflight {fe.want_inflight}")
            if not self._prefix(fe, rng, phase, trace, index):
                return
            ctx = _Context(fe)
            msgs = self._messages(rng, index, phase, ctx)
            self._deliver(fe, rng, msgs, phase, ctx, fds, trace, index)
        except (FrontendError, OSError, ValueError, struct.error) as exc:
            self._find(index, "front-end failed", f"{type(exc).__name__}: {exc}", trace)
        finally:
            if fe is not None:
                fe.close()
            fds.close()
            self._check(index, trace)

    # -- pieces ---------------------------------------------------------------------
    def _frontend(self, rng: random.Random) -> Frontend:
        features = DEFAULT_FEATURES
        for b in (P.VIRTIO_RING_F_EVENT_IDX, P.VIRTIO_RING_F_INDIRECT_DESC, P.VIRTIO_NET_F_MRG_RXBUF,
                  P.VHOST_F_LOG_ALL):
            if rng.random() < 0.3:
                features ^= bit(b)
        if rng.random() < 0.08:
            features &= ~bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
        pf = DEFAULT_PROTOCOL_FEATURES | bit(PF.BACKEND_REQ)
        for b in (PF.REPLY_ACK, PF.BACKEND_REQ, PF.INFLIGHT_SHMFD, PF.STATUS, PF.LOG_SHMFD,
                  PF.CONFIGURE_MEM_SLOTS):
            if rng.random() < 0.2:
                pf &= ~bit(b)
        return Frontend(self.path, mem_size=rng.choice((2 << 20, 4 << 20)),
                        regions=rng.choice((1, 1, 2)), queue_size=rng.choice((16, 64, 256)),
                        features=features, protocol_features=pf,
                        use_mem_slots=rng.random() < 0.3, inflight=rng.random() < 0.3,
                        timeout=self.reply_timeout, mmap_offset=rng.choice((0, 0, 4096)))

    def _prefix(self, fe: Frontend, rng: random.Random, target: Phase, trace: List[str],
                index: int) -> bool:
        """Run the negotiation up to a cut inside ``target``; False (and a
        finding) if the back-end refused a valid step."""
        phase = Phase.BEFORE_OWNER
        steps = fe.negotiation()
        sent = []
        try:
            for upcoming in steps:
                if sent:
                    phase = _phase_after(phase, sent[-1])
                if phase == target and (_leaves(phase, upcoming) or rng.random() < 0.3):
                    steps.close()
                    break
                sent.append(upcoming)
                self.prefix_messages += 1
            else:
                phase = Phase.RINGS
        except FrontendError as exc:
            trace.append("prefix: " + " ".join(R(c).name for c in sent))
            self._find(index, "valid negotiation step refused", str(exc), trace)
            return False
        trace.append("prefix: " + " ".join(R(c).name for c in sent))
        if phase != target:
            self._find(index, "prefix did not reach its phase", f"{phase.name} != {target.name}", trace)
            return False
        if target == Phase.RINGS and rng.random() < 0.5:
            fe.post_rx(0, 8)
            fe.send(0, [bytes(60)] * rng.randrange(1, 4))
        return True

    def _messages(self, rng: random.Random, index: int, phase: Phase,
                  ctx: _Context) -> List[_Msg]:
        sched = self._schedules[phase]
        start = (index // len(Phase)) * SCHEDULED
        cells = [sched[(start + i) % len(sched)] for i in range(SCHEDULED)]
        for _ in range(rng.randrange(self.max_messages + 1)):
            code = rng.randrange(1, 41) if rng.random() < 0.7 else rng.randrange(NUM_CODES)
            cells.append((code, FdKind(rng.randrange(len(FdKind)))))
        rng.shuffle(cells)
        out = []
        for code, kind in cells:
            payload, hint = _payload(code, rng, ctx)
            flags = P.VERSION | (P.FLAG_NEED_REPLY if rng.random() < 0.6 else 0)
            if rng.random() < 0.05:
                flags |= P.FLAG_REPLY
            if rng.random() < 0.05:
                flags |= rng.getrandbits(32) & ~P.VERSION_MASK
            nfds = 0 if kind == FdKind.NONE else rng.choice((1, 1, 1, 1, 2, 3, 8, 8, 1, 40))
            if code in (R.SET_MEM_TABLE,) and kind != FdKind.NONE and rng.random() < 0.5 and len(payload) >= 4:
                nfds = max(1, min(8, struct.unpack_from("<I", payload)[0]))
            split = rng.choice((0, 0, 0, 0, 1, 2)) if payload else 0
            out.append(_Msg(code, flags, payload, kind, nfds, hint, split))
        return out

    def _deliver(self, fe: Frontend, rng: random.Random, msgs: List[_Msg], phase: Phase,
                 ctx: _Context, fds: _Fds, trace: List[str], index: int) -> None:
        sock = fe.sock
        assert sock is not None
        reply_ack: Optional[bool] = fe.reply_ack
        i = 0
        while i < len(msgs):
            batch = msgs[i:i + rng.choice((1, 1, 2, 4, 8))]
            i += len(batch)
            expected: List[Tuple[_Msg, Optional[bool]]] = []
            for m in batch:
                trace.append(f"{P.request_name(m.code)} flags={m.flags:#x} size={len(m.payload)} "
                             f"fds={m.nfds}x{m.kind.name} split={m.split}")
                if not self._send(sock, m, fds):
                    self._find(index, "back-end closed the connection", "while sending", trace)
                    return
                self.messages += 1
                self.coverage.add(m.code, m.kind, phase)
                send_with_fds(sock, P.encode(R.GET_FEATURES))
                if m.code in (R.SET_PROTOCOL_FEATURES, R.SET_FEATURES):
                    # It may change REPLY_ACK, for its own ack too: unknown from here.
                    reply_ack = None
                expected.append((m, reply_ack))
            if not self._collect(fe, expected, trace, index):
                return
        self._tail(fe, rng, msgs[-1] if msgs else None, fds, trace, index)

    def _send(self, sock: socket.socket, m: _Msg, fds: _Fds) -> bool:
        raw = P.HEADER.pack(m.code, m.flags, len(m.payload)) + m.payload
        own = fds.make(m.kind, m.nfds, m.size_hint)
        try:
            if m.split == 0:
                send_with_fds(sock, raw, own)
            elif m.split == 1:
                send_with_fds(sock, raw[:P.HEADER_SIZE], own)
                send_with_fds(sock, raw[P.HEADER_SIZE:])
            else:
                send_with_fds(sock, raw[:P.HEADER_SIZE])
                send_with_fds(sock, raw[P.HEADER_SIZE:], own)
        except (BrokenPipeError, ConnectionResetError):
            return False
        finally:
            _close_all(own)
        return True

    def _collect(self, fe: Frontend, expected: List[Tuple[_Msg, Optional[bool]]],
                 trace: List[str], index: int) -> bool:
        """Read the replies of a batch (each message then its probe).  False
        when the connection is gone (a finding unless the spec allows it)."""
        for m, ack in expected:
            own: List[P.Message] = []
            probes = 2 if m.code == R.GET_FEATURES else 1
            while probes:
                try:
                    reply = fe.recv_reply(self.reply_timeout)
                except BackendClosed:
                    if m.code == R.SET_PROTOCOL_FEATURES:
                        trace.append("back-end closed the connection (allowed: protocol features)")
                    else:
                        self._find(index, "back-end closed the connection",
                                   f"after a well-framed {P.request_name(m.code)}", trace)
                    return False
                except FrontendError as exc:
                    self._find(index, "no answer", f"to {P.request_name(m.code)} or its probe: {exc}",
                               trace)
                    return False
                _close_all(reply.fds)
                if reply.request == R.GET_FEATURES and reply.is_reply:
                    probes -= 1
                    if probes:
                        own.append(reply)
                    continue
                own.append(reply)
            bad = [r for r in own if r.request != m.code or not r.is_reply]
            if bad:
                self._find(index, "reply to the wrong request",
                           f"{P.request_name(m.code)} answered with {bad[0]!r}", trace)
            need = m.code in _HAS_BODY or (ack and m.flags & P.FLAG_NEED_REPLY
                                           and m.flags & P.VERSION_MASK == P.VERSION)
            if need and not own:
                self._find(index, "NEED_REPLY not answered",
                           f"{P.request_name(m.code)} flags={m.flags:#x} (REPLY_ACK negotiated)", trace)
            if len(own) > 1:
                self._find(index, "several replies", f"{len(own)} replies to {P.request_name(m.code)}",
                           trace)
        return True

    def _tail(self, fe: Frontend, rng: random.Random, last: Optional[_Msg], fds: _Fds,
              trace: List[str], index: int) -> None:
        """How the connection ends."""
        tail = rng.choice(_TAILS)
        trace.append(f"tail {tail}")
        sock = fe.sock
        assert sock is not None
        code = rng.randrange(NUM_CODES)
        own = fds.make(FdKind(rng.randrange(1, len(FdKind))), rng.choice((0, 1, 2)), 4096)
        try:
            if tail == "truncated_header":
                send_with_fds(sock, P.HEADER.pack(code, P.VERSION, 8)[:rng.randrange(1, P.HEADER_SIZE)], own)
            elif tail == "mid_payload":
                size = rng.randrange(8, 200)
                send_with_fds(sock, P.HEADER.pack(code, P.VERSION, size) + bytes(rng.randrange(size)), own)
            elif tail in ("bad_version", "oversize"):
                flags = rng.choice((0, 2, 3)) | P.FLAG_NEED_REPLY if tail == "bad_version" else \
                    P.VERSION | P.FLAG_NEED_REPLY
                size = 8 if tail == "bad_version" else rng.choice((P.MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF))
                send_with_fds(sock, P.HEADER.pack(code, flags, size) + bytes(8), own)
                if not fe.wait_closed(self.reply_timeout):
                    self._find(index, "framing error not answered",
                               f"{tail}: connection still open, no reply", trace)
            elif tail == "shutdown":
                sock.shutdown(socket.SHUT_WR)
                if not fe.wait_closed(self.reply_timeout):
                    self._find(index, "end of stream ignored", "back-end kept the connection", trace)
            elif tail == "close_running" and fe.negotiated:
                fe.post_rx(0, 4)
                fe.send(0, [bytes(60)] * 4)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except (FrontendError, ValueError) as exc:       # our rings, after hostile messages
            trace.append(f"tail traffic refused by the front-end: {exc}")
        finally:
            _close_all(own)

    def _check(self, index: int, trace: List[str]) -> None:
        if self.target is None:
            return
        for what in self.target.deaths():
            self._find(index, "process died", what, trace)
        for text in self.target.log_errors():
            self._find(index, "exception logged", text, trace)
        if self.loopback_every and (self.connections % self.loopback_every == 0):
            why = loops_back(self.path)
            if why:
                self._find(index, "loopback broken", why, trace)

    def _find(self, index: int, what: str, detail: str, trace: List[str]) -> None:
        self.findings.append(Finding(self.name, self.seed, index, what, detail, tuple(trace)))


def _phase_after(phase: Phase, done: int) -> Phase:
    if done == R.SET_FEATURES and phase == Phase.BEFORE_OWNER:
        return Phase.FEATURES
    if done in (R.SET_MEM_TABLE, R.ADD_MEM_REG) and phase == Phase.FEATURES:
        return Phase.MEM_TABLE
    return phase


def _leaves(phase: Phase, upcoming: int) -> bool:
    """Whether sending ``upcoming`` ends ``phase``."""
    return {Phase.BEFORE_OWNER: upcoming == R.SET_OWNER,
            Phase.FEATURES: upcoming in (R.SET_MEM_TABLE, R.ADD_MEM_REG),
            Phase.MEM_TABLE: upcoming == R.SET_VRING_KICK}.get(phase, False)


# --- the hostile guest -------------------------------------------------------------
#: Random damage: descriptor tables, indirect tables, avail-index games.
_RANDOM_OPS = ("chains", "chains", "indirect", "indirect", "avail_jump", "rewrite", "flags",
               "valid")
#: One rule broken by an otherwise valid chain, one class of the ring rules each.
_CLASS_OPS = ("loop", "long_indirect", "nested_indirect", "indirect_len", "indirect_next",
              "wrong_direction", "short_frame", "oversize_frame", "past_memory_end",
              "span_regions")

class GuestFuzzer:
    """A hostile guest behind a correct front-end: random descriptor tables,
    indirect tables and avail-index games on both rings of pair 0.

    Properties checked per connection, besides the processes: the device
    returns only heads below the queue size, and moves the used index by no
    more than the queue size at once."""

    name = "guest"

    def __init__(self, path: str, seed: int, target: Optional[Target] = None, *,
                 rounds_per_connection: int = 12, settle: float = 0.01, timeout: float = 12.0,
                 loopback_every: int = 0):
        self.path = path
        self.seed = seed
        self.target = target
        self.rounds_per_connection = rounds_per_connection
        self.settle = settle
        self.timeout = timeout
        self.loopback_every = loopback_every
        self.findings: List[Finding] = []
        self.rounds = 0
        self.connections = 0
        self.counts: Dict[str, int] = {}
        self.last_trace: List[str] = []

    def run(self, rounds: int, first: int = 0) -> None:
        conn = first
        while self.rounds < rounds:
            self.run_connection(conn)
            conn += 1

    def run_connection(self, index: int) -> None:
        rng = random.Random(f"shardvu-guest:{self.seed}:{index}")
        trace: List[str] = []
        self.last_trace = trace
        self.connections += 1
        features = DEFAULT_FEATURES
        for b in (P.VIRTIO_RING_F_EVENT_IDX, P.VIRTIO_RING_F_INDIRECT_DESC, P.VIRTIO_NET_F_MRG_RXBUF):
            if rng.random() < 0.4:
                features ^= bit(b)
        qsize = rng.choice((8, 16, 64, 256))
        regions = rng.choice((1, 2))
        trace.append(f"features {features:#x} qsize {qsize} regions {regions}")
        fe = None
        try:
            fe = Frontend(self.path, mem_size=4 << 20, regions=regions, queue_size=qsize,
                          features=features, timeout=self.timeout)
            rounds = rng.randrange(1, self.rounds_per_connection + 1)
            fe.negotiate()
            for _ in range(rounds):
                self._round(fe, rng, trace, index)
                self.rounds += 1
        except (FrontendError, OSError) as exc:
            self.findings.append(Finding(self.name, self.seed, index, "front-end failed",
                                         f"{type(exc).__name__}: {exc}", tuple(trace)))
        finally:
            if fe is not None:
                fe.close()
            self._check(index, trace)

    def _round(self, fe: Frontend, rng: random.Random, trace: List[str], index: int) -> None:
        q = rng.randrange(2)
        vq = fe.queues[q]
        size = vq.size
        before = vq.used_idx
        op = rng.choice(_RANDOM_OPS + _CLASS_OPS)
        self.counts[op] = self.counts.get(op, 0) + 1
        trace.append(f"q{q} {op}")
        if op in _CLASS_OPS:
            self._one_violation(fe, rng, q, op)
        elif op in ("chains", "indirect"):
            for _ in range(rng.randrange(1, size + 1)):
                i = rng.randrange(size)
                if op == "indirect" and rng.random() < 0.5:
                    table = self._table(fe, rng)
                    vq.write_desc(i, table[0], table[1], self._flags(rng) | VRING_DESC_F_INDIRECT,
                                  self._next(rng, size))
                else:
                    vq.write_desc(i, self._addr(fe, rng), self._len(rng), self._flags(rng),
                                  self._next(rng, size))
            n = rng.randrange(1, size + 1)
            for _ in range(n):
                vq.push_avail(rng.randrange(size) if rng.random() < 0.95 else rng.randrange(1 << 16))
            vq.publish()
        elif op == "avail_jump":
            jump = rng.choice((size + 1, size, 1 << 15, 0xFFFF, (1 << 16) - size, rng.randrange(1 << 16)))
            vq.write_avail_idx(vq.published_idx + jump)
        elif op == "rewrite":               # change entries the device may already have read
            for slot in range(vq.published_idx - size, vq.published_idx):
                vq.write_avail_entry(slot, rng.randrange(1 << 16))
        elif op == "flags":
            vq.write_avail_flags(rng.choice((0, VRING_AVAIL_F_NO_INTERRUPT, 0xFFFF)))
            vq.set_used_event(rng.randrange(1 << 16))
        else:
            try:
                if q == 0:
                    fe.post_rx(0, rng.randrange(1, 8), buf_size=rng.choice((16, 64, 2048)))
                else:
                    fe.send(0, [bytes(rng.randrange(0, 2000))])
            except (FrontendError, ValueError) as exc:    # a broken ring may answer nonsense
                trace.append(f"valid traffic refused by the front-end: {exc}")
        for _ in range(rng.choice((1, 1, 2, 5))):
            fe.kick(q)
        deadline = time.monotonic() + self.settle
        while time.monotonic() < deadline and vq.used_idx == before:
            time.sleep(0.002)
        after = vq.used_idx
        moved = (after - before) & 0xFFFF
        if moved > size:
            self._find(index, "used index jumped", f"q{q} moved {moved} > size {size}", trace)
        for slot in range(before, before + min(moved, size)):
            head, _len = vq.used_elem(slot)
            if head >= size:
                self._find(index, "used head out of range", f"q{q} head {head} >= size {size}", trace)
                break
        vq.last_used_idx = after            # resynchronise the driver's view

    def _one_violation(self, fe: Frontend, rng: random.Random, q: int, op: str) -> None:
        """One chain made of valid buffers but for the one rule ``op``
        breaks (one class of the ring rules each), published and, for the
        RX cases, a frame sent to land in it."""
        vq = fe.queues[q]
        size = vq.size
        hdr = fe.hdr_len
        rx = q == 0
        wflag = VRING_DESC_F_WRITE if rx else 0
        slots = rng.sample(range(size), min(size, 4))

        def buf(n: int) -> int:
            try:
                return fe.alloc(max(n, 1), 64)
            except MemoryError:
                return fe.region_descs[0].gpa
        head = slots[0]
        if op == "loop":
            for a, b in zip(slots, slots[1:] + slots[:1]):
                vq.write_desc(a, buf(256), 256, wflag | VRING_DESC_F_NEXT, b)
        elif op in ("long_indirect", "nested_indirect", "indirect_len", "indirect_next"):
            n = size + 1 if op == "long_indirect" else rng.randrange(1, 5)
            table = buf(n * DESC_SIZE)
            raw = bytearray()
            for i in range(n):
                last = i == n - 1
                flags = wflag | (0 if last else VRING_DESC_F_NEXT)
                if op == "nested_indirect" and last:
                    flags |= VRING_DESC_F_INDIRECT
                raw += struct.pack("<QIHH", buf(256), 256, flags, 0 if last else i + 1)
            fe.write(table, bytes(raw))
            length = n * DESC_SIZE + (rng.choice((1, 8, 15)) if op == "indirect_len" else 0)
            flags = VRING_DESC_F_INDIRECT | (VRING_DESC_F_NEXT if op == "indirect_next" else 0)
            vq.write_desc(head, table, length, flags, slots[-1])
            if op == "indirect_next":
                vq.write_desc(slots[-1], buf(256), 256, wflag, 0)
        elif op == "wrong_direction":
            vq.write_desc(head, buf(2048), 2048, VRING_DESC_F_WRITE if not rx else 0, 0)
        elif op == "short_frame":
            vq.write_desc(head, buf(64), rng.randrange(hdr), 0 if not rx else VRING_DESC_F_WRITE, 0)
        elif op == "oversize_frame":
            n = rng.choice((65536, 65550, 1 << 17)) + hdr
            vq.write_desc(head, buf(n), n, wflag, 0)
        elif op == "past_memory_end":
            end = max(r.gpa + r.size for r in fe.region_descs)
            start = end - rng.choice((1, 16, 64, 1000))
            vq.write_desc(head, start, rng.choice((1100, 2048, 0xFFFFFFFF)), wflag, 0)
        elif op == "span_regions":
            if len(fe.region_descs) > 1:
                r1 = fe.region_descs[1]
                vq.write_desc(head, r1.gpa - 32, 64 + hdr, wflag, 0)
            else:
                vq.write_desc(head, buf(64 + hdr), 64 + hdr, wflag, 0)
        vq.push_avail(head)
        vq.publish()
        if rx:
            try:
                fe.send(0, [bytes(rng.choice((60, 1500, 9000)))])
            except (FrontendError, ValueError):
                pass

    @staticmethod
    def _addr(fe: Frontend, rng: random.Random) -> int:
        r = rng.choice(fe.region_descs)
        return rng.choice((r.gpa + rng.randrange(r.size), r.gpa + r.size - rng.randrange(1, 64),
                           r.gpa + r.size, 0, (1 << 64) - 1, (1 << 63), r.gpa + rng.randrange(r.size)))

    @staticmethod
    def _len(rng: random.Random) -> int:
        return rng.choice((0, 1, 11, 12, 13, 60, 64, 1514, 2048, 65535, 65536, 0xFFFFFFFF,
                           rng.randrange(4096)))

    @staticmethod
    def _flags(rng: random.Random) -> int:
        return rng.choice((0, 0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                           VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT,
                           VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, rng.randrange(1 << 16)))

    @staticmethod
    def _next(rng: random.Random, size: int) -> int:
        return rng.choice((0, 1, rng.randrange(size), size - 1, size, rng.randrange(1 << 16)))

    def _table(self, fe: Frontend, rng: random.Random) -> Tuple[int, int]:
        """An indirect table of random descriptors: (gpa, length field)."""
        n = rng.choice((1, 2, 4, 16, 64))
        try:
            gpa = fe.alloc(n * DESC_SIZE, 16)
        except MemoryError:
            gpa = fe.region_descs[0].gpa
        raw = bytearray()
        for _ in range(n):
            flags = self._flags(rng)
            raw += struct.pack("<QIHH", self._addr(fe, rng) & ((1 << 64) - 1), self._len(rng),
                               flags, self._next(rng, n + 1))
        try:
            fe.write(gpa, bytes(raw))
        except (ValueError, IndexError):
            pass
        length = rng.choice((n * DESC_SIZE, n * DESC_SIZE, n * DESC_SIZE + 1, 8, 0, 0xFFFFFFF0,
                             (n + 1) * DESC_SIZE))
        return gpa, length

    def _check(self, index: int, trace: List[str]) -> None:
        if self.target is None:
            return
        for what in self.target.deaths():
            self._find(index, "process died", what, trace)
        for text in self.target.log_errors():
            self._find(index, "exception logged", text, trace)
        if self.loopback_every and self.connections % self.loopback_every == 0:
            why = loops_back(self.path)
            if why:
                self._find(index, "loopback broken", why, trace)

    def _find(self, index: int, what: str, detail: str, trace: List[str]) -> None:
        self.findings.append(Finding(self.name, self.seed, index, what, detail, tuple(trace)))


# --- a campaign: both fuzzers and the before/after checks --------------------------
class Report(NamedTuple):
    """What :func:`run_campaign` did and found."""
    seed: int
    messages: int               # mutated protocol messages
    prefix_messages: int        # valid negotiation messages before them
    connections: int
    guest_rounds: int
    guest_connections: int
    seconds: float              # the whole campaign
    protocol_seconds: float     # the protocol fuzzer's part
    coverage: Coverage
    findings: Tuple[Finding, ...]
    restarts: int
    guest_ops: Dict[str, int]   # hostile ring rounds by kind

    @property
    def rate(self) -> float:
        """Mutated messages per second of the protocol fuzzer's part (its
        valid prefixes and checks included)."""
        return self.messages / self.protocol_seconds if self.protocol_seconds else 0.0


def run_campaign(path: str, target: Target, seed: int, messages: int, guest_rounds: int, *,
                 max_messages: int = 24, loopback_every: int = 100,
                 restart: Optional[Callable[[], Target]] = None,
                 progress: Optional[Callable[[str], None]] = None) -> Report:
    """Fuzz the back-end at ``path`` (whose processes are ``target``):
    ``messages`` mutated protocol messages, then ``guest_rounds`` hostile
    ring rounds; a loopback check first (which also sets the fd and process
    baseline) and last, and fd and process counts compared at the end.
    ``restart`` (optional) brings up a fresh back-end after the control
    process died and returns its Target, so a long run goes on finding
    things (a dead worker is reported; replacing it is the back-end's job)."""
    start = time.monotonic()
    findings: List[Finding] = []
    restarts = 0
    why = loops_back(path)
    if why:
        findings.append(Finding("campaign", seed, -1, "loopback broken before fuzzing", why, ()))
    target.baseline()
    proto = ProtocolFuzzer(path, seed, target, max_messages=max_messages,
                           loopback_every=loopback_every)
    guest = GuestFuzzer(path, seed, target, loopback_every=max(1, loopback_every // 10))
    conn = 0
    last_report = start
    while proto.messages < messages and conn < messages:   # (a connection failing early sends none)
        seen = len(proto.findings)
        proto.run_connection(conn)
        conn += 1
        if any(f.what == "process died" for f in proto.findings[seen:]) \
                and not target.control_alive():
            if restart is None:
                break                   # nothing left to fuzz
            target = restart()
            proto.target = guest.target = target
            restarts += 1
        if progress is not None and time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            progress(f"{proto.messages} messages, {proto.connections} connections, "
                     f"{len(proto.findings)} findings, "
                     f"{proto.messages / (last_report - start):.0f} msg/s")
    findings += proto.findings
    protocol_seconds = time.monotonic() - start
    gconn = 0
    while guest.rounds < guest_rounds and gconn < guest_rounds and target.control_alive():
        seen = len(guest.findings)
        guest.run_connection(gconn)
        gconn += 1
        if any(f.what == "process died" for f in guest.findings[seen:]) \
                and not target.control_alive():
            if restart is None:
                break
            target = restart()
            guest.target = target
            restarts += 1
    findings += guest.findings
    why = loops_back(path)
    if why:
        findings.append(Finding("campaign", seed, -1, "loopback broken after fuzzing", why, ()))
    for what in target.deaths():
        findings.append(Finding("campaign", seed, -1, "process died", what, ()))
    if not restarts:
        for what in target.leaks():
            findings.append(Finding("campaign", seed, -1, "fd or process count changed", what, ()))
    return Report(seed, proto.messages, proto.prefix_messages, proto.connections, guest.rounds,
                  guest.connections, time.monotonic() - start, protocol_seconds, proto.coverage,
                  tuple(findings), restarts, dict(guest.counts))
