//! systemd service notification (`Type=notify`): `READY=1` once the node
//! serves, `STATUS=` lines that `systemctl status` shows, `STOPPING=1`, and the
//! watchdog (`WatchdogSec=`).
//!
//! The protocol is sd_notify(3): one datagram of `KEY=VALUE` lines to the unix
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace). It is small enough to speak with `std::os::unix::net` alone, so
//! this module does it by hand: no `unsafe`, no dependency, and a missing
//! `$NOTIFY_SOCKET` (a run by hand, under Pacemaker, in tests) makes every call
//! a no-op.
//!
//! Owns: the notification socket, the "came up once" flag ([`was_ready`]) that
//! `main` uses to tell a failed start from a later failure, and the watchdog
//! task ([`supervise`]). It does not decide readiness: the node agent calls
//! [`ready`] when its role serves (primary: NBD export bound; secondary:
//! replication listener bound).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::agent::control::{ControlHandler, HandlerSlot, StatusDoc};

/// Set by the first [`ready`]: the agent served at least once.
static READY: AtomicBool = AtomicBool::new(false);

/// The longest a role change may leave the node without a role answering
/// status before the watchdog stops pinging: a demotion waits up to its
/// `--timeout` for clients plus `drain-timeout-ms` for the queue; 5 minutes
/// covers the defaults (30 s + 30 s) with room, and a role change stuck for
/// longer is a hang systemd should restart.
const ROLE_CHANGE_MAX: Duration = Duration::from_secs(300);

/// How often `STATUS=` is refreshed when no watchdog asks for more often.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Send `state` (newline-separated `KEY=VALUE` lines) to `$NOTIFY_SOCKET`.
/// Returns false when there is no socket or the send failed (logged at debug:
/// a notification is best effort, never a reason to stop serving).
pub fn notify(state: &str) -> bool {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) => notify_to(&target, state),
        None => false,
    }
}

/// Send `state` to the notification socket `target` (a path, or `@name`).
fn notify_to(target: &std::ffi::OsStr, state: &str) -> bool {
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), target)?;
        }
        Ok(())
    })();
    match sent {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(socket = ?target, "sd_notify failed: {e}");
            false
        }
    }
}

/// `READY=1` with a status line: the node serves. Later calls (after a role
/// change) only update the status.
pub fn ready(status_text: &str) {
    READY.store(true, Ordering::SeqCst);
    notify(&format!("READY=1\nSTATUS={}", one_line(status_text)));
}

/// True once [`ready`] was called in this process.
pub fn was_ready() -> bool {
    READY.load(Ordering::SeqCst)
}

/// `STATUS=text` (shown by `systemctl status`).
pub fn status(text: &str) {
    notify(&format!("STATUS={}", one_line(text)));
}

/// `STOPPING=1`: the agent is shutting down (drain, flush, persist).
pub fn stopping(text: &str) {
    notify(&format!("STOPPING=1\nSTATUS={}", one_line(text)));
}

/// `WATCHDOG=1`: the service is alive.
pub fn watchdog_ping() {
    notify("WATCHDOG=1");
}

/// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`), if
/// the watchdog is enabled for this process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_timeout() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

/// One line for `STATUS=` from the node's status document.
pub fn status_line(s: &StatusDoc) -> String {
    let mut line = format!(
        "{} {}: disk {}, peer {} {}",
        s.role, s.resource, s.disk_state, s.peer.name, s.peer.connection
    );
    if let Some(r) = &s.resync {
        line += &format!(", resync {:.1}%", r.percent);
    }
    if s.role == "primary" {
        line += &format!(", lag {} writes", s.lag.writes);
    }
    line
}

/// Keep systemd informed while the node runs, until `stop`: every tick (half
/// the watchdog timeout, or 5 s) ask the role for its status
/// through the control slot — on the primary that request is answered by the
/// owner task's loop, so an answer proves the loop runs — then send
/// `WATCHDOG=1` and a fresh `STATUS=`. No answer within the tick: no ping, and
/// systemd restarts the service once the timeout passes. While a role change
/// leaves the slot empty, pings continue for at most 5 minutes.
///
/// Does nothing without `$NOTIFY_SOCKET`.
pub fn supervise(slot: HandlerSlot, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = watchdog_timeout();
    let tick = watchdog.map_or(STATUS_INTERVAL, |t| (t / 2).min(STATUS_INTERVAL));
    tokio::spawn(async move {
        let mut empty_since: Option<Instant> = None;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let alive = if slot.get().is_none() {
                let since = *empty_since.get_or_insert_with(Instant::now);
                since.elapsed() < ROLE_CHANGE_MAX
            } else {
                empty_since = None;
                match tokio::time::timeout(tick, slot.status()).await {
                    Ok(Some(doc)) => {
                        status(&status_line(&doc));
                        true
                    }
                    Ok(None) => false,
                    Err(_) => {
                        tracing::warn!(
                            timeout_ms = tick.as_millis() as u64,
                            "the node did not answer its status within a watchdog tick; not pinging the systemd watchdog"
                        );
                        false
                    }
                }
            };
            if alive && watchdog.is_some() {
                watchdog_ping();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_or_abstract_socket_and_reports_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        assert!(notify_to(path.as_os_str(), "READY=1\nSTATUS=primary r0"));
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=primary r0");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("tandem-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        assert!(notify_to(
            std::ffi::OsStr::new(&format!("@{name}")),
            "WATCHDOG=1"
        ));
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        assert!(!notify_to(
            dir.path().join("absent").as_os_str(),
            "WATCHDOG=1"
        ));
    }

    #[test]
    fn status_text_is_one_line() {
        assert_eq!(one_line("a\nb"), "a b");
    }
}
