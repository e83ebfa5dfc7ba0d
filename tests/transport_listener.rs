//! The replication listener under hostile connections (issue 14): handshakes
//! run concurrently within a deadline, stalled or junk connections never delay
//! a real peer, a flood evicts the oldest unauthenticated handshake, refusals
//! are counted instead of returned; and the TLS handshake runs over any byte
//! stream (an in-memory pipe here).
//!
//! In-process, over loopback. The same figures with real agents as separate
//! processes are measured in tests/transport_e2e_hostile.rs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tandem::metrics::rejections::{RejectClass, Rejections};
use tandem::transport::{
    ListenerLimits, PeerListener, PeerStream, Security, TlsClient, TlsFiles, TlsServer,
    TransportError, connect, generate_certs,
};
use tandem::wire::{Frame, Message, Payload, encode_frame, read_frame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TIMEOUT_MS: u64 = 5_000;

fn files(dir: &Path, node: &str, peer: &str) -> TlsFiles {
    TlsFiles {
        dir: dir.to_path_buf(),
        node_name: node.to_string(),
        peer_name: peer.to_string(),
    }
}

fn tls(dir: &Path, node: &str, peer: &str) -> Security {
    Security::Tls(files(dir, node, peer))
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn heartbeat(nonce: u64) -> Frame {
    Frame {
        seq: 0,
        msg: Message::Heartbeat { nonce },
        payload: Payload::empty(),
    }
}

async fn send<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut PeerStream<S>,
    frame: &Frame,
) {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    stream.write_all(&buf).await.unwrap();
    stream.flush().await.unwrap();
}

/// A counter set of the test's own (the process-wide one is shared by the
/// tests of this binary when they run in one process).
fn own_rejections() -> &'static Rejections {
    Box::leak(Box::new(Rejections::new(tandem::ratelog::global())))
}

/// Connections that send one byte of a TLS record and then nothing.
async fn stalled(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&[0x16]).await.unwrap();
        conns.push(c);
    }
    conns
}

/// Dial `listener` as a good peer and accept it; returns how long it took.
async fn good_peer_gets_in(listener: &PeerListener, certs: &Path) -> Duration {
    let security = tls(certs, "beta", "alpha");
    let started = Instant::now();
    let (server, client) = tokio::join!(
        listener.accept(),
        connect(listener.local_addr(), &security, TIMEOUT_MS)
    );
    let elapsed = started.elapsed();
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    send(&mut client, &heartbeat(7)).await;
    let f = read_frame(&mut server, &mut BytesMut::new()).await.unwrap();
    assert_eq!(f.msg, Message::Heartbeat { nonce: 7 });
    elapsed
}

#[tokio::test]
async fn ten_stalled_connections_do_not_delay_a_real_peer() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta"]).unwrap();
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap()
        .with_rejections(own_rejections());
    let _junk = stalled(listener.local_addr(), 10).await;
    // Let the listener pick them all up (it accepts while `accept` is polled).
    let accept_a_bit = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(accept_a_bit.is_err(), "no junk connection is returned");
    assert_eq!(listener.handshakes_in_progress().await, 10);
    let delay = good_peer_gets_in(&listener, certs.path()).await;
    println!("a real peer got in after {delay:?} with 10 stalled handshakes in progress");
    // Sequential handshakes made it wait 10 x the deadline (issue 14: 20 s for two).
    assert!(delay < Duration::from_secs(1), "{delay:?}");
}

#[tokio::test]
async fn a_flood_from_one_address_evicts_its_oldest_handshake_and_the_peer_gets_in() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta"]).unwrap();
    let limits = ListenerLimits {
        handshake_timeout_ms: 60_000,
        in_progress_max: 8,
        per_source_max: 4,
    };
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap()
        .with_limits(limits)
        .with_rejections(own_rejections());
    let _junk = stalled(listener.local_addr(), 20).await;
    // 20 stalled connections from one address: 16 of them evicted, oldest first.
    let mut evicted = 0;
    while evicted < 16 {
        match tokio::time::timeout(Duration::from_secs(10), listener.accept_or_refuse())
            .await
            .expect("evictions come at once")
        {
            Err(TransportError::Evicted {
                from_source,
                in_progress,
                ..
            }) => {
                assert_eq!(from_source, 4);
                assert_eq!(in_progress, 4);
                evicted += 1;
            }
            other => panic!("expected an eviction, got {other:?}"),
        }
    }
    assert_eq!(listener.handshakes_in_progress().await, 4);
    // The real peer (same address, newest) still gets a slot, at once.
    let delay = good_peer_gets_in(&listener, certs.path()).await;
    assert!(delay < Duration::from_secs(1), "{delay:?}");
    let text = TransportError::Evicted {
        addr: loopback(),
        age_ms: 5,
        in_progress: 4,
        from_source: 4,
        source_ip: loopback().ip(),
    }
    .to_string();
    assert!(text.contains("to make room"), "{text}");
}

