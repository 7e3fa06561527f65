"""Real QEMU guests (Linux under TCG, virtio-net over vhost-user) against
`shardvu run`.

The guest is built by :mod:`shardvu.testing.guest` (Debian's linux-image-amd64 +
busybox-static) and run by :mod:`shardvu.testing.qemu`.  Skipped only when
qemu-system-x86_64 or the guest packages are missing (.ci/run installs
them).  Under TCG the guest is the bottleneck (pktgen: ~100 kpps per vCPU at
best), so these tests prove correctness, not speed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time

import psutil
import pytest

from shardvu.testing.runtime import Runtime
from shardvu.testing.guest import build_guest, have_guest_tools
from shardvu.testing.qemu import Guest, have_qemu, leftover_qemus
from nsutil import can_netns, netns, sh

_qemu_ok, _qemu_why = have_qemu()
_guest_ok, _guest_why = have_guest_tools() if _qemu_ok else (False, "")
pytestmark = [
    pytest.mark.skipif(not _qemu_ok, reason=_qemu_why),
    pytest.mark.skipif(_qemu_ok and not _guest_ok, reason=_guest_why),
]

COUNT = 2000            # frames per vCPU / queue in the pktgen tests

#: ERROR lines of the runtime log that are known and not this file's subject
#: (regexes).  Empty: everything QEMU 7.2 sends must be accepted.
TOLERATED: list = []


@pytest.fixture(scope="module")
def guest_image():
    return build_guest()


@pytest.fixture
def lab(guest_image):
    """Factory for runtimes and guests in a short temp dir; tears everything
    down and checks nothing is left running."""
    d = tempfile.mkdtemp(prefix="svq-", dir="/tmp")     # short: Unix socket paths
    kernel, initramfs = guest_image
    made = {"rt": [], "guest": []}
    me = psutil.Process()

    class Lab:
        dir = d
        sock = os.path.join(d, "vu.sock")

        def runtime(self, queues, port="sink", *extra, name=None):
            rt = Runtime(os.path.join(d, name) if name else self.sock, queues, port, *extra,
                         log_path=os.path.join(d, f"rt{len(made['rt'])}.log"))
            made["rt"].append(rt)
            return rt

        def guest(self, queues, mode, extra="", **kw):
            g = Guest(self.sock, queues, mode, extra, kernel=kernel, initramfs=initramfs,
                      serial_log=os.path.join(d, f"serial{len(made['guest'])}.log"), **kw)
            made["guest"].append(g)
            return g

    try:
        yield Lab()
    finally:
        for g in made["guest"]:
            g.cleanup()
        codes = []
        for rt in made["rt"]:
            codes.append(rt.stop())          # a second stop() just reports the code
        assert not leftover_qemus(d), "qemu left running"
        alive = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"
        if not os.environ.get("SHARDVU_KEEP_LAB"):
            shutil.rmtree(d, ignore_errors=True)
    assert all(c == 0 for c in codes), f"shardvu run exit codes {codes}"


def read_log(rt) -> str:
    with open(rt.log_path) as f:
        return f.read()


def errors(rt):
    """The runtime log's ERROR lines and tracebacks, less the TOLERATED ones."""
    out = []
    for line in read_log(rt).splitlines():
        if ("ERROR" in line or "Traceback" in line) and not any(p.search(line) for p in TOLERATED):
            out.append(line)
    return out


def tx_packets(stats, queues):
    return [stats[2 * i + 1]["packets"] for i in range(queues)]


def rx_packets(stats, queues):
    return [stats[2 * i]["packets"] for i in range(queues)]


def assert_no_errors(rt, guest):
    errs = errors(rt)
    assert not errs, "runtime ERROR lines:\n" + "\n".join(errs[:30])
    assert "SHARDVU error" not in guest.serial(), guest.serial()[-2000:]


# -- every queue, exact counts ---------------------------------------------------------

