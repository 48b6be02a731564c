//! The pods this node serves: enrollment (capture in the kernel, the
//! certificate, the in-pod listeners on 15001/15006/15008), reconciliation
//! with the registry, and the accept loops that hand each connection to
//! its direction in [`crate::proxy`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::identity::{Identity, IdentityError};
use mesh_core::registry::{Pod, Snapshot};
use mesh_ebpf::netns::{NetnsError, PodSockets};
use mesh_ebpf::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use parking_lot::{Mutex, RwLock};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, warn};

use crate::hbone;
use crate::identity::{CertError, TlsConfigError};
use crate::proxy::{NodeProxy, policy_set};

/// Why a pod could not be enrolled or updated (it stays captured, and its
/// connections refused, until a retry succeeds).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no netns")]
    NoNetns,
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The kernel side: capture of the netns, or an inbound registration.
    #[error(transparent)]
    Datapath(Box<mesh_ebpf::Error>),
    #[error("certificate for {identity}: {source}")]
    Certificate {
        identity: Identity,
        #[source]
        source: Box<CertError>,
    },
    #[error("TLS config for {identity}: {source}")]
    TlsConfig {
        identity: Identity,
        #[source]
        source: Box<TlsConfigError>,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("listen {addr} in {}: {source}", netns.display())]
    Listen {
        addr: SocketAddr,
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: listeners closed")]
    Closed { pod: String },
}

/// Whether `a` and `b` differ at most in the `sockmesh.io/status`
/// annotation, which the proxy writes itself and nothing below reads (so
/// writing it back does not update every pod in place once more).
fn same_pod(a: &Pod, b: &Pod) -> bool {
    let strip = |p: &Pod| {
        let mut p = p.clone();
        p.annotations.remove(mesh_core::opt_in::STATUS_ANNOTATION);
        p
    };
    a == b || strip(a) == strip(b)
}

impl EnrollError {
    /// What kind of failure this is, for the pod's status.
    pub fn fault(&self) -> crate::pod_status::Fault {
        match self {
            EnrollError::Certificate { .. } => crate::pod_status::Fault::CertificateRefused,
            _ => crate::pod_status::Fault::EnrollmentFailed,
        }
    }
}

impl From<mesh_ebpf::Error> for EnrollError {
    fn from(e: mesh_ebpf::Error) -> Self {
        EnrollError::Datapath(Box::new(e))
    }
}

/// A pod this node serves: what stays for as long as it is enrolled in one
/// network namespace (its cookie, sockets, listeners and their accept
/// loops), and its [`PodSpec`], which a registry change replaces in place.
pub struct EnrolledPod {
    pub key: String,
    pub cookie: u64,
    pub netns: PathBuf,
    pub sockets: Arc<PodSockets>,
    pub listeners: Vec<SocketAddr>,
    /// The 15006 listener takes IPv6 as well as IPv4.
    dual_stack: bool,
    /// A handle of the 15006 listener, to register addresses the pod gains
    /// later; taken by `stop` and by the loop when draining, so the
    /// listener closes with its loop (a listener nobody accepts on would
    /// hold the connections the kernel steers to it).
    plaintext: Mutex<Option<OwnedFd>>,
    /// Accept loops; they hold the pod, so `stop` ends them explicitly.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    spec: RwLock<Arc<PodSpec>>,
}

/// What the registry says of an enrolled pod, and the TLS it serves with.
pub struct PodSpec {
    pub pod: Pod,
    pub identity: Identity,
    pub server_tls: Arc<rustls::ServerConfig>,
}

impl EnrolledPod {
    /// The pod as it is now (a connection reads it once, when accepted).
    pub fn spec(&self) -> Arc<PodSpec> {
        self.spec.read().clone()
    }

    /// Closes the pod's listeners (connections already open carry on).
    fn stop(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.plaintext.lock().take();
    }
}

/// Which in-pod listener a connection came in on.
#[derive(Clone, Copy, Debug)]
enum Port {
    Outbound,
    Hbone,
    Plaintext,
}

