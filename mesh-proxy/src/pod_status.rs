//! Why each pod of this node is meshed or not, in one place: the admin
//! API's `/workloads` (what `mesh status` shows) and the `sockmesh.io/status`
//! annotation the Kubernetes source writes back both read [`Outcome`], so
//! the two always say the same thing with the same words.
//!
//! A `reason` is a short stable token (`pod-disabled`, `not-opted-in`,
//! `host-network`, `mesh-component`, `no-ip-yet`, `no-netns-yet`,
//! `enrolling`, `certificate-refused`, `enrollment-failed`); the first four
//! are choices or rules ([`Outcome::is_fault`] is false), the last two are
//! faults and raise a Warning Event.

use std::collections::HashMap;

use mesh_core::opt_in::NotMeshed;
use mesh_core::registry::Pod;
use mesh_kube::{PodStatus, Reconciled};

use crate::proxy::NodeProxy;
use crate::registry::RegistrySource;

/// What kind of failure kept a pod that should be meshed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No certificate for the pod's identity (the CA refused, or could not
    /// be reached).
    CertificateRefused,
    /// Anything else: capture in the kernel, the in-pod listeners, a bad
    /// identity.
    EnrollmentFailed,
}

impl Fault {
    /// The status annotation's and the admin API's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Fault::CertificateRefused => "certificate-refused",
            Fault::EnrollmentFailed => "enrollment-failed",
        }
    }

    /// The Kubernetes Event's reason.
    pub fn event_reason(self) -> &'static str {
        match self {
            Fault::CertificateRefused => "CertificateRefused",
            Fault::EnrollmentFailed => "EnrollmentFailed",
        }
    }
}

/// Where one pod of this node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enrolled: captured, listeners up, certificate held.
    Meshed { identity: String },
    /// Kept out by the opt-in rule (a choice, not a fault). `own_pod`: it
    /// is this proxy's own pod.
    NotMeshed { why: NotMeshed, own_pod: bool },
    /// Opted in, but the pod has no IP yet.
    NoIpYet,
    /// Opted in, but its network namespace is not known yet (the CNI
    /// plugin hands it over when the pod starts).
    NoNetnsYet,
    /// Opted in, enrollment not done yet (or waiting for its retry).
    Enrolling,
    /// Opted in, and enrollment failed (it is retried with backoff; the
    /// pod's traffic is refused meanwhile).
    Failed { fault: Fault, error: String },
}

impl Outcome {
    pub fn meshed(&self) -> bool {
        matches!(self, Outcome::Meshed { .. })
    }

    /// A failure to report (Warning Event), not a choice or a wait.
    pub fn is_fault(&self) -> bool {
        matches!(self, Outcome::Failed { .. })
    }

    /// The short reason token; `None` when meshed.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Outcome::Meshed { .. } => None,
            Outcome::NotMeshed { why, .. } => Some(match why {
                NotMeshed::PodDisabled => "pod-disabled",
                NotMeshed::NotOptedIn => "not-opted-in",
                NotMeshed::HostNetwork => "host-network",
                NotMeshed::MeshComponent => "mesh-component",
            }),
            Outcome::NoIpYet => Some("no-ip-yet"),
            Outcome::NoNetnsYet => Some("no-netns-yet"),
            Outcome::Enrolling => Some("enrolling"),
            Outcome::Failed { fault, .. } => Some(fault.reason()),
        }
    }

    /// A sentence for people; `None` when meshed.
    pub fn message(&self) -> Option<String> {
        Some(match self {
            Outcome::Meshed { .. } => return None,
            Outcome::NotMeshed {
                own_pod: true,
                why: NotMeshed::MeshComponent,
            } => "the node proxy's own pod is never meshed".to_owned(),
            Outcome::NotMeshed { why, .. } => why.explain().to_owned(),
            Outcome::NoIpYet => {
                "opted in; waiting for the pod's IP (status.podIPs is empty)".to_owned()
            }
            Outcome::NoNetnsYet => {
                "opted in; waiting for the pod's network namespace (the CNI plugin hands it over)"
                    .to_owned()
            }
            Outcome::Enrolling => "opted in; enrollment in progress".to_owned(),
            Outcome::Failed {
                fault: Fault::CertificateRefused,
                error,
            } => format!(
                "opted in, but no certificate: {error}; retried with backoff, the pod's connections are refused meanwhile"
            ),
            Outcome::Failed {
                fault: Fault::EnrollmentFailed,
                error,
            } => format!(
                "opted in, but enrollment failed: {error}; retried with backoff, the pod's connections are refused meanwhile"
            ),
        })
    }

    /// The `sockmesh.io/status` annotation's value; `mode` is the
    /// redirection mode in force (only shown for a meshed pod).
    pub fn status(&self, mode: &str) -> PodStatus {
        match self {
            Outcome::Meshed { identity } => PodStatus::meshed(identity.clone(), mode),
            other => PodStatus {
                meshed: false,
                reason: other.reason().map(str::to_owned),
                message: other.message(),
                identity: None,
                mode: None,
            },
        }
    }
}

