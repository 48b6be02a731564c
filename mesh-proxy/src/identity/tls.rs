//! rustls configurations per workload identity, and SPIFFE peer checks.
//!
//! Both directions verify the peer's chain to the current trust bundle
//! (which may hold several roots during a rotation) and then its SPIFFE ID:
//! the client side against the identity the destination is expected to
//! have ([`verify_peer_identity`]); the server side accepts any identity of
//! the trust domain and leaves the decision to policy, which reads it with
//! [`peer_identity`]. DNS names are never checked: SVIDs carry none.

use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::UNIX_EPOCH;

use mesh_core::display::Shown;
use mesh_core::identity::{Clock, Identity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

/// Why a peer certificate's identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("peer certificate does not parse: {0}")]
    Parse(String),
    #[error("peer certificate has {0} URI SANs; an SVID has exactly one")]
    UriSanCount(usize),
    /// `uri` as the certificate holds it, quoted, escaped once and
    /// bounded: a peer chooses it. `reason` is the SPIFFE parser's message
    /// (bounded by `mesh_core::identity::MAX_ERROR_LEN`).
    #[error("peer URI SAN {uri} is not a SPIFFE ID: {reason}")]
    NotSpiffe { uri: Shown, reason: String },
    #[error("peer is {actual}, expected {expected}")]
    Mismatch {
        expected: Box<Identity>,
        actual: Box<Identity>,
    },
    #[error("peer {actual} is not in trust domain {trust_domain}")]
    TrustDomain {
        trust_domain: String,
        actual: Box<Identity>,
    },
}

/// The crypto provider of the mesh's mTLS (ring), with the TLS 1.3
/// suites in the order the mesh prefers: AES-128-GCM, then AES-256-GCM
/// (both in Istio's profile; rustls' default puts AES-256 first), then
/// the rest as ring lists them. A rustls server follows the client's
/// order, so two sockmesh proxies agree on AES-128-GCM, and a peer that
/// prefers AES-256-GCM still gets it. AES-128 runs 10 AES rounds per block
/// instead of 14: measured in `./x bench` (commit message of this change).
pub fn mesh_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    // Stable: the suites ranked alike keep ring's order.
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// The SPIFFE ID of an SVID: its one URI SAN, parsed.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<Identity, PeerIdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PeerIdentityError::Parse(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| PeerIdentityError::Parse(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(PeerIdentityError::UriSanCount(uris.len()));
    };
    Identity::parse(uri).map_err(|e| PeerIdentityError::NotSpiffe {
        uri: Shown::new(uri),
        reason: e.to_string(),
    })
}

/// Checks that the SVID `cert` names exactly `expected`. Chain validity is
/// checked separately (by the verifiers below).
pub fn verify_peer_identity(
    cert: &CertificateDer<'_>,
    expected: &Identity,
) -> Result<Identity, PeerIdentityError> {
    let actual = peer_identity(cert)?;
    if &actual != expected {
        return Err(PeerIdentityError::Mismatch {
            expected: Box::new(expected.clone()),
            actual: Box::new(actual),
        });
    }
    Ok(actual)
}

/// The roots in force, with the verifiers built from them.
pub struct TrustBundle {
    pub roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>, provider: &Arc<CryptoProvider>) -> Self {
        let mut store = RootCertStore::empty();
        let (_added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
        let store = Arc::new(store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), provider.clone())
                .build()
                .ok();
        TrustBundle {
            roots,
            store,
            client_verifier,
        }
    }

    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }
}

/// A shared, swappable trust bundle.
#[derive(Debug, Clone)]
pub struct BundleCell(Arc<RwLock<Arc<TrustBundle>>>);

impl BundleCell {
    pub fn new(bundle: TrustBundle) -> Self {
        BundleCell(Arc::new(RwLock::new(Arc::new(bundle))))
    }

    pub fn get(&self) -> Arc<TrustBundle> {
        self.0.read().clone()
    }

    pub fn set(&self, bundle: TrustBundle) {
        *self.0.write() = Arc::new(bundle);
    }
}

/// rustls' view of our [`Clock`], so certificate validity follows it.
#[derive(Debug)]
pub struct ClockTime(pub Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        self.0
            .now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(UnixTime::since_unix_epoch)
    }
}

