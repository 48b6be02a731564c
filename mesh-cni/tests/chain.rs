//! mesh-cni chained after Debian's containernetworking-plugins (bridge +
//! host-local, /usr/lib/cni), driven by the CNI exec protocol as a runtime
//! drives it, inside a node network namespace this test makes (the bridge
//! plugin turns on ip_forward wherever it runs: never the machine's own).
//! The node proxy's enrollment socket is served by a stand-in that speaks
//! the real protocol (mesh_core::enroll) and records what it was asked.
//!
//! Root. Every namespace is named `sockmesh-cni<pid>-*` and removed on drop.

// Test helpers outside #[test] fns: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::enroll::{self, Op, Outcome, Response};
use serde_json::{Value, json};

const PLUGINS: &str = "/usr/lib/cni";

fn require_root() {
    assert!(
        nix_is_root(),
        "mesh-cni's chain tests run as root (they make network namespaces)"
    );
    assert!(
        Path::new(PLUGINS).join("bridge").exists(),
        "{PLUGINS}/bridge missing: apt-get install containernetworking-plugins (./x setup does)"
    );
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A named netns, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The node proxy's socket, played by a thread: answers each request
/// with `answer(op)` and records it.
struct Agent {
    path: PathBuf,
    seen: Arc<Mutex<Vec<Op>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start(path: &Path, answer: fn(&Op) -> Outcome) -> Agent {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let Ok(body) = enroll::read_frame(&mut c) else {
                            continue;
                        };
                        let op = enroll::parse_request(&body).unwrap().op;
                        let out = answer(&op);
                        s.lock().unwrap().push(op);
                        let _ = enroll::write_frame(&mut c, &Response::new(out));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Agent {
            path: path.to_owned(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Op> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn captures(op: &Op) -> Outcome {
    match op {
        Op::Add { .. } | Op::Check { .. } => Outcome::Captured { netns_cookie: 7 },
        _ => Outcome::Done {},
    }
}

/// One test's world: a node netns, a temp dir (IPAM state, socket, log).
struct World {
    node: Netns,
    dir: tempfile::TempDir,
    tag: String,
    pods: Vec<Netns>,
}

impl World {
    fn new(tag: &str) -> World {
        require_root();
        let tag = format!("sockmesh-cni{}-{tag}", std::process::id());
        World {
            node: Netns::new(format!("{tag}-node")),
            dir: tempfile::tempdir().unwrap(),
            tag,
            pods: Vec::new(),
        }
    }

    fn pod_netns(&mut self, i: usize) -> PathBuf {
        let n = Netns::new(format!("{}-p{i}", self.tag));
        let p = n.path();
        self.pods.push(n);
        p
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("mesh-cni.log")
    }

    /// The conflist: bridge (+ host-local) and, if `mesh`, mesh-cni.
    fn conflist(&self, mesh: bool) -> Value {
        let mut plugins = vec![json!({
            "type": "bridge", "bridge": "smcni0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "subnet": "10.244.7.0/24",
                     "dataDir": self.dir.path().join("ipam")}
        })];
        if mesh {
            plugins.push(json!({
                "type": "mesh-cni", "socket": self.socket(), "logFile": self.log(),
                "timeoutSeconds": 5, "failOpenNamespaces": ["kube-system"]
            }));
        }
        // Debian's plugins (1.1.1) speak CNI up to 1.0.0; STATUS and GC
        // (1.1) are sent to mesh-cni alone.
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": plugins})
    }
}

struct Exec {
    ok: bool,
    out: Value,
}

fn plugin_bin(ty: &str) -> PathBuf {
    if ty == "mesh-cni" {
        PathBuf::from(env!("CARGO_BIN_EXE_mesh-cni"))
    } else {
        Path::new(PLUGINS).join(ty)
    }
}

/// Runs one plugin in the node netns with `env` and `stdin`, bounded.
fn exec(w: &World, ty: &str, env: &BTreeMap<&str, String>, stdin: &Value) -> Exec {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &w.node.0])
        .arg(plugin_bin(ty))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_PATH", PLUGINS)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("{ty} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let o = child.wait_with_output().unwrap();
    let out = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    Exec {
        ok: o.status.success(),
        out,
    }
}

fn pod_env(
    cmd: &str,
    id: &str,
    netns: &Path,
    ns: &str,
    name: &str,
) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("CNI_COMMAND", cmd.to_owned()),
        ("CNI_CONTAINERID", id.to_owned()),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".to_owned()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{name};K8S_POD_INFRA_CONTAINER_ID={id}"
            ),
        ),
    ])
}

