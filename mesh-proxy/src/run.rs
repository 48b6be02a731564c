//! Assembles and runs a node proxy: eBPF data path, registry, certificate
//! manager, the data-plane runtime (listeners, copies) and the control
//! runtime (registry watch, certificates, admin, metrics), and drains on
//! SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use mesh_core::admin as admin_api;
use mesh_core::identity::SystemClock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, Door};
use crate::config::Config;
use crate::config::SourceKind;
use crate::identity::{
    CaClientConfig, CertManager, CertManagerConfig, HttpsCaClient, Token, load_pem_certs,
};
use crate::metrics::{self, FlowSource, TcpMetrics};
use crate::proxy::NodeProxy;
use crate::registry::{KubeSource, RegistrySource, kube_client};

#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct RunError {
    pub what: String,
    pub reason: String,
}

fn fail(what: impl Into<String>, reason: impl std::fmt::Display) -> RunError {
    RunError {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// Replaces the log filter; `Err` names why the filter is bad.
pub type SetFilter = Box<dyn Fn(&str) -> Result<(), admin::BadFilter> + Send + Sync>;

/// Switches the log filter at run time (the admin port's `/logging`).
pub struct LogControl {
    pub set: SetFilter,
    pub current: Mutex<String>,
}

/// Raises the open-file limit to the hard limit: every connection is two
/// sockets, plus the pooled ones.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!(error = %e, "could not raise RLIMIT_NOFILE");
    }
}

