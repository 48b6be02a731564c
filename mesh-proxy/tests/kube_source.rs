//! The node proxy's Kubernetes registry source against the fake API server
//! (kube-rs over HTTP, no eBPF): it serves the layers below the same
//! snapshot the file does, it is not reconciled against before it has
//! listed everything, readiness names a stale API while the last state
//! stays, and each pod's status is written back once, with Warning Events
//! for faults.
#![allow(clippy::unwrap_used)]

#[path = "../../mesh-kube/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{client, fake, namespace, pod};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use kube_fake::FakeApiServer;
use mesh_core::opt_in::STATUS_ANNOTATION;
use mesh_core::registry::Pod;
use mesh_proxy::pod_status::{self, Facts, Fault, Outcome};
use mesh_proxy::registry::{KubeSettings, KubeSource, RegistrySource};
use mesh_proxy::route::{Route, route};
use serde_json::{Value, json};
use sockmesh_test_support::eventually;

const T: Duration = Duration::from_secs(10);

/// The source a proxy on `node` runs (`KubeSource::config`), with
/// test-sized timings.
fn source(api: &FakeApiServer, node: &str, own_pod: Option<(&str, &str)>) -> RegistrySource {
    let settings = KubeSettings {
        node: node.into(),
        kubeconfig: None,
        own_pod: own_pod.map(|(ns, name)| (ns.into(), name.into())),
        stale_after: Duration::from_secs(1),
    };
    let mut config = KubeSource::config(&settings);
    config.probe_every = Duration::from_millis(100);
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(300);
    config.istio_recheck = Duration::from_millis(200);
    RegistrySource::kubernetes(KubeSource::with_config(client(api), config, node))
}

async fn settled(source: &RegistrySource) {
    eventually("the Kubernetes source settles", T, || source.settled())
        .await
        .unwrap();
}

const FILE: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - {name: shop, labels: {sockmesh.io/mesh: enabled}}
  - {name: legacy}
pods:
  - {namespace: shop, name: cart, uid: u1, node: node-a, service_account: sa-cart, ips: [10.0.0.1], labels: {app: cart}}
  - {namespace: shop, name: db, uid: u2, node: node-b, service_account: sa-db, ips: [10.0.0.2], labels: {app: db}}
  - {namespace: shop, name: batch, uid: u3, node: node-a, service_account: sa-batch, ips: [10.0.0.3], labels: {app: batch}, annotations: {sockmesh.io/mesh: disabled}}
  - {namespace: legacy, name: old, uid: u4, node: node-b, service_account: sa-old, ips: [10.0.0.4], labels: {app: old}}
services:
  - {namespace: shop, name: db, vip: 10.96.0.10, ports: [{port: 5432, target_port: 15432}], selector: {app: db}}
"#;

/// The same cluster as [`FILE`], as Kubernetes objects.
fn create_cluster(api: &FakeApiServer) {
    api.create(namespace("shop", json!({"sockmesh.io/mesh": "enabled"})))
        .unwrap();
    api.create(namespace("legacy", json!({}))).unwrap();
    for (ns, name, node, ip, ann) in [
        ("shop", "cart", "node-a", "10.0.0.1", json!({})),
        ("shop", "db", "node-b", "10.0.0.2", json!({})),
        (
            "shop",
            "batch",
            "node-a",
            "10.0.0.3",
            json!({"sockmesh.io/mesh": "disabled"}),
        ),
        ("legacy", "old", "node-b", "10.0.0.4", json!({})),
    ] {
        api.create(pod(ns, name, node, Some(ip), ann)).unwrap();
    }
    api.create(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "db"},
                 "ports": [{"port": 5432, "targetPort": 15432, "protocol": "TCP"}]},
    }))
    .unwrap();
}

