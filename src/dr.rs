//! Disaster-recovery operations on a secondary (issue 10), the client side:
//! `tandem points` (the consistent points it can go back to), `tandem rollback`
//! (take its image back to one of them) and `tandem inspect` (a read-only NBD
//! export of the image as of a point, served while replication continues).
//!
//! The work happens in the secondary agent (agent/secondary.rs, `handle_control`
//! and the inspection export); this module parses the point an operator names,
//! picks the rollback point it means from the agent's list, and prints answers.
//!
//! A point is named by the primary's write seq (`812`, `seq:812`), by a UTC time
//! (`2026-11-30T00:12:03.220Z`, `2026-11-30 00:12:03`), or relative to now
//! (`-10m`, `-90s`, `-2h`). A seq names the newest point holding no write after
//! it; a time the newest point whose newest write was accepted at or before it.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::control::ControlRequest;

/// The point an operator names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointSpec {
    /// The newest point whose newest write has at most this seq.
    Seq(u64),
    /// The newest point whose newest write was accepted at or before this time
    /// (unix ms).
    AtOrBefore(u64),
    /// The newest consistent point.
    Newest,
}

/// A consistent point as the agent lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointDoc {
    /// The journal record the image ends at.
    pub journal_lsn: u64,
    /// The primary's seq of the newest write the image holds.
    pub seq: u64,
    /// When the primary accepted that write (unix ms; 0 = unknown).
    pub at_unix_ms: u64,
    /// Journal bytes recorded after it: what a rollback to it discards.
    pub later_bytes: u64,
}

/// The answer to `points`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PointsDoc {
    pub points: Vec<PointDoc>,
    /// The inspection being served, if any.
    #[serde(default)]
    pub inspection: Option<InspectionDoc>,
}

/// An inspection export being served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectionDoc {
    pub nbd: String,
    pub point: PointDoc,
}

impl PointSpec {
    /// Parse `--to`/`--at`: `812`, `seq:812`, `2026-11-30T00:12:03.220Z`,
    /// `2026-11-30 00:12:03`, `-10m` (relative to `now_ms`), `newest`.
    pub fn parse(text: &str, now_ms: u64) -> Result<PointSpec, String> {
        let t = text.trim();
        if t == "newest" || t == "latest" {
            return Ok(PointSpec::Newest);
        }
        let digits = t.strip_prefix("seq:").unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return digits
                .parse()
                .map(PointSpec::Seq)
                .map_err(|e| format!("'{text}': {e}"));
        }
        if let Some(rel) = t.strip_prefix('-') {
            let ms = parse_duration_ms(rel).ok_or_else(|| {
                format!("'{text}': a relative time is -N followed by s, m, h or d (e.g. -10m)")
            })?;
            return Ok(PointSpec::AtOrBefore(now_ms.saturating_sub(ms)));
        }
        parse_utc_ms(t).map(PointSpec::AtOrBefore).ok_or_else(|| {
            format!(
                "'{text}' names no point: give a write seq (812 or seq:812, as `tandem points` lists), \
                 a UTC time (2026-11-30T00:12:03.220Z or '2026-11-30 00:12:03'), or a time relative to now (-10m)"
            )
        })
    }

    /// The point this names among `points` (oldest first), or why none.
    pub fn choose(&self, points: &[PointDoc]) -> Result<PointDoc, String> {
        let found = match *self {
            PointSpec::Newest => points.last(),
            PointSpec::Seq(seq) => points.iter().rev().find(|p| p.seq <= seq),
            PointSpec::AtOrBefore(ms) => points
                .iter()
                .rev()
                .find(|p| p.at_unix_ms != 0 && p.at_unix_ms <= ms),
        };
        found.copied().ok_or_else(|| match (points.first(), points.last()) {
            (Some(first), Some(last)) => format!(
                "{} is before the rollback window, which holds {} consistent points from {} to {}; \
                 pick one of those (`tandem points`), or restore from a backup",
                self.describe(),
                points.len(),
                describe_point(first),
                describe_point(last)
            ),
            _ => "this node holds no consistent point yet (its first full copy is running)".into(),
        })
    }

    fn describe(&self) -> String {
        match *self {
            PointSpec::Seq(s) => format!("write seq {s}"),
            PointSpec::AtOrBefore(ms) => format_utc_ms(ms),
            PointSpec::Newest => "the newest point".into(),
        }
    }
}

