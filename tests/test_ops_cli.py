"""Operating shardvu as QEMU, libvirt and systemd start it: ``shardvu-net``
and its conventions (``--print-capabilities``, ``--socket-path``, ``--fd``
of both kinds, the descriptor QEMU discovers), socket activation, the
socket's mode and group, ``--queue-size``, ``--name``, logging and clean
startup errors."""
from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest
import zmq

from shardvu import protocol as P
from shardvu.statsapi import NoAnswer, endpoints, name_endpoints, query
from shardvu.testing.frontend import Frontend, FrontendError

NET = shutil.which("shardvu-net")
needs_net = pytest.mark.skipif(NET is None, reason="shardvu-net is not installed (pip install -e .)")
FRAME = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5" + bytes(range(50))


def start(argv, env=None, pass_fds=(), log=None, **kw) -> subprocess.Popen:
    """``argv`` in a subprocess, stdout+stderr into ``log`` (a path)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                pass_fds=pass_fds, **kw)
    finally:
        if log:
            out.close()


def stats(endpoint: str, timeout: float = 2.0) -> dict:
    """One stats query on a context of its own (no fd outlives the call)."""
    ctx = zmq.Context()
    try:
        return query(endpoint, timeout, ctx)
    finally:
        ctx.destroy(linger=0)


def wait_stats(endpoint: str, proc: subprocess.Popen, log: str, timeout: float = 20.0) -> dict:
    """The first stats snapshot in which every queue has a running worker."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{open(log).read()}")
        try:
            snap = stats(endpoint, 0.5)
            if snap["queues"] and all(q["state"] != "starting" for q in snap["queues"]):
                return snap
        except NoAnswer:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready:\n{open(log).read()}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> float:
    """SIGTERM ``proc``; returns the seconds it took to exit, all its
    children included (fails if any survive)."""
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout)
    took = time.monotonic() - t0
    _, alive = psutil.wait_procs(children, timeout=5)
    for p in alive:
        p.kill()
    assert not alive, f"children left behind: {alive}"
    return took


def loop_one_frame(fe: Frontend) -> None:
    """Negotiate, then send a frame and take it back (loopback port)."""
    fe.negotiate()
    fe.post_rx(0, 16)
    fe.send(0, [FRAME])
    got = fe.receive(0, timeout=10)
    assert got and got[0][-len(FRAME):] == FRAME


