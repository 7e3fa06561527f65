"""Ports: what a queue pair is connected to.

A port is chosen per runtime with ``shardvu run --port NAME``:

``sink``
    Guest TX frames are counted and dropped; RX stays idle.
``loopback``
    Every frame the guest sends on pair *i* comes back on RX of pair *i*.
    The pair's two worker processes pass frames through a shared-memory
    single-producer/single-consumer ring (:mod:`shardvu.workers.spsc`).
    Checksum offload (CSUM, GUEST_CSUM) is offered: with CSUM negotiated the
    frames travel with their virtio-net header, and one with a partial
    checksum comes back only to a guest that negotiated GUEST_CSUM (else it
    is dropped, OFFLOAD_NOT_NEGOTIATED); GSO frames, larger than a ring
    slot, are not offered.
``generator``
    The guest's RX rings of every pair are filled with frames
    (``--frame-size`` bytes) as fast as the guest posts buffers; guest TX is
    counted and dropped.

Your own packet function
------------------------
``--port module:function`` (or :func:`register`) plugs in a per-batch
function, run in the TX worker of each pair::

    def my_port(frames: list) -> list | None:
        '''frames: the batch the guest just sent on this pair (bytes,
        without the virtio-net header).  Return the frames to deliver to the
        guest on RX of the same pair (or None / [] to drop everything).'''
        return [f for f in frames if f[12:14] == b"\\x08\\x00"]   # IPv4 only

The function is called once per batch (up to 64 frames), never per packet,
in the worker's process; what it returns travels to the RX worker through
the pair's shared-memory ring, exactly like ``loopback``.  Imported by name
in each worker, so it must be importable there (a module on ``sys.path``).

``tap:IFNAME``
    A multi-queue Linux tap (:mod:`shardvu.workers.tap`): pair *i*'s TX
    worker writes the guest's frames (with their virtio-net header) into tap
    queue *i*, its RX worker reads tap queue *i* into the guest's RX ring.
    Offloads (checksum, TSO, UFO) pass through in both directions.

A two-way port of your own
--------------------------
``--port module:Class`` with a subclass of :class:`Port`: its send side
runs in each pair's TX worker and gets the batches of guest TX frames; its
receive side runs in the pair's RX worker: a readable fd (:meth:`Port.fileno`)
that wakes the worker, and a batch reader (:meth:`Port.receive`) whose frames
the worker delivers into the guest's RX ring.  Frames carry their
virtio-net header in both directions (``hdr_len`` bytes: 12 with VERSION_1
or MRG_RXBUF, else 10), so a port can honour offloads; :attr:`Port.offloads`
says which offload features the device may offer with it (none by default).

The control process creates what the pair's two workers share
(:meth:`Port.open_control`): by default one ``SOCK_SEQPACKET`` socket pair
per queue pair, whose first socket goes to the TX worker and second to the
RX worker, so a port can answer the guest.  An ARP responder, complete::

    from shardvu.workers.ports import Port

    class ArpResponder(Port):
        # answers every ARP request as if the address were at 02:00:00:00:00:fe
        MAC = bytes.fromhex("0200000000fe")

        def send(self, frames):                      # TX worker
            h = self.hdr_len
            for f in frames:
                eth = bytes(f[h:])
                if eth[12:14] != b"\\x08\\x06" or eth[20:22] != b"\\x00\\x01":
                    continue                         # not an ARP request
                sha, spa, tpa = eth[22:28], eth[28:32], eth[38:42]
                arp = b"\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x02" + self.MAC + tpa + sha + spa
                self.channel_send(bytes(h) + sha + self.MAC + b"\\x08\\x06" + arp)

        # receive side (RX worker): the default fileno()/receive() read what
        # channel_send() wrote; the worker sets num_buffers.

Run it with ``shardvu run --port mymodule:ArpResponder``.  The bad
outcomes are the worker's: a frame the guest has no room for is dropped
and counted by reason, a port method that raises marks the queue broken.
"""
from __future__ import annotations

import errno
import importlib
import logging
import os
import select
import socket
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from shardvu.reasons import DropReason

from shardvu.framestats import add_frames, add_same

