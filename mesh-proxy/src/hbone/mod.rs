//! HBONE: the mesh's tunnel protocol.
//!
//! An HBONE tunnel is an HTTP/2 `CONNECT` stream whose `:authority` is the
//! original destination `ip:port`, carried over mutual TLS 1.3 (ALPN `h2`) to
//! the destination pod's port 15008: the wire format of Istio ambient, so a
//! sockmesh proxy and a ztunnel can talk to each other. One HTTP/2
//! connection carries many tunnels per (source identity, destination proxy)
//! pair.
//!
//! - [`authority`]: the strict parser of the `CONNECT` target, which comes
//!   from an untrusted peer.
//! - [`server`]: [`serve`] runs the HTTP/2 server on one accepted mTLS
//!   connection, asks a [`Handler`] for the upstream stream of each tunnel
//!   (policy and connect are the proxy's decisions) and copies bytes both
//!   ways.
//! - [`pool`]: the client side, a [`Pool`] of HTTP/2 connections keyed by
//!   [`PoolKey`], opened through a caller-provided [`Connector`] (the socket
//!   is made inside the source pod's netns, with `SO_MARK`).
//!
//! Both sides use [`H2Config`]: large flow-control windows and frames, so a
//! single tunnel is not window-bound on a fast path.
//!
//! ```text
//! // Server (destination node, in the pod's netns, port 15008):
//! let acceptor = tokio_rustls::TlsAcceptor::from(server_config); // mTLS, ALPN h2
//! let (tcp, _) = listener.accept().await?;
//! let tls = hbone::accept(&acceptor, tcp, Duration::from_secs(10)).await?;
//! let summary = hbone::serve(tls, inbound.clone(), async move { watch.signaled().await }, &h2).await?;
//! // where `inbound: impl Handler` checks policy on `tunnel.peer_certificates`
//! // and returns `TcpStream::connect(tunnel.target)` or a `Refusal`.
//!
//! // Client (source node):
//! let pool = Pool::new(connector, H2Config::default()); // impl Connector: dial in netns + SO_MARK, TLS per identity
//! let key = PoolKey::new("spiffe://cluster.local/ns/default/sa/web", SocketAddr::new(dst_pod_ip, HBONE_PORT));
//! let mut tunnel = pool.connect(&key, original_dst).await?; // AsyncRead + AsyncWrite
//! tokio::io::copy_bidirectional(&mut app_socket, &mut tunnel).await?;
//! ```

pub mod authority;
mod error;
pub mod pool;
pub mod server;

use std::time::Duration;

pub use authority::{AuthorityError, fuzz_authority, parse_authority};
pub use error::HboneError;
pub use pool::{Connector, Pool, PoolKey, TunnelStream};
pub use server::{
    Handler, Refusal, ServeSummary, TLS_READ_BUFFER, Tunnel, TunnelClosed, accept, buffer_reads,
    handler_fn, serve,
};

/// The HBONE port in every meshed pod's netns.
pub const HBONE_PORT: u16 = 15008;

/// The one ALPN protocol HBONE speaks. Both TLS configurations must offer
/// it: the server's `alpn_protocols` (the caller builds that config), the
/// client's (the pool adds it when missing).
pub const ALPN_H2: &[u8] = b"h2";

/// HTTP/2 and copy settings, the same on both sides of a tunnel.
#[derive(Debug, Clone)]
pub struct H2Config {
    /// Initial flow-control window of each stream (`SETTINGS_INITIAL_WINDOW_SIZE`).
    pub stream_window: u32,
    /// Flow-control window of the whole connection.
    pub connection_window: u32,
    /// Largest DATA frame we accept (`SETTINGS_MAX_FRAME_SIZE`, at most 16 MiB - 1).
    pub max_frame_size: u32,
    /// Let hyper size the windows from measured bandwidth-delay product
    /// instead of the fixed windows above.
    pub adaptive_window: bool,
    /// Bytes hyper buffers per stream for sending before it applies backpressure.
    pub max_send_buf_size: usize,
    /// Streams the server lets one connection have open at once.
    pub max_concurrent_streams: u32,
    /// Size of each of the two copy buffers of a tunnel.
    pub copy_buffer: usize,
    /// HTTP/2 PING interval; a peer that does not answer within
    /// `keepalive_timeout` is dropped.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// Client: TCP dial + TLS handshake + HTTP/2 handshake of a new connection.
    pub connect_timeout: Duration,
    /// Client: wait for the `CONNECT` response. Server: wait for the
    /// [`Handler`] to open the upstream (then 504).
    pub open_timeout: Duration,
    /// Client: streams per pooled connection before the pool opens another.
    pub max_streams_per_conn: usize,
    /// Client: a pooled connection with no stream for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for H2Config {
    fn default() -> Self {
        // Windows as large as ztunnel's: a 4 MiB stream window keeps one
        // tunnel off the flow-control brake at tens of Gbit/s on a LAN.
        H2Config {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            adaptive_window: false,
            max_send_buf_size: 4 * 1024 * 1024,
            max_concurrent_streams: 1000,
            // Measured (examples/hbone_bench.rs, interleaved runs): 256 KiB
            // moves ~30% more per CPU second than 64 KiB (fewer frames and
            // wake-ups), at 512 KiB of buffers per open tunnel.
            copy_buffer: 256 * 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(10),
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}
