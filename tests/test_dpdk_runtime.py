"""`shardvu run` driven by a front-end nobody here wrote: DPDK testpmd's
virtio-user.  Skipped when dpdk-testpmd is absent (.ci/run installs it)."""
from __future__ import annotations

import pytest

from shardvu.testing.runtime import Runtime

from shardvu.testing.testpmd import have_testpmd, leftover_testpmds, run_testpmd

pytestmark = pytest.mark.skipif(not have_testpmd(),
                                reason="dpdk-testpmd not installed (apt-get install dpdk-dev)")

SECONDS = 3


@pytest.fixture
def runtime(tmp_path):
    made = []

    def make(queues, port):
        rt = Runtime(str(tmp_path / f"rt{len(made)}.sock"), queues, port)
        made.append(rt)
        return rt
    yield make
    for rt in made:
        assert rt.stop() == 0
    assert not leftover_testpmds()


def assert_clean(rt, pmd):
    assert pmd["returncode"] == 0, pmd["log"][-2000:]
    assert "broken" not in rt.log(), rt.log()[-3000:]


@pytest.mark.parametrize("queues", [1, 8])
def test_txonly_into_sink_counts_match_testpmd(runtime, queues):
    rt = runtime(queues, "sink")
    pmd = run_testpmd(rt.sock, queues, "txonly", SECONDS)
    assert_clean(rt, pmd)
    stats = rt.settled_stats()
    tx = [stats[2 * p + 1]["packets"] for p in range(queues)]
    assert sum(tx) == pmd["tx_packets"] > 0
    assert all(n > 0 for n in tx), f"a queue carried nothing: {tx}"


@pytest.mark.parametrize("queues", [1, 8])
def test_io_forwarding_through_loopback(runtime, queues):
    rt = runtime(queues, "loopback")
    pmd = run_testpmd(rt.sock, queues, "io", SECONDS)
    assert_clean(rt, pmd)
    assert pmd["rx_packets"] > 1000
    stats = rt.settled_stats()
    rx = [stats[2 * p]["packets"] for p in range(queues)]
    assert all(rx), (f"RX packets per pair {rx}, TX {[stats[2 * p + 1]['packets'] for p in range(queues)]}"
                     f" TX drops {[stats[2 * p + 1]['drops_by_reason'] for p in range(queues)]}")
    # RSS counts the guest pages the copies touched; the worker's own
    # memory (private) stays small (~15 MiB here; the bound is 40 MB)
    assert all(0 < q["private_bytes"] < 40 << 20 for q in stats.values()), \
        {i: q["private_bytes"] for i, q in stats.items()}


@pytest.mark.parametrize("queues", [1, 8])
def test_rxonly_from_generator(runtime, queues):
    rt = runtime(queues, "generator")
    pmd = run_testpmd(rt.sock, queues, "rxonly", SECONDS)
    assert_clean(rt, pmd)
    assert pmd["rx_packets"] > 1000
    stats = rt.settled_stats()
    rx = [stats[2 * p]["packets"] for p in range(queues)]
    assert all(n > 0 for n in rx), f"a queue received nothing: {rx}"


@pytest.mark.parametrize("mrg_rxbuf", [0, 1])
@pytest.mark.parametrize("in_order", [0, 1])
def test_virtio_user_variants(runtime, mrg_rxbuf, in_order):
    rt = runtime(2, "loopback")
    pmd = run_testpmd(rt.sock, 2, "io", 2, mrg_rxbuf=mrg_rxbuf, in_order=in_order)
    assert_clean(rt, pmd)
    assert pmd["rx_packets"] > 1000


def test_packed_ring_offer_falls_back_to_split(runtime):
    rt = runtime(1, "loopback")
    pmd = run_testpmd(rt.sock, 1, "io", 2, packed_vq=1)
    assert_clean(rt, pmd)
    assert pmd["rx_packets"] > 1000
