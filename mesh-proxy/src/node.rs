//! The node agent: enrolls this node's pods (in-pod listeners, eBPF
//! enrollment, certificates) and carries their traffic — outbound from
//! 15001 over HBONE (or plain passthrough to non-mesh destinations),
//! inbound on 15008 (mTLS) and 15006 (plaintext) into the pod.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use mesh_core::identity::Identity;
use mesh_core::policy::{self, PolicySet};
use mesh_core::registry::{FileRegistry, Pod, Snapshot};
use mesh_ebpf::netns::PodSockets;
use mesh_ebpf::{
    Datapath, Direction, FlowEntry, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT,
    OrigDstReader, PROXY_MARK,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{Config, InboundMode};
use crate::hbone::{self, H2Config, Pool, PoolKey, Refusal, Tunnel, TunnelClosed};
use crate::identity::{CertManager, peer_identity};
use crate::metrics::{FlowLabels, FlowResolver};
use crate::notes::{FlowNotes, Note};

/// Timeouts of the data path's external waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const COPY_BUFFER: usize = 256 * 1024;

/// A pod this node serves.
pub struct EnrolledPod {
    pub pod: Pod,
    pub key: String,
    pub identity: Identity,
    pub cookie: u64,
    pub sockets: Arc<PodSockets>,
    pub server_tls: Arc<rustls::ServerConfig>,
    /// Accept loops; they hold the pod, so `stop` ends them explicitly.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub listeners: Vec<SocketAddr>,
}

impl EnrolledPod {
    /// Closes the pod's listeners (connections already open carry on).
    fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Counters of the proxy's own health (exported next to the Istio metrics).
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub outbound_opened: AtomicU64,
    pub outbound_failed: AtomicU64,
    pub inbound_opened: AtomicU64,
    pub inbound_denied: AtomicU64,
    pub plaintext_refused: AtomicU64,
    pub passthrough: AtomicU64,
    /// Tunnels or plaintext connections whose target was one of the
    /// proxy's own ports (they would make the proxy dial itself).
    pub proxy_port_refused: AtomicU64,
}

/// The proxy's own in-pod ports: never a target it dials for a peer (the
/// proxy would connect to itself, and again, until out of descriptors).
pub fn is_proxy_port(port: u16) -> bool {
    [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&port)
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) written as
/// the IPv4 address it is, so routing and policy see one address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To a meshed pod, through its node proxy: HBONE to `pod_ip:15008`
    /// with `:authority` = `target`.
    Mesh {
        dst: Box<Pod>,
        target: SocketAddr,
        service: Option<String>,
    },
    /// Not a mesh destination: plain TCP from the pod to `target`.
    Passthrough { target: SocketAddr },
    /// A Service with no endpoint or no such port.
    Unroutable { reason: String },
}

/// Picks the route for `orig`. `rr` spreads Service connections over their
/// endpoints.
pub fn route(snapshot: &Snapshot, orig: SocketAddr, rr: usize) -> Route {
    let orig = canonical(orig);
    if let Some(svc) = snapshot.service_by_vip(orig.ip()) {
        let name = format!("{}.{}.svc", svc.name, svc.namespace);
        let Some(port) = svc.target_port(orig.port()) else {
            return Route::Unroutable {
                reason: format!(
                    "service {}/{} has no port {}",
                    svc.namespace,
                    svc.name,
                    orig.port()
                ),
            };
        };
        let eps: Vec<&Pod> = snapshot
            .endpoints(svc)
            .filter(|p| !p.ips.is_empty())
            .collect();
        if eps.is_empty() {
            return Route::Unroutable {
                reason: format!("service {}/{} has no endpoints", svc.namespace, svc.name),
            };
        }
        let pod = eps[rr % eps.len()];
        let ip = pod
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == orig.is_ipv4())
            .unwrap_or(&pod.ips[0]);
        if !pod.meshed() {
            return Route::Passthrough {
                target: SocketAddr::new(*ip, port),
            };
        }
        return Route::Mesh {
            dst: Box::new(pod.clone()),
            target: SocketAddr::new(*ip, port),
            service: Some(name),
        };
    }
    match snapshot.pod_by_ip(orig.ip()).filter(|p| p.meshed()) {
        Some(pod) => Route::Mesh {
            dst: Box::new(pod.clone()),
            target: orig,
            service: None,
        },
        None => Route::Passthrough { target: orig },
    }
}

