//! The NBD client against a scripted fake server: handshake variants,
//! out-of-order replies, and every way a server can misbehave.
//!
//! Each test runs the server side inline on a loopback listener, writing the
//! exact bytes of `doc/proto.md` by hand, so the client is checked against
//! the spec rather than against its own encoder.

use std::time::Duration;

use bytes::Bytes;
use tandem::nbd::client::{
    NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NbdClient, NbdClientError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_POLICY: u32 = (1 << 31) | 2;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const EXPORT_LEN_BYTES: u64 = 1 << 20;
const ALL_FLAGS: u16 = 0x7d; // HAS_FLAGS, SEND_FLUSH, SEND_FUA, ROTATIONAL, SEND_TRIM, WRITE_ZEROES

async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    (listener, addr)
}

/// Sends the newstyle greeting and returns the client flags.
async fn greet(s: &mut TcpStream, handshake_flags: u16) -> u32 {
    s.write_u64(NBD_MAGIC).await.unwrap();
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u16(handshake_flags).await.unwrap();
    s.read_u32().await.expect("client flags")
}

async fn read_option(s: &mut TcpStream) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.expect("option magic"), IHAVEOPT);
    let option = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (option, data)
}

async fn option_reply(s: &mut TcpStream, option: u32, reply_type: u32, payload: &[u8]) {
    s.write_u64(OPTION_REPLY_MAGIC).await.unwrap();
    s.write_u32(option).await.unwrap();
    s.write_u32(reply_type).await.unwrap();
    s.write_u32(payload.len() as u32).await.unwrap();
    s.write_all(payload).await.unwrap();
}

fn info_export(size_bytes: u64, flags: u16) -> Vec<u8> {
    let mut p = vec![0u8, 0];
    p.extend_from_slice(&size_bytes.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p
}

/// Accepts one connection and completes a fixed newstyle handshake with
/// NBD_OPT_GO, optionally advertising block sizes.
async fn accept_go(
    listener: &TcpListener,
    flags: u16,
    block_sizes: Option<(u32, u32, u32)>,
) -> TcpStream {
    let (mut s, _) = listener.accept().await.unwrap();
    assert_eq!(
        greet(&mut s, 1).await,
        1,
        "client must answer FIXED_NEWSTYLE"
    );
    let (option, data) = read_option(&mut s).await;
    assert_eq!(option, OPT_GO);
    // u32 name length 0, no name, u16 one info request, u16 NBD_INFO_BLOCK_SIZE.
    assert_eq!(data, [0, 0, 0, 0, 0, 1, 0, 3]);
    option_reply(
        &mut s,
        OPT_GO,
        REP_INFO,
        &info_export(EXPORT_LEN_BYTES, flags),
    )
    .await;
    if let Some((min, pref, max)) = block_sizes {
        let mut p = vec![0u8, 3];
        for v in [min, pref, max] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        option_reply(&mut s, OPT_GO, REP_INFO, &p).await;
    }
    option_reply(&mut s, OPT_GO, REP_ACK, &[]).await;
    s
}

struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    len_bytes: u32,
    payload: Vec<u8>,
}

async fn read_request(s: &mut TcpStream) -> Request {
    assert_eq!(s.read_u32().await.expect("request magic"), REQUEST_MAGIC);
    let flags = s.read_u16().await.unwrap();
    let command = s.read_u16().await.unwrap();
    let cookie = s.read_u64().await.unwrap();
    let offset = s.read_u64().await.unwrap();
    let len_bytes = s.read_u32().await.unwrap();
    let mut payload = Vec::new();
    if command == CMD_WRITE {
        payload = vec![0u8; len_bytes as usize];
        s.read_exact(&mut payload).await.unwrap();
    }
    Request {
        flags,
        command,
        cookie,
        offset,
        len_bytes,
        payload,
    }
}

async fn simple_reply(s: &mut TcpStream, errno: u32, cookie: u64, data: &[u8]) {
    s.write_u32(SIMPLE_REPLY_MAGIC).await.unwrap();
    s.write_u32(errno).await.unwrap();
    s.write_u64(cookie).await.unwrap();
    s.write_all(data).await.unwrap();
}

