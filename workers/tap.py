"""A multi-queue Linux tap: the kernel side of ``--port tap:IFNAME``.

:class:`Tap` opens (or creates) ``IFNAME`` with IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR | IFF_MULTI_QUEUE and holds one queue fd per virtio queue pair.
The control process owns the object and its fds; each pair's two workers get
copies of pair *i*'s fd (so a dead worker neither detaches the queue nor
destroys a non-persistent tap).

Queue mapping (both directions use tap queue *i* for pair *i*):

* guest TX ring ``2i+1`` → ``write``/``writev`` on queue fd *i* (the frame
  with the guest's virtio-net header in front, as it is) → the kernel
  receives it on the tap (the tap's ``rx_packets``);
* the kernel transmits on the tap (``tx_packets``), choosing one of the
  attached queues by flow hash → ``read`` on queue fd *i* (header + frame)
  → guest RX ring ``2i``.

A pair whose rings are both disabled is detached (TUNSETQUEUE with
IFF_DETACH_QUEUE), so the kernel hands it no traffic; enabling either ring
attaches it again (:meth:`Tap.set_queue_attached`).

Created or attached: if ``IFNAME`` does not exist it is created, brought up,
and it disappears when the last queue fd closes (it is not persistent; the
control process's exit closes them).  An existing tap (``ip tuntap add dev
IFNAME mode tap multi_queue vnet_hdr``) is attached to and left in place; its
flags are checked with TUNGETIFF, and one without IFF_VNET_HDR or without
IFF_MULTI_QUEUE is refused with :class:`TapError`.

Offloads, tap → guest: :func:`tun_offload_flags` maps the negotiated GUEST_*
bits to TUNSETOFFLOAD flags; :meth:`Tap.configure` sets them and
TUNSETVNETHDRSZ (the negotiated header size) on the device.

Runs on CPython >= 3.9 and PyPy 3.9 (worker code): PyPy has no
``os.readv``/``os.writev``, so :func:`readv`/:func:`writev` go through cffi
(built into PyPy) there.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import List, Optional, Sequence

__all__ = ["Tap", "TapError", "check_ifname", "tun_offload_flags", "readv", "writev",
           "interface_exists", "link_stats", "link_address", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6",
           "TUN_F_TSO_ECN", "TUN_F_UFO"]

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
# <linux/sockios.h>, <net/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16

TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
_IFREQ = struct.Struct("16sH22x")       # struct ifreq: name, ifr_flags, padding

# virtio-net feature bits (kept here so worker code needs no shardvu.protocol)
_GUEST_CSUM, _GUEST_TSO4, _GUEST_TSO6, _GUEST_ECN, _GUEST_UFO = 1, 7, 8, 9, 10


class TapError(Exception):
    """The tap cannot be used as asked; the message is one line for the user."""


def check_ifname(name: str) -> None:
    """Raise TapError unless ``name`` is a valid Linux interface name: 1 to
    15 bytes, not ``.`` or ``..``, no ``/``, ``:``, ``%`` (a kernel name
    template) or whitespace."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise TapError("tap: empty interface name")
    if len(raw) >= IFNAMSIZ:
        raise TapError(f"tap: interface name {name!r} is {len(raw)} bytes long; "
                       f"the limit is {IFNAMSIZ - 1}")
    if name in (".", "..") or any(c in name for c in "/:%") or any(c.isspace() for c in name) \
            or "\0" in name:
        raise TapError(f"tap: invalid interface name {name!r}")


def tun_offload_flags(features: int) -> int:
    """TUNSETOFFLOAD flags for negotiated virtio-net ``features``: what the
    kernel may hand the guest (GUEST_CSUM → CSUM, GUEST_TSO4/6 → TSO4/6,
    GUEST_ECN → TSO_ECN, GUEST_UFO → UFO).  Without GUEST_CSUM nothing:
    the kernel refuses segmentation offloads without checksum offload."""
    if not features >> _GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    if features >> _GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if features >> _GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features >> _GUEST_ECN & 1:
        flags |= TUN_F_TSO_ECN
    if features >> _GUEST_UFO & 1:
        flags |= TUN_F_UFO
    return flags


def interface_exists(name: str) -> bool:
    """Does ``name`` exist in this process's network namespace?"""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


_STATS64 = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors",
            "rx_dropped", "tx_dropped", "multicast", "collisions")


def link_stats(name: str) -> dict:
    """The interface's kernel counters (rx_packets, tx_packets, rx_bytes,
    tx_bytes, rx_errors, tx_errors, rx_dropped, tx_dropped, ...) from
    rtnetlink's IFLA_STATS64, in this thread's network namespace.  Raises
    TapError if there is no such interface."""
    top = _getlink(name)
    if top is None or _IFLA_STATS64 not in top:
        raise TapError(f"tap: no interface {name}")
    vals = struct.unpack_from(f"{len(_STATS64)}Q", top[_IFLA_STATS64])
    return dict(zip(_STATS64, vals))


