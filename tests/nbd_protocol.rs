//! The NBD server against a hand-driven raw TCP client: malformed handshakes and
//! requests, out-of-range and oversized requests, read-only exports, concurrent
//! requests in one connection, and graceful shutdown. Every refused request is
//! checked to have never reached the backend.

mod nbd_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use nbd_support::{MemBackend, export, start, wait_for_connections};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_FUA: u16 = 1;
const FLAG_DF: u16 = 1 << 2;
const FLAG_FAST_ZERO: u16 = 1 << 4;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const ENOTSUP: u32 = 95;

const SIZE: u64 = 1 << 20;

struct Client {
    s: TcpStream,
}

impl Client {
    /// Connect and read the greeting; send client flags.
    async fn hello(port: u16, client_flags: u32) -> Client {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(
            s.read_u16().await.unwrap(),
            0b11,
            "FIXED_NEWSTYLE | NO_ZEROES"
        );
        s.write_u32(client_flags).await.unwrap();
        Client { s }
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).await.unwrap();
    }

    async fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        assert_eq!(self.s.read_u32().await.unwrap(), option);
        let ty = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap() as usize;
        let mut data = vec![0; len];
        self.s.read_exact(&mut data).await.unwrap();
        (ty, data)
    }

    /// NBD_OPT_GO; returns the transmission flags.
    async fn go(&mut self, name: &str) -> u16 {
        self.option(OPT_GO, &info_payload(name)).await;
        let mut flags = None;
        loop {
            let (ty, data) = self.option_reply(OPT_GO).await;
            match ty {
                REP_INFO if data[..2] == [0, 0] => {
                    assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), SIZE);
                    flags = Some(u16::from_be_bytes([data[10], data[11]]));
                }
                REP_INFO => {}
                REP_ACK => return flags.expect("no NBD_INFO_EXPORT before ACK"),
                other => panic!(
                    "GO failed with reply {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    async fn connect(port: u16, name: &str) -> (Client, u16) {
        let mut c = Client::hello(port, 0b11).await;
        let flags = c.go(name).await;
        (c, flags)
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).await.unwrap();
    }

    /// Read a simple reply header: (error, cookie).
    async fn reply(&mut self) -> (u32, u64) {
        let magic = tokio::time::timeout(Duration::from_secs(10), self.s.read_u32())
            .await
            .expect("no reply within 10 s")
            .unwrap();
        assert_eq!(magic, SIMPLE_REPLY_MAGIC);
        let errno = self.s.read_u32().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        (errno, cookie)
    }

    async fn expect(&mut self, cookie: u64, errno: u32) {
        assert_eq!(
            self.reply().await,
            (errno, cookie),
            "reply to request {cookie}"
        );
    }

    /// The server closed the connection (EOF, or reset) without sending more.
    async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b))
            .await
            .expect("server did not close the connection within 10 s");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "expected close, got {r:?} {b:?}"
        );
    }
}

