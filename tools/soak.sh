#!/usr/bin/env bash
# tools/soak.sh — fault soak: a tandem pair behind the fault proxy, continuous
# fio load, random (seeded) link faults and kill -9s, then heal, converge and
# compare the images. Exit 0 only if both images are identical.
#
# Usage (from the repository root; not run in CI):
#   tools/soak.sh                          # 30 minutes, random seed (printed)
#   SOAK_MINUTES=3 tools/soak.sh           # shorter
#   SOAK_SEED=1234 tools/soak.sh           # replay the same fault schedule
#   TANDEM_BIN=target/debug/tandem FAULTPROXY_BIN=target/debug/faultproxy tools/soak.sh
#
# Topology (loopback, mutual TLS):
#   fio --ioengine=nbd ─▶ primary (NBD) ─▶ faultproxy (P) ─▶ secondary (S)
#
# Every SOAK_QUIET_MIN..SOAK_QUIET_MAX seconds one fault is chosen by a bash
# RANDOM seeded with SOAK_SEED (the same seed gives the same schedule of
# fault kinds, parameters and durations; timing of the load is not replayed):
#   blackhole, delay+jitter, throttle (up), reset, reset --reject-new,
#   cut-after N bytes (up), flip-bits every Nth chunk (up),
#   kill -9 secondary, kill -9 primary, kill -9 both (secondary restarted first).
# The proxy's own RNG (flipped bits, jitter) gets --seed SOAK_SEED too.
# Agents are restarted with exactly the same arguments. An agent that exits
# when it was not killed fails the soak.
#
# At the end: clear all faults, stop fio, wait until the primary reports
# connected / nothing out of sync / no resync / no lag and the secondary
# UpToDate, SIGTERM both (each must exit 0), cmp the images.
#
# Environment:
#   SOAK_MINUTES     duration of the fault phase (default 30; SOAK_SECONDS wins)
#   SOAK_SECONDS     duration in seconds
#   SOAK_SEED        seed of the fault schedule and the proxy (default: random)
#   SOAK_SIZE        volume size (default 512M)
#   SOAK_MODE        sync | async | mixed (default mixed: async with a small
#                    window, so the ahead state is exercised too)
#   SOAK_RATE        fio rate limit (default 8m; fio syntax)
#   SOAK_QUIET_MIN / SOAK_QUIET_MAX  seconds between faults (default 2 / 8)
#   SOAK_CONVERGE_TIMEOUT  seconds for the final convergence (default 300)
#   SOAK_DIR         work directory (default: mktemp -d under /var/tmp);
#                    kept on failure or with SOAK_KEEP=1
#   TANDEM_BIN, FAULTPROXY_BIN  binaries; if unset: cargo build --release
#                    -p tandem -p faultproxy (into CARGO_TARGET_DIR or target/)
#
# Needs: fio (nbd engine), jq, cmp.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SOAK_MINUTES=${SOAK_MINUTES:-30}
SOAK_SECONDS=${SOAK_SECONDS:-$((SOAK_MINUTES * 60))}
SOAK_SEED=${SOAK_SEED:-$(( (RANDOM << 15) | RANDOM ))}
SOAK_SIZE=${SOAK_SIZE:-512M}
SOAK_MODE=${SOAK_MODE:-mixed}
SOAK_RATE=${SOAK_RATE:-8m}
SOAK_QUIET_MIN=${SOAK_QUIET_MIN:-2}
SOAK_QUIET_MAX=${SOAK_QUIET_MAX:-8}
SOAK_CONVERGE_TIMEOUT=${SOAK_CONVERGE_TIMEOUT:-300}
SOAK_KEEP=${SOAK_KEEP:-0}

log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

for tool in fio jq cmp; do
    command -v "$tool" >/dev/null || { log "error: $tool is not installed (apt-get install -y fio jq)"; exit 2; }
done

if [[ -z "${TANDEM_BIN:-}" || -z "${FAULTPROXY_BIN:-}" ]]; then
    log "building tandem and faultproxy (release)"
    (cd "$REPO" && cargo build --release --quiet -p tandem -p faultproxy)
    TARGET=${CARGO_TARGET_DIR:-$REPO/target}
    TANDEM_BIN=${TANDEM_BIN:-$TARGET/release/tandem}
    FAULTPROXY_BIN=${FAULTPROXY_BIN:-$TARGET/release/faultproxy}
fi

DIR=${SOAK_DIR:-$(mktemp -d /var/tmp/tandem-soak.XXXXXX)}
mkdir -p "$DIR"
RANDOM=$SOAK_SEED
log "seed $SOAK_SEED (replay the fault schedule with SOAK_SEED=$SOAK_SEED); ${SOAK_SECONDS}s of faults; size $SOAK_SIZE; mode $SOAK_MODE; dir $DIR"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S_PORT=$(free_port)
P_PORT=$(free_port)
NBD_PORT=$(free_port)
CERTS=$DIR/certs
"$TANDEM_BIN" certs --out "$CERTS" --name primary --name secondary >/dev/null

