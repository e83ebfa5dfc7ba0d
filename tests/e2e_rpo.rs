//! The RPO alert end to end: a pair behind the fault proxy, the primary with
//! `--rpo-seconds 2`, a hook that appends to a file, and `--metrics`. The link
//! is blackholed under an NBD write load: the lag (age of the oldest write the
//! secondary lacks) must rise past the target and raise the alert — the metric,
//! one event on the control socket, one hook run — and clear the same three ways
//! once the link heals and the resync is done. Prints its seed.

mod common;
#[path = "common/faults.rs"]
#[allow(dead_code)] // Shared with the fault tests, which use the rest.
mod faults;

use std::time::{Duration, Instant};

use common::{count_events, events_of, free_port, metric, scrape, wait_until};
use faultproxy::Fault;
use faults::{BLOCK_BYTES, LoadCfg, Model, Rig, RigOpts};

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 64 * MIB;

fn hook_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn blackholed_link_raises_the_rpo_alert_once_and_healing_clears_it() {
    let seed = common::seed("rpo");
    let hook_dir = tempfile::tempdir().expect("tempdir");
    let hook_file = hook_dir.path().join("hook.log");
    let hook = format!(
        "echo \"$TANDEM_EVENT $TANDEM_RESOURCE $TANDEM_NODE $TANDEM_PEER $TANDEM_LAG_SECONDS $TANDEM_RPO_SECONDS\" >> '{}'",
        hook_file.display()
    );
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let opts = RigOpts::new("async", SIZE_BYTES).primary(&[
        "--rpo-seconds",
        "2",
        "--rpo-hook",
        &hook,
        "--metrics",
        &metrics_addr,
    ]);
    let mut rig = Rig::start(opts, seed);

    let text = scrape(&metrics_addr);
    assert_eq!(metric(&text, "tandem_rpo_seconds", &[]), 2.0);
    assert_eq!(metric(&text, "tandem_rpo_exceeded", &[]), 0.0);
    let s = rig.primary.status().expect("primary status");
    assert_eq!(s["rpo"]["target_s"], 2.0);
    assert_eq!(s["rpo"]["exceeded"], false);
    assert!(s["rpo"]["since"].is_null());

    let model = Model::shared();
    let load = rig.start_load(
        LoadCfg {
            seed,
            volume_blocks: SIZE_BYTES / BLOCK_BYTES,
            min_blocks: 1,
            max_blocks: 8,
            depth: 4,
            bytes_per_s: 2 * MIB,
            total_bytes: None,
        },
        &model,
    );
    std::thread::sleep(Duration::from_secs(1));
    let t_fault = Instant::now();
    rig.proxy.set(Fault::Blackhole);
    let s = rig
        .primary
        .wait_status("rpo exceeded", Duration::from_secs(30), |s| {
            s["rpo"]["exceeded"] == true
        });
    eprintln!(
        "rpo: exceeded {:?} after the blackhole, lag {} s",
        t_fault.elapsed(),
        s["lag"]["seconds"]
    );
    assert!(
        s["lag"]["seconds"].as_f64().expect("lag seconds") > 2.0,
        "{s}"
    );
    assert!(s["rpo"]["since"].as_u64().is_some(), "{s}");
    assert_eq!(s["rpo"]["violations"], 1);
    let text = scrape(&metrics_addr);
    assert_eq!(metric(&text, "tandem_rpo_exceeded", &[]), 1.0);
    assert!(metric(&text, "tandem_lag_seconds", &[]) > 2.0);
    wait_until("the rpo-exceeded hook ran", Duration::from_secs(10), || {
        !hook_lines(&hook_file).is_empty()
    });
    let line = &hook_lines(&hook_file)[0];
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        (fields[0], fields[1], fields[2], fields[3], fields[5]),
        ("rpo-exceeded", "r0", "primary", "secondary", "2"),
        "hook line: {line}"
    );
    assert!(
        fields[4].parse::<f64>().expect("TANDEM_LAG_SECONDS") > 2.0,
        "{line}"
    );

    // Still blackholed, still writing: the lag keeps growing past the peer timeout
    // (writes now tracked only in the bitmap), and the alert is not repeated.
    std::thread::sleep(Duration::from_secs(3));
    let s = rig.primary.status().expect("primary status");
    assert_ne!(s["peer"]["connection"], "connected", "{s}");
    assert!(
        s["lag"]["seconds"].as_f64().expect("lag seconds") > 4.0,
        "lag must keep growing while the link is down: {s}"
    );
    assert_eq!(s["rpo"]["exceeded"], true);
    let events = events_of(&rig.primary.control);
    assert_eq!(count_events(&events, "rpo-exceeded"), 1, "{events:?}");
    assert_eq!(count_events(&events, "peer-disconnected"), 1, "{events:?}");
    assert_eq!(hook_lines(&hook_file).len(), 1);

    load.stop();
    rig.proxy.clear();
    let t_heal = Instant::now();
    let s = rig
        .primary
        .wait_status("rpo recovered", faults::CONVERGE_TIMEOUT, |s| {
            s["rpo"]["exceeded"] == false
        });
    eprintln!("rpo: recovered {:?} after healing", t_heal.elapsed());
    assert!(
        s["lag"]["seconds"].as_f64().expect("lag seconds") <= 2.0,
        "{s}"
    );
    assert!(s["rpo"]["since"].is_null(), "{s}");
    assert_eq!(s["rpo"]["violations"], 1);
    assert_eq!(
        metric(&scrape(&metrics_addr), "tandem_rpo_exceeded", &[]),
        0.0
    );
    let events = events_of(&rig.primary.control);
    assert_eq!(count_events(&events, "rpo-recovered"), 1, "{events:?}");
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    let exceeded_at = kinds.iter().position(|k| *k == "rpo-exceeded");
    let recovered_at = kinds.iter().position(|k| *k == "rpo-recovered");
    assert!(exceeded_at < recovered_at, "order of events: {kinds:?}");
    wait_until(
        "the rpo-recovered hook ran",
        Duration::from_secs(10),
        || hook_lines(&hook_file).len() == 2,
    );
    assert!(
        hook_lines(&hook_file)[1].starts_with("rpo-recovered r0 primary secondary "),
        "{:?}",
        hook_lines(&hook_file)
    );
    rig.wait_converged("after the blackhole");
    rig.finish(&model);
    assert!(
        rig.primary.log_text().contains("rpo exceeded: lag "),
        "the crossing is logged"
    );
}
