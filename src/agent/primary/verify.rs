//! The primary agent's side of the online verify (`tandem verify`): starting it
//! from the control socket, and reporting progress and the result.
//!
//! The decisions (which blocks, in what order, at what rate, what counts as a
//! mismatch, when a repair is done) are the engine's: see engine/primary/verify.rs
//! for why a reported mismatch is never a write in flight.
//!
//! Control protocol (a long operation that answers at once, then is polled):
//! - `{"cmd":"verify","args":{"repair":true,"rate":N}}` starts a verify and returns
//!   `{"ok":true,"result":{"id":ID,"total_bytes":..,"rate_bytes_per_s":..}}`, or an
//!   error saying why not (not connected, ahead, resync pending, one in progress);
//! - `{"cmd":"verify-result"}` returns the running or last verify as
//!   `{"id","state","repair","done_bytes","total_bytes","percent","eta_s",
//!   "elapsed_s","mismatched_blocks","mismatched_bytes","ranges":[{"offset","length"}],
//!   "ranges_truncated","error"}`; `state` is `scanning`, `repairing`, `done`,
//!   `failed`, or `none` when no verify ran since the agent started.
//!
//! The rate limit counts bytes of the volume compared (each is read once on both
//! nodes): `rate` in bytes per second, default the resource's resync-rate, 0 =
//! unlimited. It is a token bucket holding at most 100 ms of budget (or one chunk).

use std::time::Instant;

use serde_json::json;

use super::Owner;
use crate::agent::control::{ControlReply, VerifyStatus};
use crate::engine::primary::VerifyState;

/// Most mismatched ranges listed in a verify result; the count is always exact.
pub(super) const VERIFY_RANGES_LISTED_MAX: usize = 10_000;

pub(super) struct VerifyDriver {
    /// Id of the verify running or finished last (0: none yet).
    id: u64,
    rate_bytes_per_s: u64,
    started: Instant,
    finished_after_s: Option<f64>,
}

impl VerifyDriver {
    pub(super) fn new() -> VerifyDriver {
        VerifyDriver {
            id: 0,
            rate_bytes_per_s: 0,
            started: Instant::now(),
            finished_after_s: None,
        }
    }
}

impl Owner {
    pub(super) fn start_verify(&mut self, repair: bool, rate: Option<u64>) -> ControlReply {
        if self.draining.is_some() {
            return ControlReply::error("the agent is shutting down; verify refused".into());
        }
        let rate = rate.unwrap_or(self.cfg.resync_rate_bytes_per_s);
        if let Err(refusal) = self.engine.start_online_verify(repair, rate) {
            return ControlReply::error(format!("verify refused: {refusal}"));
        }
        let v = &mut self.verify;
        v.id += 1;
        v.rate_bytes_per_s = rate;
        v.started = Instant::now();
        v.finished_after_s = None;
        let total_bytes = self
            .shared
            .size_bytes
            .load(std::sync::atomic::Ordering::Acquire);
        tracing::info!(
            id = v.id,
            repair,
            total_bytes,
            rate_bytes_per_s = rate,
            "online verify starts"
        );
        ControlReply::success(json!({
            "id": v.id,
            "total_bytes": total_bytes,
            "rate_bytes_per_s": rate,
        }))
    }

    /// Log the end of a verify once (called on every status and tick).
    pub(super) fn pump_verify(&mut self) {
        self.note_verify_end();
    }

