"""A harness for DPDK's testpmd (Debian ``dpdk``/``dpdk-dev`` 22.11), as a
vhost-user front-end (virtio-user) or back-end (net_vhost), without
hugepages.  No pytest in here: tests/, bench/ and users all use it.

    from shardvu.testing.testpmd import TestPmd, run_testpmd, have_testpmd
    stats = run_testpmd(sock, queues=2, mode="io", seconds=5, tx_first=True)
    stats["rx_packets"], stats["tx_packets"], stats["ports"][0]["rx_packets"]

    # Two testpmds: DPDK's vhost back-end and a virtio-user front-end.
    with TestPmd.vhost(sock, queues=1, cores="1,0", mode="io") as be, \\
         TestPmd.virtio_user(sock, queues=1, cores="0,1", mode="txonly") as fe:
        fe.wait_started(); time.sleep(5); fe_stats = fe.stop(); be_stats = be.stop()

Each run gets a unique ``--file-prefix`` (and its runtime directory under
/var/run/dpdk is removed afterwards); stdout+stderr go to a log file; stdin
is a pipe kept open (non-interactive testpmd with ``-a`` forwards until
signalled).  :meth:`TestPmd.stop` sends SIGINT — testpmd then stops
forwarding and prints "Accumulated forward statistics" — waits, and falls
back to SIGKILL of the whole process group: nothing is left behind.

What virtio-user (DPDK 22.11) does on a vhost-user socket
=========================================================
Observed against ``shardvu echo --log-level DEBUG`` (and the same back-end
with extra feature bits offered); virtio-user is the socket client:

1. ``SET_OWNER``, ``GET_FEATURES``, ``GET_PROTOCOL_FEATURES``,
   ``SET_PROTOCOL_FEATURES`` = 0x10009 (MQ | REPLY_ACK | STATUS: only bits
   it knows; shardvu's NET_MTU etc. are dropped).  **No GET_QUEUE_NUM**,
   even with ``queues=4`` against a 2-pair back-end: it then simply sends
   vring indices 4..7, which the back-end must reject (shardvu logs an
   error per message and carries on; testpmd still starts and forwards on
   the pairs that exist).
2. ``SET_VRING_CALL`` for every vring of the N pairs, **before**
   SET_FEATURES, in virtio-user's queue order: all RX vrings then all TX
   vrings (0, 2, .., 2N-2, 1, 3, .., 2N-1).
3. ``SET_FEATURES`` = offered & supported & devargs.  Unknown offered bits
   (tried 41, 55, 63) and ones it does not do (EVENT_IDX, 29) are silently
   masked off — no error.  It never acks ``CTRL_VQ`` (17) to the back-end,
   even when offered: the control queue is emulated inside virtio-user and
   **never sent** (no vring 2N ever appears).  Acked with shardvu's offer:
   MRG_RXBUF (if ``mrg_rxbuf`` != 0), MQ (N > 1), INDIRECT_DESC,
   PROTOCOL_FEATURES, VERSION_1, and IN_ORDER (35) when offered (unless
   ``in_order=0``).
   Then ``SET_STATUS`` FEATURES_OK (NEED_REPLY) and ``GET_STATUS`` x2.
4. at port start: ``SET_MEM_TABLE`` (one memfd region, NEED_REPLY), then
   per vring in the same RX-first order: ``SET_VRING_NUM`` (256),
   ``SET_VRING_BASE`` (0), ``SET_VRING_ADDR``, ``SET_VRING_KICK``.  Vrings
   of all N pairs are set up, whatever ``--rxq/--txq``.
5. ``SET_VRING_ENABLE`` 1 for vrings 0 and 1 only, ``SET_STATUS``
   DRIVER_OK, and **after** DRIVER_OK ``SET_VRING_ENABLE`` 1 for vrings
   2..2P-1, where P = the pairs testpmd uses (``--rxq``): the emulated
   VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET becomes SET_VRING_ENABLE.  With
   ``queues=2 --rxq=1`` vrings 2 and 3 are set up but never enabled.  A
   back-end must accept rings that are started but disabled, and enables
   arriving after DRIVER_OK.
6. at SIGINT: ``SET_VRING_ENABLE`` 0 for each enabled vring, then
   ``GET_VRING_BASE`` for every set-up vring (RX first), then close on exit
   (no RESET_OWNER / SET_STATUS 0).  testpmd exits 0.

``packed_vq=1``: if the back-end does not offer VIRTIO_F_RING_PACKED (34)
virtio-user silently falls back to the split ring (SET_FEATURES without
bit 34; same message sequence; traffic flows, exits 0).  If the back-end
*does* offer bit 34, virtio-user acks it and lays out packed rings — a
back-end that offers it must really implement them (an echo patched to
offer it marked queue 1 broken: "avail idx moved by 32769").

With ``mrg_rxbuf``/``in_order``/``packed_vq`` unset, DPDK's defaults
apply: mrg_rxbuf=1, in_order=1, packed_vq=0.

Seen with this harness (not a virtio-user issue): ``shardvu echo`` with one
pair under io --tx-first intermittently logs "queue 0 broken: avail idx
moved by N > queue size 256" on the RX vring after a few seconds
(tests/test_dpdk_echo.py::test_echo_rx_queue_not_broken, xfail).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Union

__all__ = ["TESTPMD", "have_testpmd", "TestPmd", "TestPmdError", "run_testpmd",
           "parse_stats", "leftover_testpmds", "virtio_user_vdev", "vhost_vdev"]

TESTPMD = shutil.which("dpdk-testpmd")
RUNTIME_DIR = "/var/run/dpdk"
_counter = itertools.count()


def have_testpmd() -> bool:
    """True if ``dpdk-testpmd`` is on PATH."""
    return TESTPMD is not None


class TestPmdError(RuntimeError):
    """testpmd failed to start or exited early; ``log`` holds its output."""

    def __init__(self, msg: str, log: str = ""):
        super().__init__(msg + ("\n--- testpmd log (tail) ---\n" + log[-4000:] if log else ""))
        self.log = log


def virtio_user_vdev(sock: str, queues: int = 1, *, index: int = 0, mrg_rxbuf: Optional[bool] = None,
                     in_order: Optional[bool] = None, packed_vq: Optional[bool] = None,
                     server: bool = False, queue_size: Optional[int] = None, **extra) -> str:
    """The ``--vdev`` string of a virtio-user port (a vhost-user front-end)
    on ``sock``; None leaves an option at DPDK's default."""
    parts = [f"net_virtio_user{index}", f"path={sock}", f"queues={queues}"]
    for name, val in (("mrg_rxbuf", mrg_rxbuf), ("in_order", in_order), ("packed_vq", packed_vq)):
        if val is not None:
            parts.append(f"{name}={int(bool(val))}")
    if server:
        parts.append("server=1")
    if queue_size:
        parts.append(f"queue_size={queue_size}")
    parts += [f"{k}={v}" for k, v in extra.items()]
    return ",".join(parts)


