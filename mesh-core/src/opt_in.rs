//! Which pods are in the mesh: one rule for every registry source.
//!
//! A pod is meshed when its `sockmesh.io/mesh` annotation is `enabled`, or
//! its namespace's `sockmesh.io/mesh` label is `enabled`; the pod's
//! `disabled` overrides the namespace. Host-network pods (they share the
//! node's network namespace) and the mesh's own proxy pods never are.
//! Kubernetes reads the annotation and the namespace label; the file
//! registry reads a pod's annotation (or, as before, its label) and treats
//! a namespace it does not list as labelled `enabled`.

use serde::Serialize;

/// The pod annotation and the namespace label.
pub const MESH_KEY: &str = "sockmesh.io/mesh";
/// The annotation the node proxy writes on each pod of its node.
pub const STATUS_ANNOTATION: &str = "sockmesh.io/status";
/// The value that opts in.
pub const ENABLED: &str = "enabled";
/// The value that opts out (a pod's overrides its namespace's).
pub const DISABLED: &str = "disabled";

/// What the rule looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OptInFacts<'a> {
    /// The pod's `sockmesh.io/mesh` annotation.
    pub pod: Option<&'a str>,
    /// The namespace's `sockmesh.io/mesh` label.
    pub namespace: Option<&'a str>,
    pub host_network: bool,
    /// The pod is a sockmesh node proxy (or the CA).
    pub mesh_component: bool,
}

/// Why a pod is in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptedInBy {
    PodAnnotation,
    NamespaceLabel,
}

/// Why a pod is not in the mesh. Each is a choice or a rule, not a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotMeshed {
    /// `sockmesh.io/mesh: disabled` on the pod.
    PodDisabled,
    /// Neither the pod nor its namespace opted in.
    NotOptedIn,
    /// `hostNetwork: true`: the pod is the node's network namespace.
    HostNetwork,
    /// A sockmesh component itself.
    MeshComponent,
}

impl NotMeshed {
    /// A sentence for `mesh status` and the status annotation.
    pub fn explain(self) -> &'static str {
        match self {
            NotMeshed::PodDisabled => {
                "opted out: the pod's sockmesh.io/mesh annotation is \"disabled\""
            }
            NotMeshed::NotOptedIn => {
                "not opted in: neither the pod annotation nor the namespace label sockmesh.io/mesh is \"enabled\""
            }
            NotMeshed::HostNetwork => {
                "host network pods share the node's network namespace and are never meshed"
            }
            NotMeshed::MeshComponent => "sockmesh's own pods are never meshed",
        }
    }
}

/// The rule's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeshDecision {
    Meshed(OptedInBy),
    NotMeshed(NotMeshed),
}

impl MeshDecision {
    pub fn is_meshed(self) -> bool {
        matches!(self, MeshDecision::Meshed(_))
    }
}

/// The opt-in rule.
pub fn decide(facts: OptInFacts<'_>) -> MeshDecision {
    if facts.mesh_component {
        return MeshDecision::NotMeshed(NotMeshed::MeshComponent);
    }
    if facts.host_network {
        return MeshDecision::NotMeshed(NotMeshed::HostNetwork);
    }
    match facts.pod {
        Some(DISABLED) => MeshDecision::NotMeshed(NotMeshed::PodDisabled),
        Some(ENABLED) => MeshDecision::Meshed(OptedInBy::PodAnnotation),
        _ if facts.namespace == Some(ENABLED) => MeshDecision::Meshed(OptedInBy::NamespaceLabel),
        _ => MeshDecision::NotMeshed(NotMeshed::NotOptedIn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_overrides_the_namespace_and_host_network_and_mesh_pods_never_join() {
        let f = |pod, namespace, host_network, mesh_component| {
            decide(OptInFacts {
                pod,
                namespace,
                host_network,
                mesh_component,
            })
        };
        use MeshDecision::*;
        assert_eq!(
            f(None, None, false, false),
            NotMeshed(super::NotMeshed::NotOptedIn)
        );
        assert_eq!(
            f(Some("enabled"), None, false, false),
            Meshed(OptedInBy::PodAnnotation)
        );
        assert_eq!(
            f(None, Some("enabled"), false, false),
            Meshed(OptedInBy::NamespaceLabel)
        );
        assert_eq!(
            f(Some("disabled"), Some("enabled"), false, false),
            NotMeshed(super::NotMeshed::PodDisabled)
        );
        assert_eq!(
            f(Some("enabled"), Some("disabled"), false, false),
            Meshed(OptedInBy::PodAnnotation)
        );
        assert_eq!(
            f(None, Some("yes"), false, false),
            NotMeshed(super::NotMeshed::NotOptedIn)
        );
        assert_eq!(
            f(Some("enabled"), Some("enabled"), true, false),
            NotMeshed(super::NotMeshed::HostNetwork)
        );
        assert_eq!(
            f(Some("enabled"), Some("enabled"), false, true),
            NotMeshed(super::NotMeshed::MeshComponent)
        );
    }
}
