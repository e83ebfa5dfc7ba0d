//! The io_uring engine: one dedicated thread owns the ring.
//!
//! Requests arrive over a bounded channel; after each send the caller bumps an
//! eventfd. The thread keeps a read of that eventfd armed in the ring, so a single
//! `submit_and_wait(1)` sleeps until either some I/O completes or new work arrives.
//! Each loop turn is one batch: pull queued requests until the ring is full (no pulling
//! while it is full), push one SQE each, **one** submit, then reap every completion.
//! Short reads/writes resubmit the remainder; `-EAGAIN`/`-EINTR` resubmit the whole
//! remainder (bounded); results go back through tokio oneshot channels.
//!
//! Buffer ownership is what makes this sound: an [`InFlight`] owns its buffer (an
//! [`AlignedBuf`] or a `Bytes` clone, both heap memory that never moves) and lives in
//! the thread's slot table from the push of its SQE until its CQE is reaped. A caller
//! that stops waiting only drops the receiving end of its oneshot; the buffer stays.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::{mpsc, oneshot};

use super::buf::AlignedBuf;
use super::files::{VolumeFiles, unexpected_eof};
use super::sys;

/// Ring size: 128 SQEs (the completion queue is twice that, so with at most 128
/// operations in the ring it cannot overflow). One SQE is kept for the eventfd read.
pub const RING_ENTRIES: u32 = 128;
/// Requests that may wait in the channel before `submit` applies backpressure.
const QUEUE_DEPTH: usize = 256;
/// How often one request may be resubmitted after `-EAGAIN`/`-EINTR` before it fails.
const RETRIES_MAX: u32 = 64;
const WAKE_USER_DATA: u64 = u64::MAX;

/// A request for the ring thread.
pub enum RingOp {
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
}

/// Handle to the ring thread; dropping it drains the in-flight work and joins the thread.
pub struct UringEngine {
    tx: Option<mpsc::Sender<RingOp>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Set up the ring (failing here is how `Auto` learns io_uring is unavailable) and
    /// start its thread.
    pub fn start(files: Arc<VolumeFiles>) -> io::Result<UringEngine> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let wake = Arc::new(sys::eventfd()?);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-uring".into())
            .spawn(move || RingThread::new(ring, files, rx, thread_wake).run())?;
        Ok(UringEngine {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    /// Queue `op` and wake the ring thread.
    pub async fn submit(&self, op: RingOp) -> io::Result<()> {
        let tx = self.tx.as_ref().expect("sender lives until drop");
        tx.send(op).await.map_err(|_| engine_stopped())?;
        sys::eventfd_signal(&*self.wake)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        // The thread notices the closed channel on its next turn; wake it for that turn.
        if let Err(e) = sys::eventfd_signal(&*self.wake) {
            tracing::error!(error = %e, "could not wake the io_uring thread for shutdown");
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the io_uring thread panicked");
        }
    }
}

pub fn engine_stopped() -> io::Error {
    io::Error::other("the volume's I/O engine has stopped after a fatal error; restart the agent")
}

/// Bytes a write takes from: the caller's `Bytes`, or an aligned copy for `O_DIRECT`.
enum WriteBuf {
    Shared(Bytes),
    Aligned(AlignedBuf),
}

impl WriteBuf {
    fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuf::Shared(b) => b,
            WriteBuf::Aligned(b) => b.as_slice(),
        }
    }
}

