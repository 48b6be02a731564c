//! The HBONE server: one accepted mTLS connection, many tunnels.
//!
//! The node proxy hands each TCP connection accepted on 15008 to
//! [`serve_tcp`]: the node-wide connection caps of a [`Limiter`], a bounded
//! TLS handshake with its `rustls::ServerConfig` (client certificates
//! required, ALPN `h2`), then [`serve`]'s HTTP/2 server. Each `CONNECT`
//! stream with a valid authority becomes a [`Tunnel`] given to the
//! [`Handler`], which applies policy and opens the upstream (the app
//! socket); its answer decides the status: `200` and a byte copy both ways,
//! or the [`Refusal`]'s status. Every stage is bounded by [`ServerLimits`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::stream::H2Stream;
use super::{ALPN_H2, H2Config, HboneError, ServerLimits, parse_authority};

/// rustls reads the socket 4 KiB at a time; under a 16 KiB record stream
/// that is several `read` syscalls per record. A user-space read buffer
/// below TLS turns them into one large read.
pub const TLS_READ_BUFFER: usize = 256 * 1024;

/// How much encrypted data a tunnel's TLS session may hold for the socket
/// (rustls' default is 64 KiB): up to one maximal HTTP/2 DATA frame's
/// records go out in one `writev`.
pub const TLS_WRITE_BUFFER: usize = 1024 * 1024;

/// Wraps the socket under TLS in a large read buffer ([`TLS_READ_BUFFER`]).
/// Use it below the TLS connect (the pool does it on the client side); the
/// server uses [`ReadBuffer`], which waits for the handshake.
pub fn buffer_reads<S: AsyncRead>(io: S) -> BufReader<S> {
    BufReader::with_capacity(TLS_READ_BUFFER, io)
}

/// The socket under the server's TLS: read directly during the handshake
/// (a peer that has not authenticated costs no [`TLS_READ_BUFFER`]), then
/// through the large buffer once [`ReadBuffer::grow`] is called.
#[derive(Debug)]
pub struct ReadBuffer<S>(Option<ReadIo<S>>);

#[derive(Debug)]
enum ReadIo<S> {
    Direct(S),
    Buffered(BufReader<S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> ReadBuffer<S> {
    /// No buffer yet.
    pub fn unbuffered(io: S) -> Self {
        ReadBuffer(Some(ReadIo::Direct(io)))
    }

    /// From now on, read through a [`TLS_READ_BUFFER`]. Nothing is lost:
    /// an unbuffered reader holds no bytes.
    pub fn grow(&mut self) {
        if let Some(ReadIo::Direct(io)) = self.0.take() {
            self.0 = Some(ReadIo::Buffered(buffer_reads(io)));
        }
    }

    pub fn get_ref(&self) -> Option<&S> {
        match &self.0 {
            Some(ReadIo::Direct(io)) => Some(io),
            Some(ReadIo::Buffered(b)) => Some(b.get_ref()),
            None => None,
        }
    }

    fn io(&mut self) -> io::Result<Pin<&mut (dyn AsyncReadWrite + Unpin)>> {
        match &mut self.0 {
            Some(ReadIo::Direct(io)) => Ok(Pin::new(io)),
            Some(ReadIo::Buffered(b)) => Ok(Pin::new(b)),
            None => Err(io::Error::other("hbone: read buffer lost its socket")),
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncReadWrite for T {}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ReadBuffer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ReadBuffer<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Some(ReadIo::Direct(io)) => io.is_write_vectored(),
            Some(ReadIo::Buffered(b)) => b.is_write_vectored(),
            None => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// The TLS accept of an HBONE connection, as [`serve`] wants it:
/// `TCP_NODELAY`, a bounded handshake, then a large read buffer under TLS
/// ([`ReadBuffer`]). The caller's `acceptor` must require client
/// certificates and offer ALPN h2. [`serve_tcp`] does this within the caps.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<ReadBuffer<TcpStream>>, HboneError> {
    let peer = tcp.peer_addr().ok();
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(?peer, error = %e, "hbone: TCP_NODELAY");
    }
    match tokio::time::timeout(timeout, acceptor.accept(ReadBuffer::unbuffered(tcp))).await {
        Ok(Ok(mut tls)) => {
            tls.get_mut().0.grow();
            tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
            Ok(tls)
        }
        Ok(Err(source)) => Err(HboneError::Accept { peer, source }),
        Err(_) => Err(HboneError::Accept {
            peer,
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake took over {timeout:?}"),
            ),
        }),
    }
}

// ------------------------------------------------------------ limits

/// Why a connection was not admitted (the source of the
/// [`HboneError::Accept`] that [`serve_tcp`] returns for it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    #[error("{max} HBONE connections open on this node (max_connections); refused {peer}")]
    Total { peer: IpAddr, max: usize },
    #[error("{max} HBONE connections open from {peer} (max_connections_per_peer)")]
    PerPeer { peer: IpAddr, max: usize },
}

impl HboneError {
    /// The cap a connection was refused by, if that is why it failed.
    pub fn cap_exceeded(&self) -> Option<&CapExceeded> {
        match self {
            HboneError::Accept { source, .. } => source.get_ref()?.downcast_ref(),
            _ => None,
        }
    }
}

const CAP_SHARDS: usize = 64;

/// The node-wide state behind [`ServerLimits`]: open connections in all
/// and per source address, and counts of what the limits refused or
/// closed. Make one per node and give it to every [`serve_tcp`].
///
/// No global lock on the accept path: the total is one atomic counter; the
/// per-peer counts live in shards chosen by a keyed hash of the address.
#[derive(Debug)]
pub struct Limiter {
    limits: ServerLimits,
    open: AtomicUsize,
    peers: Box<[Mutex<HashMap<IpAddr, usize>>]>,
    shard_of: RandomState,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    refused_total_cap: AtomicU64,
    refused_per_peer_cap: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_connections_closed: AtomicU64,
    idle_tunnels_closed: AtomicU64,
}

/// What a [`Limiter`]'s limits have done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimiterStats {
    /// Connections admitted and not yet closed.
    pub open: usize,
    /// Reset at accept: the node-wide cap was reached.
    pub refused_total_cap: u64,
    /// Reset at accept: the source address was at its cap.
    pub refused_per_peer_cap: u64,
    /// Closed because the TLS handshake was not done within the budget.
    pub handshake_timeouts: u64,
    /// Closed (GOAWAY) after `connection_idle_timeout` with no stream.
    pub idle_connections_closed: u64,
    /// Tunnels closed after `tunnel_idle_timeout` with no byte moved.
    pub idle_tunnels_closed: u64,
}

