//! The admin port's `/explain`: for `pod=NS/NAME&dst=IP:PORT` or
//! `flow=COOKIE`, the kernel state, the route and the policy decision, in
//! one answer a person can read. Read-only; never on the data path.

use std::net::SocketAddr;

use crate::hbone;
use crate::proxy::NodeProxy;
use crate::route::{Route, route};

impl NodeProxy {
    /// The `/explain` answer: kernel state, route and policy decision for
    /// `pod=NS/NAME&dst=IP:PORT` or `flow=COOKIE`.
    pub fn explain(&self, query: &str) -> Result<serde_json::Value, (http::StatusCode, String)> {
        use crate::admin::query_param;
        use http::StatusCode;
        use serde_json::json;
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let flows = self.flows();
        let (pod_key, dst): (String, SocketAddr) = if let Some(cookie) = query_param(query, "flow")
        {
            let cookie: u64 = cookie
                .parse()
                .map_err(|_| bad(format!("flow {cookie:?}: not a flow id")))?;
            let (f, _) = flows.iter().find(|(f, _)| f.cookie == cookie).ok_or((
                StatusCode::NOT_FOUND,
                format!("flow {cookie}: not in this node's flow map"),
            ))?;
            let pod = self.by_cookie(f.netns).ok_or((
                StatusCode::NOT_FOUND,
                format!("flow {cookie}: its netns is not enrolled here"),
            ))?;
            (pod.key.clone(), f.original_dst)
        } else {
            let pod = query_param(query, "pod")
                .ok_or_else(|| bad("need pod=NS/NAME (and dst=IP:PORT) or flow=ID".into()))?;
            let dst = query_param(query, "dst").ok_or_else(|| bad("need dst=IP:PORT".into()))?;
            let dst: SocketAddr = dst
                .parse()
                .map_err(|_| bad(format!("dst {dst:?}: not IP:PORT")))?;
            (pod, dst)
        };
        let snap = self.registry.snapshot();
        let (ns, name) = pod_key
            .split_once('/')
            .unwrap_or(("default", pod_key.as_str()));
        let pod = snap.pod(ns, name).ok_or((
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{name}: not in the registry"),
        ))?;
        if pod.node != self.cfg.node {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "pod {ns}/{name} runs on node {}; ask that node's proxy",
                    pod.node
                ),
            ));
        }
        let key = format!("{ns}/{name}");
        let enrolled = self.enrolled(&key);
        let identity = pod
            .identity(&self.cfg.trust_domain)
            .map(|i| i.to_string())
            .unwrap_or_default();
        let (mode, kernel_enrolled, stats) = {
            let dp = self.datapath.lock();
            let in_kernel = enrolled
                .as_ref()
                .is_some_and(|e| dp.enrolled().unwrap_or_default().contains(&e.cookie));
            (
                dp.mode().to_string(),
                in_kernel,
                dp.stats().map(|s| json!(s)).unwrap_or_default(),
            )
        };
        let r = route(&snap, dst, 0);
        let (route_json, decision) = match &r {
            Route::Mesh {
                dst: dpod,
                target,
                service,
            } => {
                let src_id = pod.identity(&self.cfg.trust_domain).ok();
                let src_ip = pod.ips.first().copied().unwrap_or(dst.ip());
                let d = self.authorize(src_id.as_ref(), src_ip, dpod, target.port());
                let endpoints: Vec<String> = match snap.service_by_vip(dst.ip()) {
                    Some(svc) => snap
                        .endpoints(svc)
                        .map(|p| format!("{}/{}", p.namespace, p.name))
                        .collect(),
                    None => vec![format!("{}/{}", dpod.namespace, dpod.name)],
                };
                let same_node = self
                    .enrolled(&format!("{}/{}", dpod.namespace, dpod.name))
                    .is_some();
                let tunnel = if !same_node {
                    format!(
                        "HBONE (HTTP/2 CONNECT {target}) over mTLS to {}:{}",
                        target.ip(),
                        hbone::HBONE_PORT
                    )
                } else if service.is_none() && self.direct.is_some() {
                    "none: same node (both identities known from enrollment); the proxy decides \
                     and splices the first connection, then the kernel carries this pod's \
                     connects to this address pod to pod until registry, policy or enrollment \
                     change"
                        .to_owned()
                } else {
                    "none: same node (both identities known from enrollment); the proxy decides \
                     and splices each connection"
                        .to_owned()
                };
                (
                    json!({
                        "kind": "mesh",
                        "service": service,
                        "endpoint_pod": format!("{}/{}", dpod.namespace, dpod.name),
                        "endpoints": endpoints,
                        "target": target.to_string(),
                        "same_node": same_node,
                        "tunnel": tunnel,
                        "expected_identity": dpod.identity(&self.cfg.trust_domain).map(|i| i.to_string()).unwrap_or_default(),
                        "destination_node": dpod.node,
                    }),
                    Some(d),
                )
            }
            Route::Passthrough { target } => (
                json!({"kind": "passthrough", "target": target.to_string(),
                       "reason": "not a pod or Service of the mesh: plain TCP from the pod, no mTLS"}),
                None,
            ),
            Route::Unroutable { reason } => (json!({"kind": "unroutable", "reason": reason}), None),
        };
        let pod_flows: Vec<_> = flows
            .iter()
            .filter(|(f, _)| {
                enrolled.as_ref().is_some_and(|e| e.cookie == f.netns) && f.original_dst == dst
            })
            .map(|(f, _)| mesh_core::admin::ExplainFlow {
                cookie: f.cookie,
                app_socket: f.src.to_string(),
                bytes_sent: f.bytes_sent,
                bytes_received: f.bytes_received,
                closed: f.is_closed(),
                age_ms: mesh_ebpf::age(f.start_ns).as_millis() as u64,
            })
            .collect();
        // The path's RTT: the kernel's histogram of the tunnels from this
        // pod to the endpoint pod (None until a tunnel carried something).
        let path_rtt = match (&r, &enrolled) {
            (Route::Mesh { dst: dpod, .. }, Some(e)) => {
                let rtts = self.tunnel_rtts();
                dpod.ips.iter().find_map(|ip| {
                    rtts.get(&(e.cookie, *ip, mesh_ebpf::HistKind::TunnelOut))
                        .cloned()
                })
            }
            _ => None,
        };
        let verdict = if enrolled.is_none() {
            format!(
                "{key} is not enrolled on {}: its connections are captured but refused (fail closed)",
                self.cfg.node
            )
        } else {
            match (&r, &decision) {
                (
                    Route::Mesh {
                        dst: dpod, target, ..
                    },
                    Some(d),
                ) if d.allowed => format!(
                    "{key} -> {dst} is carried {} to {}/{} at {target} on {}; policy allows it ({})",
                    if dpod.node == self.cfg.node {
                        "on this node (no TLS hop)"
                    } else {
                        "over mTLS"
                    },
                    dpod.namespace,
                    dpod.name,
                    dpod.node,
                    d.reason
                ),
                (Route::Mesh { dst: dpod, .. }, Some(d)) => format!(
                    "{key} -> {dst} is DENIED by the destination {}/{}: {}",
                    dpod.namespace, dpod.name, d.reason
                ),
                (Route::Passthrough { target }, _) => {
                    format!(
                        "{key} -> {target} is not a mesh destination: passed through as plain TCP"
                    )
                }
                (Route::Unroutable { reason }, _) => format!("{key} -> {dst} is refused: {reason}"),
                _ => format!("{key} -> {dst}"),
            }
        };
        Ok(json!({
            "verdict": verdict,
            "pod": key,
            "node": self.cfg.node,
            "identity": identity,
            "enrolled": enrolled.is_some(),
            "netns_cookie": enrolled.as_ref().map(|e| e.cookie),
            "listeners": enrolled.as_ref().map(|e| e.listeners.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            "redirection_mode": mode,
            "kernel": {"enrolled": kernel_enrolled, "stats": stats},
            "destination": dst.to_string(),
            "route": route_json,
            "policy": decision.map(|d| json!({
                "allowed": d.allowed,
                "policy": d.policy.map(|p| p.to_string()),
                "rule": d.rule,
                "reason": d.reason,
            })),
            "flows": pod_flows,
            "rtt": path_rtt,
        }))
    }
}