/// How the pool dials: from inside the source pod's netns, with the proxy's
/// mark, presenting the source pod's certificate and expecting the
/// destination pod's identity. `PoolKey::identity` carries the source pod's
/// `namespace/name`, so connections keep the pod's own IP on the wire.
pub struct MeshConnector {
    node: std::sync::Weak<NodeProxy>,
}

impl hbone::Connector for MeshConnector {
    fn dial(
        &self,
        key: &PoolKey,
    ) -> impl std::future::Future<Output = std::io::Result<TcpStream>> + Send {
        let node = self.node.upgrade();
        let key = key.clone();
        async move {
            let node = node.ok_or_else(|| std::io::Error::other("proxy shutting down"))?;
            let pod = node.enrolled(&key.identity).ok_or_else(|| {
                std::io::Error::other(format!("pod {} is not enrolled", key.identity))
            })?;
            dial_from(&pod.sockets, key.dest).await
        }
    }

    fn tls(
        &self,
        key: &PoolKey,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), String> {
        let node = self.node.upgrade().ok_or("proxy shutting down")?;
        let pod = node
            .enrolled(&key.identity)
            .ok_or_else(|| format!("pod {} is not enrolled", key.identity))?;
        let expected = node.expected_identity(key.dest.ip())?;
        let cfg = node
            .certs
            .client_config(&pod.identity, &expected)
            .map_err(|e| format!("TLS for {}: {e}", pod.identity))?;
        Ok((cfg, crate::identity::peer_server_name(&expected)))
    }

