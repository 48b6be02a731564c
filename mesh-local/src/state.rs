//! The state file, `/run/sockmesh/<mesh>/state.json`: everything a mesh is
//! made of, written after every step of `up`, so `down` in another process
//! (or after a crash) knows what to remove, and `exec` what to enter.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

pub const STATE_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
/// The resolved topology (uids, addresses, VIPs filled in).
pub const TOPOLOGY_FILE: &str = "mesh.yaml";
/// The resolved `nodes:` and `pods:` in the workload registry's format.
pub const REGISTRY_FILE: &str = "registry.yaml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub mesh: String,
    /// The process that ran `up` (with its start time, so a reused pid is
    /// not mistaken for it).
    pub owner: ProcessRecord,
    /// `false` until `up` finished every step.
    pub complete: bool,
    pub ipv6: bool,
    pub fabric: FabricInfo,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub services: Vec<ServiceInfo>,
    /// Labels of the namespaces the topology lists (the opt-in rule reads
    /// `sockmesh.io/mesh`; a namespace not here counts as `enabled`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Set when the mesh runs in Kubernetes mode (`mesh up --kubernetes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<crate::kube::KubeInfo>,
    /// What was created, in creation order.
    pub created: Created,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    pub netns: Vec<String>,
    pub veths: Vec<Veth>,
    /// Parents before children.
    pub cgroups: Vec<PathBuf>,
    /// bpffs pin roots reserved for the nodes (made by the node proxies).
    pub pin_roots: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
    pub processes: Vec<ProcessRecord>,
}

/// A veth pair, by the end `down` deletes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Veth {
    pub netns: String,
    pub name: String,
    /// The peer, as `netns/ifname`.
    pub peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot).
    pub start_time: u64,
    /// `owner`, or the node it runs on.
    pub role: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

impl ProcessRecord {
    pub fn new(pid: u32, role: &str) -> Self {
        ProcessRecord {
            pid,
            start_time: start_time(pid).unwrap_or(0),
            role: role.to_owned(),
            argv: Vec::new(),
            log: None,
        }
    }

    /// Still the same process (not a reused pid), and not a zombie.
    pub fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first().copied().unwrap_or("Z");
        let started = fields.get(19).and_then(|s| s.parse::<u64>().ok());
        state != "Z" && state != "X" && started == Some(self.start_time)
    }
}

/// A process's start time, field 22 of `/proc/<pid>/stat`.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricInfo {
    pub netns: String,
    pub bridge: String,
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr6: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// 1-based position in the topology; picks the node's addresses.
    pub index: u8,
    pub netns: String,
    /// The node's fabric interface inside its netns.
    pub fabric_if: String,
    /// The veth's other end, inside the fabric netns.
    pub fabric_veth: String,
    pub fabric_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_ip6: Option<Ipv6Addr>,
    pub pod_cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<String>,
    /// The pods' default gateway (on the node end of each pod veth).
    pub gateway: Ipv4Addr,
    /// `.../sockmesh-<mesh>/node-<name>`: the node's eBPF attach point.
    pub cgroup: PathBuf,
    /// `<cgroup>/proxy`: where node processes run.
    pub proxy_cgroup: PathBuf,
    /// `<cgroup>/pods`: parent of the pods' cgroups.
    pub pods_cgroup: PathBuf,
    /// The node's bpffs pin root (created by its proxy, removed by `down`).
    pub pin_root: PathBuf,
}

impl NodeInfo {
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub netns: String,
    /// The pod's interface inside its netns.
    pub interface: String,
    /// The veth's node end, inside the node netns.
    pub veth: String,
    pub cgroup: PathBuf,
}

impl PodInfo {
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub vip: std::net::IpAddr,
    pub ports: Vec<(u16, u16)>,
    pub selector: BTreeMap<String, String>,
    /// `namespace/name` of the selected pods.
    pub endpoints: Vec<String>,
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

impl State {
    /// Whether pod `p` is in the mesh by the one opt-in rule (its
    /// annotations, its namespace's labels; see [`crate::topology::opt_in`]).
    pub fn decision(&self, p: &PodInfo) -> mesh_core::opt_in::MeshDecision {
        crate::topology::opt_in(&p.annotations, self.namespaces.get(&p.namespace))
    }

    /// Reads a state file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<State>, Error> {
        let Some(state) = read_json::<State>(path, "read state")? else {
            return Ok(None);
        };
        if state.version != STATE_VERSION {
            return Err(Error::State {
                path: path.to_owned(),
                reason: format!(
                    "version {} (this harness reads version {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(Some(state))
    }

    /// Writes the state atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        write_json(path, self, "rename state")
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The processes of the mesh still running: the owner and the node
    /// processes.
    pub fn alive(&self) -> Vec<&ProcessRecord> {
        std::iter::once(&self.owner)
            .chain(&self.created.processes)
            .filter(|p| p.alive())
            .collect()
    }
}

/// Reads the JSON file `path`; `Ok(None)` when there is none. `what`
/// names the read in errors.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<Option<T>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                what,
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::State {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Writes `value` as JSON to `path` atomically (a temporary file, then a
/// rename, which `what` names in errors).
pub(crate) fn write_json<T: serde::Serialize>(
    path: &Path,
    value: &T,
    what: &'static str,
) -> Result<(), Error> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::State {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    write_file(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    })
}

pub fn write_file(path: &Path, data: &[u8]) -> Result<(), Error> {
    std::fs::write(path, data).map_err(|source| Error::Io {
        what: "write",
        path: path.to_owned(),
        source,
    })
}