impl Limiter {
    pub fn new(limits: ServerLimits) -> Arc<Limiter> {
        Arc::new(Limiter {
            limits,
            open: AtomicUsize::new(0),
            peers: (0..CAP_SHARDS).map(|_| Mutex::default()).collect(),
            shard_of: RandomState::new(),
            counters: Arc::default(),
        })
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    pub fn stats(&self) -> LimiterStats {
        let c = &self.counters;
        LimiterStats {
            open: self.open.load(Ordering::Acquire),
            refused_total_cap: c.refused_total_cap.load(Ordering::Relaxed),
            refused_per_peer_cap: c.refused_per_peer_cap.load(Ordering::Relaxed),
            handshake_timeouts: c.handshake_timeouts.load(Ordering::Relaxed),
            idle_connections_closed: c.idle_connections_closed.load(Ordering::Relaxed),
            idle_tunnels_closed: c.idle_tunnels_closed.load(Ordering::Relaxed),
        }
    }

    /// Connections admitted from `peer` and not yet closed.
    pub fn open_from(&self, peer: IpAddr) -> usize {
        let peer = peer.to_canonical();
        self.shard(peer).get(&peer).copied().unwrap_or(0)
    }

    fn shard(&self, peer: IpAddr) -> parking_lot::MutexGuard<'_, HashMap<IpAddr, usize>> {
        let i = (self.shard_of.hash_one(peer) % CAP_SHARDS as u64) as usize;
        self.peers[i].lock()
    }

    /// Admits one connection from `peer`, or says which cap it is over
    /// (and counts the refusal).
    fn try_admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, CapExceeded> {
        // A v4 client of a dual-stack listener is the same peer either way.
        let peer = peer.to_canonical();
        {
            let mut shard = self.shard(peer);
            let n = shard.entry(peer).or_insert(0);
            if *n >= self.limits.max_connections_per_peer {
                let n = *n;
                if n == 0 {
                    shard.remove(&peer);
                }
                self.counters
                    .refused_per_peer_cap
                    .fetch_add(1, Ordering::Relaxed);
                return Err(CapExceeded::PerPeer {
                    peer,
                    max: self.limits.max_connections_per_peer,
                });
            }
            *n += 1;
        }
        // The per-peer place is held from here: the permit gives it back.
        let mut permit = Permit {
            limiter: self.clone(),
            peer,
            counted: false,
        };
        let max = self.limits.max_connections;
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.counters
                .refused_total_cap
                .fetch_add(1, Ordering::Relaxed);
            return Err(CapExceeded::Total { peer, max });
        }
        permit.counted = true;
        Ok(permit)
    }
}

