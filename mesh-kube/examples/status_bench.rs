//! How fast the node proxy's status write-back goes, over HTTP against the
//! fake API server: `sockmesh.io/status` on every pod by server-side apply
//! (field manager `sockmesh-node`), one pod at a time as the proxy writes
//! them, then the same statuses again (nothing changed: no request at all).
//! (Pod → view and flip → view latencies, and CA signings through
//! TokenReview: `cargo run --release -p mesh-ca --example kube_bench`.)
//!
//! `cargo run --release -p mesh-kube --example status_bench [-- PODS]`
//! (200 by default).

use std::time::{Duration, Instant};

use kube::CustomResourceExt;
use mesh_kube::{KubeConfig, KubeRegistry, PodScope, PodStatus, StatusWriter};
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let pods: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200);
    let api = kube_fake::FakeApiServer::start().await?;
    let fake = |e: kube_fake::ApiError| anyhow::anyhow!("{e:?}");
    api.create(serde_json::to_value(
        mesh_kube::crd::AuthorizationPolicy::crd(),
    )?)
    .map_err(fake)?;
    for i in 0..pods {
        api.create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": "shop"},
            "spec": {"nodeName": "node-a", "serviceAccountName": "sa",
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": format!("10.1.{}.{}", i / 250, i % 250 + 1)}}))
            .map_err(fake)?;
    }
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
    let reg = KubeRegistry::start(
        client.clone(),
        KubeConfig::new(PodScope::Node("node-a".into())),
    );
    anyhow::ensure!(reg.wait_synced(Duration::from_secs(10)).await, "not synced");
    let all = reg.view().snapshot.pods.clone();
    anyhow::ensure!(all.len() == pods, "{} pods in the view", all.len());

    let writer = StatusWriter::new(client, "node-a");
    let status = PodStatus::meshed("spiffe://cluster.local/ns/shop/sa/sa", "ebpf");
    let t = Instant::now();
    let first = writer.reconcile(&all, |_| status.clone()).await;
    let took = t.elapsed();
    let t = Instant::now();
    let again = writer.reconcile(&all, |_| status.clone()).await;
    let took_again = t.elapsed();
    println!(
        "status write-back, {pods} pods: {} applied in {took:.2?} ({:.0}/s, one at a time); \
         unchanged pass: {} skipped in {took_again:.2?}, {} PATCH sent",
        first.written,
        first.written as f64 / took.as_secs_f64(),
        again.unchanged,
        api.requests("patch", "pods") - first.written as u64,
    );
    Ok(())
}
