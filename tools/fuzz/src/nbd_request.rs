//! The NBD transmission phase's request checks, as the server runs them on a
//! stream of requests: `proto::decode_request_header`, then `proto::admit`,
//! then the payload of a write (or the bytes a rejection must discard) is
//! skipped. Checks that nothing admitted for execution falls outside the
//! export or the request limits, and that what must be discarded is bounded.
//!
//! Adapter note: mirrors the request loop of src/frontend/nbd.rs; when the NBD
//! protocol module is rewritten, only the two calls into `proto` change.

use tandem::frontend::nbd::proto::{self, Admission, Command, RequestLimits};

use crate::Input;

/// Requests per input (bounds time).
const REQUESTS_MAX: usize = 1024;

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    // The first byte picks the export's limits, so both read-only and
    // writable exports, and odd sizes, are covered.
    let Some(shape) = input.u8() else { return };
    let limits = RequestLimits {
        size_bytes: (1u64 << (20 + u32::from(shape & 0x1f))) - u64::from(shape >> 5) * 512,
        max_request_bytes: 32 << 20,
        read_only: shape & 0x80 != 0,
    };
    for _ in 0..REQUESTS_MAX {
        let Some(head) = input.take(proto::REQUEST_HEADER_LEN) else {
            return;
        };
        let head: &[u8; proto::REQUEST_HEADER_LEN] = head.try_into().expect("28 bytes");
        let Ok(h) = proto::decode_request_header(head) else {
            return; // bad magic: the connection is closed
        };
        let in_export = |offset: u64, len: u32| {
            len > 0
                && len <= limits.max_request_bytes
                && offset
                    .checked_add(u64::from(len))
                    .is_some_and(|end| end <= limits.size_bytes)
        };
        match proto::admit(&h, &limits) {
            Admission::Execute(cmd) => match cmd {
                Command::Read { offset, len } => {
                    assert!(in_export(offset, len), "{h:?} -> {cmd:?}");
                }
                Command::Write { offset, len, .. } => {
                    assert!(in_export(offset, len), "{h:?} -> {cmd:?}");
                    assert!(!limits.read_only);
                    assert_eq!(len, h.len);
                    // The payload follows the header.
                    if input.take(len as usize).is_none() {
                        return;
                    }
                }
                Command::Trim { offset, len } | Command::WriteZeroes { offset, len, .. } => {
                    assert!(
                        len > 0
                            && offset
                                .checked_add(u64::from(len))
                                .is_some_and(|e| e <= limits.size_bytes),
                        "{h:?} -> {cmd:?}"
                    );
                    assert!(!limits.read_only);
                }
                Command::Flush => assert_eq!((h.offset, h.len), (0, 0)),
            },
            Admission::Reject {
                discard_bytes,
                reason,
                ..
            } => {
                assert!(!reason.is_empty());
                assert!(discard_bytes <= proto::WRITE_DISCARD_MAX_BYTES);
                if discard_bytes > 0 {
                    assert_eq!(
                        h.kind,
                        proto::CMD_WRITE,
                        "only a write's payload is discarded"
                    );
                    assert_eq!(discard_bytes, h.len);
                }
                if input.take(discard_bytes as usize).is_none() {
                    return;
                }
            }
            Admission::Disconnect => {
                assert_eq!(h.kind, proto::CMD_DISC);
                return;
            }
            Admission::Close(reason) => {
                assert!(!reason.is_empty());
                return;
            }
        }
    }
}