/// What the layers below read of a pod: where it runs, its addresses,
/// identity, labels and whether it is meshed.
fn seen(p: &Pod) -> (String, String, Vec<std::net::IpAddr>, String, bool) {
    (
        format!("{}/{}", p.namespace, p.name),
        p.node.clone(),
        p.ips.clone(),
        p.service_account.clone(),
        p.meshed(),
    )
}

/// A route as the outbound side uses it: the pod and port it reaches.
fn reach(r: Route) -> String {
    match r {
        Route::Mesh { dst, target, .. } => format!("mesh {}/{} {target}", dst.namespace, dst.name),
        Route::Passthrough { target } => format!("passthrough {target}"),
        Route::Unroutable { reason } => format!("unroutable {reason}"),
    }
}

#[tokio::test]
async fn the_file_and_kubernetes_sources_serve_the_layers_below_the_same_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("registry.yaml"), FILE).unwrap();
    let file = RegistrySource::file(&dir.path().join("registry.yaml")).unwrap();
    let api = fake().await;
    create_cluster(&api);
    let kube = source(&api, "node-a", None);
    settled(&kube).await;
    assert!(file.settled() && file.not_ready().is_none());
    assert!(kube.not_ready().is_none(), "{:?}", kube.not_ready());
    assert!(file.changes().is_none() && kube.changes().is_some());

    let (f, k) = (file.snapshot(), kube.snapshot());
    let pods = |s: &mesh_core::registry::IndexedSnapshot| {
        let mut v: Vec<_> = s.pods.iter().map(seen).collect();
        v.sort();
        v
    };
    assert_eq!(pods(&f), pods(&k));
    assert_eq!(
        pods(&k)
            .iter()
            .filter(|p| p.4)
            .map(|p| p.0.as_str())
            .collect::<Vec<_>>(),
        ["shop/cart", "shop/db"],
        "the namespace label opts in, the pod annotation opts out"
    );
    // The pods of the other node are there: routing needs them.
    for orig in [
        "10.0.0.2:5432",   // a meshed pod on node-b
        "10.0.0.4:80",     // a pod of a namespace not opted in
        "10.96.0.10:5432", // a Service VIP
        "10.96.0.10:80",   // a port the Service does not have
        "192.0.2.7:443",   // outside the cluster
    ] {
        let orig = orig.parse().unwrap();
        assert_eq!(
            reach(route(&f, orig, 0)),
            reach(route(&k, orig, 0)),
            "{orig}"
        );
    }
    assert_eq!(
        reach(route(&k, "10.96.0.10:5432".parse().unwrap(), 0)),
        "mesh shop/db 10.0.0.2:15432"
    );
}

#[tokio::test]
async fn nothing_is_reconciled_before_every_kind_is_listed_and_readiness_says_why() {
    // No AuthorizationPolicy CRD yet: that watcher cannot list.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let api = FakeApiServer::start().await.unwrap();
    create_cluster(&api);
    let kube = source(&api, "node-a", None);
    let pods_listed = || kube.kube().unwrap().registry.view().generation > 0;
    eventually("the pods are listed", T, pods_listed)
        .await
        .unwrap();
    assert!(!kube.settled(), "a partial view is not settled");
    let why = kube.not_ready().unwrap();
    assert!(why.contains("not synced yet"), "{why}");
    assert!(why.contains("authorizationpolicies"), "{why}");
    // Nothing to report on a partial view either.
    assert!(
        pod_status::report(&kube, &[], "ebpf", Vec::new())
            .await
            .is_none(),
        "no status written before the source is settled"
    );

    let crd = serde_json::to_value(
        <mesh_kube::crd::AuthorizationPolicy as kube::CustomResourceExt>::crd(),
    )
    .unwrap();
    api.create(crd).unwrap();
    settled(&kube).await;
    assert_eq!(kube.not_ready(), None);
}