def vhost_vdev(sock: str, queues: int = 1, *, index: int = 0, client: bool = False, **extra) -> str:
    """The ``--vdev`` string of DPDK's own vhost-user back-end port."""
    parts = [f"net_vhost{index}", f"iface={sock}", f"queues={queues}"]
    if client:
        parts.append("client=1")
    parts += [f"{k}={v}" for k, v in extra.items()]
    return ",".join(parts)


class TestPmd:
    """One ``dpdk-testpmd`` process.

    ``vdevs``: one or more ``--vdev`` strings (see :func:`virtio_user_vdev`,
    :func:`vhost_vdev`).  ``cores``: the ``-l`` list; the first core is the
    main lcore, the others forward.  ``mode``: ``--forward-mode`` (io,
    txonly, rxonly, macswap, ...).  ``rxq``/``txq`` default to ``queues``.
    ``stats_period``: seconds between testpmd's own statistics prints (0:
    none).  ``extra_eal``/``extra_app``: more arguments before/after ``--``.
    Use as a context manager or call :meth:`start`/:meth:`stop`.
    """

    __test__ = False            # not a pytest class

    def __init__(self, vdevs: Union[str, Sequence[str]], *, queues: int = 1, mode: str = "io",
                 cores: str = "0,1", rxq: Optional[int] = None, txq: Optional[int] = None,
                 tx_first: bool = False, txpkts: Optional[Union[int, str]] = None,
                 mem_mb: int = 1024, total_mbufs: int = 32768, stats_period: int = 1,
                 auto_start: bool = True, extra_eal: Sequence[str] = (), extra_app: Sequence[str] = (),
                 log_path: Optional[str] = None, file_prefix: Optional[str] = None,
                 testpmd: Optional[str] = None):
        self.exe = testpmd or TESTPMD
        if not self.exe:
            raise TestPmdError("dpdk-testpmd not found (apt-get install dpdk)")
        self.vdevs = [vdevs] if isinstance(vdevs, str) else list(vdevs)
        self.file_prefix = file_prefix or f"shvu{os.getpid()}n{next(_counter)}"
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"testpmd-{self.file_prefix}-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        rxq = queues if rxq is None else rxq
        txq = queues if txq is None else txq
        eal = ["-l", cores, "--no-huge", "-m", str(mem_mb), "--no-pci", f"--file-prefix={self.file_prefix}"]
        for v in self.vdevs:
            eal += ["--vdev", v]
        app = ["--no-mlockall", f"--total-num-mbufs={total_mbufs}", f"--rxq={rxq}", f"--txq={txq}",
               f"--forward-mode={mode}"]
        if tx_first:
            app.append("--tx-first")
        if txpkts is not None:
            app.append(f"--txpkts={txpkts}")
        if stats_period:
            app += ["--stats-period", str(stats_period)]
        if auto_start:
            app.append("-a")
        # Line-buffered stdout (else the log lags in a file until testpmd's
        # periodic stats flush it, and never comes with stats_period=0).
        stdbuf = shutil.which("stdbuf")
        self.argv = ([stdbuf, "-oL", "-eL"] if stdbuf else []) + [self.exe, *eal, *extra_eal, "--", *app, *extra_app]
        self.proc: Optional[subprocess.Popen] = None
        self.stats: Optional[Dict] = None
        self.returncode: Optional[int] = None
        self._stopped = False

    # -- convenience constructors -------------------------------------------

    @classmethod
    def virtio_user(cls, sock: str, queues: int = 1, *, mrg_rxbuf: Optional[bool] = None,
                    in_order: Optional[bool] = None, packed_vq: Optional[bool] = None,
                    server: bool = False, **kw) -> "TestPmd":
        """testpmd as a vhost-user front-end on ``sock``."""
        vdev = virtio_user_vdev(sock, queues, mrg_rxbuf=mrg_rxbuf, in_order=in_order,
                                packed_vq=packed_vq, server=server)
        return cls(vdev, queues=queues, **kw)

    @classmethod
    def vhost(cls, sock: str, queues: int = 1, *, client: bool = False, **kw) -> "TestPmd":
        """testpmd as a vhost-user back-end (DPDK's net_vhost) listening on
        ``sock`` (or connecting, ``client=True``).  ``--disable-link-check``
        is added so that it starts forwarding before a front-end connects
        (else it sits in "Checking link statuses..." for ~9 s)."""
        kw["extra_app"] = ["--disable-link-check", *kw.get("extra_app", ())]
        return cls(vhost_vdev(sock, queues, client=client), queues=queues, **kw)

    # -- life cycle ----------------------------------------------------------

    def start(self) -> "TestPmd":
        """Spawn testpmd (its own process group; output to ``log_path``)."""
        if self.proc is not None:
            raise TestPmdError("already started")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __enter__(self) -> "TestPmd":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """testpmd's output so far (ANSI screen clears removed)."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return text.replace("\x1b[2J", "").replace("\x1b[1;1H", "")

    def wait_for(self, pattern: str, timeout: float = 15.0) -> "re.Match":
        """Wait until the log matches ``pattern`` (regex); TestPmdError if
        testpmd exits first or the timeout passes."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            m = rx.search(text)
            if m:
                return m
            if not self.running():
                self._reap()
                raise TestPmdError(f"testpmd exited (rc={self.returncode}) before /{pattern}/", self.log())
            if time.monotonic() > deadline:
                raise TestPmdError(f"timed out after {timeout}s waiting for /{pattern}/", text)
            time.sleep(0.05)

    def wait_started(self, timeout: float = 15.0) -> None:
        """Wait until forwarding has started (``-a``): testpmd printed its
        forwarding configuration.  Raises TestPmdError on early exit (e.g.
        the vhost-user connection failed) or timeout."""
        self.wait_for(r"packet forwarding - ports=\d+", timeout)

    def stop(self, timeout: float = 10.0) -> Optional[Dict]:
        """SIGINT, wait up to ``timeout`` s, then SIGKILL the process group.
        Parses and returns the final statistics (None if there were none,
        e.g. it died early or never started forwarding).  Idempotent."""
        if self.proc is None:
            return None
        if self.returncode is None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            self._reap()
        if not self._stopped:
            self._stopped = True
            text = self.log()
            self.stats = parse_stats(text) if "Accumulated forward statistics" in text else None
            shutil.rmtree(os.path.join(RUNTIME_DIR, self.file_prefix), ignore_errors=True)
        return self.stats

    def _reap(self) -> None:
        p = self.proc
        if p.poll() is None or _group_alive(p.pid):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        if p.stdin:
            try:
                p.stdin.close()
            except OSError:
                pass
        self.returncode = p.returncode

    def cleanup_log(self) -> None:
        """Remove the log file if the harness made it."""
        if self._own_log:
            try:
                os.unlink(self.log_path)
            except FileNotFoundError:
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_FIELD = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(\d+)")


