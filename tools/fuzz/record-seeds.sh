#!/usr/bin/env bash
# Record real replication and NBD traffic and cut it into the committed seed
# corpora (tools/fuzz/corpus/TARGET). Runs a plaintext primary and secondary
# on loopback with the recording proxy (fuzz-record) between them, and a
# second one between qemu-io / nbdinfo and the primary's export; writes,
# zeroes, trims, flushes and a restart with a bitmap resync make the traffic.
#
#   tools/fuzz/record-seeds.sh            (replaces the recorded seeds rec-*)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet --bin tandem -p tandem -p tandem-fuzz --bin fuzz-record
bin=target/debug
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sec_port=$(port); rep_proxy=$(port); nbd_port=$(port); nbd_proxy=$(port)
size=$((64 << 20))

"$bin/fuzz-record" proxy --listen "127.0.0.1:$rep_proxy" --to "127.0.0.1:$sec_port" --out "$work/rep" &
pids+=($!)
"$bin/fuzz-record" proxy --listen "127.0.0.1:$nbd_proxy" --to "127.0.0.1:$nbd_port" --out "$work/nbd" &
pids+=($!)

"$bin/tandem" secondary --volume "$work/s.img" --size "$size" --listen "127.0.0.1:$sec_port" \
  --danger-plaintext --control "$work/s.sock" > "$work/s.log" 2>&1 &
pids+=($!)
start_primary() {
  "$bin/tandem" primary --volume "$work/p.img" --size "$size" --peer "127.0.0.1:$rep_proxy" \
    --nbd "127.0.0.1:$nbd_port" --mode sync --danger-plaintext --control "$work/p.sock" \
    > "$work/p.log" 2>&1 &
  primary=$!
  pids+=($primary)
  for _ in $(seq 100); do
    if "$bin/tandem" status --control "$work/p.sock" --json 2>/dev/null | grep -Eq '"connection": *"connected"'; then
      return
    fi
    sleep 0.2
  done
  echo "record-seeds: the primary did not connect; log:" >&2
  cat "$work/p.log" >&2
  exit 1
}
start_primary
uri="nbd://127.0.0.1:$nbd_proxy"
nbdinfo "$uri" > /dev/null
nbdinfo --list "$uri" > /dev/null
qemu-io -f raw -c "write -P 0xab 0 64k" -c "write -P 0x11 1M 4k" -c "write -z 2M 128k" \
  -c "discard 4M 64k" -c "flush" -c "write -P 0x5a -f 8M 512" -c "read 0 64k" "$uri" > /dev/null
# Incompressible data (zstd frames stay raw) and compressible (they shrink).
head -c 65536 /dev/urandom > "$work/rand"
qemu-io -f raw -c "write -s $work/rand 16M 64k" -c "aio_write -P 0x01 20M 4k" \
  -c "aio_write -P 0x02 20M 4k" -c aio_flush "$uri" > /dev/null
# A restart of the primary: the reconnect runs a bitmap resync.
kill "$primary"; wait "$primary" 2>/dev/null || true
start_primary
qemu-io -f raw -c "write -P 0x77 32M 8k" -c flush "$uri" > /dev/null
sleep 1
kill "$primary"; wait "$primary" 2>/dev/null || true
sleep 0.5
find tools/fuzz/corpus -name 'rec-*' -delete 2>/dev/null || true
"$bin/fuzz-record" seeds --replication "$work/rep" --nbd "$work/nbd" --corpus tools/fuzz/corpus
# Control: the request lines tandem's CLI sends (first byte: the chunk size
# the target feeds them in).
mkdir -p tools/fuzz/corpus/control
printf '\x10{"cmd":"status"}\n' > tools/fuzz/corpus/control/rec-status
printf '\x07{"cmd":"status","resource":"r0"}\n{"cmd":"events","args":{"since":0}}\n' > tools/fuzz/corpus/control/rec-events
printf '\x1f{"cmd":"events","resource":"r0","args":{"follow":true,"since":12}}\n' > tools/fuzz/corpus/control/rec-follow
printf '\x03{"cmd":"promote","args":{"force":false}}\n{"cmd":"demote","args":{"timeout_s":30}}\r\n' > tools/fuzz/corpus/control/rec-roles
printf '\x05{"cmd":"verify","args":{"repair":true,"rate":104857600}}\n{"cmd":"verify-result"}\n{"cmd":"resolve","args":{"discard_local":true}}\n' > tools/fuzz/corpus/control/rec-verify
du -sh tools/fuzz/corpus