@pytest.fixture
def env(tmp_path):
    """The environment for the processes under test: their own runtime
    dir (named instances) and config dir (descriptors)."""
    e = dict(os.environ)
    e["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    os.makedirs(e["XDG_RUNTIME_DIR"])
    return e


@pytest.fixture
def runtime_dir(env, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    return env["XDG_RUNTIME_DIR"]


# -- the back-end program conventions -------------------------------------------------

@needs_net
def test_print_capabilities_at_top_level():
    for argv in ([NET, "--print-capabilities"], [sys.executable, "-m", "shardvu", "--print-capabilities"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"type": "net"}


@needs_net
def test_shardvu_net_takes_every_run_option():
    help_net = subprocess.run([NET, "--help"], capture_output=True, text=True, timeout=60).stdout
    help_run = subprocess.run([sys.executable, "-m", "shardvu", "run", "--help"],
                              capture_output=True, text=True, timeout=60).stdout
    opts = {w.strip(",[]") for w in help_run.split() if w.startswith("--")}
    assert {"--socket-path", "--fd", "--print-capabilities", "--metrics", "--name",
            "--socket-mode", "--socket-group", "--queue-size", "--log-format"} <= opts
    for opt in opts:
        assert opt in help_net, opt


@needs_net
def test_descriptor_discovery_end_to_end(tmp_path, env, fd_guard):
    """install-descriptor --user, then do what QEMU does: read the JSON,
    check the capabilities, run the binary it names and connect."""
    out = subprocess.run([sys.executable, "-m", "shardvu", "install-descriptor", "--user"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip()
    assert path == os.path.join(env["XDG_CONFIG_HOME"], "qemu", "vhost-user", "50-shardvu-net.json")
    with open(path) as f:
        desc = json.load(f)
    assert desc["type"] == "net" and os.path.isabs(desc["binary"])
    assert os.access(desc["binary"], os.X_OK) and os.path.basename(desc["binary"]) == "shardvu-net"
    caps = subprocess.run([desc["binary"], "--print-capabilities"], capture_output=True,
                          text=True, timeout=60)
    assert json.loads(caps.stdout)["type"] == desc["type"]
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([desc["binary"], "--socket-path", sock, "--port", "loopback"], env=env, log=log)
    try:
        wait_stats(endpoints(sock)[1], proc, log)
        with Frontend(sock) as fe:
            loop_one_frame(fe)
    finally:
        took = stop(proc)
    assert proc.returncode == 0 and took < 5, open(log).read()
    assert not os.path.exists(sock)


def test_install_descriptor_system_path_is_etc():
    from shardvu.cli import descriptor_dir
    assert descriptor_dir(True) == "/etc/qemu/vhost-user"


@needs_net
def test_sigterm_exits_promptly_and_does_not_daemonize(tmp_path, env):
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([NET, "--socket-path", sock, "--queues", "2"], env=env, log=log)
    wait_stats(endpoints(sock)[1], proc, log)
    # Not daemonized: the process we started is the control process.
    assert psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    assert len(psutil.Process(proc.pid).children(recursive=True)) >= 4   # the workers
    took = stop(proc)
    assert proc.returncode == 0 and took < 3, (took, open(log).read())


# -- --fd: both kinds ---------------------------------------------------------------

@needs_net
def test_fd_listening_socket_serves_connections(tmp_path, env, runtime_dir, fd_guard):
    sock = str(tmp_path / "vu.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(sock)
    lst.listen(1)
    log = str(tmp_path / "net.log")
    proc = start([NET, "--fd", str(lst.fileno()), "--port", "loopback", "--name", "lst"],
                 env=env, pass_fds=[lst.fileno()], log=log)
    lst.close()
    try:
        wait_stats(name_endpoints("lst")[1], proc, log)
        for _ in range(2):                      # a listening fd serves one after another
            with Frontend(sock) as fe:
                loop_one_frame(fe)
        assert proc.poll() is None
    finally:
        stop(proc)
    assert proc.returncode == 0


@needs_net
def test_fd_connected_socket_is_one_session(tmp_path, env, runtime_dir, fd_guard):
    """One end of a socketpair (libvirt's way): served, and shardvu exits
    when the front-end closes it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log = str(tmp_path / "net.log")
    proc = start([NET, "--fd", str(theirs.fileno()), "--port", "loopback", "--name", "pair"],
                 env=env, pass_fds=[theirs.fileno()], log=log)
    theirs.close()
    try:
        wait_stats(name_endpoints("pair")[1], proc, log)
        with Frontend(sock=ours) as fe:
            loop_one_frame(fe)
        proc.wait(10)                            # the session ended: so does shardvu
    finally:
        stop(proc)
    assert proc.returncode == 0, open(log).read()
    assert "one connected session" in open(log).read()


@needs_net
@pytest.mark.parametrize("kind", ["pipe", "udp", "closed"])
def test_fd_that_is_no_stream_socket_is_one_clear_line(tmp_path, kind):
    if kind == "pipe":
        r, w = os.pipe()
        keep = [r, w]
        fd = r
    elif kind == "udp":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        keep = [s]
        fd = s.fileno()
    else:
        keep, fd = [], 57
    try:
        out = subprocess.run([NET, "--fd", str(fd)], capture_output=True, text=True, timeout=60,
                             pass_fds=[fd] if keep else [])
    finally:
        for k in keep:
            k.close() if hasattr(k, "close") else os.close(k)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and f"--fd {fd}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# -- systemd --------------------------------------------------------------------------

@needs_net
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_socket_activation(tmp_path, env, runtime_dir, fd_guard):
    sock = str(tmp_path / "act.sock")
    log = str(tmp_path / "net.log")
    # It passes on only the LISTEN_* variables and those named with -E.
    proc = start(["systemd-socket-activate", "-l", sock, "-E", f"XDG_RUNTIME_DIR={runtime_dir}",
                  NET, "--port", "loopback", "--name", "act"], env=env, log=log)
    try:
        # systemd-socket-activate starts the service at the first connection.
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, open(log).read()
            time.sleep(0.05)
        with Frontend(sock, timeout=20) as fe:
            loop_one_frame(fe)
        snap = wait_stats(name_endpoints("act")[1], proc, log)
        assert snap["name"] == "act"
        assert sum(q["packets"] for q in stats(name_endpoints("act")[1])["queues"]) >= 2
    finally:
        stop(proc)
    assert "serving fd 3" in open(log).read()


def test_activation_fd_contract(monkeypatch):
    from shardvu.control.server import StartupError, activation_fd
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert activation_fd(env) == 3 and env == {}           # consumed
    assert activation_fd({}) is None
    assert activation_fd({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None   # not ours
    with pytest.raises(StartupError):
        activation_fd({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"})


def test_example_unit_files_are_consistent():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    unit = open(os.path.join(root, "docs", "systemd", "shardvu@.service")).read()
    sock = open(os.path.join(root, "docs", "systemd", "shardvu@.socket")).read()
    assert "ListenStream=" in sock and "SocketMode=" in sock
    assert "ExecStart=" in unit and "shardvu-net" in unit and "--name %i" in unit
    assert "Type=simple" in unit        # no daemonizing
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit      # live upgrade


@needs_net
def test_socket_mode_and_group(tmp_path, env):
    """The socket is created with the asked mode and group (never more open
    on the way: the mode goes through the umask, the group before listen)."""
    groups = [g for g in os.getgroups() if g != os.getegid()] or [os.getegid()]
    gid = groups[0]
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([NET, "--socket-path", sock, "--socket-mode", "0660",
                  "--socket-group", grp.getgrgid(gid).gr_name], env=env, log=log)
    try:
        wait_stats(endpoints(sock)[1], proc, log)
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    finally:
        stop(proc)


def test_listen_unix_never_wider_than_asked(tmp_path, monkeypatch):
    """The socket file's mode as bind created it, before any chmod."""
    from shardvu.control import server
    seen = []
    real_chmod = os.chmod

    def spy(path, mode, *a, **k):
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        return real_chmod(path, mode, *a, **k)
    monkeypatch.setattr(server.os, "chmod", spy)
    path = str(tmp_path / "s.sock")
    s = server.listen_unix(path, 0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660 and seen == []   # umask only
    s.close()
    s = server.listen_unix(path, 0o666, gid=os.getegid())
    assert seen == [0o600] and stat.S_IMODE(os.stat(path).st_mode) == 0o666
    s.close()


def test_socket_mode_and_group_validation():
    from shardvu.control.server import parse_mode, resolve_group
    assert parse_mode("0660") == 0o660 and parse_mode("600") == 0o600
    for bad in ("rw", "1777", "9"):
        with pytest.raises(ValueError):
            parse_mode(bad)
    with pytest.raises(ValueError):
        resolve_group("no-such-group-shardvu")


# -- --queue-size -------------------------------------------------------------------

@needs_net
def test_queue_size_is_enforced(tmp_path, env, fd_guard):
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    proc = start([NET, "--socket-path", sock, "--queue-size", "128"], env=env, log=log)
    try:
        wait_stats(endpoints(sock)[1], proc, log)
        with Frontend(sock, queue_size=256) as fe:
            with pytest.raises(FrontendError) as exc:
                fe.negotiate()
            assert exc.value.request == P.Request.SET_VRING_NUM
        with Frontend(sock, queue_size=128) as fe:
            fe.negotiate()
    finally:
        stop(proc)
    assert "above the back-end's limit 128" in open(log).read()


def test_device_refuses_vring_num_above_limit():
    from shardvu.device import Device
    with pytest.raises(ValueError):
        Device(2, max_queue_size=0)
    assert Device(2).max_queue_size == P.VIRTQUEUE_MAX_SIZE


# -- startup errors and logging -------------------------------------------------------

@needs_net
@pytest.mark.parametrize("argv, words", [
    (["--socket-path", "/nonexistent-dir/vu.sock"], "directory /nonexistent-dir does not exist"),
    (["--socket-path", "X", "--queues", "zero"], "--queues"),
    (["--socket-path", "X", "--log-level", "loud"], "invalid log level 'loud'"),
    (["--socket-path", "X", "--log-format", "xml"], "invalid log format 'xml'"),
    (["--socket-path", "X", "--port", "nosuchmodule:fn"], "cannot load port"),
    (["--socket-path", "X", "--socket-mode", "rwx"], "octal"),
    (["--socket-path", "X", "--socket-group", "no-such-group-shardvu"], "no such group"),
    (["--socket-path", "X", "--name", "../x"], "invalid instance name"),
    (["--socket-path", "X", "--queue-size", "100"], "power of two"),
    (["--socket-path", "X", "--bogus"], "unrecognized arguments"),
    ([], "--socket-path PATH or --fd N is required"),
])
def test_startup_errors_are_one_line(tmp_path, argv, words):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    out = subprocess.run([NET, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@needs_net
def test_metrics_port_in_use_is_one_line(tmp_path, env):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        out = subprocess.run([NET, "--socket-path", str(tmp_path / "vu.sock"), "--log-level", "ERROR",
                              "--metrics", f"127.0.0.1:{busy.getsockname()[1]}"],
                             capture_output=True, text=True, timeout=60, env=env)
    finally:
        busy.close()
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "cannot serve metrics" in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "vu.sock")


@needs_net
def test_json_logs_from_control_and_workers(tmp_path, env):
    sock = str(tmp_path / "vu.sock")
    log = str(tmp_path / "net.log")
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))     # the worker imports ops_port
    proc = start([NET, "--socket-path", sock, "--log-format", "json", "--log-level", "DEBUG",
                  "--port", "ops_port:logging_loopback"], env=env, log=log)
    try:
        wait_stats(endpoints(sock)[1], proc, log)
        with Frontend(sock) as fe:
            loop_one_frame(fe)
    finally:
        stop(proc)
    records = [json.loads(line) for line in open(log) if line.strip()]
    assert records, "nothing logged"
    for r in records:
        assert {"time", "level", "logger", "process", "pid", "message"} <= set(r)
    roles = {r["process"] for r in records}
    assert "control" in roles, roles
    port = [r for r in records if r["logger"] == "shardvu.tests.ops_port"]
    assert port and port[0]["process"] == "worker1" and port[0]["level"] == "WARNING", roles


def test_logsetup_contract(monkeypatch):
    import io
    import logging
    from shardvu import logsetup
    monkeypatch.delenv("SHARDVU_LOG_LEVEL", raising=False)
    monkeypatch.delenv("SHARDVU_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        buf = io.StringIO()
        logsetup.setup("debug", "json", role="worker7", stream=buf)
        logging.getLogger("shardvu.x").info("hello %d", 5)
        rec = json.loads(buf.getvalue())
        assert rec["message"] == "hello 5" and rec["process"] == "worker7" and rec["level"] == "INFO"
        assert os.environ["SHARDVU_LOG_FORMAT"] == "json"     # inherited by children
        buf = io.StringIO()
        logsetup.setup(role="worker8", stream=buf)               # from the environment
        logging.getLogger("shardvu.x").debug("again")
        assert json.loads(buf.getvalue())["process"] == "worker8"
        with pytest.raises(ValueError):
            logsetup.setup("chatty")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_worker_log_setup_is_pypy_safe():
    """The workers import shardvu.logsetup: standard library only."""
    import ast
    import shardvu.logsetup as m
    tree = ast.parse(open(m.__file__).read())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"__future__", "json", "logging", "os", "sys", "time", "typing"}, mods
