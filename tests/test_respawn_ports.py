"""Kernel ports across a kill -9 (docs/crash-isolation.md): a tap queue
cannot make its write (or read) and the ring's used-index store atomic, so
the promise is *at most the frames in flight at the kill are repeated (TX)
or lost (RX), and counted*.  Measured on the port's own counters (the
tap's, the veth's, the namespace's UDP counters) and, on af_packet and udp,
with numbered frames, with shardvu's front-end on one side and the test's
namespace on the other."""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest

from nsutil import can_netns, netns, sh
from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime
from shardvu.workers import tap as T
from shardvu.workers.worker import BATCH
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


#: an RX worker holds at most one batch (workers/worker.py BATCH, 64) taken
#: from the port and not yet published in the guest's used ring: PortRx
#: reads the port only when nothing is pending, and each pass publishes
#: what it wrote.  A kill loses at most those; nothing more may go missing
#: uncounted.
RX_IN_FLIGHT = BATCH


#: the numbered frames the RX drills send towards the guest
_RX_HEAD = b"\x02\x00\x00\x00\x00\xaa\x02\x00\x00\x00\x00\xbb\x88\xb5"


def _kill_rx_mid_stream(rt: Runtime, fe: Frontend, send, seconds: float = 4.0) -> dict:
    """Numbered 60-byte frames from the port's far side (``send(frame)``;
    BlockingIOError: not taken now, sent again later), about 10 every 2 ms,
    while ``fe`` posts RX buffers and takes what arrives; the RX worker
    (queue 0) is killed -9 halfway, the stream goes on, then what is still
    queued is drained.  Returns sent, seqs (the numbers received, in
    arrival order), after (how many arrived after the kill) and the killed
    pid."""
    fe.post_rx(0, 256)
    stop = threading.Event()
    sent = [0]

    def feed() -> None:
        while not stop.is_set():
            for _ in range(10):
                try:
                    send(_RX_HEAD + struct.pack(">I", sent[0]) + bytes(42))
                except BlockingIOError:
                    break
                sent[0] += 1
            time.sleep(0.002)
    feeder = threading.Thread(target=feed, daemon=True)

    def take(timeout: float) -> None:
        seqs.extend(struct.unpack_from(">I", f, 14)[0]
                    for f in fe.receive(0, timeout=timeout) if f[:14] == _RX_HEAD)
        fe.post_rx(0, 256)
    seqs: list = []
    killed = at_kill = 0
    feeder.start()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            take(0.05)
            if not killed and time.monotonic() - t0 > seconds / 2:
                killed = _kill(rt, 0)
                at_kill = len(seqs)
    finally:
        stop.set()
        feeder.join(2)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        take(0.2)
    return {"sent": sent[0], "seqs": seqs, "after": len(seqs) - at_kill, "killed": killed}


def _assert_rx_kill(label: str, rt: Runtime, run: dict, arrived: int) -> None:
    """The RX promise for one drill: the queue came back (one restart, a new
    worker), frames kept arriving, none twice; frames lost uncounted, by
    the sequence numbers (sent, less delivered and the queue's counted
    drops) and by the counters (``arrived``: what the kernel counted as
    reaching the port, taken by a worker or dropped for a full ring or
    buffer; less the queue's packets and drops), between 0 and
    RX_IN_FLIGHT."""
    q = rt.queue_stats()[0]
    seqs, sent = run["seqs"], run["sent"]
    repeated = len(seqs) - len(set(seqs))
    lost = sent - len(set(seqs)) - q["drops"]
    lost_counted = arrived - q["packets"] - q["drops"]
    late = sum(1 for x, y in zip(seqs, seqs[1:]) if y < x)
    print(f"{label} RX kill: {sent} sent, {arrived} reached the port, {len(seqs)} delivered "
          f"({run['after']} after the kill; queue packets {q['packets']}), {q['drops']} dropped "
          f"{ {k: v for k, v in q['drops_by_reason'].items() if v} }, {repeated} repeated, "
          f"{late} out of order, {lost} lost (counters: {lost_counted})")
    assert q["restarts"] == 1 and q["worker_pid"] not in (None, run["killed"])
    assert run["after"] > 1000, "frames stopped arriving after the kill"
    assert repeated == 0
    assert late == 0, "the replacement did not read on where its predecessor stopped"
    assert arrived == sent
    assert 0 <= lost <= RX_IN_FLIGHT
    assert 0 <= lost_counted <= RX_IN_FLIGHT


def test_kill9_of_the_af_packet_rx_worker_loses_at_most_the_frames_in_flight(tmp_path):
    """Numbered frames sent on the veth's peer end (a raw socket in the
    second namespace) reach the front-end through ``--port af_packet``'s RX
    ring across a kill -9 of the RX worker.  What reached the port is va's
    ``rx_packets``: every frame va receives goes to the pair's socket,
    into the ring or counted (PACKET_STATISTICS) as dropped for a full
    one."""
    from afnet import raw_socket, veth
    with veth("shvkar") as (nsa, nsb):
        rt = Runtime(str(tmp_path / "rt.sock"), 1, "af_packet:va")
        peer = raw_socket(nsb, "vb")
        try:
            with Frontend(rt.sock, queue_pairs=1) as fe:
                fe.negotiate()
                before = T.link_stats("va")["rx_packets"]
                run = _kill_rx_mid_stream(rt, fe, peer.send)
                _assert_rx_kill("af_packet", rt, run, T.link_stats("va")["rx_packets"] - before)
        finally:
            peer.close()
            assert rt.stop() == 0, rt.log()


def _udp_counters() -> dict:
    """This namespace's Udp counters (/proc/net/snmp): InDatagrams counts
    datagrams read from a socket, RcvbufErrors those dropped for a full
    receive buffer."""
    with open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))


def test_kill9_of_the_udp_rx_worker_loses_at_most_the_frames_in_flight(tmp_path):
    """Numbered datagrams from a plain socket peer reach the front-end
    through ``--port udp`` across a kill -9 of the RX worker.  What reached
    the port: the namespace's datagrams read (only the workers read here)
    plus those the kernel dropped for a full receive buffer."""
    from test_udp_port import _free_base
    with netns("shvkur"):
        a, b = _free_base(n=1), _free_base(n=1)
        while a == b:
            b = _free_base(n=1)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", b))
        peer.setblocking(False)
        rt = Runtime(str(tmp_path / "rt.sock"), 1, f"udp:127.0.0.1:{a},127.0.0.1:{b}")
        try:
            with Frontend(rt.sock, queue_pairs=1) as fe:
                fe.negotiate()
                before = _udp_counters()
                run = _kill_rx_mid_stream(rt, fe, lambda f: peer.sendto(f, ("127.0.0.1", a)))
                now = _udp_counters()
                _assert_rx_kill("udp", rt, run, sum(now[k] - before[k]
                                                    for k in ("InDatagrams", "RcvbufErrors")))
        finally:
            peer.close()
            assert rt.stop() == 0, rt.log()