/// `1500ms`, `90s`, `10m`, `2h`, `1d` (also a bare number of seconds).
fn parse_duration_ms(t: &str) -> Option<u64> {
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mul = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// `YYYY-MM-DD[T| ]HH:MM[:SS[.fff]][Z]` as UTC, in unix ms.
pub fn parse_utc_ms(t: &str) -> Option<u64> {
    let t = t.strip_suffix('Z').unwrap_or(t);
    let t = t.strip_suffix(" UTC").unwrap_or(t);
    let (date, clock) = t.split_once(['T', ' '])?;
    let mut d = date.split('-');
    let (y, mo, da) = (d.next()?, d.next()?, d.next()?);
    if d.next().is_some() {
        return None;
    }
    let month = time::Month::try_from(mo.parse::<u8>().ok()?).ok()?;
    let date = time::Date::from_calendar_date(y.parse().ok()?, month, da.parse().ok()?).ok()?;
    let (hms, frac) = match clock.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (clock, None),
    };
    let mut c = hms.split(':');
    let h: u8 = c.next()?.parse().ok()?;
    let mi: u8 = c.next()?.parse().ok()?;
    let s: u8 = match c.next() {
        Some(s) => s.parse().ok()?,
        None => 0,
    };
    if c.next().is_some() {
        return None;
    }
    let ms: u16 = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 3 && f.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{f:0<3}").parse().ok()?
        }
        Some(_) => return None,
    };
    let clock = time::Time::from_hms_milli(h, mi, s, ms).ok()?;
    let ts = time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp_nanos()
        / 1_000_000;
    u64::try_from(ts).ok()
}

/// `2026-11-30 00:12:03.220 UTC`.
pub fn format_utc_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// `2026-11-30 00:12:03.220 UTC (write 812)`.
pub fn describe_point(p: &PointDoc) -> String {
    if p.at_unix_ms == 0 {
        format!("write {} (time not known)", p.seq)
    } else {
        format!("{} (write {})", format_utc_ms(p.at_unix_ms), p.seq)
    }
}

fn now_ms() -> u64 {
    crate::agent::unix_now_ms()
}

async fn ask_ok(
    control: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let reply = crate::ops::ask(control, req, timeout).await?;
    if !reply.ok {
        return Err(reply
            .error
            .unwrap_or_else(|| format!("the agent refused '{}'", req.cmd)));
    }
    Ok(reply.result.unwrap_or_default())
}

/// `tandem points`: list the rollback window, oldest first.
pub async fn points(control: &Path, json: bool, timeout: Duration) -> Result<ExitCode, String> {
    let result = ask_ok(control, &ControlRequest::new("points"), timeout).await?;
    let doc: PointsDoc =
        serde_json::from_value(result).map_err(|e| format!("malformed answer to 'points': {e}"))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("points serialize")
        );
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", points_table(&doc, now_ms()));
    Ok(ExitCode::SUCCESS)
}

/// The human form of `tandem points`.
pub fn points_table(doc: &PointsDoc, now_ms: u64) -> String {
    let mut s = String::new();
    if doc.points.is_empty() {
        s += "no consistent point yet (the first full copy is running)\n";
        return s;
    }
    s += &format!(
        "{:<27} {:>12} {:>10} {:>14}\n",
        "time (UTC)", "write seq", "age", "later bytes"
    );
    for p in &doc.points {
        let (when, age) = if p.at_unix_ms == 0 {
            ("unknown".to_string(), "-".to_string())
        } else {
            (
                format_utc_ms(p.at_unix_ms),
                format!(
                    "{:.1} s",
                    now_ms.saturating_sub(p.at_unix_ms) as f64 / 1000.0
                ),
            )
        };
        s += &format!("{when:<27} {:>12} {age:>10} {:>14}\n", p.seq, p.later_bytes);
    }
    s += &format!(
        "{} points; roll back with `tandem rollback --to SEQ|TIME` on a disconnected secondary, look first with `tandem inspect --at SEQ|TIME --nbd ADDR`\n",
        doc.points.len()
    );
    if let Some(i) = &doc.inspection {
        s += &format!(
            "inspection: the image as of {} served read-only on {}\n",
            describe_point(&i.point),
            i.nbd
        );
    }
    s
}

