//! Istio's labels for this node's kernel flows: the [`FlowResolver`] of the
//! running proxy. A flow is joined to the pod it leaves (by netns cookie)
//! or enters (a delivery), to the registry, and to the facts the data path
//! left in [`crate::notes`] (a Service flow's endpoint, a delivery's
//! source identity).

use mesh_core::registry::Pod;
use mesh_ebpf::{Direction, FlowEntry};

use super::{FlowLabels, FlowResolver};
use crate::notes::Note;
use crate::proxy::NodeProxy;

impl NodeProxy {
    /// Flows of this node's pods, joined to workloads.
    pub fn flows(&self) -> Vec<(FlowEntry, Option<FlowLabels>)> {
        let flows = {
            let dp = self.datapath.lock();
            dp.flows().unwrap_or_default()
        };
        self.prune_chosen(&flows);
        flows
            .into_iter()
            .map(|f| {
                let l = self.labels(&f);
                (f, l)
            })
            .filter(|(_, l)| l.is_some())
            .collect()
    }

    /// Forgets notes of flows the kernel map no longer holds.
    pub fn prune_chosen(&self, flows: &[FlowEntry]) {
        let live: std::collections::HashSet<u64> = flows.iter().map(|f| f.cookie).collect();
        self.notes.retain(|c| live.contains(&c));
    }

    /// The pod a flow reaches: the endpoint chosen for a Service flow, the
    /// pod with the destination address otherwise.
    pub fn destination_pod(&self, f: &FlowEntry) -> Option<String> {
        self.chosen_endpoint(f.cookie).or_else(|| {
            self.registry
                .snapshot()
                .pod_by_ip(f.original_dst.ip())
                .map(|p| format!("{}/{}", p.namespace, p.name))
        })
    }

    fn chosen_endpoint(&self, cookie: u64) -> Option<String> {
        match self.notes.get(cookie) {
            Some(Note::Endpoint(e)) => Some(e),
            _ => None,
        }
    }
}

/// Istio's `*_workload` label for a pod: the controller that owns it
/// (a Deployment through its ReplicaSet, a StatefulSet, DaemonSet, Job,
/// CronJob: Kubernetes' ownerReferences), else its app label, else its
/// name (a file-registry pod has no owner: its `app` label, as before).
pub fn workload_name(p: &Pod) -> String {
    p.workload_name().to_owned()
}

/// Istio's `*_app` label: `app.kubernetes.io/name`, else `app`; empty
/// when the pod has neither.
pub fn app_name(p: &Pod) -> String {
    p.app().unwrap_or_default().to_owned()
}

/// Istio's `*_version` label: `app.kubernetes.io/version`, else `version`;
/// empty when the pod has neither.
pub fn version_name(p: &Pod) -> String {
    p.version().unwrap_or_default().to_owned()
}

impl NodeProxy {
    /// Labels of a delivery into one of this node's pods (the destination
    /// reporter): the pod it enters, and the source the tunnel named.
    fn delivery_labels(&self, f: &FlowEntry) -> Option<FlowLabels> {
        let dst = self.by_cookie(f.netns)?.spec();
        let snap = self.registry.snapshot();
        let mut l = FlowLabels {
            destination_workload: workload_name(&dst.pod),
            destination_workload_namespace: dst.pod.namespace.clone(),
            destination_principal: dst.identity.to_string(),
            destination_app: app_name(&dst.pod),
            destination_version: version_name(&dst.pod),
            connection_security_policy: "none".into(),
            ..FlowLabels::default()
        };
        let source = match self.notes.get(f.cookie) {
            Some(Note::Delivery {
                source_principal,
                source_ip,
            }) => Some((source_principal, source_ip)),
            // The kernel same-node path: no proxy socket, so no note; the
            // source is the pod of this node whose address the kernel
            // recorded (only a captured app of an enrolled pod gets there).
            _ if f.direct => {
                let ip = f.src.ip();
                let principal = snap
                    .pod_by_ip(ip)
                    .and_then(|p| self.enrolled(&format!("{}/{}", p.namespace, p.name)))
                    .map(|e| e.spec().identity.to_string());
                Some((principal, ip))
            }
            _ => None,
        };
        if let Some((source_principal, source_ip)) = source {
            if let Some(principal) = source_principal {
                l.source_principal = principal;
                l.connection_security_policy = "mutual_tls".into();
            }
            if let Some(src) = snap.pod_by_ip(source_ip) {
                l.source_workload = workload_name(src);
                l.source_workload_namespace = src.namespace.clone();
                l.source_app = app_name(src);
                l.source_version = version_name(src);
            }
        }
        Some(l)
    }
}

