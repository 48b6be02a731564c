#![forbid(unsafe_code)]
//! The sockmesh certificate authority.
//!
//! Signs short-lived SPIFFE X.509-SVIDs for the pods of the node whose proxy
//! asks, over HTTPS (TLS 1.3, rustls with ring) on port 15012.
//!
//! In-process use (the local mesh harness, tests):
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use mesh_ca::{Ca, CaConfig, CaServer, auth, roots::RootSource};
//! use mesh_core::registry::FileRegistry;
//!
//! let state = std::path::Path::new("/run/sockmesh/ca");
//! let token = auth::create_node_token(&state.join("node-tokens"), "node-1")?;
//! let ca = Ca::new(
//!     CaConfig::new("cluster.local", RootSource::StateDir(state.to_owned())),
//!     Arc::new(auth::FileTokenAuthenticator::load(state.join("node-tokens"))?),
//!     Arc::new(FileRegistry::load("/run/sockmesh/registry.yaml")?),
//! )?;
//! let server = CaServer::bind(ca.clone(), "127.0.0.1:15012".parse()?).await?;
//! // proxies trust state/trust-bundle.pem and present `token`
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod authority;
#[cfg(feature = "kubernetes")]
pub mod cluster;
pub mod csr;
pub mod metrics;
pub mod roots;
pub mod server;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use mesh_core::ca::SignRequest;
use mesh_core::ca::SignResponse;
use mesh_core::identity::{Clock, Identity, SystemClock};
use mesh_core::registry::WorkloadRegistry;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[cfg(feature = "kubernetes")]
pub use auth::TokenReviewAuthenticator;
pub use auth::{Authenticator, Caller, Credential, FileTokenAuthenticator};
pub use authority::{Authority, Issued, SignError};
pub use metrics::Metrics;
pub use roots::{RootError, RootSource, RootStore};
pub use server::CaServer;

/// Default certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default cap on a requested lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
/// The cap may not be set above this.
pub const MAX_TTL_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Shortest lifetime a caller may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(60);

/// What the CA needs to know (validated by [`CaConfig::validate`]).
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: String,
    pub roots: RootSource,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// DNS names and IPs of the CA's own serving certificate.
    pub server_names: Vec<String>,
    /// The time certificates are dated by.
    pub clock: Arc<dyn Clock>,
}

impl CaConfig {
    pub fn new(trust_domain: &str, roots: RootSource) -> Self {
        CaConfig {
            trust_domain: trust_domain.to_owned(),
            roots,
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            server_names: vec!["mesh-ca".into(), "localhost".into(), "127.0.0.1".into()],
            clock: Arc::new(SystemClock),
        }
    }

