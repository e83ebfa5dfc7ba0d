#!/usr/bin/env bash
# Power-loss campaign (issue 9, item 3): many seeded trials, each a fresh pair of
# agents whose disks lose their unflushed writes when their power is cut; see
# tools/powerloss/README.md for the construction and tests/e2e_powerloss.rs for
# the checks. Figures go to a JSON-lines file (one line per trial) and a summary
# table at the end; the exit status is non-zero when any trial failed a check.
#
# Usage (as root: loop devices, FUSE, mount):
#   TRIALS=50 tools/powerloss/run.sh                 # 50 per role per mode
#   SEED=123 TRIALS=5 MODES=sync ROLES=primary tools/powerloss/run.sh
#   POWERLOSS_TRIAL_SEED=... ROLES=both MODES=sync tools/powerloss/run.sh  # replay one trial
#
# Variables (POWERLOSS_X or the short name X):
#   TRIALS      trials per role and mode (default 50); roles and modes interleave
#   ROLES       comma list of primary,secondary,both,secondary-resync (default the
#               first three; secondary-resync: the secondary loses power mid-resync)
#   MODES       comma list of sync,async (default both)
#   SIZE        volume size, sparse (default 16G)
#   AL_EXTENTS  --al-extents of both agents (default 32: 128 MiB of active extents,
#               so the workload's spread writes make extents retire)
#   AL_EXTENT_SIZE        --al-extent-size of both agents (default: the agent's, 4M)
#   AL_EXTENT_SIZE_AFTER  --al-extent-size at every restart after the cut (default:
#               the same): recovery must use the size the crashed run logged
#   CUT_MS      MIN..MAX ms after the workload starts when the power is cut (2500..8000)
#   CUT_IN_SPREAD=1  cut only once an O_DIRECT job has run 0.5-1.5 s (as the CI trials do)
#   CONVERGE_S  how long the pair may take to converge after a restart (600)
#   SEED        master seed (default random, printed); each trial's seed derives from it
#   OUT         results file (default target/powerloss/campaign-SEED.jsonl)
#   KEEP=1      keep each trial's directory (disks, logs) for inspection
#   touch DIR_OF_OUT/STOP (target/powerloss/STOP) to end a campaign after the running
#   trial; the summary table is printed as usual.
#   PROFILE     cargo profile: release (default; a 16 GiB initial sync in a debug
#               build takes minutes) or dev
set -euo pipefail
cd "$(dirname "$0")/../.."

for v in TRIALS ROLES MODES SIZE AL_EXTENTS AL_EXTENT_SIZE AL_EXTENT_SIZE_AFTER CUT_MS CUT_IN_SPREAD CONVERGE_S SEED OUT KEEP; do
  if [ -n "${!v:-}" ] && [ -z "$(eval echo "\${POWERLOSS_$v:-}")" ]; then
    export "POWERLOSS_$v=${!v}"
  fi
done
if [ -n "${POWERLOSS_TRIAL_SEED:-}" ]; then
  export POWERLOSS_TRIAL_SEED
fi

profile=(--release)
if [ "${PROFILE:-release}" = dev ]; then profile=(); fi

if [ "$(id -u)" != 0 ]; then
  echo "run.sh: needs root (loop devices, FUSE, mount)" >&2
  exit 2
fi
for cmd in nbdkit nbdfuse fio mkfs.ext4 e2fsck debugfs losetup; do
  if ! command -v "$cmd" >/dev/null && ! [ -x "/usr/sbin/$cmd" ] && ! [ -x "/sbin/$cmd" ]; then
    echo "run.sh: $cmd missing; tools/test.sh installs the packages (or apt-get install nbdkit libnbd-bin fio e2fsprogs fuse3)" >&2
    exit 2
  fi
done

start=$(date +%s)
status=0
cargo test "${profile[@]}" --test e2e_powerloss -- \
  --ignored --exact powerloss_campaign --nocapture --test-threads=1 || status=$?
echo "run.sh: finished in $(( $(date +%s) - start )) s with status $status" >&2
exit "$status"
