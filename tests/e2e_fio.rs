//! fio's own NBD engine (libnbd) runs 4 KiB random writes at queue depth 16
//! with crc32c verification headers, then reads everything back and
//! verifies it, through the primary's export. Passes in sync and async
//! mode, and afterwards (async: after the drain) both images are identical.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Pair, assert_same_file, run_with_timeout};

const SIZE_BYTES: u64 = 64 << 20;

fn fio_verify(pair: &Pair, seed: u64) {
    let out = run_with_timeout(
        Command::new("fio")
            .current_dir(pair.site.dir.path())
            .arg("--name=tandem-e2e")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", pair.nbd_uri()))
            .args([
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=64M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--end_fsync=1",
                "--verify_state_save=0",
            ])
            // fio parses the seed as a signed 64-bit number.
            .arg(format!("--randseed={}", seed >> 1)),
        Duration::from_secs(300),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed ({}):\n{text}", out.status);
    assert!(
        !text.contains("verify: bad") && !text.contains("bad magic"),
        "fio reported a verification failure:\n{text}"
    );
    assert!(text.contains("err= 0"), "fio reported an error:\n{text}");
}

#[test]
fn fio_crc32c_verify_sync() {
    let seed = common::seed("fio sync");
    let mut pair = Pair::start("sync", SIZE_BYTES);
    fio_verify(&pair, seed);
    // fio ended with a flush (end_fsync): in sync mode the secondary already holds
    // everything durably: a kill -9 of the secondary loses none of it.
    pair.restart_secondary(true);
    pair.secondary.stop();
    assert_same_file(&pair.primary_img, &pair.secondary_img);
    pair.primary.stop();
    assert_same_file(&pair.primary_img, &pair.secondary_img);
}

#[test]
fn fio_crc32c_verify_async() {
    let seed = common::seed("fio async");
    let mut pair = Pair::start("async", SIZE_BYTES);
    fio_verify(&pair, seed);
    pair.primary.stop();
    pair.secondary.stop();
    assert_same_file(&pair.primary_img, &pair.secondary_img);
}