/// `tandem rollback --to SPEC`.
pub async fn rollback(control: &Path, to: &str, timeout: Duration) -> Result<ExitCode, String> {
    let spec = PointSpec::parse(to, now_ms())?;
    let mut req = ControlRequest::new("rollback");
    req.args = serde_json::json!({ "to": spec });
    let result = ask_ok(control, &req, timeout).await?;
    println!(
        "{}",
        result
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("rolled back")
    );
    Ok(ExitCode::SUCCESS)
}

/// `tandem inspect --at SPEC --nbd ADDR`, or `--stop`.
pub async fn inspect(
    control: &Path,
    at: Option<&str>,
    nbd: Option<&str>,
    stop: bool,
    timeout: Duration,
) -> Result<ExitCode, String> {
    let mut req = ControlRequest::new("inspect");
    if stop {
        req.args = serde_json::json!({ "stop": true });
    } else {
        let nbd = nbd.ok_or(
            "inspect needs --nbd ADDR (HOST:PORT or unix:/path) to serve the image on, or --stop",
        )?;
        let spec = match at {
            Some(a) => PointSpec::parse(a, now_ms())?,
            None => PointSpec::Newest,
        };
        req.args = serde_json::json!({ "at": spec, "nbd": nbd });
    }
    let result = ask_ok(control, &req, timeout).await?;
    println!(
        "{}",
        result
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("done")
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(lsn: u64, seq: u64, at: u64) -> PointDoc {
        PointDoc {
            journal_lsn: lsn,
            seq,
            at_unix_ms: at,
            later_bytes: 0,
        }
    }

    #[test]
    fn point_names_parse() {
        let now = 1_796_000_000_000;
        assert_eq!(PointSpec::parse("812", now), Ok(PointSpec::Seq(812)));
        assert_eq!(PointSpec::parse("seq:7", now), Ok(PointSpec::Seq(7)));
        assert_eq!(PointSpec::parse("newest", now), Ok(PointSpec::Newest));
        assert_eq!(
            PointSpec::parse("-10m", now),
            Ok(PointSpec::AtOrBefore(now - 600_000))
        );
        // 2026-11-29 12:03:41.220 UTC
        let at = 1_795_003_421_220 + 11 * 86_400_000;
        for t in [
            "2026-11-29T12:03:41.220Z",
            "2026-11-29 12:03:41.22",
            "2026-11-29 12:03:41.220 UTC",
        ] {
            assert_eq!(
                PointSpec::parse(t, now),
                Ok(PointSpec::AtOrBefore(at)),
                "{t}"
            );
        }
        assert_eq!(
            PointSpec::parse("2026-11-29T12:03", now),
            Ok(PointSpec::AtOrBefore(at - 41_220))
        );
        assert_eq!(format_utc_ms(at), "2026-11-29 12:03:41.220 UTC");
        for bad in [
            "",
            "yesterday",
            "-10x",
            "2026-13-01 00:00",
            "12:03:41",
            "seq:",
        ] {
            assert!(PointSpec::parse(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spec_picks_the_newest_point_at_or_before_it_and_explains_a_miss() {
        let points = [p(10, 5, 1000), p(20, 9, 2000), p(30, 14, 3000)];
        assert_eq!(PointSpec::Seq(9).choose(&points).unwrap().journal_lsn, 20);
        assert_eq!(PointSpec::Seq(13).choose(&points).unwrap().journal_lsn, 20);
        assert_eq!(PointSpec::Seq(99).choose(&points).unwrap().journal_lsn, 30);
        assert_eq!(
            PointSpec::AtOrBefore(2999)
                .choose(&points)
                .unwrap()
                .journal_lsn,
            20
        );
        assert_eq!(PointSpec::Newest.choose(&points).unwrap().journal_lsn, 30);
        let miss = PointSpec::Seq(4).choose(&points).unwrap_err();
        assert!(
            miss.contains("before the rollback window") && miss.contains("3 consistent points"),
            "{miss}"
        );
        assert!(
            PointSpec::Newest
                .choose(&[])
                .unwrap_err()
                .contains("no consistent point")
        );
    }
}
