//! Istio-compatible TCP metrics, counted in the kernel.
//!
//! The byte counts come from the kernel's flow map (`sm_flows`), read only at
//! scrape time and joined to workload identities then — no per-packet work in
//! user space. Names and labels follow Istio's standard TCP metrics (as
//! ztunnel emits them), so existing dashboards and Kiali work:
//!
//! - **Both reporters.** A flow's [`mesh_ebpf::Direction`] picks the reporter:
//!   `Outbound` (the source pod's app socket) is `reporter="source"`,
//!   `Inbound` (the destination proxy's delivery into a pod) is
//!   `reporter="destination"`. The reporter is part of the series key, so the
//!   two sides of one connection are never summed into one series.
//! - **Sent and received, as Istio orients them.** For *both* reporters
//!   `istio_tcp_received_bytes_total` counts the request direction (bytes the
//!   source workload sent towards the destination) and
//!   `istio_tcp_sent_bytes_total` the response direction (bytes the
//!   destination sent back). That is ztunnel's `copy_bidirectional`: client →
//!   server bytes go to `received_bytes`, server → client bytes to
//!   `sent_bytes`, on the outbound and the inbound side alike (and Istio's
//!   standard metrics: "sent during response", "received during request").
//!   The kernel's `bytes_sent` (what the source sent, for either direction)
//!   is therefore `received_bytes` here, and `bytes_received` is `sent_bytes`.
//! - **Bounded cardinality.** Destinations outside the mesh are labelled as
//!   ztunnel labels passthrough traffic: every destination label `unknown`
//!   ([`FlowLabels::unknown_destination`]). A workload label that is an IP
//!   address is replaced by `unknown` as a last guard, so the number of series
//!   follows the number of workloads, never the number of addresses.
//! - **Monotonic counters.** The last values seen for each flow (by socket
//!   cookie) are kept; when a flow leaves the kernel map — closed and
//!   forgotten, evicted from the LRU map while still open, or gone with its
//!   pod — its last values are folded into its series' totals, so a counter
//!   never goes down. The totals and the flows being followed are persisted
//!   (JSON, written atomically, at most once per scrape and on shutdown), so
//!   a restarted proxy continues them. A series may disappear (allowed by
//!   Prometheus) once its workloads are gone and it has not changed for the
//!   retention period.
//!
//! [`exposition`] renders a registry as Prometheus text 0.0.4 (the default)
//! or OpenMetrics, as the scraper's `Accept` header asks.

mod labels;
pub mod latency;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::identity::{Clock, SystemClock};
use mesh_ebpf::{Direction, FlowEntry};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use serde::{Deserialize, Serialize};

/// How long a series whose workloads are gone keeps its totals after its
/// last change, by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);

/// The identity of both ends of a flow, as Istio labels them. Empty fields
/// are exposed as `unknown` (`response_flags`: `-`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    /// Istio's `version` label of the source pod.
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `mutual_tls` for HBONE; `unknown` for plaintext passthrough (as
    /// ztunnel reports it).
    pub connection_security_policy: String,
    /// `-` when the connection was not refused; Istio's flags otherwise
    /// (`UF` upstream failure, `RBAC` denied by policy, ...).
    pub response_flags: String,
}

impl FlowLabels {
    /// These labels with a destination outside the mesh, labelled as ztunnel
    /// labels passthrough traffic: the destination workload, its namespace,
    /// principal and app are `unknown` (never the address: one series per
    /// source workload, not one per destination IP), the connection is not
    /// mutual TLS (`unknown`). Service labels the resolver set (a Service
    /// VIP that had no endpoint) are kept; unset, they are `unknown` too.
    pub fn unknown_destination(self) -> FlowLabels {
        FlowLabels {
            destination_workload: String::new(),
            destination_workload_namespace: String::new(),
            destination_principal: String::new(),
            destination_app: String::new(),
            destination_version: String::new(),
            connection_security_policy: "unknown".to_owned(),
            ..self
        }
    }
}

