//! Istio-compatible TCP metrics, counted in the kernel.
//!
//! The byte counts come from the kernel's flow map (`sm_flows`), read only at
//! scrape time and joined to workload identities then — no per-packet work in
//! user space. Closed flows are folded into per-label totals and removed from
//! the map, so counters stay monotonic while the map stays small. Names and
//! labels follow Istio's standard TCP metrics, so existing dashboards work.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_ebpf::FlowEntry;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// The identity of both ends of a flow, as Istio labels them.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `mutual_tls` for HBONE, `none` for passthrough.
    pub connection_security_policy: String,
    /// `-` when the connection was not refused; Istio's flags otherwise
    /// (`UF` upstream failure, `RBAC` denied by policy, ...).
    pub response_flags: String,
}

impl FlowLabels {
    fn label_set(&self) -> Vec<(&'static str, String)> {
        let or_unknown = |s: &str| {
            if s.is_empty() {
                "unknown".to_owned()
            } else {
                s.to_owned()
            }
        };
        vec![
            ("reporter", "source".to_owned()),
            ("request_protocol", "tcp".to_owned()),
            ("source_workload", or_unknown(&self.source_workload)),
            (
                "source_workload_namespace",
                or_unknown(&self.source_workload_namespace),
            ),
            ("source_principal", or_unknown(&self.source_principal)),
            ("source_app", or_unknown(&self.source_app)),
            (
                "destination_workload",
                or_unknown(&self.destination_workload),
            ),
            (
                "destination_workload_namespace",
                or_unknown(&self.destination_workload_namespace),
            ),
            (
                "destination_principal",
                or_unknown(&self.destination_principal),
            ),
            ("destination_app", or_unknown(&self.destination_app)),
            ("destination_service", or_unknown(&self.destination_service)),
            (
                "destination_service_name",
                or_unknown(&self.destination_service_name),
            ),
            (
                "destination_service_namespace",
                or_unknown(&self.destination_service_namespace),
            ),
            (
                "connection_security_policy",
                or_unknown(&self.connection_security_policy),
            ),
            (
                "response_flags",
                if self.response_flags.is_empty() {
                    "-".to_owned()
                } else {
                    self.response_flags.clone()
                },
            ),
        ]
    }
}

/// Counters for one label set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub opened: u64,
    pub closed: u64,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.sent_bytes += o.sent_bytes;
        self.received_bytes += o.received_bytes;
        self.opened += o.opened;
        self.closed += o.closed;
    }
}

/// Joins a kernel flow to the workloads at its ends. `None`: the flow is not
/// this node's to report (e.g. a namespace it did not enroll).
pub trait FlowResolver: Send + Sync {
    fn labels(&self, flow: &FlowEntry) -> Option<FlowLabels>;
}

/// Where the flows come from: the kernel map (a [`mesh_ebpf::Datapath`]) in
/// the proxy, a fixed list in tests.
pub trait FlowSource: Send {
    fn flows(&mut self) -> Result<Vec<FlowEntry>, String>;
    /// Drops a closed flow once it has been folded into the totals.
    fn forget(&mut self, cookie: u64) -> Result<(), String>;
}

impl FlowSource for mesh_ebpf::Datapath {
    fn flows(&mut self) -> Result<Vec<FlowEntry>, String> {
        mesh_ebpf::Datapath::flows(self).map_err(|e| e.to_string())
    }
    fn forget(&mut self, cookie: u64) -> Result<(), String> {
        self.forget_flow(cookie).map_err(|e| e.to_string())
    }
}

/// The TCP metrics of one node proxy.
pub struct TcpMetrics {
    source: Mutex<Box<dyn FlowSource>>,
    resolver: Arc<dyn FlowResolver>,
    /// Totals of flows that closed and left the kernel map.
    closed: Mutex<BTreeMap<FlowLabels, Totals>>,
}

impl std::fmt::Debug for TcpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpMetrics").finish_non_exhaustive()
    }
}

impl TcpMetrics {
    pub fn new(source: Box<dyn FlowSource>, resolver: Arc<dyn FlowResolver>) -> Self {
        TcpMetrics {
            source: Mutex::new(source),
            resolver,
            closed: Mutex::new(BTreeMap::new()),
        }
    }

    /// Reads the kernel's flows now and returns the totals per label set:
    /// closed flows folded in earlier plus the open ones as they stand. Each
    /// flow counts as opened exactly once and closed at most once.
    pub fn snapshot(&self) -> Result<BTreeMap<FlowLabels, Totals>, String> {
        let mut source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let flows = source.flows()?;
        let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        let mut open: BTreeMap<FlowLabels, Totals> = BTreeMap::new();
        for f in &flows {
            let Some(labels) = self.resolver.labels(f) else {
                continue;
            };
            let t = Totals {
                sent_bytes: f.bytes_sent,
                received_bytes: f.bytes_received,
                opened: 1,
                closed: u64::from(f.is_closed()),
            };
            if f.is_closed() {
                // Fold first, forget second: a failed forget double-counts
                // nothing because the entry is skipped once folded.
                closed.entry(labels).or_default().add(t);
                if let Err(e) = source.forget(f.cookie) {
                    tracing::warn!(cookie = f.cookie, error = %e, "could not drop a closed flow");
                }
            } else {
                open.entry(labels).or_default().add(t);
            }
        }
        let mut all = closed.clone();
        for (l, t) in open {
            all.entry(l).or_default().add(t);
        }
        Ok(all)
    }
}