__all__ = ["PortSpec", "resolve", "register", "BUILTIN", "Port", "PortControl", "TapPort",
           "PortRx", "deliver", "loop_offload", "LOOPBACK_OFFLOADS"]

log = logging.getLogger("shardvu.worker")
#: the largest frame a port hands the guest: a 64 KiB GSO frame plus header
MAX_RX_FRAME = 65536 + 12

PacketFn = Callable[[List[bytes]], Optional[List[bytes]]]


class PortSpec:
    """How the two workers of a pair behave.

    ``tx_fn``: None → TX frames are counted and dropped without copying;
    else the per-batch function whose result goes to the pair's RX worker.
    ``rx_mode``: "idle", "spsc" (deliver what the TX worker forwards) or
    "generator" (fill RX buffers with generated frames)."""

    def __init__(self, name: str, tx_fn: Optional[PacketFn], rx_mode: str,
                 identity: bool = False, two_way: Optional[type] = None, arg: str = "",
                 offloads: int = 0):
        if rx_mode not in ("idle", "spsc", "generator", "port"):
            raise ValueError(f"bad rx_mode {rx_mode!r}")
        self.name = name
        self.tx_fn = tx_fn
        self.rx_mode = rx_mode
        #: a :class:`Port` subclass (rx_mode "port"), and its argument
        self.two_way = two_way
        self.arg = arg
        self._offloads = offloads
        #: the function returns its input: frames go straight from guest
        #: memory into the pair's ring, with no intermediate copy
        self.identity = identity

    @property
    def needs_spsc(self) -> bool:
        return self.rx_mode == "spsc"

    @property
    def offloads(self) -> int:
        """Offload feature bits the device may offer with this port."""
        return self.two_way.offloads if self.two_way is not None else self._offloads

    @property
    def mtu(self) -> int:
        """The MTU the port's path allows (offered with VIRTIO_NET_F_MTU
        unless ``--mtu`` says otherwise); 0: none to advertise."""
        return self.two_way.path_mtu(self.arg) if self.two_way is not None else 0

    def open_control(self, pairs: int) -> Optional["PortControl"]:
        """The control process's part of a two-way port (None otherwise).
        Raises ValueError (one line) if it cannot be opened."""
        if self.two_way is None:
            return None
        return self.two_way.open_control(self.arg, pairs)


def _loopback(frames: List[bytes]) -> List[bytes]:
    return frames


#: what the loopback can carry: partial checksums (a frame fits a ring
#: slot); not GSO frames, which are larger than a slot
LOOPBACK_OFFLOADS = 1 << 0 | 1 << 1         # CSUM, GUEST_CSUM

BUILTIN: Dict[str, PortSpec] = {
    "sink": PortSpec("sink", None, "idle"),
    "loopback": PortSpec("loopback", _loopback, "spsc", identity=True, offloads=LOOPBACK_OFFLOADS),
    "generator": PortSpec("generator", None, "generator"),
}
_registered: Dict[str, PortSpec] = {}


def register(name: str, fn: PacketFn) -> None:
    """Make ``fn`` available as ``--port NAME`` in this process (and in
    forked workers)."""
    _registered[name] = PortSpec(name, fn, "spsc")


