//! Typed node configuration, from command-line flags and/or a TOML resource file.
//!
//! A resource file describes both nodes of a pair, like a DRBD resource file;
//! `--config FILE --node NAME` picks this node, and the other node is the peer.
//! Flags given on the command line override the file. Every option has the same
//! name in both places (`--queue-bytes-max` / `queue-bytes-max`).
//!
//! ```toml
//! [resource]
//! name = "r0"
//! mode = "sync"                  # or "async"
//! tls-dir = "/etc/tandem/r0"
//!
//! [nodes.alpha]
//! address = "192.0.2.10:7789"    # replication address (this node listens here)
//! volume = "/dev/vdb"
//! meta = "/var/lib/tandem/r0.meta"
//! nbd = "unix:/run/tandem/r0/nbd.sock"  # export served while primary
//! control = "/run/tandem/r0/control.sock"
//! metrics = "127.0.0.1:9942"     # Prometheus /metrics (optional)
//!
//! [nodes.beta]
//! address = "192.0.2.11:7789"
//! volume = "/srv/images/r0.img"
//! size = "100G"
//! ```
//!
//! Also the start-up checks of a node ([`NodeConfig::preflight`]): everything
//! that would make a start fail is looked at before the agent creates or opens
//! anything, so a refused start leaves no file behind; and the resources of a
//! host for `tandem status --all` ([`local_resources`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::primary::Mode;
use crate::types::{Role, parse_size};

/// Errors building a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {}: {source}; check the path given to --config (the unit reads /etc/tandem/RESOURCE.toml)",
        path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config file {}: node '{node}' is not defined (nodes: {known}); pass --node with one of them", path.display())]
    UnknownNode {
        path: PathBuf,
        node: String,
        known: String,
    },
    #[error("config file {}: {message}", path.display())]
    Nodes { path: PathBuf, message: String },
    #[error("missing option {option}: {hint}")]
    Missing {
        option: &'static str,
        hint: &'static str,
    },
    #[error("invalid value for {option}: {message}")]
    Invalid {
        option: &'static str,
        message: String,
    },
}

/// A size given as a number of bytes or a string with a K/M/G/T suffix.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self, option: &'static str) -> Result<u64, ConfigError> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => {
                parse_size(s).map_err(|message| ConfigError::Invalid { option, message })
            }
        }
    }
}

/// Options shared by the whole resource (`[resource]`), all optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResourceSection {
    pub name: Option<String>,
    pub mode: Option<String>,
    pub on_disconnect: Option<String>,
    pub tls_dir: Option<PathBuf>,
    pub danger_plaintext: Option<bool>,
    pub compress_level: Option<i32>,
    pub queue_bytes_max: Option<SizeValue>,
    pub queue_writes_max: Option<u32>,
    pub block_size: Option<SizeValue>,
    pub flush_interval_ms: Option<u64>,
    pub flush_bytes_max: Option<SizeValue>,
    pub resync_rate: Option<SizeValue>,
    pub heartbeat_interval_ms: Option<u64>,
    pub peer_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub al_extents: Option<usize>,
    /// Activity-log extent size (scale: large volumes with random writes).
    pub al_extent_size: Option<SizeValue>,
    pub seeded: Option<bool>,
    pub direct: Option<bool>,
    pub io_engine: Option<String>,
    pub split_brain_policy: Option<String>,
    pub fence_peer: Option<String>,
    pub rpo_seconds: Option<f64>,
    pub rpo_hook: Option<String>,
    /// The secondary's redo journal (issue 10): ring size.
    pub journal_size: Option<SizeValue>,
    /// How far back rollback and inspection reach (seconds).
    pub rollback_window_s: Option<u64>,
    /// What a resync too large for the journal does: refuse (keep the last
    /// consistent image) or inconsistent (apply it in place).
    pub resync_overflow: Option<String>,
    /// wan (issue 11 item 5): the primary's spill log, record bytes (0 = none).
    pub spill_size: Option<SizeValue>,
    // nbd (issue 13): TLS on the NBD export, and plaintext off loopback.
    pub nbd_tls_clients: Option<Vec<String>>,
    pub danger_nbd_plaintext: Option<bool>,
}

/// Per-node options (`[nodes.NAME]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeSection {
    pub address: Option<SocketAddr>,
    pub volume: Option<PathBuf>,
    pub size: Option<SizeValue>,
    pub meta: Option<PathBuf>,
    pub nbd: Option<String>,
    pub nbd_name: Option<String>,
    pub control: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// The redo journal's file (default: the metadata path + ".journal").
    pub journal: Option<PathBuf>,
    /// wan: the primary's spill log file (default: the metadata path + ".spill").
    pub spill_log: Option<PathBuf>,
    // nbd (issue 13): the secondary's read-only export.
    pub export_readonly: Option<String>,
}

/// A parsed resource file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceFile {
    #[serde(default)]
    pub resource: ResourceSection,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeSection>,
}

impl ResourceFile {
    pub fn load(path: &Path) -> Result<ResourceFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: ResourceFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        if file.nodes.len() != 2 {
            return Err(ConfigError::Nodes {
                path: path.to_owned(),
                message: format!(
                    "a resource describes exactly 2 nodes under [nodes.NAME], found {}",
                    file.nodes.len()
                ),
            });
        }
        Ok(file)
    }
}

/// How the secondary's I/O engine is chosen.
pub use crate::volume::EngineChoice;

/// What a sync-mode primary does with writes while its secondary is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Complete writes on this node alone, track them in the bitmap, log loudly.
    Degrade,
    /// Writes (and flushes) wait until the secondary is back and streaming.
    Block,
}

/// Everything a node agent needs, resolved and validated.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub resource: String,
    pub role: Role,
    pub name: String,
    pub peer_name: String,
    pub volume: PathBuf,
    pub size_bytes: Option<u64>,
    pub meta: PathBuf,
    pub direct: bool,
    pub io_engine: EngineChoice,
    /// Replication address this node listens on (both roles: the peer may dial either
    /// way; a primary refuses a second primary there, naming the split brain).
    pub listen: Option<SocketAddr>,
    /// The peer's replication address (dialed by a primary, and by a secondary while
    /// no primary is attached).
    pub peer: Option<SocketAddr>,
    /// NBD export address (served while primary).
    pub nbd: Option<String>,
    pub nbd_name: String,
    pub control: PathBuf,
    pub mode: Mode,
    /// Sync mode without a connected secondary: keep serving (degrade) or make
    /// writes wait for the peer (block).
    pub on_disconnect: OnDisconnect,
    pub tls_dir: PathBuf,
    pub danger_plaintext: bool,
    pub compress_level: i32,
    pub queue_bytes_max: u64,
    pub queue_writes_max: u32,
    pub block_size: u32,
    pub flush_interval_ms: u64,
    pub flush_bytes_max: u64,
    pub resync_rate_bytes_per_s: u64,
    pub heartbeat_interval_ms: u64,
    pub peer_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    /// Activity-log extent size and the most extents active at once (§4).
    pub al_extent_bytes: u64,
    pub al_extents_max: usize,
    /// Secondary: the volume already holds an old copy; compare it by hash at the
    /// first sync instead of receiving every block.
    pub seeded: bool,
    /// Who loses when both nodes wrote while apart (G8); default: nobody, refuse.
    pub split_brain_policy: crate::engine::generations::SplitBrainPolicy,
    /// Command run (`sh -c`) before promotion while the peer is unreachable; a
    /// non-zero exit stops the promotion.
    pub fence_peer: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    pub metrics: Option<SocketAddr>,
    /// Recovery point objective: alert when the lag exceeds this many seconds.
    pub rpo_seconds: Option<f64>,
    /// Command (run with `sh -c`) when the lag crosses the RPO target either way.
    pub rpo_hook: Option<String>,
    /// The secondary's redo journal file, its ring size, and the rollback window.
    pub journal: PathBuf,
    pub journal_bytes: u64,
    pub rollback_window_ms: u64,
    /// A resync larger than the journal may make the secondary inconsistent.
    pub resync_overflow_inconsistent: bool,
    /// wan (issue 11 item 5): the primary's ordered spill log and the record
    /// bytes it holds (0 = none: a full window goes ahead at once).
    pub spill_log: PathBuf,
    pub spill_bytes: u64,
    // nbd (issue 13):
    /// Secondary: serve the volume read-only over NBD on this address.
    pub export_readonly: Option<String>,
    /// Names whose client certificates (same CA) may use the NBD export; when
    /// any is given, every export client must negotiate TLS.
    pub nbd_tls_clients: Vec<String>,
    /// Allow a plaintext NBD export on a non-loopback address.
    pub danger_nbd_plaintext: bool,
}