fn pattern(seed: u8, len_bytes: usize) -> Vec<u8> {
    (0..len_bytes)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// Asserts the client failed because the connection broke with a protocol
/// violation whose detail contains `needle`.
fn assert_protocol_violation<T: std::fmt::Debug>(result: Result<T, NbdClientError>, needle: &str) {
    match result {
        Err(NbdClientError::ConnectionLost { cause, .. }) => match &*cause {
            NbdClientError::Protocol { detail } => {
                assert!(
                    detail.contains(needle),
                    "detail {detail:?} lacks {needle:?}"
                )
            }
            other => panic!("expected a protocol violation, got cause {other:?}"),
        },
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
}

#[tokio::test]
async fn a_non_nbd_greeting_is_rejected_with_the_magic_it_saw() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
    });
    match NbdClient::connect(&addr, "").await {
        Err(NbdClientError::BadMagic { got, expected, .. }) => {
            assert_eq!(expected, NBD_MAGIC);
            assert_eq!(got, u64::from_be_bytes(*b"HTTP/1.1"));
        }
        other => panic!("expected BadMagic, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn a_server_closing_before_the_greeting_is_reported_as_such() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        drop(s);
    });
    match NbdClient::connect(&addr, "").await {
        Err(NbdClientError::ClosedDuringHandshake { stage, .. }) => {
            assert_eq!(stage, "server greeting")
        }
        other => panic!("expected ClosedDuringHandshake, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn an_oldstyle_server_is_refused_by_name() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_u64(NBD_MAGIC).await.unwrap();
        s.write_u64(0x0000_4202_8186_1253).await.unwrap();
        s.write_all(&[0u8; 8 + 4 + 124]).await.unwrap();
    });
    assert!(matches!(
        NbdClient::connect(&addr, "").await,
        Err(NbdClientError::OldstyleServer { .. })
    ));
    server.await.unwrap();
}

#[tokio::test]
async fn go_unsupported_falls_back_to_export_name_and_honours_no_zeroes() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // FIXED_NEWSTYLE | NO_ZEROES: the client must echo both.
        assert_eq!(greet(&mut s, 0b11).await, 0b11);
        let (option, _) = read_option(&mut s).await;
        assert_eq!(option, OPT_GO);
        option_reply(&mut s, OPT_GO, REP_ERR_UNSUP, b"").await;
        let (option, name) = read_option(&mut s).await;
        assert_eq!(option, OPT_EXPORT_NAME);
        assert_eq!(name, b"vol0");
        s.write_u64(EXPORT_LEN_BYTES).await.unwrap();
        s.write_u16(ALL_FLAGS).await.unwrap();
        // No 124 zero bytes: NO_ZEROES was agreed.
        let req = read_request(&mut s).await;
        assert_eq!(
            (req.command, req.offset, req.len_bytes),
            (CMD_READ, 512, 1024)
        );
        simple_reply(&mut s, 0, req.cookie, &pattern(9, 1024)).await;
        assert_eq!(read_request(&mut s).await.command, CMD_DISC);
    });
    let client = NbdClient::connect(&addr, "vol0")
        .await
        .expect("fallback connect");
    assert_eq!(client.size_bytes(), EXPORT_LEN_BYTES);
    assert_eq!(client.transmission_flags(), ALL_FLAGS);
    assert_eq!(client.block_size_preferred(), None);
    let data = client.read(512, 1024).await.expect("read");
    assert_eq!(&data[..], &pattern(9, 1024)[..]);
    client.disconnect().await.expect("disconnect");
    server.await.unwrap();
}

#[tokio::test]
async fn a_plain_newstyle_server_gets_export_name_with_its_zero_padding() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Neither FIXED_NEWSTYLE nor NO_ZEROES: the client sets no flags and
        // must not send any option but EXPORT_NAME.
        assert_eq!(greet(&mut s, 0).await, 0);
        let (option, name) = read_option(&mut s).await;
        assert_eq!(option, OPT_EXPORT_NAME);
        assert!(name.is_empty());
        s.write_u64(EXPORT_LEN_BYTES).await.unwrap();
        s.write_u16(ALL_FLAGS).await.unwrap();
        s.write_all(&[0u8; 124]).await.unwrap();
        let req = read_request(&mut s).await;
        assert_eq!(req.command, CMD_FLUSH);
        simple_reply(&mut s, 0, req.cookie, &[]).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    client.flush().await.expect("flush");
    server.await.unwrap();
}

