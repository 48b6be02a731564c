//! `mesh status`: nodes, proxies, pods, certificates and policies, with
//! problems collected and highlighted.

use anyhow::Result;
use mesh_local::Mesh;
use mesh_local::supervise::Phase;
use serde::Serialize;
use std::io::Write as _;

use crate::admin::{self, CertState, Workloads};
use crate::cli::StatusArgs;
use crate::failure::require_root;
use crate::paint::{Paint, Style};
use crate::table::Table;
use crate::units;

/// The redirection mode of a fully working eBPF data path (anything else,
/// e.g. `degraded (...)`, is a problem).
pub const HEALTHY_MODE: &str = "sockmap";

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    pub mesh: String,
    pub state_dir: String,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    pub policies: Vec<PolicyStatus>,
    /// Kubernetes mode (`mesh up --kubernetes`): the API server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeStatus>,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KubeStatus {
    /// `http://<addr>`, inside the first node's netns.
    pub api: String,
    pub kubeconfig: String,
    /// Whether the API server answered `GET /version`.
    pub reachable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub fabric_ip: String,
    pub pod_cidr: String,
    /// Pid of the node's mesh-proxy, when it runs.
    pub proxy_pid: Option<u32>,
    /// `running`, or when it does not run: `backoff` (crashed, restarts
    /// soon), `held` (crashed, kept down), `stopped` (exited cleanly, not
    /// restarted), `down` (unsupervised).
    pub proxy_state: String,
    /// Pid of the proxy's supervisor (`None`: the proxy is not supervised).
    pub supervisor_pid: Option<u32>,
    /// Restarts after a crash (`None`: no supervisor ever ran).
    pub restarts: Option<u32>,
    /// How the proxy last ended.
    pub last_exit: Option<ProxyExit>,
    /// In backoff: when the proxy starts again (ms since the epoch).
    pub next_start_unix_ms: Option<u64>,
    pub ready: bool,
    /// Why not ready (empty when ready).
    pub ready_detail: String,
    pub redirection_mode: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyExit {
    /// `killed by SIGKILL`, `exited 1`.
    pub reason: String,
    pub unix_ms: u64,
    /// How long that proxy had run.
    pub ran_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub node: String,
    pub ip: String,
    /// Enrolled by its node proxy; `None` when the proxy did not answer.
    pub meshed: Option<bool>,
    /// Why the pod is out of the mesh by choice (the opt-in rule:
    /// `pod-disabled`, `not-opted-in`, `host-network`); not a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opted_out: Option<String>,
    pub identity: String,
    pub cert_valid: Option<bool>,
    pub cert_not_after: Option<u64>,
    pub cert_error: Option<String>,
    /// Kubernetes mode: the pod's `sockmesh.io/status` annotation, as its
    /// node proxy wrote it (`None`: not written yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_annotation: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyStatus {
    pub namespace: String,
    pub name: String,
    pub action: String,
    pub selector: String,
    pub rules: usize,
}

