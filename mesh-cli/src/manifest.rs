//! `mesh manifest`: every Kubernetes object sockmesh installs, built from
//! the k8s-openapi types (and the CRDs from `CustomResourceExt::crd()`), so
//! the YAML in `deploy/` and what `mesh install` applies are one thing.
//!
//! Decisions a reviewer should find here, each beside the code it shapes:
//! - the node DaemonSet runs in the host network and not in the host PID
//!   namespace ([`node_daemonset`]);
//! - it is not `privileged`: it gets the capabilities its eBPF and netns
//!   work needs, and bpffs and cgroup2 as hostPath mounts;
//! - the CNI installer is a native sidecar (an init container with
//!   `restartPolicy: Always`), so it is in place before the proxy starts and
//!   keeps the conflist entry until the pod stops.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
    RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, KeyToPath, Namespace, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServiceAccount,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec, TCPSocketAction, Toleration, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{CustomResource, CustomResourceExt, Resource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The label every object sockmesh installs carries: `mesh uninstall`
/// finds them by it, and the registry leaves pods with it out of the mesh.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "sockmesh");
/// The field manager of `mesh install`'s server-side apply.
pub const FIELD_MANAGER: &str = "sockmesh";

const PROXY_SA: &str = "mesh-proxy";
const CA_SA: &str = "mesh-ca";
const CA_NAME: &str = "mesh-ca";
const PROXY_NAME: &str = "mesh-node";
const ROOT_SECRET: &str = "sockmesh-ca-root";
/// The ConfigMap the CA's leader publishes the trust bundle in (key
/// `ca.crt`, root certificates only); the DaemonSet mounts it.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "sockmesh-trust-bundle";
const CA_AUDIENCE: &str = "sockmesh-ca";

/// What `mesh manifest` and `mesh install` build the objects from.
#[derive(Debug, Clone)]
pub struct Options {
    pub namespace: String,
    /// `REGISTRY/sockmesh` : images are `<prefix>/mesh-proxy:<tag>`, ...
    pub image_prefix: String,
    pub tag: String,
    pub trust_domain: String,
    /// Also a `monitoring.coreos.com/v1` ServiceMonitor (needs the
    /// Prometheus operator's CRD in the cluster).
    pub service_monitor: bool,
    pub cni_bin_dir: String,
    pub cni_conf_dir: String,
    /// Passed to `mesh-proxy --cgroup`: `kubelet` (found from the kubelet's
    /// layout under the host's cgroup2 mount) or a path under it.
    pub cgroup: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: "sockmesh-system".into(),
            image_prefix: "localhost/sockmesh".into(),
            tag: env!("CARGO_PKG_VERSION").into(),
            trust_domain: "cluster.local".into(),
            service_monitor: false,
            cni_bin_dir: "/opt/cni/bin".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            cgroup: "kubelet".into(),
        }
    }
}

impl Options {
    fn image(&self, name: &str) -> String {
        format!("{}/{name}:{}", self.image_prefix, self.tag)
    }
}

/// The Prometheus operator's ServiceMonitor, only the fields sockmesh sets
/// (the operator's CRD is not sockmesh's; `crd()` of this type is unused).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "ServiceMonitor",
    plural = "servicemonitors",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    pub selector: SelectorLabels,
    pub endpoints: Vec<MonitorEndpoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectorLabels {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitorEndpoint {
    pub port: String,
    pub path: String,
    pub interval: String,
}

/// One object to apply, with the comment printed above it in the YAML.
#[derive(Debug, Clone)]
pub struct Object {
    pub comment: String,
    pub api_resource: ApiResource,
    pub namespaced: bool,
    pub value: serde_json::Value,
}

impl Object {
    fn new<K>(comment: &str, obj: &K) -> Result<Self>
    where
        K: Resource<DynamicType = ()> + Serialize,
        K::Scope: ScopeOf,
    {
        let mut value = serde_json::to_value(obj).context("serialize a manifest object")?;
        // k8s-openapi's Serialize writes apiVersion and kind itself; the
        // CRD-derived types too. Make sure either way.
        value["apiVersion"] = K::api_version(&()).into_owned().into();
        value["kind"] = K::kind(&()).into_owned().into();
        Ok(Object {
            comment: comment.to_owned(),
            api_resource: ApiResource::erase::<K>(&()),
            namespaced: K::Scope::NAMESPACED,
            value,
        })
    }

    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    pub fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }

    /// `DaemonSet sockmesh-system/mesh-node`, `ClusterRole sockmesh-proxy`.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.api_resource.kind, self.name()),
            None => format!("{} {}", self.api_resource.kind, self.name()),
        }
    }

    pub fn is_crd(&self) -> bool {
        self.api_resource.kind == "CustomResourceDefinition"
    }

    pub fn dynamic(&self) -> Result<DynamicObject> {
        serde_json::from_value(self.value.clone())
            .with_context(|| format!("{} as a dynamic object", self.describe()))
    }
}

