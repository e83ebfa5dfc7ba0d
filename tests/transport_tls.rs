//! Mutual TLS over loopback: frames round-trip between two nodes of one
//! `tandem certs` run, and every wrong peer (foreign CA, wrong name,
//! plaintext) is refused with an error that names the problem, while the
//! listener keeps serving good peers.

use std::net::SocketAddr;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use tandem::transport::{
    PeerListener, PeerStream, Security, Side, TlsFiles, TransportError, connect, generate_certs,
};
use tandem::wire::{Frame, Message, Payload, WireError, encode_frame, read_frame};
use tokio::io::AsyncWriteExt;

const TIMEOUT_MS: u64 = 5_000;

fn tls(dir: &Path, node: &str, peer: &str) -> Security {
    Security::Tls(TlsFiles {
        dir: dir.to_path_buf(),
        node_name: node.to_string(),
        peer_name: peer.to_string(),
    })
}

/// `connect` owning its `Security`, so it can sit inside `tokio::join!`.
async fn dial(addr: SocketAddr, security: Security) -> Result<PeerStream, TransportError> {
    connect(addr, &security, TIMEOUT_MS).await
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn send(stream: &mut PeerStream, frame: &Frame) {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    stream.write_all(&buf).await.unwrap();
    stream.flush().await.unwrap();
}

fn heartbeat(nonce: u64) -> Frame {
    Frame {
        seq: 0,
        msg: Message::Heartbeat { nonce },
        payload: Payload::empty(),
    }
}

/// A good client for `listener` (alpha expects beta) must still get through.
async fn assert_good_peer_accepted(listener: &PeerListener, dir: &Path) {
    let (server, client) = tokio::join!(
        listener.accept(),
        dial(listener.local_addr(), tls(dir, "beta", "alpha"))
    );
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    send(&mut client, &heartbeat(77)).await;
    let f = read_frame(&mut server, &mut BytesMut::new()).await.unwrap();
    assert_eq!(f.msg, Message::Heartbeat { nonce: 77 });
}

#[tokio::test]
async fn mutual_tls_round_trips_frames_both_ways() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta"]).unwrap();
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap();
    let (server, client) = tokio::join!(
        listener.accept(),
        dial(listener.local_addr(), tls(certs.path(), "beta", "alpha"))
    );
    let (server, client) = (server.unwrap(), client.unwrap());
    assert!(server.is_tls() && client.is_tls());
    assert_eq!(client.peer_addr(), listener.local_addr());

    let (mut server_rx, mut server_tx) = server.into_split();
    let (mut client_rx, mut client_tx) = client.into_split();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 4096) as u8).collect();
    let writes: Vec<Frame> = (1..=8u64)
        .map(|seq| Frame {
            seq,
            msg: Message::Write {
                offset: seq * (1 << 20),
                fua: seq == 8,
                at_ms: 0,
            },
            payload: Payload::prepare(Bytes::from(data.clone()), if seq % 2 == 0 { 3 } else { 0 }),
        })
        .collect();

    let sender = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        for f in &writes {
            buf.clear();
            encode_frame(f, &mut buf);
            client_tx.write_all(&buf).await.unwrap();
        }
        client_tx.flush().await.unwrap();
        client_tx
    });
    let mut scratch = BytesMut::new();
    for seq in 1..=8u64 {
        let f = read_frame(&mut server_rx, &mut scratch).await.unwrap();
        assert_eq!(f.seq, seq);
        assert_eq!(f.payload.is_compressed(), seq % 2 == 0);
        assert_eq!(f.payload.open().unwrap(), data);
        let mut buf = BytesMut::new();
        encode_frame(
            &Frame {
                seq: 0,
                msg: Message::Applied { seq },
                payload: Payload::empty(),
            },
            &mut buf,
        );
        server_tx.write_all(&buf).await.unwrap();
    }
    server_tx.shutdown().await.unwrap();
    for seq in 1..=8u64 {
        let f = read_frame(&mut client_rx, &mut scratch).await.unwrap();
        assert_eq!(f.msg, Message::Applied { seq });
    }
    // The server closed its side cleanly after the last frame.
    assert!(matches!(
        read_frame(&mut client_rx, &mut scratch).await,
        Err(WireError::Closed)
    ));
    sender.await.unwrap();
}

