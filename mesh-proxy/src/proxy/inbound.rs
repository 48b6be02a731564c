//! Inbound HBONE (15008): mTLS connections into a pod. The caps, the
//! bounded handshake and HTTP/2 are `hbone::serve_tcp`, the same path the
//! HBONE benchmark measures; this room is the [`hbone::Handler`] that
//! checks each tunnel (target, client identity, policy) and dials the app
//! from inside the pod's netns. Each tunnel's [`Connection`] record travels
//! with the app's stream ([`Delivery`]) and is written when the tunnel ends.

use std::net::SocketAddr;

use mesh_core::identity::Identity;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::NodeProxy;
use super::connection::{Connection, Direction, Refused, Security};
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
                let mut conn = Connection::new(self.stats.clone(), Direction::Inbound);
                conn.src = Some(peer);
                conn.dst_workload = Some(pod.key.clone());
                conn.refuse(Refused::Handshake(format!("mTLS handshake: {e}")));
            }
            Err(e) => debug!(pod = %pod.key, %peer, error = %e, "HBONE connection ended"),
            Ok(_) => {}
        }
    }
}

impl NodeProxy {
    /// A connection into `pod` (as it is in `spec`) from `principal` at
    /// `peer`, to `target`: the checks every mesh delivery passes (not the
    /// proxy's own ports, an address of the pod, a client identity, the
    /// pod's policies), then the app's socket, dialled from inside the
    /// pod's netns and noted for the destination's metrics. HBONE tunnels
    /// (15008) and same-node connections both come here. Refusals are
    /// written into `conn`, the inbound record.
    pub(crate) async fn deliver(
        &self,
        pod: &EnrolledPod,
        spec: &PodSpec,
        target: SocketAddr,
        principal: Result<Identity, String>,
        peer: SocketAddr,
        conn: &mut Connection,
    ) -> Result<TcpStream, Refusal> {
        let shown = target;
        let target = canonical(target);
        if is_proxy_port(target.port()) {
            conn.refuse(Refused::ProxyPort);
            return Err(Refusal::Forbidden(format!(
                "{target}: the proxy's own port is not a tunnel target"
            )));
        }
        if !spec.pod.ips.contains(&target.ip()) {
            let why = format!("{shown} is not an address of pod {}", pod.key);
            conn.refuse(Refused::Unroutable(why.clone()));
            return Err(Refusal::Unavailable(why));
        }
        let principal = match principal {
            Ok(p) => p,
            Err(why) => {
                conn.refuse(Refused::Handshake(why.clone()));
                return Err(Refusal::Forbidden(why));
            }
        };
        conn.src_identity = Some(principal.to_string());
        let decision = self.authorize(Some(&principal), peer.ip(), &spec.pod, target.port());
        if !decision.allowed {
            conn.refuse(Refused::Policy(decision.reason.clone()));
            return Err(Refusal::Forbidden(decision.reason));
        }
        self.stats.inbound_opened.fetch_add(1, Ordering::Relaxed);
        match self.dial_from(&pod.sockets, target).await {
            Ok(app) => {
                self.note_delivery(&app, Some(&principal), peer);
                Ok(app)
            }
            Err(e) => {
                let why = format!("connect {target}: {e}");
                conn.refuse(Refused::Upstream(why.clone()));
                Err(Refusal::BadGateway(why))
            }
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

/// The app's end of a tunnel, with the tunnel's record.
pub struct Delivery {
    app: TcpStream,
    conn: Connection,
}

impl hbone::Handler for Inbound {
    type Stream = Delivery;

    fn open(
        &self,
        tunnel: Tunnel,
    ) -> impl std::future::Future<Output = Result<Delivery, Refusal>> + Send {
        let node = self.node.clone();
        let pod = self.pod.clone();
        let spec = self.spec.clone();
        let peer = self.peer;
        let mut conn = Connection::new(node.stats.clone(), Direction::Inbound);
        conn.src = Some(peer);
        conn.dst = Some(tunnel.target);
        conn.dst_workload = Some(pod.key.clone());
        conn.dst_identity = Some(spec.identity.to_string());
        conn.security = Security::MutualTls;
        async move {
            let principal = tunnel
                .peer_certificates
                .first()
                .ok_or_else(|| "no client certificate".to_owned())
                .and_then(|c| peer_identity(c).map_err(|e| e.to_string()));
            let app = node
                .deliver(&pod, &spec, tunnel.target, principal, peer, &mut conn)
                .await?;
            Ok(Delivery { app, conn })
        }
    }

    fn closed(&self, mut upstream: Delivery, c: &TunnelClosed) {
        upstream.conn.bytes_received = c.bytes_from_peer;
        upstream.conn.bytes_sent = c.bytes_to_peer;
        if let Some(e) = &c.error {
            upstream.conn.failed(e.clone());
        }
        // Dropped here: the record is written.
    }
}

impl AsyncRead for Delivery {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.app).poll_read(cx, buf)
    }
}

impl AsyncWrite for Delivery {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.app).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.app).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.app.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.app).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.app).poll_shutdown(cx)
    }
}