    /// Checks every value, naming the bad one.
    pub fn validate(&self) -> Result<(), CaError> {
        let bad = |what: &str, value: String, reason: &str| {
            Err(CaError::Config(format!("{what} {value}: {reason}")))
        };
        if let Err(e) = mesh_core::identity::validate_trust_domain(&self.trust_domain) {
            return Err(CaError::Config(e.to_string()));
        }
        if self.max_ttl > MAX_TTL_LIMIT {
            return bad(
                "max TTL",
                format!("{:?}", self.max_ttl),
                "over the limit of 30 days",
            );
        }
        if self.max_ttl < MIN_TTL {
            return bad(
                "max TTL",
                format!("{:?}", self.max_ttl),
                "under the minimum of 60s",
            );
        }
        if self.default_ttl < MIN_TTL || self.default_ttl > self.max_ttl {
            return bad(
                "default TTL",
                format!("{:?}", self.default_ttl),
                &format!("must be between 60s and the max TTL {:?}", self.max_ttl),
            );
        }
        if self.server_names.is_empty() {
            return bad("server names", "[]".into(), "at least one is needed");
        }
        for name in &self.server_names {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return bad(
                    "server name",
                    format!("{name:?}"),
                    "not a DNS name or IP address",
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("root of trust: {0}")]
    Root(#[from] RootError),
    #[error("serving certificate: {0}")]
    Serving(String),
    #[error("{0} is only possible with a generated root (--state-dir), not a plugged-in CA")]
    NotGenerated(&'static str),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A refused request: what the caller sees (status, opaque text) and what
/// the log and metrics see (reason, detail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub detail: String,
}

impl Refusal {
    pub fn new(status: u16, reason: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            detail: detail.into(),
        }
    }

    /// The text the caller gets: never the reason.
    pub fn public_text(&self) -> &'static str {
        match self.status {
            400 => "bad request",
            401 | 403 => "request refused",
            413 => "request too large",
            _ => "internal error",
        }
    }
}

/// The CA's serving certificate, swapped when the signing root changes.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

struct CaInner {
    config: CaConfig,
    authority: RwLock<Arc<Authority>>,
    serving: Arc<ServingCert>,
    authenticator: Arc<dyn Authenticator>,
    registry: Arc<dyn WorkloadRegistry>,
    metrics: Metrics,
    provider: Arc<rustls::crypto::CryptoProvider>,
    root_stamp: std::sync::Mutex<Vec<Option<RootFileStamp>>>,
}

/// The certificate authority. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Ca {
    inner: Arc<CaInner>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.inner.config.trust_domain)
            .field("roots", &self.inner.config.roots)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Validates `config`, loads (or, in a new state dir, generates) the
    /// root, and issues the CA's serving certificate. Binds nothing.
    pub fn new(
        config: CaConfig,
        authenticator: Arc<dyn Authenticator>,
        registry: Arc<dyn WorkloadRegistry>,
    ) -> Result<Ca, CaError> {
        config.validate()?;
        let config_roots = config.roots.clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let authority = load_authority(&config)?;
        let serving = serving_key(&authority, &config, &provider)?;
        tracing::info!(
            trust_domain = %config.trust_domain,
            signer = %authority.signer.subject,
            roots = authority.bundle.len(),
            "CA ready"
        );
        Ok(Ca {
            inner: Arc::new(CaInner {
                authority: RwLock::new(Arc::new(authority)),
                serving: Arc::new(ServingCert(RwLock::new(serving))),
                config,
                authenticator,
                registry,
                metrics: Metrics::new(),
                provider,
                root_stamp: std::sync::Mutex::new(root_stamp(&config_roots)),
            }),
        })
    }

    pub fn config(&self) -> &CaConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn authority(&self) -> Arc<Authority> {
        self.inner
            .authority
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The roots workloads must trust now.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.authority().bundle.clone()
    }

    pub fn trust_bundle_pem(&self) -> Vec<String> {
        self.authority().bundle_pem()
    }

    /// rustls server config of the CA's HTTPS endpoint: TLS 1.3 only, ring.
    pub fn tls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaError::Serving(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.inner.serving.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    pub async fn authenticate(&self, credential: &Credential) -> Result<Caller, Refusal> {
        self.inner
            .authenticator
            .authenticate(credential)
            .await
            .map_err(|e| Refusal::new(401, "unauthenticated", e.to_string()))
    }

    /// Authorizes and signs: `caller` may have a certificate for
    /// `request.identity` only if a pod of that identity is scheduled on its
    /// node. Records metrics; the caller logs.
    pub fn sign(&self, caller: &Caller, request: &SignRequest) -> Result<SignResponse, Refusal> {
        let started = Instant::now();
        let result = self.sign_inner(caller, request);
        match &result {
            Ok(_) => self.inner.metrics.issued(started.elapsed()),
            Err(r) => self.inner.metrics.refused(r.reason),
        }
        result
    }

    fn sign_inner(&self, caller: &Caller, request: &SignRequest) -> Result<SignResponse, Refusal> {
        let config = &self.inner.config;
        let identity = &request.identity;
        if identity.trust_domain() != config.trust_domain {
            return Err(Refusal::new(
                403,
                "wrong_trust_domain",
                format!("{identity} is not in trust domain {}", config.trust_domain),
            ));
        }
        self.authorize(caller, identity)?;
        let ttl = match request.ttl_seconds {
            None => config.default_ttl,
            Some(secs) => {
                let ttl = Duration::from_secs(secs);
                if ttl > config.max_ttl {
                    return Err(Refusal::new(
                        400,
                        "ttl_over_cap",
                        format!("ttl {secs}s is over the cap {}s", config.max_ttl.as_secs()),
                    ));
                }
                if ttl < MIN_TTL {
                    return Err(Refusal::new(
                        400,
                        "ttl_too_short",
                        format!("ttl {secs}s is under the minimum {}s", MIN_TTL.as_secs()),
                    ));
                }
                ttl
            }
        };
        let key = csr::check_csr(&request.csr, identity).map_err(|e| {
            let status = if e.reason() == "csr_not_allowed" {
                403
            } else {
                400
            };
            Refusal::new(status, e.reason(), e.to_string())
        })?;
        let authority = self.authority();
        let issued = authority
            .issue(identity, &key, ttl, config.clock.now())
            .map_err(|e| Refusal::new(500, "signing_failed", e.to_string()))?;
        Ok(SignResponse {
            identity: issued.identity.clone(),
            certificate_chain: issued.chain.iter().map(authority::cert_pem).collect(),
            trust_bundle: authority.bundle_pem(),
            serial: issued.serial_hex.clone(),
            not_before: authority::unix_secs(issued.not_before),
            not_after: authority::unix_secs(issued.not_after),
        })
    }

    fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), Refusal> {
        let registry = &self.inner.registry;
        if registry.node(&caller.node).is_none() {
            return Err(Refusal::new(
                403,
                "unknown_node",
                format!("node {} is not in the registry", caller.node),
            ));
        }
        let allowed = registry.pods_on_node(&caller.node).iter().any(|p| {
            p.namespace == identity.namespace() && p.service_account == identity.service_account()
        });
        if !allowed {
            return Err(Refusal::new(
                403,
                "not_on_node",
                format!("no pod of {identity} is scheduled on node {}", caller.node),
            ));
        }
        Ok(())
    }

