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
//! Both sides drive the `h2` crate directly (no hyper: a tunnel's bytes go
//! between the app's socket and the HTTP/2 codec as `Bytes`, with no copy
//! in between, [`copy_tunnel`]) and use [`H2Config`]: large flow-control
//! windows and frames, so a single tunnel is not window-bound on a fast path. The server is bounded
//! by [`ServerLimits`] (connection caps, handshake budget, idle timeouts,
//! enforced by a node-wide [`Limiter`]) and by
//! [`H2Config::max_concurrent_streams`].
//!
//! ```text
//! // Server (destination node, in the pod's netns, port 15008):
//! let limiter = Limiter::new(ServerLimits::default()); // one per node, shared by every listener
//! let (tcp, peer) = listener.accept().await?;
//! // caps -> bounded mTLS handshake (server_config: client certs required, ALPN h2) -> HTTP/2
//! let summary = hbone::serve_tcp(tcp, peer, server_config, inbound.clone(),
//!                                async move { watch.signaled().await }, &limiter, &h2).await?;
//! // where `inbound: impl Handler` checks policy on `tunnel.peer_certificates`
//! // and returns `TcpStream::connect(tunnel.target)` or a `Refusal`.
//!
//! // Client (source node):
//! let pool = Pool::new(connector, H2Config::default()); // impl Connector: dial in netns + SO_MARK, TLS per identity
//! let key = PoolKey::new("spiffe://cluster.local/ns/default/sa/web", SocketAddr::new(dst_pod_ip, HBONE_PORT));
//! let mut tunnel = pool.connect(&key, original_dst).await?; // AsyncRead + AsyncWrite
//! // The relay the proxy runs: no copy between the socket and HTTP/2.
//! hbone::copy_tunnel(&mut app_socket, tunnel.stream_mut(), h2.copy_buffer).await?;
//! ```

pub mod authority;
pub mod copy;
mod error;
pub mod pool;
pub mod server;
mod stream;

use std::time::Duration;

pub use authority::{AuthorityError, fuzz_authority, parse_authority};
pub use copy::{copy_bidirectional, copy_tunnel};
pub use error::HboneError;
pub use pool::{Connector, ConnectorError, Pool, PoolKey, TunnelStream};
pub use server::{
    CapExceeded, Handler, Limiter, LimiterStats, ReadBuffer, Refusal, ServeSummary,
    TLS_READ_BUFFER, Tunnel, TunnelClosed, accept, buffer_reads, handler_fn, serve, serve_tcp,
};
pub use stream::H2Stream;

/// The HBONE port in every meshed pod's netns (declared by the eBPF ABI,
/// whose `sk_lookup` leaves it alone).
pub use mesh_ebpf::HBONE_PORT;

/// The one ALPN protocol HBONE speaks. Both TLS configurations must offer
/// it: the server's `alpn_protocols` (the caller builds that config), the
/// client's (the pool adds it when missing).
pub const ALPN_H2: &[u8] = b"h2";

/// Bounds of the HBONE server (port 15008) against peers that connect and
/// stall, hold connections or tunnels open, or open many of them. The
/// caps are node-wide: give every listener of the node the same
/// [`Limiter`]. Streams per connection are [`H2Config::max_concurrent_streams`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerLimits {
    /// The TLS handshake must be done this long after the accept, or the
    /// socket is closed. Default 3 s: an mTLS handshake takes a few ms
    /// (two round trips), and the pool retries a failed dial.
    pub handshake_timeout: Duration,
    /// Connections (pre- and post-handshake) open at once on the node.
    /// Default 4096: a pool uses one connection per (source pod,
    /// destination pod) and [`H2Config::max_streams_per_conn`] tunnels,
    /// so 4096 is thousands of peers. Before its handshake a connection
    /// costs ~9 KiB (measured, `tests/hbone_memory.rs`): ~40 MiB at the
    /// cap; after it, the 256 KiB TLS read buffer is added as it is used.
    pub max_connections: usize,
    /// Connections open at once from one source IP address (a peer pod
    /// or node). Default 256: a pod's pool needs one connection per 100
    /// tunnels to this node, so 256 is 25,600 tunnels from one address,
    /// and 16 addresses are needed to fill the node-wide cap.
    pub max_connections_per_peer: usize,
    /// A connection with no open stream for this long is closed (GOAWAY).
    /// Default 120 s: longer than the pool's own idle close (60 s, checked
    /// every 60 s), so a sockmesh client always lets go first.
    pub connection_idle_timeout: Duration,
    /// A tunnel that moved no byte in either direction for this long is
    /// closed (both ends). Default 1 h, as Envoy's (and so Istio
    /// sidecars') TCP idle timeout: apps that keep idle connections
    /// (database pools) see what they saw under Istio.
    pub tunnel_idle_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            handshake_timeout: Duration::from_secs(3),
            max_connections: 4096,
            max_connections_per_peer: 256,
            connection_idle_timeout: Duration::from_secs(120),
            tunnel_idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// HTTP/2 and copy settings, the same on both sides of a tunnel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct H2Config {
    /// Initial flow-control window of each stream (`SETTINGS_INITIAL_WINDOW_SIZE`).
    pub stream_window: u32,
    /// Flow-control window of the whole connection.
    pub connection_window: u32,
    /// Largest DATA frame we accept (`SETTINGS_MAX_FRAME_SIZE`, at most 16 MiB - 1).
    pub max_frame_size: u32,
    /// Bytes `h2` buffers per stream for sending before it applies backpressure.
    pub max_send_buf_size: usize,
    /// Server: streams one connection may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`). A compliant client queues
    /// the next request until a stream closes; streams opened past it
    /// anyway are reset with `REFUSED_STREAM`. Default 100 (the pool's
    /// [`H2Config::max_streams_per_conn`]: it opens another connection
    /// first), so one connection holds at most 100 tunnels' buffers.
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
            max_send_buf_size: 4 * 1024 * 1024,
            max_concurrent_streams: 100,
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

/// Sends a PING every `interval` and returns (why) once one is not
/// answered within `timeout`: the caller then drops the connection. Runs
/// forever without an interval. Poll it alongside the connection, which
/// reads the answers.
pub(crate) async fn keepalive(
    ping: Option<h2::PingPong>,
    interval: Option<Duration>,
    timeout: Duration,
) -> String {
    let (Some(mut ping), Some(interval)) = (ping, interval) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keepalive PING: {e}"),
            Err(_) => return format!("keepalive: PING not answered within {timeout:?}"),
        }
    }
}
