//! `up`: building the mesh, step by step, recording each object in the state
//! file as it is made; and [`Mesh`], the handle to a mesh that is up.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::command::{self, ip};
use crate::state::{
    self, Created, FabricInfo, NodeInfo, PodInfo, ProcessRecord, ServiceInfo, State, Veth,
};
use crate::topology::Topology;
use crate::{Error, Options, Progress, cgroup, ipam, names, preflight, teardown};

/// A mesh that is up. Made by [`up`] (which downs it again when the handle
/// is dropped, unless [`Mesh::detach`] is called) or by [`Mesh::open`] (from
/// another process; never downs on drop).
#[derive(Debug)]
pub struct Mesh {
    pub(crate) state: State,
    pub(crate) options: Options,
    down_on_drop: bool,
}

/// Builds the mesh `mesh` out of `topology`. Refuses when not root, when
/// the machine lacks something (it says what), and when a mesh of that name
/// is up or left over. On failure, removes whatever it made.
pub fn up(
    mesh: &str,
    topology: &Topology,
    options: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Mesh, Error> {
    crate::check_mesh_name(mesh)?;
    let mut report = |p: Progress| {
        tracing::info!(mesh, "{p}");
        progress(&p);
    };
    let machine = preflight::check(options)?;
    let ipv6 = options.ipv6 && machine.ipv6;
    report(Progress::Checked {
        ipv6,
        cgroup_root: options.cgroup_root.clone(),
    });
    if options.ipv6 && !machine.ipv6 {
        report(Progress::Note(
            "IPv6 is off: the kernel has no IPv6 (/proc/sys/net/ipv6 is missing)".into(),
        ));
    }
    let resolved = ipam::resolve(topology, ipv6, "topology")?;
    let state = plan(mesh, &resolved, ipv6, options)?;
    refuse_if_present(mesh, options)?;

    let dir = options.state_dir(mesh);
    std::fs::create_dir_all(&options.state_root).map_err(|source| Error::Io {
        what: "create state root",
        path: options.state_root.clone(),
        source,
    })?;
    // Atomic: of two `up`s of one name racing here, one wins.
    std::fs::create_dir(&dir).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            Error::AlreadyUp {
                mesh: mesh.to_owned(),
                evidence: format!("being built: {} was just created", dir.display()),
            }
        } else {
            Error::Io {
                what: "create state directory",
                path: dir.clone(),
                source,
            }
        }
    })?;
    let mut builder = Builder {
        state,
        options,
        path: options.state_file(mesh),
        report: &mut report,
    };
    let built = builder.save().and_then(|()| builder.build(&resolved));
    let state = builder.state;
    match built {
        Ok(()) => Ok(Mesh {
            state,
            options: options.clone(),
            down_on_drop: true,
        }),
        Err(e) => {
            let cleanup = match teardown::down(mesh, options) {
                Ok(r) => format!("removed what it had made ({})", r.summary()),
                Err(d) => format!("cleanup failed too: {d}"),
            };
            Err(Error::Up {
                mesh: mesh.to_owned(),
                source: Box::new(e),
                cleanup,
            })
        }
    }
}

/// Refuses a mesh name that is in use: a state file (the mesh is up, or an
/// `up` died half way) or objects named after it.
fn refuse_if_present(mesh: &str, options: &Options) -> Result<(), Error> {
    let path = options.state_file(mesh);
    match State::load(&path) {
        Ok(Some(state)) => {
            let alive: Vec<String> = state
                .alive()
                .iter()
                .map(|p| format!("{} pid {}", p.role, p.pid))
                .collect();
            let present = state
                .created
                .netns
                .iter()
                .filter(|n| state::netns_path(n).exists())
                .count();
            let mut evidence = format!("state {}", path.display());
            if !alive.is_empty() {
                evidence.push_str(&format!(", running: {}", alive.join(", ")));
            }
            evidence.push_str(&format!(", {present} network namespaces"));
            if state.complete && (present > 0 || !alive.is_empty()) {
                return Err(Error::AlreadyUp {
                    mesh: mesh.to_owned(),
                    evidence,
                });
            }
            if !alive.is_empty() {
                return Err(Error::AlreadyUp {
                    mesh: mesh.to_owned(),
                    evidence: format!("being built: {evidence}"),
                });
            }
            Err(Error::Leftovers {
                mesh: mesh.to_owned(),
                evidence,
            })
        }
        Ok(None) => {
            let left = teardown::leftovers(mesh, options);
            if left.is_empty() {
                Ok(())
            } else {
                Err(Error::Leftovers {
                    mesh: mesh.to_owned(),
                    evidence: left.join(", "),
                })
            }
        }
        Err(e) => Err(Error::Leftovers {
            mesh: mesh.to_owned(),
            evidence: e.to_string(),
        }),
    }
}