def _fields(block: str) -> Dict[str, int]:
    return {k.lower().replace("-", "_"): int(v) for k, v in _FIELD.findall(block)}


def parse_stats(text: str) -> Dict:
    """Parse testpmd's output.

    Returns the "Accumulated forward statistics" totals as ``rx_packets``,
    ``rx_dropped``, ``rx_total``, ``tx_packets``, ``tx_dropped``,
    ``tx_total`` (plus any other ``Name: N`` field of that block), and
    ``ports``: {port: {same keys}} from the per-port "Forward statistics"
    blocks, and ``nic``: {port: {rx_packets, rx_missed, rx_bytes,
    rx_errors, rx_nombuf, tx_packets, tx_errors, tx_bytes, ...}} from the
    last periodic "NIC statistics" block of each port (``--stats-period``).
    Missing blocks give empty dicts / no keys."""
    out: Dict = {"ports": {}, "nic": {}}
    acc = text.rfind("Accumulated forward statistics")
    if acc >= 0:
        block = text[acc:].split("++++\n", 1)[-1]
        block = block.split("+++", 1)[0]
        out.update(_fields(block))
    for m in re.finditer(r"-+ Forward statistics for port (\d+)\s*-+\n(.*?)\n\s*-{20,}", text, re.S):
        out["ports"][int(m.group(1))] = _fields(m.group(2))
    for m in re.finditer(r"#+ NIC statistics for port (\d+)\s*#+\n(.*?)\n\s*#{20,}", text, re.S):
        body = m.group(2).split("Throughput", 1)[0]
        out["nic"][int(m.group(1))] = _fields(body)
    return out


