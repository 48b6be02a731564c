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

/// Istio's workload label for a pod: its `app` label, else its name.
fn workload_name(p: &Pod) -> String {
    p.labels
        .get("app")
        .cloned()
        .unwrap_or_else(|| p.name.clone())
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
            destination_app: dst.pod.labels.get("app").cloned().unwrap_or_default(),
            connection_security_policy: "none".into(),
            ..FlowLabels::default()
        };
        if let Some(Note::Delivery {
            source_principal,
            source_ip,
        }) = self.notes.get(f.cookie)
        {
            if let Some(principal) = source_principal {
                l.source_principal = principal;
                l.connection_security_policy = "mutual_tls".into();
            }
            if let Some(src) = snap.pod_by_ip(source_ip) {
                l.source_workload = workload_name(src);
                l.source_workload_namespace = src.namespace.clone();
                l.source_app = src.labels.get("app").cloned().unwrap_or_default();
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
            source_workload: src
                .pod
                .labels
                .get("app")
                .cloned()
                .unwrap_or_else(|| src.pod.name.clone()),
            source_workload_namespace: src.pod.namespace.clone(),
            source_principal: src.identity.to_string(),
            source_app: src.pod.labels.get("app").cloned().unwrap_or_default(),
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
                    l.destination_workload = p
                        .labels
                        .get("app")
                        .cloned()
                        .unwrap_or_else(|| p.name.clone());
                }
                l.destination_workload_namespace = p.namespace.clone();
                l.destination_principal = p
                    .identity(&self.cfg.trust_domain)
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                l.destination_app = p.labels.get("app").cloned().unwrap_or_default();
                l.connection_security_policy = "mutual_tls".into();
            }
            // Outside the mesh: one series for every such address, as Istio
            // labels them (a label per address would be unbounded).
            None => l = l.unknown_destination(),
        }
        Some(l)
    }
}
