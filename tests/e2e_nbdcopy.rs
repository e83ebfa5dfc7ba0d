//! nbdcopy (libnbd) copies a 256 MiB random image into the primary's export
//! with its own parallel, multi-connection request pattern, and flushes.
//! Sync mode: both images equal the source as soon as nbdcopy returned (G1),
//! and still after both agents stopped cleanly.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Pair, assert_same_file, run_ok, write_random_file};

const SIZE_BYTES: u64 = 256 << 20;

#[test]
fn nbdcopy_random_image_into_sync_export() {
    let seed = common::seed("nbdcopy");
    let mut pair = Pair::start("sync", SIZE_BYTES);
    let source = pair.site.path("source.img");
    write_random_file(&source, SIZE_BYTES, seed);
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&source)
            .arg(pair.nbd_uri()),
        Duration::from_secs(180),
    );
    assert_same_file(&source, &pair.primary_img);
    // `--flush`: in sync mode the secondary holds it all durably (kill -9 loses none).
    pair.restart_secondary(true);
    let status = pair.primary.status().expect("primary status");
    assert!(
        status["counters"]["client_write_bytes"]
            .as_u64()
            .unwrap_or(0)
            >= SIZE_BYTES,
        "the whole image went through the export: {status}"
    );
    pair.stop();
    assert_same_file(&source, &pair.primary_img);
    assert_same_file(&source, &pair.secondary_img);
}
