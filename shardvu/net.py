"""virtio-net on top of :mod:`shardvu.device`: features, config space and
the frame-level helpers a network back-end needs.

Queue layout (virtio-net): queue ``2*i`` is pair ``i``'s receive queue (the
device writes frames for the guest), ``2*i+1`` its transmit queue (the guest
sends).  "rx" and "tx" are always the guest's view.
"""
from __future__ import annotations

import logging
import struct
from typing import List, Optional, Sequence, Tuple

from . import protocol as P
from .device import Device, DeviceIface, RequestError
from .protocol import ProtocolFeature as PF
from .reasons import DropReason
from .ringrules import MAX_FRAME, refuse_wrong_direction
from .virtqueue import VirtQueue
from .framestats import add_batch

__all__ = ["NetIface", "net_hdr_len", "pop_tx_frames", "push_rx_frames", "parse_mac",
           "OFFLOADS", "offload_dependency_error"]

log = logging.getLogger("shardvu.net")

VIRTIO_NET_S_LINK_UP = 1

# virtio-net offload feature bits (virtio 1.2, 5.1.3)
F_CSUM, F_GUEST_CSUM = 0, 1
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 7, 8, 9, 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 11, 12, 13, 14
F_GUEST_ANNOUNCE = 21
#: every offload bit a port may carry (USO is not supported)
OFFLOADS = sum(1 << b for b in (F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN,
                                F_GUEST_UFO, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO))
_NAMES = {F_CSUM: "CSUM", F_GUEST_CSUM: "GUEST_CSUM", F_GUEST_TSO4: "GUEST_TSO4",
          F_GUEST_TSO6: "GUEST_TSO6", F_GUEST_ECN: "GUEST_ECN", F_GUEST_UFO: "GUEST_UFO",
          F_HOST_TSO4: "HOST_TSO4", F_HOST_TSO6: "HOST_TSO6", F_HOST_ECN: "HOST_ECN",
          F_HOST_UFO: "HOST_UFO"}
#: the spec's "requires" rules: feature -> any one of these must be present
_REQUIRES = {
    F_GUEST_TSO4: (F_GUEST_CSUM,), F_GUEST_TSO6: (F_GUEST_CSUM,), F_GUEST_UFO: (F_GUEST_CSUM,),
    F_GUEST_ECN: (F_GUEST_TSO4, F_GUEST_TSO6),
    F_HOST_TSO4: (F_CSUM,), F_HOST_TSO6: (F_CSUM,), F_HOST_UFO: (F_CSUM,),
    F_HOST_ECN: (F_HOST_TSO4, F_HOST_TSO6),
}


def offload_dependency_error(features: int) -> Optional[str]:
    """The first offload in ``features`` lacking what the spec says it
    requires (e.g. GUEST_TSO4 without GUEST_CSUM), as a sentence; None if
    the set is consistent."""
    for bit, needs in _REQUIRES.items():
        if features >> bit & 1 and not any(features >> n & 1 for n in needs):
            return (f"VIRTIO_NET_F_{_NAMES[bit]} requires "
                    + " or ".join(f"VIRTIO_NET_F_{_NAMES[n]}" for n in needs))
    return None
