"""``--port af_packet:IFNAME``: an existing Ethernet interface (a veth end,
a bridge, a NIC) through AF_PACKET sockets with mmap'ed TPACKET_V2 rings.

Control side (:class:`AfPacketControl`, owned by the control process):
one socket per queue pair, bound to IFNAME, each with

* PACKET_VNET_HDR: every frame in both rings carries a 10-byte
  ``virtio_net_hdr``, so partial checksums and GSO frames pass to and from
  the guest as offloads instead of being resolved by the kernel;
* an RX ring and a TX ring (PACKET_RX_RING / PACKET_TX_RING, one mapping:
  RX blocks first), frames large enough for a 64 KiB GSO frame;
* PACKET_LOSS: a TX frame the kernel refuses is skipped, its slot freed,
  so one bad guest frame cannot halt the ring;
* PACKET_IGNORE_OUTGOING: frames leaving IFNAME (those shardvu sends
  among them) are not looped back into the guest;
* PACKET_MR_PROMISC membership: frames for any MAC address are received;
* PACKET_FANOUT, hash mode with defragmentation, so each pair receives
  its share of IFNAME's traffic by flow.  The group id is allocated by the
  kernel (PACKET_FANOUT_FLAG_UNIQUEID), so it is unique in the network
  namespace; the other pairs' sockets join it.

Worker side (:class:`AfPacketPort`): both workers of pair *i* get a copy of
socket *i* and map its rings.  The TX worker copies each guest frame into
the next free TX slot (the guest's header, cut to the 10 bytes the kernel
reads, then the frame) and flushes the whole batch with one ``send``; the
RX worker sleeps on the socket (readable while the RX ring holds frames)
and copies frames out of the RX ring.

Offloads, interface → guest: a frame whose checksum is partial
(NEEDS_CSUM) goes to the guest as it is when GUEST_CSUM is negotiated,
else its checksum is completed in software; DATA_VALID is cleared without
GUEST_CSUM; a GSO frame goes to a guest that negotiated the matching
GUEST_TSO4/TSO6/UFO (and GUEST_ECN for ECN), else it is dropped and counted
(OFFLOAD_NOT_NEGOTIATED).  A VLAN tag the kernel moved into
``tp_vlan_tci`` is put back into the frame (``csum_start`` moves with it).

Bad outcomes: a frame larger than a ring slot (OVERSIZE_FRAME), a frame
shorter than an Ethernet header (SHORT_FRAME), a full TX ring (PORT_FULL),
frames the kernel dropped for a full RX ring (PORT_FULL on the RX queue,
from PACKET_STATISTICS when it marks a frame TP_STATUS_LOSING, or when the
ring runs dry), an RX slot the kernel moved past without filling it (seen
under load with several CPUs receiving: the reader waiting at it would
stall the ring for good; after HOLE_S it is skipped, PORT_ERROR),
frames that arrive after IFNAME went away (PORT_ERROR, logged once; the RX
worker stops watching the socket).

Runs on CPython >= 3.9 and PyPy 3.9 (worker code): socket, mmap and struct
only.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from shardvu.reasons import DropReason

from .ports import Port, PortControl

__all__ = ["AfPacketControl", "AfPacketPort", "AfPacketError", "open_socket", "Geometry",
           "csum_complete", "SOL_PACKET"]

log = logging.getLogger("shardvu.worker")

# <linux/if_packet.h>
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_VNET_HDR = 15
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
TPACKET_V2 = 1
PACKET_MR_PROMISC = 1
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
ETH_P_ALL = 0x0003
# tp_status
TP_STATUS_USER = 0x1
TP_STATUS_LOSING = 0x4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 0x1
TP_STATUS_WRONG_FORMAT = 0x4

#: struct tpacket2_hdr: status, len, snaplen, mac, net, sec, nsec, vlan_tci, vlan_tpid
_HDR = struct.Struct("IIIHHIIHH4x")
_U32 = struct.Struct("I")
#: TPACKET2_HDRLEN - sizeof(struct sockaddr_ll): where a TX frame starts
_TX_DATA = 32
_TX_SERIAL = 16         # tpacket2_hdr.tp_sec: the kernel ignores it on TX
#: tpacket2_hdr.tp_sec, tp_nsec: the kernel stamps every RX frame; a slot
#: given back keeps its stamp
_STAMP = struct.Struct("II")


def _next_serial(s: int) -> int:
    """Serials run 1..2**32-1 and wrap to 1 (0 = a slot never written)."""
    return s + 1 if s < 0xFFFFFFFF else 1
#: struct virtio_net_hdr (the kernel's 10 bytes)
VNET_LEN = 10
_VNET = struct.Struct("<BBHHHH")
_F_NEEDS_CSUM, _F_DATA_VALID = 1, 2
_GSO_ECN = 0x80
# guest feature needed for each gso_type (virtio-net): TCPV4, UDP, TCPV6
_GSO_NEEDS = {1: 7, 3: 10, 4: 8}
_GUEST_CSUM, _GUEST_ECN = 1, 9

ARPHRD_ETHER = 1
#: how long an empty RX slot with frames after it may wait before it is skipped
HOLE_S = 0.05


class AfPacketError(Exception):
    """The interface cannot be used as asked; the message is one line."""


class Geometry:
    """The rings' layout, shared by the control process (setsockopt) and
    the workers (mmap): ``blocks`` blocks of ``block_size`` bytes per ring,
    each holding ``block_size // frame_size`` frame slots; the TX ring's
    blocks follow the RX ring's in the mapping."""

    def __init__(self, block_size: int = 1 << 20, frame_size: int = 69904,
                 rx_blocks: int = 8, tx_blocks: int = 8):
        self.block_size = block_size
        self.frame_size = frame_size
        self.rx_blocks = rx_blocks
        self.tx_blocks = tx_blocks

    @property
    def per_block(self) -> int:
        return self.block_size // self.frame_size

    @property
    def size(self) -> int:
        return (self.rx_blocks + self.tx_blocks) * self.block_size

    def offsets(self, tx: bool) -> List[int]:
        """The mapping offset of every frame slot of one ring, in order."""
        base = self.rx_blocks * self.block_size if tx else 0
        blocks = self.tx_blocks if tx else self.rx_blocks
        return [base + b * self.block_size + i * self.frame_size
                for b in range(blocks) for i in range(self.per_block)]

    def req(self, tx: bool) -> bytes:
        """struct tpacket_req for one ring."""
        blocks = self.tx_blocks if tx else self.rx_blocks
        return struct.pack("IIII", self.block_size, blocks, self.frame_size,
                           blocks * self.per_block)

    def meta(self) -> Dict[str, int]:
        return {"block_size": self.block_size, "frame_size": self.frame_size,
                "rx_blocks": self.rx_blocks, "tx_blocks": self.tx_blocks}

    @classmethod
    def from_meta(cls, meta: Dict[str, Any]) -> "Geometry":
        return cls(meta["block_size"], meta["frame_size"], meta["rx_blocks"], meta["tx_blocks"])


