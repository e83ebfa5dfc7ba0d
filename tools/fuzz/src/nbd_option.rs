//! The NBD option haggling, as the server runs it after its greeting: client
//! flags, then options (`IHAVEOPT`, option, length, data) answered by the
//! sans-IO `nbd::negotiate::ServerNegotiation` until one ends the haggling.
//! Every byte the server answers is read back with the client's decoders
//! (`nbd::proto::decode_option_reply*`, `decode_export_name_reply`): replies
//! well-formed, for the option asked, ending with one final reply; a
//! negotiated session's flags match the export.
//!
//! Adapter note: mirrors the option loop of `NbdServer` in src/nbd/server.rs.

use tandem::nbd::negotiate::{ExportInfo, ServerNegotiation, ServerStep, TlsMode};
use tandem::nbd::proto;

use crate::Input;

const SIZE_BYTES: u64 = 1 << 30;

fn export(read_only: bool) -> ExportInfo {
    ExportInfo {
        name: "r0".into(),
        description: "tandem resource r0 (sync mode)".into(),
        size_bytes: SIZE_BYTES,
        read_only,
        block_size_min: 1,
        block_size_preferred: 4096,
        max_payload_bytes: 32 << 20,
        dirty_bitmaps: vec!["ckpt-1".into()],
    }
}

/// Read the server's answer to one option back as a client would.
fn check_replies(option: u32, step: &ServerStep, out: &[u8]) {
    if option == proto::OPT_EXPORT_NAME {
        match step {
            ServerStep::Transmission(_) => {
                let (size, _) = proto::decode_export_name_reply(out)
                    .unwrap_or_else(|e| panic!("EXPORT_NAME reply undecodable: {e}"));
                assert_eq!(size, SIZE_BYTES);
            }
            ServerStep::Close(_) => assert!(out.is_empty() || out.len() >= 20),
            other => {
                // Refused before TLS: an error reply is allowed by the spec's FORCEDTLS.
                assert!(matches!(other, ServerStep::Continue), "{other:?}");
            }
        }
        if !matches!(step, ServerStep::Continue) {
            return;
        }
    }
    let mut rest = Input(out);
    let mut final_reply = false;
    while !rest.0.is_empty() {
        assert!(!final_reply, "option {option}: a reply after the final one");
        let head = rest
            .take(proto::OPTION_REPLY_HEADER_LEN)
            .expect("a whole reply header");
        let h = proto::decode_option_reply_header(head.try_into().expect("header length"))
            .unwrap_or_else(|e| panic!("option {option}: bad reply header: {e}"));
        assert_eq!(h.option, option, "a reply for another option");
        let data = rest
            .take(h.len as usize)
            .expect("the reply carries its announced length");
        let reply = proto::decode_option_reply(h.reply_type, data)
            .unwrap_or_else(|e| panic!("option {option}: reply undecodable by a client: {e}"));
        if matches!(
            reply,
            proto::OptionReply::Ack | proto::OptionReply::Error { .. }
        ) {
            final_reply = true;
        }
    }
    match step {
        ServerStep::Close(_) => {}
        _ => assert!(final_reply, "option {option}: no final reply"),
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    // First byte: TLS required or not, read-only or not.
    let Some(mode) = input.u8() else { return };
    let tls_mode = if mode & 1 != 0 {
        TlsMode::Required
    } else {
        TlsMode::Off
    };
    let read_only = mode & 2 != 0;
    let mut neg = ServerNegotiation::new(export(read_only), tls_mode);
    let Some(flags) = input.take(4) else { return };
    if neg
        .client_flags(u32::from_be_bytes(flags.try_into().expect("4")))
        .is_err()
    {
        return;
    }
    let mut out = Vec::new();
    for _ in 0..=300 {
        let Some(head) = input.take(proto::OPTION_HEADER_LEN) else {
            return;
        };
        let Ok(h) = proto::decode_option_header(head.try_into().expect("header length")) else {
            return; // bad magic: the connection is closed
        };
        out.clear();
        let step = if h.len > proto::OPTION_DATA_MAX_BYTES {
            // The server skips the data (up to its discard bound).
            if input.take(h.len as usize).is_none() {
                return;
            }
            neg.oversized_option(h, &mut out)
        } else {
            let Some(data) = input.take(h.len as usize) else {
                return;
            };
            neg.option(h.option, data, &mut out)
        };
        check_replies(h.option, &step, &out);
        match step {
            ServerStep::Continue => {}
            ServerStep::StartTls => neg.tls_started(),
            ServerStep::Transmission(n) => {
                assert_eq!(
                    n.transmission_flags & proto::TFLAG_READ_ONLY != 0,
                    read_only,
                    "{n:?}"
                );
                assert!(
                    tls_mode == TlsMode::Off || n.tls,
                    "transmission without TLS"
                );
                return;
            }
            ServerStep::Close(reason) => {
                assert!(!reason.is_empty());
                return;
            }
        }
    }
    panic!("more than 256 options were answered");
}