#[tokio::test]
async fn foreign_ca_is_refused_in_both_directions() {
    let ours = tempfile::tempdir().unwrap();
    let foreign = tempfile::tempdir().unwrap();
    generate_certs(ours.path(), &["alpha", "beta"]).unwrap();
    generate_certs(foreign.path(), &["alpha", "beta"]).unwrap();
    let listener = PeerListener::bind(loopback(), &tls(ours.path(), "alpha", "beta"))
        .await
        .unwrap();

    // A client of another cluster: it rejects our server certificate, and
    // our listener sees the refusal.
    let (server, client) = tokio::join!(
        listener.accept_or_refuse(),
        dial(listener.local_addr(), tls(foreign.path(), "beta", "alpha"))
    );
    let client_err = client.unwrap_err();
    assert!(
        matches!(
            client_err,
            TransportError::UnknownCa {
                side: Side::Server,
                ..
            }
        ),
        "{client_err}"
    );
    assert!(client_err.to_string().contains("not signed by our CA"));
    assert!(server.is_err());

    // A client that trusts our CA but holds a certificate of another CA: our
    // listener rejects its certificate.
    let mixed = tempfile::tempdir().unwrap();
    std::fs::copy(ours.path().join("ca.pem"), mixed.path().join("ca.pem")).unwrap();
    for f in ["beta.pem", "beta.key"] {
        std::fs::copy(foreign.path().join(f), mixed.path().join(f)).unwrap();
    }
    let (server, client) = tokio::join!(
        listener.accept_or_refuse(),
        dial(listener.local_addr(), tls(mixed.path(), "beta", "alpha"))
    );
    let server_err = server.unwrap_err();
    assert!(
        matches!(
            server_err,
            TransportError::UnknownCa {
                side: Side::Client,
                ..
            }
        ),
        "{server_err}"
    );
    // In TLS 1.3 the client finishes its half of the handshake before the
    // server judges its certificate: the refusal reaches it on first read.
    if let Ok(mut stream) = client {
        let err = read_frame(&mut stream, &mut BytesMut::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("frame header"), "{err}");
    }

    // And a server of another cluster is refused by our client.
    let foreign_listener = PeerListener::bind(loopback(), &tls(foreign.path(), "alpha", "beta"))
        .await
        .unwrap();
    let (server, client) = tokio::join!(
        foreign_listener.accept_or_refuse(),
        dial(
            foreign_listener.local_addr(),
            tls(ours.path(), "beta", "alpha")
        )
    );
    assert!(matches!(
        client.unwrap_err(),
        TransportError::UnknownCa {
            side: Side::Server,
            ..
        }
    ));
    assert!(server.is_err());

    assert_good_peer_accepted(&listener, ours.path()).await;
}

#[tokio::test]
async fn wrong_peer_name_is_refused_on_both_sides() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta", "gamma"]).unwrap();
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap();

    // gamma holds a valid certificate of the same CA, but alpha expects beta.
    let (server, client) = tokio::join!(
        listener.accept_or_refuse(),
        dial(listener.local_addr(), tls(certs.path(), "gamma", "alpha"))
    );
    match server.unwrap_err() {
        TransportError::PeerName {
            expected, found, ..
        } => {
            assert_eq!(expected, "beta");
            assert!(found.iter().any(|n| n == "gamma"), "{found:?}");
        }
        other => panic!("expected PeerName, got {other}"),
    }
    // The refusal happened inside the handshake, so gamma is told why (a
    // BadCertificate alert), at the latest on its first read.
    let client_err = match client {
        Err(e) => e.to_string(),
        Ok(mut stream) => {
            let err = read_frame(&mut stream, &mut BytesMut::new())
                .await
                .unwrap_err();
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        }
    };
    assert!(client_err.contains("BadCertificate"), "{client_err}");

    // beta dials expecting gamma but reaches alpha.
    let (server, client) = tokio::join!(
        listener.accept_or_refuse(),
        dial(listener.local_addr(), tls(certs.path(), "beta", "gamma"))
    );
    let err = client.unwrap_err();
    match &err {
        TransportError::PeerName {
            expected, found, ..
        } => {
            assert_eq!(expected, "gamma");
            assert!(found.iter().any(|n| n == "alpha"), "{found:?}");
        }
        other => panic!("expected PeerName, got {other}"),
    }
    assert!(err.to_string().contains("expected \"gamma\""), "{err}");
    assert!(server.is_err());

    assert_good_peer_accepted(&listener, certs.path()).await;
}