/// One admitted connection's place under the caps, given back on drop,
/// whatever path the connection ends by.
#[derive(Debug)]
struct Permit {
    limiter: Arc<Limiter>,
    peer: IpAddr,
    /// Whether the node-wide count was taken.
    counted: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut shard = self.limiter.shard(self.peer);
            if let Some(n) = shard.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.remove(&self.peer);
                }
            }
        }
        if self.counted {
            self.limiter.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Serves one TCP connection accepted on 15008, bounded by `limiter`:
/// over a connection cap it is reset at once (before TLS), counted and
/// logged at debug; otherwise the mTLS handshake with `tls` (client
/// certificates required, ALPN h2) gets `handshake_timeout`, then
/// [`serve`] runs until the peer closes, the connection idles
/// out, or `drain` completes and its tunnels have finished. The caps'
/// place is held until this returns.
///
/// Errors from the caps and the handshake are [`HboneError::Accept`]
/// ([`HboneError::cap_exceeded`] tells a cap refusal apart).
pub async fn serve_tcp<H, D>(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    handler: H,
    drain: D,
    limiter: &Arc<Limiter>,
    config: &H2Config,
) -> Result<ServeSummary, HboneError>
where
    H: Handler,
    D: Future<Output = ()>,
{
    let _permit = match limiter.try_admit(peer.ip()) {
        Ok(permit) => permit,
        Err(cap) => {
            // A reset: the peer knows at once, and no TIME_WAIT is left here.
            let _ = tcp.set_zero_linger();
            drop(tcp);
            debug!(%peer, %cap, "hbone: connection refused: over the cap");
            return Err(HboneError::Accept {
                peer: Some(peer),
                source: io::Error::other(cap),
            });
        }
    };
    let budget = limiter.limits.handshake_timeout;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls = match accept(&acceptor, tcp, budget).await {
        Ok(tls) => tls,
        Err(e) => {
            if matches!(&e, HboneError::Accept { source, .. } if source.kind() == io::ErrorKind::TimedOut)
            {
                limiter
                    .counters
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, ?budget, "hbone: TLS handshake not done within the budget; closed");
            }
            return Err(e);
        }
    };
    serve_inner(
        tls,
        handler,
        drain,
        config,
        &limiter.limits,
        Some(limiter.counters.clone()),
    )
    .await
}

/// One tunnel the peer asked for, before the handler decides.
#[derive(Debug)]
pub struct Tunnel {
    /// The original destination (`:authority`), already validated.
    pub target: SocketAddr,
    /// The peer's certificate chain from the TLS session, leaf first: its
    /// SPIFFE ID is the source identity policy decides on.
    pub peer_certificates: Arc<[CertificateDer<'static>]>,
    /// The request headers (ztunnel sends `baggage`, `traceparent`,
    /// `forwarded`); informational only.
    pub headers: HeaderMap,
}

/// Why the handler refused a tunnel; each maps to the status the peer gets.
/// The reason is logged here, never sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Policy denied it: `403`.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The upstream refused or reset the connection: `502`.
    #[error("bad gateway: {0}")]
    BadGateway(String),
    /// No upstream to go to (not a local workload, not ready): `503`.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A finished tunnel, for metrics.
#[derive(Debug, Clone)]
pub struct TunnelClosed {
    pub target: SocketAddr,
    pub peer_certificates: Arc<[CertificateDer<'static>]>,
    /// Bytes the peer sent through the tunnel (written upstream).
    pub bytes_from_peer: u64,
    /// Bytes sent back to the peer.
    pub bytes_to_peer: u64,
    pub duration: Duration,
    /// Why the copy stopped, if not by a clean close of both directions.
    pub error: Option<String>,
}

/// The proxy's part of the server side: decide on a tunnel and open its
/// upstream.
pub trait Handler: Send + Sync + 'static {
    /// The upstream, usually the `TcpStream` to the app.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Decide on `tunnel` (policy) and open the upstream. Bounded by
    /// [`H2Config::open_timeout`] (then the peer gets `504`).
    fn open(&self, tunnel: Tunnel) -> impl Future<Output = Result<Self::Stream, Refusal>> + Send;

