//! The signing side of the CA: a signer (root or intermediate with its key),
//! the trust bundle, and the rules of an X.509-SVID.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::identity::Identity;
use rand::RngCore;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::csr::CsrPublicKey;

/// How far NotBefore is set before the signing time, for clock skew.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("requested lifetime {requested:?} is over the cap {cap:?}")]
    TtlOverCap { requested: Duration, cap: Duration },
    #[error("requested lifetime {requested:?} is under the minimum {min:?}")]
    TtlTooShort { requested: Duration, min: Duration },
    #[error("identity {identity} is not in trust domain {trust_domain}")]
    WrongTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("signer certificate expires at {signer_not_after:?}, before now")]
    SignerExpired { signer_not_after: SystemTime },
    #[error("signing for {identity}: {source}")]
    Rcgen {
        identity: String,
        source: rcgen::Error,
    },
    #[error("clock before the Unix epoch")]
    Clock,
}

/// A CA certificate with its key: what signs.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signer's certificate.
    pub cert: CertificateDer<'static>,
    /// Certificates between the signer and a root, signer first; empty when
    /// the signer is itself a root. Sent after the leaf.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
    pub subject: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// `chain` as described on the field.
    pub fn new(
        cert: CertificateDer<'static>,
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Self, rcgen::Error> {
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        let not_after = to_system_time(parsed.validity().not_after.to_datetime());
        let subject = parsed.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Signer {
            issuer,
            cert,
            chain,
            not_after,
            subject,
        })
    }
}

/// An issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The signer plus the trust bundle in force.
#[derive(Debug)]
pub struct Authority {
    pub trust_domain: String,
    pub signer: Signer,
    /// Every root workloads must trust now (several during a rotation).
    pub bundle: Vec<CertificateDer<'static>>,
}

impl Authority {
    /// Signs an X.509-SVID for `identity` over `public_key`, valid `ttl`
    /// from `now - BACKDATE`'s backdated start. The certificate carries only
    /// what this function puts in it.
    pub fn issue(
        &self,
        identity: &Identity,
        public_key: &CsrPublicKey,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, SignError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(SignError::WrongTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if now >= self.signer.not_after {
            return Err(SignError::SignerExpired {
                signer_not_after: self.signer.not_after,
            });
        }
        let not_before = now.checked_sub(BACKDATE).ok_or(SignError::Clock)?;
        // A certificate never outlives its issuer.
        let not_after = (now + ttl).min(self.signer.not_after);
        let rcgen_err = |source| SignError::Rcgen {
            identity: identity.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(rcgen_err)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if public_key.key_type().is_rsa() {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;
        let cert = params
            .signed_by(public_key, &self.signer.issuer)
            .map_err(rcgen_err)?;
        let mut chain = Vec::with_capacity(1 + self.signer.chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.signer.chain.iter().cloned());
        Ok(Issued {
            identity: identity.clone(),
            chain,
            serial_hex: hex(&serial),
            not_before: truncate_to_secs(not_before),
            not_after: truncate_to_secs(not_after),
        })
    }

    /// Issues the CA's own TLS serving certificate (DNS/IP SANs, serverAuth),
    /// with a fresh P-256 key. Returns the chain and the PKCS#8 key.
    pub fn issue_serving_cert(
        &self,
        names: &[String],
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), SignError> {
        let rcgen_err = |source| SignError::Rcgen {
            identity: format!("CA serving certificate {names:?}"),
            source,
        };
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(rcgen_err)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sockmesh CA");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let not_before = now.checked_sub(BACKDATE).ok_or(SignError::Clock)?;
        let one_year = Duration::from_secs(365 * 24 * 3600);
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset((now + one_year).min(self.signer.not_after))?;
        let cert = params
            .signed_by(&key, &self.signer.issuer)
            .map_err(rcgen_err)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.signer.chain.iter().cloned());
        Ok((chain, key.serialize_der()))
    }

    pub fn bundle_pem(&self) -> Vec<String> {
        self.bundle.iter().map(|c| cert_pem(c)).collect()
    }
}

/// Shared handle to the authority in force, swapped on rotation or reload.
pub type SharedAuthority = Arc<std::sync::RwLock<Arc<Authority>>>;

/// 16 random bytes, positive, no leading zero byte (RFC 5280 4.1.2.2).
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn cert_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

pub(crate) fn to_offset(t: SystemTime) -> Result<OffsetDateTime, SignError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| SignError::Clock)?
        .as_secs();
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).map_err(|_| SignError::Clock)?)
        .map_err(|_| SignError::Clock)
}

pub(crate) fn to_system_time(t: OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