    /// Log the end of a verify once, and stop its clock.
    fn note_verify_end(&mut self) {
        if self.verify.finished_after_s.is_some() {
            return;
        }
        let Some(r) = self.engine.verify_report() else {
            return;
        };
        let elapsed_s = self.verify.started.elapsed().as_secs_f64();
        match &r.state {
            VerifyState::Scanning | VerifyState::Repairing => return,
            VerifyState::Done => tracing::info!(
                id = self.verify.id,
                compared_blocks = r.compared_blocks.0,
                mismatched_blocks = r.mismatched_blocks.0,
                repaired = r.repair && r.mismatched_blocks.0 > 0,
                elapsed_s = format!("{elapsed_s:.1}"),
                "online verify finished"
            ),
            VerifyState::Failed(reason) => {
                tracing::warn!(id = self.verify.id, "online verify failed: {reason}")
            }
        }
        // Event (hardening): the verify's result.
        let error = match &r.state {
            VerifyState::Failed(reason) => Some(reason.to_string()),
            _ => None,
        };
        let outcome = match (&error, r.mismatched_blocks.0, r.repair) {
            (Some(_), _, _) => "failed",
            (None, 0, _) => "identical",
            (None, _, true) => "repaired",
            (None, _, false) => "differences",
        };
        self.shared
            .metrics
            .events
            .emit(crate::metrics::events::EventKind::VerifyDone {
                verify_id: self.verify.id,
                outcome: outcome.into(),
                mismatched_blocks: r.mismatched_blocks.0,
                compared_bytes: r.compared_blocks.0 * u64::from(self.cfg.block_size),
                error,
            });
        self.verify.finished_after_s = Some(elapsed_s);
    }

    fn verify_elapsed_s(&self) -> f64 {
        self.verify
            .finished_after_s
            .unwrap_or_else(|| self.verify.started.elapsed().as_secs_f64())
    }

    /// Progress for `tandem status`: only while a verify runs.
    pub(super) fn verify_status(&self) -> Option<VerifyStatus> {
        let r = self.engine.verify_report()?;
        let state = match r.state {
            VerifyState::Scanning => "scanning",
            VerifyState::Repairing => "repairing",
            VerifyState::Done | VerifyState::Failed(_) => return None,
        };
        let (done, total, percent, eta_s) = self.verify_progress();
        Some(VerifyStatus {
            state: state.into(),
            done_bytes: done,
            total_bytes: total,
            percent,
            eta_s,
            mismatched_blocks: r.mismatched_blocks.0,
        })
    }

    /// (done bytes, total bytes, percent, eta seconds) of the scan.
    fn verify_progress(&self) -> (u64, u64, f64, Option<f64>) {
        let Some(r) = self.engine.verify_report() else {
            return (0, 0, 0.0, None);
        };
        let bs = self.cfg.block_size as u64;
        let total = self
            .shared
            .size_bytes
            .load(std::sync::atomic::Ordering::Acquire);
        let done = (r.compared_blocks.0 * bs).min(total);
        let percent = 100.0 * done as f64 / total.max(1) as f64;
        let elapsed_s = self.verify_elapsed_s();
        let eta_s = match r.state {
            VerifyState::Scanning => (done > 0 && elapsed_s > 0.0)
                .then(|| elapsed_s * total.saturating_sub(done) as f64 / done as f64),
            _ => None,
        };
        (done, total, percent, eta_s)
    }

    /// The running or last verify, as the control socket returns it.
    pub(super) fn verify_result_json(&self) -> serde_json::Value {
        let Some(r) = self.engine.verify_report() else {
            return json!({ "id": 0, "state": "none" });
        };
        let (done, total, percent, eta_s) = self.verify_progress();
        let (state, error) = match &r.state {
            VerifyState::Scanning => ("scanning", None),
            VerifyState::Repairing => ("repairing", None),
            VerifyState::Done => ("done", None),
            VerifyState::Failed(reason) => ("failed", Some(reason.clone())),
        };
        let (ranges, truncated) = self
            .engine
            .verify_mismatched_ranges(VERIFY_RANGES_LISTED_MAX);
        let bs = self.cfg.block_size as u64;
        let mismatched_bytes: u64 = if truncated {
            r.mismatched_blocks.0 * bs
        } else {
            ranges.iter().map(|r| r.len).sum()
        };
        json!({
            "id": self.verify.id,
            "state": state,
            "repair": r.repair,
            "done_bytes": done,
            "total_bytes": total,
            "percent": percent,
            "eta_s": eta_s,
            "elapsed_s": self.verify_elapsed_s(),
            "rate_bytes_per_s": self.verify.rate_bytes_per_s,
            "mismatched_blocks": r.mismatched_blocks.0,
            "mismatched_bytes": mismatched_bytes,
            "ranges": ranges
                .iter()
                .map(|r| json!({ "offset": r.offset, "length": r.len }))
                .collect::<Vec<_>>(),
            "ranges_truncated": truncated,
            "error": error,
        })
    }
}