    /// Called once per tunnel that was opened, when its copy ends, with
    /// the upstream [`Handler::open`] returned (so whatever the handler
    /// keeps with it, such as a connection record, ends here).
    fn closed(&self, upstream: Self::Stream, closed: &TunnelClosed) {
        let _ = (upstream, closed);
    }
}

impl<H: Handler> Handler for Arc<H> {
    type Stream = H::Stream;

    fn open(&self, tunnel: Tunnel) -> impl Future<Output = Result<Self::Stream, Refusal>> + Send {
        (**self).open(tunnel)
    }

    fn closed(&self, upstream: Self::Stream, closed: &TunnelClosed) {
        (**self).closed(upstream, closed)
    }
}

/// A [`Handler`] from an async function (`closed` does nothing).
#[derive(Debug, Clone)]
pub struct HandlerFn<F>(F);

/// Wraps `f: Fn(Tunnel) -> impl Future<Output = Result<Stream, Refusal>>`.
pub fn handler_fn<F>(f: F) -> HandlerFn<F> {
    HandlerFn(f)
}

impl<F, Fut, T> Handler for HandlerFn<F>
where
    F: Fn(Tunnel) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Refusal>> + Send,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = T;

    fn open(&self, tunnel: Tunnel) -> impl Future<Output = Result<T, Refusal>> + Send {
        (self.0)(tunnel)
    }
}

/// What one connection carried, returned by [`serve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Tunnels answered `200`.
    pub tunnels: u64,
    /// Requests answered with an error status.
    pub refused: u64,
    pub bytes_from_peer: u64,
    pub bytes_to_peer: u64,
}

#[derive(Default)]
struct Stats {
    tunnels: AtomicU64,
    refused: AtomicU64,
    bytes_from_peer: AtomicU64,
    bytes_to_peer: AtomicU64,
}

struct Conn<H> {
    handler: H,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    copy_buffer: usize,
    open_timeout: Duration,
    tunnel_idle_timeout: Duration,
    stats: Arc<Stats>,
    /// The limiter's counters, when served by [`serve_tcp`].
    counters: Option<Arc<Counters>>,
    /// Streams open now (requests being answered and tunnels copying):
    /// the serve loop closes the connection after a while at zero.
    active: Arc<watch::Sender<usize>>,
    /// Each tunnel's copy task holds a clone; [`serve`] waits until all
    /// are gone.
    tasks: mpsc::Sender<Infallible>,
}

/// One open stream in [`Conn::active`], for as long as it lives.
struct ActiveStream(Arc<watch::Sender<usize>>);