    fn verify(&self, key: &PoolKey, peer: &[CertificateDer<'static>]) -> Result<(), String> {
        let node = self.node.upgrade().ok_or("proxy shutting down")?;
        let expected = node.expected_identity(key.dest.ip())?;
        let leaf = peer.first().ok_or("peer sent no certificate")?;
        crate::identity::verify_peer_identity(leaf, &expected)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A TCP connection to `to` from a socket made in `sockets`' netns, carrying
/// the proxy mark (so the connect hooks leave it alone).
pub async fn dial_from(sockets: &PodSockets, to: SocketAddr) -> std::io::Result<TcpStream> {
    let std_sock = sockets.tcp_socket(to.is_ipv6(), Some(PROXY_MARK))?;
    let sock = TcpSocket::from_std_stream(std_sock);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(to))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect {to}: timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The running node proxy.
pub struct NodeProxy {
    pub cfg: Config,
    /// Control plane (enroll, unenroll, listeners) and admin reads; the
    /// data path never takes this lock.
    pub datapath: Mutex<Datapath>,
    /// The data path's own original-destination lookups (no lock).
    orig: OrigDstReader,
    pub registry: FileRegistry,
    pub certs: CertManager,
    pub policies: RwLock<Arc<PolicySet>>,
    pub pool: Pool<MeshConnector>,
    pub h2: H2Config,
    /// The caps of every pod's 15008 listener, node-wide.
    pub hbone_limiter: Arc<hbone::Limiter>,
    pods: RwLock<BTreeMap<String, Arc<EnrolledPod>>>,
    rr: AtomicUsize,
    /// What the data path learned about a kernel flow that the kernel does
    /// not know (a Service flow's endpoint, a delivery's source identity),
    /// handed to metrics without a shared lock.
    pub notes: FlowNotes,
    pub stats: ProxyStats,
    /// Open connections (every direction), so SIGTERM can wait for them.
    pub conns: crate::drain::Tracker,
    /// Handle of the data-plane runtime (accept loops and copies run there).
    data: tokio::runtime::Handle,
    drain: crate::drain::Watch,
}

impl NodeProxy {
    pub fn new(
        cfg: Config,
        datapath: Datapath,
        registry: FileRegistry,
        certs: CertManager,
        data: tokio::runtime::Handle,
        drain: crate::drain::Watch,
    ) -> Result<Arc<Self>, String> {
        let policies = policy_set(&registry.snapshot())?;
        let h2 = H2Config::default();
        let orig = datapath
            .orig_dst_reader()
            .map_err(|e| format!("open the original-destination map: {e}"))?;
        Ok(Arc::new_cyclic(|weak| NodeProxy {
            pool: Pool::new(MeshConnector { node: weak.clone() }, h2.clone()),
            h2,
            hbone_limiter: hbone::Limiter::new(cfg.hbone_limits.clone()),
            cfg,
            orig,
            datapath: Mutex::new(datapath),
            registry,
            certs,
            policies: RwLock::new(Arc::new(policies)),
            pods: RwLock::new(BTreeMap::new()),
            rr: AtomicUsize::new(0),
            notes: FlowNotes::default(),
            stats: ProxyStats::default(),
            conns: crate::drain::Tracker::default(),
            data,
            drain,
        }))
    }

    pub fn enrolled(&self, key: &str) -> Option<Arc<EnrolledPod>> {
        self.pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    pub fn enrolled_pods(&self) -> Vec<Arc<EnrolledPod>> {
        self.pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn by_cookie(&self, cookie: u64) -> Option<Arc<EnrolledPod>> {
        self.pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|p| p.cookie == cookie)
            .cloned()
    }

    /// The SPIFFE ID the pod with `ip` must present.
    fn expected_identity(&self, ip: IpAddr) -> Result<Identity, String> {
        let snap = self.registry.snapshot();
        let pod = snap
            .pod_by_ip(ip)
            .ok_or_else(|| format!("no pod has address {ip}"))?;
        pod.identity(&self.cfg.trust_domain)
            .map_err(|e| e.to_string())
    }

    /// The pods this node must enroll: scheduled here, with a netns, and not
    /// opted out of the mesh.
    pub fn wanted_pods<'a>(&'a self, snap: &'a Snapshot) -> impl Iterator<Item = &'a Pod> + 'a {
        snap.pods
            .iter()
            .filter(|p| p.node == self.cfg.node && p.netns.is_some() && p.meshed())
    }

    /// Brings enrollment in line with the registry: new pods of this node
    /// are enrolled, removed ones unenrolled. Returns problems, one per pod.
    pub async fn reconcile(self: &Arc<Self>) -> Vec<String> {
        let snap = self.registry.snapshot();
        match policy_set(&snap) {
            Ok(p) => {
                *self
                    .policies
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(p)
            }
            Err(e) => warn!(error = %e, "policies not updated: keeping the previous ones"),
        }
        let wanted: BTreeMap<String, Pod> = self
            .wanted_pods(&snap)
            .map(|p| (format!("{}/{}", p.namespace, p.name), p.clone()))
            .collect();
        let mut problems = Vec::new();
        let current: Vec<String> = self
            .pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for key in current.iter().filter(|k| !wanted.contains_key(*k)) {
            self.unenroll(key);
        }
        for (key, pod) in wanted {
            if self.enrolled(&key).is_some_and(|e| e.pod == pod) {
                continue;
            }
            if self.enrolled(&key).is_some() {
                self.unenroll(&key);
            }
            if let Err(e) = self.enroll(&key, pod).await {
                warn!(pod = %key, error = %e, "enrollment failed; the pod's traffic stays captured and refused (fail closed)");
                problems.push(format!("pod {key}: {e}"));
            }
        }
        problems
    }

    async fn enroll(self: &Arc<Self>, key: &str, pod: Pod) -> Result<(), String> {
        let netns = pod.netns.clone().ok_or("no netns")?;
        let identity = pod
            .identity(&self.cfg.trust_domain)
            .map_err(|e| e.to_string())?;
        // Capture first (fail closed): once the netns is in sm_enrolled its
        // connects go to 15001, which has no listener until enrollment
        // completes, so they are refused rather than sent in clear while
        // the certificate or a listener is missing.
        let cookie = self
            .datapath
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .enroll(&netns)
            .map_err(|e| e.to_string())?;
        self.certs
            .fetch(&identity)
            .await
            .map_err(|e| format!("certificate for {identity}: {e}"))?;
        let sockets = Arc::new(PodSockets::open(&netns).map_err(|e| e.to_string())?);
        let mut server_tls = (*self
            .certs
            .server_config(&identity)
            .map_err(|e| format!("TLS config for {identity}: {e}"))?)
        .clone();
        server_tls.alpn_protocols = vec![hbone::ALPN_H2.to_vec()];
        let server_tls = Arc::new(server_tls);

        let _guard = self.data.enter();
        let bind = |addr: SocketAddr| -> Result<TcpListener, String> {
            let l = sockets
                .listen(addr)
                .map_err(|e| format!("listen {addr} in {}: {e}", netns.display()))?;
            TcpListener::from_std(l).map_err(|e| format!("listen {addr}: {e}"))
        };
        let mut listeners = Vec::new();
        let out4 = bind("127.0.0.1:15001".parse().map_err(|_| "addr")?)?;
        listeners.push((out4, Port::Outbound));
        match bind("[::1]:15001".parse().map_err(|_| "addr")?) {
            Ok(l) => listeners.push((l, Port::Outbound)),
            Err(e) => {
                warn!(pod = %key, error = %e, "no IPv6 outbound listener; IPv6 connects of this pod will be refused")
            }
        }
        // Dual stack ([::] also takes IPv4): pods have IPv6 addresses too.
        let hbone_l = match bind("[::]:15008".parse().map_err(|_| "addr")?) {
            Ok(l) => l,
            Err(e) => {
                warn!(pod = %key, error = %e, "no IPv6 in the pod netns: HBONE on IPv4 only");
                bind("0.0.0.0:15008".parse().map_err(|_| "addr")?)?
            }
        };
        listeners.push((hbone_l, Port::Hbone));
        // Dual stack, so sk_lookup can hand it IPv4 and IPv6 connections;
        // addresses of a family it cannot take stay unregistered, and the
        // kernel drops plaintext to them (fail closed).
        let (plain, dual) = match bind("[::]:15006".parse().map_err(|_| "addr")?) {
            Ok(l) => (l, true),
            Err(e) => {
                warn!(pod = %key, error = %e, "no IPv6 in the pod netns: plaintext capture on IPv4 only");
                (bind("0.0.0.0:15006".parse().map_err(|_| "addr")?)?, false)
            }
        };
        {
            let mut dp = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            for ip in pod.ips.iter().filter(|ip| dual || ip.is_ipv4()) {
                dp.set_inbound_listener(*ip, &plain)
                    .map_err(|e| e.to_string())?;
            }
        }
        listeners.push((plain, Port::Plaintext));

        let addrs = listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect();
        let enrolled = Arc::new(EnrolledPod {
            pod,
            key: key.to_owned(),
            identity,
            cookie,
            sockets,
            server_tls,
            tasks: Mutex::new(Vec::new()),
            listeners: addrs,
        });
        for (l, port) in listeners {
            let node = self.clone();
            let p = enrolled.clone();
            let task = self
                .data
                .spawn(async move { node.accept_loop(p, l, port).await });
            enrolled
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(task);
        }
        info!(pod = %key, identity = %enrolled.identity, netns_cookie = cookie, "enrolled");
        self.pods
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned(), enrolled);
        Ok(())
    }

    fn unenroll(&self, key: &str) {
        let Some(p) = self
            .pods
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
        else {
            return;
        };
        p.stop();
        {
            let mut dp = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = dp.unenroll(p.cookie) {
                warn!(pod = %key, error = %e, "unenroll");
            }
            for ip in &p.pod.ips {
                let _ = dp.remove_inbound_listener(*ip);
            }
        }
        // Pods of one service account share its certificate: drop it only
        // with the last of them.
        let still_used = self
            .pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|o| o.identity == p.identity);
        if !still_used {
            self.certs.forget(&p.identity);
        }
        info!(pod = %key, "unenrolled");
    }

    async fn accept_loop(self: Arc<Self>, pod: Arc<EnrolledPod>, l: TcpListener, port: Port) {
        let mut drain = self.drain.clone();
        loop {
            let accepted = tokio::select! {
                _ = drain.signaled() => return,
                a = l.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(pod = %pod.key, ?port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let node = self.clone();
            let pod = pod.clone();
            let drain = self.drain.clone();
            let guard = self.conns.guard();
            tokio::spawn(async move {
                let _guard = guard;
                match port {
                    Port::Outbound => node.outbound(&pod, stream, peer).await,
                    Port::Hbone => node.inbound_hbone(pod, stream, peer, drain).await,
                    Port::Plaintext => node.inbound_plaintext(&pod, stream, peer).await,
                }
            });
        }
    }

    async fn outbound(&self, pod: &EnrolledPod, mut app: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let (orig, flow_cookie) = match self.orig.original(pod.cookie, peer) {
            Ok(Some((o, c))) => (canonical(o), c),
            Ok(None) => {
                self.stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
                warn!(pod = %pod.key, %peer, "no original destination for this connection; closing");
                return;
            }
            Err(e) => {
                self.stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
                warn!(pod = %pod.key, %peer, error = %e, "original destination lookup failed");
                return;
            }
        };
        let rr = self.rr.fetch_add(1, Ordering::Relaxed);
        let route = route(&self.registry.snapshot(), orig, rr);
        self.stats.outbound_opened.fetch_add(1, Ordering::Relaxed);
        match route {
            Route::Mesh {
                dst,
                target,
                service,
            } => {
                if service.is_some() {
                    self.notes.note(
                        flow_cookie,
                        Note::Endpoint(format!("{}/{}", dst.namespace, dst.name)),
                    );
                }
                let dst_ip = target.ip();
                let key =
                    PoolKey::new(pod.key.as_str(), SocketAddr::new(dst_ip, hbone::HBONE_PORT));
                let dst_id = dst
                    .identity(&self.cfg.trust_domain)
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                match self.pool.connect(&key, target).await {
                    Ok(mut tunnel) => {
                        let r = tokio::io::copy_bidirectional_with_sizes(
                            &mut app,
                            &mut tunnel,
                            COPY_BUFFER,
                            COPY_BUFFER,
                        )
                        .await;
                        let (up, down, err) = match r {
                            Ok((a, b)) => (a, b, None),
                            Err(e) => (0, 0, Some(e.to_string())),
                        };
                        info!(target: "access", direction = "outbound", src_workload = %pod.key,
                              src_identity = %pod.identity, dst = %orig, via = %target,
                              dst_workload = %format!("{}/{}", dst.namespace, dst.name), dst_identity = %dst_id,
                              service = service.as_deref().unwrap_or("-"), security = "mutual_tls",
                              bytes_sent = up, bytes_received = down,
                              duration_ms = start.elapsed().as_millis() as u64,
                              error = err.as_deref().unwrap_or("-"), "connection closed");
                    }
                    Err(e) => {
                        self.stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
                        // Refused (policy, unreachable): the app sees a reset.
                        reset(&app);
                        info!(target: "access", direction = "outbound", src_workload = %pod.key,
                              src_identity = %pod.identity, dst = %orig, via = %target, dst_identity = %dst_id,
                              status = e.status().map(|s| s.as_u16()).unwrap_or(0),
                              duration_ms = start.elapsed().as_millis() as u64,
                              error = %e, "connection refused");
                    }
                }
            }
            Route::Passthrough { target } => {
                self.stats.passthrough.fetch_add(1, Ordering::Relaxed);
                match dial_from(&pod.sockets, target).await {
                    Ok(mut up) => {
                        let r = tokio::io::copy_bidirectional_with_sizes(
                            &mut app,
                            &mut up,
                            COPY_BUFFER,
                            COPY_BUFFER,
                        )
                        .await;
                        let (a, b) = r.unwrap_or((0, 0));
                        info!(target: "access", direction = "outbound", src_workload = %pod.key, dst = %target,
                              security = "none", bytes_sent = a, bytes_received = b,
                              duration_ms = start.elapsed().as_millis() as u64, "passthrough closed");
                    }
                    Err(e) => {
                        self.stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
                        reset(&app);
                        info!(target: "access", direction = "outbound", src_workload = %pod.key, dst = %target,
                              security = "none", error = %e, "passthrough failed");
                    }
                }
            }
            Route::Unroutable { reason } => {
                self.stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
                reset(&app);
                info!(target: "access", direction = "outbound", src_workload = %pod.key, dst = %orig,
                      error = %reason, "connection refused");
            }
        }
    }

    async fn inbound_hbone(
        self: Arc<Self>,
        pod: Arc<EnrolledPod>,
        stream: TcpStream,
        peer: SocketAddr,
        mut drain: crate::drain::Watch,
    ) {
        let handler = Arc::new(Inbound {
            node: self.clone(),
            pod: pod.clone(),
            peer,
        });
        let drained = async move { drain.signaled().await };
        // Caps, the bounded mTLS handshake, then HTTP/2: the same path the
        // HBONE benchmark measures.
        let served = hbone::serve_tcp(
            stream,
            peer,
            pod.server_tls.clone(),
            handler,
            drained,
            &self.hbone_limiter,
            &self.h2,
        )
        .await;
        match served {
            Err(e @ hbone::HboneError::Accept { .. }) if e.cap_exceeded().is_none() => {
                info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer,
                      error = %e, "mTLS handshake refused");
            }
            Err(e) => debug!(pod = %pod.key, %peer, error = %e, "HBONE connection ended"),
            Ok(_) => {}
        }
    }

    async fn inbound_plaintext(&self, pod: &EnrolledPod, mut stream: TcpStream, peer: SocketAddr) {
        // sk_lookup keeps the original destination as the local address.
        let dst = match stream.local_addr() {
            Ok(a) => canonical(a),
            Err(_) => return,
        };
        if is_proxy_port(dst.port()) {
            self.stats
                .proxy_port_refused
                .fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer, dst = %dst,
                  security = "none", result = "refused", reason = "the proxy's own port is not a destination", "connection refused");
            reset(&stream);
            return;
        }
        if self.cfg.inbound_mode == InboundMode::Strict {
            self.stats.plaintext_refused.fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer, dst = %dst,
                  security = "none", result = "refused", reason = "STRICT: plaintext to a meshed pod", "connection refused");
            reset(&stream);
            return;
        }
        let decision = self.authorize(None, peer.ip(), &pod.pod, dst.port());
        if !decision.allowed {
            self.stats.inbound_denied.fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer, dst = %dst,
                  security = "none", result = "denied", policy = %decision.reason, "connection denied");
            reset(&stream);
            return;
        }
        let start = Instant::now();
        match dial_from(&pod.sockets, dst).await {
            Ok(mut app) => {
                self.note_delivery(&app, None, peer);
                let r = tokio::io::copy_bidirectional_with_sizes(
                    &mut stream,
                    &mut app,
                    COPY_BUFFER,
                    COPY_BUFFER,
                )
                .await;
                let (a, b) = r.unwrap_or((0, 0));
                info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer, dst = %dst,
                      security = "plaintext", bytes_received = a, bytes_sent = b,
                      duration_ms = start.elapsed().as_millis() as u64, "connection closed");
            }
            Err(e) => {
                info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer,
                            dst = %dst, error = %e, "upstream failed")
            }
        }
    }

    /// Tells metrics who is behind the delivery socket `app` (its kernel
    /// flow knows only the pod it enters).
    fn note_delivery(&self, app: &TcpStream, principal: Option<&Identity>, peer: SocketAddr) {
        match mesh_ebpf::netns::socket_cookie(app) {
            Ok(cookie) => self.notes.note(
                cookie,
                Note::Delivery {
                    source_principal: principal.map(|p| p.to_string()),
                    source_ip: peer.ip().to_canonical(),
                },
            ),
            Err(e) => debug!(error = %e, "SO_COOKIE of a delivery socket"),
        }
    }

    /// The policy decision for a connection to `dst_pod:port`.
    pub fn authorize(
        &self,
        principal: Option<&Identity>,
        src_ip: IpAddr,
        dst_pod: &Pod,
        port: u16,
    ) -> policy::Decision {
        let request = policy::Request {
            source: policy::Source {
                principal: principal.map(|p| p.to_string()),
                namespace: principal.map(|p| p.namespace().to_owned()),
                ip: src_ip,
            },
            destination: policy::Destination {
                namespace: dst_pod.namespace.clone(),
                labels: dst_pod.labels.clone(),
                port,
            },
        };
        self.policies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .evaluate(&request)
    }

    /// Flows of this node's pods, joined to workloads.
    pub fn flows(&self) -> Vec<(FlowEntry, Option<FlowLabels>)> {
        let flows = {
            let dp = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
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
}

/// Closes with RST instead of FIN when `stream` is dropped: a refusal, not
/// an empty answer.
fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::Linger, &linger);
}

