//! The Kubernetes registry source against the fake API server, through
//! kube-rs over HTTP: opt-in, resilience, bad objects.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use mesh_core::opt_in::{MeshDecision, NotMeshed, OptedInBy};
use mesh_core::registry::WorkloadRegistry;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn pods_join_and_leave_by_annotation_and_namespace_label() {
    let api = fake().await;
    api.create(namespace("shop", json!({}))).unwrap();
    api.create(pod(
        "shop",
        "a",
        "node-1",
        Some("10.0.0.1"),
        json!({"sockmesh.io/mesh": "enabled"}),
    ))
    .unwrap();
    api.create(pod("shop", "b", "node-1", Some("10.0.0.2"), json!({})))
        .unwrap();
    api.create(pod(
        "shop",
        "off",
        "node-1",
        Some("10.0.0.3"),
        json!({"sockmesh.io/mesh": "disabled"}),
    ))
    .unwrap();
    api.create(pod(
        "shop",
        "elsewhere",
        "node-2",
        Some("10.0.1.1"),
        json!({"sockmesh.io/mesh": "enabled"}),
    ))
    .unwrap();
    let mut host = pod(
        "shop",
        "host",
        "node-1",
        Some("192.168.0.1"),
        json!({"sockmesh.io/mesh": "enabled"}),
    );
    host["spec"]["hostNetwork"] = true.into();
    api.create(host).unwrap();
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    assert_eq!(
        names(&reg, false),
        ["shop/a", "shop/b", "shop/host", "shop/off"],
        "only node-1's pods"
    );
    assert_eq!(names(&reg, true), ["shop/a"]);
    let view = reg.view();
    assert_eq!(
        view.pod_by_ip("10.0.0.2".parse().unwrap()).unwrap().name,
        "b"
    );
    assert_eq!(
        view.pod("shop", "host").unwrap().mesh,
        MeshDecision::NotMeshed(NotMeshed::HostNetwork)
    );
    assert_eq!(reg.node("node-1").unwrap().name, "node-1");
    assert!(reg.pod("shop", "elsewhere").is_none());

    // The pod's annotation flips on: b joins.
    api.patch(
        "",
        "pods",
        "shop",
        "b",
        &json!({"metadata": {"annotations": {"sockmesh.io/mesh": "enabled"}}}),
    )
    .unwrap();
    wait_for("b meshed", T, || names(&reg, true) == ["shop/a", "shop/b"]).await;

    // The namespace opts in: a new plain pod joins; `disabled` still wins.
    api.patch(
        "",
        "namespaces",
        "",
        "shop",
        &json!({"metadata": {"labels": {"sockmesh.io/mesh": "enabled"}}}),
    )
    .unwrap();
    api.create(pod("shop", "c", "node-1", Some("10.0.0.4"), json!({})))
        .unwrap();
    wait_for("c meshed by the namespace", T, || {
        names(&reg, true) == ["shop/a", "shop/b", "shop/c"]
    })
    .await;
    assert_eq!(
        reg.view().pod("shop", "c").unwrap().mesh,
        MeshDecision::Meshed(OptedInBy::NamespaceLabel)
    );
    assert_eq!(
        reg.view().pod("shop", "off").unwrap().mesh,
        MeshDecision::NotMeshed(NotMeshed::PodDisabled)
    );

    // The namespace label goes: c leaves, a and b (annotated) stay.
    api.patch(
        "",
        "namespaces",
        "",
        "shop",
        &json!({"metadata": {"labels": {"sockmesh.io/mesh": null}}}),
    )
    .unwrap();
    wait_for("c out again", T, || {
        names(&reg, true) == ["shop/a", "shop/b"]
    })
    .await;

    // Deleted: gone from the snapshot and the index.
    api.delete("", "pods", "shop", "a").unwrap();
    wait_for("a gone", T, || {
        !names(&reg, false).contains(&"shop/a".to_string())
    })
    .await;
    assert!(reg.view().pod_by_ip("10.0.0.1".parse().unwrap()).is_none());
}

