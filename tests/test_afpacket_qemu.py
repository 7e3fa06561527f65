"""A real QEMU guest (4 queue pairs) on ``--port af_packet:va``, over a veth
pair whose far end (vb, 10.77.0.1) lives in a second namespace the test
creates: ping, and 48 MiB (50.3 MB) each way over 4 TCP flows with
matching md5 at both ends, offloads negotiated and GSO frames crossing the
veth in both directions.  Uses tests/test_qemu.py's lab and guest."""
from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from afnet import entered, veth
from nsutil import can_netns
from test_qemu import TAP_OFFLOADS, _qemu_ok, _guest_ok, _qemu_why, _guest_why, errors, \
    guest_image, lab  # noqa: F401  (fixtures)
import test_qemu

pytestmark = [
    pytest.mark.skipif(not _qemu_ok, reason=_qemu_why),
    pytest.mark.skipif(_qemu_ok and not _guest_ok, reason=_guest_why),
    pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok"),
]

HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"


def test_guest_ping_and_tcp_both_ways_on_4_pairs(lab):
    queues, flows, mib = 4, 4, 48
    per = mib // flows << 20
    with veth() as (nsa, nsb):
        rt = lab.runtime(queues, "af_packet:va")
        with entered(nsb):
            from nsutil import sh
            sh(f"ip addr add {HOST_IP}/24 dev vb")
            stop, big = threading.Event(), {}
            sniffer = test_qemu._sniff("vb", stop, big)
            got: dict = {}
            sinks = [test_qemu._tcp_sink(5001 + i, per, got) for i in range(flows)]
        g = lab.guest(queues, "tcp", f"shardvu.ip={GUEST_IP}/24 shardvu.peer={HOST_IP} "
                      f"shardvu.count=5 shardvu.mb={mib} shardvu.flows={flows}", mem="1G").start()
        try:
            g.wait_for(r"SHARDVU listening", timeout=600)
            sent = []
            for i in range(flows):
                data = os.urandom(per)
                sent.append(data)
                with entered(nsb):
                    c = socket.create_connection((GUEST_IP, 5101 + i), timeout=60)
                with c:
                    c.sendall(data)
            res = g.wait_done(timeout=900)
        finally:
            stop.set()
            sniffer.join(2)
        for t in sinks:
            t.join(5)
        stats = rt.settled_stats()
    assert "error" not in res, res["error"]
    ping = res["ping"][0]
    assert ping["received"] == ping["transmitted"] == 5
    bits = res["features"][0]["virtio"][1:]
    negotiated = {name for name, b in TAP_OFFLOADS.items() if len(bits) > b and bits[b] == "1"}
    assert {"CSUM", "GUEST_CSUM", "GUEST_TSO4", "HOST_TSO4"} <= negotiated, bits
    out_sum, in_sum = res["sum"]
    assert out_sum["dir"] == "out" and out_sum["bytes"] == flows * per
    assert sorted(got) == [5001 + i for i in range(flows)]
    assert out_sum["md5"] == hashlib.md5(b"".join(got[5001 + i] for i in range(flows))).hexdigest()
    assert in_sum["dir"] == "in" and in_sum["bytes"] == flows * per
    assert in_sum["md5"] == hashlib.md5(b"".join(sent)).hexdigest()
    assert big["from_guest"] > 1514 and big["to_guest"] > 1514, big
    quiet = [q for q in range(2 * queues) if stats[q]["packets"] == 0]
    assert not quiet, f"queues that carried nothing: {quiet}"
    assert not errors(rt), errors(rt)
    print(f"af_packet guest: ping avg {ping['avg_ms']} ms, largest frames {big}, "
          f"negotiated {sorted(negotiated)}, "
          f"per-queue packets {[stats[q]['packets'] for q in range(2 * queues)]}")