    fn install(&self, authority: Authority) -> Result<(), CaError> {
        let serving = serving_key(&authority, &self.inner.config, &self.inner.provider)?;
        *self
            .inner
            .authority
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(authority);
        *self
            .inner
            .serving
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = serving;
        Ok(())
    }

    fn store(&self, op: &'static str) -> Result<RootStore, CaError> {
        match &self.inner.config.roots {
            RootSource::StateDir(dir) => Ok(RootStore::new(dir)),
            RootSource::Plugged(_) => Err(CaError::NotGenerated(op)),
        }
    }

    /// Root rotation step 1: a new root joins the trust bundle; the current
    /// one keeps signing. Wait for every proxy to fetch the new bundle.
    pub fn prepare_root_rotation(&self) -> Result<(), CaError> {
        let store = self.store("root rotation")?;
        let td = &self.inner.config.trust_domain;
        self.install(store.prepare(td, self.inner.config.clock.now())?)
    }

    /// Root rotation step 2: the new root signs; the old stays trusted.
    pub fn activate_next_root(&self) -> Result<(), CaError> {
        let store = self.store("root rotation")?;
        self.install(store.activate(&self.inner.config.trust_domain)?)
    }

    /// Root rotation step 3: old roots leave the bundle. Do it once every
    /// workload certificate of the old root has been renewed or expired.
    pub fn retire_previous_roots(&self) -> Result<(), CaError> {
        let store = self.store("root rotation")?;
        self.install(store.retire(&self.inner.config.trust_domain)?)
    }

    /// Re-reads the root source if its files changed since the last load
    /// (a plugged-in CA renewed by cert-manager, or a rotation step done by
    /// another process on the state dir). `Ok(true)` when reloaded.
    pub fn reload_roots_if_changed(&self) -> Result<bool, CaError> {
        let now = root_stamp(&self.inner.config.roots);
        let mut known = self
            .inner
            .root_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *known == now {
            return Ok(false);
        }
        self.reload_roots()?;
        *known = now;
        Ok(true)
    }

    /// Re-reads the root source.
    pub fn reload_roots(&self) -> Result<(), CaError> {
        let authority = load_authority(&self.inner.config)?;
        tracing::info!(signer = %authority.signer.subject, roots = authority.bundle.len(), "roots reloaded");
        self.install(authority)
    }
}

/// Modification time, size and inode of a root source file.
type RootFileStamp = (std::time::SystemTime, u64, u64);

fn root_stamp(source: &RootSource) -> Vec<Option<RootFileStamp>> {
    use std::os::unix::fs::MetadataExt;
    let files = match source {
        RootSource::StateDir(dir) => vec![dir.join("roots.json")],
        RootSource::Plugged(dir) => {
            vec![dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt")]
        }
    };
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

fn load_authority(config: &CaConfig) -> Result<Authority, CaError> {
    Ok(match &config.roots {
        RootSource::StateDir(dir) => {
            RootStore::new(dir).load_or_init(&config.trust_domain, config.clock.now())?
        }
        RootSource::Plugged(dir) => roots::load_plugged(dir, &config.trust_domain)?,
    })
}

fn serving_key(
    authority: &Authority,
    config: &CaConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, CaError> {
    let (chain, key) = authority
        .issue_serving_cert(&config.server_names, config.clock.now())
        .map_err(|e| CaError::Serving(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CaError::Serving(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}
