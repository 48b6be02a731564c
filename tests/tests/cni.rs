//! mesh-cni with the real node proxy: the local mesh's node-a serves the
//! CNI socket (`mesh-proxy --cni-socket`); the test plays the container
//! runtime inside node-a's netns, running Debian's ptp + host-local and
//! then mesh-cni by the exec protocol, for a pod the registry knows
//! without a netns (as in Kubernetes). The pod's first connect after ADD
//! must go through the mesh. Root; the pod's netns and cgroup are the
//! test's, named `sockmesh*`, removed on drop.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_local::control::ControlOptions;
use serde_json::{Value, json};
use sockmesh_tests::e2e::{TestMesh, probe, serve, wait_until, write_registry};

const PLUGINS: &str = "/usr/lib/cni";
const UID: &str = "6c1d2e3f-0000-4000-8000-00000000c0c0";

/// A pod made the way a runtime makes one: a netns and a cgroup whose path
/// carries the pod UID (as kubelet's do). Both go on drop.
struct RuntimePod {
    netns: String,
    cgroup: PathBuf,
}

impl RuntimePod {
    fn new(tag: &str, pods_cgroup: &Path, uid: &str) -> Result<RuntimePod> {
        let netns = format!("sockmesh-cni{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        ensure!(
            Command::new("ip")
                .args(["netns", "add", &netns])
                .status()?
                .success(),
            "ip netns add {netns}"
        );
        let cgroup = pods_cgroup.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)?;
        Ok(RuntimePod { netns, cgroup })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// `argv` in the pod's cgroup and netns (the local mesh's way).
    fn command(&self, argv: &[String]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(
                r#"echo $$ > "$1" || exit 125; ns="$2"; shift 2; exec nsenter --net="$ns" -- "$@""#,
            )
            .arg("sockmesh-enter")
            .arg(self.cgroup.join("cgroup.procs"))
            .arg(self.path())
            .args(argv);
        c
    }
}

impl Drop for RuntimePod {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.cgroup).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn mesh_cni() -> PathBuf {
    sockmesh_tests::e2e::probe().with_file_name("mesh-cni")
}

/// The runtime: every plugin of `list` in order (DEL in reverse) inside
/// the node netns, each given the previous result.
fn chain(
    node_netns: &Path,
    list: &Value,
    env: &BTreeMap<&str, String>,
    cached: Option<&Value>,
) -> Result<std::result::Result<Value, Value>> {
    let cmd = env["CNI_COMMAND"].clone();
    let mut plugins = list["plugins"].as_array().context("plugins")?.clone();
    if cmd == "DEL" {
        plugins.reverse();
    }
    let mut prev = cached.cloned();
    for p in plugins {
        let mut conf = p.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(pr) = &prev {
            conf["prevResult"] = pr.clone();
        }
        let ty = p["type"].as_str().context("type")?;
        let bin = if ty == "mesh-cni" {
            mesh_cni()
        } else {
            Path::new(PLUGINS).join(ty)
        };
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", node_netns.display()))
            .arg("--")
            .arg(&bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_PATH", PLUGINS)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", bin.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.to_string().as_bytes())?;
        let start = Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                bail!("{ty} {cmd} did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let o = child.wait_with_output()?;
        let out: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if !o.status.success() {
            return Ok(Err(out));
        }
        if cmd == "ADD" {
            prev = Some(out);
        }
    }
    Ok(Ok(prev.unwrap_or(Value::Null)))
}

fn pod_env(cmd: &str, netns: &Path) -> BTreeMap<&'static str, String> {
    pod_env_of(cmd, netns, "cni-app", UID)
}

fn pod_env_of(cmd: &str, netns: &Path, name: &str, uid: &str) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("CNI_COMMAND", cmd.to_owned()),
        ("CNI_CONTAINERID", format!("sandbox-{name}")),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".to_owned()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID={uid}"
            ),
        ),
    ])
}

/// mesh-cni alone, as the runtime runs it: its exit and output.
fn mesh_cni_output(env: &BTreeMap<&str, String>, conf: &Value) -> Result<std::process::Output> {
    let mut child = Command::new(mesh_cni())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// mesh-cni alone: (success, stdout JSON).
fn mesh_cni_exec(env: &BTreeMap<&str, String>, conf: &Value) -> Result<(bool, Value)> {
    let o = mesh_cni_output(env, conf)?;
    Ok((
        o.status.success(),
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
    ))
}

/// STATUS or GC (CNI 1.1, no container) to `socket`.
fn mesh_cni_1_1(cmd: &str, socket: &Path, extra: Value) -> Result<(bool, Value)> {
    let mut conf = json!({"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "mesh-cni",
                          "socket": socket});
    if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    mesh_cni_exec(&BTreeMap::from([("CNI_COMMAND", cmd.to_owned())]), &conf)
}

fn enrolled(m: &TestMesh, node: &str, pod: &str) -> Result<Option<bool>> {
    let (_, body) = m.mesh.admin_get(node, "/workloads")?;
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pod"] == pod))
        .and_then(|p| p["enrolled"].as_bool()))
}

