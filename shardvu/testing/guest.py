"""A tiny Linux guest for testing shardvu against real QEMU.

:func:`build_guest` makes (and caches) a kernel + initramfs pair from three
Debian packages:

- ``linux-image-amd64`` — the kernel and its virtio / pktgen modules.  An
  installed kernel (``/boot/vmlinuz-V`` with ``/lib/modules/V``) is used if
  there is one; otherwise the package is fetched with ``apt-get download``
  and unpacked with ``dpkg-deb`` into the build directory (nothing is
  installed into ``/boot``).
- ``busybox-static`` — ``/bin/busybox`` and its applets.
- ``qemu-system-x86`` — not needed to build, only to run (:mod:`shardvu.testing.qemu`).

The initramfs is written here in Python (newc cpio, gzip): busybox, the
modules (decompressed if the package ships them compressed), ``/dev/console``
and an ``/init`` script.  The kernel command line chooses what the guest does:

``shardvu.mode=pktgen``
    Every vCPU's pktgen thread sends ``shardvu.count`` frames (default 1000;
    0 = until stopped) on its own TX queue (``eth0@<cpu>`` bound to
    ``kpktgend_<cpu>``, ``queue_map_min = queue_map_max = <cpu>``), over
    ``min(vCPUs, TX queues)`` queues.  ``shardvu.rounds=K`` repeats that K
    times (0 = forever; a round also ends when the carrier drops, and the
    next one waits for it to come back).  Then the guest waits until its
    rx_packets holds still for ``shardvu.settle`` seconds (default 1.0) and
    reports.
``shardvu.mode=count``
    Brings eth0 up and counts what it receives: for ``shardvu.time``
    seconds, or with ``shardvu.until=linkdown`` until the carrier drops (the
    host stops the back-end's rings with QMP ``set_link``), then until
    rx_packets holds still for ``shardvu.settle`` seconds.
``shardvu.mode=ping``
    ``ip addr add shardvu.ip`` (default 10.0.0.1/24), optionally a permanent
    neighbour ``shardvu.peer`` → ``shardvu.peermac``, says ``pinging``, and
    ``ping -c shardvu.count -i shardvu.interval shardvu.peer`` (default 1 s);
    reports ``ping`` with ``seqs`` (``s`` + the answered sequence numbers,
    comma separated) and ``carrier_changes`` (the link's transitions during
    the pings: 0 = it never went down).
``shardvu.mode=tcp``
    ``ip addr add shardvu.ip``, reports the virtio features and ``ping
    -c shardvu.count shardvu.peer`` (``ping`` with ``avg_ms``); then
    ``shardvu.mb`` MiB of random data to the peer over ``shardvu.flows``
    TCP connections (busybox nc; flow *i* carries part *i* to port
    ``shardvu.port`` + *i*, pinned to vCPU *i*), reported as ``sum dir=out
    md5=...``; then ``listening`` on ports ``shardvu.rport`` + *i*, the
    parts concatenated in order reported as ``sum dir=in md5=...``.
``shardvu.mode=up``
    Brings eth0 up, says ``ready`` and stays up.

Other parameters: ``shardvu.size`` (pktgen frame size, default 60),
``shardvu.delay`` (pktgen ns between frames, default 0), ``shardvu.dstmac``
(default broadcast), ``shardvu.queues`` (pktgen over this many queues).

Everything the guest reports is a serial-console line
``SHARDVU <event> key=value ...``; it ends with ``SHARDVU done`` and powers
off.  Events: ``boot``, ``ready`` (cpus, txq, rxq, mac), ``pktgen`` (one per
queue per round: cpu, round, sent, errors, pps), ``round``, ``stats``
(tx_packets, rx_packets, tx_dropped, rx_dropped, ...), ``ping``, ``error``.

``python3 -m shardvu.testing.guest build [--force]`` builds it and prints the paths.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

__all__ = ["build_guest", "have_guest_tools", "guest_dir", "MODULES", "INIT_SCRIPT"]

#: Load order (each one's dependencies before it).
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net", "pktgen"]

BUSYBOX = "/bin/busybox"
KERNEL_PACKAGE = "linux-image-amd64"

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "SHARDVU $*"; }
finish() { say done; sync; poweroff -f; sleep 10; }
fail() { say error "reason=$*"; finish; }

P_mode=up; P_count=1000; P_rounds=1; P_settle=1.0; P_size=60; P_delay=0
P_dstmac=ff:ff:ff:ff:ff:ff; P_time=5; P_until=time; P_timeout=120
P_ip=10.0.0.1/24; P_peer=10.0.0.2; P_peermac=; P_queues=0; P_sizestep=0
P_mb=50; P_flows=4; P_port=5001; P_rport=5101; P_interval=1
for a in $(cat /proc/cmdline); do
    case "$a" in
        shardvu.*=*)
            k=${a#shardvu.}; k=${k%%=*}; v=${a#*=}
            case "$k" in *[!a-z_]*|'') continue ;; esac
            eval "P_$k=\$v" ;;
    esac
done
say boot mode=$P_mode kernel=$(uname -r)

for m in __MODULES__; do
    if [ -f /lib/modules/$m.ko ]; then
        insmod /lib/modules/$m.ko || say error reason=insmod module=$m
    fi
done

N=/sys/class/net/eth0
i=0
while [ ! -d $N ]; do
    i=$((i + 1)); [ $i -gt 200 ] && fail no_eth0
    sleep 0.05
done

stat_of() { cat $N/statistics/$1; }
report() {
    say stats tx_packets=$(stat_of tx_packets) rx_packets=$(stat_of rx_packets) \
        tx_dropped=$(stat_of tx_dropped) rx_dropped=$(stat_of rx_dropped) \
        tx_errors=$(stat_of tx_errors) rx_errors=$(stat_of rx_errors) \
        rx_length_errors=$(stat_of rx_length_errors) carrier=$(cat $N/carrier 2>/dev/null) "$@"
}
carrier() { [ "$(cat $N/carrier 2>/dev/null)" = 1 ]; }
wait_carrier() {    # $1: 1 (up) or 0 (down); gives up after P_timeout s
    i=0
    while [ "$(cat $N/carrier 2>/dev/null)" != "$1" ]; do
        i=$((i + 1)); [ $i -gt $((P_timeout * 20)) ] && return 1
        sleep 0.05
    done
    return 0
}
settle_rx() {       # until rx_packets holds still for P_settle seconds
    last=-1
    while :; do
        now=$(stat_of rx_packets)
        [ "$now" = "$last" ] && break
        last=$now
        sleep $P_settle
    done
}

ncpu=$(grep -c ^processor /proc/cpuinfo)
ntx=$(ls -d $N/queues/tx-* | wc -l)
nrx=$(ls -d $N/queues/rx-* | wc -l)
ip link set lo up
ip link set eth0 up || fail link_up
wait_carrier 1 || fail no_carrier
say ready cpus=$ncpu txq=$ntx rxq=$nrx mac=$(cat $N/address)

pg() { echo "$2" > "$1"; }
pktgen_setup() {
    P=/proc/net/pktgen
    [ -d $P ] || fail no_pktgen
    nq=$ncpu; [ $ntx -lt $nq ] && nq=$ntx
    [ "$P_queues" -gt 0 ] && [ "$P_queues" -lt $nq ] && nq=$P_queues
    c=0
    while [ $c -lt $ncpu ]; do pg $P/kpktgend_$c rem_device_all; c=$((c + 1)); done
    c=0
    while [ $c -lt $nq ]; do
        pg $P/kpktgend_$c "add_device eth0@$c"
        D=$P/eth0@$c
        pg $D "count $P_count"
        pg $D "clone_skb 0"
        pg $D "burst 1"
        pg $D "pkt_size $((P_size + c * P_sizestep))"
        pg $D "delay $P_delay"
        pg $D "dst 10.255.255.254"
        pg $D "dst_mac $P_dstmac"
        pg $D "queue_map_min $c"
        pg $D "queue_map_max $c"
        # Without QUEUE_MAP_CPU pktgen steps its queue up from 0 to min (one
        # frame on each queue 1..c-1 first); kpktgend_<c> runs on cpu c.
        pg $D "flag QUEUE_MAP_CPU"
        c=$((c + 1))
    done
}
pktgen_report() {   # $1: round
    c=0
    while [ $c -lt $nq ]; do
        D=/proc/net/pktgen/eth0@$c
        sent=$(sed -n 's/.*pkts-sofar: *\([0-9]*\).*/\1/p' $D)
        err=$(sed -n 's/.*pkts-sofar: *[0-9]* *errors: *\([0-9]*\).*/\1/p' $D)
        pps=$(sed -n 's/^ *\([0-9]*\)pps.*/\1/p' $D)
        say pktgen cpu=$c round=$1 sent=$sent errors=$err pps=${pps:-0}
        c=$((c + 1))
    done
}

case "$P_mode" in
pktgen)
    pktgen_setup
    say pktgen_setup queues=$nq count=$P_count
    r=0
    while [ "$P_rounds" = 0 ] || [ $r -lt "$P_rounds" ]; do
        r=$((r + 1))
        carrier || wait_carrier 1 || fail no_carrier
        pg /proc/net/pktgen/pgctrl start
        pktgen_report $r
        say round n=$r carrier=$(cat $N/carrier)
    done
    settle_rx
    report queues=$nq
    ;;
count)
    if [ "$P_until" = linkdown ]; then
        wait_carrier 0 || say error reason=carrier_stayed_up
    else
        sleep $P_time
    fi
    settle_rx
    report
    ;;
ping)
    ip addr add $P_ip dev eth0
    [ -n "$P_peermac" ] && ip neigh add $P_peer lladdr $P_peermac dev eth0 nud permanent
    cc0=$(cat $N/carrier_changes)
    say pinging count=$P_count interval=$P_interval
    out=$(ping -c $P_count -i $P_interval -W 2 $P_peer 2>&1)
    tx=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    rx=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    seqs=$(echo "$out" | sed -n 's/.* seq=\([0-9]*\) .*/\1/p' | tr '\n' ',')
    say ping transmitted=${tx:-0} received=${rx:-0} seqs=s${seqs%,} \
        carrier_changes=$(($(cat $N/carrier_changes) - cc0))
    report
    ;;
tcp)
    ip addr add $P_ip dev eth0
    say features virtio=v$(cat /sys/bus/virtio/devices/virtio*/features 2>/dev/null | head -1) \
        mtu=$(cat $N/mtu)
    out=$(ping -c $P_count -W 2 $P_peer 2>&1)
    tx=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    rx=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    rtt=$(echo "$out" | sed -n 's/.*= [0-9.]*\/\([0-9.]*\)\/.*/\1/p')
    rtts=$(echo "$out" | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | tr '\n' ',')
    say ping transmitted=${tx:-0} received=${rx:-0} avg_ms=${rtt:-0} rtts_ms=r${rtts%,}
    # guest -> host: P_mb MiB of random data, P_flows connections, flow i
    # carries part i on port P_port+i from vCPU i % ncpu
    per=$((P_mb / P_flows))
    dd if=/dev/urandom of=/tmp/out bs=1M count=$((per * P_flows)) 2>/dev/null
    say sum dir=out md5=$(md5sum /tmp/out | cut -d' ' -f1) bytes=$(stat -c %s /tmp/out)
    i=0
    while [ $i -lt $P_flows ]; do
        dd if=/tmp/out bs=1M skip=$((i * per)) count=$per 2>/dev/null | \
            taskset -c $((i % ncpu)) nc $P_peer $((P_port + i)) >/dev/null &
        i=$((i + 1))
    done
    wait
    rm -f /tmp/out
    say sent
    # host -> guest: the host sends part i on port P_rport+i
    i=0
    while [ $i -lt $P_flows ]; do
        taskset -c $((i % ncpu)) nc -l -p $((P_rport + i)) > /tmp/in$i &
        i=$((i + 1))
    done
    sleep 1
    say listening
    wait
    i=0
    while [ $i -lt $P_flows ]; do cat /tmp/in$i; i=$((i + 1)); done > /tmp/in
    say sum dir=in md5=$(md5sum /tmp/in | cut -d' ' -f1) bytes=$(stat -c %s /tmp/in)
    report
    ;;
up)
    while :; do sleep 3600; done
    ;;
*)
    say error reason=unknown_mode mode=$P_mode
    ;;
esac
finish
"""


