//! The node proxy's side of CNI: the enrollment socket `mesh-cni` talks to
//! (`--cni-socket`), the table of pod attachments the runtime reported,
//! and the adoption of pods that were already running.
//!
//! In Kubernetes the registry knows a pod (identity, labels, node) but not
//! its network namespace: the runtime tells the CNI plugin, which tells
//! this socket. An [`Attachment`](mesh_core::enroll::PodAttachment) is kept
//! in [`Attachments`], and [`Attachments::place`] gives the registry's pod
//! its netns (and addresses, when the registry has none yet), so the one
//! enrollment path — the registry reconcile — enrolls it. The server
//! answers ADD only once [`Enroller::captured`] says the pod's netns is
//! enrolled with its listeners open.
//!
//! Bounds: [`Limits`] caps concurrent connections (over it: refused at
//! once, the plugin retries), the time to read a request, the request size
//! (from the frame header, before the body is read) and the time to answer.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use mesh_core::enroll::{self, AttachmentRef, EnrollError, Op, Outcome, PodAttachment, Response};
use mesh_core::registry::Pod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore};
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct Limits {
    /// Enrollment connections served at once.
    pub max_connections: usize,
    /// Time a client has to send its whole request.
    pub read_timeout: Duration,
    /// Time enrollment may take before the answer is "refused".
    pub answer_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            read_timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(25),
        }
    }
}

/// What the registry says about a pod the runtime reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not (yet) in this node's registry.
    Unknown,
    /// The registry has no whole view yet (the Kubernetes source has not
    /// listed every kind once): no answer may be trusted, so none is given.
    NotReady(String),
    /// Known, but not to be meshed (opted out, host network, other node).
    NotMeshed(String),
    /// To be meshed; `uid` as the registry has it (may be empty).
    Meshed { uid: String },
}

pub type Reconciled = Pin<Box<dyn Future<Output = Vec<String>> + Send>>;

/// A pod as the /proc scan looks for it: `(namespace, name, uid)`.
pub type PodId = (String, String, String);

/// When /proc was last scanned, and for which pods.
type LastScan = std::sync::Mutex<Option<(std::time::Instant, Vec<PodId>)>>;

/// What this module needs from the node proxy. The proxy implements it
/// with its registry and its own enrollment (reconcile).
pub trait Enroller: Send + Sync + 'static {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup;
    /// Runs the registry path's enrollment (which reads
    /// [`Attachments::place`]) and returns its problems, one per pod.
    fn reconcile(self: Arc<Self>) -> Reconciled;
    /// The netns cookie if pod `namespace/name` is enrolled from `netns`.
    fn captured(&self, key: &str, netns: &Path) -> Option<u64>;
    /// Pods this node must mesh whose netns nobody reported yet:
    /// `(namespace, name, uid)`.
    fn unplaced(&self) -> Vec<PodId>;
}

/// What the CNI side did, for `/metrics` ([`Metrics`]).
#[derive(Debug, Default)]
pub struct CniStats {
    pub add_captured: AtomicU64,
    pub add_not_meshed: AtomicU64,
    pub add_refused: AtomicU64,
    pub released: AtomicU64,
    pub adopted_running: AtomicU64,
    pub adopted_fail_open: AtomicU64,
    pub busy: AtomicU64,
    /// Pods that started unmeshed (fail-open ADD) and are not enrolled yet.
    pub fail_open_pending: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The pod attachments the runtime reported (and those found running).
#[derive(Debug, Default)]
pub struct Attachments {
    by_ref: RwLock<BTreeMap<AttachmentRef, (u64, PodAttachment)>>,
    seq: std::sync::atomic::AtomicU64,
    /// Counters and gauges the metrics port exports ([`Metrics`]).
    pub stats: CniStats,
    /// Held by the proxy's reconcile for its whole run: the run loop and
    /// the CNI server both reconcile, and two at once would enroll one pod
    /// twice (the second bind of 15001 fails: measured in the benchmark).
    reconciling: Mutex<()>,
}

fn attachment_ref(p: &PodAttachment) -> AttachmentRef {
    AttachmentRef {
        container_id: p.container_id.clone(),
        ifname: p.ifname.clone(),
    }
}

impl Attachments {
    pub fn insert(&self, p: PodAttachment) {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.by_ref
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(attachment_ref(&p), (n, p));
    }

    pub fn remove(&self, r: &AttachmentRef) -> Option<PodAttachment> {
        self.by_ref
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(r)
            .map(|(_, p)| p)
    }