/// Collects the status of `mesh` from its state and its proxies' admin API.
pub fn collect(mesh: &Mesh) -> Status {
    let st = mesh.state();
    let mut s = Status {
        mesh: mesh.name().to_owned(),
        state_dir: mesh.state_dir().display().to_string(),
        ..Status::default()
    };
    let mut workloads: Vec<Workloads> = Vec::new();
    let mut certs: Vec<CertState> = Vec::new();
    let mut answered: Vec<String> = Vec::new();
    for n in &st.nodes {
        let proxy_pid = mesh.proxy_pid(&n.name);
        let sup = mesh.supervision(&n.name);
        let supervisor_pid = sup
            .as_ref()
            .filter(|s| s.supervisor_alive())
            .map(|s| s.supervisor.pid);
        let proxy_state = match (&sup, proxy_pid) {
            (_, Some(_)) => "running".to_owned(),
            (Some(s), None) if supervisor_pid.is_some() => s.phase.to_string(),
            (Some(s), None) if s.phase == Phase::Stopped => s.phase.to_string(),
            _ => "down".to_owned(),
        };
        let last_exit = sup
            .as_ref()
            .and_then(|s| s.last_exit.as_ref())
            .map(|e| ProxyExit {
                reason: e.exit.to_string(),
                unix_ms: e.unix_ms,
                ran_ms: e.ran_ms,
            });
        let next_start_unix_ms = sup
            .as_ref()
            .filter(|s| {
                proxy_pid.is_none() && supervisor_pid.is_some() && s.phase == Phase::Backoff
            })
            .and_then(|s| s.next_start_unix_ms);
        let ready = admin::ready(mesh, &n.name);
        let mode = admin::get_json::<serde_json::Value>(mesh, &n.name, "/config_dump")
            .ok()
            .and_then(|v| v["redirection_mode"].as_str().map(str::to_owned));
        if proxy_pid.is_none() {
            let why = match (&last_exit, proxy_state.as_str()) {
                (Some(e), "backoff") => format!(": {}, restarting", e.reason),
                (Some(e), "held") => format!(": {}, held down", e.reason),
                (Some(e), "stopped") => format!(": {}, not restarted", e.reason),
                (Some(e), _) => format!(": {}, no supervisor", e.reason),
                (None, _) => String::new(),
            };
            s.problems.push(format!(
                "node {}: mesh-proxy is not running{why} (log {})",
                n.name,
                mesh.control_log(&format!("proxy-{}", n.name)).display()
            ));
        } else if let Err(why) = &ready {
            s.problems
                .push(format!("node {}: mesh-proxy {why}", n.name));
        }
        if let Some(m) = &mode
            && m != HEALTHY_MODE
        {
            s.problems
                .push(format!("node {}: redirection mode is {m}", n.name));
        }
        if let Ok(w) = admin::get_json::<Workloads>(mesh, &n.name, "/workloads") {
            workloads.push(w);
            answered.push(n.name.clone());
        }
        if let Ok(c) = admin::get_json::<Vec<CertState>>(mesh, &n.name, "/certs") {
            certs.extend(c);
        }
        s.nodes.push(NodeStatus {
            name: n.name.clone(),
            netns: n.netns.clone(),
            fabric_ip: n.fabric_ip.to_string(),
            pod_cidr: n.pod_cidr.clone(),
            proxy_pid,
            proxy_state,
            supervisor_pid,
            restarts: sup.as_ref().map(|s| s.restarts),
            last_exit,
            next_start_unix_ms,
            ready: ready.is_ok(),
            ready_detail: ready.err().unwrap_or_default(),
            redirection_mode: mode,
        });
    }
    // The opt-in rule's decision for each pod, from the registry the proxies
    // read (file mode), else from the mesh's state (the pods' annotations
    // and the namespaces' labels, as the harness wrote them to the API).
    let mut decisions: std::collections::HashMap<String, mesh_core::opt_in::MeshDecision> =
        std::fs::read_to_string(mesh.control_registry())
            .ok()
            .and_then(|text| {
                mesh_core::registry::Snapshot::parse(&mesh.control_registry(), &text).ok()
            })
            .map(|snap| {
                snap.pods
                    .iter()
                    .map(|p| (format!("{}/{}", p.namespace, p.name), p.mesh))
                    .collect()
            })
            .unwrap_or_default();
    for p in &st.pods {
        decisions.entry(p.key()).or_insert_with(|| st.decision(p));
    }
    let kube = st.kube.as_ref();
    if let Some(k) = kube {
        let reachable = matches!(
            mesh.kube_request("GET", "/version", None, None),
            Ok((200, _))
        );
        if !reachable {
            s.problems.push(format!(
                "the Kubernetes API server at http://{} does not answer (log {})",
                k.api,
                mesh.control_log("kube-api").display()
            ));
        }
        s.kubernetes = Some(KubeStatus {
            api: format!("http://{}", k.api),
            kubeconfig: k.kubeconfig.display().to_string(),
            reachable,
        });
    }
    for p in &st.pods {
        let key = p.key();
        let status_annotation = if s.kubernetes.as_ref().is_some_and(|k| k.reachable) {
            mesh.pod_status_annotation(&key).ok().flatten()
        } else {
            None
        };
        let opted_out = match decisions.get(&key) {
            Some(mesh_core::opt_in::MeshDecision::NotMeshed(why)) => serde_json::to_value(why)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned)),
            _ => None,
        };
        let w = workloads
            .iter()
            .flat_map(|w| w.pods.iter())
            .find(|w| w.pod == key);
        let identity = w.map(|w| w.identity.clone()).unwrap_or_default();
        let cert = certs
            .iter()
            .find(|c| !identity.is_empty() && c.identity == identity);
        let meshed = if answered.contains(&p.node) {
            Some(w.is_some_and(|w| w.enrolled))
        } else {
            None
        };
        if meshed == Some(false) && opted_out.is_none() {
            s.problems.push(format!(
                "pod {key}: not enrolled by the proxy on {}",
                p.node
            ));
        }
        if meshed == Some(true) {
            match cert {
                None => s
                    .problems
                    .push(format!("pod {key}: no certificate for {identity}")),
                Some(c) if !c.valid => s.problems.push(format!(
                    "pod {key}: certificate of {identity} is not valid{}",
                    c.last_error
                        .as_deref()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                )),
                Some(_) => {}
            }
        }
        s.pods.push(PodStatus {
            pod: key,
            node: p.node.clone(),
            ip: p.ip.to_string(),
            meshed,
            opted_out,
            identity,
            cert_valid: cert.map(|c| c.valid),
            cert_not_after: cert.and_then(|c| c.not_after),
            cert_error: cert.and_then(|c| c.last_error.clone()),
            status_annotation,
        });
    }
    s.policies = if kube.is_some() {
        kube_policies(mesh)
    } else {
        policies(&mesh.control_registry())
    };
    s
}