def link_address(name: str) -> bytes:
    """The interface's MAC address (6 bytes); TapError if there is none."""
    top = _getlink(name)
    if top is None or 1 not in top:
        raise TapError(f"tap: no interface {name}")
    return top[1]


def _tun_flags(name: str) -> Optional[int]:
    """The flags a tun/tap device was made with (IFF_TAP, IFF_VNET_HDR,
    IFF_MULTI_QUEUE), read with rtnetlink in this thread's network namespace;
    None if ``name`` is not a tun/tap device."""
    info = _link_info(name)
    if info is None or info.get("kind") != b"tun\0":
        return None
    data = info.get("data", {})
    flags = 0
    if data.get(_IFLA_TUN_TYPE) == IFF_TAP:
        flags |= IFF_TAP
    if data.get(_IFLA_TUN_VNET_HDR):
        flags |= IFF_VNET_HDR
    if data.get(_IFLA_TUN_MULTI_QUEUE):
        flags |= IFF_MULTI_QUEUE
    return flags


_RTM_GETLINK, _NLMSG_ERROR, _IFLA_IFNAME, _IFLA_LINKINFO = 18, 2, 3, 18
_IFLA_INFO_KIND, _IFLA_INFO_DATA, _IFLA_STATS64 = 1, 2, 23
_IFLA_TUN_TYPE, _IFLA_TUN_VNET_HDR, _IFLA_TUN_MULTI_QUEUE = 3, 5, 7


def _attrs(buf: bytes) -> dict:
    out = {}
    pos = 0
    while pos + 4 <= len(buf):
        ln, typ = struct.unpack_from("HH", buf, pos)
        if ln < 4:
            break
        out[typ & 0x3FFF] = buf[pos + 4:pos + ln]
        pos += (ln + 3) & ~3
    return out


def _getlink(name: str) -> Optional[dict]:
    """RTM_GETLINK for ``name``: its top-level attributes, or None if there
    is no such link."""
    raw = name.encode() + b"\0"
    attr = struct.pack("HH", 4 + len(raw), _IFLA_IFNAME) + raw + bytes(-len(raw) % 4)
    body = struct.pack("BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0) + attr
    msg = struct.pack("IHHII", 16 + len(body), _RTM_GETLINK, 1, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.send(msg)
        reply = s.recv(65536)
    ln, typ = struct.unpack_from("IH", reply, 0)
    if typ == _NLMSG_ERROR:
        return None
    return _attrs(reply[32:ln])


def _link_info(name: str) -> Optional[dict]:
    """IFLA_LINKINFO of ``name``: {"kind": bytes, "data": {attr: int}}, or
    None if there is no such link."""
    top = _getlink(name)
    if top is None:
        return None
    li = _attrs(top.get(_IFLA_LINKINFO, b""))
    out = {"kind": li.get(_IFLA_INFO_KIND, b""), "data": {}}
    for k, v in _attrs(li.get(_IFLA_INFO_DATA, b"")).items():
        out["data"][k] = int.from_bytes(v[:4], "little") if v else 0
    return out


def _ifreq(name: str, flags: int) -> bytes:
    return _IFREQ.pack(name.encode(), flags)


def _set_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _, flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name, 0)))
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, flags | IFF_UP))


