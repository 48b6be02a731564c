//! What the local mesh is made of: nodes, pods and services, typed and
//! loadable from YAML.
//!
//! The file is a superset of the workload registry's file
//! (`mesh-core/src/registry.rs`): the same top-level `nodes:` and `pods:`
//! keys and field names, plus `services:`, and `uid` and `ips` of a pod are
//! optional here (the harness assigns them). Unknown keys are refused, so a
//! typo never passes silently.
//!
//! ```yaml
//! nodes:
//!   - name: node-a
//!   - name: node-b
//! pods:
//!   - namespace: default
//!     name: web
//!     node: node-b
//!     service_account: web
//!     labels: {app: web}
//!     ips: [10.77.2.10]          # optional: assigned from the node's pod CIDR
//!     annotations: {sockmesh.io/mesh: disabled}   # optional: opts this pod out
//! namespaces:                    # optional: labels; the opt-in rule reads
//!   - name: default              # `sockmesh.io/mesh` (a namespace not listed
//!     labels: {sockmesh.io/mesh: enabled}   # counts as `enabled`)
//! services:
//!   - namespace: default
//!     name: web
//!     vip: 10.77.240.10          # optional: assigned from 10.77.240.0/20
//!     ports: [{port: 8080, target_port: 8080}]
//!     selector: {app: web}
//! ```

