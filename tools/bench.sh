#!/usr/bin/env bash
# tools/bench.sh — tandem side by side with qemu-nbd and QEMU's own replicator
# (qemu-storage-daemon + blockdev-mirror), in one run, as ratios (issue 11).
#
# Usage (from the repository root; needs root for nothing but apt-get):
#   tools/bench.sh                          # everything (~45 min on the 2-core machine)
#   BENCH_ONLY=mirror,large,wan tools/bench.sh   # a subset of sections
#   BENCH_SHORT=1 tools/bench.sh            # smoke run: tiny sizes, 2 s jobs (~3 min);
#                                           # the figures mean nothing, the plumbing is checked
#
# Sections (BENCH_ONLY, comma-separated; default all, `matrix` = the first three):
#   qemu-nbd  qemu-nbd --cache=none and --cache=writeback, preallocated BENCH_SIZE image
#   mirror    qemu-storage-daemon (file node cache.direct=on|off, aio=io_uring, raw node
#             exported over NBD) mirrored with QMP blockdev-mirror sync=full,
#             copy-mode=write-blocking (sync) and background (async), to an `nbd`
#             blockdev served by qemu-nbd --cache=none|writeback (like for like);
#             measured once query-block-jobs reports the job ready
#   tandem    tandem sync and async, buffered (default) and --direct, after the initial sync
#   -> each of these ten targets runs four fio jobs through fio's nbd engine:
#      randwrite 4 KiB QD32 (IOPS), write 1 MiB QD16 (MB/s), randwrite 4 KiB QD1
#      (p50/p99 µs), randwrite 4 KiB QD1 with --fsync=1 (NBD_CMD_FLUSH after each write; IOPS)
#   large     random 4 KiB writes QD32 over a whole BENCH_LARGE_SIZE (64G) sparse volume:
#             qemu-nbd --cache=writeback, then tandem async (after a full initial sync,
#             which sends the holes as zero chunks), then tandem over a
#             BENCH_LARGE_RANGE (1G) range of the same volume
#             and a second async pair with --al-extent-size BENCH_LARGE_EXTENT (64M)
#             over the whole volume
#   initsync  initial sync of a fresh BENCH_INIT_SIZE (1T) sparse pair: time, bytes
#             allocated on the secondary, peak RSS (VmHWM) of both agents; stopped early
#             when the secondary allocates more than BENCH_ALLOC_GUARD (6G) or after
#             BENCH_INIT_TIMEOUT (180 s), with the projection from the progress made
#   wan       BENCH_WAN_BYTES (512M) of `tar cf - /usr/lib` written with nbdcopy to an
#             async primary whose link runs through tools/faultproxy throttled to
#             BENCH_WAN_RATE (10000000) bytes/s: time to in-sync, bytes on the wire,
#             effective rate as a multiple of the link rate
#   resync    async pair through faultproxy; outage (reset --reject-new), BENCH_RESYNC_BYTES
#             (512M) of incompressible writes, link back at BENCH_RESYNC_LINK (50 MB/s):
#             resync rate as a fraction of min(disk, link), disk = O_DIRECT 1 MiB seq rate
#   disk      write amplification: BENCH_DISK_BYTES (4G) written seq 1 MiB QD16 over the
#             BENCH_SIZE volume; bytes the images' block device wrote (/proc/diskstats)
#             per client byte, through settling, a clean stop and sync: qemu-nbd
#             writeback, QEMU mirror write-blocking and background (buffered), tandem
#             sync and async (buffered). Rough: other writers on the machine count too
#
# Prints a table per section, ratios like for like (tandem buffered vs writeback /
# cache.direct=off; tandem --direct vs --cache=none / cache.direct=on), and the issue's
# targets as met / not met; appends all of it with date, commit, machine, load and the
# exact commands to benches/RESULTS.md (BENCH_RESULTS=path to change, BENCH_RESULTS=
# empty to skip).
#
# Environment (defaults in brackets):
#   BENCH_SECONDS [15] BENCH_RAMP [3]   fio runtime and ramp per matrix job
#   BENCH_SIZE [1G]                     matrix image size
#   BENCH_LARGE_SIZE [64G] BENCH_LARGE_RANGE [1G] BENCH_LARGE_SECONDS [30]
#   BENCH_LARGE_SEEDED [0]              1: the large pair's secondary is --seeded (hash
#                                       compare) instead of a full initial sync
#   BENCH_LARGE_EXTENT [64M]            a second large pair with this --al-extent-size
#                                       runs the whole-volume job (empty: skipped)
#   BENCH_INIT_SIZE [1T] BENCH_INIT_TIMEOUT [180] BENCH_ALLOC_GUARD [6G]
#   BENCH_WAN_BYTES [512M] BENCH_WAN_RATE [10000000]
#   BENCH_RESYNC_BYTES [512M] BENCH_RESYNC_LINK [50000000]
#   BENCH_DISK_BYTES [4G]
#   BENCH_DISK_FREE_MIN [12G]           large/initsync refuse to start with less free
#   BENCH_TMPDIR [/var/tmp]             where images live (sparse, removed as we go)
#   BENCH_TARGETS                       only these matrix targets (comma-separated names
#                                       as printed, e.g. "tandem sync,mirror wb buffered")
#   BENCH_JOBS                          only these jobs (randw32,seq1m,randw1,flush1);
#                                       for an A/B of one change (TANDEM_BIN=old, then new)
#   BENCH_NOTE                          free text recorded with the results
#   TANDEM_BIN, FAULTPROXY_BIN          binaries; unset: cargo build --release
#   BENCH_DEBUG=1                       print tracebacks of failed parts
#   BENCH_KEEP_LOGS [1]                 0: never keep logs; always: keep every part's logs
#                                       (with TANDEM_LOG=tandem::agent::link=debug: the link's
#                                       compression level decisions)
#
# Every process it starts is stopped on exit (by PID); its temporary directory is
# removed; logs of failed parts are kept in BENCH_TMPDIR/tandem-bench-logs-*.
# Exit status: 0 all parts ran, 2 some part failed (the rest is still reported).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Tools the bench drives: command -> Debian package (installed when missing, like tools/test.sh).
declare -A needs=(
    [fio]=fio [qemu-nbd]=qemu-utils [qemu-storage-daemon]=qemu-utils
    [nbdcopy]=libnbd-bin [python3]=python3 [fallocate]=util-linux [tar]=tar
)
missing=()
for cmd in "${!needs[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${needs[$cmd]}")
done
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    log "installing ${missing[*]}"
    SUDO=()
    [[ $(id -u) == 0 ]] || SUDO=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio >= 3.16 needed)"

