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

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use serde::Deserialize;

use crate::identity::{self, Identity, IdentityError};

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
/// mesh (in the file registry it is a label; in Kubernetes an annotation).
pub const MESH_LABEL: &str = "sockmesh.io/mesh";

impl Pod {
    /// Whether the pod is in the mesh (not opted out).
    pub fn meshed(&self) -> bool {
        self.labels.get(MESH_LABEL).map(String::as_str) != Some("disabled")
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
    fn node(&self, name: &str) -> Option<Node>;
    fn pods_on_node(&self, node: &str) -> Vec<Pod>;
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod>;

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
        source: serde_yaml::Error,
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
    policies: Option<serde_yaml::Value>,
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
        let raw: RawFile = serde_yaml::from_str(text).map_err(|source| RegistryError::Yaml {
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
            pods.push(Pod {
                namespace: p.namespace,
                name: p.name,
                uid: p.uid,
                node: p.node,
                service_account: p.service_account,
                ips,
                labels: p.labels,
                netns: p.netns,
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
                let text = serde_yaml::to_string(&v)
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

/// The YAML file source. Holds a snapshot; [`FileRegistry::reload_if_changed`]
/// re-reads the file when its modification time, size or inode moved,
/// keeping the old snapshot if the new file is invalid. Writers should
/// replace the file atomically (write a temporary file, then rename).
#[derive(Debug)]
pub struct FileRegistry {
    path: PathBuf,
    state: RwLock<(Arc<Snapshot>, Option<FileStamp>)>,
}

impl FileRegistry {
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        let path = path.into();
        let (snapshot, stamp) = read_file(&path)?;
        Ok(FileRegistry {
            path,
            state: RwLock::new((Arc::new(snapshot), stamp)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
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
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = (Arc::new(snapshot), stamp);
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
    fn node(&self, name: &str) -> Option<Node> {
        self.snapshot()
            .nodes
            .iter()
            .find(|n| n.name == name)
            .cloned()
    }

    fn pods_on_node(&self, node: &str) -> Vec<Pod> {
        self.snapshot()
            .pods
            .iter()
            .filter(|p| p.node == node)
            .cloned()
            .collect()
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.snapshot()
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .cloned()
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
