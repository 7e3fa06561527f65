"""Kernel ports across a kill -9 (docs/crash-isolation.md): a tap queue
cannot make its write (or read) and the ring's used-index store atomic, so
the promise is *at most the frames in flight at the kill are repeated (TX)
or lost (RX), and counted*.  Measured on the tap's own counters, with
shardvu's front-end on one side and the test's namespace on the other."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from nsutil import can_netns, netns, sh
from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime
from shardvu.workers import tap as T
from test_tap_runtime import GUEST_IP, OTHER_MAC, _addresses, _frame
from util import wait_for

pytestmark = pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok")

#: frames in flight can never exceed one ring's worth of buffers
IN_FLIGHT = 256


@pytest.fixture
def tap_rt(tmp_path):
    made = []

    def start(ifname: str) -> Runtime:
        rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), 1, f"tap:{ifname}")
        made.append(rt)
        return rt
    with netns("shvkp"):
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        yield start
        for rt in made:
            if rt.proc.poll() is None:
                assert rt.stop() == 0, rt.log()


def _kill(rt: Runtime, q: int) -> int:
    pid = rt.queue_stats()[q]["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: rt.queue_stats()[q]["worker_pid"] not in (None, pid), timeout=15, interval=0.02)
    return pid


def test_kill9_of_the_tap_tx_worker_repeats_at_most_the_frames_in_flight(tap_rt):
    rt = tap_rt("shvkt")
    with Frontend(rt.sock, queue_pairs=1) as fe:
        fe.negotiate()
        before = T.link_stats("shvkt")
        sent = 0
        for rnd in range(40):
            frames = [_frame(OTHER_MAC, rnd * 1000 + i) for i in range(100)]
            done, deadline = 0, time.monotonic() + 10
            while done < len(frames):
                done += fe.send(0, frames[done:])
                fe.reclaim_tx(0)
                assert time.monotonic() < deadline, "TX ring stayed full"
            sent += done
            if rnd == 20:
                _kill(rt, 1)            # mid-stream: the ring holds frames in flight

        def on_tap() -> int:
            st = T.link_stats("shvkt")
            return st["rx_packets"] + st["rx_dropped"] - before["rx_packets"] - before["rx_dropped"]
        wait_for(lambda: on_tap() >= sent, timeout=10, interval=0.1)
        time.sleep(0.3)
        repeated = on_tap() - sent
        print(f"tap TX kill: {sent} sent, {on_tap()} on the tap, {repeated} repeated")
        assert 0 <= repeated <= IN_FLIGHT
        assert rt.queue_stats()[1]["restarts"] == 1


def test_kill9_of_the_tap_rx_worker_loses_at_most_the_frames_in_flight(tap_rt):
    rt = tap_rt("shvkr")
    with Frontend(rt.sock, queue_pairs=1) as fe:
        fe.negotiate()
        _addresses("shvkr")
        fe.post_rx(0, 256)
        before = T.link_stats("shvkr")["tx_packets"]
        stop = threading.Event()

        def feed() -> None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            while not stop.is_set():
                for port in range(9000, 9010):
                    s.sendto(b"to the guest", (GUEST_IP, port))
                time.sleep(0.002)
            s.close()
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        got, killed = 0, False
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 4.0:
                got += len(fe.receive(0, timeout=0.05))
                fe.post_rx(0, 256)
                if not killed and time.monotonic() - t0 > 2.0:
                    _kill(rt, 0)
                    killed = True
        finally:
            stop.set()
            feeder.join(2)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            got += len(fe.receive(0, timeout=0.2))
            fe.post_rx(0, 256)
        read = T.link_stats("shvkr")["tx_packets"] - before     # taken from the tap by workers
        drops = rt.queue_stats()[0]["drops"]
        lost = read - got - drops
        print(f"tap RX kill: {read} read from the tap, {got} delivered, {drops} dropped, {lost} lost")
        assert got > 1000
        assert 0 <= lost <= IN_FLIGHT
        assert rt.queue_stats()[0]["restarts"] == 1


def test_kill9_of_the_af_packet_tx_worker_repeats_at_most_the_frames_in_flight(tmp_path):
    """The same bound on ``--port af_packet`` (a TPACKET_V2 TX ring on a
    veth): numbered frames, each seen on the peer end; none lost, repeats
    only of frames in flight."""
    import struct
    from afnet import drain, raw_socket, veth
    mark = b"\x88\xb5"
    with veth("shvkaf") as (nsa, nsb):
        rt = Runtime(str(tmp_path / "rt.sock"), 1, "af_packet:va")
        peer = raw_socket(nsb, "vb")
        try:
            with Frontend(rt.sock, queue_pairs=1) as fe:
                fe.negotiate()
                sent, got = 0, []
                for rnd in range(30):
                    frames = [b"\x02\x00\x00\x00\x00\xbb\x02\x00\x00\x00\x00\xaa" + mark
                              + struct.pack(">I", rnd * 100 + i) + bytes(46) for i in range(100)]
                    done, deadline = 0, time.monotonic() + 10
                    while done < len(frames):
                        done += fe.send(0, frames[done:])
                        fe.reclaim_tx(0)
                        assert time.monotonic() < deadline, "TX ring stayed full"
                    sent += done
                    if rnd == 15:
                        _kill(rt, 1)
                    got += drain(peer, lambda f: f[12:14] == mark, timeout=0.01)
                got += drain(peer, lambda f: f[12:14] == mark, timeout=1.0)
            seqs = [struct.unpack_from(">I", f, 14)[0] for f in got]
            lost = set(range(sent)) - set(seqs)
            repeated = len(seqs) - len(set(seqs))
            print(f"af_packet TX kill: {sent} sent, {len(seqs)} on the peer, {repeated} repeated, {len(lost)} lost")
            assert not lost
            assert repeated <= IN_FLIGHT
            assert rt.queue_stats()[1]["restarts"] == 1
        finally:
            peer.close()
            assert rt.stop() == 0, rt.log()


def test_kill9_of_the_udp_tx_worker_repeats_at_most_the_frames_in_flight(tmp_path):
    """The same bound on ``--port udp`` (one datagram per frame), counted at
    a plain socket peer with a receive buffer that holds the whole test."""
    import struct
    from test_udp_port import _free_base
    with netns("shvkud"):
        a, b = _free_base(n=1), _free_base(n=1)
        while a == b:
            b = _free_base(n=1)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)        # SO_RCVBUFFORCE
        peer.bind(("127.0.0.1", b))
        peer.setblocking(False)
        rt = Runtime(str(tmp_path / "rt.sock"), 1, f"udp:127.0.0.1:{a},127.0.0.1:{b}")
        seqs: list = []

        def take() -> None:
            while True:
                try:
                    d = peer.recv(2048)
                except BlockingIOError:
                    return
                if d[12:14] == b"\x88\xb5":
                    seqs.append(struct.unpack_from(">I", d, 14)[0])
        try:
            with Frontend(rt.sock, queue_pairs=1) as fe:
                fe.negotiate()
                sent = 0
                for rnd in range(30):
                    frames = [b"\x02\x00\x00\x00\x00\xbb\x02\x00\x00\x00\x00\xaa\x88\xb5"
                              + struct.pack(">I", rnd * 100 + i) + bytes(46) for i in range(100)]
                    done, deadline = 0, time.monotonic() + 10
                    while done < len(frames):
                        done += fe.send(0, frames[done:])
                        fe.reclaim_tx(0)
                        take()
                        assert time.monotonic() < deadline, "TX ring stayed full"
                    sent += done
                    if rnd == 15:
                        _kill(rt, 1)
                deadline = time.monotonic() + 5
                while len(set(seqs)) < sent and time.monotonic() < deadline:
                    take()
                    time.sleep(0.05)
                time.sleep(0.3)
                take()
            lost = set(range(sent)) - set(seqs)
            repeated = len(seqs) - len(set(seqs))
            print(f"udp TX kill: {sent} sent, {len(seqs)} at the peer, {repeated} repeated, {len(lost)} lost")
            assert not lost
            assert repeated <= IN_FLIGHT
            assert rt.queue_stats()[1]["restarts"] == 1
        finally:
            peer.close()
            assert rt.stop() == 0, rt.log()