# The command line as run, recorded with the results.
COMMAND_LINE=""
for v in $(compgen -e | grep -E '^(BENCH_|TANDEM_BIN$|FAULTPROXY_BIN$)' | sort); do
    [[ $v == BENCH_REPO || $v == BENCH_COMMAND ]] && continue
    COMMAND_LINE+="$v=$(printf '%q' "${!v}") "
done
COMMAND_LINE+="tools/bench.sh"

if [[ -z "${TANDEM_BIN:-}" || -z "${FAULTPROXY_BIN:-}" ]]; then
    log "cargo build --release (tandem, faultproxy)"
    (cd "$REPO" && cargo build --release --quiet -p tandem -p faultproxy --bin tandem --bin faultproxy)
    TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
    TANDEM_BIN=${TANDEM_BIN:-$TARGET_DIR/release/tandem}
    FAULTPROXY_BIN=${FAULTPROXY_BIN:-$TARGET_DIR/release/faultproxy}
fi
[[ -x "$TANDEM_BIN" ]] || die "tandem binary $TANDEM_BIN is not executable"
[[ -x "$FAULTPROXY_BIN" ]] || die "faultproxy binary $FAULTPROXY_BIN is not executable"

export TANDEM_BIN FAULTPROXY_BIN BENCH_REPO="$REPO" BENCH_COMMAND="$COMMAND_LINE"
export BENCH_RESULTS=${BENCH_RESULTS-$REPO/benches/RESULTS.md}
exec python3 "$REPO/tools/bench/bench.py"
