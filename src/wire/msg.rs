//! Message bodies carried in frames, encoded with bincode 2 (standard config,
//! little-endian varints). The frame header's `kind` byte must equal
//! [`Message::kind`]; the codec checks it so a body can never be read as another
//! message.
//!
//! Protocol changelog (bump [`PROTOCOL_VERSION`] on any incompatible change):
//! - 1: first version: Hello/Welcome/Refuse handshake, Write, WriteZeroes, Trim,
//!   Flush, Applied, Durable, Heartbeat/HeartbeatReply, ResyncStart, ResyncDone,
//!   Goodbye, HashCheck/HashReply (block comparison by blake3 for crash recovery,
//!   seeding and verify).
//! - 2: generations decide the handshake (G8): Hello carries the primary's changed
//!   block count and promotion time; Welcome carries the blocks the secondary itself
//!   changed (to be resent or compared) and the decision; HashCheck may hash ranges
//!   of blocks (a power-of-two multiple of the block size), compared before blocks.
//! - 3: data frames carry the primary's acceptance time (`at_ms`, for the
//!   secondary's consistent point); WriteZeroes and Trim lengths are 64-bit (a
//!   TRIM of any size the NBD protocol allows, split at extent boundaries);
//!   Goodbye says whether the peer is left Outdated (a stop or demotion that could
//!   not drain); the secondary reports its consistent point (`Consistent`).
//! - 3, additive (ha, issue 12): online grow, `Grow`/`Grown`, sent only to a
//!   peer whose Welcome announces [`caps::GROW`] (older peers never see them).
//! - 4: the secondary answers `ResyncDone` with `SectionDone` once the section's
//!   end and the metadata naming the primary's generation are durable; the
//!   primary closes the section (and takes its generation as the peer's) on it,
//!   not on a `Durable` of the same seq (issue 9, sim seed 40236).
//! - 5: Welcome carries `stage_bytes`, the largest resync the secondary can stage
//!   in its journal while keeping its consistent image; a primary goes ahead
//!   (bitmap only) only when a resync of the whole volume would fit, and
//!   otherwise holds writes for room (issue 11: an async burst that went ahead on
//!   a 1 GiB volume left a resync the default 1 GiB journal refused, forever).

use bincode::{Decode, Encode};

/// Version of the replication protocol spoken in frames. Both sides must agree.
pub const PROTOCOL_VERSION: u16 = 5;

/// Most block hashes one HashCheck carries (32 KiB of body; 4 MiB of volume at 4 KiB blocks).
pub const HASHES_PER_CHECK_MAX: usize = 1024;

/// Capability bits advertised in the handshake.
pub mod caps {
    /// Payloads may be zstd-compressed.
    pub const ZSTD: u64 = 1 << 0;
    /// wan (issue 11 item 4): the primary's frames may come as one zstd stream
    /// per connection, in chunks (agent/link.rs). Used when both ends set it.
    pub const ZSTD_STREAM: u64 = 1 << 1;
    /// ha (issue 12): the secondary answers `Grow` (online grow).
    pub const GROW: u64 = 1 << 2;
}

/// Role byte as carried on the wire.
pub const ROLE_PRIMARY: u8 = 1;
pub const ROLE_SECONDARY: u8 = 2;

/// Disk state byte as carried on the wire.
pub const DISK_UP_TO_DATE: u8 = 1;
pub const DISK_INCONSISTENT: u8 = 2;
pub const DISK_OUTDATED: u8 = 3;
/// A secondary whose metadata was just created and holds no volume identity yet.
pub const DISK_NEW: u8 = 4;

/// Generation identifiers (G8) exchanged at the handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Generations {
    pub current: u64,
    pub bitmap_base: u64,
    pub history: [u64; 2],
}

/// First frame on every connection, sent by the dialing primary (G6).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    pub protocol_version: u16,
    pub volume_id: [u8; 16],
    pub size_bytes: u64,
    pub block_size: u32,
    pub node_name: String,
    /// The name the sender expects the receiver to have.
    pub peer_name: String,
    pub role: u8,
    pub disk_state: u8,
    pub generations: Generations,
    pub capabilities: u64,
    /// The seq of the first frame the primary will send on this connection.
    pub first_seq: u64,
    /// Blocks the sender changed that its peer may not have (its dirty bitmap).
    pub changed_blocks: u64,
    /// When the sender last became primary (unix seconds, 0 = never).
    pub promoted_at_s: u64,
}

/// Runs of blocks `(first, count)`, in volume order.
pub type BlockRuns = Vec<(u64, u64)>;

/// Most runs one Welcome carries per list; longer lists are coarsened (a superset).
pub const RUNS_PER_WELCOME_MAX: usize = 1500;

/// What the primary will do after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum SyncPlan {
    /// The secondary is current up to the primary's dirty bitmap.
    Bitmap,
    /// Every block is sent (initial sync, or the secondary's state is unknown).
    Full,
    /// The secondary holds data that is probably mostly the same (a pre-seeded copy,
    /// or metadata rebuilt after damage): every block is compared by hash and only
    /// blocks that differ are sent.
    Verify,
}

/// The secondary's acceptance of a Hello.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Welcome {
    pub protocol_version: u16,
    pub volume_id: [u8; 16],
    pub size_bytes: u64,
    pub block_size: u32,
    pub node_name: String,
    pub role: u8,
    pub disk_state: u8,
    pub generations: Generations,
    pub capabilities: u64,
    /// What the secondary needs, from its own metadata.
    pub needs: SyncPlan,
    /// Blocks the secondary itself changed (when it was primary) that the primary
    /// must resend with its own dirty blocks.
    pub own_dirty: BlockRuns,
    /// Blocks the secondary may have changed (active extents of a crash while it was
    /// primary): compared by hash, resent where they differ.
    pub own_verify: BlockRuns,
    /// The handshake decision, for the primary's log and status.
    pub decision: String,
    /// The largest resync (bytes of blocks) the secondary can stage in one
    /// section without giving up its consistent image; `u64::MAX` when it takes
    /// any (`resync-overflow = inconsistent`). Protocol 5.
    pub stage_bytes: u64,
}

