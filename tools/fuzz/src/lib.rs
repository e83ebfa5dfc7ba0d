//! Fuzz targets for every decoder of bytes from a peer or a client (issue 14):
//!
//! - [`frame`]: the replication frame header and body decoder (`wire::decode_frame`
//!   and `wire::read_frame`, which must agree), payload opening, re-encoding.
//! - [`secondary`]: the secondary's apply engine fed sequences of decoded frames
//!   and volume completions, checked against a model: nothing applied out of
//!   order or that the engine did not accept, no acknowledgement it cannot back.
//! - [`nbd_option`] / [`nbd_request`]: the NBD option haggling and the request
//!   header checks (`nbd::negotiate`, `nbd::proto`).
//! - [`control`]: the control socket's line splitter and request decoder.
//!
//! Each `run(data)` panics on a broken invariant; libFuzzer (src/bin) or the
//! corpus replay tests (tests/corpus.rs) call it. See README.md for how the
//! targets are built and run on the stable toolchain.

pub mod control;
pub mod frame;
pub mod nbd_option;
pub mod nbd_request;
pub mod primary;
pub mod secondary;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target by name, as `run.sh` and the replay tests know them.
pub const TARGETS: [(&str, Target); 6] = [
    ("frame", frame::run),
    ("secondary", secondary::run),
    ("primary", primary::run),
    ("nbd_option", nbd_option::run),
    ("nbd_request", nbd_request::run),
    ("control", control::run),
];

/// Keep freed memory in the process's heap instead of returning it to the
/// kernel: the primary target builds engines with bitmaps of 16 or 64 GiB volumes
/// (0.5–2 MiB each, several per input), and glibc's defaults handed every one
/// back (`munmap`, or trimming the heap's top) only to fault it in again for the
/// next input: a quarter of the CPU time went to page faults and `brk`. Setting
/// the thresholds also stops glibc from moving them itself (its dynamic mmap
/// threshold). Memory stays bounded by the largest input's peak (~50 MB).
pub fn keep_heap() {
    // 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
    // SAFETY: mallopt only sets allocator parameters; called before any
    // allocation of the fuzz loop and from one thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Bytes taken from the front of a fuzz input; missing bytes read as `None`.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// Poll a future that never waits (it reads from a byte slice) to completion.
pub fn poll_ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a read from a byte slice never waits"),
    }
}
