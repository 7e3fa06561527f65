"""The control process dies under a QEMU guest (issue 12 §6): kill -9 of
``shardvu run`` mid-traffic, a new instance started on the same socket
path with the same command line, and the guest's traffic resumes without
anyone touching QEMU or the guest.

* server mode: QEMU's chardev is the client with ``reconnect=1`` and
  connects again once the new instance listens;
* ``--client``: QEMU listens (``server=on``) and accepts again; the new
  instance retries until it connects.

The guest runs pktgen rounds on every TX queue, forever
(``shardvu.rounds=0``); a round ends when the carrier drops (QEMU sets the
link down when the socket closes) and the next one waits for it to come
back.  Under TCG each test takes about a minute: run them alone.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time

import psutil
import pytest

from shardvu.testing.guest import build_guest, have_guest_tools
from shardvu.testing.qemu import Guest, have_qemu, leftover_qemus
from shardvu.statsapi import name_endpoints, query
from shardvu.testing.runtime import Runtime

_qemu_ok, _qemu_why = have_qemu()
_guest_ok, _guest_why = have_guest_tools() if _qemu_ok else (False, "")
pytestmark = [
    pytest.mark.skipif(not _qemu_ok, reason=_qemu_why),
    pytest.mark.skipif(_qemu_ok and not _guest_ok, reason=_guest_why),
]

QUEUES = 2


@pytest.fixture
def lab():
    d = tempfile.mkdtemp(prefix="svr-", dir="/tmp")     # short: Unix socket paths
    kernel, initramfs = build_guest()
    made = {"rt": [], "guest": [], "family": []}
    me = psutil.Process()

    class Lab:
        sock = os.path.join(d, "vu.sock")

        def runtime(self, *extra, port="sink", cls=Runtime, **kw):
            rt = cls(self.sock, QUEUES, port, *extra,
                     log_path=os.path.join(d, f"rt{len(made['rt'])}.log"), **kw)
            made["rt"].append(rt)
            return rt

        def guest(self, **kw):
            g = Guest(self.sock, QUEUES, "pktgen", "shardvu.count=3000 shardvu.rounds=0",
                      kernel=kernel, initramfs=initramfs,
                      serial_log=os.path.join(d, f"serial{len(made['guest'])}.log"), **kw)
            made["guest"].append(g)
            return g

        def kill(self, rt: Runtime) -> None:
            family = rt._children()
            made["family"].extend(family)
            rt.proc.send_signal(signal.SIGKILL)
            assert rt.proc.wait(10) == -signal.SIGKILL
            rt._log.close()
            _, alive = psutil.wait_procs(family, timeout=20)
            for p in alive:
                p.kill()
            assert not alive, f"left running after kill -9 of the control: {[p.pid for p in alive]}"

    try:
        yield Lab()
    finally:
        for g in made["guest"]:
            g.cleanup()
        codes = [rt.stop() for rt in made["rt"] if rt.proc.poll() is None]
        assert not leftover_qemus(d), "qemu left running"
        alive = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"
        if not os.environ.get("SHARDVU_KEEP_LAB"):
            shutil.rmtree(d, ignore_errors=True)
    assert all(c == 0 for c in codes), f"shardvu run exit codes {codes}"


def _counts(rt: Runtime, queues):
    try:
        stats = rt.queue_stats()
    except Exception:
        return [0] * len(queues)
    return [stats[q]["packets"] for q in queues]


def _wait_growth(rt: Runtime, guest: Guest, timeout: float, queues):
    """Until every queue in ``queues`` of ``rt`` counted a frame."""
    deadline = time.monotonic() + timeout
    while True:
        now = _counts(rt, queues)
        if all(now):
            return now
        assert guest.running(), guest.stderr()[-2000:]
        if time.monotonic() > deadline:
            raise AssertionError(f"{rt.log_path}: queues {queues} did not all carry "
                                 f"traffic: {now}\nserial: {guest.serial()[-1500:]}\n"
                                 f"qemu: {guest.stderr()[-1500:]}")
        time.sleep(0.2)


def _errors(rt: Runtime):
    return [line for line in rt.log().splitlines() if "ERROR" in line or "Traceback" in line]


def _drill(lab, guest: Guest, rt: Runtime, extra=(), port="sink", kills: int = 2,
           restart=None) -> None:
    """Traffic on every queue of ``rt``; then ``kills`` times: kill -9,
    the guest sees its carrier drop, a new instance with the same
    arguments, traffic on every queue of it (TX; with loopback the guest's
    frames come back on RX too) and the carrier up again."""
    queues = [2 * i + 1 for i in range(QUEUES)]
    if port == "loopback":
        queues += [2 * i for i in range(QUEUES)]
    guest.wait_for(r"SHARDVU pktgen_setup", 90)
    _wait_growth(rt, guest, 60, queues)
    for _ in range(kills):
        killed = time.monotonic()
        lab.kill(rt)
        mark = len(guest.serial())
        guest.wait_for(r"SHARDVU round n=\d+ carrier=0", 30, start=0)   # the guest saw it go
        rt = restart() if restart is not None else lab.runtime(*extra, port=port)
        _wait_growth(rt, guest, 60, queues)
        print(f"traffic on every queue {time.monotonic() - killed:.1f} s after kill -9 "
              f"(the restart included)")
        guest.wait_for(r"SHARDVU round n=\d+ carrier=1", 60, start=mark)
        assert not _errors(rt), "\n".join(_errors(rt))
    assert guest.running()
    assert "SHARDVU error" not in guest.serial(), guest.serial()[-2000:]
    assert "vhost lacks feature" not in guest.stderr(), guest.stderr()


@pytest.mark.parametrize("port", ["sink", "loopback"])
def test_server_mode_qemu_reconnects_after_kill9(lab, port):
    """QEMU connects (``reconnect=1``); two kill -9 / restart cycles."""
    rt = lab.runtime(port=port)         # QEMU waits at start-up for its first connection
    g = lab.guest().start()
    _drill(lab, g, rt, port=port)


def test_client_mode_reconnects_to_qemu_after_kill9(lab):
    """QEMU listens (``server=on,wait=off``), ``shardvu run --client``
    connects; two kill -9 / restart cycles."""
    g = lab.guest(client=True).start()
    deadline = time.monotonic() + 20
    while not os.path.exists(lab.sock):
        assert g.running(), g.stderr()
        assert time.monotonic() < deadline, "QEMU did not create its socket"
        time.sleep(0.05)
    rt = lab.runtime("--client")
    _drill(lab, g, rt, ("--client",))


class _HeldRuntime(Runtime):
    """``shardvu run --fd N --name held``: stats on the named endpoints."""

    def stats(self, timeout: float = 2.0):
        return query(name_endpoints("held")[1], timeout)


def test_held_listening_socket_qemu_reconnects_into_the_backlog(lab, monkeypatch):
    """Socket activation's restart (docs/restart.md): the test owns the
    listening socket, as systemd's socket unit does, and hands it to each
    instance (``--fd``, the form activation takes inside shardvu).  After
    kill -9, QEMU's reconnect is queued in the socket's backlog rather than
    refused, and the next instance serves it; two cycles."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", os.path.dirname(lab.sock))
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(lab.sock)
    lst.listen(8)
    fd = lst.fileno()
    try:
        def start():
            return lab.runtime("--fd", str(fd), "--name", "held", cls=_HeldRuntime, pass_fds=(fd,))
        rt = start()
        g = lab.guest().start()
        _drill(lab, g, rt, restart=start)
    finally:
        lst.close()