/// Which proxy reports a series: the source's (outbound flows) or the
/// destination's (inbound flows). Istio's `reporter` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn of(direction: Direction) -> Reporter {
        match direction {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// A label value, escaped on the way out (`\` `"` and newlines, the same in
/// text 0.0.4 and OpenMetrics; prometheus-client writes values verbatim).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LabelValue(String);

impl LabelValue {
    fn or(s: &str, default: &str) -> LabelValue {
        LabelValue(if s.is_empty() { default } else { s }.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn unknown() -> LabelValue {
        LabelValue("unknown".to_owned())
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let mut rest = self.0.as_str();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

/// One series of the `istio_tcp_*` families: the reporter and the labels of
/// both ends. The key of the totals, so the two reporters never merge.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, EncodeLabelSet,
)]
pub struct SeriesLabels {
    pub reporter: Reporter,
    pub request_protocol: LabelValue,
    pub source_workload: LabelValue,
    pub source_workload_namespace: LabelValue,
    pub source_principal: LabelValue,
    pub source_app: LabelValue,
    /// Added after the state file's first format: absent in an old one.
    #[serde(default = "LabelValue::unknown")]
    pub source_version: LabelValue,
    pub destination_workload: LabelValue,
    pub destination_workload_namespace: LabelValue,
    pub destination_principal: LabelValue,
    pub destination_app: LabelValue,
    #[serde(default = "LabelValue::unknown")]
    pub destination_version: LabelValue,
    pub destination_service: LabelValue,
    pub destination_service_name: LabelValue,
    pub destination_service_namespace: LabelValue,
    pub connection_security_policy: LabelValue,
    pub response_flags: LabelValue,
}

/// A workload name that is an address (`10.0.0.1`, `[::1]:80`): never a
/// label value, or every address would be its own series.
fn is_address(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || s.parse::<SocketAddr>().is_ok()
}

impl SeriesLabels {
    pub fn new(reporter: Reporter, l: &FlowLabels) -> SeriesLabels {
        let workload = |s: &str| {
            if is_address(s) {
                tracing::debug!(
                    value = s,
                    "an address in a workload label: labelled unknown"
                );
                LabelValue::or("", "unknown")
            } else {
                LabelValue::or(s, "unknown")
            }
        };
        let u = |s: &str| LabelValue::or(s, "unknown");
        SeriesLabels {
            reporter,
            request_protocol: LabelValue("tcp".to_owned()),
            source_workload: workload(&l.source_workload),
            source_workload_namespace: u(&l.source_workload_namespace),
            source_principal: u(&l.source_principal),
            source_app: u(&l.source_app),
            source_version: u(&l.source_version),
            destination_workload: workload(&l.destination_workload),
            destination_workload_namespace: u(&l.destination_workload_namespace),
            destination_principal: u(&l.destination_principal),
            destination_app: u(&l.destination_app),
            destination_version: u(&l.destination_version),
            destination_service: workload(&l.destination_service),
            destination_service_name: u(&l.destination_service_name),
            destination_service_namespace: u(&l.destination_service_namespace),
            connection_security_policy: u(&l.connection_security_policy),
            response_flags: LabelValue::or(&l.response_flags, "-"),
        }
    }

    /// The workloads this series names (namespace, workload), `unknown`
    /// ones left out.
    fn workloads(&self) -> impl Iterator<Item = (&str, &str)> {
        [
            (&self.source_workload_namespace, &self.source_workload),
            (
                &self.destination_workload_namespace,
                &self.destination_workload,
            ),
        ]
        .into_iter()
        .filter(|(_, w)| w.as_str() != "unknown")
        .map(|(ns, w)| (ns.as_str(), w.as_str()))
    }
}

/// Counters for one series, with Istio's orientation (see the module doc):
/// `received_bytes` the request direction, `sent_bytes` the response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub opened: u64,
    pub closed: u64,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.sent_bytes = self.sent_bytes.saturating_add(o.sent_bytes);
        self.received_bytes = self.received_bytes.saturating_add(o.received_bytes);
        self.opened = self.opened.saturating_add(o.opened);
        self.closed = self.closed.saturating_add(o.closed);
    }
}

/// Joins a kernel flow to the workloads at its ends. `None`: the flow is not
/// this node's to report (e.g. a namespace it did not enroll).
pub trait FlowResolver: Send + Sync {
    /// Build the labels with [`FlowLabels::unknown_destination`] for a
    /// destination outside the mesh.
    fn labels(&self, flow: &FlowEntry) -> Option<FlowLabels>;

    /// Whether a workload (`namespace`, workload label as in
    /// [`FlowLabels`]) still exists. A series naming a workload that is gone
    /// is dropped once it has not changed for the retention period. The
    /// default keeps every series.
    fn workload_exists(&self, namespace: &str, workload: &str) -> bool {
        let _ = (namespace, workload);
        true
    }
}

/// Why the kernel flow map could not be read or trimmed (boxed: the eBPF
/// error is large and this path is not hot).
pub type FlowMapError = Box<mesh_ebpf::Error>;

/// Where the flows come from: the kernel map (a [`mesh_ebpf::Datapath`]) in
/// the proxy, a fixed list in tests.
pub trait FlowSource: Send {
    fn flows(&mut self) -> Result<Vec<FlowEntry>, FlowMapError>;
    /// Drops a closed flow once it has been folded into the totals.
    fn forget(&mut self, cookie: u64) -> Result<(), FlowMapError>;
}

impl FlowSource for mesh_ebpf::Datapath {
    fn flows(&mut self) -> Result<Vec<FlowEntry>, FlowMapError> {
        Ok(mesh_ebpf::Datapath::flows(self)?)
    }
    fn forget(&mut self, cookie: u64) -> Result<(), FlowMapError> {
        Ok(self.forget_flow(cookie)?)
    }
}

/// Why the metrics state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("metrics state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics state {path}: not a metrics state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("metrics state {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The on-disk form of the totals (version 1).
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    series: Vec<SeriesRecord>,
    open: Vec<OpenRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SeriesRecord {
    labels: SeriesLabels,
    /// Totals of flows that have left the kernel map.
    folded: Totals,
    changed_unix_secs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct OpenRecord {
    cookie: u64,
    start_ns: u64,
    /// Index in `series`.
    series: usize,
    request_bytes: u64,
    response_bytes: u64,
    folded: bool,
}

const STATE_VERSION: u32 = 1;

/// A series' totals of departed flows, and when they last changed.
#[derive(Debug, Clone, Default)]
struct Series {
    folded: Totals,
    changed: u64,
}

/// A flow followed by its socket cookie: the last counts seen.
#[derive(Debug, Clone)]
struct Tracked {
    series: Arc<SeriesLabels>,
    /// Tells a reused cookie (after a reboot) from the same flow.
    start_ns: u64,
    request_bytes: u64,
    response_bytes: u64,
    /// Already folded into its series (closed; waiting for the kernel
    /// entry to go).
    folded: bool,
}

impl Tracked {
    fn totals(&self, closed: bool) -> Totals {
        Totals {
            sent_bytes: self.response_bytes,
            received_bytes: self.request_bytes,
            opened: 1,
            closed: u64::from(closed),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    series: BTreeMap<Arc<SeriesLabels>, Series>,
    open: HashMap<u64, Tracked>,
    /// Something changed since the state file was last written.
    dirty: bool,
}

impl Inner {
    /// The shared key for `labels`, creating its series.
    fn series_key(&mut self, labels: SeriesLabels, now: u64) -> Arc<SeriesLabels> {
        if let Some((k, _)) = self.series.get_key_value(&labels) {
            return k.clone();
        }
        let k = Arc::new(labels);
        self.series.insert(
            k.clone(),
            Series {
                folded: Totals::default(),
                changed: now,
            },
        );
        self.dirty = true;
        k
    }

    /// Marks a series changed now.
    fn touch(&mut self, series: &SeriesLabels, now: u64) {
        if let Some(s) = self.series.get_mut(series) {
            s.changed = now;
        }
        self.dirty = true;
    }

    /// Moves a flow's last counts into its series' totals.
    fn fold(&mut self, t: &Tracked, closed: bool, now: u64) {
        if t.folded {
            return;
        }
        let s = self.series.entry(t.series.clone()).or_default();
        s.folded.add(t.totals(closed));
        s.changed = now;
        self.dirty = true;
    }

    fn to_file(&self) -> StateFile {
        let index: HashMap<&SeriesLabels, usize> = self
            .series
            .keys()
            .enumerate()
            .map(|(i, k)| (k.as_ref(), i))
            .collect();
        StateFile {
            version: STATE_VERSION,
            series: self
                .series
                .iter()
                .map(|(k, s)| SeriesRecord {
                    labels: k.as_ref().clone(),
                    folded: s.folded,
                    changed_unix_secs: s.changed,
                })
                .collect(),
            open: self
                .open
                .iter()
                .filter_map(|(cookie, t)| {
                    Some(OpenRecord {
                        cookie: *cookie,
                        start_ns: t.start_ns,
                        series: *index.get(t.series.as_ref())?,
                        request_bytes: t.request_bytes,
                        response_bytes: t.response_bytes,
                        folded: t.folded,
                    })
                })
                .collect(),
        }
    }

    fn from_file(f: StateFile, path: &Path) -> Result<Inner, StateError> {
        let invalid = |reason: String| StateError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if f.version != STATE_VERSION {
            return Err(invalid(format!(
                "version {} (this proxy reads version {STATE_VERSION})",
                f.version
            )));
        }
        let keys: Vec<Arc<SeriesLabels>> = f
            .series
            .iter()
            .map(|s| Arc::new(s.labels.clone()))
            .collect();
        let mut inner = Inner::default();
        for (k, s) in keys.iter().zip(f.series) {
            if inner
                .series
                .insert(
                    k.clone(),
                    Series {
                        folded: s.folded,
                        changed: s.changed_unix_secs,
                    },
                )
                .is_some()
            {
                return Err(invalid("a series appears twice".to_owned()));
            }
        }
        for o in f.open {
            let series = keys.get(o.series).cloned().ok_or_else(|| {
                invalid(format!(
                    "flow {} names series {} of {}",
                    o.cookie,
                    o.series,
                    keys.len()
                ))
            })?;
            inner.open.insert(
                o.cookie,
                Tracked {
                    series,
                    start_ns: o.start_ns,
                    request_bytes: o.request_bytes,
                    response_bytes: o.response_bytes,
                    folded: o.folded,
                },
            );
        }
        Ok(inner)
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads a state file: `Ok(None)` when there is none yet.
fn load_state(path: &Path) -> Result<Option<Inner>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: StateFile = serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Inner::from_file(file, path).map(Some)
}

/// Writes `state` to `path` atomically: a temporary file next to it, synced,
/// then renamed over it.
fn write_state(path: &Path, state: &StateFile) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let body = serde_json::to_vec(state).map_err(|source| StateError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// The TCP metrics of one node proxy.
pub struct TcpMetrics {
    source: Mutex<Box<dyn FlowSource>>,
    resolver: Arc<dyn FlowResolver>,
    inner: Mutex<Inner>,
    state_path: Option<PathBuf>,
    retention: Duration,
    clock: Arc<dyn Clock>,
    /// Called once for every flow seen closed (before it is dropped from
    /// the kernel map), with its final counts.
    on_closed: Option<ClosedHook>,
}

/// See [`TcpMetrics::with_closed_hook`].
pub type ClosedHook = Box<dyn Fn(&FlowEntry) + Send + Sync>;

impl std::fmt::Debug for TcpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpMetrics")
            .field("state_path", &self.state_path)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl TcpMetrics {
    /// Metrics kept in memory only; see [`TcpMetrics::with_state_file`].
    pub fn new(source: Box<dyn FlowSource>, resolver: Arc<dyn FlowResolver>) -> Self {
        TcpMetrics {
            source: Mutex::new(source),
            resolver,
            inner: Mutex::new(Inner::default()),
            state_path: None,
            retention: DEFAULT_RETENTION,
            clock: Arc::new(SystemClock),
            on_closed: None,
        }
    }

    /// Calls `hook` once for each flow seen closed, with its final counts,
    /// before the flow leaves the kernel map (the access log of the kernel
    /// same-node path, which no proxy socket sees).
    pub fn with_closed_hook(mut self, hook: ClosedHook) -> Self {
        self.on_closed = Some(hook);
        self
    }

    /// Persists the totals at `path` (`None`: memory only) and continues
    /// from what is there. A file that cannot be read or parsed is reported
    /// with its path and set aside as `<path>.corrupt`; the counters then
    /// start at zero.
    pub fn with_state_file(mut self, path: Option<PathBuf>) -> Self {
        if let Some(p) = &path {
            match load_state(p) {
                Ok(Some(inner)) => {
                    tracing::info!(
                        path = %p.display(),
                        series = inner.series.len(),
                        flows = inner.open.len(),
                        "metrics continue from the state file"
                    );
                    self.inner = Mutex::new(inner);
                }
                Ok(None) => {
                    tracing::info!(path = %p.display(), "no metrics state yet: counters start at zero");
                }
                Err(e @ StateError::Io { .. }) => {
                    tracing::warn!(error = %e, "metrics state ignored: counters start at zero");
                }
                Err(e) => {
                    // Unusable content: kept for a look, out of the way of
                    // the next write.
                    let mut aside = p.as_os_str().to_owned();
                    aside.push(".corrupt");
                    let kept = std::fs::rename(p, &aside).is_ok();
                    tracing::warn!(
                        error = %e,
                        kept_as = kept.then(|| PathBuf::from(&aside).display().to_string()),
                        "metrics state ignored: counters start at zero"
                    );
                }
            }
        }
        self.state_path = path;
        self
    }

    /// How long a series whose workloads are gone keeps its totals after
    /// its last change ([`DEFAULT_RETENTION`] by default).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The clock that dates series changes (tests move it by hand).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Reads the kernel's flows now and returns the totals per series:
    /// flows that left the map (folded) plus the open ones as they stand.
    /// Each flow counts as opened exactly once and closed at most once; no
    /// value is ever lower than in an earlier snapshot, unless its series
    /// was pruned. Writes the state file when something changed.
    pub fn snapshot(&self) -> Result<BTreeMap<SeriesLabels, Totals>, FlowMapError> {
        let now = unix_secs(self.clock.now());
        let mut source = self.source.lock();
        let flows = source.flows()?;
        let mut guard = self.inner.lock();
        let inner: &mut Inner = &mut guard;
        let mut present = HashSet::with_capacity(flows.len());
        for f in &flows {
            present.insert(f.cookie);
            if let Entry::Occupied(e) = inner.open.entry(f.cookie)
                && e.get().start_ns != f.start_ns
            {
                // Same cookie, another flow (cookies restart with the
                // kernel): the old one has gone.
                let old = e.remove();
                inner.fold(&old, true, now);
            }
            if !inner.open.contains_key(&f.cookie) {
                // Labels are fixed when a flow is first seen: a flow keeps
                // its series even if its pod goes away.
                let Some(labels) = self.resolver.labels(f) else {
                    continue;
                };
                let labels = SeriesLabels::new(Reporter::of(f.direction), &labels);
                let series = inner.series_key(labels, now);
                inner.touch(&series, now);
                inner.open.insert(
                    f.cookie,
                    Tracked {
                        series,
                        start_ns: f.start_ns,
                        request_bytes: 0,
                        response_bytes: 0,
                        folded: false,
                    },
                );
            }
            let Some(tracked) = inner.open.get_mut(&f.cookie) else {
                continue;
            };
            if tracked.folded {
                // Folded at an earlier scrape; dropping it had failed.
                if let Err(e) = source.forget(f.cookie) {
                    tracing::warn!(cookie = f.cookie, error = %e, "could not drop a closed flow");
                }
                continue;
            }
            // Per flow the kernel's counts only grow; max() keeps that true
            // here whatever the map says.
            let (req, resp) = (
                tracked.request_bytes.max(f.bytes_sent),
                tracked.response_bytes.max(f.bytes_received),
            );
            let grew = (req, resp) != (tracked.request_bytes, tracked.response_bytes);
            tracked.request_bytes = req;
            tracked.response_bytes = resp;
            let t = tracked.clone();
            if grew {
                inner.touch(&t.series, now);
            }
            if f.is_closed() {
                if let Some(hook) = &self.on_closed {
                    hook(&FlowEntry {
                        bytes_sent: req,
                        bytes_received: resp,
                        ..f.clone()
                    });
                }
                inner.fold(&t, true, now);
                match source.forget(f.cookie) {
                    Ok(()) => {
                        inner.open.remove(&f.cookie);
                    }
                    Err(e) => {
                        tracing::warn!(cookie = f.cookie, error = %e, "could not drop a closed flow");
                        if let Some(t) = inner.open.get_mut(&f.cookie) {
                            t.folded = true;
                        }
                    }
                }
            }
        }
        drop(source);
        // Flows that left the map without being seen closed: evicted from
        // the LRU map, or removed with their pod. Their last counts stay.
        let gone: Vec<u64> = inner
            .open
            .keys()
            .filter(|c| !present.contains(c))
            .copied()
            .collect();
        for cookie in gone {
            if let Some(t) = inner.open.remove(&cookie) {
                inner.fold(&t, true, now);
                inner.dirty = true;
            }
        }
        self.prune(inner, now);

        let mut all: BTreeMap<SeriesLabels, Totals> = inner
            .series
            .iter()
            .map(|(k, s)| (k.as_ref().clone(), s.folded))
            .collect();
        for t in inner.open.values().filter(|t| !t.folded) {
            if let Some(v) = all.get_mut(t.series.as_ref()) {
                v.add(t.totals(false));
            }
        }
        if inner.dirty {
            self.persist(inner);
        }
        Ok(all)
    }

    /// Drops series that no open flow uses, whose workloads are gone and
    /// that have not changed for the retention period.
    fn prune(&self, inner: &mut Inner, now: u64) {
        let retention = self.retention.as_secs();
        let before = inner.series.len();
        inner.series.retain(|k, s| {
            // The map's own reference is the only one: no flow uses it.
            let idle = Arc::strong_count(k) == 1 && now.saturating_sub(s.changed) >= retention;
            !idle
                || k.workloads()
                    .all(|(ns, w)| self.resolver.workload_exists(ns, w))
        });
        if inner.series.len() != before {
            tracing::debug!(
                pruned = before - inner.series.len(),
                "metric series of departed workloads dropped"
            );
            inner.dirty = true;
        }
    }

    fn persist(&self, inner: &mut Inner) {
        let Some(path) = &self.state_path else {
            inner.dirty = false;
            return;
        };
        match write_state(path, &inner.to_file()) {
            Ok(()) => inner.dirty = false,
            Err(e) => {
                tracing::warn!(error = %e, "metrics state not saved; retrying at the next scrape")
            }
        }
    }

    /// Writes the state file now if something changed since the last write
    /// (call on shutdown, after the last scrape).
    pub fn save(&self) -> Result<(), StateError> {
        let mut inner = self.inner.lock();
        match &self.state_path {
            Some(path) if inner.dirty => {
                write_state(path, &inner.to_file())?;
                inner.dirty = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Drop for TcpMetrics {
    fn drop(&mut self) {
        if let Err(e) = self.save() {
            tracing::warn!(error = %e, "metrics state not saved at exit");
        }
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
                "Bytes sent during response (destination to source), counted in the kernel.",
                |t| t.sent_bytes,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received during request (source to destination), counted in the kernel.",
                |t| t.received_bytes,
            ),
            (
                "istio_tcp_connections_opened",
                "TCP connections opened.",
                |t| t.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed (or no longer followed: evicted from the kernel map).",
                |t| t.closed,
            ),
        ];
        for (name, help, pick) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, totals) in &snapshot {
                ConstCounter::new(pick(totals)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// The two exposition formats, chosen from the scraper's `Accept` header.
///
/// prometheus-client (0.24) encodes only OpenMetrics; text 0.0.4 is derived
/// from its output by [`openmetrics_to_text`]. Self-contained (only
/// prometheus-client), so the CA can use the same functions.
pub mod exposition {
    use prometheus_client::registry::Registry;

    /// A body format, with the Content-Type that names it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Format {
        /// Prometheus text format 0.0.4: what every scraper reads.
        Text,
        /// OpenMetrics 1.0.0, when the scraper asks for it.
        OpenMetrics,
    }

    pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
    pub const OPENMETRICS_CONTENT_TYPE: &str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    impl Format {
        pub fn content_type(self) -> &'static str {
            match self {
                Format::Text => TEXT_CONTENT_TYPE,
                Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            }
        }

        /// Picks the format for an `Accept` header (all its values joined
        /// by `,`): OpenMetrics 1.0.0 only when the header rates it above
        /// text 0.0.4, or equal but named explicitly (not through `*/*`).
        /// Each offer gets the q-value of the most specific media range
        /// that matches it (RFC 9110 §12.5.1); a `version` parameter must
        /// name the version served. Text is the default, also when nothing
        /// offered is acceptable.
        pub fn negotiate(accept: Option<&str>) -> Format {
            let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
                return Format::Text;
            };
            let ranges: Vec<MediaRange> = accept.split(',').filter_map(MediaRange::parse).collect();
            let om = best(&ranges, "application", "openmetrics-text", "1.0.0");
            let text = best(&ranges, "text", "plain", "0.0.4");
            match (om, text) {
                (Some((q_om, explicit)), Some((q_text, _))) => {
                    if q_om > 0.0 && (q_om > q_text || (q_om == q_text && explicit)) {
                        Format::OpenMetrics
                    } else {
                        Format::Text
                    }
                }
                (Some((q_om, _)), None) if q_om > 0.0 => Format::OpenMetrics,
                _ => Format::Text,
            }
        }
    }

    /// One element of an `Accept` header.
    #[derive(Debug)]
    struct MediaRange<'a> {
        kind: &'a str,
        subtype: &'a str,
        version: Option<&'a str>,
        q: f32,
    }

    impl<'a> MediaRange<'a> {
        fn parse(s: &'a str) -> Option<MediaRange<'a>> {
            let mut parts = s.split(';');
            let (kind, subtype) = parts.next()?.trim().split_once('/')?;
            let (kind, subtype) = (kind.trim(), subtype.trim());
            if kind.is_empty() || subtype.is_empty() {
                return None;
            }
            let mut range = MediaRange {
                kind,
                subtype,
                version: None,
                q: 1.0,
            };
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim() {
                    k if k.eq_ignore_ascii_case("q") => {
                        // A malformed q makes the range unusable, not
                        // preferred.
                        range.q = v.parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q))?;
                    }
                    k if k.eq_ignore_ascii_case("version") => range.version = Some(v),
                    _ => {}
                }
            }
            Some(range)
        }

        /// How specifically this range names `kind/subtype;version`
        /// (higher is more specific), or `None` if it does not match.
        fn specificity(&self, kind: &str, subtype: &str, version: &str) -> Option<u8> {
            let v_ok = self.version.is_none_or(|v| v == version);
            match (self.kind, self.subtype) {
                ("*", "*") => Some(0),
                (k, "*") if k.eq_ignore_ascii_case(kind) => Some(1),
                (k, s) if k.eq_ignore_ascii_case(kind) && s.eq_ignore_ascii_case(subtype) => {
                    v_ok.then_some(if self.version.is_some() { 3 } else { 2 })
                }
                _ => None,
            }
        }
    }

    /// The q-value the most specific matching range gives an offer, and
    /// whether that range names the type explicitly.
    fn best(
        ranges: &[MediaRange],
        kind: &str,
        subtype: &str,
        version: &str,
    ) -> Option<(f32, bool)> {
        ranges
            .iter()
            .filter_map(|r| Some((r.specificity(kind, subtype, version)?, r.q)))
            .max_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)))
            .map(|(spec, q)| (q, spec >= 2))
    }

    /// Encodes `registry` in `format`.
    pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, registry)?;
        Ok(match format {
            Format::OpenMetrics => om,
            Format::Text => openmetrics_to_text(&om),
        })
    }

    /// Converts an OpenMetrics text exposition (as prometheus-client writes
    /// it) to Prometheus text 0.0.4: counters are named with `_total` in
    /// `# HELP`/`# TYPE` as in their samples, `info` becomes a `gauge`
    /// named `_info`, `stateset`/`gaugehistogram`/`unknown` become
    /// `untyped`; `# UNIT` and `# EOF` lines, `_created` samples and
    /// exemplars are dropped; timestamps go from seconds to milliseconds.
    /// Label values keep their escaping (the same in both formats).
    pub fn openmetrics_to_text(om: &str) -> String {
        let mut out = String::with_capacity(om.len());
        // The family being read: its name and type.
        let mut family: Option<(String, String)> = None;
        let mut help: Option<(String, String)> = None;
        for line in om.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut it = rest.splitn(3, ' ');
                let (kw, name, tail) = (
                    it.next().unwrap_or(""),
                    it.next().unwrap_or(""),
                    it.next().unwrap_or(""),
                );
                match kw {
                    "EOF" | "UNIT" => {}
                    "HELP" => {
                        if let Some((n, h)) = help.take() {
                            push_help(&mut out, &n, &h);
                        }
                        help = Some((name.to_owned(), tail.to_owned()));
                    }
                    "TYPE" => {
                        let (exposed, kind) = match tail {
                            "counter" => (format!("{name}_total"), "counter"),
                            "info" => (format!("{name}_info"), "gauge"),
                            "gauge" | "histogram" | "summary" => (name.to_owned(), tail),
                            _ => (name.to_owned(), "untyped"),
                        };
                        if let Some((n, h)) = help.take() {
                            push_help(&mut out, if n == name { &exposed } else { &n }, &h);
                        }
                        out.push_str(&format!("# TYPE {exposed} {kind}\n"));
                        family = Some((name.to_owned(), tail.to_owned()));
                    }
                    _ => {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                continue;
            }
            if let Some((n, h)) = help.take() {
                push_help(&mut out, &n, &h);
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, rest) = split_sample(line);
            let name = series.split('{').next().unwrap_or(series);
            if let Some((fam, kind)) = &family {
                let created = name.strip_prefix(fam.as_str()) == Some("_created");
                if created && matches!(kind.as_str(), "counter" | "histogram" | "summary") {
                    continue;
                }
            }
            let mut values = rest.split_whitespace().take_while(|t| *t != "#");
            let Some(value) = values.next() else {
                continue;
            };
            out.push_str(series);
            out.push(' ');
            out.push_str(value);
            if let Some(Ok(secs)) = values.next().map(str::parse::<f64>) {
                out.push_str(&format!(" {}", (secs * 1000.0).round() as i64));
            }
            out.push('\n');
        }
        if let Some((n, h)) = help.take() {
            push_help(&mut out, &n, &h);
        }
        out
    }

    /// `# HELP`: text 0.0.4 escapes only `\` and newlines.
    fn push_help(out: &mut String, name: &str, help: &str) {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push(' ');
        out.push_str(&help.replace("\\\"", "\""));
        out.push('\n');
    }

    /// Splits a sample line after its name and labels (label values may
    /// hold spaces, braces and escaped quotes).
    fn split_sample(line: &str) -> (&str, &str) {
        let b = line.as_bytes();
        let mut i = 0;
        while i < b.len() && b[i] != b'{' && b[i] != b' ' {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            let mut quoted = false;
            while i < b.len() {
                match b[i] {
                    b'\\' if quoted => i += 1,
                    b'"' => quoted = !quoted,
                    b'}' if !quoted => {
                        i += 1;
                        break;
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        let i = i.min(b.len());
        (&line[..i], &line[i..])
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

        #[test]
        fn openmetrics_is_served_only_to_scrapers_that_ask_for_it() {
            let cases = [
                (None, Format::Text),
                (Some(""), Format::Text),
                (Some("*/*"), Format::Text),
                (Some("text/plain"), Format::Text),
                (Some("text/plain;version=0.0.4"), Format::Text),
                (Some("application/json"), Format::Text),
                (Some(PROMETHEUS), Format::OpenMetrics),
                (
                    Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                    Format::OpenMetrics,
                ),
                (Some("application/openmetrics-text"), Format::OpenMetrics),
                (Some("application/*"), Format::OpenMetrics),
                // Only a version this endpoint does not write.
                (
                    Some("application/openmetrics-text;version=0.0.1"),
                    Format::Text,
                ),
                // Text rated higher.
                (
                    Some("application/openmetrics-text;q=0.3,text/plain;q=0.9"),
                    Format::Text,
                ),
                (
                    Some("text/plain;version=0.0.4;q=0.5,application/openmetrics-text;q=0.6"),
                    Format::OpenMetrics,
                ),
                // Refused outright, or a malformed q.
                (Some("application/openmetrics-text;q=0"), Format::Text),
                (Some("application/openmetrics-text;q=high"), Format::Text),
                // The most specific range decides: OpenMetrics 1.0.0 refused.
                (
                    Some("application/openmetrics-text;version=1.0.0;q=0,application/*;q=1"),
                    Format::Text,
                ),
                // Equal q: the type named explicitly wins over a wildcard.
                (
                    Some("application/openmetrics-text, */*"),
                    Format::OpenMetrics,
                ),
                (Some("TEXT/PLAIN, */*;q=0.1"), Format::Text),
            ];
            for (accept, want) in cases {
                assert_eq!(Format::negotiate(accept), want, "Accept: {accept:?}");
            }
            assert_eq!(
                Format::Text.content_type(),
                "text/plain; version=0.0.4; charset=utf-8"
            );
            assert_eq!(
                Format::OpenMetrics.content_type(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            );
        }

        #[test]
        fn conversion_to_text_renames_counters_and_drops_openmetrics_only_lines() {
            let om = "# HELP a_seconds Time \\\"spent\\\".\n\
                      # TYPE a_seconds counter\n\
                      # UNIT a_seconds seconds\n\
                      a_seconds_total{x=\"q\\\"} # {\"} 3 1.5 # {trace_id=\"1\"} 1.0 2\n\
                      a_seconds_created{x=\"y\"} 1700000000.0\n\
                      # HELP b Build.\n\
                      # TYPE b info\n\
                      b_info{version=\"1\"} 1\n\
                      # HELP c C.\n\
                      # TYPE c gauge\n\
                      c 2\n\
                      # EOF\n";
            let text = openmetrics_to_text(om);
            assert_eq!(
                text,
                "# HELP a_seconds_total Time \"spent\".\n\
                 # TYPE a_seconds_total counter\n\
                 a_seconds_total{x=\"q\\\"} # {\"} 3 1500\n\
                 # HELP b_info Build.\n\
                 # TYPE b_info gauge\n\
                 b_info{version=\"1\"} 1\n\
                 # HELP c C.\n\
                 # TYPE c gauge\n\
                 c 2\n"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::exposition::{self, Format};
    use super::*;
    use mesh_core::identity::ManualClock;
    use std::io::Write;
    use std::process::Command;

    struct Fixed(Arc<Mutex<Vec<FlowEntry>>>);
    impl FlowSource for Fixed {
        fn flows(&mut self) -> Result<Vec<FlowEntry>, FlowMapError> {
            Ok(self.0.lock().clone())
        }
        fn forget(&mut self, cookie: u64) -> Result<(), FlowMapError> {
            self.0.lock().retain(|f| f.cookie != cookie);
            Ok(())
        }
    }

    fn source(flows: Vec<FlowEntry>) -> (Box<Fixed>, Arc<Mutex<Vec<FlowEntry>>>) {
        let shared = Arc::new(Mutex::new(flows));
        (Box::new(Fixed(shared.clone())), shared)
    }

    /// Netns 1 is this node's; the destination workload is named after the
    /// port; destinations on port 443 are outside the mesh.
    #[derive(Default)]
    pub(super) struct ByPort {
        gone: Mutex<HashSet<String>>,
    }
    impl FlowResolver for ByPort {
        fn labels(&self, f: &FlowEntry) -> Option<FlowLabels> {
            if f.netns != 1 {
                return None;
            }
            let l = FlowLabels {
                source_workload: "client".into(),
                source_workload_namespace: "default".into(),
                destination_workload: format!("port-{}", f.original_dst.port()),
                destination_workload_namespace: "default".into(),
                connection_security_policy: "mutual_tls".into(),
                ..FlowLabels::default()
            };
            Some(if f.original_dst.port() == 443 {
                l.unknown_destination()
            } else {
                l
            })
        }
        fn workload_exists(&self, _ns: &str, w: &str) -> bool {
            !self.gone.lock().contains(w)
        }
    }

    fn flow(cookie: u64, port: u16, sent: u64, recv: u64, closed: bool) -> FlowEntry {
        FlowEntry {
            cookie,
            netns: 1,
            src: "127.0.0.1:40000".parse().unwrap(),
            dst: "127.0.0.1:15001".parse().unwrap(),
            original_dst: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
            bytes_sent: sent,
            bytes_received: recv,
            start_ns: cookie,
            end_ns: u64::from(closed),
            tcp_state: if closed {
                mesh_ebpf::tcp_state::CLOSE
            } else {
                mesh_ebpf::tcp_state::ESTABLISHED
            },
            srtt_us: 0,
            redirected: false,
            peer_open: false,
            direction: Direction::Outbound,
            direct: false,
        }
    }

    fn inbound(mut f: FlowEntry) -> FlowEntry {
        f.direction = Direction::Inbound;
        f
    }

    fn render(m: &Arc<TcpMetrics>, format: Format) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(m.clone()));
        exposition::encode(&reg, format).unwrap()
    }

    /// The value of the one sample of `name` whose labels include `labels`.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let hits: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert!(
            hits.len() <= 1,
            "{name} {labels:?} matches {hits:?}:\n{text}"
        );
        hits.first().copied()
    }

    fn only(m: &TcpMetrics) -> Totals {
        let s = m.snapshot().unwrap();
        assert_eq!(s.len(), 1, "{s:#?}");
        *s.values().next().unwrap()
    }

    fn totals(sent: u64, received: u64, opened: u64, closed: u64) -> Totals {
        Totals {
            sent_bytes: sent,
            received_bytes: received,
            opened,
            closed,
        }
    }

    /// A log sink for a scoped subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Runs `promtool check metrics` on `body`, written in `format`. Fails
    /// (never skips) when promtool is missing and CI is set.
    ///
    /// promtool (2.42, Debian bookworm) reads only text 0.0.4: a text body
    /// must pass clean. An OpenMetrics body must parse, and the only lint
    /// promtool may report is the one that comes from reading OpenMetrics
    /// as text: a counter family `x` declared by `# TYPE x counter` has its
    /// samples named `x_total`, which promtool calls `x_total no help text`.
    pub(super) fn promtool_accepts(body: &str, format: Format) {
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("promtool not found ({e}): `apt-get install prometheus`; not checked");
                return;
            }
            Err(e) => panic!("promtool is needed in CI (apt package prometheus): {e}"),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let refused = || {
            format!(
                "promtool check metrics refused the {format:?} body:\n{report}\n--- body ---\n{body}"
            )
        };
        match format {
            Format::Text => assert!(out.status.success(), "{}", refused()),
            Format::OpenMetrics => {
                // 1: a parse error; 3: lint problems, checked below.
                assert!(
                    out.status.success() || out.status.code() == Some(3),
                    "{}",
                    refused()
                );
                for problem in report.lines().filter(|l| !l.trim().is_empty()) {
                    let family = problem
                        .strip_suffix("_total no help text")
                        .unwrap_or_else(|| panic!("{}", refused()));
                    assert!(
                        body.contains(&format!("\n# TYPE {family} counter\n")),
                        "{}",
                        refused()
                    );
                }
            }
        }
    }

    #[test]
    fn versions_are_labels_and_a_state_file_from_before_them_still_loads() {
        let l = FlowLabels {
            source_workload: "client".into(),
            source_version: "v1".into(),
            destination_workload: "web".into(),
            ..FlowLabels::default()
        };
        let series = SeriesLabels::new(Reporter::Source, &l);
        assert_eq!(series.source_version.as_str(), "v1");
        assert_eq!(series.destination_version.as_str(), "unknown");
        // A state file written before the version labels existed.
        let mut old = serde_json::to_value(&series).unwrap();
        let o = old.as_object_mut().unwrap();
        o.remove("source_version");
        o.remove("destination_version");
        let back: SeriesLabels = serde_json::from_value(old).unwrap();
        assert_eq!(back.source_version.as_str(), "unknown");
        assert_eq!(back.destination_version.as_str(), "unknown");
    }

    #[test]
    fn closed_flows_fold_into_monotonic_totals_and_leave_the_map() {
        let (src, flows) = source(vec![
            flow(1, 8080, 100, 10, true),
            flow(2, 8080, 50, 5, false),
            FlowEntry {
                netns: 2, // another node's netns
                ..flow(3, 8080, 999, 999, false)
            },
        ]);
        let m = TcpMetrics::new(src, Arc::new(ByPort::default()));
        // Kernel bytes_sent (the source's) is Istio's received_bytes.
        assert_eq!(only(&m), totals(15, 150, 2, 1));
        assert_eq!(flows.lock().len(), 2, "closed flow not dropped");
        // The open flow moves on, then closes: totals only grow.
        *flows.lock() = vec![flow(2, 8080, 70, 9, true)];
        assert_eq!(only(&m), totals(19, 170, 2, 2));
    }

    #[test]
    fn both_formats_pass_promtool_with_the_right_names() {
        let (src, _) = source(vec![
            flow(1, 8080, 1234, 56, false),
            inbound(flow(2, 8080, 77, 8, false)),
        ]);
        let m = Arc::new(TcpMetrics::new(src, Arc::new(ByPort::default())));
        let text = render(&m, Format::Text);
        assert!(
            text.contains("# TYPE istio_tcp_sent_bytes_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            !text.contains("# TYPE istio_tcp_sent_bytes counter"),
            "{text}"
        );
        promtool_accepts(&text, Format::Text);

        let om = render(&m, Format::OpenMetrics);
        assert!(om.contains("# TYPE istio_tcp_sent_bytes counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        promtool_accepts(&om, Format::OpenMetrics);

        for body in [&text, &om] {
            let line = body
                .lines()
                .find(|l| l.starts_with("istio_tcp_received_bytes_total{reporter=\"source\""))
                .unwrap();
            assert!(line.ends_with(" 1234"), "{line}");
            for l in [
                "request_protocol=\"tcp\"",
                "source_workload=\"client\"",
                "destination_workload=\"port-8080\"",
                "connection_security_policy=\"mutual_tls\"",
                "response_flags=\"-\"",
                "source_principal=\"unknown\"",
            ] {
                assert!(line.contains(l), "{l} missing in {line}");
            }
            assert!(body.contains("istio_tcp_connections_opened_total{"));
        }
    }

    #[test]
    fn label_values_are_escaped_in_both_formats() {
        struct Odd;
        impl FlowResolver for Odd {
            fn labels(&self, _: &FlowEntry) -> Option<FlowLabels> {
                Some(FlowLabels {
                    source_workload: "we\"ird\\name\nx".into(),
                    ..FlowLabels::default()
                })
            }
        }
        let (src, _) = source(vec![flow(1, 80, 1, 1, false)]);
        let m = Arc::new(TcpMetrics::new(src, Arc::new(Odd)));
        for format in [Format::Text, Format::OpenMetrics] {
            let body = render(&m, format);
            assert!(
                body.contains(r#"source_workload="we\"ird\\name\nx""#),
                "{body}"
            );
            promtool_accepts(&body, format);
        }
    }

    #[test]
    fn each_reporter_has_its_own_series_with_istio_orientation() {
        // Outbound: the client sent 1000 and got 200 back. Inbound (the
        // destination side of another connection): the source sent 300,
        // the app answered 40.
        let (src, _) = source(vec![
            flow(1, 8080, 1000, 200, false),
            inbound(flow(2, 8080, 300, 40, false)),
        ]);
        let m = Arc::new(TcpMetrics::new(src, Arc::new(ByPort::default())));
        let text = render(&m, Format::Text);
        let src = [("reporter", "source")];
        let dst = [("reporter", "destination")];
        assert_eq!(
            value(&text, "istio_tcp_received_bytes_total", &src),
            Some(1000)
        );
        assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &src), Some(200));
        assert_eq!(
            value(&text, "istio_tcp_received_bytes_total", &dst),
            Some(300)
        );
        assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &dst), Some(40));
        assert_eq!(
            value(&text, "istio_tcp_connections_opened_total", &dst),
            Some(1)
        );
        assert_eq!(
            value(&text, "istio_tcp_connections_closed_total", &dst),
            Some(0)
        );
    }

    #[test]
    fn an_open_flow_evicted_from_the_kernel_map_keeps_its_counts() {
        let (src, flows) = source(vec![
            flow(1, 8080, 500, 50, false),
            flow(2, 8080, 7, 1, true),
        ]);
        let m = TcpMetrics::new(src, Arc::new(ByPort::default()));
        assert_eq!(only(&m), totals(51, 507, 2, 1));
        *flows.lock() = vec![flow(1, 8080, 600, 60, false)];
        assert_eq!(only(&m), totals(61, 607, 2, 1));
        // The LRU map evicts the open flow: it vanishes without closing.
        flows.lock().clear();
        assert_eq!(only(&m), totals(61, 607, 2, 2));
        // A flow the kernel shows with lower counts cannot pull totals down.
        *flows.lock() = vec![flow(3, 8080, 10, 1, false)];
        assert_eq!(only(&m), totals(62, 617, 3, 2));
        *flows.lock() = vec![flow(3, 8080, 4, 0, false)];
        assert_eq!(only(&m), totals(62, 617, 3, 2));
    }

    #[test]
    fn a_flow_keeps_its_series_after_its_pod_is_unenrolled() {
        #[derive(Default)]
        struct Once(Mutex<bool>);
        impl FlowResolver for Once {
            fn labels(&self, f: &FlowEntry) -> Option<FlowLabels> {
                // Resolvable only the first time (then the pod is gone).
                let mut done = self.0.lock();
                (!std::mem::replace(&mut *done, true)).then(|| ByPort::default().labels(f))?
            }
        }
        let (src, flows) = source(vec![flow(1, 8080, 10, 1, false)]);
        let m = TcpMetrics::new(src, Arc::new(Once::default()));
        assert_eq!(only(&m), totals(1, 10, 1, 0));
        *flows.lock() = vec![flow(1, 8080, 30, 3, false)];
        assert_eq!(only(&m), totals(3, 30, 1, 0));
        flows.lock().clear();
        assert_eq!(only(&m), totals(3, 30, 1, 1));
    }

    #[test]
    fn a_restarted_proxy_continues_the_counters_from_its_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-a/metrics-state.json");
        let (src, flows) = source(vec![
            flow(1, 8080, 100, 10, true),
            flow(2, 8080, 50, 5, false),
            flow(3, 9090, 20, 2, false),
        ]);
        let m =
            TcpMetrics::new(src, Arc::new(ByPort::default())).with_state_file(Some(path.clone()));
        let before = m.snapshot().unwrap();
        assert!(path.exists(), "no state written at the scrape");
        drop(m);
        // While the proxy is down flow 2 grows and flow 3 is evicted.
        *flows.lock() = vec![flow(2, 8080, 80, 6, false)];
        let m = TcpMetrics::new(Box::new(Fixed(flows.clone())), Arc::new(ByPort::default()))
            .with_state_file(Some(path.clone()));
        let after = m.snapshot().unwrap();
        assert_eq!(before.len(), 2);
        for (k, t) in &before {
            let a = after[k];
            assert!(
                a.sent_bytes >= t.sent_bytes
                    && a.received_bytes >= t.received_bytes
                    && a.opened >= t.opened
                    && a.closed >= t.closed,
                "{k:?} went down: {t:?} -> {a:?}"
            );
        }
        let port = |p: &str| {
            after
                .iter()
                .find(|(k, _)| k.destination_workload.as_str() == p)
                .map(|(_, t)| *t)
                .unwrap()
        };
        assert_eq!(port("port-8080"), totals(16, 180, 2, 1));
        assert_eq!(port("port-9090"), totals(2, 20, 1, 1));
        // Shutdown writes what changed since the last scrape; a third start
        // reads the same totals.
        m.save().unwrap();
        drop(m);
        let m = TcpMetrics::new(Box::new(Fixed(flows)), Arc::new(ByPort::default()))
            .with_state_file(Some(path));
        assert_eq!(m.snapshot().unwrap(), after);
    }

    #[test]
    fn a_corrupt_state_file_is_ignored_and_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics-state.json");
        std::fs::write(&path, b"{\"version\": 1, \"series\": [tru").unwrap();
        let (src, _) = source(vec![flow(1, 8080, 5, 1, false)]);
        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .finish();
        let m = tracing::subscriber::with_default(subscriber, || {
            TcpMetrics::new(src, Arc::new(ByPort::default())).with_state_file(Some(path.clone()))
        });
        let log = String::from_utf8(log.0.lock().clone()).unwrap();
        assert!(
            log.contains("WARN")
                && log.contains(&path.display().to_string())
                && log.contains("counters start at zero"),
            "{log}"
        );
        assert_eq!(only(&m), totals(1, 5, 1, 0));
        assert!(dir.path().join("metrics-state.json.corrupt").exists());
        // A new, valid file replaced it.
        let reread = load_state(&path).unwrap().unwrap();
        assert_eq!(reread.series.len(), 1);

        // A well-formed file naming a series that is not there is refused
        // with the path and the reason.
        std::fs::write(
            &path,
            br#"{"version":1,"series":[],"open":[{"cookie":1,"start_ns":1,"series":3,"request_bytes":1,"response_bytes":1,"folded":false}]}"#,
        )
        .unwrap();
        let e = load_state(&path).err().unwrap().to_string();
        assert!(
            e.contains("metrics-state.json") && e.contains("series 3 of 0"),
            "{e}"
        );
        std::fs::write(&path, br#"{"version":9,"series":[],"open":[]}"#).unwrap();
        let e = load_state(&path).err().unwrap().to_string();
        assert!(e.contains("version 9"), "{e}");
    }

    #[test]
    fn passthrough_to_ten_thousand_addresses_is_one_series() {
        let mut many: Vec<FlowEntry> = (0..10_000u32)
            .map(|i| FlowEntry {
                original_dst: SocketAddr::new(IpAddr::from((0x0b00_0000 + i).to_be_bytes()), 443),
                ..flow(u64::from(i) + 1, 443, 1, 1, false)
            })
            .collect();
        let (src, _) = source(many.clone());
        let m = TcpMetrics::new(src, Arc::new(ByPort::default()));
        let s = m.snapshot().unwrap();
        assert_eq!(s.len(), 1);
        let (k, t) = s.iter().next().unwrap();
        assert_eq!(k.destination_workload.as_str(), "unknown");
        assert_eq!(k.destination_service.as_str(), "unknown");
        assert_eq!(k.connection_security_policy.as_str(), "unknown");
        assert_eq!(*t, totals(10_000, 10_000, 10_000, 0));

        // A resolver that still puts the address in the label gets the same.
        struct RawIp;
        impl FlowResolver for RawIp {
            fn labels(&self, f: &FlowEntry) -> Option<FlowLabels> {
                Some(FlowLabels {
                    destination_workload: f.original_dst.ip().to_string(),
                    destination_service: f.original_dst.to_string(),
                    ..FlowLabels::default()
                })
            }
        }
        many.truncate(100);
        let (src, _) = source(many);
        let m = TcpMetrics::new(src, Arc::new(RawIp));
        assert_eq!(m.snapshot().unwrap().len(), 1);
    }

    #[test]
    fn series_of_departed_workloads_are_dropped_after_the_retention_only() {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000));
        let resolver = Arc::new(ByPort::default());
        let (src, flows) = source(vec![flow(1, 8080, 10, 1, true), flow(2, 9090, 5, 1, false)]);
        let m = TcpMetrics::new(src, resolver.clone())
            .with_retention(Duration::from_secs(600))
            .with_clock(Arc::new(clock.clone()));
        assert_eq!(m.snapshot().unwrap().len(), 2);
        resolver
            .gone
            .lock()
            .extend(["port-8080".to_owned(), "port-9090".to_owned()]);
        clock.advance(Duration::from_secs(599));
        assert_eq!(
            m.snapshot().unwrap().len(),
            2,
            "pruned before the retention"
        );
        clock.advance(Duration::from_secs(1));
        // port-8080 is idle and gone: dropped. port-9090 still has an open
        // flow: kept.
        let s = m.snapshot().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(
            s.keys().next().unwrap().destination_workload.as_str(),
            "port-9090"
        );
        // Once its flow has left, it too waits out the retention.
        flows.lock().clear();
        assert_eq!(m.snapshot().unwrap().len(), 1);
        clock.advance(Duration::from_secs(600));
        assert!(m.snapshot().unwrap().is_empty());
        // A series whose workloads exist is never dropped.
        let (src, _) = source(vec![flow(1, 8080, 10, 1, true)]);
        let m = TcpMetrics::new(src, Arc::new(ByPort::default()))
            .with_retention(Duration::ZERO)
            .with_clock(Arc::new(clock.clone()));
        m.snapshot().unwrap();
        clock.advance(Duration::from_secs(100_000));
        assert_eq!(m.snapshot().unwrap().len(), 1);
    }
}
