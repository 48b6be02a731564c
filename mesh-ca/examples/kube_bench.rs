//! Benchmarks of the Kubernetes path against the fake API server (numbers
//! for the report, not a test):
//!
//! - pod created in the API -> in the node registry's snapshot, and
//!   annotation flipped -> meshed in the snapshot: p50/p99 over N pods;
//! - CA signings per second through TokenReview, over HTTPS.
//!
//! `cargo run --release -p mesh-ca --example kube_bench -- [PODS] [SIGNINGS] [CONNECTIONS]`
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube_fake::{FakeApiServer, TokenSpec};
use mesh_ca::auth::CA_AUDIENCE;
use mesh_ca::cluster::RootSecret;
use mesh_ca::{Ca, CaConfig, CaServer, TokenReviewAuthenticator};
use mesh_core::ca::{SIGN_PATH, SignRequest};
use mesh_core::identity::Identity;
use mesh_kube::{KubeConfig, KubeRegistry, PodScope};
use serde_json::json;

fn client(api: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

fn pod(name: &str, i: usize) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "sa", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)}]},
    }))
    .unwrap()
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        v.len()
    )
}

async fn wait(reg: &KubeRegistry, mut done: impl FnMut(&mesh_kube::View) -> bool) {
    let mut changes = reg.changes();
    while !done(&reg.view()) {
        let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let pods = args.first().copied().unwrap_or(200);
    let signings = args.get(1).copied().unwrap_or(2000);
    let conns = args.get(2).copied().unwrap_or(4);

    let api = FakeApiServer::start().await?;
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}))
        .unwrap();
    let mut cfg = KubeConfig::new(PodScope::Node("node-1".into()));
    cfg.policies = false;
    cfg.istio_policies = false;
    let reg = KubeRegistry::start(client(&api), cfg);
    assert!(reg.wait_synced(Duration::from_secs(10)).await);
    let pods_api: kube::Api<Pod> = kube::Api::namespaced(client(&api), "bench");

    let mut created = Vec::with_capacity(pods);
    for i in 0..pods {
        let name = format!("p{i}");
        let t = Instant::now();
        pods_api
            .create(&PostParams::default(), &pod(&name, i + 1))
            .await?;
        wait(&reg, |v| v.pod("bench", &name).is_some()).await;
        created.push(t.elapsed());
    }
    println!(
        "pod created -> in the snapshot:      {}",
        percentiles(created)
    );

    let mut flipped = Vec::with_capacity(pods);
    for i in 0..pods {
        let name = format!("p{i}");
        let patch = json!({"metadata": {"annotations": {"sockmesh.io/mesh": "enabled"}}});
        let t = Instant::now();
        pods_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        wait(&reg, |v| v.pod("bench", &name).is_some_and(|p| p.meshed())).await;
        flipped.push(t.elapsed());
    }
    println!(
        "annotation flipped -> meshed:        {}",
        percentiles(flipped)
    );

    // The CA: TokenReview + pod lookup + authorization + signing, over HTTPS.
    api.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "proxy", "namespace": "sockmesh-system"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "mesh-proxy", "containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
    let uid = api.object("", "pods", "sockmesh-system", "proxy").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = api.mint_token(TokenSpec {
        namespace: "sockmesh-system".into(),
        service_account: "mesh-proxy".into(),
        audiences: vec![CA_AUDIENCE.into()],
        pod: Some(("proxy".into(), uid)),
        node: Some(("node-1".into(), "n1".into())),
        expires: SystemTime::now() + Duration::from_secs(3600),
    });
    let dir = tempfile::tempdir()?;
    let secret = RootSecret {
        namespace: "sockmesh-system".into(),
        name: "root".into(),
    };
    let roots = secret
        .load_or_create(
            &client(&api),
            "cluster.local",
            dir.path(),
            true,
            SystemTime::now(),
        )
        .await?;
    let ca_reg = Arc::new(KubeRegistry::start(client(&api), KubeConfig::for_ca()));
    assert!(ca_reg.wait_synced(Duration::from_secs(10)).await);
    let auth = TokenReviewAuthenticator::new(
        client(&api),
        CA_AUDIENCE,
        &[("sockmesh-system".into(), "mesh-proxy".into())],
    );
    let ca = Ca::new(
        CaConfig::new("cluster.local", roots),
        Arc::new(auth),
        ca_reg,
    )?;
    let server = CaServer::bind(ca.clone(), "127.0.0.1:0".parse()?).await?;
    let key = rcgen::KeyPair::generate()?;
    let identity = "spiffe://cluster.local/ns/bench/sa/sa";
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into()?)];
    let body = Bytes::from(serde_json::to_vec(&SignRequest {
        identity: Identity::parse(identity)?,
        csr: params.serialize_request(&key)?.pem()?,
        ttl_seconds: None,
    })?);
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(ca.trust_bundle());
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_no_client_auth(),
    );
    let addr = server.local_addr();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tls, body, token) = (tls.clone(), body.clone(), token.clone());
        let n = signings / conns;
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let req = http::Request::post(SIGN_PATH)
                    .header("host", "localhost")
                    .header("authorization", format!("Bearer {token}"))
                    .body(Full::new(body.clone()))
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "CA signings through TokenReview:     {:.0}/s ({} over {conns} connections), {}",
        lat.len() as f64 / secs,
        lat.len(),
        percentiles(lat)
    );
    println!(
        "API requests per signing:            {:.1} TokenReview, {:.1} pod GET",
        api.requests("create", "tokenreviews.authentication.k8s.io") as f64 / signings as f64,
        api.requests("get", "pods") as f64 / signings as f64
    );
    server.shutdown().await;
    Ok(())
}
