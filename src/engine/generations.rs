//! Generation identifiers and the handshake decision (G8).
//!
//! Every node's metadata holds three kinds of generation identifier (random u64s,
//! 0 = none):
//!
//! - **current**: the data generation its volume holds. A new one starts when a
//!   node is promoted, and when a primary first accepts a write while its peer is
//!   away (so that both sides writing while apart is visible as two new
//!   generations from one common ancestor: a split brain).
//! - **bitmap base**: on a primary, the generation its peer is known to hold, to
//!   which the dirty bitmap is relative (none while the peer is in sync with
//!   `current`). On a secondary whose disk is Inconsistent, the generation it is a
//!   sync target of (a resync from that generation resumes from the primary's
//!   bitmap). On an UpToDate secondary that used to be primary, the generation it
//!   diverged from.
//! - **history**: the previous current generations, newest first.
//!
//! When a primary connects to a secondary, the secondary compares both sides'
//! identifiers with [`decide`]:
//!
//! | relation                                   | decision                            |
//! |--------------------------------------------|-------------------------------------|
//! | same current                               | bitmap resync (often nothing)       |
//! | secondary is sync target of primary's gen  | bitmap resync (resume)              |
//! | secondary holds the primary's bitmap base  | bitmap resync, primary → secondary  |
//! | primary holds the secondary's base/history | secondary newer: refuse             |
//! | both diverged from a common generation     | split brain: refuse or apply policy |
//! | secondary's gen in the primary's history   | full resync                         |
//! | nothing in common                          | unrelated: refuse                   |
//!
//! A bitmap resync sends the union of the primary's dirty blocks and the blocks
//! the secondary itself may have written that the primary never received (its own
//! bitmap, when it was primary before): a node that rejoins after a failover is
//! rolled back to the new primary's data, block for block, without a full copy.

use std::fmt;

use crate::types::Generation;

/// One node's generation identifiers and what it changed since its base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenInfo {
    pub current: Generation,
    pub bitmap_base: Generation,
    pub history: [Generation; 2],
    /// Blocks this node changed that its peer may not have.
    pub changed_blocks: u64,
    /// When it last became primary (unix seconds, 0 = never).
    pub promoted_at_s: u64,
    /// Its disk is a sync target that has not finished (Inconsistent).
    pub inconsistent: bool,
}

impl GenInfo {
    fn knows_in_history(&self, g: Generation) -> bool {
        g != Generation::NONE && self.history.contains(&g)
    }
}

/// Which node loses when both wrote while apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SplitBrainPolicy {
    /// Refuse the connection; an administrator resolves it (`tandem resolve`).
    #[default]
    Disconnect,
    /// The node promoted most recently loses its changes.
    DiscardYoungerPrimary,
    /// The node that changed fewer blocks loses its changes.
    DiscardLeastChanges,
    /// This node always loses its changes.
    DiscardNode(String),
}

impl SplitBrainPolicy {
    pub fn parse(text: &str) -> Result<SplitBrainPolicy, String> {
        let t = text.trim();
        Ok(match t {
            "disconnect" => SplitBrainPolicy::Disconnect,
            "discard-younger-primary" => SplitBrainPolicy::DiscardYoungerPrimary,
            "discard-least-changes" => SplitBrainPolicy::DiscardLeastChanges,
            _ => {
                let name = t
                    .strip_prefix("discard-node")
                    .map(|r| r.trim_start_matches([' ', ':', '=']).trim())
                    .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace));
                match name {
                    Some(n) => SplitBrainPolicy::DiscardNode(n.to_string()),
                    None => {
                        return Err(format!(
                            "unknown split-brain policy '{t}': use disconnect, discard-younger-primary, discard-least-changes or \"discard-node NAME\""
                        ));
                    }
                }
            }
        })
    }
}

impl fmt::Display for SplitBrainPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitBrainPolicy::Disconnect => f.write_str("disconnect"),
            SplitBrainPolicy::DiscardYoungerPrimary => f.write_str("discard-younger-primary"),
            SplitBrainPolicy::DiscardLeastChanges => f.write_str("discard-least-changes"),
            SplitBrainPolicy::DiscardNode(n) => write!(f, "discard-node {n}"),
        }
    }
}

/// Which side loses a split brain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loser {
    Primary,
    Secondary,
}

/// What the secondary decides at the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Same data generation (or a resync that resumes): the union of both sides'
    /// dirty blocks is sent, nothing else.
    Bitmap { why: &'static str },
    /// The relation is known but no bitmap covers it: every block is sent.
    Full,
    /// The secondary holds newer data than the primary: refused; the primary is stale.
    SecondaryNewer,
    /// Both sides wrote while apart.
    SplitBrain,
    /// No generation in common.
    Unrelated,
}

