"""The control process: ``shardvu run`` (and ``shardvu-net``).

Owns the vhost-user socket and the negotiation (:class:`ShardedDevice`),
the worker pool, the stats collector and, with ``metrics``, the Prometheus
endpoint.  Where the vhost-user connection comes from:

* a socket path (default): shardvu binds and listens there, the socket's
  mode (``socket_mode``, default 0600) and group (``socket_group``)
  applied before anyone can connect, and removes it on exit;
* ``client``: shardvu connects to a front-end listening on the path,
  retrying until it appears;
* an inherited fd (``--fd N``, QEMU's back-end convention): a *listening*
  socket (virtiofsd's convention; systemd hands over the same) is served
  like a path, a *connected* one (one end of a socketpair, as libvirt gives
  vhost-user-gpu) is a single session: shardvu exits when it ends.  The two
  are told apart with ``SO_ACCEPTCONN``;
* systemd socket activation (``LISTEN_FDS``/``LISTEN_PID``): one socket,
  handled as an inherited fd.

When a front-end disconnects the device is torn down (workers reset,
memory unmapped, fds closed) and the next connection is served.  SIGINT and
SIGTERM stop everything promptly: workers stopped, socket removed.  Every
problem found while starting (a missing directory, an fd that is no
socket, a port that cannot be opened) is raised as :class:`StartupError`
with a one-line message, before any worker starts where possible.
"""
from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import stat
import threading
from typing import Any, List, Optional, Tuple

from shardvu.net import NetIface
from shardvu.runner import Runner
from shardvu.statsapi import endpoints, name_endpoints

from .pool import WorkerPool
from .sharded import ShardedDevice
from .stats import StatsCollector
from .supervisor import Supervisor
from .zygote import CPYTHON, Zygote

log = logging.getLogger("shardvu.control")

#: fd number of the first socket systemd passes (sd_listen_fds' SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3


class StartupError(Exception):
    """shardvu cannot start as asked; the message is one line for the user."""


class ControlRunner(Runner):
    """The single-threaded connection loop; the supervisor's pidfds (worker
    deaths) and zygote channel are polled in it."""

    def __init__(self, device: ShardedDevice, collector: Optional[StatsCollector],
                 supervisor: Optional[Supervisor] = None):
        super().__init__(device, poll_interval=0.2, watch_kicks=False)
        self.collector = collector
        self.supervisor = supervisor
        if supervisor is not None:
            self.aux_fds = supervisor.fds

    def on_tick(self) -> None:
        if self.supervisor is not None:
            self.supervisor.on_tick()       # respawns whose back-off has passed
            return
        for w in self.device.pool.reap():
            if self.collector is not None:
                self.collector.mark_dead(w.index, w.exitcode)
        pids = self.device.pool.pids()
        if self.collector is not None and pids != getattr(self, "_pids", pids):
            self.collector.set_workers(pids)        # the device replaced dead workers
        self._pids = pids

    def run_connection(self, conn: socket.socket) -> None:
        if self.supervisor is not None:
            self.supervisor.revive_broken()     # a new session: crash-looped queues start afresh
        self.device.session_fd = conn.fileno()  # held by the workers too (ShardedDevice.session_fd)
        try:
            super().run_connection(conn)
        finally:
            self.device.session_fd = -1


# -- where the connection comes from ----------------------------------------------