/// One request from the moment it is pulled off the channel until it is answered.
enum InFlight {
    Read {
        offset: u64,
        buf: AlignedBuf,
        done_bytes: usize,
        retries: u32,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        offset: u64,
        buf: WriteBuf,
        done_bytes: usize,
        fua: bool,
        retries: u32,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Flush {
        retries: u32,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

impl InFlight {
    fn from_op(op: RingOp, files: &VolumeFiles) -> InFlight {
        match op {
            RingOp::Read {
                offset,
                len_bytes,
                reply,
            } => InFlight::Read {
                offset,
                buf: AlignedBuf::zeroed(len_bytes as usize),
                done_bytes: 0,
                retries: 0,
                reply,
            },
            RingOp::Write {
                offset,
                data,
                fua,
                reply,
            } => {
                let buf = if files.needs_aligned_copy(offset, &data) {
                    WriteBuf::Aligned(AlignedBuf::copy_from(&data))
                } else {
                    WriteBuf::Shared(data)
                };
                InFlight::Write {
                    offset,
                    buf,
                    done_bytes: 0,
                    fua,
                    retries: 0,
                    reply,
                }
            }
            RingOp::Flush { reply } => InFlight::Flush { retries: 0, reply },
        }
    }

    /// The SQE for the remaining part of this request.
    fn sqe(&mut self, files: &VolumeFiles, user_data: u64) -> squeue::Entry {
        let entry = match self {
            InFlight::Read {
                offset,
                buf,
                done_bytes,
                ..
            } => {
                let len_bytes = buf.len() - *done_bytes;
                let ptr = buf.as_mut_slice()[*done_bytes..].as_mut_ptr();
                let at = *offset + *done_bytes as u64;
                let fd = files.fd_for(at, len_bytes as u64, ptr as usize);
                opcode::Read::new(types::Fd(fd), ptr, len_bytes as u32)
                    .offset(at)
                    .build()
            }
            InFlight::Write {
                offset,
                buf,
                done_bytes,
                fua,
                ..
            } => {
                let rest = &buf.as_slice()[*done_bytes..];
                let at = *offset + *done_bytes as u64;
                let fd = files.fd_for(at, rest.len() as u64, rest.as_ptr() as usize);
                let rw_flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
                    .offset(at)
                    .rw_flags(rw_flags)
                    .build()
            }
            InFlight::Flush { .. } => opcode::Fsync::new(types::Fd(files.primary.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(user_data)
    }

    fn retries(&mut self) -> &mut u32 {
        match self {
            InFlight::Read { retries, .. }
            | InFlight::Write { retries, .. }
            | InFlight::Flush { retries, .. } => retries,
        }
    }

    /// Answer the caller with `err`. The buffer is dropped here, so call this only for
    /// a request whose buffer the kernel no longer uses.
    fn fail(self, err: io::Error) {
        // A closed oneshot means the caller stopped waiting; nothing to tell it.
        match self {
            InFlight::Read { reply, .. } => drop(reply.send(Err(err))),
            InFlight::Write { reply, .. } | InFlight::Flush { reply, .. } => {
                drop(reply.send(Err(err)))
            }
        }
    }

    /// Answer the caller with `err` but never free the buffer: after a fatal ring
    /// error we cannot know whether the kernel still writes into it.
    fn fail_and_leak_buffer(self, err: io::Error) {
        match self {
            InFlight::Read { buf, reply, .. } => {
                std::mem::forget(buf);
                drop(reply.send(Err(err)));
            }
            InFlight::Write { buf, reply, .. } => {
                std::mem::forget(buf);
                drop(reply.send(Err(err)));
            }
            InFlight::Flush { reply, .. } => drop(reply.send(Err(err))),
        }
    }

    /// Account for a successful completion of `n` bytes: `Some(self)` when part of the
    /// request remains to be submitted, `None` when it has been answered.
    fn advance(self, n: usize, files: &VolumeFiles) -> Option<InFlight> {
        match self {
            InFlight::Read {
                offset,
                buf,
                done_bytes,
                retries,
                reply,
            } => {
                if n == 0 {
                    drop(reply.send(Err(unexpected_eof(&files.path, offset + done_bytes as u64))));
                    return None;
                }
                let done_bytes = done_bytes + n;
                assert!(
                    done_bytes <= buf.len(),
                    "kernel reported more bytes read than requested"
                );
                if done_bytes == buf.len() {
                    drop(reply.send(Ok(buf.into_bytes())));
                    None
                } else {
                    Some(InFlight::Read {
                        offset,
                        buf,
                        done_bytes,
                        retries,
                        reply,
                    })
                }
            }
            InFlight::Write {
                offset,
                buf,
                done_bytes,
                fua,
                retries,
                reply,
            } => {
                if n == 0 {
                    let err = io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "volume {} accepted 0 bytes at offset {}",
                            files.path.display(),
                            offset + done_bytes as u64
                        ),
                    );
                    drop(reply.send(Err(err)));
                    return None;
                }
                let done_bytes = done_bytes + n;
                let len_bytes = buf.as_slice().len();
                assert!(
                    done_bytes <= len_bytes,
                    "kernel reported more bytes written than requested"
                );
                if done_bytes == len_bytes {
                    drop(reply.send(Ok(())));
                    None
                } else {
                    Some(InFlight::Write {
                        offset,
                        buf,
                        done_bytes,
                        fua,
                        retries,
                        reply,
                    })
                }
            }
            InFlight::Flush { reply, .. } => {
                drop(reply.send(Ok(())));
                None
            }
        }
    }
}

struct RingThread {
    ring: IoUring,
    files: Arc<VolumeFiles>,
    rx: mpsc::Receiver<RingOp>,
    wake: Arc<OwnedFd>,
    /// Requests whose SQE is in the ring, indexed by their user_data.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    /// Requests pulled off the channel or due for resubmission but not yet pushed;
    /// holds at most `slots.len()` entries, as only a free slot lets work in.
    ready: VecDeque<InFlight>,
    /// Target of the armed eventfd read; boxed so its address never changes.
    wake_buf: Box<u64>,
    wake_armed: bool,
    closing: bool,
}

impl RingThread {
    fn new(
        ring: IoUring,
        files: Arc<VolumeFiles>,
        rx: mpsc::Receiver<RingOp>,
        wake: Arc<OwnedFd>,
    ) -> RingThread {
        let slot_count = ring.params().sq_entries() as usize - 1;
        RingThread {
            ring,
            files,
            rx,
            wake,
            slots: (0..slot_count).map(|_| None).collect(),
            free_slots: (0..slot_count).rev().collect(),
            ready: VecDeque::new(),
            wake_buf: Box::new(0),
            wake_armed: false,
            closing: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    fn run(mut self) {
        loop {
            if !self.closing && !self.wake_armed {
                self.arm_wake();
            }
            self.push_batch();
            if self.closing && self.in_flight() == 0 && self.ready.is_empty() {
                break;
            }
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                // Interrupted, short of kernel memory, or completions must be reaped
                // first: reap what is there and submit again on the next turn.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    self.fatal(e);
                    return;
                }
            }
            if let Err(e) = self.reap() {
                self.fatal(e);
                return;
            }
        }
        self.disarm_wake();
    }

    fn arm_wake(&mut self) {
        let ptr: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), ptr.cast(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        // SAFETY: the target is the boxed u64 owned by this thread, which is not freed
        // before the read's CQE has been reaped (see disarm_wake / fatal).
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.wake_armed = true;
        }
    }

    /// Fill free slots: resubmissions first, then new requests from the channel. Stops
    /// pulling from the channel as soon as the ring is full.
    fn push_batch(&mut self) {
        while let Some(&slot) = self.free_slots.last() {
            let mut op = match self.ready.pop_front() {
                Some(op) => op,
                None => match self.rx.try_recv() {
                    Ok(op) => InFlight::from_op(op, &self.files),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.closing = true;
                        break;
                    }
                },
            };
            let entry = op.sqe(&self.files, slot as u64);
            // SAFETY: the SQE points into op's buffer (heap memory that does not move);
            // op is stored in slots[slot] right below and stays there until its CQE
            // (user_data == slot) is reaped, so the buffer outlives the kernel's use.
            match unsafe { self.ring.submission().push(&entry) } {
                Ok(()) => {
                    self.free_slots.pop();
                    self.slots[slot] = Some(op);
                }
                Err(_) => {
                    // Submission queue full: hand the request back, retry next turn.
                    self.ready.push_front(op);
                    break;
                }
            }
        }
    }

    fn reap(&mut self) -> io::Result<()> {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in completions {
            if user_data == WAKE_USER_DATA {
                self.wake_armed = false;
                if result < 0 && !matches!(-result, libc::EINTR | libc::EAGAIN | libc::ECANCELED) {
                    return Err(io::Error::from_raw_os_error(-result));
                }
                continue;
            }
            let slot = usize::try_from(user_data).expect("user_data is a slot index");
            let mut op = self.slots[slot]
                .take()
                .expect("a completion arrives only for an occupied slot");
            self.free_slots.push(slot);
            if result < 0 {
                let errno = -result;
                if matches!(errno, libc::EAGAIN | libc::EINTR) && *op.retries() < RETRIES_MAX {
                    *op.retries() += 1;
                    self.ready.push_back(op);
                } else {
                    op.fail(io::Error::from_raw_os_error(errno));
                }
                continue;
            }
            if let Some(rest) = op.advance(result as usize, &self.files) {
                self.ready.push_back(rest);
            }
        }
        Ok(())
    }

    /// Shut down cleanly: complete the armed eventfd read ourselves and reap it, so its
    /// target buffer is no longer referenced by the kernel when it is freed.
    fn disarm_wake(&mut self) {
        while self.wake_armed {
            if let Err(e) = sys::eventfd_signal(&*self.wake) {
                self.fatal(e);
                return;
            }
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    self.fatal(e);
                    return;
                }
            }
            for cqe in self.ring.completion() {
                assert_eq!(
                    cqe.user_data(),
                    WAKE_USER_DATA,
                    "no I/O is in flight at shutdown"
                );
                self.wake_armed = false;
            }
        }
    }