/// Kubernetes mode: the AuthorizationPolicies in the API.
fn kube_policies(mesh: &Mesh) -> Vec<PolicyStatus> {
    let path = "/apis/security.sockmesh.io/v1/authorizationpolicies";
    let Ok(Some(list)) = mesh.kube_get(path) else {
        return Vec::new();
    };
    let Ok(items) = serde_norway::to_value(&list["items"]) else {
        return Vec::new();
    };
    let mut doc = serde_norway::Mapping::new();
    doc.insert("policies".into(), items);
    policies_of(&serde_norway::Value::Mapping(doc))
}

/// The policies of the registry file the proxies read.
pub fn policies(registry: &std::path::Path) -> Vec<PolicyStatus> {
    let Ok(text) = std::fs::read_to_string(registry) else {
        return Vec::new();
    };
    let Ok(doc) = serde_norway::from_str::<serde_norway::Value>(&text) else {
        return Vec::new();
    };
    policies_of(&doc)
}

/// The policies of a registry document (its `policies:` list).
fn policies_of(doc: &serde_norway::Value) -> Vec<PolicyStatus> {
    let Some(list) = doc["policies"].as_sequence() else {
        return Vec::new();
    };
    list.iter()
        .map(|d| {
            let labels = d["spec"]["selector"]["matchLabels"]
                .as_mapping()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            format!(
                                "{}={}",
                                k.as_str().unwrap_or("?"),
                                v.as_str().unwrap_or("?")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            PolicyStatus {
                namespace: d["metadata"]["namespace"].as_str().unwrap_or("").into(),
                name: d["metadata"]["name"].as_str().unwrap_or("").into(),
                action: d["spec"]["action"].as_str().unwrap_or("ALLOW").into(),
                selector: if labels.is_empty() {
                    "(all workloads)".into()
                } else {
                    labels
                },
                rules: d["spec"]["rules"].as_sequence().map_or(0, Vec::len),
            }
        })
        .collect()
}

/// The status as tables, at `now_ms` (milliseconds since the epoch).
pub fn render(s: &Status, now_ms: u64, paint: &Paint) -> String {
    let now = now_ms / 1000;
    let mut out = format!(
        "{} {}  (state {})\n\n",
        paint.bold("Mesh"),
        s.mesh,
        s.state_dir
    );
    let mut nodes = Table::new(&[
        "NODE",
        "ADDRESS",
        "PODS CIDR",
        "PROXY",
        "RESTARTS",
        "READY",
        "REDIRECTION",
    ]);
    for n in &s.nodes {
        let proxy = match (n.proxy_pid, n.proxy_state.as_str()) {
            (Some(pid), _) => (format!("up (pid {pid})"), Style::Green),
            (None, "backoff") => (
                match n.next_start_unix_ms {
                    Some(at) => {
                        format!("RESTARTING in {}", units::age_ms(at.saturating_sub(now_ms)))
                    }
                    None => "RESTARTING".into(),
                },
                Style::Yellow,
            ),
            (None, "held") => ("DOWN (held)".into(), Style::RedBold),
            (None, "stopped") => ("DOWN (stopped)".into(), Style::RedBold),
            (None, _) => ("DOWN".into(), Style::RedBold),
        };
        let restarts = match (n.restarts, &n.last_exit) {
            (None, _) => ("-".into(), Style::Plain),
            (Some(r), Some(e)) => (
                format!(
                    "{r}, last: {} {} ago",
                    e.reason,
                    units::age_ms(now_ms.saturating_sub(e.unix_ms))
                ),
                if r > 0 { Style::Yellow } else { Style::Plain },
            ),
            (Some(r), None) => (r.to_string(), Style::Plain),
        };
        let ready = if n.ready {
            ("ready".into(), Style::Green)
        } else {
            ("NOT READY".into(), Style::RedBold)
        };
        let mode = match &n.redirection_mode {
            Some(m) if m == HEALTHY_MODE => (m.clone(), Style::Plain),
            Some(m) => (m.clone(), Style::Yellow),
            None => ("?".into(), Style::Yellow),
        };
        nodes.styled([
            (n.name.clone(), Style::Plain),
            (n.fabric_ip.clone(), Style::Plain),
            (n.pod_cidr.clone(), Style::Plain),
            proxy,
            restarts,
            ready,
            mode,
        ]);
    }
    out.push_str(&nodes.render(paint));
    out.push('\n');
    let mut pods = Table::new(&["POD", "NODE", "IP", "MESHED", "IDENTITY", "CERTIFICATE"]);
    for p in &s.pods {
        let meshed = match (p.meshed, &p.opted_out) {
            (Some(false) | None, Some(why)) => (format!("no ({why})"), Style::Plain),
            (Some(true), _) => ("yes".into(), Style::Green),
            (Some(false), None) => ("NO".into(), Style::RedBold),
            (None, None) => ("?".into(), Style::Yellow),
        };
        let cert = match (p.cert_valid, p.cert_not_after) {
            (Some(true), Some(end)) => (
                format!("valid, expires {}", units::relative(end, now)),
                Style::Plain,
            ),
            (Some(true), None) => ("valid".into(), Style::Plain),
            (Some(false), _) => (
                format!(
                    "NOT VALID{}",
                    p.cert_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                Style::RedBold,
            ),
            (None, _) => ("-".into(), Style::Yellow),
        };
        pods.styled([
            (p.pod.clone(), Style::Plain),
            (p.node.clone(), Style::Plain),
            (p.ip.clone(), Style::Plain),
            meshed,
            (p.identity.clone(), Style::Plain),
            cert,
        ]);
    }
    out.push_str(&pods.render(paint));
    out.push('\n');
    if let Some(k) = &s.kubernetes {
        out.push_str(&format!(
            "Kubernetes API {} ({}; kubeconfig {}). Each pod's sockmesh.io/status, as its node proxy wrote it:\n",
            k.api,
            if k.reachable { "answering" } else { "NOT ANSWERING" },
            k.kubeconfig
        ));
        let mut ann = Table::new(&["POD", "SOCKMESH.IO/STATUS"]);
        for p in &s.pods {
            let text = p
                .status_annotation
                .as_ref()
                .map_or_else(|| "(not written yet)".to_owned(), |v| v.to_string());
            ann.styled([(p.pod.clone(), Style::Plain), (text, Style::Plain)]);
        }
        out.push_str(&ann.render(paint));
        out.push('\n');
    }
    if s.policies.is_empty() {
        out.push_str("No policies: every connection between meshed pods is allowed.\n");
    } else {
        let mut pol = Table::new(&["POLICY", "ACTION", "APPLIES TO", "RULES>"]);
        for p in &s.policies {
            pol.styled([
                (format!("{}/{}", p.namespace, p.name), Style::Plain),
                (
                    p.action.clone(),
                    if p.action == "DENY" {
                        Style::Yellow
                    } else {
                        Style::Plain
                    },
                ),
                (p.selector.clone(), Style::Plain),
                (p.rules.to_string(), Style::Plain),
            ]);
        }
        out.push_str(&pol.render(paint));
    }
    out.push('\n');
    if s.problems.is_empty() {
        out.push_str(&format!("{} no problems found\n", paint.green("✓")));
    } else {
        out.push_str(&format!(
            "{}\n",
            paint.red_bold(&format!("{} problem(s):", s.problems.len()))
        ));
        for p in &s.problems {
            out.push_str(&format!("  {} {p}\n", paint.red("✗")));
        }
    }
    out
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn run(name: &str, args: &StatusArgs) -> Result<u8> {
    require_root("status")?;
    let mesh = crate::local::open(name)?;
    let s = collect(&mesh);
    if args.output.json() {
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        write!(
            std::io::stdout(),
            "{}",
            render(&s, now_unix_ms(), &Paint::stdout())
        )?;
    }
    Ok(if s.problems.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_snapshot() {
        let s = Status {
            mesh: "demo".into(),
            state_dir: "/run/sockmesh/demo".into(),
            nodes: vec![
                NodeStatus {
                    name: "node-a".into(),
                    netns: "sockmesh-demo-node-a".into(),
                    fabric_ip: "10.77.0.1".into(),
                    pod_cidr: "10.77.1.0/24".into(),
                    proxy_pid: Some(4242),
                    proxy_state: "running".into(),
                    supervisor_pid: Some(4240),
                    restarts: Some(2),
                    last_exit: Some(ProxyExit {
                        reason: "killed by SIGKILL".into(),
                        unix_ms: 986_000,
                        ran_ms: 3_000,
                    }),
                    next_start_unix_ms: None,
                    ready: true,
                    ready_detail: String::new(),
                    redirection_mode: Some("sockmap".into()),
                },
                NodeStatus {
                    name: "node-b".into(),
                    netns: "sockmesh-demo-node-b".into(),
                    fabric_ip: "10.77.0.2".into(),
                    pod_cidr: "10.77.2.0/24".into(),
                    proxy_pid: None,
                    proxy_state: "backoff".into(),
                    supervisor_pid: Some(4241),
                    restarts: Some(5),
                    last_exit: Some(ProxyExit {
                        reason: "exited 1".into(),
                        unix_ms: 998_000,
                        ran_ms: 120,
                    }),
                    next_start_unix_ms: Some(1_006_000),
                    ready: false,
                    ready_detail: "not answering".into(),
                    redirection_mode: None,
                },
                NodeStatus {
                    name: "node-c".into(),
                    netns: "sockmesh-demo-node-c".into(),
                    fabric_ip: "10.77.0.3".into(),
                    pod_cidr: "10.77.3.0/24".into(),
                    proxy_pid: Some(4343),
                    proxy_state: "running".into(),
                    supervisor_pid: None,
                    restarts: None,
                    last_exit: None,
                    next_start_unix_ms: None,
                    ready: true,
                    ready_detail: String::new(),
                    redirection_mode: Some("sockmap".into()),
                },
            ],
            pods: vec![
                PodStatus {
                    pod: "default/client".into(),
                    node: "node-a".into(),
                    ip: "10.77.1.2".into(),
                    meshed: Some(true),
                    opted_out: None,
                    identity: "spiffe://cluster.local/ns/default/sa/client".into(),
                    cert_valid: Some(true),
                    cert_not_after: Some(1000 + 86_400),
                    cert_error: None,
                    status_annotation: None,
                },
                PodStatus {
                    pod: "default/web".into(),
                    node: "node-b".into(),
                    ip: "10.77.2.2".into(),
                    meshed: None,
                    opted_out: None,
                    identity: String::new(),
                    cert_valid: None,
                    cert_not_after: None,
                    cert_error: None,
                    status_annotation: None,
                },
            ],
            policies: vec![PolicyStatus {
                namespace: "default".into(),
                name: "deny-other-to-web".into(),
                action: "DENY".into(),
                selector: "app=web".into(),
                rules: 1,
            }],
            kubernetes: None,
            problems: vec!["node node-b: mesh-proxy is not running: exited 1, restarting".into()],
        };
        let got = render(&s, 1_000_000, &Paint::off());
        let want = "\
Mesh demo  (state /run/sockmesh/demo)

NODE    ADDRESS    PODS CIDR     PROXY               RESTARTS                              READY      REDIRECTION
node-a  10.77.0.1  10.77.1.0/24  up (pid 4242)       2, last: killed by SIGKILL 14.0s ago  ready      sockmap
node-b  10.77.0.2  10.77.2.0/24  RESTARTING in 6.0s  5, last: exited 1 2.0s ago            NOT READY  ?
node-c  10.77.0.3  10.77.3.0/24  up (pid 4343)       -                                     ready      sockmap

POD             NODE    IP         MESHED  IDENTITY                                     CERTIFICATE
default/client  node-a  10.77.1.2  yes     spiffe://cluster.local/ns/default/sa/client  valid, expires in 1d00h
default/web     node-b  10.77.2.2  ?                                                    -

POLICY                     ACTION  APPLIES TO  RULES
default/deny-other-to-web  DENY    app=web         1

1 problem(s):
  ✗ node node-b: mesh-proxy is not running: exited 1, restarting
";
        assert_eq!(got, want, "got:\n{got}");
    }

    #[test]
    fn a_pod_out_of_the_mesh_by_choice_shows_why_and_is_no_problem() {
        let s = Status {
            mesh: "demo".into(),
            pods: vec![PodStatus {
                pod: "default/legacy".into(),
                node: "node-a".into(),
                ip: "10.77.1.9".into(),
                meshed: Some(false),
                opted_out: Some("pod-disabled".into()),
                ..PodStatus::default()
            }],
            ..Status::default()
        };
        let got = render(&s, 1_000_000, &Paint::off());
        assert!(
            got.contains("default/legacy  node-a  10.77.1.9  no (pod-disabled)"),
            "{got}"
        );
        assert!(!got.contains("NO "), "{got}");
    }

    #[test]
    fn policies_are_read_from_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registry.yaml");
        std::fs::write(
            &p,
            format!("nodes: []\npolicies:\n{}", crate::demo::DEMO_POLICY),
        )
        .unwrap();
        let got = policies(&p);
        assert_eq!(
            got,
            [PolicyStatus {
                namespace: "default".into(),
                name: "deny-other-to-web".into(),
                action: "DENY".into(),
                selector: "app=web".into(),
                rules: 1,
            }]
        );
    }
}