def resolve(name: str) -> PortSpec:
    """The port called ``name``: built-in, registered, ``tap:IFNAME``,
    ``module:function`` or ``module:Class`` (a :class:`Port`).  Raises
    ValueError (one line) if it cannot be found or the name is invalid."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in _registered:
        return _registered[name]
    if name.startswith("tap:"):
        from .tap import TapError, check_ifname
        ifname = name[4:]
        try:
            check_ifname(ifname)
        except TapError as exc:
            raise ValueError(str(exc)) from None
        return PortSpec(name, None, "port", two_way=TapPort, arg=ifname)
    if name.startswith("af_packet:"):
        from .afpacket import AfPacketPort
        from .tap import TapError, check_ifname
        try:
            check_ifname(name[10:])
        except TapError as exc:
            raise ValueError(str(exc).replace("tap:", "af_packet:", 1)) from None
        return PortSpec(name, None, "port", two_way=AfPacketPort, arg=name[10:])
    if name.startswith("udp:"):
        from .udp import UdpPort, parse_spec
        parse_spec(name[4:])            # ValueError (one line) when malformed
        return PortSpec(name, None, "port", two_way=UdpPort, arg=name[4:])
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load port {name!r}: {exc}") from None
        if isinstance(fn, type) and issubclass(fn, Port):
            return PortSpec(name, None, "port", two_way=fn)
        if not callable(fn):
            raise ValueError(f"port {name!r} is not callable")
        return PortSpec(name, fn, "spsc")
    raise ValueError(f"unknown port {name!r} (sink, loopback, generator, tap:IFNAME, "
                     f"af_packet:IFNAME, udp:LOCAL:PORT,REMOTE:PORT, "
                     f"module:function or module:Class)")


def make_frame(size: int, seq: int = 0) -> bytes:
    """A generated Ethernet frame of ``size`` bytes: broadcast destination,
    a locally administered source, EtherType 0x88B5 (local experimental),
    then a payload counting up from ``seq``."""
    size = max(size, 60)
    head = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
    body = bytes((seq + i) & 0xFF for i in range(size - len(head)))
    return head + body


# -- two-way ports ------------------------------------------------------------------

class PortControl:
    """The control process's side of a two-way port: it owns the fds the
    pair's workers share (a worker that dies closes only its copies).

    Default: one ``SOCK_SEQPACKET`` socket pair per queue pair; both
    workers get both sockets: the TX worker writes the first
    (:meth:`Port.channel_send`), the RX worker reads the second."""

    kind = "channel"
    #: :meth:`inject` can send a frame out of the port (SEND_RARP)
    can_inject = False

    def __init__(self, pairs: int):
        self._pairs: List[Tuple[socket.socket, socket.socket]] = []
        for _ in range(pairs):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            a.setblocking(False)
            b.setblocking(False)
            self._pairs.append((a, b))

    def fds(self, pair: int) -> List[int]:
        """New fds (the caller owns them) for the workers of pair ``pair``."""
        return [os.dup(s.fileno()) for s in self._pairs[pair]]

    def meta(self, pair: int) -> Dict[str, Any]:
        """JSON-able detail for pair ``pair``'s port objects."""
        return {}

    def set_features(self, features: int, hdr_len: int) -> None:
        """SET_FEATURES was accepted: apply what the far side needs."""

    def set_enabled(self, pair: int, on: bool) -> None:
        """Pair ``pair`` has at least one enabled ring (``on``) or none."""

    def inject(self, frame: bytes, hdr_len: int) -> None:
        """Send ``frame`` (an Ethernet frame) out of the port on pair 0, as
        if the guest had sent it; ``hdr_len``: the negotiated virtio-net
        header size.  Raises OSError if the port refuses it."""
        raise OSError(errno.EOPNOTSUPP, "this port cannot inject frames")

    def close(self) -> None:
        for a, b in self._pairs:
            a.close()
            b.close()
        self._pairs = []


