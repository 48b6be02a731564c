//! The HBONE server: one accepted mTLS connection, many tunnels.
//!
//! The caller accepts TCP on 15008 and does the TLS handshake with its own
//! `rustls::ServerConfig` (client certificates required, ALPN `h2`), then
//! hands the stream to [`serve`]. Each `CONNECT` stream with a valid
//! authority becomes a [`Tunnel`] given to the [`Handler`], which applies
//! policy and opens the upstream (the app socket); its answer decides the
//! status: `200` and a byte copy both ways, or the [`Refusal`]'s status.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{ALPN_H2, H2Config, HboneError, parse_authority};

/// rustls reads the socket 4 KiB at a time; under a 16 KiB record stream
/// that is several `read` syscalls per record. A user-space read buffer
/// below TLS turns them into one large read.
pub const TLS_READ_BUFFER: usize = 256 * 1024;

/// Wraps the socket under TLS in a large read buffer ([`TLS_READ_BUFFER`]).
/// Use it below the TLS accept (the pool does it on the client side).
pub fn buffer_reads<S: AsyncRead>(io: S) -> BufReader<S> {
    BufReader::with_capacity(TLS_READ_BUFFER, io)
}

/// The TLS accept of an HBONE connection, as [`serve`] wants it:
/// `TCP_NODELAY`, a read buffer under TLS, a bounded handshake. The
/// caller's `acceptor` must require client certificates and offer ALPN h2.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<BufReader<TcpStream>>, HboneError> {
    let peer = tcp.peer_addr().ok();
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(?peer, error = %e, "hbone: TCP_NODELAY");
    }
    match tokio::time::timeout(timeout, acceptor.accept(buffer_reads(tcp))).await {
        Ok(Ok(tls)) => Ok(tls),
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

    /// Called once per tunnel that was opened, when its copy ends.
    fn closed(&self, closed: &TunnelClosed) {
        let _ = closed;
    }
}

impl<H: Handler> Handler for Arc<H> {
    type Stream = H::Stream;

    fn open(&self, tunnel: Tunnel) -> impl Future<Output = Result<Self::Stream, Refusal>> + Send {
        (**self).open(tunnel)
    }

    fn closed(&self, closed: &TunnelClosed) {
        (**self).closed(closed)
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
    stats: Arc<Stats>,
    /// Each tunnel's copy task holds a clone; [`serve`] waits until all
    /// are gone.
    tasks: mpsc::Sender<Infallible>,
}

type Body = Empty<Bytes>;

fn status(code: StatusCode) -> Response<Body> {
    let mut res = Response::new(Empty::new());
    *res.status_mut() = code;
    res
}

/// Runs HBONE on one accepted mTLS connection until the peer closes it, or
/// until `drain` completes and every tunnel open by then has finished
/// (HTTP/2 GOAWAY: no new streams). Returns once every tunnel's copy has
/// ended. Bound the whole call with a timeout to cap a drain.
///
/// The TLS session must have negotiated ALPN `h2`. Accept with [`accept`]
/// (or do what it does: `TCP_NODELAY`, [`buffer_reads`] under TLS). Run it
/// inside a span naming the peer.
pub async fn serve<S, H, D>(
    tls: tokio_rustls::server::TlsStream<S>,
    handler: H,
    drain: D,
    config: &H2Config,
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
    let conn = Arc::new(Conn {
        handler,
        peer_certificates,
        copy_buffer: config.copy_buffer,
        open_timeout: config.open_timeout,
        stats: stats.clone(),
        tasks,
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.request(req).await) }
    });

    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .adaptive_window(config.adaptive_window)
        .max_frame_size(config.max_frame_size)
        .max_send_buf_size(config.max_send_buf_size)
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout);
    let mut http = Box::pin(builder.serve_connection(TokioIo::new(tls), service));

    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    let result = loop {
        tokio::select! {
            res = http.as_mut() => break res,
            () = &mut drain, if !draining => {
                debug!("hbone: draining connection (GOAWAY)");
                draining = true;
                http.as_mut().graceful_shutdown();
            }
        }
    };
    // The service (and its task sender) lives in the connection.
    drop(http);
    // Every copy task holds a sender; `None` once the last has finished.
    let _ = tasks_done.recv().await;

    let summary = ServeSummary {
        tunnels: stats.tunnels.load(Ordering::Relaxed),
        refused: stats.refused.load(Ordering::Relaxed),
        bytes_from_peer: stats.bytes_from_peer.load(Ordering::Relaxed),
        bytes_to_peer: stats.bytes_to_peer.load(Ordering::Relaxed),
    };
    match result {
        Ok(()) => Ok(summary),
        Err(source) => Err(HboneError::Serve { source }),
    }
}

impl<H: Handler> Conn<H> {
    async fn request(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::CONNECT {
            warn!(method = %req.method(), uri = %req.uri(), "hbone: refused non-CONNECT request");
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let mut res = status(StatusCode::METHOD_NOT_ALLOWED);
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("CONNECT"));
            return res;
        }
        let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let target = match parse_authority(authority) {
            Ok(t) => t,
            Err(error) => {
                warn!(%error, "hbone: refused CONNECT");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return status(StatusCode::BAD_REQUEST);
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let tunnel = Tunnel {
            target,
            peer_certificates: self.peer_certificates.clone(),
            headers: std::mem::take(req.headers_mut()),
        };
        let upstream = match tokio::time::timeout(self.open_timeout, self.handler.open(tunnel))
            .await
        {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(refusal)) => {
                info!(dst = %target, %refusal, "hbone: tunnel refused");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return status(refusal.status());
            }
            Err(_) => {
                warn!(dst = %target, after = ?self.open_timeout, "hbone: opening upstream timed out");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return status(StatusCode::GATEWAY_TIMEOUT);
            }
        };
        self.stats.tunnels.fetch_add(1, Ordering::Relaxed);
        let conn = self.clone();
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move { conn.copy(target, upgrade, upstream).await },
            span,
        ));
        status(StatusCode::OK)
    }

    async fn copy(
        self: Arc<Self>,
        target: SocketAddr,
        upgrade: hyper::upgrade::OnUpgrade,
        mut upstream: H::Stream,
    ) {
        let _task = self.tasks.clone();
        let start = Instant::now();
        let mut down = None;
        let outcome = match tokio::time::timeout(self.open_timeout, upgrade).await {
            Err(_) => Err(format!("upgrade timed out after {:?}", self.open_timeout)),
            Ok(Err(e)) => Err(format!("upgrade: {e}")),
            Ok(Ok(upgraded)) => {
                let io = down.insert(Counted::new(TokioIo::new(upgraded)));
                tokio::io::copy_bidirectional_with_sizes(
                    io,
                    &mut upstream,
                    self.copy_buffer,
                    self.copy_buffer,
                )
                .await
                .map(drop)
                .map_err(|e| e.to_string())
            }
        };
        let (from_peer, to_peer) = down.as_ref().map_or((0, 0), |d| (d.read, d.written));
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
            error: outcome.err(),
        };
        info!(
            dst = %target,
            bytes_from_peer = from_peer,
            bytes_to_peer = to_peer,
            duration_ms = closed.duration.as_millis() as u64,
            error = closed.error.as_deref(),
            "hbone: tunnel closed"
        );
        self.handler.closed(&closed);
    }
}

/// Counts the bytes read from and written to a stream, so the counts
/// survive a copy that ends in an error.
pub(crate) struct Counted<T> {
    inner: T,
    pub(crate) read: u64,
    pub(crate) written: u64,
}

impl<T> Counted<T> {
    pub(crate) fn new(inner: T) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.written += n as u64;
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
