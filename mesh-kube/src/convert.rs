//! Kubernetes objects to mesh-core types: pure functions, no I/O, so they
//! are property-tested and a fuzz target can call [`fuzz_parse`].
//!
//! A bad object is an [`ObjectProblem`], never a panic: the registry
//! reports it and skips the object.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod as K8sPod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::display::{MAX_SHOWN_CHARS, Shown, bounded_len};
use mesh_core::opt_in::{self, MESH_KEY, OptInFacts};
use mesh_core::policy::{AuthorizationPolicy, PolicyError};
use mesh_core::registry::{Pod, Service, ServicePort, WorkloadRef};

/// Why an object was skipped. Names the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {reason}")]
pub struct ObjectProblem {
    /// `pod default/web-1`, `service shop/cart`, `authorizationpolicy ns/name`.
    pub object: String,
    pub reason: String,
}

/// Longest message an [`ObjectProblem`] prints: the kind and two names
/// shown, and the longest reason (a policy parser's message).
pub const MAX_ERROR_LEN: usize =
    64 + 2 * bounded_len(MAX_SHOWN_CHARS) + PolicyError::MAX_MESSAGE_LEN;

/// Longest name shown as it is (a DNS subdomain, as the API server checks).
const MAX_NAME: usize = 253;

/// An object's name as a problem shows it: as it is when it is a name the
/// API server would accept (lowercase letters, digits, `-` and `.`), so
/// real objects read `pod default/web-1`; quoted, escaped and bounded
/// ([`Shown`]) otherwise, so a value from a broken or hostile source cannot
/// forge a log line or grow the message.
fn name_shown(name: &str) -> String {
    let plain = name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if plain {
        name.to_owned()
    } else {
        Shown::new(name).to_string()
    }
}

/// `pod default/web-1`: the kind, then namespace and name by [`name_shown`].
fn object_name(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind} {}/{}", name_shown(ns), name_shown(name))
}

fn problem(object: &str, reason: impl Into<String>) -> ObjectProblem {
    ObjectProblem {
        object: object.to_owned(),
        reason: reason.into(),
    }
}

/// Which pods are sockmesh's own (never meshed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Components {
    /// The proxy's own pod, `(namespace, name)`.
    pub own_pod: Option<(String, String)>,
    /// Pods with this label value of `app.kubernetes.io/part-of` are
    /// sockmesh components (`sockmesh`).
    pub part_of: Option<String>,
}

impl Components {
    fn contains(&self, ns: &str, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.own_pod
            .as_ref()
            .is_some_and(|(n, p)| n == ns && p == name)
            || self
                .part_of
                .as_ref()
                .is_some_and(|v| labels.get("app.kubernetes.io/part-of") == Some(v))
    }
}

/// The workload that owns a pod, from its controller ownerReference:
/// a ReplicaSet named `<deployment>-<pod-template-hash>` is its
/// Deployment; a Job named `<cronjob>-<digits>` is its CronJob.
pub fn workload_of(
    owners: &[OwnerReference],
    labels: &BTreeMap<String, String>,
) -> Option<WorkloadRef> {
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())?;
    let (kind, name) = match owner.kind.as_str() {
        "ReplicaSet" => match labels.get("pod-template-hash") {
            Some(hash) => match owner.name.strip_suffix(&format!("-{hash}")) {
                Some(deployment) if !deployment.is_empty() => ("Deployment", deployment),
                _ => ("ReplicaSet", owner.name.as_str()),
            },
            None => ("ReplicaSet", owner.name.as_str()),
        },
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron, digits))
                if !cron.is_empty()
                    && digits.len() >= 8
                    && digits.bytes().all(|b| b.is_ascii_digit()) =>
            {
                ("CronJob", cron)
            }
            _ => ("Job", owner.name.as_str()),
        },
        kind => (kind, owner.name.as_str()),
    };
    Some(WorkloadRef {
        kind: kind.to_owned(),
        name: name.to_owned(),
    })
}

