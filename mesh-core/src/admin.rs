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
    /// The RTT of the HBONE tunnels carrying the flow across the fabric
    /// (`None`: passthrough, or no sample yet).
    pub rtt: Option<PathRtt>,
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

/// The RTT of a path (the HBONE tunnels between two pods) from the
/// kernel's histograms: `GET /flows` (each flow's, `mesh top`) and
/// `GET /explain` (`mesh explain`). Quantiles are estimated from log2
/// buckets (see [`log2_quantile`]), so they are good to a bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRtt {
    /// Which tunnel end (`<netns cookie>/<out|in>/<peer pod address>`):
    /// flows of one pod pair share it, so a reader merges each once.
    pub tunnel: String,
    /// Samples per log2 bucket of microseconds (bucket `i`:
    /// `[2^i, 2^(i+1))`), to merge paths exactly.
    pub buckets: Vec<u64>,
    pub p50_us: u64,
    pub p99_us: u64,
    /// RTT samples behind the quantiles (one per kernel RTT update).
    pub samples: u64,
    /// Segments the tunnels retransmitted.
    pub retransmits: u64,
    /// Retransmission timeouts.
    pub rtos: u64,
}

impl PathRtt {
    /// Several paths as one (each tunnel once): buckets and counters
    /// summed, quantiles from the sum. `None` without samples.
    pub fn merge<'a>(paths: impl IntoIterator<Item = &'a PathRtt>) -> Option<PathRtt> {
        let mut seen = std::collections::BTreeSet::new();
        let mut buckets: Vec<u64> = Vec::new();
        let (mut retransmits, mut rtos) = (0u64, 0u64);
        for p in paths {
            if !seen.insert(p.tunnel.as_str()) {
                continue;
            }
            if buckets.len() < p.buckets.len() {
                buckets.resize(p.buckets.len(), 0);
            }
            for (a, b) in buckets.iter_mut().zip(&p.buckets) {
                *a = a.saturating_add(*b);
            }
            retransmits = retransmits.saturating_add(p.retransmits);
            rtos = rtos.saturating_add(p.rtos);
        }
        let tunnel = seen.into_iter().collect::<Vec<_>>().join(",");
        PathRtt::from_buckets(tunnel, &buckets, retransmits, rtos)
    }

    /// From per-bucket counts of microsecond samples (bucket `i`: samples
    /// with `floor(log2(v)) == i`). `None` without samples.
    pub fn from_buckets(
        tunnel: String,
        counts: &[u64],
        retransmits: u64,
        rtos: u64,
    ) -> Option<PathRtt> {
        Some(PathRtt {
            tunnel,
            buckets: counts.to_vec(),
            p50_us: log2_quantile(counts, 0.5)?.round() as u64,
            p99_us: log2_quantile(counts, 0.99)?.round() as u64,
            samples: counts.iter().sum(),
            retransmits,
            rtos,
        })
    }
}

/// The `q` quantile (0..=1) of a log2 histogram given as per-bucket counts
/// (bucket `i` holds `[2^i, 2^(i+1))`, bucket 0 `[0, 2)`), interpolated
/// geometrically inside its bucket. `None` when there are no samples.
pub fn log2_quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (below + c) as f64 >= rank {
            let lo = if i == 0 { 1.0 } else { (1u64 << i) as f64 };
            let frac = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
            return Some(lo * 2f64.powf(frac));
        }
        below += c;
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn log2_quantiles_land_in_the_bucket_holding_the_rank() {
        assert_eq!(log2_quantile(&[0; 32], 0.5), None);
        // 10 samples in [64, 128), 1 in [4096, 8192).
        let mut c = [0u64; 32];
        c[6] = 10;
        c[12] = 1;
        let p50 = log2_quantile(&c, 0.5).unwrap();
        assert!((64.0..=128.0).contains(&p50), "{p50}");
        let p99 = log2_quantile(&c, 0.99).unwrap();
        assert!((4096.0..=8192.0).contains(&p99), "{p99}");
        let r = PathRtt::from_buckets("1/out/10.0.0.2".into(), &c, 3, 1).unwrap();
        assert_eq!((r.samples, r.retransmits, r.rtos), (11, 3, 1));
        assert!(r.p50_us <= r.p99_us);
        // Merging counts each tunnel once.
        let mut other = r.clone();
        other.tunnel = "1/out/10.0.0.3".into();
        let m = PathRtt::merge([&r, &r, &other]).unwrap();
        assert_eq!((m.samples, m.retransmits), (22, 6));
        assert_eq!(PathRtt::merge([]), None);
    }

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
