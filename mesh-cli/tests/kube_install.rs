//! `mesh install`, `mesh uninstall` and `mesh check` against the fake API
//! server (kube-fake), run as a user runs them: the `mesh` binary with a
//! kubeconfig file. kube-fake has no controllers: where a real cluster's
//! controllers would fill in a Deployment's or DaemonSet's status, the
//! tests write it themselves.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use kube_fake::FakeApiServer;
use serde_json::{Value, json};

const NS: &str = "sockmesh-system";

struct Cluster {
    api: FakeApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

async fn cluster() -> Cluster {
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    Cluster {
        api,
        _dir: dir,
        kubeconfig,
    }
}

/// Runs `mesh ARGS --kubeconfig K` off the runtime (the fake serves on it).
async fn mesh(kubeconfig: &Path, args: &[&str]) -> Output {
    let mut argv: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    argv.push("--kubeconfig".into());
    argv.push(kubeconfig.display().to_string());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(&argv)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error lines (not hints) of a failed run.
fn error_lines(o: &Output) -> Vec<String> {
    text(&o.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_creates_everything_a_rerun_changes_nothing_and_uninstall_removes_it() {
    let c = cluster().await;
    let o = mesh(&c.kubeconfig, &["install", "--no-wait"]).await;
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("DaemonSet sockmesh-system/mesh-node: created"),
        "{out}"
    );
    let ds = c.api.object("apps", "daemonsets", NS, "mesh-node").unwrap();
    assert_eq!(ds["metadata"]["managedFields"][0]["manager"], "sockmesh");
    for (group, plural, ns, name) in [
        ("", "namespaces", "", NS),
        ("", "serviceaccounts", NS, "mesh-proxy"),
        ("", "serviceaccounts", NS, "mesh-ca"),
        (
            "rbac.authorization.k8s.io",
            "clusterroles",
            "",
            "sockmesh-proxy",
        ),
        ("rbac.authorization.k8s.io", "roles", NS, "sockmesh-ca"),
        ("apps", "deployments", NS, "mesh-ca"),
        ("", "services", NS, "mesh-ca"),
        ("policy", "poddisruptionbudgets", NS, "mesh-ca"),
        ("networking.k8s.io", "networkpolicies", NS, "mesh-ca"),
        (
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
            "authorizationpolicies.security.sockmesh.io",
        ),
    ] {
        assert!(
            c.api.object(group, plural, ns, name).is_some(),
            "{plural} {ns}/{name} missing"
        );
    }

    // Again: nothing written at all.
    let rv = c.api.resource_version();
    let o = mesh(&c.kubeconfig, &["install", "--no-wait"]).await;
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.lines()
            .filter(|l| l.contains(": "))
            .filter(|l| !l.starts_with("applied"))
            .all(|l| l.ends_with(": unchanged")),
        "{out}"
    );
    assert!(out.contains("(0 created or changed"), "{out}");
    assert_eq!(c.api.resource_version(), rv, "a rerun wrote something");

    // A dry run after a change names the field and writes nothing.
    let o = mesh(&c.kubeconfig, &["install", "--dry-run", "--tag", "9.9.9"]).await;
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("DaemonSet sockmesh-system/mesh-node: would be changed: spec.template.spec.containers[0].image"),
        "{out}"
    );
    assert!(
        out.contains("Namespace sockmesh-system: unchanged"),
        "{out}"
    );
    assert_eq!(c.api.resource_version(), rv, "a dry run wrote something");

    // What the CA makes at run time goes too.
    c.api
        .create(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "sockmesh-ca-root", "namespace": NS}, "data": {}}))
        .unwrap();
    c.api
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "sockmesh-trust-bundle", "namespace": NS}, "data": {}}))
        .unwrap();
    let o = mesh(&c.kubeconfig, &["uninstall"]).await;
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("Secret sockmesh-system/sockmesh-ca-root: deleted"),
        "{out}"
    );
    assert!(
        c.api
            .object("apps", "daemonsets", NS, "mesh-node")
            .is_none()
    );
    assert!(c.api.object("", "namespaces", "", NS).is_none());
    assert!(
        c.api
            .object("", "secrets", NS, "sockmesh-ca-root")
            .is_none()
    );
    assert!(
        out.contains("ConfigMap sockmesh-system/sockmesh-trust-bundle: deleted"),
        "{out}"
    );
    assert!(
        c.api
            .object("", "configmaps", NS, "sockmesh-trust-bundle")
            .is_none()
    );
    let crd = "authorizationpolicies.security.sockmesh.io";
    assert!(
        c.api
            .object("apiextensions.k8s.io", "customresourcedefinitions", "", crd)
            .is_some(),
        "the CRD goes only with --crds"
    );
    let o = mesh(&c.kubeconfig, &["uninstall", "--crds"]).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        c.api
            .object("apiextensions.k8s.io", "customresourcedefinitions", "", crd)
            .is_none()
    );
}

