//! Agents: the I/O shells that wire an engine to a volume, the metadata store,
//! the peer transport, the NBD export and the control socket, as tokio tasks.
//!
//! One task owns a volume's replication state (the engine); the others talk to
//! it over bounded channels (ARCHITECTURE §1). Local I/O completions come back
//! on a channel whose length is bounded by the ops in flight, which the engine
//! and the replication window bound.

pub mod control;
pub mod journal;
pub mod link;
pub(crate) mod metawork;
pub mod monitor;
pub mod node;
pub mod primary;
pub mod secondary;
pub mod spill; // wan (issue 11 item 5)

use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::meta::MetaError;
use crate::transport::{Security, TlsFiles, TransportError};
use crate::volume::VolumeError;
use crate::wire::WireError;

/// Errors that stop an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("NBD export: {0}")]
    Nbd(String),
    #[error("control socket {}: {source}", path.display())]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metrics address {addr} (--metrics / metrics =): {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error(
        "metadata {meta} belongs to a volume of {meta_bytes} bytes, but {volume} has {volume_bytes} bytes; use the right --meta or recreate it"
    )]
    MetaVolumeMismatch {
        meta: String,
        meta_bytes: u64,
        volume: String,
        volume_bytes: u64,
    },
}

/// What a role (primary or secondary) gets from the node agent that hosts it.
#[derive(Clone, Default)]
pub struct RoleContext {
    /// Cancelled to end the role: shutdown, or a role change.
    pub stop: CancellationToken,
    /// Where the role installs its control handler while it runs.
    pub control: control::HandlerSlot,
    /// Set before `stop` is cancelled for a demotion. Unset: stop at once (shutdown).
    pub demote: std::sync::Arc<std::sync::Mutex<Option<Demote>>>,
    /// Promotion of a disk that is not UpToDate (`tandem promote --force`).
    pub force: bool,
    /// Set before `stop` is cancelled for a promotion: a secondary brings its image
    /// to its last consistent point and copies it into the volume.
    pub promoting: std::sync::Arc<std::sync::Mutex<bool>>,
    /// The node's figures, kept across role changes (counters and events describe
    /// the node); None: the role makes its own.
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

/// A demotion's terms.
#[derive(Clone, Copy, Debug)]
pub struct Demote {
    /// How long attached NBD clients get to disconnect by themselves.
    pub wait: Duration,
    /// Demote even if the peer does not hold every write (it is then Outdated).
    pub force: bool,
    /// ha (issue 15.3): close NBD clients still attached after `wait` (a mounted
    /// filesystem on them aborts its journal); without it the demotion is refused.
    pub force_disconnect: bool,
}

/// Run one role on a control socket of its own, without role changes (the demo
/// and embedders start a role directly; the `tandem` binary runs [`node::run`]).
pub(crate) async fn run_alone<T, Fut>(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    serve: impl FnOnce(std::sync::Arc<NodeConfig>, RoleContext) -> Fut,
) -> Result<T, AgentError>
where
    Fut: std::future::Future<Output = Result<T, AgentError>>,
{
    let slot = control::HandlerSlot::default();
    let control_stop = CancellationToken::new();
    let control_task = control::serve(
        &cfg.control,
        &cfg.resource,
        std::sync::Arc::new(slot.clone()),
        control_stop.clone(),
    )
    .await?;
    let ctx = RoleContext {
        stop: shutdown,
        control: slot,
        ..RoleContext::default()
    };
    let result = serve(std::sync::Arc::new(cfg), ctx).await;
    control_stop.cancel();
    let _ = control_task.await;
    result
}

pub(crate) use crate::metrics::unix_now_ms;

/// Run `log` at most once per [`RETRY_LOG_INTERVAL`] for `key` (a condition that
/// repeats, like two primaries refusing each other), counting what was left out.
pub(crate) fn log_repeated(key: &str, log: impl FnOnce()) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;
    static LAST: Mutex<Option<HashMap<String, (Instant, u64)>>> = Mutex::new(None);
    let mut guard = LAST.lock().expect("log lock");
    let map = guard.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    match map.get_mut(key) {
        Some((at, skipped)) if now.duration_since(*at) < RETRY_LOG_INTERVAL => *skipped += 1,
        Some((at, skipped)) => {
            if *skipped > 0 {
                tracing::info!(
                    repeats = *skipped,
                    "the next message repeated {} times since it was last logged",
                    *skipped
                );
            }
            *at = now;
            *skipped = 0;
            log();
        }
        None => {
            if map.len() > 1024 {
                map.clear();
            }
            map.insert(key.to_string(), (now, 0));
            log();
        }
    }
}

