//! qemu-io, an NBD client nobody here wrote, writes through the primary's
//! export: patterned writes at aligned and unaligned offsets and lengths,
//! WRITE_ZEROES, discards, and batches of concurrent AIO writes, each batch
//! followed by a flush.
//!
//! The oracle is qemu-io itself: the same command list is replayed against a
//! local raw "model" image, and the primary must equal it byte for byte.
//! - sync mode (G1): the secondary equals the primary as soon as qemu-io's
//!   final flush returned, while both agents still run.
//! - async mode: the secondary equals the primary after the primary drained
//!   on SIGTERM.
//!
//! Discards are 4 KiB aligned: NBD leaves trimmed contents unspecified and a
//! client may drop the unaligned head and tail of a discard; aligned discards
//! punch holes on both image files, which read back as zeros.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Pair, TestRng, assert_same_file, run_with_timeout};

const SIZE_BYTES: u64 = 64 << 20;
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);

/// A seeded list of qemu-io commands, ending in a flush.
fn script(seed: u64, size_bytes: u64) -> Vec<String> {
    let mut rng = TestRng::new(seed);
    let mut cmds = Vec::new();
    // The edges of the device first: offset 0 and the very last bytes.
    cmds.push("write -P 0x11 0 4096".to_string());
    cmds.push(format!("write -P 0x22 {} 512", size_bytes - 512));
    cmds.push(format!("write -P 0x33 {} 7", size_bytes - 7));
    for i in 0..160u64 {
        // Half of the operations go to a 2 MiB hot region so that writes overlap.
        let region = if rng.below(2) == 0 {
            2 << 20
        } else {
            size_bytes
        };
        let aligned = rng.below(2) == 0;
        let len = if aligned {
            4096 * (1 + rng.below(64))
        } else {
            1 + rng.below(200_000)
        };
        let mut off = rng.below(region - len);
        if aligned {
            off &= !4095;
        }
        let pattern = 1 + rng.below(255);
        match rng.below(10) {
            0..=4 => cmds.push(format!("write -P {pattern} {off} {len}")),
            5 => cmds.push(format!("write -z {off} {len}")),
            6 => {
                let off = off & !4095;
                let len = 4096 * (1 + rng.below(32));
                cmds.push(format!("discard {off} {len}"));
            }
            7 => {
                // Write with FUA.
                cmds.push(format!("write -f -P {pattern} {off} {len}"));
            }
            _ => {
                // A batch of concurrent, non-overlapping AIO writes, then a flush.
                let n = 2 + rng.below(8);
                let chunk = 512 + rng.below(65_536);
                let base = rng.below(size_bytes - n * chunk);
                for k in 0..n {
                    let p = 1 + (pattern + k) % 255;
                    cmds.push(format!("aio_write -P {p} {} {chunk}", base + k * chunk));
                }
                cmds.push("aio_flush".to_string());
            }
        }
        if i % 40 == 39 {
            cmds.push("flush".to_string());
        }
    }
    cmds.push("flush".to_string());
    cmds
}

fn qemu_io(target: &str, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(target);
    let out = run_with_timeout(&mut cmd, QEMU_TIMEOUT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "qemu-io against {target} failed:\n{text}"
    );
    // qemu-io may report a failed command and still exit 0.
    for line in text.lines() {
        let l = line.to_ascii_lowercase();
        assert!(
            !(l.contains("error") || l.contains("failed")),
            "qemu-io against {target} reported: {line}"
        );
    }
}

/// Apply the same commands to a local raw image, the expected content.
fn model_image(dir: &Path, size_bytes: u64, cmds: &[String]) -> std::path::PathBuf {
    let model = dir.join("model.img");
    std::fs::File::create(&model)
        .and_then(|f| f.set_len(size_bytes))
        .expect("create model image");
    qemu_io(&model.display().to_string(), cmds);
    model
}

#[test]
fn sync_mode_secondary_identical_as_soon_as_flush_returns() {
    let seed = common::seed("qemu_io sync");
    let mut pair = Pair::start("sync", SIZE_BYTES);
    let cmds = script(seed, SIZE_BYTES);
    qemu_io(&pair.nbd_uri(), &cmds);
    // G1: everything the flush covered is durable on the secondary: kill it
    // (its journal keeps what was made durable), start it again, and its image
    // (copied from the journal at its clean stop) must hold every write.
    pair.restart_secondary(true);
    let model = model_image(pair.site.dir.path(), SIZE_BYTES, &cmds);
    assert_same_file(&model, &pair.primary_img);
    let status = pair.primary.status().expect("primary status");
    assert!(
        status["counters"]["client_writes"].as_u64().unwrap_or(0) > 100,
        "the writes went through the primary: {status}"
    );
    pair.secondary.stop();
    assert_same_file(&model, &pair.secondary_img);
    pair.primary.stop();
    assert_same_file(&model, &pair.primary_img);
    assert_same_file(&model, &pair.secondary_img);
}

#[test]
fn async_mode_secondary_identical_after_drain() {
    let seed = common::seed("qemu_io async");
    let mut pair = Pair::start("async", SIZE_BYTES);
    let cmds = script(seed, SIZE_BYTES);
    qemu_io(&pair.nbd_uri(), &cmds);
    let model = model_image(pair.site.dir.path(), SIZE_BYTES, &cmds);
    assert_same_file(&model, &pair.primary_img);
    // SIGTERM: the primary stops NBD, drains to the secondary, exits 0; the
    // secondary's clean stop copies its journal into its image.
    pair.primary.stop();
    pair.secondary.stop();
    assert_same_file(&model, &pair.secondary_img);
    assert_same_file(&pair.primary_img, &pair.secondary_img);
}
