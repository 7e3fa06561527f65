"""``--port udp:LOCAL_IP:PORT,REMOTE_IP:PORT``: a UDP tunnel to another
host, one Ethernet frame per datagram, raw (no virtio-net header), as
QEMU's ``-netdev dgram`` and vhost-user-bridge's ``-l``/``-r`` send them.

Queue pair *i* uses port ``PORT+i`` at both ends: socket *i* is bound to
``LOCAL_IP:LOCAL_PORT+i`` and sends to ``REMOTE_IP:REMOTE_PORT+i`` (one
socket per pair, so each pair's traffic stays on that pair; SO_REUSEPORT
would not spread one peer's flows).  IPv6 addresses go in brackets:
``udp:[::1]:7000,[::1]:7100``.

Receive side: a datagram whose source is not pair *i*'s peer address is
dropped and counted (WRONG_PEER); one shorter than an Ethernet header
(NOT_ETHERNET) too.  Datagrams the kernel dropped because the socket's
receive buffer was full (the ``drops`` column of /proc/net/udp for this
socket) are counted as PORT_FULL on the RX queue, read at the end of each
burst and at most every DROPS_S seconds.  The sockets are not connected, so those datagrams
are seen and counted rather than filtered silently by the kernel.

No offloads are offered (a datagram carries a whole, checksummed frame),
and VIRTIO_NET_F_MTU is advertised: the path MTU (1500 unless ``--mtu``)
less the IP, UDP and Ethernet headers, so a guest frame fits one datagram
without fragmentation.

Runs on CPython >= 3.9 and PyPy 3.9 (worker code): standard library only.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from shardvu.reasons import DropReason

from .ports import Port, PortControl

__all__ = ["UdpPort", "UdpControl", "parse_spec", "parse_endpoint"]

log = logging.getLogger("shardvu.worker")
#: how often, at most, the kernel's receive-buffer drops are read
DROPS_S = 0.2
#: the path MTU assumed when advertising the guest's MTU
PATH_MTU = 1500
_ETH = 14


def parse_endpoint(text: str) -> Tuple[int, str, int]:
    """``"127.0.0.1:7000"`` or ``"[::1]:7000"`` → (family, address, port);
    ValueError (one line) when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"udp: {text!r} is not ADDRESS:PORT")
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    elif ":" in host:
        raise ValueError(f"udp: put the IPv6 address of {text!r} in brackets ([ADDR]:PORT)")
    else:
        family = socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        raise ValueError(f"udp: {host!r} is not an IP address") from None
    try:
        num = int(port)
    except ValueError:
        raise ValueError(f"udp: bad port {port!r}") from None
    if not 0 < num < 65536:
        raise ValueError(f"udp: port {num} out of range")
    return family, host, num


def parse_spec(arg: str) -> Tuple[Tuple[int, str, int], Tuple[int, str, int]]:
    """``"LOCAL_IP:PORT,REMOTE_IP:PORT"`` → (local, remote) endpoints, both
    of one address family; ValueError (one line) when malformed."""
    local, sep, remote = arg.partition(",")
    if not sep:
        raise ValueError(f"udp: expected LOCAL_IP:PORT,REMOTE_IP:PORT, got {arg!r}")
    lo, re_ = parse_endpoint(local), parse_endpoint(remote)
    if lo[0] != re_[0]:
        raise ValueError("udp: local and remote addresses are of different families")
    return lo, re_


