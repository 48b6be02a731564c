//! The CA in a Kubernetes cluster: its root in a Secret (created if absent,
//! never overwritten), the trust bundle (root certificates only) published
//! in a ConfigMap for the node proxies, and one leader among replicas by
//! Lease.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::roots::{self, RootSource, RootStore};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("secret {namespace}/{name}: {what}: {source}")]
    Secret {
        namespace: String,
        name: String,
        what: &'static str,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("secret {namespace}/{name}: {reason}")]
    BadSecret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error(
        "secret {namespace}/{name} does not exist yet and this replica is not the leader: waiting for the leader to create it"
    )]
    NotYet { namespace: String, name: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("root of trust: {0}")]
    Root(#[from] roots::RootError),
    #[error("configmap {namespace}/{name}: {what}: {source}")]
    ConfigMap {
        namespace: String,
        name: String,
        what: &'static str,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("reloading the roots: {0}")]
    Reload(String),
    #[error("lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// Where the root lives: a Secret in the cert-manager layout (`tls.crt`,
/// `tls.key`, `ca.crt`; type `kubernetes.io/tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSecret {
    pub namespace: String,
    pub name: String,
}

impl RootSecret {
    /// Reads the root Secret into `dir` (cert-manager layout, the key 0600)
    /// and returns it as a plugged root source. When the Secret does not
    /// exist and `may_create` (this replica leads), generates a root and
    /// creates the Secret; if another replica created it first, that one
    /// is used. An existing Secret is never written.
    pub async fn load_or_create(
        &self,
        client: &kube::Client,
        trust_domain: &str,
        dir: &Path,
        may_create: bool,
        now: SystemTime,
    ) -> Result<RootSource, ClusterError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let err = |what: &'static str| {
            move |source: kube::Error| ClusterError::Secret {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                what,
                source: Box::new(source),
            }
        };
        let secret = match api.get_opt(&self.name).await.map_err(err("reading"))? {
            Some(s) => s,
            None if !may_create => {
                return Err(ClusterError::NotYet {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                });
            }
            None => {
                let fresh = self.generate(trust_domain, dir, now)?;
                match api.create(&PostParams::default(), &fresh).await {
                    Ok(s) => {
                        tracing::info!(secret = %format!("{}/{}", self.namespace, self.name), "generated a new root of trust and stored it in its Secret");
                        s
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        tracing::info!(secret = %format!("{}/{}", self.namespace, self.name), "another replica created the root Secret first: using it");
                        api.get(&self.name).await.map_err(err("reading"))?
                    }
                    Err(e) => return Err(err("creating")(e)),
                }
            }
        };
        self.write_plugged(&secret, dir)
    }

    fn generate(
        &self,
        trust_domain: &str,
        dir: &Path,
        now: SystemTime,
    ) -> Result<Secret, ClusterError> {
        let work = dir.join(format!("generate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let store = RootStore::new(&work);
        store.load_or_init(trust_domain, now)?;
        let id = store.status()?.active;
        let read = |name: &str| {
            let path = work.join("roots").join(&id).join(name);
            std::fs::read(&path).map_err(|source| ClusterError::Io { path, source })
        };
        let cert = read("cert.pem")?;
        let key = read("key.pem")?;
        let _ = std::fs::remove_dir_all(&work);
        Ok(Secret {
            metadata: part_of_sockmesh(&self.namespace, &self.name),
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    ("tls.crt".to_owned(), ByteString(cert.clone())),
                    ("tls.key".to_owned(), ByteString(key)),
                    ("ca.crt".to_owned(), ByteString(cert)),
                ]
                .into(),
            ),
            ..Default::default()
        })
    }

    fn write_plugged(&self, secret: &Secret, dir: &Path) -> Result<RootSource, ClusterError> {
        let out = dir.join("root-secret");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ClusterError::Io { path, source }
        };
        std::fs::create_dir_all(&out).map_err(io(&out))?;
        let data = secret.data.clone().unwrap_or_default();
        for (key, mode) in [("tls.crt", 0o644), ("tls.key", 0o600), ("ca.crt", 0o644)] {
            let Some(value) = data.get(key) else {
                return Err(ClusterError::BadSecret {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    reason: format!("no {key}"),
                });
            };
            let path = out.join(key);
            // Unchanged files are not rewritten: a rewrite is what tells
            // the signer to reload (`Ca::reload_roots_if_changed`).
            if std::fs::read(&path).ok().as_deref() != Some(value.0.as_slice()) {
                roots::write_atomic(&path, &value.0, mode)?;
            }
        }
        Ok(RootSource::Plugged(out))
    }
}