/// What a runtime does with a conflist: each plugin in order (DEL in
/// reverse), each given the previous result. Returns the last result, or
/// the failing plugin's error.
fn chain(w: &World, list: &Value, env: &BTreeMap<&str, String>, cached: Option<&Value>) -> Exec {
    let cmd = env["CNI_COMMAND"].clone();
    let mut plugins: Vec<Value> = list["plugins"].as_array().unwrap().clone();
    if cmd == "DEL" {
        plugins.reverse();
    }
    let mut prev = cached.cloned();
    let mut last = Exec {
        ok: true,
        out: Value::Null,
    };
    for p in plugins {
        let mut conf = p.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(pr) = &prev {
            conf["prevResult"] = pr.clone();
        }
        let ty = p["type"].as_str().unwrap().to_owned();
        last = exec(w, &ty, env, &conf);
        if !last.ok {
            return last;
        }
        if cmd == "ADD" {
            prev = Some(last.out.clone());
        }
    }
    if cmd == "ADD" {
        last.out = prev.unwrap_or(Value::Null);
    }
    last
}

fn code(e: &Exec) -> u64 {
    assert!(!e.ok, "expected a failure, got {}", e.out);
    e.out["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code in {}", e.out))
}

#[test]
fn a_pod_added_through_the_chain_is_enrolled_with_its_netns_identity_and_address() {
    let mut w = World::new("add");
    let agent = Agent::start(&w.socket(), captures);
    let netns = w.pod_netns(0);
    let list = w.conflist(true);
    let add = chain(
        &w,
        &list,
        &pod_env("ADD", "c0", &netns, "default", "web-1"),
        None,
    );
    assert!(add.ok, "ADD failed: {}", add.out);
    // The result is bridge's, passed through unchanged.
    let bare = w.conflist(false);
    assert_eq!(add.out["cniVersion"], "1.0.0");
    let ip = add.out["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(ip.starts_with("10.244.7."), "{ip}");
    let seen = agent.seen();
    let Some(Op::Add { pod }) = seen.first() else {
        panic!("the proxy was not asked to add: {seen:?}")
    };
    assert_eq!(pod.netns, netns);
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
        ("default", "web-1", "uid-web-1")
    );
    assert_eq!(
        pod.ips,
        vec![
            ip.split('/')
                .next()
                .unwrap()
                .parse::<std::net::IpAddr>()
                .unwrap()
        ]
    );

    // CHECK with the cached result: every plugin agrees.
    let check = chain(
        &w,
        &list,
        &pod_env("CHECK", "c0", &netns, "default", "web-1"),
        Some(&add.out),
    );
    assert!(check.ok, "CHECK: {}", check.out);
    assert!(matches!(agent.seen().last(), Some(Op::Check { .. })));

    // STATUS and GC (1.1 commands, no container).
    let status = exec(
        &w,
        "mesh-cni",
        &BTreeMap::from([("CNI_COMMAND", "STATUS".to_owned())]),
        &json!({"cniVersion":"1.1.0","name":"k8s-pod-network","type":"mesh-cni","socket": w.socket()}),
    );
    assert!(status.ok, "STATUS: {}", status.out);
    let gc = exec(
        &w,
        "mesh-cni",
        &BTreeMap::from([("CNI_COMMAND", "GC".to_owned())]),
        &json!({"cniVersion":"1.1.0","name":"k8s-pod-network","type":"mesh-cni","socket": w.socket(),
                          "cni.dev/valid-attachments": [{"containerID":"c0","ifname":"eth0"}]}),
    );
    assert!(gc.ok, "GC: {}", gc.out);
    match agent.seen().last() {
        Some(Op::Gc { valid }) => assert_eq!(valid.len(), 1),
        o => panic!("{o:?}"),
    }

    // DEL, then DEL again (idempotent), then with the proxy gone too.
    let del = pod_env("DEL", "c0", &netns, "default", "web-1");
    assert!(chain(&w, &list, &del, Some(&add.out)).ok);
    assert!(matches!(agent.seen().last(), Some(Op::Del { .. })));
    assert!(chain(&w, &list, &del, Some(&add.out)).ok);
    drop(agent);
    assert!(
        chain(&w, &list, &del, None).ok,
        "DEL with the proxy down must succeed"
    );
    let status = exec(
        &w,
        "mesh-cni",
        &BTreeMap::from([("CNI_COMMAND", "STATUS".to_owned())]),
        &json!({"cniVersion":"1.1.0","name":"n","type":"mesh-cni","socket": w.socket()}),
    );
    assert_eq!(
        code(&status),
        50,
        "STATUS with the proxy down: {}",
        status.out
    );
    let _ = bare;
}

