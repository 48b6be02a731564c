//! Shared by the mesh-kube tests: a fake API server with sockmesh's CRD,
//! a kube-rs client on it, object builders and a polling wait.
#![allow(clippy::unwrap_used, dead_code)]

use std::time::{Duration, Instant};

use kube::CustomResourceExt;
use kube_fake::FakeApiServer;
use mesh_kube::{KubeConfig, KubeRegistry, PodScope};
use serde_json::{Value, json};

pub async fn fake() -> FakeApiServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let api = FakeApiServer::start().await.unwrap();
    let crd = serde_json::to_value(mesh_kube::crd::AuthorizationPolicy::crd()).unwrap();
    api.create(crd).unwrap();
    api
}

pub fn client(api: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

/// A node-scoped registry with test-sized timings.
pub fn registry(api: &FakeApiServer, node: &str) -> KubeRegistry {
    let mut cfg = KubeConfig::new(PodScope::Node(node.into()));
    cfg.stale_after = Duration::from_secs(1);
    cfg.probe_every = Duration::from_millis(200);
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    cfg.istio_recheck = Duration::from_millis(200);
    KubeRegistry::start(client(api), cfg)
}

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

pub fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, annotations: Value) -> Value {
    let mut status = json!({"phase": "Running"});
    if let Some(ip) = ip {
        status["podIP"] = ip.into();
        status["podIPs"] = json!([{"ip": ip}]);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations, "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{name}"), "containers": [{"name": "app", "image": "app"}]},
        "status": status,
    })
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn names(reg: &KubeRegistry, meshed_only: bool) -> Vec<String> {
    reg.snapshot()
        .pods
        .iter()
        .filter(|p| !meshed_only || p.meshed())
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}
