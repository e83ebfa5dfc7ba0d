//! Negative cases of peer authentication and identity (G6, G7), with real
//! agent processes: a refused primary never writes a byte to the secondary's
//! volume, the secondary keeps running, and a correct primary can still pair
//! with it afterwards.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    Agent, NodeOpts, READY_TIMEOUT, Site, file_digest, free_port, make_certs, primary_in_sync,
    run_with_timeout, wait_until, write_random_file,
};

const SIZE_BYTES: u64 = 64 << 20;
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);

/// A secondary on a pre-filled random image (so "untouched" is meaningful).
struct Target {
    secondary: Agent,
    img: std::path::PathBuf,
    digest: String,
    port: u16,
}

fn start_target(site: &Site, seed: u64) -> Target {
    let img = site.path("secondary.img");
    write_random_file(&img, SIZE_BYTES, seed);
    let digest = file_digest(&img);
    let port = free_port();
    let mut secondary = site.secondary("secondary", &img, SIZE_BYTES, port, &NodeOpts::default());
    secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
    Target {
        secondary,
        img,
        digest,
        port,
    }
}

/// The primary keeps retrying and never pairs: it reports an error and stays "connecting".
fn assert_primary_refused(primary: &mut Agent) -> String {
    let s = primary.wait_status("a recorded connection error", REFUSAL_TIMEOUT, |s| {
        s["last_error"].is_string()
    });
    assert_eq!(s["peer"]["connection"], "connecting", "status: {s}");
    s["last_error"].as_str().unwrap_or_default().to_string()
}

/// After a refusal: the secondary still runs, is not paired, and its image is unchanged.
fn assert_target_untouched(t: &mut Target) {
    // Give a wrongly accepted session time to write something.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        t.secondary.is_running(),
        "the secondary must survive a refused peer"
    );
    let s = t.secondary.status().expect("secondary status");
    assert_ne!(s["peer"]["connection"], "connected", "status: {s}");
    assert_eq!(
        file_digest(&t.img),
        t.digest,
        "the secondary's volume was written by a refused peer"
    );
}

/// A correct primary pairs with the secondary and syncs it fully.
fn assert_correct_primary_pairs(site: &Site, t: &mut Target) {
    let img = site.path("good-primary.img");
    let mut good = site.primary(
        "good-primary",
        &img,
        SIZE_BYTES,
        "sync",
        t.port,
        free_port(),
        &NodeOpts::default(),
    );
    good.wait_status("connected and in sync", READY_TIMEOUT, primary_in_sync);
    good.stop();
    t.secondary.stop();
    common::assert_same_file(&img, &t.img);
}

#[test]
fn foreign_ca_is_refused_and_a_correct_primary_pairs_afterwards() {
    let seed = common::seed("tls foreign ca");
    let site = Site::new();
    let foreign = site.path("foreign-certs");
    make_certs(&foreign, &["primary", "secondary"]);
    let mut t = start_target(&site, seed);
    let mut bad = site.primary(
        "foreign-primary",
        &site.path("foreign-primary.img"),
        SIZE_BYTES,
        "sync",
        t.port,
        free_port(),
        &NodeOpts {
            tls_dir: Some(foreign),
            extra: vec![],
        },
    );
    assert_primary_refused(&mut bad);
    wait_until("the secondary logs the refusal", REFUSAL_TIMEOUT, || {
        t.secondary.log_text().contains("refused a connection")
    });
    assert_target_untouched(&mut t);
    bad.stop();
    assert_correct_primary_pairs(&site, &mut t);
}

#[test]
fn primary_presenting_another_name_is_refused() {
    let seed = common::seed("tls wrong client name");
    let site = Site::with_names(&["primary", "secondary", "other"]);
    let mut t = start_target(&site, seed);
    let mut bad = site.primary(
        "other-primary",
        &site.path("other-primary.img"),
        SIZE_BYTES,
        "sync",
        t.port,
        free_port(),
        &NodeOpts {
            tls_dir: None,
            extra: vec!["--name".into(), "other".into()],
        },
    );
    assert_primary_refused(&mut bad);
    wait_until("the secondary logs the refusal", REFUSAL_TIMEOUT, || {
        t.secondary.log_text().contains("refused a connection")
    });
    assert_target_untouched(&mut t);
    bad.stop();
}

