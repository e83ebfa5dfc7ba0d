//! The recovery point objective: the decision part (no clock, no I/O).
//!
//! The primary compares its lag in seconds (the age of the oldest write the
//! secondary does not have yet, G4) with the configured target every
//! [`RPO_CHECK_INTERVAL`]. One transition is reported per crossing, so a lag
//! hovering above the target produces one alert, not one per check.

use std::time::Duration;

/// How often the primary compares its lag with the target: fine enough for
/// targets of a second or more, and a check is two atomic loads.
pub const RPO_CHECK_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpoTransition {
    /// The lag rose above the target.
    Exceeded,
    /// The lag fell back to the target or below.
    Recovered,
}

impl RpoTransition {
    /// The event kind (and the hook's `TANDEM_EVENT`).
    pub fn kind(self) -> &'static str {
        match self {
            RpoTransition::Exceeded => "rpo-exceeded",
            RpoTransition::Recovered => "rpo-recovered",
        }
    }
}

/// Tracks whether the lag is above the target.
#[derive(Clone, Debug)]
pub struct RpoMonitor {
    target_s: f64,
    exceeded: bool,
}

impl RpoMonitor {
    pub fn new(target_s: f64) -> RpoMonitor {
        assert!(
            target_s.is_finite() && target_s > 0.0,
            "rpo target {target_s}"
        );
        RpoMonitor {
            target_s,
            exceeded: false,
        }
    }

    pub fn target_s(&self) -> f64 {
        self.target_s
    }

    pub fn is_exceeded(&self) -> bool {
        self.exceeded
    }

    /// Feed the current lag; returns a transition only when the state changes.
    pub fn observe(&mut self, lag_s: f64) -> Option<RpoTransition> {
        let above = lag_s > self.target_s;
        if above == self.exceeded {
            return None;
        }
        self.exceeded = above;
        Some(if above {
            RpoTransition::Exceeded
        } else {
            RpoTransition::Recovered
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_transition_per_crossing() {
        let mut m = RpoMonitor::new(2.0);
        let lags = [0.0, 1.0, 2.0, 2.5, 3.0, 9.0, 2.1, 1.9, 0.0, 0.0, 2.01];
        let seen: Vec<Option<RpoTransition>> = lags.iter().map(|l| m.observe(*l)).collect();
        use RpoTransition::*;
        assert_eq!(
            seen,
            vec![
                None,
                None,
                None,
                Some(Exceeded),
                None,
                None,
                None,
                Some(Recovered),
                None,
                None,
                Some(Exceeded)
            ]
        );
        assert!(m.is_exceeded());
    }
}
