#!/usr/bin/env bash
# tools/bench.sh — tandem vs qemu-nbd, side by side, in one run, as ratios.
#
# Usage (from the repository root):
#   tools/bench.sh                       # defaults: 1G images, 15 s per fio job
#   BENCH_SECONDS=30 tools/bench.sh      # longer runs
#   TANDEM_BIN=path/to/tandem tools/bench.sh   # skip `cargo build --release`
#
# What it does, on this machine, in one run:
#   1. Baseline: `qemu-nbd --cache=none --aio=io_uring --format=raw --persistent
#      --shared=16` serving a preallocated raw image of BENCH_SIZE.
#   2. tandem primary (NBD export) + tandem secondary on loopback, --mode async,
#      fresh preallocated images; waits for the initial full sync first.
#   3. The same, --mode sync.
#   For each target it runs the same fio jobs through fio's nbd engine:
#     seqwrite  write 1 MiB, QD16            -> MiB/s
#     randw32   randwrite 4 KiB, QD32        -> IOPS
#     randw1    randwrite 4 KiB, QD1         -> p50 / p99 completion latency (µs)
#     randr32   randread 4 KiB, QD32         -> IOPS
#   Between jobs on tandem it waits until the async replication lag is 0, so a
#   job does not pay for the previous job's backlog.
#   Prints a table (qemu figure, tandem figure and tandem/qemu ratio) and
#   appends it, with date, machine, commit and command, to benches/RESULTS.md.
#   Then runs `cargo bench --bench frame_pipeline -- --quick` and appends its
#   summary lines under a separate heading (skip with BENCH_FRAME=0).
#
# Environment:
#   BENCH_SECONDS   runtime of each fio job, seconds (default 15)
#   BENCH_RAMP      fio ramp time before measuring, seconds (default 3)
#   BENCH_SIZE      image size (default 1G); fio --size is the same
#   BENCH_TMPDIR    where images live (default /var/tmp); all three targets use
#                   the same filesystem
#   TANDEM_BIN      tandem binary; if unset: cargo build --release (quiet)
#   TANDEM_EXTRA_ARGS  extra arguments for both tandem agents (e.g. --direct)
#   BENCH_FRAME     1 (default) to also run the frame_pipeline criterion bench
#   BENCH_RESULTS   results file (default benches/RESULTS.md)
#   BENCH_NOTE      free text recorded with the results (e.g. "2nd run")
#   BENCH_SYNC_TIMEOUT  seconds to wait for the initial full sync (default 90);
#                   on any failure the agents' logs are kept in BENCH_TMPDIR
#
# Needs: fio (with the nbd engine; `apt-get install -y fio`), qemu-nbd,
# python3, fallocate. Every process it starts is stopped on exit (trap EXIT),
# and its temporary directory is removed.
set -euo pipefail

BENCH_SECONDS=${BENCH_SECONDS:-15}
BENCH_RAMP=${BENCH_RAMP:-3}
BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
BENCH_FRAME=${BENCH_FRAME:-1}
TANDEM_EXTRA_ARGS=${TANDEM_EXTRA_ARGS:-}
BENCH_NOTE=${BENCH_NOTE:-}
BENCH_SYNC_TIMEOUT=${BENCH_SYNC_TIMEOUT:-90}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${BENCH_RESULTS:-$REPO/benches/RESULTS.md}
COMMAND_LINE="${TANDEM_BIN:+TANDEM_BIN=$TANDEM_BIN }BENCH_SECONDS=$BENCH_SECONDS BENCH_RAMP=$BENCH_RAMP BENCH_SIZE=$BENCH_SIZE${TANDEM_EXTRA_ARGS:+ TANDEM_EXTRA_ARGS=\"$TANDEM_EXTRA_ARGS\"} tools/bench.sh"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in fio qemu-nbd python3 fallocate; do
    command -v "$tool" >/dev/null || die "$tool not found (fio: apt-get install -y fio; qemu-nbd: apt-get install -y qemu-utils)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio >= 3.16 needed)"

