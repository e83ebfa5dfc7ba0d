//! The primary's ordered spill log (issue 11 item 5, ARCHITECTURE G4; Veritas
//! VVR's SRL): async writes that do not fit the in-memory replication window are
//! appended here and shipped from here in order, so the secondary stays a prefix
//! of this node's history through bursts larger than the window.
//!
//! The engine decides everything (engine/primary/stream.rs: what spills, when
//! the log is synced, read back, released or emptied); this module carries it
//! out on one thread that owns the log file (`meta::journal`, kind
//! [`JournalKind::Spill`]), in the order given, and reports back to the owner.
//!
//! **At start** ([`open`]): every record still in the log is a write that may not
//! be on the secondary; its blocks are returned so the caller marks them in the
//! bitmap, and the log is emptied ([`SpillLog::reset_after_persist`]) only after a
//! bitmap persist covering them is durable.
//!
//! **Size.** `spill-size` (default 1 GiB, 0 = no spill log) is what the engine may
//! fill with records; the file's ring is larger by the largest NBD request (a
//! wrap at the ring's end wastes less than one record), so an append the engine
//! admitted always fits.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::engine::primary::OpKind;
use crate::meta::journal::{
    Journal, JournalError, JournalIdentity, JournalKind, Lsn, RING_OFFSET_BYTES, RecordFields,
    record_len_bytes,
};
use crate::types::{ByteRange, Seq, VolumeId};

/// The largest payload one record may carry: the NBD export's largest request.
pub const RECORD_PAYLOAD_MAX_BYTES: u64 = 32 << 20;

/// Record kinds (the journal passes them through).
const KIND_WRITE: u8 = 1;
const KIND_ZEROES: u8 = 2;
const KIND_TRIM: u8 = 3;
/// Record flag: the write had FUA.
const FLAG_FUA: u8 = 1;

/// Why the spill log cannot be used; refused at start.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(
        "spill-size {spill_bytes} bytes is smaller than the replication window ({window_bytes} \
         bytes): the spill log must hold at least one window; set spill-size to at least \
         {window_bytes} (or 0 for no spill log)"
    )]
    SmallerThanWindow { spill_bytes: u64, window_bytes: u64 },
    #[error("removing the spill log {} failed: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The ring size for `spill_bytes` of records: one largest record more (wrap
/// padding), in whole 4 KiB pages.
pub fn ring_bytes(spill_bytes: u64) -> u64 {
    (spill_bytes + record_len_bytes(RECORD_PAYLOAD_MAX_BYTES)).div_ceil(4096) * 4096
}

/// The spill log as opened at start: its blocks still to cover, then the worker.
pub struct SpillLog {
    journal: Option<Journal>,
    /// Records found at start (their ranges are returned by [`open`]).
    recovered: bool,
    path: PathBuf,
    identity: JournalIdentity,
}

/// Open (or create) the spill log at `path` for `spill_bytes` of records (0: no
/// spill log; a leftover file is still read and then removed). Returns the log and
/// the volume ranges of every record it held (to mark in the bitmap before
/// anything else).
pub fn open(
    path: &Path,
    volume_id: VolumeId,
    block_size: u32,
    spill_bytes: u64,
    window_bytes: u64,
) -> Result<(SpillLog, Vec<ByteRange>), SpillError> {
    if spill_bytes > 0 && spill_bytes < window_bytes {
        return Err(SpillError::SmallerThanWindow {
            spill_bytes,
            window_bytes,
        });
    }
    let identity = JournalIdentity {
        kind: JournalKind::Spill,
        volume_id,
        block_size,
    };
    let mut ranges = Vec::new();
    let mut journal = None;
    if path.exists() {
        let j = Journal::open(path, identity)?;
        ranges.extend(
            j.records()
                .map(|r| ByteRange::new(r.fields.offset_bytes, r.fields.len_bytes)),
        );
        journal = Some(j);
    }
    let recovered = !ranges.is_empty();
    if !recovered
        && let Some(j) = &journal
        && (spill_bytes == 0 || j.capacity_bytes() != ring_bytes(spill_bytes))
    {
        // Empty, but another size than configured (or no spill log wanted now).
        drop(journal.take());
        std::fs::remove_file(path).map_err(|source| SpillError::Remove {
            path: path.to_path_buf(),
            source,
        })?;
    }
    if journal.is_none() && spill_bytes > 0 {
        journal = Some(Journal::create(path, identity, ring_bytes(spill_bytes))?);
    }
    Ok((
        SpillLog {
            journal,
            recovered,
            path: path.to_path_buf(),
            identity,
        },
        ranges,
    ))
}

