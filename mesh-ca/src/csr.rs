//! Decoding and checking certificate signing requests.
//!
//! The CA uses a CSR for two things only: the public key (proved by the
//! CSR's signature) and a cross-check that the requester did not ask for
//! names other than the identity being issued. Everything that ends up in
//! the certificate comes from the verified identity, not from the CSR.

use mesh_core::ca::{self, SignRequest};
use mesh_core::display::{self, MAX_SHOWN_CHARS, Shown, bounded_len};
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

/// Bytes of a library's error text (x509-parser, serde_json) a message
/// keeps; room for an [`mesh_core::identity::IdentityError`] inside serde's.
const LIBRARY_TEXT_BYTES: usize = 1024;

/// Longest message a [`CsrError`] or [`DecodeRequestError`] prints: fixed
/// text and at most two values shown through [`Shown`], or one library
/// message cut to a bound.
pub const MAX_ERROR_LEN: usize = 128 + 2 * bounded_len(MAX_SHOWN_CHARS);

/// Why a CSR was refused. The variants map to refusal reasons in metrics.
/// The CSR comes from the caller: what an error quotes from it is shown
/// once, escaped once and bounded ([`Shown`], [`display::text`]).
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
    NameMismatch { asked: String, identity: Shown },
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
        .map_err(pem_error)
}

/// The PEM parser's errors quote whole lines of input as byte lists (`[45,
/// 45, ...]`, five bytes of text per byte): name the line once, bounded.
fn pem_error(e: rustls::pki_types::pem::Error) -> CsrError {
    use rustls::pki_types::pem::Error;
    let line = |bytes: &[u8]| Shown::new(&String::from_utf8_lossy(bytes));
    CsrError::Pem(match e {
        Error::MissingSectionEnd { end_marker } => {
            format!("no END line for the section {}", line(&end_marker))
        }
        Error::IllegalSectionStart { line: l } => format!("malformed BEGIN line {}", line(&l)),
        Error::NoItemsFound => "no CERTIFICATE REQUEST block".to_owned(),
        other => display::text(&other.to_string(), LIBRARY_TEXT_BYTES),
    })
}

/// A library's error text, bounded, control characters escaped.
fn library(e: impl std::fmt::Display) -> String {
    display::text(&e.to_string(), LIBRARY_TEXT_BYTES)
}

/// Same as [`check_csr`] on DER input.
pub fn check_csr_der(der: &[u8], identity: &Identity) -> Result<CsrPublicKey, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der(library(e)))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key_type = key_type(spki)?;
    csr.verify_signature()
        .map_err(|e| CsrError::Signature(library(e)))?;

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
                                    identity: Shown::new(&uri),
                                });
                            }
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::AsksForCa),
                ParsedExtension::ParseError { error } => {
                    return Err(CsrError::BadExtension(library(error)));
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

/// A SAN the CSR asked for, shown once and bounded.
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI SAN {}", Shown::new(u)),
        GeneralName::DNSName(d) => format!("DNS SAN {}", Shown::new(d)),
        GeneralName::RFC822Name(e) => format!("email SAN {}", Shown::new(e)),
        GeneralName::IPAddress(ip) => {
            let text = format!("{ip:02x?}");
            format!("IP SAN {}", display::text(&text, 4 * MAX_SHOWN_CHARS))
        }
        other => format!(
            "SAN {}",
            display::text(&other.to_string(), 4 * MAX_SHOWN_CHARS)
        ),
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
            Err(CsrError::UnsupportedKey(format!(
                "EC curve {}",
                library(curve)
            )))
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
        Err(CsrError::UnsupportedKey(format!(
            "algorithm {}",
            library(alg)
        )))
    }
}

