//! Writing back: the `sockmesh.io/status` annotation on each pod of the
//! node (server-side apply, field manager `sockmesh-node`, only when it
//! changes) and Kubernetes Events on failures.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod as K8sPod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mesh_core::opt_in::{MeshDecision, NotMeshed, STATUS_ANNOTATION};
use mesh_core::registry::Pod;
use serde::{Deserialize, Serialize};

/// The field manager of everything the node proxy writes.
pub const FIELD_MANAGER: &str = "sockmesh-node";

/// The JSON in `sockmesh.io/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub meshed: bool,
    /// Why not (`pod-disabled`, `not-opted-in`, `host-network`,
    /// `mesh-component`, `enrollment-failed`, `certificate-refused`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The SPIFFE ID the pod's traffic carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The redirection mode in force (`ebpf`, `ebpf-degraded`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl PodStatus {
    /// A meshed pod.
    pub fn meshed(identity: impl Into<String>, mode: impl Into<String>) -> Self {
        PodStatus {
            meshed: true,
            reason: None,
            message: None,
            identity: Some(identity.into()),
            mode: Some(mode.into()),
        }
    }

    /// A pod the opt-in rule keeps out.
    pub fn not_meshed(why: NotMeshed) -> Self {
        let reason = serde_json::to_value(why)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        PodStatus {
            meshed: false,
            reason,
            message: Some(why.explain().to_owned()),
            identity: None,
            mode: None,
        }
    }

    /// A pod that should be meshed but is not, for `reason` (a fault).
    pub fn failed(reason: &str, message: impl Into<String>) -> Self {
        PodStatus {
            meshed: false,
            reason: Some(reason.to_owned()),
            message: Some(message.into()),
            identity: None,
            mode: None,
        }
    }

    /// The status the opt-in rule alone gives (before enrollment).
    pub fn from_decision(decision: MeshDecision, identity: Option<String>, mode: &str) -> Self {
        match decision {
            MeshDecision::Meshed(_) => PodStatus {
                meshed: true,
                reason: None,
                message: None,
                identity,
                mode: Some(mode.to_owned()),
            },
            MeshDecision::NotMeshed(why) => PodStatus::not_meshed(why),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("pod {namespace}/{name}: applying {STATUS_ANNOTATION}: {source}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("pod {namespace}/{name}: event {reason}: {source}")]
    Event {
        namespace: String,
        name: String,
        reason: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// What [`StatusWriter::reconcile`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub written: usize,
    pub unchanged: usize,
    pub failed: usize,
}

/// Writes the status annotation and Events for the pods of one node.
pub struct StatusWriter {
    client: Client,
    node: String,
    /// Last written value per pod uid.
    written: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        StatusWriter {
            client,
            node: node.into(),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Applies `status` on `pod` unless the pod already carries it (as the
    /// registry last saw it) or this writer already wrote it. `Ok(true)`
    /// when a PATCH was sent.
    pub async fn write(&self, pod: &Pod, status: &PodStatus) -> Result<bool, StatusError> {
        let json = status.to_json();
        if pod.annotations.get(STATUS_ANNOTATION) == Some(&json) {
            self.remember(&pod.uid, &json);
            return Ok(false);
        }
        if self
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&pod.uid)
            == Some(&json)
        {
            return Ok(false);
        }
        let patch = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "annotations": {STATUS_ANNOTATION: json},
            },
        });
        let api: Api<K8sPod> = Api::namespaced(self.client.clone(), &pod.namespace);
        // force: the annotation is the node proxy's; a stale copy written by
        // someone else is taken over, not a reason to stop reporting.
        api.patch(
            &pod.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| StatusError::Apply {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            source: Box::new(source),
        })?;
        self.remember(&pod.uid, &json);
        Ok(true)
    }

    fn remember(&self, uid: &str, json: &str) {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid.to_owned(), json.to_owned());
    }

    /// Forgets a pod that left the node.
    pub fn forget(&self, uid: &str) {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uid);
    }

    /// Brings every pod of `pods` (the node's, from the registry's view)
    /// to `status_of(pod)`, writing only those that differ, one at a time;
    /// forgets pods no longer listed. A failed write is logged and counted,
    /// and retried on the next call.
    pub async fn reconcile(
        &self,
        pods: &[Pod],
        status_of: impl Fn(&Pod) -> PodStatus,
    ) -> Reconciled {
        let mut done = Reconciled::default();
        for pod in pods {
            match self.write(pod, &status_of(pod)).await {
                Ok(true) => done.written += 1,
                Ok(false) => done.unchanged += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "pod status not written");
                    done.failed += 1;
                }
            }
        }
        let listed: std::collections::HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|uid, _| listed.contains(uid.as_str()));
        done
    }

    /// A Warning Event on `pod` (`CertificateRefused`, `EnrollmentFailed`).
    pub async fn warn(&self, pod: &Pod, reason: &str, message: &str) -> Result<(), StatusError> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                ..Default::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some("Warning".into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource {
                component: Some(FIELD_MANAGER.into()),
                host: Some(self.node.clone()),
            }),
            reporting_component: Some(format!("sockmesh.io/{FIELD_MANAGER}")),
            reporting_instance: Some(self.node.clone()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        api.create(&PostParams::default(), &event)
            .await
            .map(|_| ())
            .map_err(|source| StatusError::Event {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                reason: reason.to_owned(),
                source: Box::new(source),
            })
    }
}