WORK=$(mktemp -d "$BENCH_TMPDIR/tandem-bench.XXXXXX")
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${PIDS[@]}"; do
        # Bounded wait, then SIGKILL: the primary drains for at most its drain timeout.
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if ((rc != 0)); then
        # Keep the agents' logs and status snapshots for the bug report; drop the images.
        local keep
        keep="$BENCH_TMPDIR/tandem-bench-failed-$(date +%Y%m%d-%H%M%S)"
        mkdir -p "$keep"
        find "$WORK" -name '*.log' -o -name '*.status*.json' | while read -r f; do
            cp "$f" "$keep/$(basename "$(dirname "$f")").$(basename "$f")"
        done
        log "failed (exit $rc); logs kept in $keep"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- binary
if [[ -z "${TANDEM_BIN:-}" ]]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet --bin tandem)
    TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
    TANDEM_BIN=$TARGET_DIR/release/tandem
fi
[[ -x "$TANDEM_BIN" ]] || die "tandem binary $TANDEM_BIN is not executable"

# ---------------------------------------------------------------- helpers
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_tcp() { # host port timeout_s
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    return 1
}

status_json() { "$TANDEM_BIN" status --control "$1" --json 2>/dev/null; }

# Reads a status document on stdin and prints one field path (dots), or "ERR".
status_field() {
    python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
    for k in sys.argv[1].split("."):
        d = d[k] if d is not None else None
    print("null" if d is None else d)
except Exception:
    print("ERR")' "$1"
}

# Wait until the primary reports the peer connected, nothing out of sync, no resync.
wait_in_sync() { # control_socket timeout_s
    local deadline=$((SECONDS + $2)) js
    while ((SECONDS < deadline)); do
        if js=$(status_json "$1"); then
            if [[ $(status_field peer.connection <<<"$js") == connected &&
                $(status_field out_of_sync_bytes <<<"$js") == 0 &&
                $(status_field resync <<<"$js") == null ]]; then
                return 0
            fi
        fi
        sleep 0.5
    done
    return 1
}

# Wait until the primary's replication lag is 0 bytes (async backlog drained).
wait_lag_zero() { # control_socket timeout_s
    local deadline=$((SECONDS + $2)) js
    while ((SECONDS < deadline)); do
        if js=$(status_json "$1") && [[ $(status_field lag.bytes <<<"$js") == 0 ]]; then
            return 0
        fi
        sleep 0.25
    done
    log "warning: replication lag still not 0 after $2 s; continuing"
}

stop_pid() { # pid — SIGTERM, wait (bounded), SIGKILL
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 400); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "warning: pid $pid did not stop within 40 s of SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

new_image() { # path
    rm -f "$1"
    fallocate -l "$BENCH_SIZE" "$1"
}

JOBS=(seqwrite randw32 randw1 randr32)
job_args() {
    case $1 in
    seqwrite) echo "--rw=write --bs=1M --iodepth=16" ;;
    randw32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    randw1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    randr32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    esac
}

run_fio() { # target port job settle_control_socket_or_empty
    local target=$1 port=$2 job=$3 ctl=${4:-}
    if [[ -n "$ctl" ]]; then wait_lag_zero "$ctl" 60; else sync; sleep 1; fi
    log "$target: $job (${BENCH_SECONDS}s + ${BENCH_RAMP}s ramp)"
    # shellcheck disable=SC2046
    fio --name="$job" --ioengine=nbd --uri="nbd://127.0.0.1:$port" \
        $(job_args "$job") --size="$BENCH_SIZE" --randrepeat=0 \
        --time_based --runtime="$BENCH_SECONDS" --ramp_time="$BENCH_RAMP" \
        --output-format=json --output="$WORK/$target.$job.json" \
        >"$WORK/$target.$job.log" 2>&1 ||
        die "fio $job against $target failed: $(tail -5 "$WORK/$target.$job.log")"
}

# ---------------------------------------------------------------- qemu-nbd
bench_qemu() {
    local img=$WORK/qemu.img port
    new_image "$img"
    port=$(free_port)
    qemu-nbd --cache=none --aio=io_uring --format=raw --persistent --shared=16 \
        --bind 127.0.0.1 --port "$port" "$img" >"$WORK/qemu.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_tcp 127.0.0.1 "$port" 20 || die "qemu-nbd did not listen on $port: $(cat "$WORK/qemu.log")"
    for job in "${JOBS[@]}"; do run_fio qemu "$port" "$job"; done
    stop_pid "$pid"
    rm -f "$img"
}

