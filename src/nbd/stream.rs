//! The byte streams NBD runs over: a TCP or unix socket, optionally upgraded to
//! TLS by `NBD_OPT_STARTTLS` (as a server or as a client).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub(crate) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// A connected socket before TLS.
pub(crate) enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection, plain or after STARTTLS.
pub(crate) enum Conn {
    Plain(Plain),
    ServerTls(Box<tokio_rustls::server::TlsStream<Plain>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<Plain>>),
}

impl Conn {
    /// Owned halves for a reader and a writer task. Plain sockets split without a
    /// lock; a TLS stream needs one (reading may have to write and vice versa).
    pub(crate) fn split(self) -> (BoxRead, BoxWrite) {
        match self {
            Conn::Plain(Plain::Tcp(s)) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Conn::Plain(Plain::Unix(s)) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Conn::ServerTls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
            Conn::ClientTls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

macro_rules! delegate_io {
    ($ty:ty, $($variant:pat => $s:ident),+) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() { $($variant => Pin::new($s).poll_read(cx, buf)),+ }
            }
        }
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() { $($variant => Pin::new($s).poll_write(cx, buf)),+ }
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() { $($variant => Pin::new($s).poll_write_vectored(cx, bufs)),+ }
            }
            fn is_write_vectored(&self) -> bool {
                match self { $($variant => $s.is_write_vectored()),+ }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($variant => Pin::new($s).poll_flush(cx)),+ }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($variant => Pin::new($s).poll_shutdown(cx)),+ }
            }
        }
    };
}

delegate_io!(Plain, Plain::Tcp(s) => s, Plain::Unix(s) => s);
delegate_io!(Conn, Conn::Plain(s) => s, Conn::ServerTls(s) => s, Conn::ClientTls(s) => s);
