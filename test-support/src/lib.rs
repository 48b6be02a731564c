#![forbid(unsafe_code)]
//! What every test tier shares, so no tier writes its own: [`poll`] (and
//! its async twin [`eventually`]), the one way a test waits for something
//! observable, and [`Pki`], a test CA issuing X.509-SVIDs with the TLS
//! configurations the HBONE tests and benchmark use.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Polls `ok` every `every` until it gives a value, failing after
/// `timeout` with what did not happen. Never a fixed sleep before an
/// assert: wait for what the assert needs.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut ok: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = ok()? {
            return Ok(v);
        }
        ensure!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        std::thread::sleep(every);
    }
}

/// [`poll`] for async tests: waits (every 10 ms) until `cond` holds, at
/// most `timeout`.
pub async fn eventually(what: &str, timeout: Duration, cond: impl Fn() -> bool) -> Result<()> {
    within(what, timeout, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// `fut`'s output, or an error naming `what` after `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("{what}: timed out after {timeout:?}"))
}

/// A test CA that issues X.509-SVIDs (one SPIFFE URI SAN, not a CA,
/// digitalSignature, server and client auth), as the mesh CA does.
pub struct Pki {
    ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::OrganizationName, "sockmesh test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Pki {
            ca: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An SVID for `spiffe` and its key.
    pub fn leaf(
        &self,
        spiffe: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    pub fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// An mTLS server presenting `spiffe` (TLS 1.3, ALPN h2): clients must
    /// present a certificate chaining to this CA.
    pub fn server_config(
        &self,
        provider: &Arc<CryptoProvider>,
        spiffe: &str,
    ) -> Result<Arc<rustls::ServerConfig>> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone()).build()?;
        let (chain, key) = self.leaf(spiffe)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client (TLS 1.3, ALPN h2) that checks the server's chain only
    /// ([`ChainOnly`]) and presents `spiffe`'s SVID, or none.
    pub fn client_config(
        &self,
        provider: &Arc<CryptoProvider>,
        spiffe: Option<&str>,
    ) -> Result<Arc<rustls::ClientConfig>> {
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly::new(
                self.roots()?,
                provider.clone(),
            )));
        let mut config = match spiffe {
            Some(id) => {
                let (chain, key) = self.leaf(id)?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// SVIDs carry no DNS name: this verifier checks the chain only; the
/// SPIFFE ID is the caller's to check (the proxy's `Connector::verify`).
#[derive(Debug)]
pub struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ChainOnly {
    pub fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Self {
        ChainOnly { roots, provider }
    }
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &ParsedCertificate::try_from(end_entity)?,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn poll_returns_the_value_or_names_what_did_not_happen() {
        let mut n = 0;
        let got = poll(
            "three tries",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                n += 1;
                Ok((n == 3).then_some(n))
            },
        );
        assert_eq!(got.unwrap(), 3);
        let e = poll::<()>("never", Duration::ZERO, Duration::ZERO, || Ok(None)).unwrap_err();
        assert!(e.to_string().contains("never did not happen"), "{e}");
    }

    #[test]
    fn svids_carry_the_spiffe_id_and_chain_to_the_ca() {
        let pki = Pki::new().unwrap();
        let (chain, _) = pki.leaf("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert_eq!(chain.len(), 1);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        pki.server_config(&provider, "spiffe://cluster.local/ns/a/sa/b")
            .unwrap();
        pki.client_config(&provider, None).unwrap();
    }
}
