"""Two shardvu instances linked by ``--port udp`` on 127.0.0.1 carry a DPDK
virtio-user txonly stream (front-end A) to a virtio-user rxonly (front-end
B), counted exactly: every frame A's front-end sent is received by B's, or
counted as a drop by shardvu A (TX) or by shardvu B (RX), whose drops
include the kernel's UDP receive-buffer drops for its sockets (checked
against RcvbufErrors, read in a namespace of the test's own so that no
other socket counts there)."""
from __future__ import annotations

import time

import pytest

from nsutil import can_netns, netns
from shardvu.testing.runtime import Runtime
from shardvu.testing.testpmd import TestPmd, have_testpmd, leftover_testpmds, run_testpmd, \
    virtio_user_vdev
from test_udp_port import _free_base

pytestmark = [
    pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok"),
    pytest.mark.skipif(not have_testpmd(), reason="dpdk-testpmd not installed (apt-get install dpdk)"),
]


def udp_rcvbuf_errors() -> int:
    """This namespace's UDP RcvbufErrors (/proc/thread-self/net/snmp)."""
    with open("/proc/thread-self/net/snmp") as f:
        lines = [l.split() for l in f if l.startswith("Udp:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["RcvbufErrors"])


@pytest.mark.parametrize("queues", [1, 2])
def test_txonly_to_rxonly_through_two_instances_exact(tmp_path, queues):
    with netns("shvud"):
        a, b = _free_base(n=queues), _free_base(n=queues)
        while abs(a - b) < queues:
            b = _free_base(n=queues)
        ra = Runtime(str(tmp_path / "a.sock"), queues, f"udp:127.0.0.1:{a},127.0.0.1:{b}")
        rb = Runtime(str(tmp_path / "b.sock"), queues, f"udp:127.0.0.1:{b},127.0.0.1:{a}")
        try:
            rx = TestPmd(virtio_user_vdev(rb.sock, queues), queues=queues, mode="rxonly")
            rx.start()
            try:
                rx.wait_started()
                time.sleep(0.5)
                errs0 = udp_rcvbuf_errors()
                extra = ["--txonly-multi-flow"] if queues > 1 else []
                tx = run_testpmd(ra.sock, queues, "txonly", 3, extra_app=extra)
                assert tx["returncode"] == 0, tx["log"][-2000:]
                sa, sb = ra.settled_stats(), rb.settled_stats()
                errs = udp_rcvbuf_errors() - errs0
            finally:
                rxs = rx.stop()
        finally:
            assert rb.stop() == 0, rb.log()[-2000:]
            assert ra.stop() == 0, ra.log()[-2000:]
    assert not leftover_testpmds()
    sent = tx["tx_packets"]
    a_tx = sum(sa[2 * p + 1]["packets"] for p in range(queues))
    a_drops = sum(sa[2 * p + 1]["drops"] for p in range(queues))
    b_rx = [sb[2 * p]["packets"] for p in range(queues)]
    b_drops = sum(sb[2 * p]["drops"] for p in range(queues))
    b_full = sum(sb[2 * p]["drops_by_reason"]["port_full"] for p in range(queues))
    print(f"udp {queues} pairs: sent {sent}, A sent {a_tx} (+{a_drops} dropped), kernel "
          f"RcvbufErrors {errs}, B delivered {b_rx} (+{b_drops} dropped), rxonly {rxs['rx_packets']}")
    assert sent > 0 and rxs["rx_packets"] > 0
    assert a_tx + a_drops == sent
    assert a_tx == sum(b_rx) + b_drops
    assert b_full == errs
    assert sum(b_rx) == rxs["rx_packets"]
    if queues > 1:
        assert all(b_rx), b_rx
