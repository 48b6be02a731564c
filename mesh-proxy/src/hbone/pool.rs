//! The HBONE client: pooled HTTP/2 connections, one `CONNECT` stream per
//! tunnel.
//!
//! Connections are keyed by [`PoolKey`] (source identity, destination proxy
//! address): a connection authenticates as one source workload, so it can
//! only carry that workload's tunnels. A connection carries up to
//! [`H2Config::max_streams_per_conn`] tunnels at once; past that, or when
//! none is alive (closed, or the server sent GOAWAY), the pool opens
//! another through the [`Connector`]. Concurrent tunnels to a new key wait
//! for one dial instead of each opening a connection. A connection without
//! tunnels for [`H2Config::idle_timeout`] is closed.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode, Version};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, warn};

use super::stream::H2Stream;
use super::{ALPN_H2, H2Config, HboneError};

/// Which connections a tunnel may share: same source identity, same
/// destination proxy.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source workload's SPIFFE ID (its certificate is presented).
    pub identity: Arc<str>,
    /// The destination proxy: the destination pod's IP, port 15008.
    pub dest: SocketAddr,
}

impl PoolKey {
    pub fn new(identity: impl Into<Arc<str>>, dest: SocketAddr) -> Self {
        PoolKey {
            identity: identity.into(),
            dest,
        }
    }
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.identity, self.dest)
    }
}

impl fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a [`Connector`] will not make or accept a connection (its own error
/// type, boxed: the pool only reports it).
pub type ConnectorError = Box<dyn std::error::Error + Send + Sync>;

/// How the pool makes a new connection; the proxy implements it.
pub trait Connector: Send + Sync + 'static {
    /// The TCP connection to `key.dest`. The proxy makes the socket itself:
    /// inside the source pod's netns, with its `SO_MARK`. (The pool sets
    /// `TCP_NODELAY`.)
    fn dial(&self, key: &PoolKey) -> impl Future<Output = io::Result<TcpStream>> + Send;

    /// The TLS client configuration presenting `key.identity`'s certificate,
    /// and the server name to send. Asked once per new connection, so a
    /// renewed certificate is used from the next connection on. The pool
    /// adds ALPN `h2` if the configuration lacks it.
    fn tls(
        &self,
        key: &PoolKey,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), ConnectorError>;

    /// Checks the server's certificate chain (leaf first) once per new
    /// connection, after the handshake and before the connection is pooled:
    /// e.g. that its SPIFFE ID is the one the destination must have. `Err`
    /// closes the connection. The default accepts what the TLS verifier
    /// accepted.
    fn verify(
        &self,
        key: &PoolKey,
        peer_certificates: &[CertificateDer<'static>],
    ) -> Result<(), ConnectorError> {
        let _ = (key, peer_certificates);
        Ok(())
    }
}

/// A pool of HBONE connections. Cheap to clone; clones share connections.
pub struct Pool<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<C> {
    connector: C,
    config: H2Config,
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    next_id: AtomicU64,
}

/// The connections of one key.
#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// Held while dialing, so concurrent tunnels share one new connection.
    dialing: tokio::sync::Mutex<()>,
}

struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Tunnels open on the connection.
    streams: AtomicUsize,
    /// Checkouts so far; the idle check compares it across ticks.
    uses: AtomicU64,
    /// No new tunnel may use it (driver ended, GOAWAY, refused stream).
    closed: AtomicBool,
}

impl PooledConn {
    fn usable(&self, max_streams: usize) -> bool {
        !self.state.closed.load(Ordering::Acquire)
            && self.state.streams.load(Ordering::Acquire) < max_streams
    }
}

/// One open stream of a connection; releases it on drop.
struct StreamGuard(Arc<ConnState>);