/// A Pod as the mesh sees it, or why it is skipped (no node yet,
/// finished, a bad address). A pod with no IP yet is served with no
/// addresses: the CNI plugin hands its netns and addresses to the node
/// proxy before the kubelet writes `status.podIPs`, and enrollment (its
/// certificate included) must not wait for that. `namespace` is the pod's
/// Namespace when the registry has it (its labels carry the namespace
/// opt-in).
pub fn pod(
    k: &K8sPod,
    namespace: Option<&Namespace>,
    components: &Components,
) -> Result<Pod, ObjectProblem> {
    let meta = &k.metadata;
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let what = object_name("pod", &ns, &name);
    if ns.is_empty() || name.is_empty() {
        return Err(problem(&what, "no name or namespace"));
    }
    let uid = meta
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| problem(&what, "no uid"))?;
    let spec = k.spec.as_ref().ok_or_else(|| problem(&what, "no spec"))?;
    let node = spec
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| problem(&what, "not scheduled yet (no spec.nodeName)"))?;
    let status = k.status.as_ref();
    if let Some(phase) = status.and_then(|s| s.phase.as_deref())
        && matches!(phase, "Succeeded" | "Failed")
    {
        return Err(problem(
            &what,
            format!("finished (phase {phase}); its IP may be reused"),
        ));
    }
    let mut raw_ips: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|p| p.ip.as_str()).collect())
        .unwrap_or_default();
    if raw_ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref())
    {
        raw_ips.push(ip);
    }
    let ips = raw_ips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|e| problem(&what, format!("status.podIPs {}: {e}", Shown::new(ip))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let host_network = spec.host_network == Some(true);
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let ns_labels = namespace.and_then(|n| n.metadata.labels.as_ref());
    let mesh = opt_in::decide(OptInFacts {
        pod: annotations.get(MESH_KEY).map(String::as_str),
        namespace: ns_labels.and_then(|l| l.get(MESH_KEY)).map(String::as_str),
        host_network,
        mesh_component: components.contains(&ns, &name, &labels),
    });
    let workload = workload_of(
        meta.owner_references.as_deref().unwrap_or_default(),
        &labels,
    );
    Ok(Pod {
        namespace: ns,
        name,
        uid,
        node,
        service_account,
        ips,
        labels,
        netns: None,
        annotations,
        host_network,
        workload,
        mesh,
    })
}

/// A ClusterIP Service; `None` for one without a virtual IP (headless,
/// ExternalName: its clients connect to endpoints, routed as pods); an
/// error for a bad one.
pub fn service(k: &K8sService) -> Result<Option<Service>, ObjectProblem> {
    let meta = &k.metadata;
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let what = object_name("service", &ns, &name);
    let spec = k.spec.as_ref().ok_or_else(|| problem(&what, "no spec"))?;
    let Some(vip_text) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    else {
        return Ok(None);
    };
    let vip = vip_text.parse::<IpAddr>().map_err(|e| {
        problem(
            &what,
            format!("spec.clusterIP {}: {e}", Shown::new(vip_text)),
        )
    })?;
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| problem(&what, format!("port {}: not a port", p.port)))?;
        let target_port = match &p.target_port {
            None => port,
            Some(IntOrString::Int(t)) => {
                u16::try_from(*t).ok().filter(|p| *p != 0).ok_or_else(|| {
                    problem(&what, format!("port {port}: targetPort {t}: not a port"))
                })?
            }
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(t) if t != 0 => t,
                _ => {
                    tracing::debug!(service = %what, port, target = %Shown::new(s), "named targetPort: using the service port");
                    port
                }
            },
        };
        ports.push(ServicePort { port, target_port });
    }
    if ports.is_empty() {
        return Err(problem(&what, "no TCP ports"));
    }
    Ok(Some(Service {
        namespace: ns,
        name,
        vip,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
    }))
}

/// One ready endpoint of a Service, from its EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub node: Option<String>,
    /// The pod behind it, `(namespace, name)`.
    pub pod: Option<(String, String)>,
}

/// The Service an EndpointSlice belongs to, `(namespace, name)`, and its
/// ready endpoints.
pub fn endpoints(k: &EndpointSlice) -> Result<((String, String), Vec<Endpoint>), ObjectProblem> {
    let ns = k.metadata.namespace.clone().unwrap_or_default();
    let name = k.metadata.name.clone().unwrap_or_default();
    let what = object_name("endpointslice", &ns, &name);
    let service = k
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .cloned()
        .ok_or_else(|| problem(&what, "no kubernetes.io/service-name label"))?;
    let mut out = Vec::new();
    for e in &k.endpoints {
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        for a in &e.addresses {
            let ip = a
                .parse::<IpAddr>()
                .map_err(|err| problem(&what, format!("address {}: {err}", Shown::new(a))))?;
            out.push(Endpoint {
                ip,
                node: e.node_name.clone(),
                pod: e
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref() == Some("Pod"))
                    .and_then(|t| {
                        Some((
                            t.namespace.clone().unwrap_or_else(|| ns.clone()),
                            t.name.clone()?,
                        ))
                    }),
            });
        }
    }
    Ok(((ns, service), out))
}

/// An AuthorizationPolicy object (sockmesh's or Istio's), as JSON from the
/// API, through mesh-core's strict parser. Server metadata (uid,
/// managedFields, ...) is dropped first; everything else must be valid.
pub fn policy(object: &serde_json::Value) -> Result<AuthorizationPolicy, ObjectProblem> {
    let ns = object
        .pointer("/metadata/namespace")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let name = object
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let what = object_name("authorizationpolicy", ns, name);
    let mut doc = serde_json::Map::new();
    for key in ["apiVersion", "kind", "spec"] {
        if let Some(v) = object.get(key) {
            doc.insert(key.into(), v.clone());
        }
    }
    doc.insert(
        "metadata".into(),
        serde_json::json!({"name": name, "namespace": ns}),
    );
    let text = serde_json::to_string(&doc).map_err(|e| problem(&what, e.to_string()))?;
    let mut parsed =
        mesh_core::policy::parse_policies(&text).map_err(|e| problem(&what, e.to_string()))?;
    match (parsed.pop(), parsed.is_empty()) {
        (Some(p), true) => Ok(p),
        _ => Err(problem(&what, "not exactly one policy")),
    }
}