fn set_status(api: &FakeApiServer, ready: i32) {
    api.patch(
        "apps",
        "deployments",
        NS,
        "mesh-ca",
        &json!({"status": {"replicas": 2, "readyReplicas": ready.min(2), "updatedReplicas": 2}}),
    )
    .unwrap();
    api.patch(
        "apps",
        "daemonsets",
        NS,
        "mesh-node",
        &json!({"status": {"desiredNumberScheduled": 2, "currentNumberScheduled": 2,
            "numberMisscheduled": 0, "numberReady": ready, "updatedNumberScheduled": 2}}),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_waits_for_the_ca_and_every_node_proxy_with_progress() {
    let c = cluster().await;
    let kc = c.kubeconfig.clone();
    let run = tokio::spawn(async move { mesh(&kc, &["install", "--timeout", "60"]).await });
    // The controllers' part: the status, in two steps.
    let start = Instant::now();
    while c
        .api
        .object("apps", "daemonsets", NS, "mesh-node")
        .is_none()
    {
        assert!(start.elapsed() < Duration::from_secs(30), "no DaemonSet");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    set_status(&c.api, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    set_status(&c.api, 2);
    let o = run.await.unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{}\n{err}", text(&o.stdout));
    assert!(err.contains("waiting for the rollout"), "{err}");
    assert!(err.contains("node proxies 1/2 ready"), "{err}");
    assert!(
        err.contains("CA 2/2 ready, node proxies 2/2 ready"),
        "{err}"
    );
    assert!(text(&o.stdout).contains("sockmesh is installed"));

    // A rollout that does not finish: exit 1, naming what is not ready.
    set_status(&c.api, 1);
    let o = mesh(&c.kubeconfig, &["install", "--timeout", "1"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let errs = error_lines(&o);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("node proxies 1/2 ready"), "{errs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_clear_line_and_exit_7() {
    // No kubeconfig.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let o = mesh(&missing, &["install"]).await;
    assert_eq!(o.status.code(), Some(7));
    let errs = error_lines(&o);
    assert_eq!(
        errs,
        [format!(
            "error: no kubeconfig: {} does not exist",
            missing.display()
        )]
    );

    // An API server that is not there.
    let kc = dir.path().join("kc");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    std::fs::write(
        &kc,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: http://127.0.0.1:{port}}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n"),
    )
    .unwrap();
    let o = mesh(&kc, &["install", "--request-timeout", "2"]).await;
    assert_eq!(o.status.code(), Some(7));
    let errs = error_lines(&o);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(&format!(
            "error: cannot reach the API server at http://127.0.0.1:{port}/"
        )),
        "{errs:?}"
    );

    // RBAC says no to the ClusterRoles: what got applied before is named.
    let c = cluster().await;
    c.api
        .deny("patch", "clusterroles.rbac.authorization.k8s.io");
    let o = mesh(&c.kubeconfig, &["install", "--no-wait"]).await;
    assert_eq!(o.status.code(), Some(7));
    let errs = error_lines(&o);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("ClusterRole sockmesh-proxy: the API server refused (403 Forbidden)"),
        "{errs:?}"
    );
    assert!(errs[0].contains("4 of "), "{errs:?}");
    assert!(
        errs[0].contains("`mesh uninstall` removes them"),
        "{errs:?}"
    );
    assert!(text(&o.stderr).contains("hint: mesh install needs cluster-admin rights"));

    // A CRD another tool installed, with another schema: not taken over.
    let c = cluster().await;
    let objects = mesh_cli::manifest::objects(&Default::default()).unwrap();
    let mut crd = objects.into_iter().find(|o| o.is_crd()).unwrap().value;
    crd["spec"]["scope"] = "Cluster".into();
    c.api.create(crd).unwrap();
    let o = mesh(&c.kubeconfig, &["install", "--no-wait"]).await;
    assert_eq!(o.status.code(), Some(7));
    let errs = error_lines(&o);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("CustomResourceDefinition authorizationpolicies.security.sockmesh.io is owned by another field manager"),
        "{errs:?}"
    );
    assert!(errs[0].contains("spec.scope"), "{errs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_node_without_a_ready_proxy_and_the_pod_without_status() {
    let c = cluster().await;
    let o = mesh(&c.kubeconfig, &["install", "--no-wait"]).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    set_status(&c.api, 2);
    for n in ["n1", "n2"] {
        c.api
            .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}))
            .unwrap();
    }
    c.api
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "mesh-node-a", "namespace": NS,
                "labels": {"app.kubernetes.io/name": "mesh-node", "app.kubernetes.io/part-of": "sockmesh"}},
            "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "p", "image": "x"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
        .unwrap();
    c.api
        .create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"sockmesh.io/mesh": "enabled"}}}))
        .unwrap();
    c.api
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop",
                "annotations": {"sockmesh.io/status": "{\"meshed\":true,\"identity\":\"spiffe://cluster.local/ns/shop/sa/default\",\"mode\":\"ebpf\"}"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
    c.api
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "cart", "namespace": "shop"},
            "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
    let o = mesh(&c.kubeconfig, &["check"]).await;
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", text(&o.stderr));
    assert!(out.contains("ok   CA"), "{out}");
    assert!(
        out.contains("node n1") && out.contains("proxy ready; redirection: ebpf (1 pods)"),
        "{out}"
    );
    assert!(
        out.contains("FAIL node n2") && out.contains("no node proxy"),
        "{out}"
    );
    assert!(
        out.contains("FAIL pod shop/cart") && out.contains("no sockmesh.io/status"),
        "{out}"
    );
    assert!(out.contains("ok   pod shop/web"), "{out}");

    let o = mesh(&c.kubeconfig, &["check", "-o", "json"]).await;
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["failed"], 2);
    let failed: Vec<_> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["check"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(failed, ["node n2", "pod shop/cart"]);
    assert!(v["checks"][0]["fix"].is_null());
}