impl Port {
    fn number(self) -> u16 {
        match self {
            Port::Outbound => OUTBOUND_PORT,
            Port::Hbone => HBONE_PORT,
            Port::Plaintext => INBOUND_PLAINTEXT_PORT,
        }
    }
}

impl NodeProxy {
    pub fn enrolled(&self, key: &str) -> Option<Arc<EnrolledPod>> {
        self.pods.get(key)
    }

    pub fn enrolled_pods(&self) -> Vec<Arc<EnrolledPod>> {
        self.pods.all()
    }

    /// The enrolled pod whose netns has `cookie`.
    pub(crate) fn by_cookie(&self, cookie: u64) -> Option<Arc<EnrolledPod>> {
        self.pods.by_cookie(cookie)
    }

    /// The pods this node must enroll: scheduled here, with a netns, and not
    /// opted out of the mesh.
    pub fn wanted_pods<'a>(&'a self, snap: &'a Snapshot) -> impl Iterator<Item = Pod> + 'a {
        snap.pods
            .iter()
            .filter(|p| p.node == self.cfg.node && p.meshed())
            // The netns from the file, or the one CNI reported.
            .filter_map(|p| {
                self.cni
                    .place(p)
                    .or_else(|| p.netns.is_some().then(|| p.clone()))
            })
    }

    /// Brings enrollment in line with the registry: new pods of this node
    /// are enrolled, changed ones updated in place (their capture never
    /// lapses), removed ones unenrolled. A pod that failed is tried again
    /// after its own backoff. Returns this round's problems, one per pod.
    pub async fn reconcile(self: &Arc<Self>) -> Vec<String> {
        // One at a time: the run loop and the CNI socket both call this.
        let _one = self.cni.reconciling().await;
        // A Kubernetes source that has not listed everything once is a
        // partial view (pods without their namespaces): enrolling against it
        // could unenroll pods their namespace opts in. Wait for the whole.
        if !self.registry.settled() {
            return vec!["registry: Kubernetes API not synced yet; nothing reconciled".into()];
        }
        let snap = self.registry.snapshot();
        *self.policies.write() = Arc::new(policy_set(&snap));
        // What the kernel same-node path was authorized under may have
        // changed: from here on it is decided again (by the proxy).
        self.void_direct(false);
        let wanted: BTreeMap<String, Pod> = self
            .wanted_pods(&snap)
            .map(|p| (format!("{}/{}", p.namespace, p.name), p))
            .collect();
        for key in self.pods.keys().iter().filter(|k| !wanted.contains_key(*k)) {
            self.unenroll(key);
        }
        self.retry.retain(|k| wanted.contains_key(k));
        let mut problems = Vec::new();
        let now = Instant::now();
        for (key, pod) in wanted {
            let current = self.enrolled(&key);
            if current
                .as_ref()
                .is_some_and(|e| same_pod(&e.spec().pod, &pod))
            {
                continue;
            }
            if !self.retry.due(&key, now) {
                continue;
            }
            let done = match current {
                Some(e) if self.same_netns(&e, &pod) => self.update(&e, pod).await,
                // Moved to another netns: the new one is captured and served
                // before the old one is let go.
                Some(old) => {
                    let keep = pod.ips.clone();
                    let r = self.enroll(&key, pod).await;
                    if r.is_ok() {
                        self.release(&old, &keep);
                    }
                    r
                }
                None => self.enroll(&key, pod).await,
            };
            match done {
                Ok(()) => self.retry.succeeded(&key),
                Err(e) => {
                    let r = self.retry.failed(&key, e.fault(), &e.to_string(), now);
                    if r.news {
                        warn!(pod = %key, error = %e, retry_in = ?r.after, "enrollment failed; the pod's traffic stays captured and refused (fail closed)");
                    } else {
                        debug!(pod = %key, error = %e, attempts = r.attempts, retry_in = ?r.after, "enrollment failed again");
                    }
                    problems.push(format!("pod {key}: {e}"));
                }
            }
        }
        // Enrollment changed under decisions made during this round.
        self.void_direct(false);
        problems
    }

    /// Whether `pod` still lives in the netns `e` is enrolled in.
    fn same_netns(&self, e: &EnrolledPod, pod: &Pod) -> bool {
        pod.netns.as_deref().is_some_and(|n| {
            n == e.netns || mesh_ebpf::netns::cookie(n).is_ok_and(|c| c == e.cookie)
        })
    }

