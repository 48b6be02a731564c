//! The data path, one room per direction (the shape of ztunnel's
//! `src/proxy/`):
//!
//! - [`outbound`]: 15001, an app's captured connect: route, then HBONE
//!   through the [`Pool`] (dialled from the source pod's netns) or plain
//!   passthrough.
//! - [`inbound`]: 15008, HBONE into a pod: mTLS, policy, connect to the app.
//! - [`inbound_passthrough`]: 15006, plaintext into a pod (sk_lookup):
//!   STRICT refuses it, PERMISSIVE authorizes it without an identity.
//!
//! [`NodeProxy`] holds what every direction reads (ztunnel's
//! `ProxyInputs`); enrollment and the accept loops are in
//! [`crate::workloads`], the routing decision in [`crate::route`].

pub mod connection;
mod direct;
pub mod inbound;
pub mod inbound_passthrough;
pub mod outbound;
mod splice;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use mesh_core::identity::Identity;
use mesh_core::policy::{self, PolicySet};
use mesh_core::registry::{Pod, Snapshot};
use mesh_ebpf::netns::PodSockets;
use mesh_ebpf::{Datapath, DirectAllowTable, OrigDstReader, PROXY_MARK};
use parking_lot::{Mutex, RwLock};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use crate::config::Config;
use crate::hbone::{self, H2Config, Pool};
use crate::identity::CertManager;
use crate::notes::{FlowNotes, Note};
use crate::state::{Backoff, EnrolledPods};

pub use outbound::MeshConnector;

