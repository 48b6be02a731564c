//! A stopping node proxy removes its eBPF pins only when `mesh uninstall`
//! removed its DaemonSet, never on a restart: the decision, against the
//! fake API server, as the proxy's pod and DaemonSet look in a cluster.
#![allow(clippy::unwrap_used)]

use kube_fake::FakeApiServer;
use mesh_proxy::uninstall::{Verdict, verdict};
use serde_json::json;

const NS: &str = "sockmesh-system";

async fn client(api: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

fn daemonset(api: &FakeApiServer) -> String {
    let ds = api
        .create(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "mesh-node", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "x"}},
                     "template": {"metadata": {"labels": {"app": "x"}},
                                  "spec": {"containers": [{"name": "p", "image": "x"}]}}}}))
        .unwrap();
    ds["metadata"]["uid"].as_str().unwrap_or("uid-1").to_owned()
}

fn proxy_pod(api: &FakeApiServer, owner_uid: &str) {
    api.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "mesh-node-abc", "namespace": NS,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                "name": "mesh-node", "uid": owner_uid, "controller": true}]},
        "spec": {"nodeName": "n1", "containers": [{"name": "p", "image": "x"}]}}))
        .unwrap();
}

#[tokio::test]
async fn pins_go_only_when_the_daemonset_is_gone_or_going() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let uid = daemonset(&api);
    proxy_pod(&api, &uid);
    let ds = "sockmesh-system/mesh-node".to_owned();
    // A rolling update or a node drain: the DaemonSet is there.
    assert_eq!(
        verdict(&c, NS, "mesh-node-abc").await.unwrap(),
        Verdict::Restart {
            daemonset: ds.clone()
        }
    );
    // Being deleted (foreground deletion keeps it with a timestamp).
    api.patch(
        "apps",
        "daemonsets",
        NS,
        "mesh-node",
        &json!({"metadata": {"deletionTimestamp": "2026-11-29T00:00:00Z"}}),
    )
    .unwrap();
    assert_eq!(
        verdict(&c, NS, "mesh-node-abc").await.unwrap(),
        Verdict::Uninstall {
            daemonset: ds.clone()
        }
    );
    // Gone (`mesh uninstall` deletes it in the background).
    api.delete("apps", "daemonsets", NS, "mesh-node").unwrap();
    assert_eq!(
        verdict(&c, NS, "mesh-node-abc").await.unwrap(),
        Verdict::Uninstall { daemonset: ds }
    );
    // Not a DaemonSet's pod, or no pod at all: the pins stay.
    assert_eq!(verdict(&c, NS, "nope").await.unwrap(), Verdict::NoDaemonSet);
    api.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "by-hand", "namespace": NS},
        "spec": {"containers": [{"name": "p", "image": "x"}]}}))
        .unwrap();
    assert_eq!(
        verdict(&c, NS, "by-hand").await.unwrap(),
        Verdict::NoDaemonSet
    );
}

#[tokio::test]
async fn an_api_that_refuses_is_an_error_not_an_uninstall() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let uid = daemonset(&api);
    proxy_pod(&api, &uid);
    api.deny("get", "daemonsets.apps");
    let e = verdict(&c, NS, "mesh-node-abc").await.unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 403), "{e}");
}
