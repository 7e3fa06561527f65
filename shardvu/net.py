"""virtio-net on top of :mod:`shardvu.device`: features, config space and
the frame-level helpers a network back-end needs.

Queue layout (virtio-net): queue ``2*i`` is pair ``i``'s receive queue (the
device writes frames for the guest), ``2*i+1`` its transmit queue (the guest
sends).  "rx" and "tx" are always the guest's view.
"""
from __future__ import annotations

import struct
from typing import List, Optional

from . import protocol as P
from .device import Device, DeviceIface
from .protocol import ProtocolFeature as PF
from .virtqueue import VirtQueue

__all__ = ["NetIface", "net_hdr_len", "pop_tx_frames", "push_rx_frames", "parse_mac",
           "OFFLOADS", "offload_dependency_error"]

VIRTIO_NET_S_LINK_UP = 1

# virtio-net offload feature bits (virtio 1.2, 5.1.3)
F_CSUM, F_GUEST_CSUM = 0, 1
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 7, 8, 9, 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 11, 12, 13, 14
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
    (:func:`offload_dependency_error`)."""

    def __init__(self, queue_pairs: int, mac: Optional[bytes] = None, mtu: int = 0,
                 in_order: bool = False, offloads: int = 0):
        if offloads & ~OFFLOADS:
            raise ValueError(f"not offload features: {offloads & ~OFFLOADS:#x}")
        self.offloads = offloads
        self.queue_pairs = queue_pairs
        #: offer VIRTIO_F_IN_ORDER: only for a data path that completes every
        #: queue's buffers in the order it popped them
        self.in_order = in_order
        self.mac = mac or b"\x52\x54\x00\x00\x00\x01"
        self.mtu = mtu
        self.status = VIRTIO_NET_S_LINK_UP

    def get_features(self, dev: Device) -> int:
        f = (P.bit(P.VIRTIO_NET_F_MRG_RXBUF) | P.bit(P.VIRTIO_NET_F_MAC)
             | P.bit(P.VIRTIO_NET_F_STATUS) | P.bit(P.VIRTIO_NET_F_MQ))
        if self.mtu:
            f |= P.bit(P.VIRTIO_NET_F_MTU)
        if self.in_order:
            f |= P.bit(P.VIRTIO_F_IN_ORDER)
        return f | self.offloads

    def check_features(self, dev: Device, features: int) -> Optional[str]:
        return offload_dependency_error(features)

    def queue_is_processed_in_order(self, dev: Device, qidx: int) -> bool:
        return self.in_order

    def get_protocol_features(self, dev: Device) -> int:
        return P.bit(PF.NET_MTU)

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


def pop_tx_frames(vq: VirtQueue, hdr_len: int, limit: int = 256) -> List[bytes]:
    """Take up to ``limit`` frames the guest sent on TX queue ``vq``, return
    their used buffers (length 0), and return the frames without the
    virtio-net header.  A disabled-but-started ring is drained the same way
    and its frames dropped (the spec's rule); the caller decides by
    ``vq.enabled`` whether to forward.  Does not notify."""
    frames: List[bytes] = []
    n = 0
    while n < limit:
        elem = vq.pop()
        if elem is None:
            break
        data = b"".join(elem.out_sg)
        frames.append(data[hdr_len:])
        vq.fill(elem, 0, n)
        n += 1
    if n:
        vq.flush(n)
    return frames


def push_rx_frames(vq: VirtQueue, frames: List[bytes], hdr_len: int, mergeable: bool) -> int:
    """Write frames into the guest's RX buffers on ``vq``, each after a zeroed
    virtio-net header; with ``mergeable`` (MRG_RXBUF) a frame may span several
    buffers and ``num_buffers`` says how many.  Returns how many frames were
    delivered; the rest did not fit (no buffers posted).  Does not notify."""
    delivered = 0
    used = 0
    for frame in frames:
        data = bytes(hdr_len) + frame
        elems = []
        pos = 0
        while pos < len(data):
            elem = vq.pop()
            if elem is None:
                break
            room = sum(len(v) for v in elem.in_sg)
            take = min(room, len(data) - pos)
            _scatter(elem.in_sg, data[pos:pos + take])
            elems.append((elem, take))
            pos += take
            if not mergeable:
                break
        if pos < len(data):
            # Out of buffers (or a buffer too small without MRG_RXBUF):
            # give back what this frame took and stop.
            for elem, _ in reversed(elems):
                vq.unpop(elem)
            if elems and not mergeable:
                # a too-small buffer would block the ring forever: consume it
                elem = vq.pop()
                if elem is not None:
                    vq.fill(elem, 0, used)
                    used += 1
            break
        if hdr_len == 12:
            # num_buffers is bytes 10..11 of the header, which may straddle buffers.
            _scatter_at(elems[0][0].in_sg, 10, struct.pack("<H", len(elems)))
        for elem, take in elems:
            vq.fill(elem, take, used)
            used += 1
        delivered += 1
    if used:
        vq.flush(used)
    return delivered


def _scatter(sg: List[memoryview], data: bytes) -> None:
    _scatter_at(sg, 0, data)


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