#[tokio::test]
async fn plaintext_client_is_refused_and_listener_keeps_accepting() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta"]).unwrap();
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap();
    let addr = listener.local_addr();
    let (server, client) = tokio::join!(listener.accept_or_refuse(), async {
        let mut s = connect(addr, &Security::DangerPlaintext, TIMEOUT_MS)
            .await
            .unwrap();
        assert!(!s.is_tls());
        send(&mut s, &heartbeat(1)).await;
        s
    });
    let err = server.unwrap_err();
    assert!(matches!(err, TransportError::PlaintextPeer { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("spoke plaintext to a TLS listener"), "{text}");
    assert!(text.contains("tandem frame"), "{text}");
    assert!(text.contains("--danger-plaintext"), "{text}");
    drop(client);

    assert_good_peer_accepted(&listener, certs.path()).await;
}

#[tokio::test]
async fn tls_client_against_plaintext_listener_fails_cleanly() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta"]).unwrap();
    let listener = PeerListener::bind(loopback(), &Security::DangerPlaintext)
        .await
        .unwrap();
    let (server, client) = tokio::join!(
        // The plaintext listener finds a TLS ClientHello where the frame magic belongs.
        listener.accept_or_refuse(),
        dial(listener.local_addr(), tls(certs.path(), "beta", "alpha"))
    );
    let err = server.unwrap_err();
    assert!(matches!(err, TransportError::NotTandem { .. }), "{err}");
    assert!(err.to_string().contains("with TLS too"), "{err}");
    let err = client.unwrap_err();
    assert!(
        matches!(err, TransportError::HandshakeClosed { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn silent_peer_times_out_and_listener_keeps_accepting() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha", "beta"]).unwrap();
    let listener = PeerListener::bind(loopback(), &tls(certs.path(), "alpha", "beta"))
        .await
        .unwrap()
        .with_handshake_timeout_ms(200);
    let _silent = tokio::net::TcpStream::connect(listener.local_addr())
        .await
        .unwrap();
    assert!(matches!(
        listener.accept_or_refuse().await,
        Err(TransportError::HandshakeTimeout {
            timeout_ms: 200,
            ..
        })
    ));
    assert_good_peer_accepted(&listener, certs.path()).await;
}

#[tokio::test]
async fn plaintext_is_refused_on_non_loopback_addresses() {
    for addr in ["10.1.2.3:7000", "0.0.0.0:0", "[2001:db8::1]:7000", "[::]:0"] {
        let addr: SocketAddr = addr.parse().unwrap();
        let err = connect(addr, &Security::DangerPlaintext, TIMEOUT_MS)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::PlaintextNotLoopback { .. }),
            "{addr}: {err}"
        );
        assert!(err.to_string().contains("non-loopback"));
        assert!(matches!(
            PeerListener::bind(addr, &Security::DangerPlaintext).await,
            Err(TransportError::PlaintextNotLoopback { .. })
        ));
    }
    // Loopback in all its spellings is allowed.
    for addr in ["127.0.0.1:0", "127.8.9.10:0", "[::1]:0"] {
        let addr: SocketAddr = addr.parse().unwrap();
        if addr.is_ipv6() && std::net::TcpListener::bind(addr).is_err() {
            continue; // IPv6 disabled on this host: nothing to bind to.
        }
        PeerListener::bind(addr, &Security::DangerPlaintext)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn missing_certificates_name_the_file_and_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let err = PeerListener::bind(loopback(), &tls(empty.path(), "alpha", "beta"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TransportError::CertFileRead { .. }), "{text}");
    assert!(text.contains("ca.pem"), "{text}");
    assert!(text.contains("tandem certs --out"), "{text}");

    // The node's own certificate missing (CA present).
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), &["alpha"]).unwrap();
    let err = dial(
        "127.0.0.1:9".parse().unwrap(),
        tls(certs.path(), "beta", "alpha"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("beta.pem"), "{err}");
}
