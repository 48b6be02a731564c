//! TCP latency you can see, aggregated in the kernel: the histograms of
//! `sm_tcp_hist` as Prometheus families with the `istio_tcp_*` labels.
//!
//! - `sockmesh_tcp_rtt_seconds` (histogram): the smoothed RTT of the HBONE
//!   tunnels between a pair of pods, one sample per RTT update of the
//!   kernel (each ACK that measured one), so a busy tunnel weighs more.
//!   `reporter="source"` from the client end (the source pod's netns),
//!   `reporter="destination"` from the server end.
//! - `sockmesh_tcp_connection_duration_seconds` (histogram): how long the
//!   source pod's app connections lasted, recorded when they close
//!   (`reporter="source"` only: a delivery's kernel end does not know its
//!   source).
//! - `sockmesh_tcp_retransmits_total`, `sockmesh_tcp_rto_total`
//!   (counters): segments the tunnels retransmitted, retransmission
//!   timeouts that fired.
//!
//! Buckets are powers of two: bucket `i` holds the integer samples `v`
//! with `floor(log2(v)) == i`, so its `le` bound is `2^(i+1) - 1` units
//! (microseconds for RTT, milliseconds for durations), the last bucket
//! `+Inf`. Nothing is read per packet: the kernel adds each sample to its
//! CPU's copy of the entry, and a scrape sums them.
//!
//! Entries are followed by key; an entry whose pod is no longer this
//! node's (unenrolled) is folded into its series and removed from the
//! kernel map, so the map holds live pods only and no value ever goes
//! down. An entry never joined to a pod (its pod left before a scrape saw
//! it) is removed once it has stayed so for [`UNRESOLVED_GRACE`] (not at
//! once: right after a restart the proxy may not have re-enrolled its
//! pods yet). The kernel entries are pinned (they survive a proxy restart);
//! the folded values of departed pods are kept in memory only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::identity::{Clock, SystemClock};
use mesh_ebpf::{
    Direction, FlowEntry, HBONE_PORT, HIST_BUCKETS, HistEntry, HistKey, HistKind, TcpHist,
    hist_bucket_max,
};
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::{FlowLabels, FlowMapError, FlowResolver, Reporter, SeriesLabels};

/// Where the histogram entries come from: the kernel map (a
/// [`mesh_ebpf::HistTable`]) in the proxy, a fixed list in tests.
pub trait HistSource: Send {
    fn entries(&mut self) -> Result<Vec<HistEntry>, FlowMapError>;
    /// Removes an entry once its last values are folded (its pod is gone).
    fn forget(&mut self, key: &HistKey) -> Result<(), FlowMapError>;
}

impl HistSource for mesh_ebpf::HistTable {
    fn entries(&mut self) -> Result<Vec<HistEntry>, FlowMapError> {
        Ok(mesh_ebpf::HistTable::entries(self)?)
    }
    fn forget(&mut self, key: &HistKey) -> Result<(), FlowMapError> {
        Ok(mesh_ebpf::HistTable::forget(self, key)?)
    }
}

/// RTT samples per second (microseconds), duration samples per second
/// (milliseconds). Divided by (not multiplied by the inverse), so bounds
/// print exactly (`0.000015`, not `0.000014999999999999999`).
pub const RTT_UNITS_PER_SECOND: f64 = 1e6;
pub const DURATION_UNITS_PER_SECOND: f64 = 1e3;

/// A log2 histogram: per-bucket counts (not cumulative), the sample count
/// and the sum of the samples, in the kernel's unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buckets {
    pub counts: [u64; HIST_BUCKETS],
    pub count: u64,
    pub sum: u64,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            counts: [0; HIST_BUCKETS],
            count: 0,
            sum: 0,
        }
    }
}

impl Buckets {
    fn of(h: &TcpHist) -> Buckets {
        Buckets {
            counts: h.buckets,
            count: h.count,
            sum: h.sum,
        }
    }

