//! The node proxies' admin API (localhost:15000 inside each node's network
//! namespace), as the CLI reads it: the only way the CLI learns anything
//! from a proxy.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_local::Mesh;
use mesh_local::control::{self, READY_PORT};
use serde::de::DeserializeOwned;

pub use mesh_core::admin::{CertState, ExplainFlow, Flow, Workload, Workloads};

/// A GET on `node`'s admin port; the body of a 200 answer.
pub fn get(mesh: &Mesh, node: &str, path: &str) -> Result<String> {
    let (status, body) = mesh.admin_get(node, path).with_context(|| {
        format!(
            "node {node}: the proxy's admin API (localhost:15000 in netns {}) did not answer GET {path}; \
             is the proxy running? see `mesh status{}` and {}",
            mesh.node(node).map(|n| n.netns.clone()).unwrap_or_default(),
            crate::failure::name_flag(mesh.name()),
            mesh.control_log(&format!("proxy-{node}")).display()
        )
    })?;
    if status != 200 {
        anyhow::bail!(AdminStatus {
            node: node.to_owned(),
            path: path.to_owned(),
            status,
            body: body.trim().to_owned(),
        });
    }
    Ok(body)
}

/// A non-200 answer of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminStatus {
    pub node: String,
    pub path: String,
    pub status: u16,
    pub body: String,
}

impl std::fmt::Display for AdminStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {}: GET {} answered {}: {}",
            self.node, self.path, self.status, self.body
        )
    }
}

impl std::error::Error for AdminStatus {}

/// GET and decode JSON.
pub fn get_json<T: DeserializeOwned>(mesh: &Mesh, node: &str, path: &str) -> Result<T> {
    let body = get(mesh, node, path)?;
    serde_json::from_str(&body)
        .with_context(|| format!("node {node}: GET {path}: unexpected answer {body:.200}"))
}

/// The readiness answer of `node`'s proxy: `Ok(())` when ready, `Err(why)`
/// otherwise (not answering, or what it waits for).
pub fn ready(mesh: &Mesh, node: &str) -> Result<(), String> {
    let n = mesh.node(node).map_err(|e| e.to_string())?;
    match control::http(
        &n.netns_path(),
        "GET",
        SocketAddr::from(([127, 0, 0, 1], READY_PORT)),
        "/healthz/ready",
        Duration::from_secs(3),
    ) {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("not ready ({status}): {}", body.trim())),
        Err(e) => Err(format!("not answering on :{READY_PORT}: {e}")),
    }
}