/// Namespaced or not, from kube's scope marker types.
pub trait ScopeOf {
    const NAMESPACED: bool;
}
impl ScopeOf for k8s_openapi::NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl ScopeOf for k8s_openapi::ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// Checks of checkov (the manifest scanner `./x test` runs on deploy/) that
/// an object is exempt from, each with its reason: set as checkov's
/// `checkov.io/skipN` annotations, and printed as YAML comments above it.
fn skip_checks(skips: &[(&str, &str)]) -> BTreeMap<String, String> {
    skips
        .iter()
        .enumerate()
        .map(|(i, (id, why))| (format!("checkov.io/skip{}", i + 1), format!("{id}={why}")))
        .collect()
}

/// The reasons every workload shares.
const SKIP_DIGEST: (&str, &str) = (
    "CKV_K8S_43",
    "images are pinned by their release tag; digests exist only once the images are built (./x image prints them), so a digest-pinned manifest is made at release time",
);
const SKIP_PULL_ALWAYS: (&str, &str) = (
    "CKV_K8S_15",
    "IfNotPresent so that nodes with preloaded images (air-gapped, ctr import) work; the tag changes with every release",
);
const SKIP_TOKEN: (&str, &str) = (
    "CKV_K8S_38",
    "the pod talks to the Kubernetes API (watches, TokenReview, status annotations), so it needs its service account token",
);

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (PART_OF.0.to_owned(), PART_OF.1.to_owned()),
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
    ])
}

fn selector_labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".to_owned(), component.to_owned())])
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(v(groups)),
        resources: Some(v(resources)),
        verbs: v(verbs),
        ..Default::default()
    }
}

fn sa_subject(name: &str, namespace: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(namespace.into()),
        ..Default::default()
    }
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: name.into(),
    }
}

fn quantities(cpu: &str, memory: &str) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_owned(), Quantity(cpu.to_owned())),
        ("memory".to_owned(), Quantity(memory.to_owned())),
    ])
}

fn resources(req: (&str, &str), limit: (&str, &str)) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(quantities(req.0, req.1)),
        limits: Some(quantities(limit.0, limit.1)),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn host_path(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(kind.into()),
        }),
        ..Default::default()
    }
}