class Tap:
    """The queue fds of one multi-queue tap.

    Contract: :meth:`open` returns a Tap whose ``fds[i]`` is queue *i*,
    non-blocking and attached, or raises TapError with a one-line message
    (nothing left open).  :meth:`close` closes every fd; a tap this object
    created then disappears, an attached one stays."""

    def __init__(self, name: str, fds: List[int], created: bool):
        self.name = name
        self.fds = fds
        self.created = created
        self.attached = [True] * len(fds)
        self.offload = 0
        self.hdr_size = 12

    @classmethod
    def open(cls, name: str, queues: int) -> "Tap":
        check_ifname(name)
        if queues < 1:
            raise TapError("tap: need at least one queue")
        existed = interface_exists(name)
        if existed:
            # the first queue attached would replace the flags it was made with
            made = _tun_flags(name)
            if made is None:
                raise TapError(f"tap: {name} exists and is not a tap")
            if not made & IFF_VNET_HDR or not made & IFF_MULTI_QUEUE or not made & IFF_TAP:
                raise TapError(f"tap: {name} was not made as a multi_queue vnet_hdr tap "
                               f"(`ip tuntap add dev {name} mode tap multi_queue vnet_hdr`)")
        fds: List[int] = []
        try:
            for _ in range(queues):
                fds.append(cls._open_queue(name, existed))
            flags = _IFREQ.unpack(fcntl.ioctl(fds[0], TUNGETIFF, _ifreq("", 0)))[1]
            if not flags & IFF_VNET_HDR:
                raise TapError(f"tap: {name} has no vnet_hdr (recreate it with "
                               f"`ip tuntap add dev {name} mode tap multi_queue vnet_hdr`)")
            if not flags & IFF_MULTI_QUEUE:
                raise TapError(f"tap: {name} is not multi_queue")
            if not existed:
                _set_up(name)
        except TapError:
            for fd in fds:
                os.close(fd)
            raise
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise TapError(f"tap: {name}: {exc.strerror}") from None
        return cls(name, fds, created=not existed)

    @staticmethod
    def _open_queue(name: str, existed: bool) -> int:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(f"tap: cannot open /dev/net/tun: {exc.strerror}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, TAP_FLAGS))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EPERM:
                what = "attach to" if existed else "create"
                raise TapError(f"tap: no permission to {what} {name} (needs CAP_NET_ADMIN"
                               f"{'' if not existed else ' or the tap owner'})") from None
            if exc.errno == errno.EINVAL and existed:
                raise TapError(f"tap: {name} exists but is not a multi_queue vnet_hdr tap "
                               f"(`ip tuntap add dev {name} mode tap multi_queue vnet_hdr`)") from None
            if exc.errno == errno.EBUSY:
                raise TapError(f"tap: {name} is busy (its queues are in use)") from None
            raise TapError(f"tap: {name}: {exc.strerror}") from None
        return fd

    def configure(self, features: int, hdr_size: int) -> None:
        """Apply negotiated ``features``: TUNSETVNETHDRSZ ``hdr_size`` (10 or
        12) and TUNSETOFFLOAD from the GUEST_* bits.  Raises OSError if the
        kernel refuses."""
        if not self.fds:
            return
        fd = self.fds[0]
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_size))
        flags = tun_offload_flags(features)
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        self.offload = flags
        self.hdr_size = hdr_size

    def set_queue_attached(self, queue: int, on: bool) -> None:
        """Attach (``on``) or detach queue ``queue`` (TUNSETQUEUE); a no-op
        if it already is.  A detached queue gets no frames from the kernel
        (its writes still reach the tap)."""
        if self.attached[queue] == on:
            return
        flag = IFF_ATTACH_QUEUE if on else IFF_DETACH_QUEUE
        fcntl.ioctl(self.fds[queue], TUNSETQUEUE, _ifreq("", flag))
        self.attached[queue] = on

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# -- scatter/gather I/O that works on PyPy too -------------------------------------

if hasattr(os, "writev") and hasattr(os, "readv"):
    def writev(fd: int, buffers: Sequence) -> int:
        """Write the concatenation of ``buffers`` as one frame; returns bytes
        written.  Raises OSError (EAGAIN when the queue is full)."""
        return os.writev(fd, buffers)

    def readv(fd: int, buffers: Sequence) -> int:
        """Read one frame into ``buffers`` (writable buffers, filled in
        order); returns its length.  Raises OSError (EAGAIN when none)."""
        return os.readv(fd, buffers)
else:       # PyPy 3.9
    import cffi

    _ffi = cffi.FFI()
    _ffi.cdef("""
        struct iovec { void *iov_base; size_t iov_len; };
        ssize_t readv(int fd, const struct iovec *iov, int iovcnt);
        ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
    """)
    _libc = _ffi.dlopen(None)
    _IOV_ARRAY = _ffi.typeof("struct iovec[]")     # parsed at import, not at the first frame

    def _iov(buffers: Sequence, writable: bool):
        iov = _ffi.new(_IOV_ARRAY, len(buffers))
        keep = []
        for i, b in enumerate(buffers):
            p = _ffi.from_buffer(b, require_writable=writable)
            keep.append(p)
            iov[i].iov_base = p
            iov[i].iov_len = len(p)
        return iov, keep

    def writev(fd: int, buffers: Sequence) -> int:
        iov, keep = _iov(buffers, False)
        n = _libc.writev(fd, iov, len(buffers))
        if n < 0:
            e = _ffi.errno
            raise OSError(e, os.strerror(e))
        return n

    def readv(fd: int, buffers: Sequence) -> int:
        iov, keep = _iov(buffers, True)
        n = _libc.readv(fd, iov, len(buffers))
        if n < 0:
            e = _ffi.errno
            raise OSError(e, os.strerror(e))
        return n
