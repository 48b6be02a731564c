//! How fast the Kubernetes source follows the API, over HTTP against the
//! fake API server (kube-rs client and watchers as in a cluster; the fake
//! answers in-process, so this is the source's own cost, not etcd's):
//!
//! - create → in the view: a Pod created in the API until the registry's
//!   view holds it (what the node proxy reconciles on);
//! - flip → in the view: `sockmesh.io/mesh` set to `enabled` on a pod of a
//!   namespace not opted in, until the view says it is meshed;
//! - status writes: the node proxy's `sockmesh.io/status` for every pod by
//!   server-side apply, one at a time, then again (unchanged: no request).
//!
//! `cargo run --release -p mesh-kube --example registry_bench [-- PODS]`
//! (200 by default). One pod at a time, so each figure is one event's
//! latency, not a batch's.

use std::time::{Duration, Instant};

use kube::CustomResourceExt;
use mesh_kube::{KubeConfig, KubeRegistry, PodScope, PodStatus, StatusWriter};
use serde_json::json;

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn show(what: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{what:<24} n={:<4} p50={:>8.2?} p99={:>8.2?} max={:>8.2?}",
        v.len(),
        quantile(&v, 0.5),
        quantile(&v, 0.99),
        v[v.len() - 1]
    );
}

/// Waits (on the view's change channel) until `check` holds.
async fn until(reg: &KubeRegistry, what: &str, check: impl Fn(&KubeRegistry) -> bool) {
    let mut changes = reg.changes();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check(reg) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), changes.changed()).await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let pods: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200);
    let api = kube_fake::FakeApiServer::start().await?;
    api.create(serde_json::to_value(
        mesh_kube::crd::AuthorizationPolicy::crd(),
    )?)
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (ns, label) in [("shop", "enabled"), ("other", "")] {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"sockmesh.io/mesh": label}}}))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
    let reg = KubeRegistry::start(client.clone(), KubeConfig::new(PodScope::Cluster));
    anyhow::ensure!(reg.wait_synced(Duration::from_secs(10)).await, "not synced");

    let pod = |ns: &str, name: &str, i: usize| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "sa",
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", if ns == "shop" { 1 } else { 2 }, i / 250, i % 250 + 1)}})
    };
    let mut created = Vec::new();
    for i in 0..pods {
        let name = format!("p{i}");
        let t = Instant::now();
        api.create(pod("shop", &name, i))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        until(&reg, "a created pod", |r| {
            r.view().pod("shop", &name).is_some()
        })
        .await;
        created.push(t.elapsed());
    }
    for i in 0..pods {
        api.create(pod("other", &format!("q{i}"), i))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    until(&reg, "the other pods", |r| {
        r.view().snapshot.pods.len() == 2 * pods
    })
    .await;
    let mut flipped = Vec::new();
    for i in 0..pods {
        let name = format!("q{i}");
        let t = Instant::now();
        api.patch(
            "",
            "pods",
            "other",
            &name,
            &json!({"metadata": {"annotations": {"sockmesh.io/mesh": "enabled"}}}),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        until(&reg, "a flipped pod", |r| {
            r.view().pod("other", &name).is_some_and(|p| p.meshed())
        })
        .await;
        flipped.push(t.elapsed());
    }
    println!(
        "Kubernetes source, {pods} pods, one event at a time (kube-fake over HTTP on loopback):"
    );
    show("create -> in the view", created);
    show("flip -> meshed in view", flipped);

    let writer = StatusWriter::new(client, "node-a");
    let all: Vec<_> = reg.view().snapshot.pods.clone();
    let status = PodStatus::meshed("spiffe://cluster.local/ns/x/sa/sa", "ebpf");
    let t = Instant::now();
    let done = writer.reconcile(&all, |_| status.clone()).await;
    let first = t.elapsed();
    let t = Instant::now();
    let again = writer.reconcile(&all, |_| status.clone()).await;
    let second = t.elapsed();
    println!(
        "status writes            {} applied in {first:.2?} ({:.0}/s); unchanged pass: {} skipped in {second:.2?}, {} PATCH",
        done.written,
        done.written as f64 / first.as_secs_f64(),
        again.unchanged,
        api.requests("patch", "pods") - done.written as u64,
    );
    Ok(())
}
