"""Wire-format codecs and the sans-IO reader."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from shardvu import protocol as P
from shardvu.protocol import Message, MessageReader, ProtocolError, Request as R


def test_header_is_12_bytes_and_payloads_have_c_sizes():
    assert P.HEADER_SIZE == 12
    assert len(P.VringState(1, 2).pack()) == 8
    assert len(P.VringAddr(0, 0, 1, 2, 3, 4).pack()) == 40
    assert len(P.MemoryRegion(0, 1, 2, 3).pack()) == 32
    assert len(P.MemoryTable((P.MemoryRegion(0, 1, 2, 3),)).pack()) == 8 + 32
    assert len(P.MemRegMsg(P.MemoryRegion(0, 1, 2, 3)).pack()) == 40
    assert len(P.LogArea(1, 2).pack()) == 16
    assert len(P.VringArea(1, 2, 3).pack()) == 24
    assert len(P.InflightDesc(1, 2, 3, 4).pack()) == 24
    assert len(P.IotlbMsg(1, 2, 3, 4, 5).pack()) == 32
    assert len(P.ConfigMsg(0, 4, 0, b"abcd").pack()) == 16


@pytest.mark.parametrize("obj", [
    P.VringState(3, 256), P.VringAddr(1, 1, 0x1000, 0x3000, 0x2000, 0x9000),
    P.LogArea(4096, 0), P.VringArea(2, 4096, 0), P.InflightDesc(8192, 0, 4, 256),
    P.IotlbMsg(0x1000, 0x2000, 0x7f00, 3, 2), P.MemRegMsg(P.MemoryRegion(0, 1 << 20, 0x7f00, 0)),
    P.MemoryTable(tuple(P.MemoryRegion(i << 20, 1 << 20, 0x7f00 + (i << 20), 0) for i in range(8))),
    P.ConfigMsg(2, 3, 0, b"xyz"),
])
def test_payload_round_trip(obj):
    assert type(obj).unpack(obj.pack()) == obj


def test_memory_table_rejects_too_many_regions_and_bad_size():
    raw = P.MemoryTable(tuple(P.MemoryRegion(0, 1, 0, 0) for _ in range(8))).pack()
    with pytest.raises(ProtocolError):
        P.MemoryTable.unpack(b"\x09\0\0\0\0\0\0\0" + raw[8:] + bytes(32))
    with pytest.raises(ProtocolError):
        P.MemoryTable.unpack(raw[:-1])


def test_config_size_must_match_payload():
    with pytest.raises(ProtocolError):
        P.ConfigMsg.unpack(P.ConfigMsg(0, 4, 0, b"abcd").pack()[:-1])
    with pytest.raises(ProtocolError):
        P.ConfigMsg.unpack(P.ConfigMsg(0, 300, 0, bytes(300)).pack())


def test_every_seed_request_has_a_size_rule():
    for req in R:
        if req is not R.NONE:
            assert req in P.PAYLOAD_SIZE, req
    assert R.RESET_DEVICE == 34 and R.SET_STATUS == 39 and R.GET_STATUS == 40
    assert R.SET_SLAVE_REQ_FD is R.SET_BACKEND_REQ_FD
    assert P.SlaveRequest.VRING_CALL == P.BackendRequest.VRING_CALL == 4


@pytest.mark.parametrize("req,size", [
    (R.SET_FEATURES, 4), (R.GET_FEATURES, 8), (R.SET_VRING_NUM, 12), (R.SET_VRING_ADDR, 32),
    (R.SET_MEM_TABLE, 4), (R.ADD_MEM_REG, 32), (R.SET_INFLIGHT_FD, 20), (R.GET_CONFIG, 4),
])
def test_validate_size_rejects_mismatches(req, size):
    with pytest.raises(ProtocolError) as exc:
        P.validate_size(Message(req, P.VERSION, bytes(size)))
    assert exc.value.request == req


def test_validate_size_rejects_unknown_request():
    with pytest.raises(ProtocolError, match="unknown"):
        P.validate_size(Message(99, P.VERSION, b""))


def test_reader_reassembles_split_messages_and_attaches_fds():
    data = P.encode(R.SET_FEATURES, P.pack_u64(5)) + P.encode(R.SET_VRING_KICK, P.pack_u64(1))
    r = MessageReader()
    r.feed(data[:5])
    assert r.next_message() is None
    r.feed(data[5:20], [7])
    m1 = r.next_message()
    assert (m1.request, m1.u64(), m1.fds) == (R.SET_FEATURES, 5, [7])
    assert r.next_message() is None
    r.feed(data[20:])
    m2 = r.next_message()
    assert (m2.request, m2.u64(), m2.fds) == (R.SET_VRING_KICK, 1, [])


def test_reader_gives_fds_to_the_message_that_ends_the_read():
    # The kernel ends a read after the data that carried fds, so several
    # fd-less messages may precede it in one read (DPDK's virtio-user does this).
    a = P.encode(R.SET_PROTOCOL_FEATURES, P.pack_u64(1))
    b = P.encode(R.SET_VRING_CALL, P.pack_u64(0))
    r = MessageReader()
    r.feed(a + b, [9])
    m1, m2 = r.next_message(), r.next_message()
    assert (m1.request, m1.fds) == (R.SET_PROTOCOL_FEATURES, [])
    assert (m2.request, m2.fds) == (R.SET_VRING_CALL, [9])
    # fds sent with the header only, payload in a later read
    r.feed(b[:12], [4])
    assert r.next_message() is None
    r.feed(b[12:])
    assert r.next_message().fds == [4]


def test_reader_rejects_huge_size_and_bad_version():
    r = MessageReader()
    r.feed(P.HEADER.pack(R.SET_FEATURES, P.VERSION, 1 << 30))
    with pytest.raises(ProtocolError, match="exceeds"):
        r.next_message()
    r = MessageReader()
    r.feed(P.HEADER.pack(R.SET_FEATURES, 2, 0))
    with pytest.raises(ProtocolError, match="version"):
        r.next_message()


@given(st.binary(max_size=200))
def test_reader_never_raises_anything_but_protocol_error(blob):
    r = MessageReader()
    r.feed(blob)
    try:
        while r.next_message() is not None:
            pass
    except ProtocolError:
        pass


def test_request_code_0_is_a_protocol_error_not_a_key_error():
    """Code 0 (NONE) is in the enum but has no payload size: it used to
    raise KeyError out of validate_size, which killed the control process."""
    with pytest.raises(ProtocolError) as exc:
        P.validate_size(Message(0))
    assert exc.value.request == 0 and "request code 0" in exc.value.reason


@given(st.integers(0, 0xFFFFFFFF), st.binary(max_size=300))
def test_validate_size_raises_only_protocol_errors(code, payload):
    """Whatever the code and payload: accepted, or a ProtocolError that
    names the request code."""
    try:
        P.validate_size(Message(code, P.VERSION, payload))
    except ProtocolError as exc:
        assert exc.request == code
        return
    assert code in P.PAYLOAD_SIZE
