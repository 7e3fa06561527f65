"""The back-end request channel (SET_BACKEND_REQ_FD): back-end → front-end.

A small blocking client over the socket the front-end handed us.  Used for
CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG and in-band VRING_CALL/VRING_ERR.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Sequence

from . import protocol as P
from .transport import send_with_fds

log = logging.getLogger("shardvu.backend")


class BackendChannel:
    """Owns the channel's fd (closed by :meth:`close`).

    Contract: :meth:`request` sends one message (fds in the same sendmsg)
    and, when ``need_reply`` is true, waits up to ``timeout`` seconds for the
    front-end's u64 answer and returns it (0 = success); without a reply it
    returns 0.  Any failure (closed socket, timeout, malformed reply) is
    logged and returns -1; it never raises.  Thread-safe: calls serialise on
    an internal lock, as libvhost-user's ``slave_mutex`` does.
    """

    def __init__(self, fd: int, timeout: float = 5.0):
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