    /// Keeps only what `keep` accepts; returns what went.
    pub fn retain(&self, keep: impl Fn(&PodAttachment) -> bool) -> Vec<PodAttachment> {
        let mut map = self.by_ref.write().unwrap_or_else(PoisonError::into_inner);
        let gone: Vec<AttachmentRef> = map
            .iter()
            .filter(|(_, (_, p))| !keep(p))
            .map(|(r, _)| r.clone())
            .collect();
        gone.iter()
            .filter_map(|r| map.remove(r))
            .map(|(_, p)| p)
            .collect()
    }

    /// Whether an attachment of pod `key` from `netns` is held.
    pub fn holds(&self, key: &str, netns: &Path) -> bool {
        self.by_ref
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|(_, a)| a.key() == key && a.netns == netns)
    }

    /// One reconcile at a time (see the field); the proxy's reconcile
    /// holds this for its whole run.
    pub async fn reconciling(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reconciling.lock().await
    }

    pub fn len(&self) -> usize {
        self.by_ref
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The registry's `pod` as enrollment must see it: with the netns
    /// (and, if the registry has none, the addresses) of its latest
    /// attachment. `None`: no attachment (or the registry gives a netns
    /// itself, as the local mesh's file does). An attachment whose UID is
    /// not the registry's (a pod deleted and made again under one name)
    /// does not count.
    pub fn place(&self, pod: &Pod) -> Option<Pod> {
        if pod.netns.is_some() {
            return None;
        }
        let map = self.by_ref.read().unwrap_or_else(PoisonError::into_inner);
        let (_, a) = map
            .values()
            .filter(|(_, a)| {
                a.namespace == pod.namespace
                    && a.name == pod.name
                    && (pod.uid.is_empty() || a.uid == pod.uid)
            })
            .max_by_key(|(n, _)| *n)?;
        let mut placed = pod.clone();
        placed.netns = Some(a.netns.clone());
        if placed.ips.is_empty() {
            placed.ips = a.ips.clone();
        }
        Some(placed)
    }
}

/// The server: `attachments` shared with the proxy's reconcile.
pub struct Server<E: Enroller> {
    pub attachments: Arc<Attachments>,
    pub enroller: Arc<E>,
    pub limits: Limits,
    slots: Arc<Semaphore>,
    /// `fail-open/` beside the socket, where mesh-cni records pods it let
    /// start unmeshed (see [`Server::sweep`]).
    pub fail_open_dir: Option<PathBuf>,
    /// The last /proc scan and the pods it looked for: a scan reads every
    /// process's cgroup, so it runs again only for new pods or after
    /// [`RESCAN`].
    last_scan: LastScan,
}

/// How often /proc is scanned again for the same unplaced pods.
pub const RESCAN: Duration = Duration::from_secs(5);

/// Binds `path` (replacing a stale socket file), mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

impl<E: Enroller> Server<E> {
    pub fn new(attachments: Arc<Attachments>, enroller: Arc<E>, limits: Limits) -> Arc<Self> {
        Arc::new(Server {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            attachments,
            enroller,
            limits,
            fail_open_dir: None,
            last_scan: std::sync::Mutex::new(None),
        })
    }

    /// The same, reading fail-open records from `dir`.
    pub fn with_fail_open_dir(
        attachments: Arc<Attachments>,
        enroller: Arc<E>,
        limits: Limits,
        dir: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Server {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            attachments,
            enroller,
            limits,
            fail_open_dir: Some(dir),
            last_scan: std::sync::Mutex::new(None),
        })
    }