@pytest.mark.parametrize("queues", [1, 2, 4, 8])
def test_pktgen_every_queue_exact(lab, queues):
    """vCPU c's pktgen sends COUNT frames of 60+c bytes on TX queue c; each
    TX queue 2c+1 must count exactly COUNT frames and COUNT*(60+c) bytes
    (so: no loss, no duplicate, and nothing on the wrong queue)."""
    rt = lab.runtime(queues, "sink")
    g = lab.guest(queues, "pktgen", f"shardvu.count={COUNT} shardvu.sizestep=1").start()
    res = g.wait_done(timeout=90)
    assert res["ready"][-1]["txq"] == queues, res
    sent = {p["cpu"]: p for p in res["pktgen"]}
    assert sorted(sent) == list(range(queues)), res["pktgen"]
    assert all(p["sent"] == COUNT and p["errors"] == 0 for p in sent.values()), res["pktgen"]
    assert res["stats"][-1]["tx_packets"] == queues * COUNT, res["stats"]
    stats = rt.settled_stats()
    assert tx_packets(stats, queues) == [COUNT] * queues
    assert [stats[2 * c + 1]["bytes"] for c in range(queues)] == \
        [COUNT * (60 + c) for c in range(queues)]
    assert [stats[2 * c + 1]["drops"] for c in range(queues)] == [0] * queues
    assert rx_packets(stats, queues) == [0] * queues
    assert_no_errors(rt, g)


# -- generator → guest --------------------------------------------------------------------

def test_generator_to_guest_exact(lab):
    """shardvu fills the guest's RX rings; the guest's rx_packets must equal
    what shardvu delivered.  Exact because the host stops delivery first:
    QMP ``set_link n0 off`` makes QEMU stop the vhost-user rings
    (GET_VRING_BASE on each, a barrier through the workers), so shardvu's
    RX counters are final; QEMU hands the rings back to its own virtio-net
    (a pending call is delivered), the guest's NAPI consumes every used
    buffer, and the guest — which waits for its carrier to drop and then
    for rx_packets to hold still for a second — reports the total."""
    queues = 2
    rt = lab.runtime(queues, "generator", "--frame-size", "64")
    g = lab.guest(queues, "count", "shardvu.until=linkdown shardvu.settle=1").start()
    g.wait_for(r"SHARDVU ready", 60)
    time.sleep(2)
    live = rt.queue_stats()
    assert all(n > 0 for n in rx_packets(live, queues)), live
    g.set_link(False)
    res = g.wait_done(timeout=60)
    stats = rt.settled_stats()
    delivered = rx_packets(stats, queues)
    guest = res["stats"][-1]
    assert guest["carrier"] == 0
    assert guest["rx_packets"] == sum(delivered) > 0, (guest, delivered)
    assert all(n > 0 for n in delivered), delivered
    assert guest["rx_length_errors"] == guest["rx_errors"] == 0, guest
    assert all(stats[2 * i]["bytes"] == 64 * stats[2 * i]["packets"] for i in range(queues))
    assert_no_errors(rt, g)


# -- loopback ---------------------------------------------------------------------------------

def test_loopback_guest_frames_come_back(lab):
    """Every frame the guest's pktgen sends on pair i comes back on RX of
    pair i: guest tx == shardvu TX == shardvu RX == guest rx."""
    queues = 2
    rt = lab.runtime(queues, "loopback")
    g = lab.guest(queues, "pktgen",
                  f"shardvu.count={COUNT} shardvu.delay=100000 shardvu.settle=1").start()
    res = g.wait_done(timeout=90)
    assert all(p["sent"] == COUNT for p in res["pktgen"]), res["pktgen"]
    guest = res["stats"][-1]
    stats = rt.settled_stats()
    tx, rx = tx_packets(stats, queues), rx_packets(stats, queues)
    drops = [stats[2 * i + 1]["drops"] + stats[2 * i]["drops"] for i in range(queues)]
    assert guest["tx_packets"] == queues * COUNT
    assert tx == [COUNT] * queues, stats
    assert guest["rx_packets"] == sum(rx), (guest, rx)
    # Nothing lost without being counted: what came in went out or was a drop.
    assert [r + dr for r, dr in zip(rx, drops)] == [COUNT] * queues, (rx, drops, stats)
    # pktgen is paced (shardvu.delay) so that the pair's ring never fills.
    assert drops == [0] * queues, stats
    assert_no_errors(rt, g)