#[tokio::test]
async fn an_export_name_refusal_after_export_name_is_explained() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        greet(&mut s, 0).await;
        let _ = read_option(&mut s).await;
        drop(s);
    });
    match NbdClient::connect(&addr, "nope").await {
        Err(NbdClientError::ExportRefused { export_name, .. }) => assert_eq!(export_name, "nope"),
        other => panic!("expected ExportRefused, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn an_option_refusal_carries_the_server_message_and_aborts_softly() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        greet(&mut s, 1).await;
        let _ = read_option(&mut s).await;
        option_reply(&mut s, OPT_GO, REP_ERR_POLICY, b"export is busy").await;
        let (option, data) = read_option(&mut s).await;
        assert_eq!((option, data.len()), (OPT_ABORT, 0));
    });
    match NbdClient::connect(&addr, "").await {
        Err(e @ NbdClientError::OptionRefused { .. }) => {
            let message = e.to_string();
            assert!(message.contains("NBD_REP_ERR_POLICY"), "{message}");
            assert!(message.contains("export is busy"), "{message}");
        }
        other => panic!("expected OptionRefused, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn an_oversized_option_reply_is_refused_before_allocation() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        greet(&mut s, 1).await;
        let _ = read_option(&mut s).await;
        s.write_u64(OPTION_REPLY_MAGIC).await.unwrap();
        s.write_u32(OPT_GO).await.unwrap();
        s.write_u32(REP_INFO).await.unwrap();
        s.write_u32(0xffff_fff0).await.unwrap();
    });
    match NbdClient::connect(&addr, "").await {
        Err(NbdClientError::Protocol { detail }) => assert!(detail.contains("limit"), "{detail}"),
        other => panic!("expected Protocol, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn go_acknowledged_without_export_info_is_a_protocol_violation() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        greet(&mut s, 1).await;
        let _ = read_option(&mut s).await;
        option_reply(&mut s, OPT_GO, REP_ACK, &[]).await;
    });
    match NbdClient::connect(&addr, "").await {
        Err(NbdClientError::Protocol { detail }) => {
            assert!(detail.contains("NBD_INFO_EXPORT"), "{detail}")
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn a_silent_server_times_out_the_handshake() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let started = std::time::Instant::now();
    match NbdClient::connect(&addr, "").await {
        Err(NbdClientError::HandshakeTimeout { timeout_ms, .. }) => {
            assert_eq!(timeout_ms, tandem::nbd::client::HANDSHAKE_TIMEOUT_MS)
        }
        other => panic!("expected HandshakeTimeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    server.abort();
}

#[tokio::test]
async fn replies_out_of_order_reach_the_right_callers() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let mut reqs = Vec::new();
        for _ in 0..32 {
            reqs.push(read_request(&mut s).await);
        }
        // All 32 are in flight at once (QD32 on one connection); answer them
        // newest first.
        for req in reqs.iter().rev() {
            let seed = (req.offset / 4096) as u8;
            simple_reply(
                &mut s,
                0,
                req.cookie,
                &pattern(seed, req.len_bytes as usize),
            )
            .await;
        }
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let len = 512 * (i as u32 + 1);
            (i, len, client.read(i * 4096, len).await)
        }));
    }
    for task in tasks {
        let (i, len, result) = task.await.unwrap();
        let data = result.unwrap_or_else(|e| panic!("read {i}: {e}"));
        assert_eq!(&data[..], &pattern(i as u8, len as usize)[..], "read {i}");
    }
    server.await.unwrap();
}

#[tokio::test]
async fn a_server_error_reply_maps_to_errno_and_the_stream_stays_in_sync() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let req = read_request(&mut s).await;
        simple_reply(&mut s, 5, req.cookie, &[]).await; // EIO, no payload
        let req = read_request(&mut s).await;
        assert_eq!(
            (req.command, req.flags),
            (CMD_WRITE, 1),
            "FUA flag on the write"
        );
        assert_eq!(req.payload, b"abc");
        simple_reply(&mut s, 0, req.cookie, &[]).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    match client.read(8192, 4096).await {
        Err(e @ NbdClientError::Server { .. }) => {
            assert!(matches!(
                e,
                NbdClientError::Server {
                    errno: 5,
                    op: "read",
                    offset: 8192,
                    message: None,
                }
            ));
            assert!(e.to_string().contains("EIO"), "{e}");
        }
        other => panic!("expected Server error, got {other:?}"),
    }
    client
        .write(0, Bytes::from_static(b"abc"), true)
        .await
        .expect("write after error");
    server.await.unwrap();
}

