"""A single-process back-end loop: libvhost-user's own usage model.

One thread polls the vhost-user socket and every watched kick fd; messages
go through :class:`~shardvu.device.Device`, kicks run the queue handlers.
A simple back-end is a few lines::

    dev = Device(2, NetIface(1))
    dev.set_queue_handler(1, on_tx)
    Runner(dev).serve("/tmp/vhost.sock")

Contract: :meth:`Runner.run_connection` returns when the front-end
disconnects (or sends something the stream cannot recover from), after
``device.close()`` released every fd and mapping of that session.
:meth:`Runner.serve` then accepts the next connection, until :meth:`stop`.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
from typing import Callable, Dict, Optional

from .device import Device, Unwatch, Watch
from .protocol import MessageReader, ProtocolError, ProtocolFeature, request_name
from .transport import recv_with_fds, send_with_fds

log = logging.getLogger("shardvu.runner")


class Runner:
    """Drives one :class:`Device` over a socket, single-threaded."""

    def __init__(self, device: Device, poll_interval: float = 0.2, watch_kicks: bool = True):
        self.device = device
        self.poll_interval = poll_interval
        #: False when the rings are served elsewhere (the sharded runtime's
        #: workers): kick fds are then neither watched nor polled here.
        self.watch_kicks = watch_kicks
        self._stop = threading.Event()
        self._watched: Dict[int, int] = {}     # kick fd -> queue index
        self.polling_queues: set = set()        # queues with no kick fd (NOFD)
        #: More fds to watch, with the socket and between connections: fd ->
        #: handler called when it is readable (re-read every pass; the
        #: sharded runtime's worker pidfds).
        self.aux_fds: Dict[int, Callable[[], None]] = {}
        self._aux_polled: set = set()

    def stop(self) -> None:
        """Ask :meth:`serve` / :meth:`run_connection` to return soon (thread-safe)."""
        self._stop.set()

    # -- connection setup -----------------------------------------------------
    def serve(self, path: str, listener: Optional[socket.socket] = None) -> None:
        """Listen on ``path`` (mode 0600, removed on return) or on an inherited
        ``listener``, and serve one front-end at a time until :meth:`stop`."""
        own = listener is None
        if own:
            if os.path.exists(path):
                os.unlink(path)
            # Bound and listening under a temporary name, then renamed: the
            # path never exists without a listener behind it (a front-end
            # that connects as soon as it appears is not refused).
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            tmp = f"{path}.{os.getpid()}.tmp"
            if len(os.fsencode(tmp)) > 107:      # sun_path is 108 bytes: no room to rename
                tmp = path
            old = os.umask(0o177)
            try:
                listener.bind(tmp)
                listener.listen(1)
                if tmp != path:
                    os.rename(tmp, path)
            except OSError:
                listener.close()
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            finally:
                os.umask(old)
        listener.settimeout(self.poll_interval)
        try:
            while not self._stop.is_set():
                try:
                    if not self._wait_aux(listener.fileno(), self.poll_interval):
                        raise socket.timeout
                    conn, _ = listener.accept()
                except socket.timeout:
                    self.on_tick()
                    continue
                self.run_connection(conn)
        finally:
            if own:
                listener.close()
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def serve_client(self, path: str, retry_interval: float = 0.5) -> None:
        """Client mode: connect to a front-end listening on ``path``, retrying
        until it appears; after each disconnection connect again, until
        :meth:`stop`."""
        while not self._stop.is_set():
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(path)
            except OSError:
                conn.close()
                self.on_tick()
                self._wait_aux(-1, retry_interval)
                continue
            log.info("connected to front-end at %s", path)
            self.run_connection(conn)

    def _wait_aux(self, fd: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``fd`` (-1: none) or an aux fd to be
        readable; run the handlers of the aux fds that are.  True if ``fd``
        is readable."""
        fds = [fd] if fd >= 0 else []
        ready, _, _ = select.select(fds + list(self.aux_fds), [], [], timeout)
        for r in ready:
            handler = self.aux_fds.get(r)
            if handler is not None and r != fd:
                handler()
        return fd in ready

    def _sync_aux(self, poller) -> None:
        want = set(self.aux_fds)
        for fd in self._aux_polled - want:
            if fd not in self._watched:
                poller.unregister(fd)
        for fd in want - self._aux_polled:
            poller.register(fd, select.POLLIN)
        self._aux_polled = want

    def on_tick(self) -> None:
        """Called at least every ``poll_interval`` (between connections too);
        a hook for subclasses."""

    # -- the loop ---------------------------------------------------------------
    def run_connection(self, conn: socket.socket) -> None:
        """Serve ``conn`` until it closes; then tear the device down."""
        dev = self.device
        reader = MessageReader()
        conn.setblocking(False)
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        self._aux_polled = set()
        try:
            while not self._stop.is_set():
                timeout = 0 if self.polling_queues else self.poll_interval * 1000
                self._sync_aux(poller)
                for fd, ev in poller.poll(timeout):
                    if fd == conn.fileno():
                        if not self._on_socket(conn, reader, poller):
                            return
                    elif fd in self.aux_fds:
                        self.aux_fds[fd]()
                    elif fd in self._watched:
                        dev.kick(self._watched[fd])
                for q in list(self.polling_queues):
                    dev.kick(q)
                self.on_tick()
        finally:
            for fd in reader.pending_fds():
                os.close(fd)
            for fd in list(self._watched):
                poller.unregister(fd)
            self._watched.clear()
            self.polling_queues.clear()
            dev.close()
            conn.close()
            log.info("front-end disconnected; device reset")

    def _on_socket(self, conn: socket.socket, reader: MessageReader, poller) -> bool:
        try:
            data, fds = recv_with_fds(conn)
        except BlockingIOError:
            return True
        except OSError as exc:
            log.error("socket read failed: %s", exc)
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            if reader.buffered:
                log.error("front-end closed mid-message (%d bytes of a truncated message)", reader.buffered)
            return False
        reader.feed(data, fds)
        while True:
            try:
                msg = reader.next_message()
            except ProtocolError as exc:
                log.error("%s: %s; dropping the connection",
                          request_name(exc.request) if exc.request is not None else "header", exc.reason)
                return False
            if msg is None:
                return True
            outcome = self.device.handle(msg)
            for action in outcome.actions:
                if isinstance(action, Watch) and self.watch_kicks:
                    self._watched[action.fd] = action.qidx
                    poller.register(action.fd, select.POLLIN)
                    self.polling_queues.discard(action.qidx)
                elif isinstance(action, Unwatch):
                    if self._watched.pop(action.fd, None) is not None:
                        poller.unregister(action.fd)
            for reply in outcome.replies:
                try:
                    conn.setblocking(True)
                    send_with_fds(conn, reply.data, reply.fds)
                except OSError as exc:
                    log.error("%s: sending the reply failed: %s", msg.name, exc)
                    return False
                finally:
                    conn.setblocking(False)
            if outcome.close is not None:
                log.error("closing the connection: %s", outcome.close)
                return False
            # A started ring with no kick fd is polled (SET_VRING_KICK with NOFD).
            inband = self.device.has_protocol_feature(ProtocolFeature.INBAND_NOTIFICATIONS)
            for vq in self.device.vqs:
                if vq.started and vq.kick_fd < 0 and not inband and self.watch_kicks:
                    self.polling_queues.add(vq.index)
                else:
                    self.polling_queues.discard(vq.index)