# -- reconnect (QEMU reconnects to a restarted back-end) ---------------------------------------

def _wait_growth(rt, queues, timeout, base=None, guest=None):
    """Wait until every TX queue of ``rt`` carried more than ``base``."""
    base = base or [0] * queues
    deadline = time.monotonic() + timeout
    while True:
        try:
            now = tx_packets(rt.queue_stats(), queues)
        except Exception:
            now = [0] * queues
        if all(n > b for n, b in zip(now, base)):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"{rt.log_path}: TX did not grow on every queue: {now} "
                                 f"(from {base})\n" + (guest.serial()[-1500:] if guest else ""))
        time.sleep(0.2)


def test_reconnect_server_mode(lab):
    """QEMU's chardev has reconnect=1: stop shardvu mid-traffic, start a new
    one on the same socket; QEMU reconnects, the guest's carrier comes back
    and its pktgen rounds resume on every queue of the new instance."""
    queues = 2
    rt1 = lab.runtime(queues, "sink")
    g = lab.guest(queues, "pktgen", "shardvu.count=5000 shardvu.rounds=0").start()
    g.wait_for(r"SHARDVU pktgen_setup", 60)
    _wait_growth(rt1, queues, 30, guest=g)
    assert rt1.stop() == 0
    old_errors = errors(rt1)
    mark = len(g.serial())
    g.wait_for(r"SHARDVU round n=\d+ carrier=0", 15, start=0)     # the guest saw it go
    rt2 = lab.runtime(queues, "sink")
    got = _wait_growth(rt2, queues, 30, guest=g)
    assert g.running()
    g.wait_for(r"SHARDVU round n=\d+ carrier=1", 15, start=mark)
    assert old_errors == [], old_errors
    assert_no_errors(rt2, g)
    assert all(n > 0 for n in got)


# -- client mode (QEMU listens) ------------------------------------------------------------------

def test_client_mode(lab):
    """QEMU listens (server=on,wait=off) and `shardvu run --client`
    connects; exact counts as in the server-mode test."""
    queues = 2
    g = lab.guest(queues, "pktgen", f"shardvu.count={COUNT}", client=True).start()
    deadline = time.monotonic() + 10
    while not os.path.exists(lab.sock):
        assert g.running(), g.stderr()
        assert time.monotonic() < deadline, "QEMU did not create its socket"
        time.sleep(0.05)
    rt = lab.runtime(queues, "sink", "--client")
    res = g.wait_done(timeout=90)
    assert all(p["sent"] == COUNT for p in res["pktgen"]), res["pktgen"]
    stats = rt.settled_stats()
    assert tx_packets(stats, queues) == [COUNT] * queues
    assert_no_errors(rt, g)


# -- the tap port: a guest that reaches the host ---------------------------------

def _tcp_sink(port: int, size: int, out: dict) -> threading.Thread:
    """Accept one connection on HOST_IP:port, read exactly ``size`` bytes
    (then close: busybox nc exits on EOF), keep them in ``out[port]``."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((TAP_HOST_IP, port))
    srv.listen(1)
    srv.settimeout(600)

    def run():
        try:
            conn, _ = srv.accept()
            conn.settimeout(120)
            parts, n = [], 0
            while n < size:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                parts.append(chunk)
                n += len(chunk)
            conn.close()
            out[port] = b"".join(parts)
        finally:
            srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _sniff(ifname: str, stop: threading.Event, out: dict) -> threading.Thread:
    """Largest frame seen on the tap in each direction (a packet socket sees
    GSO frames whole)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))   # ETH_P_ALL
    s.bind((ifname, 0))
    s.settimeout(0.2)
    out.update({"to_guest": 0, "from_guest": 0})

    def run():
        while not stop.is_set():
            try:
                data, addr = s.recvfrom(1 << 17)
            except socket.timeout:
                continue
            key = "to_guest" if addr[2] == socket.PACKET_OUTGOING else "from_guest"
            out[key] = max(out[key], len(data))
        s.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


