//! Block status on the primary's export, as a backup tool sees it, with the
//! real agent on sparse image files:
//!
//! - `nbdinfo --map` shows the holes of a 64 GiB sparse image and exactly the
//!   extents written through the export; `qemu-img map` over NBD agrees;
//!   `nbdcopy` and `qemu-img convert` from the export give sparse copies (their
//!   allocation is the data's size, not the volume's) with identical contents.
//! - `nbdinfo --map=qemu:dirty-bitmap:NAME` shows exactly the blocks written since
//!   `tandem checkpoint create NAME`, also after a clean restart; after kill -9 it
//!   shows a superset (the written blocks plus whole 64 MiB extents written since
//!   the last save), and `tandem checkpoint list` says so.
//!
//! The primary runs alone (its peer address has no listener): block status does
//! not depend on replication. Not covered here: power loss (the checkpoint
//! store's unit tests tear its files; see src/checkpoint.rs).

mod common;
mod nbd_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::assert_same_sparse;
use common::{Agent, NodeOpts, Site, free_port, run_ok, run_with_timeout};
use nbd_support::{allocated_bytes, parse_map, ranges_where};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(180);

fn start_primary(site: &Site, label: &str, image: &Path, size: u64, nbd_port: u16) -> Agent {
    let mut agent = site.primary(
        label,
        image,
        size,
        "async",
        free_port(),
        nbd_port,
        &NodeOpts::default(),
    );
    agent.wait_status("serving", TIMEOUT, |_| true);
    agent
}

fn qemu_io(url: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", url]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd, TIMEOUT);
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

fn map(url: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let mut cmd = Command::new("nbdinfo");
    match context {
        Some(c) => cmd.arg(format!("--map={c}")),
        None => cmd.arg("--map"),
    };
    parse_map(&run_ok(cmd.arg(url), TIMEOUT))
}

fn checkpoint(control: &Path, args: &[&str]) -> (bool, String) {
    let out = run_with_timeout(
        Command::new(common::tandem_bin())
            .arg("checkpoint")
            .args(args)
            .arg("--control")
            .arg(control),
        TIMEOUT,
    );
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn map_of_a_64_gib_sparse_primary_shows_holes_and_sparse_copies_stay_sparse() {
    let site = Site::new();
    let image = site.path("primary.img");
    let nbd_port = free_port();
    let size = 64 * GIB;
    let mut primary = start_primary(&site, "primary", &image, size, nbd_port);
    let url = format!("nbd://127.0.0.1:{nbd_port}");
    // Data at 1 MiB (2 MiB), 10 GiB (1 MiB), 40 GiB + 64 KiB (64 KiB), 63 GiB (4 KiB).
    qemu_io(
        &url,
        &[
            "write -P 0x11 1M 2M",
            "write -P 0x22 10G 1M",
            "write -P 0x33 40961M 64k",
            "write -P 0x44 63G 4k",
            "flush",
        ],
    );
    let want_data = vec![
        (MIB, 3 * MIB),
        (10 * GIB, 10 * GIB + MIB),
        (40961 * MIB, 40961 * MIB + 65536),
        (63 * GIB, 63 * GIB + 4096),
    ];
    let alloc = map(&url, None);
    let (data, total) = ranges_where(&alloc, |t| t & 1 == 0);
    assert_eq!(total, size);
    assert_eq!(data, want_data, "nbdinfo --map: {alloc:?}");
    // Holes read as zeroes: hole and zero together.
    let (holes, _) = ranges_where(&alloc, |t| t == 3);
    assert_eq!(
        holes.iter().map(|(s, e)| e - s).sum::<u64>(),
        size - 2 * MIB - MIB - 65536 - 4096
    );

    // qemu-img over NBD (extended headers, 64-bit block status) agrees.
    let qmap: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &url]),
        TIMEOUT,
    ))
    .unwrap();
    let mut qdata = Vec::new();
    for e in qmap.as_array().unwrap() {
        if e["data"] == true {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match qdata.last_mut() {
                Some((_, end)) if *end == s => *end = s + l,
                _ => qdata.push((s, s + l)),
            }
        }
    }
    assert_eq!(qdata, want_data, "qemu-img map: {qmap}");

    // Copies through the export are sparse and identical.
    let data_bytes = 2 * MIB + MIB + 65536 + 4096;
    for (tool, copy) in [
        ("nbdcopy", site.path("nbdcopy.img")),
        ("qemu-img", site.path("convert.img")),
    ] {
        let mut cmd = Command::new(tool);
        if tool == "nbdcopy" {
            cmd.arg(&url).arg(&copy);
            std::fs::File::create(&copy).unwrap().set_len(size).unwrap();
        } else {
            cmd.args(["convert", "-f", "raw", "-O", "raw", &url])
                .arg(&copy);
        }
        run_ok(&mut cmd, TIMEOUT);
        let allocated = allocated_bytes(&copy);
        eprintln!(
            "{tool}: {allocated} bytes allocated for {data_bytes} bytes of data in a {size}-byte volume"
        );
        assert!(
            allocated <= data_bytes + 8 * MIB,
            "{tool} copy allocates {allocated} bytes for {data_bytes} bytes of data"
        );
        assert_same_sparse(&image, &copy);
        std::fs::remove_file(&copy).unwrap();
    }
    // The feature flags a client asks about.
    for (q, flag, code) in [
        ("--can", "structured-reply", 0),
        ("--can", "cache", 0),
        ("--can", "fast-zero", 0),
        ("--can", "multi-conn", 0),
        ("--is", "read-only", 2),
    ] {
        let status = Command::new("nbdinfo")
            .args([q, flag, &url])
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(code), "nbdinfo {q} {flag}");
    }
    primary.stop();
}

