//! Resource-level fencing (issue 12 item 2), as an administrator sets it up:
//! `fence-peer` runs before a primary's first write without its peer (sync
//! mode, `on-disconnect = degrade`); the handler outdates the peer with
//! `tandem outdate`; the Outdated peer refuses promotion; after the link heals
//! and the resync completes it is UpToDate again. A failing handler keeps the
//! writes frozen until it succeeds.
//!
//! The link runs through the fault proxy (tools/faultproxy): a reset with new
//! connections refused is a cut link while both nodes keep running.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{NodeOpts, Site, free_port, primary_in_sync, run_with_timeout, tandem_bin};
use faultproxy::{Fault, Proxy};
use tandem::nbd::client::NbdClient;

const SIZE: u64 = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(90);
const FAST_TIMEOUTS: [&str; 6] = [
    "--heartbeat-interval-ms",
    "200",
    "--peer-timeout-ms",
    "1000",
    "--connect-timeout-ms",
    "2000",
];

fn ctl(control: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = run_with_timeout(
        Command::new(tandem_bin())
            .args(args)
            .arg("--control")
            .arg(control),
        Duration::from_secs(60),
    );
    (out.status.success(), common::output_text(&out))
}

#[test]
fn degrade_mode_fences_the_peer_before_writing_alone_and_the_outdated_peer_is_not_promoted() {
    let site = Site::new();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repl = free_port();
    let nbd = free_port();
    let proxy = rt
        .block_on(Proxy::start(
            "127.0.0.1:0".parse().unwrap(),
            format!("127.0.0.1:{repl}").parse().unwrap(),
            common::seed("fencing"),
        ))
        .expect("proxy");
    let fast: Vec<String> = FAST_TIMEOUTS.iter().map(|s| s.to_string()).collect();
    let mut secondary = site.secondary(
        "secondary",
        &site.path("secondary.img"),
        SIZE,
        repl,
        &NodeOpts {
            tls_dir: None,
            extra: fast.clone(),
        },
    );
    secondary.wait_status("control socket", TIMEOUT, |_| true);
    // The handler: record the call, and fail while FAIL exists; else outdate the peer.
    let fence_log = site.path("fence.log");
    let fail = site.path("FAIL");
    let handler = format!(
        "echo \"$TANDEM_FENCE_REASON $TANDEM_PEER\" >> {log}; [ ! -e {fail} ] && {bin} outdate --control {sock}",
        log = fence_log.display(),
        fail = fail.display(),
        bin = tandem_bin(),
        sock = secondary.control.display(),
    );
    let mut extra = fast.clone();
    extra.extend(["--fence-peer".to_string(), handler]);
    let mut primary = site.primary(
        "primary",
        &site.path("primary.img"),
        SIZE,
        "sync",
        proxy.local_addr().port(),
        nbd,
        &NodeOpts {
            tls_dir: None,
            extra,
        },
    );
    primary.wait_status("in sync", TIMEOUT, primary_in_sync);
    let addr = format!("127.0.0.1:{nbd}");
    let client = rt.block_on(NbdClient::connect(&addr, "")).expect("nbd");
    rt.block_on(client.write(0, Bytes::from(vec![1u8; 4096]), false))
        .expect("write while connected");
    assert!(
        !fence_log.exists(),
        "the handler ran while the peer was connected"
    );

    // The link is cut; both nodes keep running.
    proxy.set(Fault::Reset { reject_new: true });
    primary.wait_status("peer gone", TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    let started = Instant::now();
    rt.block_on(client.write(4096, Bytes::from(vec![2u8; 4096]), false))
        .expect("the first write alone completes once the peer is fenced");
    eprintln!("first write alone: {:?}", started.elapsed());
    let calls = std::fs::read_to_string(&fence_log).expect("the handler ran");
    assert_eq!(calls.trim(), "write-alone secondary", "{calls}");
    let s = secondary.wait_status("Outdated", TIMEOUT, |s| s["disk_state"] == "Outdated");
    assert_eq!(s["role"], "secondary", "{s}");
    // More writes alone: the handler runs once per outage.
    rt.block_on(client.write(8192, Bytes::from(vec![3u8; 4096]), false))
        .expect("write");
    assert_eq!(
        std::fs::read_to_string(&fence_log).unwrap().lines().count(),
        1
    );
    // The Outdated peer refuses promotion (names --force), and stays secondary.
    let (ok, text) = ctl(&secondary.control, &["promote"]);
    assert!(!ok, "an Outdated node was promoted: {text}");
    assert!(
        text.contains("Outdated") && text.contains("--force"),
        "{text}"
    );
    // Outdated is persisted: a restart keeps it.
    secondary.stop();
    secondary.restart();
    secondary.wait_status("Outdated after a restart", TIMEOUT, |s| {
        s["disk_state"] == "Outdated"
    });
    // An outdate on a connected node or a primary is refused.
    let (ok, text) = ctl(&primary.control, &["outdate"]);
    assert!(!ok && text.contains("is primary"), "{text}");

    // The link heals: resync, and the peer is UpToDate again.
    proxy.clear();
    primary.wait_status("in sync again", TIMEOUT, primary_in_sync);
    secondary.wait_status("UpToDate again", TIMEOUT, |s| {
        s["disk_state"] == "UpToDate" && s["peer"]["connection"] == "connected"
    });
    let (ok, text) = ctl(&secondary.control, &["outdate"]);
    assert!(!ok && text.contains("connected"), "{text}");

    // A failing handler: the next outage's first write waits until it succeeds.
    std::fs::write(&fail, "").unwrap();
    proxy.set(Fault::Reset { reject_new: true });
    primary.wait_status("peer gone", TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    let write = rt.spawn({
        let addr = addr.clone();
        async move {
            let c = NbdClient::connect(&addr, "").await.expect("nbd");
            let t = Instant::now();
            c.write(12288, Bytes::from(vec![4u8; 4096]), false)
                .await
                .map(|()| t.elapsed())
        }
    });
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        !write.is_finished(),
        "a write completed alone although fencing failed"
    );
    let calls = std::fs::read_to_string(&fence_log).unwrap();
    assert!(calls.lines().count() >= 2, "{calls}");
    std::fs::remove_file(&fail).unwrap();
    let waited = rt
        .block_on(write)
        .expect("join")
        .expect("the write completes once the handler succeeds");
    eprintln!("write frozen for {waited:?} while the handler failed");
    assert!(waited >= Duration::from_secs(6), "{waited:?}");
    secondary.wait_status("Outdated", TIMEOUT, |s| s["disk_state"] == "Outdated");
    proxy.clear();
    primary.wait_status("in sync again", TIMEOUT, primary_in_sync);
    drop(client);
    primary.stop();
    secondary.stop();
    common::assert_same_file(&site.path("primary.img"), &site.path("secondary.img"));
}

/// `cibadmin` on the CIB file `cib` (Pacemaker's CIB_file: no cluster needed).
fn cibadmin(cib: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = run_with_timeout(
        Command::new("cibadmin").env("CIB_file", cib).args(args),
        Duration::from_secs(30),
    );
    (out.status.success(), common::output_text(&out))
}

/// deploy/pacemaker/tandem-fence-peer as `fence-peer`: the constraint that keeps
/// Pacemaker from promoting the peer is in the CIB before the first write alone,
/// and `--unfence-if-synced` (the OCF monitor's call) removes it only once the
/// peer is connected and in sync.
#[test]
fn the_pacemaker_handler_bans_promoting_the_peer_until_it_is_in_sync() {
    let site = Site::with_names(&["alpha", "beta"]);
    let cib = site.path("cib.xml");
    let empty = run_with_timeout(
        Command::new("cibadmin").arg("--empty"),
        Duration::from_secs(30),
    );
    assert!(empty.status.success(), "cibadmin --empty: {empty:?}");
    std::fs::write(&cib, &empty.stdout).unwrap();
    let (ok, out) = cibadmin(
        &cib,
        &[
            "--create",
            "--scope",
            "resources",
            "--xml-text",
            "<clone id=\"r0-clone\"><meta_attributes id=\"r0-clone-meta\"><nvpair id=\"r0-clone-promotable\" name=\"promotable\" value=\"true\"/></meta_attributes><primitive id=\"r0\" class=\"ocf\" provider=\"tandem\" type=\"tandem\"/></clone>",
        ],
    );
    assert!(ok, "{out}");
    let handler =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/pacemaker/tandem-fence-peer");
    let extra = format!(
        "fence-peer = \"CIB_file={} TANDEM_PCMK_NODE=alpha {}\"\n",
        cib.display(),
        handler.display()
    );
    let mut c = common::cluster::Cluster::new("sync", SIZE, &extra);
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, TIMEOUT);
    c.stop(1);
    c.agent(0).wait_status("peer gone", TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect(&c.nbd_addr(0), "").await.expect("nbd");
        tokio::time::timeout(
            Duration::from_secs(60),
            client.write(0, Bytes::from(vec![5u8; 4096]), false),
        )
        .await
        .expect("the first write alone waits for the handler: did it fail? see alpha's log")
        .expect("the first write alone completes once the constraint is in");
    });
    let (ok, constraints) = cibadmin(&cib, &["--query", "--scope", "constraints"]);
    assert!(ok, "{constraints}");
    assert!(
        constraints.contains("id=\"tandem-fence-r0\"")
            && constraints.contains("rsc=\"r0-clone\"")
            && constraints.contains("role=\"Promoted\"")
            && constraints.contains("score=\"-INFINITY\"")
            && constraints.contains("operation=\"ne\" value=\"alpha\""),
        "{constraints}"
    );
    let unfence = |c: &common::cluster::Cluster| {
        let out = run_with_timeout(
            Command::new(&handler)
                .env("CIB_file", &cib)
                .env("TANDEM_BIN", tandem_bin())
                .arg("--unfence-if-synced")
                .arg("--control")
                .arg(c.control(0)),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{out:?}");
    };
    // The peer is still away: the constraint stays.
    unfence(&c);
    let (_, constraints) = cibadmin(&cib, &["--query", "--scope", "constraints"]);
    assert!(constraints.contains("tandem-fence-r0"), "{constraints}");
    // Back and resynced: it goes.
    c.start(1, "secondary");
    c.wait_synced(0, TIMEOUT);
    unfence(&c);
    let (_, constraints) = cibadmin(&cib, &["--query", "--scope", "constraints"]);
    assert!(!constraints.contains("tandem-fence-r0"), "{constraints}");
    c.stop(0);
    c.stop(1);
}
