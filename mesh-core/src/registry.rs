//! The workload registry: which nodes exist and which pods run where.
//!
//! One trait, [`WorkloadRegistry`], with two sources: the YAML file of the
//! local mesh ([`FileRegistry`], here) and Kubernetes (a later issue). Later
//! issues add services and policies to the same file; every section is
//! optional and unknown keys are refused, so a typo never passes silently.
//!
//! ```yaml
//! nodes:
//!   - name: node-1
//! pods:
//!   - namespace: default
//!     name: web-1
//!     uid: 6f1c0d3e-0000-4000-8000-000000000001
//!     node: node-1
//!     service_account: web
//!     ips: [10.10.1.2]
//!     labels: {app: web}
//!     netns: /run/netns/sockmesh-demo-default-web-1   # local mesh only
//! services:
//!   - namespace: default
//!     name: web
//!     vip: 10.96.0.10
//!     ports: [{port: 80, target_port: 8080}]
//!     selector: {app: web}
//! policies:
//!   - apiVersion: security.sockmesh.io/v1
//!     kind: AuthorizationPolicy
//!     metadata: {name: deny-other, namespace: default}
//!     spec:
//!       action: DENY
//!       rules: [{from: [{source: {namespaces: [other]}}]}]
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use serde::Deserialize;

use crate::identity::{self, Identity, IdentityError};
use crate::opt_in::{MeshDecision, OptInFacts};

/// A node of the mesh (a Kubernetes node, or a node namespace of the local mesh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
}

/// A pod as the mesh needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The node the pod is scheduled on.
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The pod's network namespace, where the node learns it from the file
    /// (the local mesh); in Kubernetes the CNI plugin hands it over.
    pub netns: Option<PathBuf>,
    /// Annotations (Kubernetes; optional in the file).
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
    /// The controller that owns the pod (Deployment, StatefulSet, ...), for
    /// metric labels; `None` for a bare pod.
    pub workload: Option<WorkloadRef>,
    /// Whether the pod is in the mesh, by [`crate::opt_in::decide`]; the
    /// source computes it (it knows the namespace).
    pub mesh: MeshDecision,
}

/// The workload a pod belongs to, as Istio's `*_workload` labels name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRef {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `ReplicaSet`, `CronJob`, ...
    pub kind: String,
    pub name: String,
}

/// A Service: a virtual IP whose ports lead to the pods its selector picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vip: IpAddr,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

impl Service {
    /// Whether the selector picks `pod` (same namespace, every selector label
    /// present with the same value; an empty selector picks nothing, as in
    /// Kubernetes).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace
            && !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }

    /// The pod port behind service port `port`.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port)
    }
}

/// The opt-out: `sockmesh.io/mesh: disabled` on a pod keeps it out of the
/// mesh (in the file registry it may be a label or an annotation; in
/// Kubernetes an annotation). See [`crate::opt_in`].
pub const MESH_LABEL: &str = crate::opt_in::MESH_KEY;

impl Pod {
    /// Whether the pod is in the mesh (the opt-in rule, [`crate::opt_in`]).
    pub fn meshed(&self) -> bool {
        self.mesh.is_meshed()
    }

    /// Istio's `app` label: `app.kubernetes.io/name`, else `app`.
    pub fn app(&self) -> Option<&str> {
        ["app.kubernetes.io/name", "app"]
            .iter()
            .find_map(|k| self.labels.get(*k))
            .map(String::as_str)
    }

    /// Istio's `version` label: `app.kubernetes.io/version`, else `version`.
    pub fn version(&self) -> Option<&str> {
        ["app.kubernetes.io/version", "version"]
            .iter()
            .find_map(|k| self.labels.get(*k))
            .map(String::as_str)
    }

    /// The workload name for metrics: the owning controller, else the
    /// `app` label, else the pod's name (Istio's fallback order).
    pub fn workload_name(&self) -> &str {
        self.workload
            .as_ref()
            .map(|w| w.name.as_str())
            .or_else(|| self.app())
            .unwrap_or(&self.name)
    }