fn info_payload(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_out_of_range_requests_get_errors_and_never_reach_the_backend() {
    let backend = MemBackend::new(SIZE as usize);
    let mut exp = export("vol0", false);
    exp.max_request_bytes = 64 * 1024;
    let srv = start(backend.clone(), exp, "127.0.0.1:0").await;
    let (mut c, flags) = Client::connect(srv.tcp_port(), "vol0").await;
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN,
    // SEND_CACHE, SEND_FAST_ZERO; not READ_ONLY, not SEND_DF (simple replies).
    assert_eq!(
        flags,
        1 | 1 << 2 | 1 << 3 | 1 << 5 | 1 << 6 | 1 << 8 | 1 << 10 | 1 << 11
    );

    let block = vec![0x99u8; 512];
    let big = vec![0x99u8; 128 * 1024];
    // (command, flags, offset, length, payload, expected error)
    type Case<'a> = (u16, u16, u64, u32, &'a [u8], u32);
    let cases: Vec<Case> = vec![
        (CMD_READ, 0, SIZE, 512, &[], EINVAL),
        (CMD_READ, 0, SIZE - 256, 512, &[], EINVAL),
        (CMD_READ, 0, u64::MAX - 100, 512, &[], EINVAL),
        (CMD_READ, 0, 0, 0, &[], EINVAL),
        (CMD_READ, 0, 0, 128 * 1024, &[], EOVERFLOW),
        (CMD_WRITE, 0, SIZE - 256, 512, &block, ENOSPC),
        (CMD_WRITE, 0, u64::MAX - 100, 512, &block, ENOSPC),
        (CMD_WRITE, 0, 0, 128 * 1024, &big, EINVAL),
        (CMD_WRITE, 1 << 9, 0, 512, &block, EINVAL),
        (CMD_WRITE, 0, 0, 0, &[], EINVAL),
        (99, 0, 0, 512, &[], EINVAL),
        (CMD_FLUSH, 0, 0, 512, &[], EINVAL),
        (CMD_TRIM, 0, SIZE, 1, &[], EINVAL),
        (CMD_TRIM, 0, 0, 0, &[], EINVAL),
        // This backend does not zero fast: refused at once, nothing changed.
        (CMD_WRITE_ZEROES, FLAG_FAST_ZERO, 0, 512, &[], ENOTSUP),
        (CMD_WRITE_ZEROES, 1 << 9, 0, 512, &[], EINVAL),
        (CMD_WRITE_ZEROES, 0, SIZE - 1, 2, &[], ENOSPC),
        (CMD_CACHE, 0, SIZE - 1, 2, &[], EINVAL),
        (CMD_CACHE, FLAG_DF, 0, 512, &[], EINVAL),
        // DF needs structured replies; block status needs a metadata context.
        (CMD_READ, FLAG_DF, 0, 512, &[], EINVAL),
        (CMD_BLOCK_STATUS, 0, 0, 512, &[], EINVAL),
    ];
    for (i, (kind, fl, off, len, payload, errno)) in cases.iter().enumerate() {
        c.request(*kind, *fl, i as u64, *off, *len, payload).await;
        c.expect(i as u64, *errno).await;
    }
    assert_eq!(
        backend.mutations(),
        0,
        "a refused request reached the backend"
    );
    assert!(backend.snapshot().iter().all(|b| *b == 0));

    // The stream is still in sync: a valid write, FUA write and read work.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    c.request(CMD_WRITE, 0, 100, 4096 + 3, 4096, &data).await;
    c.expect(100, 0).await;
    c.request(CMD_WRITE, FLAG_FUA, 101, SIZE - 512, 512, &block)
        .await;
    c.expect(101, 0).await;
    c.request(CMD_READ, 0, 102, 4096 + 3, 4096, &[]).await;
    c.expect(102, 0).await;
    let mut back = vec![0u8; 4096];
    c.s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    c.request(CMD_FLUSH, 0, 103, 0, 0, &[]).await;
    c.expect(103, 0).await;
    assert_eq!(backend.mutations(), 2);
    assert_eq!(backend.flushes.load(Ordering::SeqCst), 1);

    c.request(CMD_DISC, 0, 104, 0, 0, &[]).await;
    c.expect_closed().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_write_length_and_bad_magic_close_the_connection() {
    let backend = MemBackend::new(SIZE as usize);
    let srv = start(backend.clone(), export("vol0", false), "127.0.0.1:0").await;

    let (mut c, _) = Client::connect(srv.tcp_port(), "vol0").await;
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX, &[0; 4096]).await;
    c.expect_closed().await;

    let (mut c, _) = Client::connect(srv.tcp_port(), "vol0").await;
    c.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).await.unwrap();
    c.s.write_all(&[0u8; 24]).await.unwrap();
    c.expect_closed().await;

    // Garbage instead of an option.
    let mut c = Client::hello(srv.tcp_port(), 0b11).await;
    c.s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    c.expect_closed().await;

    // Unknown client flags.
    let mut c = Client::hello(srv.tcp_port(), 1 << 7).await;
    c.expect_closed().await;

    assert_eq!(backend.mutations(), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    let backend = MemBackend::new(SIZE as usize);
    backend.data.lock().unwrap()[..512].fill(0x3c);
    let srv = start(backend.clone(), export("ro", true), "127.0.0.1:0").await;
    let (mut c, flags) = Client::connect(srv.tcp_port(), "ro").await;
    assert_ne!(flags & (1 << 1), 0, "READ_ONLY flag not advertised");

    c.request(CMD_WRITE, 0, 1, 0, 512, &[0u8; 512]).await;
    c.expect(1, EPERM).await;
    c.request(CMD_TRIM, 0, 2, 0, 512, &[]).await;
    c.expect(2, EPERM).await;
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 512, &[]).await;
    c.expect(3, EPERM).await;
    c.request(CMD_READ, 0, 4, 0, 512, &[]).await;
    c.expect(4, 0).await;
    let mut back = [0u8; 512];
    c.s.read_exact(&mut back).await.unwrap();
    assert!(back.iter().all(|b| *b == 0x3c));
    assert_eq!(backend.mutations(), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling_errors_then_export_name_without_no_zeroes() {
    let srv = start(
        MemBackend::new(SIZE as usize),
        export("vol0", false),
        "127.0.0.1:0",
    )
    .await;
    // Client flags: FIXED_NEWSTYLE only, so EXPORT_NAME's reply carries 124 zero bytes.
    let mut c = Client::hello(srv.tcp_port(), 0b01).await;

    // Structured replies take no data; without TLS configured STARTTLS is refused
    // by policy; metadata contexts need structured replies first.
    c.option(OPT_STRUCTURED_REPLY, &[1]).await;
    assert_eq!(
        c.option_reply(OPT_STRUCTURED_REPLY).await.0,
        REP_ERR_INVALID
    );
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply(OPT_STARTTLS).await.0, REP_ERR_POLICY);
    c.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0])
        .await;
    assert_eq!(
        c.option_reply(OPT_SET_META_CONTEXT).await.0,
        REP_ERR_INVALID
    );
    c.option(0x4242, b"whatever").await;
    assert_eq!(c.option_reply(0x4242).await.0, REP_ERR_UNSUP);
    c.option(OPT_INFO, &vec![0u8; 100 * 1024]).await;
    assert_eq!(c.option_reply(OPT_INFO).await.0, REP_ERR_TOO_BIG);
    c.option(OPT_INFO, &[0, 0, 0, 200, b'x']).await;
    assert_eq!(c.option_reply(OPT_INFO).await.0, REP_ERR_INVALID);
    c.option(OPT_INFO, &info_payload("nope")).await;
    let (ty, msg) = c.option_reply(OPT_INFO).await;
    assert_eq!(ty, REP_ERR_UNKNOWN);
    assert!(String::from_utf8(msg).unwrap().contains("vol0"));
    c.option(OPT_LIST, &[]).await;
    let (ty, server) = c.option_reply(OPT_LIST).await;
    assert_eq!(ty, REP_SERVER);
    assert_eq!(&server[..8], b"\0\0\0\x04vol0");
    assert_eq!(c.option_reply(OPT_LIST).await.0, REP_ACK);

    c.option(OPT_EXPORT_NAME, b"vol0").await;
    let mut reply = [0u8; 134];
    c.s.read_exact(&mut reply).await.unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
    assert!(reply[10..].iter().all(|b| *b == 0));
    c.request(CMD_READ, 0, 9, 0, 16, &[]).await;
    c.expect(9, 0).await;

    // EXPORT_NAME of an unknown export cannot be answered: the server closes.
    let mut c = Client::hello(srv.tcp_port(), 0b11).await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_in_flight_writes_and_reads_no_new_requests() {
    // Every write takes 300 ms, so the three below are in flight together.
    let backend = MemBackend::with_delay(SIZE as usize, 300);
    let srv = start(backend.clone(), export("vol0", false), "127.0.0.1:0").await;
    let (mut c, _) = Client::connect(srv.tcp_port(), "vol0").await;
    let (mut idle, _) = Client::connect(srv.tcp_port(), "vol0").await;
    wait_for_connections(&srv.server, 2).await;

    for i in 0..3u64 {
        c.request(CMD_WRITE, 0, i, i * 4096, 4096, &[i as u8 + 1; 4096])
            .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while backend.mutations() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes were not dispatched concurrently"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // All three started before any finished: requests run concurrently.
    assert_eq!(backend.writes_completed.load(Ordering::SeqCst), 0);

    srv.shutdown.cancel();
    // Sent after the shutdown began: must not be executed.
    c.request(CMD_WRITE, 0, 3, 3 * 4096, 4096, &[4; 4096]).await;

    let mut cookies = Vec::new();
    for _ in 0..3 {
        let (errno, cookie) = c.reply().await;
        assert_eq!(errno, 0);
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, vec![0, 1, 2]);
    c.expect_closed().await;
    idle.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(10), srv.task)
        .await
        .expect("serve did not return after shutdown")
        .unwrap();
    assert_eq!(srv.server.connections(), 0);
    assert_eq!(
        backend.mutations(),
        3,
        "a request sent after shutdown was executed"
    );
    let data = backend.snapshot();
    for i in 0..3usize {
        assert!(
            data[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|b| *b == i as u8 + 1)
        );
    }
    assert!(data[3 * 4096..].iter().all(|b| *b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_requests_on_one_connection_all_get_replies() {
    let backend = MemBackend::new(SIZE as usize);
    let srv = start(backend.clone(), export("vol0", false), "127.0.0.1:0").await;
    let (c, _) = Client::connect(srv.tcp_port(), "vol0").await;
    let (mut rd, mut wr) = c.s.into_split();
    // 1000 writes of 1 KiB each, far more than the in-flight window, sent without
    // waiting for replies; the reader task below consumes the replies meanwhile.
    let n = 1000u64;
    let reader = tokio::spawn(async move {
        let mut seen = vec![false; n as usize];
        for _ in 0..n {
            assert_eq!(rd.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
            assert_eq!(rd.read_u32().await.unwrap(), 0);
            let cookie = rd.read_u64().await.unwrap() as usize;
            assert!(!seen[cookie], "duplicate reply for {cookie}");
            seen[cookie] = true;
        }
        rd
    });
    for i in 0..n {
        let mut m = Vec::new();
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&i.to_be_bytes());
        m.extend_from_slice(&(i * 1024).to_be_bytes());
        m.extend_from_slice(&1024u32.to_be_bytes());
        m.extend_from_slice(&[(i % 251) as u8; 1024]);
        wr.write_all(&m).await.unwrap();
    }
    let _rd = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("replies did not arrive")
        .unwrap();
    let data = backend.snapshot();
    for i in 0..n as usize {
        assert!(
            data[i * 1024..(i + 1) * 1024]
                .iter()
                .all(|b| *b == (i % 251) as u8)
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_forever_for_a_client_that_stops_reading() {
    let backend = MemBackend::new(SIZE as usize);
    let srv = start(backend.clone(), export("vol0", false), "127.0.0.1:0").await;
    let (c, _) = Client::connect(srv.tcp_port(), "vol0").await;
    let (_rd, mut wr) = c.s.into_split();
    // 200 reads of 1 MiB whose replies are never read: socket buffers fill, the
    // writer blocks, the in-flight window fills, the reader stops reading.
    let sender = tokio::spawn(async move {
        for i in 0..200u64 {
            let mut m = Vec::new();
            m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&CMD_READ.to_be_bytes());
            m.extend_from_slice(&i.to_be_bytes());
            m.extend_from_slice(&0u64.to_be_bytes());
            m.extend_from_slice(&(SIZE as u32).to_be_bytes());
            if wr.write_all(&m).await.is_err() {
                break;
            }
        }
        wr
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = tokio::time::Instant::now();
    srv.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), srv.task)
        .await
        .expect("serve hung on a client that does not read its replies")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(4_000),
        "gave up too early"
    );
    drop(sender);
}