impl SpillLog {
    /// Whether a spill log is in use (a file is open).
    pub fn is_open(&self) -> bool {
        self.journal.is_some()
    }

    /// Empty the log (durably) once the bitmap persist covering its records is
    /// durable (the caller's order). A log of another size than configured is
    /// then made anew (or removed: no spill log configured any more).
    pub fn reset_after_persist(&mut self, spill_bytes: u64) -> Result<(), SpillError> {
        if !self.recovered {
            return Ok(());
        }
        self.recovered = false;
        let Some(mut j) = self.journal.take() else {
            return Ok(());
        };
        if spill_bytes > 0 && j.capacity_bytes() == ring_bytes(spill_bytes) {
            let head = j.head_lsn();
            j.truncate_after(Lsn(head.0 - 1))?;
            self.journal = Some(j);
            return Ok(());
        }
        drop(j);
        std::fs::remove_file(&self.path).map_err(|source| SpillError::Remove {
            path: self.path.clone(),
            source,
        })?;
        if spill_bytes > 0 {
            self.journal = Some(Journal::create(
                &self.path,
                self.identity,
                ring_bytes(spill_bytes),
            )?);
        }
        Ok(())
    }

    /// Start the worker thread (None without a spill log).
    pub fn start(self, done: mpsc::UnboundedSender<SpillDone>) -> Option<SpillWorker> {
        let journal = self.journal?;
        let (tx, rx) = std_mpsc::channel::<SpillJob>();
        let thread = std::thread::Builder::new()
            .name("tandem-spill".into())
            .spawn(move || run(journal, rx, done))
            .expect("spawning the spill-log thread");
        Some(SpillWorker {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

/// Bytes the ring file takes on disk.
pub fn file_bytes(spill_bytes: u64) -> u64 {
    RING_OFFSET_BYTES + ring_bytes(spill_bytes)
}

/// One job for the spill thread (the engine's spill actions).
pub enum SpillJob {
    Append {
        seq: Seq,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        at_ms: u64,
        data: Option<Bytes>,
    },
    Sync,
    Read {
        seq: Seq,
    },
    Release {
        through: Seq,
    },
    Reset,
}

/// A job finished; errors as text (the engine logs them and ends the session).
#[derive(Debug)]
pub enum SpillDone {
    Synced(Result<(), String>),
    Read {
        seq: Seq,
        result: Result<Bytes, String>,
    },
    Released(Result<(), String>),
}

/// The thread's handle.
pub struct SpillWorker {
    tx: Option<std_mpsc::Sender<SpillJob>>,
    thread: Option<JoinHandle<()>>,
}

impl SpillWorker {
    pub fn send(&self, job: SpillJob) {
        let _ = self.tx.as_ref().expect("worker running").send(job);
    }

    /// Wait for every job given so far.
    pub fn finish(mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    mut journal: Journal,
    rx: std_mpsc::Receiver<SpillJob>,
    done: mpsc::UnboundedSender<SpillDone>,
) {
    // The LSN of every live record, by seq (seqs and LSNs both increase).
    let mut lsns: VecDeque<(Seq, Lsn)> = VecDeque::new();
    // An append failed: the next sync reports it (the engine then ends the
    // session; the records that did go in still cover their writes).
    let mut append_error: Option<String> = None;
    for job in rx {
        let reply = match job {
            SpillJob::Append {
                seq,
                kind,
                range,
                fua,
                at_ms,
                data,
            } => {
                let fields = RecordFields {
                    kind: match kind {
                        OpKind::Write => KIND_WRITE,
                        OpKind::WriteZeroes => KIND_ZEROES,
                        _ => KIND_TRIM,
                    },
                    flags: if fua { FLAG_FUA } else { 0 },
                    seq: seq.0,
                    offset_bytes: range.offset,
                    len_bytes: range.len,
                    at_ms,
                };
                let payload = data.as_deref().unwrap_or(&[]);
                match journal.append(fields, payload) {
                    Ok(lsn) => lsns.push_back((seq, lsn)),
                    Err(e) => {
                        append_error.get_or_insert(format!("appending write {seq}: {e}"));
                    }
                }
                None
            }
            SpillJob::Sync => Some(SpillDone::Synced(match append_error.take() {
                Some(e) => Err(e),
                None => journal.sync().map(|_| ()).map_err(|e| e.to_string()),
            })),
            SpillJob::Read { seq } => {
                let result = match lsns.binary_search_by_key(&seq, |&(s, _)| s) {
                    Ok(i) => journal
                        .read_payload(lsns[i].1)
                        .map(Bytes::from)
                        .map_err(|e| e.to_string()),
                    Err(_) => Err(format!("write {seq} is not in the spill log")),
                };
                Some(SpillDone::Read { seq, result })
            }
            SpillJob::Release { through } => {
                let mut last = None;
                while let Some(&(s, lsn)) = lsns.front()
                    && s <= through
                {
                    last = Some(lsn);
                    lsns.pop_front();
                }
                if let Some(lsn) = last {
                    journal.release_through(lsn);
                }
                Some(SpillDone::Released(
                    journal.persist_head().map_err(|e| e.to_string()),
                ))
            }
            SpillJob::Reset => {
                lsns.clear();
                append_error = None;
                let head = journal.head_lsn();
                Some(SpillDone::Released(
                    journal
                        .truncate_after(Lsn(head.0 - 1))
                        .map_err(|e| e.to_string()),
                ))
            }
        };
        if let Some(r) = reply
            && done.send(r).is_err()
        {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> VolumeId {
        VolumeId([9; 16])
    }

    /// Records left in the log at start come back as ranges; after the reset the
    /// log is empty, and a leftover log is removed when no spill log is configured.
    #[test]
    fn records_left_at_start_are_returned_then_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        let window = 1 << 20;
        let (log, ranges) = open(&path, identity(), 4096, 4 << 20, window).unwrap();
        assert!(ranges.is_empty());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = log.start(tx).unwrap();
        for i in 1..=3u64 {
            w.send(SpillJob::Append {
                seq: Seq(i),
                kind: OpKind::Write,
                range: ByteRange::new(i * 8192, 4096),
                fua: false,
                at_ms: i,
                data: Some(Bytes::from(vec![i as u8; 4096])),
            });
        }
        w.send(SpillJob::Sync);
        w.send(SpillJob::Read { seq: Seq(2) });
        w.send(SpillJob::Release { through: Seq(1) });
        w.finish();
        assert!(matches!(rx.try_recv().unwrap(), SpillDone::Synced(Ok(()))));
        match rx.try_recv().unwrap() {
            SpillDone::Read { seq, result } => {
                assert_eq!(seq, Seq(2));
                assert_eq!(result.unwrap(), Bytes::from(vec![2u8; 4096]));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            rx.try_recv().unwrap(),
            SpillDone::Released(Ok(()))
        ));
        // A restart: records 2 and 3 are still there.
        let (mut log, ranges) = open(&path, identity(), 4096, 4 << 20, window).unwrap();
        assert_eq!(
            ranges,
            vec![ByteRange::new(16384, 4096), ByteRange::new(24576, 4096)]
        );
        log.reset_after_persist(4 << 20).unwrap();
        drop(log);
        let (log, ranges) = open(&path, identity(), 4096, 4 << 20, window).unwrap();
        assert!(ranges.is_empty());
        drop(log);
        // Spill log switched off: the empty file goes.
        let (log, _) = open(&path, identity(), 4096, 0, window).unwrap();
        assert!(!log.is_open());
        assert!(!path.exists());
    }

    /// A spill log smaller than the window is refused with the size needed.
    #[test]
    fn smaller_than_the_window_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(&dir.path().join("s"), identity(), 4096, 1 << 20, 64 << 20)
            .err()
            .unwrap();
        assert!(err.to_string().contains("at least 67108864"), "{err}");
    }
}
