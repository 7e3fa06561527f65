"""The control process keeps everything a new worker needs: a worker started
after negotiation is brought to the device's state by ``bootstrap`` (the
path a respawn will take), from the queue's snapshot alone."""
from __future__ import annotations

import os
import signal
import threading

from shardvu.control.pool import WorkerPool
from shardvu.control.server import ControlRunner
from shardvu.control.sharded import ShardedDevice
from shardvu.testing.frontend import Frontend
from shardvu.net import NetIface

from util import wait_for


def test_a_replacement_worker_is_bootstrapped_to_the_current_state(tmp_path):
    path = str(tmp_path / "boot.sock")
    pool = WorkerPool(2, "sink")
    pool.start()
    dev = ShardedDevice(pool, NetIface(1, in_order=True))
    runner = ControlRunner(dev, None)
    t = threading.Thread(target=runner.serve, args=(path,), daemon=True)
    t.start()
    try:
        wait_for(lambda: os.path.exists(path))
        with Frontend(path) as fe:
            fe.negotiate()
            fe.send(0, [bytes(64)] * 5)
            wait_for(lambda: fe.queues[1].used_idx == 5)
            old = pool[1]
            os.kill(old.pid, signal.SIGKILL)
            old.process.join(5)
            wait_for(lambda: pool.reap() or old.exitcode is not None)
            pool.replace(1)                        # what a respawn will do
            dev.bootstrap(1)
            fe.send(0, [bytes(64)] * 3)
            wait_for(lambda: fe.queues[1].used_idx == 8)
            assert fe.get_vring_base(1) == 8       # the new worker's own index
    finally:
        runner.stop()
        t.join(5)
        pool.stop()
