//! systemd integration as the unit uses it (`Type=notify`, `WatchdogSec=`):
//! the agent runs with `NOTIFY_SOCKET` pointing at a datagram socket this test
//! owns. `READY=1` must arrive only once the role serves (primary: the NBD port
//! accepts connections; secondary: the replication port does), then `STATUS=`
//! lines and `WATCHDOG=1` pings at half of `WATCHDOG_USEC`, and `STOPPING=1`
//! on SIGTERM. And the shipped unit passes `systemd-analyze verify`.
//!
//! Not covered: a hung owner loop (no ping) — there is no way to hang it from
//! outside without stopping the whole process.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, free_port, tandem_bin};

/// Datagrams received until `until` holds for one, or the timeout.
fn receive_until(
    sock: &UnixDatagram,
    timeout: Duration,
    what: &str,
    mut until: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} within {timeout:?}; got {got:?}");
        sock.set_read_timeout(Some(left)).expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&text);
                got.push(text);
                if done {
                    return got;
                }
            }
            Err(e) => panic!("no {what} within {timeout:?} ({e}); got {got:?}"),
        }
    }
}

fn notified_agent(
    site: &tempfile::TempDir,
    name: &str,
    args: &[String],
    accepting: std::net::SocketAddr,
) {
    let sock_path = site.path().join(format!("{name}.notify"));
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let control = site.path().join(format!("{name}.sock"));
    let log = site.path().join(format!("{name}.log"));
    let mut full: Vec<String> = args.to_vec();
    full.extend(["--control".into(), control.display().to_string()]);
    let out = std::fs::File::create(&log).expect("log");
    let child = Command::new(tandem_bin())
        .args(&full)
        .env("TANDEM_LOG", "info")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("spawn tandem");
    let mut agent = Agent {
        name: name.into(),
        child: Some(child),
        log,
        control,
    };
    let ready = receive_until(&sock, Duration::from_secs(60), "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    // At the moment READY=1 is sent, the port accepts: connect now.
    TcpStream::connect_timeout(&accepting, Duration::from_secs(2)).unwrap_or_else(|e| {
        panic!("{name}: READY=1 ({ready:?}) but {accepting} does not accept: {e}")
    });
    let last = ready.last().expect("ready message");
    assert!(
        last.contains(&format!("STATUS={name} of resource r0")),
        "the ready message says what serves: {last:?}"
    );
    // Pings at half of WATCHDOG_USEC (1 s): two within 3 s, and a STATUS line
    // from the live status.
    let mut pings = 0;
    let mut status = false;
    receive_until(&sock, Duration::from_secs(5), "two WATCHDOG=1", |m| {
        pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
        status |= m.starts_with(&format!("STATUS={name} r0: disk "));
        pings >= 2 && status
    });
    agent.signal(libc::SIGTERM);
    receive_until(&sock, Duration::from_secs(30), "STOPPING=1", |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    let status = agent.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "{name} exit {status}: {}",
        agent.log_text()
    );
}

#[test]
fn ready_arrives_once_the_port_accepts_then_watchdog_pings_and_stopping() {
    let site = tempfile::tempdir().expect("tempdir");
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args: Vec<String> = [
        "secondary",
        "--volume",
        &site.path().join("s.img").display().to_string(),
        "--size",
        "8M",
        "--listen",
        &listen.to_string(),
        "--danger-plaintext",
    ]
    .map(String::from)
    .to_vec();
    notified_agent(&site, "secondary", &args, listen);

    let nbd: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args: Vec<String> = [
        "primary",
        "--volume",
        &site.path().join("p.img").display().to_string(),
        "--size",
        "8M",
        "--peer",
        &format!("127.0.0.1:{}", free_port()),
        "--nbd",
        &nbd.to_string(),
        "--danger-plaintext",
    ]
    .map(String::from)
    .to_vec();
    notified_agent(&site, "primary", &args, nbd);
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit_dir = dir.path();
    let unit = unit_dir.join("tandem@r0.service");
    // systemd-analyze checks that ExecStart's binary exists: point it at the one
    // under test (the only change to the shipped text).
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/tandem@.service"
    ))
    .expect("read unit");
    assert!(text.contains("Type=notify") && text.contains("WatchdogSec="));
    std::fs::write(&unit, text.replace("/usr/local/bin/tandem", tandem_bin())).expect("write unit");
    let out = common::run_with_timeout(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .env("SYSTEMD_LOG_LEVEL", "notice"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about units other than ours (the host's own) are not ours to fix.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("tandem@")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}
