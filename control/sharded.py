"""The control process's device: the library's :class:`~shardvu.device.Device`
with every ring handed to a worker process.

The Device does the negotiation and keeps the whole state (memory-region
fds, ring sizes/addresses/bases, kick/call/err fds, log and inflight
buffers) — everything a new worker would need.  After each request it has
applied successfully, :meth:`ShardedDevice.handle` forwards the change to the
affected workers and waits for their answers before returning the reply:
every state change is a barrier.  GET_VRING_BASE first stops the worker and
returns the index the worker reports.

The control process maps guest memory only to validate ring addresses; it
never reads or writes ring memory on the data path.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from shardvu import protocol as P
from shardvu.device import Device, DeviceIface, Reply, Unwatch, Watch
from shardvu.protocol import Message, ProtocolFeature as PF, Request as R
from shardvu.virtqueue import VirtQueue

from .pool import WorkerError, WorkerPool

log = logging.getLogger("shardvu.control")

#: Protocol features that need the back-end channel from the data path, which
#: lives in the workers here: not offered.
_NOT_SHARDED = P.bit(PF.INBAND_NOTIFICATIONS) | P.bit(PF.HOST_NOTIFIER)


class ShardedDevice(Device):
    """A Device whose virtqueues are served by ``pool``'s workers."""

    def __init__(self, pool: WorkerPool, iface: Optional[DeviceIface] = None, **device_args):
        super().__init__(pool.num_queues, iface, **device_args)
        self.pool = pool

    def offered_protocol_features(self) -> int:
        return super().offered_protocol_features() & ~_NOT_SHARDED

    # -- forwarding ------------------------------------------------------------------
    def handle(self, msg: Message) -> List[object]:
        req = msg.request
        if req == R.GET_VRING_BASE:
            self._stop_worker(msg)
        errors = self.errors
        payload = msg.payload
        events = super().handle(msg)
        if self.errors == errors and req in _FORWARD:
            try:
                _FORWARD[req](self, payload)
            except (WorkerError, ValueError) as exc:
                log.error("%s: workers did not apply it: %s", P.request_name(req), exc)
                self.errors += 1
                events = [_nack(e, req) for e in events]
        # Kick fds are the workers' business.
        return [e for e in events if not isinstance(e, (Watch, Unwatch))]

    def close(self) -> List[object]:
        out = super().close()
        self._all({"cmd": "reset"})
        return out

    def _all(self, obj: Dict[str, Any], fds=()) -> None:
        try:
            self.pool.command_all(obj, fds)
        except WorkerError as exc:
            log.error("workers failed %s: %s", obj.get("cmd"), exc)

    def _stop_worker(self, msg: Message) -> None:
        try:
            st = P.VringState.unpack(msg.payload)
        except Exception:
            return          # the Device rejects the malformed message itself
        if st.index >= self.max_queues:
            return
        vq = self.vqs[st.index]
        try:
            reply = self.pool[st.index].command({"cmd": "stop"})
            vq.last_avail_idx = reply["base"]
        except WorkerError as exc:
            log.error("GET_VRING_BASE: queue %d: %s; reporting the control's copy", st.index, exc)

    def ring_state(self, vq: VirtQueue, with_base: bool) -> Dict[str, Any]:
        return {"cmd": "ring", "num": vq.num, "addr": list(vq.addr) if vq.addr else None,
                "base": vq.last_avail_idx if with_base else None,
                "features": self.features, "enable": vq.enable,
                "in_order": vq.processed_in_order}

    def bootstrap(self, index: int) -> None:
        """Bring worker ``index`` to the device's current state (a worker
        started after negotiation: the respawn path).  The base sent is the
        control's stale copy; the worker's rings are processed in order, so
        mapping them resumes at the used index (everything not yet used is
        fetched again)."""
        w = self.pool[index]
        vq = self.vqs[index]
        self._send_memory([w])
        w.command(self.ring_state(vq, True))
        for kind in ("call", "err", "kick"):
            fd = getattr(vq, kind + "_fd")
            w.command({"cmd": "fd", "kind": kind}, [fd] if fd >= 0 else [])
        if self.log is not None:
            w.command({"cmd": "log", "size": self.log.size, "offset": self.log.offset}, [self.log.fd])
        if self.inflight is not None:
            w.command(self._inflight_cmd(), [self.inflight.fd])
        if vq.started:
            w.command({"cmd": "start"})

    def _send_memory(self, workers) -> None:
        regions = self.mem.regions
        for w in workers:
            w.command({"cmd": "mem_clear"})
            for i in range(0, len(regions), 100):
                chunk = regions[i:i + 100]
                w.command({"cmd": "mem_add", "regions": [list(r.describe()) for r in chunk]},
                          [r.fd for r in chunk])

    def _inflight_cmd(self) -> Dict[str, Any]:
        b = self.inflight
        return {"cmd": "inflight", "size": b.mmap_size, "offset": b.mmap_offset,
                "num_queues": b.num_queues, "queue_size": b.queue_size}