impl Collector for TcpMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = match self.snapshot() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "reading the kernel flow map failed");
                return Ok(());
            }
        };
        type Pick = fn(&Totals) -> u64;
        let families: [(&str, &str, Pick); 4] = [
            (
                "istio_tcp_sent_bytes",
                "Bytes sent by the source workload (counted in the kernel).",
                |t| t.sent_bytes,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received by the source workload (counted in the kernel).",
                |t| t.received_bytes,
            ),
            (
                "istio_tcp_connections_opened",
                "TCP connections opened.",
                |t| t.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed.",
                |t| t.closed,
            ),
        ];
        for (name, help, pick) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, totals) in &snapshot {
                let set = labels.label_set();
                ConstCounter::new(pick(totals)).encode(family.encode_family(&set)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    struct Fixed(Arc<Mutex<Vec<FlowEntry>>>);
    impl FlowSource for Fixed {
        fn flows(&mut self) -> Result<Vec<FlowEntry>, String> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn forget(&mut self, cookie: u64) -> Result<(), String> {
            self.0.lock().unwrap().retain(|f| f.cookie != cookie);
            Ok(())
        }
    }

    struct ByPort;
    impl FlowResolver for ByPort {
        fn labels(&self, f: &FlowEntry) -> Option<FlowLabels> {
            (f.netns == 1).then(|| FlowLabels {
                source_workload: "client".into(),
                destination_workload: format!("port-{}", f.original_dst.port()),
                connection_security_policy: "mutual_tls".into(),
                ..FlowLabels::default()
            })
        }
    }

    fn flow(cookie: u64, netns: u64, port: u16, sent: u64, recv: u64, closed: bool) -> FlowEntry {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        FlowEntry {
            cookie,
            netns,
            src: a,
            dst: "127.0.0.1:15001".parse().unwrap(),
            original_dst: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
            bytes_sent: sent,
            bytes_received: recv,
            start_ns: 1,
            end_ns: u64::from(closed),
            tcp_state: if closed {
                mesh_ebpf::tcp_state::CLOSE
            } else {
                mesh_ebpf::tcp_state::ESTABLISHED
            },
            srtt_us: 0,
            redirected: false,
            direction: mesh_ebpf::Direction::Outbound,
        }
    }

    fn render(m: TcpMetrics) -> (String, Arc<TcpMetrics>) {
        let m = Arc::new(m);
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(m.clone()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        (out, m)
    }

    #[test]
    fn closed_flows_fold_into_monotonic_totals_and_leave_the_map() {
        let flows = Arc::new(Mutex::new(vec![
            flow(1, 1, 8080, 100, 10, true),
            flow(2, 1, 8080, 50, 5, false),
            flow(3, 2, 8080, 999, 999, false), // another node's netns
        ]));
        let m = TcpMetrics::new(Box::new(Fixed(flows.clone())), Arc::new(ByPort));
        let first = m.snapshot().unwrap();
        let labels = first.keys().next().unwrap().clone();
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[&labels],
            Totals {
                sent_bytes: 150,
                received_bytes: 15,
                opened: 2,
                closed: 1
            }
        );
        assert_eq!(flows.lock().unwrap().len(), 2, "closed flow not dropped");
        // The open flow moves on, then closes: totals only grow.
        *flows.lock().unwrap() = vec![flow(2, 1, 8080, 70, 9, true)];
        let second = m.snapshot().unwrap();
        assert_eq!(
            second[&labels],
            Totals {
                sent_bytes: 170,
                received_bytes: 19,
                opened: 2,
                closed: 2
            }
        );
    }

    #[test]
    fn exposition_has_istio_names_and_labels() {
        let flows = Arc::new(Mutex::new(vec![flow(1, 1, 8080, 1234, 56, false)]));
        let (text, _) = render(TcpMetrics::new(Box::new(Fixed(flows)), Arc::new(ByPort)));
        assert!(
            text.contains("# TYPE istio_tcp_sent_bytes counter"),
            "{text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total{"))
            .unwrap();
        assert!(line.ends_with(" 1234"), "{line}");
        for l in [
            "reporter=\"source\"",
            "source_workload=\"client\"",
            "destination_workload=\"port-8080\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_flags=\"-\"",
            "source_principal=\"unknown\"",
        ] {
            assert!(line.contains(l), "{l} missing in {line}");
        }
        assert!(text.contains("istio_tcp_connections_opened_total{"));
    }
}
