//! The metadata writer: one thread per node that owns the metadata store and
//! makes its writes durable in the order they are given, off the owner task's
//! critical path (issue 11: a retirement's bitmap persist used to stall every
//! client write behind an fdatasync on the owner).
//!
//! It owns the superblock as written: every change goes through it, so a bitmap
//! persist (which rewrites the superblock) never undoes a generation change.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use crate::bitmap::{BitmapPage, BitmapPages, DirtyBitmap};
use crate::meta::{MetaStore, Superblock};

/// A durable write to make.
pub enum MetaJob {
    /// Persist the bitmap pages first when given (the pages of retired extents;
    /// the others stay as they are on disk), then the activity log; with
    /// `pages_with_record` (`active` still lists the retired extents), both
    /// under one fdatasync.
    Activity {
        active: Vec<u32>,
        bitmap: Option<BitmapPages>,
        pages_with_record: bool,
    },
    /// Persist the bitmap (resync progress).
    Bitmap { bitmap: DirtyBitmap },
    /// Write this superblock (what the node's role, generations and disk state
    /// are; the store keeps its own bookkeeping fields).
    Superblock { sb: Superblock },
    /// ha (issue 12): the volume grew: grow the bitmap area (with `bitmap`, the
    /// grown bitmap), then write `sb` with the new size. Answered by
    /// `MetaDone::Grow`.
    Grow { sb: Superblock, bitmap: DirtyBitmap },
}

/// A job finished (in the order given); the text is the error's.
#[derive(Debug)]
pub enum MetaDone {
    Activity(Result<(), String>),
    Bitmap(Result<(), String>),
    Superblock(Result<(), String>),
    /// ha (issue 12): a grow, with the size recorded.
    Grow(Result<u64, String>),
}

/// The worker's handle.
pub struct MetaWorker {
    tx: Option<std_mpsc::Sender<MetaJob>>,
    thread: Option<JoinHandle<(MetaStore, Superblock)>>,
}

impl MetaWorker {
    /// Start the thread; completions go to `done`.
    pub fn start(
        mut store: MetaStore,
        mut sb: Superblock,
        extent_bytes: u64,
        done: mpsc::UnboundedSender<MetaDone>,
    ) -> MetaWorker {
        let (tx, rx) = std_mpsc::channel::<MetaJob>();
        let thread = std::thread::Builder::new()
            .name("tandem-meta".into())
            .spawn(move || {
                for job in rx {
                    let result = match job {
                        MetaJob::Activity {
                            active,
                            bitmap,
                            pages_with_record,
                        } => {
                            let r = match bitmap {
                                // Issue 11: one fdatasync for pages and record.
                                Some(pages) if pages_with_record => store
                                    .write_activity_with_pages(
                                        extent_bytes,
                                        &active,
                                        pages.iter().map(|(p, _)| p),
                                        fill_from(&pages),
                                    )
                                    .map(|_| ()),
                                bitmap => (|| {
                                    if let Some(pages) = bitmap {
                                        // One pwrite per run of pages, one fdatasync; the
                                        // superblock is not rewritten (bitmap_valid holds).
                                        store.persist_bitmap_pages_with(
                                            pages.iter().map(|(p, _)| p),
                                            fill_from(&pages),
                                        )?;
                                    }
                                    store.write_activity(extent_bytes, &active)
                                })(),
                            };
                            MetaDone::Activity(r.map_err(|e| e.to_string()))
                        }
                        MetaJob::Bitmap { bitmap } => MetaDone::Bitmap(
                            store
                                .persist_bitmap(&mut sb, &bitmap)
                                .map_err(|e| e.to_string()),
                        ),
                        MetaJob::Grow { sb: new, bitmap } => {
                            let bitmap_valid = sb.bitmap_valid;
                            sb = new;
                            sb.bitmap_valid = bitmap_valid || sb.bitmap_valid;
                            MetaDone::Grow(
                                store
                                    .grow(&sb, &bitmap)
                                    .map(|()| sb.size_bytes)
                                    .map_err(|e| e.to_string()),
                            )
                        }
                        MetaJob::Superblock { sb: new } => {
                            let bitmap_valid = sb.bitmap_valid;
                            sb = new;
                            sb.bitmap_valid = bitmap_valid || sb.bitmap_valid;
                            MetaDone::Superblock(
                                store.write_superblock(&sb).map_err(|e| e.to_string()),
                            )
                        }
                    };
                    if done.send(result).is_err() {
                        break;
                    }
                }
                (store, sb)
            })
            .expect("spawning the metadata thread");
        MetaWorker {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn send(&self, job: MetaJob) {
        // The thread only stops when this handle is finished.
        let _ = self.tx.as_ref().expect("worker running").send(job);
    }

    /// Wait for every job given so far, and take the store back (final writes).
    pub fn finish(mut self) -> (MetaStore, Superblock) {
        drop(self.tx.take());
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the metadata thread panicked")
    }
}

/// Fills a page's words from `pages` (for the store's page writers).
fn fill_from(pages: &BitmapPages) -> impl FnMut(BitmapPage, &mut [u64]) + '_ {
    |page, words| words.copy_from_slice(pages.words(page).expect("a listed page"))
}