class Port:
    """A two-way port: one object in each worker of a pair (see the module
    docstring).  Subclass it; override :meth:`send` (TX worker) and, for a
    receive side other than the default channel, :meth:`fileno` and
    :meth:`receive` (RX worker).

    Contract: the worker calls :meth:`configure` whenever the features
    change, :meth:`send` with each batch of guest TX frames (views into
    guest memory or bytes, header first, valid only during the call),
    :meth:`receive` when :meth:`fileno` is readable and the guest has
    buffers, and :meth:`close` at exit; the worker owns ``fds`` (copies of
    the control's) and closes them itself.  ``drop(reason, n)`` counts frames
    the port itself drops (a :class:`~shardvu.reasons.DropReason`).  An
    exception from a method marks the queue broken."""

    #: offload feature bits (:data:`shardvu.net.OFFLOADS`) the port carries
    offloads = 0

    @classmethod
    def path_mtu(cls, arg: str) -> int:
        """The largest frame payload (MTU) the port carries; 0: no limit to
        advertise."""
        return 0

    @classmethod
    def open_control(cls, arg: str, pairs: int) -> PortControl:
        """Create, in the control process, what the workers share."""
        return PortControl(pairs)

    def __init__(self, pair: int, tx: bool, fds: List[int], meta: Dict[str, Any]):
        self.pair = pair
        self.tx = tx
        self.fds = fds
        self.meta = meta
        self.features = 0
        self.hdr_len = 12
        self.drop: Callable[[DropReason, int], None] = lambda reason, n: None

    def configure(self, features: int, hdr_len: int) -> None:
        self.features = features
        self.hdr_len = hdr_len

    # -- send side (TX worker) -----------------------------------------------
    def send(self, frames: Sequence) -> None:
        """Take a batch of guest TX frames (header + Ethernet frame)."""

    def channel_send(self, frame: bytes) -> None:
        """Pass ``frame`` (header + Ethernet frame) to the pair's RX worker
        through the default channel; dropped (PORT_FULL) when it is full."""
        try:
            os.write(self.fds[0], frame)
        except BlockingIOError:
            self.drop(DropReason.PORT_FULL, 1)
        except OSError:
            self.drop(DropReason.PORT_ERROR, 1)

    # -- receive side (RX worker) -----------------------------------------------
    def fileno(self) -> int:
        """An fd that is readable when :meth:`receive` has frames (-1: none);
        default: the channel's receiving socket."""
        return self.fds[-1] if self.fds else -1

    def receive(self, budget: int) -> List[bytes]:
        """Up to ``budget`` frames for the guest (header + Ethernet frame);
        the worker sets ``num_buffers``.  Default: read the channel."""
        out: List[bytes] = []
        fd = self.fileno()
        while len(out) < budget:
            try:
                out.append(os.read(fd, MAX_RX_FRAME))
            except BlockingIOError:
                break
        return out

    def close(self) -> None:
        """The worker is done with the port (it owns and closes ``fds``)."""


class TapControl(PortControl):
    """The tap's queue fds, owned by the control process: queue *i* goes to
    both workers of pair *i*; SET_FEATURES sets TUNSETVNETHDRSZ and
    TUNSETOFFLOAD; a pair with no enabled ring is detached (TUNSETQUEUE),
    as every pair is until the front-end enables one of its rings."""

    kind = "tap"
    can_inject = True

    def __init__(self, tap):
        self.tap = tap
        for pair in range(len(tap.fds)):
            tap.set_queue_attached(pair, False)

    def fds(self, pair: int) -> List[int]:
        return [os.dup(self.tap.fds[pair])]     # the same queue: a copy of its file

    def meta(self, pair: int) -> Dict[str, Any]:
        return {"ifname": self.tap.name}

    def set_features(self, features: int, hdr_len: int) -> None:
        self.tap.configure(features, hdr_len)

    def set_enabled(self, pair: int, on: bool) -> None:
        self.tap.set_queue_attached(pair, on)

    def inject(self, frame: bytes, hdr_len: int) -> None:
        os.write(self.tap.fds[0], bytes(hdr_len) + frame)   # the tap's header size is hdr_len

    def close(self) -> None:
        self.tap.close()


class TapPort(Port):
    """``--port tap:IFNAME`` in a worker: writes guest frames into the
    pair's tap queue fd, reads the kernel's frames from it.  A write the
    kernel refuses (a bad virtio-net header: EINVAL) drops the frame as
    PORT_ERROR; a full queue (EAGAIN) as PORT_FULL.  When the interface
    goes away (EBADFD, EIO, ENODEV...) the port logs it once, counts every
    later frame as PORT_ERROR and stops watching its fd."""

    from shardvu.net import OFFLOADS as offloads

    @classmethod
    def open_control(cls, arg: str, pairs: int) -> PortControl:
        from .tap import Tap, TapError
        try:
            return TapControl(Tap.open(arg, pairs))
        except TapError as exc:
            raise ValueError(str(exc)) from None

    def __init__(self, pair: int, tx: bool, fds: List[int], meta: Dict[str, Any]):
        super().__init__(pair, tx, fds, meta)
        self.gone = False
        self._csum = False

    def configure(self, features: int, hdr_len: int) -> None:
        super().configure(features, hdr_len)
        self._csum = bool(features >> 1 & 1)          # GUEST_CSUM

    def _lost(self, exc: OSError) -> None:
        if not self.gone:
            self.gone = True
            log.error("pair %d: tap %s queue failed (%s); dropping its traffic",
                      self.pair, self.meta.get("ifname", "?"), exc.strerror)

    def send(self, frames: Sequence) -> None:
        if self.gone:
            self.drop(DropReason.PORT_ERROR, len(frames))
            return
        fd = self.fds[0]
        from .tap import writev
        for i, f in enumerate(frames):
            try:
                if isinstance(f, (list, tuple)):
                    writev(fd, f)
                else:
                    os.write(fd, f)
            except BlockingIOError:
                self.drop(DropReason.PORT_FULL, 1)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self.drop(DropReason.PORT_ERROR, 1)     # the kernel refused the header
                    continue
                self._lost(exc)
                self.drop(DropReason.PORT_ERROR, len(frames) - i)
                return

    def fileno(self) -> int:
        return -1 if self.gone else self.fds[0]

    def receive(self, budget: int) -> List[bytes]:
        if self.gone:
            return []
        out: List[bytes] = []
        fd = self.fds[0]
        csum = self._csum
        while len(out) < budget:
            try:
                data = os.read(fd, MAX_RX_FRAME)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(exc)
                break
            if not csum and data[0]:
                # flags the guest did not negotiate (e.g. DATA_VALID): 0
                data = b"\x00" + data[1:]
            out.append(data)
        return out


