//! Command-line interface: `tandem <subcommand>`. Every node option can also be
//! read from a TOML resource file with `--config FILE --node NAME` (see config.rs).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Userspace block-volume replicator: an NBD export on the primary, every write shipped crc32-checked and zstd-compressed over mutual TLS to a secondary",
    after_help = "Start with `tandem demo`. Quick start on two hosts: see README.md."
)]
pub struct Cli {
    /// Log format: human (default) or json (one object per line, for log shippers).
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
    /// Seconds a command that talks to an agent waits for each answer on the control
    /// socket (status, events, verify, wait-sync: default 10; promote: 150, room for
    /// the fencing command; demote: its --timeout plus 90, room for the drain).
    #[arg(long, global = true, value_name = "SECS")]
    pub control_timeout: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a private CA and node certificates for mutual TLS (DIR/ca.pem, DIR/ca.key,
    /// DIR/NAME.pem, DIR/NAME.key), or with --ca sign a node certificate with an
    /// existing CA (a new node, or --renew an expiring one). Keep ca.key off the nodes.
    Certs {
        /// Directory to write into (created mode 0700 if missing; existing files are
        /// never overwritten, except NAME.pem/NAME.key with --renew).
        #[arg(long)]
        out: PathBuf,
        /// Node names to issue certificates for (default without --ca: primary secondary).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Sign with the existing CA in this directory (its ca.pem and ca.key) instead of
        /// making a new CA; ca.pem is copied into --out when it has none.
        #[arg(long, value_name = "DIR")]
        ca: Option<PathBuf>,
        /// With --ca: replace an existing NAME.pem/NAME.key (kept as NAME.pem.old/NAME.key.old).
        #[arg(long, requires = "ca")]
        renew: bool,
        /// Validity of the new certificates in years, from one day before now (a node
        /// certificate never outlives its CA).
        #[arg(long, default_value_t = crate::transport::VALID_YEARS_DEFAULT)]
        valid_years: u32,
    },
    /// Run a node in the primary role: serve the NBD export and replicate every write.
    Primary(NodeArgs),
    /// Run a node in the secondary role: accept a primary and apply its writes in order.
    Secondary(NodeArgs),
    /// Run a node in the role its metadata persisted (the systemd unit's command):
    /// a new node or one that stopped as secondary comes up secondary; one that
    /// stopped as primary comes up secondary, waits for a primary peer to connect
    /// (the peer may have been promoted meanwhile), and otherwise promotes itself
    /// with the checks and fencing of `tandem promote`. Never a second primary.
    Up(NodeArgs),
    /// Re-read the resource file of a running agent (SIGHUP does the same): the
    /// resync rate changes live, other keys at the next role change; a file that
    /// changes the volume, the metadata or the node names is refused, nothing changed.
    Adjust {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Change a running agent's settings live.
    Set {
        #[command(subcommand)]
        setting: SetCommand,
    },
    /// Pause the resync on a running primary: out-of-sync blocks wait (and stay
    /// tracked), client writes still replicate. The secondary stays Inconsistent
    /// (or keeps its last consistent image) until `tandem resume-sync`.
    PauseSync {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Resume a resync paused with `tandem pause-sync`.
    ResumeSync {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Take the replication link down on a running primary and keep it down (the
    /// peer's dials are refused) until `tandem connect`: writes are tracked in the
    /// bitmap (degrade) or wait (block), as for any link loss. A role change ends it.
    Disconnect {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Bring back a link taken down with `tandem disconnect`: the primary dials
    /// the peer again and resyncs what changed meanwhile.
    Connect {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Mark a disconnected secondary Outdated: its data is consistent but lacks
    /// the primary's newer writes, so it is not promoted without --force. The
    /// primary's fencing command (`fence-peer`) runs this on its peer before it
    /// writes alone; the node is UpToDate again once resynced.
    Outdate {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Discard this node's data and copy every block again from its primary (a
    /// secondary only): the session ends, the node is Inconsistent (not promotable)
    /// until the full resync completes, also across a crash or restart. Asks for
    /// confirmation unless --yes.
    Invalidate {
        #[command(flatten)]
        target: ControlTarget,
        /// Do not ask: discard this node's data.
        #[arg(long)]
        yes: bool,
    },
    /// Grow the volume online, on the running primary: the secondary grows first,
    /// then the primary, then the NBD export's size (new NBD connections see it;
    /// attached clients keep theirs until they reconnect). Image files are
    /// extended; block devices must be grown first on both nodes. Shrinking is
    /// refused. Needs the secondary connected.
    Resize {
        #[command(flatten)]
        target: ControlTarget,
        /// The new size (K, M, G, T suffixes), at least the current one.
        #[arg(long)]
        size: String,
    },
    /// Show a running agent's state (one screen, or --json), or with --all the state
    /// of every resource of this host.
    Status {
        #[command(flatten)]
        target: ControlTarget,
        /// Print the status document as JSON (stable field names); with --all, an array.
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Every resource file (*.toml) in --dir: this host's node of each (--node, else
        /// NODE= of RESOURCE.env beside it, else the node named like the host, else
        /// the node whose address is this host's) is asked for its status.
        /// Exit status 1 when an agent does not answer.
        #[arg(long, conflicts_with = "control")]
        all: bool,
        /// With --all: the directory of resource files.
        #[arg(long, default_value = "/etc/tandem", requires = "all")]
        dir: PathBuf,
    },
    /// Make a running secondary the primary: it starts a new generation and serves the
    /// NBD export. Refused while the peer is primary and connected, and while this
    /// node's disk is not UpToDate (unless --force). Runs the fencing command first
    /// when the peer is unreachable.
    Promote {
        /// The agent's control socket.
        #[arg(long)]
        control: PathBuf,
        /// Promote even though the disk is Inconsistent (its data may be a mix of two
        /// generations: only for disaster recovery).
        #[arg(long)]
        force: bool,
    },
    /// Make a running primary a secondary: wait up to --timeout for attached NBD
    /// clients to detach (refused, naming them, if some stay; --force-disconnect
    /// closes them instead), stop accepting NBD clients, drain the replication
    /// queue to the peer, and serve as secondary.
    Demote {
        /// The agent's control socket.
        #[arg(long)]
        control: PathBuf,
        /// Seconds to wait for NBD clients to disconnect by themselves, then for the
        /// secondary to hold every write (async mode: the backlog drains).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Demote even though the secondary does not hold every write (it is not
        /// connected, or did not catch up in time): this node keeps its changes in
        /// its bitmap, and the peer is told it is Outdated if connected.
        #[arg(long)]
        force: bool,
        /// Close NBD clients still attached after --timeout (their requests in flight
        /// complete first). Without it the demotion is refused, naming them: a
        /// filesystem mounted on a closed export aborts its journal.
        #[arg(long)]
        force_disconnect: bool,
    },
    /// Resolve a split brain on the losing node (a secondary): its changes since the
    /// split are discarded at the next connection and replaced by the peer's data. The
    /// changed ranges are written to a report file first.
    Resolve {
        /// The losing node's control socket.
        #[arg(long)]
        control: PathBuf,
        /// Confirm: discard this node's changes (required).
        #[arg(long)]
        discard_local: bool,
    },
    /// Show a running agent's recent events (RPO crossings, peer connects and
    /// disconnects, resyncs), oldest first.
    Events {
        #[command(flatten)]
        target: ControlTarget,
        /// Keep polling and print new events as they happen, until interrupted.
        #[arg(long)]
        follow: bool,
        /// One JSON object per event and line.
        #[arg(long)]
        json: bool,
        /// Only events with an id above this one.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Compare both volumes block by block (blake3) while replication continues, and
    /// report the ranges that differ. Run against the PRIMARY's control socket.
    /// Exit codes: 0 identical (or all differences repaired), 1 differences found,
    /// 2 could not verify.
    Verify {
        /// The primary's control socket.
        #[arg(long)]
        control: PathBuf,
        /// Resync the blocks found different from the primary, and wait until that is done.
        #[arg(long)]
        repair: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Bytes of the volume compared per second (K, M, G suffixes; 0 = unlimited;
        /// default: the resource's resync rate).
        #[arg(long)]
        rate: Option<String>,
    },
    /// Wait until the primary reports its peer connected and in sync, showing the
    /// resync progress. Exit codes: 0 in sync, 1 timed out, 2 error.
    WaitSync {
        /// The primary's control socket.
        #[arg(long)]
        control: PathBuf,
        /// Give up after this many seconds (default: wait as long as it takes).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Named checkpoints on a running primary (incremental backups over NBD: a
    /// checkpoint's changed blocks are metadata context qemu:dirty-bitmap:NAME).
    // nbd (issue 13)
    Checkpoint {
        #[command(subcommand)]
        command: crate::checkpoint::CheckpointCommand,
    },
    // dr (issue 10): the DR copy's rollback window.
    /// List the consistent points a secondary can roll back to (its rollback
    /// window), oldest first: UTC time and write seq of the newest write each
    /// holds, and the journal bytes a rollback to it discards.
    Points {
        #[command(flatten)]
        target: ControlTarget,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Roll a disconnected secondary back to a consistent point of its rollback
    /// window (after ransomware or an `rm -rf`); then promote it, or let the primary
    /// resend what changed since. Refused on a primary, on a connected secondary and
    /// outside the window.
    Rollback {
        /// The secondary's control socket.
        #[arg(long)]
        control: PathBuf,
        /// The point: a write seq (812 or seq:812, as `tandem points` lists), a UTC
        /// time (2026-11-30T00:12:03Z) or a time relative to now (-10m); the newest
        /// point at or before it is taken.
        #[arg(long, value_name = "SEQ|TIME")]
        to: String,
    },
    /// Serve a secondary's image as of a consistent point read-only over NBD (to
    /// look before a rollback or a promotion) while replication continues; or stop
    /// it. The inspection ends when the journal needs the room for replication.
    Inspect {
        /// The secondary's control socket.
        #[arg(long)]
        control: PathBuf,
        /// The point, as for `rollback --to` (default: the newest).
        #[arg(long, value_name = "SEQ|TIME", conflicts_with = "stop")]
        at: Option<String>,
        /// Where to serve it: HOST:PORT, unix:/path or /abs/path.
        #[arg(long, required_unless_present = "stop")]
        nbd: Option<String>,
        /// Stop the inspection being served.
        #[arg(long)]
        stop: bool,
    },
    /// Run a self-contained demonstration on loopback: certificates, a secondary and a
    /// primary with 256 MiB images, a mixed workload through the NBD export in sync
    /// then async mode, and a final check that both images are identical.
    Demo {
        /// Image size for the demo volumes.
        #[arg(long, default_value = "256M")]
        size: String,
        /// Seconds of workload per mode.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Keep the demo's files in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `tandem set ...`: settings changed on a running agent.
#[derive(Debug, Subcommand)]
pub enum SetCommand {
    /// The resync rate limit in bytes per second (K, M, G suffixes; 0 = unlimited),
    /// live on a primary, kept for later roles on a secondary; the resource file's
    /// value returns at the next adjust or restart.
    ResyncRate {
        /// Bytes per second, e.g. 40M.
        rate: String,
        #[command(flatten)]
        target: ControlTarget,
    },
}

/// Which agent a client command talks to.
#[derive(Debug, Clone, Args)]
pub struct ControlTarget {
    /// The agent's control socket (default with --config/--node: the node's).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// The resource meant; an agent of another resource refuses (default with --config: the file's).
    #[arg(long)]
    pub resource: Option<String>,
    /// Resource file: gives the resource name and, with --node, the control socket.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// With --config: the node whose agent to ask; with --all: this host's node in every file.
    #[arg(long)]
    pub node: Option<String>,
}

impl ControlTarget {
    /// The control socket path and the resource name to send.
    pub fn resolve(self) -> Result<(PathBuf, Option<String>), crate::config::ConfigError> {
        crate::config::control_target(
            self.control,
            self.resource,
            self.config.as_deref(),
            self.node.as_deref(),
        )
    }
}

/// Options of a node agent. Each is also readable from the resource file.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// TOML resource file describing both nodes (like a DRBD resource file).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Which node of the resource file this is.
    #[arg(long)]
    pub node: Option<String>,
    /// This node's name (default: its role). Certificates are `DIR/NAME.pem` and `DIR/NAME.key`.
    #[arg(long)]
    pub name: Option<String>,
    /// The name the peer must present (default: the other role).
    #[arg(long)]
    pub peer_name: Option<String>,
    /// Image file or block device to replicate.
    #[arg(long)]
    pub volume: Option<PathBuf>,
    /// Create a sparse image of this size if the volume does not exist (K, M, G, T suffixes).
    #[arg(long)]
    pub size: Option<String>,
    /// Metadata path (default: VOLUME.tandem-meta; required for block devices in practice).
    #[arg(long)]
    pub meta: Option<PathBuf>,
    /// Open the volume with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// I/O engine: auto (io_uring, falling back to threads), io_uring, threads.
    #[arg(long)]
    pub io_engine: Option<String>,
    /// Replication address to listen on (secondary).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The secondary's replication address (primary).
    #[arg(long)]
    pub peer: Option<SocketAddr>,
    /// NBD export address (primary): HOST:PORT, unix:/path or /abs/path.
    #[arg(long)]
    pub nbd: Option<String>,
    /// NBD export name (the empty name is always accepted too).
    #[arg(long)]
    pub nbd_name: Option<String>,
    /// Control socket (default: VOLUME.tandem.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Replication mode: sync (ack after the secondary applied) or async.
    #[arg(long, value_parser = ["sync", "async"])]
    pub mode: Option<String>,
    /// Sync mode while the secondary is unreachable: degrade (default: writes complete
    /// here alone, tracked for resync, logged loudly) or block (writes wait for the peer).
    #[arg(long, value_parser = ["degrade", "block"])]
    pub on_disconnect: Option<String>,
    /// Directory holding ca.pem and this node's NAME.pem/NAME.key (default /etc/tandem).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// DANGER: replicate without TLS. Refused on non-loopback addresses.
    #[arg(long)]
    pub danger_plaintext: bool,
    /// zstd level for payloads, 0 = off (default 1).
    #[arg(long)]
    pub compress_level: Option<i32>,
    /// Replication window: bytes shipped and not yet durable on the secondary (default 64M).
    #[arg(long)]
    pub queue_bytes_max: Option<String>,
    /// Replication window: writes shipped and not yet durable on the secondary (default 8192).
    #[arg(long)]
    pub queue_writes_max: Option<u32>,
    /// Bitmap granularity (default 4K). Must match on both nodes.
    #[arg(long)]
    pub block_size: Option<String>,
    /// A write waits at most this long for the secondary's fdatasync (default 5 ms).
    #[arg(long)]
    pub flush_interval_ms: Option<u64>,
    /// ... or after this many bytes applied (default 64M).
    #[arg(long)]
    pub flush_bytes_max: Option<String>,
    /// Resync rate limit in bytes per second, 0 = unlimited (default 256M).
    #[arg(long)]
    pub resync_rate: Option<String>,
    /// Heartbeat interval (default 1000 ms).
    #[arg(long)]
    pub heartbeat_interval_ms: Option<u64>,
    /// A peer silent this long is considered dead (default 5000 ms).
    #[arg(long)]
    pub peer_timeout_ms: Option<u64>,
    /// Bound on connecting and handshaking (default 5000 ms).
    #[arg(long)]
    pub connect_timeout_ms: Option<u64>,
    /// On shutdown, wait this long for the secondary to catch up (default 30000 ms).
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
    /// Activity log: most 4 MiB extents active at once (16 to 1015, default 960).
    /// After a primary crash at most this many extents are compared by hash.
    #[arg(long)]
    pub al_extents: Option<usize>,
    /// Activity log: extent size, a power of two from 1M to 1G (default 4M). Larger
    /// extents mean fewer activation writes under random writes spread over a large
    /// volume, and more data compared by hash after a primary crash (at most
    /// al-extents × this size). Takes effect at the next start.
    #[arg(long, value_name = "SIZE")]
    pub al_extent_size: Option<String>,
    /// Secondary: the volume already holds an old copy of the primary's data (restored
    /// from backup, shipped on a disk). The first sync compares every block by blake3
    /// hash and sends only those that differ, instead of the whole volume.
    #[arg(long)]
    pub seeded: bool,
    /// Who loses when both nodes wrote while apart (split brain): disconnect (default:
    /// refuse, an administrator decides with `tandem resolve`), discard-younger-primary,
    /// discard-least-changes, or "discard-node NAME".
    #[arg(long)]
    pub split_brain_policy: Option<String>,
    /// Fencing command (run with `sh -c`) while the peer is unreachable: before
    /// the primary's first write without it (writes wait until it exits 0) and
    /// before a promotion (a non-zero exit stops the promotion).
    #[arg(long)]
    pub fence_peer: Option<String>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9942.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Recovery point objective (primary): warn, record an event and run --rpo-hook
    /// when the lag (age of the oldest write the secondary lacks) exceeds N seconds.
    #[arg(long, value_name = "N")]
    pub rpo_seconds: Option<f64>,
    /// Command run with `sh -c` when the lag crosses the RPO target either way, with
    /// TANDEM_EVENT=rpo-exceeded|rpo-recovered, TANDEM_RESOURCE, TANDEM_NODE,
    /// TANDEM_PEER, TANDEM_LAG_SECONDS and TANDEM_RPO_SECONDS set.
    #[arg(long, value_name = "CMD")]
    pub rpo_hook: Option<String>,
    /// Secondary: the redo journal file (default: the metadata path + ".journal").
    /// Every replicated write is staged there before it reaches the volume, so the
    /// secondary always holds a consistent image and can roll back (issue 10).
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
    /// Size of the redo journal, preallocated (default 1G, at least 128M). A resync
    /// up to 7/8 of what is left after 96M (812M of 1G) is staged, so the last
    /// consistent image stays promotable; a larger one is refused at once.
    #[arg(long, value_name = "SIZE")]
    pub journal_size: Option<String>,
    /// How far back `tandem rollback` and `tandem inspect` reach, in seconds
    /// (default 3600; also bounded by the journal's size).
    #[arg(long, value_name = "SECONDS")]
    pub rollback_window_s: Option<u64>,
    /// A resync larger than the journal: refuse (default; the secondary keeps its
    /// last consistent image and says how much journal it needs) or inconsistent
    /// (apply it in place; the secondary is not promotable until it completes).
    #[arg(long, value_name = "refuse|inconsistent")]
    pub resync_overflow: Option<String>,
    /// Primary, async mode: the ordered spill log file (default: the metadata
    /// path + ".spill"; wan, issue 11).
    #[arg(long, value_name = "PATH")]
    pub spill_log: Option<PathBuf>,
    /// Primary, async mode: record bytes the spill log holds, preallocated (default
    /// 1G, at least the replication window; 0 = none). Writes that do not fit the
    /// window go there and ship in order; only a full spill log goes ahead.
    #[arg(long, value_name = "SIZE")]
    pub spill_size: Option<String>,
    // nbd (issue 13):
    /// Secondary: serve the volume read-only over NBD on this address (HOST:PORT,
    /// unix:/path or /abs/path) while replication continues.
    #[arg(long, value_name = "ADDR")]
    pub export_readonly: Option<String>,
    /// Require TLS on the NBD export and accept client certificates (same CA as
    /// the nodes) issued for NAME; repeat for several clients.
    #[arg(long = "nbd-tls-client", value_name = "NAME")]
    pub nbd_tls_clients: Vec<String>,
    /// DANGER: serve the NBD export without TLS on a non-loopback address.
    #[arg(long)]
    pub danger_nbd_plaintext: bool,
}

impl NodeArgs {
    pub fn overrides(self) -> Overrides {
        Overrides {
            config: self.config,
            node: self.node,
            name: self.name,
            peer_name: self.peer_name,
            volume: self.volume,
            size: self.size,
            meta: self.meta,
            direct: self.direct,
            io_engine: self.io_engine,
            listen: self.listen,
            peer: self.peer,
            nbd: self.nbd,
            nbd_name: self.nbd_name,
            control: self.control,
            mode: self.mode,
            on_disconnect: self.on_disconnect,
            tls_dir: self.tls_dir,
            danger_plaintext: self.danger_plaintext,
            compress_level: self.compress_level,
            queue_bytes_max: self.queue_bytes_max,
            queue_writes_max: self.queue_writes_max,
            block_size: self.block_size,
            flush_interval_ms: self.flush_interval_ms,
            flush_bytes_max: self.flush_bytes_max,
            resync_rate: self.resync_rate,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            peer_timeout_ms: self.peer_timeout_ms,
            connect_timeout_ms: self.connect_timeout_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            al_extents: self.al_extents,
            al_extent_size: self.al_extent_size,
            seeded: self.seeded,
            split_brain_policy: self.split_brain_policy,
            fence_peer: self.fence_peer,
            metrics: self.metrics,
            rpo_seconds: self.rpo_seconds,
            rpo_hook: self.rpo_hook,
            journal: self.journal,
            journal_size: self.journal_size,
            rollback_window_s: self.rollback_window_s,
            resync_overflow: self.resync_overflow,
            spill_log: self.spill_log, // wan
            spill_size: self.spill_size,
            export_readonly: self.export_readonly,
            nbd_tls_clients: self.nbd_tls_clients,
            danger_nbd_plaintext: self.danger_nbd_plaintext,
        }
    }
}
