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
use mesh_core::opt_in::{self, MESH_KEY, OptInFacts};
use mesh_core::policy::AuthorizationPolicy;
use mesh_core::registry::{Pod, Service, ServicePort, WorkloadRef};

/// Why an object was skipped. Names the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {reason}")]
pub struct ObjectProblem {
    /// `pod default/web-1`, `service shop/cart`, `authorizationpolicy ns/name`.
    pub object: String,
    pub reason: String,
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

/// A Pod as the mesh sees it, or why it is skipped (no node yet, no IP
/// yet, finished, a bad address). `namespace` is the pod's Namespace when
/// the registry has it (its labels carry the namespace opt-in).
pub fn pod(
    k: &K8sPod,
    namespace: Option<&Namespace>,
    components: &Components,
) -> Result<Pod, ObjectProblem> {
    let meta = &k.metadata;
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let what = format!("pod {ns}/{name}");
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
    if raw_ips.is_empty() {
        return Err(problem(&what, "no IP yet (status.podIPs is empty)"));
    }
    let ips = raw_ips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|e| problem(&what, format!("status.podIPs {ip:?}: {e}")))
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
    let what = format!("service {ns}/{name}");
    let spec = k.spec.as_ref().ok_or_else(|| problem(&what, "no spec"))?;
    let Some(vip_text) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    else {
        return Ok(None);
    };
    let vip = vip_text
        .parse::<IpAddr>()
        .map_err(|e| problem(&what, format!("spec.clusterIP {vip_text:?}: {e}")))?;
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
                    tracing::debug!(service = %what, port, target = %s, "named targetPort: using the service port");
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
    let what = format!("endpointslice {ns}/{name}");
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
                .map_err(|err| problem(&what, format!("address {a:?}: {err}")))?;
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
    let what = format!("authorizationpolicy {ns}/{name}");
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
/// mapped to mesh-core types. Never panics; errors are bounded (they
/// name the object and quote values through mesh-core's display rules).
pub fn fuzz_parse(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match value.get("kind").and_then(|k| k.as_str()) {
        Some("Pod") => {
            if let Ok(p) = serde_json::from_value::<K8sPod>(value) {
                let _ = pod(&p, None, &Components::default());
            }
        }
        Some("Service") => {
            if let Ok(s) = serde_json::from_value::<K8sService>(value) {
                let _ = service(&s);
            }
        }
        Some("EndpointSlice") => {
            if let Ok(s) = serde_json::from_value::<EndpointSlice>(value) {
                let _ = endpoints(&s);
            }
        }
        _ => {
            let _ = policy(&value);
        }
    }
}
