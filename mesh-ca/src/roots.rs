//! Where the root of trust comes from, and how it rotates.
//!
//! Two sources:
//!
//! - **Generated** ([`RootSource::StateDir`]): on first start the CA makes
//!   a root (ECDSA P-256, 10 years) and keeps it in its state dir, key files
//!   mode 0600. Rotation is three steps, each persisted before it takes effect:
//!   [`RootStore::prepare`] (a new root is made and *trusted*, the old one
//!   still signs), [`RootStore::activate`] (the new root signs, the old one
//!   stays trusted), [`RootStore::retire`] (the old roots leave the bundle,
//!   once every workload holds a certificate of the new root).
//!
//!   ```text
//!   <state>/roots.json            {"active": ID, "next": ID?, "previous": [ID]}
//!   <state>/roots/<ID>/cert.pem   root certificate
//!   <state>/roots/<ID>/key.pem    PKCS#8 key, 0600
//!   <state>/trust-bundle.pem      every trusted root (for the proxies to read)
//!   ```
//!
//! - **Plugged** ([`RootSource::Plugged`]): a directory in the layout
//!   cert-manager writes for a CA Secret: `tls.crt` (the signing CA
//!   certificate, root or intermediate, optionally followed by its chain),
//!   `tls.key` (its key: PKCS#8, SEC1 `EC PRIVATE KEY` or PKCS#1 `RSA
//!   PRIVATE KEY`), `ca.crt` (the roots to trust; several allowed). Rotation
//!   is the owner's: put the new root in `ca.crt`, then swap `tls.*`, then
//!   drop the old root; [`crate::Ca::reload_roots`] picks each step up.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::authority::{Authority, Signer, cert_pem, hex, to_offset};