/// Every name and address of the mesh, before anything is made.
fn plan(mesh: &str, t: &Topology, ipv6: bool, options: &Options) -> Result<State, Error> {
    let mesh_cg = options.mesh_cgroup(mesh);
    let mut nodes = Vec::with_capacity(t.nodes.len());
    for n in &t.nodes {
        let index = ipam::node_index(t, &n.name)
            .ok_or_else(|| Error::Names(format!("node {:?}: no index", n.name)))?;
        let cgroup = mesh_cg.join(names::node_cgroup(&n.name));
        nodes.push(NodeInfo {
            name: n.name.clone(),
            index,
            netns: names::node_netns(mesh, &n.name),
            fabric_if: names::NODE_FABRIC_IF.into(),
            fabric_veth: names::fabric_veth(&n.name),
            fabric_ip: ipam::fabric_ip(index),
            fabric_ip6: ipv6.then(|| ipam::fabric_ip6(index)),
            pod_cidr: ipam::pod_cidr(index),
            pod_cidr6: ipv6.then(|| ipam::pod_cidr6(index)),
            gateway: ipam::gateway(index),
            proxy_cgroup: cgroup.join("proxy"),
            pods_cgroup: cgroup.join("pods"),
            cgroup,
            pin_root: options.bpffs.join(names::node_pin_root(mesh, &n.name)),
        });
    }
    let mut pods = Vec::with_capacity(t.pods.len());
    for p in &t.pods {
        pods.push(plan_pod(mesh, &nodes, p)?);
    }
    let services = t
        .services
        .iter()
        .map(|s| ServiceInfo {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vip: s.vip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            ports: s.ports.iter().map(|p| (p.port, p.target_port)).collect(),
            selector: s.selector.clone(),
            endpoints: t
                .endpoints(s)
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
        })
        .collect();
    let fabric = FabricInfo {
        netns: names::fabric_netns(mesh),
        bridge: names::BRIDGE.into(),
        cidr: ipam::FABRIC_V4.into(),
        cidr6: ipv6.then(|| ipam::FABRIC_V6.into()),
    };

    // Shortened names must stay distinct.
    let clash = |set: &mut BTreeSet<String>, name: &str, what: String| {
        if set.insert(name.to_owned()) {
            Ok(())
        } else {
            Err(Error::Names(format!(
                "{what}: name {name:?} is taken by another object of the mesh; rename one of them"
            )))
        }
    };
    let mut all_netns = BTreeSet::from([fabric.netns.clone()]);
    let mut fabric_veths = BTreeSet::new();
    let mut cgroups = BTreeSet::new();
    for n in &nodes {
        clash(&mut all_netns, &n.netns, format!("node {}", n.name))?;
        clash(
            &mut fabric_veths,
            &n.fabric_veth,
            format!("node {}", n.name),
        )?;
        clash(
            &mut cgroups,
            &n.cgroup.display().to_string(),
            format!("node {}", n.name),
        )?;
    }
    let mut veths = BTreeSet::new();
    for p in &pods {
        let what = format!("pod {}", p.key());
        clash(&mut all_netns, &p.netns, what.clone())?;
        clash(&mut veths, &format!("{}/{}", p.node, p.veth), what.clone())?;
        clash(&mut cgroups, &p.cgroup.display().to_string(), what)?;
    }

    Ok(State {
        version: state::STATE_VERSION,
        mesh: mesh.to_owned(),
        owner: ProcessRecord::new(std::process::id(), "owner"),
        complete: false,
        ipv6,
        fabric,
        nodes,
        pods,
        services,
        namespaces: t
            .namespaces
            .iter()
            .map(|n| (n.name.clone(), n.labels.clone()))
            .collect(),
        kube: None,
        created: Created::default(),
    })
}

