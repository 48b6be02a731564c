//! The per-node certificate manager.
//!
//! - Obtains a certificate for a workload identity on demand ([`CertManager::fetch`])
//!   or ahead of need ([`CertManager::track`], then the [`CertManager::run`] loop).
//! - Renews at 50% of the certificate's life, ±5% of the life as jitter.
//! - When the CA fails, keeps serving the last good certificate until it
//!   expires, and retries with exponential backoff (with jitter).
//! - One in-flight request per identity: concurrent callers share it.
//! - Time comes from an injected [`Clock`]; [`CertManager::refresh_due`]
//!   does one round of work, so tests drive it without sleeping.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::ca::{SignRequest, SignResponse};
use mesh_core::identity::{Clock, Identity};
use rand::Rng;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::{Notify, watch};

use super::client::CaClient;
use super::tls::{BundleCell, TrustBundle, peer_identity};

/// Key algorithm of workload keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// Tuning of the manager.
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    pub trust_domain: String,
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime to ask for; the CA's default when `None`.
    pub ttl: Option<Duration>,
    /// Renew at this fraction of the life...
    pub renew_at: f64,
    /// ... ± this fraction of the life, at random.
    pub renew_jitter: f64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl CertManagerConfig {
    pub fn new(trust_domain: &str) -> Self {
        CertManagerConfig {
            trust_domain: trust_domain.to_owned(),
            key_algorithm: KeyAlgorithm::default(),
            ttl: None,
            renew_at: 0.5,
            renew_jitter: 0.05,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
        }
    }
}

/// Why a certificate could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("{identity}: CA request failed: {reason}")]
    Ca { identity: Identity, reason: String },
    #[error("{identity}: CA answer refused: {reason}")]
    BadAnswer { identity: Identity, reason: String },
    #[error("{identity}: making a key or CSR: {reason}")]
    Key { identity: Identity, reason: String },
    #[error("{identity}: not in trust domain {trust_domain}")]
    TrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("trust bundle from the CA: {reason}")]
    Bundle { reason: String },
    #[error("{identity}: no valid certificate ({last_error}); next attempt in {retry_in:?}")]
    Unavailable {
        identity: Identity,
        last_error: String,
        retry_in: Duration,
    },
}

/// A workload's certificate and key, ready for rustls.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub certified_key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }
}

/// What an admin endpoint or `mesh certs` shows per identity.
pub use mesh_core::admin::CertState;

#[derive(Debug)]
struct EntryState {
    cert: Option<Arc<WorkloadCert>>,
    next_refresh: SystemTime,
    backoff: Duration,
    last_error: Option<String>,
    failures: u32,
    /// Bumped at the end of every attempt, so waiters can tell one happened.
    attempts: u64,
}

#[derive(Debug)]
pub(crate) struct Entry {
    state: Mutex<EntryState>,
    in_flight: tokio::sync::Mutex<()>,
}

impl Entry {
    fn lock(&self) -> parking_lot::MutexGuard<'_, EntryState> {
        self.state.lock()
    }

    /// The certificate if it is valid at `now`.
    pub(crate) fn current(&self, now: SystemTime) -> Option<Arc<WorkloadCert>> {
        self.lock().cert.clone().filter(|c| c.is_valid_at(now))
    }
}

pub(crate) struct Inner {
    pub(crate) client: Arc<dyn CaClient>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: CertManagerConfig,
    pub(crate) provider: Arc<rustls::crypto::CryptoProvider>,
    pub(crate) bundle: BundleCell,
    entries: Mutex<HashMap<Identity, Arc<Entry>>>,
    wake: Notify,
}

