//! Inbound plaintext (15006): TCP to a pod's address that is not HBONE,
//! steered here by the pod netns' `sk_lookup` program (the local address
//! is the original destination). The proxy's own ports are never a
//! destination; STRICT refuses plaintext; PERMISSIVE authorizes it with no
//! source identity and forwards it from inside the pod's netns.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::connection::{Connection, Direction, Refused, Security};
use super::{NodeProxy, reset};
use crate::config::InboundMode;
use crate::route::{canonical, is_proxy_port};
use crate::workloads::EnrolledPod;

impl NodeProxy {
    /// Carries one connection accepted on `pod`'s 15006.
    pub(crate) async fn inbound_plaintext(
        &self,
        pod: &EnrolledPod,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        // sk_lookup keeps the original destination as the local address.
        let dst = match stream.local_addr() {
            Ok(a) => canonical(a),
            Err(_) => return,
        };
        let mut conn = Connection::new(self.stats.clone(), Direction::Inbound);
        conn.src = Some(peer);
        conn.dst = Some(dst);
        conn.dst_workload = Some(pod.key.clone());
        let refused = if is_proxy_port(dst.port()) {
            Some(Refused::ProxyPort)
        } else if self.cfg.inbound_mode == InboundMode::Strict {
            Some(Refused::Strict)
        } else {
            let decision = self.authorize(None, peer.ip(), &pod.spec().pod, dst.port());
            (!decision.allowed).then_some(Refused::Policy(decision.reason))
        };
        if let Some(why) = refused {
            reset(&stream);
            conn.refuse(why);
            return;
        }
        conn.security = Security::Plaintext;
        match self.dial_from(&pod.sockets, dst).await {
            Ok(app) => {
                self.note_delivery(&app, None, peer);
                conn.copied(self.splice(&stream, &app, None).await);
            }
            Err(e) => conn.failed(format!("upstream: {e}")),
        }
    }
}
