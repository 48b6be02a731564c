//! Privileged tests of the local mesh harness: real network namespaces,
//! veths, a bridge and cgroups. They need root and fail (never skip)
//! without it. Each test uses its own mesh name and removes it even when it
//! fails (a guard runs `down` on drop).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_local::{Error, Mesh, Options, Progress, Topology, down, names, up};

const TIMEOUT: Duration = Duration::from_secs(30);

/// An echo server: echoes each connection's bytes back until EOF.
const ECHO_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
s.settimeout(120)
while True:
    c, _ = s.accept()
    c.settimeout(30)
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
"#;

/// Sends N patterned bytes, reads the echo; prints the length received, the
/// hash of what came back, the hash of what was sent and its own address.
const ECHO_CLIENT: &str = r#"
import hashlib, socket, sys, threading, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes((i * 7 + i // 251) % 256 for i in range(n))
for _ in range(200):
    try:
        c = socket.create_connection((host, port), timeout=10)
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("could not connect to %s:%d" % (host, port))
def send():
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
got = bytearray()
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
t.join()
print(len(got), hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest(), c.getsockname()[0])
"#;

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the local mesh tests must run as root (they create network namespaces, veths and cgroups)"
    );
}

/// `l<pid><tag>`: unique per test, and tells `sweep_stale` whose it is.
fn mesh_name(tag: &str) -> String {
    sweep_stale();
    let name = format!("l{}{tag}", std::process::id());
    names::validate_mesh_name(&name).unwrap();
    name
}

/// Removes meshes of test processes that no longer exist (a test binary
/// killed mid-run cannot run its guards).
fn sweep_stale() {
    let opts = Options::default();
    let mut meshes = std::collections::BTreeSet::new();
    let mut collect = |dir: &Path, strip: &str| {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten().take(10_000) {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = n.strip_prefix(strip) else {
                continue;
            };
            let mesh = rest.split('-').next().unwrap_or_default();
            let Some(digits) = mesh.strip_prefix('l') else {
                continue;
            };
            let pid: String = digits.chars().take_while(char::is_ascii_digit).collect();
            let tag = &digits[pid.len()..];
            if tag.len() == 1
                && pid
                    .parse::<u32>()
                    .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
            {
                meshes.insert(mesh.to_owned());
            }
        }
    };
    collect(Path::new("/run/netns"), "sockmesh-");
    collect(&opts.cgroup_root, "sockmesh-");
    collect(&opts.state_root, "");
    for mesh in meshes {
        if let Err(e) = down(&mesh, &opts) {
            eprintln!("sweeping stale mesh {mesh}: {e}");
        }
    }
}

/// Runs `down` when dropped, so a failing test leaves nothing behind.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = down(&self.0, &Options::default()) {
            eprintln!("cleanup of mesh {}: {e}", self.0);
        }
    }
}

fn up_demo(mesh: &str) -> Result<(Mesh, Vec<String>)> {
    let mut steps = Vec::new();
    let m = up(
        mesh,
        &Topology::demo(),
        &Options::default(),
        &mut |p: &Progress| steps.push(p.to_string()),
    )?;
    Ok((m, steps))
}

/// Nothing of `mesh` is left on the machine.
fn assert_gone(mesh: &str) {
    let prefix = names::mesh_prefix(mesh);
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with(&prefix)),
        "netns left: {netns}"
    );
    let opts = Options::default();
    assert!(!opts.mesh_cgroup(mesh).exists(), "cgroup left");
    assert!(!opts.state_dir(mesh).exists(), "state dir left");
    for e in std::fs::read_dir(&opts.bpffs).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(
            !(n.starts_with(&prefix) || n == names::mesh_cgroup(mesh)),
            "pin left: {n}"
        );
    }
}