/// The node's certificate manager. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct CertManager {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("trust_domain", &self.inner.config.trust_domain)
            .field("client", &self.inner.client)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// `initial_roots`: the trust bundle known at start (e.g. the file the
    /// CA wrote); every CA answer replaces it.
    pub fn new(
        client: Arc<dyn CaClient>,
        clock: Arc<dyn Clock>,
        config: CertManagerConfig,
        initial_roots: Vec<CertificateDer<'static>>,
    ) -> Self {
        let provider = Arc::new(super::tls::mesh_provider());
        let bundle = BundleCell::new(TrustBundle::new(initial_roots, &provider));
        CertManager {
            inner: Arc::new(Inner {
                client,
                clock,
                config,
                provider,
                bundle,
                entries: Mutex::new(HashMap::new()),
                wake: Notify::new(),
            }),
        }
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.inner.bundle.get()
    }

    pub(crate) fn entry(&self, identity: &Identity) -> Arc<Entry> {
        let mut entries = self.inner.entries.lock();
        entries
            .entry(identity.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    state: Mutex::new(EntryState {
                        cert: None,
                        next_refresh: UNIX_EPOCH,
                        backoff: self.inner.config.initial_backoff,
                        last_error: None,
                        failures: 0,
                        attempts: 0,
                    }),
                    in_flight: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Keeps a certificate for `identity` ready ahead of need (a pod of it
    /// was scheduled here). The run loop fetches it at once.
    pub fn track(&self, identity: &Identity) {
        self.entry(identity);
        self.inner.wake.notify_one();
    }

    /// Stops keeping `identity` (its last pod left the node).
    pub fn forget(&self, identity: &Identity) {
        self.inner.entries.lock().remove(identity);
    }

    /// The certificate of `identity` if one valid now is held.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCert>> {
        let entry = self.inner.entries.lock().get(identity).cloned()?;
        entry.current(self.inner.clock.now())
    }

    /// A certificate valid now for `identity`: the one held, or a new one
    /// from the CA (sharing any request already in flight). While the CA
    /// fails and the backoff runs, answers the last error at once.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let entry = self.entry(identity);
        let now = self.inner.clock.now();
        {
            let st = entry.lock();
            if let Some(cert) = st.cert.clone().filter(|c| c.is_valid_at(now)) {
                return Ok(cert);
            }
            if let (Some(err), Ok(retry_in)) = (&st.last_error, st.next_refresh.duration_since(now))
            {
                return Err(CertError::Unavailable {
                    identity: identity.clone(),
                    last_error: err.clone(),
                    retry_in,
                });
            }
        }
        self.refresh(identity, &entry).await
    }

    /// Renews `identity` now, whatever its schedule (e.g. `mesh certs
    /// renew`, or after a root rotation). Shares a request already in flight.
    pub async fn renew(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let entry = self.entry(identity);
        self.refresh(identity, &entry).await
    }

    /// One attempt to renew `identity` (shared with concurrent callers).
    /// On failure the previous certificate stays in use while valid.
    async fn refresh(
        &self,
        identity: &Identity,
        entry: &Arc<Entry>,
    ) -> Result<Arc<WorkloadCert>, CertError> {
        let seen = entry.lock().attempts;
        let _in_flight = entry.in_flight.lock().await;
        {
            // Someone else's attempt finished while we waited: take its result.
            let st = entry.lock();
            if st.attempts != seen {
                let now = self.inner.clock.now();
                return match (
                    st.cert.clone().filter(|c| c.is_valid_at(now)),
                    &st.last_error,
                ) {
                    (Some(cert), None) => Ok(cert),
                    (_, Some(err)) => Err(CertError::Unavailable {
                        identity: identity.clone(),
                        last_error: err.clone(),
                        retry_in: st.next_refresh.duration_since(now).unwrap_or_default(),
                    }),
                    (None, None) => Err(CertError::Unavailable {
                        identity: identity.clone(),
                        last_error: "no certificate".into(),
                        retry_in: Duration::ZERO,
                    }),
                };
            }
        }
        let result = self.request(identity).await;
        let now = self.inner.clock.now();
        let mut st = entry.lock();
        st.attempts += 1;
        match result {
            Ok(cert) => {
                let cert = Arc::new(cert);
                st.next_refresh = self.renew_time(&cert);
                st.backoff = self.inner.config.initial_backoff;
                st.last_error = None;
                st.failures = 0;
                st.cert = Some(cert.clone());
                tracing::info!(
                    identity = %identity,
                    serial = %cert.serial,
                    not_after = crate::identity::unix(cert.not_after),
                    "workload certificate obtained"
                );
                Ok(cert)
            }
            Err(err) => {
                let delay = jittered(st.backoff);
                st.next_refresh = now + delay;
                st.backoff = (st.backoff * 2).min(self.inner.config.max_backoff);
                st.failures += 1;
                st.last_error = Some(err.to_string());
                let held = st.cert.clone().filter(|c| c.is_valid_at(now));
                tracing::warn!(
                    identity = %identity,
                    error = %err,
                    failures = st.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    keeping_serial = held.as_ref().map(|c| c.serial.as_str()).unwrap_or("-"),
                    "workload certificate renewal failed"
                );
                Err(err)
            }
        }
    }

    fn renew_time(&self, cert: &WorkloadCert) -> SystemTime {
        let life = cert
            .not_after
            .duration_since(cert.not_before)
            .unwrap_or_default();
        let c = &self.inner.config;
        let jitter = if c.renew_jitter > 0.0 {
            rand::rng().random_range(-c.renew_jitter..=c.renew_jitter)
        } else {
            0.0
        };
        let fraction = (c.renew_at + jitter).clamp(0.05, 0.95);
        cert.not_before + life.mul_f64(fraction)
    }

    async fn request(&self, identity: &Identity) -> Result<WorkloadCert, CertError> {
        let config = &self.inner.config;
        if identity.trust_domain() != config.trust_domain {
            return Err(CertError::TrustDomain {
                identity: identity.clone(),
                trust_domain: config.trust_domain.clone(),
            });
        }
        let key_err = |reason: String| CertError::Key {
            identity: identity.clone(),
            reason,
        };
        let key = KeyPair::generate_for(config.key_algorithm.rcgen())
            .map_err(|e| key_err(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| key_err(e.to_string()))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| key_err(e.to_string()))?;
        let request = SignRequest {
            identity: identity.clone(),
            csr,
            ttl_seconds: config.ttl.map(|t| t.as_secs()),
        };
        let response = self
            .inner
            .client
            .sign(&request)
            .await
            .map_err(|e| CertError::Ca {
                identity: identity.clone(),
                reason: e.to_string(),
            })?;
        self.accept(identity, &key, response)
    }

    /// Checks the CA's answer before using it: the leaf names `identity`
    /// alone, holds our key, and chains to the bundle that came with it.
    fn accept(
        &self,
        identity: &Identity,
        key: &KeyPair,
        response: SignResponse,
    ) -> Result<WorkloadCert, CertError> {
        let bad = |reason: String| CertError::BadAnswer {
            identity: identity.clone(),
            reason,
        };
        let chain = parse_pems(&response.certificate_chain).map_err(&bad)?;
        let roots = parse_pems(&response.trust_bundle).map_err(&bad)?;
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let named = peer_identity(leaf).map_err(|e| bad(e.to_string()))?;
        if &named != identity {
            return Err(bad(format!("leaf names {named}")));
        }
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("leaf does not hold the key we sent".into()));
        }
        let not_before = to_system_time(parsed.validity().not_before.timestamp());
        let not_after = to_system_time(parsed.validity().not_after.timestamp());
        let bundle = TrustBundle::new(roots.clone(), &self.inner.provider);
        let check =
            rustls::server::ParsedCertificate::try_from(leaf).map_err(|e| bad(e.to_string()))?;
        let now = rustls::pki_types::UnixTime::since_unix_epoch(
            self.inner
                .clock
                .now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &check,
            &bundle.root_store(),
            &chain[1..],
            now,
            self.inner.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| bad(format!("leaf does not chain to the trust bundle: {e}")))?;
        let signing = self
            .inner
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| bad(format!("loading our key into rustls: {e}")))?;
        let certified_key = Arc::new(CertifiedKey::new(chain.clone(), signing));
        // The bundle every answer carries is the current one.
        if self.inner.bundle.get().roots != roots {
            tracing::info!(roots = roots.len(), "trust bundle updated");
            self.inner.client.update_trust(&roots);
            self.inner.bundle.set(bundle);
        }
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain,
            serial: response.serial,
            not_before,
            not_after,
            certified_key,
        })
    }

    /// Fetches the trust bundle from the CA and puts it in force. Returns
    /// the number of roots.
    pub async fn refresh_trust_bundle(&self) -> Result<usize, CertError> {
        let resp = self
            .inner
            .client
            .trust_bundle()
            .await
            .map_err(|e| CertError::Bundle {
                reason: e.to_string(),
            })?;
        let roots = parse_pems(&resp.roots).map_err(|reason| CertError::Bundle { reason })?;
        let n = roots.len();
        if self.inner.bundle.get().roots != roots {
            tracing::info!(roots = n, "trust bundle updated");
            self.inner.client.update_trust(&roots);
            self.inner
                .bundle
                .set(TrustBundle::new(roots, &self.inner.provider));
        }
        Ok(n)
    }

    /// One round of background work: renews every tracked identity whose
    /// renewal time has come (concurrently). Returns how many were tried.
    pub async fn refresh_due(&self) -> usize {
        let now = self.inner.clock.now();
        let due: Vec<(Identity, Arc<Entry>)> = self
            .inner
            .entries
            .lock()
            .iter()
            .filter(|(_, e)| e.lock().next_refresh <= now)
            .map(|(i, e)| (i.clone(), e.clone()))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (identity, entry) in &due {
            let this = self.clone();
            let (identity, entry) = (identity.clone(), entry.clone());
            tasks.spawn(async move {
                let _ = this.refresh(&identity, &entry).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        due.len()
    }

    /// When the next renewal or retry is due.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.inner
            .entries
            .lock()
            .values()
            .map(|e| e.lock().next_refresh)
            .min()
    }

    /// Background loop: renews on time until `shutdown` turns true. Sleeps
    /// at most `max_sleep` at a time, so a clock jump is noticed.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        const MAX_SLEEP: Duration = Duration::from_secs(30);
        loop {
            self.refresh_due().await;
            let wait = self
                .next_due()
                .map(|t| t.duration_since(self.inner.clock.now()).unwrap_or_default())
                .unwrap_or(MAX_SLEEP)
                .clamp(Duration::from_millis(10), MAX_SLEEP);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.wake.notified() => {}
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break },
            }
        }
    }

    /// State of every tracked identity, sorted by identity.
    pub fn states(&self) -> Vec<CertState> {
        let now = self.inner.clock.now();
        let mut out: Vec<CertState> = self
            .inner
            .entries
            .lock()
            .iter()
            .map(|(identity, e)| {
                let st = e.lock();
                CertState {
                    identity: identity.to_string(),
                    serial: st.cert.as_ref().map(|c| c.serial.clone()),
                    not_before: st
                        .cert
                        .as_ref()
                        .map(|c| crate::identity::unix(c.not_before)),
                    not_after: st.cert.as_ref().map(|c| crate::identity::unix(c.not_after)),
                    next_refresh: crate::identity::unix(st.next_refresh),
                    last_error: st.last_error.clone(),
                    consecutive_failures: st.failures,
                    valid: st.cert.as_ref().is_some_and(|c| c.is_valid_at(now)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    pub fn state(&self, identity: &Identity) -> Option<CertState> {
        let id = identity.to_string();
        self.states().into_iter().find(|s| s.identity == id)
    }
}

fn parse_pems(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    pems.iter()
        .map(|p| {
            CertificateDer::from_pem_slice(p.as_bytes())
                .map_err(|e| format!("not a PEM certificate: {e:?}"))
        })
        .collect()
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH
    }
}

/// `d` plus up to 25% more, at random.
fn jittered(d: Duration) -> Duration {
    d + d.mul_f64(rand::rng().random_range(0.0..0.25))
}
