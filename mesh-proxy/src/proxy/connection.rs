//! One record per connection, in every direction (the role of ztunnel's
//! `ConnectionResult`): filled in as the connection is routed, authorized
//! and copied, and written once when it is dropped — the access-log line,
//! the proxy's counters — inside the connection's span.
//!
//! The field names mean the same in every direction, with Istio's
//! orientation (as the TCP metrics use it): `bytes_received` is what the
//! source sent towards the destination, `bytes_sent` what the destination
//! sent back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{Span, info};

use super::ProxyStats;

/// Which way a connection goes, as the access log names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How the connection is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    MutualTls,
    /// Both pods on this node: both identities known from enrollment,
    /// policy decided by this proxy, no TLS hop (ARCHITECTURE.md, "The
    /// same-node path"). Metrics still label it `mutual_tls`, as Istio
    /// labels any connection between authenticated identities.
    SameNode,
    /// The kernel same-node path: as [`Security::SameNode`], authorized by
    /// this proxy for an earlier connection of the same pod to the same
    /// address, and carried by the kernel alone (the record is written
    /// from the kernel's flow once it has closed).
    SameNodeDirect,
    /// Plaintext into a meshed pod (PERMISSIVE).
    Plaintext,
    /// Not a mesh connection (passthrough, or refused before it was one).
    None,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::SameNode => "same_node",
            Security::SameNodeDirect => "same_node_direct",
            Security::Plaintext => "plaintext",
            Security::None => "none",
        }
    }
}

/// Why a connection was refused; each has its counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A target that is one of the proxy's own ports.
    ProxyPort,
    /// Plaintext to a meshed pod, in STRICT mode.
    Strict,
    /// Denied by an AuthorizationPolicy (the reason names the rule).
    Policy(String),
    /// No route (a Service without the port or endpoints), no original
    /// destination, or the tunnel was refused by the other side (`status`).
    Unroutable(String),
    Tunnel {
        status: Option<u16>,
        error: String,
    },
    /// The upstream could not be reached.
    Upstream(String),
    /// The peer's mTLS handshake was refused.
    Handshake(String),
}

/// How the connection ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Outcome {
    #[default]
    Closed,
    Failed(String),
    Refused(Refused),
}

/// One connection, logged and counted when dropped.
pub struct Connection {
    stats: Arc<ProxyStats>,
    span: Span,
    start: Instant,
    pub direction: Direction,
    pub security: Security,
    pub src: Option<SocketAddr>,
    pub src_workload: Option<String>,
    pub src_identity: Option<String>,
    /// The original destination.
    pub dst: Option<SocketAddr>,
    /// Where it was carried: the endpoint of a Service, the pod address.
    pub via: Option<SocketAddr>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    pub service: Option<String>,
    /// Source -> destination.
    pub bytes_received: u64,
    /// Destination -> source.
    pub bytes_sent: u64,
    /// How long it lasted, when known otherwise than from this record's
    /// own lifetime (a kernel flow's).
    pub duration: Option<std::time::Duration>,
    outcome: Outcome,
}

impl Connection {
    /// A connection starting now, in the current span.
    pub fn new(stats: Arc<ProxyStats>, direction: Direction) -> Self {
        Connection {
            stats,
            span: Span::current(),
            start: Instant::now(),
            direction,
            security: Security::None,
            src: None,
            src_workload: None,
            src_identity: None,
            dst: None,
            via: None,
            dst_workload: None,
            dst_identity: None,
            service: None,
            bytes_received: 0,
            bytes_sent: 0,
            duration: None,
            outcome: Outcome::Closed,
        }
    }

    /// Records what a bidirectional copy returned: `(source -> destination,
    /// destination -> source)` bytes, or why it stopped.
    pub fn copied(&mut self, r: std::io::Result<(u64, u64)>) {
        match r {
            Ok((received, sent)) => {
                self.bytes_received = received;
                self.bytes_sent = sent;
            }
            Err(e) => self.outcome = Outcome::Failed(e.to_string()),
        }
    }