#[test]
fn a_pod_added_through_cni_is_captured_before_its_first_connect() -> Result<()> {
    ensure!(
        Path::new(PLUGINS).join("ptp").exists(),
        "{PLUGINS}/ptp missing: apt-get install containernetworking-plugins (./x setup does)"
    );
    ensure!(
        mesh_cni().exists(),
        "mesh-cni is not built: cargo build --bins"
    );
    let m = TestMesh::up(
        "cn",
        ControlOptions {
            cni_sockets: true,
            ..ControlOptions::default()
        },
    )?;
    let node = m.mesh.node("node-a")?.clone();
    // The registry knows the pod, not its netns (the runtime has not made
    // it yet), as the Kubernetes source does.
    let mut doc = m.mesh.registry_document(None);
    doc["pods"].as_array_mut().context("pods")?.push(json!({
        "namespace": "default", "name": "cni-app", "uid": UID, "node": "node-a",
        "service_account": "client", "ips": [], "labels": {"app": "cni-app"},
    }));
    write_registry(&m, &doc)?;
    wait_until(
        "node-a's proxy to know default/cni-app",
        Duration::from_secs(20),
        || Ok(enrolled(&m, "node-a", "default/cni-app")? == Some(false)),
    )?;

    let pod = RuntimePod::new("app", &node.pods_cgroup, UID)?;
    // Under the mesh's state dir: `down` removes it.
    let dir = m.mesh.state_dir().join("cni-test");
    std::fs::create_dir_all(&dir)?;
    // Addresses from the top of node-a's pod CIDR that no mesh pod has.
    let used: Vec<String> = m
        .mesh
        .state()
        .pods
        .iter()
        .map(|p| p.ip.to_string())
        .collect();
    let base = node.gateway.octets();
    let free = |last: u8| format!("{}.{}.{}.{last}", base[0], base[1], base[2]);
    ensure!(
        (230..=250).all(|k| !used.contains(&free(k))),
        "a mesh pod has an address in {}-{}",
        free(230),
        free(250)
    );
    let list = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [
            {"type": "ptp", "ipMasq": false, "ipam": {
                "type": "host-local", "dataDir": dir.as_path().join("ipam"),
                "ranges": [[{"subnet": node.pod_cidr, "rangeStart": free(230),
                             "rangeEnd": free(250), "gateway": node.gateway.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "mesh-cni", "socket": m.mesh.cni_socket("node-a"),
             "logFile": dir.as_path().join("mesh-cni.log"), "timeoutSeconds": 30}
        ]
    });
    // Bad input reaches nothing: a netns that does not exist (4), no
    // prevResult (7); the pod stays unenrolled.
    let mesh_conf = {
        let mut c = list["plugins"][1].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        c["name"] = list["name"].clone();
        c
    };
    let mut gone = pod_env("ADD", &pod.path());
    gone.insert("CNI_NETNS", "/run/netns/sockmesh-no-such-netns".into());
    let mut with_prev = mesh_conf.clone();
    with_prev["prevResult"] =
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.77.1.240/24"}]});
    let (ok, e) = mesh_cni_exec(&gone, &with_prev)?;
    ensure!(!ok && e["code"] == 4, "missing netns: {e}");
    let (ok, e) = mesh_cni_exec(&pod_env("ADD", &pod.path()), &mesh_conf)?;
    ensure!(!ok && e["code"] == 7, "no prevResult: {e}");
    ensure!(
        enrolled(&m, "node-a", "default/cni-app")? == Some(false),
        "bad input enrolled the pod"
    );

    // As containerd does, the loopback network first (the pod's lo up:
    // the proxy's in-pod listeners live on it).
    let lo =
        json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]});
    let mut lo_env = pod_env("ADD", &pod.path());
    lo_env.insert("CNI_IFNAME", "lo".into());
    if let Err(e) = chain(&node.netns_path(), &lo, &lo_env, None)? {
        bail!("loopback ADD: {e}");
    }
    let add = chain(
        &node.netns_path(),
        &list,
        &pod_env("ADD", &pod.path()),
        None,
    )?;
    let result = match add {
        Ok(r) => r,
        Err(e) => bail!(
            "ADD failed: {e}\npod netns: {}\nmesh-cni log:\n{}\nproxy log:\n{}",
            String::from_utf8_lossy(
                &Command::new("ip")
                    .args(["-n", &pod.netns, "addr"])
                    .output()?
                    .stdout
            ),
            std::fs::read_to_string(dir.as_path().join("mesh-cni.log")).unwrap_or_default(),
            m.log("proxy-node-a")
        ),
    };
    let ip = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("no address in the result")?
        .to_owned();
    ensure!(
        ip.parse::<std::net::Ipv4Addr>()?.octets()[3] >= 230,
        "address {ip} is not from the range"
    );
    // ADD returned: the pod is enrolled now, not eventually.
    ensure!(
        enrolled(&m, "node-a", "default/cni-app")? == Some(true),
        "ADD returned before the pod was enrolled"
    );
    let check = chain(
        &node.netns_path(),
        &list,
        &pod_env("CHECK", &pod.path()),
        Some(&result),
    )?;
    ensure!(check.is_ok(), "CHECK: {check:?}");

    // Its very first connect goes through the mesh.
    let web = m.ip("default/web")?;
    let s = serve(&m, "default/web", 8080, 1, 1000)?;
    let argv: Vec<String> = [
        probe().display().to_string(),
        "--strict-eagain".into(),
        "connect".into(),
        "--to".into(),
        format!("{web}:8080"),
        "--send".into(),
        "1000".into(),
        "--seed".into(),
        "3".into(),
    ]
    .into();
    let out = pod.command(&argv).output()?;
    ensure!(
        out.status.success(),
        "the pod's connect failed: {}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log("proxy-node-a")
    );
    let _ = s.wait();
    wait_until(
        "node-a's access log line for cni-app",
        Duration::from_secs(10),
        || {
            Ok(m.log("proxy-node-a").lines().any(|l| {
                l.contains("default/cni-app") && l.contains("outbound") && l.contains("mutual_tls")
            }))
        },
    )
    .with_context(|| format!("proxy-node-a log:\n{}", m.log("proxy-node-a")))?;

    // GC listing the attachment keeps it.
    let socket = m.mesh.cni_socket("node-a");
    let (ok, e) = mesh_cni_1_1(
        "GC",
        &socket,
        json!({"cni.dev/valid-attachments": [{"containerID": "sandbox-cni-app", "ifname": "eth0"}]}),
    )?;
    ensure!(ok, "GC: {e}");
    ensure!(
        enrolled(&m, "node-a", "default/cni-app")? == Some(true),
        "GC released a listed attachment"
    );
    let (ok, e) = mesh_cni_1_1("STATUS", &socket, json!({}))?;
    ensure!(ok, "STATUS with the proxy up: {e}");

    // The proxy crashes and its supervisor restarts it: what CNI told the
    // old one is gone, and the pod (a process in a cgroup that carries its
    // UID) is found again and enrolled; the runtime's CHECK, with its own
    // netns path, still passes.
    let mut app = pod
        .command(&["sleep".to_owned(), "600".to_owned()])
        .spawn()?;
    let r = (|| -> Result<()> {
        let old = m.mesh.proxy_pid("node-a").context("node-a's proxy pid")?;
        Command::new("kill")
            .args(["-KILL", &old.to_string()])
            .status()?;
        wait_until(
            "the restarted proxy to enroll cni-app again",
            Duration::from_secs(30),
            || {
                Ok(m.mesh.proxy_pid("node-a").is_some_and(|p| p != old)
                    && enrolled(&m, "node-a", "default/cni-app").ok().flatten() == Some(true))
            },
        )
        .with_context(|| format!("proxy-node-a log:\n{}", m.log("proxy-node-a")))?;
        let check = chain(
            &node.netns_path(),
            &list,
            &pod_env("CHECK", &pod.path()),
            Some(&result),
        )?;
        ensure!(check.is_ok(), "CHECK after the restart: {check:?}");
        Ok(())
    })();
    let _ = app.kill();
    let _ = app.wait();
    r?;

    // DEL: unenrolled; DEL again: still fine.
    for _ in 0..2 {
        let del = chain(
            &node.netns_path(),
            &list,
            &pod_env("DEL", &pod.path()),
            Some(&result),
        )?;
        ensure!(del.is_ok(), "DEL: {del:?}");
    }
    ensure!(
        enrolled(&m, "node-a", "default/cni-app")? == Some(false),
        "still enrolled after DEL"
    );
    // Captured again (mesh-cni alone, as on a retried ADD), then a GC that
    // no longer lists it releases it.
    let mut again = mesh_conf.clone();
    again["prevResult"] = result.clone();
    let (ok, e) = mesh_cni_exec(&pod_env("ADD", &pod.path()), &again)?;
    ensure!(ok, "second ADD: {e}");
    ensure!(enrolled(&m, "node-a", "default/cni-app")? == Some(true));
    let (ok, e) = mesh_cni_1_1("GC", &socket, json!({"cni.dev/valid-attachments": []}))?;
    ensure!(ok, "GC: {e}");
    ensure!(
        enrolled(&m, "node-a", "default/cni-app")? == Some(false),
        "GC kept an attachment the runtime no longer has"
    );
    Ok(())
}

