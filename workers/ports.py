"""Ports: what a queue pair is connected to.

A port is chosen per runtime with ``shardvu run --port NAME``:

``sink``
    Guest TX frames are counted and dropped; RX stays idle.
``loopback``
    Every frame the guest sends on pair *i* comes back on RX of pair *i*.
    The pair's two worker processes pass frames through a shared-memory
    single-producer/single-consumer ring (:mod:`shardvu.workers.spsc`).
``generator``
    The guest's RX rings of every pair are filled with frames
    (``--frame-size`` bytes) as fast as the guest posts buffers; guest TX is
    counted and dropped.

Your own packet function
------------------------
``--port module:function`` (or :func:`register`) plugs in a per-batch
function, run in the TX worker of each pair::

    def my_port(frames: list) -> list | None:
        '''frames: the batch the guest just sent on this pair (bytes,
        without the virtio-net header).  Return the frames to deliver to the
        guest on RX of the same pair (or None / [] to drop everything).'''
        return [f for f in frames if f[12:14] == b"\\x08\\x00"]   # IPv4 only

The function is called once per batch (up to 64 frames), never per packet,
in the worker's process; what it returns travels to the RX worker through
the pair's shared-memory ring, exactly like ``loopback``.  Imported by name
in each worker, so it must be importable there (a module on ``sys.path``).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional

__all__ = ["PortSpec", "resolve", "register", "BUILTIN"]

PacketFn = Callable[[List[bytes]], Optional[List[bytes]]]


class PortSpec:
    """How the two workers of a pair behave.

    ``tx_fn``: None → TX frames are counted and dropped without copying;
    else the per-batch function whose result goes to the pair's RX worker.
    ``rx_mode``: "idle", "spsc" (deliver what the TX worker forwards) or
    "generator" (fill RX buffers with generated frames)."""

    def __init__(self, name: str, tx_fn: Optional[PacketFn], rx_mode: str,
                 identity: bool = False):
        if rx_mode not in ("idle", "spsc", "generator"):
            raise ValueError(f"bad rx_mode {rx_mode!r}")
        self.name = name
        self.tx_fn = tx_fn
        self.rx_mode = rx_mode
        #: the function returns its input: frames go straight from guest
        #: memory into the pair's ring, with no intermediate copy
        self.identity = identity

    @property
    def needs_spsc(self) -> bool:
        return self.rx_mode == "spsc"


def _loopback(frames: List[bytes]) -> List[bytes]:
    return frames


BUILTIN: Dict[str, PortSpec] = {
    "sink": PortSpec("sink", None, "idle"),
    "loopback": PortSpec("loopback", _loopback, "spsc", identity=True),
    "generator": PortSpec("generator", None, "generator"),
}
_registered: Dict[str, PortSpec] = {}


def register(name: str, fn: PacketFn) -> None:
    """Make ``fn`` available as ``--port NAME`` in this process (and in
    forked workers)."""
    _registered[name] = PortSpec(name, fn, "spsc")


def resolve(name: str) -> PortSpec:
    """The port called ``name``: built-in, registered, or ``module:function``.
    Raises ValueError if it cannot be found."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in _registered:
        return _registered[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load port {name!r}: {exc}") from None
        if not callable(fn):
            raise ValueError(f"port {name!r} is not callable")
        return PortSpec(name, fn, "spsc")
    raise ValueError(f"unknown port {name!r} (sink, loopback, generator or module:function)")


def make_frame(size: int, seq: int = 0) -> bytes:
    """A generated Ethernet frame of ``size`` bytes: broadcast destination,
    a locally administered source, EtherType 0x88B5 (local experimental),
    then a payload counting up from ``seq``."""
    size = max(size, 60)
    head = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
    body = bytes((seq + i) & 0xFF for i in range(size - len(head)))
    return head + body
