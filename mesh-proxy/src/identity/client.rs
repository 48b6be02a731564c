//! Talking to the CA: the [`CaClient`] trait and its HTTPS implementation.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use mesh_core::ca::{
    ErrorResponse, MAX_RESPONSE_BYTES, SIGN_PATH, SignRequest, SignResponse, TRUST_BUNDLE_PATH,
    TrustBundleResponse,
};
use mesh_core::identity::{Clock, SystemClock};
use rustls::pki_types::{CertificateDer, ServerName};

use super::ca_address::CaAddress;
use super::tls::ClockTime;

/// Why a call to the CA failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaClientError {
    #[error("CA {addr}: connect: {reason}")]
    Connect { addr: CaAddress, reason: String },
    #[error("CA {addr}: TLS: {reason}")]
    Tls { addr: CaAddress, reason: String },
    #[error("CA {addr}: HTTP: {reason}")]
    Http { addr: CaAddress, reason: String },
    #[error("CA {addr}: {path} answered {status}: {message}")]
    Status {
        addr: CaAddress,
        path: &'static str,
        status: u16,
        message: String,
    },
    #[error("CA {addr}: {path}: response does not decode: {reason}")]
    Decode {
        addr: CaAddress,
        path: &'static str,
        reason: String,
    },
    #[error("CA {addr}: no answer within {after:?}")]
    Timeout { addr: CaAddress, after: Duration },
    #[error("CA client configuration: {0}")]
    Config(String),
    #[error("CA token file {}: {reason}", path.display())]
    Token {
        path: std::path::PathBuf,
        reason: String,
    },
}

impl serde::Serialize for CaAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Bound on one connect attempt to one of the CA's addresses (the whole
/// call has its own, [`CaClientConfig::timeout`]).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(3);