impl StreamGuard {
    fn new(state: &Arc<ConnState>) -> Self {
        state.streams.fetch_add(1, Ordering::AcqRel);
        state.uses.fetch_add(1, Ordering::Relaxed);
        StreamGuard(state.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> parking_lot::MutexGuard<'_, T> {
    m.lock()
}

impl Slot {
    /// The usable connection with the fewest tunnels, with a stream
    /// reserved on it. Forgets dead connections.
    fn pick(&self, max_streams: usize) -> Option<(Arc<PooledConn>, StreamGuard)> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| !c.state.closed.load(Ordering::Acquire));
        let best = conns
            .iter()
            .filter(|c| c.usable(max_streams))
            .min_by_key(|c| c.state.streams.load(Ordering::Acquire))?
            .clone();
        let guard = StreamGuard::new(&best.state);
        Some((best, guard))
    }
}

/// An open tunnel: a bidirectional byte stream to the target. Shut down
/// the write side to half-close (HTTP/2 END_STREAM); reads end when the
/// peer half-closes.
pub struct TunnelStream {
    io: H2Stream,
    target: SocketAddr,
    conn_id: u64,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    _guard: StreamGuard,
}

impl fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelStream")
            .field("target", &self.target)
            .field("conn_id", &self.conn_id)
            .finish_non_exhaustive()
    }
}

impl TunnelStream {
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The destination proxy's certificate chain, leaf first.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    /// Which pooled connection carries the tunnel (unique within a pool).
    pub fn connection_id(&self) -> u64 {
        self.conn_id
    }