/// What `tandem adjust` (or SIGHUP) does with a re-read resource file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AdjustPlan {
    /// Keys applied to the running role at once.
    pub live: Vec<&'static str>,
    /// Keys that change at the next role change or restart (listeners, the export,
    /// the replication session's parameters).
    pub later: Vec<&'static str>,
}

/// Compare the running configuration with a re-read one: refuse what would make
/// it another node or another volume (`Err` names the keys: nothing is changed);
/// otherwise say which keys change live and which at the next role change.
pub fn adjust_plan(old: &NodeConfig, new: &NodeConfig) -> Result<AdjustPlan, String> {
    macro_rules! changed {
        ($($field:ident => $key:literal),* $(,)?) => {{
            let mut keys: Vec<&'static str> = Vec::new();
            $(if format!("{:?}", old.$field) != format!("{:?}", new.$field) {
                keys.push($key);
            })*
            keys
        }};
    }
    let fixed = changed!(
        resource => "name (the resource)",
        name => "the node's name",
        peer_name => "the peer's name",
        volume => "volume",
        meta => "meta",
        journal => "journal",
        block_size => "block-size",
    );
    if !fixed.is_empty() {
        return Err(format!(
            "it changes {} of the running node, which never change live (another volume or node is a \
             new resource: stop this one first). Revert those keys and adjust again",
            fixed.join(", ")
        ));
    }
    let live = changed!(resync_rate_bytes_per_s => "resync-rate");
    let later = changed!(
        // ha (issue 12): the size a new image is created with; a running
        // volume's size changes with `tandem resize` and is then recorded in
        // its metadata, so the file may follow it.
        size_bytes => "size (for a new image; tandem resize grows a running volume)",
        mode => "mode",
        on_disconnect => "on-disconnect",
        listen => "address",
        peer => "the peer's address",
        nbd => "nbd",
        nbd_name => "nbd-name",
        control => "control (at restart only)",
        tls_dir => "tls-dir",
        danger_plaintext => "danger-plaintext",
        compress_level => "compress-level",
        queue_bytes_max => "queue-bytes-max",
        queue_writes_max => "queue-writes-max",
        flush_interval_ms => "flush-interval-ms",
        flush_bytes_max => "flush-bytes-max",
        heartbeat_interval_ms => "heartbeat-interval-ms",
        peer_timeout_ms => "peer-timeout-ms",
        connect_timeout_ms => "connect-timeout-ms",
        drain_timeout_ms => "drain-timeout-ms",
        al_extents_max => "al-extents",
        al_extent_bytes => "al-extent-size",
        split_brain_policy => "split-brain-policy",
        fence_peer => "fence-peer",
        metrics => "metrics",
        rpo_seconds => "rpo-seconds",
        rpo_hook => "rpo-hook",
        journal_bytes => "journal-size",
        rollback_window_ms => "rollback-window-s",
        resync_overflow_inconsistent => "resync-overflow",
        export_readonly => "export-readonly",
        nbd_tls_clients => "nbd-tls-client",
        danger_nbd_plaintext => "danger-nbd-plaintext",
        direct => "direct",
        io_engine => "io-engine",
        seeded => "seeded",
    );
    Ok(AdjustPlan { live, later })
}

/// Defaults, with the reasoning behind each number.
pub mod defaults {
    /// 4 KiB: the page size, the usual filesystem block, 32 MiB of bitmap per TiB.
    pub const BLOCK_SIZE: u32 = 4096;
    /// zstd level 1: ~500 MB/s per core on text-like data; higher levels cost more CPU
    /// than a LAN saves. 0 disables compression.
    pub const COMPRESS_LEVEL: i32 = 1;
    /// The async window: 64 MiB or 8192 writes in flight to the secondary.
    pub const QUEUE_BYTES_MAX: u64 = 64 << 20;
    pub const QUEUE_WRITES_MAX: u32 = 8192;
    /// The secondary flushes at least every 5 ms, or every 64 MiB applied.
    pub const FLUSH_INTERVAL_MS: u64 = 5;
    pub const FLUSH_BYTES_MAX: u64 = 64 << 20;
    /// Resync at most 256 MiB/s so it does not starve client I/O.
    pub const RESYNC_RATE_BYTES_PER_S: u64 = 256 << 20;
    /// Heartbeat every second; a peer silent for 5 s is dead.
    pub const HEARTBEAT_INTERVAL_MS: u64 = 1000;
    pub const PEER_TIMEOUT_MS: u64 = 5000;
    pub const CONNECT_TIMEOUT_MS: u64 = 5000;
    /// On shutdown, wait up to 30 s for the secondary to catch up.
    pub const DRAIN_TIMEOUT_MS: u64 = 30_000;
    /// 4 MiB activity extents (DRBD's size): after a crash at most `al-extents` ×
    /// 4 MiB (3.75 GiB by default) is compared by hash; a write to an already-active
    /// extent costs no metadata I/O. `al-extent-size` trades a longer comparison
    /// after a crash for fewer activations under random writes over a large volume.
    pub const AL_EXTENT_BYTES: u64 = 4 << 20;
    /// Extent sizes `al-extent-size` accepts: 1 MiB to 1 GiB (powers of two).
    pub const AL_EXTENT_BYTES_MIN: u64 = 1 << 20;
    pub const AL_EXTENT_BYTES_MAX: u64 = 1 << 30;
    /// The secondary's redo journal: 1 GiB, and rollback up to an hour back
    /// (whichever is reached first, issue 10).
    pub const JOURNAL_BYTES: u64 = 1 << 30;
    pub const ROLLBACK_WINDOW_S: u64 = 3600;
    /// wan: the primary's spill log: 1 GiB of writes (16 windows; about 50 s of
    /// a 20 MB/s WAN link's backlog) before async mode goes ahead.
    pub const SPILL_BYTES: u64 = 1 << 30;
}

