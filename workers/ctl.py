"""The control ↔ worker command channel.

One ``SOCK_SEQPACKET`` socketpair per worker: message boundaries are kept,
and fds travel with a message (SCM_RIGHTS, which duplicates them into the
receiver: the sender keeps its own).  A message is a JSON object; the
worker answers every command with ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``, which is what makes each state change a
barrier: the control process waits for that answer before it replies to
the front-end.

A message with more fds than one datagram may carry (:data:`MAX_FDS`; a
snapshot of a 509-region memory table has more) goes as continuation
datagrams ``{"_fds": N}`` carrying fds only, then the message itself with
the last fds; :func:`recv` reassembles them.
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
_MORE = "_fds"          # a continuation datagram: fds of the message that follows


class ChannelClosed(ConnectionError):
    """The other end of the channel went away."""


def socketpair() -> Tuple[socket.socket, socket.socket]:
    """A (control end, worker end) pair."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, obj: Dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message; ``fds`` (any number) are duplicated into the receiver."""
    fds = list(fds)
    try:
        while len(fds) > MAX_FDS:
            head, fds = fds[:MAX_FDS], fds[MAX_FDS:]
            sock.sendmsg([json.dumps({_MORE: len(head)}).encode()], _rights(head))
        sock.sendmsg([json.dumps(obj, separators=(",", ":")).encode()], _rights(fds))
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ChannelClosed(str(exc)) from None


def _rights(fds: Sequence[int]) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def recv(sock: socket.socket) -> Tuple[Dict[str, Any], List[int]]:
    """Receive one message and its fds (the caller owns them).  Raises
    :class:`ChannelClosed` at end of stream (closing any fds received)."""
    got: List[int] = []
    while True:
        obj, fds = _recv_one(sock, got)
        got += fds
        if not (isinstance(obj, dict) and set(obj) == {_MORE}):
            return obj, got


def _recv_one(sock: socket.socket, pending: List[int]) -> Tuple[Any, List[int]]:
    fds = array.array("i")
    try:
        data, anc, _flags, _addr = sock.recvmsg(_MAX_MSG, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                                _CLOEXEC)
    except ConnectionResetError as exc:
        _close_all(pending)
        raise ChannelClosed(str(exc)) from None
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    if not data:
        _close_all(pending + list(fds))
        raise ChannelClosed("channel closed")
    return json.loads(data), list(fds)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