COMMON=(--tls-dir "$CERTS" --size "$SOAK_SIZE" --heartbeat-interval-ms 200
        --peer-timeout-ms 1000 --connect-timeout-ms 2000)
case "$SOAK_MODE" in
    sync) PRIMARY_MODE=(--mode sync) ;;
    async) PRIMARY_MODE=(--mode async) ;;
    mixed) PRIMARY_MODE=(--mode async --queue-bytes-max 4M --queue-writes-max 256) ;;
    *) log "error: SOAK_MODE must be sync, async or mixed"; exit 2 ;;
esac
SEC_ARGS=(secondary --volume "$DIR/secondary.img" --listen "127.0.0.1:$S_PORT"
          --control "$DIR/secondary.sock" "${COMMON[@]}")
PRI_ARGS=(primary --volume "$DIR/primary.img" --peer "127.0.0.1:$P_PORT"
          --nbd "127.0.0.1:$NBD_PORT" --control "$DIR/primary.sock"
          --al-extents 64 "${PRIMARY_MODE[@]}" "${COMMON[@]}")

SEC_PID=
PRI_PID=
FP_PID=
LOAD_PID=
FAILED=1

start_secondary() { TANDEM_LOG=info "$TANDEM_BIN" "${SEC_ARGS[@]}" >>"$DIR/secondary.log" 2>&1 & SEC_PID=$!; }
start_primary() { TANDEM_LOG=info "$TANDEM_BIN" "${PRI_ARGS[@]}" >>"$DIR/primary.log" 2>&1 & PRI_PID=$!; }
status() { "$TANDEM_BIN" status --control "$DIR/$1.sock" --json 2>/dev/null; }
ctl() { "$FAULTPROXY_BIN" ctl --control "$DIR/fp.sock" "$@" >/dev/null; }

# Stop the load loop, then the fio it started (by pid; fio is its child, not
# ours). fio's nbd engine spins forever once the server is gone ("nbd_poll:
# nothing to poll for in state DEAD"), so SIGTERM is followed by SIGKILL.
stop_load() {
    if [[ -n "$LOAD_PID" ]]; then
        kill "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
        LOAD_PID=
    fi
    if [[ -f "$DIR/fio.pid" ]]; then
        local fpid i
        fpid=$(cat "$DIR/fio.pid")
        kill "$fpid" 2>/dev/null || true
        for i in $(seq 30); do kill -0 "$fpid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$fpid" 2>/dev/null || true
        while kill -0 "$fpid" 2>/dev/null; do sleep 0.1; done
        rm -f "$DIR/fio.pid"
    fi
}

# Client bytes written through primaries that are gone (their counters died with them).
WRITTEN_BEFORE=0
primary_written() { status primary | jq -r '.counters.client_write_bytes' 2>/dev/null || echo 0; }
# Before the primary is killed: count what it served, stop the load (it cannot survive).
before_primary_kill() {
    WRITTEN_BEFORE=$((WRITTEN_BEFORE + $(primary_written)))
    stop_load
}
after_primary_start() {
    wait_for 30 "primary control socket" socket_up primary
    start_load
}

cleanup() {
    set +e
    stop_load
    for pid in $PRI_PID $SEC_PID $FP_PID; do
        kill -9 "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    if [[ $FAILED -ne 0 ]]; then
        log "FAILED (seed $SOAK_SEED); logs and images kept in $DIR"
        for f in primary secondary faultproxy; do
            log "----- last lines of $f.log -----"
            tail -n 25 "$DIR/$f.log" >&2
        done
    elif [[ "$SOAK_KEEP" == 1 ]]; then
        log "kept $DIR"
    else
        rm -rf "$DIR"
    fi
}
trap cleanup EXIT

# An agent that exits by itself (not killed by us) fails the soak.
check_alive() {
    local who=$1 pid=$2
    if ! kill -0 "$pid" 2>/dev/null; then
        local rc=0
        wait "$pid" || rc=$?
        log "error: the $who exited by itself (status $rc)"
        exit 1
    fi
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        if ((SECONDS > deadline)); then log "error: $what: not within ${timeout}s"; return 1; fi
        sleep 0.5
    done
}
socket_up() { status "$1" >/dev/null; }
converged() {
    local p s
    p=$(status primary) || return 1
    s=$(status secondary) || return 1
    jq -e '.peer.connection == "connected" and .out_of_sync_bytes == 0 and .resync == null and .lag.writes == 0' <<<"$p" >/dev/null &&
        jq -e '.disk_state == "UpToDate" and .peer.connection == "connected"' <<<"$s" >/dev/null
}

"$FAULTPROXY_BIN" --listen "127.0.0.1:$P_PORT" --upstream "127.0.0.1:$S_PORT" \
    --control "$DIR/fp.sock" --seed "$SOAK_SEED" >>"$DIR/faultproxy.log" 2>&1 &