/// Drop every capability, add back `add`; no privilege escalation, a
/// read-only root, the runtime's seccomp profile.
fn locked_down(add: &[&str], user: Option<i64>) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: user.map(|u| u != 0),
        run_as_user: user,
        run_as_group: user,
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: (!add.is_empty()).then(|| add.iter().map(|c| (*c).to_owned()).collect()),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// Every object, in apply order (namespace and CRDs first, workloads last).
pub fn objects(o: &Options) -> Result<Vec<Object>> {
    let ns = o.namespace.as_str();
    let mut out = vec![
        Object::new(
            "The mesh's namespace. Pod Security `privileged`: the node DaemonSet needs host paths and capabilities (see its comment); the CA in it runs restricted anyway.",
            &Namespace {
                metadata: ObjectMeta {
                    labels: Some({
                        let mut l = labels("sockmesh");
                        l.insert(
                            "pod-security.kubernetes.io/enforce".into(),
                            "privileged".into(),
                        );
                        l
                    }),
                    ..meta(ns, None, "sockmesh")
                },
                ..Default::default()
            },
        )?,
        Object::new(
            "sockmesh's policy resource (the OpenAPI schema is generated from mesh-kube's Rust type).",
            &{
                let mut crd = mesh_kube::crd::AuthorizationPolicy::crd();
                crd.metadata.labels = Some(labels("sockmesh"));
                crd
            },
        )?,
        Object::new(
            "The node proxy's identity (TokenReview checks its projected token at the CA).",
            &ServiceAccount {
                metadata: meta(PROXY_SA, Some(ns), PROXY_NAME),
                ..Default::default()
            },
        )?,
        Object::new(
            "The CA's identity.",
            &ServiceAccount {
                metadata: meta(CA_SA, Some(ns), CA_NAME),
                ..Default::default()
            },
        )?,
        Object::new(
            "What a node proxy reads (its registry: pods, namespaces, services, endpoint slices, both policy groups) and writes (the status annotation on its node's pods; Events).",
            &ClusterRole {
                metadata: meta("sockmesh-proxy", None, PROXY_NAME),
                rules: Some(vec![
                    rule(
                        &[""],
                        &["pods", "namespaces", "services"],
                        &["list", "watch"],
                    ),
                    rule(
                        &["discovery.k8s.io"],
                        &["endpointslices"],
                        &["list", "watch"],
                    ),
                    rule(
                        &["security.sockmesh.io", "security.istio.io"],
                        &["authorizationpolicies"],
                        &["list", "watch"],
                    ),
                    // patch: the status annotation; get: its own pod's
                    // owner when it stops (uninstall or restart?).
                    rule(&[""], &["pods"], &["get", "patch"]),
                    rule(&[""], &["events"], &["create"]),
                ]),
                ..Default::default()
            },
        )?,
        Object::new(
            "",
            &ClusterRoleBinding {
                metadata: meta("sockmesh-proxy", None, PROXY_NAME),
                role_ref: role_ref("ClusterRole", "sockmesh-proxy"),
                subjects: Some(vec![sa_subject(PROXY_SA, ns)]),
            },
        )?,
        Object::new(
            "A stopping node proxy reads its own DaemonSet: gone means `mesh uninstall`, and it removes its eBPF pins; there means a restart, and it keeps them.",
            &Role {
                metadata: meta("sockmesh-proxy", Some(ns), PROXY_NAME),
                rules: Some(vec![PolicyRule {
                    resource_names: Some(vec![PROXY_NAME.into()]),
                    ..rule(&["apps"], &["daemonsets"], &["get"])
                }]),
            },
        )?,
        Object::new(
            "",
            &RoleBinding {
                metadata: meta("sockmesh-proxy", Some(ns), PROXY_NAME),
                role_ref: role_ref("Role", "sockmesh-proxy"),
                subjects: Some(vec![sa_subject(PROXY_SA, ns)]),
            },
        )?,
        Object::new(
            "What the CA needs cluster-wide: review the proxies' tokens; read pods (a certificate is issued only for a pod on the asking proxy's node) and the namespaces, services and slices its registry watches.",
            &ClusterRole {
                metadata: meta("sockmesh-ca", None, CA_NAME),
                rules: Some(vec![
                    rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                    rule(&[""], &["pods"], &["get", "list", "watch"]),
                    // Its registry (KubeConfig::for_ca) watches these too.
                    rule(&[""], &["namespaces", "services"], &["list", "watch"]),
                    rule(
                        &["discovery.k8s.io"],
                        &["endpointslices"],
                        &["list", "watch"],
                    ),
                ]),
                ..Default::default()
            },
        )?,
        Object::new(
            "",
            &ClusterRoleBinding {
                metadata: meta("sockmesh-ca", None, CA_NAME),
                role_ref: role_ref("ClusterRole", "sockmesh-ca"),
                subjects: Some(vec![sa_subject(CA_SA, ns)]),
            },
        )?,
        Object::new(
            "What the CA needs in its own namespace only: the root Secret (read; created once by the leader), the trust bundle ConfigMap (root certificates only, published by the leader for the node proxies) and the leader Lease. get and patch are limited to those names; create is not and cannot be: RBAC authorizes a create before the object's name is known, so resourceNames never match it.",
            &Role {
                metadata: meta("sockmesh-ca", Some(ns), CA_NAME),
                rules: Some(vec![
                    PolicyRule {
                        resource_names: Some(vec![ROOT_SECRET.into()]),
                        ..rule(&[""], &["secrets"], &["get"])
                    },
                    // `create` cannot be narrowed by name in RBAC: the
                    // name is in the request body, not in the URL the
                    // authorizer sees, so resourceNames never match it.
                    rule(&[""], &["secrets"], &["create"]),
                    PolicyRule {
                        resource_names: Some(vec![TRUST_BUNDLE_CONFIGMAP.into()]),
                        ..rule(&[""], &["configmaps"], &["get", "patch"])
                    },
                    // Same: `create` of the ConfigMap, by any name.
                    rule(&[""], &["configmaps"], &["create"]),
                    rule(
                        &["coordination.k8s.io"],
                        &["leases"],
                        &["get", "create", "update"],
                    ),
                ]),
            },
        )?,
        Object::new(
            "",
            &RoleBinding {
                metadata: meta("sockmesh-ca", Some(ns), CA_NAME),
                role_ref: role_ref("Role", "sockmesh-ca"),
                subjects: Some(vec![sa_subject(CA_SA, ns)]),
            },
        )?,
        Object::new("", &ca_deployment(o))?,
        Object::new(
            "The CA's signing port (the proxies reach it by its DNS name, mesh-ca.<namespace>.svc:15012) and its metrics.",
            &Service {
                metadata: meta(CA_NAME, Some(ns), CA_NAME),
                spec: Some(ServiceSpec {
                    selector: Some(selector_labels(CA_NAME)),
                    ports: Some(vec![
                        service_port("grpc-ca", 15012),
                        service_port("http-metrics", 15014),
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )?,
        Object::new(
            "One CA replica stays through voluntary disruptions (node drains): a proxy renews certificates hours before they expire, but new pods need the CA at once.",
            &PodDisruptionBudget {
                metadata: meta(CA_NAME, Some(ns), CA_NAME),
                spec: Some(PodDisruptionBudgetSpec {
                    min_available: Some(IntOrString::Int(1)),
                    selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(CA_NAME)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )?,
        Object::new(NODE_COMMENT, &node_daemonset(o))?,
        Object::new(
            "The node proxies' Prometheus metrics (Istio names), one endpoint per node; headless, for scraping only.",
            &Service {
                metadata: meta("mesh-node-metrics", Some(ns), PROXY_NAME),
                spec: Some(ServiceSpec {
                    cluster_ip: Some("None".into()),
                    selector: Some(selector_labels(PROXY_NAME)),
                    ports: Some(vec![service_port("http-metrics", 15020)]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )?,
    ];
    out.push(Object::new(
        "The CA accepts its signing port and metrics only, and reaches out to DNS and the API server only.",
        &network_policy(
            CA_NAME,
            ns,
            &[15012, 15014],
            Some(&[(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")]),
        ),
    )?);
    out.push(Object::new(
        "Readiness and metrics only. The node proxy runs in the host network, where most NetworkPolicy implementations do not apply: this states the intent and holds where they do.",
        &network_policy(PROXY_NAME, ns, &[15020, 15021], None),
    )?);
    if o.service_monitor {
        let mut sm = ServiceMonitor::new(
            PROXY_NAME,
            ServiceMonitorSpec {
                selector: SelectorLabels {
                    match_labels: selector_labels(PROXY_NAME),
                },
                endpoints: vec![MonitorEndpoint {
                    port: "http-metrics".into(),
                    path: "/metrics".into(),
                    interval: "15s".into(),
                }],
            },
        );
        sm.metadata.namespace = Some(ns.into());
        sm.metadata.labels = Some(labels(PROXY_NAME));
        out.push(Object::new(
            "Prometheus operator: scrape every node proxy (mesh manifest --service-monitor).",
            &sm,
        )?);
    }
    Ok(out)
}

/// Ingress to `ports` from anywhere; egress to `egress` ports only (None:
/// egress unrestricted).
fn network_policy(
    component: &str,
    ns: &str,
    ports: &[i32],
    egress: Option<&[(i32, &str)]>,
) -> NetworkPolicy {
    let np = |port: i32, proto: &str| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some(proto.into()),
        ..Default::default()
    };
    let mut types = vec!["Ingress".to_owned()];
    if egress.is_some() {
        types.push("Egress".to_owned());
    }
    NetworkPolicy {
        metadata: meta(component, Some(ns), component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(component)),
                ..Default::default()
            }),
            ingress: Some(vec![NetworkPolicyIngressRule {
                ports: Some(ports.iter().map(|p| np(*p, "TCP")).collect()),
                ..Default::default()
            }]),
            egress: egress.map(|e| {
                vec![NetworkPolicyEgressRule {
                    ports: Some(e.iter().map(|(p, proto)| np(*p, proto)).collect()),
                    ..Default::default()
                }]
            }),
            policy_types: Some(types),
        }),
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn ca_deployment(o: &Options) -> Deployment {
    let ns = o.namespace.as_str();
    let args = [
        "cluster",
        "--trust-domain",
        &o.trust_domain,
        "--proxy-service-account",
        PROXY_SA,
        "--audience",
        CA_AUDIENCE,
        "--root-secret",
        ROOT_SECRET,
        "--trust-bundle-configmap",
        TRUST_BUNDLE_CONFIGMAP,
        "--work-dir",
        "/var/run/sockmesh-ca",
        "--listen",
        "0.0.0.0:15012",
        "--metrics-listen",
        "0.0.0.0:15014",
        "--server-name",
        &format!("{CA_NAME}.{ns}.svc"),
        "--server-name",
        CA_NAME,
    ];
    Deployment {
        metadata: ObjectMeta {
            annotations: Some(skip_checks(&[SKIP_DIGEST, SKIP_PULL_ALWAYS, SKIP_TOKEN])),
            ..meta(CA_NAME, Some(ns), CA_NAME)
        },
        spec: Some(DeploymentSpec {
            // Two replicas; the Lease picks the one that may create the root.
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(selector_labels(CA_NAME)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(CA_NAME)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(CA_SA.into()),
                    priority_class_name: Some("system-cluster-critical".into()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![Container {
                        name: CA_NAME.into(),
                        image: Some(o.image("mesh-ca")),
                        image_pull_policy: Some("IfNotPresent".into()),
                        args: Some(args.iter().map(|a| (*a).to_owned()).collect()),
                        env: Some(vec![
                            field_env("POD_NAME", "metadata.name"),
                            field_env("POD_NAMESPACE", "metadata.namespace"),
                        ]),
                        ports: Some(vec![port("grpc-ca", 15012), port("http-metrics", 15014)]),
                        readiness_probe: Some(Probe {
                            tcp_socket: Some(TCPSocketAction {
                                port: IntOrString::Int(15012),
                                ..Default::default()
                            }),
                            period_seconds: Some(5),
                            ..Default::default()
                        }),
                        liveness_probe: Some(Probe {
                            http_get: Some(HTTPGetAction {
                                path: Some("/metrics".into()),
                                port: IntOrString::Int(15014),
                                ..Default::default()
                            }),
                            period_seconds: Some(10),
                            failure_threshold: Some(6),
                            ..Default::default()
                        }),
                        resources: Some(resources(("50m", "64Mi"), ("1", "256Mi"))),
                        security_context: Some(locked_down(&[], Some(10001))),
                        volume_mounts: Some(vec![mount("work", "/var/run/sockmesh-ca", false)]),
                        ..Default::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: "work".into(),
                        empty_dir: Some(Default::default()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The node DaemonSet's YAML comment (the reasons in [`node_daemonset`]).
pub const NODE_COMMENT: &str = "The node proxy, one per node. hostNetwork: true, because mesh-cni refuses new pods while the node proxy is down (fail closed), so the proxy itself must not need the CNI chain to start; hostPID: false, because pods' network namespaces come from the CNI plugin as paths under /var/run/netns, not from host PIDs. Not privileged: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (load and attach eBPF), CAP_SYS_ADMIN (setns into pods' netns), CAP_SYS_RESOURCE (memlock on kernels before 5.11); bpffs and the host cgroup2 tree are hostPath mounts. Pins live on the host's bpffs, so a rolling update (one node at a time, no surge) hands them to the next proxy.";

fn node_daemonset(o: &Options) -> DaemonSet {
    let ns = o.namespace.as_str();
    // hostNetwork: true. mesh-cni fails closed: while a node's proxy is not
    // serving, new pods on that node are refused. A proxy pod in the pod
    // network would itself need the CNI chain to start: a deadlock on every
    // node restart. In the host network it starts first; its listeners for
    // meshed pods are opened inside each pod's netns, so the host network
    // carries only its readiness (15021), metrics (15020) and its calls to
    // the API server and the CA.
    //
    // hostPID: false. The proxy enters pods' network namespaces through the
    // netns paths the CNI plugin hands over (/var/run/netns, mounted with
    // HostToContainer propagation), never through /proc/<pid> of the host,
    // so it has no need to see the host's processes.
    let proxy_args = vec![
        "--registry-source".to_owned(),
        "kubernetes".to_owned(),
        "--node".to_owned(),
        "$(NODE_NAME)".to_owned(),
        "--pod-name".to_owned(),
        "$(POD_NAME)".to_owned(),
        "--pod-namespace".to_owned(),
        "$(POD_NAMESPACE)".to_owned(),
        "--trust-domain".to_owned(),
        o.trust_domain.clone(),
        // The Service's DNS name, resolved at each connect (the
        // ClusterFirstWithHostNet DNS policy below makes it resolvable in
        // the host network): right in IPv4, IPv6 and dual-stack clusters,
        // where $(MESH_CA_SERVICE_HOST) is a bare IPv6 address in v6.
        "--ca".to_owned(),
        format!("{CA_NAME}.{ns}.svc:15012"),
        "--ca-server-name".to_owned(),
        format!("{CA_NAME}.{ns}.svc"),
        "--ca-bundle".to_owned(),
        "/var/run/secrets/sockmesh/ca/ca.crt".to_owned(),
        "--token-file".to_owned(),
        "/var/run/secrets/sockmesh/token/token".to_owned(),
        "--cgroup".to_owned(),
        o.cgroup.clone(),
        "--cgroup-root".to_owned(),
        "/host/sys/fs/cgroup".to_owned(),
        "--pin-root".to_owned(),
        "/sys/fs/bpf/sockmesh".to_owned(),
        "--cni-socket".to_owned(),
        "/var/run/sockmesh/cni.sock".to_owned(),
        "--metrics-state".to_owned(),
        "/var/lib/sockmesh/metrics-state.json".to_owned(),
    ];
    let cni_args = vec![
        "install".to_owned(),
        "--watch".to_owned(),
        "--bin-dir".to_owned(),
        "/host/opt/cni/bin".to_owned(),
        "--conf-dir".to_owned(),
        "/host/etc/cni/net.d".to_owned(),
        "--socket".to_owned(),
        "/var/run/sockmesh/cni.sock".to_owned(),
    ];
    let env = vec![
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    DaemonSet {
        metadata: ObjectMeta {
            annotations: Some(skip_checks(&[
                SKIP_DIGEST,
                SKIP_PULL_ALWAYS,
                SKIP_TOKEN,
                (
                    "CKV_K8S_19",
                    "hostNetwork: mesh-cni refuses pods while the node proxy is down, so the proxy must start without the CNI chain (see the comment above)",
                ),
                (
                    "CKV_K8S_25",
                    "the proxy adds BPF, NET_ADMIN, PERFMON, SYS_ADMIN, SYS_RESOURCE, after dropping ALL: what loading eBPF, attaching it to cgroups and entering pods' netns take",
                ),
                (
                    "CKV_K8S_39",
                    "CAP_SYS_ADMIN: setns(2) into a pod's network namespace requires it; privileged: false all the same",
                ),
                (
                    "CKV_K8S_23",
                    "the proxy and the CNI installer run as uid 0: capabilities of a non-root process are lost at exec without file capabilities, and the installer writes root-owned host CNI dirs",
                ),
                ("CKV_K8S_40", "uid 0, for the same reason as CKV_K8S_23"),
            ])),
            ..meta(PROXY_NAME, Some(ns), PROXY_NAME)
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(PROXY_NAME)),
                ..Default::default()
            },
            // One node at a time and no surge: two proxies on one node
            // would fight over the same pins and ports. The pins stay on
            // the host's bpffs, so the meshed pods keep their redirect (and
            // fail closed) while the proxy is replaced.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    max_surge: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(PROXY_NAME)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(PROXY_SA.into()),
                    host_network: Some(true),
                    host_pid: Some(false),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    priority_class_name: Some("system-node-critical".into()),
                    termination_grace_period_seconds: Some(30),
                    // Every node, whatever its taints: a node without its
                    // proxy refuses every meshed pod.
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }]),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    init_containers: Some(vec![Container {
                        // A native sidecar: started (and its entry written)
                        // before the proxy; on SIGTERM it removes the entry.
                        name: "mesh-cni".into(),
                        image: Some(o.image("mesh-cni")),
                        image_pull_policy: Some("IfNotPresent".into()),
                        restart_policy: Some("Always".into()),
                        args: Some(cni_args),
                        resources: Some(resources(("10m", "16Mi"), ("100m", "64Mi"))),
                        // Root (the CNI dirs are root's); no capability.
                        security_context: Some(locked_down(&[], Some(0))),
                        volume_mounts: Some(vec![
                            mount("cni-bin", "/host/opt/cni/bin", false),
                            mount("cni-conf", "/host/etc/cni/net.d", false),
                        ]),
                        ..Default::default()
                    }]),
                    containers: vec![Container {
                        name: "mesh-proxy".into(),
                        image: Some(o.image("mesh-proxy")),
                        image_pull_policy: Some("IfNotPresent".into()),
                        args: Some(proxy_args),
                        env: Some(env),
                        ports: Some(vec![port("http-metrics", 15020), port("http-ready", 15021)]),
                        readiness_probe: Some(http_probe("/healthz/ready", 15021)),
                        // Alive = its readiness port accepts (not ready
                        // = not yet synced or draining, which is no reason
                        // to restart it).
                        liveness_probe: Some(Probe {
                            tcp_socket: Some(TCPSocketAction {
                                port: IntOrString::Int(15021),
                                ..Default::default()
                            }),
                            initial_delay_seconds: Some(10),
                            period_seconds: Some(10),
                            failure_threshold: Some(6),
                            ..Default::default()
                        }),
                        resources: Some(resources(("100m", "128Mi"), ("2", "1Gi"))),
                        security_context: Some(locked_down(
                            &["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"],
                            Some(0),
                        )),
                        volume_mounts: Some(vec![
                            VolumeMount {
                                mount_propagation: Some("HostToContainer".into()),
                                ..mount("bpffs", "/sys/fs/bpf", false)
                            },
                            mount("cgroup2", "/host/sys/fs/cgroup", true),
                            VolumeMount {
                                mount_propagation: Some("HostToContainer".into()),
                                ..mount("netns", "/var/run/netns", true)
                            },
                            mount("run", "/var/run/sockmesh", false),
                            mount("state", "/var/lib/sockmesh", false),
                            mount("ca-bundle", "/var/run/secrets/sockmesh/ca", true),
                            mount("ca-token", "/var/run/secrets/sockmesh/token", true),
                        ]),
                        ..Default::default()
                    }],
                    volumes: Some(vec![
                        host_path("bpffs", "/sys/fs/bpf", "Directory"),
                        host_path("cgroup2", "/sys/fs/cgroup", "Directory"),
                        host_path("netns", "/var/run/netns", "DirectoryOrCreate"),
                        host_path("run", "/var/run/sockmesh", "DirectoryOrCreate"),
                        host_path("state", "/var/lib/sockmesh", "DirectoryOrCreate"),
                        host_path("cni-bin", &o.cni_bin_dir, "DirectoryOrCreate"),
                        host_path("cni-conf", &o.cni_conf_dir, "DirectoryOrCreate"),
                        Volume {
                            // The trust bundle the CA's leader publishes:
                            // root certificates only. Not the root Secret,
                            // even with items: [ca.crt]: to mount a Secret
                            // the kubelet fetches all of it, key included,
                            // on every node. Not optional: the proxy waits
                            // for the CA's first bundle.
                            name: "ca-bundle".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: TRUST_BUNDLE_CONFIGMAP.into(),
                                items: Some(vec![KeyToPath {
                                    key: "ca.crt".into(),
                                    path: "ca.crt".into(),
                                    ..Default::default()
                                }]),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "ca-token".into(),
                            projected: Some(ProjectedVolumeSource {
                                sources: Some(vec![VolumeProjection {
                                    service_account_token: Some(ServiceAccountTokenProjection {
                                        audience: Some(CA_AUDIENCE.into()),
                                        expiration_seconds: Some(3600),
                                        path: "token".into(),
                                    }),
                                    ..Default::default()
                                }]),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The objects as one YAML stream, each with its comment above it.
pub fn to_yaml(objects: &[Object]) -> Result<String> {
    let mut out = String::from(
        "# sockmesh: generated by `mesh manifest` from the Rust types (mesh-cli/src/manifest.rs).\n\
         # Do not edit: regenerate with `cargo run -q -p mesh-cli -- manifest > deploy/sockmesh.yaml`.\n",
    );
    for obj in objects {
        out.push_str("---\n");
        if !obj.comment.is_empty() {
            for line in wrap(&obj.comment, 78) {
                out.push_str("# ");
                out.push_str(&line);
                out.push('\n');
            }
        }
        let skips = obj.value["metadata"]["annotations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("checkov.io/skip"))
            .filter_map(|(_, v)| v.as_str());
        for skip in skips {
            let (id, why) = skip.split_once('=').unwrap_or((skip, ""));
            for (i, line) in wrap(&format!("{id} skipped: {why}"), 76).iter().enumerate() {
                out.push_str(if i == 0 { "# " } else { "#   " });
                out.push_str(line);
                out.push('\n');
            }
        }
        let yaml = serde_norway::to_string(&obj.value)
            .with_context(|| format!("{} as YAML", obj.describe()))?;
        out.push_str(&yaml);
    }
    Ok(out)
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().expect("one line at least");
        if !last.is_empty() && last.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

/// The group/version/kind of an object, for looking up its API.
pub fn gvk(obj: &Object) -> GroupVersionKind {
    GroupVersionKind::gvk(
        &obj.api_resource.group,
        &obj.api_resource.version,
        &obj.api_resource.kind,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_object_carries_the_part_of_label_and_a_namespace_when_namespaced() {
        let objs = objects(&Options {
            service_monitor: true,
            ..Options::default()
        })
        .unwrap();
        assert!(objs.iter().any(|o| o.api_resource.kind == "ServiceMonitor"));
        for o in &objs {
            assert_eq!(
                o.value["metadata"]["labels"][PART_OF.0],
                PART_OF.1,
                "{}",
                o.describe()
            );
            assert_eq!(o.namespaced, o.namespace().is_some(), "{}", o.describe());
        }
        let plain = objects(&Options::default()).unwrap();
        assert!(
            !plain
                .iter()
                .any(|o| o.api_resource.kind == "ServiceMonitor")
        );
    }

    #[test]
    fn the_proxy_is_not_privileged_and_uses_the_host_network_only() {
        let ds = node_daemonset(&Options::default());
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!((pod.host_network, pod.host_pid), (Some(true), Some(false)));
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(
            sc.capabilities.unwrap().drop.unwrap(),
            vec!["ALL".to_owned()]
        );
    }

    #[test]
    fn comments_wrap_at_the_width() {
        let lines = wrap(NODE_COMMENT, 78);
        assert!(lines.len() > 3);
        assert!(lines.iter().all(|l| l.len() <= 78));
        assert_eq!(lines.join(" "), NODE_COMMENT);
    }
}