#[test]
fn version_lists_the_spec_versions() {
    let w = World::new("ver");
    let v = exec(
        &w,
        "mesh-cni",
        &BTreeMap::from([("CNI_COMMAND", "VERSION".to_owned())]),
        &json!({"cniVersion":"1.1.0"}),
    );
    assert!(v.ok);
    let versions: Vec<&str> = v.out["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        versions.contains(&"1.1.0") && versions.contains(&"0.4.0"),
        "{versions:?}"
    );
}

#[test]
fn bad_input_gets_the_spec_codes_and_enrolls_nothing() {
    let mut w = World::new("bad");
    let agent = Agent::start(&w.socket(), captures);
    let netns = w.pod_netns(0);
    let env = pod_env("ADD", "c1", &netns, "default", "web-2");
    let prev = json!({"cniVersion":"1.1.0","ips":[{"address":"10.244.7.9/24"}]});
    let conf = |extra: Value| {
        let mut c = json!({"cniVersion":"1.1.0","name":"n","type":"mesh-cni","socket": w.socket(), "prevResult": prev});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    // Malformed config: not JSON at all.
    let mut cmd = Command::new(plugin_bin("mesh-cni"));
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut c = cmd.spawn().unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"{\"cniVersion\": ")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["code"], 6, "{out}");

    assert_eq!(
        code(&exec(
            &w,
            "mesh-cni",
            &env,
            &conf(json!({"prevResult": null}))
        )),
        7
    );
    let e = exec(&w, "mesh-cni", &env, &conf(json!({"cniVersion": "0.2.0"})));
    assert_eq!(code(&e), 1);
    assert!(
        e.out["details"].as_str().unwrap().contains("1.1.0"),
        "{}",
        e.out
    );
    assert_eq!(
        code(&exec(
            &w,
            "mesh-cni",
            &env,
            &conf(json!({"timeoutSeconds": "soon"}))
        )),
        7
    );
    let mut gone = env.clone();
    gone.insert("CNI_NETNS", "/run/netns/sockmesh-no-such-netns".into());
    let e = exec(&w, "mesh-cni", &gone, &conf(json!({})));
    assert_eq!(code(&e), 4);
    assert!(
        e.out["msg"]
            .as_str()
            .unwrap()
            .contains("/run/netns/sockmesh-no-such-netns"),
        "{}",
        e.out
    );
    let mut no_cmd = env.clone();
    no_cmd.insert("CNI_COMMAND", "ATTACH".into());
    assert_eq!(code(&exec(&w, "mesh-cni", &no_cmd, &conf(json!({})))), 4);
    assert!(
        agent.seen().is_empty(),
        "nothing may reach the proxy: {:?}",
        agent.seen()
    );

    // The proxy's socket missing: fail closed, try again later.
    drop(agent);
    let e = exec(&w, "mesh-cni", &env, &conf(json!({})));
    assert_eq!(code(&e), 11, "{}", e.out);
    assert!(
        e.out["msg"].as_str().unwrap().contains("fail closed"),
        "{}",
        e.out
    );
}

#[test]
fn a_pod_added_while_the_proxy_is_down_is_refused_then_meshed_on_retry() {
    let mut w = World::new("retry");
    let netns = w.pod_netns(0);
    let list = w.conflist(true);
    let env = pod_env("ADD", "c2", &netns, "default", "web-3");
    let first = chain(&w, &list, &env, None);
    assert_eq!(code(&first), 11, "{}", first.out);
    // The runtime cleans up the failed sandbox (DEL), then retries.
    assert!(
        chain(
            &w,
            &list,
            &pod_env("DEL", "c2", &netns, "default", "web-3"),
            None
        )
        .ok
    );
    let agent = Agent::start(&w.socket(), captures);
    let again = chain(&w, &list, &env, None);
    assert!(again.ok, "retry: {}", again.out);
    assert!(matches!(agent.seen().first(), Some(Op::Add { pod }) if pod.name == "web-3"));
    assert!(
        chain(
            &w,
            &list,
            &pod_env("DEL", "c2", &netns, "default", "web-3"),
            Some(&again.out)
        )
        .ok
    );
}