# ---------------------------------------------------------------- tandem
CERTS=$WORK/certs
"$TANDEM_BIN" certs --out "$CERTS" >/dev/null

bench_tandem() { # mode
    local mode=$1 dir=$WORK/$1
    mkdir -p "$dir"
    local pimg=$dir/primary.img simg=$dir/secondary.img
    new_image "$pimg"
    new_image "$simg"
    local rport nport
    rport=$(free_port)
    nport=$(free_port)
    # shellcheck disable=SC2086
    "$TANDEM_BIN" secondary --volume "$simg" --listen "127.0.0.1:$rport" \
        --tls-dir "$CERTS" --size "$BENCH_SIZE" $TANDEM_EXTRA_ARGS >"$dir/secondary.log" 2>&1 &
    local spid=$!
    PIDS+=("$spid")
    local deadline=$((SECONDS + 20))
    until status_json "$simg.tandem.sock" >/dev/null; do
        ((SECONDS < deadline)) || die "secondary did not come up: $(tail -5 "$dir/secondary.log")"
        sleep 0.2
    done
    # shellcheck disable=SC2086
    "$TANDEM_BIN" primary --volume "$pimg" --peer "127.0.0.1:$rport" --nbd "127.0.0.1:$nport" \
        --mode "$mode" --tls-dir "$CERTS" --size "$BENCH_SIZE" $TANDEM_EXTRA_ARGS \
        >"$dir/primary.log" 2>&1 &
    local ppid_=$!
    PIDS+=("$ppid_")
    local t0=$SECONDS
    if ! wait_in_sync "$pimg.tandem.sock" "$BENCH_SYNC_TIMEOUT"; then
        status_json "$pimg.tandem.sock" >"$dir/primary.status-at-failure.json" || true
        status_json "$simg.tandem.sock" >"$dir/secondary.status-at-failure.json" || true
        die "tandem $mode: initial sync did not finish in $BENCH_SYNC_TIMEOUT s: $(tail -5 "$dir/primary.log")"
    fi
    log "tandem $mode: initial sync done in $((SECONDS - t0)) s"
    echo "$((SECONDS - t0))" >"$WORK/tandem-$mode.initial_sync_s"
    for job in "${JOBS[@]}"; do run_fio "tandem-$mode" "$nport" "$job" "$pimg.tandem.sock"; done
    status_json "$pimg.tandem.sock" >"$WORK/tandem-$mode.status.json" || true
    stop_pid "$ppid_"
    stop_pid "$spid"
    rm -f "$pimg" "$simg"
}

bench_qemu
bench_tandem async
bench_tandem sync

# ---------------------------------------------------------------- report
TABLE=$(python3 - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]

def load(target, job):
    s = open(os.path.join(work, f"{target}.{job}.json")).read()
    # fio's nbd engine prints a line before the JSON document.
    return json.loads(s[s.index("{"):])["jobs"][0]

def fig(target, job):
    j = load(target, job)
    side = j["read"] if job == "randr32" else j["write"]
    if job == "seqwrite":
        return [side["bw_bytes"] / 2**20]
    if job == "randw1":
        p = side["clat_ns"]["percentile"]
        return [p["50.000000"] / 1000, p["99.000000"] / 1000]
    return [side["iops"]]

rows = [
    ("seqwrite", "write 1 MiB seq QD16", ["MiB/s"]),
    ("randw32", "randwrite 4 KiB QD32", ["IOPS"]),
    ("randw1", "randwrite 4 KiB QD1", ["p50 µs", "p99 µs"]),
    ("randr32", "randread 4 KiB QD32", ["IOPS"]),
]
out = ["| job | metric | qemu-nbd | tandem async | async/qemu | tandem sync | sync/qemu |",
       "|---|---|---:|---:|---:|---:|---:|"]
for job, title, metrics in rows:
    q, a, s = fig("qemu", job), fig("tandem-async", job), fig("tandem-sync", job)
    for i, m in enumerate(metrics):
        fmt = (lambda v: f"{v:.0f}") if m != "MiB/s" else (lambda v: f"{v:.1f}")
        ra = a[i] / q[i] if q[i] else float("nan")
        rs = s[i] / q[i] if q[i] else float("nan")
        out.append(f"| {title} | {m} | {fmt(q[i])} | {fmt(a[i])} | {ra:.2f}x | {fmt(s[i])} | {rs:.2f}x |")
