//! The secondary's handshake decision (G6, G8), sans-IO: from its own state and the
//! primary's Hello, either a [`Plan`] (what the primary must send) or a typed
//! [`Refusal`] whose text names both sides' values and what to do.

use std::fmt;

use crate::engine::generations::{self, Decision, GenInfo, Loser, SplitBrainPolicy};
use crate::types::{Generation, VolumeId};
use crate::wire::{self, Hello, PROTOCOL_VERSION, SyncPlan};

/// What the secondary knows about itself at the handshake.
#[derive(Clone, Debug)]
pub struct Local {
    pub name: String,
    /// The name it expects its peer to have.
    pub peer_name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub volume_id: VolumeId,
    /// New: no identity adopted yet.
    pub is_new: bool,
    /// Generations and own changes, as the decision sees them.
    pub gens: GenInfo,
    /// Its image is consistent (a completed full copy at some point); a node
    /// without one gets a full copy whatever its generations say.
    pub has_consistent_image: bool,
    /// Its data is probably mostly the primary's (pre-seeded, or metadata rebuilt):
    /// compared by hash instead of copied.
    pub compare_by_hash: bool,
    /// `tandem resolve --discard-local` was given.
    pub discard_local: bool,
    /// ha (issue 12): `tandem invalidate` discarded this node's data and a full
    /// resync has not completed since (`recovery::full_sync_owed`).
    pub full_sync_owed: bool,
    pub policy: SplitBrainPolicy,
    /// Where its metadata lives (for the texts).
    pub meta_path: String,
}

/// An accepted handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub sync: SyncPlan,
    pub why: Why,
    /// This node's own changes are discarded: list them in a report first.
    pub discards_local: bool,
}

/// Why a plan was chosen (the log and status show its text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    InitialFull,
    InitialCompare,
    /// A node whose earlier full copy never completed starts over.
    NeverCompleted,
    Bitmap(&'static str),
    GenerationsBehind,
    PreSeededCompare,
    Discard {
        reason: String,
        full: bool,
    },
    /// ha (issue 12): `tandem invalidate` discarded this node's data.
    Invalidated,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = match self.sync {
            SyncPlan::Bitmap => "bitmap resync",
            SyncPlan::Full => "full resync",
            SyncPlan::Verify => "hash-compare resync",
        };
        match &self.why {
            Why::InitialFull => write!(f, "{plan}: initial full sync of a new secondary"),
            Why::InitialCompare => write!(
                f,
                "{plan}: initial sync of a pre-seeded (or rebuilt) volume: compare every block by hash"
            ),
            Why::NeverCompleted => write!(
                f,
                "{plan}: this node's first full copy never completed, it holds no consistent image: start over"
            ),
            Why::Bitmap(why) => write!(f, "{plan}: {why}"),
            Why::GenerationsBehind => write!(
                f,
                "{plan}: this node is generations behind the primary: full resync"
            ),
            Why::PreSeededCompare => write!(
                f,
                "{plan}: no bitmap covers this node's data (pre-seeded): compare every block by hash"
            ),
            Why::Invalidated => write!(
                f,
                "{plan}: this node was invalidated (tandem invalidate): its data is discarded and every block is copied from the primary"
            ),
            Why::Discard { reason, full } => write!(
                f,
                "{reason}: discarding this node's changes, resync ({})",
                if *full { "full" } else { "changed blocks only" }
            ),
        }
    }
}

/// Both sides' generations and changes, for refusal texts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Both {
    pub primary: String,
    pub p: GenInfo,
    pub secondary: String,
    pub s: GenInfo,
    pub block_size: u32,
}

impl fmt::Display for Both {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bs = self.block_size as u64;
        write!(
            f,
            "{} (primary): generation {}, diverged from {}, {} blocks ({} bytes) changed; {} (this node): generation {}, diverged from {}, {} blocks ({} bytes) changed",
            self.primary,
            self.p.current,
            self.p.bitmap_base,
            self.p.changed_blocks,
            self.p.changed_blocks * bs,
            self.secondary,
            self.s.current,
            self.s.bitmap_base,
            self.s.changed_blocks,
            self.s.changed_blocks * bs
        )
    }
}