FP_PID=$!
start_secondary
wait_for 30 "secondary control socket" socket_up secondary
start_primary
wait_for 30 "primary control socket" socket_up primary
wait_for 300 "initial sync" converged
log "initial sync done"

# Continuous load: fio is restarted whenever it ends (it fails when the primary is killed).
load_loop() {
    local i=0
    while true; do
        i=$((i + 1))
        fio --name="soak$i" --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT" \
            --rw=randwrite --bsrange=4k-256k --iodepth=8 \
            --rate="$SOAK_RATE" --size="$SOAK_SIZE" --time_based --runtime=600 \
            --randseed=$((SOAK_SEED + i)) --verify_state_save=0 \
            >>"$DIR/fio.log" 2>&1 &
        echo $! >"$DIR/fio.pid"
        wait $! || true
        sleep 1
    done
}
start_load() { load_loop & LOAD_PID=$!; }
start_load

rand_between() { echo $(($1 + RANDOM % ($2 - $1 + 1))); }

declare -A COUNT
kill9() { # kill9 PID: SIGKILL and reap
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
END=$((SECONDS + SOAK_SECONDS))
n=0
while ((SECONDS < END)); do
    sleep "$(rand_between "$SOAK_QUIET_MIN" "$SOAK_QUIET_MAX")"
    check_alive primary "$PRI_PID"
    check_alive secondary "$SEC_PID"
    n=$((n + 1))
    hold=$(rand_between 2 8)
    case $((RANDOM % 10)) in
        0) kind=blackhole; ctl set blackhole ;;
        1) kind=delay; ctl set delay --ms "$(rand_between 5 100)" --jitter-ms "$(rand_between 0 20)" ;;
        2) kind=throttle; ctl set throttle --bytes-per-s "$(rand_between 500000 4000000)" --dir up ;;
        3) kind=reset; ctl set reset; hold=0 ;;
        4) kind=reset-reject-new; ctl set reset --reject-new ;;
        5) kind=cut; ctl set cut-after --bytes "$(rand_between 2000 300000)" --dir up ;;
        6) kind=flip-bits; ctl set flip-bits --every-nth-chunk "$(rand_between 3 60)" --dir up ;;
        7) kind=kill-secondary
           kill9 "$SEC_PID"; sleep "$(rand_between 0 4)"; start_secondary; hold=0 ;;
        8) kind=kill-primary
           before_primary_kill
           kill9 "$PRI_PID"; sleep "$(rand_between 0 2)"; start_primary
           after_primary_start; hold=0 ;;
        9) kind=kill-both
           before_primary_kill
           kill9 "$PRI_PID"; kill9 "$SEC_PID"; sleep "$(rand_between 0 2)"
           start_secondary; wait_for 30 "secondary control socket" socket_up secondary
           start_primary; after_primary_start; hold=0 ;;
    esac
    COUNT[$kind]=$(( ${COUNT[$kind]:-0} + 1 ))
    log "fault $n: $kind (hold ${hold}s)"
    sleep "$hold"
    ctl clear
done

log "fault phase over after $n faults: $(for k in "${!COUNT[@]}"; do printf '%s=%s ' "$k" "${COUNT[$k]}"; done)"
ctl clear
stop_load
sleep 1
check_alive primary "$PRI_PID"
check_alive secondary "$SEC_PID"
t0=$SECONDS
wait_for "$SOAK_CONVERGE_TIMEOUT" "final convergence" converged
log "converged $((SECONDS - t0))s after the last fault"
P_STATUS=$(status primary)
S_STATUS=$(status secondary)
log "clients wrote $(( (WRITTEN_BEFORE + $(jq -r .counters.client_write_bytes <<<"$P_STATUS")) >> 20 )) MiB in total (across primary restarts)"
log "primary counters (since its last start): $(jq -c .counters <<<"$P_STATUS")"
log "secondary counters: $(jq -c .counters <<<"$S_STATUS")"
log "proxy: $("$FAULTPROXY_BIN" ctl --control "$DIR/fp.sock" stats | jq -c .stats)"

kill -TERM "$PRI_PID"; if wait "$PRI_PID"; then rc=0; else rc=$?; fi
PRI_PID=
[[ $rc -eq 0 ]] || { log "error: primary exited with $rc after SIGTERM"; exit 1; }
kill -TERM "$SEC_PID"; if wait "$SEC_PID"; then rc=0; else rc=$?; fi
SEC_PID=
[[ $rc -eq 0 ]] || { log "error: secondary exited with $rc after SIGTERM"; exit 1; }

if cmp "$DIR/primary.img" "$DIR/secondary.img"; then
    FAILED=0
    log "PASS: images identical after $n faults (seed $SOAK_SEED)"
else
    log "error: images differ (seed $SOAK_SEED)"
    exit 1
fi