#[tokio::test]
async fn readiness_names_a_stale_api_and_the_last_state_stays() {
    let api = fake().await;
    create_cluster(&api);
    let kube = source(&api, "node-a", None);
    settled(&kube).await;
    let before = kube.snapshot();

    api.stop_serving();
    eventually("readiness reports the API stale", T, || {
        kube.not_ready().is_some_and(|w| w.contains("stale"))
    })
    .await
    .unwrap();
    let why = kube.not_ready().unwrap();
    assert!(
        why.contains("no successful list/watch") && why.contains("--api-stale-seconds 1"),
        "{why}"
    );
    assert!(why.contains("serving the last known state"), "{why}");
    // Nothing is lost while the API is away: still settled, same pods.
    assert!(kube.settled());
    assert_eq!(kube.snapshot().snapshot(), before.snapshot());
    assert_eq!(
        kube.snapshot().pods.iter().filter(|p| p.meshed()).count(),
        2
    );

    api.come_back();
    eventually("readiness recovers", T, || kube.not_ready().is_none())
        .await
        .unwrap();
    assert_eq!(kube.snapshot().snapshot(), before.snapshot());
}

/// The status annotation of `ns/name`, parsed.
fn status_of(api: &FakeApiServer, ns: &str, name: &str) -> Option<Value> {
    let pod = api.object("", "pods", ns, name)?;
    let text = pod["metadata"]["annotations"][STATUS_ANNOTATION].as_str()?;
    Some(serde_json::from_str(text).unwrap())
}