/// The registry document with `pods` added (known, no netns yet).
fn with_pods(m: &TestMesh, pods: &[(&str, &str)]) -> Result<()> {
    let mut doc = m.mesh.registry_document(None);
    for (name, uid) in pods {
        // `name`, or `namespace/name`.
        let (namespace, name) = name.split_once('/').unwrap_or(("default", name));
        doc["pods"].as_array_mut().context("pods")?.push(json!({
            "namespace": namespace, "name": name, "uid": uid, "node": "node-a",
            "service_account": "client", "ips": [], "labels": {"app": name},
        }));
    }
    write_registry(m, &doc)
}

fn lo_up(node: &Path, pod: &RuntimePod) -> Result<()> {
    let lo =
        json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]});
    let mut env = pod_env_of("ADD", &pod.path(), "lo", "lo");
    env.insert("CNI_IFNAME", "lo".into());
    match chain(node, &lo, &env, None)? {
        Ok(_) => Ok(()),
        Err(e) => bail!("loopback ADD: {e}"),
    }
}

#[test]
fn with_the_proxy_down_add_fails_closed_and_succeeds_on_retry_and_running_pods_are_adopted()
-> Result<()> {
    const LATE: &str = "6c1d2e3f-0000-4000-8000-00000000c1a7";
    const EARLY: &str = "6c1d2e3f-0000-4000-8000-00000000ea71";
    ensure!(
        mesh_cni().exists(),
        "mesh-cni is not built: cargo build --bins"
    );
    let mut m = TestMesh::up(
        "cr",
        ControlOptions {
            cni_sockets: true,
            restart_proxies: false,
            ..ControlOptions::default()
        },
    )?;
    let node = m.mesh.node("node-a")?.clone();
    const OPEN: &str = "6c1d2e3f-0000-4000-8000-0000000000e0";
    with_pods(
        &m,
        &[
            ("cni-late", LATE),
            ("cni-early", EARLY),
            ("kube-system/cni-open", OPEN),
        ],
    )?;
    wait_until(
        "node-a's proxy to know the pods",
        Duration::from_secs(20),
        || Ok(enrolled(&m, "node-a", "default/cni-early")? == Some(false)),
    )?;

    // The proxy goes down.
    let pid = m.mesh.proxy_pid("node-a").context("node-a's proxy pid")?;
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    wait_until("node-a's proxy to exit", Duration::from_secs(15), || {
        Ok(!Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))?.contains(") Z "))
    })?;

    let dir = m.mesh.state_dir().join("cni-retry");
    std::fs::create_dir_all(&dir)?;
    let base = node.gateway.octets();
    let addr = |last: u8| format!("{}.{}.{}.{last}", base[0], base[1], base[2]);
    let list = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [
            {"type": "ptp", "ipMasq": false, "ipam": {
                "type": "host-local", "dataDir": dir.join("ipam"),
                "ranges": [[{"subnet": node.pod_cidr, "rangeStart": addr(230),
                             "rangeEnd": addr(250), "gateway": node.gateway.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "mesh-cni", "socket": m.mesh.cni_socket("node-a"), "timeoutSeconds": 30}
        ]
    });

    // STATUS: not available while the proxy is down.
    let (ok, e) = mesh_cni_1_1("STATUS", &m.mesh.cni_socket("node-a"), json!({}))?;
    ensure!(!ok && e["code"] == 50, "STATUS with the proxy down: {e}");

    // A pod started now is refused: fail closed, try again later.
    let late = RuntimePod::new("late", &node.pods_cgroup, LATE)?;
    lo_up(&node.netns_path(), &late)?;
    let add = pod_env_of("ADD", &late.path(), "cni-late", LATE);
    match chain(&node.netns_path(), &list, &add, None)? {
        Ok(r) => bail!("ADD with the proxy down succeeded: {r}"),
        Err(e) => {
            ensure!(e["code"] == 11, "not 'try again later': {e}");
            ensure!(
                e["msg"].as_str().unwrap_or("").contains("fail closed"),
                "{e}"
            );
        }
    }
    // The runtime tears the failed sandbox's network down.
    let del = pod_env_of("DEL", &late.path(), "cni-late", LATE);
    ensure!(
        chain(&node.netns_path(), &list, &del, None)?.is_ok(),
        "DEL of the failed ADD"
    );

    // In a fail-open namespace the pod starts unmeshed, with a record the
    // proxy picks up when it is back.
    let open = RuntimePod::new("open", &node.pods_cgroup, OPEN)?;
    lo_up(&node.netns_path(), &open)?;
    let mut open_list = list.clone();
    open_list["plugins"][1]["failOpenNamespaces"] = json!(["kube-system"]);
    let mut open_add = pod_env_of("ADD", &open.path(), "cni-open", OPEN);
    open_add.insert(
        "CNI_ARGS",
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=cni-open;K8S_POD_UID={OPEN}"
        ),
    );
    let open_result = match chain(&node.netns_path(), &open_list, &open_add, None)? {
        Ok(r) => r,
        Err(e) => bail!("fail-open ADD: {e}"),
    };
    let record = m
        .mesh
        .cni_socket("node-a")
        .with_file_name("fail-open")
        .join("kube-system.cni-open.json");
    ensure!(
        record.exists(),
        "no fail-open record at {}",
        record.display()
    );

    // A pod that runs while the proxy is down (its ADD was fail-open, or it
    // predates the mesh): a process in a cgroup that carries its UID.
    let early = RuntimePod::new("early", &node.pods_cgroup, EARLY)?;
    lo_up(&node.netns_path(), &early)?;
    let mut sleeper = early
        .command(&["sleep".to_owned(), "600".to_owned()])
        .spawn()?;

    m.mesh.start_proxy("node-a", &m.bins, &m.opts)?;
    let r = (|| -> Result<()> {
        wait_until(
            "the CNI socket to answer again",
            Duration::from_secs(30),
            || Ok(std::os::unix::net::UnixStream::connect(m.mesh.cni_socket("node-a")).is_ok()),
        )?;
        let (ok, e) = mesh_cni_1_1("STATUS", &m.mesh.cni_socket("node-a"), json!({}))?;
        ensure!(ok, "STATUS with the proxy back: {e}");
        // The retry meshes the pod.
        let again = chain(&node.netns_path(), &list, &add, None)?;
        let result = match again {
            Ok(r) => r,
            Err(e) => bail!("retry: {e}\nproxy log:\n{}", m.log("proxy-node-a")),
        };
        ensure!(
            enrolled(&m, "node-a", "default/cni-late")? == Some(true),
            "ADD returned but cni-late is not enrolled"
        );
        // The fail-open pod is enrolled from its record, which then goes;
        // the metric counts it.
        wait_until("cni-open to be enrolled", Duration::from_secs(20), || {
            Ok(enrolled(&m, "node-a", "kube-system/cni-open")? == Some(true))
        })
        .with_context(|| {
            format!(
                "record there: {}; workloads: {}\nproxy log:\n{}",
                record.exists(),
                m.mesh
                    .admin_get("node-a", "/workloads")
                    .map(|(_, b)| b)
                    .unwrap_or_default(),
                m.log("proxy-node-a")
            )
        })?;
        wait_until(
            "the fail-open record to go",
            Duration::from_secs(10),
            || Ok(!record.exists()),
        )?;
        let metrics = m.mesh.metrics("node-a")?;
        ensure!(
            metrics.contains("sockmesh_cni_adopted_pods_total{found_by=\"fail_open\"} 1"),
            "no fail-open adoption in the metrics:\n{metrics}"
        );
        let mut open_del = open_add.clone();
        open_del.insert("CNI_COMMAND", "DEL".into());
        ensure!(
            chain(
                &node.netns_path(),
                &open_list,
                &open_del,
                Some(&open_result)
            )?
            .is_ok()
        );
        // The running pod is found by its cgroup and enrolled.
        wait_until("cni-early to be adopted", Duration::from_secs(20), || {
            Ok(enrolled(&m, "node-a", "default/cni-early")? == Some(true))
        })
        .with_context(|| format!("proxy log:\n{}", m.log("proxy-node-a")))?;
        ensure!(chain(&node.netns_path(), &list, &del, Some(&result))?.is_ok());
        Ok(())
    })();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    r?;
    // Its process gone, the adopted pod is released.
    wait_until("cni-early to be released", Duration::from_secs(20), || {
        Ok(enrolled(&m, "node-a", "default/cni-early")? == Some(false))
    })?;
    Ok(())
}

