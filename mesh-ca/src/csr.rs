//! Decoding and checking certificate signing requests.
//!
//! The CA uses a CSR for two things only: the public key (proved by the
//! CSR's signature) and a cross-check that the requester did not ask for
//! names other than the identity being issued. Everything that ends up in
//! the certificate comes from the verified identity, not from the CSR.

use mesh_core::ca::{self, SignRequest};
use mesh_core::identity::Identity;
use rcgen::{PublicKeyData, SignatureAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted (ring verifies up to 8192 bits).
pub const MAX_RSA_BITS: usize = 8192;

/// Why a CSR was refused. The variants map to refusal reasons in metrics.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not PEM with a CERTIFICATE REQUEST block: {0}")]
    Pem(String),
    #[error("CSR is not valid DER PKCS#10: {0}")]
    Der(String),
    #[error("CSR signature does not verify with its own public key: {0}")]
    Signature(String),
    #[error("CSR key type {0} is not supported (ECDSA P-256/P-384, Ed25519, RSA 2048-8192)")]
    UnsupportedKey(String),
    #[error("CSR asks for {asked}, but the identity is {identity}")]
    NameMismatch { asked: String, identity: String },
    #[error("CSR asks for a CA certificate")]
    AsksForCa,
    #[error("CSR extension request is malformed: {0}")]
    BadExtension(String),
}

impl CsrError {
    /// Short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::Pem(_) | CsrError::Der(_) => "malformed_csr",
            CsrError::Signature(_) => "bad_csr_signature",
            CsrError::UnsupportedKey(_) => "unsupported_key",
            CsrError::NameMismatch { .. } | CsrError::AsksForCa | CsrError::BadExtension(_) => {
                "csr_not_allowed"
            }
        }
    }
}

/// Key types a workload certificate may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa { bits: usize },
}

impl KeyType {
    fn rcgen_alg(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
            // Only the SPKI algorithm (rsaEncryption, NULL) is used from it.
            KeyType::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
        }
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa { .. })
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyType::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyType::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyType::Ed25519 => f.write_str("Ed25519"),
            KeyType::Rsa { bits } => write!(f, "RSA {bits}"),
        }
    }
}

/// The public key of a checked CSR, in the form rcgen signs.
#[derive(Debug, Clone)]
pub struct CsrPublicKey {
    key_type: KeyType,
    raw: Vec<u8>,
}

impl CsrPublicKey {
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.key_type.rcgen_alg()
    }
}

/// Parses a PEM CSR, verifies its signature, and checks it asks for nothing
/// but `identity`. Returns the public key to certify.
pub fn check_csr(pem_text: &str, identity: &Identity) -> Result<CsrPublicKey, CsrError> {
    let der = decode_pem(pem_text)?;
    check_csr_der(&der, identity)
}

fn decode_pem(pem_text: &str) -> Result<Vec<u8>, CsrError> {
    use rustls::pki_types::CertificateSigningRequestDer;
    use rustls::pki_types::pem::PemObject;
    CertificateSigningRequestDer::from_pem_slice(pem_text.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| CsrError::Pem(format!("{e:?}")))
}

/// Same as [`check_csr`] on DER input.
pub fn check_csr_der(der: &[u8], identity: &Identity) -> Result<CsrPublicKey, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key_type = key_type(spki)?;
    csr.verify_signature()
        .map_err(|e| CsrError::Signature(e.to_string()))?;

    let uri = identity.to_string();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) if *u == uri => {}
                            other => {
                                return Err(CsrError::NameMismatch {
                                    asked: describe(other),
                                    identity: uri,
                                });
                            }
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::AsksForCa),
                ParsedExtension::ParseError { error } => {
                    return Err(CsrError::BadExtension(error.to_string()));
                }
                // Key usages and anything else requested are ignored: the
                // certificate's extensions are the CA's, not the CSR's.
                _ => {}
            }
        }
    }
    Ok(CsrPublicKey {
        key_type,
        raw: spki.subject_public_key.data.to_vec(),
    })
}

fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI SAN {u:?}"),
        GeneralName::DNSName(d) => format!("DNS SAN {d:?}"),
        GeneralName::RFC822Name(e) => format!("email SAN {e:?}"),
        GeneralName::IPAddress(ip) => format!("IP SAN {ip:02x?}"),
        other => format!("SAN {other}"),
    }
}

