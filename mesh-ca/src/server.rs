//! The CA's HTTPS endpoint (hyper 1, HTTP/1.1 over TLS 1.3).
//!
//! Every wait has a bound: TLS handshake, request headers, request body,
//! and the drain at shutdown. Concurrent connections are capped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
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
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::{Ca, CaError, Credential, Refusal};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 1024;

/// A running CA listener. Dropping it does not stop it; call
/// [`CaServer::shutdown`].
#[derive(Debug)]
pub struct CaServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl CaServer {
    /// Binds `addr` and serves the CA API over TLS.
    pub async fn bind(ca: Ca, addr: SocketAddr) -> Result<CaServer, CaError> {
        let tls = ca.tls_server_config()?;
        Self::start(ca, addr, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    /// Binds `addr` and serves only `/metrics`, in plain HTTP (for scrapers
    /// that do not hold the mesh's root).
    pub async fn bind_metrics(ca: Ca, addr: SocketAddr) -> Result<CaServer, CaError> {
        Self::start(ca, addr, None).await
    }

    async fn start(
        ca: Ca,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<CaServer, CaError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| CaError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| CaError::Bind { addr, source })?;
        let (shutdown, rx) = watch::channel(false);
        tracing::info!(addr = %local_addr, tls = tls.is_some(), "CA listening");
        let task = tokio::spawn(accept_loop(ca, listener, tls, rx));
        Ok(CaServer {
            local_addr,
            shutdown,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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

async fn accept_loop(
    ca: Ca,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing");
            continue;
        };
        let ca = ca.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            serve_connection(ca, tcp, peer, tls, shutdown).await;
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
    ca: Ca,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    let is_tls = tls.is_some();
    match tls {
        Some(acceptor) => {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            http_connection(ca, TokioIo::new(stream), peer, is_tls, shutdown).await;
        }
        None => http_connection(ca, TokioIo::new(tcp), peer, is_tls, shutdown).await,
    }
}

async fn http_connection<I>(
    ca: Ca,
    io: I,
    peer: SocketAddr,
    is_tls: bool,
    mut shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let ca = ca.clone();
        async move { Ok::<_, Infallible>(handle(ca, req, peer, is_tls).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
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