impl ActiveStream {
    fn new(active: &Arc<watch::Sender<usize>>) -> Self {
        active.send_modify(|n| *n += 1);
        ActiveStream(active.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut res = Response::new(());
    *res.status_mut() = code;
    res
}

/// Runs HBONE on one accepted mTLS connection until the peer closes it, or
/// until `drain` completes and every tunnel open by then has finished
/// (HTTP/2 GOAWAY: no new streams). Returns once every tunnel's copy has
/// ended. Bound the whole call with a timeout to cap a drain. `limits`'
/// idle timeouts apply: the connection is closed (GOAWAY) after
/// `connection_idle_timeout` with no open stream, each tunnel after
/// `tunnel_idle_timeout` with no byte either way. [`serve_tcp`] calls this
/// after its caps and handshake.
///
/// The TLS session must have negotiated ALPN `h2`. Accept with [`accept`]
/// (or do what it does: `TCP_NODELAY`, a read buffer under TLS after the
/// handshake). Run it inside a span naming the peer.
pub async fn serve<S, H, D>(
    tls: tokio_rustls::server::TlsStream<S>,
    handler: H,
    drain: D,
    config: &H2Config,
    limits: &ServerLimits,
) -> Result<ServeSummary, HboneError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
    D: Future<Output = ()>,
{
    serve_inner(tls, handler, drain, config, limits, None).await
}

async fn serve_inner<S, H, D>(
    tls: tokio_rustls::server::TlsStream<S>,
    handler: H,
    drain: D,
    config: &H2Config,
    limits: &ServerLimits,
    counters: Option<Arc<Counters>>,
) -> Result<ServeSummary, HboneError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
    D: Future<Output = ()>,
{
    let session = tls.get_ref().1;
    let alpn = session.alpn_protocol();
    if alpn != Some(ALPN_H2) {
        return Err(HboneError::ServerAlpn {
            alpn: alpn.map(|a| String::from_utf8_lossy(a).into_owned()),
        });
    }
    let peer_certificates: Arc<[CertificateDer<'static>]> = session
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();

    let stats = Arc::new(Stats::default());
    let (tasks, mut tasks_done) = mpsc::channel::<Infallible>(1);
    let (active, mut active_rx) = watch::channel(0usize);
    let conn = Arc::new(Conn {
        handler,
        peer_certificates,
        copy_buffer: config.copy_buffer,
        open_timeout: config.open_timeout,
        tunnel_idle_timeout: limits.tunnel_idle_timeout,
        stats: stats.clone(),
        counters: counters.clone(),
        active: Arc::new(active),
        tasks,
    });
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_frame_size(config.max_frame_size)
        .max_send_buffer_size(config.max_send_buf_size)
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(16 * 1024);
    // The client's preface follows its TLS handshake at once: the same
    // budget as the handshake (the connection idle timeout if longer).
    let preface = limits.handshake_timeout.max(Duration::from_secs(1));
    let mut http = match tokio::time::timeout(preface, builder.handshake::<_, Bytes>(tls)).await {
        Ok(Ok(http)) => http,
        Ok(Err(source)) => return Err(HboneError::Serve { source }),
        Err(_) => {
            return Err(HboneError::ServeStalled {
                what: format!("no HTTP/2 preface within {preface:?} of the TLS handshake"),
            });
        }
    };
    let keepalive = super::keepalive(
        http.ping_pong(),
        config.keepalive_interval,
        config.keepalive_timeout,
    );
    let mut keepalive = std::pin::pin!(keepalive);

    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    let idle_timeout = limits.connection_idle_timeout;
    // Since when no stream has been open (None while some are).
    let mut idle_since = Some(Instant::now());
    let mut watching = true;
    let result = loop {
        let idle_deadline = idle_since.map(|t| t + idle_timeout);
        tokio::select! {
            req = http.accept() => match req {
                None => break Ok(()),
                Some(Err(source)) => break Err(HboneError::Serve { source }),
                Some(Ok((req, respond))) => conn.clone().request(req, respond),
            },
            () = &mut drain, if !draining => {
                debug!("hbone: draining connection (GOAWAY)");
                draining = true;
                http.graceful_shutdown();
            }
            changed = active_rx.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let open = *active_rx.borrow_and_update();
                idle_since = (open == 0).then(Instant::now);
            }
            () = sleep_until_some(idle_deadline), if !draining => {
                debug!(idle = ?idle_timeout, "hbone: no stream open for the idle timeout; closing (GOAWAY)");
                if let Some(c) = &counters {
                    c.idle_connections_closed.fetch_add(1, Ordering::Relaxed);
                }
                draining = true;
                http.graceful_shutdown();
            }
            what = keepalive.as_mut() => break Err(HboneError::ServeStalled { what }),
        }
    };
    // Closes the connection: the tunnels still open see it end.
    drop(http);
    drop(conn);
    // Every copy task holds a sender; `None` once the last has finished.
    let _ = tasks_done.recv().await;

    let summary = ServeSummary {
        tunnels: stats.tunnels.load(Ordering::Relaxed),
        refused: stats.refused.load(Ordering::Relaxed),
        bytes_from_peer: stats.bytes_from_peer.load(Ordering::Relaxed),
        bytes_to_peer: stats.bytes_to_peer.load(Ordering::Relaxed),
    };
    result.map(|()| summary)
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl<H: Handler> Conn<H> {
    /// Answers one request: refusals at once, a `CONNECT` in a task of its
    /// own (the handler's decision, then the tunnel's copy).
    fn request(self: Arc<Self>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let active = ActiveStream::new(&self.active);
        if req.method() != Method::CONNECT {
            warn!(method = %req.method(), uri = %req.uri(), "hbone: refused non-CONNECT request");
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let mut res = status(StatusCode::METHOD_NOT_ALLOWED);
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("CONNECT"));
            let _ = respond.send_response(res, true);
            return;
        }
        let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let target = match parse_authority(authority) {
            Ok(t) => t,
            Err(error) => {
                warn!(%error, "hbone: refused CONNECT");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
                return;
            }
        };
        let task = self.tasks.clone();
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _task = task;
                let _active = active;
                self.tunnel(target, req, respond).await
            },
            span,
        ));
    }

    async fn tunnel(
        self: Arc<Self>,
        target: SocketAddr,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let (parts, recv) = req.into_parts();
        let tunnel = Tunnel {
            target,
            peer_certificates: self.peer_certificates.clone(),
            headers: parts.headers,
        };
        let upstream = match tokio::time::timeout(self.open_timeout, self.handler.open(tunnel))
            .await
        {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(refusal)) => {
                info!(dst = %target, %refusal, "hbone: tunnel refused");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let _ = respond.send_response(status(refusal.status()), true);
                return;
            }
            Err(_) => {
                warn!(dst = %target, after = ?self.open_timeout, "hbone: opening upstream timed out");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let _ = respond.send_response(status(StatusCode::GATEWAY_TIMEOUT), true);
                return;
            }
        };
        self.stats.tunnels.fetch_add(1, Ordering::Relaxed);
        let send = respond.send_response(status(StatusCode::OK), false);
        self.copy(target, send.map(|send| H2Stream::new(send, recv)), upstream)
            .await
    }

    async fn copy(
        self: Arc<Self>,
        target: SocketAddr,
        down: Result<H2Stream, h2::Error>,
        mut upstream: H::Stream,
    ) {
        let start = Instant::now();
        // When a byte last moved either way, in ms since `start`.
        let last_active = Arc::new(AtomicU64::new(0));
        let (outcome, from_peer, to_peer) = match down {
            Err(e) => (Err(TunnelEnd::Respond(e)), 0, 0),
            Ok(mut io) => {
                io.track_activity(start, last_active.clone());
                let copy = super::copy_tunnel(&mut upstream, &mut io, self.copy_buffer);
                let idle = self.tunnel_idle_timeout;
                let outcome = until_idle(copy, start, &last_active, idle).await;
                if matches!(outcome, Err(TunnelEnd::Idle(_)))
                    && let Some(c) = &self.counters
                {
                    c.idle_tunnels_closed.fetch_add(1, Ordering::Relaxed);
                }
                (outcome, io.read, io.written)
            }
        };
        self.stats
            .bytes_from_peer
            .fetch_add(from_peer, Ordering::Relaxed);
        self.stats
            .bytes_to_peer
            .fetch_add(to_peer, Ordering::Relaxed);
        let closed = TunnelClosed {
            target,
            peer_certificates: self.peer_certificates.clone(),
            bytes_from_peer: from_peer,
            bytes_to_peer: to_peer,
            duration: start.elapsed(),
            error: outcome.err().map(|e| e.to_string()),
        };
        info!(
            dst = %target,
            bytes_from_peer = from_peer,
            bytes_to_peer = to_peer,
            duration_ms = closed.duration.as_millis() as u64,
            error = closed.error.as_deref(),
            "hbone: tunnel closed"
        );
        self.handler.closed(upstream, &closed);
    }
}

/// Why a tunnel's copy ended early.
#[derive(Debug, thiserror::Error)]
enum TunnelEnd {
    #[error("answering 200: {0}")]
    Respond(#[source] h2::Error),
    #[error("{0}")]
    Copy(#[source] io::Error),
    #[error("idle: no byte either way for {0:?}; closed")]
    Idle(Duration),
}

/// Runs `copy` until it ends, or until no byte has moved (`last_active`,
/// ms since `start`) for `idle`: then the copy is dropped, which closes
/// both ends.
async fn until_idle<F, T>(
    copy: F,
    start: Instant,
    last_active: &AtomicU64,
    idle: Duration,
) -> Result<(), TunnelEnd>
where
    F: Future<Output = io::Result<T>>,
{
    let mut copy = std::pin::pin!(copy);
    loop {
        let last = start + Duration::from_millis(last_active.load(Ordering::Relaxed));
        tokio::select! {
            res = copy.as_mut() => return res.map(drop).map_err(TunnelEnd::Copy),
            () = tokio::time::sleep_until(last + idle) => {
                let last = start + Duration::from_millis(last_active.load(Ordering::Relaxed));
                if last + idle <= Instant::now() {
                    return Err(TunnelEnd::Idle(idle));
                }
            }
        }
    }
}
