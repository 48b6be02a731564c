//! `sockmesh-bench kube [JSON] [--pods N]`: the Kubernetes path end to end
//! on the local mesh (`mesh up --kubernetes`), a benchmark, not a test:
//!
//! - **created -> enrolled**: from the Pod's create request to the API
//!   until mesh-cni ADD returns (the pod captured, its certificate issued):
//!   the runtime's work in between (the pod's netns and veth, `ip` commands)
//!   is included, as it is in a cluster. Each pod has its own service
//!   account, so each enrollment includes one CA signing through
//!   TokenReview.
//! - **annotation flipped -> enrolled**: from the merge patch setting
//!   `sockmesh.io/mesh: enabled` on an opted-out pod until its node proxy's
//!   `/workloads` lists it enrolled (polled every 2 ms: add up to ~2 ms).
//! - **enrollments per second**, serial, each with its own CA signing
//!   through TokenReview (pods / time of the creation phase). The CA's own
//!   signing rate through TokenReview, concurrent, over HTTPS, is
//!   `cargo run --release -p mesh-ca --example kube_bench`.
//!
//! p50/p99 over N pods (200 by default), split over both nodes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_local::control::ControlOptions;
use mesh_local::kube::KubeOptions;
use serde_json::{Value, json};

use crate::e2e::{TestMesh, workload_enrolled};

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "{name:<34} p50 {p50:8.1} ms   p99 {p99:8.1} ms   max {max:8.1} ms   (n={})",
        ms.len()
    );
    json!({"p50_ms": p50, "p99_ms": p99, "max_ms": max, "n": ms.len()})
}

pub fn run(args: &[String]) -> Result<()> {
    let mut pods = 200usize;
    let mut json_out = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--pods" => pods = it.next().context("--pods N")?.parse().context("--pods")?,
            other if json_out.is_none() && !other.starts_with('-') => json_out = Some(other),
            other => bail!("sockmesh-bench kube: unknown argument {other:?}"),
        }
    }
    if pods == 0 || pods > 400 {
        bail!("--pods {pods}: 1-400 (two nodes' pod ranges)");
    }
    let mut m = TestMesh::up_kube(
        "kb",
        &mesh_local::Topology::demo(),
        ControlOptions::default(),
        &KubeOptions::default(),
    )?;
    println!("sockmesh-bench kube: {pods} pods on mesh {}", m.mesh.name());

    // Created -> enrolled.
    let mut created = Vec::with_capacity(pods);
    let phase = Instant::now();
    for i in 0..pods {
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        let name = format!("bench-{i}");
        let pod = mesh_local::Pod {
            namespace: "default".into(),
            name: name.clone(),
            uid: None,
            node: node.into(),
            service_account: name.clone(),
            ips: Vec::new(),
            labels: [("app".to_owned(), "bench".to_owned())].into(),
            annotations: Default::default(),
        };
        let t0 = Instant::now();
        let key = format!("default/{name}");
        if m.mesh.add_pod(&pod, true)?.is_err() {
            // Refused while the proxy had not seen the pod yet: the
            // runtime retries, as kubelet does.
            m.mesh.cni_add_retrying(&key, Duration::from_secs(30))?;
        }
        created.push(t0.elapsed().as_secs_f64() * 1e3);
        if (i + 1) % 50 == 0 {
            println!("  {} pods enrolled", i + 1);
        }
    }
    let creation_s = phase.elapsed().as_secs_f64();
    let enrollments_per_s = pods as f64 / creation_s;

    // Annotation flipped -> enrolled.
    let mut flipped = Vec::with_capacity(pods);
    for i in 0..pods {
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        let key = format!("default/bench-{i}");
        m.mesh
            .set_pod_annotation(&key, "sockmesh.io/mesh", Some("disabled"))?;
        crate::poll(
            &format!("{key} to leave the mesh"),
            Duration::from_secs(30),
            Duration::from_millis(5),
            || Ok((workload_enrolled(&m, node, &key)? != Some(true)).then_some(())),
        )?;
        let t0 = Instant::now();
        m.mesh
            .set_pod_annotation(&key, "sockmesh.io/mesh", Some("enabled"))?;
        crate::poll(
            &format!("{key} to be enrolled again"),
            Duration::from_secs(30),
            Duration::from_millis(2),
            || Ok((workload_enrolled(&m, node, &key)? == Some(true)).then_some(())),
        )?;
        flipped.push(t0.elapsed().as_secs_f64() * 1e3);
    }

    let doc = json!({
        "benchmark": "kube",
        "pods": pods,
        "created_to_enrolled": summary("pod created -> enrolled (CNI ADD)", created),
        "annotation_flip_to_enrolled": summary("annotation flipped -> enrolled", flipped),
        "enrollments_per_s_serial": enrollments_per_s,
    });
    println!(
        "{:<34} {enrollments_per_s:.1}/s ({pods} in {creation_s:.1} s, serial, each with its pod's creation and one TokenReview signing)",
        "enrollments"
    );
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    drop(m);
    Ok(())
}
