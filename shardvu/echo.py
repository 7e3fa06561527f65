"""The example back-end: a virtio-net device that echoes every frame the
guest sends on pair *i* back to the guest on pair *i*.

It is the whole of a simple back-end on the library — a device, two queue
handlers per pair, and the single-process :class:`~shardvu.runner.Runner`::

    python -m shardvu.echo --socket /tmp/echo.sock --queue-pairs 2
"""
from __future__ import annotations

import argparse
from typing import Optional

from . import logsetup
from . import protocol as P
from .device import Device
from .net import NetIface, net_hdr_len, pop_tx_frames, push_rx_frames
from .runner import Runner

__all__ = ["EchoBackend", "main"]


class EchoBackend:
    """Device + handlers.  Counters: ``echoed``, ``dropped`` (no RX buffer,
    or the ring is disabled: a disabled TX ring is drained and dropped)."""

    def __init__(self, queue_pairs: int = 1, mac: Optional[bytes] = None, mtu: int = 0):
        self.iface = NetIface(queue_pairs, mac, mtu)
        self.device = Device(2 * queue_pairs, self.iface)
        self.echoed = 0
        self.dropped = 0
        for pair in range(queue_pairs):
            self.device.set_queue_handler(2 * pair + 1, self._on_tx)
            self.device.set_queue_handler(2 * pair, self._on_rx)
        self.runner = Runner(self.device)

    def _on_tx(self, dev: Device, qidx: int) -> None:
        txq, rxq = dev.vqs[qidx], dev.vqs[qidx - 1]
        hdr = net_hdr_len(dev.features)
        mergeable = dev.has_feature(P.VIRTIO_NET_F_MRG_RXBUF)
        while True:
            frames = pop_tx_frames(txq, hdr)
            if not frames:
                break
            txq.notify()
            if not (txq.enabled and rxq.enabled and rxq.started and rxq.ready()):
                self.dropped += len(frames)
                continue
            n = push_rx_frames(rxq, frames, hdr, mergeable)
            self.echoed += n
            self.dropped += len(frames) - n
            if n:
                rxq.notify()

    def _on_rx(self, dev: Device, qidx: int) -> None:
        # New RX buffers: nothing is queued here, frames are echoed as they come.
        pass

    def serve(self, path: str) -> None:
        self.runner.serve(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="shardvu-echo", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--queue-pairs", type=int, default=1)
    ap.add_argument("--log-level", default="INFO", help=", ".join(logsetup.LEVELS))
    ap.add_argument("--log-format", default="text", choices=logsetup.FORMATS)
    args = ap.parse_args(argv)
    try:
        logsetup.setup(args.log_level, args.log_format, role="echo")
    except ValueError as exc:
        ap.error(str(exc))
    backend = EchoBackend(args.queue_pairs)
    try:
        backend.serve(args.socket)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
