"""Crash isolation seen from a real guest: a QEMU guest (Linux under TCG)
pings the host through ``--port tap`` while the test kill -9s random
workers.  The guest must never notice: no vhost-user disconnect (neither
the control's log nor QEMU's shows one), the guest's link never goes down
(its carrier_changes stays 0), and at most one ping is lost per kill.

Bounded in time (about a minute under TCG); run QEMU tests alone, one at a
time.  Skipped only when QEMU, the guest packages or network namespaces are
missing."""
from __future__ import annotations

import datetime
import os
import random
import shutil
import signal
import tempfile
import time

import psutil
import pytest

from shardvu.testing.guest import build_guest, have_guest_tools
from shardvu.testing.qemu import Guest, have_qemu, leftover_qemus
from shardvu.testing.runtime import Runtime
from nsutil import can_netns, netns, sh
from util import wait_for

_qemu_ok, _qemu_why = have_qemu()
_guest_ok, _guest_why = have_guest_tools() if _qemu_ok else (False, "")
PYPY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-pypy", "bin", "python")
pytestmark = [
    pytest.mark.skipif(not _qemu_ok, reason=_qemu_why),
    pytest.mark.skipif(_qemu_ok and not _guest_ok, reason=_guest_why),
    pytest.mark.skipif(bool(can_netns()), reason=can_netns() or "ok"),
]

HOST_IP, GUEST_IP = "10.78.0.1", "10.78.0.2"
PINGS, INTERVAL = 60, 0.5       # 30 s of pings
KILL_EVERY = 2.0                # seconds between kills
#: what a vhost-user disconnect leaves in the control's log / QEMU's output
DISCONNECT = ("front-end disconnected", "dropping the connection", "closing the connection",
              "closed mid-message")
QEMU_DISCONNECT = ("disconnect", "Failed to", "vhost lacks", "vhost_set")


def _stamp(line: str) -> float:
    """The time of a control log line (``YYYY-MM-DD HH:MM:SS,mmm ...``)."""
    t = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return t.timestamp()


@pytest.mark.parametrize("interp", [
    pytest.param((), id="cpython"),
    pytest.param(("--worker-python", PYPY), id="pypy",
                 marks=pytest.mark.skipif(not os.path.exists(PYPY), reason="no PyPy venv at .venv-pypy"))])
def test_guest_pings_through_repeated_kill9_of_random_workers(interp):
    queues = 2
    d = tempfile.mkdtemp(prefix="svk-", dir="/tmp")
    kernel, initramfs = build_guest()
    me = psutil.Process()
    rt = g = None
    kills: list = []
    try:
        with netns("shvk"):
            sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
            rt = Runtime(os.path.join(d, "vu.sock"), queues, "tap:shvk0", *interp,
                         log_path=os.path.join(d, "rt.log"), wait=False)
            wait_for(lambda: len(rt.workers()) == 2 * queues and rt.stats_ready(), timeout=60, interval=0.1)
            sh(f"ip addr add {HOST_IP}/24 dev shvk0")
            g = Guest(rt.sock, queues, "ping",
                      f"shardvu.ip={GUEST_IP}/24 shardvu.peer={HOST_IP} shardvu.count={PINGS} "
                      f"shardvu.interval={INTERVAL}",
                      kernel=kernel, initramfs=initramfs, serial_log=os.path.join(d, "serial.log")).start()
            g.wait_for(r"SHARDVU pinging", timeout=300)
            fds0 = rt.fds()
            time.sleep(3.0)                      # ARP resolved, replies flowing
            rng = random.Random(os.environ.get("SHARDVU_DRILL_SEED") or None)
            end = time.monotonic() + PINGS * INTERVAL - 6.0
            recent: dict = {q: [] for q in range(2 * queues)}
            while time.monotonic() < end:
                now = time.monotonic()
                # no queue dies twice within the crash-loop window (backoff would
                # delay its respawn: the policy has its own test)
                calm = [q for q in recent if len([t for t in recent[q] if t > now - 11]) < 2]
                q = rng.choice(calm)
                pid = rt.queue_stats()[q]["worker_pid"]
                os.kill(pid, signal.SIGKILL)
                kills.append((round(now - g.started_at, 2), q, pid))
                recent[q].append(now)
                wait_for(lambda: rt.queue_stats()[q]["worker_pid"] not in (None, pid), timeout=15, interval=0.02)
                time.sleep(KILL_EVERY)
            fds1 = rt.fds()
            g.wait_for(r"SHARDVU ping ", timeout=120)
            pinged = time.time()         # after this the guest powers off: one disconnect
            res = g.wait_done(timeout=120)
            stats = rt.queue_stats()
        log = rt.log()
        qemu_out = g.stderr()
        assert "error" not in res, res["error"]
        ping = res["ping"][0]
        seqs = [int(s) for s in str(ping["seqs"])[1:].split(",") if s]
        missing = sorted(set(range(ping["transmitted"])) - set(seqs))
        print(f"drill ({'pypy' if interp else 'cpython'}): {len(kills)} kills {kills}; "
              f"pings {ping['transmitted']} sent, {ping['received']} answered, missing {missing}; "
              f"restarts {[stats[q]['restarts'] for q in range(2 * queues)]}")
        assert len(kills) >= 8
        assert ping["transmitted"] == PINGS
        assert len(missing) <= len(kills), (missing, kills)
        # a respawn takes tens of ms, a ping interval 500: two pings in a row
        # lost would be an outage no single kill explains
        assert not [m for m in missing if m + 1 in missing], (missing, kills)
        assert ping["carrier_changes"] == 0, "the guest's link went down"
        during = [line for line in log.splitlines()
                  if any(m in line for m in DISCONNECT) and _stamp(line) < pinged - 0.5]
        assert not during, during
        assert not [m for m in QEMU_DISCONNECT if m in qemu_out], qemu_out
        assert g.running() or "done" in res
        assert sum(stats[q]["restarts"] for q in range(2 * queues)) == len(kills)
        assert fds1 == fds0, f"control fds {fds0} -> {fds1}"
    finally:
        if g is not None:
            g.cleanup()
        if rt is not None:
            assert rt.stop() == 0
        assert not leftover_qemus(d), "qemu left running"
        alive = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"
        shutil.rmtree(d, ignore_errors=True)