/// A pod's names and addresses (its uid and addresses already resolved).
pub(crate) fn plan_pod(
    mesh: &str,
    nodes: &[NodeInfo],
    p: &crate::topology::Pod,
) -> Result<PodInfo, Error> {
    let node = nodes
        .iter()
        .find(|n| n.name == p.node)
        .ok_or_else(|| Error::Names(format!("pod {}/{}: no node", p.namespace, p.name)))?;
    let ip = p.ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let ip6 = p.ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    let ip =
        ip.ok_or_else(|| Error::Names(format!("pod {}/{}: no IPv4 address", p.namespace, p.name)))?;
    Ok(PodInfo {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone().unwrap_or_default(),
        node: p.node.clone(),
        service_account: p.service_account.clone(),
        labels: p.labels.clone(),
        annotations: p.annotations.clone(),
        ip,
        ip6,
        netns: names::pod_netns(mesh, &p.namespace, &p.name),
        interface: names::POD_IF.into(),
        veth: names::pod_veth(&p.namespace, &p.name),
        cgroup: node
            .pods_cgroup
            .join(names::pod_cgroup(&p.namespace, &p.name)),
    })
}

struct Builder<'a> {
    state: State,
    options: &'a Options,
    path: PathBuf,
    report: &'a mut dyn FnMut(Progress),
}

