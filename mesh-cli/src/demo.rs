//! What `mesh up` builds without a file: the demo topology on N nodes, its
//! one policy (a denial the user can see), and the apps in its pods. Also
//! reading a user's topology file with an optional `policies:` section.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use mesh_core::opt_in::{DISABLED, ENABLED, MESH_KEY};
use mesh_local::{Namespace, Node, Pod, Service, ServicePort, Topology};

/// The policy of the demo: namespace `other` may not reach `app: web`.
pub const DEMO_POLICY: &str = "\
- apiVersion: security.sockmesh.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-other-to-web, namespace: default}
  spec:
    selector: {matchLabels: {app: web}}
    action: DENY
    rules:
    - from:
      - source: {namespaces: [other]}
";

/// `node-a`, `node-b`, ... (at most 26).
pub fn node_name(i: usize) -> String {
    let letter = (b'a' + (i % 26) as u8) as char;
    format!("node-{letter}")
}

/// The demo on `nodes` nodes (1-26): default/client and default/web-2 on
/// the first node, default/web on the second, other/iperf on the last,
/// and one more web pod (`web-3`, ...) on each further node. Services:
/// default/web (8080) and other/iperf (5201). Both namespaces opt in by
/// their `sockmesh.io/mesh=enabled` label; default/legacy (first node)
/// stays out on purpose, by its `sockmesh.io/mesh: disabled` annotation,
/// so `mesh status` shows a pod out of the mesh by choice.
pub fn topology(nodes: usize) -> Topology {
    let nodes = nodes.clamp(1, 26);
    let pod = |ns: &str, name: &str, node: usize, sa: &str, app: &str| Pod {
        namespace: ns.into(),
        name: name.into(),
        uid: None,
        node: node_name(node),
        service_account: sa.into(),
        ips: Vec::new(),
        labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        annotations: BTreeMap::new(),
    };
    let mut legacy = pod("default", "legacy", 0, "legacy", "legacy");
    legacy
        .annotations
        .insert(MESH_KEY.to_owned(), DISABLED.to_owned());
    let second = 1.min(nodes - 1);
    let mut pods = vec![
        pod("default", "client", 0, "client", "client"),
        pod("default", "web", second, "web", "web"),
        pod("default", "web-2", 0, "web", "web"),
        pod("other", "iperf", nodes - 1, "iperf", "iperf"),
        legacy,
    ];
    for i in 2..nodes {
        pods.push(pod("default", &format!("web-{}", i + 1), i, "web", "web"));
    }
    let service = |ns: &str, name: &str, port: u16| Service {
        namespace: ns.into(),
        name: name.into(),
        vip: None,
        ports: vec![ServicePort {
            port,
            target_port: port,
        }],
        selector: BTreeMap::from([("app".to_owned(), name.to_owned())]),
    };
    Topology {
        nodes: (0..nodes).map(|i| Node { name: node_name(i) }).collect(),
        pods,
        services: vec![
            service("default", "web", 8080),
            service("other", "iperf", 5201),
        ],
        namespaces: ["default", "other"]
            .into_iter()
            .map(|name| Namespace {
                name: name.into(),
                labels: BTreeMap::from([(MESH_KEY.to_owned(), ENABLED.to_owned())]),
            })
            .collect(),
    }
}

pub fn policies() -> serde_norway::Value {
    // A constant that a unit test parses: cannot fail.
    serde_norway::from_str(DEMO_POLICY).unwrap_or(serde_norway::Value::Null)
}

