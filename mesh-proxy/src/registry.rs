//! Where the node proxy learns its workloads: the YAML file of the local
//! mesh, or the Kubernetes API (`mesh_kube::KubeRegistry`). Both serve
//! the same `Arc<IndexedSnapshot>`; every layer below (enrollment, routing,
//! policy, metrics) reads only that, so it does not know which one it is.
//!
//! The file source is polled; the Kubernetes source says when its view
//! changed ([`RegistrySource::changes`]) and writes each pod's status back
//! ([`KubeSource::status`]). Until the Kubernetes source has listed every
//! kind once it is not [`settled`](RegistrySource::settled): a partial view
//! (pods without their namespaces) would unenroll pods the namespace opts
//! in, so nothing is reconciled against it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::registry::{FileRegistry, IndexedSnapshot, RegistryError, WorkloadRegistry};
use mesh_kube::{Components, KubeConfig, KubeRegistry, PodScope, StatusWriter};
use tokio::sync::watch;

/// `--registry-source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The YAML file given by `--registry` (the local mesh).
    #[default]
    File,
    /// The Kubernetes API: pods of `--node`, namespaces, services,
    /// endpointslices, authorization policies.
    Kubernetes,
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "file" => Ok(SourceKind::File),
            "kubernetes" => Ok(SourceKind::Kubernetes),
            other => Err(format!(
                "--registry-source {other:?}: expected \"file\" or \"kubernetes\""
            )),
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::File => "file",
            SourceKind::Kubernetes => "kubernetes",
        })
    }
}

/// Why the registry source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    File(#[from] RegistryError),
    #[error("--kubeconfig {}: {reason}", path.display())]
    Kubeconfig { path: PathBuf, reason: String },
    #[error(
        "no Kubernetes client configuration (neither $KUBECONFIG, ~/.kube/config nor the in-cluster service account): {0}; give --kubeconfig PATH"
    )]
    Infer(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// The Kubernetes source and what the node proxy writes back.
pub struct KubeSource {
    pub registry: KubeRegistry,
    /// The `sockmesh.io/status` annotation and Warning Events.
    pub status: StatusWriter,
    /// `--api-stale-seconds`.
    pub stale_after: Duration,
}

/// One of the two sources.
pub enum RegistrySource {
    File(FileRegistry),
    Kubernetes(Box<KubeSource>),
}

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistrySource::File(r) => f.debug_tuple("File").field(&r.path()).finish(),
            RegistrySource::Kubernetes(k) => {
                f.debug_tuple("Kubernetes").field(&k.registry).finish()
            }
        }
    }
}

/// What the Kubernetes source needs to start.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    pub node: String,
    /// `--kubeconfig`; unset: `$KUBECONFIG`, `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// The proxy's own pod `(namespace, name)`, never meshed.
    pub own_pod: Option<(String, String)>,
    pub stale_after: Duration,
}

/// A kube-rs client from `--kubeconfig`, or kube's usual inference.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |reason: String| SourceError::Kubeconfig {
                path: path.to_owned(),
                reason,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| SourceError::Infer(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| SourceError::Client(e.to_string()))
}

impl KubeSource {
    /// Starts the watchers (on the current tokio runtime): see
    /// [`KubeSource::config`].
    pub fn start(client: kube::Client, settings: &KubeSettings) -> KubeSource {
        KubeSource::with_config(client, KubeSource::config(settings), &settings.node)
    }

    /// The watchers a node proxy runs. Pods of every node, not only of
    /// `settings.node` (a `spec.nodeName` field selector): routing needs
    /// the pods of the other nodes too — a destination pod's address, that
    /// it is meshed, and its service account (the identity its proxy must
    /// present) — and an EndpointSlice carries none of the last two. Only
    /// this node's pods are enrolled and have their status written. (RBAC
    /// cannot restrict a list to a field selector anyway: the permission is
    /// the same.)
    pub fn config(settings: &KubeSettings) -> KubeConfig {
        let mut config = KubeConfig::new(PodScope::Cluster);
        config.components = Components {
            own_pod: settings.own_pod.clone(),
            ..config.components
        };
        config.stale_after = settings.stale_after;
        config
    }

    /// [`KubeSource::start`] with every knob of the watchers given (tests
    /// shorten the backoffs).
    pub fn with_config(client: kube::Client, config: KubeConfig, node: &str) -> KubeSource {
        let stale_after = config.stale_after;
        KubeSource {
            registry: KubeRegistry::start(client.clone(), config),
            status: StatusWriter::new(client, node),
            stale_after,
        }
    }
}

impl RegistrySource {
    pub fn file(path: &Path) -> Result<RegistrySource, SourceError> {
        Ok(RegistrySource::File(FileRegistry::load(path)?))
    }

    pub fn kubernetes(source: KubeSource) -> RegistrySource {
        RegistrySource::Kubernetes(Box::new(source))
    }

    /// The current state, indexed (the one thing every layer below reads).
    pub fn snapshot(&self) -> Arc<IndexedSnapshot> {
        match self {
            RegistrySource::File(r) => r.snapshot(),
            RegistrySource::Kubernetes(k) => k.registry.snapshot(),
        }
    }

    pub fn kind(&self) -> SourceKind {
        match self {
            RegistrySource::File(_) => SourceKind::File,
            RegistrySource::Kubernetes(_) => SourceKind::Kubernetes,
        }
    }

    pub fn kube(&self) -> Option<&KubeSource> {
        match self {
            RegistrySource::File(_) => None,
            RegistrySource::Kubernetes(k) => Some(k),
        }
    }

    /// Re-reads the file if it changed (`Ok(true)`: a new snapshot). The
    /// Kubernetes source changes by itself: `Ok(false)`.
    pub fn refresh(&self) -> Result<bool, RegistryError> {
        match self {
            RegistrySource::File(r) => r.reload_if_changed(),
            RegistrySource::Kubernetes(_) => Ok(false),
        }
    }

    /// A receiver that changes with every new view of the Kubernetes
    /// source; `None` for the file (polled).
    pub fn changes(&self) -> Option<watch::Receiver<u64>> {
        self.kube().map(|k| k.registry.changes())
    }

    /// Whether the snapshot is a whole view that may be reconciled
    /// against: always for the file; for Kubernetes once every watcher
    /// has listed once. Afterwards it stays so: while the API server is
    /// unreachable the last view stays (stale, not empty).
    pub fn settled(&self) -> bool {
        match self {
            RegistrySource::File(_) => true,
            RegistrySource::Kubernetes(k) => k.registry.view().whole,
        }
    }

    /// Why readiness should say no because of the registry: not synced
    /// yet, or no contact with the API server for longer than
    /// `--api-stale-seconds`.
    pub fn not_ready(&self) -> Option<String> {
        let k = self.kube()?;
        let h = k.registry.health();
        let last = h
            .last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default();
        if !k.registry.view().whole {
            return Some(format!(
                "Kubernetes API: not synced yet (pods, namespaces, services, endpointslices and authorizationpolicies not all listed once){last}"
            ));
        }
        if h.stale {
            return Some(format!(
                "Kubernetes API: stale: no successful list/watch for {}s (--api-stale-seconds {}); serving the last known state{last}",
                h.since_contact.as_secs(),
                k.stale_after.as_secs()
            ));
        }
        None
    }
}

impl WorkloadRegistry for RegistrySource {
    fn current(&self) -> Arc<IndexedSnapshot> {
        self.snapshot()
    }
}
