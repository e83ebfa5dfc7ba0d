#!/usr/bin/env python3
"""Bursty writes over a throttled WAN link: how often is the DR copy consistent?
(issue 11 items 3 and 5, issue 10's scenario), side by side with QEMU's mirror.

Every target gets the same workload through fio's nbd engine: BURSTS rounds of
BURST_BYTES of incompressible 1 MiB writes at QD16 (as fast as the primary takes
them), each followed by PAUSE_S seconds of quiet; the replication link runs
through tools/faultproxy throttled to RATE bytes/s. While it runs, the DR copy
is polled every 200 ms.

Targets: tandem async (default spill log), tandem async --spill-size 0 (no spill
log: the full window goes ahead to a bitmap resync), tandem sync,
qemu-storage-daemon blockdev-mirror copy-mode=background and write-blocking (its
target, a qemu-nbd, behind the same throttled proxy).

Figures per target: the client's write rate during the bursts, the time until the
copy caught up after the last burst, and the fraction of polls at which the DR
copy was consistent. tandem: the secondary reports a consistent point and no
resync is open (a promotion would get a consistent image). QEMU's mirror makes no
such promise while it copies (its target is a mix of old and new blocks until the
job has nothing left to copy): counted consistent when query-block-jobs shows
nothing left to copy (offset == len) — an upper bound.

Usage (repository root, release build):
  TANDEM_BIN=target/release/tandem FAULTPROXY_BIN=target/release/faultproxy \
    python3 tools/wan/burst_bench.py [RESULTS.md]
Env: WAN_RATE (20000000), WAN_BURST (200M), WAN_BURSTS (3), WAN_PAUSE_S (5),
WAN_TARGETS (comma list of: spill,nospill,sync,mirror-bg,mirror-wb).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
os.environ.setdefault("BENCH_REPO", REPO)
os.environ.setdefault("TANDEM_BIN", os.path.join(REPO, "target/release/tandem"))
os.environ.setdefault("FAULTPROXY_BIN", os.path.join(REPO, "target/release/faultproxy"))
sys.path.insert(0, os.path.join(REPO, "tools", "bench"))
import bench as B  # noqa: E402  (tools/bench/bench.py: process and QMP helpers)

RATE = int(os.environ.get("WAN_RATE", "20000000"))
BURST = B.parse_size(os.environ.get("WAN_BURST", "200M"))
BURSTS = int(os.environ.get("WAN_BURSTS", "3"))
PAUSE_S = float(os.environ.get("WAN_PAUSE_S", "5"))
TARGETS = os.environ.get("WAN_TARGETS", "spill,nospill,sync,mirror-bg,mirror-wb").split(",")
SIZE = max(BURST * BURSTS * 2, 1 << 30)
SEC = "wan-burst"


class Poller(threading.Thread):
    """Calls `probe` every 200 ms; counts True/False answers."""

    def __init__(self, probe):
        super().__init__(daemon=True)
        self.probe = probe
        self.stop = threading.Event()
        self.yes = 0
        self.polls = 0

    def run(self):
        while not self.stop.is_set():
            try:
                ok = self.probe()
            except Exception:  # noqa: BLE001 - a failed poll counts as not consistent
                ok = False
            if ok is not None:
                self.polls += 1
                self.yes += bool(ok)
            time.sleep(0.2)


def bursts(uri, work):
    """The workload; returns the client's MB/s over the bursts (time writing)."""
    writing = 0.0
    for i in range(BURSTS):
        out = os.path.join(work, f"burst{i}.json")
        argv = ["fio", f"--name=burst{i}", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
                "--iodepth=16", f"--size={BURST}", f"--offset={i * BURST}", "--refill_buffers",
                "--output-format=json", f"--output={out}"]
        if i == 0:
            B.record(SEC, argv)
        t0 = time.monotonic()
        B.run(argv, section=None, timeout=900)
        writing += time.monotonic() - t0
        time.sleep(PAUSE_S)
    return BURSTS * BURST / writing / 1e6


def tandem_target(work, certs, name, mode, extra):
    t = B.Tandem(work, certs, name, SIZE, mode, proxy=True, section=SEC, extra=extra)
    try:
        t.wait_in_sync(300, f"{name}: initial sync")
        t.proxy_ctl_cmd("set", "throttle", "--bytes-per-s", str(RATE))

        def consistent():
            s = t.status(t.sctl)
            if s is None:
                return None
            cp = s.get("consistent_point")
            return bool(cp) and not cp.get("resync_open")

        p = Poller(consistent)
        p.start()
        t0 = time.monotonic()
        rate = bursts(t.uri, t.dir)
        t_last = time.monotonic()
        t.wait_in_sync(900, f"{name}: caught up")
        caught = time.monotonic() - t_last + PAUSE_S
        p.stop.set()
        p.join()
        st = t.pstatus() or {}
        c = st.get("counters", {})
        return {
            "client MB/s": rate,
            "caught up s after the last burst": caught,
            "total s": time.monotonic() - t0,
            "consistent": f"{p.yes}/{p.polls} ({100.0 * p.yes / max(p.polls, 1):.0f}%)",
            "ahead episodes": c.get("ahead_episodes"),
            "spill episodes": c.get("spill_episodes"),
            "spilled MiB": round(c.get("spilled_bytes", 0) / 2**20),
        }
    finally:
        t.stop()