/// Fuzz entry: any bytes, as a JSON Pod, Service, EndpointSlice or policy,
/// mapped to mesh-core types. Never panics; a problem's message must pass
/// [`mesh_core::display::check_message`]: at most [`MAX_ERROR_LEN`] bytes,
/// no control character, values escaped once.
pub fn fuzz_parse(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // Values shown are decoded JSON strings: every escape that makes a
    // backslash starts with one.
    let input_run = data.iter().filter(|b| **b == b'\\').count();
    let check = |e: ObjectProblem| {
        if let Err(why) =
            mesh_core::display::check_message(&e.to_string(), MAX_ERROR_LEN, input_run)
        {
            panic!("{:?}: {why}", String::from_utf8_lossy(data));
        }
    };
    let result = match value.get("kind").and_then(|k| k.as_str()) {
        Some("Pod") => match serde_json::from_value::<K8sPod>(value) {
            Ok(p) => pod(&p, None, &Components::default()).err(),
            Err(_) => None,
        },
        Some("Service") => match serde_json::from_value::<K8sService>(value) {
            Ok(s) => service(&s).err(),
            Err(_) => None,
        },
        Some("EndpointSlice") => match serde_json::from_value::<EndpointSlice>(value) {
            Ok(s) => endpoints(&s).err(),
            Err(_) => None,
        },
        _ => policy(&value).err(),
    };
    if let Some(e) = result {
        check(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's body (`fuzz/fuzz_targets/kube_objects.rs`) over
    /// its seeds: one valid object of each kind among them.
    #[test]
    fn the_fuzz_body_holds_over_its_seeds() {
        let seeds = mesh_core::display::fuzz_seeds("kube_objects");
        for seed in &seeds {
            fuzz_parse(seed);
        }
    }

    /// A finding of the fuzz target: names and addresses were shown raw,
    /// so a control character forged a log line and a long value had no
    /// bound.
    #[test]
    fn ten_kib_of_control_characters_give_a_bounded_problem() {
        let junk = "\u{1}\n\u{9f}".repeat(10 * 1024 / 3);
        let objects = [
            serde_json::json!({"kind": "Pod", "metadata": {"namespace": junk, "name": junk}}),
            serde_json::json!({"kind": "Pod",
                "metadata": {"namespace": "default", "name": "web-1", "uid": "u"},
                "spec": {"nodeName": "n1", "containers": []},
                "status": {"podIPs": [{"ip": junk}]}}),
            serde_json::json!({"kind": "Service", "metadata": {"namespace": "shop", "name": junk},
                "spec": {"clusterIP": junk}}),
            serde_json::json!({"kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"namespace": junk, "name": "cart-x",
                    "labels": {"kubernetes.io/service-name": "cart"}},
                "endpoints": [{"addresses": [junk]}]}),
            serde_json::json!({"kind": "AuthorizationPolicy",
                "apiVersion": "security.sockmesh.io/v1",
                "metadata": {"namespace": junk, "name": junk}, "spec": {"rulez": []}}),
        ];
        for o in objects {
            let bytes = serde_json::to_vec(&o).unwrap_or_default();
            fuzz_parse(&bytes);
            let e = match o["kind"].as_str() {
                Some("Pod") => pod(
                    &serde_json::from_value(o.clone()).unwrap_or_default(),
                    None,
                    &Components::default(),
                )
                .err(),
                Some("Service") => {
                    service(&serde_json::from_value(o.clone()).unwrap_or_default()).err()
                }
                Some("EndpointSlice") => serde_json::from_value(o.clone())
                    .ok()
                    .and_then(|s| endpoints(&s).err()),
                _ => policy(&o).err(),
            };
            let msg = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(!msg.is_empty(), "{o} is refused");
            assert!(msg.len() <= MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
            assert!(
                msg.contains("… ("),
                "the value is cut, with its size: {msg}"
            );
            assert_eq!(
                mesh_core::display::check_message(&msg, MAX_ERROR_LEN, 0),
                Ok(())
            );
        }
    }

    #[test]
    fn real_names_are_shown_as_they_are() {
        assert_eq!(
            object_name("pod", "default", "web-1.v2"),
            "pod default/web-1.v2"
        );
        assert_eq!(object_name("pod", "", "Web 1"), r#"pod /"Web 1""#);
    }
}
