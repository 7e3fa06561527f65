"""The control ↔ worker command channel.

One ``SOCK_SEQPACKET`` socketpair per worker: message boundaries are kept,
and fds travel with a message (SCM_RIGHTS).  A message is a JSON object;
the worker answers every command with ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``, which is what makes each state change a
barrier: the control process waits for that answer before it replies to the
front-end.
"""
from __future__ import annotations

import array
import json
import os
import socket
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["send", "recv", "socketpair", "MAX_FDS", "ChannelClosed"]

#: The kernel's SCM_MAX_FD is 253; stay well below it.
MAX_FDS = 200
_MAX_MSG = 1 << 20
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)


class ChannelClosed(ConnectionError):
    """The other end of the channel went away."""


def socketpair() -> Tuple[socket.socket, socket.socket]:
    """A (control end, worker end) pair."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, obj: Dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message; ``fds`` are duplicated into the receiver."""
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} fds in one message (max {MAX_FDS})")
    data = json.dumps(obj, separators=(",", ":")).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        sock.sendmsg([data], anc)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ChannelClosed(str(exc)) from None


def recv(sock: socket.socket) -> Tuple[Dict[str, Any], List[int]]:
    """Receive one message and its fds (the caller owns them).  Raises
    :class:`ChannelClosed` at end of stream."""
    fds = array.array("i")
    try:
        data, anc, _flags, _addr = sock.recvmsg(_MAX_MSG, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                                _CLOEXEC)
    except ConnectionResetError as exc:
        raise ChannelClosed(str(exc)) from None
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        raise ChannelClosed("channel closed")
    return json.loads(data), list(fds)
