//! Fault descriptions and the set of faults currently in force.
//!
//! Owns: the public [`Fault`] / [`Dir`] vocabulary (also the JSON shape of the control
//! socket), validation of user-supplied fault parameters, and [`FaultSet`], the state
//! every connection watches. Does not own any I/O: the connection pumps in `conn` read
//! the set and act on it.

use serde::{Deserialize, Serialize};

/// Longest delay (base plus jitter) accepted, 10 minutes: longer than any DR timeout worth
/// rehearsing, short enough that a typo (`--ms 5000000`) is rejected instead of wedging a test.
pub const DELAY_MS_MAX: u64 = 600_000;

/// Direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// Client → upstream (bytes accepted on the listen address, sent to the upstream).
    Up,
    /// Upstream → client.
    Down,
    /// Both directions.
    #[default]
    Both,
}

impl Dir {
    /// Whether a fault configured for `self` applies to traffic flowing in `flow`
    /// (`flow` is always `Up` or `Down`).
    pub fn covers(self, flow: Dir) -> bool {
        debug_assert!(flow != Dir::Both, "a flow has a single direction");
        self == Dir::Both || self == flow
    }
}

/// One fault. Setting a fault replaces the earlier fault of the same kind; faults of
/// different kinds combine (a slow *and* corrupting link is `Delay` + `FlipBits`).
///
/// JSON shape (control socket): `{"kind":"delay","ms":50,"jitter_ms":10,"dir":"both"}`;
/// `dir` defaults to `"both"`, `jitter_ms` to 0, `reject_new` to false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Each chunk is held for `ms ± jitter_ms` (uniform, clamped at 0) after it was read.
    /// Order is kept: a chunk never overtakes an earlier one.
    Delay {
        ms: u64,
        #[serde(default)]
        jitter_ms: u64,
        #[serde(default)]
        dir: Dir,
    },
    /// Token bucket of `bytes_per_s` per direction, shared by all connections (one link).
    Throttle {
        bytes_per_s: u64,
        #[serde(default)]
        dir: Dir,
    },
    /// Stop forwarding in both directions and stop reading (TCP backpressure), keeping
    /// the sockets open: a dead link without RST.
    Blackhole,
    /// Close all current connections with RST; while `reject_new` is set, new connections
    /// are accepted and immediately reset.
    Reset {
        #[serde(default)]
        reject_new: bool,
    },
    /// Forward `bytes` more bytes in `dir` on every connection, then reset it.
    CutAfter {
        bytes: u64,
        #[serde(default)]
        dir: Dir,
    },
    /// Flip one bit, chosen by the seeded RNG, in every `every_nth_chunk`-th chunk.
    FlipBits {
        every_nth_chunk: u64,
        #[serde(default)]
        dir: Dir,
    },
}

/// A fault whose parameters make no sense.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    #[error(
        "delay of {ms} ms ± {jitter_ms} ms exceeds the maximum of {max_ms} ms; use a shorter delay or a blackhole"
    )]
    DelayTooLong {
        ms: u64,
        jitter_ms: u64,
        max_ms: u64,
    },
    #[error("throttle of 0 bytes/s would stall forever; use a blackhole for a dead link")]
    ThrottleZero,
    #[error("flip_bits every_nth_chunk must be at least 1 (1 = every chunk)")]
    FlipEveryZero,
}

impl Fault {
    /// Checks the parameters; the proxy refuses invalid faults.
    pub fn validate(&self) -> Result<(), FaultError> {
        match *self {
            Fault::Delay { ms, jitter_ms, .. } => {
                if ms.saturating_add(jitter_ms) > DELAY_MS_MAX {
                    return Err(FaultError::DelayTooLong {
                        ms,
                        jitter_ms,
                        max_ms: DELAY_MS_MAX,
                    });
                }
            }
            Fault::Throttle { bytes_per_s, .. } => {
                if bytes_per_s == 0 {
                    return Err(FaultError::ThrottleZero);
                }
            }
            Fault::FlipBits {
                every_nth_chunk, ..
            } => {
                if every_nth_chunk == 0 {
                    return Err(FaultError::FlipEveryZero);
                }
            }
            Fault::Blackhole | Fault::Reset { .. } | Fault::CutAfter { .. } => {}
        }
        Ok(())
    }
}

/// A cut or bit-flip setting plus the id of the `set` that installed it: connections
/// restart their byte budget / chunk counter when the id changes, so setting the same
/// cut twice gives every connection N *more* bytes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counted<T> {
    pub(crate) spec: T,
    pub(crate) change_id: u64,
}

/// Everything currently in force. Connections hold a `watch::Receiver` of this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FaultSet {
    /// (ms, jitter_ms, dir)
    pub(crate) delay: Option<(u64, u64, Dir)>,
    /// (bytes_per_s, dir)
    pub(crate) throttle: Option<(u64, Dir)>,
    pub(crate) blackhole: bool,
    pub(crate) reject_new: bool,
    /// (bytes, dir)
    pub(crate) cut_after: Option<Counted<(u64, Dir)>>,
    /// (every_nth_chunk, dir)
    pub(crate) flip_bits: Option<Counted<(u64, Dir)>>,
    /// Bumped by every `Reset`; a connection resets when it differs from the value it
    /// saw at accept time. Never goes back, not even on `clear`.
    pub(crate) reset_epoch: u64,
}