impl Builder<'_> {
    fn save(&self) -> Result<(), Error> {
        self.state.save(&self.path)
    }

    fn ip(&self, args: &[&str]) -> Result<String, Error> {
        ip(args, self.options.command_timeout)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), Error> {
        self.ip(&["netns", "add", name])?;
        self.state.created.netns.push(name.to_owned());
        self.save()?;
        self.ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn add_cgroup(&mut self, path: &Path) -> Result<(), Error> {
        cgroup::create(path)?;
        self.state.created.cgroups.push(path.to_owned());
        Ok(())
    }

    /// Switches a sysctl on inside `netns` (its own copy, not the machine's).
    fn sysctl_in(&self, netns: &str, keys: &[&str]) -> Result<(), Error> {
        let script = keys
            .iter()
            .map(|k| format!("echo 1 > /proc/sys/{k}"))
            .collect::<Vec<_>>()
            .join(" && ");
        command::run(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", state::netns_path(netns).display()))
                .args(["--", "sh", "-c", &script]),
            self.options.command_timeout,
        )?;
        Ok(())
    }

    fn build(&mut self, t: &Topology) -> Result<(), Error> {
        self.fabric()?;
        let mesh_cg = self.options.mesh_cgroup(&self.state.mesh);
        self.add_cgroup(&mesh_cg)?;
        for i in 0..self.state.nodes.len() {
            self.node(i)?;
        }
        for i in 0..self.state.pods.len() {
            self.pod(i)?;
        }
        for i in 0..self.state.nodes.len() {
            self.routes(i)?;
        }
        self.files(t)?;
        self.state.complete = true;
        self.save()?;
        (self.report)(Progress::Ready {
            mesh: self.state.mesh.clone(),
            nodes: self.state.nodes.len(),
            pods: self.state.pods.len(),
            state: self.path.clone(),
        });
        Ok(())
    }

    /// The fabric netns and its bridge; also where the kernel's bridge and
    /// veth support is tried.
    fn fabric(&mut self) -> Result<(), Error> {
        let f = self.state.fabric.clone();
        self.add_netns(&f.netns)?;
        self.ip(&[
            "-n",
            &f.netns,
            "link",
            "add",
            &f.bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])
        .map_err(|e| Error::Missing {
            what: "bridge support (CONFIG_BRIDGE)".into(),
            detail: e.to_string(),
        })?;
        self.ip(&["-n", &f.netns, "link", "set", &f.bridge, "up"])?;
        let probe = [
            "-n", &f.netns, "link", "add", "smprobe0", "type", "veth", "peer", "name", "smprobe1",
        ];
        self.ip(&probe).map_err(|e| Error::Missing {
            what: "veth support (CONFIG_VETH)".into(),
            detail: e.to_string(),
        })?;
        self.ip(&["-n", &f.netns, "link", "del", "smprobe0"])?;
        (self.report)(Progress::Fabric {
            netns: f.netns,
            bridge: f.bridge,
            cidr: f.cidr,
        });
        Ok(())
    }

    fn node(&mut self, i: usize) -> Result<(), Error> {
        let n = self.state.nodes[i].clone();
        let fabric = self.state.fabric.clone();
        self.add_netns(&n.netns)?;
        let mut forwarding = vec!["net/ipv4/ip_forward"];
        if self.state.ipv6 {
            forwarding.push("net/ipv6/conf/all/forwarding");
        }
        self.sysctl_in(&n.netns, &forwarding)?;

        self.add_veth(&fabric.netns, &n.fabric_veth, &n.netns, &n.fabric_if)?;
        self.ip(&[
            "-n",
            &fabric.netns,
            "link",
            "set",
            &n.fabric_veth,
            "master",
            &fabric.bridge,
            "up",
        ])?;
        let addr = format!("{}/24", n.fabric_ip);
        self.ip(&["-n", &n.netns, "addr", "add", &addr, "dev", &n.fabric_if])?;
        if let Some(ip6) = n.fabric_ip6 {
            let addr6 = format!("{ip6}/64");
            self.ip(&[
                "-n",
                &n.netns,
                "addr",
                "add",
                &addr6,
                "dev",
                &n.fabric_if,
                "nodad",
            ])?;
        }
        self.ip(&["-n", &n.netns, "link", "set", &n.fabric_if, "up"])?;

        self.add_cgroup(&n.cgroup)?;
        self.add_cgroup(&n.proxy_cgroup)?;
        self.add_cgroup(&n.pods_cgroup)?;
        self.state.created.pin_roots.push(n.pin_root.clone());
        self.save()?;
        (self.report)(Progress::Node {
            name: n.name,
            netns: n.netns,
            fabric_ip: n.fabric_ip,
            pod_cidr: n.pod_cidr,
        });
        Ok(())
    }

    /// A veth pair: `name` in `netns`, its peer `peer` in `peer_netns`;
    /// recorded (and the state saved) before anything else is done to it,
    /// so `down` removes it whatever fails next.
    fn add_veth(
        &mut self,
        netns: &str,
        name: &str,
        peer_netns: &str,
        peer: &str,
    ) -> Result<(), Error> {
        self.ip(&[
            "-n", netns, "link", "add", name, "type", "veth", "peer", "name", peer, "netns",
            peer_netns,
        ])?;
        self.state.created.veths.push(Veth {
            netns: netns.to_owned(),
            name: name.to_owned(),
            peer: format!("{peer_netns}/{peer}"),
        });
        self.save()
    }

    fn pod(&mut self, i: usize) -> Result<(), Error> {
        let p = self.state.pods[i].clone();
        let n = self
            .state
            .node(&p.node)
            .cloned()
            .ok_or_else(|| Error::Names(format!("pod {}: node {} unknown", p.key(), p.node)))?;
        self.add_netns(&p.netns)?;
        self.add_veth(&n.netns, &p.veth, &p.netns, &p.interface)?;

        // Node end: the gateway address, a host route to the pod.
        let gw = format!("{}/32", n.gateway);
        let host = format!("{}/32", p.ip);
        self.ip(&["-n", &n.netns, "addr", "add", &gw, "dev", &p.veth])?;
        if p.ip6.is_some() {
            let gw6 = format!("{}/64", ipam::GATEWAY_V6);
            self.ip(&["-n", &n.netns, "addr", "add", &gw6, "dev", &p.veth, "nodad"])?;
        }
        self.ip(&["-n", &n.netns, "link", "set", &p.veth, "up"])?;
        self.ip(&["-n", &n.netns, "route", "add", &host, "dev", &p.veth])?;
        if let Some(ip6) = p.ip6 {
            let host6 = format!("{ip6}/128");
            self.ip(&["-n", &n.netns, "route", "add", &host6, "dev", &p.veth])?;
        }

        // Pod end: a /32, the gateway on link, default via the gateway.
        let gw_ip = n.gateway.to_string();
        let src = p.ip.to_string();
        self.ip(&["-n", &p.netns, "addr", "add", &host, "dev", &p.interface])?;
        if let Some(ip6) = p.ip6 {
            let host6 = format!("{ip6}/128");
            self.ip(&[
                "-n",
                &p.netns,
                "addr",
                "add",
                &host6,
                "dev",
                &p.interface,
                "nodad",
            ])?;
        }
        self.ip(&["-n", &p.netns, "link", "set", &p.interface, "up"])?;
        self.ip(&[
            "-n",
            &p.netns,
            "route",
            "add",
            &gw_ip,
            "dev",
            &p.interface,
            "scope",
            "link",
        ])?;
        self.ip(&[
            "-n",
            &p.netns,
            "route",
            "add",
            "default",
            "via",
            &gw_ip,
            "dev",
            &p.interface,
            "src",
            &src,
        ])?;
        if p.ip6.is_some() {
            let gw6 = ipam::GATEWAY_V6.to_string();
            self.ip(&[
                "-6",
                "-n",
                &p.netns,
                "route",
                "add",
                "default",
                "via",
                &gw6,
                "dev",
                &p.interface,
            ])?;
        }
        self.add_cgroup(&p.cgroup)?;
        self.save()?;
        (self.report)(Progress::Pod {
            pod: p.key(),
            node: p.node,
            netns: p.netns,
            ip: p.ip,
            ip6: p.ip6,
        });
        Ok(())
    }

    /// Routes from node `i` to every other node's pod range over the fabric.
    fn routes(&mut self, i: usize) -> Result<(), Error> {
        let n = self.state.nodes[i].clone();
        let mut count = 0;
        for other in self.state.nodes.clone() {
            if other.name == n.name {
                continue;
            }
            let via = other.fabric_ip.to_string();
            self.ip(&[
                "-n",
                &n.netns,
                "route",
                "add",
                &other.pod_cidr,
                "via",
                &via,
                "dev",
                &n.fabric_if,
            ])?;
            if let (Some(cidr6), Some(via6)) = (&other.pod_cidr6, other.fabric_ip6) {
                let via6 = via6.to_string();
                self.ip(&[
                    "-n",
                    &n.netns,
                    "route",
                    "add",
                    cidr6,
                    "via",
                    &via6,
                    "dev",
                    &n.fabric_if,
                ])?;
            }
            count += 1;
        }
        (self.report)(Progress::Routes {
            node: n.name,
            routes: count,
        });
        Ok(())
    }

    /// The resolved topology, for the proxies and the CA.
    fn files(&mut self, t: &Topology) -> Result<(), Error> {
        let dir = self.options.state_dir(&self.state.mesh);
        let topology = dir.join(state::TOPOLOGY_FILE);
        let registry = dir.join(state::REGISTRY_FILE);
        state::write_file(&topology, t.to_yaml().as_bytes())?;
        self.state.created.files.push(topology.clone());
        state::write_file(&registry, t.registry_yaml().as_bytes())?;
        self.state.created.files.push(registry.clone());
        (self.report)(Progress::Files { topology, registry });
        Ok(())
    }
}

