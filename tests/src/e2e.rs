//! The end-to-end harness: a local mesh per test (two node namespaces on a
//! bridge, pods with their own cgroups, the real CA and proxies), the probe
//! run inside pods as the app, and the checks a user would make.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_local::control::{Binaries, ControlOptions};
use mesh_local::{Mesh, Topology};
use serde_json::Value;

pub const T: Duration = Duration::from_secs(60);

pub fn bins() -> Result<Binaries> {
    // Workspace binaries sit next to a program of this package, or next
    // to the deps directory of a test.
    let exe = std::env::current_exe()?;
    let here = exe.parent().context("no directory for this program")?;
    let dir = if here.join("mesh-proxy").exists() {
        here.to_owned()
    } else {
        here.parent()
            .context("test binary has no target dir")?
            .to_owned()
    };
    let b = Binaries {
        ca: dir.join("mesh-ca"),
        proxy: dir.join("mesh-proxy"),
    };
    // The supervisor (`mesh supervise`) restarts crashed proxies.
    for p in [&b.ca, &b.proxy, &b.supervisor()] {
        ensure!(
            p.exists(),
            "{} is not built: run `cargo build --bins` (./x test does)",
            p.display()
        );
    }
    Ok(b)
}

/// The probe binary, built beside the mesh binaries.
pub fn probe() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let here = exe.parent().map(PathBuf::from).unwrap_or_default();
    if here.join("sockmesh-probe").exists() {
        return here.join("sockmesh-probe");
    }
    here.parent()
        .map(|d| d.join("sockmesh-probe"))
        .unwrap_or_else(|| PathBuf::from("sockmesh-probe"))
}

/// The demo, plus a Service with one endpoint (`other/iperf` on node-b),
/// so every stream to its VIP lands on one server.
pub fn soak_topology() -> Topology {
    let mut topo = Topology::demo();
    if let Some(mut svc) = topo.services.first().cloned() {
        svc.namespace = "other".into();
        svc.name = "iperf".into();
        svc.selector = [("app".to_owned(), "iperf".to_owned())].into();
        topo.services.push(svc);
    }
    // A pod opted out of the mesh on the other node: the passthrough path
    // (plain TCP from the client's pod, spliced by its proxy).
    topo.pods.push(mesh_local::Pod {
        namespace: "default".into(),
        name: "plain".into(),
        uid: None,
        node: "node-b".into(),
        service_account: "plain".into(),
        ips: Vec::new(),
        labels: Default::default(),
        annotations: [("sockmesh.io/mesh".to_owned(), "disabled".to_owned())].into(),
    });
    topo
}

/// A mesh for one test: `down` on drop, even when the test fails.
pub struct TestMesh {
    pub mesh: Mesh,
    pub bins: Binaries,
    pub opts: ControlOptions,
}

impl TestMesh {
    pub fn up(tag: &str, opts: ControlOptions) -> Result<Self> {
        Self::up_with(tag, &Topology::demo(), opts)
    }

    /// A mesh of `topology` (names prefixed by `tag` and this process).
    pub fn up_with(tag: &str, topology: &Topology, opts: ControlOptions) -> Result<Self> {
        let (mut mesh, bins) = Self::namespaces(tag, topology)?;
        mesh.start_control(&bins, &opts, &mut |_| {})
            .with_context(|| format!("control plane; logs under {}", mesh.state_dir().display()))?;
        Ok(TestMesh { mesh, bins, opts })
    }

    /// The fabric, nodes and pods of `topology` (names prefixed by `tag`
    /// and this process; a leftover of that name removed first), no
    /// control plane yet.
    fn namespaces(tag: &str, topology: &Topology) -> Result<(Mesh, Binaries)> {
        crate::require_privileges();
        let name = format!("{tag}{}", std::process::id() % 100_000);
        let bins = bins()?;
        let _ = mesh_local::down(&name, &mesh_local::Options::default());
        let mesh = mesh_local::up(
            &name,
            topology,
            &mesh_local::Options::default(),
            &mut |_| {},
        )?;
        Ok((mesh, bins))
    }