    /// The copy ended with `error` (the bytes are set by the caller).
    pub fn failed(&mut self, error: impl Into<String>) {
        self.outcome = Outcome::Failed(error.into());
    }

    /// The connection was refused; the app or peer sees a reset or an
    /// HTTP status.
    pub fn refuse(&mut self, why: Refused) {
        self.outcome = Outcome::Refused(why);
    }

    fn count(&self) {
        let s = &self.stats;
        let counter = match (&self.outcome, self.direction) {
            (Outcome::Refused(Refused::ProxyPort), _) => &s.proxy_port_refused,
            (Outcome::Refused(Refused::Strict), _) => &s.plaintext_refused,
            (Outcome::Refused(Refused::Policy(_)), _) => &s.inbound_denied,
            (Outcome::Refused(_), Direction::Outbound) => &s.outbound_failed,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.count();
        let (result, reason, status) = match &self.outcome {
            Outcome::Closed => ("closed", None, None),
            Outcome::Failed(e) => ("failed", Some(e.as_str()), None),
            Outcome::Refused(r) => match r {
                Refused::ProxyPort => (
                    "refused",
                    Some("the proxy's own port is not a destination"),
                    None,
                ),
                Refused::Strict => ("refused", Some("STRICT: plaintext to a meshed pod"), None),
                Refused::Policy(p) => ("denied", Some(p.as_str()), None),
                Refused::Tunnel { status, error } => ("refused", Some(error.as_str()), *status),
                Refused::Unroutable(e) | Refused::Upstream(e) | Refused::Handshake(e) => {
                    ("refused", Some(e.as_str()), None)
                }
            },
        };
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let addr = |a: Option<SocketAddr>| a.map_or_else(|| "-".into(), |a| a.to_string());
        let _entered = self.span.enter();
        info!(target: "access",
              direction = self.direction.as_str(),
              src = %addr(self.src),
              src_workload = %show(&self.src_workload),
              src_identity = %show(&self.src_identity),
              dst = %addr(self.dst),
              via = %addr(self.via),
              dst_workload = %show(&self.dst_workload),
              dst_identity = %show(&self.dst_identity),
              service = %show(&self.service),
              security = self.security.as_str(),
              bytes_received = self.bytes_received,
              bytes_sent = self.bytes_sent,
              duration_ms = self.duration.unwrap_or_else(|| self.start.elapsed()).as_millis() as u64,
              result,
              status = status.unwrap_or(0),
              reason = reason.unwrap_or("-"),
              "connection {result}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(stats: &ProxyStats) -> [u64; 4] {
        [
            &stats.outbound_failed,
            &stats.inbound_denied,
            &stats.plaintext_refused,
            &stats.proxy_port_refused,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    #[test]
    fn a_record_counts_its_outcome_once_when_dropped() {
        let stats = Arc::new(ProxyStats::default());
        let record = |direction, outcome: Option<Refused>| {
            let mut c = Connection::new(stats.clone(), direction);
            c.copied(Ok((3, 5)));
            assert_eq!((c.bytes_received, c.bytes_sent), (3, 5));
            if let Some(r) = outcome {
                c.refuse(r);
            }
            c
        };
        let open = record(Direction::Outbound, None);
        assert_eq!(count(&stats), [0; 4], "nothing counted while open");
        drop(open);
        assert_eq!(count(&stats), [0; 4], "a clean close counts no failure");
        drop(record(
            Direction::Outbound,
            Some(Refused::Tunnel {
                status: Some(403),
                error: "forbidden".into(),
            }),
        ));
        drop(record(
            Direction::Inbound,
            Some(Refused::Policy("deny".into())),
        ));
        drop(record(Direction::Inbound, Some(Refused::Strict)));
        drop(record(Direction::Inbound, Some(Refused::ProxyPort)));
        // An inbound dial failure is the peer's 502, not an outbound failure.
        drop(record(
            Direction::Inbound,
            Some(Refused::Upstream("x".into())),
        ));
        assert_eq!(count(&stats), [1, 1, 1, 1]);
    }
}
