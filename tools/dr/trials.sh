#!/usr/bin/env bash
# tools/dr/trials.sh — is the DR copy promotable when the primary dies? (issue 10)
#
# Each trial: async replication to a secondary in a network namespace this
# script creates, over a veth link throttled to 20 MB/s (tc tbf on the
# primary's side); ext4 on the primary's NBD export (nbdfuse + loop) busy with
# bursts (a 200 MiB file and /usr/share/doc copied in rounds, each ended by
# sync, random pauses); the primary SIGKILLed at a random instant 3-8 s into the
# load; the secondary promoted WITHOUT --force; its volume mounted (journal
# replay) and checked with e2fsck -fn. Per trial it records whether promotion
# worked, whether the copy mounts and fscks clean, the consistent point the
# promotion reports, the data-loss window (kill time minus the accept time of
# the newest write the promoted copy holds), and what the primary's status said
# about the DR copy just before the kill. A summary ends the run.
#
#   tools/dr/trials.sh [--trials N] [--seed S] [--rate MBYTES_PER_S] [--size SIZE]
#                      [--kill-after MIN_S-MAX_S] [--bin PATH] [--out DIR] [--keep]
#
# --kill-after 60-90 makes long trials: the samples of the primary's view of
# the DR copy (OUT/samples-N.tsv: unix ms, consistent point ms, behind s, lag s)
# show whether the consistent point keeps advancing under sustained load.
#
# Needs root (netns, tc, loop, mount), iproute2, nbdfuse (libnbd-bin), fuse3,
# e2fsprogs. Default binary: target/release/tandem (built when missing).
# Replay one trial: --seed S --trials 1 with the seed its line shows (the trial
# seeds are derived from the run's seed: trial i uses S + i).
# Everything it creates (namespace, veth, loop devices, FUSE and ext4 mounts,
# processes) is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