    fn add(&mut self, o: &Buckets) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a = a.saturating_add(b);
        }
        self.count = self.count.saturating_add(o.count);
        self.sum = self.sum.saturating_add(o.sum);
    }

    /// The `q` quantile (0..=1) in the kernel's unit, interpolated
    /// geometrically inside its bucket (`[2^i, 2^(i+1))`; bucket 0 is
    /// `[0, 2)`). `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        mesh_core::admin::log2_quantile(&self.counts, q)
    }

    /// `(le in seconds, count)` pairs as prometheus-client takes them
    /// (per bucket; `f64::MAX` is `+Inf`).
    fn prometheus(&self, per_second: f64) -> Vec<(f64, u64)> {
        (0..HIST_BUCKETS)
            .map(|i| {
                let le = hist_bucket_max(i).map_or(f64::MAX, |m| m as f64 / per_second);
                (le, self.counts[i])
            })
            .collect()
    }
}

/// The latency of one series.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Tunnel RTT samples, microseconds.
    pub rtt: Buckets,
    /// Connection durations, milliseconds.
    pub duration: Buckets,
    pub retransmits: u64,
    pub rtos: u64,
}

impl Latency {
    fn of(e: &HistEntry) -> Latency {
        let mut l = Latency::default();
        match e.kind {
            HistKind::FlowDuration => l.duration = Buckets::of(&e.hist),
            HistKind::TunnelOut | HistKind::TunnelIn => {
                l.rtt = Buckets::of(&e.hist);
                l.retransmits = e.hist.retransmits;
                l.rtos = e.hist.rtos;
            }
        }
        l
    }

    fn add(&mut self, o: &Latency) {
        self.rtt.add(&o.rtt);
        self.duration.add(&o.duration);
        self.retransmits = self.retransmits.saturating_add(o.retransmits);
        self.rtos = self.rtos.saturating_add(o.rtos);
    }

    /// Whether every value of `self` is at least `o`'s (a kernel entry
    /// only grows; one that shrank was removed and made anew).
    fn covers(&self, o: &Latency) -> bool {
        self.rtt.count >= o.rtt.count
            && self.duration.count >= o.duration.count
            && self.retransmits >= o.retransmits
            && self.rtos >= o.rtos
    }
}

/// Swaps the two ends of a set of labels.
fn swapped(l: FlowLabels) -> FlowLabels {
    FlowLabels {
        source_workload: l.destination_workload,
        source_workload_namespace: l.destination_workload_namespace,
        source_principal: l.destination_principal,
        source_app: l.destination_app,
        source_version: l.destination_version,
        destination_workload: l.source_workload,
        destination_workload_namespace: l.source_workload_namespace,
        destination_principal: l.source_principal,
        destination_app: l.source_app,
        destination_version: l.source_version,
        ..l
    }
}

/// The reporter and labels of a histogram entry, through the same join as
/// the `istio_tcp_*` families: the entry is presented to the resolver as
/// an outbound flow of its pod (`netns`) to its remote address. A tunnel's
/// server end is the pod it enters connecting "out" to the source, so its
/// labels are swapped back. `None`: not this node's pod (or gone).
pub fn hist_labels(resolver: &dyn FlowResolver, e: &HistEntry) -> Option<(Reporter, FlowLabels)> {
    let port = match e.kind {
        HistKind::TunnelOut => HBONE_PORT,
        _ => 0,
    };
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    let probe = FlowEntry {
        cookie: 0,
        netns: e.netns,
        src: any,
        dst: any,
        original_dst: SocketAddr::new(e.remote, port),
        bytes_sent: 0,
        bytes_received: 0,
        start_ns: 0,
        end_ns: 0,
        tcp_state: 0,
        srtt_us: 0,
        redirected: false,
        peer_open: false,
        direction: Direction::Outbound,
        direct: false,
    };
    let l = resolver.labels(&probe)?;
    Some(match e.kind {
        HistKind::TunnelIn => (Reporter::Destination, swapped(l)),
        HistKind::TunnelOut | HistKind::FlowDuration => (Reporter::Source, l),
    })
}

struct Followed {
    series: Arc<SeriesLabels>,
    last: Latency,
}

/// How long an entry no pod of this node claims stays in the kernel map.
pub const UNRESOLVED_GRACE: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Inner {
    live: HashMap<HistKey, Followed>,
    folded: BTreeMap<SeriesLabels, Latency>,
    /// Entries never joined to a pod, since when.
    unresolved: HashMap<HistKey, SystemTime>,
}

