"""The control process: ``shardvu run``.

Owns the vhost-user socket and the negotiation (:class:`ShardedDevice`),
the worker pool and the stats collector.  Server mode (default) listens on
the socket path (mode 0600, removed on exit) or on an inherited listening
fd (``--fd``); ``--client`` connects to a front-end's listening socket,
retrying until it appears.  When a front-end disconnects the device is torn
down (workers reset, memory unmapped, fds closed) and the next connection is
served.  SIGINT and SIGTERM stop everything cleanly: workers stopped, socket
removed.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
from typing import List, Optional

from shardvu.net import NetIface
from shardvu.runner import Runner

from .pool import WorkerPool
from .sharded import ShardedDevice
from .stats import StatsCollector, endpoints

log = logging.getLogger("shardvu.control")


class ControlRunner(Runner):
    """The single-threaded connection loop, with worker liveness checks."""

    def __init__(self, device: ShardedDevice, collector: Optional[StatsCollector]):
        super().__init__(device, poll_interval=0.2, watch_kicks=False)
        self.collector = collector

    def on_tick(self) -> None:
        for w in self.device.pool.reap():
            if self.collector is not None:
                self.collector.mark_dead(w.index, w.exitcode)


class ControlServer:
    """Everything ``shardvu run`` starts, in order, and stops, in reverse."""

    def __init__(self, socket_path: Optional[str], queue_pairs: int, port: str = "sink", *,
                 client: bool = False, listen_fd: Optional[int] = None,
                 cpus: Optional[List[int]] = None, mac: Optional[bytes] = None, mtu: int = 0,
                 frame_size: int = 64, log_level: str = "WARNING",
                 worker_python: Optional[str] = None):
        if socket_path is None and listen_fd is None:
            raise ValueError("need a socket path or an inherited fd")
        self.socket_path = socket_path
        self.client = client
        self.listen_fd = listen_fd
        stats_key = socket_path or f"/tmp/shardvu-fd{listen_fd}-{os.getpid()}"
        self.pub_endpoint, self.query_endpoint = endpoints(stats_key)
        self.pool = WorkerPool(2 * queue_pairs, port, frame_size, self.pub_endpoint, log_level, cpus,
                               worker_python)
        # Workers complete every buffer in the order they popped it.
        self.iface = NetIface(queue_pairs, mac, mtu, in_order=True)
        self.device: Optional[ShardedDevice] = None
        self.collector: Optional[StatsCollector] = None
        self.runner: Optional[ControlRunner] = None

    def run(self) -> int:
        # Workers first: they fork from a process holding no sockets or
        # ZeroMQ context yet.
        self.pool.start()
        try:
            self.collector = StatsCollector(self.pub_endpoint, self.query_endpoint,
                                            socket_path=self.socket_path)
            self.collector.set_workers(self.pool.pids())
            self.collector.start()
            self.device = ShardedDevice(self.pool, self.iface)
            self.runner = ControlRunner(self.device, self.collector)
            self._install_signals()
            if self.client:
                log.info("client mode: connecting to %s", self.socket_path)
                self.runner.serve_client(self.socket_path)
            elif self.listen_fd is not None:
                listener = socket.socket(fileno=self.listen_fd)
                self.runner.serve(self.socket_path or "", listener=listener)
                listener.close()
            else:
                log.info("listening on %s", self.socket_path)
                self.runner.serve(self.socket_path)
        finally:
            self.pool.stop()
            if self.collector is not None:
                self.collector.close()
        return 0

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()

    def _install_signals(self) -> None:
        def on_signal(signum, frame):
            log.info("signal %d: shutting down", signum)
            self.stop()
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
