//! Outbound (15001): an app's connect, captured by `cgroup/connect4/6` and
//! accepted in its pod's netns. The original destination comes from the
//! kernel (`OrigDstReader`, no lock); [`route`] decides; a mesh destination
//! is reached over HBONE through the pool (the same `Pool::connect` and
//! copy buffer the HBONE benchmark measures), anything else passes through
//! as plain TCP from the pod. Refusals reset the app's socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use mesh_core::identity::{Identity, IdentityError};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{NodeProxy, reset};
use crate::hbone::{self, ConnectorError, PoolKey};
use crate::identity::{PeerIdentityError, TlsConfigError};
use crate::notes::Note;
use crate::route::{Route, canonical, route};
use crate::workloads::EnrolledPod;

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
        let start = Instant::now();
        let spec = pod.spec();
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
        let copy_buffer = self.h2.copy_buffer;
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
                let key = PoolKey::new(
                    pod.key.as_str(),
                    SocketAddr::new(dst_ip, mesh_ebpf::HBONE_PORT),
                );
                let dst_id = dst
                    .identity(&self.cfg.trust_domain)
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                match self.pool.connect(&key, target).await {
                    Ok(mut tunnel) => {
                        let r = tokio::io::copy_bidirectional_with_sizes(
                            &mut app,
                            &mut tunnel,
                            copy_buffer,
                            copy_buffer,
                        )
                        .await;
                        let (up, down, err) = match r {
                            Ok((a, b)) => (a, b, None),
                            Err(e) => (0, 0, Some(e.to_string())),
                        };
                        info!(target: "access", direction = "outbound", src_workload = %pod.key,
                              src_identity = %spec.identity, dst = %orig, via = %target,
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
                              src_identity = %spec.identity, dst = %orig, via = %target, dst_identity = %dst_id,
                              status = e.status().map(|s| s.as_u16()).unwrap_or(0),
                              duration_ms = start.elapsed().as_millis() as u64,
                              error = %e, "connection refused");
                    }
                }
            }
            Route::Passthrough { target } => {
                self.stats.passthrough.fetch_add(1, Ordering::Relaxed);
                match self.dial_from(&pod.sockets, target).await {
                    Ok(mut up) => {
                        let r = tokio::io::copy_bidirectional_with_sizes(
                            &mut app,
                            &mut up,
                            copy_buffer,
                            copy_buffer,
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
}