def parse_mode(text: str) -> int:
    """An octal permission string (``"0660"``, ``"660"``) as an int in
    0..0o777; ValueError otherwise."""
    try:
        mode = int(text, 8)
    except (TypeError, ValueError):
        raise ValueError(f"socket mode {text!r} is not an octal number such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"socket mode {text!r} outside 0000..0777")
    return mode


def resolve_group(group: str) -> int:
    """A group name or number as a gid; ValueError if there is no such group."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no such group {group!r}") from None


def listen_unix(path: str, mode: int = 0o600, gid: Optional[int] = None,
                backlog: int = 1) -> socket.socket:
    """Bind and listen on the Unix socket ``path`` with permission bits
    ``mode`` and, if given, group ``gid``, without a window in which the
    socket is more open than asked: the mode goes through the umask at
    bind; with a group, bind grants the owner only, and the group and the
    mode are set before listen (a connect before listen is refused anyway).
    A stale socket at ``path`` is replaced.  Raises StartupError."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StartupError(f"cannot listen on {path}: directory {directory} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first = mode if gid is None else mode & 0o700
    old = os.umask(0o777 & ~first)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        raise StartupError(f"cannot set up {path}: {exc.strerror}") from None
    return sock


def inherited_socket(fd: int) -> Tuple[socket.socket, bool]:
    """The inherited vhost-user socket ``fd`` and whether it is listening
    (``SO_ACCEPTCONN``).  Raises StartupError if ``fd`` is not open, not a
    socket, or not a Unix stream socket."""
    try:
        st = os.fstat(fd)
    except OSError:
        raise StartupError(f"--fd {fd}: no such open file descriptor") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"--fd {fd}: not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise StartupError(f"--fd {fd}: not a Unix stream socket")
    sock.set_inheritable(False)
    return sock, bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def activation_fd(environ: Any = os.environ) -> Optional[int]:
    """The socket systemd passed by socket activation (``LISTEN_FDS`` and
    ``LISTEN_PID`` naming this process), or None when not activated.  The
    variables are removed, so that no child mistakes them for its own.
    Raises StartupError unless exactly one socket was passed."""
    pid, count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    if pid is None or count is None:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    if pid != str(os.getpid()):
        return None
    if count != "1":
        raise StartupError(f"socket activation passed {count} sockets; shardvu serves one")
    return LISTEN_FDS_START


class ControlServer:
    """Everything ``shardvu run`` starts, in order, and stops, in reverse.

    Exactly one of ``socket_path`` and ``listen_fd`` names the connection
    (``client`` needs ``socket_path``).  ``name`` keys the stats endpoints
    (:func:`shardvu.statsapi.name_endpoints`); without one they derive from
    ``socket_path``, and an instance on an fd is called ``shardvu-<pid>``.
    ``queue_size`` is the largest ring the front-end may set up.
    ``metrics`` (``HOST:PORT``) starts the Prometheus endpoint.
    """

    def __init__(self, socket_path: Optional[str], queue_pairs: int, port: str = "sink", *,
                 client: bool = False, listen_fd: Optional[int] = None,
                 cpus: Optional[List[int]] = None, mac: Optional[bytes] = None, mtu: int = 0,
                 frame_size: int = 64, log_level: str = "WARNING",
                 worker_python: Optional[str] = None, name: Optional[str] = None,
                 socket_mode: int = 0o600, socket_group: Optional[int] = None,
                 queue_size: Optional[int] = None, metrics: Optional[str] = None):
        if socket_path is None and listen_fd is None:
            raise ValueError("need a socket path or an inherited fd")
        self.socket_path = socket_path
        self.client = client
        self.listen_fd = listen_fd
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.queue_size = queue_size
        self.metrics_address = metrics
        if name is None and socket_path is None:
            name = f"shardvu-{os.getpid()}"
        self.name = name
        try:
            self.pub_endpoint, self.query_endpoint = (
                name_endpoints(name, create=True) if name else endpoints(socket_path))
        except (ValueError, OSError) as exc:
            raise StartupError(f"stats endpoint: {exc}") from None
        self.pool = WorkerPool(2 * queue_pairs, port, frame_size, self.pub_endpoint, log_level, cpus,
                               worker_python)
        # Workers complete every buffer in the order they popped it.
        self.iface = NetIface(queue_pairs, mac, mtu or self.pool.port.mtu, in_order=True,
                              offloads=self.pool.port.offloads)
        self.port_control = None        # a two-way port's control side (e.g. the tap's queues)
        self.device: Optional[ShardedDevice] = None
        self.collector: Optional[StatsCollector] = None
        self.runner: Optional[ControlRunner] = None
        # Replacement workers fork from the zygote (see control/zygote.py).
        self.zygote = Zygote([worker_python or CPYTHON], initial=2 * queue_pairs)
        self.supervisor: Optional[Supervisor] = None
        self.metrics = None
        self._stopping = threading.Event()

    def _connection(self) -> Tuple[Optional[socket.socket], bool]:
        """``(socket, listening)`` to serve; ``(None, False)`` in client mode."""
        if self.client:
            return None, False
        if self.listen_fd is not None:
            return inherited_socket(self.listen_fd)
        return listen_unix(self.socket_path, self.socket_mode, self.socket_group), True

    def run(self) -> int:
        """Serve until stopped (or, on a connected fd, until that session
        ends); returns the exit status.  Raises StartupError."""
        self._install_signals()
        sock, listening = self._connection()
        owns_path = sock is not None and self.listen_fd is None
        try:
            self._open_port()
            # Workers before any thread or ZeroMQ context: they fork from
            # this process (and close every fd they inherit).
            self.zygote.start()
            self.supervisor = Supervisor(self.pool, self.zygote)
            self.pool.spawner = self.supervisor.spawn     # every worker from the zygote
            self.pool.start()
            self.collector = StatsCollector(self.pub_endpoint, self.query_endpoint,
                                            socket_path=self.socket_path, name=self.name)
            self.collector.set_workers(self.pool.pids())
            self.collector.start()
            self.supervisor.collector = self.collector
            if self.metrics_address:
                from shardvu import metrics
                try:
                    self.metrics = metrics.serve(self.metrics_address, self.collector.snapshot,
                                                 self.name or "")
                except OSError as exc:
                    raise StartupError(f"cannot serve metrics on {self.metrics_address}: "
                                       f"{exc.strerror or exc}") from None
                log.info("metrics on http://%s:%d/metrics", *self.metrics.address)
            kwargs = {} if self.queue_size is None else {"max_queue_size": self.queue_size}
            self.device = ShardedDevice(self.pool, self.iface, **kwargs)
            self.supervisor.attach(self.device)
            self.supervisor.watch_all()
            self.runner = ControlRunner(self.device, self.collector, self.supervisor)
            if self._stopping.is_set():
                return 0
            where = self.socket_path if self.listen_fd is None else f"fd {self.listen_fd}"
            log.info("shardvu %s: %s %s%s", self.name or self.socket_path,
                     "connecting to" if self.client else "serving", where,
                     "" if listening or self.client else " (one connected session)")
            if self.client:
                self.runner.serve_client(self.socket_path)
            elif listening:
                self.runner.serve(self.socket_path or "", listener=sock)
            else:
                self.runner.run_connection(sock)
        finally:
            if sock is not None:
                sock.close()
            if owns_path:
                try:
                    os.unlink(self.socket_path)
                except OSError:
                    pass
            if self.metrics is not None:
                self.metrics.close()
            self.pool.stop()
            if self.port_control is not None:
                self.port_control.close()
            if self.supervisor is not None:
                self.supervisor.close()
            self.zygote.stop()
            if self.collector is not None:
                self.collector.close()
        return 0

    def _open_port(self) -> None:
        """Open a two-way port's control side (``tap:IFNAME``: create or
        attach the tap, one queue fd per pair); its fds go to each pair's
        workers with their snapshots.  Raises StartupError (one line)."""
        pairs = self.pool.num_queues // 2
        try:
            self.port_control = self.pool.port.open_control(pairs)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if self.port_control is None:
            return
        self.iface.port = self.port_control
        for pair in range(pairs):
            self.pool.set_port(pair, self.port_control.kind, self.port_control.fds(pair),
                               self.port_control.meta(pair))

    def stop(self) -> None:
        """Ask :meth:`run` to return soon (signal-safe)."""
        self._stopping.set()
        if self.runner is not None:
            self.runner.stop()

    def _install_signals(self) -> None:
        def on_signal(signum, frame):
            log.info("signal %d: shutting down", signum)
            self.stop()
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

        def on_hup(signum, frame):          # live upgrade, run from the control loop
            if self.supervisor is not None:
                log.info("SIGHUP: replacing every worker with the code installed now")
                self.supervisor.reload_requested = True
        signal.signal(signal.SIGHUP, on_hup)