#[tokio::test]
async fn workloads_come_from_owner_references_and_services_are_indexed_by_vip() {
    let api = fake().await;
    let mut p = pod(
        "default",
        "web-7d9f-abcde",
        "node-1",
        Some("10.0.0.9"),
        json!({}),
    );
    p["metadata"]["labels"] =
        json!({"app.kubernetes.io/name": "web", "version": "v2", "pod-template-hash": "7d9f"});
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "rs1", "controller": true}]);
    api.create(p).unwrap();
    api.create(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app.kubernetes.io/name": "web"},
                 "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .unwrap();
    api.create(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.0.9"], "nodeName": "node-1", "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "web-7d9f-abcde", "namespace": "default"}},
            {"addresses": ["10.0.1.9"], "nodeName": "node-2", "conditions": {"ready": true}},
            {"addresses": ["10.0.2.9"], "nodeName": "node-3", "conditions": {"ready": false}}
        ],
    }))
    .unwrap();
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    wait_for("endpoints", T, || {
        reg.view().endpoints("default", "web").len() == 2
    })
    .await;
    let view = reg.view();
    let pod = view.pod("default", "web-7d9f-abcde").unwrap();
    let w = pod.workload.as_ref().unwrap();
    assert_eq!((w.kind.as_str(), w.name.as_str()), ("Deployment", "web"));
    assert_eq!((pod.app(), pod.version()), (Some("web"), Some("v2")));
    let svc = view.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    assert_eq!(svc.target_port(80), Some(8080));
    let eps: Vec<_> = view
        .endpoints("default", "web")
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(eps, ["10.0.0.9", "10.0.1.9"]);
}

#[tokio::test]
async fn a_cut_watch_and_a_410_relist_lose_and_duplicate_nothing() {
    let api = fake().await;
    for i in 0..5 {
        api.create(pod(
            "default",
            &format!("p{i}"),
            "node-1",
            Some(&format!("10.0.0.{}", i + 1)),
            json!({}),
        ))
        .unwrap();
    }
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    assert_eq!(names(&reg, false).len(), 5);
    let lists = reg.health().lists;

    // Every watch dropped mid-stream; changes made meanwhile arrive by replay.
    api.cut_watches();
    api.create(pod("default", "p5", "node-1", Some("10.0.0.6"), json!({})))
        .unwrap();
    api.delete("", "pods", "default", "p0").unwrap();
    wait_for("p5 in, p0 out after the cut", T, || {
        let n = names(&reg, false);
        n.contains(&"default/p5".into()) && !n.contains(&"default/p0".into())
    })
    .await;
    assert_eq!(
        reg.health().lists,
        lists,
        "a cut watch resumes from its version: no relist"
    );

    // History compacted and the next watches expire: 410 -> relist.
    api.compact();
    api.expire_next_watches(5);
    api.cut_watches();
    api.create(pod("default", "p6", "node-1", Some("10.0.0.7"), json!({})))
        .unwrap();
    api.delete("", "pods", "default", "p1").unwrap();
    wait_for("relisted", T, || reg.health().lists > lists).await;
    wait_for("p6 in, p1 out after the relist", T, || {
        let n = names(&reg, false);
        n.contains(&"default/p6".into()) && !n.contains(&"default/p1".into())
    })
    .await;
    let n = names(&reg, false);
    assert_eq!(
        n,
        [
            "default/p2",
            "default/p3",
            "default/p4",
            "default/p5",
            "default/p6"
        ],
        "nothing lost, nothing twice"
    );
    assert!(api.requests("watch", "pods") >= 3);
}

