"""Run the test guest (:mod:`shardvu.testing.guest`) in QEMU against a vhost-user
back-end.

::

    with Guest(sock, queues=2, mode="pktgen", cmdline_extra="shardvu.count=2000") as g:
        g.start()
        g.wait_for(r"SHARDVU done", timeout=60)
        print(g.results()["pktgen"])

What the launcher always does, and why:

- TCG (``-accel tcg``, ``thread=multi`` with several vCPUs): nested KVM is
  not usable on the machines this runs on; a guest boots in a few seconds.
- ``vectors=0`` on the virtio-net-pci device: QEMU 7.2 under TCG segfaults
  in ``msix_set_vector_notifiers`` when vhost-user starts with MSI-X on.
  The guest then runs on one legacy INTx line.
- ``romfile=`` (no option ROM: nothing here boots from the network).
- guest memory from a shared memfd (vhost-user maps it in the back-end).
- ``-smp`` defaults to ``queues``: the guest driver enables
  min(queues, vCPUs) queue pairs.
- a QMP socket, for :meth:`Guest.qmp` / :meth:`Guest.set_link`.
- ``ipv6.disable=1`` on the kernel command line: the guest sends no frame of
  its own (no router solicitation, DAD, MLD), so counts are exact.

The serial console goes to ``serial_log``; :meth:`Guest.results` parses its
``SHARDVU <event> key=value ...`` lines.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Guest", "have_qemu", "QEMU", "parse_results", "leftover_qemus"]

QEMU = "qemu-system-x86_64"

_LINE = re.compile(r"SHARDVU (\w+)((?: [\w.]+=\S*)*)")


def have_qemu() -> Tuple[bool, str]:
    """Whether qemu-system-x86_64 is here, and if not why."""
    path = shutil.which(QEMU)
    if path is None:
        return False, f"{QEMU} not installed (apt-get install qemu-system-x86)"
    return True, path


def _value(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def parse_results(text: str) -> Dict[str, List[Dict[str, Any]]]:
    """``{event: [fields of each SHARDVU <event> line, in order]}``; numbers
    become int / float."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for m in _LINE.finditer(text):
        fields = {}
        for kv in m.group(2).split():
            k, _, v = kv.partition("=")
            fields[k] = _value(v)
        out.setdefault(m.group(1), []).append(fields)
    return out


def leftover_qemus(marker: Optional[str] = None) -> List[int]:
    """Pids of qemu-system-x86_64 processes still running (with ``marker`` in
    their command line, if given)."""
    import psutil
    pids = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if p.info["name"] == QEMU or (cmd and os.path.basename(cmd[0]) == QEMU):
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if marker is None or any(marker in c for c in cmd):
                    pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


