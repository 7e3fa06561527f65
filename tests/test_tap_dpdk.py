"""``--port tap`` against DPDK: virtio-user txonly counted exactly on the
tap's own counters, and the reverse, a ``net_af_packet`` vdev on the tap's
host side feeding virtio-user's rxonly through shardvu.  The tap lives in a
namespace the test creates."""
from __future__ import annotations

import time

import pytest

from nsutil import can_netns, netns, sh
from shardvu.testing.runtime import Runtime
from shardvu.testing.testpmd import TestPmd, have_testpmd, leftover_testpmds, run_testpmd, \
    virtio_user_vdev
from shardvu.workers import tap as T

pytestmark = [
    pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok"),
    pytest.mark.skipif(not have_testpmd(), reason="dpdk-testpmd not installed (apt-get install dpdk)"),
]

SECONDS = 3


@pytest.fixture
def runtime(tmp_path):
    made = []

    def make(queues: int, ifname: str) -> Runtime:
        rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), queues, f"tap:{ifname}")
        made.append(rt)
        return rt
    with netns("shvtd"):
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        yield make
        for rt in made:
            assert rt.stop() == 0, rt.log()[-3000:]
    assert not leftover_testpmds()


@pytest.mark.parametrize("queues", [1, 2])
def test_txonly_counted_exactly_on_the_tap(runtime, queues):
    ifname = f"shvtx{queues}"
    rt = runtime(queues, ifname)
    before = T.link_stats(ifname)
    extra = ["--txonly-multi-flow"] if queues > 1 else []
    pmd = run_testpmd(rt.sock, queues, "txonly", SECONDS, extra_app=extra)
    assert pmd["returncode"] == 0, pmd["log"][-2000:]
    stats = rt.settled_stats()
    after = T.link_stats(ifname)
    sent = pmd["tx_packets"]
    assert sent > 0
    tap_rx = after["rx_packets"] - before["rx_packets"]
    tap_dropped = after["rx_dropped"] - before["rx_dropped"]
    shardvu_drops = sum(stats[2 * p + 1]["drops"] for p in range(queues))
    print(f"txonly {queues} pairs: sent {sent}, tap rx_packets {tap_rx}, rx_dropped {tap_dropped}, "
          f"shardvu drops {shardvu_drops}")
    assert tap_rx + tap_dropped + shardvu_drops == sent
    per_pair = [stats[2 * p + 1]["packets"] for p in range(queues)]
    assert sum(per_pair) == tap_rx + tap_dropped and all(per_pair), per_pair


@pytest.mark.parametrize("queues", [1, 2])
def test_af_packet_into_rxonly_counted_exactly(runtime, queues):
    ifname = f"shvrx{queues}"
    rt = runtime(queues, ifname)
    rx = TestPmd(virtio_user_vdev(rt.sock, queues), queues=queues, mode="rxonly")
    rx.start()
    try:
        rx.wait_started()
        time.sleep(0.5)
        before = T.link_stats(ifname)
        extra = ["--txonly-multi-flow"] if queues > 1 else []
        tx = TestPmd(f"net_af_packet0,iface={ifname}", queues=1, mode="txonly", mem_mb=512,
                     extra_app=extra)
        tx.start()
        try:
            tx.wait_started()
            time.sleep(SECONDS)
        finally:
            txs = tx.stop()
        stats = rt.settled_stats()
        after = T.link_stats(ifname)
    finally:
        rxs = rx.stop()
    handed = after["tx_packets"] - before["tx_packets"]
    kernel_dropped = after["tx_dropped"] - before["tx_dropped"]
    shardvu_drops = sum(stats[2 * p]["drops"] for p in range(queues))
    print(f"af_packet -> {queues} pairs: af_packet sent {txs['tx_packets']}, tap tx_packets {handed}, "
          f"tap tx_dropped {kernel_dropped}, virtio-user rx {rxs['rx_packets']}, "
          f"shardvu drops {shardvu_drops}")
    assert handed > 0
    assert rxs["rx_packets"] + shardvu_drops == handed
    per_pair = [stats[2 * p]["packets"] for p in range(queues)]
    assert sum(per_pair) == rxs["rx_packets"]
    if queues > 1:
        assert all(per_pair), f"a pair carried nothing: {per_pair}"
