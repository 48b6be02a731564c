//! The status annotation and Events, written through kube-rs to the fake.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use mesh_core::opt_in::{NotMeshed, STATUS_ANNOTATION};
use mesh_kube::{FIELD_MANAGER, PodStatus, StatusWriter};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn status_is_applied_with_server_side_apply_only_when_it_changes() {
    let api = fake().await;
    api.create(pod(
        "default",
        "web",
        "node-1",
        Some("10.0.0.1"),
        json!({"sockmesh.io/mesh": "enabled"}),
    ))
    .unwrap();
    api.create(pod(
        "default",
        "plain",
        "node-1",
        Some("10.0.0.2"),
        json!({}),
    ))
    .unwrap();
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    let writer = StatusWriter::new(client(&api), "node-1");
    let web = reg.view().pod("default", "web").unwrap().clone();
    let meshed = PodStatus::meshed("spiffe://cluster.local/ns/default/sa/sa-web", "ebpf");
    assert!(writer.write(&web, &meshed).await.unwrap());
    assert_eq!(api.requests("patch", "pods"), 1);

    let stored = api.object("", "pods", "default", "web").unwrap();
    let text = stored["metadata"]["annotations"][STATUS_ANNOTATION]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(text).unwrap(),
        json!({"meshed": true, "identity": "spiffe://cluster.local/ns/default/sa/sa-web", "mode": "ebpf"})
    );
    let managers = stored["metadata"]["managedFields"].as_array().unwrap();
    let ours = managers
        .iter()
        .find(|m| m["manager"] == FIELD_MANAGER)
        .unwrap();
    assert_eq!(ours["operation"], "Apply");
    assert_eq!(
        ours["fieldsV1"],
        json!({"f:metadata": {"f:annotations": {"f:sockmesh.io/status": {}}}})
    );
    assert_eq!(
        stored["metadata"]["annotations"]["sockmesh.io/mesh"], "enabled",
        "other annotations untouched"
    );

    // The same status again: no PATCH, from this writer's memory...
    assert!(!writer.write(&web, &meshed).await.unwrap());
    // ...nor from a new writer (a restarted proxy) once the registry shows it.
    wait_for("annotation seen", T, || {
        reg.view()
            .pod("default", "web")
            .unwrap()
            .annotations
            .contains_key(STATUS_ANNOTATION)
    })
    .await;
    let restarted = StatusWriter::new(client(&api), "node-1");
    let web = reg.view().pod("default", "web").unwrap().clone();
    assert!(!restarted.write(&web, &meshed).await.unwrap());
    assert_eq!(api.requests("patch", "pods"), 1);

    // A change is written; the opt-out reason reads as a sentence.
    let plain = reg.view().pod("default", "plain").unwrap().clone();
    let status = PodStatus::from_decision(plain.mesh, None, "ebpf");
    assert_eq!(status, PodStatus::not_meshed(NotMeshed::NotOptedIn));
    assert!(writer.write(&plain, &status).await.unwrap());
    assert!(
        writer
            .write(
                &web,
                &PodStatus::failed("certificate-refused", "the CA refused")
            )
            .await
            .unwrap()
    );
    assert_eq!(api.requests("patch", "pods"), 3);
    let stored = api.object("", "pods", "default", "plain").unwrap();
    let text = stored["metadata"]["annotations"][STATUS_ANNOTATION]
        .as_str()
        .unwrap();
    assert!(text.contains("\"reason\":\"not-opted-in\""), "{text}");
}

#[tokio::test]
async fn failures_become_warning_events_on_the_pod() {
    let api = fake().await;
    api.create(pod("default", "web", "node-1", Some("10.0.0.1"), json!({})))
        .unwrap();
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    let web = reg.view().pod("default", "web").unwrap().clone();
    let writer = StatusWriter::new(client(&api), "node-1");
    writer
        .warn(
            &web,
            "CertificateRefused",
            "the CA refused spiffe://cluster.local/ns/default/sa/sa-web",
        )
        .await
        .unwrap();
    assert_eq!(api.requests("create", "events"), 1);
    let events =
        kube::Api::<k8s_openapi::api::core::v1::Event>::namespaced(client(&api), "default")
            .list(&Default::default())
            .await
            .unwrap();
    let e = &events.items[0];
    assert_eq!(e.reason.as_deref(), Some("CertificateRefused"));
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.involved_object.uid.as_deref(), Some(web.uid.as_str()));
    assert_eq!(e.source.as_ref().unwrap().host.as_deref(), Some("node-1"));
}

#[tokio::test]
async fn reconcile_writes_only_the_pods_whose_status_changed() {
    let api = fake().await;
    for (name, ip, ann) in [
        ("a", "10.0.0.1", json!({"sockmesh.io/mesh": "enabled"})),
        ("b", "10.0.0.2", json!({})),
        ("c", "10.0.0.3", json!({})),
    ] {
        api.create(pod("default", name, "node-1", Some(ip), ann))
            .unwrap();
    }
    let reg = registry(&api, "node-1");
    assert!(reg.wait_synced(T).await);
    let writer = StatusWriter::new(client(&api), "node-1");
    let by_rule = |p: &mesh_core::registry::Pod| {
        PodStatus::from_decision(
            p.mesh,
            p.identity("cluster.local").ok().map(|i| i.to_string()),
            "ebpf",
        )
    };
    let first = writer.reconcile(&reg.snapshot().pods, by_rule).await;
    assert_eq!((first.written, first.unchanged, first.failed), (3, 0, 0));
    wait_for("statuses seen", T, || {
        reg.snapshot()
            .pods
            .iter()
            .all(|p| p.annotations.contains_key(STATUS_ANNOTATION))
    })
    .await;
    let again = writer.reconcile(&reg.snapshot().pods, by_rule).await;
    assert_eq!((again.written, again.unchanged), (0, 3));
    // b opts in: only b is written.
    api.patch(
        "",
        "pods",
        "default",
        "b",
        &json!({"metadata": {"annotations": {"sockmesh.io/mesh": "enabled"}}}),
    )
    .unwrap();
    wait_for("b meshed", T, || {
        reg.view().pod("default", "b").is_some_and(|p| p.meshed())
    })
    .await;
    let third = writer.reconcile(&reg.snapshot().pods, by_rule).await;
    assert_eq!((third.written, third.unchanged), (1, 2));
    assert_eq!(api.requests("patch", "pods"), 4);
}
