#!/usr/bin/env bash
# Build the libFuzzer binaries of tools/fuzz with coverage instrumentation, on
# the stable toolchain: SanitizerCoverage through `-C passes=sancov-module` and
# LLVM flags (what cargo-fuzz passes, minus the sanitizer, which needs nightly).
# `--target` keeps the flags off build scripts and proc macros (they would not
# link against libFuzzer's coverage callbacks). Prints the binaries' directory.
#
# FUZZ_CMP=0 builds without `-sanitizer-coverage-trace-compares` (in a target
# dir of its own, target/fuzz-nocmp): libFuzzer then gets no operands of
# comparisons to steer its mutations by, but every comparison of the fuzzed code
# stops calling into libFuzzer. For the primary target that is ~55% of its CPU
# time (its engine walks maps and bitmaps); its inputs are opcodes and small
# numbers the harness maps onto the volume, with no magic values to find. Long
# campaigns of the primary target use it (README.md, session 7); run.sh and CI
# keep the comparisons.
set -euo pipefail
cd "$(dirname "$0")/../.."
triple=$(rustc -vV | sed -n 's/^host: //p')
cmp="-C llvm-args=-sanitizer-coverage-trace-compares"
dir=target/fuzz
if [ "${FUZZ_CMP:-1}" = 0 ]; then
  cmp=""
  dir=target/fuzz-nocmp
fi
export RUSTFLAGS="-C passes=sancov-module \
 -C llvm-args=-sanitizer-coverage-level=4 \
 -C llvm-args=-sanitizer-coverage-inline-8bit-counters \
 -C llvm-args=-sanitizer-coverage-pc-table \
 $cmp \
 -C target-feature=+popcnt \
 --cfg fuzzing -C debug-assertions -C overflow-checks -C codegen-units=16"
# A target dir of its own: these flags would otherwise invalidate the normal build.
# Only the fuzz_* binaries link libFuzzer's coverage callbacks; the recorder is
# built normally (record-seeds.sh).
bins=()
for t in frame secondary primary nbd_option nbd_request control; do bins+=(--bin "fuzz_$t"); done
cargo build --release --quiet -p tandem-fuzz --features libfuzzer "${bins[@]}" \
  --target "$triple" --target-dir "$dir" >&2
echo "$dir/$triple/release"