/// Echoes `bytes` from `from` to `host:8080`; returns the client's own address.
fn echo(mesh: &Mesh, from: &str, host: &str, bytes: usize) -> Result<String> {
    let out = mesh.exec_output(
        from,
        &[
            "python3",
            "-c",
            ECHO_CLIENT,
            host,
            "8080",
            &bytes.to_string(),
        ],
        TIMEOUT,
    )?;
    ensure!(
        out.status.success(),
        "client in {from} -> {host}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    ensure!(f.len() == 4, "client printed {text:?}");
    ensure!(
        f[0] == bytes.to_string(),
        "{from} -> {host}: {} of {bytes} bytes came back",
        f[0]
    );
    ensure!(f[1] == f[2], "{from} -> {host}: bytes changed on the way");
    Ok(f[3].to_owned())
}

fn host_snapshot() -> (String, String) {
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let addrs = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    (fwd, String::from_utf8_lossy(&addrs.stdout).into_owned())
}

fn sh_out(mesh: &Mesh, pod: &str, script: &str) -> Result<String> {
    let out = mesh.exec_output(pod, &["sh", "-c", script], TIMEOUT)?;
    ensure!(
        out.status.success(),
        "{pod}: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn pods_talk_across_and_within_nodes_and_exec_lands_in_the_pod() -> Result<()> {
    require_root();
    let name = mesh_name("c");
    let _cleanup = Cleanup(name.clone());
    let (fwd_before, _) = host_snapshot();
    let (mesh, steps) = up_demo(&name)?;
    let all = steps.join("\n");
    assert!(
        all.contains(&format!(
            "created node node-a (netns sockmesh-{name}-node-a, 10.77.0.1"
        )),
        "{all}"
    );
    assert!(all.contains("created pod other/iperf on node-b"), "{all}");
    assert!(
        all.contains(&format!("mesh {name} is up: 2 nodes, 4 pods")),
        "{all}"
    );

    let web = mesh.pod("default/web")?.clone();
    let client = mesh.pod("client")?.clone();
    assert_eq!(web.ip.to_string(), "10.77.2.2");
    assert_eq!(client.ip.to_string(), "10.77.1.2");

    let mut server = mesh
        .pod_command("default/web", &["python3", "-c", ECHO_SERVER, "8080"])?
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        // Cross-node, by pod IP: the source is the client pod's own IP.
        let src = echo(&mesh, "default/client", &web.ip.to_string(), 1 << 20)?;
        assert_eq!(src, client.ip.to_string());
        // Same node (iperf and web are both on node-b).
        let src = echo(&mesh, "other/iperf", &web.ip.to_string(), 256 << 10)?;
        assert_eq!(src, mesh.pod("other/iperf")?.ip.to_string());
        // IPv6, cross-node.
        let web6 = web.ip6.context("web has no IPv6 address")?.to_string();
        let src = echo(&mesh, "default/web-2", &web6, 256 << 10)?;
        assert_eq!(src, mesh.pod("web-2")?.ip6.unwrap().to_string());
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result?;

    // exec runs in the pod's netns and cgroup.
    let addrs = sh_out(&mesh, "default/client", "ip -o addr show")?;
    assert!(addrs.contains("eth0    inet 10.77.1.2/32"), "{addrs}");
    assert!(addrs.contains("fd77:0:0:1::2/128"), "{addrs}");
    assert!(!addrs.contains("10.77.2."), "{addrs}");
    let cg = sh_out(&mesh, "default/client", "cat /proc/self/cgroup")?;
    assert!(
        cg.lines()
            .any(|l| l == format!("0::/sockmesh-{name}/node-node-a/pods/default_client")),
        "{cg}"
    );
    // Forwarding is on inside the node, and the machine's is untouched.
    let out = mesh
        .node_command("node-a", &["cat", "/proc/sys/net/ipv4/ip_forward"])?
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let (fwd_after, host_addrs) = host_snapshot();
    assert_eq!(fwd_before, fwd_after, "the machine's ip_forward changed");
    assert!(!host_addrs.contains("10.77."), "{host_addrs}");
    assert!(!host_addrs.contains("fd77:"), "{host_addrs}");

    // The resolved files: the harness's topology and the registry's view.
    let resolved = Topology::load(&mesh.topology_file())?;
    assert_eq!(resolved.services[0].vip.unwrap().to_string(), "10.77.240.1");
    assert!(
        resolved
            .pods
            .iter()
            .all(|p| p.uid.is_some() && !p.ips.is_empty())
    );
    let registry = std::fs::read_to_string(mesh.registry_file())?;
    let snap = mesh_core::registry::Snapshot::parse(&mesh.registry_file(), &registry)?;
    assert_eq!(snap.pods.len(), 4);
    let web_entry = snap.pods.iter().find(|p| p.name == "web").unwrap();
    assert_eq!(web_entry.ips[0].to_string(), "10.77.2.2");

    let report = mesh.down()?;
    assert_eq!(report.netns.len(), 7, "{report}");
    assert_eq!(report.cgroups.len(), 11, "{report}");
    assert_gone(&name);
    let again = down(&name, &Options::default())?;
    assert!(again.is_empty(), "{again}");
    Ok(())
}

#[test]
fn node_process_runs_in_node_netns_and_proxy_cgroup_and_down_kills_it() -> Result<()> {
    require_root();
    let name = mesh_name("p");
    let _cleanup = Cleanup(name.clone());
    let (mut mesh, _) = up_demo(&name)?;
    let log = mesh.state_dir().join("node-b.log");
    let mut child = mesh.spawn_node_process(
        "node-b",
        &[
            "sh",
            "-c",
            "cat /proc/self/cgroup; ip -o addr show dev fabric0; echo ready; exec sleep 600",
        ],
        &log,
    )?;
    let pid = child.id();
    let deadline = Instant::now() + TIMEOUT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("ready") {
            break text;
        }
        if Instant::now() > deadline {
            bail!("node process wrote {text:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        text.lines()
            .any(|l| l == format!("0::/sockmesh-{name}/node-node-b/proxy")),
        "{text}"
    );
    assert!(text.contains("fabric0    inet 10.77.0.2/24"), "{text}");

    // Another process sees it through the state file.
    let other = Mesh::open(&name, &Options::default())?;
    let rec = &other.state().created.processes[0];
    assert_eq!((rec.pid, rec.role.as_str()), (pid, "node-b"));
    assert!(rec.alive());
    assert_eq!(rec.log.as_deref(), Some(log.as_path()));
    drop(other);
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "open's drop left it up"
    );

    // The node's pin root (a proxy would pin its maps there): a real map.
    let pins = mesh.node("node-b")?.pin_root.clone();
    assert!(pins.starts_with("/sys/fs/bpf") && !pins.exists());
    std::fs::create_dir_all(pins.join("abi-v1/maps"))?;
    let map = pins.join("abi-v1/maps/sm_test");
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&map)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1", "name", "sm_test",
        ])
        .status()
        .context("bpftool")?;
    ensure!(st.success() && map.exists(), "bpftool map create: {st}");

    let report = mesh.down()?;
    assert!(report.killed.contains(&pid), "{report}");
    assert_eq!(report.pins, vec![pins.clone()], "{report}");
    assert!(!pins.exists());
    let status = child.wait()?;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status}");
    assert_gone(&name);
    Ok(())
}