#[tokio::test]
async fn refusals_are_counted_not_returned_by_accept() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta", "gamma"]).unwrap();
    let rejections = own_rejections();
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap()
        .with_handshake_timeout_ms(300)
        .with_rejections(rejections);
    let addr = listener.local_addr();
    // Plaintext junk, TLS-looking junk, a half handshake that times out, a
    // closed connection and a node with the wrong name, then the good peer.
    let junk = async {
        let mut a = TcpStream::connect(addr).await.unwrap();
        a.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        b.write_all(&[0x16, 3, 1, 0, 4, 0xde, 0xad, 0xbe, 0xef])
            .await
            .unwrap();
        let _ = b.shutdown().await;
        let c = stalled(addr, 1).await;
        drop(TcpStream::connect(addr).await.unwrap());
        let gamma = tls(certs.path(), "gamma", "alpha");
        let wrong = connect(addr, &gamma, TIMEOUT_MS).await;
        if let Ok(mut w) = wrong {
            // TLS 1.3: the refusal arrives on the first read.
            let _ = read_frame(&mut w, &mut BytesMut::new()).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        (a, c)
    };
    let (_junk, delay) = tokio::join!(junk, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        good_peer_gets_in(&listener, certs.path()).await
    });
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    // Let the stalled one time out: accept drives the handshakes.
    let _ = tokio::time::timeout(Duration::from_millis(800), listener.accept()).await;
    let counts = rejections.counts();
    println!("{counts:?}");
    assert_eq!(counts.handshakes, 5, "{counts:?}");
    assert_eq!(rejections.get(RejectClass::Connection), 0);
    for key in [
        "transport.plaintext-peer",
        "transport.handshake-timeout",
        "transport.handshake-closed",
        "transport.peer-name",
    ] {
        assert!(counts.reasons.contains_key(key), "{key}: {counts:?}");
    }
}

#[tokio::test]
async fn plaintext_junk_is_refused_before_an_agent_sees_it() {
    let listener = PeerListener::bind(loopback(), &Security::DangerPlaintext)
        .await
        .unwrap()
        .with_handshake_timeout_ms(300)
        .with_rejections(own_rejections());
    let addr = listener.local_addr();
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"hello\n").await.unwrap();
    let err = listener.accept_or_refuse().await.unwrap_err();
    assert!(matches!(err, TransportError::NotTandem { .. }), "{err}");
    // Half the magic, then silence: timed out.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"TN").await.unwrap();
    let err = listener.accept_or_refuse().await.unwrap_err();
    assert!(
        matches!(err, TransportError::HandshakeTimeout { .. }),
        "{err}"
    );
    // A tandem node (it sends a frame first) gets in.
    let (server, client) = tokio::join!(listener.accept(), async {
        let mut c = connect(addr, &Security::DangerPlaintext, TIMEOUT_MS)
            .await
            .unwrap();
        send(&mut c, &heartbeat(3)).await;
        c
    });
    let mut server = server.unwrap();
    let f = read_frame(&mut server, &mut BytesMut::new()).await.unwrap();
    assert_eq!(f.msg, Message::Heartbeat { nonce: 3 });
    drop(client);
}

#[tokio::test]
async fn dropping_the_listener_frees_the_port_and_its_handshakes_at_once() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta"]).unwrap();
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap()
        .with_rejections(own_rejections());
    let addr = listener.local_addr();
    let mut junk = stalled(addr, 3).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert_eq!(listener.handshakes_in_progress().await, 3);
    drop(listener);
    // A role change binds the same address again right away.
    let again = PeerListener::bind(addr, &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap();
    // The aborted handshakes closed their sockets.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut buf = [0u8; 1];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(Duration::from_secs(2), junk[0].read(&mut buf))
        .await
        .expect("closed, not hanging")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(again);
}

#[tokio::test]
async fn tls_runs_over_an_in_memory_pipe_with_the_same_checks() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta", "gamma"]).unwrap();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let server = TlsServer::load(&files(certs.path(), "alpha", "beta")).unwrap();
    let client = TlsClient::load(&files(certs.path(), "beta", "alpha")).unwrap();

    let (a, b) = tokio::io::duplex(64 << 10);
    let (s, c) = tokio::join!(server.accept(a, addr), client.connect(b, addr));
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    assert!(s.is_tls() && c.is_tls());
    send(&mut c, &heartbeat(11)).await;
    let f = read_frame(&mut s, &mut BytesMut::new()).await.unwrap();
    assert_eq!(f.msg, Message::Heartbeat { nonce: 11 });
    // Halves for two tasks, as the agents use them.
    let (mut rd, mut wr) = s.into_split();
    let mut buf = BytesMut::new();
    encode_frame(&heartbeat(12), &mut buf);
    wr.write_all(&buf).await.unwrap();
    wr.flush().await.unwrap();
    let f = read_frame(&mut c, &mut BytesMut::new()).await.unwrap();
    assert_eq!(f.msg, Message::Heartbeat { nonce: 12 });
    send(&mut c, &heartbeat(13)).await;
    let f = read_frame(&mut rd, &mut BytesMut::new()).await.unwrap();
    assert_eq!(f.msg, Message::Heartbeat { nonce: 13 });

    // gamma is refused by alpha (which expects beta) over the pipe too.
    let gamma = TlsClient::load(&files(certs.path(), "gamma", "alpha")).unwrap();
    let (a, b) = tokio::io::duplex(64 << 10);
    let (s, c) = tokio::join!(server.accept(a, addr), async {
        let mut c = gamma.connect(b, addr).await?;
        // TLS 1.3: the client learns of the refusal at its first read.
        read_frame(&mut c, &mut BytesMut::new())
            .await
            .map_err(|e| TransportError::Handshake {
                addr,
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok::<_, TransportError>(())
    });
    assert!(
        matches!(s, Err(TransportError::PeerName { .. })),
        "{:?}",
        s.err()
    );
    assert!(c.is_err());

    // And the plaintext form over a pipe.
    let (a, b) = tokio::io::duplex(1024);
    let (mut pa, mut pb) = (PeerStream::plain(a, addr), PeerStream::plain(b, addr));
    assert!(!pa.is_tls());
    send(&mut pa, &heartbeat(14)).await;
    let f = read_frame(&mut pb, &mut BytesMut::new()).await.unwrap();
    assert_eq!(f.msg, Message::Heartbeat { nonce: 14 });
}