fn other_err(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// The handshake-signature methods both SPIFFE verifiers share: TLS 1.2
/// refused (the mesh speaks TLS 1.3 only), TLS 1.3 signatures checked with
/// the verifier's `provider`.
macro_rules! tls13_only_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Client side: the server must chain to the bundle and be `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: BundleCell,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: BundleCell, expected: Identity, provider: Arc<CryptoProvider>) -> Self {
        SpiffeServerVerifier {
            bundle,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.bundle.get();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &bundle.store,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        verify_peer_identity(end_entity, &self.expected).map_err(other_err)?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// Server side: the client must chain to the bundle (clientAuth) and carry
/// a SPIFFE ID of `trust_domain`.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: BundleCell,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: BundleCell, trust_domain: String, provider: Arc<CryptoProvider>) -> Self {
        SpiffeClientVerifier {
            bundle,
            trust_domain,
            provider,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.bundle.get();
        let verifier = bundle
            .client_verifier
            .as_ref()
            .ok_or_else(|| rustls::Error::General("trust bundle is empty".into()))?;
        verifier.verify_client_cert(end_entity, intermediates, now)?;
        let actual = peer_identity(end_entity).map_err(other_err)?;
        if actual.trust_domain() != self.trust_domain {
            return Err(other_err(PeerIdentityError::TrustDomain {
                trust_domain: self.trust_domain.clone(),
                actual: Box::new(actual),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// A server name for connecting to a peer proxy: verifiers ignore it, but
/// rustls needs one (and sends it as SNI when it is a DNS name).
pub fn peer_server_name(expected: &Identity) -> ServerName<'static> {
    // SNI carries no identity here; use the namespace as a harmless DNS label.
    ServerName::try_from(format!("{}.sockmesh.invalid", expected.namespace()))
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const WEB: &str = "spiffe://td/ns/default/sa/web";

    /// The URI SAN is the peer's choice: a long one of control characters
    /// is shown quoted, escaped once and cut, not as it came.
    #[test]
    fn ten_kib_of_control_characters_in_a_uri_san_give_a_bounded_message() {
        let value = "\u{1}\n\u{7f}\\".repeat(10 * 1024 / 4);
        let err = peer_identity(&cert(vec![uri(&value)])).unwrap_err();
        assert!(matches!(err, PeerIdentityError::NotSpiffe { .. }), "{err}");
        let msg = err.to_string();
        let max = 64
            + mesh_core::display::bounded_len(mesh_core::display::MAX_SHOWN_CHARS)
            + mesh_core::identity::MAX_ERROR_LEN;
        assert!(msg.len() <= max, "{} bytes: {msg}", msg.len());
        assert!(msg.starts_with(r#"peer URI SAN "\u{1}\n\u{7f}\\"#), "{msg}");
        assert!(
            msg.contains(&format!("… ({} bytes)\"", value.len())),
            "{msg}"
        );
        assert_eq!(mesh_core::display::check_message(&msg, max, 1), Ok(()));
    }

    #[test]
    fn verify_peer_identity_accepts_exactly_the_expected_id() {
        let expected = Identity::parse(WEB).unwrap();
        let ok = cert(vec![uri(WEB), SanType::DnsName("web".try_into().unwrap())]);
        assert_eq!(verify_peer_identity(&ok, &expected).unwrap(), expected);

        let other = cert(vec![uri("spiffe://td/ns/default/sa/db")]);
        assert!(matches!(
            verify_peer_identity(&other, &expected),
            Err(PeerIdentityError::Mismatch { .. })
        ));
        let other_td = cert(vec![uri("spiffe://other/ns/default/sa/web")]);
        assert!(matches!(
            verify_peer_identity(&other_td, &expected),
            Err(PeerIdentityError::Mismatch { .. })
        ));
        let two = cert(vec![uri(WEB), uri("spiffe://td/ns/default/sa/db")]);
        assert_eq!(
            verify_peer_identity(&two, &expected),
            Err(PeerIdentityError::UriSanCount(2))
        );
        let none = cert(vec![SanType::DnsName("web".try_into().unwrap())]);
        assert_eq!(
            verify_peer_identity(&none, &expected),
            Err(PeerIdentityError::UriSanCount(0))
        );
        let http = cert(vec![uri("https://td/ns/default/sa/web")]);
        assert!(matches!(
            verify_peer_identity(&http, &expected),
            Err(PeerIdentityError::NotSpiffe { .. })
        ));
        let sloppy = cert(vec![uri("spiffe://td/ns/default/sa/web/")]);
        assert!(matches!(
            verify_peer_identity(&sloppy, &expected),
            Err(PeerIdentityError::NotSpiffe { .. })
        ));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        assert!(matches!(
            verify_peer_identity(&garbage, &expected),
            Err(PeerIdentityError::Parse(_))
        ));
        let err = verify_peer_identity(&other, &expected)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sa/db") && err.contains("sa/web"), "{err}");
    }
}