/// Run by the test below in a child process: brings a mesh up, starts a node
/// process, then waits to be killed.
fn child_up(name: &str) -> Result<()> {
    let (mut mesh, _) = up_demo(name)?;
    let log = mesh.state_dir().join("node-a.log");
    mesh.spawn_node_process("node-a", &["sleep", "600"], &log)?;
    println!("up");
    std::thread::sleep(Duration::from_secs(120));
    bail!("child was not killed");
}

#[test]
fn down_removes_a_mesh_whose_up_process_was_killed() -> Result<()> {
    if let Ok(name) = std::env::var("SOCKMESH_LOCAL_TEST_CHILD") {
        return child_up(&name);
    }
    require_root();
    let name = mesh_name("k");
    let _cleanup = Cleanup(name.clone());
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "down_removes_a_mesh_whose_up_process_was_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SOCKMESH_LOCAL_TEST_CHILD", &name)
        .stdout(Stdio::null())
        .spawn()?;
    let opts = Options::default();
    let deadline = Instant::now() + TIMEOUT;
    let state = loop {
        if let Ok(Some(s)) = mesh_local::State::load(&opts.state_file(&name))
            && s.complete
            && !s.created.processes.is_empty()
        {
            break s;
        }
        if let Some(st) = child.try_wait()? {
            bail!("the child exited ({st}) before its mesh was up");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the child's mesh was not up within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(state.owner.pid, child.id());
    child.kill()?;
    child.wait()?;
    let node_proc = state.created.processes[0].clone();
    assert!(node_proc.alive(), "the node process outlives its up");
    assert!(!state.owner.alive());

    // The mesh is still up: a second `up` refuses.
    let err = up(&name, &Topology::demo(), &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::AlreadyUp { .. }), "{err}");

    let report = down(&name, &opts)?;
    assert!(report.killed.contains(&node_proc.pid), "{report}");
    assert_eq!(report.netns.len(), 7, "{report}");
    assert!(!node_proc.alive());
    assert_gone(&name);
    Ok(())
}

