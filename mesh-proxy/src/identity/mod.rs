//! Workload identity on the node: certificates from the CA, kept fresh, and
//! the rustls configurations that present and check them.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use mesh_core::identity::{Identity, SystemClock};
//! use mesh_proxy::identity::{CaAddress, CaClientConfig, CertManager, CertManagerConfig, HttpsCaClient, Token, load_pem_certs};
//!
//! let anchors = load_pem_certs(std::path::Path::new("/run/sockmesh/ca/trust-bundle.pem"))?;
//! // Read again for every request: a projected token rotates.
//! let token = Token::File("/run/sockmesh/ca/node-tokens/node-1.token".into());
//! let client = HttpsCaClient::new(CaClientConfig::new(
//!     "mesh-ca.sockmesh-system.svc:15012".parse::<CaAddress>()?, "mesh-ca", anchors.clone(), token))?;
//! let certs = CertManager::new(Arc::new(client), Arc::new(SystemClock),
//!     CertManagerConfig::new("cluster.local"), anchors);
//! let (_stop, stop_rx) = tokio::sync::watch::channel(false);
//! tokio::spawn(certs.clone().run(stop_rx));
//!
//! let web = Identity::parse("spiffe://cluster.local/ns/default/sa/web")?;
//! certs.fetch(&web).await?;                   // on demand (or certs.track(&web) ahead of need)
//! let server = certs.server_config(&web)?;     // inbound HBONE as `web`
//! let db = Identity::parse("spiffe://cluster.local/ns/default/sa/db")?;
//! let client = certs.client_config(&web, &db)?; // outbound as `web`, peer must be `db`
//! # let _ = (server, client); Ok(()) }
//! ```

pub mod ca_address;
mod client;
mod manager;
mod tls;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_core::identity::Identity;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub use ca_address::{BadCaAddress, CaAddress};
pub use client::{CaClient, CaClientConfig, CaClientError, CaFuture, HttpsCaClient, Token};
pub use manager::{
    CertError, CertManager, CertManagerConfig, CertState, KeyAlgorithm, WorkloadCert,
};
pub use tls::{
    BundleCell, ClockTime, PeerIdentityError, SpiffeClientVerifier, SpiffeServerVerifier,
    TrustBundle, peer_identity, peer_server_name, verify_peer_identity,
};

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration for {identity}: {reason}")]
    Build { identity: Identity, reason: String },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
}

/// Reads every certificate of a PEM file (e.g. the CA's trust-bundle.pem).
pub fn load_pem_certs(
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let bytes = std::fs::read(path).map_err(|e| TlsConfigError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::Pem {
            path: path.display().to_string(),
            reason: format!("not PEM certificates: {e:?}"),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Pem {
            path: path.display().to_string(),
            reason: "no certificate".into(),
        });
    }
    Ok(certs)
}

/// Presents the current certificate of one identity; renewals take effect
/// on the next handshake without rebuilding configurations.
#[derive(Debug)]
struct IdentityResolver {
    manager: CertManager,
    identity: Identity,
}

impl IdentityResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.manager.current(&self.identity);
        if cert.is_none() {
            tracing::warn!(identity = %self.identity, "no valid certificate to present");
        }
        cert.map(|c| c.certified_key.clone())
    }
}

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl CertManager {
    /// Server side of mTLS for `identity` (TLS 1.3 only): presents its
    /// current certificate and requires a client certificate chaining to the
    /// trust bundle with a SPIFFE ID of the trust domain. Read the client's
    /// identity after the handshake with [`peer_identity`]. ALPN is left to
    /// the caller (HBONE sets `h2`). Starts tracking `identity`.
    pub fn server_config(
        &self,
        identity: &Identity,
    ) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
        self.track(identity);
        let inner = &self.inner;
        let verifier = SpiffeClientVerifier::new(
            inner.bundle.clone(),
            inner.config.trust_domain.clone(),
            inner.provider.clone(),
        );
        let config = self
            .tls13(identity, rustls::ServerConfig::builder_with_details)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(self.resolver(identity));
        Ok(Arc::new(config))
    }

    /// Client side of mTLS for `identity` (TLS 1.3 only): presents its
    /// current certificate and accepts only a server chaining to the trust
    /// bundle whose SPIFFE ID is `expected_peer`. Use
    /// [`peer_server_name`] as the server name. Starts tracking `identity`.
    pub fn client_config(
        &self,
        identity: &Identity,
        expected_peer: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
        self.track(identity);
        let inner = &self.inner;
        let verifier = SpiffeServerVerifier::new(
            inner.bundle.clone(),
            expected_peer.clone(),
            inner.provider.clone(),
        );
        let config = self
            .tls13(identity, rustls::ClientConfig::builder_with_details)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.resolver(identity));
        Ok(Arc::new(config))
    }

    /// A configuration builder of either side on this manager's provider
    /// and clock, TLS 1.3 only.
    fn tls13<S: rustls::ConfigSide>(
        &self,
        identity: &Identity,
        builder_with_details: impl FnOnce(
            Arc<rustls::crypto::CryptoProvider>,
            Arc<dyn rustls::time_provider::TimeProvider>,
        ) -> rustls::ConfigBuilder<S, rustls::WantsVersions>,
    ) -> Result<rustls::ConfigBuilder<S, rustls::WantsVerifier>, TlsConfigError> {
        let inner = &self.inner;
        builder_with_details(
            inner.provider.clone(),
            Arc::new(ClockTime(inner.clock.clone())),
        )
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError::Build {
            identity: identity.clone(),
            reason: e.to_string(),
        })
    }

    /// Presents `identity`'s current certificate, on either side.
    fn resolver(&self, identity: &Identity) -> Arc<IdentityResolver> {
        Arc::new(IdentityResolver {
            manager: self.clone(),
            identity: identity.clone(),
        })
    }
}
