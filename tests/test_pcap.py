"""``--pcap FILE``: the capture read back with dpkt's pcapng blocks, exact
frame counts per queue pair (interface) and direction; the size limit;
an unwritable path.  Traffic over the udp port on 127.0.0.1."""
from __future__ import annotations

import socket
import struct
import subprocess
import sys

import dpkt.pcapng as ng
import pytest

from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime
from test_udp_port import _free_base, frames
from util import wait_for


def read_pcapng(path: str):
    """(interface names, [(iface, direction, caplen, pkt_len, data)])."""
    raw = open(path, "rb").read()
    names, out = [], []
    pos = 0
    while pos + 8 <= len(raw):
        btype, blen = struct.unpack_from("<II", raw, pos)
        block = raw[pos:pos + blen]
        if btype == ng.PCAPNG_BT_IDB:
            idb = ng.InterfaceDescriptionBlockLE(block)
            names.append(next(o.data for o in idb.opts if o.code == ng.PCAPNG_OPT_IF_NAME))
        elif btype == ng.PCAPNG_BT_EPB:
            epb = ng.EnhancedPacketBlockLE(block)
            flags = next(struct.unpack("<I", o.data)[0] for o in epb.opts if o.code == 2)
            out.append((epb.iface_id, "in" if flags & 3 == 1 else "out", epb.caplen,
                        epb.pkt_len, bytes(epb.pkt_data)))
        pos += blen
    assert pos == len(raw)
    return names, out


def _run(tmp_path, *extra, queues: int = 2):
    a, b = _free_base(n=queues), _free_base(n=queues)
    while abs(a - b) < queues:
        b = _free_base(n=queues)
    rt = Runtime(str(tmp_path / "rt.sock"), queues, f"udp:127.0.0.1:{a},127.0.0.1:{b}", *extra)
    peers = []
    for i in range(queues):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", b + i))
        s.settimeout(5)
        peers.append(s)
    return rt, a, peers


def test_every_frame_by_pair_and_direction(tmp_path):
    pcap = str(tmp_path / "cap.pcapng")
    rt, a, peers = _run(tmp_path, "--pcap", pcap)
    try:
        with Frontend(rt.sock, queue_pairs=2) as fe:
            fe.negotiate()
            for pair in (0, 1):
                fe.post_rx(pair, 64)
            sent = {0: frames(0, 5), 1: frames(1, 7, size=1400)}
            back = {0: frames(10, 3), 1: frames(11, 4)}
            for pair in (0, 1):
                fe.send(pair, sent[pair])
                for _ in sent[pair]:
                    peers[pair].recvfrom(4096)
                for f in back[pair]:
                    peers[pair].sendto(f, ("127.0.0.1", a + pair))
            for pair in (0, 1):
                assert fe.receive(pair, timeout=5, min_frames=len(back[pair])) == back[pair]
        assert rt.stop() == 0
        names, recs = read_pcapng(pcap)
        assert names == [b"pair0", b"pair1"]
        for pair in (0, 1):
            assert [r[4] for r in recs if r[:2] == (pair, "out")] == sent[pair]
            assert [r[4] for r in recs if r[:2] == (pair, "in")] == back[pair]
        assert len(recs) == 5 + 7 + 3 + 4
        assert all(r[2] == r[3] for r in recs)
        assert "pcap: 19 frames written; dropped (ring full) by queue: 0:0, 1:0, 2:0, 3:0" \
            in rt.log()
    finally:
        for s in peers:
            s.close()
        if rt.proc.poll() is None:
            rt.stop()


def test_limit_stops_capture_and_says_so(tmp_path):
    pcap = str(tmp_path / "cap.pcapng")
    rt, a, peers = _run(tmp_path, "--pcap", pcap, "--pcap-limit", "4096", queues=1)
    try:
        with Frontend(rt.sock, queue_pairs=1) as fe:
            fe.negotiate()
            fe.send(0, frames(0, 40, size=200))
            for _ in range(40):
                peers[0].recvfrom(4096)
            wait_for(lambda: "--pcap-limit 4096 bytes reached" in rt.log(), timeout=5,
                     interval=0.1)
        assert rt.stop() == 0
        import os
        assert os.path.getsize(pcap) <= 4096
        _, recs = read_pcapng(pcap)
        assert 0 < len(recs) < 40
        assert [r[4] for r in recs] == frames(0, len(recs), size=200)
    finally:
        for s in peers:
            s.close()
        if rt.proc.poll() is None:
            rt.stop()


@pytest.mark.parametrize("args,needle", [
    (["--port", "udp:127.0.0.1:7300,127.0.0.1:7400", "--pcap", "/nonexistent/dir/x.pcapng"],
     "cannot write it"),
    (["--port", "sink", "--pcap", "/nonexistent/dir/x.pcapng"], "cannot write it"),
    (["--port", "loopback", "--pcap", "/tmp", "--pcap-limit", "0"], "cannot write it"),
])
def test_bad_pcap_one_line_exit(tmp_path, args, needle):
    r = subprocess.run([sys.executable, "-m", "shardvu.cli", "run", "--socket",
                        str(tmp_path / "s.sock"), *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], r.stderr
