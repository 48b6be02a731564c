//! End-to-end tier, as an attacker would try it: plaintext must never reach
//! a meshed pod (IPv4 or IPv6; proxy up, killed, draining, or the pod
//! without a certificate), mapped addresses must not skip the mesh, the
//! proxy must not be talked into dialing itself, and one pod leaving must
//! not take a certificate other pods still serve. Needs root; fails (never
//! skips) without it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_local::Topology;
use mesh_local::control::ControlOptions;
use serde_json::Value;
use sockmesh_tests::e2e::*;

/// The probe's `connect` to `to`, giving up on a dropped SYN after 2 s.
fn connect_argv(to: &str) -> Vec<String> {
    [
        probe().display().to_string(),
        "connect".into(),
        "--to".into(),
        to.into(),
        "--connect-timeout-ms".into(),
        "2000".into(),
    ]
    .into()
}

/// The banner a `connect_argv` client printed, if it got one.
fn banner_of(mut cmd: std::process::Command) -> Result<Option<String>> {
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "banner")
        .and_then(|v| v["line"].as_str().map(str::to_owned)))
}

/// Whether a plain TCP client in `node`'s own netns (outside the mesh) gets
/// the banner of the app server at `to`: `Ok(Some(banner))` if plaintext
/// reached the app. A dropped SYN gives up after 2 s.
fn plain_banner(m: &TestMesh, node: &str, to: &str) -> Result<Option<String>> {
    banner_of(m.mesh.node_command(node, &connect_argv(to))?)
}

/// An app server in `pod` answering every connection on `[::]:8080` (IPv4
/// and IPv6) with a banner.
fn banner_server(m: &TestMesh, pod: &str) -> Result<Proc> {
    let argv: Vec<String> = [
        probe().display().to_string(),
        "server".into(),
        "--listen".into(),
        "[::]:8080".into(),
        "--count".into(),
        "1000".into(),
    ]
    .into();
    let mut cmd = m.mesh.pod_command(pod, &argv)?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut p = Proc {
        child: cmd.spawn()?,
        what: format!("{pod} banner server"),
        lines: None,
    };
    p.event("listening")?;
    Ok(p)
}

fn targets(m: &TestMesh, pod: &str) -> Result<Vec<String>> {
    let p = m.mesh.pod(pod)?;
    let mut t = vec![format!("{}:8080", p.ip)];
    t.push(format!(
        "[{}]:8080",
        p.ip6
            .context("the mesh has no IPv6 (pods got no IPv6 address)")?
    ));
    Ok(t)
}

/// Asserts that no plaintext client from `node` reaches `pod`'s app on any
/// of its addresses, saying `when`.
fn assert_sealed(m: &TestMesh, node: &str, pod: &str, when: &str) -> Result<()> {
    for to in targets(m, pod)? {
        let got = plain_banner(m, node, &to)?;
        ensure!(
            got.is_none(),
            "{when}: plaintext from {node} to {to} reached the app: {got:?}"
        );
    }
    Ok(())
}

/// `node`'s proxy draining after SIGTERM, kept draining by a connection
/// from default/client to default/web:9090 held open.
struct Draining {
    node: String,
    pid: u32,
    server: Proc,
    held: Proc,
}

impl Draining {
    fn start(m: &TestMesh, node: &str) -> Result<Draining> {
        let server = serve(m, "default/web", 9090, 1, 100)?;
        let web_9090 = format!("{}:9090", m.ip("default/web")?);
        let mut held = m.spawn(
            "default/client",
            &[
                "connect", "--to", &web_9090, "--send", "100", "--seed", "5", "--hold",
            ],
        )?;
        held.event("connected")?;
        held.event("holding")?;
        let pid = one_pid(m, node, &m.bins.proxy)?;
        signal(pid, nix::sys::signal::Signal::SIGTERM)?;
        let log = format!("proxy-{node}");
        wait_until("the drain to start", Duration::from_secs(5), || {
            Ok(m.log(&log).contains("draining"))
        })?;
        Ok(Draining {
            node: node.to_owned(),
            pid,
            server,
            held,
        })
    }

