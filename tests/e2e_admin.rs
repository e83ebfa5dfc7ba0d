//! What an administrator meets (issue 15): a demotion never cuts a client off
//! unless told to, and names the clients it waits for; two primaries refusing
//! each other log it once per 30 s, not at every redial; `last error` clears
//! when its condition does.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::cluster::Cluster;
use tandem::nbd::client::NbdClient;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(90);

/// Issue 15.3: `tandem demote` with a client attached (a mounted filesystem, in
/// production) is refused after `--timeout`, naming the client, and the node
/// stays primary with its export serving; a client that detaches within the
/// timeout lets it go ahead; `--force-disconnect` closes clients instead.
#[test]
fn demote_with_a_client_attached_is_refused_naming_it_unless_forced() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, TIMEOUT);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr = c.nbd_addr(0);
    let client = rt
        .block_on(NbdClient::connect(&addr, ""))
        .expect("attach to the export");

    let (ok, text) = c.ctl(0, "demote", &["--timeout", "1"]);
    assert!(!ok, "demoted with a client attached: {text}");
    assert!(
        text.contains("1 NBD client(s) still attached") && text.contains("127.0.0.1:"),
        "the refusal names the client: {text}"
    );
    assert!(
        text.contains("--force-disconnect") && text.contains("still primary"),
        "{text}"
    );
    assert_eq!(c.status(0)["role"], "primary");
    // Nothing was cut: the client still writes and flushes.
    rt.block_on(async {
        client
            .write(0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .expect("write after the refused demotion");
        client.flush().await.expect("flush");
    });

    // The client detaches while the demotion waits: it goes ahead and says so.
    rt.spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.disconnect().await.expect("disconnect");
    });
    let out = c.ctl_ok(0, "demote", &["--timeout", "30"]);
    assert!(
        out.contains("1 NBD client(s) detached while it waited")
            && out.contains("peer holds every write"),
        "{out}"
    );
    c.agent(0)
        .wait_status("secondary", TIMEOUT, |s| s["role"] == "secondary");

    // Back to alpha as primary, a client attached, and --force-disconnect.
    c.ctl_ok(1, "demote", &["--timeout", "5"]);
    c.agent(1)
        .wait_status("secondary", TIMEOUT, |s| s["role"] == "secondary");
    c.ctl_ok(0, "promote", &[]);
    c.wait_synced(0, TIMEOUT);
    let client = rt
        .block_on(NbdClient::connect(&addr, ""))
        .expect("attach to the export again");
    let out = c.ctl_ok(0, "demote", &["--timeout", "1", "--force-disconnect"]);
    assert!(
        out.contains("1 NBD client(s) attached; 1 still attached after 1 s were closed"),
        "{out}"
    );
    assert!(
        rt.block_on(client.flush()).is_err(),
        "the closed client still flushes"
    );
}

/// Issue 15.7: two primaries refuse each other at every redial; each side logs
/// the refusal of the other's dial once, then a count every 30 s (it was one
/// ERROR per dial, keyed by the dialer's ephemeral port: 8 in 9 s).
#[test]
fn two_primaries_refusing_each_other_log_it_once_per_30_s() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(0, "primary");
    c.start(1, "primary");
    let refusals = |text: &str| {
        text.lines()
            .filter(|l| l.contains("ERROR") && l.contains("refusing a connection"))
            .count()
    };
    common::wait_until("alpha refuses beta's dial", TIMEOUT, || {
        refusals(&c.agents[0].as_ref().expect("alpha").log_text()) >= 1
    });
    // beta redials with backoff (0.1 s doubling to 5 s): about 6 dials in 12 s.
    std::thread::sleep(Duration::from_secs(12));
    for node in 0..2 {
        let log = c.agents[node].as_ref().expect("running").log_text();
        let n = refusals(&log);
        assert!(
            n <= 1,
            "{} logged {n} refusals in 12 s (rate limit: once per 30 s)",
            common::cluster::NODES[node]
        );
    }
    let s = c.status(0);
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("both nodes are primary")),
        "{s}"
    );
}

/// Issue 15.6: `last error` says what is wrong now: a primary that could not
/// reach its secondary shows it while it cannot, and no longer once connected
/// and in sync.
#[test]
fn last_error_clears_once_the_peer_is_connected_and_in_sync() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(0, "primary");
    let s = c
        .agent(0)
        .wait_status("cannot connect, shown", TIMEOUT, |s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot connect"))
        });
    assert_eq!(s["role"], "primary", "{s}");
    c.start(1, "secondary");
    c.wait_synced(0, TIMEOUT);
    for node in 0..2 {
        let s = c.status(node);
        assert!(s["last_error"].is_null(), "{s}");
    }
}

/// Issue 15.9: every `Documentation=` of the shipped unit names a file that the
/// install steps of deploy/README.md install.
#[test]
fn the_units_documentation_is_installed_by_the_install_steps() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/tandem@.service")).expect("unit");
    let install = std::fs::read_to_string(root.join("deploy/README.md")).expect("deploy README");
    let docs: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(!docs.is_empty(), "the unit has no Documentation=");
    for doc in docs {
        let path = doc
            .strip_prefix("file:")
            .unwrap_or_else(|| panic!("{doc}: not a file: URL"));
        assert!(
            install
                .lines()
                .any(|l| l.trim_start().starts_with("install ") && l.contains(&format!(" {path}"))),
            "{path} (Documentation= of the unit) is installed by no step of deploy/README.md"
        );
    }
}
