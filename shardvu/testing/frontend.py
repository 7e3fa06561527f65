"""A Python vhost-user front-end (QEMU's role), for tests and traffic.

:class:`Frontend` owns a made-up guest: memfd-backed guest memory split into
regions whose front-end virtual addresses differ from their guest-physical
ones, one :class:`~shardvu.testing.driver.DriverQueue` per virtqueue, and the
kick/call/err eventfds.  It negotiates with a back-end over its Unix socket
as QEMU does, then sends and receives virtio-net frames.

Contracts:

* Every wait is bounded (``timeout``, default 5 s): a dead or silent
  back-end raises :class:`ReplyTimeout` or :class:`BackendClosed`, never
  hangs.
* With REPLY_ACK negotiated every request without a reply of its own is
  sent with NEED_REPLY and its ack is checked; a non-zero ack raises
  :class:`FrontendError` (``request``, ``code``).
* A message's fds travel with its header in one ``sendmsg``.
* :meth:`Frontend.close` closes every fd the front-end made or received
  (sockets, memfds, eventfds, log and inflight fds) and stops the
  back-end-request thread.  A view handed out
  (:attr:`Frontend.inflight_view`) must be dropped by the caller first for
  its mapping to go away at once.
* Virtqueue ``2*p`` is pair ``p``'s RX queue (the device writes into it),
  ``2*p + 1`` its TX queue.
"""
from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .. import protocol as P
from ..dirtylog import DirtyLog
from .driver import DriverError, DriverQueue, QueueFull, ring_layout
from ..eventfd import drain, eventfd, signal
from ..memory import GuestMemory
from ..transport import recv_with_fds, send_with_fds
from ..protocol import (BackendRequest, ConfigMsg, InflightDesc, LogArea, MemoryRegion,
                       MemoryTable, MemRegMsg, Message, MessageReader, ProtocolFeature,
                       Request, VringAddr, VringState, bit, pack_u64)

__all__ = [
    "Frontend", "FrontendError", "BackendClosed", "ReplyTimeout", "DirtyLog",
    "DEFAULT_FEATURES", "DEFAULT_PROTOCOL_FEATURES", "UVA_BASE",
]

#: Front-end virtual address of guest-physical 0 (plus a gap per region).
UVA_BASE = 0x7F00_0000_0000
UVA_GAP = 0x1_0000_0000
PAGE = 4096

DEFAULT_FEATURES = (bit(P.VIRTIO_F_VERSION_1) | bit(P.VIRTIO_NET_F_MRG_RXBUF)
                    | bit(P.VIRTIO_RING_F_EVENT_IDX) | bit(P.VIRTIO_RING_F_INDIRECT_DESC)
                    | bit(P.VIRTIO_NET_F_MQ) | bit(P.VIRTIO_NET_F_MAC) | bit(P.VIRTIO_NET_F_MTU)
                    | bit(P.VIRTIO_NET_F_STATUS) | bit(P.VHOST_USER_F_PROTOCOL_FEATURES))

DEFAULT_PROTOCOL_FEATURES = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK)
                             | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.LOG_SHMFD)
                             | bit(ProtocolFeature.INFLIGHT_SHMFD)
                             | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
                             | bit(ProtocolFeature.STATUS) | bit(ProtocolFeature.RESET_DEVICE))

#: Requests that carry a reply whatever the flags say.
_HAS_REPLY = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.IOTLB_MSG,
    Request.POSTCOPY_ADVISE, Request.POSTCOPY_END, Request.CREATE_CRYPTO_SESSION,
})

# virtio status bits
STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8

_NET_HDR = struct.Struct("<BBHHHHH")   # 12 bytes, num_buffers last
_RECV_SIZE = 65536


class FrontendError(Exception):
    """A request failed: ``request`` is its code, ``code`` the back-end's
    non-zero ack (or -1 for a malformed, missing or unexpected reply)."""

    def __init__(self, request: int, code: int, reason: str = ""):
        name = P.request_name(request) if request is not None else "?"
        super().__init__(f"{name}: {reason or f'back-end answered {code}'}")
        self.request = request
        self.code = code
        self.reason = reason


class BackendClosed(FrontendError, ConnectionError):
    """The back-end closed the connection."""


class ReplyTimeout(FrontendError, TimeoutError):
    """No reply within the timeout."""


class _Pool:
    """Fixed-size buffers in guest memory: a free list over a bump allocator."""

    def __init__(self, fe: "Frontend", chunk: int):
        self.fe = fe
        self.chunk = chunk
        self.free: List[int] = []

    def get(self) -> int:
        return self.free.pop() if self.free else self.fe.alloc(self.chunk, 64)

    def put(self, gpa: int) -> None:
        self.free.append(gpa)