#[tokio::test]
async fn a_garbage_reply_breaks_the_connection_for_pending_and_later_requests() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let _ = read_request(&mut s).await;
        s.write_all(&[0xde; 16]).await.unwrap();
        // Keep the socket open: the client must not wait for EOF to fail.
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    assert_protocol_violation(client.read(0, 512).await, "reply magic 0xdededede");
    assert_protocol_violation(client.read(0, 512).await, "reply magic 0xdededede");
    server.abort();
}

#[tokio::test]
async fn a_structured_reply_is_refused_because_it_was_never_negotiated() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let req = read_request(&mut s).await;
        s.write_u32(0x668e_33ef).await.unwrap();
        s.write_u16(1).await.unwrap();
        s.write_u16(0).await.unwrap();
        s.write_u64(req.cookie).await.unwrap();
        s.write_u32(0).await.unwrap();
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    assert_protocol_violation(client.read(0, 512).await, "structured");
    server.await.unwrap();
}

#[tokio::test]
async fn a_reply_for_an_unknown_cookie_is_a_protocol_violation() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let req = read_request(&mut s).await;
        simple_reply(&mut s, 0, req.cookie ^ 0xffff, &[]).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    assert_protocol_violation(client.flush().await, "cookie");
    server.await.unwrap();
}

#[tokio::test]
async fn a_read_reply_cut_short_is_reported_not_padded() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let req = read_request(&mut s).await;
        simple_reply(&mut s, 0, req.cookie, &[1u8; 100]).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    assert_protocol_violation(client.read(0, 4096).await, "middle of a 4096-byte read");
    server.await.unwrap();
}

#[tokio::test]
async fn a_server_closing_in_transmission_fails_requests_with_server_closed() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let _ = read_request(&mut s).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    match client.read(0, 512).await {
        Err(NbdClientError::ConnectionLost { cause, .. }) => {
            assert!(matches!(*cause, NbdClientError::ServerClosed), "{cause:?}")
        }
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn a_cancelled_read_still_consumes_its_reply() {
    let (listener, addr) = listen().await;
    let (got_request_tx, got_request_rx) = tokio::sync::oneshot::channel();
    let (reply_now_tx, reply_now_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let mut s = accept_go(&listener, ALL_FLAGS, None).await;
        let first = read_request(&mut s).await;
        got_request_tx.send(()).unwrap();
        reply_now_rx.await.unwrap();
        simple_reply(&mut s, 0, first.cookie, &pattern(1, 4096)).await;
        let second = read_request(&mut s).await;
        simple_reply(&mut s, 0, second.cookie, &pattern(2, 512)).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    let cancelled = {
        let client = client.clone();
        tokio::spawn(async move { client.read(0, 4096).await })
    };
    got_request_rx.await.unwrap();
    cancelled.abort();
    assert!(cancelled.await.unwrap_err().is_cancelled());
    reply_now_tx.send(()).unwrap();
    let data = client
        .read(4096, 512)
        .await
        .expect("read after a cancelled read");
    assert_eq!(&data[..], &pattern(2, 512)[..]);
    server.await.unwrap();
}

#[tokio::test]
async fn requests_the_server_did_not_advertise_are_refused_locally() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut s = accept_go(
            &listener,
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY,
            Some((512, 4096, 65_536)),
        )
        .await;
        // The only request that reaches the wire is the valid read.
        let req = read_request(&mut s).await;
        assert_eq!(
            (req.command, req.offset, req.len_bytes),
            (CMD_READ, 1024, 512)
        );
        simple_reply(&mut s, 0, req.cookie, &[0u8; 512]).await;
    });
    let client = NbdClient::connect(&addr, "").await.expect("connect");
    assert_eq!(client.block_size_preferred(), Some(4096));
    assert!(matches!(
        client.write(0, Bytes::from_static(&[0; 512]), false).await,
        Err(NbdClientError::ReadOnly { op: "write" })
    ));
    assert!(matches!(
        client.trim(0, 512).await,
        Err(NbdClientError::ReadOnly { op: "trim" })
    ));
    assert!(matches!(
        client.flush().await,
        Err(NbdClientError::Unsupported { op: "flush", .. })
    ));
    assert_eq!(client.transmission_flags() & NBD_FLAG_SEND_FLUSH, 0);
    for (offset, len) in [(100, 512), (0, 100), (0, 0), (0, 131_072)] {
        assert!(
            matches!(
                client.read(offset, len).await,
                Err(NbdClientError::InvalidRequest { .. })
            ),
            "read({offset}, {len}) should be refused locally"
        );
    }
    client.read(1024, 512).await.expect("valid read");
    server.await.unwrap();
}
