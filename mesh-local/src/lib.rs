//! The local mesh harness: a whole multi-node mesh on one Linux machine, as
//! root, out of network namespaces and a mesh-owned cgroup subtree. Used by
//! the tests, the benchmarks and `mesh up`/`mesh down`/`mesh exec`.
//!
//! ```text
//!  sockmesh-<mesh>-fabric netns:  br0 ── n-node-a ─┐   ┌─ n-node-b
//!                                                  │   │
//!  sockmesh-<mesh>-node-a netns:   fabric0 10.77.0.1   fabric0 10.77.0.2  (node-b)
//!        ip_forward=1              smp<hash> 10.77.1.1/32 (gateway) ... one per pod
//!                                    │
//!  sockmesh-<mesh>-default-client:  eth0 10.77.1.2/32, default via 10.77.1.1
//! ```
//!
//! Cgroups: `<v2 root>/sockmesh-<mesh>/node-<node>/{proxy, pods/<ns>_<pod>}`.
//! Everything is listed in `/run/sockmesh/<mesh>/state.json` as it is made,
//! so [`down`] from another process, or after a crash, removes it all; it
//! also sweeps everything named `sockmesh-<mesh>-*`. Nothing touches the
//! machine's own netns, routes, sysctls, firewall or root cgroup.
//!
//! Addresses: see [`ipam`]. Names: see [`names`]. File format: see
//! [`topology`].
#![forbid(unsafe_code)]

mod cgroup;
mod command;
pub mod control;
pub mod ipam;
pub mod kube;
mod mesh;
pub mod names;
mod preflight;
mod process;
pub mod state;
pub mod supervise;
mod teardown;
pub mod topology;

pub use cgroup::{v2_root as cgroup2_root, v2_root_in as cgroup2_root_in};

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

pub use mesh::{Mesh, up};
pub use state::{NodeInfo, PodInfo, ServiceInfo, State};
pub use teardown::{DownReport, down};
pub use topology::{Namespace, Node, Pod, Service, ServicePort, Topology, TopologyError};

/// Where the harness keeps things, and its limits.
#[derive(Debug, Clone)]
pub struct Options {
    /// State directories live in `<state_root>/<mesh>/`.
    pub state_root: PathBuf,
    /// The cgroup v2 root (this machine has a hybrid layout).
    pub cgroup_root: PathBuf,
    /// bpffs: node pin roots are `<bpffs>/sockmesh-<mesh>-<node>`.
    pub bpffs: PathBuf,
    /// Give pods IPv6 addresses too (skipped, with a note, when the kernel
    /// has no IPv6).
    pub ipv6: bool,
    /// Deadline of every command the harness runs.
    pub command_timeout: Duration,
    /// Deadline for processes to die and cgroups to empty on `down`.
    pub kill_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            state_root: PathBuf::from("/run/sockmesh"),
            cgroup_root: cgroup::v2_root(),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            ipv6: true,
            command_timeout: Duration::from_secs(10),
            kill_timeout: Duration::from_secs(5),
        }
    }
}

impl Options {
    pub fn state_dir(&self, mesh: &str) -> PathBuf {
        self.state_root.join(mesh)
    }

    pub fn state_file(&self, mesh: &str) -> PathBuf {
        self.state_dir(mesh).join(state::STATE_FILE)
    }

    /// `<cgroup_root>/sockmesh-<mesh>`.
    pub fn mesh_cgroup(&self, mesh: &str) -> PathBuf {
        self.cgroup_root.join(names::mesh_cgroup(mesh))
    }
}

/// One step of `up`, for the CLI to print (also logged with `tracing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The machine has what the mesh needs.
    Checked {
        ipv6: bool,
        cgroup_root: PathBuf,
    },
    /// Something worth knowing that changes nothing.
    Note(String),
    Fabric {
        netns: String,
        bridge: String,
        cidr: String,
    },
    Node {
        name: String,
        netns: String,
        fabric_ip: Ipv4Addr,
        pod_cidr: String,
    },
    Pod {
        pod: String,
        node: String,
        netns: String,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
    },
    Routes {
        node: String,
        routes: usize,
    },
    Files {
        topology: PathBuf,
        registry: PathBuf,
    },
    Ready {
        mesh: String,
        nodes: usize,
        pods: usize,
        state: PathBuf,
    },
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::Checked { ipv6, cgroup_root } => write!(
                f,
                "checked the machine: root, netns, cgroup v2 at {}, IPv6 {}",
                cgroup_root.display(),
                if *ipv6 { "on" } else { "off" }
            ),
            Progress::Note(n) => f.write_str(n),
            Progress::Fabric {
                netns,
                bridge,
                cidr,
            } => write!(f, "created fabric (netns {netns}, bridge {bridge}, {cidr})"),
            Progress::Node {
                name,
                netns,
                fabric_ip,
                pod_cidr,
            } => write!(
                f,
                "created node {name} (netns {netns}, {fabric_ip}, pods {pod_cidr})"
            ),
            Progress::Pod {
                pod,
                node,
                netns,
                ip,
                ip6,
            } => {
                write!(f, "created pod {pod} on {node} (netns {netns}, {ip}")?;
                if let Some(ip6) = ip6 {
                    write!(f, ", {ip6}")?;
                }
                f.write_str(")")
            }
            Progress::Routes { node, routes } => {
                write!(f, "routed node {node} to {routes} other pod ranges")
            }
            Progress::Files { topology, registry } => {
                write!(f, "wrote {} and {}", topology.display(), registry.display())
            }
            Progress::Ready {
                mesh,
                nodes,
                pods,
                state,
            } => write!(
                f,
                "mesh {mesh} is up: {nodes} nodes, {pods} pods (state {})",
                state.display()
            ),
        }
    }
}

/// Why an operation of the harness failed. Each names what failed and the
/// value that made it fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the local mesh needs root (effective uid is {uid}): it creates network namespaces and cgroups"
    )]
    NotRoot { uid: u32 },
    #[error("this machine lacks {what}: {detail}")]
    Missing { what: String, detail: String },
    #[error("mesh name {name:?}: {reason}")]
    MeshName { name: String, reason: &'static str },
    #[error("mesh {mesh:?} is already up ({evidence}); run `mesh down {mesh}` first")]
    AlreadyUp { mesh: String, evidence: String },
    #[error(
        "mesh {mesh:?} has leftovers of an earlier run ({evidence}); run `mesh down {mesh}` to remove them"
    )]
    Leftovers { mesh: String, evidence: String },
    #[error("mesh {mesh:?} is not up (no {})", path.display())]
    NotUp { mesh: String, path: PathBuf },
    #[error("mesh {mesh:?} has no {what} {name:?}")]
    Unknown {
        mesh: String,
        what: &'static str,
        name: String,
    },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("{0}")]
    Names(String),
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` did not finish within {after:?}; killed")]
    Timeout { cmd: String, after: Duration },
    #[error("{what} still there after {after:?}")]
    Stuck { what: String, after: Duration },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state {}: {reason}", path.display())]
    State { path: PathBuf, reason: String },
    #[error("mesh {mesh:?}: up failed: {source}; {cleanup}")]
    Up {
        mesh: String,
        source: Box<Error>,
        cleanup: String,
    },
    #[error("mesh {mesh:?}: down could not remove everything: {}", report.problems.join("; "))]
    DownIncomplete {
        mesh: String,
        report: Box<DownReport>,
    },
}

pub(crate) fn check_mesh_name(mesh: &str) -> Result<(), Error> {
    names::validate_mesh_name(mesh).map_err(|reason| Error::MeshName {
        name: mesh.to_owned(),
        reason,
    })
}