#[test]
fn a_fail_open_namespace_starts_unmeshed_with_a_log_line() {
    let mut w = World::new("open");
    let netns = w.pod_netns(0);
    let list = w.conflist(true);
    let add = chain(
        &w,
        &list,
        &pod_env("ADD", "c3", &netns, "kube-system", "dns-1"),
        None,
    );
    assert!(add.ok, "{}", add.out);
    let log = std::fs::read_to_string(w.log()).unwrap();
    assert!(
        log.contains("FAIL-OPEN") && log.contains("kube-system/dns-1"),
        "{log}"
    );
    // The record the node proxy enrolls the pod from once it is back.
    let record: Value = serde_json::from_slice(
        &std::fs::read(w.dir.path().join("fail-open/kube-system.dns-1.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["pod"]["netns"], json!(netns));
    assert!(
        record["reason"].as_str().unwrap().contains("not reachable"),
        "{record}"
    );
    assert!(
        chain(
            &w,
            &list,
            &pod_env("DEL", "c3", &netns, "kube-system", "dns-1"),
            Some(&add.out)
        )
        .ok
    );
}

#[test]
fn a_refusal_from_the_proxy_fails_add_with_its_reason() {
    let mut w = World::new("refuse");
    let _agent = Agent::start(&w.socket(), |op| match op {
        Op::Add { .. } => Outcome::Refused {
            reason: "certificate for default/web-4: CA unreachable".into(),
        },
        _ => Outcome::Done {},
    });
    let netns = w.pod_netns(0);
    let list = w.conflist(true);
    let e = chain(
        &w,
        &list,
        &pod_env("ADD", "c4", &netns, "default", "web-4"),
        None,
    );
    assert_eq!(code(&e), 11);
    assert!(
        e.out["details"]
            .as_str()
            .unwrap()
            .contains("CA unreachable"),
        "{}",
        e.out
    );
    assert!(
        chain(
            &w,
            &list,
            &pod_env("DEL", "c4", &netns, "default", "web-4"),
            None
        )
        .ok
    );
}

/// `cargo test -p mesh-cni --test chain bench_add_latency -- --ignored
/// --nocapture`: ADD latency of bridge + host-local, and what mesh-cni
/// adds after them (its own exec, straight from the runtime's netns as a
/// runtime runs it, and the round trip to an instant proxy stand-in),
/// over 200 pods.
#[test]
#[ignore]
fn bench_add_latency() {
    let mut w = World::new("bench");
    let _agent = Agent::start(&w.socket(), captures);
    let n = 200;
    let (mut bare, mut added) = (Vec::new(), Vec::new());
    let list = w.conflist(false);
    let mesh = w.conflist(true)["plugins"][1].clone();
    for i in 0..n {
        let netns = w.pod_netns(i);
        let id = format!("b{i}");
        let env = pod_env("ADD", &id, &netns, "default", &format!("p{i}"));
        let start = Instant::now();
        let add = chain(&w, &list, &env, None);
        bare.push(start.elapsed());
        assert!(add.ok, "{}", add.out);
        let mut conf = mesh.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        conf["prevResult"] = add.out.clone();
        let start = Instant::now();
        let o = Command::new(plugin_bin("mesh-cni"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(conf.to_string().as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        added.push(start.elapsed());
        assert!(o.status.success());
        let del = pod_env("DEL", &id, &netns, "default", &format!("p{i}"));
        assert!(chain(&w, &list, &del, Some(&add.out)).ok);
        w.pods.clear();
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    };
    println!(
        "ADD bridge+host-local ({n}): p50 {:?} p99 {:?}",
        pct(&mut bare, 0.5),
        pct(&mut bare, 0.99)
    );
    println!(
        "added by mesh-cni ({n}):     p50 {:?} p99 {:?}",
        pct(&mut added, 0.5),
        pct(&mut added, 0.99)
    );
}