    /// The HTTP/2 stream, for the relay that moves `Bytes` through it
    /// without copying ([`super::copy::copy_tunnel`]).
    pub fn stream_mut(&mut self) -> &mut H2Stream {
        &mut self.io
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Why a `CONNECT` failed, and whether another connection may succeed.
enum Attempt {
    /// The server never processed the request (GOAWAY, refused stream,
    /// connection gone before it was sent): safe to retry elsewhere.
    Retry(HboneError),
    Fail(HboneError),
}

impl<C: Connector> Pool<C> {
    pub fn new(connector: C, config: H2Config) -> Self {
        Pool {
            inner: Arc::new(Inner {
                connector,
                config,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    pub fn connector(&self) -> &C {
        &self.inner.connector
    }

    /// Live pooled connections, all keys.
    pub fn connection_count(&self) -> usize {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).values().cloned().collect();
        slots
            .iter()
            .map(|s| {
                lock(&s.conns)
                    .iter()
                    .filter(|c| !c.state.closed.load(Ordering::Acquire))
                    .count()
            })
            .sum()
    }

    /// Opens a tunnel to `target` through the destination proxy of `key`,
    /// reusing a pooled connection when one is alive. Succeeds once the
    /// proxy answered `200`; any other answer is [`HboneError::Status`].
    pub async fn connect(
        &self,
        key: &PoolKey,
        target: SocketAddr,
    ) -> Result<TunnelStream, HboneError> {
        let (conn, guard) = self.checkout(key).await?;
        match self.request(key, &conn, guard, target).await {
            Ok(stream) => Ok(stream),
            Err(Attempt::Fail(e)) => Err(e),
            Err(Attempt::Retry(e)) => {
                debug!(pool = %key, conn = conn.id, error = %e, "hbone: connection going away; retrying on another");
                conn.state.closed.store(true, Ordering::Release);
                let (conn, guard) = self.checkout(key).await?;
                self.request(key, &conn, guard, target)
                    .await
                    .map_err(|(Attempt::Retry(e) | Attempt::Fail(e))| e)
            }
        }
    }

    async fn request(
        &self,
        key: &PoolKey,
        conn: &PooledConn,
        guard: StreamGuard,
        target: SocketAddr,
    ) -> Result<TunnelStream, Attempt> {
        let dest = key.dest;
        let timeout = self.inner.config.open_timeout;
        let req = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(target.to_string())
            .body(())
            .map_err(|e| {
                Attempt::Fail(HboneError::Config {
                    dest,
                    identity: key.identity.to_string(),
                    source: format!("CONNECT {target}: {e}").into(),
                })
            })?;
        let send = conn.send.clone();
        // Errors before the request is on the wire (connection gone or
        // going away) may be retried; after, only those that say the
        // server did not process it.
        let open = async {
            let mut send = send.ready().await.map_err(|e| (true, e))?;
            let (response, stream) = send.send_request(req, false).map_err(|e| (true, e))?;
            let res = response.await.map_err(|e| (never_processed(&e), e))?;
            Ok::<_, (bool, h2::Error)>((res, stream))
        };
        let (res, stream) = match tokio::time::timeout(timeout, open).await {
            Err(_) => {
                return Err(Attempt::Fail(HboneError::Timeout {
                    dest,
                    what: "CONNECT response",
                    after: timeout,
                }));
            }
            Ok(Err((retry, source))) => {
                let e = HboneError::Request {
                    dest,
                    target,
                    source,
                };
                return Err(if retry {
                    Attempt::Retry(e)
                } else {
                    Attempt::Fail(e)
                });
            }
            Ok(Ok(r)) => r,
        };
        if res.status() != StatusCode::OK {
            return Err(Attempt::Fail(HboneError::Status {
                dest,
                target,
                status: res.status(),
            }));
        }
        Ok(TunnelStream {
            io: H2Stream::new(stream, res.into_body()),
            target,
            conn_id: conn.id,
            peer_certificates: conn.peer_certificates.clone(),
            _guard: guard,
        })
    }

    async fn checkout(&self, key: &PoolKey) -> Result<(Arc<PooledConn>, StreamGuard), HboneError> {
        let max = self.inner.config.max_streams_per_conn.max(1);
        let slot = lock(&self.inner.slots)
            .entry(key.clone())
            .or_default()
            .clone();
        if let Some(found) = slot.pick(max) {
            return Ok(found);
        }
        let wait = self.inner.config.connect_timeout;
        let Ok(_dialing) = tokio::time::timeout(wait, slot.dialing.lock()).await else {
            return Err(HboneError::Timeout {
                dest: key.dest,
                what: "wait for another dial",
                after: wait,
            });
        };
        // Another task may have dialed while we waited.
        if let Some(found) = slot.pick(max) {
            return Ok(found);
        }
        let conn = Arc::new(self.open(key, &slot).await?);
        let guard = StreamGuard::new(&conn.state);
        lock(&slot.conns).push(conn.clone());
        Ok((conn, guard))
    }

    /// Dial, TLS, verify, HTTP/2 handshake; spawns the connection's driver.
    async fn open(&self, key: &PoolKey, slot: &Arc<Slot>) -> Result<PooledConn, HboneError> {
        let inner = &self.inner;
        let dest = key.dest;
        let config_err = |source| HboneError::Config {
            dest,
            identity: key.identity.to_string(),
            source,
        };
        let (tls, server_name) = inner.connector.tls(key).map_err(config_err)?;
        let tls = with_h2_alpn(tls);
        let c = &inner.config;
        let handshake = async {
            let tcp = inner
                .connector
                .dial(key)
                .await
                .map_err(|source| HboneError::Dial { dest, source })?;
            if let Err(e) = tcp.set_nodelay(true) {
                warn!(pool = %key, error = %e, "hbone: TCP_NODELAY");
            }
            let mut tls = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, super::buffer_reads(tcp))
                .await
                .map_err(|source| HboneError::Tls { dest, source })?;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(super::server::TLS_WRITE_BUFFER));
            let session = tls.get_ref().1;
            if session.alpn_protocol() != Some(ALPN_H2) {
                return Err(HboneError::Alpn {
                    dest,
                    alpn: session
                        .alpn_protocol()
                        .map(|a| String::from_utf8_lossy(a).into_owned()),
                });
            }
            let peer: Arc<[CertificateDer<'static>]> = session
                .peer_certificates()
                .unwrap_or_default()
                .iter()
                .map(|c| c.clone().into_owned())
                .collect();
            inner
                .connector
                .verify(key, &peer)
                .map_err(|source| HboneError::PeerRejected { dest, source })?;
            let mut builder = h2::client::Builder::new();
            builder
                .initial_window_size(c.stream_window)
                .initial_connection_window_size(c.connection_window)
                .max_frame_size(c.max_frame_size)
                .max_send_buffer_size(c.max_send_buf_size)
                .max_header_list_size(16 * 1024)
                .enable_push(false);
            let (send, conn) = builder
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| HboneError::Handshake { dest, source })?;
            Ok((send, conn, peer))
        };
        let (send, mut conn, peer_certificates) =
            match tokio::time::timeout(c.connect_timeout, handshake).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(HboneError::Timeout {
                        dest,
                        what: "connect (dial, TLS, HTTP/2 handshake)",
                        after: c.connect_timeout,
                    });
                }
            };
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        info!(pool = %key, conn = id, "hbone: connection opened");
        let keepalive =
            super::keepalive(conn.ping_pong(), c.keepalive_interval, c.keepalive_timeout);
        let driver = drive(
            conn,
            keepalive,
            state.clone(),
            Arc::downgrade(slot),
            Arc::downgrade(inner),
            key.clone(),
            id,
            c.idle_timeout,
        );
        tokio::spawn(driver.in_current_span());
        Ok(PooledConn {
            id,
            send,
            peer_certificates,
            state,
        })
    }
}

/// Runs one connection until it ends or idles out, then takes it out of
/// its slot (and the slot out of the pool when it is left empty).
#[allow(clippy::too_many_arguments)]
async fn drive<F, K, C>(
    conn: F,
    keepalive: K,
    state: Arc<ConnState>,
    slot: Weak<Slot>,
    pool: Weak<Inner<C>>,
    key: PoolKey,
    id: u64,
    idle_timeout: std::time::Duration,
) where
    F: Future<Output = Result<(), h2::Error>>,
    K: Future<Output = String>,
{
    let mut conn = std::pin::pin!(conn);
    let mut keepalive = std::pin::pin!(keepalive);
    let mut tick = tokio::time::interval(idle_timeout);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut uses_seen = state.uses.load(Ordering::Relaxed);
    let why = loop {
        tokio::select! {
            res = conn.as_mut() => break match res {
                Ok(()) => "closed".to_owned(),
                Err(e) => format!("error: {e}"),
            },
            why = keepalive.as_mut() => break why,
            _ = tick.tick() => {
                let Some(slot) = slot.upgrade() else { continue };
                // Checkouts reserve a stream under this lock, so nothing
                // can start using the connection while we retire it.
                let conns = lock(&slot.conns);
                let uses = state.uses.load(Ordering::Relaxed);
                if state.streams.load(Ordering::Acquire) == 0 && uses == uses_seen {
                    state.closed.store(true, Ordering::Release);
                    drop(conns);
                    break "idle".to_owned();
                }
                uses_seen = uses;
            }
        }
    };
    state.closed.store(true, Ordering::Release);
    info!(pool = %key, conn = id, reason = %why, "hbone: connection closed");
    let Some(slot) = slot.upgrade() else { return };
    let now_empty = {
        let mut conns = lock(&slot.conns);
        conns.retain(|c| c.id != id);
        conns.is_empty()
    };
    if now_empty && let Some(pool) = pool.upgrade() {
        let mut slots = lock(&pool.slots);
        // Only the map and our `slot` hold it: nobody is checking out.
        if Arc::strong_count(&slot) == 2 && lock(&slot.conns).is_empty() {
            slots.remove(&key);
        }
    }
}

/// True when the server cannot have acted on the request: retrying it on
/// another connection is safe.
fn never_processed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

fn with_h2_alpn(tls: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    if tls.alpn_protocols.iter().any(|p| p == ALPN_H2) {
        return tls;
    }
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}