TAP_HOST_IP, TAP_GUEST_IP = "10.77.0.1", "10.77.0.2"
#: virtio-net offload feature bits the tap port offers
TAP_OFFLOADS = {"CSUM": 0, "GUEST_CSUM": 1, "GUEST_TSO4": 7, "GUEST_TSO6": 8, "GUEST_ECN": 9,
                "HOST_TSO4": 11, "HOST_TSO6": 12, "HOST_ECN": 13}


@pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok")
def test_tap_guest_ping_and_tcp_both_ways_on_4_pairs(lab):
    """A 4-pair guest on ``--port tap``: ping into the test's namespace, then
    48 MiB (50.3 MB) each way over 4 TCP flows with matching md5 at both
    ends, offloads negotiated and frames larger than the MTU crossing the
    tap in both directions, and traffic on every queue of every pair."""
    queues, flows, mib = 4, 4, 48
    per = mib // flows << 20
    with netns("shvq"):
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        rt = lab.runtime(queues, "tap:shvq0")
        sh(f"ip addr add {TAP_HOST_IP}/24 dev shvq0")
        stop, big = threading.Event(), {}
        sniffer = _sniff("shvq0", stop, big)
        got: dict = {}
        sinks = [_tcp_sink(5001 + i, per, got) for i in range(flows)]
        g = lab.guest(queues, "tcp", f"shardvu.ip={TAP_GUEST_IP}/24 shardvu.peer={TAP_HOST_IP} "
                      f"shardvu.count=5 shardvu.mb={mib} shardvu.flows={flows}", mem="1G").start()
        try:
            g.wait_for(r"SHARDVU listening", timeout=600)
            sent = []
            for i in range(flows):
                data = os.urandom(per)
                sent.append(data)
                with socket.create_connection((TAP_GUEST_IP, 5101 + i), timeout=60) as c:
                    c.sendall(data)
            res = g.wait_done(timeout=600)
        finally:
            stop.set()
            sniffer.join(2)
        for t in sinks:
            t.join(5)
        stats = rt.settled_stats()
    assert "error" not in res, res["error"]
    ping = res["ping"][0]
    assert ping["received"] == ping["transmitted"] == 5
    bits = res["features"][0]["virtio"][1:]          # "v" + the bits, feature 0 first
    negotiated = {name for name, b in TAP_OFFLOADS.items() if len(bits) > b and bits[b] == "1"}
    assert {"CSUM", "GUEST_CSUM", "GUEST_TSO4", "HOST_TSO4"} <= negotiated, bits
    out_sum, in_sum = res["sum"]
    assert out_sum["dir"] == "out" and out_sum["bytes"] == flows * per
    # guest -> host: the guest hashed its file, the host the parts it read, in order
    assert sorted(got) == [5001 + i for i in range(flows)]
    assert [len(got[5001 + i]) for i in range(flows)] == [per] * flows
    assert out_sum["md5"] == hashlib.md5(b"".join(got[5001 + i] for i in range(flows))).hexdigest()
    # host -> guest: the other way round
    assert in_sum["dir"] == "in" and in_sum["bytes"] == flows * per
    assert in_sum["md5"] == hashlib.md5(b"".join(sent)).hexdigest()
    assert big["from_guest"] > 1514 and big["to_guest"] > 1514, big
    quiet = [q for q in range(2 * queues) if stats[q]["packets"] == 0]
    assert not quiet, f"queues that carried nothing: {quiet}"
    assert not errors(rt), errors(rt)
    print(f"tap guest: ping avg {ping['avg_ms']} ms, largest frames {big}, negotiated {sorted(negotiated)}, "
          f"per-queue packets {[stats[q]['packets'] for q in range(2 * queues)]}")
