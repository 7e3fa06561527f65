"""The back-end request channel (SET_BACKEND_REQ_FD): back-end → front-end.

A small blocking client over the socket the front-end handed us.  Used for
CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG and in-band VRING_CALL/VRING_ERR.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from typing import Sequence

from . import protocol as P
from .transport import fd_kind, send_with_fds

log = logging.getLogger("shardvu.backend")


def _check_channel_fd(fd: int) -> None:
    """ValueError unless ``fd`` is a connected Unix stream socket.  Asks
    the kernel: fstat first (S_ISSOCK), then getsockopt on a duplicate."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ValueError(f"back-end request fd {fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"back-end request fd is {fd_kind(mode)}, not a socket")
    probe = socket.socket(fileno=os.dup(fd))
    try:
        family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        try:
            probe.getpeername()
            connected = True
        except OSError:
            connected = False
    finally:
        probe.close()
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise ValueError(f"back-end request fd is a socket of family {family} type {kind}, "
                         "not a Unix stream socket")
    if listening:
        raise ValueError("back-end request fd is a listening socket, not a connected one")
    if not connected:
        raise ValueError("back-end request fd is a socket that is not connected")


class BackendChannel:
    """Owns the channel's fd (closed by :meth:`close`).

    The constructor takes ownership of ``fd`` even when it fails: an fd
    that is not a connected ``AF_UNIX`` ``SOCK_STREAM`` socket (an eventfd,
    a pipe, a listening or datagram socket...) is closed and ValueError
    raised naming what it is.

    Contract: :meth:`request` sends one message (fds in the same sendmsg)
    and, when ``need_reply`` is true, waits up to ``timeout`` seconds for the
    front-end's u64 answer and returns it (0 = success); without a reply it
    returns 0.  Any failure (closed socket, timeout, malformed reply) is
    logged and returns -1; it never raises.  Thread-safe: calls serialise on
    an internal lock, as libvhost-user's ``slave_mutex`` does.
    """

    def __init__(self, fd: int, timeout: float = 5.0):
        try:
            _check_channel_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        self.sock = socket.socket(fileno=fd)
        self.sock.settimeout(timeout)
        self._lock = threading.Lock()
        self.sent = 0

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                need_reply: bool = False) -> int:
        flags = P.VERSION | (P.FLAG_NEED_REPLY if need_reply else 0)
        data = P.encode(request, payload, flags)
        name = P.BackendRequest(request).name if request in P.BackendRequest._value2member_map_ else str(request)
        with self._lock:
            try:
                send_with_fds(self.sock, data, fds)
                self.sent += 1
                if not need_reply:
                    return 0
                reader = P.MessageReader()
                while True:
                    chunk = self.sock.recv(64)
                    if not chunk:
                        raise ConnectionError("front-end closed the channel")
                    reader.feed(chunk)
                    reply = reader.next_message()
                    if reply is not None:
                        break
                if reply.request != request or len(reply.payload) != 8:
                    raise P.ProtocolError(f"unexpected reply {reply!r}")
                return reply.u64()
            except (OSError, P.ProtocolError) as exc:
                log.error("backend request %s failed: %s", name, exc)
                return -1

    def close(self) -> None:
        self.sock.close()

    @property
    def fileno(self) -> int:
        return self.sock.fileno()