/// Raw option values from the command line (all optional; the file fills gaps).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub node: Option<String>,
    pub name: Option<String>,
    pub peer_name: Option<String>,
    pub volume: Option<PathBuf>,
    pub size: Option<String>,
    pub meta: Option<PathBuf>,
    pub direct: bool,
    pub io_engine: Option<String>,
    pub listen: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub nbd: Option<String>,
    pub nbd_name: Option<String>,
    pub control: Option<PathBuf>,
    pub mode: Option<String>,
    pub on_disconnect: Option<String>,
    pub tls_dir: Option<PathBuf>,
    pub danger_plaintext: bool,
    pub compress_level: Option<i32>,
    pub queue_bytes_max: Option<String>,
    pub queue_writes_max: Option<u32>,
    pub block_size: Option<String>,
    pub flush_interval_ms: Option<u64>,
    pub flush_bytes_max: Option<String>,
    pub resync_rate: Option<String>,
    pub heartbeat_interval_ms: Option<u64>,
    pub peer_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub al_extents: Option<usize>,
    pub al_extent_size: Option<String>,
    pub seeded: bool,
    pub split_brain_policy: Option<String>,
    pub fence_peer: Option<String>,
    pub metrics: Option<SocketAddr>,
    pub rpo_seconds: Option<f64>,
    pub rpo_hook: Option<String>,
    pub journal: Option<PathBuf>,
    pub journal_size: Option<String>,
    pub rollback_window_s: Option<u64>,
    pub resync_overflow: Option<String>,
    // wan (issue 11 item 5):
    pub spill_log: Option<PathBuf>,
    pub spill_size: Option<String>,
    // nbd (issue 13):
    pub export_readonly: Option<String>,
    pub nbd_tls_clients: Vec<String>,
    pub danger_nbd_plaintext: bool,
}