    /// Applies a registry change to an enrolled pod without touching its
    /// capture or listeners: a new identity's certificate first, then the
    /// addresses the pod gained (before dropping those it lost), then the
    /// new spec for connections accepted from now on.
    async fn update(&self, e: &EnrolledPod, pod: Pod) -> Result<(), EnrollError> {
        let old = e.spec();
        let identity = pod.identity(&self.cfg.trust_domain)?;
        let server_tls = if identity == old.identity {
            old.server_tls.clone()
        } else {
            self.server_tls(&identity).await?
        };
        {
            let plaintext = e.plaintext.lock();
            let fd = plaintext
                .as_ref()
                .ok_or_else(|| EnrollError::Closed { pod: e.key.clone() })?;
            let mut dp = self.datapath.lock();
            for ip in pod.ips.iter().filter(|ip| e.dual_stack || ip.is_ipv4()) {
                dp.set_inbound_listener(*ip, fd)?;
            }
            for ip in old.pod.ips.iter().filter(|ip| !pod.ips.contains(ip)) {
                let _ = dp.remove_inbound_listener(*ip);
            }
        }
        *e.spec.write() = Arc::new(PodSpec {
            pod,
            identity,
            server_tls,
        });
        if !self.pods.uses(&old.identity) {
            self.certs.forget(&old.identity);
        }
        info!(pod = %e.key, identity = %e.spec().identity, "updated in place");
        Ok(())
    }

    /// The certificate of `identity` and the 15008 TLS configuration that
    /// presents it.
    async fn server_tls(
        &self,
        identity: &Identity,
    ) -> Result<Arc<rustls::ServerConfig>, EnrollError> {
        self.certs
            .fetch(identity)
            .await
            .map_err(|source| EnrollError::Certificate {
                identity: identity.clone(),
                source: Box::new(source),
            })?;
        let mut server_tls =
            (*self
                .certs
                .server_config(identity)
                .map_err(|source| EnrollError::TlsConfig {
                    identity: identity.clone(),
                    source: Box::new(source),
                })?)
            .clone();
        server_tls.alpn_protocols = vec![hbone::ALPN_H2.to_vec()];
        Ok(Arc::new(server_tls))
    }

    async fn enroll(self: &Arc<Self>, key: &str, pod: Pod) -> Result<(), EnrollError> {
        let netns = pod.netns.clone().ok_or(EnrollError::NoNetns)?;
        let identity = pod.identity(&self.cfg.trust_domain)?;
        // Capture first (fail closed): once the netns is in sm_enrolled its
        // connects go to 15001, which has no listener until enrollment
        // completes, so they are refused rather than sent in clear while
        // the certificate or a listener is missing.
        let cookie = self.datapath.lock().enroll(&netns)?;
        let server_tls = self.server_tls(&identity).await?;
        let sockets = Arc::new(PodSockets::open(&netns)?);

        let _guard = self.data.enter();
        let bind = |ip: IpAddr, port: u16| -> Result<TcpListener, EnrollError> {
            let addr = SocketAddr::new(ip, port);
            let listen_err = |source| EnrollError::Listen {
                addr,
                netns: netns.clone(),
                source,
            };
            TcpListener::from_std(sockets.listen(addr).map_err(listen_err)?).map_err(listen_err)
        };
        let (v4_any, v6_any) = (Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into());
        let mut listeners = Vec::new();
        let out4 = bind(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT)?;
        listeners.push((out4, Port::Outbound));
        match bind(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT) {
            Ok(l) => listeners.push((l, Port::Outbound)),
            Err(e) => {
                warn!(pod = %key, error = %e, "no IPv6 outbound listener; IPv6 connects of this pod will be refused")
            }
        }
        // Dual stack ([::] also takes IPv4): pods have IPv6 addresses too.
        let hbone_l = match bind(v6_any, HBONE_PORT) {
            Ok(l) => l,
            Err(e) => {
                warn!(pod = %key, error = %e, "no IPv6 in the pod netns: HBONE on IPv4 only");
                bind(v4_any, HBONE_PORT)?
            }
        };
        listeners.push((hbone_l, Port::Hbone));
        // Dual stack, so sk_lookup can hand it IPv4 and IPv6 connections;
        // addresses of a family it cannot take stay unregistered, and the
        // kernel drops plaintext to them (fail closed).
        let (plain, dual_stack) = match bind(v6_any, INBOUND_PLAINTEXT_PORT) {
            Ok(l) => (l, true),
            Err(e) => {
                warn!(pod = %key, error = %e, "no IPv6 in the pod netns: plaintext capture on IPv4 only");
                (bind(v4_any, INBOUND_PLAINTEXT_PORT)?, false)
            }
        };
        {
            let mut dp = self.datapath.lock();
            for ip in pod.ips.iter().filter(|ip| dual_stack || ip.is_ipv4()) {
                dp.set_inbound_listener(*ip, &plain)?;
            }
        }
        let plaintext =
            plain
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| EnrollError::Listen {
                    addr: SocketAddr::new(v6_any, INBOUND_PLAINTEXT_PORT),
                    netns: netns.clone(),
                    source,
                })?;
        listeners.push((plain, Port::Plaintext));