impl FlowResolver for NodeProxy {
    fn workload_exists(&self, namespace: &str, workload: &str) -> bool {
        self.registry
            .snapshot()
            .pods
            .iter()
            .any(|p| p.namespace == namespace && workload_name(p) == workload)
    }

    fn labels(&self, f: &FlowEntry) -> Option<FlowLabels> {
        if f.direction == Direction::Inbound {
            return self.delivery_labels(f);
        }
        let src = self.by_cookie(f.netns)?.spec();
        let snap = self.registry.snapshot();
        let mut l = FlowLabels {
            source_workload: workload_name(&src.pod),
            source_workload_namespace: src.pod.namespace.clone(),
            source_principal: src.identity.to_string(),
            source_app: app_name(&src.pod),
            source_version: version_name(&src.pod),
            ..FlowLabels::default()
        };
        let dst_pod = match snap.service_by_vip(f.original_dst.ip()) {
            Some(svc) => {
                l.destination_service = format!("{}.{}.svc.cluster.local", svc.name, svc.namespace);
                l.destination_service_name = svc.name.clone();
                l.destination_service_namespace = svc.namespace.clone();
                // The endpoint the proxy chose for this connection.
                let chosen = self.chosen_endpoint(f.cookie);
                snap.endpoints(svc)
                    .find(|p| {
                        chosen.as_deref() == Some(format!("{}/{}", p.namespace, p.name).as_str())
                    })
                    .or_else(|| snap.endpoints(svc).next())
            }
            None => snap.pod_by_ip(f.original_dst.ip()),
        };
        match dst_pod {
            Some(p) => {
                if l.destination_workload.is_empty() {
                    l.destination_workload = workload_name(p);
                }
                l.destination_workload_namespace = p.namespace.clone();
                l.destination_principal = p
                    .identity(&self.cfg.trust_domain)
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                l.destination_app = app_name(p);
                l.destination_version = version_name(p);
                l.connection_security_policy = "mutual_tls".into();
            }
            // Outside the mesh: one series for every such address, as Istio
            // labels them (a label per address would be unbounded).
            None => l = l.unknown_destination(),
        }
        Some(l)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_core::opt_in::{MeshDecision, OptedInBy};
    use mesh_core::registry::WorkloadRef;

    fn pod(labels: &[(&str, &str)], workload: Option<(&str, &str)>) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "cart-7d9f8-x2x4q".into(),
            uid: "u1".into(),
            node: "node-a".into(),
            service_account: "cart".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            netns: None,
            annotations: Default::default(),
            host_network: false,
            workload: workload.map(|(kind, name)| WorkloadRef {
                kind: kind.into(),
                name: name.into(),
            }),
            mesh: MeshDecision::Meshed(OptedInBy::PodAnnotation),
        }
    }

    #[test]
    fn the_owning_controller_names_the_workload_then_istios_app_labels_then_the_pod() {
        // A Deployment's pod (mesh-kube resolved its ReplicaSet): the
        // Deployment, whatever the labels say.
        let p = pod(
            &[("app", "cart-legacy"), ("app.kubernetes.io/name", "cart")],
            Some(("Deployment", "cart")),
        );
        assert_eq!(workload_name(&p), "cart");
        assert_eq!(app_name(&p), "cart", "app.kubernetes.io/name before app");
        let p = pod(&[("app", "db")], Some(("StatefulSet", "db-primary")));
        assert_eq!(workload_name(&p), "db-primary");
        assert_eq!(app_name(&p), "db");
        // No owner (a bare pod, or the file registry): the app label, as
        // the file source always did...
        let p = pod(&[("app", "web")], None);
        assert_eq!(workload_name(&p), "web");
        assert_eq!(app_name(&p), "web");
        let p = pod(&[("app.kubernetes.io/name", "shop-ui"), ("app", "x")], None);
        assert_eq!(workload_name(&p), "shop-ui");
        // ...else the pod's name; no app label is an empty one.
        let p = pod(&[("version", "v2")], None);
        assert_eq!(workload_name(&p), "cart-7d9f8-x2x4q");
        assert_eq!(app_name(&p), "");
    }
}
