"""``--port af_packet`` against DPDK: virtio-user txonly through shardvu
counted exactly on the veth peer's counters, and the reverse, a
``net_af_packet`` vdev on the peer (in the test's second namespace) feeding
virtio-user's rxonly through shardvu."""
from __future__ import annotations

import time

import pytest

from afnet import entered, veth
from nsutil import can_netns
from shardvu.testing.runtime import Runtime
from shardvu.testing.testpmd import TestPmd, have_testpmd, leftover_testpmds, run_testpmd, \
    virtio_user_vdev
from shardvu.workers.tap import link_stats

pytestmark = [
    pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok"),
    pytest.mark.skipif(not have_testpmd(), reason="dpdk-testpmd not installed (apt-get install dpdk)"),
]

SECONDS = 3


@pytest.fixture
def net(tmp_path):
    made = []
    with veth() as (nsa, nsb):
        def start(queues: int) -> Runtime:
            rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), queues, "af_packet:va")
            made.append(rt)
            return rt
        yield nsb, start
        for rt in made:
            assert rt.stop() == 0, rt.log()[-3000:]
    assert not leftover_testpmds()


def links(nsb: str):
    a = link_stats("va")
    with entered(nsb):
        b = link_stats("vb")
    return a, b


@pytest.mark.parametrize("queues", [1, 2])
def test_txonly_counted_exactly_on_the_peer(net, queues):
    nsb, start = net
    rt = start(queues)
    a0, b0 = links(nsb)
    extra = ["--txonly-multi-flow"] if queues > 1 else []
    pmd = run_testpmd(rt.sock, queues, "txonly", SECONDS, extra_app=extra)
    assert pmd["returncode"] == 0, pmd["log"][-2000:]
    stats = rt.settled_stats()
    a1, b1 = links(nsb)
    sent = pmd["tx_packets"]
    peer_rx = b1["rx_packets"] - b0["rx_packets"]
    kernel_dropped = (a1["tx_dropped"] - a0["tx_dropped"]) + (b1["rx_dropped"] - b0["rx_dropped"])
    shardvu_drops = sum(stats[2 * p + 1]["drops"] for p in range(queues))
    print(f"txonly {queues} pairs: sent {sent}, vb rx_packets {peer_rx}, kernel dropped "
          f"{kernel_dropped}, shardvu drops {shardvu_drops}")
    assert sent > 0 and peer_rx > 0
    assert peer_rx + kernel_dropped + shardvu_drops == sent
    per_pair = [stats[2 * p + 1]["packets"] for p in range(queues)]
    assert sum(per_pair) == peer_rx + kernel_dropped and all(per_pair), per_pair


@pytest.mark.parametrize("queues", [1, 2])
def test_af_packet_peer_into_rxonly_counted_exactly(net, queues):
    nsb, start = net
    rt = start(queues)
    rx = TestPmd(virtio_user_vdev(rt.sock, queues), queues=queues, mode="rxonly")
    rx.start()
    try:
        rx.wait_started()
        time.sleep(0.5)
        a0, _ = links(nsb)
        extra = ["--txonly-multi-flow"] if queues > 1 else []
        with entered(nsb):          # testpmd on vb's side, in the peer namespace
            tx = TestPmd("net_af_packet0,iface=vb", queues=1, mode="txonly", mem_mb=512,
                         extra_app=extra)
            tx.start()
        try:
            tx.wait_started()
            time.sleep(SECONDS)
        finally:
            txs = tx.stop()
        stats = rt.settled_stats()
        a1, _ = links(nsb)
    finally:
        rxs = rx.stop()
    arrived = a1["rx_packets"] - a0["rx_packets"]
    shardvu_drops = sum(stats[2 * p]["drops"] for p in range(queues))
    print(f"vb -> {queues} pairs: af_packet sent {txs['tx_packets']}, va rx_packets {arrived}, "
          f"virtio-user rx {rxs['rx_packets']}, shardvu packets "
          f"{[stats[2 * p]['packets'] for p in range(queues)]}, shardvu drops {shardvu_drops} "
          f"({ {q: {k: v for k, v in stats[q]['drops_by_reason'].items() if v} for q in stats} })")
    assert arrived > 0
    assert rxs["rx_packets"] + shardvu_drops == arrived
    per_pair = [stats[2 * p]["packets"] for p in range(queues)]
    assert sum(per_pair) == rxs["rx_packets"]
    if queues > 1:
        assert all(per_pair), f"a pair carried nothing: {per_pair}"
