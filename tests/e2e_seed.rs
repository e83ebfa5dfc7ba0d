//! Seeding a secondary from an old copy, and a secondary whose metadata lost
//! both superblock slots: every block is compared by blake3 hash and only the
//! blocks that differ cross the wire (ARCHITECTURE §5; issue: bad metadata is
//! never assumed in sync, and never answered with a blind full copy).

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use common::{
    NodeOpts, Site, TestRng, assert_same_file, free_port, primary_in_sync, seed, write_random_file,
};

const MIB: u64 = 1 << 20;

/// Overwrite `count` distinct random 4 KiB blocks of `path` with random data.
fn change_blocks(
    path: &std::path::Path,
    size_bytes: u64,
    count: u64,
    rng: &mut TestRng,
) -> std::collections::BTreeSet<u64> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = size_bytes / 4096;
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.below(blocks));
    }
    let mut buf = vec![0u8; 4096];
    for &b in &chosen {
        rng.fill(&mut buf);
        f.seek(SeekFrom::Start(b * 4096)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    chosen
}

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no counters.{name}: {s}"))
}

#[test]
fn seeded_secondary_with_one_percent_changed_moves_under_three_percent() {
    let seed = seed("seeded");
    let mut rng = TestRng::new(seed);
    let size = 1024 * MIB;
    let site = Site::new();
    let (p_img, s_img) = (site.path("primary.img"), site.path("secondary.img"));
    write_random_file(&p_img, size, seed);
    std::fs::copy(&p_img, &s_img).unwrap();
    // 1% of the blocks change on the primary's side after the copy was made.
    let changed_blocks = change_blocks(&p_img, size, size / 4096 / 100, &mut rng);

    let (port, nbd) = (free_port(), free_port());
    let seeded = NodeOpts {
        tls_dir: None,
        extra: vec!["--seeded".into()],
    };
    let mut sec = site.secondary("secondary", &s_img, size, port, &seeded);
    let mut pri = site.primary(
        "primary",
        &p_img,
        size,
        "sync",
        port,
        nbd,
        &NodeOpts::default(),
    );
    let s = pri.wait_status(
        "seeding to finish",
        Duration::from_secs(240),
        primary_in_sync,
    );
    let moved = counter(&s, "replicated_wire_bytes");
    let hashes = counter(&s, "verify_wire_bytes");
    eprintln!(
        "seeded: {:.1} MiB of data + {:.2} MiB of hash frames for a {} MiB volume; {} MiB compared; {} mismatches reported",
        moved as f64 / MIB as f64,
        hashes as f64 / MIB as f64,
        size / MIB,
        counter(&s, "verified_bytes") / MIB,
        counter(&s, "verify_mismatched_blocks")
    );
    // Every block is compared (ranges first, then the blocks of ranges that differ).
    assert!(
        counter(&s, "verified_bytes") >= size,
        "every block is compared by hash: {s}"
    );
    // Ranges first: far fewer hash bytes than one hash per block would take.
    assert!(
        hashes < size / 4096 * 32 / 2,
        "{hashes} bytes of hash frames: ranges were not compared first"
    );
    assert!(
        moved + hashes <= size * 3 / 100,
        "seeding moved {} bytes; at most 3% of {size} expected",
        moved + hashes
    );
    // Mismatches are reported per differing range (16 blocks), then per differing
    // block within those: exactly the changed blocks are found, and only they are sent.
    let ranges: std::collections::BTreeSet<u64> = changed_blocks
        .iter()
        .map(|b| b / tandem::engine::primary::RANGE_HASH_BLOCKS)
        .collect();
    assert_eq!(
        counter(&s, "verify_mismatched_blocks"),
        ranges.len() as u64 + changed_blocks.len() as u64,
        "{s}"
    );
    assert_eq!(
        counter(&s, "resync_bytes"),
        changed_blocks.len() as u64 * 4096,
        "exactly the changed blocks are sent as data: {s}"
    );
    // Once seeded, the node is an ordinary secondary: restarted with the same
    // --seeded flag, it resyncs by bitmap, not by another full comparison.
    sec.stop();
    let mut sec = site.secondary("secondary", &s_img, size, port, &seeded);
    let s = sec.wait_status("reconnected", Duration::from_secs(60), |s| {
        s["peer"]["connection"] == "connected" && s["disk_state"] == "UpToDate"
    });
    assert!(
        s["handshake"]
            .as_str()
            .unwrap_or_default()
            .starts_with("bitmap resync"),
        "{s}"
    );
    pri.stop();
    sec.stop();
    assert_same_file(&p_img, &s_img);
}

#[test]
fn secondary_with_both_superblock_slots_destroyed_is_rebuilt_and_compared_by_hash() {
    let seed = seed("both slots bad");
    let mut rng = TestRng::new(seed);
    let size = 128 * MIB;
    let site = Site::new();
    let (p_img, s_img) = (site.path("primary.img"), site.path("secondary.img"));
    write_random_file(&p_img, size, seed);
    let (port, nbd) = (free_port(), free_port());
    let mut sec = site.secondary("secondary", &s_img, size, port, &NodeOpts::default());
    let mut pri = site.primary(
        "primary",
        &p_img,
        size,
        "sync",
        port,
        nbd,
        &NodeOpts::default(),
    );
    pri.wait_status("initial sync", Duration::from_secs(120), primary_in_sync);
    sec.stop();

    // Both 4 KiB superblock slots of the secondary's metadata are overwritten.
    let meta = {
        let mut p = s_img.clone().into_os_string();
        p.push(".tandem-meta");
        std::path::PathBuf::from(p)
    };
    let mut junk = vec![0u8; 8192];
    rng.fill(&mut junk);
    let mut f = std::fs::OpenOptions::new().write(true).open(&meta).unwrap();
    f.write_all(&junk).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let before = pri.status().expect("primary status");

    let mut sec = site.secondary(
        "secondary-rebuilt",
        &s_img,
        size,
        port,
        &NodeOpts::default(),
    );
    let s = pri.wait_status(
        "the rebuilt secondary to converge",
        Duration::from_secs(120),
        |s| primary_in_sync(s) && s["counters"]["sessions"].as_u64() >= Some(2),
    );
    let log = sec.log_text();
    assert!(
        log.contains("both superblock slots are bad")
            && log.contains("compared with the primary's by hash"),
        "the secondary says what happened:\n{log}"
    );
    let verified = counter(&s, "verified_bytes") - counter(&before, "verified_bytes");
    let data = counter(&s, "replicated_wire_bytes") - counter(&before, "replicated_wire_bytes");
    eprintln!(
        "rebuilt: {} MiB compared by hash, {} MiB of data sent",
        verified / MIB,
        data / MIB
    );
    assert_eq!(
        verified, size,
        "every block is compared, never assumed in sync"
    );
    assert!(
        data < size / 20,
        "identical data is not copied again ({data} bytes sent)"
    );
    let aside = std::fs::read_dir(site.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(".tandem-meta.damaged-")
        });
    assert!(aside, "the damaged metadata is kept beside the new one");
    pri.stop();
    sec.stop();
    assert_same_file(&p_img, &s_img);
}
