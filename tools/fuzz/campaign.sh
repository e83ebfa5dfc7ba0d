#!/usr/bin/env bash
# A long fuzzing campaign: each target in turn (one fuzzer process at a time,
# niced, so a shared machine stays usable) until it has run EXECS executions
# or HOURS hours, whichever comes first. Crashes are kept in
# target/fuzz/artifacts/TARGET/; the run goes on with the next target.
#
#   tools/fuzz/campaign.sh [-n EXECS] [-h HOURS | -s SECONDS] [-j WORKERS] [TARGET...]
#   (default 10 000 000 executions, 2 h cap, one worker)
#
# -j N runs N fuzzer processes of a target side by side (one per core), each
# with its own seed and log (target/fuzz/campaign-TARGET.W.log), sharing the
# corpus directory (each writes its finds there; -reload=0, so none rereads the
# others'); each runs EXECS/N executions, and the line printed adds them up.
# FUZZ_SEED sets the first worker's seed (the others count up from it).
#
# Prints, per target: executions, time, new corpus size, crashes. Quote these
# figures (and the commit) when reporting a campaign.
set -euo pipefail
cd "$(dirname "$0")/../.."

execs=10000000
seconds=$((2 * 3600))
workers=1
all=(frame secondary primary nbd_option nbd_request control)
while getopts "n:h:s:j:" opt; do
  case $opt in
    n) execs=$OPTARG ;;
    h) seconds=$((OPTARG * 3600)) ;;
    s) seconds=$OPTARG ;;
    j) workers=$OPTARG ;;
    *) echo "usage: $0 [-n EXECS] [-h HOURS | -s SECONDS] [-j WORKERS] [TARGET...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
targets=("$@")
if ((${#targets[@]} == 0)); then targets=("${all[@]}"); fi

bin_dir=$(tools/fuzz/build.sh)
for t in "${targets[@]}"; do
  work="target/fuzz/corpus/$t"
  artifacts="target/fuzz/artifacts/$t"
  mkdir -p "$work" "$artifacts" "tools/fuzz/regressions/$t"
  start=$(date +%s)
  seed0=${FUZZ_SEED:-$(( (start % 100000) * 10 ))}
  per_worker=$(( (execs + workers - 1) / workers ))
  # -runs stops after the executions; -max_total_time caps the wall time.
  # -fork would survive crashes but needs more cores than this machine has.
  # -reload=0: no rereading the corpus every second (see run.sh).
  pids=() logs=()
  for ((w = 1; w <= workers; w++)); do
    log="target/fuzz/campaign-$t.log"
    if ((workers > 1)); then log="target/fuzz/campaign-$t.$w.log"; fi
    logs+=("$log")
    nice -n 10 "$bin_dir/fuzz_$t" -runs="$per_worker" -max_total_time="$seconds" -seed=$((seed0 + w - 1)) \
      -timeout=10 -rss_limit_mb=2048 -reload=0 -print_final_stats=1 -artifact_prefix="$artifacts/" \
      ${FUZZ_ARGS:-} "$work" "tools/fuzz/corpus/$t" "tools/fuzz/regressions/$t" > "$log" 2>&1 &
    pids+=($!)
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  runs=0 each=""
  for log in "${logs[@]}"; do
    r=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    runs=$((runs + ${r:-0}))
    each="$each${each:+,}${r:-?}"
  done
  crashes=$(find "$artifacts" -type f | wc -l)
  echo "campaign: $t executions=$runs (workers: $each) seeds=$seed0.. seconds=$(( $(date +%s) - start )) exit=$rc corpus=$(ls "$work" | wc -l) crash_files=$crashes $(git rev-parse --short HEAD)"
done