    /// Accepts until `stop` resolves.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                _ = &mut stop => return,
                a = listener.accept() => a,
            };
            let conn = match accepted {
                Ok((c, _)) => c,
                Err(e) => {
                    warn!(error = %e, "CNI socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                bump(&self.attachments.stats.busy);
                let busy = Response::new(Outcome::Refused {
                    reason: format!(
                        "node proxy busy: {} enrollment requests at once; retry",
                        self.limits.max_connections
                    ),
                });
                // One non-blocking write into the fresh socket's buffer, no
                // task: a flood over the cap costs nothing that lasts.
                if let Ok(frame) = enroll::encode(&busy) {
                    let _ = conn.try_write(&frame);
                }
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                me.connection(conn).await;
            });
        }
    }

    async fn connection(&self, mut conn: UnixStream) {
        let req = match tokio::time::timeout(self.limits.read_timeout, read(&mut conn)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %e, "CNI socket: bad request");
                let _ = write(
                    &mut conn,
                    &Response::new(Outcome::Refused {
                        reason: e.to_string(),
                    }),
                )
                .await;
                return;
            }
            Err(_) => {
                warn!(timeout = ?self.limits.read_timeout, "CNI socket: request not sent in time; closed");
                return;
            }
        };
        let outcome =
            match tokio::time::timeout(self.limits.answer_timeout, self.handle(req.op)).await {
                Ok(o) => o,
                Err(_) => Outcome::Refused {
                    reason: format!(
                        "enrollment did not finish within {:?}; the runtime retries",
                        self.limits.answer_timeout
                    ),
                },
            };
        let _ = tokio::time::timeout(
            self.limits.read_timeout,
            write(&mut conn, &Response::new(outcome)),
        )
        .await;
    }

    /// The proxy's reconcile, which serializes itself
    /// ([`Attachments::reconciling`]).
    async fn reconcile(&self) -> Vec<String> {
        self.enroller.clone().reconcile().await
    }

    /// The answer to one request.
    pub async fn handle(&self, op: Op) -> Outcome {
        match op {
            Op::Status {} => Outcome::Done {},
            Op::Add { pod } => self.add(pod).await,
            Op::Check { pod } => match self.enroller.captured(&pod.key(), &pod.netns) {
                Some(netns_cookie) => Outcome::Captured { netns_cookie },
                None => match self.enroller.lookup(&pod.namespace, &pod.name) {
                    Lookup::NotMeshed(reason) => Outcome::NotMeshed { reason },
                    _ => Outcome::Refused {
                        reason: format!(
                            "pod {} is not enrolled from {}",
                            pod.key(),
                            pod.netns.display()
                        ),
                    },
                },
            },
            Op::Del { attachment, pod } => {
                let mut released = Vec::new();
                if let Some(p) = self.attachments.remove(&attachment) {
                    info!(pod = %p.key(), container = %attachment.container_id, "CNI DEL: released");
                    released.push(p);
                }
                if let Some(name) = pod {
                    // What a restarted proxy found of this pod by its
                    // process (the runtime never told it the attachment).
                    let key = name.key();
                    released.extend(
                        self.attachments.retain(|a| {
                            !(a.key() == key && a.container_id.starts_with(SCAN_PREFIX))
                        }),
                    );
                }
                if !released.is_empty() {
                    self.attachments
                        .stats
                        .released
                        .fetch_add(released.len() as u64, Ordering::Relaxed);
                    self.reconcile().await;
                }
                Outcome::Done {}
            }
            Op::Gc { valid } => {
                let valid: std::collections::BTreeSet<_> = valid.into_iter().collect();
                let gone = self.attachments.retain(|p| {
                    valid.contains(&attachment_ref(p)) || p.container_id.starts_with(SCAN_PREFIX)
                });
                if !gone.is_empty() {
                    self.attachments
                        .stats
                        .released
                        .fetch_add(gone.len() as u64, Ordering::Relaxed);
                    info!(
                        released = gone.len(),
                        "CNI GC: released attachments the runtime no longer has"
                    );
                    self.reconcile().await;
                }
                Outcome::Done {}
            }
        }
    }

    async fn add(&self, pod: PodAttachment) -> Outcome {
        let o = self.add_inner(pod).await;
        let st = &self.attachments.stats;
        bump(match o {
            Outcome::Captured { .. } => &st.add_captured,
            Outcome::NotMeshed { .. } => &st.add_not_meshed,
            _ => &st.add_refused,
        });
        o
    }

    async fn add_inner(&self, pod: PodAttachment) -> Outcome {
        let key = pod.key();
        match self.enroller.lookup(&pod.namespace, &pod.name) {
            Lookup::Unknown => {
                return Outcome::Refused {
                    reason: format!(
                        "pod {key} is not in this node's registry (yet); the runtime retries"
                    ),
                };
            }
            Lookup::NotReady(why) => {
                return Outcome::Refused {
                    reason: format!(
                        "pod {key}: the node proxy cannot decide yet ({why}); the runtime retries"
                    ),
                };
            }
            Lookup::NotMeshed(reason) => return Outcome::NotMeshed { reason },
            Lookup::Meshed { uid } if !uid.is_empty() && uid != pod.uid => {
                return Outcome::Refused {
                    reason: format!(
                        "pod {key}: the runtime's UID {:?} is not the registry's {uid:?} (a pod of the same name was made again?)",
                        pod.uid
                    ),
                };
            }
            Lookup::Meshed { .. } => {}
        }
        let netns = pod.netns.clone();
        if let Some(netns_cookie) = self.enroller.captured(&key, &netns) {
            self.attachments.insert(pod);
            return Outcome::Captured { netns_cookie };
        }
        info!(pod = %key, netns = %netns.display(), container = %pod.container_id, "CNI ADD: enrolling");
        self.attachments.insert(pod);
        let problems = self.reconcile().await;
        match self.enroller.captured(&key, &netns) {
            Some(netns_cookie) => Outcome::Captured { netns_cookie },
            None => {
                let mine: Vec<&String> = problems
                    .iter()
                    .filter(|p| p.starts_with(&format!("pod {key}:")))
                    .collect();
                let reason = if mine.is_empty() {
                    format!("pod {key} not enrolled from {}", netns.display())
                } else {
                    mine.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                warn!(pod = %key, %reason, "CNI ADD refused (fail closed; the runtime retries)");
                Outcome::Refused {
                    reason: truncate(reason, enroll::MAX_REASON),
                }
            }
        }
    }

    /// Drops attachments whose netns is gone (a pod that ended without
    /// DEL, a scanned process that exited); enrolls pods mesh-cni let
    /// start unmeshed (fail-open records) and running pods nobody reported
    /// (by the UID in a process's cgroup path); reconciles if anything
    /// changed. Returns (dropped, adopted).
    pub async fn sweep(&self, proc_root: &Path) -> (usize, usize) {
        let st = &self.attachments.stats;
        let gone = self.attachments.retain(|p| p.netns.exists());
        for p in &gone {
            info!(pod = %p.key(), netns = %p.netns.display(), "netns gone: released");
        }
        st.released.fetch_add(gone.len() as u64, Ordering::Relaxed);
        let mut adopted = 0;
        if let Some(dir) = &self.fail_open_dir {
            let (found, pending) = self.fail_open_records(dir);
            st.fail_open_pending.store(pending, Ordering::Relaxed);
            for a in found {
                info!(pod = %a.key(), netns = %a.netns.display(), "pod started fail-open: enrolling it now");
                bump(&st.adopted_fail_open);
                self.attachments.insert(a);
                adopted += 1;
            }
        }
        let unplaced = self.enroller.unplaced();
        let due = {
            let mut last = self
                .last_scan
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = !unplaced.is_empty()
                && last
                    .as_ref()
                    .is_none_or(|(at, seen)| at.elapsed() >= RESCAN || *seen != unplaced);
            if due {
                *last = Some((std::time::Instant::now(), unplaced.clone()));
            }
            due
        };
        // Off the control runtime: the scan reads every process's cgroup.
        let found = if due {
            let root = proc_root.to_owned();
            tokio::task::spawn_blocking(move || running_pods(&root, &unplaced))
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        for a in found {
            info!(pod = %a.key(), netns = %a.netns.display(), "running pod found: enrolling");
            bump(&st.adopted_running);
            self.attachments.insert(a);
            adopted += 1;
        }
        if !gone.is_empty() || adopted > 0 {
            self.reconcile().await;
        }
        (gone.len(), adopted)
    }

    /// Reads `dir`'s fail-open records (bounded: 4096 files of 8 KiB):
    /// returns the pods to enroll now and how many records stay (pods that
    /// run unmeshed). A record goes once its pod is captured, its netns is
    /// gone, or it cannot be read.
    fn fail_open_records(&self, dir: &Path) -> (Vec<PodAttachment>, u64) {
        #[derive(serde::Deserialize)]
        struct Record {
            version: u32,
            pod: PodAttachment,
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return (Vec::new(), 0);
        };
        let (mut found, mut pending) = (Vec::new(), 0);
        for e in entries.flatten().take(4096) {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let record = std::fs::File::open(&path).ok().and_then(|f| {
                let mut text = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, 8192), &mut text).ok()?;
                serde_json::from_slice::<Record>(&text).ok()
            });
            let Some(r) = record.filter(|r| {
                r.version == enroll::VERSION
                    && enroll::Request::new(Op::Add { pod: r.pod.clone() })
                        .validate()
                        .is_ok()
            }) else {
                warn!(record = %path.display(), "unreadable fail-open record: removed");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let key = r.pod.key();
            let done = !r.pod.netns.exists()
                || self.enroller.captured(&key, &r.pod.netns).is_some()
                || matches!(
                    self.enroller.lookup(&r.pod.namespace, &r.pod.name),
                    Lookup::NotMeshed(_)
                );
            if done {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            pending += 1;
            let known = matches!(
                self.enroller.lookup(&r.pod.namespace, &r.pod.name),
                Lookup::Meshed { ref uid } if uid.is_empty() || *uid == r.pod.uid
            );
            if known && !self.attachments.holds(&key, &r.pod.netns) {
                found.push(r.pod);
            }
        }
        (found, pending)
    }
}

/// Serves `listener` and sweeps every `sweep` (attachments whose netns is
/// gone, running pods nobody reported, found under `proc_root`) until
/// `stop` resolves; then removes the socket file, so the plugin's STATUS
/// reports not ready.
pub async fn run<E: Enroller>(
    server: Arc<Server<E>>,
    listener: UnixListener,
    proc_root: PathBuf,
    sweep: Duration,
    stop: impl Future<Output = ()>,
) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serving = {
        let mut rx = stop_rx.clone();
        tokio::spawn(server.clone().serve(listener, async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    let sweeping = tokio::spawn(async move {
        let mut rx = stop_rx;
        let mut tick = tokio::time::interval(sweep);
        loop {
            tokio::select! {
                _ = rx.changed() => return,
                _ = tick.tick() => { server.sweep(&proc_root).await; }
            }
        }
    });
    stop.await;
    let _ = stop_tx.send(true);
    let _ = serving.await;
    let _ = sweeping.await;
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

/// The CNI side's metrics, for the proxy's Prometheus registry.
#[derive(Debug)]
pub struct Metrics(pub Arc<Attachments>);

impl prometheus_client::collector::Collector for Metrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = &self.0.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // (name, help, label, label value -> counter)
        type Family<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a AtomicU64)]);
        let families: [Family; 2] = [
            (
                "sockmesh_cni_adds",
                "CNI ADDs answered, by result (captured, not_meshed, refused).",
                "result",
                &[
                    ("captured", &s.add_captured),
                    ("not_meshed", &s.add_not_meshed),
                    ("refused", &s.add_refused),
                ],
            ),
            (
                "sockmesh_cni_adopted_pods",
                "Pods enrolled without an ADD, by how they were found (fail_open record, running process).",
                "found_by",
                &[
                    ("fail_open", &s.adopted_fail_open),
                    ("running", &s.adopted_running),
                ],
            ),
        ];
        for (name, help, label, values) in families {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (value, c) in values {
                ConstCounter::new(load(c)).encode(e.encode_family(&[(label, *value)])?)?;
            }
        }
        for (name, help, c) in [
            (
                "sockmesh_cni_released",
                "Attachments released (DEL, GC, netns gone).",
                &s.released,
            ),
            (
                "sockmesh_cni_busy_refusals",
                "Enrollment connections refused at the connection cap.",
                &s.busy,
            ),
        ] {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(load(c)).encode(e)?;
        }
        for (name, help, v) in [
            (
                "sockmesh_cni_attachments",
                "Pod attachments held (reported by the runtime or found running).",
                self.0.len() as i64,
            ),
            (
                "sockmesh_cni_fail_open_pods",
                "Pods that started unmeshed (fail-open namespace, proxy down) and are not enrolled yet.",
                load(&s.fail_open_pending) as i64,
            ),
        ] {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(e)?;
        }
        Ok(())
    }
}

