"""Prometheus metrics of a running ``shardvu run`` (``--metrics HOST:PORT``).

:class:`SnapshotCollector` turns the control process's stats snapshot
(:meth:`shardvu.control.stats.StatsCollector.snapshot`) into metric
families at each scrape; :func:`serve` exposes them at ``/metrics`` over
HTTP with prometheus_client.  Every series carries the labels ``name`` (the
instance's ``--name``, or ""), ``queue`` (the virtqueue index) and
``direction`` ("rx" or "tx", as virtio names the queue and as ``shardvu
stats`` shows it).  There is no pid label: a respawned worker continues
its queue's series, and the counters are monotonic because the stats
collector folds a replaced worker's counts into a base.

Counters (``_total``)::

    shardvu_packets_total, shardvu_bytes_total, shardvu_errors_total
    shardvu_drops_total                       every dropped frame
    shardvu_drops_by_reason_total{reason}     one series per DropReason value
    shardvu_size_packets_total{size}          size = 64, 65_to_127, 128_to_255,
                                              256_to_511, 512_to_1023,
                                              1024_to_1522, 1523_to_max (DPDK's
                                              vhost xstats size_<size>_packets)
    shardvu_broadcast_packets_total, shardvu_multicast_packets_total
    shardvu_kicks_total, shardvu_calls_total, shardvu_calls_suppressed_total
    shardvu_worker_restarts_total, shardvu_worker_cpu_seconds_total

The size bins and the broadcast/multicast counters are exported from the
worker counters of the same names (:data:`shardvu.workers.stats.SIZE_BINS`,
``CAST_FIELDS``), which the ring loops do not fill yet: they read 0.

Gauges: ``shardvu_worker_private_memory_bytes``,
``shardvu_worker_resident_memory_bytes``, ``shardvu_queue_broken`` (0/1);
and ``shardvu_build_info{name, version}`` = 1.

Control-process only: the workers never import this module (nor
prometheus_client).
"""
from __future__ import annotations

import ipaddress
import threading
from typing import Any, Callable, Dict, Iterator, List, Tuple

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .reasons import DropReason
from .workers.stats import CAST_FIELDS, SIZE_BINS

__all__ = ["SnapshotCollector", "parse_address", "serve", "DEFAULT_HOST"]

#: Where ``--metrics PORT`` binds without a host: loopback only.
DEFAULT_HOST = "127.0.0.1"

_LABELS = ["name", "queue", "direction"]

#: (metric name without _total, snapshot field, help)
_COUNTERS = (
    ("shardvu_packets", "packets", "Frames moved through the queue."),
    ("shardvu_bytes", "bytes", "Frame bytes moved through the queue (virtio-net header excluded)."),
    ("shardvu_errors", "ring_errors", "Ring violations by the driver (the queue is then broken)."),
    ("shardvu_drops", "drops", "Frames dropped, every reason together."),
    ("shardvu_kicks", "kicks", "Kick (guest notification) wake-ups consumed."),
    ("shardvu_calls", "calls", "Call eventfd writes: interrupts sent to the guest."),
    ("shardvu_calls_suppressed", "suppressed",
     "Interrupts not sent (EVENT_IDX or NO_INTERRUPT suppression)."),
    ("shardvu_broadcast_packets", CAST_FIELDS[0],
     "Frames to the broadcast address (not counted by the ring loops yet: 0)."),
    ("shardvu_multicast_packets", CAST_FIELDS[1],
     "Frames to a multicast address, not broadcast (not counted by the ring loops yet: 0)."),
    ("shardvu_worker_restarts", "restarts", "Times the queue's worker was replaced."),
    ("shardvu_worker_cpu_seconds", "cpu_seconds",
     "CPU time (user + system) of the queue's workers, present and past."),
)

#: size label value -> snapshot field (DPDK's xstats name)
SIZE_LABELS = tuple((field[len("size_"):-len("_packets")], field) for field, _, _ in SIZE_BINS)


