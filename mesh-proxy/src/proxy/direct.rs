//! The kernel same-node path's access log. Its connections never reach a
//! proxy socket, so their records are written from the kernel's flows once
//! they have closed, with the final counts: one outbound record from the
//! source's flow, one inbound record from the destination's, with both
//! identities, as for any same-node connection. A sweep reads the flow map
//! every second while the path has new or open connections
//! ([`NodeProxy::sweep_direct`]); a metrics scrape that drops a closed flow
//! first writes its record too; each is written once.

use std::collections::HashSet;
use std::time::Duration;

use mesh_ebpf::{FlowEntry, FlowTable};
use tracing::debug;

use super::NodeProxy;
use super::connection::{Connection, Direction, Security};

impl NodeProxy {
    /// Writes the access-log record of a closed flow of the kernel
    /// same-node path (other flows: nothing).
    pub fn log_direct(&self, f: &FlowEntry) {
        if !f.direct || !f.is_closed() {
            return;
        }
        if !self.direct_logged.lock().insert((f.cookie, f.start_ns)) {
            return;
        }
        let snap = self.registry.snapshot();
        let pod = |ip| {
            snap.pod_by_ip(ip).map(|p| {
                (
                    format!("{}/{}", p.namespace, p.name),
                    p.identity(&self.cfg.trust_domain)
                        .map(|i| i.to_string())
                        .ok(),
                )
            })
        };
        let direction = match f.direction {
            mesh_ebpf::Direction::Outbound => Direction::Outbound,
            mesh_ebpf::Direction::Inbound => Direction::Inbound,
        };
        let mut c = Connection::new(self.stats.clone(), direction);
        c.security = Security::SameNodeDirect;
        // Both flows name the source app's socket (pod address and port).
        c.src = Some(f.src);
        if let Some((w, id)) = pod(f.src.ip()) {
            c.src_workload = Some(w);
            c.src_identity = id;
        }
        c.dst = Some(f.original_dst);
        c.via = Some(f.original_dst);
        if let Some((w, id)) = pod(f.original_dst.ip()) {
            c.dst_workload = Some(w);
            c.dst_identity = id;
        }
        // The kernel's bytes_sent is what the source sent, on either flow.
        c.bytes_received = f.bytes_sent;
        c.bytes_sent = f.bytes_received;
        c.duration = Some(Duration::from_nanos(f.end_ns.saturating_sub(f.start_ns)));
    }
}

impl NodeProxy {
    /// Writes the records of the kernel same-node path's connections that
    /// closed since the last sweep (the flow map is only read: dropping a
    /// closed flow is the metrics reader's, after it has folded it).
    /// Returns whether a kernel-path flow is still open (or the map could
    /// not be read): whether the next sweep has anything to wait for.
    pub fn sweep_direct(&self, table: &FlowTable) -> bool {
        let flows = match table.flows() {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "flow sweep");
                return true;
            }
        };
        for f in &flows {
            self.log_direct(f);
        }
        let live: HashSet<(u64, u64)> = flows.iter().map(|f| (f.cookie, f.start_ns)).collect();
        self.direct_logged.lock().retain(|k| live.contains(k));
        flows.iter().any(|f| f.direct && !f.is_closed())
    }

    /// How many connects took the kernel same-node path so far (the
    /// kernel's `connect_direct`), to sweep only when there is something
    /// new; `None` when the counters cannot be read.
    pub fn direct_connects(&self) -> Option<u64> {
        let stats = self.datapath.lock().stats().ok()?;
        stats.get(mesh_ebpf::Stat::ConnectDirect.name()).copied()
    }
}