#[tokio::test]
async fn each_pods_status_is_written_back_once_with_its_reason_and_faults_raise_events() {
    let api = fake().await;
    create_cluster(&api);
    api.create(namespace("sockmesh", json!({}))).unwrap();
    api.create(pod(
        "sockmesh",
        "mesh-proxy-a",
        "node-a",
        Some("10.0.0.9"),
        json!({"sockmesh.io/mesh": "enabled"}),
    ))
    .unwrap();
    let mut host = pod("shop", "host", "node-a", Some("192.168.0.1"), json!({}));
    host["spec"]["hostNetwork"] = true.into();
    api.create(host).unwrap();
    api.create(pod("shop", "pending", "node-a", None, json!({})))
        .unwrap();
    for name in ["refused", "broken", "starting", "nocni"] {
        api.create(pod(
            "shop",
            name,
            "node-a",
            Some(&format!("10.0.1.{}", name.len())),
            json!({}),
        ))
        .unwrap();
    }
    let kube = source(&api, "node-a", Some(("sockmesh", "mesh-proxy-a")));
    settled(&kube).await;

    // What enrollment knows on node-a: cart enrolled, refused without a
    // certificate, broken failed to capture, starting has its netns (from
    // CNI), nocni not yet.
    let failures = BTreeMap::from([
        (
            "shop/refused",
            (
                Fault::CertificateRefused,
                "CA 10.96.0.12:15012: /sign answered 403: forbidden".to_owned(),
            ),
        ),
        (
            "shop/broken",
            (Fault::EnrollmentFailed, "no netns".to_owned()),
        ),
    ]);
    let facts = |p: &Pod| {
        let key = format!("{}/{}", p.namespace, p.name);
        Facts {
            no_ip: p.ips.is_empty(),
            has_netns: key == "shop/starting",
            enrolled: (key == "shop/cart")
                .then(|| "spiffe://cluster.local/ns/shop/sa/sa-cart".to_owned()),
            failure: failures.get(key.as_str()).cloned(),
            own_pod: key == "sockmesh/mesh-proxy-a",
        }
    };
    let outcomes = pod_status::outcomes(&kube, "node-a", facts);
    let keys: Vec<String> = outcomes
        .iter()
        .map(|(p, _)| format!("{}/{}", p.namespace, p.name))
        .collect();
    assert_eq!(
        keys,
        [
            "shop/batch",
            "shop/broken",
            "shop/cart",
            "shop/host",
            "shop/nocni",
            "shop/pending",
            "shop/refused",
            "shop/starting",
            "sockmesh/mesh-proxy-a"
        ],
        "this node's pods only, the one without an IP yet too"
    );
    let news: Vec<(String, Fault, String)> = failures
        .iter()
        .map(|(k, (f, e))| ((*k).to_owned(), *f, e.clone()))
        .collect();
    let done = pod_status::report(&kube, &outcomes, "ebpf", news.clone())
        .await
        .unwrap();
    assert_eq!((done.written, done.failed), (9, 0));

    let reason = |name: &str, ns: &str| status_of(&api, ns, name).map(|s| s["reason"].clone());
    assert_eq!(
        status_of(&api, "shop", "cart").unwrap(),
        json!({"meshed": true, "identity": "spiffe://cluster.local/ns/shop/sa/sa-cart", "mode": "ebpf"})
    );
    for (name, ns, want) in [
        ("batch", "shop", "pod-disabled"),
        ("host", "shop", "host-network"),
        ("mesh-proxy-a", "sockmesh", "mesh-component"),
        ("pending", "shop", "no-ip-yet"),
        ("refused", "shop", "certificate-refused"),
        ("broken", "shop", "enrollment-failed"),
        ("starting", "shop", "enrolling"),
        ("nocni", "shop", "no-netns-yet"),
    ] {
        assert_eq!(reason(name, ns), Some(json!(want)), "{ns}/{name}");
    }
    assert_eq!(
        status_of(&api, "sockmesh", "mesh-proxy-a").unwrap()["message"],
        "the node proxy's own pod is never meshed"
    );
    assert!(
        status_of(&api, "shop", "refused").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("/sign answered 403"),
        "the annotation carries the cause"
    );
    assert_eq!(
        status_of(&api, "shop", "db"),
        None,
        "node-b's pods are node-b's to write"
    );
    assert_eq!(status_of(&api, "legacy", "old"), None);

    let events: Api<Event> = Api::namespaced(client(&api), "shop");
    let mut got: Vec<(String, String, String)> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            (
                e.involved_object.name.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.type_.unwrap_or_default(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("broken".into(), "EnrollmentFailed".into(), "Warning".into()),
            (
                "refused".into(),
                "CertificateRefused".into(),
                "Warning".into()
            ),
        ]
    );

    // Unchanged: no PATCH, no Event (the same failures are not news).
    let patches = api.requests("patch", "pods");
    let outcomes = pod_status::outcomes(&kube, "node-a", facts);
    let done = pod_status::report(&kube, &outcomes, "ebpf", Vec::new())
        .await
        .unwrap();
    assert_eq!((done.written, done.unchanged), (0, 9));
    assert_eq!(api.requests("patch", "pods"), patches);
    assert_eq!(api.requests("create", "events"), 2);

    // A failure that cleared before it was reported raises no Event.
    let cleared = |p: &Pod| Facts {
        failure: None,
        ..facts(p)
    };
    let outcomes = pod_status::outcomes(&kube, "node-a", cleared);
    pod_status::report(&kube, &outcomes, "ebpf", news)
        .await
        .unwrap();
    assert_eq!(api.requests("create", "events"), 2);

    // The annotation flips: the pod's status follows once the view has it.
    api.patch(
        "",
        "pods",
        "shop",
        "cart",
        &json!({"metadata": {"annotations": {"sockmesh.io/mesh": "disabled"}}}),
    )
    .unwrap();
    eventually("the view sees the flip", T, || {
        kube.snapshot()
            .pod("shop", "cart")
            .is_some_and(|p| !p.meshed())
    })
    .await
    .unwrap();
    let outcomes = pod_status::outcomes(&kube, "node-a", cleared);
    let cart = outcomes.iter().find(|(p, _)| p.name == "cart").unwrap();
    assert!(matches!(cart.1, Outcome::NotMeshed { .. }));
    let done = pod_status::report(&kube, &outcomes, "ebpf", Vec::new())
        .await
        .unwrap();
    assert_eq!(done.written, 1);
    assert_eq!(reason("cart", "shop"), Some(json!("pod-disabled")));
}
