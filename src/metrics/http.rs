//! A small HTTP/1.1 server for `GET /metrics`: read the request line and
//! headers, answer, close. Written here rather than pulling in an HTTP stack
//! (hyper and friends) for one read-only endpoint scraped every few seconds.
//!
//! Bounds: at most [`CONNECTIONS_MAX`] connections at once (more are closed
//! unanswered), a request head of at most [`REQUEST_HEAD_BYTES_MAX`], and
//! [`REQUEST_TIMEOUT`] to send it. `GET` (and `HEAD`) of `/metrics` → 200 with
//! the exposition; another path → 404; another method → 405; garbage → 400.
//! Every response has `Connection: close`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Scrapers are few (one or two Prometheus servers, a curl now and then).
pub const CONNECTIONS_MAX: usize = 16;
/// A scrape request is a few hundred bytes.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// Time to receive the request head, and to produce and send the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Produces the exposition per scrape; None = the agent is shutting down (503).
pub type Render =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<String>> + Send>> + Send + Sync>;

/// Serve `listener` until `stop`.
pub fn serve(listener: TcpListener, render: Render, stop: CancellationToken) -> JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        // Over the bound: dropping the stream closes it.
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            continue;
                        };
                        let render = render.clone();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, render)).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::warn!("metrics endpoint accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stop.cancelled() => break,
            }
        }
    })
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    Bad,
}

/// Parse a request head (everything up to the blank line).
pub(crate) fn parse_request(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Bad;
    };
    let Some(line) = text.split("\r\n").next() else {
        return Request::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Request::Bad;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Request::Metrics { head_only: false },
        ("HEAD", "/metrics") => Request::Metrics { head_only: true },
        ("GET" | "HEAD", _) => Request::NotFound,
        _ => Request::MethodNotAllowed,
    }
}

async fn answer(mut stream: TcpStream, render: Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let request = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break parse_request(&head[..end]);
        }
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            break Request::Bad;
        }
    };
    let (status, content_type, body, head_only) = match request {
        Request::Metrics { head_only } => match render().await {
            Some(body) => ("200 OK", super::prometheus::CONTENT_TYPE, body, head_only),
            None => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                "the agent is shutting down\n".to_string(),
                head_only,
            ),
        },
        Request::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_string(),
            false,
        ),
        Request::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics is served\n".to_string(),
            false,
        ),
        Request::Bad => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "malformed HTTP request\n".to_string(),
            false,
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let p = |s: &str| parse_request(s.as_bytes());
        assert_eq!(
            p("GET /metrics HTTP/1.1\r\nHost: x"),
            Request::Metrics { head_only: false }
        );
        assert_eq!(
            p("GET /metrics?x=1 HTTP/1.0"),
            Request::Metrics { head_only: false }
        );
        assert_eq!(
            p("HEAD /metrics HTTP/1.1"),
            Request::Metrics { head_only: true }
        );
        assert_eq!(p("GET / HTTP/1.1"), Request::NotFound);
        assert_eq!(p("POST /metrics HTTP/1.1"), Request::MethodNotAllowed);
        assert_eq!(p("GET /metrics"), Request::Bad);
        assert_eq!(p("GET /metrics SPDY/3"), Request::Bad);
        assert_eq!(p("\u{1}\u{2}"), Request::Bad);
    }

    #[tokio::test]
    async fn a_scrape_gets_the_body_and_other_paths_get_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let render: Render = Arc::new(|| Box::pin(async { Some("tandem_up 1\n".to_string()) }));
        let task = serve(listener, render, stop.clone());
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("Connection: close\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\ntandem_up 1\n"), "{ok}");
        let missing = get("/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        stop.cancel();
        task.await.unwrap();
    }
}