    /// A mesh of `topology` in Kubernetes mode (`mesh up --kubernetes`):
    /// the API server, the CA in cluster mode, the proxies on the
    /// Kubernetes source, every pod enrolled through mesh-cni ADD.
    pub fn up_kube(
        tag: &str,
        topology: &Topology,
        opts: ControlOptions,
        kube: &mesh_local::kube::KubeOptions,
    ) -> Result<Self> {
        let (mut mesh, bins) = Self::namespaces(tag, topology)?;
        ensure!(
            bins.cni().exists(),
            "{} is not built: run `cargo build --bins`",
            bins.cni().display()
        );
        mesh.start_kube_control(&bins, &opts, kube, &mut |_| {})
            .with_context(|| {
                format!(
                    "Kubernetes control plane; logs under {}",
                    mesh.state_dir().display()
                )
            })?;
        Ok(TestMesh { mesh, bins, opts })
    }

    pub fn ip(&self, pod: &str) -> Result<String> {
        Ok(self.mesh.pod(pod)?.ip.to_string())
    }

    pub fn vip(&self, service: &str) -> Result<String> {
        let s = self
            .mesh
            .state()
            .services
            .iter()
            .find(|s| format!("{}/{}", s.namespace, s.name) == service)
            .with_context(|| format!("no service {service}"))?;
        Ok(s.vip.to_string())
    }

    pub fn spawn(&self, pod: &str, args: &[&str]) -> Result<Proc> {
        let mut argv: Vec<String> = vec![probe().display().to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = self.mesh.pod_command(pod, &argv)?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(Proc {
            child: cmd.spawn()?,
            what: format!("{pod}: {}", args.join(" ")),
            lines: None,
        })
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.mesh.control_log(name)).unwrap_or_default()
    }
}

pub struct Proc {
    pub child: Child,
    pub what: String,
    pub lines: Option<std::io::Lines<std::io::BufReader<std::process::ChildStdout>>>,
}

impl Proc {
    /// The next JSON line, whatever its event.
    pub fn next_event(&mut self) -> Result<Value> {
        use std::io::BufRead;
        if self.lines.is_none() {
            let out = self.child.stdout.take().context("stdout")?;
            self.lines = Some(std::io::BufReader::new(out).lines());
        }
        let lines = self.lines.as_mut().context("lines")?;
        let Some(line) = lines.next() else {
            let err = self.stderr();
            bail!("`{}` ended: {err}", self.what);
        };
        let line = line?;
        serde_json::from_str(&line).with_context(|| format!("`{}` printed {line:?}", self.what))
    }

    pub fn event(&mut self, want: &str) -> Result<Value> {
        let v = self
            .next_event()
            .with_context(|| format!("waiting for `{want}`"))?;
        ensure!(
            v["event"] == want,
            "`{}`: expected {want}, got {v}",
            self.what
        );
        Ok(v)
    }

    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        let _ = self.child.kill();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    pub fn wait(mut self) -> Result<()> {
        let end = Instant::now() + T;
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    let err = self.stderr();
                    bail!("`{}` exited {st}: {err}", self.what);
                }
                return Ok(());
            }
            ensure!(Instant::now() < end, "`{}` still running", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A checksummed full-duplex transfer from `client` to `to`, served by the
/// already-listening `server`. Returns what the client saw.
pub fn transfer(
    m: &TestMesh,
    client: &str,
    to: &str,
    server: &mut Proc,
    up: u64,
    down: u64,
) -> Result<Value> {
    let (u, d) = (up.to_string(), down.to_string());
    let mut c = strict_client(m, client, to, up, 11)?;
    c.event("connected")?;
    server.event("accepted")?;
    let ct = c.event("transfer")?["transfer"].clone();
    let st = server.event("transfer")?["transfer"].clone();
    c.wait()?;
    ensure!(
        ct["received"] == down && st["received"] == up,
        "counts: client {ct} server {st} (want {u}/{d})"
    );
    ensure!(
        ct["sent_sha256"] == st["received_sha256"],
        "client->server bytes differ"
    );
    ensure!(
        st["sent_sha256"] == ct["received_sha256"],
        "server->client bytes differ"
    );
    Ok(ct)
}

/// Like [`serve`], with the `count` connections served at once.
pub fn serve_concurrent(
    m: &TestMesh,
    pod: &str,
    port: u16,
    count: usize,
    down: u64,
) -> Result<Proc> {
    let listen = format!("0.0.0.0:{port}");
    let (c, d) = (count.to_string(), down.to_string());
    let mut s = m.spawn(
        pod,
        &[
            "serve",
            "--listen",
            &listen,
            "--count",
            &c,
            "--concurrent",
            "--send",
            &d,
            "--seed",
            "22",
        ],
    )?;
    s.event("listening")?;
    Ok(s)
}

pub fn serve(m: &TestMesh, pod: &str, port: u16, count: usize, down: u64) -> Result<Proc> {
    let listen = format!("0.0.0.0:{port}");
    let (c, d) = (count.to_string(), down.to_string());
    let mut s = m.spawn(
        pod,
        &[
            "serve", "--listen", &listen, "--count", &c, "--send", &d, "--seed", "22",
        ],
    )?;
    s.event("listening")?;
    Ok(s)
}

/// Polls `ok` every 100 ms until it holds, failing after `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> Result<bool>,
) -> Result<()> {
    crate::poll(what, timeout, Duration::from_millis(100), || {
        Ok(ok()?.then_some(()))
    })
}

