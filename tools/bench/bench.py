#!/usr/bin/env python3
"""tandem side by side with qemu-nbd and QEMU's mirror, in one run, as ratios.

Called by tools/bench.sh (read its header for usage); stdlib only. Every process it
starts is recorded by PID and stopped on exit; every image lives in one temporary
directory that is removed on exit (images are sparse or removed as soon as a section
ends). Results are printed and appended to benches/RESULTS.md.

Sections (BENCH_ONLY selects, comma-separated; default all):
  qemu-nbd  qemu-nbd --cache=none and --cache=writeback          (matrix targets)
  mirror    qemu-storage-daemon + blockdev-mirror, write-blocking and background,
            cache.direct=on and off                                (matrix targets)
  tandem    tandem sync/async, buffered and --direct               (matrix targets)
  matrix    = qemu-nbd,mirror,tandem
  large     random 4 KiB writes QD32 over a whole 64 GiB sparse volume: tandem async
            vs qemu-nbd --cache=writeback, and tandem over a 1 GiB range of it
  initsync  initial sync of a 1 TiB sparse pair: time, secondary allocation, peak RSS
  wan       512 MiB of `tar cf - /usr/lib` through nbdcopy, async, 10 MB/s faultproxy
  resync    resync after an outage, rate vs min(disk, link)
  disk      bytes the disk wrote per byte a client wrote (seq 1 MiB QD16, BENCH_DISK_BYTES
            over a BENCH_SIZE volume), through a clean stop and a sync: qemu-nbd writeback,
            the QEMU mirror (buffered) and tandem sync/async (buffered)
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

# ------------------------------------------------------------------ configuration

ENV = os.environ
SHORT = ENV.get("BENCH_SHORT", "0") == "1"


def env_int(name, default):
    return int(ENV.get(name, str(default)))


def parse_size(text):
    text = str(text).strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def human(n):
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


CFG = {
    "seconds": env_int("BENCH_SECONDS", 2 if SHORT else 15),
    "ramp": env_int("BENCH_RAMP", 0 if SHORT else 3),
    "size": parse_size(ENV.get("BENCH_SIZE", "64M" if SHORT else "1G")),
    "large_size": parse_size(ENV.get("BENCH_LARGE_SIZE", "1G" if SHORT else "64G")),
    "large_range": parse_size(ENV.get("BENCH_LARGE_RANGE", "64M" if SHORT else "1G")),
    "large_seconds": env_int("BENCH_LARGE_SECONDS", 2 if SHORT else 30),
    # 1: the large pair's secondary is --seeded (hash compare instead of a full copy,
    # which at 134a6c6 allocated the whole secondary); 0 (default since the sparse
    # resync of issue 11): a full initial sync, which sends holes as zero chunks.
    "large_seeded": ENV.get("BENCH_LARGE_SEEDED", "0") == "1",
    # A second pair with this --al-extent-size runs the whole-volume job (random
    # writes over more than al-extents x 4 MiB activate an extent nearly per
    # write); empty: skipped.
    "large_extent": ENV.get("BENCH_LARGE_EXTENT", "64M"),
    "init_size": parse_size(ENV.get("BENCH_INIT_SIZE", "4G" if SHORT else "1T")),
    "init_timeout": env_int("BENCH_INIT_TIMEOUT", 60 if SHORT else 180),
    "alloc_guard": parse_size(ENV.get("BENCH_ALLOC_GUARD", "1G" if SHORT else "6G")),
    "wan_bytes": parse_size(ENV.get("BENCH_WAN_BYTES", "16M" if SHORT else "512M")),
    "wan_rate": env_int("BENCH_WAN_RATE", 2_000_000 if SHORT else 10_000_000),
    "wan_timeout": env_int("BENCH_WAN_TIMEOUT", 120 if SHORT else 600),
    "resync_bytes": parse_size(ENV.get("BENCH_RESYNC_BYTES", "16M" if SHORT else "512M")),
    "resync_link": env_int("BENCH_RESYNC_LINK", 20_000_000 if SHORT else 50_000_000),
    "resync_timeout": env_int("BENCH_RESYNC_TIMEOUT", 120 if SHORT else 300),
    "disk_bytes": parse_size(ENV.get("BENCH_DISK_BYTES", "256M" if SHORT else "4G")),
    "sync_timeout": env_int("BENCH_SYNC_TIMEOUT", 120 if SHORT else 300),
    "disk_free_min": parse_size(ENV.get("BENCH_DISK_FREE_MIN", "2G" if SHORT else "12G")),
    "tmpdir": ENV.get("BENCH_TMPDIR", "/var/tmp"),
    "results": ENV.get("BENCH_RESULTS"),
    "note": ENV.get("BENCH_NOTE", ""),
    "tandem": ENV["TANDEM_BIN"],
    "faultproxy": ENV["FAULTPROXY_BIN"],
    "repo": ENV["BENCH_REPO"],
    "command": ENV.get("BENCH_COMMAND", "tools/bench.sh"),
}

ALL_SECTIONS = ["qemu-nbd", "mirror", "tandem", "large", "initsync", "wan", "resync", "disk"]
only = [s.strip() for s in ENV.get("BENCH_ONLY", "").split(",") if s.strip()]
if "matrix" in only:
    only = [s for s in only if s != "matrix"] + ["qemu-nbd", "mirror", "tandem"]
for s in only:
    if s not in ALL_SECTIONS:
        sys.exit(f"bench: unknown section {s!r} in BENCH_ONLY; use {','.join(ALL_SECTIONS)} or matrix")
SECTIONS = [s for s in ALL_SECTIONS if not only or s in only]

# The four fio jobs of the matrix: name -> (fio arguments, metric).
JOBS = {
    "randw32": (["--rw=randwrite", "--bs=4k", "--iodepth=32"], "IOPS"),
    "seq1m": (["--rw=write", "--bs=1M", "--iodepth=16"], "MB/s"),
    "randw1": (["--rw=randwrite", "--bs=4k", "--iodepth=1"], "p50/p99 µs"),
    "flush1": (["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "IOPS"),
}
# BENCH_JOBS: a subset of the jobs (comma-separated keys above), for an A/B of
# one job; tables and targets still list all four (ALL_JOBS), — for those not run.
only_jobs = [j.strip() for j in ENV.get("BENCH_JOBS", "").split(",") if j.strip()]
for j in only_jobs:
    if j not in JOBS:
        sys.exit(f"bench: unknown job {j!r} in BENCH_JOBS; use {','.join(JOBS)}")
ALL_JOBS = list(JOBS)  # tables and targets always show the four (— for a job not run)
if only_jobs:
    JOBS = {k: v for k, v in JOBS.items() if k in only_jobs}
JOB_TITLES = {
    "randw32": "randwrite 4 KiB QD32",
    "seq1m": "write 1 MiB seq QD16",
    "randw1": "randwrite 4 KiB QD1",
    "flush1": "write+flush 4 KiB QD1",
}

# ------------------------------------------------------------------ processes


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


PROCS = []  # every Popen we started, stopped at exit
COMMANDS = []  # (section, command line) recorded for RESULTS.md


WORK = {"dir": None}  # the temporary directory, shown as $WORK in recorded commands


def record(section, argv):
    line = " ".join(shlex.quote(str(a)) for a in argv)
    if WORK["dir"]:
        line = line.replace(WORK["dir"], "$WORK")
    if (section, line) not in COMMANDS:
        COMMANDS.append((section, line))


def start(argv, logfile, section=None):
    if section:
        record(section, argv)
    out = open(logfile, "ab")
    p = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    p.logfile = logfile
    PROCS.append(p)
    return p


def stop(p, timeout=40):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} did not stop within {timeout} s of SIGTERM; killing it")
            p.kill()
            p.wait()
    if p in PROCS:
        PROCS.remove(p)


def stop_all():
    for p in list(PROCS):
        try:
            stop(p, timeout=15)
        except Exception as e:  # keep stopping the others
            log(f"stopping pid {p.pid}: {e}")


def tail(path, n=8):
    try:
        return "\n".join(open(path, errors="replace").read().splitlines()[-n:])
    except OSError:
        return "(no log)"


def run(argv, section=None, timeout=None, check=True, **kw):
    if section:
        record(section, argv)
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise BenchError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what, interval=0.2, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited ({proc.returncode}): {tail(proc.logfile)}")
        time.sleep(interval)
    raise BenchError(f"{what}: not reached within {timeout} s")


def tcp_up(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def vm_hwm_bytes(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def allocated_bytes(path):
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def disk_free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_disk(what, need):
    free = disk_free(CFG["tmpdir"])
    if free < need:
        raise BenchError(f"{what}: only {human(free)} free in {CFG['tmpdir']}, need {human(need)}; skipped")
    log(f"{what}: {human(free)} free")


def sparse_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def prealloc_image(path, size):
    sparse_image(path, size)
    run(["fallocate", "-l", str(size), path])


def allocated_in(path):
    """Bytes allocated by every file under path (what the run holds on the disk)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def log_held(what):
    """After a target or section stops: what the work directory still holds (the
    smoke test checks that nothing but logs and certificates stays behind)."""
    log(f"{what}: stopped; the work directory holds {allocated_in(WORK['dir'])} bytes")


