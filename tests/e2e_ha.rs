//! HA operations as an administrator runs them (issue 12): `tandem up` (the
//! systemd unit's command) never makes a second primary; a lone primary's
//! demotion; promotion of a node with no peer configured; runtime resync control
//! (set resync-rate, pause-sync/resume-sync, adjust and SIGHUP), measured on the
//! primary's out-of-sync count; a panic in an agent task ends the process.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{Site, assert_same_file, run_with_timeout, tandem_bin, wait_until};
use tandem::nbd::client::NbdClient;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);

/// Whether an NBD client can attach to `addr` (a node serving writes there).
fn serves_nbd(addr: &str) -> bool {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), NbdClient::connect(addr, ""))
            .await
            .is_ok_and(|r| r.is_ok())
    })
}

/// For `period`, node `node` must be secondary and not serve its export.
fn assert_never_serves(c: &mut Cluster, node: usize, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        if let Some(s) = c.agent(node).status() {
            assert_eq!(s["role"], "secondary", "node {node} serves as primary: {s}");
        }
        assert!(
            !serves_nbd(&c.nbd_addr(node)),
            "node {node} accepted an NBD client: two nodes serve writes"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_lone_primary_demotes_unless_its_peer_lacks_writes() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(1);
    c.agent(0).wait_status("peer gone", SYNC_TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    // Nothing written since the peer left: the peer lacks nothing (Pacemaker's
    // demote of a lone node, ocf-tester).
    let out = c.ctl_ok(0, "demote", &["--timeout", "1"]);
    assert!(out.contains("demoted"), "{out}");
    // Answered once the secondary serves: the very next status finds it (the OCF
    // monitor right after a demote failed while the new secondary zeroed its
    // journal: "agent is shutting down").
    let s = c
        .agent(0)
        .status()
        .expect("status answers as soon as demote returned");
    assert_eq!(s["role"], "secondary", "{s}");
    let out = c.ctl_ok(0, "promote", &[]);
    assert!(out.contains("now primary"), "{out}");

    // Writes the peer lacks: refused without --force, the export stays.
    write_blocks(&c.nbd_addr(0), 10, 8, 1);
    let (ok, text) = c.ctl(0, "demote", &["--timeout", "1"]);
    assert!(
        !ok,
        "a lone primary with writes its peer lacks demoted: {text}"
    );
    assert!(
        text.contains("--force") && text.contains("not connected"),
        "{text}"
    );
    let s = c
        .agent(0)
        .wait_status("primary again", SYNC_TIMEOUT, |s| s["role"] == "primary");
    assert_eq!(s["out_of_sync_bytes"], 8 * BLOCK, "{s}");
    assert!(serves_nbd(&c.nbd_addr(0)), "the export did not come back");
    let out = c.ctl_ok(0, "demote", &["--timeout", "1", "--force"]);
    assert!(out.contains("stay marked out of sync"), "{out}");
    c.agent(0)
        .wait_status("secondary", SYNC_TIMEOUT, |s| s["role"] == "secondary");
}

#[test]
fn up_after_a_switchover_comes_up_secondary_and_resyncs() {
    let mut c = Cluster::new("sync", 32 * MIB, "");
    c.start(1, "up");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_blocks(&c.nbd_addr(0), 0, 64, 2);
    c.wait_synced(0, SYNC_TIMEOUT);

    // Switchover, then the old primary's service restarts (the unit's command line).
    c.ctl_ok(0, "demote", &["--timeout", "1"]);
    c.ctl_ok(1, "promote", &[]);
    write_blocks(&c.nbd_addr(1), 100, 64, 3);
    c.stop(0);
    write_blocks(&c.nbd_addr(1), 200, 64, 4);
    c.start(0, "up");
    // A client tries alpha's export all along: never served.
    assert_never_serves(&mut c, 0, Duration::from_secs(4));
    c.wait_synced(1, SYNC_TIMEOUT);
    assert!(
        c.agent(0).log_text().contains("stopped as secondary"),
        "{}",
        c.agent(0).log_text()
    );
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

#[test]
fn up_of_a_former_primary_yields_to_a_promoted_peer_and_otherwise_promotes() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);

    // alpha stops as primary; beta is promoted meanwhile and writes.
    c.stop(0);
    let out = c.ctl_ok(1, "promote", &[]);
    assert!(out.contains("now primary"), "{out}");
    write_blocks(&c.nbd_addr(1), 0, 32, 5);
    c.start(0, "up");
    // Longer than alpha's promotion window (5 s + connect 5 s + peer 2 s).
    assert_never_serves(&mut c, 0, Duration::from_secs(15));
    c.wait_synced(1, SYNC_TIMEOUT);
    let log = c.agent(0).log_text();
    assert!(log.contains("staying secondary"), "{log}");

    // Now beta stops as primary with alpha away: `up` promotes it after the window.
    c.stop(0);
    c.stop(1);
    let started = Instant::now();
    c.start(1, "up");
    let s = c
        .agent(1)
        .wait_status("promoted by up", SYNC_TIMEOUT, |s| s["role"] == "primary");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10),
        "promoted after {waited:?}, before the peer could have connected: {s}"
    );
    assert!(serves_nbd(&c.nbd_addr(1)));
    write_blocks(&c.nbd_addr(1), 40, 16, 6);
    c.start(0, "up");
    c.wait_synced(1, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

#[test]
fn a_node_with_no_peer_configured_is_promoted_and_serves() {
    let site = Site::with_names(&["dr", "primary"]);
    let listen = common::free_port();
    let nbd = common::free_port();
    let control = site.path("dr.sock");
    // The DR node as the issue found it: a secondary with no --peer.
    let args: Vec<String> = [
        "secondary",
        "--name",
        "dr",
        "--peer-name",
        "primary",
        "--volume",
        &site.path("dr.img").display().to_string(),
        "--size",
        "16M",
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--nbd",
        &format!("127.0.0.1:{nbd}"),
        "--control",
        &control.display().to_string(),
        "--tls-dir",
        &site.certs.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent = common::Agent::spawn("dr", &args, site.path("dr.log"), control.clone());
    agent.wait_status("control socket", common::READY_TIMEOUT, |_| true);
    // A new node holds no consistent image: refused, whatever the peer.
    let promote = |force: bool| {
        let mut cmd = Command::new(tandem_bin());
        cmd.arg("promote").arg("--control").arg(&control);
        if force {
            cmd.arg("--force");
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = promote(false);
    assert!(!ok, "{text}");
    assert!(!text.contains("missing option --peer"), "{text}");
    drop(agent);

    // A DR node that held a consistent image: seed it as a replica of a primary,
    // then restart it without a peer and promote it alone.
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_blocks(&c.nbd_addr(0), 0, 16, 7);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    let beta_listen = common::free_port();
    let beta_nbd = common::free_port();
    let beta_control = c.site.path("beta-dr.sock");
    let args: Vec<String> = [
        "secondary",
        "--name",
        "beta",
        "--peer-name",
        "alpha",
        "--volume",
        &c.image(1).display().to_string(),
        "--listen",
        &format!("127.0.0.1:{beta_listen}"),
        "--nbd",
        &format!("127.0.0.1:{beta_nbd}"),
        "--control",
        &beta_control.display().to_string(),
        "--tls-dir",
        &c.site.certs.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut beta = common::Agent::spawn(
        "beta-dr",
        &args,
        c.site.path("beta-dr.log"),
        beta_control.clone(),
    );
    beta.wait_status("control socket", common::READY_TIMEOUT, |_| true);
    let out = run_with_timeout(
        Command::new(tandem_bin())
            .arg("promote")
            .arg("--control")
            .arg(&beta_control),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}\n{}", beta.log_text());
    assert!(text.contains("now primary"), "{text}");
    let addr = format!("127.0.0.1:{beta_nbd}");
    write_blocks(&addr, 100, 16, 8);
    let s = beta.status().expect("status");
    assert_eq!(s["role"], "primary", "{s}");
    beta.stop();
}

/// The primary's out-of-sync bytes, from its status.
fn out_of_sync(c: &mut Cluster, node: usize) -> u64 {
    c.status(node)["out_of_sync_bytes"]
        .as_u64()
        .expect("out_of_sync_bytes")
}

#[test]
fn resync_rate_pause_resume_adjust_and_sighup_change_the_resync_live() {
    let mut c = Cluster::new("sync", 64 * MIB, "resync-rate = \"0\"\n");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    // 16 MiB written while beta is away: the resync to come.
    c.stop(1);
    write_mib(&c.nbd_addr(0), 0, 16, 9);
    assert_eq!(out_of_sync(&mut c, 0), 16 * MIB);

    // set resync-rate: 256 KiB/s.
    let out = run_with_timeout(
        Command::new(tandem_bin())
            .args(["set", "resync-rate", "256K", "--control"])
            .arg(c.control(0)),
        Duration::from_secs(60),
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.contains("262144 bytes/s"), "{out}");
    c.start(1, "secondary");
    c.agent(0).wait_status("peer back", SYNC_TIMEOUT, |s| {
        s["peer"]["connection"] == "connected"
    });
    let before = out_of_sync(&mut c, 0);
    std::thread::sleep(Duration::from_secs(4));
    let after = out_of_sync(&mut c, 0);
    let sent = before - after;
    eprintln!("at 256K/s: {sent} bytes resynced in 4 s");
    // 4 s at 256 KiB/s plus at most one 1 MiB burst and a chunk in flight.
    assert!(sent <= 4 * 256 * 1024 + 3 * MIB, "{sent} bytes in 4 s");
    assert!(after > 0, "the resync finished at 256 KiB/s: {sent} bytes");

    // pause-sync: nothing moves (a chunk in flight may land).
    let out = c.ctl_ok(0, "pause-sync", &[]);
    assert!(out.contains("paused"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let paused_at = out_of_sync(&mut c, 0);
    std::thread::sleep(Duration::from_secs(3));
    let still = out_of_sync(&mut c, 0);
    eprintln!("paused: {} bytes resynced in 3 s", paused_at - still);
    assert_eq!(paused_at, still, "the resync went on while paused");
    // On the secondary: refused, naming where to run it.
    let (ok, text) = c.ctl(1, "pause-sync", &[]);
    assert!(!ok && text.contains("primary"), "{text}");
    let out = c.ctl_ok(0, "resume-sync", &[]);
    assert!(out.contains("running"), "{out}");

    // adjust with a file that names another volume: refused, nothing changed.
    let text = std::fs::read_to_string(&c.config).expect("resource file");
    let moved = text.replace("alpha.img", "alpha-other.img");
    std::fs::write(&c.config, &moved).expect("write");
    let (ok, out) = c.ctl(0, "adjust", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("volume") && out.contains("nothing changed"),
        "{out}"
    );
    // SIGHUP with an unlimited rate in the file: the resync completes quickly.
    std::fs::write(
        &c.config,
        text.replace("peer-timeout-ms = 2000", "peer-timeout-ms = 2001"),
    )
    .expect("write");
    // The running rate is 256K (set above); the file says unlimited: SIGHUP applies it.
    c.agent(0).signal(libc::SIGHUP);
    let started = Instant::now();
    c.wait_synced(0, SYNC_TIMEOUT);
    eprintln!(
        "after SIGHUP: synced in {:?} (at 256 KiB/s the rest needed over 40 s)",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "still at 256 KiB/s after SIGHUP"
    );
    let log = c.agent(0).log_text();
    assert!(log.contains("SIGHUP: re-reading"), "{log}");
    assert!(c.agent(0).is_running(), "SIGHUP ended the agent");
    // adjust by command: the rest (peer-timeout-ms) waits for the next role change.
    let (ok, out) = c.ctl(0, "adjust", &[]);
    assert!(ok, "{out}");
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

#[test]
fn a_panic_in_an_agent_task_ends_the_process_with_a_log_line() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reply = rt
        .block_on(async {
            let req = tandem::agent::control::ControlRequest::new("debug-panic-task");
            tandem::ops::ask(&c.control(1), &req, Duration::from_secs(10)).await
        })
        .expect("reply");
    // The test binary runs without TANDEM_DEBUG_COMMANDS: the command is unknown.
    assert!(!reply.ok, "{reply:?}");
    c.stop(1);

    let mut agent = {
        let args = vec![
            "secondary".to_string(),
            "--config".into(),
            c.config.display().to_string(),
            "--node".into(),
            "beta".into(),
        ];
        let log = c.site.path("beta-panic.log");
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("clone");
        let child = Command::new(tandem_bin())
            .args(&args)
            .env("TANDEM_LOG", "info")
            .env("TANDEM_DEBUG_COMMANDS", "1")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn");
        common::Agent {
            name: "beta-panic".into(),
            child: Some(child),
            log,
            control: c.control(1),
            args,
        }
    };
    agent.wait_status("control socket", common::READY_TIMEOUT, |_| true);
    let reply = rt
        .block_on(async {
            let req = tandem::agent::control::ControlRequest::new("debug-panic-task");
            tandem::ops::ask(&c.control(1), &req, Duration::from_secs(10)).await
        })
        .expect("reply");
    if !cfg!(debug_assertions) {
        // `cargo test --release`: the agent binary is a release build too, and
        // a release build has no debug commands, whatever its environment.
        assert!(!reply.ok, "a release build ran a debug command: {reply:?}");
        agent.stop();
        return;
    }
    assert!(reply.ok, "{reply:?}");
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(101), "{status}\n{}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("panic: debug-panic-task") && log.contains("exiting with status 101"),
        "{log}"
    );
    wait_until("control socket gone", Duration::from_secs(5), || {
        common::status_of(&c.control(1)).is_none()
    });
}

#[test]
fn disconnect_holds_the_link_down_until_connect_then_the_peer_resyncs() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    let out = c.ctl_ok(0, "disconnect", &[]);
    assert!(out.contains("disconnected"), "{out}");
    c.agent(0).wait_status("link down", SYNC_TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    // Longer than the reconnect backoff (5 s): both sides keep trying, the link stays down.
    write_blocks(&c.nbd_addr(0), 0, 32, 10);
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let s = c.status(0);
        assert_eq!(s["peer"]["connection"], "connecting", "{s}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(c.status(0)["out_of_sync_bytes"], 32 * BLOCK);
    // On the secondary: refused, naming the primary.
    let (ok, text) = c.ctl(1, "disconnect", &[]);
    assert!(!ok && text.contains("primary"), "{text}");
    assert!(
        c.ctl_ok(0, "disconnect", &[])
            .contains("already disconnected")
    );
    let out = c.ctl_ok(0, "connect", &[]);
    assert!(out.contains("connecting"), "{out}");
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// A primary killed -9 (writes its peer lacks, activity log extents open) and
/// restarted by `up` alone: it promotes itself after the window and, once the
/// peer is back, resyncs everything it may have changed.
#[test]
fn up_after_a_crash_of_a_lone_primary_loses_nothing_on_the_peer() {
    let mut c = Cluster::new("sync", 32 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_blocks(&c.nbd_addr(0), 0, 64, 11);
    c.stop(1);
    c.agent(0).wait_status("peer gone", SYNC_TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    write_blocks(&c.nbd_addr(0), 500, 64, 12);
    write_mib(&c.nbd_addr(0), 20, 4, 13);
    c.kill(0);
    c.start(0, "up");
    c.agent(0)
        .wait_status("promoted by up", SYNC_TIMEOUT, |s| s["role"] == "primary");
    write_blocks(&c.nbd_addr(0), 1000, 16, 14);
    c.start(1, "up");
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// Write `n` 4 KiB blocks of `seed`-derived data from `first_block` on.
fn write_blocks(addr: &str, first_block: u64, n: u64, seed: u64) {
    common::write_seeded(addr, first_block, n, BLOCK, seed)
}

/// Write `n` MiB of `seed`-derived data from MiB `first` on.
fn write_mib(addr: &str, first: u64, n: u64, seed: u64) {
    common::write_seeded(addr, first, n, MIB, seed)
}