impl Inner {
    fn fold(&mut self, f: Followed) {
        self.folded
            .entry(f.series.as_ref().clone())
            .or_default()
            .add(&f.last);
    }
}

/// The latency families of one node proxy.
pub struct TcpLatency {
    source: Mutex<Box<dyn HistSource>>,
    resolver: Arc<dyn FlowResolver>,
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for TcpLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLatency").finish_non_exhaustive()
    }
}

impl TcpLatency {
    pub fn new(source: Box<dyn HistSource>, resolver: Arc<dyn FlowResolver>) -> Self {
        TcpLatency {
            source: Mutex::new(source),
            resolver,
            inner: Mutex::new(Inner::default()),
            clock: Arc::new(SystemClock),
        }
    }

    /// The clock that dates unresolved entries (tests move it by hand).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Reads the kernel's histograms now: per series, what departed pods
    /// left plus the live entries as they stand. No value is ever lower
    /// than in an earlier snapshot.
    pub fn snapshot(&self) -> Result<BTreeMap<SeriesLabels, Latency>, FlowMapError> {
        let mut source = self.source.lock();
        let entries = source.entries()?;
        let mut guard = self.inner.lock();
        let inner: &mut Inner = &mut guard;
        let mut present = HashSet::with_capacity(entries.len());
        for e in &entries {
            // Resolved at every scrape: an entry whose pod left this node
            // is folded and removed from the kernel map (labels stay those
            // of its first sight).
            let labels = hist_labels(self.resolver.as_ref(), e);
            let now = Latency::of(e);
            match (inner.live.remove(&e.key), labels) {
                (Some(f), None) => {
                    // Its pod is gone: its latest values join the series
                    // and the entry leaves the kernel map.
                    let last = if now.covers(&f.last) {
                        now
                    } else {
                        let mut both = f.last.clone();
                        both.add(&now);
                        both
                    };
                    inner.fold(Followed {
                        series: f.series,
                        last,
                    });
                    if let Err(err) = source.forget(&e.key) {
                        tracing::warn!(error = %err, "could not drop a histogram entry");
                    }
                }
                (None, None) => {
                    let now = self.clock.now();
                    let since = *inner.unresolved.entry(e.key).or_insert(now);
                    if now.duration_since(since).unwrap_or_default() >= UNRESOLVED_GRACE {
                        match source.forget(&e.key) {
                            Ok(()) => {
                                inner.unresolved.remove(&e.key);
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "could not drop a histogram entry")
                            }
                        }
                    }
                }
                (Some(f), Some(_)) => {
                    present.insert(e.key);
                    if now.covers(&f.last) {
                        inner.live.insert(
                            e.key,
                            Followed {
                                series: f.series,
                                last: now,
                            },
                        );
                    } else {
                        // Removed and made anew in between: keep what the
                        // old entry had counted.
                        let series = f.series.clone();
                        inner.fold(f);
                        inner.live.insert(e.key, Followed { series, last: now });
                    }
                }
                (None, Some((reporter, l))) => {
                    present.insert(e.key);
                    inner.unresolved.remove(&e.key);
                    let series = Arc::new(SeriesLabels::new(reporter, &l));
                    inner.live.insert(e.key, Followed { series, last: now });
                }
            }
        }
        drop(source);
        let seen: HashSet<HistKey> = entries.iter().map(|e| e.key).collect();
        inner.unresolved.retain(|k, _| seen.contains(k));
        let gone: Vec<HistKey> = inner
            .live
            .keys()
            .filter(|k| !present.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(f) = inner.live.remove(&k) {
                inner.fold(f);
            }
        }
        let mut all = inner.folded.clone();
        for f in inner.live.values() {
            all.entry(f.series.as_ref().clone())
                .or_default()
                .add(&f.last);
        }
        Ok(all)
    }
}

/// HELP texts (the bucket bounds are part of the contract).
pub const RTT_HELP: &str = "Smoothed TCP round-trip time of the HBONE tunnels between the two \
     workloads, one sample per kernel RTT update, aggregated in the kernel. Buckets are powers of \
     two: le = (2^(i+1) - 1) microseconds, i = 0..30, then +Inf.";