def _norm(addr) -> Tuple[str, int]:
    """(address in canonical text form, port) of a socket address."""
    host = addr[0].split("%")[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.inet_ntop(family, socket.inet_pton(family, host)), addr[1]


class UdpControl(PortControl):
    """One bound UDP socket per queue pair, owned by the control process."""

    kind = "udp"
    can_inject = True

    def __init__(self, arg: str, pairs: int):
        (family, lhost, lport), (_, rhost, rport) = parse_spec(arg)
        if lport + pairs - 1 > 65535 or rport + pairs - 1 > 65535:
            raise ValueError(f"udp: {pairs} queue pairs need ports up to PORT+{pairs - 1} (> 65535)")
        self.family = family
        self.remote = (rhost, rport)
        self.socks: List[socket.socket] = []
        try:
            for i in range(pairs):
                s = socket.socket(family, socket.SOCK_DGRAM)
                self.socks.append(s)
                s.setblocking(False)
                try:
                    s.bind((lhost, lport + i))
                except OSError as exc:
                    raise ValueError(f"udp: cannot bind {arg.partition(',')[0]} (+{i}): "
                                     f"{exc.strerror}") from None
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except BaseException:
            self.close()
            raise

    def fds(self, pair: int) -> List[int]:
        return [os.dup(self.socks[pair].fileno())]

    def meta(self, pair: int) -> Dict[str, Any]:
        return {"family": int(self.family), "peer": [self.remote[0], self.remote[1] + pair]}

    def inject(self, frame: bytes, hdr_len: int) -> None:
        """Send ``frame`` to pair 0's peer (SEND_RARP)."""
        self.socks[0].sendto(frame, self.remote)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []


class UdpPort(Port):
    """``--port udp:...`` in a worker (see the module docstring).

    Contract: ``fds[0]`` is pair *i*'s bound socket (the worker owns it);
    :meth:`send` sends each guest frame (header cut off) to the pair's peer
    and never blocks (a full socket buffer drops the frame: PORT_FULL);
    :meth:`receive` returns up to ``budget`` frames with a zeroed header
    of ``hdr_len`` bytes in front."""

    offloads = 0

    @classmethod
    def open_control(cls, arg: str, pairs: int) -> PortControl:
        return UdpControl(arg, pairs)

    @classmethod
    def path_mtu(cls, arg: str) -> int:
        (family, _, _), _ = parse_spec(arg)
        return PATH_MTU - (48 if family == socket.AF_INET6 else 28) - _ETH

    def __init__(self, pair: int, tx: bool, fds: List[int], meta: Dict[str, Any]):
        super().__init__(pair, tx, fds, meta)
        self.sock = socket.socket(fileno=os.dup(fds[0]))
        self.sock.setblocking(False)        # PyPy does not take it from the fd
        self.peer = (meta["peer"][0], int(meta["peer"][1]))
        self._peer_key = _norm(self.peer)
        self._last_bad = None
        self._inode = os.fstat(fds[0]).st_ino
        self._table = "/proc/thread-self/net/udp6" if int(meta.get("family", 2)) == \
            socket.AF_INET6 else "/proc/thread-self/net/udp"
        self._kernel_drops: Optional[int] = None     # the socket's count at the last read
        self._drops_due = 0.0
        if not tx:
            self._count_kernel_drops()      # the baseline: earlier drops are not this worker's

    def close(self) -> None:
        self.sock.close()

    def send(self, frames: Sequence) -> None:
        h = self.hdr_len
        sendto = self.sock.sendto
        peer = self.peer
        for k, f in enumerate(frames):
            if isinstance(f, (list, tuple)):
                f = b"".join(f)
            try:
                sendto(f[h:], peer)
            except BlockingIOError:
                self.drop(DropReason.PORT_FULL, 1)
            except OSError as exc:
                # ECONNREFUSED: an earlier datagram met a closed port; EMSGSIZE: too big
                if exc.errno not in (errno.ECONNREFUSED, errno.EMSGSIZE):
                    log.warning("pair %d: udp send to %s:%d: %s", self.pair, peer[0], peer[1],
                                exc.strerror)
                self.drop(DropReason.PORT_ERROR, 1)

    def fileno(self) -> int:
        return self.fds[0]

    def receive(self, budget: int) -> List[bytes]:
        out: List[bytes] = []
        hdr = bytes(self.hdr_len)
        recvfrom = self.sock.recvfrom
        want = self._peer_key
        while len(out) < budget:
            try:
                data, addr = recvfrom(65536)
            except BlockingIOError:
                if out or time.monotonic() >= self._drops_due:
                    self._count_kernel_drops()
                break
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:     # ICMP for an earlier send
                    continue
                raise
            if (addr[0], addr[1]) != want and _norm(addr) != want:
                self.drop(DropReason.WRONG_PEER, 1)
                if addr[:2] != self._last_bad:
                    self._last_bad = addr[:2]
                    log.warning("pair %d: udp datagram from %s:%d, not the peer %s:%d: dropped",
                                self.pair, addr[0], addr[1], want[0], want[1])
                continue
            if len(data) < _ETH:
                self.drop(DropReason.NOT_ETHERNET, 1)
                continue
            out.append(hdr + data)
        return out

    def _count_kernel_drops(self) -> None:
        """Count (PORT_FULL) the datagrams the kernel dropped for this
        socket since the last read: its ``drops`` in /proc/net/udp[6]."""
        self._drops_due = time.monotonic() + DROPS_S
        key = str(self._inode)
        try:
            with open(self._table) as f:
                for line in f:
                    cols = line.split()
                    if len(cols) > 12 and cols[9] == key:
                        now = int(cols[-1])
                        break
                else:
                    return
        except (OSError, ValueError):
            return
        if self._kernel_drops is not None and now > self._kernel_drops:
            self.drop(DropReason.PORT_FULL, now - self._kernel_drops)
        self._kernel_drops = now