/// Every message of the replication protocol.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Message {
    /// primary → secondary: identity and state (frame seq 0).
    Hello(Hello),
    /// secondary → primary: handshake accepted.
    Welcome(Welcome),
    /// Either way: handshake refused; the text says what is wrong and what to do.
    Refuse {
        reason: String,
    },
    /// primary → secondary: write the frame payload at `offset` (frame seq = write seq).
    /// `fua`: make it durable before acknowledging `Durable` past it. `at_ms`: when
    /// the primary accepted it (ms since the epoch, its clock).
    Write {
        offset: u64,
        fua: bool,
        at_ms: u64,
    },
    /// primary → secondary: zero `len` bytes at `offset` (no payload). Also used
    /// for all-zero ranges (and holes) found by resync.
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        at_ms: u64,
    },
    /// primary → secondary: discard `len` bytes at `offset` (no payload).
    Trim {
        offset: u64,
        len: u64,
        at_ms: u64,
    },
    /// primary → secondary: make everything through the frame's seq durable, then
    /// answer `Durable` covering it.
    Flush,
    /// secondary → primary: the write with this seq has completed on its volume.
    Applied {
        seq: u64,
    },
    /// secondary → primary: every write ≤ `through_seq` is applied and flushed.
    Durable {
        through_seq: u64,
    },
    /// Either way: liveness probe; the peer answers with `HeartbeatReply`.
    Heartbeat {
        nonce: u64,
    },
    HeartbeatReply {
        nonce: u64,
    },
    /// primary → secondary: a resync starts now that stages about `blocks` blocks in
    /// the secondary's journal (blocks compared by hash count a 32nd; 0 = nothing
    /// differs), sent when the link
    /// switches to streaming with a non-empty dirty set). The secondary records
    /// Inconsistent durably before applying anything after it (ARCHITECTURE §5).
    ResyncStart {
        blocks: u64,
        full: bool,
    },
    /// primary → secondary: initial or bitmap resync finished through this seq:
    /// once Durable covers it, the secondary is UpToDate.
    ResyncDone {
        through_seq: u64,
    },
    /// Either way: orderly close (shutdown); no more frames follow. From the
    /// primary, `outdated`: it holds writes the secondary never received (a stop
    /// or demotion that could not drain): the secondary is Outdated (G8).
    Goodbye {
        outdated: bool,
    },
    /// primary → secondary: compare the volume from `offset` with these blake3 hashes,
    /// one per `block_size` bytes (the last unit may end at the volume's end).
    /// `block_size` is the volume's block size, or a power-of-two multiple of it (up
    /// to 1 MiB) when whole ranges are compared first.
    /// The frame seq orders it like a write (G2): the comparison sees every earlier
    /// write. At most [`HASHES_PER_CHECK_MAX`] hashes.
    HashCheck {
        offset: u64,
        block_size: u32,
        hashes: Vec<[u8; 32]>,
    },
    /// secondary → primary: the answer to the HashCheck with frame seq `seq`: indices
    /// (into its hash list) of the blocks that differ. Stands in for `Applied` of that seq.
    HashReply {
        seq: u64,
        mismatched: Vec<u32>,
    },
    /// secondary → primary: its image is consistent through the primary's `seq`,
    /// whose newest write was accepted at `at_ms` (for lag and status; sent when
    /// it moves, at most a few times a second).
    Consistent {
        seq: u64,
        at_ms: u64,
    },
    /// secondary → primary: the resync ended by `ResyncDone { through_seq }` is
    /// recorded durably (section end in the journal, the primary's generation in
    /// the superblock): this node is a consistent copy through that seq.
    SectionDone {
        through_seq: u64,
    },
    /// ha (issue 12): primary → secondary: grow the volume to `size_bytes` (an
    /// image file is extended, a block device must be that large and has its new
    /// range zeroed) and record it durably in the metadata, then answer `Grown`.
    /// Ordered after every frame sent before it; nothing addresses the new range
    /// before the answer. Frame seq 0.
    Grow {
        size_bytes: u64,
    },
    /// ha (issue 12): secondary → primary: the answer to `Grow`. `error` empty:
    /// the volume and its metadata are `size_bytes` durably; else why not
    /// (nothing changed there).
    Grown {
        size_bytes: u64,
        error: String,
    },
}

impl Message {
    /// The frame header's kind byte for this message.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Welcome(_) => 2,
            Message::Refuse { .. } => 3,
            Message::Write { .. } => 4,
            Message::WriteZeroes { .. } => 5,
            Message::Trim { .. } => 6,
            Message::Flush => 7,
            Message::Applied { .. } => 8,
            Message::Durable { .. } => 9,
            Message::Heartbeat { .. } => 10,
            Message::HeartbeatReply { .. } => 11,
            Message::ResyncDone { .. } => 12,
            Message::Goodbye { .. } => 13,
            Message::ResyncStart { .. } => 14,
            Message::HashCheck { .. } => 15,
            Message::HashReply { .. } => 16,
            Message::Consistent { .. } => 17,
            Message::Grow { .. } => 18,  // ha
            Message::Grown { .. } => 19, // ha
            Message::SectionDone { .. } => 20,
        }
    }

    /// Whether this message carries a payload (only `Write` does).
    pub fn has_payload(&self) -> bool {
        matches!(self, Message::Write { .. })
    }
}