def rm(*paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass

# ------------------------------------------------------------------ fio


def fio(section, uri, job, size, seconds, ramp, out_json, extra=(), time_based=True):
    args = JOBS[job][0] if job in JOBS else []
    argv = ["fio", f"--name={job}", "--ioengine=nbd", f"--uri={uri}", *args, *extra,
            f"--size={size}", "--randrepeat=0"]
    if time_based:
        argv += ["--time_based", f"--runtime={seconds}", f"--ramp_time={ramp}"]
    argv += ["--output-format=json", f"--output={out_json}"]
    shown = [a for a in argv if not a.startswith("--output=")]
    record(section, [a.replace(uri, "nbd://HOST:PORT") for a in shown])
    r = run(argv, check=False, timeout=seconds + ramp + 600)
    if r.returncode != 0:
        raise BenchError(f"fio {job} on {uri} failed: {r.stderr.strip()[-600:]} {tail(out_json)}")
    text = open(out_json).read()
    j = json.loads(text[text.index("{"):])["jobs"][0]
    w = j["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {
        "iops": w["iops"],
        "mbps": w["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
    }


def job_value(job, r):
    if job == "seq1m":
        return r["mbps"]
    if job == "randw1":
        return r["p50_us"]
    return r["iops"]

# ------------------------------------------------------------------ tandem


class Tandem:
    """A tandem pair on loopback (optionally through a faultproxy)."""

    def __init__(self, work, certs, name, size, mode, direct=False, seeded=False,
                 proxy=False, prealloc=False, section=None, extra=()):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.pimg = os.path.join(self.dir, "primary.img")
        self.simg = os.path.join(self.dir, "secondary.img")
        self.size = size
        self.section = section
        for img in (self.pimg, self.simg):
            (prealloc_image if prealloc else sparse_image)(img, size)
        self.pctl = self.pimg + ".tandem.sock"
        self.sctl = self.simg + ".tandem.sock"
        rport = free_port()
        self.nport = free_port()
        common = ["--tls-dir", certs, "--size", str(size)] + (["--direct"] if direct else []) + list(extra)
        self.secondary = start([CFG["tandem"], "secondary", "--volume", self.simg,
                                "--listen", f"127.0.0.1:{rport}", *common] + (["--seeded"] if seeded else []),
                               os.path.join(self.dir, "secondary.log"), section)
        wait_for(lambda: self.status(self.sctl), 30, "tandem secondary control socket", proc=self.secondary)
        self.proxy = None
        peer_port = rport
        if proxy:
            pport = free_port()
            self.proxy_ctl = os.path.join(self.dir, "faultproxy.sock")
            self.proxy = start([CFG["faultproxy"], "--listen", f"127.0.0.1:{pport}",
                                "--upstream", f"127.0.0.1:{rport}", "--control", self.proxy_ctl,
                                "--seed", "1"], os.path.join(self.dir, "faultproxy.log"), section)
            wait_for(lambda: os.path.exists(self.proxy_ctl) and tcp_up(pport), 20, "faultproxy", proc=self.proxy)
            peer_port = pport
        self.primary = start([CFG["tandem"], "primary", "--volume", self.pimg, "--peer", f"127.0.0.1:{peer_port}",
                              "--nbd", f"127.0.0.1:{self.nport}", "--mode", mode, *common],
                             os.path.join(self.dir, "primary.log"), section)
        self.t_started = time.monotonic()
        wait_for(lambda: tcp_up(self.nport), 60, "tandem primary NBD export", proc=self.primary)
        self.uri = f"nbd://127.0.0.1:{self.nport}"

    @staticmethod
    def status(sock):
        try:
            r = subprocess.run([CFG["tandem"], "status", "--control", sock, "--json"],
                               capture_output=True, text=True, timeout=10)
            return json.loads(r.stdout) if r.returncode == 0 else None
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            return None

    def pstatus(self):
        return self.status(self.pctl)

    def in_sync(self, st=None):
        st = st or self.pstatus()
        if not st:
            return False
        peer = st.get("peer") or {}
        return (peer.get("connection") == "connected" and peer.get("disk_state") == "UpToDate"
                and st.get("out_of_sync_bytes") == 0 and st.get("resync") is None
                and (st.get("lag") or {}).get("bytes") == 0)

    def wait_in_sync(self, timeout, what="in sync"):
        return wait_for(self.in_sync, timeout, f"tandem {what}", interval=0.25, proc=self.primary)

    def settle(self, timeout=120):
        """Between jobs: wait for the async backlog (window, bitmap) to drain."""
        try:
            self.wait_in_sync(timeout, "settle")
        except BenchError as e:
            log(f"warning: {e}; continuing")

    def proxy_ctl_cmd(self, *args):
        return json.loads(run([CFG["faultproxy"], "ctl", "--control", self.proxy_ctl, *args],
                              section=self.section).stdout)

    def stop(self, remove=True):
        for p in (self.primary, self.secondary, self.proxy):
            if p is not None:
                stop(p)
        if not remove:
            return
        # The images and everything the agents made beside them: metadata, the
        # secondary's redo journal and the primary's spill log (1 GiB each,
        # preallocated); the logs stay until the run ends (kept on failure).
        for f in os.listdir(self.dir):
            if not f.endswith(".log"):
                path = os.path.join(self.dir, f)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    rm(path)

# ------------------------------------------------------------------ qemu


class QemuNbd:
    def __init__(self, work, name, size, cache, prealloc=True, section=None, img=None):
        self.img = img or os.path.join(work, f"{name}.img")
        if img is None:
            (prealloc_image if prealloc else sparse_image)(self.img, size)
        self.port = free_port()
        self.proc = start(["qemu-nbd", f"--cache={cache}", "--aio=io_uring", "--format=raw", "--persistent",
                           "--shared=16", "--bind", "127.0.0.1", "--port", self.port, self.img],
                          os.path.join(work, f"{name}.log"), section)
        wait_for(lambda: tcp_up(self.port), 20, "qemu-nbd", proc=self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}"

    def stop(self, remove=True):
        stop(self.proc)
        if remove:
            rm(self.img)


class Qmp:
    """QMP over a unix socket: JSON lines, qmp_capabilities first."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")
        greeting = json.loads(self.f.readline())
        assert "QMP" in greeting, greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "event" in msg:
                continue
            if "error" in msg:
                raise BenchError(f"QMP {name}: {msg['error']}")
            return msg["return"]

    def close(self):
        self.sock.close()


class Mirror:
    """qemu-storage-daemon exporting a raw node over NBD, mirrored with blockdev-mirror
    (sync=full) to an nbd blockdev served by qemu-nbd on the secondary image."""

    def __init__(self, work, name, size, copy_mode, direct, section):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.pimg = os.path.join(self.dir, "primary.img")
        self.simg = os.path.join(self.dir, "secondary.img")
        prealloc_image(self.pimg, size)
        prealloc_image(self.simg, size)
        self.secondary = QemuNbd(self.dir, "secondary-qemu-nbd", size, "none" if direct else "writeback",
                                 section=section, img=self.simg)
        self.port = free_port()
        qmp_path = os.path.join(self.dir, "qmp.sock")
        on = "on" if direct else "off"
        self.proc = start([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={self.pimg},cache.direct={on},aio=io_uring",
            "--blockdev", "driver=raw,node-name=src0,file=file0",
            "--blockdev", f"driver=nbd,node-name=tgt0,server.type=inet,server.host=127.0.0.1,"
                          f"server.port={self.secondary.port}",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}",
            "--export", "type=nbd,id=exp0,node-name=src0,name=exp,writable=on",
            "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
        ], os.path.join(self.dir, "qsd.log"), section)
        wait_for(lambda: os.path.exists(qmp_path) and tcp_up(self.port), 30, "qemu-storage-daemon", proc=self.proc)
        self.qmp = Qmp(qmp_path)
        self.qmp.cmd("blockdev-mirror", **{"job-id": "m0", "device": "src0", "target": "tgt0",
                                            "sync": "full", "copy-mode": copy_mode})
        record(section, ["QMP", "blockdev-mirror", json.dumps({"job-id": "m0", "device": "src0", "target": "tgt0",
                                                               "sync": "full", "copy-mode": copy_mode})])
        wait_for(self.ready, CFG["sync_timeout"], "mirror job ready", interval=0.2, proc=self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}/exp"

    def job(self):
        jobs = self.qmp.cmd("query-block-jobs")
        return jobs[0] if jobs else None

    def ready(self):
        j = self.job()
        if j is None:
            raise BenchError("mirror job vanished")
        return j.get("ready")

    def settle(self, timeout=120):
        """Wait until the job has nothing left to copy (background mode lags behind)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.job()
            if j and j.get("ready") and j["offset"] == j["len"] and not j.get("busy"):
                return
            time.sleep(0.25)
        log("warning: mirror job did not catch up; continuing")

    def stop(self, remove=True):
        try:
            self.qmp.cmd("block-job-cancel", device="m0", force=True)
        except Exception:
            pass
        self.qmp.close()
        stop(self.proc)
        self.secondary.stop(remove=False)
        if remove:
            rm(self.pimg, self.simg)

# ------------------------------------------------------------------ sections

RESULTS = {}  # matrix: target -> job -> fio dict
EXTRA = {}  # section -> dict of figures
ERRORS = {}  # section or target -> message

MATRIX_TARGETS = [
    # (name, section, description)
    ("qemu-nbd none", "qemu-nbd", "qemu-nbd --cache=none"),
    ("qemu-nbd writeback", "qemu-nbd", "qemu-nbd --cache=writeback"),
    ("mirror wb direct", "mirror", "QEMU mirror write-blocking, cache.direct=on"),
    ("mirror bg direct", "mirror", "QEMU mirror background, cache.direct=on"),
    ("mirror wb buffered", "mirror", "QEMU mirror write-blocking, cache.direct=off"),
    ("mirror bg buffered", "mirror", "QEMU mirror background, cache.direct=off"),
    ("tandem sync", "tandem", "tandem sync (buffered)"),
    ("tandem async", "tandem", "tandem async (buffered)"),
    ("tandem sync direct", "tandem", "tandem sync --direct"),
    ("tandem async direct", "tandem", "tandem async --direct"),
]


def start_matrix_target(work, certs, name, section):
    size = CFG["size"]
    slug = name.replace(" ", "-")
    if name.startswith("qemu-nbd"):
        return QemuNbd(work, slug, size, "none" if name.endswith("none") else "writeback", section=section)
    if name.startswith("mirror"):
        mode = "write-blocking" if " wb " in name else "background"
        return Mirror(work, slug, size, mode, name.endswith("direct"), section)
    mode = name.split()[1]  # "tandem sync ...", "tandem async ..."
    assert mode in ("sync", "async"), name
    t = Tandem(work, certs, slug, size, mode, direct=name.endswith("direct"), prealloc=True, section=section)
    t.wait_in_sync(CFG["sync_timeout"], "initial sync")
    return t


# BENCH_TARGETS: only the matrix targets named (comma-separated, exact names of
# MATRIX_TARGETS, e.g. "tandem sync,mirror wb buffered").
only_targets = [t.strip() for t in ENV.get("BENCH_TARGETS", "").split(",") if t.strip()]
for t in only_targets:
    if t not in [name for name, _, _ in MATRIX_TARGETS]:
        sys.exit(f"bench: unknown target {t!r} in BENCH_TARGETS; use {', '.join(n for n, _, _ in MATRIX_TARGETS)}")


def on_matrix_target(work, certs, name, section, label, error_key, body):
    """Start a matrix target and run `body(target)`; a failure (of the start or of
    the body) is recorded under `error_key` and logged; the target is stopped
    either way."""
    log(f"{label}: starting")
    target = None
    try:
        target = start_matrix_target(work, certs, name, section)
        body(target)
    except Exception as e:
        ERRORS[error_key] = str(e)
        log(f"{label}: FAILED: {e}")
        if ENV.get("BENCH_DEBUG"):
            traceback.print_exc()
    finally:
        if target is not None:
            try:
                target.stop()
            except Exception as e:
                log(f"{label}: stopping: {e}")


def run_matrix(work, certs):
    for name, section, _ in MATRIX_TARGETS:
        if section not in SECTIONS or (only_targets and name not in only_targets):
            continue
        def jobs(target, name=name, section=section):
            RESULTS[name] = {}
            for job in JOBS:
                if hasattr(target, "settle"):
                    target.settle()
                else:
                    os.sync()
                    time.sleep(1)
                r = fio(section, target.uri, job, CFG["size"], CFG["seconds"], CFG["ramp"],
                        os.path.join(work, f"{name.replace(' ', '-')}.{job}.json"))
                RESULTS[name][job] = r
                log(f"{name}: {job} iops={r['iops']:.0f} MB/s={r['mbps']:.1f} p50={r['p50_us']:.0f}µs")
        on_matrix_target(work, certs, name, section, name, name, jobs)
        log_held(name)


def run_large(work, certs):
    size, rng, secs = CFG["large_size"], CFG["large_range"], CFG["large_seconds"]
    sec = "large"
    ex = EXTRA.setdefault(sec, {"size": size, "range": rng})
    check_disk("large", CFG["disk_free_min"])
    q = QemuNbd(work, "large-qemu-nbd", size, "writeback", prealloc=False, section=sec)
    try:
        ex["qemu-nbd whole"] = fio(sec, q.uri, "large", size, secs, CFG["ramp"], os.path.join(work, "large-q.json"),
                                   extra=["--rw=randwrite", "--bs=4k", "--iodepth=32"])
        ex["qemu-nbd whole alloc"] = allocated_bytes(q.img)
    finally:
        q.stop()
    # A full initial sync (BENCH_LARGE_SEEDED=1: the secondary --seeded, hashes
    # compared): holes go as zero chunks, so the secondary stays thin. Only writes
    # are measured.
    t = Tandem(work, certs, "large-tandem", size, "async", seeded=CFG["large_seeded"], section=sec)
    try:
        t0 = time.monotonic()
        t.wait_in_sync(CFG["sync_timeout"] * 4, "large: initial sync")
        ex["initial sync s"] = time.monotonic() - t0
        for label, fsize in (("tandem whole", size), ("tandem range", rng)):
            t.settle(300)
            ex[label] = fio(sec, t.uri, "large", fsize, secs, CFG["ramp"],
                            os.path.join(work, f"large-{label.split()[1]}.json"),
                            extra=["--rw=randwrite", "--bs=4k", "--iodepth=32"])
            log(f"large: {label} iops={ex[label]['iops']:.0f} p99={ex[label]['p99_us']:.0f}µs")
        ex["secondary alloc"] = allocated_bytes(t.simg)
    finally:
        t.stop()
    if CFG["large_extent"]:
        ext = CFG["large_extent"]
        ex["extent"] = ext
        t = Tandem(work, certs, "large-tandem-extent", size, "async", section=sec,
                   extra=["--al-extent-size", ext])
        try:
            t.wait_in_sync(CFG["sync_timeout"] * 4, "large: initial sync (--al-extent-size)")
            t.settle(300)
            label = "tandem whole extent"
            ex[label] = fio(sec, t.uri, "large", size, secs, CFG["ramp"],
                            os.path.join(work, "large-whole-extent.json"),
                            extra=["--rw=randwrite", "--bs=4k", "--iodepth=32"])
            log(f"large: {label} {ext} iops={ex[label]['iops']:.0f} p99={ex[label]['p99_us']:.0f}µs")
        finally:
            t.stop()


def run_initsync(work, certs):
    size = CFG["init_size"]
    sec = "initsync"
    ex = EXTRA.setdefault(sec, {"size": size})
    check_disk("initsync", CFG["disk_free_min"])
    t = Tandem(work, certs, "initsync", size, "async", section=sec)
    peak = {"p": 0, "s": 0}
    try:
        t0 = t.t_started
        aborted = None
        last = None
        while True:
            st = t.pstatus()
            if st:
                last = st
            peak["p"] = max(peak["p"], vm_hwm_bytes(t.primary.pid) or 0)
            peak["s"] = max(peak["s"], vm_hwm_bytes(t.secondary.pid) or 0)
            if st and t.in_sync(st):
                break
            elapsed = time.monotonic() - t0
            alloc = allocated_bytes(t.simg)
            if alloc > CFG["alloc_guard"]:
                aborted = f"secondary allocated {human(alloc)} (> guard {human(CFG['alloc_guard'])})"
            elif elapsed > CFG["init_timeout"]:
                aborted = f"not in sync after {CFG['init_timeout']} s"
            if aborted:
                break
            if t.primary.poll() is not None or t.secondary.poll() is not None:
                raise BenchError(f"an agent exited during the initial sync: {tail(t.primary.logfile)}")
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        ex["seconds"] = elapsed
        ex["aborted"] = aborted
        ex["secondary alloc"] = allocated_bytes(t.simg)
        ex["primary alloc"] = allocated_bytes(t.pimg)
        ex["rss primary"] = peak["p"]
        ex["rss secondary"] = peak["s"]
        rs = (last or {}).get("resync") or {}
        ex["done bytes"] = rs.get("done_bytes", size if not aborted else 0)
        if aborted and ex["done bytes"]:
            ex["projected seconds"] = elapsed * size / ex["done bytes"]
            ex["projected alloc"] = ex["secondary alloc"] * size / ex["done bytes"]
        log(f"initsync: {elapsed:.1f} s aborted={aborted} alloc={human(ex['secondary alloc'])} "
            f"rss p={human(peak['p'])} s={human(peak['s'])}")
    finally:
        t.stop()


def make_tar(path, nbytes):
    with open(path, "wb") as out:
        p = subprocess.Popen(["tar", "cf", "-", "/usr/lib"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        left = nbytes
        while left > 0:
            chunk = p.stdout.read(min(left, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
        p.kill()
        p.wait()
    return os.path.getsize(path)


def run_wan(work, certs):
    sec = "wan"
    ex = EXTRA.setdefault(sec, {"rate": CFG["wan_rate"]})
    tar = os.path.join(work, "usr-lib.tar")
    n = make_tar(tar, CFG["wan_bytes"])
    record(sec, ["tar", "cf", "-", "/usr/lib", "|", "head", "-c", str(CFG["wan_bytes"]), ">", "usr-lib.tar"])
    size = max(CFG["wan_bytes"] * 2, 64 << 20)
    t = Tandem(work, certs, "wan", size, "async", proxy=True, section=sec)
    try:
        t.wait_in_sync(CFG["sync_timeout"], "wan: initial sync")
        t.proxy_ctl_cmd("set", "throttle", "--bytes-per-s", str(CFG["wan_rate"]))
        before = t.proxy_ctl_cmd("stats")["stats"]
        c0 = (t.pstatus() or {}).get("counters", {})
        t0 = time.monotonic()
        run(["nbdcopy", tar, t.uri], section=sec, timeout=CFG["wan_timeout"])
        ex["nbdcopy s"] = time.monotonic() - t0
        t.wait_in_sync(CFG["wan_timeout"], "wan: in sync after the copy")
        ex["seconds"] = time.monotonic() - t0
        after = t.proxy_ctl_cmd("stats")["stats"]
        c1 = (t.pstatus() or {}).get("counters", {})
        ex["bytes"] = n
        ex["wire bytes"] = after["bytes_up"] - before["bytes_up"]
        ex["replicated bytes"] = c1.get("replicated_bytes", 0) - c0.get("replicated_bytes", 0)
        ex["replicated wire bytes"] = c1.get("replicated_wire_bytes", 0) - c0.get("replicated_wire_bytes", 0)
        ex["effective rate"] = n / ex["seconds"]
        ex["multiple"] = ex["effective rate"] / CFG["wan_rate"]
        # Check the copy: the secondary must hold the tar after convergence.
        log(f"wan: {ex['seconds']:.1f} s, {human(ex['wire bytes'])} on the wire, {ex['multiple']:.2f}x link")
    finally:
        t.stop()
        rm(tar)


def disk_rate(work, sec):
    """min(sequential read, sequential write) of this disk with O_DIRECT, 1 MiB."""
    path = os.path.join(work, "disk-rate.img")
    secs = 2 if SHORT else 4
    rates = {}
    try:
        for rw in ("write", "read"):
            out = os.path.join(work, f"disk-{rw}.json")
            argv = ["fio", f"--name=disk-{rw}", "--ioengine=psync", "--direct=1", f"--rw={rw}", "--bs=1M",
                    f"--filename={path}", "--size=1G" if not SHORT else "--size=128M", "--time_based",
                    f"--runtime={secs}", "--output-format=json", f"--output={out}"]
            run(argv, section=sec)
            j = json.loads(open(out).read())["jobs"][0]
            rates[rw] = j[rw]["bw_bytes"]
    finally:
        rm(path)
    return min(rates.values()), rates


def run_resync(work, certs):
    sec = "resync"
    link = CFG["resync_link"]
    ex = EXTRA.setdefault(sec, {"link": link})
    disk, rates = disk_rate(work, sec)
    ex["disk"] = disk
    ex["disk rates"] = rates
    size = max(CFG["resync_bytes"] * 2, 64 << 20)
    t = Tandem(work, certs, "resync", size, "async", proxy=True, section=sec)
    try:
        t.wait_in_sync(CFG["sync_timeout"], "resync: initial sync")
        t.proxy_ctl_cmd("set", "reset", "--reject-new")
        wait_for(lambda: ((t.pstatus() or {}).get("peer") or {}).get("connection") == "connecting", 60,
                 "resync: primary notices the outage")
        # Incompressible data, so the link (not zstd) sets the pace.
        fio(sec, t.uri, "outage-writes", CFG["resync_bytes"], 0, 0, os.path.join(work, "resync-fio.json"),
            extra=["--rw=write", "--bs=1M", "--iodepth=8", "--refill_buffers"], time_based=False)
        st = t.pstatus() or {}
        ex["dirty bytes"] = st.get("out_of_sync_bytes", 0)
        t.proxy_ctl_cmd("clear")
        t.proxy_ctl_cmd("set", "throttle", "--bytes-per-s", str(link))
        t0 = time.monotonic()
        started = wait_for(lambda: (t.pstatus() or {}).get("resync") and time.monotonic(), 120,
                           "resync: pass starts", interval=0.1)
        t.wait_in_sync(CFG["resync_timeout"], "resync: in sync")
        t1 = time.monotonic()
        ex["reconnect s"] = started - t0
        ex["pass s"] = t1 - started
        ex["seconds"] = t1 - t0
        ex["rate"] = ex["dirty bytes"] / max(ex["pass s"], 1e-6)
        ex["fraction"] = ex["rate"] / min(disk, link)
        log(f"resync: {human(ex['dirty bytes'])} in {ex['pass s']:.1f} s = {ex['rate'] / 1e6:.1f} MB/s "
            f"({ex['fraction']:.2f} of min(disk {disk / 1e6:.0f}, link {link / 1e6:.0f}) MB/s)")
    finally:
        t.stop()

# ------------------------------------------------------------------ report


def sectors_written(path):
    """Sectors the block device holding `path` has written (/proc/diskstats)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    for line in open("/proc/diskstats"):
        f = line.split()
        if int(f[0]) == major and int(f[1]) == minor:
            return int(f[9])
    raise BenchError(f"no /proc/diskstats line for device {major}:{minor} of {path}")


DISK_TARGETS = ["qemu-nbd writeback", "mirror wb buffered", "mirror bg buffered", "tandem sync", "tandem async"]


def run_disk(work, certs):
    """Write amplification: disk bytes written per client byte, from before the job
    to after the target settled, stopped cleanly (tandem's secondary copies its
    journal into the volume on a clean stop) and `sync` returned. Other processes on
    the machine add to the count: a rough figure, not a precise one."""
    nbytes = CFG["disk_bytes"]
    out = EXTRA.setdefault("disk", {"bytes": nbytes, "rows": {}})
    for name in DISK_TARGETS:
        if only_targets and name not in only_targets:
            continue
        def measure(target, name=name):
            os.sync()
            time.sleep(1)
            before = sectors_written(work)
            t0 = time.monotonic()
            fio("disk", target.uri, "seq1m", CFG["size"], 0, 0,
                os.path.join(work, f"disk-{name.replace(' ', '-')}.json"),
                extra=[f"--io_size={nbytes}"], time_based=False)
            t_fio = time.monotonic() - t0
            if hasattr(target, "settle"):
                target.settle(timeout=CFG["sync_timeout"])
            target.stop(remove=False)
            os.sync()
            t_all = time.monotonic() - t0
            written = (sectors_written(work) - before) * 512
            out["rows"][name] = {"fio s": t_fio, "durable s": t_all, "disk bytes": written}
            log(f"disk: {name}: {written / nbytes:.2f} disk bytes per client byte, fio {t_fio:.1f} s, "
                f"settled and synced {t_all:.1f} s")
        on_matrix_target(work, certs, name, "disk", f"disk: {name}", f"disk {name}", measure)


def fmt(v, job=None):
    if v is None:
        return "—"
    if job == "seq1m":
        return f"{v:.0f}"
    return f"{v:,.0f}"


def matrix_table():
    if not RESULTS and not any(t in ERRORS for t, _, _ in MATRIX_TARGETS):
        return []
    out = ["| target | randw 4k QD32 IOPS | seq 1M QD16 MB/s | QD1 p50 µs | QD1 p99 µs | write+flush QD1 IOPS |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, section, desc in MATRIX_TARGETS:
        if section not in SECTIONS:
            continue
        r = RESULTS.get(name, {})
        if name in ERRORS and not r:
            out.append(f"| {desc} | failed: {ERRORS[name][:120]} | | | | |")
            continue
        g = lambda job, key: r[job][key] if job in r else None  # noqa: E731
        out.append(f"| {desc} | {fmt(g('randw32', 'iops'))} | {fmt(g('seq1m', 'mbps'), 'seq1m')} | "
                   f"{fmt(g('randw1', 'p50_us'))} | {fmt(g('randw1', 'p99_us'))} | {fmt(g('flush1', 'iops'))} |")
    return out


def ratio(a, b, lower_better=False):
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets():
    """The issue's Targets, each (label, figure text, met: True/False/None)."""
    rows = []

    def val(target, job):
        r = RESULTS.get(target, {}).get(job)
        return job_value(job, r) if r else None

    pairs = [("buffered", "tandem sync", "mirror wb buffered"), ("direct", "tandem sync direct", "mirror wb direct")]
    for label, t, m in pairs:
        figs, met = [], True
        for job in ALL_JOBS:
            r = ratio(val(t, job), val(m, job))
            if r is None:
                met = None if met is not False else False
                figs.append(f"{job} —")
                continue
            ok = r <= 1.0 if job == "randw1" else r >= 1.0
            met = (met if met is not None else True) and ok if met is not False else False
            figs.append(f"{job} {r:.2f}x")
        rows.append((f"sync ≥ 1.0× write-blocking mirror, {label} (QD1 p50 ≤ 1.0×)", ", ".join(figs), met))
    pairs = [("buffered", "tandem async", "qemu-nbd writeback"), ("direct", "tandem async direct", "qemu-nbd none")]
    for label, t, q in pairs:
        figs, met = [], True
        for job in ("randw32", "seq1m"):
            r = ratio(val(t, job), val(q, job))
            if r is None:
                met = None
                figs.append(f"{job} —")
                continue
            met = met and r >= 0.7 if met is not None else None
            figs.append(f"{job} {r:.2f}x")
        rows.append((f"async ≥ 0.7× qemu-nbd, {label}", ", ".join(figs), met))
    lg = EXTRA.get("large", {})
    if "tandem whole" in lg and "tandem range" in lg:
        r1 = lg["tandem whole"]["iops"] / max(lg["tandem range"]["iops"], 1e-9)
        rows.append((f"{human(lg['size'])} whole ≥ 0.5× {human(lg['range'])} range",
                     f"{lg['tandem whole']['iops']:,.0f} vs {lg['tandem range']['iops']:,.0f} IOPS = {r1:.2f}x",
                     r1 >= 0.5))
    if "tandem whole" in lg and "qemu-nbd whole" in lg:
        r2 = lg["tandem whole"]["iops"] / max(lg["qemu-nbd whole"]["iops"], 1e-9)
        rows.append((f"{human(lg['size'])} whole ≥ 0.5× qemu-nbd writeback",
                     f"{lg['tandem whole']['iops']:,.0f} vs {lg['qemu-nbd whole']['iops']:,.0f} IOPS = {r2:.2f}x",
                     r2 >= 0.5))
    if "tandem whole extent" in lg and "qemu-nbd whole" in lg:
        r3 = lg["tandem whole extent"]["iops"] / max(lg["qemu-nbd whole"]["iops"], 1e-9)
        rows.append((f"{human(lg['size'])} whole, --al-extent-size {lg['extent']}, ≥ 0.5× qemu-nbd writeback",
                     f"{lg['tandem whole extent']['iops']:,.0f} vs {lg['qemu-nbd whole']['iops']:,.0f} IOPS = {r3:.2f}x",
                     r3 >= 0.5))
    ini = EXTRA.get("initsync", {})
    if "seconds" in ini:
        size = ini["size"]
        if ini["aborted"]:
            proj = ini.get("projected seconds")
            txt = f"aborted after {ini['seconds']:.0f} s ({ini['aborted']})" + \
                  (f"; projected {proj:.0f} s" if proj else "")
            rows.append((f"{human(size)} initial sync < 10 s", txt, False))
        else:
            rows.append((f"{human(size)} initial sync < 10 s", f"{ini['seconds']:.1f} s", ini["seconds"] < 10))
        frac = ini["secondary alloc"] / size
        txt = f"{human(ini['secondary alloc'])} = {frac * 100:.2f}%"
        if ini.get("projected alloc"):
            txt += f" when stopped; projected {human(ini['projected alloc'])}"
        rows.append(("secondary allocation < 1%", txt,
                     frac < 0.01 and not (ini.get("projected alloc", 0) >= 0.01 * size)))
        bitmap = size // 4096 // 8
        limit = (64 << 20) + bitmap
        rows.append((f"peak RSS ≤ 64 MiB + bitmap ({human(bitmap)}) = {human(limit)}",
                     f"primary {human(ini['rss primary'])}, secondary {human(ini['rss secondary'])}"
                     + (" (when stopped)" if ini["aborted"] else ""),
                     max(ini["rss primary"], ini["rss secondary"]) <= limit and not ini["aborted"]
                     if not ini["aborted"] else (False if max(ini["rss primary"], ini["rss secondary"]) > limit
                                                  else None)))
    wan = EXTRA.get("wan", {})
    if "multiple" in wan:
        rows.append(("WAN ≥ 2.5× link rate", f"{wan['multiple']:.2f}x ({human(wan['bytes'])} in {wan['seconds']:.1f} s, "
                     f"{human(wan['wire bytes'])} on the wire, link {wan['rate'] / 1e6:.0f} MB/s)", wan["multiple"] >= 2.5))
    rs = EXTRA.get("resync", {})
    if "fraction" in rs:
        rows.append(("resync ≥ 90% of min(disk, link)",
                     f"{rs['rate'] / 1e6:.1f} MB/s = {rs['fraction'] * 100:.0f}% of min(disk {rs['disk'] / 1e6:.0f}, "
                     f"link {rs['link'] / 1e6:.0f}) MB/s", rs["fraction"] >= 0.9))
    for sec in ("large", "initsync", "wan", "resync"):
        if sec in ERRORS:
            rows.append((f"{sec}", f"failed: {ERRORS[sec][:200]}", False))
    return rows


def extra_lines():
    out = []
    lg = EXTRA.get("large", {})
    if lg.get("tandem whole"):
        out.append(f"- large: random 4 KiB writes QD32, {CFG['large_seconds']} s each: qemu-nbd writeback whole "
                   f"{human(lg['size'])} {lg.get('qemu-nbd whole', {}).get('iops', 0):,.0f} IOPS "
                   f"(p99 {lg.get('qemu-nbd whole', {}).get('p99_us', 0):,.0f} µs); tandem async whole "
                   f"{lg['tandem whole']['iops']:,.0f} IOPS (p99 {lg['tandem whole']['p99_us']:,.0f} µs); tandem async "
                   f"{human(lg['range'])} range {lg.get('tandem range', {}).get('iops', 0):,.0f} IOPS "
                   f"(p99 {lg.get('tandem range', {}).get('p99_us', 0):,.0f} µs). Initial sync "
                   f"({'secondary --seeded: hash compare' if CFG['large_seeded'] else 'full'}) took "
                   f"{lg.get('initial sync s', 0):.0f} s; secondary allocated {human(lg.get('secondary alloc', 0))}."
                   + (f" A second pair with --al-extent-size {lg['extent']}: whole "
                      f"{lg['tandem whole extent']['iops']:,.0f} IOPS (p99 {lg['tandem whole extent']['p99_us']:,.0f} µs)."
                      if lg.get("tandem whole extent") else ""))
    ini = EXTRA.get("initsync", {})
    if "seconds" in ini:
        out.append(f"- initsync: {human(ini['size'])} sparse pair, {ini['seconds']:.1f} s"
                   + (f" (stopped: {ini['aborted']}; {human(ini['done bytes'])} done)" if ini["aborted"] else "")
                   + f"; secondary allocated {human(ini['secondary alloc'])}; peak RSS primary "
                   f"{human(ini['rss primary'])}, secondary {human(ini['rss secondary'])}.")
    wan = EXTRA.get("wan", {})
    if "seconds" in wan:
        out.append(f"- wan: {human(wan['bytes'])} of /usr/lib tar, nbdcopy took {wan['nbdcopy s']:.1f} s, in sync after "
                   f"{wan['seconds']:.1f} s; {wan['wire bytes']:,} bytes up the proxy "
                   f"({wan['bytes'] / max(wan['wire bytes'], 1):.2f}:1 vs the data); tandem counted "
                   f"{wan['replicated bytes']:,} payload bytes, {wan['replicated wire bytes']:,} on the wire; "
                   f"effective {wan['effective rate'] / 1e6:.1f} MB/s over a {wan['rate'] / 1e6:.0f} MB/s link.")
    dk = EXTRA.get("disk", {})
    if dk.get("rows"):
        out.append(f"- disk: {human(dk['bytes'])} written seq 1 MiB QD16 over a {human(CFG['size'])} volume; disk bytes "
                   "written per client byte, through settling, a clean stop and sync (fio time / time until durable "
                   "and stopped):")
        for name, row in dk["rows"].items():
            out.append(f"  - {name}: {row['disk bytes'] / dk['bytes']:.2f} ({row['disk bytes'] / 2**30:.1f} GiB; "
                       f"{row['fio s']:.1f} s / {row['durable s']:.1f} s)")
    rs = EXTRA.get("resync", {})
    if "seconds" in rs:
        out.append(f"- resync: {human(rs['dirty bytes'])} dirty after the outage; reconnect {rs['reconnect s']:.1f} s, "
                   f"pass {rs['pass s']:.1f} s ({rs['rate'] / 1e6:.1f} MB/s); disk O_DIRECT 1 MiB write "
                   f"{rs['disk rates']['write'] / 1e6:.0f} MB/s, read {rs['disk rates']['read'] / 1e6:.0f} MB/s; "
                   f"link {rs['link'] / 1e6:.0f} MB/s.")
    return out


def report(load_start):
    lines = []
    table = matrix_table()
    if table:
        lines += [f"Matrix: fio through the nbd engine, {CFG['seconds']} s per job after {CFG['ramp']} s ramp, "
                  f"{human(CFG['size'])} preallocated images.", ""] + table + [""]
        # Ratios like for like.
        ratios = ["| ratio | randw 4k QD32 | seq 1M | QD1 p50 (lower is better) | write+flush QD1 |",
                  "|---|---:|---:|---:|---:|"]
        for a, b in [("tandem sync", "mirror wb buffered"), ("tandem sync direct", "mirror wb direct"),
                     ("tandem async", "mirror bg buffered"), ("tandem async direct", "mirror bg direct"),
                     ("tandem async", "qemu-nbd writeback"), ("tandem async direct", "qemu-nbd none"),
                     ("tandem sync", "qemu-nbd writeback"), ("tandem sync direct", "qemu-nbd none")]:
            if a in RESULTS and b in RESULTS:
                cells = []
                for job in ALL_JOBS:
                    ra, rb = RESULTS[a].get(job), RESULTS[b].get(job)
                    r = ratio(job_value(job, ra), job_value(job, rb)) if ra and rb else None
                    cells.append("—" if r is None else f"{r:.2f}x")
                ratios.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
        if len(ratios) > 2:
            lines += ratios + [""]
    ex = extra_lines()
    if ex:
        lines += ex + [""]
    rows = targets()
    if rows:
        lines += ["Targets (issue 11):", "", "| target | measured | |", "|---|---|---|"]
        for label, fig, met in rows:
            lines.append(f"| {label} | {fig} | {'met' if met else ('not met' if met is False else 'n/a')} |")
        lines.append("")
    return lines


def machine_lines(load_start, started):
    commit = run(["git", "-C", CFG["repo"], "rev-parse", "--short", "HEAD"], check=False).stdout.strip() or "unknown"
    dirty = run(["git", "-C", CFG["repo"], "status", "--porcelain", "--", "src", "Cargo.toml"], check=False).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    fs = run(["df", "-T", CFG["tmpdir"]], check=False).stdout.splitlines()[-1].split()
    load_end = open("/proc/loadavg").read().split()[:3]
    ver = lambda argv: (run(argv, check=False).stdout.splitlines() or ["?"])[0]  # noqa: E731
    return [
        f"- machine: {os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}, images on {fs[1]} ({fs[0]}), "
        f"load average at start {' '.join(load_start)}, at end {' '.join(load_end)}",
        f"- commit: {commit}{' (with uncommitted changes in src/)' if dirty else ''}",
        f"- command: `{CFG['command']}` (took {(time.monotonic() - started) / 60:.1f} min)",
        f"- {ver(['fio', '--version'])}; {ver(['qemu-nbd', '--version'])}; sections: {','.join(SECTIONS)}"
        + (" (BENCH_SHORT=1: smoke sizes, figures meaningless)" if SHORT else ""),
    ] + ([f"- note: {CFG['note']}"] if CFG["note"] else [])


def main():
    started = time.monotonic()
    load_start = open("/proc/loadavg").read().split()[:3]
    work = tempfile.mkdtemp(prefix="tandem-bench.", dir=CFG["tmpdir"])
    WORK["dir"] = work
    log(f"work directory {work}; sections {','.join(SECTIONS)}; load {' '.join(load_start)}")
    ok = False
    try:
        certs = os.path.join(work, "certs")
        run([CFG["tandem"], "certs", "--out", certs])
        if any(s in SECTIONS for s in ("qemu-nbd", "mirror", "tandem")):
            run_matrix(work, certs)
        for sec, fn in (("large", run_large), ("initsync", run_initsync), ("wan", run_wan), ("resync", run_resync),
                        ("disk", run_disk)):
            if sec in SECTIONS:
                log(f"{sec}: starting")
                try:
                    fn(work, certs)
                except Exception as e:
                    ERRORS[sec] = str(e)
                    log(f"{sec}: FAILED: {e}")
                    if ENV.get("BENCH_DEBUG"):
                        traceback.print_exc()
                log_held(sec)
        ok = True
    finally:
        stop_all()
        leftovers = [p.pid for p in PROCS]
        keep_logs = ENV.get("BENCH_KEEP_LOGS", "1")
        if (ERRORS and keep_logs == "1") or keep_logs == "always":
            keep = os.path.join(CFG["tmpdir"], "tandem-bench-logs-" + time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(keep, exist_ok=True)
            for root, _, files in os.walk(work):
                for f in files:
                    if f.endswith(".log") or f.endswith(".json"):
                        rel = os.path.relpath(os.path.join(root, f), work).replace("/", ".")
                        subprocess.run(["cp", os.path.join(root, f), os.path.join(keep, rel)])
            log(f"logs kept in {keep}")
        subprocess.run(["rm", "-rf", work])
        if leftovers:
            log(f"warning: processes still running: {leftovers}")
    if not ok:
        return 1
    body = report(load_start)
    head = machine_lines(load_start, started)
    cmds = ["<details><summary>exact commands (ports are free ports picked at run time; $WORK is the "
            "temporary directory)</summary>", "", "```"]
    for sec, line in COMMANDS:
        cmds.append(f"[{sec}] {line}")
    cmds += ["```", "", "</details>", ""]
    title = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — tools/bench.sh"
    text = "\n".join(["", title, ""] + head + [""] + body + cmds)
    print(text)
    if CFG["results"]:
        new = not os.path.exists(CFG["results"])
        with open(CFG["results"], "a") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by `tools/bench.sh`; newest last.\n")
            f.write(text)
        log(f"appended to {CFG['results']}")
    failed = sorted(ERRORS)
    if failed:
        log(f"failed parts: {', '.join(failed)}")
        return 2
    return 0


if __name__ == "__main__":
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