/// `cargo test -p sockmesh-tests --test cni bench -- --ignored --nocapture`:
/// CNI ADD latency of ptp + host-local, and what mesh-cni
/// adds after it with the real node proxy (enrollment: eBPF, listeners,
/// the certificate of the pods' shared service account), over 200 pods.
#[test]
#[ignore]
fn bench_cni_add_latency_with_the_real_proxy() -> Result<()> {
    let n = 200;
    let m = TestMesh::up(
        "cb",
        ControlOptions {
            cni_sockets: true,
            ..ControlOptions::default()
        },
    )?;
    let node = m.mesh.node("node-a")?.clone();
    let names: Vec<(String, String)> = (0..=n)
        .map(|i| {
            (
                format!("bench-{i}"),
                format!("6c1d2e3f-0000-4000-8000-{i:012}"),
            )
        })
        .collect();
    let mut doc = m.mesh.registry_document(None);
    for (name, uid) in &names {
        doc["pods"].as_array_mut().context("pods")?.push(json!({
            "namespace": "default", "name": name, "uid": uid, "node": "node-a",
            "service_account": "bench", "ips": [], "labels": {"app": "bench"},
        }));
    }
    write_registry(&m, &doc)?;
    let last = format!("default/{}", names[n].0);
    wait_until(
        "node-a's proxy to know the pods",
        Duration::from_secs(30),
        || Ok(enrolled(&m, "node-a", &last)? == Some(false)),
    )?;
    let dir = m.mesh.state_dir().join("cni-bench");
    std::fs::create_dir_all(&dir)?;
    let base = node.gateway.octets();
    let addr = |last: u8| format!("{}.{}.{}.{last}", base[0], base[1], base[2]);
    let ptp = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [{"type": "ptp", "ipMasq": false, "ipam": {
            "type": "host-local", "dataDir": dir.join("ipam"),
            "ranges": [[{"subnet": node.pod_cidr, "rangeStart": addr(230),
                         "rangeEnd": addr(250), "gateway": node.gateway.to_string()}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]
    });
    let mesh = json!({"type": "mesh-cni", "cniVersion": "1.0.0", "name": "k8s-pod-network",
                      "socket": m.mesh.cni_socket("node-a"), "timeoutSeconds": 30});
    // SOCKMESH_CNI_BENCH=cold: every pod is the only one of its service
    // account on the node while it lives (a certificate per ADD).
    let cold = std::env::var("SOCKMESH_CNI_BENCH").is_ok_and(|v| v == "cold");
    let mut warm_pod = None;
    let (mut bare, mut added) = (Vec::new(), Vec::new());
    for (i, (name, uid)) in names.iter().enumerate() {
        let pod = RuntimePod::new("bench", &node.pods_cgroup, uid)?;
        lo_up(&node.netns_path(), &pod)?;
        let env = pod_env_of("ADD", &pod.path(), name, uid);
        let start = Instant::now();
        let result = match chain(&node.netns_path(), &ptp, &env, None)? {
            Ok(r) => r,
            Err(e) => bail!("ptp ADD: {e}"),
        };
        if i > 0 {
            bare.push(start.elapsed());
        }
        let mut conf = mesh.clone();
        conf["prevResult"] = result.clone();
        // Pod 0 warms up, untimed: the CA learns the new service account
        // at its next registry poll and refuses it until then.
        let tries = if i == 0 { 60 } else { 1 };
        let mut last = None;
        for _ in 0..tries {
            let start = Instant::now();
            let o = mesh_cni_output(&env, &conf)?;
            let took = start.elapsed();
            let ok = o.status.success();
            last = Some(o);
            if ok {
                if i > 0 {
                    added.push(took);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let o = last.context("no ADD ran")?;
        ensure!(
            o.status.success(),
            "mesh-cni ADD {name}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let mut list = ptp.clone();
        list["plugins"]
            .as_array_mut()
            .context("plugins")?
            .push(mesh.clone());
        let del = pod_env_of("DEL", &pod.path(), name, uid);
        if i == 0 {
            // Pod 0 stays: the service account's certificate stays on the
            // node, as while any replica runs (the last pod of an account
            // takes its certificate with it; the next ADD fetches one:
            // `cold` below measures that).
            if !cold {
                warm_pod = Some((pod, del, list, result));
                continue;
            }
        }
        ensure!(
            chain(&node.netns_path(), &list, &del, Some(&result))?.is_ok(),
            "DEL {name}"
        );
    }
    if let Some((_pod, del, list, result)) = warm_pod.take() {
        ensure!(chain(&node.netns_path(), &list, &del, Some(&result))?.is_ok());
    }
    // Reconciles from the run loop and the socket never overlap (they
    // used to enroll one pod twice: the second bind failed).
    let log = m.log("proxy-node-a");
    ensure!(
        !log.contains("Address already in use"),
        "a pod was enrolled twice at once:\n{log}"
    );
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    };
    println!(
        "ADD ptp+host-local ({n}):              p50 {:?} p99 {:?}",
        pct(&mut bare, 0.5),
        pct(&mut bare, 0.99)
    );
    println!(
        "added by mesh-cni, real proxy ({n}, {}): p50 {:?} p99 {:?}",
        if cold {
            "certificate per pod"
        } else {
            "account's certificate on the node"
        },
        pct(&mut added, 0.5),
        pct(&mut added, 0.99)
    );
    Ok(())
}

/// Stops on drop: a child process (containerd).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes on drop the directories this test had to create on the
/// machine's filesystem (mount points for the CNI dirs, only if absent).
struct MadeDirs(Vec<PathBuf>);

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// What runc and containerd leave outside the mesh's own tree, removed on
/// drop: the mesh's cgroups in the cgroup v1 hierarchies (runc creates
/// the container's cgroup in every mounted hierarchy on a hybrid system)
/// and /run/containerd (shim sockets, runc state), if it was not there.
struct RuntimeLeftovers {
    mesh_cgroup: String,
    run_containerd: bool,
}

impl Drop for RuntimeLeftovers {
    fn drop(&mut self) {
        if let Ok(dirs) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in dirs.flatten().filter(|c| c.file_name() != "unified") {
                let top = c.path().join(&self.mesh_cgroup);
                if top.is_dir() {
                    let _ = Command::new("find")
                        .arg(&top)
                        .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                        .status();
                }
            }
        }
        if self.run_containerd {
            let _ = std::fs::remove_dir_all("/run/containerd");
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OCI image archive of Debian's busybox-static (no registry): one
/// layer with /bin/busybox and its applet links.
fn busybox_image(dir: &Path) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_tar = dir.join("layer.tar");
    ensure!(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&layer_tar)
            .arg(".")
            .status()?
            .success(),
        "tar the layer"
    );
    let layer = std::fs::read(&layer_tar)?;
    let layer_digest = sha256_hex(&layer);
    std::fs::write(blobs.join(&layer_digest), &layer)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    }))?;
    let config_digest = sha256_hex(&config);
    std::fs::write(blobs.join(&config_digest), &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_digest}"), "size": layer.len()}],
    }))?;
    let manifest_digest = sha256_hex(&manifest);
    std::fs::write(blobs.join(&manifest_digest), &manifest)?;
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": format!("sha256:{manifest_digest}"), "size": manifest.len(),
                           "annotations": {"io.containerd.image.name": "docker.io/sockmesh/busybox:test",
                                           "org.opencontainers.image.ref.name": "test"}}],
        }))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = dir.join("busybox-oci.tar");
    ensure!(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .args(["oci-layout", "index.json", "blobs"])
            .status()?
            .success(),
        "tar the image"
    );
    Ok(archive)
}