    /// The pod's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Result<Identity, IdentityError> {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// Read access to the workloads of the mesh. Implementations keep their
/// own cache (a file snapshot, a Kubernetes watch) so lookups are cheap and
/// synchronous.
pub trait WorkloadRegistry: Send + Sync + std::fmt::Debug {
    /// The registry's current state, indexed. Every lookup below reads it.
    fn current(&self) -> Arc<IndexedSnapshot>;

    fn node(&self, name: &str) -> Option<Node> {
        self.current()
            .nodes
            .iter()
            .find(|n| n.name == name)
            .cloned()
    }

    fn pods_on_node(&self, node: &str) -> Vec<Pod> {
        self.current()
            .pods
            .iter()
            .filter(|p| p.node == node)
            .cloned()
            .collect()
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.current().pod(namespace, name).cloned()
    }

    /// The identities of the pods scheduled on `node`, deduplicated.
    fn identities_on_node(&self, node: &str, trust_domain: &str) -> BTreeSet<Identity> {
        self.pods_on_node(node)
            .iter()
            .filter_map(|p| p.identity(trust_domain).ok())
            .collect()
    }
}

/// Why the registry file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry {path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("registry {path}: {what}: {reason}")]
    Invalid {
        path: PathBuf,
        what: String,
        reason: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    pods: Vec<RawPod>,
    #[serde(default)]
    services: Vec<RawService>,
    /// AuthorizationPolicy documents, as in Kubernetes (see `policy`).
    #[serde(default)]
    policies: Option<serde_norway::Value>,
    /// Namespaces with labels (`sockmesh.io/mesh`); a namespace not listed
    /// counts as labelled `enabled`, so a file without this section meshes
    /// every pod that does not opt out.
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    namespace: String,
    name: String,
    vip: String,
    ports: Vec<RawServicePort>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServicePort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    namespace: String,
    name: String,
    uid: String,
    node: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    host_network: bool,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// A parsed, checked registry file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub policies: Vec<crate::policy::AuthorizationPolicy>,
}

impl Snapshot {
    /// The pod that has `ip`.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods.iter().find(|p| p.ips.contains(&ip))
    }

    /// The Service whose virtual IP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.services.iter().find(|s| s.vip == ip)
    }

    /// The pods a Service selects, in file order.
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| service.selects(p))
    }
}

