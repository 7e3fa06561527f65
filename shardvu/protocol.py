"""vhost-user wire format: constants, payload codecs and a sans-IO message reader.

Nothing here touches a socket.  Bytes and file descriptors go in
(:meth:`MessageReader.feed`), :class:`Message` objects come out; replies are
built with :func:`encode`.  All numbers are little-endian (the machine byte
order of every platform shardvu runs on).

Names follow the current spec (front-end/back-end).  The seed's ``SLAVE``
names survive only as aliases at the bottom of this module.
"""
from __future__ import annotations

import enum
import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "Request", "BackendRequest", "ProtocolFeature", "ProtocolError",
    "Message", "MessageReader", "encode", "HEADER_SIZE", "VERSION",
    "FLAG_REPLY", "FLAG_NEED_REPLY", "VringState", "VringAddr",
    "MemoryRegion", "MemoryTable", "MemRegMsg", "LogArea", "ConfigMsg",
    "VringArea", "InflightDesc", "IotlbMsg",
]

# --- header ---------------------------------------------------------------
HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size            # 12
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

#: Most fds one message may carry (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8
MEMORY_BASELINE_NREGIONS = 8
#: Largest config-space payload (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Largest payload any request carries; bigger ``size`` fields are hostile.
MAX_PAYLOAD = 4096

VHOST_LOG_PAGE = 4096
VIRTQUEUE_MAX_SIZE = 1024
#: Memory slots offered through GET_MAX_MEM_SLOTS.
MAX_MEM_SLOTS = 509

# --- virtio / vhost feature bits (device features, GET_FEATURES) ----------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_IOMMU_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

#: VHOST_VRING_F_LOG: log writes to this ring's used ring (vring addr flags).
VHOST_VRING_F_LOG = 0


class Request(enum.IntEnum):
    """Front-end → back-end requests (VhostUserRequest plus newer ids)."""
    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end → front-end requests on the SET_BACKEND_REQ_FD channel."""
    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol feature mask."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def bit(n: int) -> int:
    """``1 << n``, for feature masks."""
    return 1 << n


class ProtocolError(Exception):
    """A message violates the wire format.  ``request`` is the request code
    (or None when the header itself could not be read)."""

    def __init__(self, reason: str, request: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        self.request = request


def request_name(code: int) -> str:
    """Readable name of a front-end request code, for logs."""
    try:
        return Request(code).name
    except ValueError:
        return f"UNKNOWN({code})"


# --- payloads -------------------------------------------------------------
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MEM_HDR = struct.Struct("<II")
_LOG = struct.Struct("<QQ")
_CONFIG_HDR = struct.Struct("<III")
_AREA = struct.Struct("<QQQ")
_INFLIGHT = struct.Struct("<QQHH4x")    # 24 bytes: the C struct's padding
_IOTLB = struct.Struct("<QQQBB6x")      # 32 bytes: struct vhost_iotlb_msg


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(payload: bytes) -> int:
    return _U64.unpack(payload)[0]


class VringState(NamedTuple):
    """``struct vhost_vring_state``: vring index and a number."""
    index: int
    num: int

    def pack(self) -> bytes:
        return _STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, payload: bytes) -> "VringState":
        return cls(*_STATE.unpack(payload))


class VringAddr(NamedTuple):
    """``struct vhost_vring_addr``: ring addresses in front-end virtual
    address space; ``log`` is the used ring's guest-physical address."""
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def pack(self) -> bytes:
        return _ADDR.pack(*self)

    @classmethod
    def unpack(cls, payload: bytes) -> "VringAddr":
        return cls(*_ADDR.unpack(payload))


class MemoryRegion(NamedTuple):
    """One guest memory region as the front-end describes it."""
    gpa: int
    size: int
    uva: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _REGION.pack(*self)

    @classmethod
    def unpack(cls, payload: bytes, offset: int = 0) -> "MemoryRegion":
        return cls(*_REGION.unpack_from(payload, offset))


class MemoryTable(NamedTuple):
    """SET_MEM_TABLE payload: up to eight regions, one fd each."""
    regions: Tuple[MemoryRegion, ...]

    def pack(self) -> bytes:
        return _MEM_HDR.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, payload: bytes) -> "MemoryTable":
        n, _pad = _MEM_HDR.unpack_from(payload)
        if n > MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(f"{n} regions exceed {MEMORY_BASELINE_NREGIONS}", Request.SET_MEM_TABLE)
        if len(payload) != _MEM_HDR.size + n * _REGION.size:
            raise ProtocolError(f"size {len(payload)} does not match {n} regions", Request.SET_MEM_TABLE)
        return cls(tuple(MemoryRegion.unpack(payload, _MEM_HDR.size + i * _REGION.size) for i in range(n)))


