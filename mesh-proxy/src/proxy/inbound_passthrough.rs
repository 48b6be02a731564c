//! Inbound plaintext (15006): TCP to a pod's address that is not HBONE,
//! steered here by the pod netns' `sk_lookup` program (the local address
//! is the original destination). The proxy's own ports are never a
//! destination; STRICT refuses plaintext; PERMISSIVE authorizes it with no
//! source identity and forwards it from inside the pod's netns.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::info;

use super::{NodeProxy, reset};
use crate::config::InboundMode;
use crate::route::{canonical, is_proxy_port};
use crate::workloads::EnrolledPod;

impl NodeProxy {
    /// Carries one connection accepted on `pod`'s 15006.
    pub(crate) async fn inbound_plaintext(
        &self,
        pod: &EnrolledPod,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) {
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
        let decision = self.authorize(None, peer.ip(), &pod.spec().pod, dst.port());
        if !decision.allowed {
            self.stats.inbound_denied.fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction = "inbound", dst_workload = %pod.key, src = %peer, dst = %dst,
                  security = "none", result = "denied", policy = %decision.reason, "connection denied");
            reset(&stream);
            return;
        }
        let start = Instant::now();
        match self.dial_from(&pod.sockets, dst).await {
            Ok(mut app) => {
                self.note_delivery(&app, None, peer);
                let r = tokio::io::copy_bidirectional_with_sizes(
                    &mut stream,
                    &mut app,
                    self.h2.copy_buffer,
                    self.h2.copy_buffer,
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
}