fn key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyType, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == OID_EC_P256 {
            Ok(KeyType::EcdsaP256)
        } else if curve == OID_NIST_EC_P384 {
            Ok(KeyType::EcdsaP384)
        } else {
            Err(CsrError::UnsupportedKey(format!("EC curve {curve}")))
        }
    } else if *alg == OID_SIG_ED25519 {
        Ok(KeyType::Ed25519)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::UnsupportedKey("malformed RSA key".into())),
        };
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(CsrError::UnsupportedKey(format!("RSA {bits}")));
        }
        Ok(KeyType::Rsa { bits })
    } else {
        Err(CsrError::UnsupportedKey(format!("algorithm {alg}")))
    }
}

/// Fuzz entry point for the request decoder (called by `fuzz/` and by unit
/// tests over seeds): decodes a sign request body and checks its CSR. Must
/// never panic.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(req) = ca::decode_sign_request(data) {
        let _ = check_csr(&req.csr, &req.identity);
    }
    // Raw DER through the CSR parser too, against a fixed identity.
    if let Ok(id) = Identity::parse("spiffe://fuzz.local/ns/default/sa/fuzz") {
        let _ = check_csr_der(data, &id);
    }
}

/// Decodes a request body: JSON envelope, then the CSR inside it.
pub fn decode_request(body: &[u8]) -> Result<(SignRequest, CsrPublicKey), DecodeRequestError> {
    let req = ca::decode_sign_request(body)?;
    let key = check_csr(&req.csr, &req.identity)?;
    Ok((req, key))
}

/// Either half of [`decode_request`] failing.
#[derive(Debug, thiserror::Error)]
pub enum DecodeRequestError {
    #[error(transparent)]
    Envelope(#[from] ca::DecodeError),
    #[error(transparent)]
    Csr(#[from] CsrError),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn id() -> Identity {
        Identity::parse("spiffe://td/ns/default/sa/web").unwrap()
    }

    fn csr_with(sans: Vec<SanType>, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_the_identity_and_key_types() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let uri = SanType::URI(id().to_string().try_into().unwrap());
            let pk = check_csr(&csr_with(vec![uri], &key), &id()).unwrap();
            assert_eq!(pk.der_bytes(), key.public_key_raw());
            // No SANs at all is fine too.
            check_csr(&csr_with(vec![], &key), &id()).unwrap();
        }
    }

    #[test]
    fn refuses_other_names() {
        let key = KeyPair::generate().unwrap();
        let other = SanType::URI("spiffe://td/ns/default/sa/admin".try_into().unwrap());
        let dns = SanType::DnsName("evil.example".try_into().unwrap());
        let mine = SanType::URI(id().to_string().try_into().unwrap());
        for sans in [vec![other], vec![mine, dns]] {
            let err = check_csr(&csr_with(sans, &key), &id()).unwrap_err();
            assert_eq!(err.reason(), "csr_not_allowed", "{err}");
        }
    }

    #[test]
    fn refuses_bad_signature_and_garbage() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_with(vec![], &key);
        let mut der = decode_pem(&pem).unwrap();
        let last = der.len() - 3;
        der[last] ^= 0x55;
        let err = check_csr_der(&der, &id()).unwrap_err();
        assert_eq!(err.reason(), "bad_csr_signature", "{err}");
        assert_eq!(
            check_csr("hello", &id()).unwrap_err().reason(),
            "malformed_csr"
        );
        assert_eq!(
            check_csr_der(b"\x30\x03abc", &id()).unwrap_err().reason(),
            "malformed_csr"
        );
    }

    #[test]
    fn fuzz_seeds() {
        let key = KeyPair::generate().unwrap();
        let req = SignRequest {
            identity: id(),
            csr: csr_with(vec![], &key),
            ttl_seconds: Some(60),
        };
        let json = serde_json::to_vec(&req).unwrap();
        fuzz_decode(&json);
        fuzz_decode(&json[..json.len() / 2]);
        fuzz_decode(&decode_pem(&req.csr).unwrap());
        fuzz_decode(b"");
        fuzz_decode(b"{\"identity\":\"spiffe://a/ns/b/sa/c\",\"csr\":\"-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n-----END CERTIFICATE REQUEST-----\"}");
        decode_request(&json).unwrap();
    }
}