/// Seconds since the epoch (0 if the clock is before it).
pub(crate) fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The transport security a node config asks for.
pub fn security_for(cfg: &NodeConfig) -> Security {
    if cfg.danger_plaintext {
        Security::DangerPlaintext
    } else {
        Security::Tls(TlsFiles {
            dir: cfg.tls_dir.clone(),
            node_name: cfg.name.clone(),
            peer_name: cfg.peer_name.clone(),
        })
    }
}

/// Map an I/O error to the errno handed to NBD clients.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::InvalidInput => libc::EINVAL,
        io::ErrorKind::OutOfMemory => libc::ENOMEM,
        io::ErrorKind::Unsupported => libc::EOPNOTSUPP,
        io::ErrorKind::PermissionDenied => libc::EPERM,
        _ => libc::EIO,
    })
}

/// Cancel `token` on SIGTERM or SIGINT (the first one); a second signal is left
/// to the default handler only after the agent has exited.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot install the SIGTERM handler: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}

/// How long to wait between log lines that repeat the same connection failure.
pub(crate) const RETRY_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Metadata of a block device must live on a persistent filesystem: the default
/// sidecar path (`/dev/sdX.tandem-meta`) would land on devtmpfs and vanish at reboot,
/// silently losing the bitmap and the volume's identity.
pub fn check_meta_path(cfg: &NodeConfig, volume: &crate::volume::Volume) -> Result<(), AgentError> {
    if volume.is_block_device() && cfg.meta == crate::meta::MetaStore::default_path_for(&cfg.volume)
    {
        return Err(AgentError::Refused(format!(
            "{} is a block device: pass --meta PATH on a persistent filesystem (e.g. /var/lib/tandem/{}.meta) for its metadata",
            cfg.volume.display(),
            cfg.resource
        )));
    }
    Ok(())
}

/// The superblock a node's metadata starts with on its first start: a primary
/// creates the volume's identity and first generation; a secondary has none until
/// it adopts a primary's at the first handshake (G6).
fn fresh_superblock(
    role: crate::types::Role,
    size_bytes: u64,
    block_size: u32,
) -> crate::meta::Superblock {
    use crate::types::{DiskState, Generation, Role, VolumeId};
    let primary = role == Role::Primary;
    crate::meta::Superblock {
        volume_id: if primary {
            VolumeId::random()
        } else {
            VolumeId::NIL
        },
        size_bytes,
        block_size,
        role,
        disk_state: if primary {
            DiskState::UpToDate
        } else {
            DiskState::Inconsistent
        },
        is_new: !primary,
        gen_current: if primary {
            Generation::random()
        } else {
            Generation::NONE
        },
        gen_bitmap_base: Generation::NONE,
        gen_history: [Generation::NONE; 2],
        promoted_at_s: if primary { unix_now_s() } else { 0 },
        clean_shutdown: true,
        resync_cursor: None,
        bitmap_valid: true,
        volume_mixed: false,
        poisoned: false,
        consistent_seq: 0,
        consistent_at_ms: 0,
        mixed_through: 0,
    }
}