use mesh_core::identity::{dns1123_label, dns1123_subdomain};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why a topology cannot be used. Every variant names where it came from
/// and the value that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology {origin}: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("topology {origin}: {source}")]
    Yaml {
        origin: String,
        source: serde_norway::Error,
    },
    #[error("topology {origin}: {what}: {reason}")]
    Invalid {
        origin: String,
        what: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Topology {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Namespaces with labels. The opt-in rule
    /// ([`mesh_core::opt_in::decide`]) reads their `sockmesh.io/mesh`
    /// label; a namespace not listed counts as labelled `enabled`, as in
    /// the registry file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// Assigned (stable, derived from namespace and name) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub node: String,
    pub service_account: String,
    /// At most one IPv4 and one IPv6 address; assigned when absent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `sockmesh.io/mesh: enabled|disabled` opts the pod in or out (the
    /// pod's value overrides its namespace's label).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Assigned from the service range when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    /// The pod's port; the service port when absent.
    pub target_port: u16,
}

// ---- the file ----------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    pods: Vec<RawPod>,
    #[serde(default)]
    services: Vec<RawService>,
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
struct RawNode {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    namespace: String,
    name: String,
    #[serde(default)]
    uid: Option<String>,
    node: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    namespace: String,
    name: String,
    #[serde(default)]
    vip: Option<String>,
    ports: Vec<RawPort>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// Most nodes a local mesh has (node `i` gets `10.77.<i>.0/24`).
pub const MAX_NODES: usize = 200;

impl Topology {
    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::from_yaml(&text, &origin)
    }

    /// Parses and checks topology YAML; `origin` names the source in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, TopologyError> {
        let raw: RawFile = serde_norway::from_str(text).map_err(|source| TopologyError::Yaml {
            origin: origin.to_owned(),
            source,
        })?;
        let invalid = |what: String, reason: String| TopologyError::Invalid {
            origin: origin.to_owned(),
            what,
            reason,
        };
        let mut pods = Vec::with_capacity(raw.pods.len());
        for p in raw.pods {
            let what = format!("pod {}/{}", p.namespace, p.name);
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
                annotations: p.annotations,
            });
        }
        let mut services = Vec::with_capacity(raw.services.len());
        for s in raw.services {
            let what = format!("service {}/{}", s.namespace, s.name);
            let vip = s
                .vip
                .map(|v| {
                    v.parse::<IpAddr>()
                        .map_err(|e| invalid(what.clone(), format!("vip {v:?}: {e}")))
                })
                .transpose()?;
            services.push(Service {
                namespace: s.namespace,
                name: s.name,
                vip,
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        port: p.port,
                        target_port: p.target_port.unwrap_or(p.port),
                    })
                    .collect(),
                selector: s.selector,
            });
        }
        let topology = Topology {
            nodes: raw
                .nodes
                .into_iter()
                .map(|n| Node { name: n.name })
                .collect(),
            pods,
            services,
            namespaces: raw
                .namespaces
                .into_iter()
                .map(|n| Namespace {
                    name: n.name,
                    labels: n.labels,
                })
                .collect(),
        };
        topology.validate(origin)?;
        Ok(topology)
    }

    /// The topology as YAML in the file format (resolved topologies print
    /// their assigned uids, addresses and VIPs).
    pub fn to_yaml(&self) -> String {
        // Plain strings, maps and numbers: serialising cannot fail.
        serde_norway::to_string(self).unwrap_or_default()
    }

    /// The workload registry's view (`nodes:` and `pods:` only), in the
    /// registry file format of `mesh-core`.
    pub fn registry_yaml(&self) -> String {
        let registry = Topology {
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
            services: Vec::new(),
            namespaces: self.namespaces.clone(),
        };
        registry.to_yaml()
    }

    /// The topology `mesh up` builds without a file: two nodes, pods in two
    /// namespaces, one service.
    pub fn demo() -> Self {
        let pod = |ns: &str, name: &str, node: &str, sa: &str, app: &str| Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: None,
            node: node.into(),
            service_account: sa.into(),
            ips: Vec::new(),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            annotations: BTreeMap::new(),
        };
        Topology {
            nodes: vec![
                Node {
                    name: "node-a".into(),
                },
                Node {
                    name: "node-b".into(),
                },
            ],
            pods: vec![
                pod("default", "client", "node-a", "client", "client"),
                pod("default", "web", "node-b", "web", "web"),
                pod("default", "web-2", "node-a", "web", "web"),
                pod("other", "iperf", "node-b", "iperf", "iperf"),
            ],
            services: vec![Service {
                namespace: "default".into(),
                name: "web".into(),
                vip: None,
                ports: vec![ServicePort {
                    port: 8080,
                    target_port: 8080,
                }],
                selector: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
            }],
            namespaces: Vec::new(),
        }
    }

    /// Whether pod `p` is in the mesh by the one opt-in rule
    /// ([`mesh_core::opt_in::decide`]): its `sockmesh.io/mesh` annotation,
    /// else its namespace's label (a namespace not listed counts as
    /// `enabled`, as in the registry file).
    pub fn decision(&self, p: &Pod) -> mesh_core::opt_in::MeshDecision {
        let ns = self.namespaces.iter().find(|n| n.name == p.namespace);
        opt_in(&p.annotations, ns.map(|n| &n.labels))
    }

    /// Checks names and references (addresses are checked when they are
    /// assigned, see [`crate::ipam`]).
    pub fn validate(&self, origin: &str) -> Result<(), TopologyError> {
        let invalid = |what: String, reason: String| TopologyError::Invalid {
            origin: origin.to_owned(),
            what,
            reason,
        };
        if self.nodes.is_empty() {
            return Err(invalid(
                "nodes".into(),
                "at least one node is needed".into(),
            ));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(invalid(
                "nodes".into(),
                format!("{} nodes; at most {MAX_NODES}", self.nodes.len()),
            ));
        }
        let mut nodes = BTreeSet::new();
        for n in &self.nodes {
            let what = format!("node {:?}", n.name);
            dns1123_subdomain(&n.name).map_err(|r| invalid(what.clone(), r.into()))?;
            if n.name == "fabric" {
                return Err(invalid(what, "\"fabric\" names the mesh's fabric".into()));
            }
            if !nodes.insert(n.name.as_str()) {
                return Err(invalid(what, "listed twice".into()));
            }
        }
        let mut pods = BTreeSet::new();
        let mut uids = BTreeSet::new();
        for p in &self.pods {
            let what = format!("pod {}/{}", p.namespace, p.name);
            dns1123_label(&p.namespace)
                .map_err(|r| invalid(what.clone(), format!("namespace {:?}: {r}", p.namespace)))?;
            dns1123_subdomain(&p.name)
                .map_err(|r| invalid(what.clone(), format!("name {:?}: {r}", p.name)))?;
            dns1123_subdomain(&p.service_account).map_err(|r| {
                invalid(
                    what.clone(),
                    format!("service_account {:?}: {r}", p.service_account),
                )
            })?;
            if !nodes.contains(p.node.as_str()) {
                return Err(invalid(
                    what,
                    format!("node {:?} is not in the nodes list", p.node),
                ));
            }
            if let Some(uid) = &p.uid {
                if uid.is_empty() {
                    return Err(invalid(what, "uid \"\": empty".into()));
                }
                if !uids.insert(uid.as_str()) {
                    return Err(invalid(what, format!("uid {uid:?} is used twice")));
                }
            }
            if !pods.insert((p.namespace.as_str(), p.name.as_str())) {
                return Err(invalid(what, "listed twice".into()));
            }
            let v4 = p.ips.iter().filter(|ip| ip.is_ipv4()).count();
            let v6 = p.ips.len() - v4;
            if v4 > 1 || v6 > 1 {
                return Err(invalid(
                    what,
                    format!(
                        "ips {:?}: at most one IPv4 and one IPv6 address",
                        p.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>()
                    ),
                ));
            }
        }
        let mut namespaces = BTreeSet::new();
        for n in &self.namespaces {
            let what = format!("namespace {:?}", n.name);
            dns1123_label(&n.name).map_err(|r| invalid(what.clone(), r.into()))?;
            if !namespaces.insert(n.name.as_str()) {
                return Err(invalid(what, "listed twice".into()));
            }
            check_mesh_value(&n.labels, "label").map_err(|r| invalid(what, r))?;
        }
        for p in &self.pods {
            check_mesh_value(&p.annotations, "annotation")
                .map_err(|r| invalid(format!("pod {}/{}", p.namespace, p.name), r))?;
        }
        let mut services = BTreeSet::new();
        for s in &self.services {
            let what = format!("service {}/{}", s.namespace, s.name);
            dns1123_label(&s.namespace)
                .map_err(|r| invalid(what.clone(), format!("namespace {:?}: {r}", s.namespace)))?;
            dns1123_label(&s.name)
                .map_err(|r| invalid(what.clone(), format!("name {:?}: {r}", s.name)))?;
            if !services.insert((s.namespace.as_str(), s.name.as_str())) {
                return Err(invalid(what, "listed twice".into()));
            }
            if s.ports.is_empty() {
                return Err(invalid(what, "ports: at least one port is needed".into()));
            }
            let mut ports = BTreeSet::new();
            for p in &s.ports {
                if p.port == 0 || p.target_port == 0 {
                    return Err(invalid(
                        what,
                        format!("port {} -> {}: ports are 1-65535", p.port, p.target_port),
                    ));
                }
                if !ports.insert(p.port) {
                    return Err(invalid(what, format!("port {} is listed twice", p.port)));
                }
            }
        }
        Ok(())
    }

    /// The pods a service selects (every selector label matches; an empty
    /// selector selects nothing, as in Kubernetes).
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| {
            p.namespace == service.namespace
                && !service.selector.is_empty()
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| p.labels.get(k) == Some(v))
        })
    }
}

