//! faultproxy: a fault-injecting TCP proxy for rehearsing DR events and for testing the
//! tandem replicator.
//!
//! A [`Proxy`] accepts connections on a listen address and connects each to one
//! upstream address, forwarding bytes both ways untouched (TLS passes through). Faults
//! ([`Fault`]) can be set and cleared at any time and apply to existing and new
//! connections at once: delay with jitter, throttle, blackhole (dead link without RST),
//! reset (RST, optionally refusing new connections), cut after N bytes, and bit flips
//! from an RNG seeded with a seed that is logged at start, so a failing run can be
//! replayed.
//!
//! Faults of different kinds combine; setting a fault replaces the earlier one of the
//! same kind; [`Proxy::clear`] removes all. Every buffer is bounded (see `conn`): when
//! the proxy does not forward, it stops reading and TCP backpressure applies.
//!
//! The binary (`src/main.rs`) wraps this library and adds a unix control socket
//! (`control`) and a `ctl` client.

mod conn;
pub mod control;
pub mod fault;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

pub use control::{ControlError, Request, Response};
pub use fault::{Dir, Fault, FaultError};

use conn::Shared;

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Bytes written to the upstream (client → upstream).
    pub bytes_up: u64,
    /// Bytes written to clients (upstream → client).
    pub bytes_down: u64,
    pub connections_accepted: u64,
    pub connections_active: u64,
    /// Connections reset at accept because `Reset { reject_new: true }` was in force.
    pub connections_rejected: u64,
    pub upstream_connect_failures: u64,
    pub bits_flipped: u64,
    /// Connections closed with RST by a `Reset` or `CutAfter` fault.
    pub resets: u64,
    /// Connections closed by a `CutAfter` fault (also counted in `resets`).
    pub cuts: u64,
}

/// A running proxy. Dropping it stops accepting, aborts all its connection tasks (their
/// sockets close) and removes the control socket file.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    control_path: Mutex<Option<PathBuf>>,
}

impl Proxy {
    /// Binds `listen` (port 0 picks a free port, see [`Proxy::local_addr`]) and starts
    /// forwarding to `upstream`. Must be called inside a tokio runtime.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, seed: u64) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(seed, upstream));
        info!(seed, %local_addr, %upstream, "faultproxy started (replay with --seed {seed})");
        let accept = tokio::spawn(conn::accept_loop(shared.clone(), listener));
        Ok(Proxy {
            shared,
            local_addr,
            tasks: Mutex::new(vec![accept]),
            control_path: Mutex::new(None),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The seed of all random choices (jitter, flipped bits).
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// Installs `fault`, replacing the earlier fault of the same kind.
    ///
    /// # Panics
    /// If the fault's parameters are invalid ([`Fault::validate`]); use
    /// [`Proxy::try_set`] for untrusted input.
    pub fn set(&self, fault: Fault) {
        if let Err(e) = self.try_set(fault) {
            panic!("invalid fault {fault:?}: {e}");
        }
    }

    /// Installs `fault` if its parameters are valid.
    pub fn try_set(&self, fault: Fault) -> Result<(), FaultError> {
        try_set_shared(&self.shared, fault)
    }

    /// Removes every fault.
    pub fn clear(&self) {
        clear_shared(&self.shared);
    }

    /// The faults in force.
    pub fn faults(&self) -> Vec<Fault> {
        self.shared.faults.borrow().to_faults()
    }

    pub fn stats(&self) -> Stats {
        stats_shared(&self.shared)
    }

    /// Serves the JSON-lines control protocol (see [`control`]) on the unix socket `path`.
    pub fn serve_control(&self, path: &Path) -> Result<(), ControlError> {
        let listener = control::bind(path)?;
        info!(path = %path.display(), "control socket listening");
        let task = tokio::spawn(control::serve(self.shared.clone(), listener));
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        *self.control_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        if let Some(path) = self
            .control_path
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub(crate) fn try_set_shared(shared: &Shared, fault: Fault) -> Result<(), FaultError> {
    fault.validate()?;
    let change_id = shared.next_change_id.fetch_add(1, Ordering::Relaxed);
    shared.faults.send_modify(|f| f.apply(fault, change_id));
    info!(?fault, "fault set");
    Ok(())
}

pub(crate) fn clear_shared(shared: &Shared) {
    shared.faults.send_modify(|f| f.clear());
    info!("all faults cleared");
}

pub(crate) fn stats_shared(shared: &Shared) -> Stats {
    let c = &shared.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Stats {
        bytes_up: load(&c.bytes_up),
        bytes_down: load(&c.bytes_down),
        connections_accepted: load(&c.connections_accepted),
        connections_active: load(&c.connections_active),
        connections_rejected: load(&c.connections_rejected),
        upstream_connect_failures: load(&c.upstream_connect_failures),
        bits_flipped: load(&c.bits_flipped),
        resets: load(&c.resets),
        cuts: load(&c.cuts),
    }
}
