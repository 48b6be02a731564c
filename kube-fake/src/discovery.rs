//! The resource types the fake serves, and the discovery documents built
//! from them (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`).

use serde_json::{Value, json};

/// One resource type: `pods` in `v1`, `leases` in `coordination.k8s.io/v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// Only `create` (TokenReview).
    pub create_only: bool,
}

impl ResourceType {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            create_only: false,
        }
    }

    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `leases.coordination.k8s.io`: the name request counters use.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn discovery_entry(&self) -> Value {
        let verbs: &[&str] = if self.create_only {
            &["create"]
        } else {
            &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ]
        };
        let short: &[&str] = match (self.group.as_str(), self.plural.as_str()) {
            ("", "pods") => &["po"],
            ("", "namespaces") => &["ns"],
            ("", "nodes") => &["no"],
            ("", "services") => &["svc"],
            ("", "endpoints") => &["ep"],
            ("", "configmaps") => &["cm"],
            ("", "serviceaccounts") => &["sa"],
            ("", "events") => &["ev"],
            ("apps", "deployments") => &["deploy"],
            ("apps", "replicasets") => &["rs"],
            ("apps", "statefulsets") => &["sts"],
            ("apps", "daemonsets") => &["ds"],
            ("apiextensions.k8s.io", _) => &["crd", "crds"],
            _ => &[],
        };
        json!({
            "name": self.plural,
            "singularName": self.kind.to_lowercase(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": short,
        })
    }
}

/// The built-in types: what sockmesh and kube-runtime touch.
pub fn builtin() -> Vec<ResourceType> {
    let mut t = vec![
        ResourceType::new("", "v1", "Pod", "pods", true),
        ResourceType::new("", "v1", "Namespace", "namespaces", false),
        ResourceType::new("", "v1", "Node", "nodes", false),
        ResourceType::new("", "v1", "Service", "services", true),
        ResourceType::new("", "v1", "Endpoints", "endpoints", true),
        ResourceType::new("", "v1", "Secret", "secrets", true),
        ResourceType::new("", "v1", "ConfigMap", "configmaps", true),
        ResourceType::new("", "v1", "ServiceAccount", "serviceaccounts", true),
        ResourceType::new("", "v1", "Event", "events", true),
        ResourceType::new("events.k8s.io", "v1", "Event", "events", true),
        ResourceType::new(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
        ),
        ResourceType::new("coordination.k8s.io", "v1", "Lease", "leases", true),
        ResourceType::new("apps", "v1", "Deployment", "deployments", true),
        ResourceType::new("apps", "v1", "ReplicaSet", "replicasets", true),
        ResourceType::new("apps", "v1", "StatefulSet", "statefulsets", true),
        ResourceType::new("apps", "v1", "DaemonSet", "daemonsets", true),
        ResourceType::new("batch", "v1", "Job", "jobs", true),
        ResourceType::new(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            true,
        ),
        ResourceType::new(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        ResourceType::new("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
        ),
        ResourceType::new(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        ),
    ];
    let mut review = ResourceType::new(
        "authentication.k8s.io",
        "v1",
        "TokenReview",
        "tokenreviews",
        false,
    );
    review.create_only = true;
    t.push(review);
    t
}

/// The types a CustomResourceDefinition object declares (one per served version).
pub fn from_crd(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let (Some(group), Some(kind), Some(plural)) = (
        spec["group"].as_str(),
        spec.pointer("/names/kind").and_then(Value::as_str),
        spec.pointer("/names/plural").and_then(Value::as_str),
    ) else {
        return Vec::new();
    };
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .filter_map(|v| v["name"].as_str())
        .map(|version| ResourceType::new(group, version, kind, plural, namespaced))
        .collect()
}

/// `GET /api`.
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    })
}

fn groups(types: &[ResourceType]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, versions)) if !versions.contains(&t.version) => {
                versions.push(t.version.clone())
            }
            Some(_) => {}
            None => out.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    out
}

fn group_doc(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `GET /apis`.
pub fn group_list(types: &[ResourceType]) -> Value {
    let groups: Vec<Value> = groups(types)
        .iter()
        .map(|(g, vs)| {
            let mut doc = group_doc(g, vs);
            if let Some(o) = doc.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            doc
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/<group>`.
pub fn group(types: &[ResourceType], group: &str) -> Option<Value> {
    groups(types)
        .into_iter()
        .find(|(g, _)| g == group)
        .map(|(g, vs)| group_doc(&g, &vs))
}

/// `GET /api/v1`, `GET /apis/<group>/<version>`.
pub fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .map(ResourceType::discovery_entry)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}