_NEEDS_CSUM = 1


def loop_offload(frames: Sequence, features: int, hdr_len: int,
                 drop: Callable[[DropReason, int], None]) -> List[bytes]:
    """The loopback with offloads negotiated: guest TX frames (header
    first) that may go back to the same guest's RX, as bytes with
    ``num_buffers`` 1.  A frame with a partial checksum (NEEDS_CSUM) passes
    only with GUEST_CSUM, a GSO frame never (the loopback offers no HOST_*
    segmentation); the others are dropped as OFFLOAD_NOT_NEGOTIATED."""
    guest_csum = features >> 1 & 1
    out: List[bytes] = []
    bad = 0
    for f in frames:
        if f[1] or (f[0] & _NEEDS_CSUM and not guest_csum):
            bad += 1
            continue
        if hdr_len == 12:
            out.append(bytes(f[:10]) + b"\x01\x00" + bytes(f[12:]))
        else:
            out.append(bytes(f))
    if bad:
        drop(DropReason.OFFLOAD_NOT_NEGOTIATED, bad)
    return out


def _set_num_buffers(frame: bytes, n: int) -> bytes:
    return frame[:10] + struct.pack("<H", n) + frame[12:]


def deliver(vq, frames: Sequence[bytes], hdr_len: int, mergeable: bool,
            drop: Callable[[DropReason, int], None], counts=None) -> Tuple[int, int, int]:
    """Write ``frames`` (each header + Ethernet frame) into the guest's RX
    buffers on ``vq``; with ``mergeable`` a frame may span several buffers,
    ``num_buffers`` (header bytes 10..11, 12-byte header) says how many.

    Returns ``(consumed, delivered, payload bytes)``: ``consumed`` frames
    are done (delivered, or dropped and counted through ``drop``); the rest
    wait for buffers.  Without MRG_RXBUF a frame larger than the next
    buffer is dropped (RX_BUFFER_TOO_SMALL) and the buffer kept for the
    next frame; with it, a frame larger than the whole ring
    (OVERSIZE_FRAME).  With ``counts`` (the queue's Counters) each frame
    delivered is counted in its size bin and cast.  One flush, one notify."""
    used = 0
    consumed = delivered = nbytes = 0
    for frame in frames:
        size = len(frame)
        elems = []
        room = 0
        while room < size:
            elem = vq.pop()
            if elem is None:
                break
            elems.append(elem)
            for v in elem.in_sg:
                room += len(v)
            if not mergeable:
                break
        if room < size:
            for elem in reversed(elems):
                vq.unpop(elem)
            if elems and not mergeable:
                drop(DropReason.RX_BUFFER_TOO_SMALL, 1)
                consumed += 1
                continue
            if mergeable and len(elems) >= vq.num:
                drop(DropReason.OVERSIZE_FRAME, 1)
                consumed += 1
                continue
            break                       # wait for the guest's buffers
        if hdr_len == 12:
            frame = _set_num_buffers(frame, len(elems))
        pos = 0
        for elem in elems:
            start = pos
            for v in elem.in_sg:
                n = min(len(v), size - pos)
                if n <= 0:
                    break
                v[:n] = frame[pos:pos + n]
                pos += n
            vq.fill(elem, pos - start, used)
            used += 1
        consumed += 1
        delivered += 1
        nbytes += size - hdr_len
        if counts is not None:
            add_same(counts, frame, hdr_len, 1)
    if used:
        vq.flush(used)
        vq.notify()
    return consumed, delivered, nbytes


