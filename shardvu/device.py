"""The vhost-user device state machine: libvhost-user's ``VuDev`` in Python.

Sans-IO, in the manner of h11: :meth:`Device.handle` takes one decoded
:class:`~shardvu.protocol.Message` (bytes and fds already received) and
returns an :class:`Outcome` for the caller to carry out: success, or failure
with its reason; the :class:`Reply` messages to send; the fd actions (a kick
fd to :class:`Watch` or :class:`Unwatch`, or the connection to
:class:`Close`); and which queues' configuration changed (the sharded
runtime sends those queues' workers a fresh
:class:`~shardvu.snapshot.QueueSnapshot`, built by
:meth:`Device.queue_snapshot`).  The device never reads or writes the
vhost-user socket.
(It does signal eventfds and use the back-end request channel, exactly as
libvhost-user does; those are the data plane's own fds.)

Error contract: a request that is malformed, out of order or unsupported
never raises out of :meth:`Device.handle`.  It is logged at ERROR as
``"<REQUEST>: <reason>"``, answered with a REPLY_ACK failure when the
front-end asked for one (or an empty reply for requests that have a reply
body), every fd it carried that was not kept is closed, and the device goes
on serving.  A malformed ring marks only that queue broken.

fd ownership: the device owns every fd it keeps (region, kick/call/err,
log, log call, inflight, back-end channel) and closes each exactly once,
when it is replaced or at :meth:`Device.reset`.  A :class:`Reply`'s fds and
a snapshot's fds stay the device's: sending duplicates them.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import protocol as P
from .backend import BackendChannel
from .dirtylog import DirtyLog
from .inflight import InflightBuffer
from .memory import GuestMemory, MemoryMapError
from .protocol import Message, ProtocolError, ProtocolFeature as PF, Request as R
from .snapshot import InflightPart, LogPart, PortPart, QueueSnapshot, RegionPart
from .virtqueue import RingError, VirtQueue, avail_ring_size, desc_table_size, used_ring_size

__all__ = ["Device", "DeviceIface", "Outcome", "Reply", "Watch", "Unwatch", "Close",
           "RequestError"]

log = logging.getLogger("shardvu.device")


# --- events -------------------------------------------------------------
class Reply:
    """Send ``data`` (a whole message) with ``fds``; the device keeps owning the fds."""
    __slots__ = ("data", "fds")

    def __init__(self, data: bytes, fds: Sequence[int] = ()):
        self.data = data
        self.fds = list(fds)

    def __repr__(self) -> str:
        return f"Reply({len(self.data)} bytes, fds={self.fds})"


class Watch:
    """Start polling ``fd`` for readability; on each event call ``Device.kick(qidx)``."""
    __slots__ = ("fd", "qidx")

    def __init__(self, fd: int, qidx: int):
        self.fd, self.qidx = fd, qidx

    def __repr__(self) -> str:
        return f"Watch(fd={self.fd}, q={self.qidx})"


class Unwatch:
    """Stop polling ``fd`` (sent before the device closes it)."""
    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def __repr__(self) -> str:
        return f"Unwatch(fd={self.fd})"


class Close:
    """The connection must be closed (the spec's only answer to some errors)."""
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Close({self.reason!r})"


class RequestError(Exception):
    """Raised by a request handler: the request fails with this reason."""


class Outcome:
    """What handling one message came to.

    ``ok``: the request was applied (False: refused, ``reason`` says why).
    ``replies``: the :class:`Reply` messages to send, in order.
    ``actions``: the fd actions to carry out (:class:`Watch`,
    :class:`Unwatch`, :class:`Close`), in order; carry them out before the
    replies.  ``changed``: indices of the queues whose configuration (the
    content of :meth:`Device.queue_snapshot`) the request changed.
    """
    __slots__ = ("request", "ok", "reason", "replies", "actions", "changed")

    def __init__(self, request: int, ok: bool = True, reason: str = "",
                 replies: Sequence[Reply] = (), actions: Sequence[object] = (),
                 changed: Sequence[int] = ()):
        self.request = request
        self.ok = ok
        self.reason = reason
        self.replies: List[Reply] = list(replies)
        self.actions: List[object] = list(actions)
        self.changed: Tuple[int, ...] = tuple(changed)

    @classmethod
    def from_events(cls, request: int, events: Sequence[object], ok: bool = True,
                    reason: str = "") -> "Outcome":
        """An outcome from a list of events (DeviceIface.process_msg's form)."""
        return cls(request, ok, reason, [e for e in events if isinstance(e, Reply)],
                   [e for e in events if not isinstance(e, Reply)])

    @property
    def close(self) -> Optional[str]:
        """The reason the connection must be closed, or None."""
        for a in self.actions:
            if isinstance(a, Close):
                return a.reason
        return None

    def __repr__(self) -> str:
        state = "ok" if self.ok else f"failed: {self.reason}"
        return (f"Outcome({P.request_name(self.request)} {state}, replies={self.replies}, "
                f"actions={self.actions}, changed={self.changed})")


# --- callbacks ----------------------------------------------------------
class DeviceIface:
    """Device callbacks, the counterpart of ``VuDevIface``.  Subclass and
    override what the device needs; every method has a safe default."""

    def get_features(self, dev: "Device") -> int:
        """Device-specific virtio feature bits, added to the ring features
        the library implements (GET_FEATURES)."""
        return 0

    def check_features(self, dev: "Device", features: int) -> Optional[str]:
        """Why ``features`` (all offered) cannot be accepted together, e.g.
        a feature without one it depends on; None to accept them.  A
        reason fails SET_FEATURES and leaves the features unchanged."""
        return None

    def set_features(self, dev: "Device", features: int) -> None:
        """The front-end acknowledged ``features`` (SET_FEATURES)."""

    def get_protocol_features(self, dev: "Device") -> int:
        """Extra protocol feature bits the device implements (e.g. NET_MTU)."""
        return 0

    def set_protocol_features(self, dev: "Device", features: int) -> None:
        """The front-end enabled ``features`` (SET_PROTOCOL_FEATURES)."""

    def process_msg(self, dev: "Device", msg: Message) -> Optional[List[object]]:
        """Called first for every message.  Return a list of events to take
        over the request entirely (the library then does nothing else with
        it, fds included), or None for the default processing."""
        return None

    def queue_set_started(self, dev: "Device", qidx: int, started: bool) -> None:
        """Queue ``qidx`` was started (SET_VRING_KICK) or stopped (GET_VRING_BASE, reset)."""

    def queue_is_processed_in_order(self, dev: "Device", qidx: int) -> bool:
        """True if the queue completes requests in order, so that on
        reconnect it may resume at the used index."""
        return False

    def get_config(self, dev: "Device", size: int) -> Optional[bytes]:
        """The first ``size`` bytes of config space, or None if the device
        has none.  A device with config space gets PROTOCOL_F_CONFIG."""
        return None

    def set_config(self, dev: "Device", data: bytes, offset: int, flags: int) -> bool:
        """Write ``data`` at ``offset`` in config space; False refuses it."""
        return False

    def send_rarp(self, dev: "Device", mac: bytes) -> None:
        """SEND_RARP (protocol feature RARP): announce ``mac`` (6 bytes)
        after a migration.  Raise RequestError (or ValueError) to refuse."""
        raise RequestError("RARP announcement is not supported")


#: Virtio feature bits the library implements whatever the device.
LIBRARY_FEATURES = (
    P.bit(P.VIRTIO_F_NOTIFY_ON_EMPTY)
    | P.bit(P.VIRTIO_RING_F_INDIRECT_DESC)
    | P.bit(P.VIRTIO_RING_F_EVENT_IDX)
    | P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
    | P.bit(P.VHOST_F_LOG_ALL)
    | P.bit(P.VIRTIO_F_VERSION_1)
)

#: Protocol features the library implements.  Not offered, because nothing
#: here implements them: CROSS_ENDIAN, CRYPTO_SESSION, PAGEFAULT
#: (postcopy), XEN_MMAP, SHARED_OBJECT, DEVICE_STATE.  RARP is offered by a
#: device interface that can send the announcement (``send_rarp``).
LIBRARY_PROTOCOL_FEATURES = (
    P.bit(PF.MQ) | P.bit(PF.LOG_SHMFD) | P.bit(PF.REPLY_ACK) | P.bit(PF.BACKEND_REQ)
    | P.bit(PF.BACKEND_SEND_FD) | P.bit(PF.HOST_NOTIFIER) | P.bit(PF.INFLIGHT_SHMFD)
    | P.bit(PF.RESET_DEVICE) | P.bit(PF.INBAND_NOTIFICATIONS)
    | P.bit(PF.CONFIGURE_MEM_SLOTS) | P.bit(PF.STATUS)
)

#: Requests this library refuses, with the reason logged.
_UNSUPPORTED = {
    R.CREATE_CRYPTO_SESSION: "crypto sessions are not supported by a net device",
    R.CLOSE_CRYPTO_SESSION: "crypto sessions are not supported by a net device",
    R.GPU_SET_SOCKET: "no GPU socket on a net device",
    R.SET_VRING_ENDIAN: "cross-endian rings are not supported",
    R.POSTCOPY_ADVISE: "postcopy migration is not supported",
    R.POSTCOPY_LISTEN: "postcopy migration is not supported",
    R.POSTCOPY_END: "postcopy migration is not supported",
}

# Requests that may carry fds; every other request must carry none.
_TAKES_FDS = {
    R.SET_MEM_TABLE, R.SET_LOG_BASE, R.SET_LOG_FD, R.SET_VRING_KICK, R.SET_VRING_CALL,
    R.SET_VRING_ERR, R.SET_BACKEND_REQ_FD, R.SET_INFLIGHT_FD, R.ADD_MEM_REG, R.REM_MEM_REG,
    R.GPU_SET_SOCKET,
}

# Requests whose reply carries a body (so REPLY_ACK adds nothing).
_HAS_REPLY = {
    R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE, R.GET_QUEUE_NUM,
    R.GET_CONFIG, R.GET_INFLIGHT_FD, R.GET_MAX_MEM_SLOTS, R.GET_STATUS,
    R.SET_LOG_BASE, R.POSTCOPY_END, R.CREATE_CRYPTO_SESSION,
}


def _need_eventfd(fd: int, what: str) -> None:
    """Kick, call, err and log fds must be eventfds (the spec's word; a
    pipe's write end, say, cannot be read, and a file is always readable).
    Closes ``fd`` and raises RequestError otherwise.  Where ``/proc`` does
    not say, the fd is taken on trust."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return
    if target != "anon_inode:[eventfd]":
        os.close(fd)
        raise RequestError(f"{what} fd is not an eventfd ({target.split(':')[0]})")


class Device:
    """One vhost-user device: negotiated state, guest memory and ``max_queues``
    virtqueues.

    Use: create it with an iface, feed every received message to
    :meth:`handle` and carry out the events it returns; when a watched kick
    fd is readable call :meth:`kick`.  Queue handlers registered with
    :meth:`set_queue_handler` run from :meth:`kick` (and in-band
    VRING_KICK).  :meth:`close` releases everything when the connection
    ends; the device may then serve a new connection.
    """

    def __init__(self, max_queues: int, iface: Optional[DeviceIface] = None,
                 max_mem_slots: int = P.MAX_MEM_SLOTS, max_queue_size: int = P.VIRTQUEUE_MAX_SIZE,
                 map_memory: bool = True):
        if not 1 <= max_queues <= 256:
            raise ValueError("max_queues must be 1..256 (the index field is 8 bits)")
        if not 1 <= max_queue_size <= P.VIRTQUEUE_MAX_SIZE:
            raise ValueError(f"max_queue_size must be 1..{P.VIRTQUEUE_MAX_SIZE}")
        self.max_queues = max_queues
        #: SET_VRING_NUM above this size is refused (``--queue-size``)
        self.max_queue_size = max_queue_size
        self.iface = iface or DeviceIface()
        #: with ``map_memory`` False the table is kept unmapped and ring
        #: addresses are checked by arithmetic (the sharded control process)
        self.mem = GuestMemory(max_mem_slots, map_regions=map_memory)
        self.vqs: List[VirtQueue] = [VirtQueue(i, log) for i in range(max_queues)]
        for vq in self.vqs:
            vq.mem = self.mem
        self.handlers: Dict[int, Callable[["Device", int], None]] = {}
        self.features = 0
        self.protocol_features = 0
        self.protocol_negotiated = False     # SET_PROTOCOL_FEATURES received
        self.owner = False
        self.status = 0
        self.mtu = 0
        self.log: Optional[DirtyLog] = None
        self.log_call_fd = -1
        self.inflight: Optional[InflightBuffer] = None
        self.backend: Optional[BackendChannel] = None
        self.errors = 0          # requests refused, for stats and tests
        # Snapshot serials (see shardvu.snapshot): one device-wide counter;
        # a queue's base_serial changes when the front-end sets its base,
        # its generation when the ring is reset.
        self._serial = 0
        self.base_serial: List[int] = [0] * max_queues
        self.generation: List[int] = [0] * max_queues

    # -- negotiated facts ---------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def offered_features(self) -> int:
        return LIBRARY_FEATURES | self.iface.get_features(self)

    def offered_protocol_features(self) -> int:
        pf = LIBRARY_PROTOCOL_FEATURES | self.iface.get_protocol_features(self)
        if self.iface.get_config(self, 0) is not None:
            pf |= P.bit(PF.CONFIG)
        return pf

    # -- entry points ---------------------------------------------------------
    def handle(self, msg: Message) -> Outcome:
        """Process one front-end message; return its :class:`Outcome`.

        Owns ``msg.fds`` from here on: each is kept or closed."""
        before = self._config_keys()
        outcome = self._handle(msg)
        outcome.changed = self._changed_since(before)
        return outcome

    def _handle(self, msg: Message) -> Outcome:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s payload=%s", msg, msg.payload.hex())
        try:
            events = self.iface.process_msg(self, msg)
        except Exception as exc:  # a buggy override must not kill the loop
            log.exception("%s: process_msg override failed", msg.name)
            reason = f"process_msg override failed: {exc}"
            return Outcome.from_events(msg.request, self._fail(msg, reason), False, reason)
        if events is not None:
            return Outcome.from_events(msg.request, events)
        out: List[object] = []
        try:
            P.validate_size(msg)
            body = self._dispatch(msg, out)
        except (ProtocolError, RequestError, MemoryMapError, RingError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else str(exc)
            return Outcome.from_events(msg.request, out + self._fail(msg, reason), False, reason)
        finally:
            self._close_fds(msg)
        if body is not None:
            out.append(Reply(*body) if isinstance(body, tuple) else Reply(P.encode_reply(msg.request, body)))
        elif msg.need_reply and self.has_protocol_feature(PF.REPLY_ACK):
            out.append(Reply(P.encode_reply(msg.request, P.pack_u64(0))))
        return Outcome.from_events(msg.request, out)

    def refuse(self, msg: Message, outcome: Outcome, reason: str) -> Outcome:
        """``outcome`` of ``msg``, turned into a failure with ``reason``: the
        device applied the request but something beyond it (a worker) did
        not.  Logged and counted like any refused request; the replies
        become the failure replies, the fd actions and changes stay."""
        return Outcome(msg.request, False, reason, self._fail(msg, reason), outcome.actions,
                       outcome.changed)

    def kick(self, qidx: int) -> None:
        """A kick arrived for queue ``qidx`` (its kick fd was readable, or
        VRING_KICK): drain the fd and run the queue's handler.  An exception
        in the handler marks that queue broken; it never propagates."""
        vq = self.vqs[qidx]
        if vq.kick_fd >= 0:
            try:
                os.read(vq.kick_fd, 8)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                log.error("queue %d: reading kick fd failed: %s", qidx, exc)
        vq.kicks += 1
        self._run_handler(qidx)

    def set_queue_handler(self, qidx: int, handler: Optional[Callable[["Device", int], None]]) -> None:
        """``vu_set_queue_handler``: ``handler(dev, qidx)`` runs on each kick."""
        if handler is None:
            self.handlers.pop(qidx, None)
        else:
            self.handlers[qidx] = handler

    def get_queue(self, qidx: int) -> VirtQueue:
        """``vu_get_queue``."""
        return self.vqs[qidx]

    def gpa_to_va(self, gpa: int, plen: int):
        """``vu_gpa_to_va``: ``(view, available length)`` or ``(None, 0)``."""
        return self.mem.gpa_to_va(gpa, plen)

    # -- back-end requests ---------------------------------------------------
    def config_changed(self) -> bool:
        """Tell the front-end config space changed (BACKEND_CONFIG_CHANGE_MSG).
        False when the channel or PROTOCOL_F_CONFIG is missing, or it failed."""
        if self.backend is None or not self.has_protocol_feature(PF.CONFIG):
            return False
        ack = self.has_protocol_feature(PF.REPLY_ACK)
        return self.backend.request(P.BackendRequest.CONFIG_CHANGE_MSG, need_reply=ack) == 0

    def set_queue_host_notifier(self, qidx: int, fd: int, size: int, offset: int) -> bool:
        """``vu_set_queue_host_notifier``: ask the front-end to map ``fd`` as
        queue ``qidx``'s notify area (``fd`` < 0 de-registers it).  Needs
        HOST_NOTIFIER, BACKEND_SEND_FD and the request channel."""
        if (self.backend is None or not self.has_protocol_feature(PF.HOST_NOTIFIER)
                or not self.has_protocol_feature(PF.BACKEND_SEND_FD)):
            return False
        u64 = qidx | (P.VRING_NOFD_MASK if fd < 0 else 0)
        payload = P.VringArea(u64, size if fd >= 0 else 0, offset if fd >= 0 else 0).pack()
        ack = self.has_protocol_feature(PF.REPLY_ACK)
        fds = [fd] if fd >= 0 else []
        return self.backend.request(P.BackendRequest.VRING_HOST_NOTIFIER_MSG, payload, fds, need_reply=ack) == 0

    # -- teardown ----------------------------------------------------------
    def reset(self, keep_protocol: bool = True) -> List[object]:
        """Back to the initial state: rings stopped and disabled, their fds
        closed, memory, log and inflight buffer released, features cleared.
        With ``keep_protocol`` the negotiated protocol features and the
        back-end channel survive (RESET_DEVICE keeps ownership)."""
        out: List[object] = []
        for vq in self.vqs:
            out += self._stop_queue(vq)
            for name in ("call_fd", "err_fd"):
                fd = getattr(vq, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(vq, name, -1)
            vq.unmap_rings()
            vq.reset()
            self.generation[vq.index] = self.base_serial[vq.index] = self._next_serial()
            vq.inflight = None
            vq.log = None
            vq.inband_call = vq.inband_err = None
        self.mem.clear()
        self._set_log(None)
        if self.log_call_fd >= 0:
            os.close(self.log_call_fd)
            self.log_call_fd = -1
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.features = 0
        self.status = 0
        if not keep_protocol:
            self.protocol_features = 0
            self.protocol_negotiated = False
            self.owner = False
            if self.backend is not None:
                self.backend.close()
                self.backend = None
        return out

    def close(self) -> List[object]:
        """The connection ended: release every resource (``vu_deinit``)."""
        return self.reset(keep_protocol=False)

    # -- internals -----------------------------------------------------------
    def _fail(self, msg: Message, reason: str) -> List[object]:
        self.errors += 1
        log.error("%s: %s", msg.name, reason)
        if msg.request in _HAS_REPLY and msg.request != R.SET_LOG_BASE:
            # The front-end waits for a body; an empty one is a clear failure.
            return [Reply(P.encode_reply(msg.request))]
        if msg.need_reply or msg.request == R.SET_LOG_BASE:
            # (SET_LOG_BASE's reply body is itself a u64 status.)
            return [Reply(P.encode_reply(msg.request, P.pack_u64(1)))]
        return []

    @staticmethod
    def _close_fds(msg: Message) -> None:
        for fd in msg.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        msg.fds = []

    @staticmethod
    def _take_fds(msg: Message, n: int) -> List[int]:
        """Exactly ``n`` fds from ``msg`` (ownership passes to the caller)."""
        if len(msg.fds) != n:
            raise RequestError(f"expected {n} fd(s), got {len(msg.fds)}")
        fds, msg.fds = msg.fds, []
        return fds

    def _queue(self, index: int) -> VirtQueue:
        if index >= self.max_queues:
            raise RequestError(f"vring index {index} out of range (device has {self.max_queues})")
        return self.vqs[index]

    def _need_protocol(self, bit: int) -> None:
        if not self.has_protocol_feature(bit):
            raise RequestError(f"protocol feature {PF(bit).name} not negotiated")

    def _run_handler(self, qidx: int) -> None:
        handler = self.handlers.get(qidx)
        vq = self.vqs[qidx]
        if handler is None or not vq.started or vq.broken:
            return
        try:
            handler(self, qidx)
        except Exception as exc:
            log.exception("queue %d handler failed", qidx)
            vq.mark_broken(f"handler raised {type(exc).__name__}: {exc}")

    def _set_started(self, vq: VirtQueue, started: bool) -> None:
        if vq.started != started:
            vq.started = started
            if started:
                vq.discard_disabled = bool(vq.enable)
            self.iface.queue_set_started(self, vq.index, started)

    def collect_progress(self, vq: VirtQueue) -> None:
        """Hook: started queue ``vq`` is being stopped (GET_VRING_BASE,
        SET_VRING_KICK, SET_STATUS(0), RESET_OWNER, a reset), and its
        progress (``vq.last_avail_idx``) must be brought here first.  The
        single-process device serves the ring itself: nothing to do.  The
        sharded runtime stops the queue's worker and takes its progress."""

    def _stop_queue(self, vq: VirtQueue) -> List[object]:
        out: List[object] = []
        if vq.started:
            self.collect_progress(vq)
        self._set_started(vq, False)
        if vq.kick_fd >= 0:
            out.append(Unwatch(vq.kick_fd))
            os.close(vq.kick_fd)
            vq.kick_fd = -1
        return out

    def _set_log(self, dlog: Optional[DirtyLog]) -> None:
        if self.log is not None:
            self.log.close()
        self.log = dlog
        for vq in self.vqs:
            vq.log = dlog

    def _map_rings(self, vq: VirtQueue) -> None:
        """``vq.map_rings()``, telling it first whether the device completes
        that queue in order (then it may resume at the used index).  With
        unmapped memory, only check the addresses (:meth:`_check_rings`)."""
        vq.processed_in_order = bool(self.iface.queue_is_processed_in_order(self, vq.index))
        if self.mem.maps:
            vq.map_rings()
        else:
            self._check_rings(vq)

    def _check_rings(self, vq: VirtQueue) -> None:
        """The checks of ``VirtQueue.map_rings``, by arithmetic on the region
        table alone (no access to guest memory): size a power of two within
        the limit, addresses set, each ring part inside one region.  Raises
        RingError."""
        num = vq.num
        if num == 0:
            raise RingError(f"queue {vq.index}: size not set")
        if num > P.VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise RingError(f"queue {vq.index}: size {num} is not a power of two "
                            f"<= {P.VIRTQUEUE_MAX_SIZE}")
        if vq.addr is None:
            raise RingError(f"queue {vq.index}: ring addresses not set")
        for name, uva, size in (("descriptor table", vq.addr.desc, desc_table_size(num)),
                                ("avail ring", vq.addr.avail, avail_ring_size(num)),
                                ("used ring", vq.addr.used, used_ring_size(num))):
            if self.mem.uva_range(uva, size) is None:
                raise RingError(f"queue {vq.index}: {name} at {uva:#x}+{size:#x} "
                                "is not inside one memory region")

    # -- snapshots -----------------------------------------------------------
    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def port_part(self, qidx: int) -> Tuple[Optional[PortPart], Sequence[int]]:
        """Hook: queue ``qidx``'s port part and its fds (owned by whoever
        returns them), for :meth:`queue_snapshot`.  None here."""
        return None, ()

    def queue_snapshot(self, qidx: int) -> QueueSnapshot:
        """The configuration of queue ``qidx`` as its worker needs it.  Its
        fds are the device's own (see :mod:`shardvu.snapshot`)."""
        vq = self.vqs[qidx]
        port, port_fds = self.port_part(qidx)
        dlog, inf = self.log, self.inflight
        return QueueSnapshot(
            index=qidx, features=self.features, num=vq.num,
            addr=tuple(vq.addr) if vq.addr is not None else None,
            base=vq.last_avail_idx, base_serial=self.base_serial[qidx],
            generation=self.generation[qidx], enabled=bool(vq.enable),
            discard_disabled=bool(vq.discard_disabled),
            in_order=bool(self.iface.queue_is_processed_in_order(self, qidx)),
            regions=tuple(RegionPart(*r.describe()) for r in self.mem.regions),
            region_fds=tuple(r.fd for r in self.mem.regions),
            kick_fd=vq.kick_fd, call_fd=vq.call_fd, err_fd=vq.err_fd,
            log=LogPart(dlog.size, dlog.offset) if dlog is not None else None,
            log_fd=dlog.fd if dlog is not None else -1, log_call_fd=self.log_call_fd,
            inflight=(InflightPart(inf.mmap_size, inf.mmap_offset, inf.num_queues, inf.queue_size)
                      if inf is not None else None),
            inflight_fd=inf.fd if inf is not None else -1,
            port=port, port_fds=tuple(port_fds))

    def _config_keys(self) -> Tuple[tuple, List[tuple]]:
        """What :meth:`queue_snapshot` is made of, cheaply: a device-wide
        key and one per queue (fd numbers included: a replaced fd changes
        the key, since the new one was received before the old was closed)."""
        dlog, inf = self.log, self.inflight
        dev_key = (self.features,
                   tuple((r.describe(), r.fd) for r in self.mem.regions),
                   (dlog.size, dlog.offset, dlog.fd) if dlog is not None else None,
                   self.log_call_fd,
                   (inf.fd, inf.mmap_size, inf.mmap_offset, inf.num_queues, inf.queue_size)
                   if inf is not None else None)
        queue_keys = [(vq.num, vq.addr, vq.last_avail_idx, self.base_serial[i], self.generation[i],
                       bool(vq.enable), bool(vq.discard_disabled), vq.kick_fd, vq.call_fd, vq.err_fd)
                      for i, vq in enumerate(self.vqs)]
        return dev_key, queue_keys

    def _changed_since(self, before: Tuple[tuple, List[tuple]]) -> Tuple[int, ...]:
        dev_key, queue_keys = self._config_keys()
        if dev_key != before[0]:
            return tuple(range(self.max_queues))
        return tuple(i for i, (a, b) in enumerate(zip(before[1], queue_keys)) if a != b)

    def _remap_rings(self) -> None:
        """Re-translate ring addresses after the memory table changed."""
        for vq in self.vqs:
            if vq.addr is None or not vq.num:
                continue
            try:
                self._map_rings(vq)
            except RingError as exc:
                log.warning("queue %d: rings not mapped after memory change: %s", vq.index, exc)

    def _unmap_rings(self) -> None:
        for vq in self.vqs:
            vq.unmap_rings()

    def _dispatch(self, msg: Message, out: List[object]):
        req = R(msg.request)
        if msg.fds and req not in _TAKES_FDS:
            raise RequestError(f"unexpected {len(msg.fds)} fd(s)")
        if req in _UNSUPPORTED:
            raise RequestError(_UNSUPPORTED[req])
        handler = getattr(self, "_on_" + req.name.lower(), None)
        if handler is None:
            raise RequestError("request not supported")
        return handler(msg, out)

    # -- request handlers: return a reply payload, (data, fds), or None -------
    def _on_get_features(self, msg, out):
        return P.pack_u64(self.offered_features())

    def _on_set_features(self, msg, out):
        features = msg.u64()
        extra = features & ~self.offered_features()
        if extra:
            raise RequestError(f"features {extra:#x} were not offered")
        why = self.iface.check_features(self, features)
        if why:
            raise RequestError(why)
        self.features = features
        for vq in self.vqs:
            vq.features = features
        if not features & P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
            # Without PROTOCOL_FEATURES the spec enables every ring at once.
            for vq in self.vqs:
                vq.enable = True
        self.iface.set_features(self, features)

    def _on_get_protocol_features(self, msg, out):
        return P.pack_u64(self.offered_protocol_features())

    def _on_set_protocol_features(self, msg, out):
        pf = msg.u64()
        extra = pf & ~self.offered_protocol_features()
        if extra:
            raise RequestError(f"protocol features {extra:#x} were not offered")
        if pf & P.bit(PF.INBAND_NOTIFICATIONS) and (
                not pf & P.bit(PF.BACKEND_REQ) or not pf & P.bit(PF.REPLY_ACK)):
            # The spec's only remedy: close the connection.
            log.error("SET_PROTOCOL_FEATURES: in-band notifications need BACKEND_REQ and REPLY_ACK")
            out.append(Close("INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK"))
            return None
        self.protocol_features = pf
        self.protocol_negotiated = True
        self.iface.set_protocol_features(self, pf)

    def _on_set_owner(self, msg, out):
        self.owner = True

    def _on_reset_owner(self, msg, out):
        # Deprecated; the spec recommends only disabling the rings.
        for vq in self.vqs:
            out += self._stop_queue(vq)
            vq.enable = False

    def _on_reset_device(self, msg, out):
        self._need_protocol(PF.RESET_DEVICE)
        out += self.reset(keep_protocol=True)

    def _on_get_queue_num(self, msg, out):
        return P.pack_u64(self.max_queues)

    def _on_get_max_mem_slots(self, msg, out):
        self._need_protocol(PF.CONFIGURE_MEM_SLOTS)
        return P.pack_u64(self.mem.max_slots)

    def _on_set_mem_table(self, msg, out):
        table = P.MemoryTable.unpack(msg.payload)
        fds = self._take_fds(msg, len(table.regions))
        self._unmap_rings()
        self.mem.clear()
        for i, (region, fd) in enumerate(zip(table.regions, fds)):
            try:
                self.mem.add(region, fd)
            except MemoryMapError as exc:
                for rest in fds[i + 1:]:
                    os.close(rest)
                self.mem.clear()
                raise RequestError(f"region {i}: {exc}") from None
        self._remap_rings()

    def _on_add_mem_reg(self, msg, out):
        self._need_protocol(PF.CONFIGURE_MEM_SLOTS)
        region = P.MemRegMsg.unpack(msg.payload).region
        (fd,) = self._take_fds(msg, 1)
        self.mem.add(region, fd)
        self._remap_rings()

    def _on_rem_mem_reg(self, msg, out):
        self._need_protocol(PF.CONFIGURE_MEM_SLOTS)
        if len(msg.fds) > 1:
            raise RequestError(f"expected at most 1 fd, got {len(msg.fds)}")
        region = P.MemRegMsg.unpack(msg.payload).region
        self._unmap_rings()
        found = self.mem.remove(region)
        self._remap_rings()
        if not found:
            raise RequestError(f"no region at gpa {region.gpa:#x} size {region.size:#x}")

    def _on_set_log_base(self, msg, out):
        self._need_protocol(PF.LOG_SHMFD)
        area = P.LogArea.unpack(msg.payload)
        (fd,) = self._take_fds(msg, 1)
        try:
            dlog = DirtyLog(fd, area.mmap_size, area.mmap_offset)
        except (OSError, ValueError) as exc:
            raise RequestError(f"cannot map the log: {exc}") from None
        dlog.call_fd = self.log_call_fd
        self._set_log(dlog)
        return P.pack_u64(0)

    def _on_set_log_fd(self, msg, out):
        (fd,) = self._take_fds(msg, 1)
        _need_eventfd(fd, "log")
        if self.log_call_fd >= 0:
            os.close(self.log_call_fd)
        self.log_call_fd = fd
        if self.log is not None:
            self.log.call_fd = fd

    def _on_set_vring_num(self, msg, out):
        st = P.VringState.unpack(msg.payload)
        vq = self._queue(st.index)
        if st.num == 0 or st.num & (st.num - 1) or st.num > P.VIRTQUEUE_MAX_SIZE:
            raise RequestError(f"queue {st.index}: size {st.num} is not a power of two in 1..{P.VIRTQUEUE_MAX_SIZE}")
        if st.num > self.max_queue_size:
            raise RequestError(f"queue {st.index}: size {st.num} above the back-end's limit {self.max_queue_size}")
        vq.num = st.num
        if vq.addr is not None and len(self.mem):
            self._map_rings(vq)

    def _on_set_vring_addr(self, msg, out):
        addr = P.VringAddr.unpack(msg.payload)
        vq = self._queue(addr.index)
        if not vq.num:
            raise RequestError(f"queue {addr.index}: SET_VRING_ADDR before SET_VRING_NUM")
        old = vq.addr
        vq.addr = addr
        try:
            self._map_rings(vq)
        except RingError as exc:
            vq.addr = old
            if old is not None:
                self._map_rings(vq)     # keep serving on the previous, valid rings
            raise RequestError(f"ring addresses outside guest memory: {exc}") from None

    def _on_set_vring_base(self, msg, out):
        st = P.VringState.unpack(msg.payload)
        vq = self._queue(st.index)
        if st.num > 0xFFFF:
            raise RequestError(f"queue {st.index}: base {st.num} does not fit 16 bits")
        vq.set_base(st.num)
        self.base_serial[st.index] = self._next_serial()

    def _on_get_vring_base(self, msg, out):
        st = P.VringState.unpack(msg.payload)
        vq = self._queue(st.index)
        out += self._stop_queue(vq)
        base = vq.last_avail_idx
        if vq.call_fd >= 0:
            os.close(vq.call_fd)
            vq.call_fd = -1
        return P.VringState(st.index, base).pack()

    def _vring_fd(self, msg: Message):
        value = msg.u64()
        vq = self._queue(value & P.VRING_IDX_MASK)
        if value & ~(P.VRING_IDX_MASK | P.VRING_NOFD_MASK):
            raise RequestError(f"reserved bits set in {value:#x}")
        if value & P.VRING_NOFD_MASK:
            self._take_fds(msg, 0)
            return vq, -1
        (fd,) = self._take_fds(msg, 1)
        _need_eventfd(fd, f"queue {vq.index}")
        return vq, fd

    def _on_set_vring_kick(self, msg, out):
        vq, fd = self._vring_fd(msg)
        out += self._stop_queue(vq)
        vq.kick_fd = fd
        if fd >= 0:
            out.append(Watch(fd, vq.index))
        # libvhost-user starts the ring here; the first kick then finds it running.
        self._set_started(vq, True)
        if vq.inflight is not None and vq.ready():
            vq.check_inflight()

    def _on_set_vring_call(self, msg, out):
        vq, fd = self._vring_fd(msg)
        if vq.call_fd >= 0:
            os.close(vq.call_fd)
        vq.call_fd = fd

    def _on_set_vring_err(self, msg, out):
        vq, fd = self._vring_fd(msg)
        if vq.err_fd >= 0:
            os.close(vq.err_fd)
        vq.err_fd = fd

    def _on_set_vring_enable(self, msg, out):
        st = P.VringState.unpack(msg.payload)
        vq = self._queue(st.index)
        # QEMU 7.2 enables rings before SET_FEATURES (it checks the offered
        # features): SET_PROTOCOL_FEATURES having been received is enough.
        if not (self.protocol_negotiated or self.has_feature(P.VHOST_USER_F_PROTOCOL_FEATURES)):
            raise RequestError("PROTOCOL_FEATURES not negotiated")
        if st.num > 1:
            raise RequestError(f"queue {st.index}: enable value {st.num} is not 0 or 1")
        vq.enable = bool(st.num)
        if vq.enable and vq.started:
            vq.discard_disabled = True

    def _on_vring_kick(self, msg, out):
        self._need_protocol(PF.INBAND_NOTIFICATIONS)
        st = P.VringState.unpack(msg.payload)
        vq = self._queue(st.index)
        self._set_started(vq, True)
        self.kick(st.index)

    def _on_set_backend_req_fd(self, msg, out):
        self._need_protocol(PF.BACKEND_REQ)
        (fd,) = self._take_fds(msg, 1)
        channel = BackendChannel(fd)        # owns fd; ValueError if it is no socket
        if self.backend is not None:
            self.backend.close()
        self.backend = channel
        if self.has_protocol_feature(PF.INBAND_NOTIFICATIONS):
            for vq in self.vqs:
                vq.inband_call = self._inband(P.BackendRequest.VRING_CALL, vq.index)
                vq.inband_err = self._inband(P.BackendRequest.VRING_ERR, vq.index)

    def _inband(self, request: int, qidx: int) -> Callable[[], None]:
        payload = P.VringState(qidx, 0).pack()

        def send() -> None:
            if self.backend is not None:
                self.backend.request(request, payload, need_reply=True)
        return send

    def _on_get_config(self, msg, out):
        cfg = P.ConfigMsg.unpack(msg.payload)
        self._need_protocol(PF.CONFIG)
        data = self.iface.get_config(self, cfg.offset + cfg.size)
        if data is None or len(data) < cfg.offset + cfg.size:
            raise RequestError(f"config range {cfg.offset}+{cfg.size} not readable")
        return P.ConfigMsg(cfg.offset, cfg.size, cfg.flags, data[cfg.offset:cfg.offset + cfg.size]).pack()

    def _on_set_config(self, msg, out):
        cfg = P.ConfigMsg.unpack(msg.payload)
        self._need_protocol(PF.CONFIG)
        if not self.iface.set_config(self, cfg.data, cfg.offset, cfg.flags):
            raise RequestError(f"config write {cfg.offset}+{cfg.size} refused")

    def _on_get_inflight_fd(self, msg, out):
        self._need_protocol(PF.INFLIGHT_SHMFD)
        desc = P.InflightDesc.unpack(msg.payload)
        if not 1 <= desc.num_queues <= self.max_queues:
            raise RequestError(f"{desc.num_queues} queues, device has {self.max_queues}")
        buf = InflightBuffer.create(desc.num_queues, desc.queue_size)
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = buf
        self._attach_inflight()
        reply = P.InflightDesc(buf.mmap_size, buf.mmap_offset, buf.num_queues, buf.queue_size).pack()
        return P.encode_reply(msg.request, reply), [buf.fd]

    def _on_set_inflight_fd(self, msg, out):
        self._need_protocol(PF.INFLIGHT_SHMFD)
        desc = P.InflightDesc.unpack(msg.payload)
        if not 1 <= desc.num_queues <= self.max_queues:
            raise RequestError(f"{desc.num_queues} queues, device has {self.max_queues}")
        (fd,) = self._take_fds(msg, 1)
        try:     # map() owns fd from here and closes it itself when it fails
            buf = InflightBuffer.map(fd, desc.mmap_size, desc.mmap_offset, desc.num_queues, desc.queue_size)
        except (OSError, ValueError) as exc:
            raise RequestError(f"cannot map the inflight buffer: {exc}") from None
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = buf
        self._attach_inflight()

    def _attach_inflight(self) -> None:
        for vq in self.vqs:
            vq.inflight = self.inflight.queue(vq.index) if vq.index < self.inflight.num_queues else None

    def _on_set_status(self, msg, out):
        self._need_protocol(PF.STATUS)
        status = msg.u64()
        if status > 0xFF:
            raise RequestError(f"status {status:#x} does not fit 8 bits")
        self.status = status
        if status == 0:
            # A virtio reset: stop every ring; memory stays for the restart.
            for vq in self.vqs:
                out += self._stop_queue(vq)

    def _on_get_status(self, msg, out):
        self._need_protocol(PF.STATUS)
        return P.pack_u64(self.status)

    def _on_send_rarp(self, msg, out):
        self._need_protocol(PF.RARP)
        self.iface.send_rarp(self, msg.payload[:6])

    def _on_net_set_mtu(self, msg, out):
        self._need_protocol(PF.NET_MTU)
        mtu = msg.u64()
        if not 68 <= mtu <= 65535:
            raise RequestError(f"MTU {mtu} out of range 68..65535")
        self.mtu = mtu

    def _on_iotlb_msg(self, msg, out):
        raise RequestError("IOTLB messages need VIRTIO_F_IOMMU_PLATFORM, which is not offered")