/// Compare a primary's and a secondary's generations (see the module docs).
pub fn decide(p: &GenInfo, s: &GenInfo) -> Decision {
    let none = Generation::NONE;
    // A secondary whose bitmap base names a generation it never held itself (not
    // in its history), while its own is one the primary descends from, is a sync
    // target that has not recorded the end of its resync (a section open, or its
    // end marker not yet durable when the session dropped): its image is not
    // known to be that generation's. A node promoted (or that wrote alone) keeps
    // its old generation in its history as its base, and holds a new one the
    // primary does not know. Found by the simulator with switchovers (seeds
    // 100038, 100040 async; 100094 sync), where the old rules refused such a node
    // as "newer" or as a split brain.
    let sync_target = s.bitmap_base != none
        && !s.knows_in_history(s.bitmap_base)
        && (s.current == none || p.knows_in_history(s.current) || p.bitmap_base == s.current);
    let s = &GenInfo {
        inconsistent: s.inconsistent || sync_target,
        ..*s
    };
    if s.current != none && s.current == p.current {
        return Decision::Bitmap {
            why: "same generation",
        };
    }
    if s.inconsistent && s.bitmap_base != none && s.bitmap_base == p.current {
        return Decision::Bitmap {
            why: "resuming an interrupted resync from this generation",
        };
    }
    if p.bitmap_base != none && s.current == p.bitmap_base {
        return Decision::Bitmap {
            why: "the primary's generation descends from the secondary's",
        };
    }
    if !s.inconsistent && s.bitmap_base != none && s.bitmap_base == p.current {
        return Decision::SecondaryNewer;
    }
    if s.knows_in_history(p.current) {
        return Decision::SecondaryNewer;
    }
    if p.bitmap_base != none
        && s.bitmap_base != none
        && !s.inconsistent
        && (p.bitmap_base == s.bitmap_base
            || s.knows_in_history(p.bitmap_base)
            || p.knows_in_history(s.bitmap_base))
    {
        return Decision::SplitBrain;
    }
    if p.knows_in_history(s.current) {
        return Decision::Full;
    }
    Decision::Unrelated
}

