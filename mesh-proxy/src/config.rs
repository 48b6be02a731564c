//! The node proxy's configuration: every value checked before any socket is
//! bound, errors naming the value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::registry::KubeSettings;
pub use crate::registry::SourceKind;

/// What the inbound plaintext port (15006) does with non-mesh traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum InboundMode {
    /// Refuse plaintext to meshed pods.
    Strict,
    /// Forward it (policy still applies, with no source identity) and label
    /// it plaintext.
    Permissive,
}

/// An inbound mode that is neither STRICT nor PERMISSIVE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inbound mode {0:?}: expected STRICT or PERMISSIVE")]
pub struct BadInboundMode(pub String);

impl std::str::FromStr for InboundMode {
    type Err = BadInboundMode;
    fn from_str(s: &str) -> Result<Self, BadInboundMode> {
        match s.to_ascii_uppercase().as_str() {
            "STRICT" => Ok(InboundMode::Strict),
            "PERMISSIVE" => Ok(InboundMode::Permissive),
            _ => Err(BadInboundMode(s.to_owned())),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// This node's name in the registry (Kubernetes: the Node's name, the
    /// pods' `spec.nodeName`).
    pub node: String,
    /// Where workloads come from: the file, or the Kubernetes API.
    pub registry_source: SourceKind,
    /// The registry file (nodes, pods, services, policies); the file
    /// source only.
    pub registry: Option<PathBuf>,
    /// The Kubernetes source's client configuration (unset: `$KUBECONFIG`,
    /// `~/.kube/config`, then in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// The proxy's own pod (never meshed), Kubernetes only.
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// After this long without a successful list/watch the Kubernetes
    /// source is stale: readiness says so (the last state is kept).
    pub api_stale_after: Duration,
    pub trust_domain: String,
    /// The CA (port 15012: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`,
    /// resolved at each connect) and the name its certificate carries.
    pub ca_addr: crate::identity::CaAddress,
    pub ca_server_name: String,
    /// Roots that verify the CA's serving certificate (its trust bundle).
    pub ca_bundle: PathBuf,
    /// This node's token for the CA (file, 0600); read again for every
    /// request to the CA (projected ServiceAccount tokens rotate).
    pub token_file: PathBuf,
    /// cgroup v2 directory the eBPF cgroup programs attach to (holds this
    /// node's pods and this proxy).
    pub cgroup: PathBuf,
    /// bpffs directory for this node's pins.
    pub pin_root: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub inbound_mode: InboundMode,
    /// Data-plane worker threads.
    pub workers: usize,
    /// How often the registry file is checked for changes.
    pub registry_poll: Duration,
    /// How long SIGTERM waits for open connections.
    pub drain_deadline: Duration,
    /// Where TCP metric totals persist across restarts (unset: memory
    /// only, so a restart resets the counters).
    pub metrics_state: Option<PathBuf>,
    /// How long the series of a workload that is gone stay exported.
    pub metrics_retention: Duration,
    /// Bounds of every pod's 15008 listener (caps, handshake budget, idle
    /// timeouts).
    pub hbone_limits: crate::hbone::ServerLimits,
    /// HTTP/2 windows, frame sizes, timeouts and the copy buffer of every
    /// tunnel (both sides) and of every plain copy (passthrough, plaintext).
    pub h2: crate::hbone::H2Config,
    /// A plain TCP dial from a pod's netns (the app on delivery, a
    /// passthrough destination, the first hop of a pooled connection).
    pub dial_timeout: Duration,
    /// Unix socket where mesh-cni hands over new pods (off when unset).
    pub cni_socket: Option<PathBuf>,
    /// Whether the kernel records the TCP RTT, retransmit and duration
    /// histograms (`sockmesh_tcp_*`; `Datapath::set_histograms`).
    pub tcp_histograms: bool,
    /// The kernel same-node path: once this proxy has authorized a
    /// same-node connection (policy allows it), later connects of that pod
    /// to that address and port go pod to pod in the kernel, with no proxy
    /// socket, while the destination's listener is alive; every change of
    /// registry, policy or enrollment voids the authorizations.
    pub same_node_direct: bool,
}

/// [`Config::api_stale_after`] unless told otherwise.
pub const DEFAULT_API_STALE: Duration = Duration::from_secs(60);

/// [`Config::dial_timeout`] unless told otherwise.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("config: {what}: {reason}")]
pub struct ConfigError {
    pub what: String,
    pub reason: String,
}

fn err(what: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        what: what.into(),
        reason: reason.into(),
    }
}

fn readable_file(what: &str, p: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(err(format!("{what} {}", p.display()), "is not a file")),
        Err(e) => Err(err(format!("{what} {}", p.display()), e.to_string())),
    }
}

