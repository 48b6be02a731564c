//! The Kubernetes path end to end, on the local mesh's real pod netns:
//! `mesh up --kubernetes` (kube-fake as the API server, `mesh-ca cluster`
//! with TokenReview, proxies on the Kubernetes source, every pod enrolled
//! through mesh-cni ADD by the harness playing the runtime). Root; each
//! test's mesh is removed on drop, even when it fails.
//!
//! `cargo test -p sockmesh-tests --features privileged --test kube`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_local::Topology;
use mesh_local::control::ControlOptions;
use mesh_local::kube::{Hook, KubeOptions};
use serde_json::Value;
use sockmesh_tests::e2e::{TestMesh, attempt, serve, wait_held, wait_until, workload_enrolled};

const MESH: &str = "sockmesh.io/mesh";

/// The demo topology plus default/legacy, opted out by its annotation.
fn topology() -> Topology {
    let mut t = Topology::demo();
    let mut legacy = t.pods[0].clone();
    legacy.name = "legacy".into();
    legacy.service_account = "legacy".into();
    legacy.labels = [("app".to_owned(), "legacy".to_owned())].into();
    legacy.annotations = [(MESH.to_owned(), "disabled".to_owned())].into();
    t.pods.push(legacy);
    t
}

fn pod(ns: &str, name: &str, node: &str, sa: &str) -> mesh_local::Pod {
    mesh_local::Pod {
        namespace: ns.into(),
        name: name.into(),
        uid: None,
        node: node.into(),
        service_account: sa.into(),
        ips: Vec::new(),
        labels: [("app".to_owned(), name.to_owned())].into(),
        annotations: BTreeMap::new(),
    }
}

/// Makes `p` as the runtime does, retrying ADD as kubelet does while the
/// node proxy has not seen the new Pod in its watch yet.
fn start_pod(m: &mut TestMesh, p: &mesh_local::Pod) -> Result<()> {
    let key = format!("{}/{}", p.namespace, p.name);
    if let Err(e) = m.mesh.add_pod(p, true)? {
        ensure!(e["code"] == 11, "CNI ADD of {key}: {e}");
        m.mesh.cni_add_retrying(&key, Duration::from_secs(30))?;
    }
    Ok(())
}

/// Whether `pod` is enrolled by `node`'s proxy (`None`: not listed).
fn enrolled(m: &TestMesh, node: &str, pod: &str) -> Result<Option<bool>> {
    workload_enrolled(m, node, pod)
}