impl CaAddress {
    /// A TCP connection to the CA: an IP directly; a host name resolved
    /// now (so a changed record is followed) and each of its addresses
    /// tried in turn until one answers.
    pub async fn connect(&self) -> Result<tokio::net::TcpStream, CaClientError> {
        let fail = |reason: String| CaClientError::Connect {
            addr: self.clone(),
            reason,
        };
        let (host, port) = match self {
            CaAddress::Ip(a) => {
                return tokio::net::TcpStream::connect(*a)
                    .await
                    .map_err(|e| fail(e.to_string()));
            }
            CaAddress::Host { host, port } => (host.as_str(), *port),
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| fail(format!("resolving {host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(fail(format!("{host} resolves to no address")));
        }
        let mut failures = Vec::with_capacity(addrs.len());
        for a in &addrs {
            match tokio::time::timeout(CONNECT_ATTEMPT, tokio::net::TcpStream::connect(a)).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => failures.push(format!("{a}: {e}")),
                Err(_) => failures.push(format!("{a}: no answer within {CONNECT_ATTEMPT:?}")),
            }
        }
        Err(fail(format!(
            "{host} resolves to {} addresses, none answered ({})",
            addrs.len(),
            failures.join("; ")
        )))
    }
}

/// The node's credential for the CA.
#[derive(Clone, PartialEq, Eq)]
pub enum Token {
    /// A fixed value.
    Value(String),
    /// A file read again for every request (trimmed), so a projected
    /// ServiceAccount token the kubelet rotates is picked up.
    File(std::path::PathBuf),
}

impl From<String> for Token {
    fn from(value: String) -> Self {
        Token::Value(value)
    }
}

/// Longest token file read (a projected token is ~1 KiB).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

impl Token {
    /// The value to send now.
    pub fn current(&self) -> Result<String, CaClientError> {
        match self {
            Token::Value(v) => Ok(v.clone()),
            Token::File(path) => {
                use std::io::Read;
                let bad = |reason: String| CaClientError::Token {
                    path: path.clone(),
                    reason,
                };
                let mut text = String::new();
                std::fs::File::open(path)
                    .map_err(|e| bad(e.to_string()))?
                    .take(MAX_TOKEN_BYTES + 1)
                    .read_to_string(&mut text)
                    .map_err(|e| bad(e.to_string()))?;
                if text.len() as u64 > MAX_TOKEN_BYTES {
                    return Err(bad(format!("longer than {MAX_TOKEN_BYTES} bytes")));
                }
                let token = text.trim();
                if token.is_empty() {
                    return Err(bad("empty".into()));
                }
                if let Some(c) = token.chars().find(|c| c.is_control() || c.is_whitespace()) {
                    return Err(bad(format!(
                        "holds {c:?}: not one token (whitespace or a control character inside)"
                    )));
                }
                Ok(token.to_owned())
            }
        }
    }
}

pub type CaFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CaClientError>> + Send + 'a>>;

/// What the certificate manager needs from a CA.
pub trait CaClient: Send + Sync + fmt::Debug {
    fn sign<'a>(&'a self, request: &'a SignRequest) -> CaFuture<'a, SignResponse>;
    fn trust_bundle(&self) -> CaFuture<'_, TrustBundleResponse>;
    /// The workload trust bundle changed (e.g. a root rotation began): a
    /// client that authenticates the CA with it should trust these roots too.
    fn update_trust(&self, _roots: &[CertificateDer<'static>]) {}
}

/// How to reach and authenticate to the CA.
#[derive(Clone)]
pub struct CaClientConfig {
    pub address: CaAddress,
    /// Name the CA's TLS certificate must carry (e.g. `mesh-ca`).
    pub server_name: String,
    /// Roots that vouch for the CA's TLS certificate (the trust bundle file).
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// This node's credential, sent as `Authorization: Bearer`.
    pub token: Token,
    /// Bound on one whole call (connect, handshake, request, response).
    pub timeout: Duration,
    /// Time the CA's certificate is judged by.
    pub clock: Arc<dyn Clock>,
}

impl fmt::Debug for CaClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClientConfig")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field("trust_anchors", &self.trust_anchors.len())
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl CaClientConfig {
    pub fn new(
        address: impl Into<CaAddress>,
        server_name: &str,
        trust_anchors: Vec<CertificateDer<'static>>,
        token: impl Into<Token>,
    ) -> Self {
        CaClientConfig {
            address: address.into(),
            server_name: server_name.to_owned(),
            trust_anchors,
            token: token.into(),
            timeout: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The CA over HTTPS (TLS 1.3, ring), one short connection per call.
pub struct HttpsCaClient {
    config: CaClientConfig,
    server_name: ServerName<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    tls: RwLock<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for HttpsCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsCaClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HttpsCaClient {
    pub fn new(config: CaClientConfig) -> Result<Self, CaClientError> {
        let server_name = ServerName::try_from(config.server_name.clone()).map_err(|_| {
            CaClientError::Config(format!(
                "CA server name {:?} is not a DNS name or IP",
                config.server_name
            ))
        })?;
        if config.trust_anchors.is_empty() {
            return Err(CaClientError::Config(
                "no trust anchors for the CA's certificate".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = tls_config(&provider, &config, &[])?;
        Ok(HttpsCaClient {
            config,
            server_name,
            provider,
            tls: RwLock::new(tls),
        })
    }

    /// One request to the CA, bounded by the configured timeout.
    async fn call(
        &self,
        method: Method,
        path: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, CaClientError> {
        let (addr, after) = (self.config.address.clone(), self.config.timeout);
        tokio::time::timeout(after, self.exchange(method, path, body))
            .await
            .map_err(|_| CaClientError::Timeout { addr, after })?
    }

    /// Connect, TLS, one HTTP/1 exchange (unbounded: see [`Self::call`]).
    async fn exchange(
        &self,
        method: Method,
        path: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, CaClientError> {
        let addr = &self.config.address;
        let token = self.config.token.current()?;
        let tcp = addr.connect().await?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.read().clone();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| CaClientError::Tls {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        let http_err = |e: &dyn fmt::Display| CaClientError::Http {
            addr: addr.clone(),
            reason: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_err(&e))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.config.server_name.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http_err(&e))?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(|e| http_err(&e))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| http_err(&e))?
                .to_bytes();
            if status != StatusCode::OK {
                let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                return Err(CaClientError::Status {
                    addr: addr.clone(),
                    path,
                    status: status.as_u16(),
                    message,
                });
            }
            Ok(bytes)
        }
        .await;
        driver.abort();
        result
    }
}

fn tls_config(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    config: &CaClientConfig,
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, CaClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) =
        roots.add_parsable_certificates(config.trust_anchors.iter().chain(extra).cloned());
    if added == 0 {
        return Err(CaClientError::Config(
            "none of the CA trust anchors parse as certificates".into(),
        ));
    }
    let mut tls = rustls::ClientConfig::builder_with_details(
        provider.clone(),
        Arc::new(ClockTime(config.clock.clone())),
    )
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| CaClientError::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

impl CaClient for HttpsCaClient {
    fn sign<'a>(&'a self, request: &'a SignRequest) -> CaFuture<'a, SignResponse> {
        Box::pin(async move {
            let addr = &self.config.address;
            let body = serde_json::to_vec(request).map_err(|e| CaClientError::Decode {
                addr: addr.clone(),
                path: SIGN_PATH,
                reason: e.to_string(),
            })?;
            let bytes = self.call(Method::POST, SIGN_PATH, Some(body)).await?;
            serde_json::from_slice(&bytes).map_err(|e| CaClientError::Decode {
                addr: addr.clone(),
                path: SIGN_PATH,
                reason: e.to_string(),
            })
        })
    }

    fn trust_bundle(&self) -> CaFuture<'_, TrustBundleResponse> {
        Box::pin(async move {
            let bytes = self.call(Method::GET, TRUST_BUNDLE_PATH, None).await?;
            serde_json::from_slice(&bytes).map_err(|e| CaClientError::Decode {
                addr: self.config.address.clone(),
                path: TRUST_BUNDLE_PATH,
                reason: e.to_string(),
            })
        })
    }

    fn update_trust(&self, roots: &[CertificateDer<'static>]) {
        match tls_config(&self.provider, &self.config, roots) {
            Ok(cfg) => *self.tls.write() = cfg,
            Err(e) => tracing::warn!(error = %e, "keeping the CA client's trust anchors"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn connect_error(address: &str) -> String {
        address
            .parse::<CaAddress>()
            .unwrap()
            .connect()
            .await
            .unwrap_err()
            .to_string()
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_or_answer_is_a_connect_error_naming_it() {
        let e = connect_error("no-such-host.invalid:15012").await;
        assert!(
            e.starts_with(
                "CA no-such-host.invalid:15012: connect: resolving no-such-host.invalid:"
            ),
            "{e}"
        );
        // A port nobody listens on: every address of the name is tried.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = dead.local_addr().unwrap().port();
        drop(dead);
        let e = connect_error(&format!("localhost:{port}")).await;
        assert!(
            e.contains(&format!(
                "CA localhost:{port}: connect: localhost resolves to"
            )),
            "{e}"
        );
        assert!(e.contains(&format!("127.0.0.1:{port}: ")), "{e}");
    }

    #[test]
    fn a_token_file_is_read_each_time_and_bad_ones_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = Token::File(path.clone());
        let err = |t: &Token| t.current().unwrap_err().to_string();
        assert!(err(&token).contains(&path.display().to_string()), "missing");
        std::fs::write(&path, "one\n").unwrap();
        assert_eq!(token.current().unwrap(), "one");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(token.current().unwrap(), "two", "read again, not cached");
        for (content, why) in [
            ("".to_owned(), "empty"),
            ("a\tb".to_owned(), "not one token"),
            ("x\u{1b}[2Jy".to_owned(), "not one token"),
            (
                "t".repeat(MAX_TOKEN_BYTES as usize + 1),
                "longer than 65536 bytes",
            ),
        ] {
            std::fs::write(&path, &content).unwrap();
            let e = err(&token);
            assert!(
                e.starts_with(&format!("CA token file {}: ", path.display())),
                "{e}"
            );
            assert!(e.contains(why), "{e}");
            assert!(e.len() < 200, "the error never carries the token: {e}");
        }
        assert_eq!(Token::from("v".to_owned()).current().unwrap(), "v");
    }
}