/// Open a node's volume (exclusively) and its metadata, creating the metadata on
/// the first start. Both are refused with a clear error when held by another agent.
///
/// A secondary whose metadata has lost both superblock slots rebuilds it as a new
/// secondary (the old file is kept beside it) and returns `rebuilt = true`: its data
/// is then compared block by block with the primary's by hash — never assumed in
/// sync, never blindly copied. A primary cannot do that (its identity is lost) and
/// refuses with instructions.
pub(crate) fn open_node(
    cfg: &NodeConfig,
    role: crate::types::Role,
) -> Result<(crate::volume::Volume, crate::meta::Opened, bool), AgentError> {
    // ha (issue 12): once a node has metadata, the size it records is the
    // volume's (an online grow changes it; the resource file's `size` is the size
    // a new image is created with). A volume larger than recorded is served at
    // the recorded size: a block device grown before `tandem resize`, or a
    // resize interrupted before this node's metadata recorded it.
    let recorded_bytes = match crate::ops::persisted_superblock(&cfg.meta) {
        Ok(Some(sb)) if cfg.volume.exists() => Some(sb.size_bytes),
        _ => None,
    };
    let opts = crate::volume::OpenOptions {
        create_size_bytes: if recorded_bytes.is_some() {
            None
        } else {
            cfg.size_bytes
        },
        direct: cfg.direct,
        engine: cfg.io_engine,
    };
    let volume = retry_while_held(
        || crate::volume::Volume::open(&cfg.volume, &opts),
        |e| matches!(e, crate::volume::VolumeError::Busy { .. }),
    )?;
    if let Some(recorded) = recorded_bytes
        && volume.size_bytes() > recorded
    {
        tracing::warn!(
            volume = %cfg.volume.display(),
            volume_bytes = volume.size_bytes(),
            recorded_bytes = recorded,
            "the volume is larger than its metadata records (grown before tandem resize, or a resize interrupted before it was recorded here): serving the recorded size; tandem resize on the primary uses the rest"
        );
        volume.limit_to(recorded);
    }
    check_meta_path(cfg, &volume)?;
    let size_bytes = volume.size_bytes();
    tracing::info!(volume = %cfg.volume.display(), size_bytes, engine = volume.engine_name(), "opened volume");
    let open = || {
        retry_while_held(
            || {
                crate::meta::MetaStore::open_or_create(
                    &cfg.meta,
                    size_bytes,
                    cfg.block_size,
                    || fresh_superblock(role, size_bytes, cfg.block_size),
                )
            },
            |e| matches!(e, MetaError::Locked { .. }),
        )
    };
    let (opened, rebuilt) = match open() {
        Err(e @ MetaError::BothSlotsBad { .. }) if role == crate::types::Role::Secondary => {
            let aside = aside_path(&cfg.meta);
            tracing::error!(
                "{e}. Rebuilding it as a new secondary (the damaged file is kept as {}); the data on {} is kept and every block will be compared with the primary's by hash",
                aside.display(),
                cfg.volume.display()
            );
            std::fs::rename(&cfg.meta, &aside).map_err(|source| {
                AgentError::Refused(format!(
                    "cannot move the damaged metadata {} aside: {source}",
                    cfg.meta.display()
                ))
            })?;
            (open()?, true)
        }
        Err(e @ MetaError::BothSlotsBad { .. }) => {
            return Err(AgentError::Refused(format!(
                "{e}. This primary's identity and generations are lost. To recover: move {} aside and start this node again (it gets a new identity), \
                 then re-pair the secondary: stop it, move its metadata aside and start it with --seeded, which compares every block by hash \
                 and sends only those that differ",
                cfg.meta.display()
            )));
        }
        r => (r?, false),
    };
    if let Some(r) = &opened.recovered_from {
        tracing::warn!(meta = %cfg.meta.display(), "metadata recovered: {r}");
    }
    Ok((volume, opened, rebuilt))
}

/// Drop a file's (or block device's) clean cached pages, after it was made
/// durable: reads then show what the disk holds. A disk that failed a write or an
/// fdatasync is served again only after this: Linux keeps the pages whose
/// writeback failed in the page cache, marked clean, so a restart that only
/// fsyncs would read, compare and replicate data the disk never got (found by the
/// simulator: engine::sim, the seeds with I/O errors fail G3 without it).
pub(crate) fn drop_cached_pages(path: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

/// Where a damaged file is kept: `PATH.damaged-UNIXSECONDS`.
pub(crate) fn aside_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut p = path.to_path_buf().into_os_string();
    p.push(format!(
        ".damaged-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    ));
    std::path::PathBuf::from(p)
}

/// How long a starting agent waits for a lock held by a previous holder. An agent
/// killed with I/O in flight keeps its files (and their locks) until the kernel
/// has torn down its io_uring, which can take a moment after the process is gone;
/// a restart (systemd, an operator) must not fail on that.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Run `open` until it succeeds, fails otherwise, or `is_held` errors persist
/// for [`LOCK_WAIT`]; then the last error is returned.
fn retry_while_held<T, E>(
    mut open: impl FnMut() -> Result<T, E>,
    is_held: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let start = std::time::Instant::now();
    loop {
        match open() {
            Err(e) if is_held(&e) && start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Ok(v) => {
                if start.elapsed() >= Duration::from_millis(100) {
                    tracing::info!(
                        waited_ms = start.elapsed().as_millis() as u64,
                        "the previous holder released the lock"
                    );
                }
                return Ok(v);
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a node answers a second connection from its peer while one is attached.
pub(crate) const ALREADY_CONNECTED: &str = "already connected to this peer";