/// Runs the proxy until SIGTERM/SIGINT, then drains.
pub fn run(cfg: Config, log: LogControl) -> Result<(), RunError> {
    cfg.validate().map_err(|e| fail("configuration", e))?;
    raise_nofile();
    let data_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers)
        .thread_name("data")
        .enable_all()
        .build()
        .map_err(|e| fail("data-plane runtime", e))?;
    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail("control runtime", e))?;

    let mut datapath = mesh_ebpf::Datapath::install(&cfg.cgroup, &cfg.pin_root).map_err(|e| {
        fail(
            format!("eBPF data path on cgroup {}", cfg.cgroup.display()),
            e,
        )
    })?;
    datapath
        .set_redirect(false)
        .map_err(|e| fail("eBPF flow mode", e))?;
    datapath
        .set_histograms(cfg.tcp_histograms)
        .map_err(|e| fail("--tcp-histograms", e))?;
    info!(mode = %datapath.mode(), pins = %datapath.pin_dir().display(), "data path ready");
    let registry = open_registry(&cfg, &control_rt)?;
    let anchors = load_pem_certs(&cfg.ca_bundle).map_err(|e| fail("--ca-bundle", e))?;
    // Checked now, then read again for every request (a projected
    // ServiceAccount token rotates).
    let token = Token::File(cfg.token_file.clone());
    token.current().map_err(|e| fail("--token-file", e))?;
    let client = HttpsCaClient::new(CaClientConfig::new(
        cfg.ca_addr.clone(),
        &cfg.ca_server_name,
        anchors.clone(),
        token,
    ))
    .map_err(|e| fail("CA client", e))?;
    let certs = CertManager::new(
        Arc::new(client),
        Arc::new(SystemClock),
        CertManagerConfig::new(&cfg.trust_domain),
        anchors,
    );

    let (trigger, watch) = crate::drain::channel();
    let node = NodeProxy::new(
        cfg.clone(),
        datapath,
        registry,
        certs.clone(),
        data_rt.handle().clone(),
        watch.clone(),
    )
    .map_err(|e| fail("node proxy", e))?;

    // Metrics read the kernel's flows through a map handle of their own:
    // a scrape never takes a lock the data path or the control plane holds.
    let flow_table = node
        .datapath
        .lock()
        .flow_table()
        .map_err(|e| fail("open the flow map", e))?;
    let tcp_metrics = Arc::new(
        TcpMetrics::new(
            Box::new(NodeFlows {
                table: flow_table,
                node: node.clone(),
            }),
            node.clone(),
        )
        .with_state_file(cfg.metrics_state.clone())
        .with_retention(cfg.metrics_retention)
        .with_closed_hook({
            let node = node.clone();
            Box::new(move |f| node.log_direct(f))
        }),
    );
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(tcp_metrics.clone()));
    // The kernel's RTT/duration histograms, through their own map handle.
    let hist_table = node
        .datapath
        .lock()
        .hist_table()
        .map_err(|e| fail("open the histogram map", e))?;
    registry.register_collector(Box::new(metrics::latency::TcpLatency::new(
        Box::new(hist_table),
        node.clone(),
    )));
    registry.register_collector(Box::new(Health(node.clone())));
    if cfg.cni_socket.is_some() {
        registry.register_collector(Box::new(crate::cni::Metrics(node.cni.clone())));
    }
    let state: Arc<dyn AdminState> = Arc::new(Admin {
        node: node.clone(),
        registry,
        log,
    });

    control_rt.block_on(async move {
        let (cert_stop_tx, cert_stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(certs.clone().run(cert_stop_rx));
        for (addr, door) in [
            (cfg.admin_addr, Door::Admin),
            (cfg.metrics_addr, Door::Metrics),
            (cfg.readiness_addr, Door::Readiness),
        ] {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| fail(format!("listen {addr} ({door:?})"), e))?;
            tokio::spawn(admin::serve(l, door, state.clone(), watch.clone()));
        }
        if cfg.same_node_direct {
            // The kernel same-node path's connections are seen by no proxy
            // socket: a sweep of the flow map writes their access-log
            // records within a second of their close. It reads the map only
            // while there is something to record: a connect took the path
            // since the last tick, or a flow of it was still open.
            let table = node.datapath.lock().flow_table().map_err(|e| fail("open the flow map", e))?;
            let sweeper = node.clone();
            let mut stop = watch.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                let (mut seen, mut open) = (None, false);
                loop {
                    tokio::select! {
                        _ = stop.signaled() => return,
                        _ = tick.tick() => {
                            let connects = sweeper.direct_connects();
                            let new = connects.is_none() || connects != seen;
                            if new || open {
                                // A connect counted now may not be
                                // established yet: look again next tick.
                                open = sweeper.sweep_direct(&table) || new;
                                seen = connects;
                            }
                        }
                    }
                }
            });
        }
        let problems = node.reconcile().await;
        node.report_status().await;
        info!(node = %cfg.node, source = %cfg.registry_source, pods = node.enrolled_pods().len(), problems = problems.len(), "node proxy up");
        if let Some(why) = node.registry.not_ready() {
            info!(status = %why, "waiting for the Kubernetes API; nothing is enrolled until every kind is listed once");
        }
        if let Some(path) = &cfg.cni_socket {
            let l = crate::cni::bind(path).map_err(|e| fail(format!("--cni-socket {}", path.display()), e))?;
            let fail_open = path.parent().unwrap_or(std::path::Path::new("/")).join("fail-open");
            let server = crate::cni::Server::with_fail_open_dir(node.cni.clone(), node.clone(), crate::cni::Limits::default(), fail_open);
            let mut stop = watch.clone();
            tokio::spawn(crate::cni::run(server, l, "/proc".into(), cfg.registry_poll, async move { stop.signaled().await }));
            info!(socket = %path.display(), "CNI enrollment socket up");
        }

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| fail("SIGTERM handler", e))?;
        let mut tick = tokio::time::interval(cfg.registry_poll);
        // The Kubernetes source says when its view changed; the file is
        // polled on the tick.
        let mut changes = node.registry.changes();
        let mut synced = node.registry.settled();
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                Some(_) = next_change(&mut changes) => {
                    first_sync(&node, &mut synced);
                    node.reconcile().await;
                    report(&node).await;
                }
                _ = tick.tick() => {
                    node.notes.drain();
                    // The last kind to list may change nothing in the view
                    // (no policies yet): no change to wake on, so check here.
                    let now_synced = first_sync(&node, &mut synced);
                    match node.registry.refresh() {
                        Ok(changed) if changed || now_synced => { node.reconcile().await; }
                        Ok(_) => {
                            // Retry pods that failed to enroll (CA down, ...).
                            if node.enrolled_pods().len() < wanted(&node) { node.reconcile().await; }
                        }
                        Err(e) => warn!(error = %e, "registry not reloaded; keeping the last good one"),
                    }
                    report(&node).await;
                }
            }
        }
        info!(open = node.conns.open(), "draining: no new connections; waiting for open ones");
        // No new kernel same-node connection either (the listeners close
        // next, which the kernel checks too).
        node.void_direct(true);
        trigger.signal();
        let _ = cert_stop_tx.send(true);
        drop(watch);
        if node.conns.idle(cfg.drain_deadline).await {
            info!("drained: every connection finished");
        } else {
            warn!(deadline = ?cfg.drain_deadline, open = node.conns.open(),
                  "drain deadline passed; closing what is left");
        }
        if let Err(e) = tcp_metrics.save() {
            warn!(error = %e, "metric totals not saved; they restart from the last saved state");
        }
        uninstall_if_removed(&cfg).await;
        Ok::<(), RunError>(())
    })?;
    data_rt.shutdown_timeout(std::time::Duration::from_secs(1));
    info!("stopped");
    Ok(())
}