/// The redirection mode as the status annotation names it.
pub fn mode_name(mode: &mesh_ebpf::Mode) -> &'static str {
    match mode {
        mesh_ebpf::Mode::Sockmap => "ebpf",
        mesh_ebpf::Mode::Degraded { .. } => "ebpf-degraded",
    }
}

/// What the proxy knows of one pod, from which [`outcome`] decides.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The pod has no IP yet (neither in the API nor from CNI).
    pub no_ip: bool,
    /// The node proxy knows the pod's network namespace (from the file or
    /// from CNI).
    pub has_netns: bool,
    /// Enrolled, with this identity.
    pub enrolled: Option<String>,
    /// The last enrollment failure, while it is retried.
    pub failure: Option<(Fault, String)>,
    /// The pod is this proxy's own.
    pub own_pod: bool,
}

/// The one rule: the opt-in decision first, then what enrollment did.
pub fn outcome(pod: &Pod, facts: &Facts) -> Outcome {
    if let mesh_core::opt_in::MeshDecision::NotMeshed(why) = pod.mesh {
        return Outcome::NotMeshed {
            why,
            own_pod: facts.own_pod,
        };
    }
    if let Some(identity) = &facts.enrolled {
        return Outcome::Meshed {
            identity: identity.clone(),
        };
    }
    if let Some((fault, error)) = &facts.failure {
        return Outcome::Failed {
            fault: *fault,
            error: error.clone(),
        };
    }
    if facts.no_ip {
        return Outcome::NoIpYet;
    }
    if !facts.has_netns {
        return Outcome::NoNetnsYet;
    }
    Outcome::Enrolling
}