/// Apply a split-brain policy. `None`: the policy does not pick a loser (disconnect,
/// or a tie).
pub fn split_brain_loser(
    policy: &SplitBrainPolicy,
    p: &GenInfo,
    p_name: &str,
    s: &GenInfo,
    s_name: &str,
) -> Option<Loser> {
    match policy {
        SplitBrainPolicy::Disconnect => None,
        SplitBrainPolicy::DiscardYoungerPrimary => match p.promoted_at_s.cmp(&s.promoted_at_s) {
            std::cmp::Ordering::Greater => Some(Loser::Primary),
            std::cmp::Ordering::Less => Some(Loser::Secondary),
            std::cmp::Ordering::Equal => None,
        },
        SplitBrainPolicy::DiscardLeastChanges => match p.changed_blocks.cmp(&s.changed_blocks) {
            std::cmp::Ordering::Less => Some(Loser::Primary),
            std::cmp::Ordering::Greater => Some(Loser::Secondary),
            std::cmp::Ordering::Equal => None,
        },
        SplitBrainPolicy::DiscardNode(n) if n == p_name => Some(Loser::Primary),
        SplitBrainPolicy::DiscardNode(n) if n == s_name => Some(Loser::Secondary),
        SplitBrainPolicy::DiscardNode(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: Generation = Generation(0x11);
    const G2: Generation = Generation(0x22);
    const A2: Generation = Generation(0xa2);
    const B2: Generation = Generation(0xb2);
    const X: Generation = Generation(0x99);
    const N: Generation = Generation::NONE;

    fn g(current: Generation, base: Generation, history: [Generation; 2]) -> GenInfo {
        GenInfo {
            current,
            bitmap_base: base,
            history,
            changed_blocks: 0,
            promoted_at_s: 0,
            inconsistent: false,
        }
    }

    #[test]
    fn connected_pair_in_the_same_generation_uses_the_bitmap() {
        let p = g(G1, N, [N, N]);
        let s = g(G1, N, [N, N]);
        assert!(matches!(decide(&p, &s), Decision::Bitmap { .. }));
    }

    #[test]
    fn primary_that_wrote_alone_resyncs_its_bitmap() {
        // The link broke, the primary wrote (new generation A2 from G1).
        let p = g(A2, G1, [G1, N]);
        let s = g(G1, N, [N, N]);
        assert!(matches!(decide(&p, &s), Decision::Bitmap { .. }));
    }

    #[test]
    fn failback_after_promotion_uses_the_bitmap() {
        // B was promoted (B2 from G1); old primary A still holds G1 (killed while connected).
        let p = g(B2, G1, [G1, N]);
        let s = g(G1, N, [N, N]);
        assert!(matches!(decide(&p, &s), Decision::Bitmap { .. }));
    }

    #[test]
    fn interrupted_resync_resumes() {
        let p = g(A2, G1, [G1, N]);
        let mut s = g(G1, A2, [N, N]);
        s.inconsistent = true;
        assert!(matches!(decide(&p, &s), Decision::Bitmap { .. }));
    }

    #[test]
    fn a_resync_whose_end_was_not_recorded_resumes() {
        // The demoted node (G1) was the sync target of A2 (promoted from G1); the
        // section ended but the session dropped before its end marker was durable.
        let p = g(A2, N, [G1, N]);
        let s = g(G1, A2, [N, N]);
        assert!(matches!(decide(&p, &s), Decision::Bitmap { .. }));
    }

    #[test]
    fn an_unrecorded_sync_target_of_an_ancestor_is_copied_not_refused() {
        // The demoted node (G1) was the sync target of A2 (promoted from G1), the
        // session dropped before it recorded the end; A2 then wrote alone (B2).
        let p = g(B2, A2, [A2, G1]);
        let s = g(G1, A2, [N, N]);
        assert_eq!(decide(&p, &s), Decision::Full);
    }

    #[test]
    fn stale_primary_is_refused() {
        // B was promoted (B2 from G1) and wrote, then demoted; A still primary at G1.
        let p = g(G1, N, [N, N]);
        let s = g(B2, G1, [G1, N]);
        assert_eq!(decide(&p, &s), Decision::SecondaryNewer);
        // Same, after B's bitmap base was cleared by a completed resync elsewhere.
        let s = g(B2, N, [G1, N]);
        assert_eq!(decide(&p, &s), Decision::SecondaryNewer);
    }

    #[test]
    fn both_wrote_while_apart_is_split_brain() {
        let p = g(A2, G1, [G1, N]);
        let s = g(B2, G1, [G1, N]);
        assert_eq!(decide(&p, &s), Decision::SplitBrain);
        assert_eq!(decide(&s, &p), Decision::SplitBrain);
    }

    #[test]
    fn split_brain_after_further_generations_is_still_split_brain() {
        // A wrote apart twice (A2 from G1, then G2 from A2 after a later flap).
        let p = g(G2, A2, [A2, G1]);
        let s = g(B2, G1, [G1, N]);
        assert_eq!(decide(&p, &s), Decision::SplitBrain);
    }

    #[test]
    fn secondary_far_behind_needs_a_full_sync() {
        let p = g(G2, A2, [A2, G1]);
        let s = g(G1, N, [N, N]);
        assert_eq!(decide(&p, &s), Decision::Full);
    }

    #[test]
    fn unrelated_generations_are_refused() {
        let p = g(G1, N, [N, N]);
        let s = g(X, N, [N, N]);
        assert_eq!(decide(&p, &s), Decision::Unrelated);
    }

    #[test]
    fn policies_pick_the_loser() {
        let mut p = g(A2, G1, [G1, N]);
        let mut s = g(B2, G1, [G1, N]);
        p.promoted_at_s = 100;
        s.promoted_at_s = 200;
        p.changed_blocks = 5;
        s.changed_blocks = 9;
        let pick = |pol: &SplitBrainPolicy| split_brain_loser(pol, &p, "alpha", &s, "beta");
        assert_eq!(pick(&SplitBrainPolicy::Disconnect), None);
        assert_eq!(
            pick(&SplitBrainPolicy::DiscardYoungerPrimary),
            Some(Loser::Secondary)
        );
        assert_eq!(
            pick(&SplitBrainPolicy::DiscardLeastChanges),
            Some(Loser::Primary)
        );
        assert_eq!(
            pick(&SplitBrainPolicy::DiscardNode("alpha".into())),
            Some(Loser::Primary)
        );
        assert_eq!(
            pick(&SplitBrainPolicy::DiscardNode("beta".into())),
            Some(Loser::Secondary)
        );
        assert_eq!(pick(&SplitBrainPolicy::DiscardNode("gamma".into())), None);
    }

    #[test]
    fn policy_parsing() {
        assert_eq!(
            SplitBrainPolicy::parse("discard-node beta"),
            Ok(SplitBrainPolicy::DiscardNode("beta".into()))
        );
        assert_eq!(
            SplitBrainPolicy::parse("discard-node:beta"),
            Ok(SplitBrainPolicy::DiscardNode("beta".into()))
        );
        assert_eq!(
            SplitBrainPolicy::parse("discard-least-changes"),
            Ok(SplitBrainPolicy::DiscardLeastChanges)
        );
        assert!(SplitBrainPolicy::parse("discard-node").is_err());
        assert!(SplitBrainPolicy::parse("coin-flip").is_err());
        for text in [
            "disconnect",
            "discard-younger-primary",
            "discard-least-changes",
            "discard-node beta",
        ] {
            let p = SplitBrainPolicy::parse(text).expect("parses");
            assert_eq!(p.to_string(), text);
        }
    }
}