#[test]
fn up_twice_refuses_and_down_works_without_the_handle() -> Result<()> {
    require_root();
    let name = mesh_name("f");
    let _cleanup = Cleanup(name.clone());
    let opts = Options::default();
    let (mesh, _) = up_demo(&name)?;

    let err = up(&name, &Topology::demo(), &opts, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::AlreadyUp { .. }), "{msg}");
    assert!(
        msg.contains(&format!("mesh \"{name}\" is already up"))
            && msg.contains(&format!("run `mesh down {name}` first")),
        "{msg}"
    );
    // The refused `up` touched nothing: the mesh still works.
    let out = mesh.exec_output(
        "other/iperf",
        &["ip", "-o", "addr", "show", "dev", "eth0"],
        TIMEOUT,
    )?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.77.2.3/32"));

    // A handle that is never dropped (a crashed caller): down by name.
    std::mem::forget(mesh);
    let report = down(&name, &opts)?;
    assert_eq!(report.netns.len(), 7, "{report}");
    assert!(report.state_dir.is_some());
    assert_gone(&name);
    assert!(down(&name, &opts)?.is_empty());

    // Objects named after the mesh without a state file: `up` refuses and
    // names them, `down` sweeps them by name.
    let stray = format!("sockmesh-{name}-stray");
    let st = Command::new("ip").args(["netns", "add", &stray]).status()?;
    ensure!(st.success());
    let err = up(&name, &Topology::demo(), &opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, Error::Leftovers { .. }) && err.to_string().contains(&stray),
        "{err}"
    );
    let report = down(&name, &opts)?;
    assert_eq!(report.netns, vec![stray]);
    assert_gone(&name);

    // Bad names are refused before anything is made.
    let err = up("Bad-Name", &Topology::demo(), &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("\"Bad-Name\""), "{err}");
    Ok(())
}

#[test]
fn a_failed_up_removes_what_it_made() -> Result<()> {
    if let Ok(name) = std::env::var("SOCKMESH_LOCAL_TEST_FAIL") {
        // Child: `nsenter` fails, so `up` fails at the first node, after the
        // fabric, its netns and the mesh cgroup exist.
        let err = up(&name, &Topology::demo(), &Options::default(), &mut |_| {}).unwrap_err();
        println!("{err}");
        return Ok(());
    }
    require_root();
    let name = mesh_name("e");
    let _cleanup = Cleanup(name.clone());
    let opts = Options::default();

    let bin = tempfile::tempdir()?;
    let fake = bin.path().join("nsenter");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'nsenter: simulated failure' >&2\nexit 1\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "a_failed_up_removes_what_it_made",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SOCKMESH_LOCAL_TEST_FAIL", &name)
        .env("PATH", path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "child: {text}");
    assert!(
        text.contains(&format!("mesh \"{name}\": up failed: "))
            && text.contains("simulated failure")
            && text.contains("removed what it had made (")
            && text.contains("2 network namespaces")
            && text.contains("1 cgroups"),
        "{text}"
    );
    assert_gone(&name);

    // An object with the mesh's name and no state: refused up front.
    std::fs::create_dir(opts.mesh_cgroup(&name))?;
    let err = up(&name, &Topology::demo(), &opts, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Leftovers { .. }), "{msg}");
    assert!(
        msg.contains(&format!("cgroup {}", opts.mesh_cgroup(&name).display())),
        "{msg}"
    );
    down(&name, &opts)?;
    assert_gone(&name);

    // A bad topology is refused before anything is made.
    let mut t = Topology::demo();
    t.pods[0].node = "node-z".into();
    let err = up(&name, &t, &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("\"node-z\""), "{err}");
    assert_gone(&name);
    Ok(())
}
