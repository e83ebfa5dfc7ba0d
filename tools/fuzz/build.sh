#!/usr/bin/env bash
# Build the libFuzzer binaries of tools/fuzz with coverage instrumentation, on
# the stable toolchain: SanitizerCoverage through `-C passes=sancov-module` and
# LLVM flags (what cargo-fuzz passes, minus the sanitizer, which needs nightly).
# `--target` keeps the flags off build scripts and proc macros (they would not
# link against libFuzzer's coverage callbacks). Prints the binaries' directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-C passes=sancov-module \
 -C llvm-args=-sanitizer-coverage-level=4 \
 -C llvm-args=-sanitizer-coverage-inline-8bit-counters \
 -C llvm-args=-sanitizer-coverage-pc-table \
 -C llvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -C debug-assertions -C overflow-checks -C codegen-units=16"
# A target dir of its own: these flags would otherwise invalidate the normal build.
# Only the fuzz_* binaries link libFuzzer's coverage callbacks; the recorder is
# built normally (record-seeds.sh).
bins=()
for t in frame secondary primary nbd_option nbd_request control; do bins+=(--bin "fuzz_$t"); done
cargo build --release --quiet -p tandem-fuzz --features libfuzzer "${bins[@]}" \
  --target "$triple" --target-dir target/fuzz >&2
echo "target/fuzz/$triple/release"