/// In a cluster, when this proxy's DaemonSet is gone (`mesh uninstall`),
/// removes its eBPF pins: the kernel detaches the programs once this
/// process exits, and the node is left as it was. A restart (the DaemonSet
/// is there) keeps them for the next proxy. When the API cannot tell, the
/// pins stay, and the log says how to remove them.
async fn uninstall_if_removed(cfg: &Config) {
    let (SourceKind::Kubernetes, Some(ns), Some(pod)) = (
        cfg.registry_source,
        cfg.pod_namespace.as_deref(),
        cfg.pod_name.as_deref(),
    ) else {
        return;
    };
    let asked = async {
        let client = kube_client(cfg.kubeconfig.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        crate::uninstall::verdict(&client, ns, pod)
            .await
            .map_err(|e| e.to_string())
    };
    let keep = "the pins stay; remove them with `rm -r` of the pin root once no proxy runs";
    match tokio::time::timeout(std::time::Duration::from_secs(5), asked).await {
        Ok(Ok(crate::uninstall::Verdict::Uninstall { daemonset })) => {
            match mesh_ebpf::uninstall(&cfg.pin_root) {
                Ok(r) => info!(%daemonset, pins = r.pins.len(), pin_root = %cfg.pin_root.display(),
                               "DaemonSet removed: eBPF pins removed (uninstall)"),
                Err(e) => warn!(%daemonset, error = %e, pin_root = %cfg.pin_root.display(),
                                "DaemonSet removed but the pins could not be removed"),
            }
        }
        Ok(Ok(v)) => {
            info!(verdict = ?v, "stopping, not uninstalling: the eBPF pins stay for the next proxy")
        }
        Ok(Err(e)) => {
            warn!(error = %e, pin_root = %cfg.pin_root.display(), "could not ask the API whether this is an uninstall; {keep}")
        }
        Err(_) => {
            warn!(pin_root = %cfg.pin_root.display(), "the API did not answer within 5 s whether this is an uninstall; {keep}")
        }
    }
}

/// The registry source `--registry-source` names: the file, or watchers on
/// the Kubernetes API (started on `rt`, where they run).
fn open_registry(cfg: &Config, rt: &tokio::runtime::Runtime) -> Result<RegistrySource, RunError> {
    match cfg.registry_source {
        SourceKind::File => {
            let path = cfg
                .registry
                .as_deref()
                .ok_or_else(|| fail("--registry", "missing"))?;
            RegistrySource::file(path).map_err(|e| fail("registry", e))
        }
        SourceKind::Kubernetes => rt.block_on(async {
            let client = kube_client(cfg.kubeconfig.as_deref())
                .await
                .map_err(|e| fail("registry", e))?;
            info!(node = %cfg.node, "watching the Kubernetes API for this node's pods");
            Ok(RegistrySource::kubernetes(KubeSource::start(
                client,
                &cfg.kube_settings(),
            )))
        }),
    }
}

/// The next generation of the Kubernetes view; never for the file source
/// (or once the source is gone).
async fn next_change(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<u64> {
    let Some(rx) = changes else {
        return std::future::pending().await;
    };
    match rx.changed().await {
        Ok(()) => Some(*rx.borrow_and_update()),
        Err(_) => {
            *changes = None;
            None
        }
    }
}

/// Whether the registry just became settled (the Kubernetes source's
/// first whole view); logs it once.
fn first_sync(node: &NodeProxy, synced: &mut bool) -> bool {
    if *synced || !node.registry.settled() {
        return false;
    }
    *synced = true;
    info!(
        pods = node.registry.snapshot().pods.len(),
        "Kubernetes API synced: reconciling"
    );
    true
}

/// Writes the pods' status back (Kubernetes) and logs what was written.
async fn report(node: &NodeProxy) {
    if let Some(done) = node.report_status().await
        && (done.written > 0 || done.failed > 0)
    {
        info!(
            written = done.written,
            unchanged = done.unchanged,
            failed = done.failed,
            "pod status written back"
        );
    }
}

fn wanted(node: &NodeProxy) -> usize {
    node.wanted_pods(&node.registry.snapshot()).count()
}

/// The kernel flow map, through the metrics' own handle; reading it also
/// drops the data path's notes of flows that are gone.
struct NodeFlows {
    table: mesh_ebpf::FlowTable,
    node: Arc<NodeProxy>,
}

impl FlowSource for NodeFlows {
    fn flows(&mut self) -> Result<Vec<mesh_ebpf::FlowEntry>, metrics::FlowMapError> {
        let flows = self.table.flows()?;
        self.node.prune_chosen(&flows);
        Ok(flows)
    }
    fn forget(&mut self, cookie: u64) -> Result<(), metrics::FlowMapError> {
        Ok(self.table.forget(cookie)?)
    }
}

/// The proxy's own health metrics and the redirection mode.
#[derive(Debug)]
struct Health(Arc<NodeProxy>);

impl Collector for Health {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0.stats;
        for (name, help, v) in [
            (
                "sockmesh_outbound_connections",
                "Outbound connections accepted on 15001.",
                &s.outbound_opened,
            ),
            (
                "sockmesh_outbound_failures",
                "Outbound connections that could not be carried.",
                &s.outbound_failed,
            ),
            (
                "sockmesh_inbound_connections",
                "Inbound tunnels opened to pods.",
                &s.inbound_opened,
            ),
            (
                "sockmesh_inbound_denied",
                "Inbound connections denied by policy.",
                &s.inbound_denied,
            ),
            (
                "sockmesh_plaintext_refused",
                "Plaintext connections refused (STRICT).",
                &s.plaintext_refused,
            ),
            (
                "sockmesh_passthrough_connections",
                "Outbound connections to non-mesh destinations.",
                &s.passthrough,
            ),
        ] {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(e)?;
        }
        let mode = self.0.datapath.lock().mode().clone();
        let mut e = encoder.encode_descriptor(
            "sockmesh_redirection_mode",
            "1 for the redirection mode in force (sockmap, or degraded with the reason in logs).",
            None,
            MetricType::Gauge,
        )?;
        let label = [(
            "mode",
            if mode == mesh_ebpf::Mode::Sockmap {
                "sockmap"
            } else {
                "degraded"
            },
        )];
        ConstGauge::new(1i64).encode(e.encode_family(&label)?)?;
        let mut e = encoder.encode_descriptor(
            "sockmesh_enrolled_pods",
            "Pods enrolled on this node.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.0.enrolled_pods().len() as i64)
            .encode(e.encode_family(&[("node", self.0.cfg.node.as_str())])?)?;
        Ok(())
    }
}

/// The registry's source and, for Kubernetes, its health (`/config_dump`).
fn registry_dump(registry: &RegistrySource) -> serde_json::Value {
    match registry.kube() {
        None => json!({"source": registry.kind()}),
        Some(k) => {
            let h = k.registry.health();
            json!({
                "source": registry.kind(),
                "synced": h.synced,
                "stale": h.stale,
                "since_contact_ms": h.since_contact.as_millis() as u64,
                "last_error": h.last_error,
                "lists": h.lists,
                "generation": k.registry.view().generation,
                "problems": k.registry.view().problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        }
    }
}

struct Admin {
    node: Arc<NodeProxy>,
    registry: prometheus_client::registry::Registry,
    log: LogControl,
}

impl AdminState for Admin {
    fn config_dump(&self) -> serde_json::Value {
        let dp = self.node.datapath.lock();
        json!({
            "config": self.node.cfg,
            "redirection_mode": dp.mode().to_string(),
            "app_redirect": dp.redirect().unwrap_or(false),
            "pins": dp.pin_dir(),
            "policies": self.node.policies.read().len(),
            "registry": registry_dump(&self.node.registry),
        })
    }

    fn workloads(&self) -> serde_json::Value {
        let pods = self
            .node
            .outcomes()
            .into_iter()
            .map(|(p, outcome)| {
                let key = format!("{}/{}", p.namespace, p.name);
                let e = self.node.enrolled(&key);
                admin_api::Workload {
                    ips: p.ips.iter().map(ToString::to_string).collect(),
                    identity: p
                        .identity(&self.node.cfg.trust_domain)
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                    enrolled: e.is_some(),
                    netns: p.netns.as_ref().map(|n| n.display().to_string()),
                    netns_cookie: e.as_ref().map(|e| e.cookie),
                    listeners: e.map(|e| e.listeners.iter().map(ToString::to_string).collect()),
                    labels: p.labels.clone(),
                    reason: outcome.reason().map(str::to_owned),
                    message: outcome.message(),
                    fault: outcome.is_fault(),
                    pod: key,
                }
            })
            .collect::<Vec<_>>();
        json!(admin_api::Workloads {
            node: self.node.cfg.node.clone(),
            pods,
        })
    }

    fn certs(&self) -> serde_json::Value {
        serde_json::to_value(self.node.certs.states()).unwrap_or_default()
    }

    fn flows(&self) -> serde_json::Value {
        let rtts = self.node.tunnel_rtts();
        let flows: Vec<_> = self
            .node
            .flows()
            .into_iter()
            .map(|(f, l)| {
                let l = l.unwrap_or_default();
                admin_api::Flow {
                    cookie: f.cookie,
                    direction: match f.direction {
                        mesh_ebpf::Direction::Outbound => "outbound",
                        mesh_ebpf::Direction::Inbound => "inbound",
                    }
                    .to_owned(),
                    source_workload: format!(
                        "{}/{}",
                        l.source_workload_namespace, l.source_workload
                    ),
                    source_principal: l.source_principal,
                    app_socket: f.src.to_string(),
                    original_dst: f.original_dst.to_string(),
                    destination_workload: format!(
                        "{}/{}",
                        l.destination_workload_namespace, l.destination_workload
                    ),
                    destination_principal: l.destination_principal,
                    destination_pod: self.node.destination_pod(&f),
                    destination_service: l.destination_service,
                    security: l.connection_security_policy,
                    bytes_sent: f.bytes_sent,
                    bytes_received: f.bytes_received,
                    age_ms: mesh_ebpf::age(f.start_ns).as_millis() as u64,
                    closed: f.is_closed(),
                    srtt_us: f.srtt_us.into(),
                    rtt: self.node.flow_rtt(&f, &rtts),
                }
            })
            .collect();
        json!(flows)
    }

    fn stats(&self) -> serde_json::Value {
        let dp = self.node.datapath.lock();
        let kernel = dp
            .stats()
            .map(|s| json!(s))
            .unwrap_or_else(|e| json!({"error": e.to_string()}));
        let s = &self.node.stats;
        json!({
            "kernel": kernel,
            "proxy": {
                "outbound_opened": s.outbound_opened.load(Ordering::Relaxed),
                "outbound_failed": s.outbound_failed.load(Ordering::Relaxed),
                "inbound_opened": s.inbound_opened.load(Ordering::Relaxed),
                "inbound_denied": s.inbound_denied.load(Ordering::Relaxed),
                "plaintext_refused": s.plaintext_refused.load(Ordering::Relaxed),
                "passthrough": s.passthrough.load(Ordering::Relaxed),
            }
        })
    }

    fn set_log_level(&self, filter: &str) -> Result<(), admin::BadFilter> {
        (self.log.set)(filter)?;
        *self.log.current.lock() = filter.to_owned();
        info!(filter, "log filter changed");
        Ok(())
    }

    fn log_level(&self) -> String {
        self.log.current.lock().clone()
    }

    fn ready(&self) -> Result<(), admin::NotReady> {
        let snap = self.node.registry.snapshot();
        let mut missing: Vec<String> = self.node.registry.not_ready().into_iter().collect();
        for p in self.node.wanted_pods(&snap) {
            let key = format!("{}/{}", p.namespace, p.name);
            match self.node.enrolled(&key) {
                None => missing.push(format!("{key} not enrolled")),
                Some(e) => {
                    if !self
                        .node
                        .certs
                        .state(&e.spec().identity)
                        .is_some_and(|s| s.valid)
                    {
                        missing.push(format!("{key} has no valid certificate"));
                    }
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(admin::NotReady(missing))
        }
    }

    fn explain(&self, query: &str) -> Result<serde_json::Value, (http::StatusCode, String)> {
        self.node.explain(query)
    }

    fn metrics(&self, format: crate::metrics::exposition::Format) -> (String, &'static str) {
        let out = crate::metrics::exposition::encode(&self.registry, format).unwrap_or_else(|e| {
            error!(error = %e, "encoding metrics");
            String::new()
        });
        (out, format.content_type())
    }
}