/// Lifetime of a generated root.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// Generate on first start, keep in this directory.
    StateDir(PathBuf),
    /// Use the CA certificate and key in this directory (cert-manager layout).
    Plugged(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("root rotation: {0}")]
    Rotation(String),
    #[error("generating a root: {0}")]
    Generate(rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootError + '_ {
    move |source| RootError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> RootError {
    RootError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootsState {
    active: String,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    previous: Vec<String>,
}

/// The rotation phase of a generated root store, for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootStatus {
    pub active: String,
    pub next: Option<String>,
    pub previous: Vec<String>,
}

/// A state-dir root store (the generated source).
#[derive(Debug, Clone)]
pub struct RootStore {
    dir: PathBuf,
}

impl RootStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RootStore { dir: dir.into() }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("roots.json")
    }

    pub fn trust_bundle_path(&self) -> PathBuf {
        self.dir.join("trust-bundle.pem")
    }

    fn root_dir(&self, id: &str) -> PathBuf {
        self.dir.join("roots").join(id)
    }

    fn read_state(&self) -> Result<Option<RootsState>, RootError> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| invalid(&path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn write_state(&self, state: &RootsState) -> Result<(), RootError> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| invalid(&self.state_path(), e.to_string()))?;
        write_atomic(&self.state_path(), &json, 0o600)
    }

    /// Loads the roots, generating the first one if the store is empty.
    pub fn load_or_init(
        &self,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<Authority, RootError> {
        create_private_dir(&self.dir)?;
        let state = match self.read_state()? {
            Some(s) => s,
            None => {
                let id = self.generate(trust_domain, now)?;
                let state = RootsState {
                    active: id,
                    ..Default::default()
                };
                self.write_state(&state)?;
                tracing::info!(dir = %self.dir.display(), root = %state.active, "generated a new root of trust");
                state
            }
        };
        self.authority(&state, trust_domain)
    }

    pub fn status(&self) -> Result<RootStatus, RootError> {
        let s = self
            .read_state()?
            .ok_or_else(|| invalid(&self.state_path(), "no root yet"))?;
        Ok(RootStatus {
            active: s.active,
            next: s.next,
            previous: s.previous,
        })
    }

    fn authority(&self, state: &RootsState, trust_domain: &str) -> Result<Authority, RootError> {
        let (cert, key) = self.read_root(&state.active, true)?;
        let key = key.ok_or_else(|| invalid(&self.root_dir(&state.active), "no key"))?;
        let signer = Signer::new(cert.clone(), key, Vec::new())
            .map_err(|e| invalid(&self.root_dir(&state.active), e.to_string()))?;
        let mut bundle = vec![cert];
        for id in state.next.iter().chain(state.previous.iter()) {
            bundle.push(self.read_root(id, false)?.0);
        }
        let authority = Authority {
            trust_domain: trust_domain.to_owned(),
            signer,
            bundle,
        };
        let pem: String = authority.bundle_pem().concat();
        write_atomic(&self.trust_bundle_path(), pem.as_bytes(), 0o644)?;
        Ok(authority)
    }

    fn read_root(
        &self,
        id: &str,
        with_key: bool,
    ) -> Result<(CertificateDer<'static>, Option<KeyPair>), RootError> {
        let dir = self.root_dir(id);
        let cert_path = dir.join("cert.pem");
        let text = fs::read(&cert_path).map_err(io_err(&cert_path))?;
        let cert = CertificateDer::from_pem_slice(&text)
            .map_err(|e| invalid(&cert_path, format!("not a PEM certificate: {e:?}")))?;
        let key = if with_key {
            let key_path = dir.join("key.pem");
            Some(load_key(&key_path)?)
        } else {
            None
        };
        Ok((cert, key))
    }

    fn generate(&self, trust_domain: &str, now: SystemTime) -> Result<String, RootError> {
        let mut raw = [0u8; 8];
        rand::rng().fill_bytes(&mut raw);
        let id = hex(&raw);
        let key = KeyPair::generate().map_err(RootError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sockmesh");
        dn.push(
            DnType::CommonName,
            format!("sockmesh root {trust_domain} {id}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut serial = [0u8; 16];
        rand::rng().fill_bytes(&mut serial);
        serial[0] = (serial[0] & 0x7f) | 1;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let start = now
            .checked_sub(crate::authority::BACKDATE)
            .ok_or_else(|| RootError::Rotation("clock before the epoch".into()))?;
        params.not_before = to_offset(start).map_err(|e| RootError::Rotation(e.to_string()))?;
        params.not_after =
            to_offset(now + ROOT_LIFETIME).map_err(|e| RootError::Rotation(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(RootError::Generate)?;
        let dir = self.root_dir(&id);
        create_private_dir(&dir)?;
        write_atomic(&dir.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&dir.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
        Ok(id)
    }

    /// Rotation step 1: a new root is generated and added to the trust
    /// bundle; the active root keeps signing.
    pub fn prepare(&self, trust_domain: &str, now: SystemTime) -> Result<Authority, RootError> {
        let mut state = self.require_state()?;
        if let Some(next) = &state.next {
            return Err(RootError::Rotation(format!(
                "root {next} is already prepared; activate it first"
            )));
        }
        let id = self.generate(trust_domain, now)?;
        state.next = Some(id.clone());
        self.write_state(&state)?;
        tracing::info!(next = %id, active = %state.active, "root rotation: new root prepared and trusted");
        self.authority(&state, trust_domain)
    }

    /// Rotation step 2: the prepared root signs from now on; the old one stays trusted.
    pub fn activate(&self, trust_domain: &str) -> Result<Authority, RootError> {
        let mut state = self.require_state()?;
        let next = state
            .next
            .take()
            .ok_or_else(|| RootError::Rotation("no prepared root to activate".into()))?;
        let old = std::mem::replace(&mut state.active, next);
        state.previous.push(old.clone());
        self.write_state(&state)?;
        tracing::info!(active = %state.active, previous = %old, "root rotation: new root active");
        self.authority(&state, trust_domain)
    }

    /// Rotation step 3: previous roots leave the bundle; their keys are deleted.
    pub fn retire(&self, trust_domain: &str) -> Result<Authority, RootError> {
        let mut state = self.require_state()?;
        let retired = std::mem::take(&mut state.previous);
        self.write_state(&state)?;
        let authority = self.authority(&state, trust_domain)?;
        for id in &retired {
            let dir = self.root_dir(id);
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a retired root");
            }
        }
        tracing::info!(retired = ?retired, "root rotation: previous roots retired");
        Ok(authority)
    }

    fn require_state(&self) -> Result<RootsState, RootError> {
        self.read_state()?
            .ok_or_else(|| invalid(&self.state_path(), "no root yet: start the CA once first"))
    }
}

/// Loads a plugged-in CA from `dir` (cert-manager layout).
pub fn load_plugged(dir: &Path, trust_domain: &str) -> Result<Authority, RootError> {
    let tls_crt = dir.join("tls.crt");
    let tls_key = dir.join("tls.key");
    let ca_crt = dir.join("ca.crt");
    let certs = read_certs(&tls_crt)?;
    let Some((signer_cert, rest)) = certs.split_first() else {
        return Err(invalid(&tls_crt, "no certificate"));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(signer_cert)
        .map_err(|e| invalid(&tls_crt, format!("first certificate does not parse: {e}")))?;
    let is_ca = parsed
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(invalid(
            &tls_crt,
            format!(
                "{} is not a CA certificate (basicConstraints cA is not true)",
                parsed.subject()
            ),
        ));
    }
    let can_sign = parsed
        .key_usage()
        .ok()
        .flatten()
        .is_none_or(|ku| ku.value.key_cert_sign());
    if !can_sign {
        return Err(invalid(
            &tls_crt,
            format!("{}: key usage lacks keyCertSign", parsed.subject()),
        ));
    }
    let self_signed = parsed.subject() == parsed.issuer();
    let key = load_key(&tls_key)?;
    if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
        return Err(invalid(
            &tls_key,
            format!(
                "key does not match the certificate {} in tls.crt",
                parsed.subject()
            ),
        ));
    }
    let mut bundle = if ca_crt.exists() {
        read_certs(&ca_crt)?
    } else {
        Vec::new()
    };
    if bundle.is_empty() {
        if !self_signed {
            return Err(invalid(
                &ca_crt,
                "missing or empty, and tls.crt is an intermediate: the root to trust is unknown",
            ));
        }
        bundle.push(signer_cert.clone());
    }
    // Chain sent after leaves: the signer and intermediates, never a root.
    let chain: Vec<CertificateDer<'static>> = if self_signed {
        Vec::new()
    } else {
        std::iter::once(signer_cert.clone())
            .chain(rest.iter().filter(|c| !bundle.contains(c)).cloned())
            .collect()
    };
    let signer = Signer::new(signer_cert.clone(), key, chain)
        .map_err(|e| invalid(&tls_crt, e.to_string()))?;
    Ok(Authority {
        trust_domain: trust_domain.to_owned(),
        signer,
        bundle,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RootError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not PEM certificates: {e:?}")))
}

/// Loads a private key in PKCS#8, SEC1 or PKCS#1 PEM.
pub fn load_key(path: &Path) -> Result<KeyPair, RootError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let key = PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| invalid(path, format!("no PEM private key: {e:?}")))?;
    let result = match &key {
        PrivateKeyDer::Pkcs8(k) => KeyPair::try_from(k.secret_pkcs8_der()),
        PrivateKeyDer::Sec1(k) => [P256_ALG_ID, P384_ALG_ID]
            .iter()
            .map(|alg| KeyPair::try_from(pkcs8_wrap(alg, k.secret_sec1_der()).as_slice()))
            .find(Result::is_ok)
            .unwrap_or(Err(rcgen::Error::CouldNotParseKeyPair)),
        PrivateKeyDer::Pkcs1(k) => {
            KeyPair::try_from(pkcs8_wrap(RSA_ALG_ID, k.secret_pkcs1_der()).as_slice())
        }
        _ => Err(rcgen::Error::CouldNotParseKeyPair),
    };
    result.map_err(|e| invalid(path, format!("unsupported or malformed key: {e}")))
}

// AlgorithmIdentifier DER: { id-ecPublicKey, prime256v1 } / { id-ecPublicKey,
// secp384r1 } / { rsaEncryption, NULL }.
const P256_ALG_ID: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
const P384_ALG_ID: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];
const RSA_ALG_ID: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// PKCS#8 PrivateKeyInfo { version 0, algorithm, OCTET STRING key }.
fn pkcs8_wrap(alg_id: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(alg_id);
    body.extend(der_tlv(0x04, key));
    der_tlv(0x30, &body)
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), RootError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RootError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// PEM of every certificate, concatenated.
pub fn bundle_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(cert_pem).collect()
}
