use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

/// What went wrong with an HBONE connection or tunnel. Each variant names
/// the peer (`dest`: the destination proxy) and, where there is one, the
/// tunnel's `target`.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("hbone {dest}: dial: {source}")]
    Dial {
        dest: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("hbone {dest}: TLS handshake: {source}")]
    Tls {
        dest: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("hbone {dest}: peer negotiated ALPN {alpn:?}, not h2")]
    Alpn {
        dest: SocketAddr,
        alpn: Option<String>,
    },
    #[error("hbone {dest}: peer refused: {source}")]
    PeerRejected {
        dest: SocketAddr,
        #[source]
        source: super::ConnectorError,
    },
    #[error("hbone {dest}: TLS configuration for source {identity}: {source}")]
    Config {
        dest: SocketAddr,
        identity: String,
        #[source]
        source: super::ConnectorError,
    },
    #[error("hbone {dest}: HTTP/2 handshake: {source}")]
    Handshake {
        dest: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("hbone {dest}: CONNECT {target}: {source}")]
    Request {
        dest: SocketAddr,
        target: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("hbone {dest}: CONNECT {target}: peer answered {status}")]
    Status {
        dest: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("hbone {dest}: {what} timed out after {after:?}")]
    Timeout {
        dest: SocketAddr,
        what: &'static str,
        after: Duration,
    },
    #[error("hbone server: TLS accept from {peer:?}: {source}")]
    Accept {
        peer: Option<SocketAddr>,
        #[source]
        source: io::Error,
    },
    #[error("hbone server: client negotiated ALPN {alpn:?}, not h2")]
    ServerAlpn { alpn: Option<String> },
    #[error("hbone server: HTTP/2 connection: {source}")]
    Serve {
        #[source]
        source: h2::Error,
    },
    #[error("hbone server: {what}")]
    ServeStalled { what: String },
}

impl HboneError {
    /// The HTTP status the peer answered, for a refused tunnel.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HboneError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}
