//! The CA's HTTPS endpoint (hyper 1, HTTP/1.1 over TLS 1.3).
//!
//! Every wait has a bound: the TLS handshake and the first request (one
//! budget, [`ListenerLimits::handshake_timeout`]), each later request's
//! headers, the request body, and the drain at shutdown. Connections are
//! capped in all and per peer address ([`ListenerLimits`]); a connection
//! over a cap is reset at once, before TLS.

mod caps;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_core::ca::{
    ErrorResponse, MAX_REQUEST_BYTES, METRICS_PATH, SIGN_PATH, TRUST_BUNDLE_PATH,
    TrustBundleResponse,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use caps::{CapExceeded, ConnectionCaps, Permit};

use crate::{Ca, CaError, Credential, Refusal};

const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds of one CA listener against clients that connect and then stall
/// or flood before they have authenticated (the node's Bearer token comes
/// in the first request). Check with [`ListenerLimits::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    /// The TLS handshake and the first request's headers must both be in
    /// this long after the accept, or the socket is closed; later requests
    /// on the connection get as long for their headers (which also bounds
    /// an idle keep-alive connection). Default 3 s: a handshake and a
    /// request take a few milliseconds, and the proxies' CA client retries
    /// with backoff, so only stalled clients lose.
    pub handshake_timeout: Duration,
    /// Connections open at once, in all. Default 1024: a node proxy opens
    /// one short connection per certificate request (signing takes ~0.1
    /// ms), so 1024 is room for a thousand nodes renewing at the same
    /// instant, and a few KiB each before authentication.
    pub max_connections: usize,
    /// Connections open at once from one source IP address. Default 64: a
    /// node rarely has more than a few requests in flight (enrolling a
    /// burst of pods at most), and one address can then hold at most 1/16
    /// of the global cap, so a stuck or hostile peer cannot lock the
    /// others out.
    pub max_connections_per_peer: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            handshake_timeout: Duration::from_secs(3),
            max_connections: 1024,
            max_connections_per_peer: 64,
        }
    }
}

/// The longest handshake budget [`ListenerLimits::validate`] accepts.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

impl ListenerLimits {
    /// Checks every value, naming the bad one.
    pub fn validate(&self) -> Result<(), CaError> {
        let bad = |what: &str, value: String, reason: String| {
            Err(CaError::Config(format!("{what} {value}: {reason}")))
        };
        if self.handshake_timeout.is_zero() || self.handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
            return bad(
                "handshake timeout",
                format!("{:?}", self.handshake_timeout),
                format!("must be over 0 and at most {MAX_HANDSHAKE_TIMEOUT:?}"),
            );
        }
        if self.max_connections == 0 {
            return bad("max connections", "0".into(), "must be at least 1".into());
        }
        if self.max_connections_per_peer == 0 {
            return bad(
                "max connections per peer",
                "0".into(),
                "must be at least 1".into(),
            );
        }
        if self.max_connections_per_peer > self.max_connections {
            return bad(
                "max connections per peer",
                self.max_connections_per_peer.to_string(),
                format!("over max connections {}", self.max_connections),
            );
        }
        Ok(())
    }
}

/// What a listener's limits have done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Connections admitted and not yet closed.
    pub open: usize,
    /// Reset at accept: the global cap was reached.
    pub refused_total_cap: u64,
    /// Reset at accept: the peer address was at its cap.
    pub refused_per_peer_cap: u64,
    /// Closed because the TLS handshake or the first request did not
    /// arrive within the budget.
    pub handshake_timeouts: u64,
}

/// A running CA listener. Dropping it does not stop it; call
/// [`CaServer::shutdown`].
#[derive(Debug)]
pub struct CaServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    caps: Arc<ConnectionCaps>,
    handshake_timeouts: Arc<AtomicU64>,
}

impl CaServer {
    /// Binds `addr` and serves the CA API over TLS, with the default
    /// [`ListenerLimits`].
    pub async fn bind(ca: Ca, addr: SocketAddr) -> Result<CaServer, CaError> {
        Self::bind_with(ca, addr, &ListenerLimits::default()).await
    }