/// Why the node proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("open the original-destination map: {0}")]
    OrigDst(#[source] Box<mesh_ebpf::Error>),
    #[error("the kernel same-node path (--same-node-direct): {0}")]
    Direct(#[source] Box<mesh_ebpf::Error>),
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

/// The running node proxy.
pub struct NodeProxy {
    pub cfg: Config,
    /// Control plane (enroll, unenroll, listeners) and admin reads; the
    /// data path never takes this lock.
    pub datapath: Mutex<Datapath>,
    /// The data path's own original-destination lookups (no lock).
    pub(crate) orig: OrigDstReader,
    /// The kernel same-node path's authorizations (`None`: off). Written
    /// by the data path only, under its own lock (one map update).
    pub(crate) direct: Option<Mutex<DirectAllowTable>>,
    /// The generation authorizations are written in; the kernel honours
    /// only the current one. 0: none (stopping, or off).
    pub(crate) direct_generation: AtomicU64,
    /// Kernel same-node flows whose access-log record is written (cookie,
    /// start), until they leave the flow map.
    pub(crate) direct_logged: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// The file or the Kubernetes source: both serve the same snapshot.
    pub registry: crate::registry::RegistrySource,
    pub certs: CertManager,
    pub policies: RwLock<Arc<PolicySet>>,
    pub pool: Pool<MeshConnector>,
    pub h2: H2Config,
    /// The caps of every pod's 15008 listener, node-wide.
    pub hbone_limiter: Arc<hbone::Limiter>,
    /// The enrolled pods, by key and by netns cookie.
    pub(crate) pods: EnrolledPods,
    /// When pods whose enrollment failed are tried again.
    pub(crate) retry: Backoff,
    pub(crate) rr: AtomicUsize,
    /// What the data path learned about a kernel flow that the kernel does
    /// not know (a Service flow's endpoint, a delivery's source identity),
    /// handed to metrics without a shared lock.
    pub notes: FlowNotes,
    pub stats: Arc<ProxyStats>,
    /// Open connections (every direction), so SIGTERM can wait for them.
    pub conns: crate::drain::Tracker,
    /// Handle of the data-plane runtime (accept loops and copies run there).
    pub(crate) data: tokio::runtime::Handle,
    pub(crate) drain: crate::drain::Watch,
    /// Pod netns the container runtime reported through CNI (`cni`).
    pub cni: Arc<crate::cni::Attachments>,
}

impl NodeProxy {
    pub fn new(
        cfg: Config,
        mut datapath: Datapath,
        registry: crate::registry::RegistrySource,
        certs: CertManager,
        data: tokio::runtime::Handle,
        drain: crate::drain::Watch,
    ) -> Result<Arc<Self>, ProxyError> {
        let policies = policy_set(&registry.snapshot());
        let h2 = cfg.h2.clone();
        let orig = datapath
            .orig_dst_reader()
            .map_err(|e| ProxyError::OrigDst(Box::new(e)))?;
        let direct_err = |e| ProxyError::Direct(Box::new(e));
        // A new generation: what an earlier proxy authorized is void.
        let generation = if cfg.same_node_direct {
            datapath.direct_generation().map_err(direct_err)?.max(1) + 1
        } else {
            0
        };
        let direct = if cfg.same_node_direct {
            let mut table = datapath.direct_allow_table().map_err(direct_err)?;
            table.clear().map_err(direct_err)?;
            Some(Mutex::new(table))
        } else {
            None
        };
        datapath
            .set_direct_generation(generation)
            .map_err(direct_err)?;
        Ok(Arc::new_cyclic(|weak| NodeProxy {
            pool: Pool::new(MeshConnector::new(weak.clone()), h2.clone()),
            h2,
            hbone_limiter: hbone::Limiter::new(cfg.hbone_limits.clone()),
            cfg,
            orig,
            direct,
            direct_generation: AtomicU64::new(generation),
            direct_logged: Mutex::default(),
            datapath: Mutex::new(datapath),
            registry,
            certs,
            policies: RwLock::new(Arc::new(policies)),
            pods: EnrolledPods::default(),
            retry: Backoff::default(),
            rr: AtomicUsize::new(0),
            notes: FlowNotes::default(),
            stats: Arc::default(),
            conns: crate::drain::Tracker::default(),
            data,
            drain,
            cni: Arc::default(),
        }))
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
        self.policies.read().evaluate(&request)
    }

    /// Voids every kernel same-node authorization (called after registry,
    /// policy or enrollment changes are in place, so a decision made before
    /// the change is never honoured after it), or with `stop` all of them
    /// for good (draining).
    pub(crate) fn void_direct(&self, stop: bool) {
        if self.direct.is_none() {
            return;
        }
        let generation = if stop {
            self.direct_generation.store(0, Ordering::SeqCst);
            0
        } else {
            self.direct_generation.fetch_add(1, Ordering::SeqCst) + 1
        };
        if let Err(e) = self.datapath.lock().set_direct_generation(generation) {
            // The kernel would keep honouring the old generation: remove
            // the authorizations themselves instead.
            tracing::error!(error = %e, "could not move the kernel same-node generation; removing every authorization");
            if let Some(table) = &self.direct
                && let Err(e) = table.lock().clear()
            {
                tracing::error!(error = %e, "could not remove the kernel same-node authorizations");
            }
        }
    }

    /// The generation a decision made now is written in.
    pub(crate) fn direct_generation(&self) -> u64 {
        self.direct_generation.load(Ordering::SeqCst)
    }

    /// Lets the apps of netns `netns` reach `dst` (as they gave it to
    /// connect) in the kernel from now on, until generation `generation`
    /// is voided.
    pub(crate) fn allow_direct(&self, netns: u64, dst: SocketAddr, generation: u64) {
        let Some(table) = &self.direct else {
            return;
        };
        if generation == 0 {
            return;
        }
        if let Err(e) = table.lock().allow(netns, dst, generation) {
            debug!(error = %e, %dst, "kernel same-node authorization not written");
        }
    }

    /// Tells metrics who is behind the delivery socket `app` (its kernel
    /// flow knows only the pod it enters).
    pub(crate) fn note_delivery(
        &self,
        app: &TcpStream,
        principal: Option<&Identity>,
        peer: SocketAddr,
    ) {
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

    /// Copies both ways between the source's `down` and a tunnel `up`
    /// until both are closed, with the tunnels' copy buffer (held only
    /// while bytes are in flight, [`hbone::copy`]):
    /// `(source -> destination, destination -> source)` bytes.
    pub(crate) async fn copy(
        &self,
        down: &mut TcpStream,
        up: &mut hbone::TunnelStream,
    ) -> std::io::Result<(u64, u64)> {
        hbone::copy_tunnel(down, up.stream_mut(), self.h2.copy_buffer).await
    }

    /// Copies both ways between two plaintext TCP legs inside the kernel
    /// (`splice(2)` through a pipe per direction, sized like the copy
    /// buffer), until both are closed: `(down -> up, up -> down)` bytes.
    /// `idle`: end it once no byte moved for that long.
    pub(crate) async fn splice(
        &self,
        down: &TcpStream,
        up: &TcpStream,
        idle: Option<std::time::Duration>,
    ) -> std::io::Result<(u64, u64)> {
        splice::splice_bidirectional(down, up, self.h2.copy_buffer, idle).await
    }

    /// A TCP connection to `to` from a socket made in `sockets`' netns,
    /// carrying the proxy mark (so the connect hooks leave it alone).
    pub async fn dial_from(
        &self,
        sockets: &PodSockets,
        to: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        dial_from(sockets, to, self.cfg.dial_timeout).await
    }
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy")
            .field("node", &self.cfg.node)
            .finish_non_exhaustive()
    }
}

/// A TCP connection to `to` from a socket made in `sockets`' netns, carrying
/// the proxy mark (so the connect hooks leave it alone), within `timeout`.
pub async fn dial_from(
    sockets: &PodSockets,
    to: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<TcpStream> {
    let std_sock = sockets.tcp_socket(to.is_ipv6(), Some(PROXY_MARK))?;
    let sock = TcpSocket::from_std_stream(std_sock);
    let stream = tokio::time::timeout(timeout, sock.connect(to))
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

/// Closes with RST instead of FIN when `stream` is dropped: a refusal, not
/// an empty answer.
pub(crate) fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::Linger, &linger);
}

pub(crate) fn policy_set(snap: &Snapshot) -> PolicySet {
    PolicySet::new(
        snap.policies.clone(),
        mesh_core::policy::DEFAULT_ROOT_NAMESPACE,
    )
}
