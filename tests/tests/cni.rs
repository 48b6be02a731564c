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
    Ok(())
}

/// The registry document with `pods` added (known, no netns yet).
fn with_pods(m: &TestMesh, pods: &[(&str, &str)]) -> Result<()> {
    let mut doc = m.mesh.registry_document(None);
    for (name, uid) in pods {
        doc["pods"].as_array_mut().context("pods")?.push(json!({
            "namespace": "default", "name": name, "uid": uid, "node": "node-a",
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
    with_pods(&m, &[("cni-late", LATE), ("cni-early", EARLY)])?;
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
