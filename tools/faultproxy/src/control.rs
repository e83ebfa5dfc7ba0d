//! The control socket: JSON lines over a unix socket, one request → one response line.
//!
//! Owns: the request/response types and the unix-socket server. Does not own fault
//! semantics (delegated to [`crate::Proxy`]'s shared state).
//!
//! Requests:
//! - `{"cmd":"set","fault":{"kind":"delay","ms":50,"jitter_ms":10,"dir":"both"}}`
//! - `{"cmd":"clear"}`
//! - `{"cmd":"stats"}`
//!
//! Every response is `{"ok":true,"faults":[...],"stats":{...}}` (the state after the
//! request) or `{"ok":false,"error":"..."}`. A request line longer than
//! [`REQUEST_LINE_BYTES_MAX`] is answered with an error and the connection is closed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::Stats;
use crate::conn::Shared;
use crate::fault::{Fault, FaultError};

/// Longest request line: the largest valid request is ~120 bytes.
pub const REQUEST_LINE_BYTES_MAX: usize = 4096;

/// One control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Set { fault: Fault },
    Clear,
    Stats,
}

/// One control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Vec<Fault>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

/// What can go wrong with one control request or the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control request is not valid JSON of the expected shape: {source}; see tools/faultproxy/README.md"
    )]
    BadRequest {
        #[source]
        source: serde_json::Error,
    },
    #[error("control request line exceeds {max_bytes} bytes; send one JSON object per line")]
    LineTooLong { max_bytes: usize },
    #[error(transparent)]
    BadFault(#[from] FaultError),
    #[error(
        "cannot bind control socket {path}: {source}; remove a stale file or pick another path"
    )]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Response {
    fn error(e: &ControlError) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            faults: None,
            stats: None,
        }
    }
}

/// Parses and executes one request line.
pub(crate) fn handle_line(shared: &Shared, line: &[u8]) -> Response {
    let request = match serde_json::from_slice::<Request>(line) {
        Ok(r) => r,
        Err(source) => return Response::error(&ControlError::BadRequest { source }),
    };
    let result = match request {
        Request::Set { fault } => crate::try_set_shared(shared, fault).map_err(ControlError::from),
        Request::Clear => {
            crate::clear_shared(shared);
            Ok(())
        }
        Request::Stats => Ok(()),
    };
    match result {
        Ok(()) => Response {
            ok: true,
            error: None,
            faults: Some(shared.faults.borrow().to_faults()),
            stats: Some(crate::stats_shared(shared)),
        },
        Err(e) => Response::error(&e),
    }
}

/// Binds `path` (replacing a stale socket file) and serves until the task is aborted.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only ever remove a socket: a typo must not delete someone's file.
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    clients.spawn(serve_client(shared.clone(), stream));
                }
                Err(e) => {
                    warn!(error = %e, "control accept failed; retrying in 50 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

async fn serve_client(shared: Arc<Shared>, stream: UnixStream) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let read = (&mut rd)
            .take(REQUEST_LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await;
        let len = match read {
            Ok(0) => return,
            Ok(len) => len,
            Err(e) => {
                debug!(error = %e, "control client read failed");
                return;
            }
        };
        let too_long = len > REQUEST_LINE_BYTES_MAX && line.last() != Some(&b'\n');
        let response = if too_long {
            Response::error(&ControlError::LineTooLong {
                max_bytes: REQUEST_LINE_BYTES_MAX,
            })
        } else {
            handle_line(&shared, line.trim_ascii())
        };
        let mut out = serde_json::to_vec(&response).expect("Response always serializes");
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}