/// Whether two paths name one network namespace (the runtime's
/// `/run/netns/cni-…` and a process's `/proc/<pid>/ns/net` do, after a
/// restart found the pod by its process): same device and inode.
pub fn same_netns(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub(3);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

async fn read(conn: &mut UnixStream) -> Result<enroll::Request, EnrollError> {
    let mut header = [0u8; 4];
    conn.read_exact(&mut header).await?;
    let len = enroll::frame_len(header)?;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await?;
    enroll::parse_request(&body)
}

async fn write(conn: &mut UnixStream, r: &Response) -> Result<(), EnrollError> {
    let frame = enroll::encode(r)?;
    conn.write_all(&frame).await?;
    conn.shutdown().await?;
    Ok(())
}

/// Container IDs of attachments found by [`running_pods`] (GC keeps them:
/// the runtime never listed them; they go when their process does).
pub const SCAN_PREFIX: &str = "running:";
/// Processes looked at per scan.
const MAX_SCANNED: usize = 65_536;

/// Pods among `wanted` (`namespace, name, uid`) that already run: a
/// process whose cgroup path carries the pod's UID (kubelet writes it as
/// `pod<uid>` with the cgroupfs driver, `pod<uid with _>` with systemd's)
/// and whose netns is not the proxy's own (host-network pods share that).
pub fn running_pods(proc_root: &Path, wanted: &[PodId]) -> Vec<PodAttachment> {
    let own = std::fs::metadata(proc_root.join("self/ns/net")).ok();
    let own_ino = own.map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let mut found: BTreeMap<String, PodAttachment> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    for e in dir.flatten().take(MAX_SCANNED) {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cgroup) = std::fs::read_to_string(e.path().join("cgroup")) else {
            continue;
        };
        for (ns, pod, uid) in wanted {
            let key = format!("{ns}/{pod}");
            if uid.is_empty() || found.contains_key(&key) {
                continue;
            }
            let systemd = uid.replace('-', "_");
            if !(cgroup.contains(uid.as_str()) || cgroup.contains(systemd.as_str())) {
                continue;
            }
            let netns: PathBuf = e.path().join("ns/net");
            let ino = std::fs::metadata(&netns)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
            if ino.is_none() || ino == own_ino {
                continue;
            }
            found.insert(
                key,
                PodAttachment {
                    container_id: format!("{SCAN_PREFIX}{pid}"),
                    ifname: "scan".into(),
                    netns,
                    namespace: ns.clone(),
                    name: pod.clone(),
                    uid: uid.clone(),
                    ips: Vec::new(),
                },
            );
        }
    }
    found.into_values().collect()
}

