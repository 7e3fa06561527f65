"""DPDK testpmd (virtio-user) against ``shardvu echo``, through tests/dpdk.py.

Skipped when dpdk-testpmd is absent.  Each test runs one testpmd for a few
seconds on cores 0,1 and must leave no process behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shardvu.testing.testpmd import TestPmd, have_testpmd, leftover_testpmds, parse_stats, run_testpmd

pytestmark = pytest.mark.skipif(not have_testpmd(), reason="dpdk-testpmd not installed (apt-get install dpdk)")

SECONDS = 3


class Echo:
    """``python3 -m shardvu.echo`` as a subprocess, log in a file."""

    def __init__(self, sock: str, pairs: int, log_path: str):
        self.sock = sock
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "shardvu.echo", "--socket", sock,
                                          "--queue-pairs", str(pairs), "--log-level", "DEBUG"],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "echo did not listen"
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def echo(tmp_path):
    made = []

    def make(pairs: int) -> Echo:
        e = Echo(str(tmp_path / f"echo{len(made)}.sock"), pairs, str(tmp_path / f"echo{len(made)}.log"))
        made.append(e)
        return e
    yield make
    for e in made:
        e.stop()
    assert not leftover_testpmds(f"shvu{os.getpid()}n"), "testpmd left behind"
    for e in made:
        assert e.proc.poll() is not None


def _messages(log: str, name: str) -> list:
    return [line for line in log.splitlines() if f"Message({name}," in line]


@pytest.mark.parametrize("pairs", [1, 2])
def test_io_tx_first_echoes(echo, pairs):
    e = echo(pairs)
    st = run_testpmd(e.sock, pairs, "io", SECONDS, mrg_rxbuf=False)
    assert st["returncode"] == 0
    assert st["rx_packets"] > 1000, st
    # io forwarding re-sends what comes back: what went out came back,
    # less what the echo dropped for want of RX buffers.
    assert st["rx_packets"] >= 0.9 * st["tx_packets"], st
    assert st["ports"][0]["rx_packets"] == st["rx_packets"]
    assert st["nic"][0]["rx_packets"] > 0
    log = e.log()
    enabled = {line.split("payload=")[1][:2] for line in _messages(log, "SET_VRING_ENABLE")
               if line.split("payload=")[1][8:10] == "01"}
    assert enabled == {f"{i:02x}" for i in range(2 * pairs)}, enabled


def test_io_mergeable_two_pairs(echo):
    e = echo(2)
    st = run_testpmd(e.sock, 2, "io", SECONDS)           # DPDK default: mrg_rxbuf=1
    assert st["rx_packets"] > 1000 and st["rx_packets"] >= 0.9 * st["tx_packets"], st


def test_txonly(echo):
    e = echo(1)
    st = run_testpmd(e.sock, 1, "txonly", SECONDS, txpkts=64)
    assert st["returncode"] == 0
    assert st["tx_packets"] > 1000, st
    # txonly never polls RX: the echo finds no RX buffers after the first
    # 256 and drops; whatever testpmd counted as received is at most that.
    assert st["rx_packets"] <= 256


def test_packed_vq_falls_back_to_split(echo):
    """shardvu does not offer VIRTIO_F_RING_PACKED: virtio-user must
    negotiate the split ring and run normally, and end cleanly."""
    e = echo(1)
    t = time.monotonic()
    st = run_testpmd(e.sock, 1, "io", SECONDS, packed_vq=True, mrg_rxbuf=False)
    assert time.monotonic() - t < SECONDS + 12
    assert st["returncode"] == 0 and st["rx_packets"] > 1000, st
    (feat,) = _messages(e.log(), "SET_FEATURES")
    acked = int.from_bytes(bytes.fromhex(feat.split("payload=")[1][:16]), "little")
    assert not acked >> 34 & 1


def test_queue_pairs_beyond_rxq_are_not_enabled(echo):
    e = echo(2)
    st = run_testpmd(e.sock, 2, "io", 1, rxq=1, txq=1, mrg_rxbuf=False)
    assert st["returncode"] == 0
    log = e.log()
    on = [line for line in _messages(log, "SET_VRING_ENABLE") if line.split("payload=")[1][8:10] == "01"]
    assert {line.split("payload=")[1][:2] for line in on} == {"00", "01"}
    assert len(_messages(log, "SET_VRING_KICK")) == 4           # all 4 vrings set up


def test_no_backend_fails_cleanly(tmp_path):
    """No socket: testpmd exits at probe; the harness reports it and
    leaves nothing behind."""
    from shardvu.testing.testpmd import TestPmdError
    pmd = TestPmd.virtio_user(str(tmp_path / "nobody.sock"), 1)
    pmd.start()
    with pytest.raises(TestPmdError):
        pmd.wait_started(15)
    assert pmd.stop() is None
    pmd.cleanup_log()
    assert not pmd.running()
    assert not leftover_testpmds(pmd.file_prefix)
    assert not os.path.exists(os.path.join("/var/run/dpdk", pmd.file_prefix))


def test_echo_rx_queue_not_broken(echo):
    # Regression: struct.pack_into zeroes a field before writing it, so DPDK
    # could read used->idx == 0 mid-store and corrupt its rings.
    e = echo(1)
    run_testpmd(e.sock, 1, "io", 4)
    assert "broken" not in e.log()


def test_parse_stats():
    text = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 10         RX-missed: 0          RX-bytes:  640
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 12         TX-errors: 0          TX-bytes:  768

  Throughput (since last show)
  Rx-pps:            5          Rx-bps:         2560
  ############################################################################
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 409408         RX-dropped: 0             RX-total: 409408
  TX-packets: 344640         TX-dropped: 64800         TX-total: 409440
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 409408         RX-dropped: 0             RX-total: 409408
  TX-packets: 344640         TX-dropped: 64800         TX-total: 409440
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
"""
    st = parse_stats(text)
    assert st["rx_packets"] == 409408 and st["tx_dropped"] == 64800 and st["tx_total"] == 409440
    assert st["ports"] == {0: {"rx_packets": 409408, "rx_dropped": 0, "rx_total": 409408,
                               "tx_packets": 344640, "tx_dropped": 64800, "tx_total": 409440}}
    assert st["nic"][0] == {"rx_packets": 10, "rx_missed": 0, "rx_bytes": 640, "rx_errors": 0,
                            "rx_nombuf": 0, "tx_packets": 12, "tx_errors": 0, "tx_bytes": 768}


def test_two_testpmds_vhost_backend(tmp_path):
    """The reverse role for benchmarks: DPDK's net_vhost back-end (io)
    and a virtio-user front-end (txonly), each its own testpmd."""
    sock = str(tmp_path / "vhost.sock")
    with TestPmd.vhost(sock, 1, cores="1,0", mode="io", stats_period=0) as be:
        be.wait_started(15)
        with TestPmd.virtio_user(sock, 1, cores="0,1", mode="txonly", stats_period=0) as fe:
            fe.wait_started(15)
            time.sleep(2)
            fs = fe.stop()
        bs = be.stop()
    for p in (be, fe):
        p.cleanup_log()
        assert p.returncode == 0
    assert fs["tx_packets"] > 1000, fs
    assert bs["rx_packets"] == fs["tx_packets"] + fs["tx_dropped"] or bs["rx_packets"] > 0.9 * fs["tx_packets"]
    assert not leftover_testpmds(f"shvu{os.getpid()}n")