impl Snapshot {
    /// Parses registry YAML; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, RegistryError> {
        let raw: RawFile = serde_norway::from_str(text).map_err(|source| RegistryError::Yaml {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |what: String, reason: String| RegistryError::Invalid {
            path: path.to_owned(),
            what,
            reason,
        };
        let mut node_names = BTreeSet::new();
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for n in raw.nodes {
            if n.name.is_empty() || identity::validate_service_account(&n.name).is_err() {
                return Err(invalid(
                    format!("node {:?}", n.name),
                    "node names must be DNS-1123 subdomains".into(),
                ));
            }
            if !node_names.insert(n.name.clone()) {
                return Err(invalid(format!("node {:?}", n.name), "listed twice".into()));
            }
            nodes.push(Node { name: n.name });
        }
        let mut pod_names = BTreeSet::new();
        let mut uids = BTreeSet::new();
        let mut pods = Vec::with_capacity(raw.pods.len());
        for p in raw.pods {
            let what = format!("pod {}/{}", p.namespace, p.name);
            identity::validate_namespace(&p.namespace)
                .map_err(|e| invalid(what.clone(), e.to_string()))?;
            if identity::validate_service_account(&p.name).is_err() {
                return Err(invalid(
                    what,
                    format!("name {:?}: must be a DNS-1123 subdomain", p.name),
                ));
            }
            identity::validate_service_account(&p.service_account)
                .map_err(|e| invalid(what.clone(), e.to_string()))?;
            if !node_names.contains(&p.node) {
                return Err(invalid(
                    what,
                    format!("node {:?} is not in the nodes list", p.node),
                ));
            }
            if p.uid.is_empty() {
                return Err(invalid(what, "uid \"\": empty".into()));
            }
            if !uids.insert(p.uid.clone()) {
                return Err(invalid(what, format!("uid {:?} is used twice", p.uid)));
            }
            if !pod_names.insert((p.namespace.clone(), p.name.clone())) {
                return Err(invalid(what, "listed twice".into()));
            }
            let ips = p
                .ips
                .iter()
                .map(|ip| {
                    ip.parse::<IpAddr>()
                        .map_err(|e| invalid(what.clone(), format!("ip {ip:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let namespace_label = match raw.namespaces.iter().find(|n| n.name == p.namespace) {
                Some(n) => n.labels.get(MESH_LABEL).map(String::as_str),
                None => Some(crate::opt_in::ENABLED),
            };
            let mesh = crate::opt_in::decide(OptInFacts {
                pod: p
                    .annotations
                    .get(MESH_LABEL)
                    .or_else(|| p.labels.get(MESH_LABEL))
                    .map(String::as_str),
                namespace: namespace_label,
                host_network: p.host_network,
                mesh_component: false,
            });
            pods.push(Pod {
                namespace: p.namespace,
                name: p.name,
                uid: p.uid,
                node: p.node,
                service_account: p.service_account,
                ips,
                labels: p.labels,
                netns: p.netns,
                annotations: p.annotations,
                host_network: p.host_network,
                workload: None,
                mesh,
            });
        }
        let mut services = Vec::with_capacity(raw.services.len());
        let mut vips = BTreeSet::new();
        let mut service_names = BTreeSet::new();
        for s in raw.services {
            let what = format!("service {}/{}", s.namespace, s.name);
            identity::validate_namespace(&s.namespace)
                .map_err(|e| invalid(what.clone(), e.to_string()))?;
            if identity::validate_service_account(&s.name).is_err() {
                return Err(invalid(
                    what,
                    format!("name {:?}: must be a DNS-1123 label", s.name),
                ));
            }
            if !service_names.insert((s.namespace.clone(), s.name.clone())) {
                return Err(invalid(what, "listed twice".into()));
            }
            let vip: IpAddr = s
                .vip
                .parse()
                .map_err(|e| invalid(what.clone(), format!("vip {:?}: {e}", s.vip)))?;
            if !vips.insert(vip) || pods.iter().any(|p| p.ips.contains(&vip)) {
                return Err(invalid(what, format!("vip {vip} is already in use")));
            }
            if s.ports.is_empty() {
                return Err(invalid(what, "ports: at least one port is needed".into()));
            }
            let mut ports = Vec::with_capacity(s.ports.len());
            for p in &s.ports {
                let target_port = p.target_port.unwrap_or(p.port);
                if p.port == 0 || target_port == 0 {
                    return Err(invalid(
                        what,
                        format!("port {}->{target_port}: 0 is not a port", p.port),
                    ));
                }
                if ports.iter().any(|q: &ServicePort| q.port == p.port) {
                    return Err(invalid(what, format!("port {} listed twice", p.port)));
                }
                ports.push(ServicePort {
                    port: p.port,
                    target_port,
                });
            }
            services.push(Service {
                namespace: s.namespace,
                name: s.name,
                vip,
                ports,
                selector: s.selector,
            });
        }
        let policies = match raw.policies {
            None => Vec::new(),
            Some(v) => {
                let text = serde_norway::to_string(&v)
                    .map_err(|e| invalid("policies".into(), e.to_string()))?;
                crate::policy::parse_policies(&text)
                    .map_err(|e| invalid("policies".into(), e.to_string()))?
            }
        };
        Ok(Snapshot {
            nodes,
            pods,
            services,
            policies,
        })
    }
}

/// A [`Snapshot`] with its lookups indexed once, when it is parsed: pod by
/// IP and by name, Service by VIP, a Service's endpoints. It reads as the
/// snapshot it holds (`Deref`); the lookups below replace the snapshot's
/// linear scans, so the data path never walks the pod list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexedSnapshot {
    snapshot: Snapshot,
    /// Positions in `snapshot.pods`.
    pod_by_ip: HashMap<IpAddr, usize>,
    pod_by_name: HashMap<(String, String), usize>,
    /// Position in `snapshot.services`, and the positions of the pods the
    /// Service selects, in file order.
    service_by_vip: HashMap<IpAddr, (usize, Vec<usize>)>,
}

impl IndexedSnapshot {
    pub fn new(snapshot: Snapshot) -> Self {
        let mut pod_by_ip = HashMap::new();
        let mut pod_by_name = HashMap::new();
        for (i, p) in snapshot.pods.iter().enumerate() {
            for ip in &p.ips {
                // The first pod listed wins, as the linear scan did.
                pod_by_ip.entry(*ip).or_insert(i);
            }
            pod_by_name
                .entry((p.namespace.clone(), p.name.clone()))
                .or_insert(i);
        }
        let mut service_by_vip = HashMap::new();
        for (i, s) in snapshot.services.iter().enumerate() {
            let endpoints = snapshot
                .pods
                .iter()
                .enumerate()
                .filter(|(_, p)| s.selects(p))
                .map(|(j, _)| j)
                .collect();
            service_by_vip.entry(s.vip).or_insert((i, endpoints));
        }
        IndexedSnapshot {
            snapshot,
            pod_by_ip,
            pod_by_name,
            service_by_vip,
        }
    }

    /// The pod that has `ip`.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pod_by_ip.get(&ip).map(|&i| &self.snapshot.pods[i])
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pod_by_name
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|&i| &self.snapshot.pods[i])
    }

    /// The Service whose virtual IP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.service_by_vip
            .get(&ip)
            .map(|(i, _)| &self.snapshot.services[*i])
    }

    /// The pods a Service selects, in file order.
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        let indexed = self
            .service_by_vip
            .get(&service.vip)
            .filter(|(i, _)| self.snapshot.services[*i] == *service)
            .map(|(_, eps)| eps.as_slice());
        // A Service of another snapshot: select by scanning.
        let scanned = indexed
            .is_none()
            .then(|| self.snapshot.endpoints(service))
            .into_iter()
            .flatten();
        indexed
            .unwrap_or_default()
            .iter()
            .map(|&i| &self.snapshot.pods[i])
            .chain(scanned)
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl From<Snapshot> for IndexedSnapshot {
    fn from(snapshot: Snapshot) -> Self {
        IndexedSnapshot::new(snapshot)
    }
}

impl std::ops::Deref for IndexedSnapshot {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// The YAML file source. Holds a snapshot; [`FileRegistry::reload_if_changed`]
/// re-reads the file when its modification time, size or inode moved,
/// keeping the old snapshot if the new file is invalid. Writers should
/// replace the file atomically (write a temporary file, then rename).
#[derive(Debug)]
pub struct FileRegistry {
    path: PathBuf,
    state: RwLock<(Arc<IndexedSnapshot>, Option<FileStamp>)>,
}

impl FileRegistry {
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        let path = path.into();
        let (snapshot, stamp) = read_file(&path)?;
        Ok(FileRegistry {
            path,
            state: RwLock::new((Arc::new(snapshot.into()), stamp)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn snapshot(&self) -> Arc<IndexedSnapshot> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Re-reads the file if it changed. `Ok(true)` when a new snapshot is in
    /// force; on error the previous snapshot stays.
    pub fn reload_if_changed(&self) -> Result<bool, RegistryError> {
        let current = stamp(&self.path).map_err(|source| RegistryError::Read {
            path: self.path.clone(),
            source,
        })?;
        let known = self.state.read().unwrap_or_else(PoisonError::into_inner).1;
        if current.is_some() && current == known {
            return Ok(false);
        }
        let (snapshot, stamp) = read_file(&self.path)?;
        *self.state.write().unwrap_or_else(PoisonError::into_inner) =
            (Arc::new(snapshot.into()), stamp);
        Ok(true)
    }
}

/// Modification time, size and inode of the registry file when last read.
type FileStamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> std::io::Result<Option<FileStamp>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(meta.modified().ok().map(|m| (m, meta.len(), meta.ino())))
}

fn read_file(path: &Path) -> Result<(Snapshot, Option<FileStamp>), RegistryError> {
    let read_err = |source| RegistryError::Read {
        path: path.to_owned(),
        source,
    };
    let before = stamp(path).map_err(read_err)?;
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    Ok((Snapshot::parse(path, &text)?, before))
}

impl WorkloadRegistry for FileRegistry {
    fn current(&self) -> Arc<IndexedSnapshot> {
        self.snapshot()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
nodes:
  - name: node-1
  - name: node-2
pods:
  - namespace: default
    name: web-1
    uid: u1
    node: node-1
    service_account: web
    ips: [10.10.1.2, "fd00::2"]
    labels: {app: web}
  - namespace: default
    name: db-1
    uid: u2
    node: node-2
"#;

    fn parse(text: &str) -> Result<Snapshot, RegistryError> {
        Snapshot::parse(Path::new("/etc/mesh/registry.yaml"), text)
    }

    #[test]
    fn parses_nodes_and_pods() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.nodes.len(), 2);
        let web = &s.pods[0];
        assert_eq!(web.service_account, "web");
        assert_eq!(web.ips.len(), 2);
        assert_eq!(web.labels["app"], "web");
        assert_eq!(s.pods[1].service_account, "default");
        assert_eq!(
            web.identity("cluster.local").unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(parse("").unwrap(), Snapshot::default());
    }

    #[test]
    fn errors_name_the_file_and_the_bad_value() {
        let cases = [
            (GOOD.replace("10.10.1.2", "10.10.1.x"), "\"10.10.1.x\""),
            (GOOD.replace("node: node-2", "node: node-9"), "\"node-9\""),
            (GOOD.replace("uid: u2", "uid: u1"), "\"u1\""),
            (
                GOOD.replace("service_account: web", "service_account: Web"),
                "\"Web\"",
            ),
            (
                GOOD.replace(
                    "namespace: default\n    name: db-1",
                    "namespace: Prod\n    name: db-1",
                ),
                "\"Prod\"",
            ),
            (GOOD.replace("labels:", "lables:"), "lables"),
            (
                GOOD.replace("- name: node-2", "- name: node-1"),
                "\"node-1\"",
            ),
            ("nodes: 3".to_string(), "nodes"),
        ];
        for (text, want) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.starts_with("registry /etc/mesh/registry.yaml: "),
                "{err}"
            );
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn services_resolve_to_the_pods_they_select() {
        let text = format!(
            "{GOOD}services:\n  - namespace: default\n    name: web\n    vip: 10.96.0.10\n    ports: [{{port: 80, target_port: 8080}}, {{port: 9090}}]\n    selector: {{app: web}}\n"
        );
        let s = parse(&text).unwrap();
        let svc = s.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(svc.target_port(80), Some(8080));
        assert_eq!(svc.target_port(9090), Some(9090));
        assert_eq!(svc.target_port(81), None);
        let eps: Vec<_> = s.endpoints(svc).map(|p| p.name.as_str()).collect();
        assert_eq!(eps, ["web-1"]);
        assert_eq!(
            s.pod_by_ip("fd00::2".parse().unwrap()).unwrap().name,
            "web-1"
        );

        for (bad, want) in [
            (
                text.replace("vip: 10.96.0.10", "vip: 10.96.0.x"),
                "\"10.96.0.x\"",
            ),
            (
                text.replace("vip: 10.96.0.10", "vip: 10.10.1.2"),
                "10.10.1.2 is already in use",
            ),
            (text.replace("{port: 9090}", "{port: 0}"), "0 is not a port"),
            (
                text.replace("{port: 9090}", "{port: 80}"),
                "port 80 listed twice",
            ),
        ] {
            let err = parse(&bad).unwrap_err().to_string();
            assert!(
                err.contains("service default/web") && err.contains(want),
                "{err}"
            );
        }
    }

    #[test]
    fn the_index_answers_as_the_scans_do() {
        let text = format!(
            "{GOOD}  - namespace: default\n    name: web-2\n    uid: u3\n    node: node-2\n    ips: [10.10.1.3]\n    labels: {{app: web}}\nservices:\n  - namespace: default\n    name: web\n    vip: 10.96.0.10\n    ports: [{{port: 80}}]\n    selector: {{app: web}}\n  - namespace: default\n    name: none\n    vip: 10.96.0.11\n    ports: [{{port: 80}}]\n    selector: {{app: nothing}}\n"
        );
        let plain = parse(&text).unwrap();
        let indexed = IndexedSnapshot::new(plain.clone());
        for ip in [
            "10.10.1.2",
            "fd00::2",
            "10.10.1.3",
            "10.10.1.9",
            "10.96.0.10",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(indexed.pod_by_ip(ip), plain.pod_by_ip(ip), "{ip}");
            assert_eq!(indexed.service_by_vip(ip), plain.service_by_vip(ip), "{ip}");
        }
        for svc in &plain.services {
            let a: Vec<_> = indexed.endpoints(svc).collect();
            let b: Vec<_> = plain.endpoints(svc).collect();
            assert_eq!(a, b, "{}", svc.name);
        }
        assert_eq!(indexed.endpoints(&plain.services[0]).count(), 2);
        assert_eq!(indexed.pod("default", "web-2").unwrap().uid, "u3");
        assert!(indexed.pod("default", "web-3").is_none());
        assert_eq!(indexed.pods.len(), 3, "reads as the snapshot it holds");
    }

    #[test]
    fn policies_are_parsed_and_bad_ones_named() {
        let text = format!(
            "{GOOD}policies:\n  - apiVersion: security.sockmesh.io/v1\n    kind: AuthorizationPolicy\n    metadata: {{name: deny-db, namespace: default}}\n    spec:\n      selector: {{matchLabels: {{app: db}}}}\n      action: DENY\n      rules: [{{}}]\n"
        );
        let s = parse(&text).unwrap();
        assert_eq!(s.policies.len(), 1);
        assert_eq!(s.policies[0].name, "deny-db");
        let err = parse(&text.replace("action: DENY", "action: NOPE"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("policies") && err.contains("NOPE"), "{err}");
    }

    #[test]
    fn the_file_follows_the_opt_in_rule_with_unlisted_namespaces_enabled() {
        let text = format!(
            "{GOOD}  - namespace: quiet\n    name: q-1\n    uid: u3\n    node: node-1\n  - namespace: quiet\n    name: q-2\n    uid: u4\n    node: node-1\n    annotations: {{sockmesh.io/mesh: enabled}}\n  - namespace: default\n    name: off\n    uid: u5\n    node: node-1\n    labels: {{sockmesh.io/mesh: disabled}}\n  - namespace: default\n    name: host\n    uid: u6\n    node: node-1\n    host_network: true\nnamespaces:\n  - name: quiet\n"
        );
        let s = parse(&text).unwrap();
        let meshed: Vec<_> = s
            .pods
            .iter()
            .filter(|p| p.meshed())
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(meshed, ["web-1", "db-1", "q-2"]);
        let off = s.pods.iter().find(|p| p.name == "off").unwrap();
        assert_eq!(
            off.mesh,
            MeshDecision::NotMeshed(crate::opt_in::NotMeshed::PodDisabled)
        );
        assert_eq!(s.pods[0].app(), Some("web"));
        assert_eq!(s.pods[0].workload_name(), "web");
        assert_eq!(s.pods[1].workload_name(), "db-1");
    }

    #[test]
    fn file_source_reloads_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let reg = FileRegistry::load(&path).unwrap();
        assert_eq!(reg.pods_on_node("node-1").len(), 1);
        assert_eq!(reg.identities_on_node("node-2", "td").len(), 1);
        assert!(reg.node("node-3").is_none());
        assert!(reg.pod("default", "db-1").is_some());
        assert!(!reg.reload_if_changed().unwrap());

        let moved = GOOD.replace("node: node-2", "node: node-1");
        let replace = |text: &str| {
            let tmp = dir.path().join("registry.yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        replace(&moved);
        assert!(reg.reload_if_changed().unwrap());
        assert_eq!(reg.pods_on_node("node-1").len(), 2);

        replace("pods: [oops");
        assert!(reg.reload_if_changed().is_err());
        assert_eq!(
            reg.pods_on_node("node-1").len(),
            2,
            "last good snapshot kept"
        );

        let missing = FileRegistry::load(dir.path().join("nope.yaml")).unwrap_err();
        assert!(missing.to_string().contains("nope.yaml"));
    }
}
