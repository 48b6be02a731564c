//! Inbound HBONE (15008): mTLS connections into a pod. The caps, the
//! bounded handshake and HTTP/2 are `hbone::serve_tcp`, the same path the
//! HBONE benchmark measures; this room is the [`hbone::Handler`] that
//! checks each tunnel (target, client identity, policy) and dials the app
//! from inside the pod's netns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tracing::{debug, info};

use super::NodeProxy;
use crate::hbone::{self, Refusal, Tunnel, TunnelClosed};
use crate::identity::peer_identity;
use crate::route::{canonical, is_proxy_port};
use crate::workloads::{EnrolledPod, PodSpec};

impl NodeProxy {
    /// Serves one connection accepted on `pod`'s 15008.
    pub(crate) async fn inbound_hbone(
        self: Arc<Self>,
        pod: Arc<EnrolledPod>,
        stream: TcpStream,
        peer: SocketAddr,
        mut drain: crate::drain::Watch,
    ) {
        let spec = pod.spec();
        let handler = Arc::new(Inbound {
            node: self.clone(),
            pod: pod.clone(),
            spec: spec.clone(),
            peer,
        });
        let drained = async move { drain.signaled().await };
        // Caps, the bounded mTLS handshake, then HTTP/2: the same path the
        // HBONE benchmark measures.
        let served = hbone::serve_tcp(
            stream,
            peer,
            spec.server_tls.clone(),
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
}

/// The 15008 side of one HBONE connection into `pod`.
struct Inbound {
    node: Arc<NodeProxy>,
    pod: Arc<EnrolledPod>,
    /// The pod as it was when the connection was accepted.
    spec: Arc<PodSpec>,
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
        let spec = self.spec.clone();
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
            if !spec.pod.ips.contains(&target.ip()) {
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
            let decision = node.authorize(Some(&principal), peer.ip(), &spec.pod, target.port());
            if !decision.allowed {
                node.stats.inbound_denied.fetch_add(1, Ordering::Relaxed);
                info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer,
                      src_identity = %principal, dst = %tunnel.target, security = "mutual_tls",
                      result = "denied", policy = %decision.reason, "connection denied");
                return Err(Refusal::Forbidden(decision.reason));
            }
            node.stats.inbound_opened.fetch_add(1, Ordering::Relaxed);
            let app = node
                .dial_from(&pod.sockets, target)
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