fn dirty(url: &str, name: &str) -> Vec<(u64, u64)> {
    let m = map(url, Some(&format!("qemu:dirty-bitmap:{name}")));
    let (dirty, total) = ranges_where(&m, |t| t & 1 == 1);
    assert_eq!(total, 16 * GIB);
    dirty
}

fn covers(outer: &[(u64, u64)], inner: &[(u64, u64)]) -> bool {
    inner
        .iter()
        .all(|&(s, e)| outer.iter().any(|&(os, oe)| os <= s && e <= oe))
}

#[test]
fn dirty_bitmap_is_exact_across_a_clean_restart_and_a_superset_after_kill_9() {
    let site = Site::new();
    let image = site.path("primary.img");
    let nbd_port = free_port();
    let size = 16 * GIB;
    let mut primary = start_primary(&site, "primary", &image, size, nbd_port);
    let control = primary.control.clone();
    let url = format!("nbd://127.0.0.1:{nbd_port}");
    // Before the checkpoint: not in it.
    qemu_io(&url, &["write -P 0x01 0 1M", "write -P 0x02 8G 64k"]);
    let (ok, out) = checkpoint(&control, &["create", "daily"]);
    assert!(ok, "{out}");
    assert!(out.contains("qemu:dirty-bitmap:daily"), "{out}");
    // Bad input: a name that cannot be a context leaf, and a duplicate.
    let (ok, out) = checkpoint(&control, &["create", "two words"]);
    assert!(!ok && out.contains("invalid checkpoint name"), "{out}");
    let (ok, out) = checkpoint(&control, &["create", "daily"]);
    assert!(!ok && out.contains("already exists"), "{out}");
    // After: writes, zeroes and a trim.
    qemu_io(
        &url,
        &[
            "write -P 0x03 5G 4k",
            "write -P 0x04 12352M 64k",
            "write -z 3G 1M",
            "discard 1G 64k",
            "write -P 0x05 8G 4k",
        ],
    );
    let want = vec![
        (GIB, GIB + 65536),
        (3 * GIB, 3 * GIB + MIB),
        (5 * GIB, 5 * GIB + 4096),
        (8 * GIB, 8 * GIB + 4096),
        (12352 * MIB, 12352 * MIB + 65536),
    ];
    assert_eq!(dirty(&url, "daily"), want);
    let (ok, list) = checkpoint(&control, &["list"]);
    assert!(
        ok && list.contains("daily") && list.contains("exact"),
        "{list}"
    );

    // A clean restart keeps the map exactly.
    primary.stop();
    let mut primary = start_primary(&site, "primary-2", &image, size, nbd_port);
    assert_eq!(dirty(&url, "daily"), want);

    // kill -9 after a write: the map may grow, never shrink.
    qemu_io(&url, &["write -P 0x06 9G 4k"]);
    primary.signal(libc::SIGKILL);
    primary.wait_exit(TIMEOUT);
    let mut primary = start_primary(&site, "primary-3", &image, size, nbd_port);
    let control = primary.control.clone();
    let after = dirty(&url, "daily");
    let mut must = want.clone();
    must.push((9 * GIB, 9 * GIB + 4096));
    assert!(covers(&after, &must), "{after:?} misses some of {must:?}");
    // Over-approximated by the 64 MiB extent written since the last save, no more.
    assert!(
        covers(&after, &[(9 * GIB, 9 * GIB + 64 * MIB)]),
        "{after:?}"
    );
    let marked: u64 = after.iter().map(|(s, e)| e - s).sum();
    assert!(
        marked <= 64 * MIB + 2 * MIB,
        "{marked} bytes marked: {after:?}"
    );
    let (ok, list) = checkpoint(&control, &["list", "--json"]);
    assert!(ok, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["state"], "over-approximated", "{list}");
    assert!(
        list[0]["reason"].as_str().unwrap().contains("uncleanly"),
        "{list}"
    );

    // Removed: the context is gone.
    let (ok, out) = checkpoint(&control, &["remove", "daily"]);
    assert!(ok, "{out}");
    let out = run_with_timeout(
        Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:daily", &url]),
        TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "a removed checkpoint is still served"
    );
    primary.stop();
}
