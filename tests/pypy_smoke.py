"""Run by tests/test_pypy.py under another interpreter (PyPy 3.9): the
library's whole path — negotiation, traffic both ways, a hostile ring —
with nothing but the standard library and shardvu on sys.path."""
import os
import sys
import tempfile
import threading
import time

from shardvu.echo import EchoBackend
from shardvu.testing.frontend import Frontend
from shardvu.testing.driver import VRING_DESC_F_NEXT

path = os.path.join(tempfile.mkdtemp(), "pypy.sock")
backend = EchoBackend(2)
t = threading.Thread(target=backend.serve, args=(path,), daemon=True)
t.start()
while not os.path.exists(path):
    time.sleep(0.01)
with Frontend(path, queue_pairs=2) as fe:
    fe.negotiate()
    for pair in range(2):
        fe.post_rx(pair, 64)
        frames = [bytes([pair, i]) * 40 for i in range(30)]
        fe.send(pair, frames)
        got = fe.receive(pair, timeout=10, min_frames=30)
        assert got == frames, (pair, len(got))
    q = fe.queues[1]
    q.write_desc(0, fe.alloc(64), 64, VRING_DESC_F_NEXT, 0)     # a loop
    q.push_avail(0)
    q.write_avail_idx(q.avail_idx)
    fe.kick(1)
    deadline = time.monotonic() + 5
    while not backend.device.vqs[1].broken:
        assert time.monotonic() < deadline, "hostile ring not detected"
        time.sleep(0.01)
    fe.post_rx(1, 4)
    fe.send(1, [b"still"])
    assert fe.receive(1, timeout=5) == [b"still"]
backend.runner.stop()
t.join(5)
print("ok", sys.implementation.name, sys.version_info[:2])