out.append("")
out.append("Ratios are tandem/qemu-nbd: higher is better for MiB/s and IOPS, lower is better for latency.")
extra = []
for mode in ("async", "sync"):
    try:
        sync_s = open(os.path.join(work, f"tandem-{mode}.initial_sync_s")).read().strip()
        st = json.load(open(os.path.join(work, f"tandem-{mode}.status.json")))
        c = st.get("counters", {})
        extra.append(f"tandem {mode}: initial full sync of a fresh image {sync_s} s; "
                     f"replicated {c.get('replicated_bytes', 0) / 2**20:.0f} MiB "
                     f"({c.get('replicated_wire_bytes', 0) / 2**20:.0f} MiB on the wire).")
    except Exception as e:  # the status snapshot is informative only
        extra.append(f"tandem {mode}: no status snapshot ({e})")
out += [""] + extra
print("\n".join(out))
PY
)

echo
echo "$TABLE"
echo

COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$REPO" status --porcelain -- src Cargo.toml 2>/dev/null | head -1)
FS=$(df -T "$BENCH_TMPDIR" | awk 'NR==2 {print $2 " (" $1 ")"}')
CPU=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
[[ -f "$RESULTS" ]] || printf '# Benchmark results\n\nAppended by `tools/bench.sh` (and its frame_pipeline step); newest last.\n' >"$RESULTS"
{
    echo
    echo "## $(date -u +'%Y-%m-%d %H:%M UTC') — tandem vs qemu-nbd"
    echo
    echo "- machine: $(nproc) CPUs ($CPU), kernel $(uname -r), images on $FS, load average at end $LOAD"
    echo "- commit: $COMMIT${DIRTY:+ (with uncommitted changes in src/)}"
    echo "- command: \`$COMMAND_LINE\`"
    echo "- fio $(fio --version | sed 's/^fio-//'), nbd engine; qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'); ${BENCH_SECONDS} s per job after ${BENCH_RAMP} s ramp; images ${BENCH_SIZE}, preallocated with fallocate"
    [[ -n "$BENCH_NOTE" ]] && echo "- note: $BENCH_NOTE"
    echo
    echo "$TABLE"
} >>"$RESULTS"
log "appended to $RESULTS"

# ---------------------------------------------------------------- frame_pipeline
if [[ "$BENCH_FRAME" == 1 ]]; then
    log "cargo bench --bench frame_pipeline -- --quick"
    (cd "$REPO" && cargo bench --quiet --bench frame_pipeline -- --quick) >"$WORK/frame.txt" 2>&1 ||
        die "cargo bench failed: $(tail -20 "$WORK/frame.txt")"
    FRAME=$(python3 - "$WORK/frame.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
# Criterion prints "<id>  time: [lo mid hi]" (the id may be on its own line) and "thrpt: [lo mid hi]".
rows, cur, t = [], None, None
for line in text.splitlines():
    m = re.match(r"^(\S+/\S+)\s*(time:.*)?$", line)
    if m and not line.startswith(" "):
        cur = m.group(1)
        line = m.group(2) or ""
    tm = re.search(r"time:\s+\[\S+ \S+ (\S+ \S+) \S+ \S+\]", line)
    if tm:
        t = tm.group(1)
    th = re.search(r"thrpt:\s+\[\S+ \S+ (\S+ \S+) \S+ \S+\]", line)
    if th and cur:
        rows.append((cur, t, th.group(1)))
        cur = None
print("| benchmark | time (median) | throughput (uncompressed bytes) |")
print("|---|---:|---:|")
for name, t, th in rows:
    print(f"| {name} | {t} | {th} |")
PY
)
    echo "$FRAME"
    {
        echo
        echo "### $(date -u +'%Y-%m-%d %H:%M UTC') — frame_pipeline (\`cargo bench --bench frame_pipeline -- --quick\`), commit $COMMIT"
        echo
        echo "$FRAME"
    } >>"$RESULTS"
    log "appended frame_pipeline summary to $RESULTS"
fi