impl Mesh {
    /// Makes one more pod on a mesh that is up (its netns, veth, routes
    /// and cgroup), as a container runtime's network setup would; records
    /// it in the state. `p` is planned ([`plan_pod`]).
    pub(crate) fn build_pod(&mut self, p: PodInfo) -> Result<(), Error> {
        if self.state.pod(&p.namespace, &p.name).is_some() {
            return Err(Error::Names(format!(
                "pod {}: already in the mesh",
                p.key()
            )));
        }
        self.state.pods.push(p);
        let i = self.state.pods.len() - 1;
        let mut noop = |_: Progress| {};
        let mut builder = Builder {
            state: self.state.clone(),
            options: &self.options,
            path: self.options.state_file(&self.state.mesh),
            report: &mut noop,
        };
        let r = builder.pod(i);
        self.state = builder.state;
        r
    }

    /// Removes pod `namespace/name` made by [`Mesh::build_pod`] or `up`:
    /// kills its processes, deletes its netns (and with it its veth) and
    /// cgroup, and forgets it.
    pub(crate) fn unbuild_pod(&mut self, namespace: &str, name: &str) -> Result<(), Error> {
        let p = self
            .state
            .pod(namespace, name)
            .cloned()
            .ok_or_else(|| Error::Unknown {
                mesh: self.state.mesh.clone(),
                what: "pod",
                name: format!("{namespace}/{name}"),
            })?;
        cgroup::kill_tree(&p.cgroup, self.options.kill_timeout)?;
        cgroup::remove_tree(&p.cgroup, self.options.kill_timeout)?;
        let node_netns = self.state.node(&p.node).map(|n| n.netns.clone());
        if let Some(n) = node_netns {
            // Gone with the pod's netns already, normally.
            let _ = ip(
                &["-n", &n, "link", "del", &p.veth],
                self.options.command_timeout,
            );
        }
        ip(&["netns", "del", &p.netns], self.options.command_timeout)?;
        let c = &mut self.state.created;
        c.netns.retain(|n| n != &p.netns);
        c.veths
            .retain(|v| v.name != p.veth || v.peer != format!("{}/{}", p.netns, p.interface));
        c.cgroups.retain(|g| g != &p.cgroup);
        self.state
            .pods
            .retain(|q| !(q.namespace == namespace && q.name == name));
        self.state.save(&self.options.state_file(&self.state.mesh))
    }