/// Where `tandem status`/`tandem events` find an agent: `--control SOCK`, or the
/// node's control socket from `--config FILE --node NAME`; and which resource
/// name to send (from `--resource`, else the file's), so that a socket of
/// another resource refuses instead of answering for the wrong one.
pub fn control_target(
    control: Option<PathBuf>,
    resource: Option<String>,
    config: Option<&Path>,
    node: Option<&str>,
) -> Result<(PathBuf, Option<String>), ConfigError> {
    let Some(path) = config else {
        let control = control.ok_or(ConfigError::Missing {
            option: "--control",
            hint: "the agent's control socket (or --config FILE --node NAME)",
        })?;
        return Ok((control, resource));
    };
    let file = ResourceFile::load(path)?;
    let resource =
        resource.or_else(|| Some(file.resource.name.clone().unwrap_or_else(|| "r0".into())));
    if let Some(control) = control {
        return Ok((control, resource));
    }
    let node = node.ok_or(ConfigError::Missing {
        option: "--node",
        hint: "with --config and without --control, name the node whose agent to ask",
    })?;
    let section = file
        .nodes
        .get(node)
        .ok_or_else(|| ConfigError::UnknownNode {
            path: path.to_owned(),
            node: node.to_string(),
            known: file.nodes.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
    let control = match (&section.control, &section.volume) {
        (Some(c), _) => c.clone(),
        (None, Some(v)) => {
            let mut p = v.clone().into_os_string();
            p.push(".tandem.sock");
            PathBuf::from(p)
        }
        (None, None) => {
            return Err(ConfigError::Nodes {
                path: path.to_owned(),
                message: format!("node '{node}' has neither control nor volume; pass --control"),
            });
        }
    };
    Ok((control, resource))
}

/// One resource file of a directory, as `tandem status --all` finds it: the
/// resource, which of its nodes is this host, and that node's control socket.
#[derive(Clone, Debug)]
pub struct LocalResource {
    pub file: PathBuf,
    pub resource: String,
    /// This host's node, or why it could not be told.
    pub node: Result<String, String>,
    /// The node's control socket (`control`, else `VOLUME.tandem.sock`).
    pub control: Option<PathBuf>,
}

/// `NODE=` from the unit's environment file beside a resource file (`r0.env`).
fn node_from_env_file(file: &Path) -> Option<String> {
    let env = file.with_extension("env");
    let text = std::fs::read_to_string(env).ok()?;
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("NODE=")?;
        let v = v.trim().trim_matches('"').trim_matches('\'');
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// This host's name (`uname -n`).
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Which node of `file` this host is: `--node`, else `NODE=` of the unit's env
/// file beside it, else the node named like the host, else the only node whose
/// replication address is assigned to this host.
fn local_node(path: &Path, file: &ResourceFile, node: Option<&str>) -> Result<String, String> {
    let known = || file.nodes.keys().cloned().collect::<Vec<_>>().join(", ");
    if let Some(n) = node
        .map(str::to_string)
        .or_else(|| node_from_env_file(path))
    {
        return if file.nodes.contains_key(&n) {
            Ok(n)
        } else {
            Err(format!(
                "node '{n}' is not in the file (nodes: {})",
                known()
            ))
        };
    }
    if let Some(h) = host_name()
        && file.nodes.contains_key(&h)
    {
        return Ok(h);
    }
    let local: Vec<&String> = file
        .nodes
        .iter()
        .filter(|(_, n)| {
            n.address
                .is_some_and(|a| std::net::TcpListener::bind(SocketAddr::new(a.ip(), 0)).is_ok())
        })
        .map(|(k, _)| k)
        .collect();
    match local.as_slice() {
        [one] => Ok((*one).clone()),
        _ => Err(format!(
            "cannot tell which node this host is (nodes: {}); pass --node, or write NODE=NAME into {}",
            known(),
            path.with_extension("env").display()
        )),
    }
}

/// Every resource file (`*.toml`) in `dir`, sorted by name, with this host's node
/// and its control socket. A file that does not parse is returned with the reason
/// in `node`.
pub fn local_resources(dir: &Path, node: Option<&str>) -> Result<Vec<LocalResource>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::with_capacity(files.len());
    for path in files {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = match ResourceFile::load(&path) {
            Ok(f) => f,
            Err(e) => {
                out.push(LocalResource {
                    file: path,
                    resource: stem,
                    node: Err(e.to_string()),
                    control: None,
                });
                continue;
            }
        };
        let resource = file.resource.name.clone().unwrap_or_else(|| "r0".into());
        let node = local_node(&path, &file, node);
        let control = node.as_ref().ok().and_then(|n| {
            let section = &file.nodes[n];
            section.control.clone().or_else(|| {
                section.volume.as_ref().map(|v| {
                    let mut p = v.clone().into_os_string();
                    p.push(".tandem.sock");
                    PathBuf::from(p)
                })
            })
        });
        out.push(LocalResource {
            file: path,
            resource,
            node,
            control,
        });
    }
    Ok(out)
}

fn size_opt(
    cli: &Option<String>,
    file: &Option<SizeValue>,
    option: &'static str,
) -> Result<Option<u64>, ConfigError> {
    if let Some(s) = cli {
        return parse_size(s)
            .map(Some)
            .map_err(|message| ConfigError::Invalid { option, message });
    }
    file.as_ref().map(|v| v.bytes(option)).transpose()
}

impl NodeConfig {
    /// Resolve a node's configuration for `role` from flags and an optional resource file.
    pub fn resolve(role: Role, o: Overrides) -> Result<NodeConfig, ConfigError> {
        let file = o.config.as_deref().map(ResourceFile::load).transpose()?;
        let res = file
            .as_ref()
            .map(|f| f.resource.clone())
            .unwrap_or_default();
        let (mine, theirs, my_name, their_name) =
            match (&file, &o.node) {
                (Some(f), node) => {
                    let path = o.config.clone().expect("file implies path");
                    let node = node.clone().or_else(|| o.name.clone()).ok_or(ConfigError::Missing {
                    option: "--node",
                    hint: "with --config, name this node (one of the [nodes.NAME] sections)",
                })?;
                    let known = f.nodes.keys().cloned().collect::<Vec<_>>().join(", ");
                    let mine = f
                        .nodes
                        .get(&node)
                        .cloned()
                        .ok_or(ConfigError::UnknownNode {
                            path,
                            node: node.clone(),
                            known,
                        })?;
                    let (peer_name, theirs) = f
                        .nodes
                        .iter()
                        .find(|(k, _)| **k != node)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .expect("2 nodes");
                    (mine, theirs, Some(node), Some(peer_name))
                }
                (None, _) => (NodeSection::default(), NodeSection::default(), None, None),
            };
        let default_name = role.to_string();
        let default_peer = match role {
            Role::Primary => Role::Secondary.to_string(),
            Role::Secondary => Role::Primary.to_string(),
        };
        let name = o.name.or(my_name).unwrap_or(default_name);
        let peer_name = o.peer_name.or(their_name).unwrap_or(default_peer);
        let volume = o.volume.or(mine.volume).ok_or(ConfigError::Missing {
            option: "--volume",
            hint: "the image file or block device to replicate",
        })?;
        let size_bytes = size_opt(&o.size, &mine.size, "--size")?;
        let meta = o
            .meta
            .or(mine.meta)
            .unwrap_or_else(|| crate::meta::MetaStore::default_path_for(&volume));
        let meta_for_journal = meta.clone();
        let control = o.control.or(mine.control).unwrap_or_else(|| {
            let mut p = volume.clone().into_os_string();
            p.push(".tandem.sock");
            PathBuf::from(p)
        });
        let mode = match o.mode.or(res.mode).as_deref() {
            None | Some("sync") => Mode::Sync,
            Some("async") => Mode::Async,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    option: "--mode",
                    message: format!("'{other}': expected sync or async"),
                });
            }
        };
        let on_disconnect = match o.on_disconnect.or(res.on_disconnect).as_deref() {
            None | Some("degrade") => OnDisconnect::Degrade,
            Some("block") => OnDisconnect::Block,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    option: "--on-disconnect",
                    message: format!("'{other}': expected degrade or block"),
                });
            }
        };
        let io_engine = match o.io_engine.or(res.io_engine).as_deref() {
            None | Some("auto") => EngineChoice::Auto,
            Some("io_uring") | Some("uring") => EngineChoice::Uring,
            Some("threads") => EngineChoice::Threads,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    option: "--io-engine",
                    message: format!("'{other}': expected auto, io_uring or threads"),
                });
            }
        };
        let block_size = size_opt(&o.block_size, &res.block_size, "--block-size")?
            .unwrap_or(defaults::BLOCK_SIZE as u64);
        if !block_size.is_power_of_two() || !(512..=(1 << 20)).contains(&block_size) {
            return Err(ConfigError::Invalid {
                option: "--block-size",
                message: format!("{block_size}: must be a power of two from 512 to 1M"),
            });
        }
        let compress_level = o
            .compress_level
            .or(res.compress_level)
            .unwrap_or(defaults::COMPRESS_LEVEL);
        if !(0..=19).contains(&compress_level) {
            return Err(ConfigError::Invalid {
                option: "--compress-level",
                message: format!("{compress_level}: expected 0 (off) to 19"),
            });
        }
        // Both nodes get both addresses: either can take either role at runtime.
        let listen = o.listen.or(mine.address);
        let peer = o.peer.or(theirs.address);
        let split_brain_policy =
            match o.split_brain_policy.or(res.split_brain_policy) {
                None => crate::engine::generations::SplitBrainPolicy::default(),
                Some(text) => crate::engine::generations::SplitBrainPolicy::parse(&text).map_err(
                    |message| ConfigError::Invalid {
                        option: "--split-brain-policy",
                        message,
                    },
                )?,
            };
        let fence_peer = o
            .fence_peer
            .or(res.fence_peer)
            .filter(|c| !c.trim().is_empty());
        let tls_dir = o
            .tls_dir
            .or(res.tls_dir)
            .unwrap_or_else(|| PathBuf::from("/etc/tandem"));
        let cfg = NodeConfig {
            resource: res.name.unwrap_or_else(|| "r0".into()),
            role,
            name,
            peer_name,
            volume,
            size_bytes,
            meta,
            direct: o.direct || res.direct.unwrap_or(false),
            io_engine,
            listen,
            peer,
            nbd: o.nbd.or(mine.nbd),
            nbd_name: o.nbd_name.or(mine.nbd_name).unwrap_or_default(),
            control,
            mode,
            on_disconnect,
            tls_dir,
            danger_plaintext: o.danger_plaintext || res.danger_plaintext.unwrap_or(false),
            compress_level,
            queue_bytes_max: size_opt(
                &o.queue_bytes_max,
                &res.queue_bytes_max,
                "--queue-bytes-max",
            )?
            .unwrap_or(defaults::QUEUE_BYTES_MAX),
            queue_writes_max: o
                .queue_writes_max
                .or(res.queue_writes_max)
                .unwrap_or(defaults::QUEUE_WRITES_MAX),
            block_size: block_size as u32,
            flush_interval_ms: o
                .flush_interval_ms
                .or(res.flush_interval_ms)
                .unwrap_or(defaults::FLUSH_INTERVAL_MS),
            flush_bytes_max: size_opt(
                &o.flush_bytes_max,
                &res.flush_bytes_max,
                "--flush-bytes-max",
            )?
            .unwrap_or(defaults::FLUSH_BYTES_MAX),
            resync_rate_bytes_per_s: size_opt(&o.resync_rate, &res.resync_rate, "--resync-rate")?
                .unwrap_or(defaults::RESYNC_RATE_BYTES_PER_S),
            heartbeat_interval_ms: o
                .heartbeat_interval_ms
                .or(res.heartbeat_interval_ms)
                .unwrap_or(defaults::HEARTBEAT_INTERVAL_MS),
            peer_timeout_ms: o
                .peer_timeout_ms
                .or(res.peer_timeout_ms)
                .unwrap_or(defaults::PEER_TIMEOUT_MS),
            connect_timeout_ms: o
                .connect_timeout_ms
                .or(res.connect_timeout_ms)
                .unwrap_or(defaults::CONNECT_TIMEOUT_MS),
            drain_timeout_ms: o
                .drain_timeout_ms
                .or(res.drain_timeout_ms)
                .unwrap_or(defaults::DRAIN_TIMEOUT_MS),
            al_extent_bytes: size_opt(&o.al_extent_size, &res.al_extent_size, "--al-extent-size")?
                .unwrap_or(defaults::AL_EXTENT_BYTES),
            al_extents_max: o
                .al_extents
                .or(res.al_extents)
                .unwrap_or(crate::meta::al::AL_EXTENTS_DEFAULT),
            seeded: o.seeded || res.seeded.unwrap_or(false),
            metrics: o.metrics.or(mine.metrics),
            rpo_seconds: o.rpo_seconds.or(res.rpo_seconds),
            rpo_hook: o.rpo_hook.or(res.rpo_hook).filter(|h| !h.trim().is_empty()),
            split_brain_policy,
            fence_peer,
            journal: o.journal.or(mine.journal).unwrap_or_else(|| {
                let mut p = meta_for_journal.clone().into_os_string();
                p.push(".journal");
                PathBuf::from(p)
            }),
            journal_bytes: size_opt(&o.journal_size, &res.journal_size, "--journal-size")?
                .unwrap_or(defaults::JOURNAL_BYTES),
            // wan (issue 11 item 5)
            spill_log: o.spill_log.or(mine.spill_log).unwrap_or_else(|| {
                let mut p = meta_for_journal.clone().into_os_string();
                p.push(".spill");
                PathBuf::from(p)
            }),
            spill_bytes: size_opt(&o.spill_size, &res.spill_size, "--spill-size")?
                .unwrap_or(defaults::SPILL_BYTES),
            rollback_window_ms: o
                .rollback_window_s
                .or(res.rollback_window_s)
                .unwrap_or(defaults::ROLLBACK_WINDOW_S)
                .saturating_mul(1000),
            resync_overflow_inconsistent: match o
                .resync_overflow
                .or(res.resync_overflow)
                .as_deref()
                .unwrap_or("refuse")
            {
                "refuse" => false,
                "inconsistent" => true,
                other => {
                    return Err(ConfigError::Invalid {
                        option: "--resync-overflow",
                        message: format!("'{other}': expected refuse or inconsistent"),
                    });
                }
            },
            // nbd (issue 13): flags win over the file.
            export_readonly: o.export_readonly.or(mine.export_readonly),
            nbd_tls_clients: if o.nbd_tls_clients.is_empty() {
                res.nbd_tls_clients.unwrap_or_default()
            } else {
                o.nbd_tls_clients
            },
            danger_nbd_plaintext: o.danger_nbd_plaintext
                || res.danger_nbd_plaintext.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same node in another role (a promotion or demotion at runtime),
    /// validated for it: a node can only become primary with an NBD address and
    /// a peer to dial, and secondary with an address to listen on.
    pub fn with_role(&self, role: Role) -> Result<NodeConfig, ConfigError> {
        let cfg = NodeConfig {
            role,
            ..self.clone()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.danger_plaintext {
            // G7: plaintext only on loopback, refused before anything is opened or dialed.
            for (option, addr) in [("--peer", self.peer), ("--listen", self.listen)] {
                if let Some(addr) = addr
                    && !addr.ip().to_canonical().is_loopback()
                {
                    return Err(ConfigError::Invalid {
                        option,
                        message: format!(
                            "{addr} is not a loopback address, and --danger-plaintext is refused off loopback; remove --danger-plaintext and use TLS (tandem certs)"
                        ),
                    });
                }
            }
        }
        // nbd (issue 13): a plaintext NBD export is refused off loopback.
        if self.nbd_tls_clients.is_empty() && !self.danger_nbd_plaintext {
            for (option, addr) in [
                ("--nbd", &self.nbd),
                ("--export-readonly", &self.export_readonly),
            ] {
                if let Some(addr) = addr
                    && let Ok(crate::nbd::NbdAddress::Tcp(a)) =
                        addr.parse::<crate::nbd::NbdAddress>()
                    && !a.ip().to_canonical().is_loopback()
                {
                    return Err(ConfigError::Invalid {
                        option,
                        message: format!(
                            "{a} is not a loopback address and the NBD export has no TLS: anyone on the network could read and write the volume; add --nbd-tls-client NAME (certificates from tandem certs), or --danger-nbd-plaintext to accept that"
                        ),
                    });
                }
            }
        }
        match self.role {
            Role::Primary => {
                // A primary dials its secondary (--peer), or waits for it to dial
                // in (--listen): a lone DR node promoted with no peer configured
                // serves alone and resyncs the secondary that appears.
                if self.peer.is_none() && self.listen.is_none() {
                    return Err(ConfigError::Missing {
                        option: "--peer",
                        hint: "the secondary's replication address, e.g. 192.0.2.11:7789 (or --listen ADDR for a lone primary that its secondary dials)",
                    });
                }
                if self.nbd.is_none() {
                    return Err(ConfigError::Missing {
                        option: "--nbd",
                        hint: "the NBD export address, e.g. unix:/run/tandem/r0/nbd.sock or 127.0.0.1:10809",
                    });
                }
            }
            Role::Secondary => {
                if self.listen.is_none() {
                    return Err(ConfigError::Missing {
                        option: "--listen",
                        hint: "the replication address to listen on, e.g. 0.0.0.0:7789",
                    });
                }
            }
        }
        if self.queue_bytes_max < 1 << 20 || self.queue_writes_max < 16 {
            return Err(ConfigError::Invalid {
                option: "--queue-bytes-max/--queue-writes-max",
                message: "the replication window must allow at least 1 MiB and 16 writes".into(),
            });
        }
        if !(16..=crate::meta::al::AL_EXTENTS_MAX).contains(&self.al_extents_max) {
            return Err(ConfigError::Invalid {
                option: "--al-extents",
                message: format!(
                    "{}: expected 16 to {}",
                    self.al_extents_max,
                    crate::meta::al::AL_EXTENTS_MAX
                ),
            });
        }
        if !self.al_extent_bytes.is_power_of_two()
            || !(defaults::AL_EXTENT_BYTES_MIN..=defaults::AL_EXTENT_BYTES_MAX)
                .contains(&self.al_extent_bytes)
        {
            return Err(ConfigError::Invalid {
                option: "--al-extent-size",
                message: format!(
                    "{} bytes: expected a power of two from 1M to 1G (default 4M)",
                    self.al_extent_bytes
                ),
            });
        }
        // wan (issue 11 item 5): a spill log holds at least one window.
        if self.spill_bytes > 0 && self.spill_bytes < self.queue_bytes_max {
            return Err(ConfigError::Invalid {
                option: "--spill-size",
                message: format!(
                    "{} bytes is smaller than the replication window ({} bytes, --queue-bytes-max): the spill log must hold at least one window; set it to at least {} bytes, or 0 for no spill log",
                    self.spill_bytes, self.queue_bytes_max, self.queue_bytes_max
                ),
            });
        }
        if self.journal_bytes < 128 << 20 || !self.journal_bytes.is_multiple_of(4096) {
            return Err(ConfigError::Invalid {
                option: "--journal-size",
                message: format!(
                    "{} bytes: the journal holds at least 128 MiB (a few of the largest writes plus room to resync), in whole 4 KiB pages",
                    self.journal_bytes
                ),
            });
        }
        if let Some(rpo) = self.rpo_seconds
            && !(rpo.is_finite() && rpo > 0.0)
        {
            return Err(ConfigError::Invalid {
                option: "--rpo-seconds",
                message: format!("{rpo}: expected a positive number of seconds"),
            });
        }
        if self.rpo_hook.is_some() && self.rpo_seconds.is_none() {
            return Err(ConfigError::Missing {
                option: "--rpo-seconds",
                hint: "--rpo-hook runs when the lag crosses the RPO target; set the target too",
            });
        }
        if self.peer_timeout_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::Invalid {
                option: "--peer-timeout-ms",
                message: format!(
                    "{} ms must exceed --heartbeat-interval-ms ({} ms)",
                    self.peer_timeout_ms, self.heartbeat_interval_ms
                ),
            });
        }
        Ok(())
    }
}