/// `mesh check --pre` on fake cgroup and CNI trees: what the proxy would
/// attach to, for each kubelet driver and layout, and a failure with its fix.
#[test]
fn check_pre_says_which_cgroup_the_proxy_would_attach_to() {
    let run = |cg: &Path, cni: &Path| -> (Option<i32>, Value) {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(["check", "--pre", "-o", "json", "--cgroup-root"])
            .arg(cg)
            .arg("--cni-conf-dir")
            .arg(cni)
            .output()
            .unwrap();
        (o.status.code(), serde_json::from_slice(&o.stdout).unwrap())
    };
    let find = |v: &Value, name: &str| -> Value {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .cloned()
            .unwrap()
    };
    let t = tempfile::tempdir().unwrap();
    let cni = t.path().join("net.d");
    std::fs::create_dir_all(&cni).unwrap();
    std::fs::write(cni.join("10-calico.conflist"), "{}").unwrap();
    let mkcg = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
    };
    // systemd driver, unified layout.
    let unified = t.path().join("unified-root");
    mkcg(&unified);
    std::fs::write(unified.join("cgroup.controllers"), "cpu").unwrap();
    mkcg(&unified.join("kubepods.slice"));
    let (_, v) = run(&unified, &cni);
    let c = find(&v, "proxy cgroup");
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(
        c["detail"],
        format!(
            "would attach to {} (the kubelet's systemd driver; cgroup /kubepods.slice)",
            unified.join("kubepods.slice").display()
        )
    );
    assert_eq!(
        find(&v, "cgroup v2")["detail"],
        format!("{} (unified layout)", unified.display())
    );
    assert!(
        find(&v, "CNI conf dir")["detail"]
            .as_str()
            .unwrap()
            .ends_with("10-calico.conflist")
    );
    // cgroupfs driver, hybrid layout.
    let hybrid = t.path().join("hybrid-root");
    std::fs::create_dir_all(hybrid.join("memory")).unwrap();
    mkcg(&hybrid.join("unified"));
    mkcg(&hybrid.join("unified/kubepods"));
    let (_, v) = run(&hybrid, &cni);
    let c = find(&v, "proxy cgroup");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("unified/kubepods (the kubelet's cgroupfs driver"),
        "{c}"
    );
    // No kubelet: the check fails, says what to do, and --pre exits 6.
    let bare = t.path().join("bare");
    mkcg(&bare);
    std::fs::write(bare.join("cgroup.controllers"), "cpu").unwrap();
    let (code, v) = run(&bare, &t.path().join("no-cni"));
    assert_eq!(code, Some(6));
    assert_eq!(v["ok"], false);
    let c = find(&v, "proxy cgroup");
    assert_eq!(c["ok"], false);
    assert!(c["fix"].as_str().unwrap().contains("--proxy-cgroup"), "{c}");
    assert_eq!(find(&v, "CNI conf dir")["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_monitor_needs_the_operators_crd_and_says_so() {
    let c = cluster().await;
    let o = mesh(
        &c.kubeconfig,
        &["install", "--no-wait", "--service-monitor"],
    )
    .await;
    assert_eq!(o.status.code(), Some(7));
    let errs = error_lines(&o);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains(
            "ServiceMonitor sockmesh-system/mesh-node: the cluster has no ServiceMonitor type"
        ),
        "{errs:?}"
    );
    assert!(
        errs[0].contains("objects were applied before it"),
        "{errs:?}"
    );
    assert!(text(&o.stderr).contains("hint: install the Prometheus operator first"));
    // The operator's CRD (the part the fake reads).
    c.api
        .create(
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
                "versions": [{"name": "v1", "served": true, "storage": true}]}}),
        )
        .unwrap();
    let o = mesh(
        &c.kubeconfig,
        &["install", "--no-wait", "--service-monitor"],
    )
    .await;
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("ServiceMonitor sockmesh-system/mesh-node: created"),
        "{out}"
    );
    let sm = c
        .api
        .object("monitoring.coreos.com", "servicemonitors", NS, "mesh-node")
        .unwrap();
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-metrics");
    // Uninstall removes it even without --service-monitor.
    let o = mesh(&c.kubeconfig, &["uninstall"]).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        c.api
            .object("monitoring.coreos.com", "servicemonitors", NS, "mesh-node")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_the_status_annotation_the_node_proxies_wrote_and_counts_it() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, Patch, PatchParams};
    let c = cluster().await;
    let o = mesh(&c.kubeconfig, &["install", "--no-wait"]).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    for (ns, name, annotations) in [
        ("shop", "web", json!({"keep": "me"})),
        ("shop", "plain", json!({"keep": "me too"})),
        ("other", "db", json!({})),
    ] {
        c.api
            .create(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}}))
            .unwrap();
    }
    // What a node proxy does: server-side apply as sockmesh-node.
    let client = kube::Client::try_from(kube::Config::new(c.api.url().parse().unwrap())).unwrap();
    for (ns, name) in [("shop", "web"), ("other", "db")] {
        let status = r#"{"meshed":true,"identity":"spiffe://cluster.local/ns/shop/sa/default","mode":"ebpf"}"#;
        Api::<Pod>::namespaced(client.clone(), ns)
            .patch(
                name,
                &PatchParams::apply("sockmesh-node"),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns,
                        "annotations": {"sockmesh.io/status": status}}})),
            )
            .await
            .unwrap();
    }
    let annotations = |ns: &str, name: &str| {
        c.api.object("", "pods", ns, name).unwrap()["metadata"]["annotations"].clone()
    };
    assert!(annotations("shop", "web")["sockmesh.io/status"].is_string());

    let o = mesh(&c.kubeconfig, &["uninstall", "--dry-run"]).await;
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("sockmesh.io/status would be removed from 2 pods"),
        "{out}"
    );
    assert!(annotations("other", "db")["sockmesh.io/status"].is_string());

    let o = mesh(&c.kubeconfig, &["uninstall"]).await;
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("sockmesh.io/status removed from 2 pods"),
        "{out}"
    );
    assert!(
        err.contains("2 pods carry sockmesh.io/status: removing it from each"),
        "{err}"
    );
    assert!(
        err.contains("sockmesh.io/status removed from 2/2 pods"),
        "{err}"
    );
    assert_eq!(annotations("shop", "web"), json!({"keep": "me"}));
    assert_eq!(annotations("shop", "plain"), json!({"keep": "me too"}));
    assert!(
        annotations("other", "db")
            .get("sockmesh.io/status")
            .is_none(),
        "{}",
        annotations("other", "db")
    );
    assert_eq!(
        c.api.requests("patch", "pods"),
        2 + 2,
        "2 applies, 2 removals"
    );

    // Nothing left: a second uninstall finds no pod to clean.
    let o = mesh(&c.kubeconfig, &["uninstall"]).await;
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("sockmesh.io/status removed from 0 pods"),
        "{out}"
    );
}