pub const DURATION_HELP: &str = "Duration of the source workload's TCP connections, recorded in \
     the kernel when they close. Buckets are powers of two: le = (2^(i+1) - 1) milliseconds, \
     i = 0..30, then +Inf.";
pub const RETRANSMITS_HELP: &str = "TCP segments retransmitted by the HBONE tunnels between the two workloads, counted in the kernel.";
pub const RTO_HELP: &str = "TCP retransmission timeouts of the HBONE tunnels between the two workloads, counted in the kernel.";

impl Collector for TcpLatency {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = match self.snapshot() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "reading the kernel histogram map failed");
                return Ok(());
            }
        };
        type Pick = fn(&Latency) -> &Buckets;
        let hists: [(&str, &str, Pick, f64); 2] = [
            (
                "sockmesh_tcp_rtt_seconds",
                RTT_HELP,
                |l| &l.rtt,
                RTT_UNITS_PER_SECOND,
            ),
            (
                "sockmesh_tcp_connection_duration_seconds",
                DURATION_HELP,
                |l| &l.duration,
                DURATION_UNITS_PER_SECOND,
            ),
        ];
        for (name, help, pick, unit) in hists {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (labels, lat) in &snapshot {
                let b = pick(lat);
                if b.count == 0 {
                    continue;
                }
                family
                    .encode_family(labels)?
                    .encode_histogram::<NoLabelSet>(
                        b.sum as f64 / unit,
                        b.count,
                        &b.prometheus(unit),
                        None,
                    )?;
            }
        }
        type Count = fn(&Latency) -> u64;
        let counters: [(&str, &str, Count); 2] = [
            ("sockmesh_tcp_retransmits", RETRANSMITS_HELP, |l| {
                l.retransmits
            }),
            ("sockmesh_tcp_rto", RTO_HELP, |l| l.rtos),
        ];
        for (name, help, pick) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, lat) in snapshot.iter().filter(|(_, l)| l.rtt.count > 0) {
                ConstCounter::new(pick(lat)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// The RTT of every tunnel end of this node, by (netns, peer address,
/// side): one read of the kernel map, for `/flows` and `/explain`.
pub type TunnelRtts = HashMap<(u64, IpAddr, HistKind), mesh_core::admin::PathRtt>;

impl crate::proxy::NodeProxy {
    /// See [`TunnelRtts`]. Empty when the map cannot be read.
    pub fn tunnel_rtts(&self) -> TunnelRtts {
        let entries = self.datapath.lock().histograms().unwrap_or_default();
        entries
            .into_iter()
            .filter(|e| e.kind != HistKind::FlowDuration)
            .filter_map(|e| {
                let side = if e.kind == HistKind::TunnelOut {
                    "out"
                } else {
                    "in"
                };
                let r = mesh_core::admin::PathRtt::from_buckets(
                    format!("{}/{side}/{}", e.netns, e.remote),
                    &e.hist.buckets,
                    e.hist.retransmits,
                    e.hist.rtos,
                )?;
                Some(((e.netns, e.remote, e.kind), r))
            })
            .collect()
    }

    /// The RTT of the tunnels that carry flow `f`: from its pod to the pod
    /// it reaches (outbound), or into its pod from the source (a
    /// delivery). `None` for passthrough flows (no tunnel) and tunnels
    /// with no sample yet.
    pub fn flow_rtt(&self, f: &FlowEntry, rtts: &TunnelRtts) -> Option<mesh_core::admin::PathRtt> {
        let (peer, kind) = match f.direction {
            Direction::Outbound => {
                let pod = self.destination_pod(f)?;
                let (ns, name) = pod.split_once('/')?;
                let snap = self.registry.snapshot();
                let p = snap.pod(ns, name)?;
                let ip = p
                    .ips
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == f.original_dst.is_ipv4())
                    .or_else(|| p.ips.first().copied())?;
                (ip, HistKind::TunnelOut)
            }
            Direction::Inbound => match self.notes.get(f.cookie) {
                Some(crate::notes::Note::Delivery { source_ip, .. }) => {
                    (source_ip, HistKind::TunnelIn)
                }
                _ => return None,
            },
        };
        rtts.get(&(f.netns, peer, kind)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::super::exposition::{self, Format};
    use super::super::tests::{ByPort, promtool_accepts};
    use super::*;
    use mesh_ebpf::{AF_INET, HIST_FLOW, HIST_TUNNEL_IN, HIST_TUNNEL_OUT, hist_bucket};

    struct Fixed(Arc<Mutex<Vec<HistEntry>>>);
    impl HistSource for Fixed {
        fn entries(&mut self) -> Result<Vec<HistEntry>, FlowMapError> {
            Ok(self.0.lock().clone())
        }
        fn forget(&mut self, key: &HistKey) -> Result<(), FlowMapError> {
            self.0.lock().retain(|e| e.key != *key);
            Ok(())
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An entry of `netns` with samples `rtt` (or durations) in its buckets.
    fn entry(netns: u64, kind: u16, remote: &str, samples: &[u64], retrans: u64) -> HistEntry {
        let (family, remote_ip) = mesh_ebpf::words_from_ip(ip(remote));
        let key = HistKey {
            netns,
            local_ip: [0; 4],
            remote_ip,
            family,
            kind,
            _pad: 0,
        };
        let mut hist = TcpHist::default();
        for &v in samples {
            hist.buckets[hist_bucket(v)] += 1;
            hist.count += 1;
            hist.sum += v;
        }
        hist.retransmits = retrans;
        HistEntry {
            key,
            kind: match kind {
                HIST_TUNNEL_OUT => HistKind::TunnelOut,
                HIST_TUNNEL_IN => HistKind::TunnelIn,
                _ => HistKind::FlowDuration,
            },
            netns,
            local: None,
            remote: ip(remote),
            hist,
        }
    }

    fn latency(entries: Vec<HistEntry>) -> (Arc<TcpLatency>, Arc<Mutex<Vec<HistEntry>>>) {
        let shared = Arc::new(Mutex::new(entries));
        let l = TcpLatency::new(Box::new(Fixed(shared.clone())), Arc::new(ByPort::default()));
        (Arc::new(l), shared)
    }

    fn render(l: &Arc<TcpLatency>, format: Format) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(l.clone()));
        exposition::encode(&reg, format).unwrap()
    }

    fn sample(body: &str, prefix: &str) -> f64 {
        let line = body
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn tunnels_and_durations_become_histograms_with_istio_labels_that_pass_promtool() {
        // Client end (source reporter): 3 samples ~100 us; server end: one
        // of 5 ms; 2 connections of 150 ms and 3 s.
        let (l, _) = latency(vec![
            entry(1, HIST_TUNNEL_OUT, "10.0.0.2", &[90, 100, 110], 4),
            entry(1, HIST_TUNNEL_IN, "10.0.0.3", &[5000], 0),
            entry(1, HIST_FLOW, "10.0.0.2", &[150, 3000], 0),
            entry(2, HIST_TUNNEL_OUT, "10.0.0.9", &[1], 0), // not this node's
        ]);
        let text = render(&l, Format::Text);
        promtool_accepts(&text, Format::Text);
        promtool_accepts(&render(&l, Format::OpenMetrics), Format::OpenMetrics);
        assert!(
            text.contains("# TYPE sockmesh_tcp_rtt_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sockmesh_tcp_retransmits_total counter\n"),
            "{text}"
        );
        let src = "sockmesh_tcp_rtt_seconds_bucket{";
        // 90..110 us: bucket 6 ([64, 128) us, le 127 us) holds all three.
        let le = |body: &str, le: &str| {
            body.lines()
                .find(|l| {
                    l.starts_with(src)
                        && l.contains("reporter=\"source\"")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        };
        assert_eq!(le(&text, "0.000063"), Some(0), "{text}");
        assert_eq!(le(&text, "0.000127"), Some(3), "{text}");
        assert_eq!(le(&text, "+Inf"), Some(3), "{text}");
        assert!(
            (sample(&text, "sockmesh_tcp_rtt_seconds_sum{reporter=\"source\"") - 300e-6).abs()
                < 1e-9
        );
        // The server end: reporter destination, with the ends swapped back.
        let dst = text
            .lines()
            .find(|l| l.starts_with("sockmesh_tcp_rtt_seconds_count{reporter=\"destination\""))
            .unwrap();
        assert!(dst.contains("source_workload=\"port-0\""), "{dst}");
        assert!(dst.contains("destination_workload=\"client\""), "{dst}");
        assert_eq!(
            sample(&text, "sockmesh_tcp_retransmits_total{reporter=\"source\""),
            4.0
        );
        // Durations: 150 ms in [128, 256) ms, 3 s in [2048, 4096) ms.
        let d = "sockmesh_tcp_connection_duration_seconds_bucket{";
        let dur = |le: &str| {
            text.lines()
                .find(|l| l.starts_with(d) && l.contains(&format!("le=\"{le}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        };
        assert_eq!(dur("0.127"), Some(0));
        assert_eq!(dur("0.255"), Some(1));
        assert_eq!(dur("2.047"), Some(1));
        assert_eq!(dur("4.095"), Some(2));
        assert!(!text.contains("10.0.0.9"), "{text}");
    }

    #[test]
    fn an_entry_of_a_departed_pod_is_folded_and_leaves_the_kernel_map() {
        let (l, shared) = latency(vec![entry(1, HIST_TUNNEL_OUT, "10.0.0.2", &[100], 2)]);
        let first = l.snapshot().unwrap();
        assert_eq!(first.values().next().unwrap().retransmits, 2);
        // The pod is gone (its netns is no longer this node's): its last
        // values stay, the kernel entry goes.
        {
            let mut e = shared.lock();
            e[0] = entry(7, HIST_TUNNEL_OUT, "10.0.0.2", &[100, 100], 5);
            e[0].key.netns = 1;
            e[0].netns = 7;
        }
        let after = l.snapshot().unwrap();
        let v = after.values().next().unwrap();
        assert_eq!((v.retransmits, v.rtt.count), (5, 2));
        assert!(shared.lock().is_empty(), "entry not removed");
        // Gone from the map: still reported, never lower.
        let later = l.snapshot().unwrap();
        assert_eq!(later, after);
    }

    #[test]
    fn an_entry_no_pod_claims_is_removed_after_the_grace_only() {
        let clock = mesh_core::identity::ManualClock::new(SystemTime::UNIX_EPOCH);
        let shared = Arc::new(Mutex::new(vec![entry(
            9,
            HIST_TUNNEL_OUT,
            "10.0.0.2",
            &[100],
            0,
        )]));
        let l = TcpLatency::new(Box::new(Fixed(shared.clone())), Arc::new(ByPort::default()))
            .with_clock(Arc::new(clock.clone()));
        assert!(l.snapshot().unwrap().is_empty());
        clock.advance(UNRESOLVED_GRACE / 2);
        l.snapshot().unwrap();
        assert_eq!(shared.lock().len(), 1, "removed before the grace");
        clock.advance(UNRESOLVED_GRACE);
        l.snapshot().unwrap();
        assert!(shared.lock().is_empty(), "kept after the grace");
    }

    #[test]
    fn an_entry_made_anew_keeps_what_the_old_one_counted() {
        let (l, shared) = latency(vec![entry(1, HIST_TUNNEL_OUT, "10.0.0.2", &[100; 4], 9)]);
        l.snapshot().unwrap();
        shared.lock()[0] = entry(1, HIST_TUNNEL_OUT, "10.0.0.2", &[100], 1);
        let s = l.snapshot().unwrap();
        let v = s.values().next().unwrap();
        assert_eq!((v.rtt.count, v.retransmits), (5, 10));
    }

    #[test]
    fn quantiles_of_a_series_come_from_its_buckets() {
        let mut b = Buckets::default();
        b.counts[hist_bucket(100)] = 99;
        b.counts[hist_bucket(10_000)] = 1;
        let p50 = b.quantile(0.5).unwrap();
        assert!((64.0..128.0).contains(&p50), "{p50}");
        let p99 = b.quantile(0.995).unwrap();
        assert!((8192.0..16384.0).contains(&p99), "{p99}");
        let _ = AF_INET;
    }
}