/// Why a node agent refuses to start, found before anything is created,
/// opened for writing or bound (see [`NodeConfig::preflight`]).
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("TLS: {0}")]
    Tls(#[from] crate::transport::CertError),
    #[error(
        "volume {path} does not exist and is under /dev, so it must be a block device: check the device name (ls -l /dev/disk/by-id/) and that the disk is attached; tandem never creates files under /dev"
    )]
    NoBlockDevice { path: PathBuf },
    #[error(
        "volume {path} does not exist; pass --size (size = in the resource file) to create a sparse image of that size, or point --volume at the existing image or block device"
    )]
    NoVolume { path: PathBuf },
    #[error(
        "{what} {path} is under /dev, which is lost at reboot; set {option} to a path on a persistent filesystem, e.g. /var/lib/tandem/RESOURCE.meta"
    )]
    UnderDev {
        what: &'static str,
        path: PathBuf,
        option: &'static str,
    },
    #[error(
        "{volume} is a block device: set --meta (meta = in the resource file) to a path on a persistent filesystem, e.g. /var/lib/tandem/{resource}.meta"
    )]
    BlockDeviceMeta { volume: PathBuf, resource: String },
    #[error(
        "{what} {path}: directory {dir} does not exist; create it (mkdir -p -m 0700 {dir}), or set {option} to a path in an existing directory"
    )]
    NoDirectory {
        what: &'static str,
        path: PathBuf,
        dir: PathBuf,
        option: &'static str,
    },
    #[error(
        "{what} {path}: cannot create files in {dir} ({source}); fix its owner or mode, or if the agent runs under the systemd unit (ProtectSystem=strict) add ReadWritePaths={dir} in a drop-in (systemctl edit tandem@RESOURCE)"
    )]
    DirectoryNotWritable {
        what: &'static str,
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} {path} cannot be opened for reading and writing ({source}); fix its owner or mode, or if the agent runs under the systemd unit add ReadWritePaths= for it in a drop-in"
    )]
    NotWritable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is {kind}; point {option} at {expected}")]
    WrongKind {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
        option: &'static str,
        expected: &'static str,
    },
    #[error(
        "control socket {path}: another agent is listening on it; stop it, or give this one another --control path"
    )]
    ControlInUse { path: PathBuf },
    #[error("cannot listen on {addr} ({what}): {source}; {hint}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD export address {input:?}: {message}")]
    NbdAddress { input: String, message: String },
}