impl NodeProxy {
    /// The `/explain` answer: kernel state, route and policy decision for
    /// `pod=NS/NAME&dst=IP:PORT` or `flow=COOKIE`.
    pub fn explain(&self, query: &str) -> Result<serde_json::Value, (http::StatusCode, String)> {
        use crate::admin::query_param;
        use http::StatusCode;
        use serde_json::json;
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let flows = self.flows();
        let (pod_key, dst): (String, SocketAddr) = if let Some(cookie) = query_param(query, "flow")
        {
            let cookie: u64 = cookie
                .parse()
                .map_err(|_| bad(format!("flow {cookie:?}: not a flow id")))?;
            let (f, _) = flows.iter().find(|(f, _)| f.cookie == cookie).ok_or((
                StatusCode::NOT_FOUND,
                format!("flow {cookie}: not in this node's flow map"),
            ))?;
            let pod = self.by_cookie(f.netns).ok_or((
                StatusCode::NOT_FOUND,
                format!("flow {cookie}: its netns is not enrolled here"),
            ))?;
            (pod.key.clone(), f.original_dst)
        } else {
            let pod = query_param(query, "pod")
                .ok_or_else(|| bad("need pod=NS/NAME (and dst=IP:PORT) or flow=ID".into()))?;
            let dst = query_param(query, "dst").ok_or_else(|| bad("need dst=IP:PORT".into()))?;
            let dst: SocketAddr = dst
                .parse()
                .map_err(|_| bad(format!("dst {dst:?}: not IP:PORT")))?;
            (pod, dst)
        };
        let snap = self.registry.snapshot();
        let (ns, name) = pod_key
            .split_once('/')
            .unwrap_or(("default", pod_key.as_str()));
        let pod = snap
            .pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
            .ok_or((
                StatusCode::NOT_FOUND,
                format!("pod {ns}/{name}: not in the registry"),
            ))?;
        if pod.node != self.cfg.node {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "pod {ns}/{name} runs on node {}; ask that node's proxy",
                    pod.node
                ),
            ));
        }
        let key = format!("{ns}/{name}");
        let enrolled = self.enrolled(&key);
        let identity = pod
            .identity(&self.cfg.trust_domain)
            .map(|i| i.to_string())
            .unwrap_or_default();
        let (mode, kernel_enrolled, stats) = {
            let dp = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            let in_kernel = enrolled
                .as_ref()
                .is_some_and(|e| dp.enrolled().unwrap_or_default().contains(&e.cookie));
            (
                dp.mode().to_string(),
                in_kernel,
                dp.stats().map(|s| json!(s)).unwrap_or_default(),
            )
        };
        let r = route(&snap, dst, 0);
        let (route_json, decision) = match &r {
            Route::Mesh {
                dst: dpod,
                target,
                service,
            } => {
                let src_id = pod.identity(&self.cfg.trust_domain).ok();
                let src_ip = pod.ips.first().copied().unwrap_or(dst.ip());
                let d = self.authorize(src_id.as_ref(), src_ip, dpod, target.port());
                let endpoints: Vec<String> = match snap.service_by_vip(dst.ip()) {
                    Some(svc) => snap
                        .endpoints(svc)
                        .map(|p| format!("{}/{}", p.namespace, p.name))
                        .collect(),
                    None => vec![format!("{}/{}", dpod.namespace, dpod.name)],
                };
                (
                    json!({
                        "kind": "mesh",
                        "service": service,
                        "endpoint_pod": format!("{}/{}", dpod.namespace, dpod.name),
                        "endpoints": endpoints,
                        "target": target.to_string(),
                        "tunnel": format!("HBONE (HTTP/2 CONNECT {target}) over mTLS to {}:{}", target.ip(), hbone::HBONE_PORT),
                        "expected_identity": dpod.identity(&self.cfg.trust_domain).map(|i| i.to_string()).unwrap_or_default(),
                        "destination_node": dpod.node,
                    }),
                    Some(d),
                )
            }
            Route::Passthrough { target } => (
                json!({"kind": "passthrough", "target": target.to_string(),
                       "reason": "not a pod or Service of the mesh: plain TCP from the pod, no mTLS"}),
                None,
            ),
            Route::Unroutable { reason } => (json!({"kind": "unroutable", "reason": reason}), None),
        };
        let pod_flows: Vec<_> = flows
            .iter()
            .filter(|(f, _)| {
                enrolled.as_ref().is_some_and(|e| e.cookie == f.netns) && f.original_dst == dst
            })
            .map(|(f, _)| {
                json!({"cookie": f.cookie, "app_socket": f.src, "bytes_sent": f.bytes_sent,
                       "bytes_received": f.bytes_received, "closed": f.is_closed(),
                       "age_ms": mesh_ebpf::age(f.start_ns).as_millis() as u64})
            })
            .collect();
        let verdict = if enrolled.is_none() {
            format!(
                "{key} is not enrolled on {}: its connections are captured but refused (fail closed)",
                self.cfg.node
            )
        } else {
            match (&r, &decision) {
                (
                    Route::Mesh {
                        dst: dpod, target, ..
                    },
                    Some(d),
                ) if d.allowed => format!(
                    "{key} -> {dst} is carried over mTLS to {}/{} at {target} on {}; policy allows it ({})",
                    dpod.namespace, dpod.name, dpod.node, d.reason
                ),
                (Route::Mesh { dst: dpod, .. }, Some(d)) => format!(
                    "{key} -> {dst} is DENIED by the destination {}/{}: {}",
                    dpod.namespace, dpod.name, d.reason
                ),
                (Route::Passthrough { target }, _) => {
                    format!(
                        "{key} -> {target} is not a mesh destination: passed through as plain TCP"
                    )
                }
                (Route::Unroutable { reason }, _) => format!("{key} -> {dst} is refused: {reason}"),
                _ => format!("{key} -> {dst}"),
            }
        };
        Ok(json!({
            "verdict": verdict,
            "pod": key,
            "node": self.cfg.node,
            "identity": identity,
            "enrolled": enrolled.is_some(),
            "netns_cookie": enrolled.as_ref().map(|e| e.cookie),
            "listeners": enrolled.as_ref().map(|e| e.listeners.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            "redirection_mode": mode,
            "kernel": {"enrolled": kernel_enrolled, "stats": stats},
            "destination": dst.to_string(),
            "route": route_json,
            "policy": decision.map(|d| json!({
                "allowed": d.allowed,
                "policy": d.policy.map(|p| p.to_string()),
                "rule": d.rule,
                "reason": d.reason,
            })),
            "flows": pod_flows,
        }))
    }
}