/// A refused handshake.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "protocol version mismatch: local {local}, peer {peer}; run the same tandem version on both nodes"
    )]
    ProtocolVersion { local: u16, peer: u16 },
    #[error(
        "volume size mismatch: local {local} bytes, peer {peer} bytes; resize one side or recreate metadata"
    )]
    SizeMismatch { local: u64, peer: u64 },
    #[error(
        "block size mismatch: local {local} bytes, peer {peer} bytes; use the same --block-size on both nodes"
    )]
    BlockSizeMismatch { local: u32, peer: u32 },
    #[error("peer calls itself '{got}' but '{expected}' was expected (--peer-name)")]
    PeerName { got: String, expected: String },
    #[error("peer expects a node named '{expected}' but this node is '{ours}' (--name)")]
    OurName { expected: String, ours: String },
    #[error("both nodes are secondary: nothing to replicate until one is promoted")]
    BothSecondary,
    #[error(
        "volume UUID mismatch: local {local}, peer {peer}; these volumes hold unrelated data (recreate this node's metadata {meta} to resync it from scratch)"
    )]
    VolumeMismatch {
        local: VolumeId,
        peer: VolumeId,
        meta: String,
    },
    #[error(
        "this node holds newer data than the primary: {both}. The primary is stale: demote {primary} (tandem demote) and promote {secondary}, or to discard this node's newer data run `tandem resolve --discard-local` on {secondary}",
        primary = .both.primary, secondary = .both.secondary
    )]
    SecondaryNewer { both: Both },
    #[error(
        "split brain: both nodes wrote while apart: {both}. {by} discards the primary {primary}'s changes, but a primary's data is never discarded while it serves: demote {primary} (tandem demote) and promote {secondary}; {primary} then resyncs from {secondary}",
        primary = .both.primary, secondary = .both.secondary
    )]
    SplitBrainPrimaryLoses { both: Both, by: String },
    #[error(
        "split brain: both nodes wrote while apart: {both}. Not resolved automatically (split-brain-policy {policy}). To keep {primary}'s data, run `tandem resolve --discard-local` on {secondary}; to keep {secondary}'s, demote {primary}, promote {secondary}, and resolve on {primary}",
        primary = .both.primary, secondary = .both.secondary
    )]
    SplitBrain { both: Both, policy: String },
    #[error(
        "the nodes share no data generation: primary {primary} has {p} (history {p_history0}, {p_history1}), this node {secondary} has {s} (history {s_history0}, {s_history1}); they hold unrelated data. To discard this node's data and copy everything from {primary}, run `tandem resolve --discard-local` on {secondary}",
        p_history0 = .p_history[0], p_history1 = .p_history[1], s_history0 = .s_history[0], s_history1 = .s_history[1]
    )]
    Unrelated {
        primary: String,
        p: Generation,
        p_history: [Generation; 2],
        secondary: String,
        s: Generation,
        s_history: [Generation; 2],
    },
}

impl Refusal {
    /// Refusals that are part of both nodes dialing, not problems.
    pub fn is_quiet(&self) -> bool {
        matches!(self, Refusal::BothSecondary)
    }
    /// A split brain (for events and status).
    pub fn is_split_brain(&self) -> bool {
        matches!(
            self,
            Refusal::SplitBrain { .. } | Refusal::SplitBrainPrimaryLoses { .. }
        )
    }
}

/// The generations a peer's Hello announces, as the handshake decision sees them.
pub fn gen_info_of(h: &Hello) -> GenInfo {
    GenInfo {
        current: Generation(h.generations.current),
        bitmap_base: Generation(h.generations.bitmap_base),
        history: h.generations.history.map(Generation),
        changed_blocks: h.changed_blocks,
        promoted_at_s: h.promoted_at_s,
        inconsistent: false,
    }
}

