"""Unix-socket I/O with SCM_RIGHTS: the only place shardvu's library reads a
vhost-user socket (the single-process runner and the Python front-end use it;
the sharded runtime's control process has its own loop in ``control/``)."""
from __future__ import annotations

import array
import socket
from typing import List, Sequence, Tuple

#: Room for more fds than any request may carry, so extras are seen (and
#: closed) instead of silently truncated by the kernel.
MAX_RECV_FDS = 32
# PyPy's socket module lacks the constant; this is Linux's value.
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)


def recv_with_fds(sock: socket.socket, bufsize: int = 65536,
                  maxfds: int = MAX_RECV_FDS) -> Tuple[bytes, List[int]]:
    """One ``recvmsg``: the bytes and any fds that came with them (marked
    close-on-exec).  Returns ``(b"", [])`` at end of stream.  The caller
    owns the returned fds."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * fds.itemsize),
                                                _MSG_CMSG_CLOEXEC)
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    return data, list(fds)


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send ``data`` whole, the fds with its first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])