/// Fuzz entry point for the request decoder (called by `fuzz/` and by unit
/// tests over seeds): decodes a sign request body and checks its CSR, and
/// checks the bytes as a raw DER CSR. Must never panic but on a broken
/// invariant: every refusal's message passes [`display::check_message`]
/// (at most [`MAX_ERROR_LEN`] bytes, no control character, escaped once).
pub fn fuzz_decode(data: &[u8]) {
    // Values shown come from the JSON (whose escapes start with `\`) or
    // from the DER inside the PEM: bound their backslash runs by the count.
    let backslashes = |b: &[u8]| b.iter().filter(|c| **c == b'\\').count();
    let mut input_run = backslashes(data);
    if let Ok(req) = ca::decode_sign_request(data)
        && let Ok(der) = decode_pem(&req.csr)
    {
        input_run += backslashes(&der);
    }
    let check = |what: &str, message: String| {
        if let Err(why) = display::check_message(&message, MAX_ERROR_LEN, input_run) {
            panic!("{what}: {why}");
        }
    };
    if let Err(e) = decode_request(data) {
        check("sign request", e.to_string());
    }
    // Raw DER through the CSR parser too, against a fixed identity.
    if let Ok(id) = Identity::parse("spiffe://fuzz.local/ns/default/sa/fuzz")
        && let Err(e) = check_csr_der(data, &id)
    {
        check("DER CSR", e.to_string());
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
    /// The envelope's error, as text: serde_json quotes input raw
    /// (``unknown field `…` ``), so it is kept bounded, control characters
    /// escaped ([`display::text`]).
    #[error("{0}")]
    Envelope(String),
    #[error(transparent)]
    Csr(#[from] CsrError),
}

impl From<ca::DecodeError> for DecodeRequestError {
    fn from(e: ca::DecodeError) -> Self {
        DecodeRequestError::Envelope(library(e))
    }
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

    fn assert_bounded(what: &str, msg: &str) {
        assert!(
            msg.len() <= MAX_ERROR_LEN,
            "{what}: {} bytes: {msg}",
            msg.len()
        );
        assert!(!msg.contains("\\\\"), "{what}: escaped twice: {msg}");
        assert_eq!(
            display::check_message(msg, MAX_ERROR_LEN, 0),
            Ok(()),
            "{what}"
        );
    }

    /// 10 KiB of control characters (DEL, which JSON carries raw) wherever
    /// a sign request reaches an error message: bounded, escaped once.
    #[test]
    fn hostile_requests_get_bounded_messages() {
        let junk = "\u{7f}".repeat(10 * 1024);
        let pem = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n");
        let envelope = |identity: &str, csr: &str| {
            serde_json::json!({"identity": identity, "csr": csr}).to_string()
        };
        let cases = [
            ("unknown field", format!("{{\"{junk}\": 1}}")),
            ("identity", envelope(&junk, "x")),
            (
                "identity path",
                envelope(&format!("spiffe://td/{}", &junk[..1000]), "x"),
            ),
            (
                "ttl",
                format!(
                    "{{\"identity\": \"spiffe://td/ns/a/sa/b\", \"csr\": \"x\", \"ttl_seconds\": \"{junk}\"}}"
                ),
            ),
            ("PEM label", envelope("spiffe://td/ns/a/sa/b", &pem(&junk))),
            (
                "PEM end",
                envelope("spiffe://td/ns/a/sa/b", &pem("CERTIFICATE REQUEST")),
            ),
            (
                "PEM base64",
                envelope(
                    "spiffe://td/ns/a/sa/b",
                    &format!(
                        "-----BEGIN CERTIFICATE REQUEST-----\n{junk}\n-----END CERTIFICATE REQUEST-----\n"
                    ),
                ),
            ),
        ];
        for (what, body) in cases {
            assert!(
                body.len() <= ca::MAX_REQUEST_BYTES,
                "{what}: {} bytes",
                body.len()
            );
            let msg = decode_request(body.as_bytes()).unwrap_err().to_string();
            assert!(
                msg.contains("\\u{7f}") || what.starts_with("PEM"),
                "{what}: {msg}"
            );
            assert_bounded(what, &msg);
            fuzz_decode(body.as_bytes());
        }
    }

    #[test]
    fn a_hostile_san_is_shown_once_and_bounded() {
        let key = KeyPair::generate().unwrap();
        let uri: String = (0..1000).map(|i| char::from(1 + (i % 31) as u8)).collect();
        let san = SanType::URI(uri.as_str().try_into().unwrap());
        let pem = csr_with(vec![san], &key);
        let msg = check_csr(&pem, &id()).unwrap_err().to_string();
        assert!(
            msg.starts_with("CSR asks for URI SAN \"\\u{1}\\u{2}"),
            "{msg}"
        );
        assert!(
            msg.ends_with(
                "… (1000 bytes)\", but the identity is \"spiffe://td/ns/default/sa/web\""
            ),
            "{msg}"
        );
        assert_bounded("URI SAN", &msg);
        fuzz_decode(&decode_pem(&pem).unwrap());
    }

    /// What the server logs for an envelope it cannot decode: serde_json
    /// quotes an unknown field raw, control characters included; through
    /// [`DecodeRequestError`] it is escaped and bounded. 10 KiB of them
    /// (a body over the size limit, so its serde error is made directly),
    /// and as many as a body within the limit holds.
    #[test]
    fn ten_kib_of_control_characters_in_an_unknown_field_give_a_bounded_message() {
        let body = |field: String| {
            let mut map = serde_json::Map::new();
            map.insert("identity".into(), "spiffe://td/ns/default/sa/web".into());
            map.insert("csr".into(), "x".into());
            map.insert(field, 1.into());
            serde_json::Value::Object(map).to_string()
        };
        let big = body("\u{1}\n\u{9f}\u{1b}".repeat(10 * 1024 / 4));
        let big = serde_json::from_str::<SignRequest>(&big).map_err(ca::DecodeError::from);
        let fits = body("\n\t".repeat(3 * 1024));
        assert!(fits.len() <= ca::MAX_REQUEST_BYTES, "{} bytes", fits.len());
        let fits = ca::decode_sign_request(fits.as_bytes());
        for e in [big.err(), fits.err()] {
            let raw = e.as_ref().map(|e| e.to_string()).unwrap_or_default();
            assert!(raw.contains('\n'), "serde_json quotes it raw: {raw:?}");
            let msg = e
                .map(|e| DecodeRequestError::from(e).to_string())
                .unwrap_or_default();
            assert!(msg.contains("unknown field"), "{msg}");
            assert!(msg.len() <= MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
            assert_eq!(display::check_message(&msg, MAX_ERROR_LEN, 0), Ok(()));
        }
    }

    #[test]
    fn fuzz_seed_files() {
        for seed in mesh_core::display::fuzz_seeds("sign_request") {
            fuzz_decode(&seed);
        }
    }

    /// A CSR made now, and the seeds the target starts from.
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