def _repo_root() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return here if os.path.exists(os.path.join(here, "pyproject.toml")) else None


def guest_dir() -> str:
    """``$SHARDVU_GUEST_DIR``, else ``<repo>/build/guest`` (an editable
    install), else ``~/.cache/shardvu/guest``."""
    env = os.environ.get("SHARDVU_GUEST_DIR")
    if env:
        return os.path.abspath(env)
    root = _repo_root()
    if root is not None:
        return os.path.join(root, "build", "guest")
    return os.path.join(os.path.expanduser("~"), ".cache", "shardvu", "guest")


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable with no PT_INTERP (statically linked)."""
    import struct
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:      # ELFCLASS64 only
                return False
            e_phoff, = struct.unpack_from("<Q", ident, 32)
            e_phentsize, e_phnum = struct.unpack_from("<HH", ident, 54)
            f.seek(e_phoff)
            table = f.read(e_phentsize * e_phnum)
    except OSError:
        return False
    for i in range(e_phnum):
        if struct.unpack_from("<I", table, i * e_phentsize)[0] == 3:   # PT_INTERP
            return False
    return True


def _installed_kernel() -> Optional[Tuple[str, str]]:
    """(vmlinuz, modules dir) of an installed kernel that has virtio_net as a
    module, newest first."""
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        ver = os.path.basename(vmlinuz)[len("vmlinuz-"):]
        mods = f"/lib/modules/{ver}"
        if os.access(vmlinuz, os.R_OK) and _find_module(mods, "virtio_net"):
            return vmlinuz, mods
    return None


def _find_module(moddir: str, name: str) -> Optional[str]:
    kernel = os.path.join(moddir, "kernel")
    if not os.path.isdir(kernel):
        return None
    wanted = {name + ext for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz")}
    wanted |= {n.replace("_", "-") for n in wanted}
    for dirpath, _dirs, files in os.walk(kernel):
        for f in files:
            if f in wanted:
                return os.path.join(dirpath, f)
    return None


def _builtin_modules(moddir: str) -> set:
    try:
        with open(os.path.join(moddir, "modules.builtin")) as f:
            return {os.path.basename(l.strip()).split(".ko")[0].replace("-", "_") for l in f}
    except OSError:
        return set()


def _apt_kernel_package() -> Optional[str]:
    """The real package behind linux-image-amd64 (e.g.
    linux-image-6.1.0-56-amd64), per the local apt cache; None if unknown."""
    if not (shutil.which("apt-cache") and shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    try:
        out = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip().strip("<>")
    return None


def have_guest_tools() -> Tuple[bool, str]:
    """Whether :func:`build_guest` can work here, and if not why (for a
    pytest skip reason)."""
    if _cached(guest_dir()) is not None:
        return True, "cached guest"
    if not os.path.exists(BUSYBOX):
        return False, f"{BUSYBOX} missing (apt-get install busybox-static)"
    if not _is_static_elf(BUSYBOX):
        return False, f"{BUSYBOX} is not statically linked (apt-get install busybox-static)"
    if _installed_kernel() is not None:
        return True, "installed kernel"
    if _extracted_kernel(guest_dir()) is not None:
        return True, "extracted kernel"
    if _apt_kernel_package() is not None:
        return True, "kernel via apt-get download"
    return False, (f"no guest kernel: install {KERNEL_PACKAGE} (or make apt-get download "
                   f"{KERNEL_PACKAGE} work)")


# -- the kernel ---------------------------------------------------------------

def _extracted_kernel(build: str) -> Optional[Tuple[str, str]]:
    root = os.path.join(build, "kernel-pkg")
    for vmlinuz in sorted(glob.glob(os.path.join(root, "boot", "vmlinuz-*")), reverse=True):
        ver = os.path.basename(vmlinuz)[len("vmlinuz-"):]
        mods = os.path.join(root, "lib", "modules", ver)
        if _find_module(mods, "virtio_net"):
            return vmlinuz, mods
    return None


def _download_kernel(build: str) -> Tuple[str, str]:
    pkg = _apt_kernel_package()
    if pkg is None:
        raise RuntimeError(f"cannot resolve {KERNEL_PACKAGE} with apt-cache "
                           "(run apt-get update, or install the package)")
    dl = tempfile.mkdtemp(prefix="kernel-dl-", dir=build)
    try:
        # apt drops privileges to _apt when it can; a private dir it cannot
        # write only costs a warning.
        r = subprocess.run(["apt-get", "download", pkg], cwd=dl, capture_output=True,
                           text=True, timeout=600)
        debs = glob.glob(os.path.join(dl, "*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {pkg} failed:\n{r.stderr}")
        root = os.path.join(build, "kernel-pkg")
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        # Only the kernel and the modules we need: list, then extract.
        listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", debs[0]], capture_output=True,
                                 check=True, timeout=600).stdout
        import tarfile
        with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
            names = {m.replace("-", "_") for m in MODULES}
            members = []
            for m in tar.getmembers():
                base = os.path.basename(m.name)
                stem = base.split(".ko")[0].replace("-", "_")
                if (m.name.startswith("./boot/vmlinuz-") or base in ("modules.builtin",)
                        or (".ko" in base and stem in names)):
                    if m.isfile():
                        members.append(m)
            for m in members:
                m.name = os.path.normpath(m.name)
                if m.name.startswith(("/", "..")):
                    continue
                tar.extract(m, root, set_attrs=False)
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    got = _extracted_kernel(build)
    if got is None:
        raise RuntimeError(f"{pkg} has no vmlinuz / virtio_net.ko")
    return got


def _kernel(build: str) -> Tuple[str, str]:
    return _installed_kernel() or _extracted_kernel(build) or _download_kernel(build)


def _read_module(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        try:
            import zstandard  # type: ignore
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
        except ImportError:
            pass
        if not shutil.which("zstd"):
            raise RuntimeError(f"{path}: zstd-compressed and neither zstd nor python zstandard here")
        return subprocess.run(["zstd", "-dc", path], capture_output=True, check=True).stdout
    return data


# -- the initramfs --------------------------------------------------------------

class _Cpio:
    """A newc ("070701") cpio archive, built in memory."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink=1) -> None:
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0))
        self.ino += 1
        out = self.buf
        out.write(hdr.encode() + nameb)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def _init_script() -> str:
    return INIT_SCRIPT.replace("__MODULES__", " ".join(MODULES))