def run_testpmd(sock: str, queues: int = 1, mode: str = "io", seconds: float = 5.0, *,
                tx_first: Optional[bool] = None, start_timeout: float = 15.0,
                stop_timeout: float = 10.0, vdev: Optional[str] = None, **opts) -> Dict:
    """Run a virtio-user testpmd on ``sock`` for ``seconds`` of forwarding
    and return its final statistics (see :func:`parse_stats`), with
    ``returncode`` and ``log`` (the log text) added.

    ``opts`` go to :class:`TestPmd` (cores, txpkts, ...) or, for
    ``mrg_rxbuf``, ``in_order``, ``packed_vq``, ``server``, to the vdev.
    ``tx_first`` defaults to True for io mode (otherwise nothing moves).
    Raises TestPmdError if it does not start or prints no statistics."""
    vopts = {k: opts.pop(k) for k in ("mrg_rxbuf", "in_order", "packed_vq", "server") if k in opts}
    if tx_first is None:
        tx_first = mode == "io"
    pmd = TestPmd(vdev or virtio_user_vdev(sock, queues, **vopts), queues=queues, mode=mode,
                  tx_first=tx_first, **opts)
    pmd.start()
    try:
        pmd.wait_started(start_timeout)
        time.sleep(seconds)
    finally:
        stats = pmd.stop(stop_timeout)
        text = pmd.log()
        pmd.cleanup_log()
    if stats is None:
        raise TestPmdError(f"testpmd printed no statistics (rc={pmd.returncode})", text)
    stats["returncode"] = pmd.returncode
    stats["log"] = text
    return stats


def leftover_testpmds(prefix: Optional[str] = None) -> List[int]:
    """PIDs of testpmd processes whose ``--file-prefix`` starts with
    ``prefix`` (by default: any this harness started from this process;
    ``"shvu"``: from any process)."""
    if prefix is None:
        prefix = f"shvu{os.getpid()}n"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(b"--file-prefix=" + prefix.encode()) for a in argv) and \
                any(a.endswith(b"testpmd") for a in argv[:1]):
            pids.append(int(entry))
    return pids