class PortRx:
    """The RX worker's side of a two-way port: frames read from the port
    wait here (at most one batch) until the guest posts buffers.

    Contract: :meth:`pass_once` moves at most ``budget`` frames into the
    guest (fast single-buffer loop first, then :func:`deliver`), reading
    from the port only when nothing is pending; :meth:`want_fd` says
    whether the worker should sleep on the port's fd (not while frames wait
    for guest buffers: a kick wakes it then)."""

    #: the queue's Counters, where delivered frames are counted by size
    #: bin and cast (None: not counted)
    counts = None

    def __init__(self, port: Port, drop: Callable[[DropReason, int], None]):
        self.port = port
        self.drop = drop
        self.pending: List[bytes] = []
        #: frames the port itself dropped while receiving (a wrong-peer
        #: datagram, a full kernel ring): consumed without reaching the guest
        self.port_drops = 0
        port.drop = self._port_drop
        self._probe = select.poll()
        self._probe_fd = -1

    def ready(self) -> bool:
        """Cheap check that a pass would find frames: some are pending, or
        the port's fd is readable (one ``poll`` with no timeout)."""
        if self.pending:
            return True
        fd = self.port.fileno()
        if fd != self._probe_fd:
            if self._probe_fd >= 0:
                self._probe.unregister(self._probe_fd)
            if fd >= 0:
                self._probe.register(fd, select.POLLIN)
            self._probe_fd = fd
        return fd >= 0 and bool(self._probe.poll(0))

    def _port_drop(self, reason: DropReason, n: int) -> None:
        self.port_drops += n
        self.drop(reason, n)

    def pass_once(self, vq, budget: int, cache, split_fast,
                  mergeable: bool) -> Tuple[int, int, int]:
        """Returns ``(frames consumed, frames delivered, payload bytes)``;
        frames the port dropped while receiving count as consumed."""
        port = self.port
        if not self.pending:
            d0 = self.port_drops
            frames = port.receive(budget)
            extra = self.port_drops - d0
            if not frames:
                return extra, 0, 0
            n, delivered, nbytes = self._deliver(vq, frames, cache, split_fast, mergeable)
            return n + extra, delivered, nbytes
        return self._deliver(vq, self.pending, cache, split_fast, mergeable)

    def _deliver(self, vq, frames, cache, split_fast, mergeable: bool) -> Tuple[int, int, int]:
        port = self.port
        if frames is not self.pending:
            if port.hdr_len == 12:
                frames = [f if f[10:12] == b"\x01\x00" else _set_num_buffers(f, 1) for f in frames]
            self.pending = frames
        frames = self.pending
        if not vq.enabled:              # a disabled ring gets no frames: drop them
            self.drop(DropReason.RING_DISABLED, len(frames))
            self.pending = []
            return len(frames), 0, 0
        n = nbytes = 0
        if split_fast.eligible(vq):
            n, nbytes, _ = split_fast.rx_pass(vq, frames, b"", cache)
            nbytes -= n * port.hdr_len
            if n and self.counts is not None:
                add_frames(self.counts, frames[:n], port.hdr_len)
        delivered = n
        # whatever made the fast loop stop (a chain, a short buffer, a
        # buffer spanning two regions, the batch's end), the general path
        # takes what is left, or finds no buffer
        if n < len(frames) and not vq.broken:
            consumed, d2, b2 = deliver(vq, frames[n:], port.hdr_len, mergeable, self.drop,
                                       self.counts)
            n += consumed
            delivered += d2
            nbytes += b2
        self.pending = frames[n:]
        return n, delivered, nbytes

    def want_fd(self) -> bool:
        return not self.pending and self.port.fileno() >= 0