/// The metadata of an object the CA makes: its name and the label
/// `mesh uninstall` and the opt-in rule know sockmesh's objects by.
fn part_of_sockmesh(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(
            [(
                "app.kubernetes.io/part-of".to_owned(),
                "sockmesh".to_owned(),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// The ConfigMap key of the trust bundle (PEM, every root to trust).
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";
/// The field manager of the CA's writes to the trust bundle ConfigMap.
pub const TRUST_BUNDLE_MANAGER: &str = "sockmesh-ca";

/// Where the trust bundle is published: a ConfigMap holding only the root
/// certificates (PEM, key [`TRUST_BUNDLE_KEY`]). The node proxies mount it
/// as `--ca-bundle`; a Secret volume of the root Secret would make every
/// node's kubelet fetch the whole Secret, key included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundleConfigMap {
    pub namespace: String,
    pub name: String,
}

impl TrustBundleConfigMap {
    /// Makes the ConfigMap hold exactly `roots` as PEM under
    /// [`TRUST_BUNDLE_KEY`], and nothing else: created when absent,
    /// rewritten when it differs (a rotation added or dropped a root, or
    /// someone edited it), untouched when it matches. `Ok(true)` when it
    /// wrote. Only certificates are ever written: the PEM is built from
    /// the DER certificates here.
    pub async fn publish(
        &self,
        client: &kube::Client,
        roots: &[CertificateDer<'_>],
    ) -> Result<bool, ClusterError> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
        let err = |what: &'static str| {
            move |source: kube::Error| ClusterError::ConfigMap {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                what,
                source: Box::new(source),
            }
        };
        let pem = roots::bundle_pem(roots);
        let want: std::collections::BTreeMap<String, String> =
            [(TRUST_BUNDLE_KEY.to_owned(), pem.clone())].into();
        let live = match api.get_opt(&self.name).await.map_err(err("reading"))? {
            Some(live) => live,
            None => {
                let fresh = ConfigMap {
                    metadata: part_of_sockmesh(&self.namespace, &self.name),
                    data: Some(want.clone()),
                    ..Default::default()
                };
                let params = PostParams {
                    field_manager: Some(TRUST_BUNDLE_MANAGER.into()),
                    ..Default::default()
                };
                match api.create(&params, &fresh).await {
                    Ok(_) => {
                        tracing::info!(configmap = %format!("{}/{}", self.namespace, self.name), roots = roots.len(), "published the trust bundle");
                        return Ok(true);
                    }
                    // Another replica (a leader a moment ago) made it: compare below.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        api.get(&self.name).await.map_err(err("reading"))?
                    }
                    Err(e) => return Err(err("creating")(e)),
                }
            }
        };
        let exact = live.data.as_ref() == Some(&want)
            && live.binary_data.as_ref().is_none_or(|b| b.is_empty());
        if exact {
            return Ok(false);
        }
        // A JSON merge patch: sets the bundle and removes every other key
        // (null), whoever wrote it. Needs only `patch` on this one name.
        let mut data = serde_json::Map::new();
        for key in live.data.iter().flat_map(|d| d.keys()) {
            data.insert(key.clone(), serde_json::Value::Null);
        }
        data.insert(TRUST_BUNDLE_KEY.into(), pem.into());
        let mut patch = serde_json::json!({ "data": data });
        if live.binary_data.is_some() {
            patch["binaryData"] = serde_json::Value::Null;
        }
        let params = PatchParams {
            field_manager: Some(TRUST_BUNDLE_MANAGER.into()),
            ..Default::default()
        };
        api.patch(&self.name, &params, &Patch::Merge(&patch))
            .await
            .map_err(err("updating"))?;
        tracing::info!(configmap = %format!("{}/{}", self.namespace, self.name), roots = roots.len(), "trust bundle updated");
        Ok(true)
    }
}

/// One round of the cluster CA's upkeep: re-read the root Secret (an owner
/// rotating the root edits it, cert-manager style: the new root into
/// `ca.crt`, then `tls.*`, then the old root out), reload the signer if it
/// changed, and, on the leader, publish the trust bundle. `Ok(true)` when
/// the ConfigMap was written.
pub async fn sync_roots(
    client: &kube::Client,
    secret: &RootSecret,
    bundle: &TrustBundleConfigMap,
    ca: &crate::Ca,
    dir: &Path,
    leads: bool,
) -> Result<bool, ClusterError> {
    let trust_domain = ca.config().trust_domain.clone();
    secret
        .load_or_create(client, &trust_domain, dir, false, SystemTime::now())
        .await?;
    ca.reload_roots_if_changed()
        .map_err(|e| ClusterError::Reload(e.to_string()))?;
    if !leads {
        return Ok(false);
    }
    bundle.publish(client, &ca.trust_bundle()).await
}

/// One leader among CA replicas, by a `coordination.k8s.io/v1` Lease.
#[derive(Clone)]
pub struct LeaderElection {
    pub client: kube::Client,
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub lease: Duration,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("lease", &format!("{}/{}", self.namespace, self.name))
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl LeaderElection {
    /// One round: take the Lease if it is free or expired, renew it if
    /// ours. `Ok(true)` when this replica leads now. A lost race (409) is
    /// `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, ClusterError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let err = |source: kube::Error| ClusterError::Lease {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        };
        let lost = |e: &kube::Error| matches!(e, kube::Error::Api(a) if a.code == 409);
        let secs = i32::try_from(self.lease.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = api.get_opt(&self.name).await.map_err(err)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if lost(&e) => Ok(false),
                Err(e) => Err(err(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours {
            let duration_ms = i64::from(spec.lease_duration_seconds.unwrap_or(secs)) * 1000;
            let renewed_ms = spec
                .renew_time
                .as_ref()
                .map(|t| t.0.as_millisecond())
                .unwrap_or(0);
            let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
            if spec.holder_identity.is_some() && now_ms < renewed_ms + duration_ms {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now_micro());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now_micro());
        spec.lease_duration_seconds = Some(secs);
        match api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if lost(&e) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Runs rounds every third of the lease; the receiver says whether this
    /// replica leads. An API error counts as not leading (a leader that
    /// cannot renew steps down before its lease runs out).
    pub fn run(self) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let leads = match self.try_acquire_or_renew().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "leader election");
                        false
                    }
                };
                if *tx.borrow() != leads {
                    tracing::info!(identity = %self.identity, leads, "leadership changed");
                }
                tx.send_replace(leads);
                tokio::time::sleep(self.lease / 3).await;
            }
        });
        (rx, task)
    }
}