/// `access(2)` for reading and writing (`dir`: writing and searching), which also
/// reports a read-only filesystem (EROFS), as the unit's ProtectSystem=strict makes one.
fn access_rw(path: &Path, dir: bool) -> std::io::Result<()> {
    use rustix::fs::Access;
    let mode = if dir {
        Access::WRITE_OK | Access::EXEC_OK
    } else {
        Access::READ_OK | Access::WRITE_OK
    };
    rustix::fs::access(path, mode).map_err(std::io::Error::from)
}

fn is_under_dev(path: &Path) -> bool {
    path.starts_with("/dev")
}

/// The directory a new file at `path` would be created in.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A file tandem may create at `path`: its directory exists and is writable.
fn check_can_create(
    what: &'static str,
    path: &Path,
    option: &'static str,
) -> Result<(), PreflightError> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(PreflightError::NoDirectory {
            what,
            path: path.to_owned(),
            dir,
            option,
        });
    }
    access_rw(&dir, true).map_err(|source| PreflightError::DirectoryNotWritable {
        what,
        path: path.to_owned(),
        dir,
        source,
    })
}

/// A unix socket tandem will bind at `path` (removing a stale one): its directory
/// is writable, and whatever is there now is a socket nobody answers on.
fn check_socket_path(
    what: &'static str,
    path: &Path,
    option: &'static str,
) -> Result<(), PreflightError> {
    use std::os::unix::fs::FileTypeExt;
    check_can_create(what, path, option)?;
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                Err(PreflightError::ControlInUse {
                    path: path.to_owned(),
                })
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(PreflightError::WrongKind {
            what,
            path: path.to_owned(),
            kind: "not a socket (it would be replaced)",
            option,
            expected: "a socket path of its own, e.g. /run/tandem/RESOURCE/control.sock",
        }),
    }
}

/// Bind `addr` and release it at once: the port is free and the address is this
/// host's. std sets SO_REUSEADDR, so the agent's own bind right after succeeds.
fn check_bind(
    what: &'static str,
    addr: SocketAddr,
    hint: &'static str,
) -> Result<(), PreflightError> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| PreflightError::Bind {
            what,
            addr,
            hint,
            source,
        })
}

impl NodeConfig {
    /// Every precondition of starting this node, checked before anything is
    /// created or written, so that a refused start leaves nothing behind: the TLS
    /// files (readable, key matching, certificate valid now for this node's name
    /// under ca.pem, both names valid and different), the volume (an existing
    /// image or block device we may read and write, or a new image with `--size`
    /// in a writable directory, never under /dev), the metadata path, the
    /// control socket and a unix NBD socket (writable directories, no live agent
    /// there), and the addresses (the replication listener, the primary's NBD
    /// export, metrics: bindable now).
    pub fn preflight(&self) -> Result<(), PreflightError> {
        if !self.danger_plaintext {
            crate::transport::check_tls_files(&crate::transport::TlsFiles {
                dir: self.tls_dir.clone(),
                node_name: self.name.clone(),
                peer_name: self.peer_name.clone(),
            })?;
        }
        self.preflight_volume()?;
        check_socket_path("control socket", &self.control, "--control (control =)")?;
        let nbd = match &self.nbd {
            Some(text) => Some(text.parse::<crate::frontend::NbdAddress>().map_err(|e| {
                PreflightError::NbdAddress {
                    input: text.clone(),
                    message: e.to_string(),
                }
            })?),
            None => None,
        };
        if let Some(crate::frontend::NbdAddress::Unix(path)) = &nbd {
            check_socket_path("NBD socket", path, "--nbd (nbd =)")?;
        }
        // A secondary's read-only export (nbd: issue 13), checked like the NBD export.
        let readonly = match (&self.export_readonly, self.role) {
            (Some(text), Role::Secondary) => {
                Some(text.parse::<crate::frontend::NbdAddress>().map_err(|e| {
                    PreflightError::NbdAddress {
                        input: text.clone(),
                        message: e.to_string(),
                    }
                })?)
            }
            _ => None,
        };
        match readonly {
            Some(crate::frontend::NbdAddress::Unix(path)) => {
                check_socket_path("read-only NBD socket", &path, "--export-readonly")?
            }
            Some(crate::frontend::NbdAddress::Tcp(addr)) => check_bind(
                "read-only NBD export, --export-readonly",
                addr,
                "is another agent or resource serving on this port? give each resource its own (or a unix socket)",
            )?,
            None => {}
        }
        if let Some(addr) = self.listen {
            check_bind(
                "replication address, --listen or this node's address =",
                addr,
                "is it this host's address (check --node: it picks this host's section), and is no other agent or resource using the port?",
            )?;
        }
        if self.role == Role::Primary
            && let Some(crate::frontend::NbdAddress::Tcp(addr)) = nbd
        {
            check_bind(
                "NBD export, --nbd",
                addr,
                "is another agent or resource serving NBD on this port? give each resource its own (or a unix socket)",
            )?;
        }
        if let Some(addr) = self.metrics {
            check_bind(
                "metrics, --metrics",
                addr,
                "is another agent or resource serving metrics on this port? give each resource its own",
            )?;
        }
        Ok(())
    }

