#![forbid(unsafe_code)]
//! sockmesh in a Kubernetes cluster: the registry source that watches the
//! API ([`KubeRegistry`], behind mesh-core's `WorkloadRegistry`), the
//! mapping of Kubernetes objects onto mesh-core's types ([`convert`]), the
//! AuthorizationPolicy CRD ([`crd`]), and what the node proxy writes back
//! ([`StatusWriter`]: the `sockmesh.io/status` annotation and Events).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mesh_kube::{KubeConfig, KubeRegistry, PodScope};
//! let client = kube::Client::try_default().await?;
//! let registry = KubeRegistry::start(client, KubeConfig::new(PodScope::Node("node-1".into())));
//! registry.wait_synced(std::time::Duration::from_secs(30)).await;
//! let view = registry.view(); // indexed: pod by IP, Service by VIP
//! # Ok(()) }
//! ```

pub mod convert;
pub mod crd;
pub mod registry;
pub mod status;

pub use convert::{Components, Endpoint, ObjectProblem};
pub use registry::{Health, KubeConfig, KubeRegistry, PodScope, View};
pub use status::{FIELD_MANAGER, PodStatus, Reconciled, StatusError, StatusWriter};
