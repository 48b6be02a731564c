//! Outbound (15001): an app's connect, captured by `cgroup/connect4/6` and
//! accepted in its pod's netns. The original destination comes from the
//! kernel (`OrigDstReader`, no lock); [`route`] decides; a mesh destination
//! is reached over HBONE through the pool (the same `Pool::connect` and
//! copy buffer the HBONE benchmark measures), anything else passes through
//! as plain TCP from the pod. Refusals reset the app's socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use mesh_core::identity::{Identity, IdentityError};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tracing::warn;

use super::connection::{Connection, Direction, Refused, Security};
use super::{NodeProxy, reset};
use crate::hbone::{self, ConnectorError, PoolKey};
use crate::identity::{PeerIdentityError, TlsConfigError};
use crate::notes::Note;
use crate::route::{Route, canonical, route};
use crate::workloads::{EnrolledPod, PodSpec};

/// Why the pool may not open (or keep) a connection for a pod.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("proxy shutting down")]
    ShuttingDown,
    #[error("pod {0} is not enrolled")]
    NotEnrolled(String),
    #[error("no pod has address {0}")]
    UnknownAddress(IpAddr),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS for {identity}: {source}")]
    Tls {
        identity: Identity,
        #[source]
        source: Box<TlsConfigError>,
    },
    #[error("peer sent no certificate")]
    NoCertificate,
    #[error(transparent)]
    Peer(#[from] PeerIdentityError),
}

/// How the pool dials: from inside the source pod's netns, with the proxy's
/// mark, presenting the source pod's certificate and expecting the
/// destination pod's identity. `PoolKey::identity` carries the source pod's
/// `namespace/name`, so connections keep the pod's own IP on the wire.
pub struct MeshConnector {
    node: Weak<NodeProxy>,
}

impl MeshConnector {
    pub(crate) fn new(node: Weak<NodeProxy>) -> Self {
        MeshConnector { node }
    }
}

impl hbone::Connector for MeshConnector {
    fn dial(
        &self,
        key: &PoolKey,
    ) -> impl std::future::Future<Output = std::io::Result<TcpStream>> + Send {
        let node = self.node.upgrade();
        let key = key.clone();
        async move {
            let node = node.ok_or_else(|| std::io::Error::other(ConnectError::ShuttingDown))?;
            let pod = node.enrolled(&key.identity).ok_or_else(|| {
                std::io::Error::other(ConnectError::NotEnrolled(key.identity.to_string()))
            })?;
            node.dial_from(&pod.sockets, key.dest).await
        }
    }

    fn tls(
        &self,
        key: &PoolKey,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), ConnectorError> {
        let node = self.node.upgrade().ok_or(ConnectError::ShuttingDown)?;
        let pod = node
            .enrolled(&key.identity)
            .ok_or_else(|| ConnectError::NotEnrolled(key.identity.to_string()))?
            .spec();
        let expected = node.expected_identity(key.dest.ip())?;
        let cfg = node
            .certs
            .client_config(&pod.identity, &expected)
            .map_err(|source| ConnectError::Tls {
                identity: pod.identity.clone(),
                source: Box::new(source),
            })?;
        Ok((cfg, crate::identity::peer_server_name(&expected)))
    }

