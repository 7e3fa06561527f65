"""Offload features of NetIface: offered only as the port allows, the
spec's dependencies enforced at SET_FEATURES."""
from __future__ import annotations

import pytest

from shardvu import protocol as P
from shardvu.device import Device
from shardvu.net import OFFLOADS, NetIface, offload_dependency_error
from shardvu.protocol import Message, Request as R

B = {"CSUM": 0, "GUEST_CSUM": 1, "GUEST_TSO4": 7, "GUEST_TSO6": 8, "GUEST_ECN": 9,
     "GUEST_UFO": 10, "HOST_TSO4": 11, "HOST_TSO6": 12, "HOST_ECN": 13, "HOST_UFO": 14}


def bits(*names: str) -> int:
    return sum(1 << B[n] for n in names)


def set_features(dev: Device, features: int) -> bool:
    """SET_FEATURES with REPLY_ACK semantics: True when it was accepted."""
    return dev.handle(Message(R.SET_FEATURES, P.VERSION, P.pack_u64(features))).ok


def test_offered_only_when_the_port_carries_them():
    plain = Device(2, NetIface(1)).offered_features()
    assert not plain & OFFLOADS
    full = Device(2, NetIface(1, offloads=OFFLOADS)).offered_features()
    assert full & OFFLOADS == OFFLOADS == bits(*B)
    with pytest.raises(ValueError):
        NetIface(1, offloads=1 << 49)                    # not an offload bit


@pytest.mark.parametrize("features,missing", [
    (("GUEST_TSO4",), "GUEST_TSO4 requires VIRTIO_NET_F_GUEST_CSUM"),
    (("GUEST_TSO6",), "GUEST_TSO6 requires VIRTIO_NET_F_GUEST_CSUM"),
    (("GUEST_UFO",), "GUEST_UFO requires VIRTIO_NET_F_GUEST_CSUM"),
    (("GUEST_CSUM", "GUEST_ECN"), "GUEST_ECN requires VIRTIO_NET_F_GUEST_TSO4 or VIRTIO_NET_F_GUEST_TSO6"),
    (("HOST_TSO4",), "HOST_TSO4 requires VIRTIO_NET_F_CSUM"),
    (("HOST_TSO6",), "HOST_TSO6 requires VIRTIO_NET_F_CSUM"),
    (("HOST_UFO",), "HOST_UFO requires VIRTIO_NET_F_CSUM"),
    (("CSUM", "HOST_ECN"), "HOST_ECN requires VIRTIO_NET_F_HOST_TSO4 or VIRTIO_NET_F_HOST_TSO6"),
])
def test_dependency_refused(features, missing):
    assert missing in offload_dependency_error(bits(*features))
    dev = Device(2, NetIface(1, offloads=OFFLOADS))
    ok_set = bits("CSUM", "GUEST_CSUM")
    assert set_features(dev, ok_set)
    assert not set_features(dev, bits(*features))
    assert dev.features == ok_set                       # unchanged by the refusal


@pytest.mark.parametrize("features", [
    (), ("CSUM",), ("GUEST_CSUM",), tuple(B),
    ("GUEST_CSUM", "GUEST_TSO6", "GUEST_ECN"), ("CSUM", "HOST_TSO4", "HOST_ECN", "HOST_UFO"),
])
def test_consistent_sets_accepted(features):
    dev = Device(2, NetIface(1, offloads=OFFLOADS))
    f = bits(*features) | P.bit(P.VIRTIO_F_VERSION_1)
    assert offload_dependency_error(f) is None
    assert set_features(dev, f) and dev.features == f


def test_not_offered_refused():
    dev = Device(2, NetIface(1))
    assert not set_features(dev, bits("CSUM"))
