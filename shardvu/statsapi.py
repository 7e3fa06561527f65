"""Where a running ``shardvu run`` answers stats queries, and the query itself.

Shared by the control process (:mod:`shardvu.control.stats`), the CLI
(:mod:`shardvu.statscli`) and the test harness, so that none of them
imports another: every party derives the same ZeroMQ endpoints from the
instance's name (``--name``) or, without one, from its vhost-user socket
path, without configuration.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import zmq

__all__ = ["endpoints", "name_endpoints", "instance_names", "run_dir", "check_name",
           "query", "NoAnswer"]

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


def run_dir() -> str:
    """The directory where named instances put their stats endpoints:
    ``$XDG_RUNTIME_DIR/shardvu`` if that variable is set, else
    ``/tmp/shardvu-<uid>``.  Not created here (see :func:`name_endpoints`)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "shardvu")
    return f"/tmp/shardvu-{os.getuid()}"


def check_name(name: str) -> str:
    """``name`` if it is a valid instance name (1-64 characters of letters,
    digits, ``.``, ``_``, ``-``, not starting with ``.``); else ValueError."""
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", name or ""):
        raise ValueError(f"invalid instance name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, "
                         "not starting with '.'")
    return name


def name_endpoints(name: str, create: bool = False) -> Tuple[str, str]:
    """``(pub_endpoint, query_endpoint)`` of the instance called ``name``
    (``shardvu run --name NAME``): ``ipc://<run_dir>/<name>.pub`` and
    ``.stats``.  With ``create`` the run directory is made (mode 0700) if
    missing.  ValueError for an invalid name or a too-long path."""
    directory = run_dir()
    if create:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    return endpoints(os.path.join(directory, check_name(name)))


def instance_names() -> List[str]:
    """Names of the instances whose query endpoint exists in :func:`run_dir`
    (sorted; a crashed instance may leave a stale one behind)."""
    try:
        entries = os.listdir(run_dir())
    except OSError:
        return []
    return sorted(e[:-len(".stats")] for e in entries if e.endswith(".stats"))



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