impl FaultSet {
    /// Installs `fault`, replacing the earlier fault of the same kind.
    pub(crate) fn apply(&mut self, fault: Fault, change_id: u64) {
        match fault {
            Fault::Delay { ms, jitter_ms, dir } => self.delay = Some((ms, jitter_ms, dir)),
            Fault::Throttle { bytes_per_s, dir } => self.throttle = Some((bytes_per_s, dir)),
            Fault::Blackhole => self.blackhole = true,
            Fault::Reset { reject_new } => {
                self.reset_epoch += 1;
                self.reject_new = reject_new;
            }
            Fault::CutAfter { bytes, dir } => {
                self.cut_after = Some(Counted {
                    spec: (bytes, dir),
                    change_id,
                })
            }
            Fault::FlipBits {
                every_nth_chunk,
                dir,
            } => {
                self.flip_bits = Some(Counted {
                    spec: (every_nth_chunk, dir),
                    change_id,
                })
            }
        }
    }

    /// Removes every fault. The reset epoch stays: connections reset earlier stay reset,
    /// connections accepted since must not be reset by `clear`.
    pub(crate) fn clear(&mut self) {
        *self = FaultSet {
            reset_epoch: self.reset_epoch,
            ..FaultSet::default()
        };
    }

    /// The faults in force, in the vocabulary of [`Fault`] (a past `Reset` without
    /// `reject_new` is an event, not a state, and is not listed).
    pub(crate) fn to_faults(&self) -> Vec<Fault> {
        let mut faults = Vec::new();
        if let Some((ms, jitter_ms, dir)) = self.delay {
            faults.push(Fault::Delay { ms, jitter_ms, dir });
        }
        if let Some((bytes_per_s, dir)) = self.throttle {
            faults.push(Fault::Throttle { bytes_per_s, dir });
        }
        if self.blackhole {
            faults.push(Fault::Blackhole);
        }
        if self.reject_new {
            faults.push(Fault::Reset { reject_new: true });
        }
        if let Some(c) = self.cut_after {
            faults.push(Fault::CutAfter {
                bytes: c.spec.0,
                dir: c.spec.1,
            });
        }
        if let Some(c) = self.flip_bits {
            faults.push(Fault::FlipBits {
                every_nth_chunk: c.spec.0,
                dir: c.spec.1,
            });
        }
        faults
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_json_shape_matches_the_documented_examples() {
        let f: Fault =
            serde_json::from_str(r#"{"kind":"delay","ms":50,"jitter_ms":10,"dir":"both"}"#)
                .unwrap();
        assert_eq!(
            f,
            Fault::Delay {
                ms: 50,
                jitter_ms: 10,
                dir: Dir::Both
            }
        );
        let f: Fault = serde_json::from_str(r#"{"kind":"cut_after","bytes":7}"#).unwrap();
        assert_eq!(
            f,
            Fault::CutAfter {
                bytes: 7,
                dir: Dir::Both
            }
        );
        let f: Fault = serde_json::from_str(r#"{"kind":"blackhole"}"#).unwrap();
        assert_eq!(f, Fault::Blackhole);
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"meteor"}"#).is_err());
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"delay"}"#).is_err());
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert_eq!(
            Fault::Throttle {
                bytes_per_s: 0,
                dir: Dir::Up
            }
            .validate(),
            Err(FaultError::ThrottleZero)
        );
        assert_eq!(
            Fault::FlipBits {
                every_nth_chunk: 0,
                dir: Dir::Up
            }
            .validate(),
            Err(FaultError::FlipEveryZero)
        );
        assert!(
            Fault::Delay {
                ms: DELAY_MS_MAX,
                jitter_ms: 1,
                dir: Dir::Up
            }
            .validate()
            .is_err()
        );
        assert!(Fault::Blackhole.validate().is_ok());
    }

    #[test]
    fn clear_keeps_the_reset_epoch_and_set_replaces_same_kind() {
        let mut s = FaultSet::default();
        s.apply(Fault::Reset { reject_new: true }, 1);
        s.apply(
            Fault::Delay {
                ms: 1,
                jitter_ms: 0,
                dir: Dir::Up,
            },
            2,
        );
        s.apply(
            Fault::Delay {
                ms: 9,
                jitter_ms: 0,
                dir: Dir::Down,
            },
            3,
        );
        assert_eq!(s.delay, Some((9, 0, Dir::Down)));
        assert_eq!(s.to_faults().len(), 2);
        s.clear();
        assert_eq!(s.reset_epoch, 1);
        assert!(!s.reject_new);
        assert!(s.to_faults().is_empty());
    }

    #[test]
    fn dir_covers() {
        assert!(Dir::Both.covers(Dir::Up) && Dir::Both.covers(Dir::Down));
        assert!(Dir::Up.covers(Dir::Up) && !Dir::Up.covers(Dir::Down));
        assert!(Dir::Down.covers(Dir::Down) && !Dir::Down.covers(Dir::Up));
    }
}