_SIOCGIFNAME, _SIOCGIFINDEX, _SIOCGIFHWADDR = 0x8910, 0x8933, 0x8927
_IFREQ_INDEX = struct.Struct("16si20x")


def _ifindex(name: str) -> int:
    # ioctls, not socket.if_nametoindex: PyPy 3.9 has none
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s, _SIOCGIFINDEX, _IFREQ_INDEX.pack(name.encode(), 0))
        except OSError:
            raise AfPacketError(f"af_packet: no interface {name}") from None
    return _IFREQ_INDEX.unpack(raw)[1]


def _ifname(index: int) -> Optional[str]:
    """The name of interface ``index`` in this namespace, None if none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s, _SIOCGIFNAME, _IFREQ_INDEX.pack(b"", index))
        except OSError:
            return None
    return _IFREQ_INDEX.unpack(raw)[0].rstrip(b"\0").decode()


def _check_ether(name: str) -> None:
    # SIOCGIFHWADDR: the hardware type, in this thread's network namespace
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s, _SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
        except OSError:
            raise AfPacketError(f"af_packet: no interface {name}") from None
    kind = struct.unpack_from("H", raw, 16)[0]
    if kind != ARPHRD_ETHER:
        raise AfPacketError(f"af_packet: {name} is not an Ethernet interface (type {kind})")


def open_socket(ifname: str, geo: Geometry, fanout: Optional[int]) -> socket.socket:
    """One pair's socket on ``ifname``: TPACKET_V2 rings with ``geo``'s
    layout, vnet headers, PACKET_LOSS, outgoing frames ignored, promiscuous,
    in fanout group ``fanout`` (None: a new group with a kernel-chosen id;
    read it with :func:`fanout_id`).  Raises AfPacketError (one line)."""
    ifindex = _ifindex(ifname)
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError:
        raise AfPacketError("af_packet: no permission to open a packet socket "
                            "(needs CAP_NET_RAW)") from None
    try:
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        s.setsockopt(SOL_PACKET, PACKET_RX_RING, geo.req(False))
        s.setsockopt(SOL_PACKET, PACKET_TX_RING, geo.req(True))
        s.bind((ifname, ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                     struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b""))
        mode = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
        if fanout is None:
            arg = (mode | PACKET_FANOUT_FLAG_UNIQUEID) << 16
        else:
            arg = fanout | mode << 16
        s.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("I", arg))
        s.setblocking(False)
    except OSError as exc:
        s.close()
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise AfPacketError(f"af_packet: no interface {ifname}") from None
        raise AfPacketError(f"af_packet: {ifname}: {exc.strerror}") from None
    return s


def fanout_id(s: socket.socket) -> int:
    """The fanout group id of a socket that joined one."""
    return s.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF


class AfPacketControl(PortControl):
    """The pairs' sockets, owned by the control process; each pair's two
    workers get copies of its socket and the ring geometry in ``meta``."""

    kind = "af_packet"
    can_inject = True

    def __init__(self, ifname: str, pairs: int, geo: Optional[Geometry] = None):
        if pairs < 1:
            raise AfPacketError("af_packet: need at least one queue pair")
        self.ifname = ifname
        self.ifindex = _ifindex(ifname)
        _check_ether(ifname)
        self.geo = geo or Geometry()
        self.socks: List[socket.socket] = []
        try:
            first = open_socket(ifname, self.geo, None)
            self.socks.append(first)
            self.fanout = fanout_id(first)
            for _ in range(pairs - 1):
                self.socks.append(open_socket(ifname, self.geo, self.fanout))
        except BaseException:
            self.close()
            raise

    def fds(self, pair: int) -> List[int]:
        return [os.dup(self.socks[pair].fileno())]

    def meta(self, pair: int) -> Dict[str, Any]:
        return dict(self.geo.meta(), ifname=self.ifname, ifindex=self.ifindex,
                    fanout=self.fanout)

    def stats(self, pair: int) -> Dict[str, int]:
        """The kernel's PACKET_STATISTICS for pair ``pair`` since the last
        call: frames received (``packets``) and dropped for a full RX ring
        (``drops``)."""
        raw = self.socks[pair].getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        packets, drops = struct.unpack("II", raw)
        return {"packets": packets, "drops": drops}

    def inject(self, frame: bytes, hdr_len: int) -> None:
        """Send ``frame`` out of IFNAME (SEND_RARP) through a plain packet
        socket of its own: the pairs' sockets send only through their TX
        rings, which belong to the TX workers."""
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
            s.bind((self.ifname, 0))
            s.send(frame)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []


def csum_complete(frame: bytearray, start: int, offset: int) -> None:
    """Finish a partial checksum in place (virtio NEEDS_CSUM): the
    one's-complement sum of ``frame[start:]``, whose checksum field at
    ``start + offset`` holds the pseudo-header sum, complemented into that
    field.  Raises ValueError if the field lies outside the frame."""
    pos = start + offset
    if start < 0 or pos + 2 > len(frame):
        raise ValueError("checksum field outside the frame")
    data = bytes(frame[start:])
    if len(data) & 1:
        data += b"\0"
    # the one's-complement sum of 16-bit words is the value mod 0xffff
    s = int.from_bytes(data, "big") % 0xFFFF
    if s == 0 and any(data):
        s = 0xFFFF
    c = ~s & 0xFFFF
    if c == 0 and offset == 6:
        c = 0xFFFF                  # UDP: a computed 0 is sent as 0xffff
    frame[pos:pos + 2] = struct.pack(">H", c)


def _guest_may_take(features: int, gso_type: int) -> bool:
    need = _GSO_NEEDS.get(gso_type & ~_GSO_ECN)
    if need is None or not features >> need & 1:
        return False
    return not gso_type & _GSO_ECN or bool(features >> _GUEST_ECN & 1)


class AfPacketPort(Port):
    """``--port af_packet:IFNAME`` in a worker (see the module docstring).

    Contract: ``fds[0]`` is the pair's socket (the worker owns and closes
    it); the port maps the socket's rings and unmaps them at :meth:`close`.
    :meth:`send` never blocks: a batch is copied into free TX slots and
    flushed with one non-blocking ``send``.  :meth:`receive` returns at most
    ``budget`` frames, each ``hdr_len`` header bytes then the Ethernet
    frame."""

    from shardvu.net import OFFLOADS as offloads

    @classmethod
    def open_control(cls, arg: str, pairs: int) -> PortControl:
        try:
            return AfPacketControl(arg, pairs)
        except AfPacketError as exc:
            raise ValueError(str(exc)) from None

    def __init__(self, pair: int, tx: bool, fds: List[int], meta: Dict[str, Any]):
        super().__init__(pair, tx, fds, meta)
        self.geo = Geometry.from_meta(meta)
        self.ifname = meta.get("ifname", "?")
        self.ifindex = meta.get("ifindex", 0)
        self.sock = socket.socket(fileno=os.dup(fds[0]))
        self.sock.setblocking(False)        # PyPy does not take it from the fd
        self.mm: Optional[mmap.mmap] = mmap.mmap(fds[0], self.geo.size, mmap.MAP_SHARED,
                                                 mmap.PROT_READ | mmap.PROT_WRITE)
        #: writes go through a memoryview: PyPy's mmap slices take bytes only
        self.buf: Optional[memoryview] = memoryview(self.mm)
        self.slots = self.geo.offsets(tx)
        self.slot = 0
        #: TX: serial of the last frame written, kept in each slot's tp_sec
        #: (ignored by the kernel on TX), so a replacement worker resumes
        #: at the slot after its predecessor's last one: the kernel's TX
        #: head is there, and it sends only from its head on.
        self.serial = 0
        if tx:
            self.slot, self.serial = self._resume_slot()
        #: RX on a ring already used (a predecessor killed, a reload, a new
        #: session): find the kernel's place at the first receive, once the
        #: predecessor can no longer take frames (see _resume_rx)
        self._resync = not tx and any(_STAMP.unpack_from(self.mm, off + _TX_SERIAL) != (0, 0)
                                      for off in self.slots)
        self.max_tx = self.geo.frame_size - _TX_DATA - VNET_LEN
        self.gone = False
        self._unchecked = False     # RX frames taken since PACKET_STATISTICS was read
        self._hole_since: Optional[float] = None
        self._stored = self._taken = 0      # RX frames the kernel stored / this port took
        self._next_check = 0.0
        self._hole_slot = -1
        self._hole_logged = False

    # -- both sides ---------------------------------------------------------------
    def _lost(self, why: str) -> None:
        if not self.gone:
            self.gone = True
            log.error("pair %d: af_packet %s failed (%s); dropping its traffic",
                      self.pair, self.ifname, why)

    def _check_link(self, err: int) -> None:
        """After a socket error: gone for good if the interface is."""
        if _ifname(self.ifindex) != self.ifname:
            self._lost(f"{os.strerror(err)}: the interface is gone")
        else:
            log.warning("pair %d: af_packet %s: %s", self.pair, self.ifname, os.strerror(err))

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:     # a view still exported: the GC unmaps it
                pass
            self.mm = None
        self.sock.close()

    # -- send side (TX worker) ---------------------------------------------------------
    def _resume_slot(self) -> Tuple[int, int]:
        """(slot to write next, last serial) from the serials in the ring:
        the write head is where consecutive serials break (0 = never used)."""
        serials = [_U32.unpack_from(self.mm, off + _TX_SERIAL)[0] for off in self.slots]
        n = len(serials)
        for i, s in enumerate(serials):
            if s and serials[(i + 1) % n] != _next_serial(s):
                return (i + 1) % n, s
        return 0, 0

    def send(self, frames: Sequence) -> None:
        if self.gone:
            self.drop(DropReason.PORT_ERROR, len(frames))
            return
        mm = self.mm
        buf = self.buf
        slots = self.slots
        nslots = len(slots)
        h = self.hdr_len
        i = self.slot
        serial = self.serial
        queued = 0
        flushed = False
        for k, f in enumerate(frames):
            if isinstance(f, (list, tuple)):
                f = b"".join(f)
            flen = len(f) - h
            if flen < 14:
                self.drop(DropReason.SHORT_FRAME, 1)
                continue
            if flen > self.max_tx:
                self.drop(DropReason.OVERSIZE_FRAME, 1)
                continue
            off = slots[i]
            status = _U32.unpack_from(mm, off)[0]
            if status not in (TP_STATUS_AVAILABLE, TP_STATUS_WRONG_FORMAT):
                if not flushed:
                    self._flush(queued)
                    flushed = True
                    queued = 0
                    if self.gone:
                        self.drop(DropReason.PORT_ERROR, len(frames) - k)
                        break
                    status = _U32.unpack_from(mm, off)[0]
                if status not in (TP_STATUS_AVAILABLE, TP_STATUS_WRONG_FORMAT):
                    self.drop(DropReason.PORT_FULL, len(frames) - k)
                    break
            d = off + _TX_DATA
            buf[d:d + VNET_LEN] = f[:VNET_LEN]
            buf[d + VNET_LEN:d + VNET_LEN + flen] = f[h:]
            _U32.pack_into(mm, off + 4, VNET_LEN + flen)      # tp_len before the status
            serial = _next_serial(serial)
            _U32.pack_into(mm, off + _TX_SERIAL, serial)
            _U32.pack_into(mm, off, TP_STATUS_SEND_REQUEST)
            queued += 1
            i += 1
            if i == nslots:
                i = 0
        self.slot = i
        self.serial = serial
        if queued:
            self._flush(queued)

    def _flush(self, queued: int) -> None:
        """Send the ``queued`` frames just put in the TX ring (one call);
        if the interface is gone they are counted as PORT_ERROR."""
        try:
            self.sock.send(b"", socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return
            self._check_link(exc.errno)
            if self.gone:
                self.drop(DropReason.PORT_ERROR, queued)

    # -- receive side (RX worker) ------------------------------------------------------
    def fileno(self) -> int:
        return -1 if self.gone else self.fds[0]

    def receive(self, budget: int) -> List[bytes]:
        if self.gone:
            return []
        if self._resync:
            self._resume_rx()
        mm = self.mm
        slots = self.slots
        nslots = len(slots)
        i = self.slot
        out: List[bytes] = []
        features = self.features
        csum_ok = bool(features >> _GUEST_CSUM & 1)
        tail = b"\x01\x00" if self.hdr_len == 12 else b""
        while len(out) < budget:
            off = slots[i]
            status, tlen, snap, mac, _net, _s, _ns, tci, tpid = _HDR.unpack_from(mm, off)
            if not status & TP_STATUS_USER:
                if not out and self._hole(mm, i):
                    i = self.slot
                    continue
                break
            self._taken += 1
            if status & TP_STATUS_LOSING:
                self._count_ring_drops()
            frame = self._take(mm, off, status, tlen, snap, mac, tci, tpid, csum_ok, features)
            _U32.pack_into(mm, off, 0)          # the slot goes back to the kernel
            i += 1
            if i == nslots:
                i = 0
            if frame is not None:
                out.append(frame[0] + tail + frame[1])
        if i != self.slot:
            self._unchecked = True
        self.slot = i
        if not out:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._check_link(err)
        return out

    def _resume_rx(self) -> None:
        """Read on from where the kernel is, not slot 0: the oldest frame
        still in the ring, or with none the slot the kernel fills next.
        (Started anywhere else, reader and kernel stay out of step for
        good: frames come a ring lap late, and are dropped whenever the
        kernel meets a slot still unread.)  The kernel fills slots in
        order, so it writes next after the newest stamp; from there the
        oldest frame is the first slot holding one after a slot that does
        not.  Statuses are read backwards (slot 0's predecessor again after
        slot 0): a frame the kernel adds meanwhile then cannot look like
        such a start.  PACKET_STATISTICS is read now (its drops counted),
        and the frames stored are those in the ring, so frames the
        predecessor took since its last read are not taken for holes."""
        self._resync = False
        mm = self.mm
        slots = self.slots
        n = len(slots)
        newest, head = (0, 0), 0
        for i, off in enumerate(slots):
            stamp = _STAMP.unpack_from(mm, off + _TX_SERIAL)
            if stamp > newest:
                newest, head = stamp, i + 1 if i + 1 < n else 0
        user = [False] * n
        for i in range(n - 1, -1, -1):
            user[i] = bool(_U32.unpack_from(mm, slots[i])[0] & TP_STATUS_USER)
        before_first = bool(_U32.unpack_from(mm, slots[-1])[0] & TP_STATUS_USER)
        self.slot = head
        for j in range(n):
            i = head + j - n if head + j >= n else head + j
            if user[i] and not (user[i - 1] if i else before_first):
                self.slot = i
                break
        self._count_ring_drops()
        self._stored, self._taken = sum(user), 0

    def _hole(self, mm, i: int) -> bool:
        """Our next slot ``i`` is the kernel's (the ring looks dry), yet the
        kernel stored a frame there: the slot after it holds a frame, or
        PACKET_STATISTICS counts more frames stored than were taken.
        Normally a frame still being copied in on another CPU (microseconds,
        in softirq); seen under load, a slot the kernel never fills, which
        would stall the ring for good.  After HOLE_S seconds the slot is
        skipped and its frame counted as lost (PORT_ERROR).  Also where
        drops after the last LOSING mark get counted (once per burst).
        True when the slot was skipped."""
        nxt = self.slots[i + 1 if i + 1 < len(self.slots) else 0]
        now = time.monotonic()
        if not _U32.unpack_from(mm, nxt)[0] & TP_STATUS_USER:
            # statistics once per burst, while a hole is suspected, and at
            # most every HOLE_S when idle
            if not (self._unchecked or self._hole_since is not None or now >= self._next_check):
                return False
            self._unchecked = False
            self._next_check = now + HOLE_S
            self._count_ring_drops()
            if self._stored <= self._taken:
                self._hole_since = None
                return False
        if self._hole_since is None or self._hole_slot != i:
            self._hole_since, self._hole_slot = now, i
            return False
        if now - self._hole_since < HOLE_S:
            return False
        self._hole_since = None
        self.slot = i + 1 if i + 1 < len(self.slots) else 0
        self._taken += 1
        self.drop(DropReason.PORT_ERROR, 1)
        if not self._hole_logged:
            self._hole_logged = True
            log.warning("pair %d: af_packet %s: RX slot %d stayed empty while the kernel moved on; "
                        "skipped (counted as port_error; logged once)", self.pair, self.ifname, i)
        return True

    def _count_ring_drops(self) -> None:
        """The kernel dropped frames for a full RX ring (it marks the next
        frame LOSING): read and reset PACKET_STATISTICS, count them."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        packets, dropped = struct.unpack("II", raw)
        self._stored += packets - dropped       # (TPACKET_V2: tp_packets counts drops too)
        if dropped:
            self.drop(DropReason.PORT_FULL, dropped)

    def _take(self, mm, off: int, status: int, tlen: int, snap: int, mac: int, tci: int,
              tpid: int, csum_ok: bool, features: int):
        """(vnet header, frame) of one RX slot, offloads resolved for the
        guest's features; None when dropped (counted)."""
        if snap < tlen:
            self.drop(DropReason.OVERSIZE_FRAME, 1)
            return None
        if tlen < 14:
            self.drop(DropReason.SHORT_FRAME, 1)
            return None
        start = off + mac
        vnet = mm[start - VNET_LEN:start]
        eth = mm[start:start + snap]
        flags, gso, hlen, gsize, cstart, coff = _VNET.unpack(vnet)
        if status & TP_STATUS_VLAN_VALID:
            tag = struct.pack(">HH", tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100, tci)
            eth = eth[:12] + tag + eth[12:]
            if flags & _F_NEEDS_CSUM:
                cstart += 4
            if gso:
                hlen += 4
            vnet = _VNET.pack(flags, gso, hlen, gsize, cstart, coff)
        if gso and not _guest_may_take(features, gso):
            self.drop(DropReason.OFFLOAD_NOT_NEGOTIATED, 1)
            return None
        if not csum_ok and flags:
            if flags & _F_NEEDS_CSUM:
                buf = bytearray(eth)
                try:
                    csum_complete(buf, cstart, coff)
                except ValueError:
                    self.drop(DropReason.SHORT_FRAME, 1)
                    return None
                eth = bytes(buf)
            vnet = bytes(VNET_LEN)
        return vnet, eth