/// Check a Hello against this node (G6) and decide what the primary must send (G8).
// A refusal carries both nodes' generations for its message; it is built once per
// handshake, so its size costs nothing.
#[allow(clippy::result_large_err)]
pub fn decide(h: &Hello, local: &Local) -> Result<Plan, Refusal> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::ProtocolVersion {
            local: PROTOCOL_VERSION,
            peer: h.protocol_version,
        });
    }
    // ha (issue 12): a secondary larger than its primary is one an online grow
    // reached first (the primary grows only once the secondary recorded it):
    // its extra range is zeroed and unused until the primary grows too. A
    // smaller one cannot hold the primary's volume: refused (the agent grows
    // it first when it can, agent/secondary/grow.rs, and the primary redials).
    if h.size_bytes > local.size_bytes {
        return Err(Refusal::SizeMismatch {
            local: local.size_bytes,
            peer: h.size_bytes,
        });
    }
    if h.block_size != local.block_size {
        return Err(Refusal::BlockSizeMismatch {
            local: local.block_size,
            peer: h.block_size,
        });
    }
    if h.node_name != local.peer_name {
        return Err(Refusal::PeerName {
            got: h.node_name.clone(),
            expected: local.peer_name.clone(),
        });
    }
    if h.peer_name != local.name {
        return Err(Refusal::OurName {
            expected: h.peer_name.clone(),
            ours: local.name.clone(),
        });
    }
    if h.role != wire::ROLE_PRIMARY {
        return Err(Refusal::BothSecondary);
    }
    if !local.is_new && local.volume_id != VolumeId(h.volume_id) {
        return Err(Refusal::VolumeMismatch {
            local: local.volume_id,
            peer: VolumeId(h.volume_id),
            meta: local.meta_path.clone(),
        });
    }
    let plan = |sync, why| Plan {
        sync,
        why,
        discards_local: false,
    };
    if local.full_sync_owed && !local.is_new {
        // Whatever its generations or journal say: the operator discarded its
        // data, so nothing of it is compared or kept (not even by hash: a disk
        // that corrupted blocks behind tandem's back may return them as they
        // were hashed).
        return Ok(plan(SyncPlan::Full, Why::Invalidated));
    }
    if local.is_new {
        // A new node (or one with rebuilt metadata) has no generations to compare.
        return Ok(if local.compare_by_hash {
            plan(SyncPlan::Verify, Why::InitialCompare)
        } else {
            plan(SyncPlan::Full, Why::InitialFull)
        });
    }
    if !local.has_consistent_image {
        // Its first copy never completed (it may have been cut after the Welcome,
        // or the primary wrote alone meanwhile, issue 9 findings 9 and 12): it has
        // no data worth keeping or comparing generations for.
        return Ok(if local.compare_by_hash {
            plan(SyncPlan::Verify, Why::InitialCompare)
        } else {
            plan(SyncPlan::Full, Why::NeverCompleted)
        });
    }
    let p = gen_info_of(h);
    let s = local.gens;
    let both = Both {
        primary: h.node_name.clone(),
        p,
        secondary: local.name.clone(),
        s,
        block_size: local.block_size,
    };
    let discard = |reason: String, common_base: bool| Plan {
        sync: if common_base {
            SyncPlan::Bitmap
        } else {
            SyncPlan::Full
        },
        why: Why::Discard {
            reason,
            full: !common_base,
        },
        discards_local: true,
    };
    Ok(match generations::decide(&p, &s) {
        Decision::Bitmap { why } => plan(SyncPlan::Bitmap, Why::Bitmap(why)),
        // A pre-seeded volume that never completed its first sync is still compared by
        // hash rather than overwritten wholesale.
        Decision::Full if local.compare_by_hash => plan(SyncPlan::Verify, Why::PreSeededCompare),
        Decision::Full => plan(SyncPlan::Full, Why::GenerationsBehind),
        Decision::SecondaryNewer if local.discard_local => discard(
            "this node holds newer data, and resolve --discard-local was given".into(),
            p.bitmap_base == Generation::NONE && s.bitmap_base == p.current,
        ),
        Decision::SecondaryNewer => return Err(Refusal::SecondaryNewer { both }),
        Decision::SplitBrain => {
            let common_base = p.bitmap_base == s.bitmap_base;
            let loser = if local.discard_local {
                Some((Loser::Secondary, "resolve --discard-local".to_string()))
            } else {
                generations::split_brain_loser(&local.policy, &p, &h.node_name, &s, &local.name)
                    .map(|l| (l, format!("split-brain-policy {}", local.policy)))
            };
            match loser {
                Some((Loser::Secondary, by)) => discard(
                    format!("split brain ({both}) resolved by {by}"),
                    common_base,
                ),
                Some((Loser::Primary, by)) => {
                    return Err(Refusal::SplitBrainPrimaryLoses { both, by });
                }
                None => {
                    return Err(Refusal::SplitBrain {
                        both,
                        policy: local.policy.to_string(),
                    });
                }
            }
        }
        Decision::Unrelated if local.discard_local => discard(
            "no common generation, and resolve --discard-local was given".into(),
            false,
        ),
        Decision::Unrelated => {
            return Err(Refusal::Unrelated {
                primary: h.node_name.clone(),
                p: p.current,
                p_history: p.history,
                secondary: local.name.clone(),
                s: s.current,
                s_history: s.history,
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(current: u64, base: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            volume_id: [1; 16],
            size_bytes: 1 << 20,
            block_size: 4096,
            node_name: "alpha".into(),
            peer_name: "beta".into(),
            role: wire::ROLE_PRIMARY,
            disk_state: wire::DISK_UP_TO_DATE,
            generations: wire::Generations {
                current,
                bitmap_base: base,
                history: [base, 0],
            },
            capabilities: 0,
            first_seq: 1,
            changed_blocks: 0,
            promoted_at_s: 0,
        }
    }

    fn local() -> Local {
        Local {
            name: "beta".into(),
            peer_name: "alpha".into(),
            size_bytes: 1 << 20,
            block_size: 4096,
            volume_id: VolumeId([1; 16]),
            is_new: false,
            gens: GenInfo {
                current: Generation::NONE,
                bitmap_base: Generation(0x11),
                history: [Generation::NONE; 2],
                changed_blocks: 0,
                promoted_at_s: 0,
                inconsistent: true,
            },
            has_consistent_image: false,
            compare_by_hash: false,
            discard_local: false,
            full_sync_owed: false,
            policy: SplitBrainPolicy::Disconnect,
            meta_path: "/m".into(),
        }
    }

    /// A node in the primary's generation, in sync.
    fn in_sync() -> Local {
        let mut l = local();
        l.gens.current = Generation(0x11);
        l.gens.bitmap_base = Generation::NONE;
        l.gens.inconsistent = false;
        l.has_consistent_image = true;
        l
    }

    /// ha (issue 12): `tandem invalidate` makes the next handshake a full resync
    /// where the generations alone would plan a bitmap resync of nothing, and
    /// also for a pre-seeded node (no hash comparison of discarded data).
    #[test]
    fn an_invalidated_node_gets_a_full_resync_whatever_its_generations_say() {
        let h = hello(0x11, 0);
        let p = decide(&h, &in_sync()).unwrap();
        assert_eq!(p.sync, SyncPlan::Bitmap, "the same generation: {p}");
        let mut l = in_sync();
        l.full_sync_owed = true;
        l.compare_by_hash = true;
        let p = decide(&h, &l).unwrap();
        assert_eq!(p.sync, SyncPlan::Full);
        assert_eq!(p.why, Why::Invalidated);
        assert!(
            !p.discards_local,
            "no split-brain report: nothing of its own"
        );
        assert!(p.to_string().contains("tandem invalidate"), "{p}");
        // Also after the journal lost its consistent point (a crash mid-resync).
        l.has_consistent_image = false;
        assert_eq!(decide(&h, &l).unwrap().why, Why::Invalidated);
        // Identity is still checked.
        let mut other = h.clone();
        other.volume_id = [2; 16];
        assert!(matches!(
            decide(&other, &l),
            Err(Refusal::VolumeMismatch { .. })
        ));
    }

    /// Issue 9 finding 12: a first session cut after the Welcome left the node
    /// with the volume's identity but no generation; it must not refuse its own
    /// primary as unrelated.
    #[test]
    fn a_first_copy_cut_after_the_welcome_starts_over_instead_of_refusing() {
        let p = decide(&hello(0x11, 0), &local()).unwrap();
        assert_eq!(p.sync, SyncPlan::Full);
        assert_eq!(p.why, Why::NeverCompleted);
    }

    /// Issue 9 finding 9: the primary wrote alone meanwhile (a new generation).
    #[test]
    fn an_interrupted_first_copy_after_the_primary_wrote_alone_is_a_full_resync() {
        let p = decide(&hello(0x22, 0x11), &local()).unwrap();
        assert_eq!(p.sync, SyncPlan::Full);
    }

    /// ha (issue 12): a pair mid-grow (the secondary grew, the primary did not
    /// record it before a crash) reconciles; a secondary too small is refused.
    #[test]
    fn a_secondary_an_interrupted_grow_made_larger_is_accepted() {
        let mut l = local();
        l.size_bytes = 2 << 20;
        assert!(decide(&hello(0x11, 0), &l).is_ok());
        l.size_bytes = 1 << 19;
        assert!(matches!(
            decide(&hello(0x11, 0), &l),
            Err(Refusal::SizeMismatch { .. })
        ));
    }

    #[test]
    fn identity_mismatches_name_both_values() {
        let mut l = local();
        l.size_bytes = 1 << 19;
        let e = decide(&hello(1, 0), &l).unwrap_err();
        assert_eq!(
            e.to_string(),
            "volume size mismatch: local 524288 bytes, peer 1048576 bytes; resize one side or recreate metadata"
        );
    }
}