def parse_address(text: str) -> Tuple[str, int]:
    """``"HOST:PORT"``, ``"[V6]:PORT"``, ``":PORT"`` or ``"PORT"`` as
    ``(host, port)``; the host defaults to :data:`DEFAULT_HOST`.  ValueError
    for anything else (a port outside 0..65535, a malformed address)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)         # ValueError if not one
    elif ":" in host:
        raise ValueError(f"metrics address {text!r}: write an IPv6 host as [ADDR]:PORT")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"metrics address {text!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"metrics address {text!r}: port {number} outside 0..65535")
    return host or DEFAULT_HOST, number


class SnapshotCollector(Collector):
    """A prometheus_client collector reading ``snapshot()`` (a callable
    returning the stats snapshot dict) at every scrape."""

    def __init__(self, snapshot: Callable[[], Dict[str, Any]], name: str = "") -> None:
        self._snapshot = snapshot
        self.name = name

    def describe(self) -> List[Metric]:
        return []       # dynamic: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        name = snap.get("name") or self.name
        queues = snap.get("queues", [])

        def labels(q: Dict[str, Any]) -> List[str]:
            return [name, str(q["index"]), q["direction"]]

        info = GaugeMetricFamily("shardvu_build_info", "The instance name and shardvu version.",
                                 labels=["name", "version"])
        info.add_metric([name, __version__], 1)
        yield info
        for metric, field, doc in _COUNTERS:
            fam = CounterMetricFamily(metric, doc, labels=_LABELS)
            for q in queues:
                fam.add_metric(labels(q), q.get(field, 0))
            yield fam
        fam = CounterMetricFamily("shardvu_drops_by_reason",
                                  "Frames dropped, by reason (shardvu.reasons.DropReason).",
                                  labels=_LABELS + ["reason"])
        for q in queues:
            by_reason = q.get("drops_by_reason") or {}
            for reason in DropReason:
                fam.add_metric(labels(q) + [reason.value], by_reason.get(reason.value, 0))
        yield fam
        fam = CounterMetricFamily("shardvu_size_packets",
                                  "Frames by length in bytes, in DPDK vhost's xstats bins "
                                  "(not counted by the ring loops yet: 0).",
                                  labels=_LABELS + ["size"])
        for q in queues:
            for label, field in SIZE_LABELS:
                fam.add_metric(labels(q) + [label], q.get(field, 0))
        yield fam
        for metric, field, doc in (
                ("shardvu_worker_private_memory_bytes", "private_bytes",
                 "Memory only the queue's worker maps (its unique set size: not the guest memory, "
                 "nor pages shared with the zygote)."),
                ("shardvu_worker_resident_memory_bytes", "rss_bytes",
                 "Resident memory of the queue's worker.")):
            gauge = GaugeMetricFamily(metric, doc, labels=_LABELS)
            for q in queues:
                gauge.add_metric(labels(q), q.get(field, 0))
            yield gauge
        gauge = GaugeMetricFamily("shardvu_queue_broken",
                                  "1 while the queue is marked broken, else 0.", labels=_LABELS)
        for q in queues:
            gauge.add_metric(labels(q), 1 if q.get("state") == "broken" else 0)
        yield gauge


class MetricsServer:
    """The HTTP server :func:`serve` started; :meth:`close` stops it."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.address: Tuple[str, int] = httpd.server_address[:2]

    def close(self) -> None:
        """Stop serving and close the listening socket.  Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            self._thread.join(5)


def serve(address: str, snapshot: Callable[[], Dict[str, Any]], name: str = "") -> MetricsServer:
    """Serve ``/metrics`` at ``address`` (see :func:`parse_address`) in a
    daemon thread.  Raises ValueError for a bad address and OSError when the
    port cannot be bound (in use, not permitted)."""
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, name))
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd, thread)