def _make_initramfs(moddir: str) -> bytes:
    builtin = _builtin_modules(moddir)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    with open(BUSYBOX, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name in MODULES:
        path = _find_module(moddir, name)
        if path is None:
            if name in builtin:
                continue
            raise RuntimeError(f"module {name} not found under {moddir} and not built in")
        cpio.file(f"lib/modules/{name}.ko", _read_module(path))
    cpio.file("init", _init_script().encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def _stamp(vmlinuz: str, moddir: str) -> dict:
    st = os.stat(BUSYBOX)
    return {"kernel": os.path.abspath(vmlinuz), "kernel_size": os.path.getsize(vmlinuz),
            "modules": os.path.abspath(moddir), "busybox_size": st.st_size,
            "busybox_mtime": int(st.st_mtime), "modules_list": MODULES,
            "init": hashlib.sha256(_init_script().encode()).hexdigest()}


def _cached(build: str) -> Optional[Tuple[str, str]]:
    k, i = os.path.join(build, "vmlinuz"), os.path.join(build, "initramfs.cpio.gz")
    try:
        with open(os.path.join(build, "stamp.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    if not (os.path.exists(k) and os.path.exists(i)):
        return None
    if old.get("init") != hashlib.sha256(_init_script().encode()).hexdigest():
        return None
    if old.get("modules_list") != MODULES:
        return None
    return k, i


def build_guest(force: bool = False, build_dir: Optional[str] = None) -> Tuple[str, str]:
    """``(kernel_path, initramfs_path)``, built into ``build_dir`` (default
    :func:`guest_dir`) unless an up-to-date pair is already there."""
    build = os.path.abspath(build_dir or guest_dir())
    os.makedirs(build, exist_ok=True)
    if not force:
        got = _cached(build)
        if got is not None:
            return got
    if not _is_static_elf(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} missing or not static: apt-get install busybox-static")
    vmlinuz, moddir = _kernel(build)
    image = _make_initramfs(moddir)
    k, i = os.path.join(build, "vmlinuz"), os.path.join(build, "initramfs.cpio.gz")
    for path, data in ((k, None), (i, image)):
        tmp = path + ".tmp"
        if data is None:
            shutil.copyfile(vmlinuz, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        os.replace(tmp, path)
    with open(os.path.join(build, "stamp.json"), "w") as f:
        json.dump(_stamp(vmlinuz, moddir), f, indent=1)
    return k, i


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python3 -m shardvu.testing.guest",
                                 description="Build the test guest (kernel + initramfs).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the guest; prints the two paths")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--dir", help=f"build directory (default {guest_dir()})")
    sub.add_parser("check", help="say whether the guest can be built here")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        ok, why = have_guest_tools()
        print(("ok: " if ok else "missing: ") + why)
        return 0 if ok else 1
    try:
        k, i = build_guest(force=args.force, build_dir=args.dir)
    except RuntimeError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"kernel    {k}\ninitramfs {i}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