/// containerd 1.6 + runc (Debian) running in node-a's netns; `ctr run
/// --cni` of a local busybox image runs the chain (ptp + host-local +
/// mesh-cni, from a conflist in a private mount of /etc/cni/net.d); the
/// container's first connect is carried by the mesh.
#[test]
fn a_container_run_by_containerd_is_meshed_before_its_first_connect() -> Result<()> {
    const CTR_UID: &str = "6c1d2e3f-0000-4000-8000-0000000c7a00";
    for bin in ["containerd", "ctr", "runc", "unshare"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()?
                .status
                .success(),
            "{bin} missing: apt-get install containerd runc"
        );
    }
    let m = TestMesh::up(
        "cd",
        ControlOptions {
            cni_sockets: true,
            ..ControlOptions::default()
        },
    )?;
    let node = m.mesh.node("node-a")?.clone();
    with_pods(&m, &[("ctr-app", CTR_UID)])?;
    wait_until(
        "node-a's proxy to know the pod",
        Duration::from_secs(20),
        || Ok(enrolled(&m, "node-a", "default/ctr-app")? == Some(false)),
    )?;
    let _leftovers = RuntimeLeftovers {
        mesh_cgroup: node
            .cgroup
            .parent()
            .and_then(|p| p.file_name())
            .context("mesh cgroup")?
            .to_string_lossy()
            .into_owned(),
        run_containerd: !Path::new("/run/containerd").exists(),
    };
    let dir = m.mesh.state_dir().join("ctr");
    std::fs::create_dir_all(&dir)?;
    let image = busybox_image(&dir)?;

    // containerd, its state under the mesh's state dir, in node-a's netns.
    let cfg = dir.join("containerd.toml");
    let sock = dir.join("containerd.sock");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = {:?}\n",
            dir.join("root"),
            dir.join("state"),
            sock
        ),
    )?;
    let log = std::fs::File::create(dir.join("containerd.log"))?;
    let _containerd = Daemon(
        Command::new("nsenter")
            .arg(format!("--net={}", node.netns_path().display()))
            .args(["--", "containerd", "--config"])
            .arg(&cfg)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    wait_until("containerd's socket", Duration::from_secs(20), || {
        Ok(sock.exists())
    })?;
    let ctr = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["--namespace", "sockmesh"])
            .args(args)
            .output()?)
    };
    let imported = ctr(&["image", "import", image.to_str().context("path")?])?;
    ensure!(
        imported.status.success(),
        "ctr image import: {}",
        String::from_utf8_lossy(&imported.stderr)
    );

    // The CNI dirs ctr reads (/etc/cni/net.d, /opt/cni/bin), bound from the
    // test's own in a private mount namespace.
    let mut made = MadeDirs(Vec::new());
    for d in ["/etc/cni", "/etc/cni/net.d", "/opt/cni", "/opt/cni/bin"] {
        if !Path::new(d).exists() {
            std::fs::create_dir(d)?;
            made.0.push(d.into());
        }
    }
    let (conf_dir, bin_dir) = (dir.join("net.d"), dir.join("bin"));
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&bin_dir)?;
    for p in ["ptp", "host-local", "loopback"] {
        std::os::unix::fs::symlink(Path::new(PLUGINS).join(p), bin_dir.join(p))?;
    }
    std::os::unix::fs::symlink(mesh_cni(), bin_dir.join("mesh-cni"))?;
    let base = node.gateway.octets();
    let addr = |last: u8| format!("{}.{}.{}.{last}", base[0], base[1], base[2]);
    std::fs::write(
        conf_dir.join("10-sockmesh.conflist"),
        serde_json::to_vec_pretty(&json!({
            "cniVersion": "1.0.0", "name": "ctr-net",
            "plugins": [
                {"type": "ptp", "ipMasq": false, "ipam": {
                    "type": "host-local", "dataDir": dir.join("ipam"),
                    "ranges": [[{"subnet": node.pod_cidr, "rangeStart": addr(230),
                                 "rangeEnd": addr(250), "gateway": node.gateway.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}]}},
                // ctr passes no CNI_ARGS: the pod is named in args.cni.
                {"type": "mesh-cni", "socket": m.mesh.cni_socket("node-a"),
                 "logFile": dir.join("mesh-cni.log"), "timeoutSeconds": 30,
                 "args": {"cni": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "ctr-app",
                                  "K8S_POD_UID": CTR_UID}}}
            ]
        }))?,
    )?;

    // Everything on the fabric is recorded while the container runs.
    let fabric = m.mesh.state().fabric.netns.clone();
    let pcap = dir.join("fabric.pcap");
    let mut dump = Daemon(
        Command::new("ip")
            .args([
                "netns", "exec", &fabric, "tcpdump", "-i", "br0", "-U", "-s", "0", "-w",
            ])
            .arg(&pcap)
            .arg("tcp")
            .stderr(Stdio::piped())
            .spawn()
            .context("tcpdump (installed by ./x setup)")?,
    );
    let listening = {
        let stderr = dump.0.stderr.take().context("tcpdump's stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx
    };
    listening
        .recv_timeout(Duration::from_secs(10))
        .context("tcpdump did not start capturing within 10 s")?;

    let web = m.ip("default/web")?;
    let s = serve(&m, "default/web", 8080, 1, 1000)?;
    // The container's cgroup under node-a's pods (the eBPF hooks sit on
    // node-a's cgroup), named after the pod UID.
    let cgroup = node
        .pods_cgroup
        .strip_prefix("/sys/fs/cgroup/unified")
        .context("pods cgroup outside the unified hierarchy")?
        .join(format!("pod{CTR_UID}"));
    let script = r#"mount --bind "$1" /etc/cni/net.d && mount --bind "$2" /opt/cni/bin && ns="$3" && shift 3 && exec nsenter --net="$ns" -- "$@""#;
    let run = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sockmesh-ctr",
        ])
        .arg(&conf_dir)
        .arg(&bin_dir)
        .arg(node.netns_path())
        .arg("ctr")
        .arg("--address")
        .arg(&sock)
        .args([
            "--namespace",
            "sockmesh",
            "run",
            "--rm",
            "--cni",
            "--snapshotter",
            "native",
            "--cgroup",
        ])
        .arg(cgroup.display().to_string())
        .args(["docker.io/sockmesh/busybox:test", "ctr-app", "sh", "-c"])
        .arg(format!(
            "head -c 1000 /dev/zero | nc -w 5 {web} 8080 | wc -c"
        ))
        .output()?;
    let _ = s.wait();
    ensure!(
        run.status.success(),
        "ctr run: {}\n{}\nmesh-cni log:\n{}\ncontainerd log (tail):\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        std::fs::read_to_string(dir.join("mesh-cni.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("containerd.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    wait_until(
        "node-a's access log line for ctr-app",
        Duration::from_secs(10),
        || {
            Ok(m.log("proxy-node-a").lines().any(|l| {
                l.contains("default/ctr-app") && l.contains("outbound") && l.contains("mutual_tls")
            }))
        },
    )
    .with_context(|| {
        format!(
            "ctr output: {}\nmesh-cni log:\n{}\nproxy-node-a log:\n{}",
            String::from_utf8_lossy(&run.stdout),
            std::fs::read_to_string(dir.join("mesh-cni.log")).unwrap_or_default(),
            m.log("proxy-node-a")
        )
    })?;
    // On the fabric: the container's connection is HBONE (15008) from its
    // own address, nothing reaches web:8080 in clear.
    let _ = wait_until("tcpdump to write packets", Duration::from_secs(5), || {
        Ok(std::fs::metadata(&pcap).map_or(0, |m| m.len()) > 24)
    });
    let _ = Command::new("kill")
        .args(["-INT", &dump.0.id().to_string()])
        .status();
    let _ = dump.0.wait();
    let listing = sockmesh_tests::run(Command::new("tcpdump").args(["-nn", "-r"]).arg(&pcap))?;
    let lines: Vec<&str> = listing.lines().filter(|l| l.contains(" IP ")).collect();
    for l in &lines {
        ensure!(
            l.contains(".15008") || l.contains(".15012"),
            "non-mesh port on the fabric: {l}\n{listing}"
        );
    }
    let from_container = (230..=250).any(|k| {
        lines.iter().any(|l| {
            l.contains(&format!("{}. ", addr(k)).replace(". ", ".")) && l.contains(".15008")
        })
    });
    ensure!(
        from_container,
        "no HBONE from the container's address on the fabric ({:?} bytes captured):\n{listing}",
        std::fs::metadata(&pcap).map(|m| m.len())
    );

    // The container is gone (--rm): its pod is released.
    wait_until("ctr-app to be released", Duration::from_secs(20), || {
        Ok(enrolled(&m, "node-a", "default/ctr-app")? == Some(false))
    })?;
    Ok(())
}
