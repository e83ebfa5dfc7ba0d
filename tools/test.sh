#!/usr/bin/env bash
# Run the whole test suite, end-to-end tests included.
#
# Installs the Debian packages whose tools the end-to-end tests drive (only
# when one is missing), makes sure FUSE is usable, runs
# `cargo clippy --workspace --all-targets -- -D warnings` and
# `cargo fmt --all --check`, then
# `cargo nextest run --workspace --no-fail-fast` (or `cargo test --workspace`
# when cargo-nextest is not installed), then every fuzz target for
# FUZZ_SECONDS (default 30) seconds each (tools/fuzz/run.sh; a crash fails the
# run). Extra arguments are passed to the test runner, e.g.
# `tools/test.sh e2e_fio` or `tools/test.sh --test e2e_tls`; with arguments
# the fuzz step is skipped (FUZZ_SECONDS=0 skips it too).
#
# The e2e tests need root (loop devices, mount, FUSE); they run at most two at
# a time (see .config/nextest.toml) so that they do not starve each other.
set -euo pipefail

cd "$(dirname "$0")/.."

# command -> Debian package providing it
declare -A needs=(
  [qemu-io]=qemu-utils
  [qemu-img]=qemu-utils
  [qemu-storage-daemon]=qemu-utils # bench: tools/bench.sh smoke test (QEMU mirror)
  [mkfs.ext2]=e2fsprogs # bench: tests/volume_sparse.rs
  [fio]=fio
  [nbdcopy]=libnbd-bin
  [nbdinfo]=libnbd-bin
  [nbdfuse]=libnbd-bin
  [nbdkit]=nbdkit
  [fusermount3]=fuse3
  [mkfs.ext4]=e2fsprogs
  [e2fsck]=e2fsprogs
  # tests/e2e_powerloss.rs (power-cut disks): debugfs names the files that own
  # differing blocks; nbdkit's file plugin and cache filter come with nbdkit.
  [debugfs]=e2fsprogs
  [losetup]=util-linux
  [mount]=mount
  [curl]=curl
  [promtool]=prometheus
  [ocf-tester]=resource-agents
  # tests/e2e_ha_fencing.rs: deploy/pacemaker/tandem-fence-peer on a CIB file.
  [cibadmin]=pacemaker-cli-utils
  [xmllint]=libxml2-utils
  [systemd-analyze]=systemd
  [sshd]=openssh-server
  [ssh]=openssh-client
  [ip]=iproute2
  [nsenter]=util-linux
  # libFuzzer (tools/fuzz) is C++, built from source by libfuzzer-sys.
  [g++]=g++
)
missing=()
for cmd in "${!needs[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ] && ! [ -x "/sbin/$cmd" ]; then
    missing+=("${needs[$cmd]}")
  fi
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "test.sh: installing ${missing[*]}" >&2
  SUDO=()
  if [ "$(id -u)" != 0 ]; then SUDO=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! [ -e /dev/fuse ]; then
  echo "test.sh: /dev/fuse missing, loading the fuse module" >&2
  modprobe fuse || echo "test.sh: modprobe fuse failed; the FUSE test will fail" >&2
fi

start=$(date +%s)
status=0
echo "test.sh: cargo clippy --workspace --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings || status=$?
echo "test.sh: cargo fmt --all --check" >&2
cargo fmt --all --check || status=$?
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --config-file tools/nextest.toml "$@" || status=$?
else
  # Without nextest: test binaries run one after another; limit threads inside
  # each so that the heavy e2e tests of one file do not run all at once.
  cargo test --workspace --no-fail-fast "$@" -- --test-threads=2 || status=$?
fi
fuzz_seconds=${FUZZ_SECONDS:-30}
if (($# == 0)) && ((fuzz_seconds > 0)); then
  # Each target for a fixed time from its committed seeds; a crash fails the run.
  tools/fuzz/run.sh -t "$fuzz_seconds" || status=$?
fi
echo "test.sh: finished in $(( $(date +%s) - start )) s with status $status" >&2
exit "$status"
