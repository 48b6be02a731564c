//! kube-rs, the real client, against the fake: what mesh-kube relies on.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use kube_fake::{FakeApiServer, TokenSpec};
use serde_json::json;

async fn client(api: &FakeApiServer) -> Client {
    let config = kube::Config::new(api.url().parse().unwrap());
    Client::try_from(config).unwrap()
}

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn kube_rs_lists_with_selectors_over_plain_http() {
    let api = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api).await, "default");
    for (n, node) in [("a", "n1"), ("b", "n2"), ("c", "n1")] {
        pods.create(&PostParams::default(), &pod(n, node))
            .await
            .unwrap();
    }
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    let names: Vec<_> = on_n1
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(on_n1.metadata.resource_version.as_deref(), Some("4"));
    let none = pods
        .list(&ListParams::default().labels("app!=web"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
    let dup = pods
        .create(&PostParams::default(), &pod("a", "n1"))
        .await
        .unwrap_err();
    assert!(
        matches!(dup, kube::Error::Api(ref e) if e.code == 409),
        "{dup}"
    );
    assert_eq!(api.requests("create", "pods"), 4);
    assert_eq!(api.requests("list", "pods"), 2);
}

#[tokio::test]
async fn watch_replays_from_a_version_and_expired_versions_get_410() {
    let api = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api).await, "default");
    let a = pods
        .create(&PostParams::default(), &pod("a", "n1"))
        .await
        .unwrap();
    let rv = a.metadata.resource_version.clone().unwrap();
    pods.create(&PostParams::default(), &pod("b", "n1"))
        .await
        .unwrap();
    pods.delete("a", &Default::default()).await.unwrap();
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    for _ in 0..2 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(p) => seen.push(format!("added {}", p.metadata.name.unwrap())),
            WatchEvent::Deleted(p) => seen.push(format!("deleted {}", p.metadata.name.unwrap())),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, ["added b", "deleted a"]);
    api.compact();
    let mut old = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match old.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_side_apply_records_the_manager_and_conflicts_unless_forced() {
    let api = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api).await, "default");
    pods.create(&PostParams::default(), &pod("a", "n1"))
        .await
        .unwrap();
    let patch = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "annotations": {"x": "1"}}});
    let applied = pods
        .patch(
            "a",
            &PatchParams::apply("sockmesh-node"),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
    let managers: Vec<_> = applied
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .map(|m| (m.manager.clone().unwrap(), m.operation.clone().unwrap()))
        .collect();
    assert!(
        managers.contains(&("sockmesh-node".into(), "Apply".into())),
        "{managers:?}"
    );
    let other = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "annotations": {"x": "2"}}});
    let err = pods
        .patch(
            "a",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(&other),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err}"
    );
    pods.patch(
        "a",
        &PatchParams::apply("someone-else").force(),
        &Patch::Apply(&other),
    )
    .await
    .unwrap();
    // Apply creates when absent.
    let new = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "z"}, "spec": {"nodeName": "n9"}});
    pods.patch("z", &PatchParams::apply("m"), &Patch::Apply(&new))
        .await
        .unwrap();
    assert!(api.object("", "pods", "default", "z").is_some());
}

#[tokio::test]
async fn token_review_checks_audience_expiry_and_the_bound_pod() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    let p = pods
        .create(&PostParams::default(), &pod("proxy", "n1"))
        .await
        .unwrap();
    let spec = |expires| TokenSpec {
        namespace: "default".into(),
        service_account: "mesh-proxy".into(),
        audiences: vec!["sockmesh-ca".into()],
        pod: Some(("proxy".into(), p.metadata.uid.clone().unwrap())),
        node: Some(("n1".into(), "node-uid".into())),
        expires,
    };
    let good = api.mint_token(spec(
        std::time::SystemTime::now() + Duration::from_secs(600),
    ));
    let expired = api.mint_token(spec(std::time::SystemTime::now() - Duration::from_secs(1)));
    let reviews: Api<TokenReview> = Api::all(c);
    let review = |token: &str, aud: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: Some(vec![aud.into()]),
        },
        ..Default::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review(&good, "sockmesh-ca"))
        .await
        .unwrap();
    let status = ok.status.unwrap();
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:default:mesh-proxy")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/node-name"],
        ["n1"]
    );
    for (token, aud, want) in [
        (good.as_str(), "other", "invalid for the target audiences"),
        (expired.as_str(), "sockmesh-ca", "expired"),
        ("forged", "sockmesh-ca", "invalid bearer token"),
    ] {
        let r = reviews
            .create(&PostParams::default(), &review(token, aud))
            .await
            .unwrap();
        let s = r.status.unwrap();
        assert_eq!(s.authenticated, Some(false));
        assert!(s.error.unwrap().contains(want));
    }
    pods.delete("proxy", &Default::default()).await.unwrap();
    let r = reviews
        .create(&PostParams::default(), &review(&good, "sockmesh-ca"))
        .await
        .unwrap();
    assert!(r.status.unwrap().error.unwrap().contains("not found"));
}

#[tokio::test]
async fn deny_answers_403_as_rbac_words_it_and_only_for_that_verb_and_resource() {
    let api = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api).await, "default");
    api.deny("create", "pods");
    let e = pods
        .create(&PostParams::default(), &pod("a", "n1"))
        .await
        .unwrap_err();
    let kube::Error::Api(s) = e else {
        panic!("{e}")
    };
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        s.message,
        "pods is forbidden: User \"system:anonymous\" cannot create resource \"pods\" in API group \"\" in the namespace \"default\""
    );
    // Other verbs, and the same verb on other resources, still work.
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client(&api).await, "default");
    leases
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "l"}})).unwrap(),
        )
        .await
        .unwrap();
}
