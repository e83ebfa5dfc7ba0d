//! The secondary's redo journal as the agent drives it: one thread owns the
//! journal file (meta::journal) and carries out appends, syncs, releases,
//! truncations and payload reads in the order given, so the node task never
//! blocks on an fdatasync (engine/secondary.rs decides what and when).

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::engine::secondary::{Lsn, Record, RecordKind};
use crate::meta::journal::{
    self, Journal, JournalError, JournalIdentity, JournalKind, RecordFields,
};
use crate::types::{ByteRange, Seq, VolumeId};

enum Job {
    Append {
        fields: RecordFields,
        payload: Bytes,
    },
    Sync,
    Release {
        through: Lsn,
    },
    Truncate {
        after: Lsn,
    },
    /// Payloads in one hand-off (a checkpoint batch), in the order given; the
    /// first failure ends the reading.
    ReadMany {
        lsns: Vec<Lsn>,
        reply: oneshot::Sender<Result<Vec<Bytes>, String>>,
    },
    Stats {
        reply: oneshot::Sender<(u64, u64)>,
    },
    /// Every job before it is done: the thread ends (other handles may remain).
    Stop,
}

/// A journal operation finished (in the order given).
#[derive(Debug)]
pub enum JournalDone {
    Synced(Result<(), String>),
    Released(Result<(), String>),
    Truncated(Result<(), String>),
}

/// The journal thread's handle. Cloneable senders for reads (checkpoints and hash
/// comparisons run in their own tasks).
#[derive(Clone)]
pub struct JournalHandle {
    tx: std_mpsc::Sender<Job>,
}

pub struct JournalThread {
    handle: JournalHandle,
    thread: Option<JoinHandle<()>>,
}

/// What an open journal held.
pub struct Opened {
    pub thread: JournalThread,
    /// The engine's view: records after `applied`, in order.
    pub applied: Lsn,
    pub records: Vec<Record>,
    pub capacity_bytes: u64,
}

fn kind_of(code: u8) -> Option<RecordKind> {
    RecordKind::from_code(code)
}

/// Whether [`open`] may create a missing journal, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// A missing journal is an error.
    No,
    /// Fallocated only: a new node's (under a provisional identity at start,
    /// under its primary's when it adopts it). Adoption happens inside the
    /// handshake, which must not wait for a whole ring to be written (minutes
    /// for a journal of tens of GiB, past the primary's handshake timeout).
    Fallocated,
    /// At the start of a node that has its identity, before it listens: the
    /// ring is written once ([`Journal::create_written`]: durable appends then
    /// skip the filesystem's extent conversions).
    Written,
}

/// Open the node's journal (or create it when `create` says so), recover its
/// records, make them durable, and start its thread. With `resize`, an
/// existing journal of another size than `capacity_bytes` is resized first
/// (its live records copied into a new ring, see [`Journal::resize`]); when
/// that is not possible it keeps its size and the reason is logged.
pub fn open(
    path: &Path,
    volume_id: VolumeId,
    block_size: u32,
    capacity_bytes: u64,
    create: Create,
    resize: bool,
    done: mpsc::UnboundedSender<JournalDone>,
) -> Result<Opened, JournalError> {
    let identity = JournalIdentity {
        kind: JournalKind::Redo,
        volume_id,
        block_size,
    };
    let j = if create == Create::Written && !path.exists() {
        tracing::info!(
            path = %path.display(),
            bytes = capacity_bytes,
            "creating the journal: writing zeros over its ring once (about 1-3 s per GiB)"
        );
        Journal::create_written(path, identity, capacity_bytes)?
    } else if create == Create::Fallocated && !path.exists() {
        Journal::create(path, identity, capacity_bytes)?
    } else {
        let mut j = Journal::open(path, identity)?;
        if resize && j.capacity_bytes() != capacity_bytes {
            resize_journal(&mut j, capacity_bytes);
        }
        j
    };
    let applied = Lsn(j.head_lsn().0.saturating_sub(1));
    let mut records = Vec::new();
    for info in j.records() {
        let Some(kind) = kind_of(info.fields.kind) else {
            return Err(JournalError::Io {
                kind: JournalKind::Redo,
                path: path.to_path_buf(),
                op: "recovery (a record of an unknown kind: written by a newer tandem?)",
                source: std::io::Error::other(format!(
                    "record {} has kind {}",
                    info.lsn, info.fields.kind
                )),
            });
        };
        records.push(Record {
            lsn: Lsn(info.lsn.0),
            seq: Seq(info.fields.seq),
            kind,
            range: ByteRange::new(info.fields.offset_bytes, info.fields.len_bytes),
            at_ms: info.fields.at_ms,
            journal_bytes: info.len_bytes(),
            in_section: false,
        });
    }
    let capacity = j.capacity_bytes();
    let thread = JournalThread::start(j, done);
    Ok(Opened {
        thread,
        applied,
        records,
        capacity_bytes: capacity,
    })
}

