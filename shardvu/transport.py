"""Unix-socket I/O with SCM_RIGHTS: the only place shardvu's library reads a
vhost-user socket (the single-process runner and the Python front-end use it;
the sharded runtime's control process has its own loop in ``control/``)."""
from __future__ import annotations

import array
import os
import socket
import stat
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


_FILE_TYPES = ((stat.S_ISREG, "a regular file"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def fd_kind(mode: int) -> str:
    """What an fd of ``st_mode`` ``mode`` is, for error messages ("a pipe";
    an eventfd, epoll or timer fd has no file type: "an anonymous inode")."""
    for test, name in _FILE_TYPES:
        if test(mode):
            return name
    return "an anonymous inode (eventfd or similar)"


def check_mappable(fd: int, offset: int, size: int, what: str) -> None:
    """ValueError unless ``fd`` is a regular file (memfd, shm, hugetlbfs)
    whose size covers ``offset + size`` bytes, with ``offset >= 0`` and
    ``size > 0``: what every mapper checks before ``mmap``, so that no
    access within the mapping can fault (short of a later truncation).
    ``what`` names the fd in the message ("dirty log")."""
    if size <= 0:
        raise ValueError(f"{what} size is zero")
    if offset < 0:
        raise ValueError(f"negative {what} offset {offset}")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ValueError(f"{what} fd: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} fd is {fd_kind(st.st_mode)}, not a file that can be mapped")
    if st.st_size < offset + size:
        raise ValueError(f"{what} fd holds {st.st_size} bytes, {offset + size} needed")


def close_fds_except(keep) -> None:
    """Close every fd of this process above 2 except those in ``keep``: a
    forked process (a zygote's spare, a worker) keeps only what it needs,
    so that fds its parent closes are really closed."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