    fn verify(
        &self,
        key: &PoolKey,
        peer: &[CertificateDer<'static>],
    ) -> Result<(), ConnectorError> {
        let node = self.node.upgrade().ok_or(ConnectError::ShuttingDown)?;
        let expected = node.expected_identity(key.dest.ip())?;
        let leaf = peer.first().ok_or(ConnectError::NoCertificate)?;
        crate::identity::verify_peer_identity(leaf, &expected).map_err(ConnectError::from)?;
        Ok(())
    }
}

impl NodeProxy {
    /// The SPIFFE ID the pod with `ip` must present.
    fn expected_identity(&self, ip: IpAddr) -> Result<Identity, ConnectError> {
        let snap = self.registry.snapshot();
        let pod = snap.pod_by_ip(ip).ok_or(ConnectError::UnknownAddress(ip))?;
        Ok(pod.identity(&self.cfg.trust_domain)?)
    }
}

impl NodeProxy {
    /// Carries one connection accepted on `pod`'s 15001.
    pub(crate) async fn outbound(&self, pod: &EnrolledPod, mut app: TcpStream, peer: SocketAddr) {
        let spec = pod.spec();
        let mut conn = Connection::new(self.stats.clone(), Direction::Outbound);
        conn.src = Some(peer);
        conn.src_workload = Some(pod.key.clone());
        conn.src_identity = Some(spec.identity.to_string());
        // Read before anything is decided: a change made after this point
        // voids what this connection authorizes (see `void_direct`).
        let generation = self.direct_generation();
        let (raw, orig, flow_cookie) = match self.orig.original(pod.cookie, peer) {
            Ok(Some((o, c))) => (o, canonical(o), c),
            Ok(None) => {
                warn!(pod = %pod.key, %peer, "no original destination for this connection; closing");
                conn.refuse(Refused::Unroutable("no original destination".into()));
                return;
            }
            Err(e) => {
                warn!(pod = %pod.key, %peer, error = %e, "original destination lookup failed");
                conn.refuse(Refused::Unroutable(format!(
                    "original destination lookup: {e}"
                )));
                return;
            }
        };
        conn.dst = Some(orig);
        let rr = self.rr.fetch_add(1, Ordering::Relaxed);
        let route = route(&self.registry.snapshot(), orig, rr);
        self.stats.outbound_opened.fetch_add(1, Ordering::Relaxed);
        match route {
            Route::Mesh {
                dst,
                target,
                service,
            } => {
                let endpoint = format!("{}/{}", dst.namespace, dst.name);
                if service.is_some() {
                    self.notes
                        .note(flow_cookie, Note::Endpoint(endpoint.clone()));
                }
                conn.via = Some(target);
                conn.dst_workload = Some(endpoint.clone());
                conn.dst_identity = dst
                    .identity(&self.cfg.trust_domain)
                    .map(|i| i.to_string())
                    .ok();
                conn.service = service;
                if let Some(dst_pod) = self.enrolled(&endpoint) {
                    // Both pods on this node: no TLS, no HBONE hop. A pod
                    // address as the app gave it (not a Service, which
                    // picks an endpoint each time; not v4-mapped) may take
                    // the kernel same-node path from the next connect on.
                    let direct = (conn.service.is_none() && raw == orig)
                        .then_some((pod.cookie, raw, generation));
                    return self
                        .same_node(&spec, app, peer, conn, &dst_pod, target, direct)
                        .await;
                }
                conn.security = Security::MutualTls;
                let key = PoolKey::new(
                    pod.key.as_str(),
                    SocketAddr::new(target.ip(), mesh_ebpf::HBONE_PORT),
                );
                match self.pool.connect(&key, target).await {
                    Ok(mut tunnel) => conn.copied(self.copy(&mut app, &mut tunnel).await),
                    Err(e) => {
                        // Refused (policy, unreachable): the app sees a reset.
                        reset(&app);
                        conn.refuse(Refused::Tunnel {
                            status: e.status().map(|s| s.as_u16()),
                            error: e.to_string(),
                        });
                    }
                }
            }
            Route::Passthrough { target } => {
                self.stats.passthrough.fetch_add(1, Ordering::Relaxed);
                conn.via = Some(target);
                match self.dial_from(&pod.sockets, target).await {
                    Ok(up) => conn.copied(self.splice(&app, &up, None).await),
                    Err(e) => {
                        reset(&app);
                        conn.refuse(Refused::Upstream(e.to_string()));
                    }
                }
            }
            Route::Unroutable { reason } => {
                reset(&app);
                conn.refuse(Refused::Unroutable(reason));
            }
        }
    }
}

impl NodeProxy {
    /// A mesh connection whose destination pod `dst` is enrolled on this
    /// node too. What an HBONE tunnel would prove, this proxy knows: the
    /// source is `src`'s app (its connect was captured in `src`'s netns,
    /// whose identity enrollment established), the destination is `dst`
    /// (the proxy dials its address from inside its netns). So the
    /// connection takes the checks of every delivery ([`NodeProxy::deliver`]:
    /// proxy ports, the pod's address, `dst`'s policies for `src`'s
    /// identity and address) and is then spliced between the two
    /// plaintext legs in the kernel, with no TLS and no second proxy hop.
    /// Once allowed, `direct` (the source netns, the destination as the app
    /// gave it, the generation read before deciding) is written to the
    /// kernel: later connects of that pod to that address go pod to pod.
    /// Both records are written, as for a tunnel: `out` (outbound) and an
    /// inbound one; metrics see the same two kernel flows (the app's, and
    /// the delivery's, noted with the source identity).
    // Each argument is a distinct fact of the connection; a struct to
    // carry them would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn same_node(
        &self,
        src: &PodSpec,
        app: TcpStream,
        peer: SocketAddr,
        mut out: Connection,
        dst: &EnrolledPod,
        target: SocketAddr,
        direct: Option<(u64, SocketAddr, u64)>,
    ) {
        out.security = Security::SameNode;
        let dst_spec = dst.spec();
        // The address a tunnel from `src` would come from: its own, of the
        // target's family.
        let src_ip = src
            .pod
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == target.is_ipv4())
            .or(src.pod.ips.first())
            .copied()
            .unwrap_or(peer.ip());
        let from = SocketAddr::new(src_ip, peer.port());
        let mut inb = Connection::new(self.stats.clone(), Direction::Inbound);
        inb.src = Some(from);
        inb.dst = Some(target);
        inb.dst_workload = Some(dst.key.clone());
        inb.dst_identity = Some(dst_spec.identity.to_string());
        inb.security = Security::SameNode;
        let principal = Ok(src.identity.clone());
        match self
            .deliver(dst, &dst_spec, target, principal, from, &mut inb)
            .await
        {
            Ok(up) => {
                if let Some((netns, dst, generation)) = direct {
                    self.allow_direct(netns, dst, generation);
                }
                // The bound a tunnel has (--tunnel-idle-seconds).
                let idle = Some(self.cfg.hbone_limits.tunnel_idle_timeout);
                match self.splice(&app, &up, idle).await {
                    Ok(moved) => {
                        out.copied(Ok(moved));
                        inb.copied(Ok(moved));
                    }
                    Err(e) => {
                        out.failed(e.to_string());
                        inb.failed(e.to_string());
                    }
                }
            }
            Err(refusal) => {
                // What the app of a refused tunnel sees: a reset.
                reset(&app);
                out.refuse(Refused::Tunnel {
                    status: Some(refusal.status().as_u16()),
                    error: refusal.to_string(),
                });
            }
        }
    }
}
