//! The NBD option haggling, as the server runs it after its greeting: client
//! flags, then options (`IHAVEOPT`, option, length, data) answered by
//! `proto::answer_option` until one ends the haggling. Checks that every reply
//! is well-formed (option-reply magic, the option echoed, the announced length
//! present and bounded) and that the export's data is only sent when the
//! client may enter transmission.
//!
//! Adapter note: mirrors `NbdServer::handshake` in src/frontend/nbd.rs; when the
//! NBD protocol module is rewritten, only the three calls into `proto` change.

use tandem::frontend::nbd::proto::{self, ExportInfo, OptionOutcome};

use crate::Input;

const SIZE_BYTES: u64 = 1 << 30;

fn export() -> ExportInfo {
    ExportInfo {
        name: "r0".into(),
        description: "tandem resource r0 (sync mode)".into(),
        size_bytes: SIZE_BYTES,
        transmission_flags: proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES,
        block_size_min: 1,
        block_size_preferred: 4096,
        max_request_bytes: 32 << 20,
    }
}

/// Check the server's bytes for one option: a sequence of option replies, or
/// (EXPORT_NAME) the export's size and flags.
fn check_replies(option: u32, outcome: &OptionOutcome, no_zeroes: bool, out: &[u8]) {
    if option == proto::OPT_EXPORT_NAME {
        match outcome {
            OptionOutcome::Transmission => {
                assert_eq!(out.len(), if no_zeroes { 10 } else { 134 });
                assert_eq!(
                    u64::from_be_bytes(out[..8].try_into().expect("8")),
                    SIZE_BYTES
                );
            }
            OptionOutcome::Close(_) => assert!(out.is_empty()),
            OptionOutcome::Continue => panic!("EXPORT_NAME must end the haggling"),
        }
        return;
    }
    let mut rest = Input(out);
    let mut replies = 0;
    let mut acked = false;
    while !rest.0.is_empty() {
        let head = rest.take(20).expect("a reply header is 20 bytes");
        assert_eq!(
            u64::from_be_bytes(head[..8].try_into().expect("8")),
            proto::OPTION_REPLY_MAGIC
        );
        assert_eq!(
            u32::from_be_bytes(head[8..12].try_into().expect("4")),
            option
        );
        let kind = u32::from_be_bytes(head[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4")) as usize;
        let body = rest
            .take(len)
            .expect("the reply carries its announced length");
        assert!(!acked, "a reply after the final ACK");
        if kind == proto::REP_ACK {
            assert!(body.is_empty());
            acked = true;
        }
        if kind & (1 << 31) != 0 {
            // An error is final and its message is bounded.
            assert!(len <= 4096 + 256, "error message of {len} bytes");
            acked = true;
        }
        replies += 1;
    }
    assert!(replies > 0, "option {option} got no reply");
    assert!(acked, "option {option} got no final reply");
    if matches!(outcome, OptionOutcome::Transmission) {
        assert_eq!(option, proto::OPT_GO);
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let info = export();
    let Some(flags) = input.take(4) else { return };
    let client_flags = u32::from_be_bytes(flags.try_into().expect("4"));
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return; // refused, connection closed
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut out = Vec::new();
    for _ in 0..proto::OPTIONS_PER_CONNECTION_MAX {
        let Some(head) = input.take(16) else { return };
        if u64::from_be_bytes(head[..8].try_into().expect("8")) != proto::IHAVEOPT {
            return;
        }
        let option = u32::from_be_bytes(head[8..12].try_into().expect("4"));
        let len_bytes = u32::from_be_bytes(head[12..16].try_into().expect("4"));
        out.clear();
        if len_bytes > proto::OPTION_DATA_MAX_BYTES {
            if len_bytes > proto::OPTION_DISCARD_MAX_BYTES || option == proto::OPT_EXPORT_NAME {
                return;
            }
            // The server discards the data; the input rarely holds that much.
            if input.take(len_bytes as usize).is_none() {
                return;
            }
            proto::answer_oversized_option(option, len_bytes, &mut out);
            check_replies(option, &OptionOutcome::Continue, no_zeroes, &out);
            continue;
        }
        let Some(data) = input.take(len_bytes as usize) else {
            return;
        };
        let outcome = proto::answer_option(&info, no_zeroes, option, data, &mut out);
        check_replies(option, &outcome, no_zeroes, &out);
        match outcome {
            OptionOutcome::Continue => {}
            OptionOutcome::Transmission | OptionOutcome::Close(_) => return,
        }
    }
}
