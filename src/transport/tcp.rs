//! TCP socket options for replication links (through rustix's typed socket
//! options: no hand-written `unsafe`).

use std::time::Duration;

use rustix::net::sockopt;
use tokio::net::TcpStream;

use super::TransportError;

/// Keepalive idle time used by [`super::connect`] and [`super::PeerListener`]:
/// a silent dead peer is noticed after about `5 + 3 * 5` = 20 s even when no
/// heartbeat is pending.
pub const KEEPALIVE_S_DEFAULT: u64 = 5;
/// TCP_USER_TIMEOUT used by [`super::connect`] and [`super::PeerListener`]:
/// unacknowledged data older than 20 s kills the connection, so a write to a
/// vanished peer fails instead of hanging for the kernel's ~15 minutes of
/// retransmissions.
pub const USER_TIMEOUT_MS_DEFAULT: u64 = 20_000;
/// Keepalive probes sent before the connection is declared dead.
const KEEPALIVE_PROBES: u32 = 3;

fn option_error(option: &'static str) -> impl FnOnce(rustix::io::Errno) -> TransportError {
    move |e| TransportError::SocketOption {
        option,
        source: e.into(),
    }
}

/// TCP_NODELAY (frames are written whole; Nagle would only add latency to
/// small acks), SO_KEEPALIVE with `keepalive_s` idle and probe interval and 3
/// probes, and TCP_USER_TIMEOUT of `user_timeout_ms`.
pub fn configure_tcp(
    stream: &TcpStream,
    keepalive_s: u64,
    user_timeout_ms: u64,
) -> Result<(), TransportError> {
    stream
        .set_nodelay(true)
        .map_err(|source| TransportError::SocketOption {
            option: "TCP_NODELAY",
            source,
        })?;
    // The kernel keeps these in seconds as an int.
    let keepalive = Duration::from_secs(keepalive_s.clamp(1, i32::MAX as u64));
    sockopt::set_socket_keepalive(stream, true).map_err(option_error("SO_KEEPALIVE"))?;
    sockopt::set_tcp_keepidle(stream, keepalive).map_err(option_error("TCP_KEEPIDLE"))?;
    sockopt::set_tcp_keepintvl(stream, keepalive).map_err(option_error("TCP_KEEPINTVL"))?;
    sockopt::set_tcp_keepcnt(stream, KEEPALIVE_PROBES).map_err(option_error("TCP_KEEPCNT"))?;
    sockopt::set_tcp_user_timeout(stream, user_timeout_ms.min(i32::MAX as u64) as u32)
        .map_err(option_error("TCP_USER_TIMEOUT"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_are_set_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        configure_tcp(&stream, 7, 12_345).unwrap();
        assert!(stream.nodelay().unwrap());
        assert!(sockopt::socket_keepalive(&stream).unwrap());
        assert_eq!(
            sockopt::tcp_keepidle(&stream).unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(
            sockopt::tcp_keepintvl(&stream).unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(sockopt::tcp_keepcnt(&stream).unwrap(), 3);
        assert_eq!(sockopt::tcp_user_timeout(&stream).unwrap(), 12_345);
    }
}
