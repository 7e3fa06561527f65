"""The two-way port API: the ARP responder from the ports module's
documentation, run as ``--port module:ArpResponder`` in ``shardvu run``."""
from __future__ import annotations

import os
import socket
import textwrap

import dpkt
import pytest

from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime
from shardvu.workers import ports
from util import wait_for

GUEST_MAC = bytes.fromhex("020000000002")
RESPONDER_MAC = bytes.fromhex("0200000000fe")


def doc_example() -> str:
    """The example's code, exactly as the documentation shows it."""
    doc = ports.__doc__
    start = doc.index("    from shardvu.workers.ports import Port")
    end = doc.index("Run it with ``shardvu run --port mymodule:ArpResponder``")
    return textwrap.dedent(doc[start:end])


def arp_request(target: str) -> bytes:
    arp = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REQUEST, sha=GUEST_MAC, spa=socket.inet_aton("10.9.0.2"),
                       tha=bytes(6), tpa=socket.inet_aton(target))
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=GUEST_MAC,
                                        type=dpkt.ethernet.ETH_TYPE_ARP, data=arp))


@pytest.fixture
def responder(tmp_path, monkeypatch):
    (tmp_path / "arp_example.py").write_text(doc_example())
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rt = Runtime(str(tmp_path / "rt.sock"), 2, "arp_example:ArpResponder")
    yield rt
    if rt.proc.poll() is None:
        assert rt.stop() == 0


def test_resolve_two_way_class(tmp_path, monkeypatch):
    (tmp_path / "arp_example2.py").write_text(doc_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ports.resolve("arp_example2:ArpResponder")
    assert spec.rx_mode == "port" and spec.two_way.__name__ == "ArpResponder"
    assert spec.offloads == 0 and spec.tx_fn is None
    assert ports.resolve("loopback").two_way is None           # the simple forms stay


def test_arp_responder_answers_on_every_pair(responder):
    with Frontend(responder.sock, queue_pairs=2) as fe:
        fe.negotiate()
        for pair in (0, 1):
            fe.post_rx(pair, 16)
            others = [bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=GUEST_MAC, type=0x88B5,
                                                   data=bytes(50)))]
            assert fe.send(pair, others + [arp_request(f"10.9.0.{10 + pair}")]) == 2
        for pair in (0, 1):
            got = fe.receive(pair, timeout=5)
            assert len(got) == 1
            eth = dpkt.ethernet.Ethernet(got[0])
            assert eth.dst == GUEST_MAC and eth.src == RESPONDER_MAC
            arp = eth.data
            assert arp.op == dpkt.arp.ARP_OP_REPLY and arp.sha == RESPONDER_MAC
            assert arp.spa == socket.inet_aton(f"10.9.0.{10 + pair}") and arp.tha == GUEST_MAC
        wait_for(lambda: [responder.queue_stats()[q]["packets"] for q in range(4)] == [1, 2, 1, 2],
                 timeout=5, interval=0.1)