class MemRegMsg(NamedTuple):
    """ADD_MEM_REG / REM_MEM_REG payload: 8 bytes of padding then a region."""
    region: MemoryRegion

    def pack(self) -> bytes:
        return _U64.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, payload: bytes) -> "MemRegMsg":
        return cls(MemoryRegion.unpack(payload, 8))


class LogArea(NamedTuple):
    """SET_LOG_BASE payload: size and offset of the dirty log in its fd."""
    mmap_size: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _LOG.pack(*self)

    @classmethod
    def unpack(cls, payload: bytes) -> "LogArea":
        return cls(*_LOG.unpack(payload))


class ConfigMsg(NamedTuple):
    """GET_CONFIG / SET_CONFIG payload: offset, size, flags, then ``size`` bytes."""
    offset: int
    size: int
    flags: int
    data: bytes

    def pack(self) -> bytes:
        return _CONFIG_HDR.pack(self.offset, self.size, self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: bytes) -> "ConfigMsg":
        offset, size, flags = _CONFIG_HDR.unpack_from(payload)
        if size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config size {size} exceeds {MAX_CONFIG_SIZE}")
        if len(payload) != _CONFIG_HDR.size + size:
            raise ProtocolError(f"config payload of {len(payload)} bytes does not hold size {size}")
        return cls(offset, size, flags, bytes(payload[_CONFIG_HDR.size:]))


class VringArea(NamedTuple):
    """VRING_HOST_NOTIFIER payload: queue index (``u64``), mmap size and offset."""
    u64: int
    size: int
    offset: int

    def pack(self) -> bytes:
        return _AREA.pack(*self)

    @classmethod
    def unpack(cls, payload: bytes) -> "VringArea":
        return cls(*_AREA.unpack(payload))


class InflightDesc(NamedTuple):
    """GET/SET_INFLIGHT_FD payload."""
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        return _INFLIGHT.pack(*self)

    @classmethod
    def unpack(cls, payload: bytes) -> "InflightDesc":
        return cls(*_INFLIGHT.unpack(payload))


class IotlbMsg(NamedTuple):
    """``struct vhost_iotlb_msg``."""
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def pack(self) -> bytes:
        return _IOTLB.pack(*self)

    @classmethod
    def unpack(cls, payload: bytes) -> "IotlbMsg":
        return cls(*_IOTLB.unpack(payload))


# Exact payload sizes per request ("var" = checked by the payload decoder).
_NONE, _VAR = 0, -1
PAYLOAD_SIZE = {
    Request.GET_FEATURES: _NONE,
    Request.SET_FEATURES: _U64.size,
    Request.SET_OWNER: _NONE,
    Request.RESET_OWNER: _NONE,
    Request.SET_MEM_TABLE: _VAR,
    Request.SET_LOG_BASE: _LOG.size,
    Request.SET_LOG_FD: _NONE,
    Request.SET_VRING_NUM: _STATE.size,
    Request.SET_VRING_ADDR: _ADDR.size,
    Request.SET_VRING_BASE: _STATE.size,
    Request.GET_VRING_BASE: _STATE.size,
    Request.SET_VRING_KICK: _U64.size,
    Request.SET_VRING_CALL: _U64.size,
    Request.SET_VRING_ERR: _U64.size,
    Request.GET_PROTOCOL_FEATURES: _NONE,
    Request.SET_PROTOCOL_FEATURES: _U64.size,
    Request.GET_QUEUE_NUM: _NONE,
    Request.SET_VRING_ENABLE: _STATE.size,
    Request.SEND_RARP: _U64.size,
    Request.NET_SET_MTU: _U64.size,
    Request.SET_BACKEND_REQ_FD: _NONE,
    Request.IOTLB_MSG: _IOTLB.size,
    Request.SET_VRING_ENDIAN: _STATE.size,
    Request.GET_CONFIG: _VAR,
    Request.SET_CONFIG: _VAR,
    Request.CREATE_CRYPTO_SESSION: _VAR,
    Request.CLOSE_CRYPTO_SESSION: _U64.size,
    Request.POSTCOPY_ADVISE: _NONE,
    Request.POSTCOPY_LISTEN: _NONE,
    Request.POSTCOPY_END: _NONE,
    Request.GET_INFLIGHT_FD: _INFLIGHT.size,
    Request.SET_INFLIGHT_FD: _INFLIGHT.size,
    Request.GPU_SET_SOCKET: _NONE,
    Request.RESET_DEVICE: _NONE,
    Request.VRING_KICK: _STATE.size,
    Request.GET_MAX_MEM_SLOTS: _NONE,
    Request.ADD_MEM_REG: _U64.size + _REGION.size,
    Request.REM_MEM_REG: _U64.size + _REGION.size,
    Request.SET_STATUS: _U64.size,
    Request.GET_STATUS: _NONE,
}