    /// Checks the proxy is still draining, then lets the held connection
    /// finish; returns the proxy's pid.
    fn finish(mut self, m: &TestMesh) -> Result<u32> {
        ensure!(
            !gone(self.pid),
            "the proxy exited with a connection still open:\n{}",
            m.log(&format!("proxy-{}", self.node))
        );
        {
            use std::io::Write;
            self.held
                .child
                .stdin
                .as_mut()
                .context("stdin")?
                .write_all(b"go\n")?;
        }
        self.held.event("transfer")?;
        self.server.event("accepted")?;
        Ok(self.pid)
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
    Ok(())
}

/// The one live (not zombie) process of `program` on `node`.
fn one_pid(m: &TestMesh, node: &str, program: &std::path::Path) -> Result<u32> {
    let pids: Vec<u32> = m
        .mesh
        .node_pids(node, program)
        .into_iter()
        .filter(|p| !gone(*p))
        .collect();
    ensure!(pids.len() == 1, "{} on {node}: {pids:?}", program.display());
    Ok(pids[0])
}

fn gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn plaintext_never_reaches_a_meshed_pod_whether_its_proxy_is_up_killed_draining_or_without_certificates()
-> Result<()> {
    let opts = ControlOptions {
        restart_proxies: false,
        ..ControlOptions::default()
    };
    let mut m = TestMesh::up("x", opts)?;
    let _srv = banner_server(&m, "default/web")?;
    // The app itself answers (from inside its own pod).
    let web4 = format!("{}:8080", m.ip("default/web")?);

    // 1. Proxy up, STRICT: IPv4 and IPv6 are reset by the proxy.
    assert_sealed(&m, "node-a", "default/web", "proxy up (STRICT)")?;

    // 2. Proxy killed: nothing listens in the pod; the kernel drops it.
    let pid = one_pid(&m, "node-b", &m.bins.proxy)?;
    signal(pid, nix::sys::signal::Signal::SIGKILL)?;
    wait_until("the killed proxy's exit", Duration::from_secs(5), || {
        Ok(gone(pid))
    })?;
    assert_sealed(&m, "node-a", "default/web", "proxy killed")?;

    // 3. Draining after SIGTERM (a tunnel held open keeps it draining).
    m.mesh.start_proxy("node-b", &m.bins, &m.opts)?;
    m.mesh.wait_proxy_ready("node-b", Duration::from_secs(30))?;
    let drain = Draining::start(&m, "node-b")?;
    assert_sealed(&m, "node-a", "default/web", "proxy draining")?;
    let pid = drain.finish(&m)?;
    wait_until("the drained proxy's exit", Duration::from_secs(10), || {
        Ok(gone(pid))
    })?;

    // 4. Captured, but no certificate (the CA is down): still sealed.
    let ca = one_pid(&m, "node-a", &m.bins.ca)?;
    signal(ca, nix::sys::signal::Signal::SIGKILL)?;
    wait_until("the CA's exit", Duration::from_secs(5), || Ok(gone(ca)))?;
    mesh_ebpf::uninstall(&m.mesh.node("node-b")?.pin_root.clone())?;
    m.mesh.start_proxy("node-b", &m.bins, &m.opts)?;
    wait_until(
        "node-b's capture of its pods",
        Duration::from_secs(20),
        || {
            Ok(m.log("proxy-node-b")
                .lines()
                .filter(|l| l.contains("enrollment failed"))
                .count()
                >= 2)
        },
    )?;
    assert_sealed(&m, "node-a", "default/web", "no certificate yet")?;
    // The one way in left is from the pod itself, which is the app's own
    // business: it still works.
    let argv: Vec<String> = [
        probe().display().to_string(),
        "connect".into(),
        "--mark".into(),
        "--to".into(),
        web4.clone(),
    ]
    .into();
    let out = m.mesh.pod_command("default/web", &argv)?.output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("server [::]:8080"),
        "the pod could not reach its own app: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn an_ipv4_mapped_ipv6_destination_goes_through_mtls_not_around_it() -> Result<()> {
    let m = TestMesh::up("y", ControlOptions::default())?;
    let web = m.ip("default/web")?;
    let mapped = format!("[::ffff:{web}]:8080");
    let mut s = serve(&m, "default/web", 8080, 1, 1000)?;
    transfer(&m, "default/client", &mapped, &mut s, 1000, 1000)?;
    // The outbound record is written when the client's proxy closes the
    // connection, which may be just after the transfer returns.
    let outbound = |log: &str| {
        log.lines()
            .rfind(|l| l.contains("direction=\"outbound\"") || l.contains("direction=outbound"))
            .map(str::to_owned)
    };
    wait_until(
        "the outbound access log line",
        Duration::from_secs(10),
        || Ok(outbound(&m.log("proxy-node-a")).is_some()),
    )
    .with_context(|| format!("no outbound access log line:\n{}", m.log("proxy-node-a")))?;
    let line = outbound(&m.log("proxy-node-a")).context("outbound line")?;
    ensure!(line.contains("mutual_tls"), "not carried over mTLS: {line}");
    ensure!(
        line.contains(&format!("{web}:8080")),
        "destination not canonicalized: {line}"
    );
    // web's proxy logs the tunnel when it closes, which may be just after
    // the client's transfer returns.
    wait_until(
        "web's proxy to log the client's identity",
        Duration::from_secs(10),
        || {
            Ok(m.log("proxy-node-b")
                .contains("spiffe://cluster.local/ns/default/sa/client"))
        },
    )
    .with_context(|| format!("web's proxy log:\n{}", m.log("proxy-node-b")))?;
    Ok(())
}

fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn the_proxy_refuses_its_own_ports_as_targets_and_its_descriptors_stay_flat() -> Result<()> {
    let opts = ControlOptions {
        inbound_mode: "PERMISSIVE".into(),
        ..ControlOptions::default()
    };
    let m = TestMesh::up("z", opts)?;
    let web = m.ip("default/web")?;
    let pid = one_pid(&m, "node-b", &m.bins.proxy)?;
    let before = fd_count(pid)?;
    for _ in 0..10 {
        // Plaintext straight at the capture port: would be forwarded to
        // itself, again and again.
        let got = plain_banner(&m, "node-a", &format!("{web}:15006"))?;
        ensure!(got.is_none(), "15006 answered: {got:?}");
        // Through the mesh: a tunnel whose target is the proxy's own port.
        for port in [15006, 15008, 15001] {
            let r = attempt(&m, "default/client", &format!("{web}:{port}"))?;
            ensure!(r.is_err(), "a tunnel to web:{port} was carried: {r:?}");
        }
    }
    // Connections close asynchronously: poll until the count settles.
    let mut now = fd_count(pid)?;
    wait_until(
        "the proxy's descriptors to settle",
        Duration::from_secs(10),
        || {
            now = fd_count(pid)?;
            Ok(now <= before + 4)
        },
    )
    .with_context(|| format!("descriptors {before} -> {now}"))?;
    wait_log(&m, "proxy-node-b", "the refusal logged", |log| {
        log.contains("the proxy's own port is not")
    })?;
    Ok(())
}

#[test]
fn a_pod_leaving_does_not_take_the_certificate_its_service_account_still_uses() -> Result<()> {
    let mut topo = Topology::demo();
    let mut twin = topo
        .pods
        .iter()
        .find(|p| p.name == "web")
        .cloned()
        .context("demo has web")?;
    twin.name = "web-3".into();
    topo.pods.push(twin);
    let m = TestMesh::up_with("v", &topo, ControlOptions::default())?;
    let web = format!("{}:8080", m.ip("default/web")?);
    let mut s = serve(&m, "default/web", 8080, 2, 100)?;
    assert_eq!(attempt(&m, "default/client", &web)?, Ok(100));
    s.event("accepted")?;
    s.event("transfer")?;
    // web-3 (same node, same service account) leaves the mesh.
    let mut without = m.mesh.registry_document(None);
    if let Some(pods) = without["pods"].as_array_mut() {
        pods.retain(|p| p["name"] != "web-3");
    }
    write_registry(&m, &without)?;
    wait_until("web-3's unenrollment", Duration::from_secs(10), || {
        Ok(workload_enrolled(&m, "node-b", "default/web-3")?.is_none())
    })?;
    // A new tunnel into web still gets web's certificate.
    let r = attempt(&m, "default/client", &web)?;
    ensure!(r == Ok(100), "web lost its certificate with web-3: {r:?}");
    s.event("accepted")?;
    let (_, certs) = m.mesh.admin_get("node-b", "/certs")?;
    ensure!(
        certs.contains("spiffe://cluster.local/ns/default/sa/web"),
        "web's certificate is gone from node-b: {certs}"
    );
    Ok(())
}

/// Whether an app in `pod` gets the banner of the app server at `to`
/// (a dropped or refused connect gives up within 2 s).
fn pod_banner(m: &TestMesh, pod: &str, to: &str) -> Result<Option<String>> {
    banner_of(m.mesh.pod_command(pod, &connect_argv(to))?)
}

/// A kernel counter of `node`'s data path, read from its pins (works with
/// the proxy dead).
fn kernel_stat(m: &TestMesh, node: &str, name: &str) -> Result<u64> {
    let dp = mesh_ebpf::Datapath::open(&m.mesh.node(node)?.pin_root)?;
    Ok(dp.stats()?.get(name).copied().unwrap_or(0))
}

/// The kernel same-node path carries a connection with no proxy socket,
/// so it must close with the proxy: once client -> web-2 (both on node-a)
/// has been authorized and taken it, killing node-a's proxy, or draining
/// it, leaves the client nothing that reaches web-2's app.
#[test]
fn the_kernel_same_node_path_closes_when_the_proxy_dies_or_drains() -> Result<()> {
    let opts = ControlOptions {
        restart_proxies: false,
        ..ControlOptions::default()
    };
    let mut m = TestMesh::up("kd", opts)?;
    let _srv = banner_server(&m, "default/web-2")?;
    // IPv4 and IPv6.
    let all = targets(&m, "default/web-2")?;
    let authorize = |m: &TestMesh, when: &str| -> Result<()> {
        for to in &all {
            let before = kernel_stat(m, "node-a", "connect_direct")?;
            // The first connect is decided by the proxy (and authorizes
            // the path), the second takes it.
            for i in 0..2 {
                let got = pod_banner(m, "default/client", to)?;
                ensure!(got.is_some(), "{when}: connect {i} to {to} got no banner");
            }
            ensure!(
                kernel_stat(m, "node-a", "connect_direct")? == before + 1,
                "{when}: the second connect to {to} did not take the kernel path"
            );
        }
        Ok(())
    };
    let sealed = |m: &TestMesh, when: &str| -> Result<()> {
        let direct = kernel_stat(m, "node-a", "connect_direct")?;
        for to in &all {
            let got = pod_banner(m, "default/client", to)?;
            ensure!(got.is_none(), "{when}: the client reached {to}: {got:?}");
        }
        ensure!(
            kernel_stat(m, "node-a", "connect_direct")? == direct,
            "{when}: a connect still took the kernel path"
        );
        Ok(())
    };
    authorize(&m, "proxy up")?;

    // Killed: no generation moved, but the listener the kernel checks is
    // gone with the process.
    let pid = one_pid(&m, "node-a", &m.bins.proxy)?;
    signal(pid, nix::sys::signal::Signal::SIGKILL)?;
    wait_until("the killed proxy's exit", Duration::from_secs(5), || {
        Ok(gone(pid))
    })?;
    sealed(&m, "proxy killed")?;

    // Restarted: what the dead proxy authorized is void; decided anew.
    m.mesh.start_proxy("node-a", &m.bins, &m.opts)?;
    m.mesh.wait_proxy_ready("node-a", Duration::from_secs(30))?;
    authorize(&m, "proxy restarted")?;

    // Draining (a connection held open keeps it draining).
    let drain = Draining::start(&m, "node-a")?;
    sealed(&m, "proxy draining")?;
    drain.finish(&m)?;
    Ok(())
}