/// A topology file: the `mesh-local` format plus an optional `policies:`
/// list (AuthorizationPolicy documents, as in the registry file).
pub fn load_file(path: &Path) -> Result<(Topology, Option<serde_norway::Value>)> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("topology {origin}"))?;
    let mut doc: serde_norway::Value =
        serde_norway::from_str(&text).with_context(|| format!("topology {origin}: not YAML"))?;
    let policies = match doc.as_mapping_mut() {
        Some(m) => m.remove("policies"),
        None => None,
    };
    let rest = serde_norway::to_string(&doc).with_context(|| format!("topology {origin}"))?;
    let topology = Topology::from_yaml(&rest, &origin)?;
    if let Some(p) = &policies
        && !p.is_sequence()
    {
        anyhow::bail!(crate::failure::Failure::new(
            crate::failure::code::USAGE,
            format!("topology {origin}: policies: must be a list of AuthorizationPolicy documents")
        ));
    }
    Ok((topology, policies))
}

/// A long-lived program the demo runs in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub argv: Vec<String>,
    /// The TCP port it listens on, when it is a server.
    pub port: Option<u16>,
    pub what: &'static str,
}

/// The demo app of a pod with label `app: <app>`; `web_root` is the
/// directory the web server serves.
pub fn app(label: Option<&str>, web_root: &Path) -> Option<App> {
    match label? {
        "web" => Some(App {
            argv: vec![
                "python3".into(),
                "-m".into(),
                "http.server".into(),
                "8080".into(),
                "--directory".into(),
                web_root.display().to_string(),
            ],
            port: Some(8080),
            what: "HTTP server on :8080",
        }),
        "iperf" => Some(App {
            argv: vec!["iperf3".into(), "-s".into(), "-p".into(), "5201".into()],
            port: Some(5201),
            what: "iperf3 server on :5201",
        }),
        "client" => Some(App {
            argv: vec!["sleep".into(), "infinity".into()],
            port: None,
            what: "idle (use `mesh exec` to run clients here)",
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_scales_and_keeps_its_shape() {
        let two = topology(2);
        two.validate("test").unwrap();
        assert_eq!(two.nodes.len(), 2);
        let pods: Vec<_> = two
            .pods
            .iter()
            .map(|p| format!("{}/{}@{}", p.namespace, p.name, p.node))
            .collect();
        assert_eq!(
            pods,
            [
                "default/client@node-a",
                "default/web@node-b",
                "default/web-2@node-a",
                "other/iperf@node-b",
                "default/legacy@node-a",
            ]
        );
        // The namespaces opt in; legacy stays out by its own choice.
        let out: Vec<_> = two
            .pods
            .iter()
            .filter(|p| !two.decision(p).is_meshed())
            .map(|p| (p.name.as_str(), two.decision(p)))
            .collect();
        assert_eq!(
            out,
            [(
                "legacy",
                mesh_core::opt_in::MeshDecision::NotMeshed(
                    mesh_core::opt_in::NotMeshed::PodDisabled
                )
            )]
        );
        let one = topology(1);
        one.validate("test").unwrap();
        assert!(one.pods.iter().all(|p| p.node == "node-a"));
        let four = topology(4);
        four.validate("test").unwrap();
        assert_eq!(four.pods.len(), 7);
        assert!(
            four.pods
                .iter()
                .any(|p| p.name == "web-4" && p.node == "node-d")
        );
        assert_eq!(four.endpoints(&four.services[0]).count(), 4);
    }

    #[test]
    fn the_demo_policy_is_a_valid_deny() {
        let text = serde_norway::to_string(&policies()).unwrap();
        let parsed = mesh_core::policy::parse_policies(&text).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].name, "deny-other-to-web");
    }

    #[test]
    fn files_may_carry_policies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(
            &path,
            format!(
                "nodes: [{{name: n1}}]\npods:\n- {{namespace: default, name: a, node: n1}}\npolicies:\n{DEMO_POLICY}"
            ),
        )
        .unwrap();
        let (t, p) = load_file(&path).unwrap();
        assert_eq!(t.pods.len(), 1);
        assert!(p.unwrap().is_sequence());
        std::fs::write(&path, "nodes: [{name: n1}]\nnodez: []\n").unwrap();
        let e = format!("{:#}", load_file(&path).unwrap_err());
        assert!(e.contains("mesh.yaml") && e.contains("nodez"), "{e}");
    }
}
