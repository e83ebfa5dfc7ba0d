#!/usr/bin/env bash
# A long fuzzing campaign: each target in turn (one fuzzer process at a time,
# niced, so a shared machine stays usable) until it has run EXECS executions
# or HOURS hours, whichever comes first. Crashes are kept in
# target/fuzz/artifacts/TARGET/; the run goes on with the next target.
#
#   tools/fuzz/campaign.sh [-n EXECS] [-h HOURS | -s SECONDS] [TARGET...]   (default 10 000 000 executions, 2 h cap)
#
# Prints, per target: executions, time, new corpus size, crashes. Quote these
# figures (and the commit) when reporting a campaign.
set -euo pipefail
cd "$(dirname "$0")/../.."

execs=10000000
seconds=$((2 * 3600))
all=(frame secondary primary nbd_option nbd_request control)
while getopts "n:h:s:" opt; do
  case $opt in
    n) execs=$OPTARG ;;
    h) seconds=$((OPTARG * 3600)) ;;
    s) seconds=$OPTARG ;;
    *) echo "usage: $0 [-n EXECS] [-h HOURS | -s SECONDS] [TARGET...]" >&2; exit 2 ;;
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
  log="target/fuzz/campaign-$t.log"
  start=$(date +%s)
  # -runs stops after EXECS executions; -max_total_time caps the wall time.
  # -fork would survive crashes but needs more cores than this machine has.
  # -reload=0: one fuzzer per corpus (see run.sh): no rereading it every second.
  set +e
  nice -n 10 "$bin_dir/fuzz_$t" -runs="$execs" -max_total_time="$seconds" \
    -timeout=10 -rss_limit_mb=2048 -reload=0 -print_final_stats=1 -artifact_prefix="$artifacts/" \
    ${FUZZ_ARGS:-} "$work" "tools/fuzz/corpus/$t" "tools/fuzz/regressions/$t" > "$log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  crashes=$(find "$artifacts" -type f | wc -l)
  echo "campaign: $t executions=${runs:-?} seconds=$(( $(date +%s) - start )) exit=$rc corpus=$(ls "$work" | wc -l) crash_files=$crashes $(git rev-parse --short HEAD)"
done