def mirror_target(work, name, copy_mode):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    pimg, simg = os.path.join(d, "primary.img"), os.path.join(d, "secondary.img")
    B.sparse_image(pimg, SIZE)
    B.sparse_image(simg, SIZE)
    sec = B.QemuNbd(d, "secondary-qemu-nbd", SIZE, "writeback", section=SEC, img=simg)
    pport = B.free_port()
    ctl = os.path.join(d, "faultproxy.sock")
    proxy = B.start([B.CFG["faultproxy"], "--listen", f"127.0.0.1:{pport}", "--upstream",
                     f"127.0.0.1:{sec.port}", "--control", ctl, "--seed", "1"],
                    os.path.join(d, "faultproxy.log"), SEC)
    B.wait_for(lambda: os.path.exists(ctl) and B.tcp_up(pport), 20, "faultproxy", proc=proxy)
    port = B.free_port()
    qmp_path = os.path.join(d, "qmp.sock")
    qsd = B.start([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={pimg},cache.direct=off,aio=io_uring",
        "--blockdev", "driver=raw,node-name=src0,file=file0",
        "--blockdev", f"driver=nbd,node-name=tgt0,server.type=inet,server.host=127.0.0.1,server.port={pport}",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
        "--export", "type=nbd,id=exp0,node-name=src0,name=exp,writable=on",
        "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
        "--monitor", "chardev=qmp0",
    ], os.path.join(d, "qsd.log"), SEC)
    try:
        B.wait_for(lambda: os.path.exists(qmp_path) and B.tcp_up(port), 30, "qemu-storage-daemon", proc=qsd)
        qmp = B.Qmp(qmp_path)
        qmp.cmd("blockdev-mirror", **{"job-id": "m0", "device": "src0", "target": "tgt0",
                                       "sync": "full", "copy-mode": copy_mode})
        B.record(SEC, ["QMP", "blockdev-mirror", json.dumps({"sync": "full", "copy-mode": copy_mode})])
        lock = threading.Lock()

        def job():
            with lock:
                jobs = qmp.cmd("query-block-jobs")
            return jobs[0] if jobs else None

        B.wait_for(lambda: (job() or {}).get("ready"), 600, "mirror ready", proc=qsd)
        json.loads(B.run([B.CFG["faultproxy"], "ctl", "--control", ctl, "set", "throttle",
                          "--bytes-per-s", str(RATE)], section=SEC).stdout)

        def caught_up():
            j = job()
            return j is not None and j.get("offset") == j.get("len")

        p = Poller(caught_up)
        p.start()
        t0 = time.monotonic()
        rate = bursts(f"nbd://127.0.0.1:{port}/exp", d)
        t_last = time.monotonic()
        B.wait_for(caught_up, 900, "mirror caught up", interval=0.2, proc=qsd)
        caught = time.monotonic() - t_last + PAUSE_S
        p.stop.set()
        p.join()
        return {
            "client MB/s": rate,
            "caught up s after the last burst": caught,
            "total s": time.monotonic() - t0,
            "consistent": f"{p.yes}/{p.polls} ({100.0 * p.yes / max(p.polls, 1):.0f}%) caught up (no prefix guarantee)",
        }
    finally:
        for proc in (qsd, proxy):
            B.stop(proc)
        sec.stop(remove=False)
        B.rm(pimg, simg)


def main():
    results = sys.argv[1] if len(sys.argv) > 1 else None
    work = tempfile.mkdtemp(prefix="tandem-wanburst-", dir="/var/tmp")
    B.WORK["dir"] = work
    certs = os.path.join(work, "certs")
    B.run([B.CFG["tandem"], "certs", "--out", certs], section=None)
    rows = []
    try:
        for t in TARGETS:
            B.log(f"target {t}")
            if t == "spill":
                r = tandem_target(work, certs, t, "async", [])
                label = "tandem async, spill log (default 1G)"
            elif t == "nospill":
                r = tandem_target(work, certs, t, "async", ["--spill-size", "0"])
                label = "tandem async, --spill-size 0"
            elif t == "sync":
                r = tandem_target(work, certs, t, "sync", [])
                label = "tandem sync"
            elif t == "mirror-bg":
                r = mirror_target(work, t, "background")
                label = "QEMU mirror background"
            elif t == "mirror-wb":
                r = mirror_target(work, t, "write-blocking")
                label = "QEMU mirror write-blocking"
            else:
                raise SystemExit(f"unknown target {t}")
            B.log(f"{label}: {r}")
            rows.append((label, r))
    finally:
        B.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = ["", f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — tools/wan/burst_bench.py (wan)", "",
             f"Commit {commit}, load {load[0]:.1f}. {BURSTS} bursts of {BURST >> 20} MiB incompressible "
             f"1 MiB writes QD16 (fio --ioengine=nbd), {PAUSE_S:g} s apart, replication link throttled to "
             f"{RATE / 1e6:g} MB/s by tools/faultproxy; DR copy polled every 200 ms.", "",
             "| target | client MB/s during bursts | caught up, s after last burst | DR copy consistent | ahead / spill episodes |",
             "|---|---:|---:|---|---|"]
    for label, r in rows:
        eps = f"{r.get('ahead episodes', '-')} / {r.get('spill episodes', '-')}" if "ahead episodes" in r else "-"
        lines.append(f"| {label} | {r['client MB/s']:.1f} | {r['caught up s after the last burst']:.1f} | "
                     f"{r['consistent']} | {eps} |")
    lines += ["", "Command: `TANDEM_BIN=target/release/tandem FAULTPROXY_BIN=target/release/faultproxy "
              "python3 tools/wan/burst_bench.py benches/RESULTS.md`", "", "```"]
    for sec, line in B.COMMANDS:
        lines.append(f"[{sec}] {line}")
    lines += ["```", ""]
    text = "\n".join(lines)
    print(text)
    if results:
        with open(results, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