#[tokio::test]
async fn an_api_server_outage_keeps_the_last_state_reports_staleness_and_removes_nothing() {
    let outage: u64 = std::env::var("SOCKMESH_TEST_API_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let api = fake().await;
    api.create(namespace("shop", json!({"sockmesh.io/mesh": "enabled"})))
        .unwrap();
    for i in 0..3 {
        api.create(pod(
            "shop",
            &format!("p{i}"),
            "node-1",
            Some(&format!("10.0.0.{}", i + 1)),
            json!({}),
        ))
        .unwrap();
    }
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    let before = reg.snapshot();
    assert_eq!(names(&reg, true).len(), 3);
    assert!(!reg.health().stale);

    api.go_away(Duration::from_secs(outage));
    // While it is away the cluster changes (the test writes straight to the store).
    api.delete("", "pods", "shop", "p0").unwrap();
    wait_for("stale", T, || reg.health().stale).await;
    let h = reg.health();
    assert!(h.last_error.is_some(), "{h:?}");
    assert_eq!(
        *reg.snapshot(),
        *before,
        "nothing removed while the API is down"
    );
    tokio::time::sleep(Duration::from_secs(outage) / 2).await;
    assert_eq!(*reg.snapshot(), *before, "still nothing removed");
    assert!(reg.health().stale);

    // Back: fresh again, and what changed meanwhile arrives.
    wait_for("fresh", T + Duration::from_secs(outage), || {
        !reg.health().stale
    })
    .await;
    api.create(pod("shop", "p3", "node-1", Some("10.0.0.4"), json!({})))
        .unwrap();
    wait_for("caught up", T, || {
        names(&reg, true) == ["shop/p1", "shop/p2", "shop/p3"]
    })
    .await;
}

#[tokio::test]
async fn bad_objects_are_reported_and_skipped_and_the_watchers_go_on() {
    let api = fake().await;
    api.create(pod(
        "default",
        "pending",
        "node-1",
        None,
        json!({"sockmesh.io/mesh": "enabled"}),
    ))
    .unwrap();
    let policy = |name: &str, spec: serde_json::Value| {
        json!({"apiVersion": "security.sockmesh.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    };
    api.create(policy(
        "good",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
    ))
    .unwrap();
    api.create(policy("typo", json!({"action": "DENY", "rulez": [{}]})))
        .unwrap();
    api.create(policy(
        "l7",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ))
    .unwrap();
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    wait_for("policies", T, || reg.view().problems.len() == 2).await;
    let view = reg.view();
    let problems: Vec<String> = view.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("authorizationpolicy default/typo:") && p.contains("rulez")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("authorizationpolicy default/l7:") && p.contains("methods")),
        "{problems:?}"
    );
    let policies: Vec<_> = view
        .snapshot
        .policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(policies, ["good"]);
    // A pod with no IP yet is no problem: it is served with no addresses
    // (CNI enrolls it before the kubelet writes its IP).
    assert_eq!(names(&reg, true), ["default/pending"]);
    assert!(view.pod("default", "pending").unwrap().ips.is_empty());

    // The pod gets its IP: it is found by it.
    api.patch(
        "",
        "pods",
        "default",
        "pending",
        &json!({"status": {"podIPs": [{"ip": "10.0.0.5"}], "podIP": "10.0.0.5"}}),
    )
    .unwrap();
    wait_for("pending pod has its IP", T, || {
        reg.view()
            .pod_by_ip("10.0.0.5".parse().unwrap())
            .is_some_and(|p| p.name == "pending")
    })
    .await;
    assert_eq!(reg.view().problems.len(), 2);
}

#[tokio::test]
async fn istio_policies_are_watched_once_their_crd_exists() {
    let api = fake().await;
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    api.create(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "authorizationpolicies.security.istio.io"},
        "spec": {"group": "security.istio.io", "scope": "Namespaced",
                 "names": {"kind": "AuthorizationPolicy", "plural": "authorizationpolicies"},
                 "versions": [{"name": "v1", "served": true, "storage": true}]},
    }))
    .unwrap();
    api.create(
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                      "metadata": {"name": "istio-deny", "namespace": "default"},
                      "spec": {"action": "DENY", "rules": [{}]}}),
    )
    .unwrap();
    wait_for("the Istio policy", T, || {
        reg.snapshot()
            .policies
            .iter()
            .any(|p| p.name == "istio-deny")
    })
    .await;
}