    /// The ring itself failed. Answer every caller with the error. Buffers the kernel
    /// might still reference are leaked on purpose: freeing them could let the kernel
    /// write into reused memory. Later requests fail because the channel closes.
    fn fatal(&mut self, err: io::Error) {
        tracing::error!(path = %self.files.path.display(), error = %err, "io_uring failed; failing all in-flight requests and stopping the engine");
        let msg = format!(
            "io_uring failed for volume {}: {err}",
            self.files.path.display()
        );
        for op in self.ready.drain(..) {
            op.fail(io::Error::other(msg.clone()));
        }
        for op in self.slots.iter_mut().filter_map(Option::take) {
            op.fail_and_leak_buffer(io::Error::other(msg.clone()));
        }
        if self.wake_armed {
            std::mem::forget(std::mem::take(&mut self.wake_buf));
        }
        self.rx.close();
        while let Ok(op) = self.rx.try_recv() {
            InFlight::from_op(op, &self.files).fail(engine_stopped());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    fn pipe() -> (File, File) {
        let (rx, tx) = std::io::pipe().unwrap();
        (File::from(OwnedFd::from(rx)), File::from(OwnedFd::from(tx)))
    }

    /// The "direct" descriptor is the read end of an empty pipe, so an aligned read
    /// stays in flight until the test writes into the pipe; unaligned requests go to
    /// a regular file. A request sent while the ring thread sleeps in
    /// `submit_and_wait` on the pipe read must be woken by the eventfd and complete.
    #[tokio::test]
    async fn request_sent_while_io_in_flight_is_woken_by_eventfd() {
        let (pipe_rx, pipe_tx) = pipe();
        let file = tempfile::tempfile().unwrap();
        let file_data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&file_data, 0).unwrap();
        let files = Arc::new(VolumeFiles {
            path: "pipe-test".into(),
            primary: pipe_rx,
            buffered: Some(file),
            direct_align_bytes: 4096,
            is_block_device: false,
            zero_align_bytes: 512,
            sparse: Default::default(),
        });
        let engine = UringEngine::start(files).unwrap();
        // Dropped before the engine (reverse declaration order), so if an assertion
        // fails the pipe read ends with EOF and dropping the engine does not hang.
        let mut pipe_tx = pipe_tx;

        let (reply, mut stuck) = oneshot::channel();
        engine
            .submit(RingOp::Read {
                offset: 0,
                len_bytes: 4096,
                reply,
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            stuck.try_recv().is_err(),
            "the pipe read must still be in flight"
        );

        let (reply, rx) = oneshot::channel();
        engine
            .submit(RingOp::Read {
                offset: 1,
                len_bytes: 10,
                reply,
            })
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("woken by the eventfd")
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &file_data[1..11]);
        assert!(
            stuck.try_recv().is_err(),
            "the pipe read is still in flight"
        );

        // 1000 bytes (< PIPE_BUF, so atomic) give a short read; the remainder
        // [1000, 4096) is unaligned and so is resubmitted to the regular file: the
        // result proves the resubmission used the right offset and buffer position.
        pipe_tx.write_all(&[0xEE; 1000]).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("pipe read completes")
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got[..1000].iter().all(|b| *b == 0xEE));
        assert_eq!(&got[1000..], &file_data[1000..4096]);
        drop(engine);
    }

    #[tokio::test]
    async fn dropping_the_engine_with_queued_work_answers_everything() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let files = Arc::new(VolumeFiles {
            path: "drop-test".into(),
            primary: file,
            buffered: None,
            direct_align_bytes: 0,
            is_block_device: false,
            zero_align_bytes: 512,
            sparse: Default::default(),
        });
        let engine = UringEngine::start(files).unwrap();
        let mut replies = Vec::new();
        for i in 0..200u64 {
            let (reply, rx) = oneshot::channel();
            engine
                .submit(RingOp::Write {
                    offset: i * 4096,
                    data: Bytes::from(vec![i as u8; 4096]),
                    fua: false,
                    reply,
                })
                .await
                .unwrap();
            replies.push(rx);
        }
        drop(engine);
        for rx in replies {
            rx.await.expect("answered before the thread exits").unwrap();
        }
    }
}
