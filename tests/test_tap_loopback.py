"""The loopback port with checksum offload: a frame with a partial checksum
comes back only to a guest that negotiated GUEST_CSUM; GSO frames are not
offered and are dropped (OFFLOAD_NOT_NEGOTIATED) if a guest sends one."""
from __future__ import annotations

import struct

import pytest

from shardvu.testing.frontend import DEFAULT_FEATURES, Frontend
from shardvu.testing.runtime import Runtime
from shardvu.workers.ports import LOOPBACK_OFFLOADS, loop_offload
from util import wait_for

_HDR = struct.Struct("<BBHHHHH")
CSUM, GUEST_CSUM = 1 << 0, 1 << 1


@pytest.fixture
def loopback(tmp_path):
    rt = Runtime(str(tmp_path / "lb.sock"), 1, "loopback")
    yield rt
    assert rt.stop() == 0


def frame(n: int, size: int = 80) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes([n]) * (size - 14)


def test_filter_rules():
    drops = []
    drop = lambda reason, n: drops.append((reason.value, n))    # noqa: E731
    plain = bytes(12) + frame(1)
    partial = _HDR.pack(1, 0, 0, 0, 34, 6, 0) + frame(2)
    gso = _HDR.pack(1, 1, 54, 1448, 34, 16, 0) + frame(3)
    out = loop_offload([plain, partial, gso], CSUM | GUEST_CSUM, 12, drop)
    assert [f[12:] for f in out] == [frame(1), frame(2)]
    assert all(f[10:12] == b"\x01\x00" for f in out)
    assert drops == [("offload_not_negotiated", 1)]
    drops.clear()
    assert [f[12:] for f in loop_offload([plain, partial], CSUM, 12, drop)] == [frame(1)]
    assert drops == [("offload_not_negotiated", 1)]


def test_offered_and_partial_checksum_passes_with_guest_csum(loopback):
    with Frontend(loopback.sock, features=DEFAULT_FEATURES | CSUM | GUEST_CSUM) as fe:
        fe.negotiate()
        assert fe.offered_features & LOOPBACK_OFFLOADS == LOOPBACK_OFFLOADS
        assert fe.features & (CSUM | GUEST_CSUM) == CSUM | GUEST_CSUM
        fe.post_rx(0, 32)
        hdr = _HDR.pack(1, 0, 0, 0, 34, 6, 0)
        assert fe.send(0, [frame(7)], header=hdr) == 1
        assert fe.send(0, [frame(8)]) == 1
        got = fe.receive(0, timeout=5, min_frames=2, keep_header=True)
        assert [g[12:] for g in got] == [frame(7), frame(8)]
        assert _HDR.unpack(got[0][:12]) == (1, 0, 0, 0, 34, 6, 1)
        assert _HDR.unpack(got[1][:12])[0] == 0


def test_without_guest_csum_dropped_and_counted(loopback):
    with Frontend(loopback.sock, features=DEFAULT_FEATURES | CSUM) as fe:
        fe.negotiate()
        fe.post_rx(0, 32)
        assert fe.send(0, [frame(1)], header=_HDR.pack(1, 0, 0, 0, 34, 6, 0)) == 1
        assert fe.send(0, [frame(2)], header=_HDR.pack(1, 1, 54, 1448, 34, 16, 0)) == 1
        assert fe.send(0, [frame(3)]) == 1
        got = fe.receive(0, timeout=5)
        assert got == [frame(3)]
        wait_for(lambda: loopback.queue_stats()[1]["drops_by_reason"]["offload_not_negotiated"] == 2,
                 timeout=5, interval=0.1)
        assert loopback.queue_stats()[1]["packets"] == 1


def test_without_offloads_the_fused_path_is_unchanged(loopback):
    with Frontend(loopback.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 256)
        frames = [frame(i & 0xFF, 60 + i) for i in range(200)]
        assert fe.send(0, frames) == 200
        got = []
        while len(got) < 200:
            more = fe.receive(0, timeout=5, min_frames=200 - len(got))
            assert more
            got += more
        assert got == frames