/// A Kubernetes object name (DNS-1123 subdomain: lowercase letters,
/// digits, `-` and `.`, starting and ending alphanumeric, at most 253).
fn kube_name(flag: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(err(
            format!("{flag} {value:?}"),
            "not a Kubernetes name (lowercase letters, digits, '-' and '.', at most 253)",
        ))
    }
}

impl Config {
    /// What the Kubernetes source is started with.
    pub fn kube_settings(&self) -> KubeSettings {
        KubeSettings {
            node: self.node.clone(),
            kubeconfig: self.kubeconfig.clone(),
            own_pod: self.pod_namespace.clone().zip(self.pod_name.clone()),
            stale_after: self.api_stale_after,
        }
    }

    fn validate_source(&self) -> Result<(), ConfigError> {
        match self.registry_source {
            SourceKind::File => match &self.registry {
                Some(path) => readable_file("--registry", path)?,
                None => {
                    return Err(err(
                        "--registry",
                        "missing: --registry-source file (the default) reads workloads from this file; give --registry PATH, or --registry-source kubernetes",
                    ));
                }
            },
            SourceKind::Kubernetes => {
                if let Some(path) = &self.registry {
                    return Err(err(
                        format!("--registry {}", path.display()),
                        "only read with --registry-source file; with --registry-source kubernetes workloads come from the API",
                    ));
                }
                kube_name("--node", &self.node)?;
                if let Some(path) = &self.kubeconfig {
                    readable_file("--kubeconfig", path)?;
                }
            }
        }
        match (&self.pod_name, &self.pod_namespace) {
            (Some(name), Some(ns)) => {
                kube_name("--pod-name", name)?;
                kube_name("--pod-namespace", ns)?;
            }
            (Some(name), None) => {
                return Err(err(
                    format!("--pod-name {name:?}"),
                    "needs --pod-namespace (env POD_NAMESPACE) too",
                ));
            }
            (None, Some(ns)) => {
                return Err(err(
                    format!("--pod-namespace {ns:?}"),
                    "needs --pod-name (env POD_NAME) too",
                ));
            }
            (None, None) => {}
        }
        if self.api_stale_after.is_zero() {
            return Err(err("--api-stale-seconds 0", "must be more than 0"));
        }
        Ok(())
    }