/// The one opt-in rule ([`mesh_core::opt_in::decide`]) for a local-mesh
/// pod: its annotations, and its namespace's labels (`None`: a namespace
/// the mesh does not list, which counts as labelled `enabled`, as in the
/// registry file).
pub fn opt_in(
    annotations: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> mesh_core::opt_in::MeshDecision {
    use mesh_core::opt_in::{ENABLED, MESH_KEY, OptInFacts, decide};
    let namespace = match namespace_labels {
        Some(labels) => labels.get(MESH_KEY).map(String::as_str),
        None => Some(ENABLED),
    };
    decide(OptInFacts {
        pod: annotations.get(MESH_KEY).map(String::as_str),
        namespace,
        host_network: false,
        mesh_component: false,
    })
}

/// `sockmesh.io/mesh`, when set, is `enabled` or `disabled`: a typo must
/// not silently leave a pod out of (or in) the mesh.
fn check_mesh_value(map: &BTreeMap<String, String>, what: &str) -> Result<(), String> {
    use mesh_core::opt_in::{DISABLED, ENABLED, MESH_KEY};
    match map.get(MESH_KEY) {
        Some(v) if v != ENABLED && v != DISABLED => Err(format!(
            "{what} {MESH_KEY}: {v:?}: must be \"{ENABLED}\" or \"{DISABLED}\""
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
nodes:
  - name: node-a
  - name: node-b
pods:
  - namespace: default
    name: web
    node: node-b
    service_account: web
    ips: [10.77.2.10]
    labels: {app: web}
  - namespace: default
    name: client
    uid: 6f1c0d3e-0000-4000-8000-000000000001
    node: node-a
services:
  - namespace: default
    name: web
    vip: 10.77.240.10
    ports: [{port: 8080, target_port: 80}, {port: 9090}]
    selector: {app: web}
"#;

    fn parse(text: &str) -> Result<Topology, TopologyError> {
        Topology::from_yaml(text, "mesh.yaml")
    }

    #[test]
    fn parses_the_file() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.pods[0].ips, vec!["10.77.2.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(t.pods[1].service_account, "default");
        assert_eq!(t.services[0].ports[0].target_port, 80);
        assert_eq!(t.services[0].ports[1].target_port, 9090);
        let eps: Vec<_> = t.endpoints(&t.services[0]).map(|p| &p.name).collect();
        assert_eq!(eps, ["web"]);
        // Printing and parsing again gives the same topology.
        assert_eq!(parse(&t.to_yaml()).unwrap(), t);
        assert_eq!(
            parse(&Topology::demo().to_yaml()).unwrap(),
            Topology::demo()
        );
    }

    #[test]
    fn errors_name_the_origin_and_the_bad_value() {
        let cases = [
            (GOOD.replace("10.77.2.10", "10.77.2.x"), "\"10.77.2.x\""),
            (GOOD.replace("10.77.240.10", "10.77.240"), "\"10.77.240\""),
            (GOOD.replace("node: node-b", "node: node-9"), "\"node-9\""),
            (
                GOOD.replace("service_account: web", "service_account: Web"),
                "\"Web\"",
            ),
            (GOOD.replace("name: client", "name: Client"), "\"Client\""),
            (GOOD.replace("labels:", "lables:"), "lables"),
            (
                GOOD.replace("- name: node-b", "- name: node-a"),
                "\"node-a\"",
            ),
            (
                GOOD.replace("- name: node-b", "- name: fabric"),
                "\"fabric\"",
            ),
            (GOOD.replace("port: 9090", "port: 70000"), "70000"),
            (GOOD.replace("port: 9090", "port: 8080"), "8080"),
            (
                GOOD.replace("[10.77.2.10]", "[10.77.2.10, 10.77.2.11]"),
                "10.77.2.11",
            ),
            (
                format!("{GOOD}namespaces: [{{name: default}}, {{name: default}}]\n"),
                "listed twice",
            ),
            (
                format!("{GOOD}namespaces: [{{name: other, labels: {{sockmesh.io/mesh: yes}}}}]\n"),
                "\"yes\"",
            ),
            (
                GOOD.replace(
                    "labels: {app: web}",
                    "annotations: {sockmesh.io/mesh: enable}",
                ),
                "\"enable\"",
            ),
            ("nodes: 3".to_string(), "nodes"),
            ("pods: []".to_string(), "at least one node"),
        ];
        for (text, want) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("topology mesh.yaml: "), "{err}");
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn the_opt_in_rule_reads_annotations_and_namespace_labels() {
        use mesh_core::opt_in::{MeshDecision, NotMeshed, OptedInBy};
        let text = format!(
            "{GOOD}namespaces: [{{name: quiet, labels: {{sockmesh.io/mesh: disabled}}}}]\n"
        )
        .replace(
            "labels: {app: web}",
            "labels: {app: web}\n    annotations: {sockmesh.io/mesh: disabled}",
        )
        .replace(
            "  - namespace: default\n    name: client",
            "  - namespace: quiet\n    name: client",
        );
        let t = parse(&text).unwrap();
        // Printed and read again, the same.
        assert_eq!(parse(&t.to_yaml()).unwrap(), t);
        let web = &t.pods[0];
        assert_eq!(
            t.decision(web),
            MeshDecision::NotMeshed(NotMeshed::PodDisabled)
        );
        // `quiet` is labelled disabled: not opted in.
        assert_eq!(
            t.decision(&t.pods[1]),
            MeshDecision::NotMeshed(NotMeshed::NotOptedIn)
        );
        let mut on = t.pods[1].clone();
        on.annotations
            .insert("sockmesh.io/mesh".into(), "enabled".into());
        assert_eq!(
            t.decision(&on),
            MeshDecision::Meshed(OptedInBy::PodAnnotation)
        );
        // The registry file reads the same decisions.
        let snap = registry_of(&t);
        for (p, r) in t.pods.iter().zip(&snap.pods) {
            assert_eq!(t.decision(p), r.mesh, "{}", p.name);
        }
    }

    /// What mesh-core's registry reads from `t`'s registry file (the
    /// harness writes it with uids, as here).
    fn registry_of(t: &Topology) -> mesh_core::registry::Snapshot {
        let mut with_uids = t.clone();
        for p in &mut with_uids.pods {
            p.uid.get_or_insert_with(|| format!("uid-{}", p.name));
        }
        mesh_core::registry::Snapshot::parse(Path::new("registry.yaml"), &with_uids.registry_yaml())
            .unwrap()
    }

    #[test]
    fn registry_reads_the_same_nodes_and_pods() {
        // The registry of mesh-core reads our `nodes:`/`pods:` (the harness
        // writes this file, with uids and ips, next to the state).
        let t = parse(GOOD).unwrap();
        let snap = registry_of(&t);
        assert_eq!(snap.nodes.len(), 2);
        assert_eq!(snap.pods[0].ips, t.pods[0].ips);
        assert_eq!(snap.pods[0].labels["app"], "web");
        assert_eq!(snap.pods[1].service_account, "default");
    }
}