/// Every pod of `node` the registry knows, sorted by key, with where it
/// stands; `facts(pod)` says what enrollment knows of it.
pub fn outcomes(
    registry: &RegistrySource,
    node: &str,
    facts: impl Fn(&Pod) -> Facts,
) -> Vec<(Pod, Outcome)> {
    let snap = registry.snapshot();
    let mut out: Vec<(Pod, Outcome)> = snap
        .pods
        .iter()
        .filter(|p| p.node == node)
        .map(|p| (p.clone(), outcome(p, &facts(p))))
        .collect();
    out.sort_by(|(a, _), (b, _)| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// Writes each pod's `sockmesh.io/status` (only where it changed: the
/// writer remembers) and a Warning Event for each failure in `news`
/// (`(key, fault, error)`: new failures, each reported once). Nothing
/// for the file source, or before the Kubernetes source is synced (a
/// partial view would report pods of opted-in namespaces as not opted in).
pub async fn report(
    registry: &RegistrySource,
    outcomes: &[(Pod, Outcome)],
    mode: &str,
    news: Vec<(String, Fault, String)>,
) -> Option<Reconciled> {
    let k = registry.kube()?;
    if !registry.settled() {
        return None;
    }
    let statuses: HashMap<&str, PodStatus> = outcomes
        .iter()
        .map(|(p, o)| (p.uid.as_str(), o.status(mode)))
        .collect();
    let pods: Vec<Pod> = outcomes.iter().map(|(p, _)| p.clone()).collect();
    let done = k
        .status
        .reconcile(&pods, |p| {
            statuses
                .get(p.uid.as_str())
                .cloned()
                .unwrap_or_else(|| Outcome::Enrolling.status(mode))
        })
        .await;
    for (key, fault, _) in news {
        let Some((pod, o)) = outcomes
            .iter()
            .find(|(p, _)| format!("{}/{}", p.namespace, p.name) == key)
        else {
            continue;
        };
        // Only while it still stands (a retry may have succeeded since).
        if !matches!(o, Outcome::Failed { fault: f, .. } if *f == fault) {
            continue;
        }
        let message = o.message().unwrap_or_default();
        if let Err(e) = k.status.warn(pod, fault.event_reason(), &message).await {
            tracing::warn!(error = %e, "warning event not created");
        }
    }
    Some(done)
}

impl NodeProxy {
    /// What enrollment knows of `pod`.
    fn facts(&self, pod: &Pod) -> Facts {
        let key = format!("{}/{}", pod.namespace, pod.name);
        // CNI may know the netns and the addresses before the API does.
        let placed = self.cni.place(pod);
        Facts {
            no_ip: placed.as_ref().unwrap_or(pod).ips.is_empty(),
            has_netns: pod.netns.is_some() || placed.is_some(),
            enrolled: self.enrolled(&key).map(|e| e.spec().identity.to_string()),
            failure: self.retry.failure(&key),
            own_pod: self.cfg.pod_namespace.as_deref() == Some(pod.namespace.as_str())
                && self.cfg.pod_name.as_deref() == Some(pod.name.as_str()),
        }
    }

    /// Every pod of this node the registry knows, with where it stands.
    pub fn outcomes(&self) -> Vec<(Pod, Outcome)> {
        outcomes(&self.registry, &self.cfg.node, |p| self.facts(p))
    }

    /// Writes the pods' status back (Kubernetes source; see [`report`]).
    pub async fn report_status(&self) -> Option<Reconciled> {
        if self.registry.kube().is_none() || !self.registry.settled() {
            return None;
        }
        let mode = mode_name(self.datapath.lock().mode());
        let outcomes = self.outcomes();
        let news = self.retry.take_news();
        report(&self.registry, &outcomes, mode, news).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_core::opt_in::{MeshDecision, OptedInBy};

    fn pod(mesh: MeshDecision) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "cart-1".into(),
            uid: "u1".into(),
            node: "node-a".into(),
            service_account: "cart".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            labels: Default::default(),
            netns: None,
            annotations: Default::default(),
            host_network: false,
            workload: None,
            mesh,
        }
    }

    #[test]
    fn every_state_has_its_reason_and_the_annotation_says_the_same() {
        let meshed = pod(MeshDecision::Meshed(OptedInBy::NamespaceLabel));
        let f = |facts: Facts| outcome(&meshed, &facts);
        let cases: Vec<(Outcome, Option<&str>, bool)> = vec![
            (
                f(Facts {
                    enrolled: Some("spiffe://td/ns/shop/sa/cart".into()),
                    failure: Some((Fault::EnrollmentFailed, "old".into())),
                    ..Facts::default()
                }),
                None,
                false,
            ),
            (
                f(Facts {
                    failure: Some((
                        Fault::CertificateRefused,
                        "CA 10.0.0.9:15012 answered 403".into(),
                    )),
                    has_netns: true,
                    ..Facts::default()
                }),
                Some("certificate-refused"),
                true,
            ),
            (
                f(Facts {
                    failure: Some((Fault::EnrollmentFailed, "no netns".into())),
                    ..Facts::default()
                }),
                Some("enrollment-failed"),
                true,
            ),
            (
                f(Facts {
                    no_ip: true,
                    ..Facts::default()
                }),
                Some("no-ip-yet"),
                false,
            ),
            (f(Facts::default()), Some("no-netns-yet"), false),
            (
                f(Facts {
                    has_netns: true,
                    ..Facts::default()
                }),
                Some("enrolling"),
                false,
            ),
        ];
        for (o, reason, fault) in cases {
            assert_eq!(o.reason(), reason, "{o:?}");
            assert_eq!(o.is_fault(), fault, "{o:?}");
            let s = o.status("ebpf");
            assert_eq!(s.meshed, reason.is_none());
            assert_eq!(s.reason.as_deref(), reason);
            assert_eq!(s.message, o.message());
            if s.meshed {
                assert_eq!(s.mode.as_deref(), Some("ebpf"));
                assert_eq!(s.identity.as_deref(), Some("spiffe://td/ns/shop/sa/cart"));
            } else {
                assert!(s.message.is_some() && s.mode.is_none() && s.identity.is_none());
            }
        }
        let refused = f(Facts {
            failure: Some((Fault::CertificateRefused, "CA answered 403".into())),
            ..Facts::default()
        });
        assert!(refused.message().unwrap().contains("CA answered 403"));
    }

    #[test]
    fn the_opt_in_rule_comes_first_and_its_reasons_match_mesh_kube() {
        for why in [
            NotMeshed::PodDisabled,
            NotMeshed::NotOptedIn,
            NotMeshed::HostNetwork,
            NotMeshed::MeshComponent,
        ] {
            // Even a pod with an enrollment fact is reported by the rule.
            let o = outcome(
                &pod(MeshDecision::NotMeshed(why)),
                &Facts {
                    no_ip: true,
                    enrolled: Some("x".into()),
                    ..Facts::default()
                },
            );
            assert!(!o.is_fault());
            // The same token and sentence as mesh-kube's own mapping.
            assert_eq!(o.status("ebpf"), PodStatus::not_meshed(why));
        }
        let own = outcome(
            &pod(MeshDecision::NotMeshed(NotMeshed::MeshComponent)),
            &Facts {
                own_pod: true,
                ..Facts::default()
            },
        );
        assert_eq!(own.reason(), Some("mesh-component"));
        assert_eq!(
            own.message().as_deref(),
            Some("the node proxy's own pod is never meshed")
        );
    }
}