class Guest:
    """One QEMU guest with a vhost-user virtio-net device on ``sock``.

    ``client=False`` (the usual): QEMU connects to a back-end listening on
    ``sock``; with ``reconnect`` it reconnects (every second) after the
    back-end goes away.  QEMU waits at start-up until the first connection
    succeeds, so start the back-end first.  ``client=True``: QEMU listens on
    ``sock`` (``server=on,wait=off``) and the back-end connects
    (``shardvu run --client``); QEMU's start-up then blocks until the
    back-end connects.

    ``mode`` and ``cmdline_extra`` make the kernel command line (see
    :mod:`shardvu.testing.guest`)."""

    def __init__(self, sock: str, queues: int = 1, mode: str = "up", cmdline_extra: str = "", *,
                 client: bool = False, reconnect: bool = True, smp: Optional[int] = None,
                 mem: str = "512M", serial_log: Optional[str] = None, mac: Optional[str] = None,
                 kernel: Optional[str] = None, initramfs: Optional[str] = None,
                 extra_args: Tuple[str, ...] = (), tap: Optional[str] = None):
        self.sock = sock
        self.queues = queues
        self.mode = mode
        self.cmdline_extra = cmdline_extra
        self.client = client
        self.reconnect = reconnect
        self.smp = smp or queues
        self.mem = mem
        self._tmpdir = tempfile.mkdtemp(prefix="shardvu-qemu-")
        self.serial_log = serial_log or os.path.join(self._tmpdir, "serial.log")
        self.qmp_path = os.path.join(self._tmpdir, "qmp.sock")
        self.stderr_path = os.path.join(self._tmpdir, "qemu.stderr")
        self.mac = mac
        self.kernel = kernel
        self.initramfs = initramfs
        self.extra_args = tuple(extra_args)
        #: QEMU's own tap back-end on this interface (no vhost) instead of
        #: vhost-user on ``sock``: the side-by-side comparison
        self.tap = tap
        self.proc: Optional[subprocess.Popen] = None
        self._qmp: Optional[socket.socket] = None
        self._qmp_buf = b""
        self.started_at = 0.0

    # -- command line ------------------------------------------------------------------
    def cmdline(self) -> str:
        parts = ["console=ttyS0", "panic=-1", "ipv6.disable=1", "loglevel=4",
                 f"shardvu.mode={self.mode}"]
        if self.cmdline_extra:
            parts.append(self.cmdline_extra)
        return " ".join(parts)

    def argv(self) -> List[str]:
        if self.kernel is None or self.initramfs is None:
            from .guest import build_guest
            self.kernel, self.initramfs = build_guest()
        accel = "tcg,thread=multi" if self.smp > 1 else "tcg"
        if self.client:
            chardev = f"socket,id=c0,path={self.sock},server=on,wait=off"
        else:
            chardev = f"socket,id=c0,path={self.sock}" + (",reconnect=1" if self.reconnect else "")
        dev = "virtio-net-pci,netdev=n0,mq=on,vectors=0,romfile="
        if self.mac:
            dev += f",mac={self.mac}"
        return [
            shutil.which(QEMU) or QEMU,
            "-name", "shardvu-guest",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-accel", accel, "-smp", str(self.smp), "-m", self.mem,
            "-object", f"memory-backend-memfd,id=mem,size={self.mem},share=on",
            "-numa", "node,memdev=mem",
            "-kernel", self.kernel, "-initrd", self.initramfs, "-append", self.cmdline(),
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *(["-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no,vhost=off,"
                          f"queues={self.queues}"] if self.tap else
              ["-chardev", chardev, "-netdev", f"vhost-user,id=n0,chardev=c0,queues={self.queues}"]),
            "-device", dev,
            *self.extra_args,
        ]

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> "Guest":
        if self.proc is not None:
            raise RuntimeError("already started")
        argv = self.argv()
        open(self.serial_log, "w").close()
        self._stderr = open(self.stderr_path, "w")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=subprocess.STDOUT)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def serial(self) -> str:
        """The guest's serial console so far ("" before QEMU made the file)."""
        return _read_text(self.serial_log)

    def stderr(self) -> str:
        """QEMU's stderr so far ("" before it started)."""
        return _read_text(self.stderr_path)

    def wait_for(self, regex: str, timeout: float = 60.0, start: int = 0) -> "re.Match":
        """The first match of ``regex`` in the serial output (from offset
        ``start``); raises TimeoutError (with the console's tail) after
        ``timeout`` seconds, RuntimeError if QEMU exits first."""
        pat = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial()
            m = pat.search(text, start)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                text = self.serial()
                m = pat.search(text, start)
                if m:
                    return m
                raise RuntimeError(f"qemu exited {self.proc.returncode} before {regex!r}\n"
                                   f"stderr: {self.stderr()[-2000:]}\nserial: {text[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {regex!r} on the serial console after {timeout} s\n"
                                   f"serial: {text[-3000:]}\nstderr: {self.stderr()[-1000:]}")
            time.sleep(0.05)

    def wait_done(self, timeout: float = 60.0) -> Dict[str, List[Dict[str, Any]]]:
        """Wait for ``SHARDVU done`` and for QEMU to exit (the guest powers
        off); returns :meth:`results`."""
        self.wait_for(r"SHARDVU done", timeout)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return self.results()

    def results(self) -> Dict[str, List[Dict[str, Any]]]:
        """``{event: [fields, ...]}`` from the SHARDVU lines so far; see
        :func:`parse_results`."""
        return parse_results(self.serial())

    def result(self, event: str) -> Dict[str, Any]:
        """The fields of the last ``SHARDVU <event>`` line (KeyError if none)."""
        got = self.results().get(event)
        if not got:
            raise KeyError(f"no SHARDVU {event} line; serial: {self.serial()[-2000:]}")
        return got[-1]

    # -- QMP ---------------------------------------------------------------------------
    def _qmp_line(self, timeout: float) -> Dict[str, Any]:
        assert self._qmp is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._qmp_buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QMP: no reply")
            self._qmp.settimeout(left)
            chunk = self._qmp.recv(65536)
            if not chunk:
                raise ConnectionError("QMP: connection closed")
            self._qmp_buf += chunk
        line, _, self._qmp_buf = self._qmp_buf.partition(b"\n")
        return json.loads(line)

    def _qmp_connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.qmp_path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or not self.running():
                    raise
                time.sleep(0.05)
        self._qmp, self._qmp_buf = s, b""
        self._qmp_line(timeout)                       # greeting
        self.qmp("qmp_capabilities", timeout=timeout)

    def qmp(self, command: str, timeout: float = 10.0, **arguments) -> Any:
        """Run a QMP command; returns its ``return`` value, raises
        RuntimeError on an ``error`` reply."""
        if self._qmp is None and command != "qmp_capabilities":
            self._qmp_connect(timeout)
        assert self._qmp is not None
        msg: Dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._qmp_line(timeout)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            # an event: ignore

    def set_link(self, up: bool) -> None:
        """QMP ``set_link n0``: link down stops the vhost-user rings
        (GET_VRING_BASE on each) and the guest sees its carrier drop."""
        self.qmp("set_link", name="n0", up=up)

    # -- stop -------------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> Optional[int]:
        """Quit QEMU: QMP ``quit``, then SIGTERM, then SIGKILL.  Returns its
        exit status (None if never started)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                self.qmp("quit", timeout=2.0)
            except Exception:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None
        return None if proc is None else proc.returncode

    def cleanup(self) -> None:
        """Stop, and remove the temporary directory (QMP socket, logs that
        were not given a path)."""
        self.stop()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
