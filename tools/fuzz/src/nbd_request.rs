//! The NBD transmission phase's request checks, as the server runs them on a
//! stream of requests: `nbd::proto::decode_request_header` (or the extended
//! form), then `nbd::proto::admit`, then the payload the header announces is
//! skipped. Checks that nothing admitted for execution falls outside the
//! export or the negotiated limits, that writes are refused on read-only
//! exports, and that only an announced payload is ever discarded.
//!
//! Adapter note: mirrors the request loop of `NbdServer` in src/nbd/server.rs.

use tandem::nbd::proto::{self, Admission, Command, HeaderStyle, RequestLimits};

use crate::Input;

/// Requests per input (bounds time).
const REQUESTS_MAX: usize = 1024;

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    // The first two bytes pick the export and the session, so both header
    // styles, read-only and writable exports and odd sizes are covered.
    let (Some(shape), Some(session)) = (input.u8(), input.u8()) else {
        return;
    };
    let style = if session & 1 != 0 {
        HeaderStyle::Extended
    } else {
        HeaderStyle::Compact
    };
    let limits = RequestLimits {
        size_bytes: (1u64 << (20 + u32::from(shape & 0x1f))) - u64::from(shape >> 5) * 512,
        max_payload_bytes: 32 << 20,
        read_only: session & 2 != 0,
        style,
        structured: session & 4 != 0 || style == HeaderStyle::Extended,
        meta_contexts: usize::from((session >> 3) & 3),
        fast_zero: session & 0x20 != 0,
    };
    for _ in 0..REQUESTS_MAX {
        let Some(head) = input.take(style.request_len()) else {
            return;
        };
        let decoded = match style {
            HeaderStyle::Compact => proto::decode_request_header(head.try_into().expect("28")),
            HeaderStyle::Extended => {
                proto::decode_extended_request_header(head.try_into().expect("32"))
            }
        };
        let Ok(r) = decoded else {
            return; // bad magic: the connection is closed
        };
        let payload = r.payload_len(style);
        let in_export = |offset: u64, len: u64| {
            offset
                .checked_add(len)
                .is_some_and(|end| end <= limits.size_bytes)
        };
        match proto::admit(&r, &limits) {
            Admission::Execute(cmd) => {
                match cmd {
                    Command::Read { offset, len } => {
                        assert!(
                            len > 0 && len <= limits.max_payload_bytes,
                            "{r:?} -> {cmd:?}"
                        );
                        assert!(in_export(offset, u64::from(len)), "{r:?} -> {cmd:?}");
                    }
                    Command::Write { offset, len, .. } => {
                        assert!(!limits.read_only, "write admitted on a read-only export");
                        assert!(
                            len > 0 && len <= limits.max_payload_bytes,
                            "{r:?} -> {cmd:?}"
                        );
                        assert!(in_export(offset, u64::from(len)), "{r:?} -> {cmd:?}");
                        assert_eq!(u64::from(len), payload, "a write's length is its payload");
                    }
                    Command::Trim { offset, len } | Command::WriteZeroes { offset, len, .. } => {
                        assert!(!limits.read_only, "{cmd:?} admitted on a read-only export");
                        assert!(len > 0 && in_export(offset, len), "{r:?} -> {cmd:?}");
                    }
                    Command::Cache { offset, len } => {
                        assert!(in_export(offset, len), "{r:?} -> {cmd:?}");
                    }
                    Command::BlockStatus { offset, len, .. } => {
                        assert!(limits.meta_contexts > 0, "block status without a context");
                        assert!(len > 0 && in_export(offset, len), "{r:?} -> {cmd:?}");
                    }
                    Command::Flush => {}
                }
                // The payload follows the header.
                if input.take(payload as usize).is_none() {
                    return;
                }
            }
            Admission::Reject {
                discard_bytes,
                reason,
                ..
            } => {
                assert!(!reason.is_empty());
                assert_eq!(
                    u64::from(discard_bytes),
                    payload,
                    "only the announced payload is discarded"
                );
                assert!(u64::from(discard_bytes) <= proto::PAYLOAD_DISCARD_MAX_BYTES);
                if input.take(discard_bytes as usize).is_none() {
                    return;
                }
            }
            Admission::Disconnect => {
                assert_eq!(r.kind, proto::CMD_DISC);
                return;
            }
            Admission::Close(reason) => {
                assert!(!reason.is_empty());
                return;
            }
        }
    }
}
