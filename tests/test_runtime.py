"""The sharded runtime (`shardvu run`) driven by shardvu's own front-end:
one control process, one worker process per virtqueue, stats over ZeroMQ."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from shardvu import protocol as P
from shardvu.testing.driver import VRING_DESC_F_NEXT
from shardvu.testing.frontend import Frontend, FrontendError
from shardvu.protocol import Request as R

from util import wait_for


def frames(pair: int, n: int, size: int = 64):
    return [bytes([pair, i & 0xFF]) + bytes(size - 2) for i in range(n)]


def test_one_worker_per_virtqueue_and_clean_shutdown(runtime):
    rt = runtime(4)
    workers = rt.workers()
    assert len(workers) == 8
    snap = rt.stats()
    assert [q["index"] for q in snap["queues"]] == list(range(8))
    assert [q["direction"] for q in snap["queues"]] == ["rx", "tx"] * 4
    assert {q["worker_pid"] for q in snap["queues"]} == {w.pid for w in workers}
    assert oct(os.stat(rt.sock).st_mode & 0o777) == "0o600"
    assert rt.stop() == 0
    assert not os.path.exists(rt.sock)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def test_sigint_also_shuts_down_cleanly(runtime):
    rt = runtime(1)
    assert rt.stop(signal.SIGINT) == 0


def test_sink_counts_every_frame_on_its_queue(runtime):
    rt = runtime(8, "sink")
    with Frontend(rt.sock, queue_pairs=8, mem_size=128 << 20) as fe:
        fe.negotiate()
        sent = {}
        for pair in range(8):
            sent[pair] = fe.send(pair, frames(pair, 10 + pair))
        wait_for(lambda: all(fe.queues[2 * p + 1].used_idx == sent[p] for p in range(8)))
        wait_for(lambda: all(rt.queue_stats()[2 * p + 1]["packets"] == sent[p] for p in range(8)),
                 timeout=5, interval=0.1)
        stats = rt.queue_stats()
        for pair in range(8):
            assert stats[2 * pair + 1]["bytes"] == sent[pair] * 64
            assert stats[2 * pair]["packets"] == 0           # RX stays idle
        assert all(q["cpu_percent"] >= 0 and q["rss_bytes"] > 0 for q in stats.values())


def test_loopback_returns_each_pairs_frames_on_that_pair(runtime):
    rt = runtime(4, "loopback")
    with Frontend(rt.sock, queue_pairs=4) as fe:
        fe.negotiate()
        for pair in range(4):
            fe.post_rx(pair, 128)
        for pair in range(4):
            fe.send(pair, frames(pair, 50))
        for pair in range(4):
            assert fe.receive(pair, timeout=10, min_frames=50) == frames(pair, 50)


def test_generator_fills_every_rx_ring(runtime):
    rt = runtime(2, "generator", "--frame-size", "128")
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        for pair in range(2):
            fe.post_rx(pair, 64)
        for pair in range(2):
            got = fe.receive(pair, timeout=10, min_frames=100)
            assert len(got) >= 100 and all(len(f) == 128 for f in got)
        wait_for(lambda: rt.queue_stats()[0]["packets"] >= 100, interval=0.1)


def test_custom_port_function(runtime, tmp_path):
    mod = tmp_path / "myport.py"
    mod.write_text("def upper(frames):\n    return [f.upper() for f in frames if f.startswith(b'k')]\n")
    env_path = str(tmp_path)
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        rt = runtime(1, "myport:upper")
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 16)
        fe.send(0, [b"keep me" + bytes(57), b"drop me" + bytes(57)])
        assert fe.receive(0, timeout=5) == [b"KEEP ME" + bytes(57)]


def test_get_vring_base_returns_the_workers_index(runtime):
    rt = runtime(1)
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.send(0, frames(0, 7))
        wait_for(lambda: fe.queues[1].used_idx == 7)
        assert fe.get_vring_base(1) == 7
        assert fe.get_vring_base(0) == 0           # never processed anything
        fe.send(0, frames(0, 2))
        time.sleep(0.3)
        assert fe.queues[1].used_idx == 7          # the worker stopped the ring


def test_reconnect_tears_down_and_serves_the_next_frontend(runtime):
    rt = runtime(2, "loopback")
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        fe.post_rx(1, 8)
        fe.send(1, frames(1, 4))
        assert len(fe.receive(1, timeout=5, min_frames=4)) == 4
    time.sleep(0.5)
    fds_after_first = rt.fds()
    for _ in range(3):
        fe = Frontend(rt.sock, queue_pairs=2)
        fe.negotiate()
        fe.post_rx(0, 8)
        fe.send(0, frames(0, 3))
        assert len(fe.receive(0, timeout=5, min_frames=3)) == 3
        fe.close()                               # vanish mid-traffic, no goodbye
        time.sleep(0.5)
    assert rt.fds() == fds_after_first
    assert len(rt.workers()) == 4


def test_client_mode_connects_to_a_listening_frontend(runtime):
    rt = runtime(1, "loopback", "--client")     # retries until the front-end listens
    with Frontend.listen(rt.sock, timeout=15) as fe:
        fe.negotiate()
        fe.post_rx(0, 8)
        fe.send(0, frames(0, 5))
        assert len(fe.receive(0, timeout=5, min_frames=5)) == 5
    # after the front-end goes away the runtime retries until a new one listens
    with Frontend.listen(rt.sock, timeout=15) as fe:
        fe.negotiate()
        fe.post_rx(0, 4)
        fe.send(0, frames(0, 1))
        assert len(fe.receive(0, timeout=5)) == 1


def test_inherited_listening_fd(runtime, tmp_path):
    path = str(tmp_path / "inherited.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    rt = runtime(1, "sink", "--fd", str(lst.fileno()), wait=False, pass_fds=(lst.fileno(),))
    rt.sock = path
    lst.close()
    with Frontend(path) as fe:
        fe.negotiate()
        fe.send(0, frames(0, 3))
        wait_for(lambda: fe.queues[1].used_idx == 3)
    rt.stop()
    os.unlink(path)


def test_print_capabilities():
    out = subprocess.run([sys.executable, "-m", "shardvu.cli", "--print-capabilities"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout) == {"type": "net"}
    out = subprocess.run([sys.executable, "-m", "shardvu.cli", "run", "--print-capabilities"],
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout) == {"type": "net"}


def test_cpus_pins_workers(runtime):
    rt = runtime(1, "sink", "--cpus", "0")
    for w in rt.workers():
        assert w.cpu_affinity() == [0]


def test_stats_cli_json_and_table(runtime):
    rt = runtime(1)
    out = subprocess.run([sys.executable, "-m", "shardvu.cli", "stats", "--socket", rt.sock, "--json"],
                         capture_output=True, text=True, timeout=30)
    snap = json.loads(out.stdout)
    q = snap["queues"][0]
    for key in ("index", "direction", "packets", "bytes", "drops", "kicks", "calls",
                "worker_pid", "cpu_percent", "rss_bytes"):
        assert key in q
    out = subprocess.run([sys.executable, "-m", "shardvu.cli", "stats", "--socket", rt.sock],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "tx" in out.stdout and "rx" in out.stdout


def test_crashed_worker_is_replaced_and_shows_in_stats_and_log(runtime):
    rt = runtime(2)
    victim = rt.queue_stats()[3]["worker_pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: rt.queue_stats()[3]["worker_pid"] not in (None, victim), interval=0.1)
    wait_for(lambda: "replaced by pid" in rt.log(), interval=0.1)
    # the death is logged with its status once the zygote reports it
    wait_for(lambda: f"worker 3 (pid {victim}) died (signal 9)" in rt.log(), interval=0.1)
    # every queue works, the replaced one included
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        for pair in (0, 1):
            fe.send(pair, frames(pair, 2))
            wait_for(lambda: fe.queues[2 * pair + 1].used_idx == 2)


# --- bad input and faults -----------------------------------------------------------
def test_out_of_order_messages(runtime):
    rt = runtime(1)
    children = {p.pid for p in rt.workers()}
    fds = rt.fds()
    with Frontend(rt.sock) as fe:
        fe.request(R.GET_FEATURES)
        fe.request(R.SET_PROTOCOL_FEATURES, P.pack_u64(P.bit(P.ProtocolFeature.REPLY_ACK)))
        fe._reply_ack = True
        # a kick before the memory table
        fe.request(R.SET_VRING_NUM, P.VringState(1, 256).pack())
        fe.request(R.SET_VRING_KICK, P.pack_u64(1), [fe.kick_fds[1]])
        fe.kick(1)
        # ring addresses outside memory (there is none yet)
        with pytest.raises(FrontendError):
            fe.request(R.SET_VRING_ADDR, P.VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0).pack())
        # GET_VRING_BASE on a ring that never started
        assert fe.get_vring_base(0) == 0
    time.sleep(0.5)
    assert "SET_VRING_ADDR" in rt.log()
    assert {p.pid for p in rt.workers()} == children
    assert rt.fds() == fds
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.send(0, frames(0, 1))
        wait_for(lambda: fe.queues[1].used_idx == 1)


def test_disconnect_mid_negotiation(runtime):
    rt = runtime(1)
    fds = rt.fds()
    fe = Frontend(rt.sock)
    fe.request(R.GET_FEATURES)
    fe.request(R.SET_MEM_TABLE, P.MemoryTable(tuple(fe.region_descs)).pack(), fe.region_fds)
    fe.close()
    time.sleep(0.5)
    assert rt.fds() == fds
    with Frontend(rt.sock) as fe:
        fe.negotiate()


def test_hostile_ring_breaks_only_its_queue(runtime):
    rt = runtime(2, "loopback")
    with Frontend(rt.sock, queue_pairs=2) as fe:
        fe.negotiate()
        q = fe.queues[1]
        q.write_desc(0, fe.alloc(64), 64, VRING_DESC_F_NEXT, 0)     # a loop
        q.push_avail(0)
        q.write_avail_idx(q.avail_idx)
        fe.kick(1)
        wait_for(lambda: rt.queue_stats()[1]["state"] == "broken", interval=0.1)
        assert rt.queue_stats()[1]["ring_errors"] == 1
        wait_for(lambda: fe.errors(1) >= 1)
        fe.post_rx(1, 8)
        fe.send(1, frames(1, 3))
        assert len(fe.receive(1, timeout=5, min_frames=3)) == 3
    assert "queue 1 broken: descriptor loop" in rt.log()


def test_workers_exit_when_the_control_process_dies(runtime):
    rt = runtime(2)
    workers = rt.workers()
    os.kill(rt.proc.pid, signal.SIGKILL)
    rt.proc.wait(5)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "workers outlived the control process"
    os.unlink(rt.sock)            # a SIGKILLed control process cannot clean up
    rt.stop()


def test_dirty_log_through_the_workers(runtime):
    rt = runtime(1, "loopback")
    with Frontend(rt.sock) as fe:
        fe.negotiate()
        fe.post_rx(0, 8)
        dlog = fe.set_log_base()
        fe.set_features(fe.features | P.bit(P.VHOST_F_LOG_ALL))
        fe.set_vring_addr(0, log=True)
        fe.set_vring_addr(1, log=True)
        dlog.clear()
        fe.send(0, [b"\x5a" * 100])
        rxq = fe.queues[0]
        wait_for(lambda: rxq.used_idx == 1)
        head, length = rxq.used_elem(0)
        gpa = fe._rx_bufs[(0, head)][0]
        wait_for(lambda: fe.queues[1].used_idx == 1)
        expected = {p for p in range(gpa // 4096, (gpa + length - 1) // 4096 + 1)}
        expected |= {fe.queues[0].used_gpa // 4096, fe.queues[1].used_gpa // 4096}
        assert set(dlog.dirty_pages()) == expected
