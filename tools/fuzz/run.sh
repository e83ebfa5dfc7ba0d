#!/usr/bin/env bash
# Run fuzz targets for a fixed time each and fail on the first crash.
#
#   tools/fuzz/run.sh [-t SECONDS] [-j] [TARGET...]   (default: every target, 30 s each)
#
# The binaries are built by tools/fuzz/build.sh (coverage-instrumented, stable
# toolchain). Each target starts from its committed seeds
# (tools/fuzz/corpus/TARGET) and past crashes (tools/fuzz/regressions/TARGET);
# inputs it finds go to target/fuzz/corpus/TARGET (kept between runs, never
# committed). A crash leaves its input in target/fuzz/artifacts/TARGET/ and
# the script exits non-zero, printing how to keep it as a regression test.
# Extra libFuzzer flags: FUZZ_ARGS="-max_len=4096 ...". FUZZ_WORK=DIR keeps the
# inputs found in DIR/TARGET instead of target/fuzz/corpus/TARGET.
#
# The random seed is fixed (FUZZ_SEED, default 1) so that a run is repeatable:
# the same tree, seed and starting corpus make the same inputs in the same
# order, and a CI run (a fresh clone: no inputs kept from earlier runs) covers
# a prefix of what `FUZZ_SEED=1 tools/fuzz/run.sh -t LONGER` covered locally
# from an empty target/fuzz/corpus. Finding new bugs is the job of the long
# campaigns (tools/fuzz/campaign.sh, random seeds); FUZZ_SEED=0 asks libFuzzer
# for a random seed here too.
#
# Each target also stops after a fixed number of executions (`runs` below, or
# FUZZ_RUNS for every target), about what 30 s give on an idle machine: a faster
# CI machine then never goes past what `tools/fuzz/run.sh -t 1200` (the caps
# alone) covered locally on the same tree.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=30
all=(frame secondary primary nbd_option nbd_request control)
while getopts "t:" opt; do
  case $opt in
    t) seconds=$OPTARG ;;
    *) echo "usage: $0 [-t SECONDS] [TARGET...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
targets=("$@")
if ((${#targets[@]} == 0)); then targets=("${all[@]}"); fi

declare -A runs=([frame]=2000000 [secondary]=150000 [primary]=20000
  [nbd_option]=1500000 [nbd_request]=15000000 [control]=2500000)

bin_dir=$(tools/fuzz/build.sh)
status=0
for t in "${targets[@]}"; do
  bin="$bin_dir/fuzz_$t"
  [ -x "$bin" ] || { echo "run.sh: no target '$t' (known: ${all[*]})" >&2; exit 2; }
  work="${FUZZ_WORK:-target/fuzz/corpus}/$t"
  artifacts="target/fuzz/artifacts/$t"
  mkdir -p "$work" "$artifacts" "tools/fuzz/regressions/$t"
  seed=${FUZZ_SEED:-1}
  max_runs=${FUZZ_RUNS:-${runs[$t]}}
  echo "run.sh: fuzzing $t for $seconds s or $max_runs executions (seed $seed)" >&2
  # -timeout: one input taking over 10 s is a hang and counts as a crash.
  # -rss_limit_mb: the decoders must stay far below this on any input.
  # -reload=0: one fuzzer per corpus, so nobody else adds inputs to it; the
  # default rereads (lists and reads) the whole corpus directory every second
  # (a tenth of the primary target's time with a kept corpus of ~1 400 inputs).
  if ! "$bin" -seed="$seed" -runs="$max_runs" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -reload=0 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-} \
      "$work" "tools/fuzz/corpus/$t" "tools/fuzz/regressions/$t" \
      > "target/fuzz/$t.log" 2>&1; then
    status=1
    tail -n 60 "target/fuzz/$t.log" >&2
    echo "run.sh: target $t CRASHED; input(s): $(ls "$artifacts")" >&2
    echo "run.sh: keep it as a regression test: cp $artifacts/<crash-file> tools/fuzz/regressions/$t/<what-it-found>" >&2
  else
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "target/fuzz/$t.log" | sed "s/^/run.sh: $t /" >&2
  fi
done
exit "$status"