class Frontend:
    """A vhost-user front-end with its own guest memory and virtio-net rings.

    Connect with ``Frontend(path=...)`` or ``Frontend(sock=...)`` (or
    :meth:`listen` for back-ends in client mode), then :meth:`negotiate`.
    ``features``/``protocol_features`` are the wanted masks (intersected
    with the back-end's offer).  ``regions`` memfds of ``mem_size //
    regions`` bytes each make up the guest memory (``mmap_offset`` bytes of
    each memfd precede its region).  ``use_mem_slots`` sends ADD_MEM_REG per
    region instead of SET_MEM_TABLE when CONFIGURE_MEM_SLOTS is negotiated.
    ``inflight`` makes :meth:`negotiate` fetch and install an inflight area
    when INFLIGHT_SHMFD is negotiated.  ``used_align`` is the used ring's
    alignment (4096: legacy layout, the used ring on its own page).
    """

    def __init__(self, path: Optional[str] = None, sock: Optional[socket.socket] = None, *,
                 mem_size: int = 64 << 20, regions: int = 1, queue_pairs: int = 1,
                 queue_size: int = 256, features: Optional[int] = None,
                 protocol_features: Optional[int] = None, backend_req: bool = False,
                 use_mem_slots: bool = False, inflight: bool = False, timeout: float = 5.0,
                 mmap_offset: int = 0, used_align: int = 4096, tx_buf_size: int = 2048):
        if regions < 1 or mem_size < regions * PAGE:
            raise ValueError("need at least one page per region")
        if queue_pairs < 1:
            raise ValueError("queue_pairs must be >= 1")
        self.timeout = timeout
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.queue_size = queue_size
        self.wanted_features = DEFAULT_FEATURES if features is None else features
        wanted_pf = DEFAULT_PROTOCOL_FEATURES if protocol_features is None else protocol_features
        if backend_req and protocol_features is None:
            wanted_pf |= bit(ProtocolFeature.BACKEND_REQ)
        self.wanted_protocol_features = wanted_pf
        self.use_mem_slots = use_mem_slots
        self.want_inflight = inflight
        self.tx_buf_size = tx_buf_size

        # negotiated state
        self.offered_features = 0
        self.offered_protocol_features = 0
        self.features = 0
        self.protocol_features = 0
        self.max_queues: Optional[int] = None
        self.max_mem_slots: Optional[int] = None
        self.negotiated = False
        self._reply_ack = False

        # connection
        self.sock: Optional[socket.socket] = None
        self._reader = MessageReader()
        self._breq_sock: Optional[socket.socket] = None
        self._breq_thread: Optional[threading.Thread] = None
        self._breq_stop = -1
        self._lock = threading.Lock()
        #: back-end requests received, by :class:`BackendRequest` code
        self.backend_requests: Dict[int, int] = {}
        self.vring_errors: Dict[int, int] = {}

        # guest memory
        self.mem = GuestMemory()
        self.region_fds: List[int] = []
        self.region_descs: List[MemoryRegion] = []
        rsize = (mem_size // regions) & ~(PAGE - 1)
        try:
            for i in range(regions):
                gpa = i * rsize
                fd = os.memfd_create(f"shardvu-guest{i}", os.MFD_CLOEXEC)
                self.region_fds.append(fd)
                os.ftruncate(fd, rsize + mmap_offset)
                desc = MemoryRegion(gpa, rsize, UVA_BASE + gpa + (i + 1) * UVA_GAP, mmap_offset)
                self.region_descs.append(desc)
                self.mem.add(desc, os.dup(fd))
        except BaseException:
            self._close_memory()
            raise
        self._bump = [d.gpa for d in self.region_descs]
        self._bump_region = 0

        # rings
        self.queues: List[DriverQueue] = []
        lay = ring_layout(queue_size, used_align)
        for _q in range(self.num_queues):
            gpa = self.alloc(lay.total, max(used_align, 16))
            self.queues.append(DriverQueue(self.mem, gpa, queue_size, used_align=used_align,
                                           alloc=self.alloc))
        self.kick_fds = [eventfd() for _ in range(self.num_queues)]
        self.call_fds = [eventfd() for _ in range(self.num_queues)]
        self.err_fds = [eventfd() for _ in range(self.num_queues)]
        self._calls = [0] * self.num_queues
        self.kicks = [0] * self.num_queues
        self.suppressed_kicks = [0] * self.num_queues
        self._tx_pool = _Pool(self, tx_buf_size)
        self._rx_pools: Dict[int, _Pool] = {}
        self._tx_bufs: Dict[Tuple[int, int], List[int]] = {}
        self._rx_bufs: Dict[Tuple[int, int], Tuple[int, int]] = {}
        self._rx_pending: List[List[Tuple[int, int, int]]] = [[] for _ in range(self.num_queues)]
        self._rx_size = [2048] * self.num_queues
        self.log: Optional[DirtyLog] = None
        self.inflight_fd = -1
        self.inflight_desc: Optional[InflightDesc] = None
        self._inflight_mm: Optional[mmap.mmap] = None
        self.inflight_view: Optional[memoryview] = None
        self._closed = False

        if sock is not None:
            self._attach(sock)
        elif path is not None:
            self._attach(self._connect(path))

    # -- construction helpers ---------------------------------------------------------
    @staticmethod
    def accept(path: str, timeout: float = 5.0) -> socket.socket:
        """Listen on ``path``, accept one back-end (client mode) and return
        the connected socket; the listening socket is closed and ``path``
        unlinked."""
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)
            lst.bind(path)
            lst.listen(1)
            lst.settimeout(timeout)
            conn, _ = lst.accept()
            return conn
        finally:
            lst.close()
            try:
                os.unlink(path)
            except OSError:
                pass

    @classmethod
    def listen(cls, path: str, **kwargs) -> "Frontend":
        """A front-end for a back-end in client mode: listen on ``path``,
        accept one connection (within ``timeout``), return the Frontend."""
        sock = cls.accept(path, kwargs.get("timeout", 5.0))
        try:
            return cls(sock=sock, **kwargs)
        except BaseException:
            sock.close()
            raise

    def _connect(self, path: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return s

    def _attach(self, sock: socket.socket) -> None:
        sock.settimeout(self.timeout)
        self.sock = sock
        self._reader = MessageReader()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- guest memory -------------------------------------------------------------------
    def alloc(self, size: int, align: int = 64) -> int:
        """Bump-allocate ``size`` bytes of guest memory (never freed; inside
        one region).  Raises MemoryError when memory is exhausted."""
        while self._bump_region < len(self.region_descs):
            r = self.region_descs[self._bump_region]
            start = (self._bump[self._bump_region] + align - 1) & ~(align - 1)
            if start + size <= r.gpa + r.size:
                self._bump[self._bump_region] = start + size
                return start
            self._bump_region += 1
        raise MemoryError(f"guest memory exhausted allocating {size} bytes")

    def add_mem_region(self, size: int) -> MemoryRegion:
        """Hot-plug a new region of ``size`` bytes (page multiple) after the
        last one and send it with ADD_MEM_REG (needs CONFIGURE_MEM_SLOTS).
        Later :meth:`alloc` calls may use it."""
        if size <= 0 or size % PAGE:
            raise ValueError("region size must be a positive multiple of 4096")
        last = self.region_descs[-1]
        gpa = last.gpa + last.size
        fd = os.memfd_create(f"shardvu-guest{len(self.region_descs)}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            desc = MemoryRegion(gpa, size, UVA_BASE + gpa + (len(self.region_descs) + 1) * UVA_GAP, 0)
            self.mem.add(desc, os.dup(fd))
        except BaseException:
            os.close(fd)
            raise
        self.region_fds.append(fd)
        self.region_descs.append(desc)
        self._bump.append(gpa)
        self.request(Request.ADD_MEM_REG, MemRegMsg(desc).pack(), [fd])
        return desc

    def remove_mem_region(self, desc: MemoryRegion, unmap: bool = True) -> None:
        """Send REM_MEM_REG for ``desc`` (no fd); with ``unmap`` also drop
        it from this front-end's memory (nothing in it may still be in use)."""
        self.request(Request.REM_MEM_REG, MemRegMsg(desc).pack())
        if unmap and desc in self.region_descs:
            i = self.region_descs.index(desc)
            self.mem.remove(desc)
            os.close(self.region_fds.pop(i))
            del self.region_descs[i]
            del self._bump[i]
            if i < self._bump_region:
                self._bump_region -= 1

    def gpa_to_uva(self, gpa: int) -> int:
        """Front-end virtual address of ``gpa`` (what SET_VRING_ADDR carries)."""
        for r in self.region_descs:
            if r.gpa <= gpa < r.gpa + r.size:
                return gpa - r.gpa + r.uva
        raise ValueError(f"guest address {gpa:#x} is not in guest memory")

    def read(self, gpa: int, length: int) -> bytes:
        return self.mem.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)

    # -- wire level ---------------------------------------------------------------------
    def _require_sock(self) -> socket.socket:
        if self.sock is None:
            raise BackendClosed(Request.NONE, -1, "not connected")
        return self.sock

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` (any bytes) in one sendmsg with ``fds`` attached."""
        sock = self._require_sock()
        try:
            send_with_fds(sock, data, fds)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed(Request.NONE, -1, f"send failed: {exc}") from None
        except socket.timeout:
            raise ReplyTimeout(Request.NONE, -1, "send timed out") from None

    def recv_reply(self, timeout: Optional[float] = None) -> Message:
        """Next message from the back-end; raises :class:`ReplyTimeout`
        after ``timeout`` (default: the front-end's) or
        :class:`BackendClosed` on EOF.  The caller owns ``msg.fds``."""
        sock = self._require_sock()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                msg = self._reader.next_message()
            except P.ProtocolError as exc:
                raise FrontendError(exc.request or 0, -1, f"bad reply: {exc.reason}") from None
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplyTimeout(Request.NONE, -1, "no reply")
            sock.settimeout(left)
            try:
                data, fds = recv_with_fds(sock, _RECV_SIZE)
            except socket.timeout:
                raise ReplyTimeout(Request.NONE, -1, "no reply") from None
            except ConnectionResetError:
                raise BackendClosed(Request.NONE, -1, "connection reset") from None
            finally:
                sock.settimeout(self.timeout)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise BackendClosed(Request.NONE, -1, "connection closed")
            self._reader.feed(data, fds)

    def wait_closed(self, timeout: float = 1.0) -> bool:
        """True if the back-end closes the connection within ``timeout``
        (any messages that arrive meanwhile are discarded, fds closed)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = self.recv_reply(left)
            except BackendClosed:
                return True
            except ReplyTimeout:
                return False
            except FrontendError:
                continue
            for fd in msg.fds:
                os.close(fd)

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (),
                need_reply: Optional[bool] = None, check: bool = True,
                timeout: Optional[float] = None) -> Optional[Message]:
        """Send one request and return its reply, if it has one or an ack
        was asked (``need_reply``; default: when REPLY_ACK is negotiated and
        the request has no reply of its own).  With ``check``, a reply of
        the wrong code raises :class:`FrontendError`, as does a non-zero
        ack.  SET_LOG_BASE expects a reply when LOG_SHMFD is negotiated."""
        has_reply = req in _HAS_REPLY or (
            req == Request.SET_LOG_BASE and self.protocol_features & bit(ProtocolFeature.LOG_SHMFD))
        if need_reply is None:
            need_reply = self._reply_ack and not has_reply
        flags = P.VERSION | (P.FLAG_NEED_REPLY if need_reply else 0)
        try:
            self.send_raw(P.encode(req, payload, flags), fds)
            if not (has_reply or need_reply):
                return None
            msg = self.recv_reply(timeout)
        except FrontendError as exc:
            raise type(exc)(req, exc.code, exc.reason) from None
        if check:
            if msg.request != req or not msg.is_reply:
                for fd in msg.fds:
                    os.close(fd)
                raise FrontendError(req, -1, f"unexpected reply {msg!r}")
            if need_reply and not has_reply:
                if len(msg.payload) != 8:
                    raise FrontendError(req, -1, f"ack of {len(msg.payload)} bytes")
                code = msg.u64()
                if code:
                    for fd in msg.fds:
                        os.close(fd)
                    raise FrontendError(req, code)
        return msg

    def _get_u64(self, req: int) -> int:
        msg = self.request(req)
        assert msg is not None
        if len(msg.payload) != 8:
            raise FrontendError(req, -1, f"reply of {len(msg.payload)} bytes")
        return msg.u64()

    def _set_u64(self, req: int, value: int, fds: Sequence[int] = ()) -> None:
        self.request(req, pack_u64(value), fds)

    # -- negotiation --------------------------------------------------------------------
    def negotiate(self, vring_bases: Optional[Dict[int, int]] = None) -> None:
        """QEMU's start-up sequence: GET_FEATURES, GET/SET_PROTOCOL_FEATURES
        (when offered), GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (mem slots),
        SET_OWNER, SET_FEATURES, SET_STATUS (STATUS), SET_BACKEND_REQ_FD
        (BACKEND_REQ), GET/SET_INFLIGHT_FD (INFLIGHT_SHMFD and an area held
        or ``inflight`` asked), the memory table (SET_MEM_TABLE or one
        ADD_MEM_REG per region), then per virtqueue SET_VRING_NUM,
        SET_VRING_BASE (``vring_bases[q]`` or 0), SET_VRING_ADDR,
        SET_VRING_CALL, SET_VRING_ERR, SET_VRING_KICK and SET_VRING_ENABLE(1)
        (when PROTOCOL_FEATURES was negotiated), then SET_STATUS with
        DRIVER_OK.  Raises :class:`FrontendError` on a refused request or
        when the back-end offers fewer queues or slots than needed."""
        for _step in self.negotiation(vring_bases):
            pass

    def negotiation(self, vring_bases: Optional[Dict[int, int]] = None) -> Iterator[int]:
        """:meth:`negotiate` one request at a time: yields the code of each
        request *before* sending it, and sends it when resumed.  Closing the
        generator instead (``break``) leaves the negotiation cut just before
        that request: a valid prefix of any length, for fuzzers.  Several
        steps may share a code (per queue); :attr:`negotiated` turns true
        only when the generator runs to its end."""
        self._require_sock()
        yield Request.GET_FEATURES
        self.offered_features = self._get_u64(Request.GET_FEATURES)
        self._reply_ack = False
        self.protocol_features = 0
        pf_offered = bool(self.offered_features & bit(P.VHOST_USER_F_PROTOCOL_FEATURES))
        if pf_offered:
            yield Request.GET_PROTOCOL_FEATURES
            self.offered_protocol_features = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = self.offered_protocol_features & self.wanted_protocol_features
            yield Request.SET_PROTOCOL_FEATURES
            self._set_u64(Request.SET_PROTOCOL_FEATURES, self.protocol_features)
            self._reply_ack = bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))
        if self.has_protocol(ProtocolFeature.MQ):
            yield Request.GET_QUEUE_NUM
            self.max_queues = self._get_u64(Request.GET_QUEUE_NUM)
            if self.max_queues < self.num_queues:
                raise FrontendError(Request.GET_QUEUE_NUM, -1,
                                    f"back-end supports {self.max_queues} queues, "
                                    f"{self.num_queues} wanted")
        elif self.queue_pairs > 1:
            raise FrontendError(Request.GET_QUEUE_NUM, -1, "several queue pairs need protocol MQ")
        slots = self.use_mem_slots and self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if slots:
            yield Request.GET_MAX_MEM_SLOTS
            self.max_mem_slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
            if self.max_mem_slots < len(self.region_descs):
                raise FrontendError(Request.GET_MAX_MEM_SLOTS, -1,
                                    f"{self.max_mem_slots} slots for {len(self.region_descs)} regions")
        elif len(self.region_descs) > P.MEMORY_BASELINE_NREGIONS:
            raise FrontendError(Request.SET_MEM_TABLE, -1,
                                f"{len(self.region_descs)} regions need CONFIGURE_MEM_SLOTS")
        yield Request.SET_OWNER
        self.request(Request.SET_OWNER)
        self.features = self.offered_features & self.wanted_features
        yield Request.SET_FEATURES
        self.set_features(self.features)
        if self.has_protocol(ProtocolFeature.STATUS):
            yield Request.SET_STATUS
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if self.has_protocol(ProtocolFeature.BACKEND_REQ):
            yield Request.SET_BACKEND_REQ_FD
            self._setup_backend_channel()
        if self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            if self.inflight_fd < 0 and self.want_inflight:
                yield Request.GET_INFLIGHT_FD
                self.get_inflight_fd()
            if self.inflight_fd >= 0:
                yield Request.SET_INFLIGHT_FD
                self.set_inflight_fd()
        if slots:
            for desc, fd in zip(self.region_descs, self.region_fds):
                yield Request.ADD_MEM_REG
                self.request(Request.ADD_MEM_REG, MemRegMsg(desc).pack(), [fd])
        else:
            yield Request.SET_MEM_TABLE
            self.request(Request.SET_MEM_TABLE, MemoryTable(tuple(self.region_descs)).pack(),
                         self.region_fds)
        event_idx = bool(self.features & bit(P.VIRTIO_RING_F_EVENT_IDX))
        bases = vring_bases or {}
        for q, vq in enumerate(self.queues):
            vq.event_idx = event_idx
            yield Request.SET_VRING_NUM
            self.request(Request.SET_VRING_NUM, VringState(q, vq.size).pack())
            yield Request.SET_VRING_BASE
            self.request(Request.SET_VRING_BASE, VringState(q, bases.get(q, 0)).pack())
            yield Request.SET_VRING_ADDR
            self.set_vring_addr(q, log=False)
            yield Request.SET_VRING_CALL
            self.request(Request.SET_VRING_CALL, pack_u64(q), [self.call_fds[q]])
            yield Request.SET_VRING_ERR
            self.request(Request.SET_VRING_ERR, pack_u64(q), [self.err_fds[q]])
            yield Request.SET_VRING_KICK
            self.request(Request.SET_VRING_KICK, pack_u64(q), [self.kick_fds[q]])
            if pf_offered and self.features & bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
                yield Request.SET_VRING_ENABLE
                self.set_vring_enable(q, True)
        if self.has_protocol(ProtocolFeature.STATUS):
            yield Request.SET_STATUS
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        self.negotiated = True

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated (every request then gets an answer
        when it sets NEED_REPLY)."""
        return self._reply_ack

    def has_feature(self, n: int) -> bool:
        """Whether virtio/vhost feature bit ``n`` was negotiated."""
        return bool(self.features >> n & 1)

    def has_protocol(self, n: int) -> bool:
        """Whether protocol feature bit ``n`` was negotiated."""
        return bool(self.protocol_features >> n & 1)

    @property
    def hdr_len(self) -> int:
        """virtio_net_hdr size: 12 with VERSION_1 or MRG_RXBUF, else 10."""
        if self.features & (bit(P.VIRTIO_F_VERSION_1) | bit(P.VIRTIO_NET_F_MRG_RXBUF)):
            return 12
        return 10

    def reconnect(self, path: Optional[str] = None, sock: Optional[socket.socket] = None,
                  vring_bases: Optional[Dict[int, int]] = None) -> None:
        """Drop the connection and negotiate again on a new one (``path``
        or ``sock``), keeping guest memory, rings, eventfds and the inflight
        area (sent again with SET_INFLIGHT_FD).  Each ring restarts at
        ``vring_bases[q]``, by default the used ring's idx in guest memory
        (what QEMU restores when the old back-end cannot answer
        GET_VRING_BASE)."""
        bases = dict(vring_bases) if vring_bases is not None else {
            q: vq.used_idx for q, vq in enumerate(self.queues)}
        self._disconnect()
        if sock is None:
            if path is None:
                raise ValueError("reconnect needs a path or a socket")
            sock = self._connect(path)
        self._attach(sock)
        self.negotiated = False
        self.negotiate(bases)

    def _disconnect(self) -> None:
        self._stop_backend_channel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in self._reader.pending_fds():
            os.close(fd)
        self._reader = MessageReader()

    # -- back-end request channel ----------------------------------------------------
    def _setup_backend_channel(self) -> None:
        self._stop_backend_channel()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._breq_sock = ours
        self._breq_stop = eventfd()
        self._breq_thread = threading.Thread(target=self._serve_backend, name="shardvu-breq",
                                             daemon=True)
        self._breq_thread.start()

    def _stop_backend_channel(self) -> None:
        if self._breq_thread is not None:
            signal(self._breq_stop)
            self._breq_thread.join(5)
            self._breq_thread = None
        if self._breq_stop >= 0:
            os.close(self._breq_stop)
            self._breq_stop = -1
        if self._breq_sock is not None:
            self._breq_sock.close()
            self._breq_sock = None

    def _serve_backend(self) -> None:
        sock = self._breq_sock
        assert sock is not None
        reader = MessageReader()
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._breq_stop, select.POLLIN)
        sock.settimeout(self.timeout)
        while True:
            events = dict(poller.poll())
            if self._breq_stop in events:
                return
            try:
                data, fds = recv_with_fds(sock, _RECV_SIZE)
            except OSError:
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            reader.feed(data, fds)
            while True:
                try:
                    msg = reader.next_message()
                except P.ProtocolError:
                    for fd in reader.pending_fds():
                        os.close(fd)
                    return
                if msg is None:
                    break
                self._handle_backend_request(msg)
                if msg.need_reply:
                    try:
                        sock.sendall(P.encode(msg.request, pack_u64(0), P.VERSION | P.FLAG_REPLY))
                    except OSError:
                        return

    def _handle_backend_request(self, msg: Message) -> None:
        try:
            code: int = BackendRequest(msg.request)
        except ValueError:
            code = msg.request
        with self._lock:
            self.backend_requests[code] = self.backend_requests.get(code, 0) + 1
            if msg.request in (BackendRequest.VRING_CALL, BackendRequest.VRING_ERR) \
                    and len(msg.payload) == 8:
                q = VringState.unpack(msg.payload).index
                if msg.request == BackendRequest.VRING_CALL and 0 <= q < self.num_queues:
                    self._calls[q] += 1
                elif msg.request == BackendRequest.VRING_ERR:
                    self.vring_errors[q] = self.vring_errors.get(q, 0) + 1
        for fd in msg.fds:
            os.close(fd)

    def backend_request_count(self, req: int) -> int:
        """How many back-end requests of code ``req`` arrived."""
        with self._lock:
            return self.backend_requests.get(int(req), 0)

    # -- per-request helpers -------------------------------------------------------------
    def set_features(self, features: int) -> None:
        """SET_FEATURES (e.g. to toggle VHOST_F_LOG_ALL); records them."""
        self._set_u64(Request.SET_FEATURES, features)
        self.features = features

    def set_status(self, status: int) -> None:
        self._set_u64(Request.SET_STATUS, status)

    def get_status(self) -> int:
        return self._get_u64(Request.GET_STATUS)

    def reset_device(self) -> None:
        self.request(Request.RESET_DEVICE)

    def get_vring_base(self, q: int) -> int:
        """GET_VRING_BASE: stops ring ``q`` and returns its next avail index."""
        msg = self.request(Request.GET_VRING_BASE, VringState(q, 0).pack())
        assert msg is not None
        try:
            return VringState.unpack(msg.payload).num
        except struct.error:
            raise FrontendError(Request.GET_VRING_BASE, -1, "malformed reply") from None

    def set_vring_enable(self, q: int, on: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, VringState(q, 1 if on else 0).pack())

    def set_vring_addr(self, q: int, log: bool = False) -> None:
        """SET_VRING_ADDR with front-end virtual addresses; ``log`` sets
        VHOST_VRING_F_LOG (log_guest_addr is the used ring's gpa)."""
        vq = self.queues[q]
        addr = VringAddr(q, (1 << P.VHOST_VRING_F_LOG) if log else 0, self.gpa_to_uva(vq.desc_gpa),
                         self.gpa_to_uva(vq.used_gpa), self.gpa_to_uva(vq.avail_gpa), vq.used_gpa)
        self.request(Request.SET_VRING_ADDR, addr.pack())

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG; a zero-length reply (the back-end's error) raises."""
        msg = self.request(Request.GET_CONFIG, ConfigMsg(offset, size, 0, bytes(size)).pack())
        assert msg is not None
        if not msg.payload:
            raise FrontendError(Request.GET_CONFIG, -1, "back-end refused")
        try:
            return ConfigMsg.unpack(msg.payload).data
        except (P.ProtocolError, struct.error) as exc:
            raise FrontendError(Request.GET_CONFIG, -1, f"malformed reply: {exc}") from None

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(Request.SET_CONFIG, ConfigMsg(offset, len(data), flags, bytes(data)).pack())

    def set_log_base(self, size: Optional[int] = None) -> DirtyLog:
        """Create a memfd dirty log (default: one bit per page of guest
        memory, rounded up to 8 bytes) and send it with SET_LOG_BASE.
        Replaces (and closes) a previous log."""
        if size is None:
            end = max(r.gpa + r.size for r in self.region_descs)
            size = ((end // P.VHOST_LOG_PAGE + 7) // 8 + 7) & ~7
        fd = os.memfd_create("shardvu-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        log = DirtyLog(fd, size, 0)   # owns fd from here
        try:
            self.request(Request.SET_LOG_BASE, LogArea(size, 0).pack(), [fd])
        except BaseException:
            log.close()
            raise
        if self.log is not None:
            self.log.close()
        self.log = log
        return log

    def get_inflight_fd(self, num_queues: Optional[int] = None,
                        queue_size: Optional[int] = None) -> InflightDesc:
        """GET_INFLIGHT_FD: keep the returned fd and map it
        (:attr:`inflight_view`).  Replaces a previous area."""
        nq = self.num_queues if num_queues is None else num_queues
        qs = self.queue_size if queue_size is None else queue_size
        msg = self.request(Request.GET_INFLIGHT_FD, InflightDesc(0, 0, nq, qs).pack())
        assert msg is not None
        fds = msg.fds
        try:
            desc = InflightDesc.unpack(msg.payload)
            if len(fds) != 1:
                raise FrontendError(Request.GET_INFLIGHT_FD, -1, f"reply carried {len(fds)} fds")
        except struct.error:
            for fd in fds:
                os.close(fd)
            raise FrontendError(Request.GET_INFLIGHT_FD, -1, "malformed reply") from None
        except FrontendError:
            for fd in fds:
                os.close(fd)
            raise
        self._close_inflight()
        self.inflight_fd = fds[0]
        self.inflight_desc = desc
        if desc.mmap_size:
            self._inflight_mm = mmap.mmap(self.inflight_fd, desc.mmap_size + desc.mmap_offset,
                                          flags=mmap.MAP_SHARED,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.inflight_view = memoryview(self._inflight_mm)[desc.mmap_offset:]
        return desc

    def set_inflight_fd(self, desc: Optional[InflightDesc] = None, fd: Optional[int] = None) -> None:
        """SET_INFLIGHT_FD with the area from :meth:`get_inflight_fd` (or
        the given ``desc``/``fd``)."""
        desc = desc if desc is not None else self.inflight_desc
        fd = fd if fd is not None else self.inflight_fd
        if desc is None or fd is None or fd < 0:
            raise ValueError("no inflight area: call get_inflight_fd first")
        self.request(Request.SET_INFLIGHT_FD, desc.pack(), [fd])

    def _close_inflight(self) -> None:
        if self.inflight_view is not None:
            self.inflight_view.release()
            self.inflight_view = None
        if self._inflight_mm is not None:
            try:
                self._inflight_mm.close()
            except BufferError:
                pass
            self._inflight_mm = None
        if self.inflight_fd >= 0:
            os.close(self.inflight_fd)
            self.inflight_fd = -1
        self.inflight_desc = None

    # -- notifications ---------------------------------------------------------------------
    def kick(self, q: int) -> None:
        """Signal virtqueue ``q``'s kick eventfd."""
        signal(self.kick_fds[q])
        self.kicks[q] += 1

    def calls(self, q: int) -> int:
        """Total call notifications seen on ``q`` so far (eventfd counts plus
        in-band VRING_CALL messages); drains the call eventfd."""
        n = drain(self.call_fds[q])
        with self._lock:
            self._calls[q] += n
            return self._calls[q]

    def errors(self, q: int) -> int:
        """Drain ``q``'s err eventfd; returns its counter (0 if quiet)."""
        return drain(self.err_fds[q])

    def _wait_call(self, q: int, timeout: float) -> None:
        p = select.poll()
        p.register(self.call_fds[q], select.POLLIN)
        p.poll(max(0, int(timeout * 1000)))
        self.calls(q)

    # -- traffic -------------------------------------------------------------------------------
    def _kick_if_needed(self, q: int) -> None:
        if self.queues[q].kick_needed():
            self.kick(q)
        else:
            self.suppressed_kicks[q] += 1

    def send(self, pair: int, frames: Iterable[bytes], kick: bool = True,
             indirect: Optional[bool] = None, split_header: bool = False,
             header: Optional[bytes] = None) -> int:
        """Queue each frame (after a zeroed virtio_net_hdr, or ``header``) on TX queue
        ``2*pair+1``, publish, and kick unless the device suppressed it.
        A frame larger than ``tx_buf_size`` spans several descriptors
        (indirect when negotiated, or as ``indirect`` says).  Reclaims used
        TX buffers first when the ring is full; returns how many frames were
        queued (fewer when the ring stays full)."""
        q = 2 * pair + 1
        vq = self.queues[q]
        use_indirect_default = self.has_feature(P.VIRTIO_RING_F_INDIRECT_DESC)
        hdr = bytes(self.hdr_len) if header is None else header
        count = 0
        for frame in frames:
            parts = [hdr, bytes(frame)] if split_header else [hdr + bytes(frame)]
            chunks: List[Tuple[int, int]] = []
            bufs: List[int] = []
            for part in parts:
                for off in range(0, max(len(part), 1), self.tx_buf_size):
                    piece = part[off:off + self.tx_buf_size]
                    gpa = self._tx_pool.get()
                    self.write(gpa, piece)
                    bufs.append(gpa)
                    chunks.append((gpa, len(piece)))
            ind = (use_indirect_default and len(chunks) > 1) if indirect is None else indirect
            need = 1 if ind else len(chunks)
            if vq.num_free < need:
                self.reclaim_tx(pair)
            try:
                head = vq.add(chunks, (), indirect=ind)
            except QueueFull:
                for gpa in bufs:
                    self._tx_pool.put(gpa)
                break
            self._tx_bufs[(q, head)] = bufs
            count += 1
        vq.publish()
        if kick:
            self._kick_if_needed(q)
        return count

    def reclaim_tx(self, pair: int) -> int:
        """Collect used TX chains of ``pair``; returns how many."""
        q = 2 * pair + 1
        used = self._get_used(q)
        for head, _len in used:
            for gpa in self._tx_bufs.pop((q, head), ()):
                self._tx_pool.put(gpa)
        return len(used)

    def _get_used(self, q: int) -> List[Tuple[int, int]]:
        try:
            return self.queues[q].get_used()
        except DriverError as exc:
            raise FrontendError(Request.NONE, -1, f"queue {q}: {exc}") from None

    def post_rx(self, pair: int, count: int, buf_size: int = 2048, kick: bool = True) -> int:
        """Post ``count`` device-writable buffers of ``buf_size`` bytes on RX
        queue ``2*pair``; returns how many fit in the ring."""
        q = 2 * pair
        vq = self.queues[q]
        pool = self._rx_pools.get(buf_size)
        if pool is None:
            pool = self._rx_pools[buf_size] = _Pool(self, buf_size)
        self._rx_size[q] = buf_size
        n = 0
        for _ in range(count):
            if not vq.num_free:
                break
            gpa = pool.get()
            head = vq.add((), [(gpa, buf_size)])
            self._rx_bufs[(q, head)] = (gpa, buf_size)
            n += 1
        if n:
            vq.publish()
            if kick:
                self._kick_if_needed(q)
        return n

    def receive(self, pair: int, timeout: float = 1.0, min_frames: int = 1,
                keep_header: bool = False) -> List[bytes]:
        """Frames the device wrote into RX queue ``2*pair`` (net header
        stripped unless ``keep_header``, MRG_RXBUF buffers merged), re-posting a buffer for each
        one consumed.  Waits up to ``timeout`` for ``min_frames`` frames,
        sleeping on the call eventfd with notifications enabled; returns
        what it has (possibly nothing) when time runs out."""
        q = 2 * pair
        vq = self.queues[q]
        frames: List[bytes] = []
        deadline = time.monotonic() + timeout
        mrg = self.has_feature(P.VIRTIO_NET_F_MRG_RXBUF)
        hlen = self.hdr_len
        while True:
            consumed = 0
            for head, length in self._get_used(q):
                gpa, size = self._rx_bufs.pop((q, head), (None, 0))
                if gpa is None:
                    continue
                self._rx_pending[q].append((gpa, size, min(length, size)))
            pending = self._rx_pending[q]
            while pending:
                gpa, size, length = pending[0]
                nbuf = 1
                if mrg and length >= hlen:
                    nbuf = _NET_HDR.unpack(self.read(gpa, 12))[6]
                    if nbuf == 0:       # strict, unlike DPDK's and Linux's drivers
                        raise ValueError(f"queue {q}: device wrote num_buffers 0 with MRG_RXBUF")
                if len(pending) < nbuf:
                    break
                data = bytearray()
                for i in range(nbuf):
                    g, s, n = pending[i]
                    data += self.read(g, n)
                    self._rx_pools[s].put(g)
                del pending[:nbuf]
                consumed += nbuf
                frames.append(bytes(data if keep_header else data[hlen:]))
            if consumed:
                self.post_rx(pair, consumed, self._rx_size[q])
            if len(frames) >= min_frames:
                return frames
            left = deadline - time.monotonic()
            if left <= 0:
                return frames
            if vq.enable_interrupts():
                continue
            self._wait_call(q, min(left, 0.05))

    # -- teardown ---------------------------------------------------------------------------
    def _close_memory(self) -> None:
        self.mem.close()
        for fd in self.region_fds:
            os.close(fd)
        self.region_fds = []

    def close(self) -> None:
        """Close every fd this front-end made or holds.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._disconnect()
        for fd in self.kick_fds + self.call_fds + self.err_fds:
            os.close(fd)
        self.kick_fds, self.call_fds, self.err_fds = [], [], []
        if self.log is not None:
            self.log.close()
            self.log = None
        self._close_inflight()
        for vq in self.queues:
            vq.close()
        self._close_memory()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