class Message:
    """One vhost-user message: header fields, raw payload and the fds that
    arrived with it.  The receiver owns ``fds`` and must close each one it
    does not keep."""

    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int = VERSION, payload: bytes = b"",
                 fds: Sequence[int] = ()):
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds: List[int] = list(fds)

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def u64(self) -> int:
        return unpack_u64(self.payload)

    def __repr__(self) -> str:
        return (f"Message({self.name}, flags={self.flags:#x}, "
                f"size={len(self.payload)}, fds={self.fds})")


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """Header plus payload, ready to send (fds travel separately)."""
    return HEADER.pack(int(request), flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """A reply to ``request``: version 1 with the reply flag set."""
    return encode(request, payload, VERSION | FLAG_REPLY)


def validate_size(msg: Message) -> None:
    """Raise :class:`ProtocolError` unless the payload size fits the request.

    Every code, including 0 and any code outside :class:`Request` or absent
    from :data:`PAYLOAD_SIZE`, gets a ProtocolError naming it; nothing else
    is raised."""
    try:
        req = Request(msg.request)
    except ValueError:
        raise ProtocolError("unknown request code", msg.request) from None
    want = PAYLOAD_SIZE.get(req)
    if want is None:        # NONE (0): a code with no request behind it
        raise ProtocolError(f"request code {msg.request} is not a front-end request", msg.request)
    size = len(msg.payload)
    if want == _VAR:
        if req == Request.SET_MEM_TABLE:
            if size < _MEM_HDR.size:
                raise ProtocolError(f"size {size} too small for a memory table", req)
            MemoryTable.unpack(msg.payload)
        elif req in (Request.GET_CONFIG, Request.SET_CONFIG):
            if size < _CONFIG_HDR.size:
                raise ProtocolError(f"size {size} too small for a config payload", req)
            try:
                ConfigMsg.unpack(msg.payload)
            except ProtocolError as exc:
                raise ProtocolError(exc.reason, req) from None
    elif size != want:
        raise ProtocolError(f"payload size {size}, expected {want}", req)


class MessageReader:
    """Reassembles messages from a byte stream (sans-IO).

    Feed it what each ``recvmsg`` returned: the bytes and any fds that came
    with them.  On a Unix stream socket the kernel ends a read right after
    the data that carried fds, and front-ends send a message's fds with its
    bytes in one ``sendmsg``; so the fds of a read belong to the message
    whose bytes end that read (or that is still incomplete there).  The
    reader attaches them to the message spanning that stream position,
    even when one read holds several messages.

    Contract: :meth:`next_message` returns a complete :class:`Message`, or
    ``None`` when more bytes are needed.  A header whose ``size`` exceeds
    :data:`MAX_PAYLOAD` or whose version is not 1 raises
    :class:`ProtocolError`; after that the stream cannot be resynchronised
    and the caller must drop the connection (closing :meth:`pending_fds`).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0          # stream offset of _buf[0]
        # (stream offset where the read carrying them ended, fds), in order
        self._marks: List[Tuple[int, List[int]]] = []

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._buf += data
        if fds:
            self._marks.append((self._pos + len(self._buf), list(fds)))

    def next_message(self) -> Optional[Message]:
        if len(self._buf) < HEADER_SIZE:
            return None
        request, flags, size = HEADER.unpack_from(self._buf)
        if flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"bad version in flags {flags:#x}", request)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"payload size {size} exceeds {MAX_PAYLOAD}", request)
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._pos += end
        fds: List[int] = []
        while self._marks and self._marks[0][0] <= self._pos:
            fds.extend(self._marks.pop(0)[1])
        return Message(request, flags, payload, fds)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a message (a truncated header or payload)."""
        return len(self._buf)

    def pending_fds(self) -> List[int]:
        """Take the fds received but not yet attached to a message."""
        fds = [fd for _, group in self._marks for fd in group]
        self._marks = []
        return fds


# Seed (libvhost-user.h) names, kept as aliases only.
Request.SET_SLAVE_REQ_FD = Request.SET_BACKEND_REQ_FD  # type: ignore[attr-defined]
SlaveRequest = BackendRequest
ProtocolFeature.SLAVE_REQ = ProtocolFeature.BACKEND_REQ  # type: ignore[attr-defined]
ProtocolFeature.SLAVE_SEND_FD = ProtocolFeature.BACKEND_SEND_FD  # type: ignore[attr-defined]
