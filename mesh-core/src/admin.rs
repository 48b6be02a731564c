//! The node proxy's admin API (localhost:15000), as both ends see it: the
//! proxy serializes these types and `mesh` deserializes the same ones, so
//! a field renamed on one side cannot silently read as empty on the other.

use serde::{Deserialize, Serialize};

/// One flow of the node's kernel flow map, joined to workloads
/// (`GET /flows`). Byte counts are the kernel's: what the app sent and
/// received on its socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub cookie: u64,
    /// `outbound` (an app's connection, the source reporter) or `inbound`
    /// (a delivery into a pod, the destination reporter).
    pub direction: String,
    /// `namespace/workload`.
    pub source_workload: String,
    pub source_principal: String,
    /// The app's socket (`ip:port`).
    pub app_socket: String,
    /// Where the app connected (`ip:port`).
    pub original_dst: String,
    pub destination_workload: String,
    pub destination_principal: String,
    /// The pod the flow reaches (a Service flow's chosen endpoint).
    pub destination_pod: Option<String>,
    pub destination_service: String,
    pub security: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub age_ms: u64,
    pub closed: bool,
    /// The app socket's smoothed RTT (loopback: the app <-> proxy leg).
    pub srtt_us: u64,
}

/// A flow as `GET /explain` lists it: the asking pod's flows to the
/// destination explained.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainFlow {
    pub cookie: u64,
    pub app_socket: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub closed: bool,
    pub age_ms: u64,
}

/// The pods of a node (`GET /workloads`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workloads {
    pub node: String,
    pub pods: Vec<Workload>,
}

/// One pod of the node, enrolled or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// `namespace/name`.
    pub pod: String,
    pub ips: Vec<String>,
    pub identity: String,
    pub enrolled: bool,
    pub netns: Option<String>,
    pub netns_cookie: Option<u64>,
    /// The in-pod listeners, while enrolled.
    pub listeners: Option<Vec<String>>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Why the pod is not meshed, as a short token (`None` when meshed):
    /// a choice or rule (`pod-disabled`, `not-opted-in`, `host-network`,
    /// `mesh-component`), a wait (`no-ip-yet`, `no-netns-yet`,
    /// `enrolling`) or a fault (`certificate-refused`,
    /// `enrollment-failed`). The same as the pod's `sockmesh.io/status`.
    pub reason: Option<String>,
    /// The reason as a sentence for people.
    pub message: Option<String>,
    /// Whether `reason` is a fault (not a choice or a wait).
    pub fault: bool,
}

/// The certificate state of one identity (`GET /certs`, `mesh certs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertState {
    pub identity: String,
    pub serial: Option<String>,
    /// Seconds since the Unix epoch.
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    pub next_refresh: u64,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Whether a certificate valid now is held.
    pub valid: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_missing_a_field_is_refused_not_read_as_empty() {
        let full = serde_json::to_value(Flow::default()).unwrap();
        let back: Flow = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(back, Flow::default());
        let mut partial = full;
        partial.as_object_mut().unwrap().remove("bytes_sent");
        let e = serde_json::from_value::<Flow>(partial).unwrap_err();
        assert!(e.to_string().contains("bytes_sent"), "{e}");
    }
}