        let addrs = listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect();
        let enrolled = Arc::new(EnrolledPod {
            key: key.to_owned(),
            cookie,
            netns,
            sockets,
            listeners: addrs,
            dual_stack,
            plaintext: Mutex::new(Some(plaintext)),
            tasks: Mutex::new(Vec::new()),
            spec: RwLock::new(Arc::new(PodSpec {
                pod,
                identity,
                server_tls,
            })),
        });
        for (l, port) in listeners {
            let node = self.clone();
            let p = enrolled.clone();
            let task = self
                .data
                .spawn(async move { node.accept_loop(p, l, port).await });
            enrolled.tasks.lock().push(task);
        }
        info!(pod = %key, identity = %enrolled.spec().identity, netns_cookie = cookie, "enrolled");
        self.pods.insert(enrolled);
        Ok(())
    }

    fn unenroll(&self, key: &str) {
        if let Some(p) = self.pods.remove(key) {
            self.release(&p, &[]);
            info!(pod = %key, "unenrolled");
        }
    }

    /// Lets go of an enrollment that is no longer in the table: its
    /// listeners, its netns' capture (unless another enrollment holds that
    /// netns), its addresses (but `keep`), and its certificate unless
    /// another pod of its service account still uses it.
    fn release(&self, p: &EnrolledPod, keep: &[IpAddr]) {
        p.stop();
        {
            let mut dp = self.datapath.lock();
            if self.pods.by_cookie(p.cookie).is_none()
                && let Err(e) = dp.unenroll(p.cookie)
            {
                warn!(pod = %p.key, error = %e, "unenroll");
            }
            for ip in p.spec().pod.ips.iter().filter(|ip| !keep.contains(ip)) {
                let _ = dp.remove_inbound_listener(*ip);
            }
        }
        let identity = &p.spec().identity;
        if !self.pods.uses(identity) {
            self.certs.forget(identity);
        }
    }

    async fn accept_loop(self: Arc<Self>, pod: Arc<EnrolledPod>, l: TcpListener, port: Port) {
        let mut drain = self.drain.clone();
        loop {
            let accepted = tokio::select! {
                _ = drain.signaled() => {
                    // Draining: the listener closes (so the kernel stops
                    // steering to it), and so must the handle kept of it.
                    if let Port::Plaintext = port {
                        pod.plaintext.lock().take();
                    }
                    return;
                }
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
            // One span per connection: its record and every line logged
            // while it is carried are inside it.
            let span =
                tracing::info_span!("connection", pod = %pod.key, port = port.number(), %peer);
            tokio::spawn(
                async move {
                    let _guard = guard;
                    match port {
                        Port::Outbound => node.outbound(&pod, stream, peer).await,
                        Port::Hbone => node.inbound_hbone(pod, stream, peer, drain).await,
                        Port::Plaintext => node.inbound_plaintext(&pod, stream, peer).await,
                    }
                }
                .instrument(span),
            );
        }
    }
}