def _nack(event: object, req: int) -> object:
    """Turn a success ack into a failure ack (a worker failed the barrier)."""
    if isinstance(event, Reply) and event.data == P.encode_reply(req, P.pack_u64(0)):
        return Reply(P.encode_reply(req, P.pack_u64(1)))
    return event


def _live(dev: ShardedDevice):
    return [w for w in dev.pool.workers if w.exitcode is None]


def _fwd_features(dev: ShardedDevice, payload: bytes) -> None:
    enable_all = not dev.has_feature(P.VHOST_USER_F_PROTOCOL_FEATURES)
    dev.pool.command_all({"cmd": "features", "features": dev.features, "enable_all": enable_all})


def _fwd_mem_table(dev: ShardedDevice, payload: bytes) -> None:
    dev._send_memory(_live(dev))


def _fwd_add_mem(dev: ShardedDevice, payload: bytes) -> None:
    region = P.MemRegMsg.unpack(payload).region
    for r in dev.mem.regions:
        if r.matches(region):
            if r.refs == 1:         # newly mapped; a repeated add changes nothing
                dev.pool.command_all({"cmd": "mem_add", "regions": [list(r.describe())]}, [r.fd])
            return
    raise ValueError("added region not found")


def _fwd_rem_mem(dev: ShardedDevice, payload: bytes) -> None:
    region = P.MemRegMsg.unpack(payload).region
    if not any(r.matches(region) for r in dev.mem.regions):     # last reference gone
        dev.pool.command_all({"cmd": "mem_rem", "region": list(region)})


def _ring_index(payload: bytes) -> int:
    return P.VringState.unpack(payload[:8]).index


def _fwd_ring(dev: ShardedDevice, payload: bytes) -> None:
    q = _ring_index(payload)
    dev.pool[q].command(dev.ring_state(dev.vqs[q], with_base=False))


def _fwd_ring_base(dev: ShardedDevice, payload: bytes) -> None:
    q = _ring_index(payload)
    dev.pool[q].command(dev.ring_state(dev.vqs[q], with_base=True))


def _fwd_enable(dev: ShardedDevice, payload: bytes) -> None:
    st = P.VringState.unpack(payload)
    dev.pool[st.index].command({"cmd": "enable", "on": bool(st.num)})


def _fwd_vring_fd(kind: str):
    def forward(dev: ShardedDevice, payload: bytes) -> None:
        q = P.unpack_u64(payload) & P.VRING_IDX_MASK
        fd = getattr(dev.vqs[q], kind + "_fd")
        w = dev.pool[q]
        w.command({"cmd": "fd", "kind": kind}, [fd] if fd >= 0 else [])
        if kind == "kick":
            w.command({"cmd": "start"})
    return forward


def _fwd_stop_all(dev: ShardedDevice, payload: bytes) -> None:
    dev.pool.command_all({"cmd": "stop"})
    dev.pool.command_all({"cmd": "enable", "on": False})


def _fwd_reset(dev: ShardedDevice, payload: bytes) -> None:
    dev.pool.command_all({"cmd": "reset"})


def _fwd_status(dev: ShardedDevice, payload: bytes) -> None:
    if P.unpack_u64(payload) == 0:
        dev.pool.command_all({"cmd": "stop"})


def _fwd_log(dev: ShardedDevice, payload: bytes) -> None:
    lg = dev.log
    dev.pool.command_all({"cmd": "log", "size": lg.size, "offset": lg.offset}, [lg.fd])


def _fwd_log_fd(dev: ShardedDevice, payload: bytes) -> None:
    dev.pool.command_all({"cmd": "log_call"}, [dev.log_call_fd])


def _fwd_inflight(dev: ShardedDevice, payload: bytes) -> None:
    dev.pool.command_all(dev._inflight_cmd(), [dev.inflight.fd])


_FORWARD = {
    R.SET_FEATURES: _fwd_features,
    R.SET_MEM_TABLE: _fwd_mem_table,
    R.ADD_MEM_REG: _fwd_add_mem,
    R.REM_MEM_REG: _fwd_rem_mem,
    R.SET_VRING_NUM: _fwd_ring,
    R.SET_VRING_ADDR: _fwd_ring,
    R.SET_VRING_BASE: _fwd_ring_base,
    R.SET_VRING_ENABLE: _fwd_enable,
    R.SET_VRING_KICK: _fwd_vring_fd("kick"),
    R.SET_VRING_CALL: _fwd_vring_fd("call"),
    R.SET_VRING_ERR: _fwd_vring_fd("err"),
    R.RESET_OWNER: _fwd_stop_all,
    R.RESET_DEVICE: _fwd_reset,
    R.SET_STATUS: _fwd_status,
    R.SET_LOG_BASE: _fwd_log,
    R.SET_LOG_FD: _fwd_log_fd,
    R.GET_INFLIGHT_FD: _fwd_inflight,
    R.SET_INFLIGHT_FD: _fwd_inflight,
}