#[test]
fn secondary_with_unexpected_name_is_refused_by_the_primary() {
    let seed = common::seed("tls wrong server name");
    let site = Site::new();
    let mut t = start_target(&site, seed);
    let mut bad = site.primary(
        "picky-primary",
        &site.path("picky-primary.img"),
        SIZE_BYTES,
        "sync",
        t.port,
        free_port(),
        &NodeOpts {
            tls_dir: None,
            extra: vec!["--peer-name".into(), "bogus".into()],
        },
    );
    let err = assert_primary_refused(&mut bad);
    assert!(
        err.contains("bogus") || err.contains("name"),
        "the error names the expected peer: {err}"
    );
    assert_target_untouched(&mut t);
    bad.stop();
    assert_correct_primary_pairs(&site, &mut t);
}

#[test]
fn plaintext_primary_is_refused_by_a_tls_secondary() {
    let seed = common::seed("tls plaintext");
    let site = Site::new();
    let mut t = start_target(&site, seed);
    let mut bad = site.primary(
        "plaintext-primary",
        &site.path("plaintext-primary.img"),
        SIZE_BYTES,
        "sync",
        t.port,
        free_port(),
        &NodeOpts {
            tls_dir: None,
            extra: vec!["--danger-plaintext".into()],
        },
    );
    assert_primary_refused(&mut bad);
    wait_until(
        "the secondary logs a refusal naming plaintext",
        REFUSAL_TIMEOUT,
        || {
            t.secondary
                .log_text()
                .lines()
                .any(|l| l.contains("refus") && l.contains("plaintext"))
        },
    );
    assert_target_untouched(&mut t);
    bad.stop();
}

fn assert_refused_before_connecting(args: &[&str], dir: &Path) {
    let out = run_with_timeout(
        Command::new(common::tandem_bin())
            .args(args)
            .current_dir(dir),
        Duration::from_secs(15),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "tandem {args:?} must fail; stderr:\n{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("10.0.0.1"))
        .unwrap_or_else(|| panic!("no line names the address; stderr:\n{stderr}"));
    assert!(
        line.contains("plaintext") && line.contains("loopback"),
        "the message says why: {line}"
    );
}

/// The primary must exit with the refusal instead of retrying a connection
/// it is never allowed to make.
#[test]
fn plaintext_primary_with_non_loopback_peer_exits_before_connecting() {
    let site = Site::new();
    let nbd = format!("127.0.0.1:{}", free_port());
    let img = site.path("p.img").display().to_string();
    let sock = site.path("p.sock").display().to_string();
    let size = SIZE_BYTES.to_string();
    assert_refused_before_connecting(
        &[
            "primary",
            "--volume",
            &img,
            "--size",
            &size,
            "--peer",
            "10.0.0.1:7000",
            "--nbd",
            &nbd,
            "--mode",
            "sync",
            "--danger-plaintext",
            "--control",
            &sock,
        ],
        site.dir.path(),
    );
}

#[test]
fn plaintext_secondary_on_non_loopback_listen_address_exits() {
    let site = Site::new();
    let img = site.path("s.img").display().to_string();
    let sock = site.path("s.sock").display().to_string();
    let size = SIZE_BYTES.to_string();
    assert_refused_before_connecting(
        &[
            "secondary",
            "--volume",
            &img,
            "--size",
            &size,
            "--listen",
            "10.0.0.1:7000",
            "--danger-plaintext",
            "--control",
            &sock,
        ],
        site.dir.path(),
    );
}

#[test]
fn volumes_of_different_sizes_are_refused_naming_both_sizes() {
    let seed = common::seed("tls size mismatch");
    let site = Site::new();
    let mut t = start_target(&site, seed);
    let big_bytes = 2 * SIZE_BYTES;
    let pri_img = site.path("big-primary.img");
    write_random_file(&pri_img, big_bytes, seed ^ 1);
    let pri_digest = file_digest(&pri_img);
    let mut bad = site.primary(
        "big-primary",
        &pri_img,
        big_bytes,
        "sync",
        t.port,
        free_port(),
        &NodeOpts::default(),
    );
    let err = assert_primary_refused(&mut bad);
    for size in [SIZE_BYTES, big_bytes] {
        assert!(
            err.contains(&size.to_string()),
            "the refusal names both sizes ({SIZE_BYTES} and {big_bytes}): {err}"
        );
    }
    let sec_log_line = t
        .secondary
        .log_text()
        .lines()
        .find(|l| l.contains("size mismatch"))
        .map(str::to_owned);
    let line = sec_log_line.expect("the secondary logs the size mismatch");
    for size in [SIZE_BYTES, big_bytes] {
        assert!(line.contains(&size.to_string()), "secondary log: {line}");
    }
    assert_target_untouched(&mut t);
    bad.stop();
    assert_eq!(
        file_digest(&pri_img),
        pri_digest,
        "the primary's volume was written although it never served a client"
    );
    t.secondary.stop();
}