/// The node proxy as the CNI server sees it: its registry, and its one
/// enrollment path (reconcile), which reads [`Attachments::place`].
impl Enroller for crate::proxy::NodeProxy {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        // Before the Kubernetes source has listed every kind once, a pod
        // whose namespace is not listed yet would read as "not opted in"
        // and ADD would start it unmeshed: refuse instead (the runtime
        // retries), as for a pod the registry does not know yet.
        if !self.registry.settled() {
            return Lookup::NotReady(
                self.registry
                    .not_ready()
                    .unwrap_or_else(|| "the registry is not synced yet".into()),
            );
        }
        let snap = self.registry.snapshot();
        match snap.pod(namespace, name) {
            None => Lookup::Unknown,
            Some(p) if p.node != self.cfg.node => Lookup::NotMeshed(format!(
                "scheduled on node {}, this is {}",
                p.node, self.cfg.node
            )),
            Some(p) if !p.meshed() => Lookup::NotMeshed(format!("not in the mesh: {:?}", p.mesh)),
            Some(p) => Lookup::Meshed { uid: p.uid.clone() },
        }
    }

    fn reconcile(self: Arc<Self>) -> Reconciled {
        Box::pin(async move { crate::proxy::NodeProxy::reconcile(&self).await })
    }

    fn captured(&self, key: &str, netns: &Path) -> Option<u64> {
        self.enrolled(key)
            .filter(|e| same_netns(&e.netns, netns))
            .map(|e| e.cookie)
    }

    fn unplaced(&self) -> Vec<PodId> {
        let snap = self.registry.snapshot();
        snap.snapshot()
            .pods
            .iter()
            .filter(|p| p.node == self.cfg.node && p.netns.is_none() && p.meshed())
            .filter(|p| self.cni.place(p).is_none())
            .map(|p| (p.namespace.clone(), p.name.clone(), p.uid.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A proxy whose registry has `default/web` (uid u-1) meshed and
    /// `default/plain` opted out; reconcile "enrolls" what `place` gives.
    struct Fake {
        att: Arc<Attachments>,
        enrolled: RwLock<BTreeMap<String, PathBuf>>,
        reconciles: AtomicUsize,
        fail: bool,
    }

    fn registry_pod(name: &str) -> Pod {
        Pod {
            namespace: "default".into(),
            name: name.into(),
            uid: "u-1".into(),
            node: "n1".into(),
            service_account: "sa".into(),
            ips: vec![],
            labels: BTreeMap::new(),
            netns: None,
            annotations: BTreeMap::new(),
            host_network: false,
            workload: None,
            mesh: mesh_core::opt_in::MeshDecision::Meshed(
                mesh_core::opt_in::OptedInBy::NamespaceLabel,
            ),
        }
    }

    impl Enroller for Fake {
        fn lookup(&self, _ns: &str, name: &str) -> Lookup {
            match name {
                "web" => Lookup::Meshed { uid: "u-1".into() },
                "plain" => Lookup::NotMeshed("opted out".into()),
                "early" => Lookup::NotReady("Kubernetes API: not synced yet".into()),
                _ => Lookup::Unknown,
            }
        }
        fn reconcile(self: Arc<Self>) -> Reconciled {
            Box::pin(async move {
                self.reconciles.fetch_add(1, Ordering::Relaxed);
                if self.fail {
                    return vec!["pod default/web: CA unreachable".into()];
                }
                let mut e = self.enrolled.write().unwrap();
                e.clear();
                if let Some(p) = self.att.place(&registry_pod("web")) {
                    e.insert("default/web".into(), p.netns.unwrap());
                }
                vec![]
            })
        }
        fn captured(&self, key: &str, netns: &Path) -> Option<u64> {
            (self.enrolled.read().unwrap().get(key).map(|p| p.as_path()) == Some(netns))
                .then_some(42)
        }
        fn unplaced(&self) -> Vec<PodId> {
            if self.enrolled.read().unwrap().is_empty() {
                vec![("default".into(), "web".into(), "u-1".into())]
            } else {
                vec![]
            }
        }
    }

    fn fake(att: &Arc<Attachments>, fail: bool) -> Arc<Fake> {
        Arc::new(Fake {
            att: att.clone(),
            enrolled: RwLock::new(BTreeMap::new()),
            reconciles: AtomicUsize::new(0),
            fail,
        })
    }

    fn server(fail: bool) -> Arc<Server<Fake>> {
        let att = Arc::new(Attachments::default());
        let fake = fake(&att, fail);
        Server::new(att, fake, Limits::default())
    }

    /// A file standing for a pod's netns (the directory lives as long as
    /// the returned guard).
    fn fake_netns() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let ns = d.path().join("ns");
        std::fs::write(&ns, "").unwrap();
        (d, ns)
    }

    /// `s` serving a socket in a fresh directory, until `tx` is sent.
    fn serving(
        s: &Arc<Server<Fake>>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("cni.sock");
        let l = bind(&path).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(s.clone().serve(l, async {
            let _ = rx.await;
        }));
        (d, path, tx, task)
    }

    fn att(name: &str, netns: &Path) -> PodAttachment {
        PodAttachment {
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            netns: netns.to_owned(),
            namespace: "default".into(),
            name: name.into(),
            uid: "u-1".into(),
            ips: vec!["10.9.0.2".parse().unwrap()],
        }
    }

    #[tokio::test]
    async fn add_before_the_registry_has_a_whole_view_is_refused_never_started_unmeshed() {
        let s = server(false);
        let (_d, ns) = fake_netns();
        let o = s
            .handle(Op::Add {
                pod: att("early", &ns),
            })
            .await;
        match o {
            Outcome::Refused { reason } => {
                assert!(reason.contains("default/early"), "{reason}");
                assert!(reason.contains("not synced yet"), "{reason}");
            }
            other => panic!("ADD before sync must be refused, got {other:?}"),
        }
        assert!(s.attachments.place(&registry_pod("early")).is_none());
    }

    #[tokio::test]
    async fn add_answers_captured_only_once_enrolled_and_del_releases() {
        let s = server(false);
        let (_d, ns) = fake_netns();
        let o = s
            .handle(Op::Add {
                pod: att("web", &ns),
            })
            .await;
        assert_eq!(o, Outcome::Captured { netns_cookie: 42 });
        let placed = s.attachments.place(&registry_pod("web")).unwrap();
        assert_eq!(placed.netns.as_deref(), Some(ns.as_path()));
        assert_eq!(
            placed.ips,
            vec!["10.9.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            s.handle(Op::Check {
                pod: att("web", &ns)
            })
            .await,
            Outcome::Captured { netns_cookie: 42 }
        );
        let r = AttachmentRef {
            container_id: "c-web".into(),
            ifname: "eth0".into(),
        };
        assert_eq!(
            s.handle(Op::Del {
                pod: None,
                attachment: r.clone()
            })
            .await,
            Outcome::Done {}
        );
        assert!(s.enroller.enrolled.read().unwrap().is_empty());
        // DEL again: nothing to do, still done, no reconcile.
        let before = s.enroller.reconciles.load(Ordering::Relaxed);
        assert_eq!(
            s.handle(Op::Del {
                attachment: r,
                pod: None
            })
            .await,
            Outcome::Done {}
        );
        assert_eq!(s.enroller.reconciles.load(Ordering::Relaxed), before);
    }

    /// The reason of an ADD that must be refused.
    async fn refused(s: &Server<Fake>, pod: PodAttachment) -> String {
        match s.handle(Op::Add { pod }).await {
            Outcome::Refused { reason } => reason,
            o => panic!("expected a refusal, got {o:?}"),
        }
    }

    #[tokio::test]
    async fn unknown_opted_out_and_failing_pods_get_their_reason() {
        let s = server(false);
        let ns = PathBuf::from("/proc/self/ns/net");
        let reason = refused(&s, att("ghost", &ns)).await;
        assert!(reason.contains("default/ghost"), "{reason}");
        assert!(matches!(
            s.handle(Op::Add {
                pod: att("plain", &ns)
            })
            .await,
            Outcome::NotMeshed { .. }
        ));
        let mut other = att("web", &ns);
        other.uid = "u-2".into();
        let reason = refused(&s, other).await;
        assert!(reason.contains("u-2"), "{reason}");
        let reason = refused(&server(true), att("web", &ns)).await;
        assert!(reason.contains("CA unreachable"), "{reason}");
    }

    #[tokio::test]
    async fn gc_keeps_what_the_runtime_lists_and_sweep_drops_gone_netns() {
        let s = server(false);
        let (_d, ns) = fake_netns();
        s.handle(Op::Add {
            pod: att("web", &ns),
        })
        .await;
        let keep = AttachmentRef {
            container_id: "c-web".into(),
            ifname: "eth0".into(),
        };
        s.handle(Op::Gc { valid: vec![keep] }).await;
        assert_eq!(s.attachments.len(), 1);
        s.handle(Op::Gc { valid: vec![] }).await;
        assert!(s.attachments.is_empty());
        assert!(s.enroller.enrolled.read().unwrap().is_empty());
        s.handle(Op::Add {
            pod: att("web", &ns),
        })
        .await;
        std::fs::remove_file(&ns).unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(s.sweep(empty.path()).await, (1, 0));
        assert!(s.attachments.is_empty());
    }

    #[tokio::test]
    async fn a_pod_that_started_fail_open_is_enrolled_from_its_record_then_the_record_goes() {
        let (d, ns) = fake_netns();
        let records = d.path().join("fail-open");
        std::fs::create_dir_all(&records).unwrap();
        let att_ = Arc::new(Attachments::default());
        let fake = fake(&att_, false);
        let s = Server::with_fail_open_dir(att_, fake, Limits::default(), records.clone());
        let record =
            serde_json::json!({"version": 1, "pod": att("web", &ns), "reason": "proxy down"});
        std::fs::write(records.join("default.web.json"), record.to_string()).unwrap();
        std::fs::write(records.join("junk.json"), "{").unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(s.sweep(empty.path()).await, (0, 1));
        assert_eq!(s.enroller.captured("default/web", &ns), Some(42));
        assert_eq!(
            s.attachments
                .stats
                .adopted_fail_open
                .load(Ordering::Relaxed),
            1
        );
        assert!(
            !records.join("junk.json").exists(),
            "an unreadable record stays"
        );
        // Captured: the next sweep drops the record, nothing pending.
        s.sweep(empty.path()).await;
        assert!(!records.join("default.web.json").exists());
        assert_eq!(
            s.attachments
                .stats
                .fail_open_pending
                .load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn a_netns_is_the_same_by_any_path() {
        let own = Path::new("/proc/self/ns/net");
        let by_pid = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        assert!(same_netns(own, &by_pid));
        assert!(!same_netns(own, Path::new("/proc/self/ns/mnt")));
        assert!(!same_netns(own, Path::new("/nonexistent/ns")));
    }

    #[test]
    fn running_pods_are_found_by_the_uid_in_their_cgroup() {
        let d = tempfile::tempdir().unwrap();
        let proc = d.path();
        // Our own netns, and a pod process with another one.
        for (pid, cgroup, ns) in [
            ("self", "0::/system.slice/proxy.service", "a"),
            (
                "77",
                "0::/kubepods.slice/kubepods-besteffort-podu_1.slice/cri-x.scope",
                "b",
            ),
            ("78", "0::/kubepods.slice/other", "c"),
        ] {
            std::fs::create_dir_all(proc.join(pid).join("ns")).unwrap();
            std::fs::write(proc.join(pid).join("cgroup"), cgroup).unwrap();
            std::fs::write(proc.join(pid).join("ns/net"), ns).unwrap();
        }
        let found = running_pods(proc, &[("default".into(), "web".into(), "u-1".into())]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].netns, proc.join("77/ns/net"));
        assert_eq!(found[0].container_id, "running:77");
    }

    #[tokio::test]
    async fn over_the_connection_cap_a_client_is_refused_at_once() {
        let att_ = Arc::new(Attachments::default());
        let fake = fake(&att_, false);
        let limits = Limits {
            max_connections: 1,
            read_timeout: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(10),
        };
        let s = Server::new(att_, fake, limits);
        let (_d, path, tx, task) = serving(&s);
        // Holds the only slot: connected, sends nothing.
        let _idle = UnixStream::connect(&path).await.unwrap();
        let mut c = UnixStream::connect(&path).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .expect("refused at once, not after the idle client's timeout")
            .unwrap();
        let r = enroll::parse_response(&out[4..]).unwrap();
        assert!(
            matches!(r.outcome, Outcome::Refused { ref reason } if reason.contains("busy")),
            "{r:?}"
        );
        assert_eq!(s.attachments.stats.busy.load(Ordering::Relaxed), 1);
        let _ = tx.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_socket_refuses_oversized_frames_and_serves_status() {
        let s = server(false);
        let (_d, path, tx, task) = serving(&s);
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(&((enroll::MAX_MESSAGE + 1) as u32).to_be_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        let r = enroll::parse_response(&out[4..]).unwrap();
        assert!(
            matches!(r.outcome, Outcome::Refused { ref reason } if reason.contains("limit")),
            "{r:?}"
        );
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(&enroll::encode(&enroll::Request::new(Op::Status {})).unwrap())
            .await
            .unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert_eq!(
            enroll::parse_response(&out[4..]).unwrap().outcome,
            Outcome::Done {}
        );
        let _ = tx.send(());
        task.await.unwrap();
    }
}
