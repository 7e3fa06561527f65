"""Where a running ``shardvu run`` answers stats queries, and the query itself.

Shared by the control process (:mod:`shardvu.control.stats`), the CLI
(:mod:`shardvu.statscli`) and the test harness, so that none of them
imports another: every party derives the same ZeroMQ endpoints from the
vhost-user socket path without configuration.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import zmq

__all__ = ["endpoints", "query", "NoAnswer"]

_IPC = "ipc://"
_SUN_PATH_MAX = 107          # sockaddr_un.sun_path holds 108 bytes incl. NUL


def endpoints(socket_path: str) -> Tuple[str, str]:
    """``(pub_endpoint, query_endpoint)`` for the vhost-user socket
    ``socket_path``: ``ipc://<abs path>.pub`` and ``ipc://<abs path>.stats``.

    The path is made absolute so workers, control and the CLI agree
    whatever their working directory.  Raises ValueError if the result is
    too long for a Unix socket address.
    """
    base = os.path.abspath(socket_path)
    pub, query = base + ".pub", base + ".stats"
    if len(query.encode()) > _SUN_PATH_MAX:
        raise ValueError(f"stats endpoint path too long for a Unix socket "
                         f"({len(query.encode())} > {_SUN_PATH_MAX} bytes): {query}")
    return _IPC + pub, _IPC + query



class NoAnswer(Exception):
    """No control process answered the stats query in time."""


def query(endpoint: str, timeout: float, context: Optional[zmq.Context] = None) -> Dict[str, Any]:
    """One REQ/REP round trip to ``endpoint``; returns the decoded snapshot.

    Uses a fresh socket per call (a REQ socket whose reply never came is
    unusable) and never waits longer than ``timeout`` seconds in total.
    Raises :class:`NoAnswer` on timeout.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        for event in (zmq.POLLOUT, zmq.POLLIN):
            ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not sock.poll(ms, event):
                raise NoAnswer(endpoint)
            if event == zmq.POLLOUT:
                sock.send(b"stats", zmq.NOBLOCK)
        return json.loads(sock.recv())
    finally:
        sock.close(linger=0)