fn wait_enrolled(m: &TestMesh, node: &str, pod: &str, want: bool) -> Result<()> {
    wait_until(
        &format!("{pod} enrolled={want} on {node}"),
        Duration::from_secs(30),
        || Ok(enrolled(m, node, pod)?.unwrap_or(false) == want),
    )
    .with_context(|| {
        format!(
            "proxy-{node} log:\n{}",
            tail(&m.log(&format!("proxy-{node}")))
        )
    })
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The pod's `sockmesh.io/status` once `ok` accepts it.
fn wait_status(m: &TestMesh, pod: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(
        &format!("{pod}'s sockmesh.io/status"),
        Duration::from_secs(30),
        || {
            last = m.mesh.pod_status_annotation(pod)?.unwrap_or(Value::Null);
            Ok(ok(&last))
        },
    )
    .with_context(|| format!("last status of {pod}: {last}"))?;
    Ok(last)
}

/// One connection from `from` to web's `port`: through the mesh (the
/// access log of `from`'s node says mutual TLS) or refused.
fn mtls_to_web(m: &TestMesh, from: &str, node: &str) -> Result<()> {
    let to = format!("{}:8080", m.ip("default/web")?);
    let mut s = serve(m, "default/web", 8080, 1, 1000)?;
    let got = attempt(m, from, &to)?;
    ensure!(got == Ok(1000), "{from} -> {to}: {got:?}");
    let _ = s.event("accepted");
    let log = format!("proxy-{node}");
    wait_until(
        &format!("{from}'s mTLS access-log line"),
        Duration::from_secs(10),
        || {
            Ok(m.log(&log)
                .lines()
                .any(|l| l.contains(from) && l.contains("outbound") && l.contains("mutual_tls")))
        },
    )
    .with_context(|| format!("{log}:\n{}", tail(&m.log(&log))))
}

/// A plaintext connection from an unmeshed `from` to the STRICT web pod
/// is refused by web's proxy.
fn refused_to_web(m: &TestMesh, from: &str) -> Result<()> {
    let to = format!("{}:8080", m.ip("default/web")?);
    let got = attempt(m, from, &to)?;
    ensure!(
        got.is_err(),
        "{from} (unmeshed) -> STRICT web got through: {got:?}"
    );
    Ok(())
}

fn requests(m: &TestMesh, verb: &str, resource: &str) -> Result<u64> {
    let v = m.mesh.kube_hook(&Hook::Requests {
        verb: verb.into(),
        resource: resource.into(),
    })?;
    v["count"].as_u64().context("count")
}

/// The pods `node`'s proxy lists, by name, with how many times each.
fn listed(m: &TestMesh, node: &str) -> Result<BTreeMap<String, usize>> {
    let (_, body) = m.mesh.admin_get(node, "/workloads")?;
    let v: Value = serde_json::from_str(&body)?;
    let mut out = BTreeMap::new();
    for p in v["pods"].as_array().context("pods")? {
        *out.entry(p["pod"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    Ok(out)
}

#[test]
fn pods_follow_the_api_through_cni_annotations_labels_and_watch_failures() -> Result<()> {
    let mut m = TestMesh::up_kube(
        "ku",
        &topology(),
        ControlOptions::default(),
        &KubeOptions::default(),
    )?;

    // Enrolled through CNI from the API's pods; legacy stays out by choice
    // and its status says why; web's status was applied by SSA.
    for (node, pod) in [
        ("node-a", "default/client"),
        ("node-b", "default/web"),
        ("node-b", "other/iperf"),
    ] {
        ensure!(
            enrolled(&m, node, pod)? == Some(true),
            "{pod} not enrolled on {node}"
        );
    }
    ensure!(enrolled(&m, "node-a", "default/legacy")? != Some(true));
    let st = wait_status(&m, "default/legacy", |v| v["meshed"] == false)?;
    ensure!(st["reason"] == "pod-disabled", "legacy: {st}");
    let web = wait_status(&m, "default/web", |v| v["meshed"] == true)?;
    ensure!(
        web["identity"] == "spiffe://cluster.local/ns/default/sa/web",
        "web: {web}"
    );
    let obj = m
        .mesh
        .kube_get(&m.mesh.pod_path("default/web")?)?
        .context("web's Pod")?;
    let managers: Vec<(String, String)> = obj["metadata"]["managedFields"]
        .as_array()
        .context("managedFields")?
        .iter()
        .map(|f| {
            (
                f["manager"].as_str().unwrap_or("").to_owned(),
                f["operation"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    ensure!(
        managers.contains(&("sockmesh-node".into(), "Apply".into())),
        "no server-side apply by sockmesh-node: {managers:?}"
    );
    // Not re-applied while nothing changes.
    let patches = requests(&m, "patch", "pods")?;
    std::thread::sleep(Duration::from_secs(3));
    let again = requests(&m, "patch", "pods")?;
    ensure!(
        again == patches,
        "status re-applied with nothing changed: {patches} -> {again} pod patches"
    );
    mtls_to_web(&m, "default/client", "node-a")?;

    // A pod created in the API and started by the runtime: enrolled when
    // ADD returns, its first connection over mTLS.
    start_pod(&mut m, &pod("default", "new-1", "node-a", "client"))?;
    ensure!(
        enrolled(&m, "node-a", "default/new-1")? == Some(true),
        "ADD returned before new-1 was enrolled"
    );
    mtls_to_web(&m, "default/new-1", "node-a")?;

    // The annotation flipped on the live pod: out, refused by STRICT web;
    // back in, mTLS again. No restart of the pod.
    m.mesh
        .set_pod_annotation("default/new-1", MESH, Some("disabled"))?;
    wait_enrolled(&m, "node-a", "default/new-1", false)?;
    wait_status(&m, "default/new-1", |v| v["reason"] == "pod-disabled")?;
    refused_to_web(&m, "default/new-1")?;
    m.mesh
        .set_pod_annotation("default/new-1", MESH, Some("enabled"))?;
    wait_enrolled(&m, "node-a", "default/new-1", true)?;
    mtls_to_web(&m, "default/new-1", "node-a")?;

    // The namespace label flipped: other/iperf leaves and comes back.
    m.mesh
        .set_namespace_label("other", MESH, Some("disabled"))?;
    wait_enrolled(&m, "node-b", "other/iperf", false)?;
    wait_status(&m, "other/iperf", |v| v["reason"] == "not-opted-in")?;
    m.mesh.set_namespace_label("other", MESH, Some("enabled"))?;
    wait_enrolled(&m, "node-b", "other/iperf", true)?;

    // Watches cut mid-stream, then 410 Gone on the next ones (more than
    // there are watchers, so every watcher of both proxies and the CA gets
    // one): the proxies relist; a pod added and one deleted meanwhile are
    // seen once each.
    let lists = requests(&m, "list", "pods")?;
    m.mesh.kube_hook(&Hook::ExpireWatches { n: 40 })?;
    m.mesh.kube_hook(&Hook::CutWatches)?;
    m.mesh.delete_pod("default/new-1")?;
    start_pod(&mut m, &pod("default", "new-2", "node-b", "web"))?;
    wait_until(
        "the proxies to relist pods",
        Duration::from_secs(30),
        || Ok(requests(&m, "list", "pods")? > lists),
    )?;
    wait_until(
        "node-a's proxy to drop new-1",
        Duration::from_secs(30),
        || Ok(enrolled(&m, "node-a", "default/new-1")?.is_none()),
    )?;
    wait_enrolled(&m, "node-b", "default/new-2", true)?;
    for node in ["node-a", "node-b"] {
        let l = listed(&m, node)?;
        ensure!(
            l.values().all(|&n| n == 1),
            "{node} lists a pod twice: {l:?}"
        );
    }
    let want_a: Vec<&str> = vec!["default/client", "default/legacy", "default/web-2"];
    let a: Vec<String> = listed(&m, "node-a")?.into_keys().collect();
    for w in &want_a {
        ensure!(a.iter().any(|p| p == w), "node-a lost {w}: {a:?}");
    }
    ensure!(
        !a.iter().any(|p| p == "default/new-1"),
        "node-a kept deleted new-1"
    );
    // And the data path still works after the relist.
    mtls_to_web(&m, "default/client", "node-a")?;

    // A bad object (a policy with a field the strict parser does not
    // know) is reported by name and skipped; the watchers and the data
    // path carry on.
    m.mesh.kube_create(&serde_json::json!({
        "apiVersion": "security.sockmesh.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "typo-policy", "namespace": "default"},
        "spec": {"action": "DENY", "rulez": []},
    }))?;
    for node in ["node-a", "node-b"] {
        let log = format!("proxy-{node}");
        wait_until(
            &format!("{node}'s proxy to report the bad policy"),
            Duration::from_secs(20),
            || {
                Ok(m.log(&log)
                    .lines()
                    .any(|l| l.contains("kubernetes object skipped") && l.contains("typo-policy")))
            },
        )
        .with_context(|| format!("{log}:\n{}", tail(&m.log(&log))))?;
    }
    mtls_to_web(&m, "default/web-2", "node-a")?;
    Ok(())
}

/// GET of `node`'s readiness port: (status, body).
fn readiness(m: &TestMesh, node: &str) -> Result<(u16, String)> {
    let n = m.mesh.node(node)?;
    Ok(mesh_local::control::http(
        &n.netns_path(),
        "GET",
        SocketAddr::from(([127, 0, 0, 1], mesh_local::control::READY_PORT)),
        "/healthz/ready",
        Duration::from_secs(3),
    )?)
}

#[test]
fn with_the_api_server_gone_for_30s_traffic_flows_nothing_is_unenrolled_and_readiness_says_stale()
-> Result<()> {
    let m = TestMesh::up_kube(
        "ko",
        &topology(),
        ControlOptions::default(),
        &KubeOptions {
            api_stale_seconds: 5,
            ..KubeOptions::default()
        },
    )?;
    mtls_to_web(&m, "default/client", "node-a")?;
    let before_a = listed(&m, "node-a")?;
    let before_b = listed(&m, "node-b")?;
    let gone = Duration::from_secs(30);
    m.mesh.kube_hook(&Hook::GoAway {
        seconds: gone.as_secs(),
    })?;
    let start = Instant::now();
    let mut stale_seen = false;
    let mut rounds = 0;
    while start.elapsed() < gone - Duration::from_secs(2) {
        ensure!(
            !matches!(
                m.mesh.kube_request("GET", "/version", None, None),
                Ok((200, _))
            ),
            "the API server answered while away"
        );
        ensure!(
            listed(&m, "node-a")? == before_a,
            "node-a changed while the API was away"
        );
        ensure!(
            listed(&m, "node-b")? == before_b,
            "node-b changed while the API was away"
        );
        for (node, pod) in [("node-a", "default/client"), ("node-b", "default/web")] {
            ensure!(
                enrolled(&m, node, pod)? == Some(true),
                "{pod} unenrolled while the API was away"
            );
        }
        let to = format!("{}:8080", m.ip("default/web")?);
        let mut s = serve(&m, "default/web", 8080, 1, 1000)?;
        let got = attempt(&m, "default/client", &to)?;
        ensure!(
            got == Ok(1000),
            "client -> web while the API was away: {got:?}"
        );
        let _ = s.event("accepted");
        let (code, body) = readiness(&m, "node-a")?;
        if start.elapsed() > Duration::from_secs(12) {
            ensure!(
                code != 200 && body.to_lowercase().contains("stale"),
                "readiness {}s into the outage: {code} {body}",
                start.elapsed().as_secs()
            );
            stale_seen = true;
        }
        rounds += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    ensure!(
        stale_seen && rounds > 5,
        "the outage was not observed ({rounds} rounds)"
    );
    // Back: ready again, and new objects are seen.
    wait_until(
        "node-a's proxy to be ready again",
        Duration::from_secs(60),
        || Ok(readiness(&m, "node-a")?.0 == 200),
    )?;
    mtls_to_web(&m, "default/client", "node-a")?;
    Ok(())
}

#[test]
fn tokens_are_checked_by_token_review_and_the_runtime_fails_closed_and_adopts_running_pods()
-> Result<()> {
    let mut m = TestMesh::up_kube(
        "kt",
        &topology(),
        ControlOptions {
            restart_proxies: true,
            ..ControlOptions::default()
        },
        &KubeOptions::default(),
    )?;

    // Node A's valid token on node B: the CA refuses B's pod (its
    // service account has no pod on node A), end to end.
    let token_b = m.mesh.kube_token_file("node-b");
    let good_b = std::fs::read(&token_b)?;
    let a_token = std::fs::read(m.mesh.kube_token_file("node-a"))?;
    let bad_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("only-b-1", a_token, "node-a"),
        (
            "only-b-2",
            b"forged-token-0000".to_vec(),
            "not authenticated",
        ),
        (
            "only-b-3",
            {
                let v = m.mesh.kube_hook(&Hook::MintToken {
                    namespace: mesh_local::kube::NAMESPACE.into(),
                    service_account: mesh_local::kube::PROXY_SERVICE_ACCOUNT.into(),
                    audiences: vec!["kubernetes".into()],
                    pod: None,
                    node: None,
                    expires_in: 3600,
                })?;
                v["token"].as_str().unwrap_or("").as_bytes().to_vec()
            },
            "audience",
        ),
        (
            "only-b-4",
            {
                let v = m.mesh.kube_hook(&Hook::MintToken {
                    namespace: mesh_local::kube::NAMESPACE.into(),
                    service_account: mesh_local::kube::PROXY_SERVICE_ACCOUNT.into(),
                    audiences: vec![mesh_local::kube::CA_AUDIENCE.into()],
                    pod: None,
                    node: None,
                    expires_in: -60,
                })?;
                v["token"].as_str().unwrap_or("").as_bytes().to_vec()
            },
            "expired",
        ),
    ];
    for (name, token, cause) in bad_cases {
        std::fs::write(&token_b, &token)?;
        let refusals = m.log("ca").matches("sign request refused").count();
        let key = format!("default/{name}");
        // The runtime's ADD cannot succeed without a certificate; the
        // pod must not be meshed.
        let _ = m
            .mesh
            .add_pod(&pod("default", name, "node-b", name), true)?;
        wait_until(
            &format!("the CA to refuse {name} ({cause})"),
            Duration::from_secs(30),
            || {
                let log = m.log("ca");
                Ok(log.matches("sign request refused").count() > refusals
                    && log
                        .lines()
                        .filter(|l| l.contains("sign request refused"))
                        .any(|l| l.contains(cause)))
            },
        )
        .with_context(|| format!("CA log:\n{}", tail(&m.log("ca"))))?;
        let certs = m.mesh.admin_get("node-b", "/certs")?.1;
        let id = format!("spiffe://cluster.local/ns/default/sa/{name}");
        let v: Value = serde_json::from_str(&certs)?;
        ensure!(
            !v.as_array()
                .context("certs")?
                .iter()
                .any(|c| c["identity"] == id.as_str() && c["valid"] == true),
            "{name} got a certificate with a bad token ({cause})"
        );
        // The wire answer is opaque: the cause is only in the CA's log.
        ensure!(
            !m.log("proxy-node-b").contains(cause) || cause == "node-a",
            "the refusal's cause reached the proxy ({cause})"
        );
        m.mesh.delete_pod(&key)?;
    }
    // The right token: a new pod of a new account on B is meshed.
    std::fs::write(&token_b, &good_b)?;
    start_pod(&mut m, &pod("default", "only-b-5", "node-b", "only-b-5"))?;
    wait_enrolled(&m, "node-b", "default/only-b-5", true)?;

    // The runtime with node-a's proxy down: ADD fails closed (code 11),
    // and succeeds once the proxy is back; a pod that was already running
    // (never announced through CNI) is found by the proxy's /proc scan.
    m.mesh.hold_proxy("node-a")?;
    let pid = m.mesh.proxy_pid("node-a").context("node-a's proxy")?;
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    wait_held(&m, "node-a")?;
    let refused = m
        .mesh
        .add_pod(&pod("default", "late", "node-a", "client"), true)?;
    match refused {
        Ok(r) => bail!("ADD with node-a's proxy down succeeded: {r}"),
        Err(e) => ensure!(e["code"] == 11, "not 'try again later': {e}"),
    }
    let _ = m
        .mesh
        .add_pod(&pod("default", "early", "node-a", "client"), false)?;
    let mut sleeper = m
        .mesh
        .pod_command("default/early", &["sleep", "300"])?
        .spawn()?;
    let r = (|| -> Result<()> {
        m.mesh.start_proxy("node-a", &m.bins, &m.opts)?;
        let retried = m
            .mesh
            .cni_add_retrying("default/late", Duration::from_secs(30))?;
        ensure!(!retried.is_null(), "retried ADD: {retried}");
        let now = enrolled(&m, "node-a", "default/late")?;
        ensure!(
            now == Some(true),
            "late not enrolled after its ADD returned ({now:?}); proxy-node-a log:\n{}",
            tail(&m.log("proxy-node-a"))
        );
        wait_enrolled(&m, "node-a", "default/early", true)?;
        mtls_to_web(&m, "default/late", "node-a")?;
        mtls_to_web(&m, "default/early", "node-a")
    })();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    r
}

/// `mesh` itself, with a deadline: its output.
fn mesh_cli(name: &str, args: &[&str]) -> Result<std::process::Output> {
    let bin = sockmesh_tests::e2e::probe().with_file_name("mesh");
    ensure!(
        bin.is_file(),
        "{} is not built: cargo build --bins",
        bin.display()
    );
    let mut child = std::process::Command::new(&bin)
        .arg("--name")
        .arg(name)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let end = Instant::now() + Duration::from_secs(180);
    while child.try_wait()?.is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            bail!("`mesh {}` did not finish within 180 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// Downs the mesh on drop, even when the test fails.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = mesh_local::down(&self.0, &mesh_local::Options::default());
    }
}

#[test]
fn mesh_up_kubernetes_serves_the_demo_and_status_shows_each_pods_status_annotation() -> Result<()> {
    sockmesh_tests::require_privileges();
    let name = format!("kc{}", std::process::id() % 100_000);
    let _ = mesh_local::down(&name, &mesh_local::Options::default());
    let _down = Down(name.clone());
    let up = mesh_cli(&name, &["up", "--kubernetes"])?;
    let text = String::from_utf8_lossy(&up.stdout);
    ensure!(
        up.status.success() && text.contains("Kubernetes API server") && text.contains("CNI ADD"),
        "mesh up --kubernetes: {}\n{text}\n{}",
        up.status,
        String::from_utf8_lossy(&up.stderr)
    );
    let curl = mesh_cli(
        &name,
        &[
            "exec",
            "default/client",
            "--",
            "curl",
            "-sS",
            "-m",
            "10",
            "http://web:8080/",
        ],
    )?;
    ensure!(
        String::from_utf8_lossy(&curl.stdout).contains("hello from default/web"),
        "curl through the mesh: {curl:?}"
    );
    // The demo's deny policy, read from the API, refuses other -> web.
    let denied = mesh_cli(
        &name,
        &[
            "exec",
            "other/iperf",
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            "http://web.default:8080/",
        ],
    )?;
    ensure!(
        !denied.status.success(),
        "other/iperf reached web: {denied:?}"
    );

    // Status: every pod's annotation as its proxy wrote it; legacy's
    // opt-out is a choice (exit 0, no problem).
    let mut st = Value::Null;
    wait_until(
        "mesh status to show every pod's annotation",
        Duration::from_secs(30),
        || {
            let o = mesh_cli(&name, &["status", "-o", "json"])?;
            st = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            Ok(o.status.success()
                && st["pods"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().all(|p| p["status_annotation"].is_object())))
        },
    )
    .with_context(|| format!("last status: {st:#}"))?;
    ensure!(st["kubernetes"]["reachable"] == true, "{st:#}");
    ensure!(
        st["problems"].as_array().is_some_and(Vec::is_empty),
        "{st:#}"
    );
    let pods = st["pods"].as_array().context("pods")?;
    let by = |k: &str| {
        pods.iter()
            .find(|p| p["pod"] == k)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let legacy = by("default/legacy");
    ensure!(
        legacy["opted_out"] == "pod-disabled"
            && legacy["status_annotation"]["reason"] == "pod-disabled",
        "legacy: {legacy:#}"
    );
    let web = by("default/web");
    ensure!(
        web["meshed"] == true && web["status_annotation"]["meshed"] == true,
        "web: {web:#}"
    );
    let table = mesh_cli(&name, &["status"])?;
    let table = String::from_utf8_lossy(&table.stdout);
    ensure!(
        table.contains("SOCKMESH.IO/STATUS") && table.contains("no (pod-disabled)"),
        "status:\n{table}"
    );
    let down = mesh_cli(&name, &["down"])?;
    ensure!(down.status.success(), "mesh down: {down:?}");
    ensure!(
        !mesh_local::Options::default().state_dir(&name).exists(),
        "mesh down left the state directory"
    );
    Ok(())
}