fn policy_set(snap: &Snapshot) -> Result<PolicySet, String> {
    Ok(PolicySet::new(
        snap.policies.clone(),
        mesh_core::policy::DEFAULT_ROOT_NAMESPACE,
    ))
}

#[derive(Clone, Copy, Debug)]
enum Port {
    Outbound,
    Hbone,
    Plaintext,
}

/// The 15008 side of one HBONE connection into `pod`.
struct Inbound {
    node: Arc<NodeProxy>,
    pod: Arc<EnrolledPod>,
    peer: SocketAddr,
}

impl hbone::Handler for Inbound {
    type Stream = TcpStream;

    fn open(
        &self,
        tunnel: Tunnel,
    ) -> impl std::future::Future<Output = Result<TcpStream, Refusal>> + Send {
        let node = self.node.clone();
        let pod = self.pod.clone();
        let peer = self.peer;
        async move {
            let target = canonical(tunnel.target);
            if is_proxy_port(target.port()) {
                node.stats
                    .proxy_port_refused
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Forbidden(format!(
                    "{target}: the proxy's own port is not a tunnel target"
                )));
            }
            if !pod.pod.ips.contains(&target.ip()) {
                return Err(Refusal::Unavailable(format!(
                    "{} is not an address of pod {}",
                    tunnel.target, pod.key
                )));
            }
            let principal = tunnel
                .peer_certificates
                .first()
                .ok_or_else(|| Refusal::Forbidden("no client certificate".into()))
                .and_then(|c| peer_identity(c).map_err(|e| Refusal::Forbidden(e.to_string())))?;
            let decision = node.authorize(Some(&principal), peer.ip(), &pod.pod, target.port());
            if !decision.allowed {
                node.stats.inbound_denied.fetch_add(1, Ordering::Relaxed);
                info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer,
                      src_identity = %principal, dst = %tunnel.target, security = "mutual_tls",
                      result = "denied", policy = %decision.reason, "connection denied");
                return Err(Refusal::Forbidden(decision.reason));
            }
            node.stats.inbound_opened.fetch_add(1, Ordering::Relaxed);
            let app = dial_from(&pod.sockets, target)
                .await
                .map_err(|e| Refusal::BadGateway(format!("connect {target}: {e}")))?;
            node.note_delivery(&app, Some(&principal), peer);
            Ok(app)
        }
    }

    fn closed(&self, c: &TunnelClosed) {
        let principal = c
            .peer_certificates
            .first()
            .and_then(|cert| peer_identity(cert).ok())
            .map(|i| i.to_string())
            .unwrap_or_default();
        info!(target: "access", direction = "inbound", dst_workload = %self.pod.key, src = %self.peer,
              src_identity = %principal, dst = %c.target, security = "mutual_tls",
              bytes_received = c.bytes_from_peer, bytes_sent = c.bytes_to_peer,
              duration_ms = c.duration.as_millis() as u64, error = c.error.as_deref().unwrap_or("-"),
              "connection closed");
    }
}

impl NodeProxy {
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
        let dst = self.by_cookie(f.netns)?;
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
        let src = self.by_cookie(f.netns)?;
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