/// `process`'s log once `ok` accepts it: a connection's access-log line is
/// written when the connection ends, which may be just after the client
/// is done.
pub fn wait_log(
    m: &TestMesh,
    process: &str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<String> {
    wait_until(what, Duration::from_secs(10), || Ok(ok(&m.log(process))))
        .with_context(|| format!("{process}'s log:\n{}", m.log(process)))?;
    Ok(m.log(process))
}

/// The sum of `name` over every series that has all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An app in `client` that connects to `to` and moves `send` bytes of
/// stream `seed` each way, full duplex, printing digests. Strict: a
/// blocking app that fails on a spurious EAGAIN (on the mesh's paths no
/// app socket is in a socket map, so it must never see one).
pub fn strict_client(m: &TestMesh, client: &str, to: &str, send: u64, seed: u64) -> Result<Proc> {
    let (n, s) = (send.to_string(), seed.to_string());
    m.spawn(
        client,
        &[
            "--strict-eagain",
            "connect",
            "--to",
            to,
            "--send",
            &n,
            "--seed",
            &s,
        ],
    )
}

/// One connection attempt from `client` to `to`: `Ok(received bytes)` or
/// the error the app saw.
pub fn attempt(m: &TestMesh, client: &str, to: &str) -> Result<Result<u64, String>> {
    let mut c = strict_client(m, client, to, 1000, 3)?;
    let st = c.child.wait()?;
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut o) = c.child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    if let Some(mut e) = c.child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    if !st.success() {
        return Ok(Err(err));
    }
    let t = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "transfer")
        .with_context(|| format!("no transfer in {out}"))?;
    Ok(Ok(t["transfer"]["received"].as_u64().unwrap_or(0)))
}

/// A plain TCP client outside the mesh: a probe in node-b's own netns.
pub fn plain_attempt(m: &TestMesh, to: &str) -> Result<Result<String, String>> {
    let argv: Vec<String> = [probe().display().to_string()]
        .into_iter()
        .chain(
            ["--strict-eagain", "connect", "--to", to]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect();
    let out = m.mesh.node_command("node-b", &argv)?.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "banner")
        .map(|v| v["line"].as_str().unwrap_or("").to_owned())
        .ok_or_else(|| format!("no banner in {stdout}")))
}

pub fn write_registry(m: &TestMesh, doc: &Value) -> Result<()> {
    let path = m.mesh.control_registry();
    let tmp = path.with_extension("yaml.test-tmp");
    std::fs::write(&tmp, serde_norway::to_string(doc)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

pub fn workload_enrolled(m: &TestMesh, node: &str, pod: &str) -> Result<Option<bool>> {
    let (_, body) = m.mesh.admin_get(node, "/workloads")?;
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pod"] == pod))
        .map(|p| p["enrolled"] == true))
}

/// Waits until `node`'s supervisor holds its (killed) proxy down.
pub fn wait_held(m: &TestMesh, node: &str) -> Result<()> {
    wait_until(
        &format!("{node}'s supervisor to hold its proxy down"),
        Duration::from_secs(10),
        || {
            Ok(m.mesh
                .supervision(node)
                .is_some_and(|s| s.phase == mesh_local::supervise::Phase::Held))
        },
    )
}