    fn preflight_volume(&self) -> Result<(), PreflightError> {
        use std::os::unix::fs::FileTypeExt;
        let volume = &self.volume;
        let is_block_device = match std::fs::metadata(volume) {
            Ok(m) if m.file_type().is_block_device() => true,
            Ok(m) if m.is_file() => false,
            Ok(_) => {
                return Err(PreflightError::WrongKind {
                    what: "volume",
                    path: volume.clone(),
                    kind: "neither a regular file nor a block device",
                    option: "--volume (volume =)",
                    expected: "an image file or a block device",
                });
            }
            Err(_) if is_under_dev(volume) => {
                return Err(PreflightError::NoBlockDevice {
                    path: volume.clone(),
                });
            }
            Err(_) => {
                if self.size_bytes.is_none() {
                    return Err(PreflightError::NoVolume {
                        path: volume.clone(),
                    });
                }
                check_can_create("volume", volume, "--volume (volume =)")?;
                false
            }
        };
        if volume.exists() {
            access_rw(volume, false).map_err(|source| PreflightError::NotWritable {
                what: "volume",
                path: volume.clone(),
                source,
            })?;
        }
        if is_block_device && self.meta == crate::meta::MetaStore::default_path_for(volume) {
            return Err(PreflightError::BlockDeviceMeta {
                volume: volume.clone(),
                resource: self.resource.clone(),
            });
        }
        if is_under_dev(&self.meta) {
            return Err(PreflightError::UnderDev {
                what: "metadata",
                path: self.meta.clone(),
                option: "--meta (meta =)",
            });
        }
        match std::fs::metadata(&self.meta) {
            Ok(m) if m.is_file() => {
                access_rw(&self.meta, false).map_err(|source| PreflightError::NotWritable {
                    what: "metadata",
                    path: self.meta.clone(),
                    source,
                })
            }
            Ok(_) => Err(PreflightError::WrongKind {
                what: "metadata",
                path: self.meta.clone(),
                kind: "not a regular file",
                option: "--meta (meta =)",
                expected: "a metadata file of its own",
            }),
            Err(_) => check_can_create("metadata", &self.meta, "--meta (meta =)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("r0.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const FILE: &str = r#"
[resource]
name = "r0"
mode = "async"
tls-dir = "/etc/tandem/r0"
queue-bytes-max = "128M"

[nodes.alpha]
address = "127.0.0.1:7001"
volume = "/srv/a.img"
nbd = "127.0.0.1:10809"

[nodes.beta]
address = "127.0.0.1:7002"
volume = "/srv/b.img"
size = "1G"
"#;

    #[test]
    fn adjust_changes_the_rate_live_keeps_the_rest_for_later_and_refuses_another_volume() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = |text: &str| {
            let path = write(dir.path(), text);
            NodeConfig::resolve(
                Role::Primary,
                Overrides {
                    config: Some(path),
                    node: Some("alpha".into()),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let old = resolve(FILE);
        assert_eq!(adjust_plan(&old, &old), Ok(AdjustPlan::default()));
        let new =
            resolve(&FILE.replace("mode = \"async\"", "mode = \"sync\"\nresync-rate = \"10M\""));
        assert_eq!(
            adjust_plan(&old, &new),
            Ok(AdjustPlan {
                live: vec!["resync-rate"],
                later: vec!["mode"],
            })
        );
        // ha (issue 12): after `tandem resize` the file may follow the new size.
        let grown = resolve(&FILE.replace(
            "volume = \"/srv/a.img\"",
            "volume = \"/srv/a.img\"\nsize = \"2G\"",
        ));
        assert_eq!(
            adjust_plan(&old, &grown).map(|p| p.later.len()),
            Ok(1),
            "{:?}",
            adjust_plan(&old, &grown)
        );
        let moved = resolve(&FILE.replace("/srv/a.img", "/srv/other.img"));
        let e = adjust_plan(&old, &moved).unwrap_err();
        assert!(e.contains("volume") && e.contains("meta"), "{e}");
    }

    /// A primary needs a peer to dial or a listener its secondary dials (a lone
    /// DR node promoted without a peer configured).
    #[test]
    fn a_primary_without_a_peer_address_needs_a_listener() {
        let base = NodeConfig::resolve(
            Role::Secondary,
            Overrides {
                volume: Some("/x.img".into()),
                listen: Some("127.0.0.1:7000".parse().unwrap()),
                nbd: Some("127.0.0.1:10809".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(base.peer.is_none());
        assert!(base.with_role(Role::Primary).is_ok());
        let alone = NodeConfig {
            listen: None,
            ..base
        };
        let e = alone.with_role(Role::Primary).unwrap_err();
        assert!(e.to_string().contains("--peer"), "{e}");
    }

    #[test]
    fn resource_file_picks_this_node_and_the_other_as_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), FILE);
        let o = Overrides {
            config: Some(path.clone()),
            node: Some("alpha".into()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(Role::Primary, o).unwrap();
        assert_eq!(c.name, "alpha");
        assert_eq!(c.peer_name, "beta");
        assert_eq!(c.peer, Some("127.0.0.1:7002".parse().unwrap()));
        assert_eq!(c.mode, Mode::Async);
        assert_eq!(c.queue_bytes_max, 128 << 20);
        let o = Overrides {
            config: Some(path),
            node: Some("beta".into()),
            mode: Some("sync".into()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(Role::Secondary, o).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:7002".parse().unwrap()));
        assert_eq!(c.size_bytes, Some(1 << 30));
        assert_eq!(c.mode, Mode::Sync, "flags override the file");
    }

    #[test]
    fn malformed_or_incomplete_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[resource\nname=");
        let e = NodeConfig::resolve(
            Role::Primary,
            Overrides {
                config: Some(path),
                node: Some("a".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        let path = write(
            dir.path(),
            &FILE.replace("[nodes.beta]", "[nodes.beta]\nbogus = 1"),
        );
        let e = NodeConfig::resolve(
            Role::Primary,
            Overrides {
                config: Some(path),
                node: Some("alpha".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let path = write(dir.path(), FILE);
        let e = NodeConfig::resolve(
            Role::Primary,
            Overrides {
                config: Some(path),
                node: Some("gamma".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("alpha, beta"), "{e}");
    }

    #[test]
    fn monitoring_options_come_from_the_file_and_flags_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let text = FILE
            .replace(
                "queue-bytes-max = \"128M\"",
                "queue-bytes-max = \"128M\"\nrpo-seconds = 10\nrpo-hook = \"logger rpo\"",
            )
            .replace(
                "nbd = \"127.0.0.1:10809\"",
                "nbd = \"127.0.0.1:10809\"\nmetrics = \"127.0.0.1:9942\"",
            );
        let path = write(dir.path(), &text);
        let o = Overrides {
            config: Some(path.clone()),
            node: Some("alpha".into()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(Role::Primary, o).unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9942".parse().unwrap()));
        assert_eq!(c.rpo_seconds, Some(10.0));
        assert_eq!(c.rpo_hook.as_deref(), Some("logger rpo"));
        let o = Overrides {
            config: Some(path.clone()),
            node: Some("alpha".into()),
            rpo_seconds: Some(2.5),
            metrics: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(Role::Primary, o).unwrap();
        assert_eq!(c.rpo_seconds, Some(2.5));
        assert_eq!(c.metrics, Some("127.0.0.1:1".parse().unwrap()));
        let o = Overrides {
            config: Some(path.clone()),
            node: Some("alpha".into()),
            rpo_seconds: Some(0.0),
            ..Default::default()
        };
        let e = NodeConfig::resolve(Role::Primary, o).unwrap_err();
        assert!(e.to_string().contains("--rpo-seconds"), "{e}");
        let (control, resource) = control_target(None, None, Some(&path), Some("beta")).unwrap();
        assert_eq!(control, PathBuf::from("/srv/b.img.tandem.sock"));
        assert_eq!(resource.as_deref(), Some("r0"));
        let e = control_target(None, None, None, None).unwrap_err();
        assert!(e.to_string().contains("--control"), "{e}");
    }

    #[test]
    fn plaintext_off_loopback_is_refused_before_anything_starts() {
        let o = Overrides {
            volume: Some("/x.img".into()),
            peer: Some("10.0.0.1:7000".parse().unwrap()),
            nbd: Some("127.0.0.1:1".into()),
            danger_plaintext: true,
            ..Default::default()
        };
        let e = NodeConfig::resolve(Role::Primary, o).unwrap_err();
        assert!(
            e.to_string().contains("10.0.0.1:7000") && e.to_string().contains("loopback"),
            "{e}"
        );
        let o = Overrides {
            volume: Some("/x.img".into()),
            listen: Some("[::1]:7000".parse().unwrap()),
            danger_plaintext: true,
            ..Default::default()
        };
        assert!(NodeConfig::resolve(Role::Secondary, o).is_ok());
    }

    #[test]
    fn flags_alone_work_and_name_the_missing_option() {
        let o = Overrides {
            volume: Some("/x.img".into()),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(Role::Secondary, o).unwrap();
        assert_eq!(
            (c.name.as_str(), c.peer_name.as_str()),
            ("secondary", "primary")
        );
        assert_eq!(c.meta, PathBuf::from("/x.img.tandem-meta"));
        let e = NodeConfig::resolve(
            Role::Primary,
            Overrides {
                volume: Some("/x.img".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("--peer"), "{e}");
    }

    /// scale (issue 11): the activity log's extent size comes from the file or the
    /// flag, defaults to 4 MiB and is refused unless a power of two in 1M..=1G.
    #[test]
    fn al_extent_size_from_file_or_flag_and_its_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let text = FILE.replace(
            "queue-bytes-max = \"128M\"",
            "queue-bytes-max = \"128M\"\nal-extent-size = \"64M\"",
        );
        let path = write(dir.path(), &text);
        let plain_dir = tempfile::tempdir().unwrap();
        let plain = write(plain_dir.path(), FILE);
        let resolve = |flag: Option<&str>, file: bool| {
            NodeConfig::resolve(
                Role::Primary,
                Overrides {
                    config: Some(if file { path.clone() } else { plain.clone() }),
                    node: Some("alpha".into()),
                    al_extent_size: flag.map(str::to_string),
                    ..Default::default()
                },
            )
        };
        assert_eq!(resolve(None, false).unwrap().al_extent_bytes, 4 << 20);
        assert_eq!(resolve(None, true).unwrap().al_extent_bytes, 64 << 20);
        assert_eq!(resolve(Some("1G"), true).unwrap().al_extent_bytes, 1 << 30);
        for bad in ["3M", "512K", "2G"] {
            let e = resolve(Some(bad), true).unwrap_err().to_string();
            assert!(
                e.contains("--al-extent-size") && e.contains("power of two from 1M to 1G"),
                "{bad}: {e}"
            );
        }
    }

    /// The keys serde accepts in a section, from the error an unknown key gets.
    fn accepted_keys(section: &str) -> Vec<String> {
        let text = format!("{section}\nzz-unknown = 1\n");
        let e = toml::from_str::<ResourceFile>(&text)
            .unwrap_err()
            .to_string();
        let list = e
            .split("expected one of")
            .nth(1)
            .expect("serde lists the fields");
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// An unreadable resource file: the error names it and says what to check
    /// (issue 15: every error says what to do).
    #[test]
    fn a_missing_resource_file_names_it_and_the_fix() {
        let e = ResourceFile::load(Path::new("/nonexistent/r0.toml"))
            .expect_err("a missing file loads")
            .to_string();
        assert!(e.contains("/nonexistent/r0.toml"), "{e}");
        assert!(e.contains("--config"), "{e}");
    }

    /// The resource-file examples of README.md and deploy/r0.toml parse, and
    /// each names every key the parser accepts (issue 15.9).
    #[test]
    fn documented_resource_files_parse_and_name_every_key() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let section = &readme[readme.find("## Resource file").unwrap()..];
        let start = section.find("```toml\n").unwrap() + 8;
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let deploy = std::fs::read_to_string(root.join("deploy/r0.toml")).unwrap();
        for (what, text) in [("README.md", example), ("deploy/r0.toml", deploy.as_str())] {
            let file: ResourceFile = toml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(file.nodes.len(), 2, "{what}");
            // Commented-out keys count as documented: uncomment them.
            let uncommented: String = text
                .lines()
                .map(|l| {
                    l.trim_start()
                        .strip_prefix("# ")
                        .filter(|r| r.contains(" = "))
                        .unwrap_or(l)
                })
                .collect::<Vec<_>>()
                .join("\n");
            for (section, keys) in [
                ("[resource]", accepted_keys("[resource]")),
                ("[nodes.a]", accepted_keys("[nodes.a]")),
            ] {
                for key in keys {
                    let documented = uncommented
                        .lines()
                        .any(|l| l.trim_start().starts_with(&format!("{key} =")));
                    assert!(
                        documented,
                        "{what}: key {key} of {section} is not documented"
                    );
                }
            }
        }
    }
}