_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` → 6 bytes (ValueError if malformed)."""
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


def net_hdr_len(features: int) -> int:
    """Size of ``struct virtio_net_hdr`` for the negotiated features: 12 with
    VERSION_1 or MRG_RXBUF (the ``num_buffers`` field), else 10."""
    if features & (P.bit(P.VIRTIO_F_VERSION_1) | P.bit(P.VIRTIO_NET_F_MRG_RXBUF)):
        return 12
    return 10


class NetIface(DeviceIface):
    """A virtio-net device's callbacks: features, and a config space holding
    the MAC address, link status, queue-pair count and MTU.

    ``offloads``: the offload feature bits (a subset of :data:`OFFLOADS`)
    the port can carry; only those are offered, and SET_FEATURES is refused
    when the acknowledged set breaks a spec dependency
    (:func:`offload_dependency_error`).

    ``port``: the control side of a two-way port
    (:class:`shardvu.workers.ports.PortControl`), told the accepted
    features (``set_features``) and which pairs have an enabled ring
    (``set_enabled``: SET_VRING_ENABLE; every pair at SET_FEATURES without
    VHOST_USER_F_PROTOCOL_FEATURES, when the spec enables every ring)."""

    def __init__(self, queue_pairs: int, mac: Optional[bytes] = None, mtu: int = 0,
                 in_order: bool = False, offloads: int = 0, port=None):
        if offloads & ~OFFLOADS:
            raise ValueError(f"not offload features: {offloads & ~OFFLOADS:#x}")
        self.offloads = offloads
        self.port = port
        self.queue_pairs = queue_pairs
        #: offer VIRTIO_F_IN_ORDER: only for a data path that completes every
        #: queue's buffers in the order it popped them
        self.in_order = in_order
        self.mac = mac or b"\x52\x54\x00\x00\x00\x01"
        self.mtu = mtu
        self.status = VIRTIO_NET_S_LINK_UP

    def get_features(self, dev: Device) -> int:
        # GUEST_ANNOUNCE: the front-end (QEMU) runs the control queue and
        # the guest's own announcements after a migration
        f = (P.bit(P.VIRTIO_NET_F_MRG_RXBUF) | P.bit(P.VIRTIO_NET_F_MAC)
             | P.bit(P.VIRTIO_NET_F_STATUS) | P.bit(P.VIRTIO_NET_F_MQ)
             | P.bit(F_GUEST_ANNOUNCE))
        if self.mtu:
            f |= P.bit(P.VIRTIO_NET_F_MTU)
        if self.in_order:
            f |= P.bit(P.VIRTIO_F_IN_ORDER)
        return f | self.offloads

    def check_features(self, dev: Device, features: int) -> Optional[str]:
        return offload_dependency_error(features)

    def set_features(self, dev: Device, features: int) -> None:
        if self.port is None:
            return
        try:
            self.port.set_features(features, net_hdr_len(features))
        except OSError as exc:
            log.error("SET_FEATURES: the port refused features %#x: %s", features, exc)
        if not features & P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
            for pair in range(self.queue_pairs):
                self._enable(pair, True)

    def process_msg(self, dev: Device, msg) -> None:
        if self.port is not None and msg.request == P.Request.SET_VRING_ENABLE:
            try:
                st = P.VringState.unpack(msg.payload)
            except Exception:
                return None         # the Device refuses it
            if st.index < 2 * self.queue_pairs:
                other = dev.vqs[st.index ^ 1].enable
                self._enable(st.index // 2, bool(st.num) or other)
        return None

    def queue_set_started(self, dev: Device, qidx: int, started: bool) -> None:
        # a pair whose rings are both stopped (GET_VRING_BASE, reset, the
        # front-end gone) is detached; a ring started while enabled attaches it
        if self.port is None or qidx >= 2 * self.queue_pairs:
            return
        rx, tx = dev.vqs[qidx & ~1], dev.vqs[qidx | 1]
        if started:
            if dev.vqs[qidx].enable:
                self._enable(qidx // 2, True)
        elif not rx.started and not tx.started:
            self._enable(qidx // 2, False)

    def _enable(self, pair: int, on: bool) -> None:
        try:
            self.port.set_enabled(pair, on)
        except OSError as exc:
            log.error("pair %d: the port could not %s it: %s", pair,
                      "attach" if on else "detach", exc)

    def queue_is_processed_in_order(self, dev: Device, qidx: int) -> bool:
        return self.in_order

    def get_protocol_features(self, dev: Device) -> int:
        pf = P.bit(PF.NET_MTU)
        if self.port is not None and getattr(self.port, "can_inject", False):
            pf |= P.bit(PF.RARP)
        return pf

    def send_rarp(self, dev: Device, mac: bytes) -> None:
        """SEND_RARP: a RARP announcement from ``mac`` goes out of the
        port on pair 0 (as DPDK injects it into the guest's TX), for the
        switches beyond the port to learn where the guest now is."""
        from .rarp import format_mac, rarp_frame
        if self.port is None or not getattr(self.port, "can_inject", False):
            raise RequestError("SEND_RARP: this port cannot send an announcement")
        frame = rarp_frame(mac)             # ValueError: no or a group MAC
        try:
            self.port.inject(frame, net_hdr_len(dev.features))
        except OSError as exc:
            raise RequestError(f"SEND_RARP: the port refused the frame: {exc.strerror}") from None
        log.info("SEND_RARP: announced %s on pair 0", format_mac(mac))

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.mac, self.status, self.queue_pairs, self.mtu)

    def get_config(self, dev: Device, size: int) -> Optional[bytes]:
        return self.config_bytes()

    def set_config(self, dev: Device, data: bytes, offset: int, flags: int) -> bool:
        # Only the MAC is writable (the legacy interface lets drivers set it).
        if offset + len(data) > 6:
            return False
        mac = bytearray(self.mac)
        mac[offset:offset + len(data)] = data
        self.mac = bytes(mac)
        return True


def pop_tx_frames(vq: VirtQueue, hdr_len: int, limit: int = 256, drops=None,
                  max_frame: int = MAX_FRAME) -> List[bytes]:
    """Take up to ``limit`` chains the guest sent on TX queue ``vq``, return
    their used buffers (length 0), and return the frames without the
    virtio-net header, following :mod:`shardvu.ringrules`: a chain with a
    device-writable descriptor breaks the queue (WRONG_DIRECTION, the chain
    is not consumed); a chain shorter than the header or a frame longer
    than ``max_frame`` is consumed and dropped, counted through
    ``drops.drop(reason)`` when ``drops`` is given.  A disabled-but-started
    ring is drained the same way and its frames dropped (the spec's rule);
    the caller decides by ``vq.enabled`` whether to forward.  Does not
    notify."""
    frames: List[bytes] = []
    n = 0
    while n < limit:
        elem = vq.pop()
        if elem is None:
            break
        if elem.in_descs:
            refuse_wrong_direction(vq, elem, tx=True)
            break
        flen = elem.out_len - hdr_len
        if flen < 0:
            if drops is not None:
                drops.drop(DropReason.SHORT_FRAME)
        elif flen > max_frame:
            if drops is not None:
                drops.drop(DropReason.OVERSIZE_FRAME)
        else:
            sg = elem.out_sg
            data = b"".join(sg) if len(sg) != 1 else bytes(sg[0])
            frames.append(data[hdr_len:])
        vq.fill(elem, 0, n)
        n += 1
    if n:
        vq.flush(n)
    return frames


def push_rx_frames(vq: VirtQueue, frames: Sequence, hdr_len: int, mergeable: bool,
                   drops=None, max_frame: int = MAX_FRAME) -> int:
    """Write frames, in order, into the guest's RX buffers on ``vq``, each
    after a zeroed virtio-net header; with ``mergeable`` (MRG_RXBUF) a frame
    may span several buffers and ``num_buffers`` says how many.

    Follows :mod:`shardvu.ringrules`: a chain with a device-readable
    descriptor breaks the queue (WRONG_DIRECTION); a frame longer than
    ``max_frame``, or (without ``mergeable``) longer than its buffer, is
    dropped and counted through ``drops.drop(reason)`` while the buffer
    stays posted for the next frame.  Returns how many frames were consumed
    (delivered or dropped: a prefix of ``frames``); the rest found no
    buffers (or the queue broke).  Does not notify."""
    return push_rx_frames_counted(vq, frames, hdr_len, mergeable, drops, max_frame)[0]


def push_rx_frames_counted(vq: VirtQueue, frames: Sequence, hdr_len: int, mergeable: bool,
                           drops=None, max_frame: int = MAX_FRAME, counts=None) -> Tuple[int, int]:
    """:func:`push_rx_frames`, returning ``(frames consumed, payload bytes
    delivered)``; with ``counts`` (a worker's Counters) each frame delivered
    is counted in its size bin and cast (shardvu/framestats.py)."""
    consumed = nbytes = 0
    used = 0
    done: List = []         # frames delivered (counted at the end)
    for frame in frames:
        elem = vq.pop()
        if elem is None:
            break
        if elem.out_descs:
            refuse_wrong_direction(vq, elem, tx=False)
            break
        if len(frame) > max_frame:
            vq.unpop(elem)
            if drops is not None:
                drops.drop(DropReason.OVERSIZE_FRAME)
            consumed += 1
            continue
        size = hdr_len + len(frame)
        room = elem.in_len
        if not mergeable and room < size:
            vq.unpop(elem)
            if drops is not None:
                drops.drop(DropReason.RX_BUFFER_TOO_SMALL)
            consumed += 1
            continue
        # Gather every buffer the frame needs before writing any of them.
        elems = [(elem, room)]
        total = room
        while total < size:
            elem = vq.pop()
            if elem is None:
                break
            if elem.out_descs:
                refuse_wrong_direction(vq, elem, tx=False)
                break
            room = elem.in_len
            elems.append((elem, room))
            total += room
        if total < size:
            # out of buffers, or the queue broke: this frame is not delivered
            vq.rewind(len(elems))
            break
        # the header, with num_buffers (bytes 10..11) when it has one; it may
        # straddle buffers like any other byte
        hdr = _HDR12[len(elems)] if hdr_len == 12 and len(elems) < 8 else (
            bytes(10) + struct.pack("<H", len(elems)) if hdr_len == 12 else bytes(hdr_len))
        if len(elems) == 1:
            _scatter_at(elems[0][0].in_sg, 0, hdr + frame)
            elems[0] = (elems[0][0], size)
        else:
            data = hdr + bytes(frame)
            pos = 0
            for i, (e, room) in enumerate(elems):
                take = min(room, size - pos)
                _scatter_at(e.in_sg, 0, data[pos:pos + take])
                elems[i] = (e, take)
                pos += take
        for e, take in elems:
            vq.fill(e, take, used)
            used += 1
        consumed += 1
        nbytes += len(frame)
        done.append(frame)
    if counts is not None and done:
        add_batch(counts, done, len(done))
    if used:
        vq.flush(used)
    return consumed, nbytes


_HDR12 = [bytes(10) + struct.pack("<H", n) for n in range(8)]


def _scatter_at(sg: List[memoryview], offset: int, data: bytes) -> None:
    """Copy ``data`` into the concatenation of ``sg`` starting at ``offset``."""
    pos = 0
    for view in sg:
        if pos >= len(data):
            break
        if offset >= len(view):
            offset -= len(view)
            continue
        n = min(len(view) - offset, len(data) - pos)
        view[offset:offset + n] = data[pos:pos + n]
        pos += n
        offset = 0