    /// Binds `addr` and serves the CA API over TLS within `limits`.
    pub async fn bind_with(
        ca: Ca,
        addr: SocketAddr,
        limits: &ListenerLimits,
    ) -> Result<CaServer, CaError> {
        let tls = ca.tls_server_config()?;
        Self::start(ca, addr, Some(tokio_rustls::TlsAcceptor::from(tls)), limits).await
    }

    /// Binds `addr` and serves only `/metrics`, in plain HTTP (for scrapers
    /// that do not hold the mesh's root).
    pub async fn bind_metrics(ca: Ca, addr: SocketAddr) -> Result<CaServer, CaError> {
        Self::bind_metrics_with(ca, addr, &ListenerLimits::default()).await
    }

    /// [`CaServer::bind_metrics`] within `limits` (the budget covers the
    /// first request).
    pub async fn bind_metrics_with(
        ca: Ca,
        addr: SocketAddr,
        limits: &ListenerLimits,
    ) -> Result<CaServer, CaError> {
        Self::start(ca, addr, None, limits).await
    }

    async fn start(
        ca: Ca,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        limits: &ListenerLimits,
    ) -> Result<CaServer, CaError> {
        limits.validate()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| CaError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| CaError::Bind { addr, source })?;
        let (shutdown, rx) = watch::channel(false);
        tracing::info!(
            addr = %local_addr,
            tls = tls.is_some(),
            handshake_timeout = ?limits.handshake_timeout,
            max_connections = limits.max_connections,
            max_connections_per_peer = limits.max_connections_per_peer,
            "CA listening"
        );
        let listening = Listening {
            ca,
            tls,
            caps: ConnectionCaps::new(limits.max_connections, limits.max_connections_per_peer),
            budget: limits.handshake_timeout,
            handshake_timeouts: Arc::new(AtomicU64::new(0)),
        };
        let (caps, handshake_timeouts) =
            (listening.caps.clone(), listening.handshake_timeouts.clone());
        let task = tokio::spawn(accept_loop(listening, listener, rx));
        Ok(CaServer {
            local_addr,
            shutdown,
            task,
            caps,
            handshake_timeouts,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Open connections and what the limits refused or closed so far.
    pub fn connections(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.caps.open(),
            refused_total_cap: self.caps.refused_total(),
            refused_per_peer_cap: self.caps.refused_per_peer(),
            handshake_timeouts: self.handshake_timeouts.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, lets open requests finish (bounded), and returns
    /// once the listener is closed.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "CA accept loop ended abnormally");
        }
    }
}

/// What every connection of one listener shares.
#[derive(Clone)]
struct Listening {
    ca: Ca,
    tls: Option<tokio_rustls::TlsAcceptor>,
    caps: Arc<ConnectionCaps>,
    budget: Duration,
    handshake_timeouts: Arc<AtomicU64>,
}

async fn accept_loop(
    listening: Listening,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match listening.caps.try_admit(peer.ip()) {
            Ok(p) => p,
            Err(cap) => {
                // A reset: no TIME_WAIT left here, and the client knows at once.
                let _ = tcp.set_zero_linger();
                tracing::debug!(%peer, %cap, "connection refused: over the cap");
                continue;
            }
        };
        let listening = listening.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            serve_connection(listening, tcp, peer, shutdown).await;
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(open = conns.len(), "drain timed out; aborting connections");
        conns.abort_all();
    }
}

async fn serve_connection(
    listening: Listening,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    // One budget for the TLS handshake and the first request together.
    let deadline = Instant::now() + listening.budget;
    match listening.tls.clone() {
        Some(acceptor) => {
            let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    listening.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, budget = ?listening.budget, "TLS handshake timed out; closing");
                    return;
                }
            };
            http_connection(&listening, TokioIo::new(stream), peer, deadline, shutdown).await;
        }
        None => http_connection(&listening, TokioIo::new(tcp), peer, deadline, shutdown).await,
    }
}