/// Resize an open journal to the configured size; on failure keep it as it is
/// and say why (the node works with the size it has: a larger one only lets it
/// stage larger resyncs and keep a longer rollback window).
fn resize_journal(j: &mut Journal, capacity_bytes: u64) {
    let (path, from_bytes) = (j.path().to_path_buf(), j.capacity_bytes());
    tracing::info!(
        path = %path.display(),
        from_bytes,
        to_bytes = capacity_bytes,
        records = j.records().len(),
        live_bytes = j.live_bytes(),
        "resizing the journal to the configured journal-size: copying its records into a new ring (about 1-3 s per GiB)"
    );
    let started = std::time::Instant::now();
    match j.resize(capacity_bytes) {
        Ok(()) => tracing::info!(
            path = %path.display(),
            capacity_bytes = j.capacity_bytes(),
            records = j.records().len(),
            ms = started.elapsed().as_millis() as u64,
            "journal resized"
        ),
        Err(e) => tracing::warn!(
            path = %path.display(),
            capacity_bytes = from_bytes,
            journal_size = capacity_bytes,
            "the journal keeps its size: {e}"
        ),
    }
}

/// Bytes a record with this payload takes in the journal.
pub fn record_bytes(payload_len: u64) -> u64 {
    journal::record_len_bytes(payload_len)
}

impl JournalThread {
    fn start(mut j: Journal, done: mpsc::UnboundedSender<JournalDone>) -> JournalThread {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("tandem-journal".into())
            .spawn(move || {
                // An append error is reported by the next sync (the journal is
                // poisoned by it): appends are fire-and-forget.
                let mut append_error: Option<String> = None;
                for job in rx {
                    match job {
                        Job::Append { fields, payload } => {
                            if let Err(e) = j.append(fields, &payload) {
                                append_error.get_or_insert(e.to_string());
                            }
                        }
                        Job::Sync => {
                            let r = match append_error.take() {
                                Some(e) => Err(e),
                                None => j.sync().map(|_| ()).map_err(|e| e.to_string()),
                            };
                            if done.send(JournalDone::Synced(r)).is_err() {
                                return;
                            }
                        }
                        Job::Release { through } => {
                            j.release_through(journal::Lsn(through.0));
                            let r = j.persist_head().map_err(|e| e.to_string());
                            if done.send(JournalDone::Released(r)).is_err() {
                                return;
                            }
                        }
                        Job::Truncate { after } => {
                            let r = j
                                .truncate_after(journal::Lsn(after.0))
                                .map_err(|e| e.to_string());
                            if done.send(JournalDone::Truncated(r)).is_err() {
                                return;
                            }
                        }
                        Job::ReadMany { lsns, reply } => {
                            let r = lsns
                                .iter()
                                .map(|lsn| {
                                    j.read_payload(journal::Lsn(lsn.0))
                                        .map(Bytes::from)
                                        .map_err(|e| e.to_string())
                                })
                                .collect();
                            let _ = reply.send(r);
                        }
                        Job::Stats { reply } => {
                            let _ = reply.send((j.used_bytes(), j.capacity_bytes()));
                        }
                        Job::Stop => return,
                    }
                }
            })
            .expect("spawning the journal thread");
        JournalThread {
            handle: JournalHandle { tx },
            thread: Some(thread),
        }
    }

    pub fn handle(&self) -> JournalHandle {
        self.handle.clone()
    }

    /// Wait for every job given so far and stop the thread (handles still held
    /// elsewhere find it gone: reads fail, other jobs are dropped).
    pub fn stop(mut self) {
        let _ = self.handle.tx.send(Job::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl JournalHandle {
    pub fn append(&self, record: &Record, payload: Option<Bytes>) {
        let fields = RecordFields {
            kind: record.kind.code(),
            flags: 0,
            seq: record.seq.0,
            offset_bytes: record.range.offset,
            len_bytes: record.range.len,
            at_ms: record.at_ms,
        };
        let _ = self.tx.send(Job::Append {
            fields,
            payload: payload.unwrap_or_default(),
        });
    }

    pub fn sync(&self) {
        let _ = self.tx.send(Job::Sync);
    }

    pub fn release(&self, through: Lsn) {
        let _ = self.tx.send(Job::Release { through });
    }

    pub fn truncate(&self, after: Lsn) {
        let _ = self.tx.send(Job::Truncate { after });
    }

    /// A record's payload (checked against its crc).
    pub async fn read(&self, lsn: Lsn) -> Result<Bytes, String> {
        let mut one = self.read_many(vec![lsn]).await?;
        Ok(one.pop().expect("one payload per lsn"))
    }

    /// The payloads of `lsns`, in that order, each checked against its crc: one
    /// round trip to the journal thread for a whole checkpoint batch (one per
    /// record cost the secondary a task, a channel message and a wake-up per
    /// 4 KiB write copied).
    pub async fn read_many(&self, lsns: Vec<Lsn>) -> Result<Vec<Bytes>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::ReadMany { lsns, reply })
            .map_err(|_| "the journal thread stopped".to_string())?;
        rx.await
            .map_err(|_| "the journal thread stopped".to_string())?
    }

    /// (used, capacity) bytes.
    pub async fn stats(&self) -> Option<(u64, u64)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job::Stats { reply }).ok()?;
        rx.await.ok()
    }
}
