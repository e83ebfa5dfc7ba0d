//! TCP socket options for replication links.

use std::os::fd::AsRawFd;

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
const KEEPALIVE_PROBES: libc::c_int = 3;

fn set_int_option(
    stream: &TcpStream,
    level: libc::c_int,
    option: libc::c_int,
    option_name: &'static str,
    value: libc::c_int,
) -> Result<(), TransportError> {
    let fd = stream.as_raw_fd();
    // SAFETY: `fd` is an open socket owned by `stream`, which outlives this
    // call; `value` is a live c_int and the length passed is its exact size,
    // as setsockopt(2) requires for these integer options.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&value as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(TransportError::SocketOption {
            option: option_name,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn clamp_to_c_int(value: u64) -> libc::c_int {
    value.min(libc::c_int::MAX as u64) as libc::c_int
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
    let keepalive_s = clamp_to_c_int(keepalive_s.max(1));
    set_int_option(
        stream,
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        "SO_KEEPALIVE",
        1,
    )?;
    set_int_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        "TCP_KEEPIDLE",
        keepalive_s,
    )?;
    set_int_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        "TCP_KEEPINTVL",
        keepalive_s,
    )?;
    set_int_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        "TCP_KEEPCNT",
        KEEPALIVE_PROBES,
    )?;
    set_int_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        "TCP_USER_TIMEOUT",
        clamp_to_c_int(user_timeout_ms),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_int_option(stream: &TcpStream, level: libc::c_int, option: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the fd is open for the lifetime of `stream`; `value` and
        // `len` are live locals of the sizes getsockopt(2) expects.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                level,
                option,
                (&mut value as *mut libc::c_int).cast::<libc::c_void>(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        value
    }

    #[tokio::test]
    async fn options_are_set_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        configure_tcp(&stream, 7, 12_345).unwrap();
        assert!(stream.nodelay().unwrap());
        assert_eq!(
            get_int_option(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            1
        );
        assert_eq!(
            get_int_option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            7
        );
        assert_eq!(
            get_int_option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            7
        );
        assert_eq!(
            get_int_option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            3
        );
        assert_eq!(
            get_int_option(&stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            12_345
        );
    }
}