    /// Checks every value that can be checked without binding a socket.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.is_empty() {
            return Err(err("--node", "empty"));
        }
        mesh_core::identity::validate_trust_domain(&self.trust_domain).map_err(|e| {
            err(
                format!("--trust-domain {:?}", self.trust_domain),
                e.to_string(),
            )
        })?;
        self.validate_source()?;
        readable_file("--ca-bundle", &self.ca_bundle)?;
        readable_file("--token-file", &self.token_file)?;
        if !self.cgroup.join("cgroup.procs").exists() {
            return Err(err(
                format!("--cgroup {}", self.cgroup.display()),
                "not a cgroup v2 directory (no cgroup.procs)",
            ));
        }
        if !self.admin_addr.ip().is_loopback() {
            return Err(err(
                format!("--admin {}", self.admin_addr),
                "the admin port must stay on localhost",
            ));
        }
        if self.workers == 0 || self.workers > 64 {
            return Err(err(format!("--workers {}", self.workers), "must be 1..=64"));
        }
        if self.registry_poll.is_zero() {
            return Err(err("--registry-poll", "must be more than 0"));
        }
        let l = &self.hbone_limits;
        if l.max_connections == 0 {
            return Err(err("--hbone-max-connections 0", "must be at least 1"));
        }
        if l.max_connections_per_peer == 0 || l.max_connections_per_peer > l.max_connections {
            return Err(err(
                format!(
                    "--hbone-max-connections-per-peer {}",
                    l.max_connections_per_peer
                ),
                format!(
                    "must be 1..={} (--hbone-max-connections)",
                    l.max_connections
                ),
            ));
        }
        for (flag, d) in [
            ("--hbone-handshake-seconds", l.handshake_timeout),
            ("--tunnel-idle-seconds", l.tunnel_idle_timeout),
            ("--hbone-idle-seconds", l.connection_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(err(format!("{flag} 0"), "must be more than 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(dir: &Path) -> Config {
        for f in ["reg.yaml", "bundle.pem", "token"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        Config {
            node: "node-a".into(),
            registry_source: SourceKind::File,
            registry: Some(dir.join("reg.yaml")),
            kubeconfig: None,
            pod_name: None,
            pod_namespace: None,
            api_stale_after: DEFAULT_API_STALE,
            trust_domain: "cluster.local".into(),
            ca_addr: "127.0.0.1:15012".parse().unwrap(),
            ca_server_name: "mesh-ca".into(),
            ca_bundle: dir.join("bundle.pem"),
            token_file: dir.join("token"),
            cgroup: dir.to_owned(),
            pin_root: "/sys/fs/bpf/sockmesh".into(),
            admin_addr: "127.0.0.1:15000".parse().unwrap(),
            metrics_addr: "0.0.0.0:15020".parse().unwrap(),
            readiness_addr: "0.0.0.0:15021".parse().unwrap(),
            inbound_mode: InboundMode::Strict,
            workers: 2,
            registry_poll: Duration::from_millis(500),
            drain_deadline: Duration::from_secs(5),
            metrics_state: None,
            metrics_retention: Duration::from_secs(3600),
            hbone_limits: crate::hbone::ServerLimits::default(),
            h2: crate::hbone::H2Config::default(),
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            cni_socket: None,
            tcp_histograms: true,
            same_node_direct: true,
        }
    }

    #[test]
    fn bad_values_are_named() {
        let d = tempfile::tempdir().unwrap();
        assert!(good(d.path()).validate().is_ok());
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.trust_domain = "Bad Domain".into()),
                "\"Bad Domain\"",
            ),
            (
                Box::new(|c| c.registry = Some("/nonexistent/reg.yaml".into())),
                "/nonexistent/reg.yaml",
            ),
            (
                Box::new(|c| c.admin_addr = "0.0.0.0:15000".parse().unwrap()),
                "0.0.0.0:15000",
            ),
            (Box::new(|c| c.cgroup = "/tmp".into()), "--cgroup /tmp"),
            (Box::new(|c| c.workers = 0), "--workers 0"),
            (Box::new(|c| c.registry = None), "--registry: missing"),
            (
                Box::new(|c| c.registry_source = SourceKind::Kubernetes),
                "--registry /",
            ),
            (
                Box::new(|c| {
                    c.registry_source = SourceKind::Kubernetes;
                    c.registry = None;
                    c.kubeconfig = Some("/nonexistent/kubeconfig".into());
                }),
                "--kubeconfig /nonexistent/kubeconfig",
            ),
            (
                Box::new(|c| {
                    c.registry_source = SourceKind::Kubernetes;
                    c.registry = None;
                    c.node = "Node_A".into();
                }),
                "--node \"Node_A\"",
            ),
            (
                Box::new(|c| c.pod_name = Some("mesh-proxy-x1".into())),
                "--pod-name \"mesh-proxy-x1\": needs --pod-namespace",
            ),
            (
                Box::new(|c| c.pod_namespace = Some("sockmesh".into())),
                "--pod-namespace \"sockmesh\": needs --pod-name",
            ),
            (
                Box::new(|c| {
                    c.pod_name = Some("p".into());
                    c.pod_namespace = Some("Bad NS".into());
                }),
                "--pod-namespace \"Bad NS\"",
            ),
            (
                Box::new(|c| c.api_stale_after = Duration::ZERO),
                "--api-stale-seconds 0",
            ),
        ];
        for (mutate, want) in cases {
            let mut c = good(d.path());
            mutate(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        let mut kube = good(d.path());
        kube.registry_source = SourceKind::Kubernetes;
        kube.registry = None;
        kube.pod_name = Some("mesh-proxy-7x2".into());
        kube.pod_namespace = Some("sockmesh".into());
        assert!(kube.validate().is_ok(), "{:?}", kube.validate());
        assert_eq!(
            kube.kube_settings().own_pod,
            Some(("sockmesh".into(), "mesh-proxy-7x2".into()))
        );
        assert_eq!(
            "kubernetes".parse::<SourceKind>(),
            Ok(SourceKind::Kubernetes)
        );
        assert!(
            "k8s"
                .parse::<SourceKind>()
                .unwrap_err()
                .contains("--registry-source \"k8s\"")
        );
        assert_eq!(
            "permissive".parse::<InboundMode>(),
            Ok(InboundMode::Permissive)
        );
        assert!(
            "loose"
                .parse::<InboundMode>()
                .unwrap_err()
                .to_string()
                .contains("\"loose\"")
        );
    }
}