    /// The mesh `mesh` as another process built it (for `mesh exec`,
    /// `mesh status`). Dropping it leaves the mesh up.
    pub fn open(mesh: &str, options: &Options) -> Result<Mesh, Error> {
        crate::check_mesh_name(mesh)?;
        let path = options.state_file(mesh);
        let state = State::load(&path)?.ok_or_else(|| Error::NotUp {
            mesh: mesh.to_owned(),
            path: path.clone(),
        })?;
        if !state.complete {
            return Err(Error::State {
                path,
                reason: "the mesh is not complete (its `up` did not finish)".into(),
            });
        }
        Ok(Mesh {
            state,
            options: options.clone(),
            down_on_drop: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.state.mesh
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn state_dir(&self) -> PathBuf {
        self.options.state_dir(&self.state.mesh)
    }

    /// The resolved topology file (`mesh.yaml` in the state directory).
    pub fn topology_file(&self) -> PathBuf {
        self.state_dir().join(state::TOPOLOGY_FILE)
    }

    /// The resolved `nodes:`/`pods:` in the registry's file format.
    pub fn registry_file(&self) -> PathBuf {
        self.state_dir().join(state::REGISTRY_FILE)
    }

    pub fn node(&self, name: &str) -> Result<&NodeInfo, Error> {
        self.state.node(name).ok_or_else(|| Error::Unknown {
            mesh: self.state.mesh.clone(),
            what: "node",
            name: name.to_owned(),
        })
    }

    /// A pod by `namespace/name`, or by `name` in namespace `default`.
    pub fn pod(&self, pod: &str) -> Result<&PodInfo, Error> {
        let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
        self.state.pod(ns, name).ok_or_else(|| Error::Unknown {
            mesh: self.state.mesh.clone(),
            what: "pod",
            name: pod.to_owned(),
        })
    }

    /// Whether dropping this handle runs `down` (true for [`up`]'s handle).
    pub fn set_down_on_drop(&mut self, down: bool) {
        self.down_on_drop = down;
    }

    /// Leaves the mesh up after this handle is gone (what `mesh up` does);
    /// returns the state file, which `down` reads.
    pub fn detach(mut self) -> PathBuf {
        self.down_on_drop = false;
        self.options.state_file(&self.state.mesh)
    }

    /// Removes the whole mesh (see [`crate::down`]).
    pub fn down(mut self) -> Result<crate::DownReport, Error> {
        self.down_on_drop = false;
        teardown::down(&self.state.mesh, &self.options)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if self.down_on_drop
            && let Err(e) = teardown::down(&self.state.mesh, &self.options)
        {
            tracing::error!(mesh = %self.state.mesh, "down on drop: {e}");
        }
    }
}