TRIALS=50
SEED=$(( $(date +%s) % 100000 ))
RATE_MB=20
SIZE=2G
BIN=""
OUT=""
KEEP=0
KILL_MIN_MS=3000
KILL_MAX_MS=8000
while [ $# -gt 0 ]; do
    case "$1" in
        --trials) TRIALS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --rate) RATE_MB=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --kill-after) KILL_MIN_MS=$(( ${2%-*} * 1000 )); KILL_MAX_MS=$(( ${2#*-} * 1000 )); shift 2 ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "$BIN" ]; then
    BIN=$ROOT/target/release/tandem
    [ -x "$BIN" ] || (cd "$ROOT" && cargo build --release --quiet)
fi
for tool in ip tc nbdfuse fusermount3 losetup mkfs.ext4 e2fsck python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y iproute2 libnbd-bin fuse3 e2fsprogs python3)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (network namespace, tc, loop devices, mounts)" >&2; exit 2; }

W=$(mktemp -d /var/tmp/tandem-dr.XXXXXX)
OUT=${OUT:-$W}
mkdir -p "$OUT"
RESULTS=$OUT/results.tsv
TAG=$$
NS=tdr$TAG
VH=tdrh$TAG
VN=tdrn$TAG
NET=$(( TAG % 200 + 20 ))
HOST_IP=10.231.$NET.1
NS_IP=10.231.$NET.2

# --- cleanup (only what this script created) -------------------------------
PIDS=()
LOOPS=()
MOUNTS=()
FUSES=()
cleanup_trial() {
    local m l f p
    for m in "${MOUNTS[@]:-}"; do [ -n "$m" ] && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }; done
    for l in "${LOOPS[@]:-}"; do [ -n "$l" ] && { losetup -d "$l" 2>/dev/null || true; }; done
    for f in "${FUSES[@]:-}"; do [ -n "$f" ] && { fusermount3 -u "$f" 2>/dev/null || fusermount3 -uz "$f" 2>/dev/null || true; }; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && { kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
    MOUNTS=(); LOOPS=(); FUSES=(); PIDS=()
}
cleanup() {
    set +e
    cleanup_trial
    ip netns del "$NS" 2>/dev/null
    ip link del "$VH" 2>/dev/null
    if [ "$KEEP" = 0 ]; then
        # Keep the results when --out points elsewhere; drop the images.
        rm -rf "$W/base" "$W/trial"
        [ "$OUT" = "$W" ] || rm -rf "$W"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
now_ms() { date +%s%3N; }
json() { python3 -c 'import json,sys
try:
    d=json.load(sys.stdin)
except ValueError:
    d=None
for k in sys.argv[1].split("."):
    d = d.get(k) if isinstance(d, dict) else None
print("" if d is None else d)' "$1"; }
status() { "$BIN" status --control "$1" --json 2>/dev/null; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local until=$(( $(date +%s) + $1 )) what=$2; shift 2
    until "$@"; do
        [ "$(date +%s)" -lt "$until" ] || { log "timed out waiting for $what"; return 1; }
        sleep 0.2
    done
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- the network: a namespace for the secondary, a throttled veth -----------
ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add "$HOST_IP/30" dev "$VH"
ip link set "$VH" up
ip -n "$NS" addr add "$NS_IP/30" dev "$VN"
ip -n "$NS" link set "$VN" up
ip -n "$NS" link set lo up
# 20 MB/s from the primary to the secondary (the WAN link); acks go back freely.
tc qdisc add dev "$VH" root tbf rate "$(( RATE_MB * 8 ))mbit" burst 256kb latency 100ms

# --- certificates, resource file -------------------------------------------
"$BIN" certs --out "$W/certs" >/dev/null
P_PORT=$(free_port); S_PORT=$(free_port); NBD_PORT=$(free_port); NBD2_PORT=$(free_port)
mkdir -p "$W/trial" "$W/base"
cat > "$W/r0.toml" <<EOF
[resource]
name = "r0"
mode = "async"
tls-dir = "$W/certs"
peer-timeout-ms = 3000
heartbeat-interval-ms = 500

[nodes.primary]
address = "$HOST_IP:$P_PORT"
volume = "$W/trial/primary.img"
size = "$SIZE"
nbd = "127.0.0.1:$NBD_PORT"
control = "$W/trial/primary.sock"

[nodes.secondary]
address = "$NS_IP:$S_PORT"
volume = "$W/trial/secondary.img"
size = "$SIZE"
# Its export once promoted (inside the namespace).
nbd = "127.0.0.1:$NBD2_PORT"
control = "$W/trial/secondary.sock"
EOF

start_secondary() {
    ip netns exec "$NS" "$BIN" secondary --config "$W/r0.toml" --node secondary >>"$W/trial/secondary.log" 2>&1 &
    SEC_PID=$!; PIDS+=("$SEC_PID")
    wait_for 30 "the secondary's control socket" status_ok "$W/trial/secondary.sock"
}
start_primary() {
    "$BIN" primary --config "$W/r0.toml" --node primary >>"$W/trial/primary.log" 2>&1 &
    PRI_PID=$!; PIDS+=("$PRI_PID")
    wait_for 30 "the primary's control socket" status_ok "$W/trial/primary.sock"
}
status_ok() { status "$1" >/dev/null; }
peer_gone() { local c; c=$(status "$W/trial/secondary.sock" | json peer.connection) && [ "$c" != connected ]; }
is_primary() { [ "$(status "$W/trial/secondary.sock" | json role)" = primary ]; }
in_sync() {
    local s; s=$(status "$W/trial/primary.sock") || return 1
    [ "$(json peer.connection <<<"$s")" = connected ] && [ "$(json out_of_sync_bytes <<<"$s")" = 0 ] \
        && [ "$(json lag.writes <<<"$s")" = 0 ] && [ -z "$(json resync <<<"$s")" ]
}
attach() { # attach NAME -> sets DEV, mounts nothing
    local dir=$W/trial/$1
    mkdir -p "$dir"
    nbdfuse -P "$dir.pid" "$dir" "nbd://127.0.0.1:$NBD_PORT" </dev/null >>"$W/trial/nbdfuse.log" 2>&1 &
    PIDS+=("$!"); FUSES+=("$dir")
    wait_for 30 "nbdfuse" test -e "$dir/nbd"
    DEV=$(losetup -f --show "$dir/nbd"); LOOPS+=("$DEV")
}

# --- the base pair: ext4 made and synced once, unthrottled, then copied ----
log "base pair: $SIZE sparse volumes, ext4, initial sync (work dir $W)"
tc qdisc change dev "$VH" root tbf rate 2gbit burst 4mb latency 100ms
start_secondary
start_primary
wait_for 600 "the initial sync" in_sync
attach base
mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$DEV"
mkdir -p "$W/trial/mnt"
mount "$DEV" "$W/trial/mnt"; MOUNTS+=("$W/trial/mnt")
mkdir -p "$W/trial/mnt/data"
umount "$W/trial/mnt"; MOUNTS=()
cleanup_trial_io() { # the NBD client side only
    local m l f
    for m in "${MOUNTS[@]:-}"; do [ -n "$m" ] && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }; done
    for l in "${LOOPS[@]:-}"; do [ -n "$l" ] && { losetup -d "$l" 2>/dev/null || true; }; done
    for f in "${FUSES[@]:-}"; do [ -n "$f" ] && { fusermount3 -u "$f" 2>/dev/null || fusermount3 -uz "$f" 2>/dev/null || true; }; done
    MOUNTS=(); LOOPS=(); FUSES=()
}
cleanup_trial_io
wait_for 120 "the base pair in sync" in_sync
kill -TERM "$PRI_PID"; wait "$PRI_PID" || true
kill -TERM "$SEC_PID"; wait "$SEC_PID" || true
PIDS=()
for f in primary.img primary.img.tandem-meta secondary.img secondary.img.tandem-meta; do
    cp --sparse=always "$W/trial/$f" "$W/base/$f"
done
tc qdisc change dev "$VH" root tbf rate "$(( RATE_MB * 8 ))mbit" burst 256kb latency 100ms
head -c $((200 << 20)) /dev/urandom > "$W/big.bin"

# --- the load --------------------------------------------------------------
# Rounds: a 200 MiB file and sync, /usr/share/doc (140 MiB of small files)
# and sync, a random pause: bursts of hundreds of MiB against a 20 MB/s link
# (without the syncs the page cache would hold it all past the kill).
workload() {
    local mnt=$1 seed=$2 r=0
    RANDOM=$seed
    while true; do
        cp "$W/big.bin" "$mnt/data/big$(( r % 2 )).bin" || return
        sync -f "$mnt" || return
        rm -rf "$mnt/data/doc$(( r % 2 ))" && cp -a /usr/share/doc "$mnt/data/doc$(( r % 2 ))" || return
        sync -f "$mnt" || return
        sleep "0.$(( RANDOM % 10 ))"
        r=$(( r + 1 ))
    done
}

printf 'trial\tseed\tkill_after_ms\tpromoted\tmount_ok\tfsck_clean\tpoint_seq\tpoint_at_ms\tkill_ms\tloss_window_s\tprekill_lag_s\tprekill_behind_s\tprekill_point_at_ms\tpoint_regressed\tsection_open_at_kill\tpoint_advances\tmax_behind_s\texcess_over_lag_s\tpromote_message\n' > "$RESULTS"
log "running $TRIALS trials, seed $SEED, link ${RATE_MB} MB/s, results in $RESULTS"
for i in $(seq 1 "$TRIALS"); do
    tseed=$(( SEED + i ))
    RANDOM=$tseed
    span=$(( KILL_MAX_MS - KILL_MIN_MS + 1 ))
    if [ "$span" -le 32768 ]; then r=$RANDOM; else r=$(( RANDOM * 32768 + RANDOM )); fi
    kill_after_ms=$(( KILL_MIN_MS + r % span ))
    rm -rf "$W/trial"; mkdir -p "$W/trial"
    for f in primary.img primary.img.tandem-meta secondary.img secondary.img.tandem-meta; do
        cp --sparse=always "$W/base/$f" "$W/trial/$f"
    done
    start_secondary
    start_primary
    if ! wait_for 120 "in sync at the start of trial $i" in_sync; then
        log "trial $i: the pair did not sync at the start; see $W/trial/*.log"; exit 1
    fi
    attach fuse
    mkdir -p "$W/trial/mnt"
    mount "$DEV" "$W/trial/mnt"; MOUNTS+=("$W/trial/mnt")
    workload "$W/trial/mnt" "$tseed" >/dev/null 2>&1 &
    LOAD=$!; PIDS+=("$LOAD")
    start_ms=$(now_ms)
    # Sample the primary's view of the DR copy while the load runs.
    : > "$W/trial/samples"
    prekill=""; prekill_ms=$start_ms
    while [ $(( $(now_ms) - start_ms )) -lt "$kill_after_ms" ]; do
        if s=$(status "$W/trial/primary.sock"); then
            prekill=$s; prekill_ms=$(now_ms)
            printf '%s\t%s\t%s\t%s\n' "$prekill_ms" "$(json consistent_point.at_unix_ms <<<"$s")" "$(json consistent_point.behind_s <<<"$s")" "$(json lag.seconds <<<"$s")" >> "$W/trial/samples"
        fi
        sleep 0.25
    done
    kill_ms=$(now_ms)
    kill -9 "$PRI_PID"
    wait "$PRI_PID" 2>/dev/null || true
    # The load's shell and its running cp/sync (children of the shell this script started).
    pkill -9 -P "$LOAD" 2>/dev/null || true
    kill -9 "$LOAD" 2>/dev/null || true; wait "$LOAD" 2>/dev/null || true
    cleanup_trial_io
    prekill_lag=$(json lag.seconds <<<"$prekill")
    prekill_behind=$(json consistent_point.behind_s <<<"$prekill")
    prekill_at=$(json consistent_point.at_unix_ms <<<"$prekill")
    section_open=$(json consistent_point.resync_open <<<"$prekill")
    # The secondary notices the dead connection, then is promoted without --force.
    wait_for 60 "the secondary to see the primary gone" peer_gone || true
    sec=$(status "$W/trial/secondary.sock" || echo '{}')
    point_seq=$(json consistent_point.seq <<<"$sec")
    point_at=$(json consistent_point.at_unix_ms <<<"$sec")
    promoted=0; mount_ok=0; fsck_clean=0
    if msg=$("$BIN" promote --control "$W/trial/secondary.sock" 2>&1); then
        promoted=1
        wait_for 60 "the promoted node" is_primary || promoted=0
    fi
    msg=$(tr '\t\n' '  ' <<<"$msg")
    kill -TERM "$SEC_PID" 2>/dev/null || true
    wait "$SEC_PID" 2>/dev/null || true
    PIDS=()
    # Mount (replays the ext4 journal, as an admin's first mount does), then fsck.
    mkdir -p "$W/trial/check"
    if mount -o loop "$W/trial/secondary.img" "$W/trial/check" 2>>"$W/trial/check.log"; then
        MOUNTS+=("$W/trial/check")
        ls -R "$W/trial/check" >/dev/null 2>&1 && mount_ok=1
        umount "$W/trial/check" && MOUNTS=()
    fi
    if e2fsck -fn "$W/trial/secondary.img" >>"$W/trial/check.log" 2>&1; then fsck_clean=1; fi
    loss=""; excess=""
    [ -n "$point_at" ] && loss=$(python3 -c "print(round(($kill_ms - $point_at) / 1000, 3))")
    # How much older the promoted point is than the primary's last lag figure
    # allowed (lag seconds at the sample, plus the time from the sample to the kill).
    [ -n "$loss" ] && [ -n "$prekill_lag" ] && excess=$(python3 -c "print(round($loss - $prekill_lag - ($kill_ms - $prekill_ms) / 1000, 3))")
    regressed=0
    if [ -n "$prekill_at" ] && [ -n "$point_at" ] && [ "$point_at" -lt "$prekill_at" ]; then regressed=1; fi
    read -r advances max_behind < <(python3 - "$W/trial/samples" <<'PY'
import sys
ats, behinds = [], []
for line in open(sys.argv[1]):
    _, a, b, _ = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
    if a: ats.append(int(a))
    if b: behinds.append(float(b))
adv = sum(1 for x, y in zip(ats, ats[1:]) if y > x)
print(adv, max(behinds) if behinds else "")
PY
)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$i" "$tseed" "$kill_after_ms" "$promoted" "$mount_ok" "$fsck_clean" "$point_seq" "$point_at" \
        "$kill_ms" "$loss" "$prekill_lag" "$prekill_behind" "$prekill_at" "$regressed" "$section_open" \
        "$advances" "$max_behind" "$excess" "$msg" >> "$RESULTS"
    log "trial $i/$TRIALS seed $tseed: kill at ${kill_after_ms} ms, promoted=$promoted mount=$mount_ok fsck=$fsck_clean loss=${loss} s (pre-kill behind ${prekill_behind} s, lag ${prekill_lag} s, resync open ${section_open:-?})"
    cp "$W/trial/samples" "$OUT/samples-$i.tsv"
    if [ "$promoted" = 0 ] || [ "$fsck_clean" = 0 ]; then
        mkdir -p "$OUT/failed-$i"
        cp "$W"/trial/*.log "$OUT/failed-$i/" 2>/dev/null || true
        [ "$KEEP" = 1 ] && cp --sparse=always "$W/trial/secondary.img" "$OUT/failed-$i/"
    fi
done

python3 - "$RESULTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
n = len(rows)
def count(k): return sum(1 for r in rows if r[k] == "1")
loss = sorted(float(r["loss_window_s"]) for r in rows if r["loss_window_s"])
def pct(p): return loss[min(len(loss) - 1, int(p * len(loss)))] if loss else float("nan")
excess = [float(r["excess_over_lag_s"]) for r in rows if r["excess_over_lag_s"]]
adv = [int(r["point_advances"] or 0) for r in rows]
behind = [float(r["max_behind_s"]) for r in rows if r["max_behind_s"]]
print(f"trials: {n}")
print(f"promoted without --force: {count('promoted')}/{n}")
print(f"promoted copy mounts: {count('mount_ok')}/{n}; e2fsck -fn clean: {count('fsck_clean')}/{n}")
print(f"consistent and promotable (promoted, mounts, fsck clean): {sum(1 for r in rows if r['promoted']=='1' and r['mount_ok']=='1' and r['fsck_clean']=='1')}/{n}")
if loss:
    print(f"data-loss window (kill time - accept time of the newest write held), s: median {statistics.median(loss):.2f}, p90 {pct(0.9):.2f}, max {loss[-1]:.2f}")
if excess:
    print(f"loss window minus (the primary's last lag seconds + time from that sample to the kill), s: median {statistics.median(excess):.2f}, max {max(excess):.2f}")
print(f"consistent point older than the one the primary showed before the kill: {count('point_regressed')}/{n}")
print(f"resync open at the kill: {sum(1 for r in rows if r['section_open_at_kill'] == 'True')}/{n}")
if behind:
    print(f"under load, the primary's 'behind' figure: median of per-trial max {statistics.median(behind):.2f} s, max {max(behind):.2f} s; the consistent point advanced {statistics.median(adv)} times per trial (median; the status is sampled about once a second)")
PY
