//! The fallback engine: a small pool of threads doing blocking `pread`/`pwrite`,
//! `fdatasync`, `fallocate` and block-device ioctls. Used when io_uring is unavailable
//! (seccomp, `kernel.io_uring_disabled`, old kernels) or asked for.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::files::VolumeFiles;
use super::uring::engine_stopped;

/// Worker threads per volume: enough to keep a few requests in flight on an SSD
/// without crowding a small machine.
pub const WORKERS: usize = 4;
/// Requests that may wait for a worker before `submit` applies backpressure.
const QUEUE_DEPTH: usize = 256;

pub enum PoolOp {
    Read {
        offset: u64,
        len_bytes: u32,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Flush {
        reply: oneshot::Sender<io::Result<()>>,
    },
    WriteZeroes {
        offset: u64,
        len_bytes: u64,
        fua: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
    PunchHole {
        offset: u64,
        len_bytes: u64,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

pub struct ThreadEngine {
    tx: Option<mpsc::Sender<PoolOp>>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadEngine {
    pub fn start(files: Arc<VolumeFiles>) -> io::Result<ThreadEngine> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        let mut engine = ThreadEngine {
            tx: Some(tx),
            workers: Vec::with_capacity(WORKERS),
        };
        for i in 0..WORKERS {
            let rx = rx.clone();
            let files = files.clone();
            // On error, dropping `engine` closes the channel and joins the started workers.
            let worker = std::thread::Builder::new()
                .name(format!("tandem-io-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next request; a
                        // panic elsewhere cannot leave the receiver inconsistent.
                        let op = rx
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .blocking_recv();
                        match op {
                            Some(op) => execute(&files, op),
                            None => return,
                        }
                    }
                })?;
            engine.workers.push(worker);
        }
        Ok(engine)
    }

    pub async fn submit(&self, op: PoolOp) -> io::Result<()> {
        let tx = self.tx.as_ref().expect("sender lives until drop");
        tx.send(op).await.map_err(|_| engine_stopped())
    }
}

/// Run one request to completion and answer it (a closed oneshot means the caller
/// stopped waiting, which is not an error).
fn execute(files: &VolumeFiles, op: PoolOp) {
    match op {
        PoolOp::Read {
            offset,
            len_bytes,
            reply,
        } => drop(reply.send(files.read_sync(offset, len_bytes))),
        PoolOp::Write {
            offset,
            data,
            fua,
            reply,
        } => drop(reply.send(files.write_sync(offset, &data, fua))),
        PoolOp::Flush { reply } => drop(reply.send(files.flush_sync())),
        PoolOp::WriteZeroes {
            offset,
            len_bytes,
            fua,
            reply,
        } => drop(reply.send(files.write_zeroes_sync(offset, len_bytes, fua))),
        PoolOp::PunchHole {
            offset,
            len_bytes,
            reply,
        } => drop(reply.send(files.punch_hole_sync(offset, len_bytes))),
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("an I/O worker thread panicked");
            }
        }
    }
}