async fn http_connection<I>(
    listening: &Listening,
    io: I,
    peer: SocketAddr,
    first_request_by: Instant,
    mut shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let is_tls = listening.tls.is_some();
    let requested = Arc::new(AtomicBool::new(false));
    let service = service_fn({
        let (ca, requested) = (listening.ca.clone(), requested.clone());
        move |req| {
            requested.store(true, Ordering::Relaxed);
            let ca = ca.clone();
            async move { Ok::<_, Infallible>(handle(ca, req, peer, is_tls).await) }
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(listening.budget)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut waiting_first = true;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                break conn.as_mut().await;
            }
            () = tokio::time::sleep_until(first_request_by), if waiting_first => {
                waiting_first = false;
                if !requested.load(Ordering::Relaxed) {
                    listening.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, budget = ?listening.budget, "no request within the budget; closing");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Routes one request. Public so tests and embedders can drive the API
/// without a socket.
pub async fn handle(
    ca: Ca,
    req: Request<Incoming>,
    peer: SocketAddr,
    is_tls: bool,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method, path.as_str(), is_tls) {
        (Method::GET, METRICS_PATH, _) => text(StatusCode::OK, ca.metrics().render()),
        (Method::GET, TRUST_BUNDLE_PATH, true) => {
            let body = TrustBundleResponse {
                trust_domain: ca.config().trust_domain.clone(),
                roots: ca.trust_bundle_pem(),
            };
            json(StatusCode::OK, &body)
        }
        (Method::POST, SIGN_PATH, true) => match sign(&ca, req, peer).await {
            Ok(resp) => resp,
            Err(refusal) => {
                ca.metrics().refused(refusal.reason);
                refuse(&refusal)
            }
        },
        (_, METRICS_PATH | TRUST_BUNDLE_PATH | SIGN_PATH, true) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The sign endpoint up to the point [`Ca::sign`] takes over. Refusals
/// returned from here are counted by the caller; those from `Ca::sign`
/// are counted there.
async fn sign(
    ca: &Ca,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let credential = bearer(&req).ok_or_else(|| {
        Refusal::new(
            401,
            "missing_credentials",
            "no Authorization: Bearer header",
        )
    })?;
    let caller = ca
        .authenticate(&credential)
        .await
        .inspect_err(|r| log_refusal(peer, "-", None, r))?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > MAX_REQUEST_BYTES as u64) {
        let r = Refusal::new(413, "body_too_large", format!("content-length {len}"));
        log_refusal(peer, &caller.node, None, &r);
        return Err(r);
    }
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_REQUEST_BYTES).collect(),
    )
    .await;
    let body = match body {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            let r = if e.is::<http_body_util::LengthLimitError>() {
                Refusal::new(
                    413,
                    "body_too_large",
                    format!("over {MAX_REQUEST_BYTES} bytes"),
                )
            } else {
                Refusal::new(400, "malformed_request", format!("reading body: {e}"))
            };
            log_refusal(peer, &caller.node, None, &r);
            return Err(r);
        }
        Err(_) => {
            let r = Refusal::new(400, "malformed_request", "body not received in time");
            log_refusal(peer, &caller.node, None, &r);
            return Err(r);
        }
    };
    let request = mesh_core::ca::decode_sign_request(&body).map_err(|e| {
        // serde_json quotes input raw (``unknown field `…` ``): the
        // envelope error the CSR decoder gives is bounded and escaped.
        let e = crate::csr::DecodeRequestError::from(e);
        let r = Refusal::new(400, "malformed_request", e.to_string());
        log_refusal(peer, &caller.node, None, &r);
        r
    })?;
    match ca.sign(&caller, &request) {
        Ok(resp) => {
            tracing::info!(
                %peer,
                node = %caller.node,
                identity = %resp.identity,
                serial = %resp.serial,
                not_after = resp.not_after,
                "certificate issued"
            );
            Ok(json(StatusCode::OK, &resp))
        }
        Err(r) => {
            log_refusal(peer, &caller.node, Some(&request.identity.to_string()), &r);
            // Already counted by Ca::sign.
            Ok(refuse(&r))
        }
    }
}

fn log_refusal(peer: SocketAddr, node: &str, identity: Option<&str>, r: &Refusal) {
    tracing::warn!(
        %peer,
        node,
        identity = identity.unwrap_or("-"),
        status = r.status,
        reason = r.reason,
        detail = %r.detail,
        "sign request refused"
    );
}

fn bearer(req: &Request<Incoming>) -> Option<Credential> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| Credential::Bearer(token.to_owned()))
}

fn refuse(r: &Refusal) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, r.public_text())
}

fn error(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorResponse {
            error: text.to_owned(),
        },
    )
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(bytes) => response(status, "application/json", bytes.into()),
        Err(e) => response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding response: {e}").into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(
        status,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body.into(),
    )
}

fn response(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}
