//! The mesh's control plane on the local topology: per-node CA tokens, the
//! registry file the CA and proxies read (with each pod's netns), the CA on
//! the first node, one `mesh-proxy` per node; readiness waits; and plain
//! HTTP to a node's admin ports from inside its netns.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::supervise::{self, RestartPolicy, Supervision};
use crate::{Error, Mesh};

/// Where the mesh's programs are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub ca: PathBuf,
    pub proxy: PathBuf,
}

impl Binaries {
    /// The proxies' supervisor: the `mesh` program next to `mesh-proxy`
    /// (its hidden `mesh supervise` command).
    pub fn supervisor(&self) -> PathBuf {
        self.proxy.with_file_name("mesh")
    }

    /// The CNI plugin, next to `mesh-proxy`.
    pub fn cni(&self) -> PathBuf {
        self.proxy.with_file_name("mesh-cni")
    }
}

#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub trust_domain: String,
    /// `STRICT` or `PERMISSIVE`.
    pub inbound_mode: String,
    /// The proxies' and CA's log filter.
    pub log: String,
    /// AuthorizationPolicy documents (a YAML list), or none.
    pub policies: Option<serde_norway::Value>,
    /// Bound on each readiness wait.
    pub ready_timeout: Duration,
    /// Data-plane worker threads of each proxy.
    pub proxy_workers: usize,
    /// Run each proxy under a supervisor ([`Binaries::supervisor`]) that
    /// restarts it when it crashes, as a DaemonSet would. Off: a proxy
    /// that dies stays down until [`Mesh::start_proxy`].
    pub restart_proxies: bool,
    /// The supervisor's backoff.
    pub restart_policy: RestartPolicy,
    /// Each proxy serves mesh-cni at [`Mesh::cni_socket`]
    /// (`mesh-proxy --cni-socket`).
    pub cni_sockets: bool,
    /// The kernel same-node path (`mesh-proxy --same-node-direct`); off,
    /// every same-node connection is spliced by the proxy.
    pub same_node_direct: bool,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            trust_domain: "cluster.local".into(),
            inbound_mode: "STRICT".into(),
            log: "info".into(),
            policies: None,
            ready_timeout: Duration::from_secs(30),
            proxy_workers: 2,
            restart_proxies: true,
            restart_policy: RestartPolicy::default(),
            cni_sockets: false,
            same_node_direct: true,
        }
    }
}

pub const CA_PORT: u16 = 15012;
pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READY_PORT: u16 = 15021;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Most bytes of an answer body [`http`] reads.
const MAX_BODY: usize = 16 << 20;

/// An HTTP/1.1 request from inside the network namespace at `netns` (the
/// node's admin ports listen there), made with hyper's client on a small
/// runtime of its own in a thread that entered the namespace. Returns
/// status and body; the whole exchange is bounded by `timeout`.
pub fn http(
    netns: &Path,
    method: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    http_request(netns, method, addr, path, None, timeout)
}

/// [`http`] with a request body: `(content type, body)`.
pub fn http_request(
    netns: &Path,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<(&str, &str)>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let file = std::fs::File::open(netns)?;
    let method = http::Method::from_bytes(method.as_bytes()).map_err(std::io::Error::other)?;
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<(u16, String)> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            // Connected here, in the namespace; the runtime only drives it.
            let tcp = TcpStream::connect_timeout(&addr, timeout)?;
            tcp.set_nonblocking(true)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                tokio::time::timeout(timeout, exchange_with(tcp, method, addr, path, body))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("{addr}{path}: no answer within {timeout:?}"),
                        )
                    })?
            })
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// One request on `tcp` (with a body: `(content type, body)`), and its answer.
async fn exchange_with(
    tcp: TcpStream,
    method: http::Method,
    addr: SocketAddr,
    path: &str,
    body: Option<(&str, &str)>,
) -> std::io::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let bad = |e: &dyn std::fmt::Display| std::io::Error::other(format!("{addr}{path}: {e}"));
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(tcp)?);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| bad(&e))?;
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    if let Some((content_type, _)) = body {
        request = request.header(http::header::CONTENT_TYPE, content_type);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.map(|(_, b)| b.to_owned()).unwrap_or_default(),
        )))
        .map_err(|e| bad(&e))?;
    let answer = send.send_request(request).await.map_err(|e| bad(&e))?;
    let status = answer.status().as_u16();
    let body = http_body_util::Limited::new(answer.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| bad(&e))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

impl Mesh {
    fn control_dir(&self, sub: &str) -> Result<PathBuf, Error> {
        let d = self.state_dir().join(sub);
        std::fs::create_dir_all(&d).map_err(io("create dir", &d))?;
        Ok(d)
    }

    /// The registry as the CA and proxies read it: nodes, pods with their
    /// addresses and netns, services with their VIPs, and `policies`.
    pub fn registry_document(&self, policies: Option<&serde_norway::Value>) -> serde_json::Value {
        let st = self.state();
        let pods: Vec<_> = st
            .pods
            .iter()
            .map(|p| {
                let mut ips = vec![p.ip.to_string()];
                if let Some(v6) = p.ip6 {
                    ips.push(v6.to_string());
                }
                json!({
                    "namespace": p.namespace, "name": p.name, "uid": p.uid, "node": p.node,
                    "service_account": p.service_account, "ips": ips, "labels": p.labels,
                    "annotations": p.annotations, "netns": p.netns_path(),
                })
            })
            .collect();
        let services: Vec<_> = st
            .services
            .iter()
            .map(|s| {
                json!({
                    "namespace": s.namespace, "name": s.name, "vip": s.vip.to_string(),
                    "ports": s.ports.iter().map(|(p, t)| json!({"port": p, "target_port": t})).collect::<Vec<_>>(),
                    "selector": s.selector,
                })
            })
            .collect();
        let mut doc = json!({
            "nodes": st.nodes.iter().map(|n| json!({"name": n.name})).collect::<Vec<_>>(),
            "pods": pods,
            "services": services,
        });
        if !st.namespaces.is_empty() {
            doc["namespaces"] = st
                .namespaces
                .iter()
                .map(|(name, labels)| json!({"name": name, "labels": labels}))
                .collect();
        }
        if let Some(v) = policies.and_then(|p| serde_json::to_value(p).ok()) {
            doc["policies"] = v;
        }
        doc
    }

    /// Where the control plane reads the registry.
    pub fn control_registry(&self) -> PathBuf {
        self.state_dir().join("control").join("registry.yaml")
    }

    /// Writes the registry atomically (the proxies pick changes up without
    /// a restart: a policy change applies to new connections).
    pub fn write_control_registry(
        &self,
        policies: Option<&serde_norway::Value>,
    ) -> Result<PathBuf, Error> {
        let dir = self.control_dir("control")?;
        let path = dir.join("registry.yaml");
        let tmp = dir.join("registry.yaml.tmp");
        let text =
            serde_norway::to_string(&self.registry_document(policies)).map_err(|e| Error::Io {
                what: "encode registry",
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        std::fs::write(&tmp, text).map_err(io("write registry", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("replace registry", &path))?;
        Ok(path)
    }

    /// The CA's address: it runs on the first node.
    pub fn ca_address(&self) -> Result<SocketAddr, Error> {
        let first = self.state().nodes.first().ok_or_else(|| Error::Unknown {
            mesh: self.state().mesh.clone(),
            what: "node",
            name: "(first)".into(),
        })?;
        Ok(SocketAddr::new(first.fabric_ip.into(), CA_PORT))
    }

    fn ca_dir(&self) -> PathBuf {
        self.state_dir().join("control").join("ca")
    }
    fn tokens_dir(&self) -> PathBuf {
        self.state_dir().join("control").join("tokens")
    }
    /// The log file of a control-plane process (`ca`, `proxy-<node>`).
    pub fn control_log(&self, name: &str) -> PathBuf {
        self.state_dir().join("control").join(format!("{name}.log"))
    }

    /// Starts the CA and every node's proxy and waits until each proxy is
    /// ready (all its pods enrolled with certificates). `progress` gets one
    /// line per step.
    pub fn start_control(
        &mut self,
        bins: &Binaries,
        opts: &ControlOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), Error> {
        self.control_dir("control")?;
        let tokens = self.control_dir("control/tokens")?;
        let ca_dir = self.ca_dir();
        let nodes: Vec<String> = self.state().nodes.iter().map(|n| n.name.clone()).collect();
        for node in &nodes {
            let mut cmd = Command::new(&bins.ca);
            cmd.args(["node-token", "--tokens-dir"])
                .arg(&tokens)
                .arg(node);
            crate::command::output(&mut cmd, Duration::from_secs(10))?;
        }
        progress(&format!(
            "issued CA tokens for {} nodes ({})",
            nodes.len(),
            tokens.display()
        ));
        let registry = self.write_control_registry(opts.policies.as_ref())?;
        progress(&format!("wrote the registry {}", registry.display()));

        let first = nodes.first().cloned().ok_or_else(|| Error::Unknown {
            mesh: self.state().mesh.clone(),
            what: "node",
            name: "(any)".into(),
        })?;
        let ca_addr = self.ca_address()?;
        let ca_argv: Vec<String> = vec![
            bins.ca.display().to_string(),
            "--trust-domain".into(),
            opts.trust_domain.clone(),
            "--state-dir".into(),
            ca_dir.display().to_string(),
            "--registry".into(),
            registry.display().to_string(),
            "--tokens-dir".into(),
            tokens.display().to_string(),
            "--listen".into(),
            format!("0.0.0.0:{CA_PORT}"),
        ];
        let log = self.control_log("ca");
        self.spawn_node_process(&first, &ca_argv, &log)?;
        let bundle = ca_dir.join("trust-bundle.pem");
        wait_for(
            opts.ready_timeout,
            &format!("the CA to write {}", bundle.display()),
            &log,
            || bundle.exists(),
        )?;
        progress(&format!(
            "started the CA on {first} ({ca_addr}); trust bundle {}",
            bundle.display()
        ));

        for node in &nodes {
            self.start_proxy(node, bins, opts)?;
            let how = match self.supervision(node) {
                Some(s) if s.supervisor_alive() => format!(
                    "supervised by pid {}: restarted when it crashes",
                    s.supervisor.pid
                ),
                _ => "not supervised".into(),
            };
            progress(&format!(
                "started mesh-proxy on {node} ({how}; log {})",
                self.control_log(&format!("proxy-{node}")).display()
            ));
        }
        for node in &nodes {
            self.wait_proxy_ready(node, opts.ready_timeout)?;
            progress(&format!("mesh-proxy on {node} is ready"));
        }
        Ok(())
    }

    /// Starts (or restarts) the proxy of `node`. Supervised (the default,
    /// [`ControlOptions::restart_proxies`]): lifts a [`Mesh::hold_proxy`],
    /// has the node's supervisor start the proxy now if it is down (or
    /// starts a supervisor if there is none), and returns once the proxy
    /// runs; does nothing more when it already runs (also when its
    /// supervisor was killed and it runs on). Unsupervised: spawns
    /// the proxy. Either way it returns once the proxy is in its cgroup.
    pub fn start_proxy(
        &mut self,
        node: &str,
        bins: &Binaries,
        opts: &ControlOptions,
    ) -> Result<(), Error> {
        let argv = self.proxy_argv(node, bins, opts)?;
        let log = self.control_log(&format!("proxy-{node}"));
        if let Some(s) = self.supervision(node)
            && s.supervisor_alive()
        {
            // Its supervisor is there (whatever `opts` says now).
            let _ = std::fs::remove_file(self.proxy_hold_file(node));
            if s.proxy_pid().is_some() {
                return Ok(());
            }
            let kick = self.proxy_kick_file(node);
            crate::state::write_file(&kick, b"")?;
            return self.wait_supervised_proxy(node, s.supervisor.pid, &log, None);
        }
        if self
            .supervision(node)
            .is_some_and(|s| s.proxy_pid().is_some())
        {
            // Its supervisor was killed, the proxy runs on: leave it be
            // (a second one would fight it for the node's ports).
            tracing::warn!(node, "mesh-proxy runs without its supervisor");
            return Ok(());
        }
        let supervisor = bins.supervisor();
        if !opts.restart_proxies {
            self.spawn_node_process(node, &argv, &log)?;
            return Ok(());
        }
        if !supervisor.is_file() {
            tracing::warn!(
                node,
                "{} is missing: the proxy runs unsupervised (build mesh-cli: `cargo build --bins`)",
                supervisor.display()
            );
            self.spawn_node_process(node, &argv, &log)?;
            return Ok(());
        }
        let _ = std::fs::remove_file(self.proxy_hold_file(node));
        let _ = std::fs::remove_file(self.proxy_kick_file(node));
        let cfg = supervise::Config {
            node: node.to_owned(),
            argv: argv.into_iter().map(Into::into).collect(),
            record: self.supervision_file(node),
            hold: self.proxy_hold_file(node),
            kick: self.proxy_kick_file(node),
            mesh_state: self.options.state_file(&self.state.mesh),
            policy: opts.restart_policy,
        };
        let mut sup_argv: Vec<std::ffi::OsString> = vec![supervisor.into(), "supervise".into()];
        sup_argv.extend(cfg.to_args());
        let mut child = self.spawn_node_process(node, &sup_argv, &log)?;
        let r = self.wait_supervised_proxy(node, child.id(), &log, Some(&mut child));
        if r.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        r
    }

    /// The proxy's command line on `node`.
    fn proxy_argv(
        &self,
        node: &str,
        bins: &Binaries,
        opts: &ControlOptions,
    ) -> Result<Vec<String>, Error> {
        let n = self.node(node)?;
        let metrics_state = self
            .control_dir("control")?
            .join(format!("metrics-{node}.json"));
        let mut argv = vec![
            bins.proxy.display().to_string(),
            "--node".into(),
            node.to_owned(),
            "--registry".into(),
            self.control_registry().display().to_string(),
            "--trust-domain".into(),
            opts.trust_domain.clone(),
            "--ca".into(),
            self.ca_address()?.to_string(),
            "--ca-bundle".into(),
            self.ca_dir().join("trust-bundle.pem").display().to_string(),
            "--token-file".into(),
            self.tokens_dir()
                .join(format!("{node}.token"))
                .display()
                .to_string(),
            "--cgroup".into(),
            n.cgroup.display().to_string(),
            "--pin-root".into(),
            n.pin_root.display().to_string(),
            "--inbound-mode".into(),
            opts.inbound_mode.clone(),
            "--log".into(),
            opts.log.clone(),
            "--workers".into(),
            opts.proxy_workers.to_string(),
            // Counters continue across a crash and restart of the proxy.
            "--metrics-state".into(),
            metrics_state.display().to_string(),
        ];
        if !opts.same_node_direct {
            argv.push("--same-node-direct".into());
            argv.push("off".into());
        }
        if opts.cni_sockets {
            argv.push("--cni-socket".into());
            argv.push(self.cni_socket(node).display().to_string());
        }
        if self.state().kube.is_some() {
            return self.kube_proxy_argv(node, argv);
        }
        Ok(argv)
    }

    /// Waits (bounded by the command timeout) until the supervisor `pid`
    /// of `node` reports a running proxy. With the supervisor's `child`
    /// handle, fails as soon as it exits (e.g. a `mesh` program too old to
    /// know `supervise`).
    fn wait_supervised_proxy(
        &self,
        node: &str,
        pid: u32,
        log: &Path,
        mut child: Option<&mut std::process::Child>,
    ) -> Result<(), Error> {
        let record = self.supervision_file(node);
        let what = format!("the supervisor (pid {pid}) to start mesh-proxy on {node}");
        let mut exited = None;
        let r = wait_for(self.options.command_timeout, &what, log, || {
            if let Some(c) = child.as_deref_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                exited = Some(status.to_string());
                return true;
            }
            Supervision::load(&record).ok().flatten().is_some_and(|s| {
                s.supervisor.pid == pid && s.supervisor_alive() && s.proxy_pid().is_some()
            })
        });
        if let Some(status) = exited {
            return Err(Error::Command {
                cmd: what,
                status: format!("the supervisor exited ({status})"),
                stderr: log_tail(log, 15),
            });
        }
        r
    }

    /// Where `node`'s proxy serves mesh-cni (with
    /// [`ControlOptions::cni_sockets`]).
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.state_dir()
            .join("control")
            .join(format!("cni-{node}.sock"))
    }

    /// The record of `node`'s proxy supervisor (see [`supervise`]).
    pub fn supervision_file(&self, node: &str) -> PathBuf {
        self.state_dir()
            .join("control")
            .join(format!("supervise-{node}.json"))
    }

    /// While this file exists, `node`'s supervisor leaves a crashed proxy
    /// down.
    pub fn proxy_hold_file(&self, node: &str) -> PathBuf {
        self.state_dir()
            .join("control")
            .join(format!("hold-{node}"))
    }

    fn proxy_kick_file(&self, node: &str) -> PathBuf {
        self.state_dir()
            .join("control")
            .join(format!("start-{node}"))
    }

    /// What `node`'s supervisor last recorded, if the proxy is supervised.
    pub fn supervision(&self, node: &str) -> Option<Supervision> {
        Supervision::load(&self.supervision_file(node))
            .ok()
            .flatten()
    }

    /// Keeps `node`'s proxy down when it next dies (its supervisor waits)
    /// until [`Mesh::start_proxy`]: for tests of what happens while a node
    /// has no proxy.
    pub fn hold_proxy(&self, node: &str) -> Result<(), Error> {
        self.node(node)?;
        let dir = self.control_dir("control")?;
        crate::state::write_file(&dir.join(format!("hold-{node}")), b"")
    }

    /// The pid of `node`'s running proxy (supervised or not).
    pub fn proxy_pid(&self, node: &str) -> Option<u32> {
        if let Some(pid) = self.supervision(node).and_then(|s| s.proxy_pid()) {
            return Some(pid);
        }
        self.state()
            .created
            .processes
            .iter()
            .filter(|p| p.role == node)
            .filter(|p| p.argv.first().is_some_and(|a| a.ends_with("mesh-proxy")))
            .filter(|p| p.alive())
            .map(|p| p.pid)
            .next_back()
    }

    /// Waits until `node`'s proxy answers 200 on its readiness port.
    pub fn wait_proxy_ready(&self, node: &str, timeout: Duration) -> Result<(), Error> {
        let n = self.node(node)?.clone();
        let addr = SocketAddr::from(([127, 0, 0, 1], READY_PORT));
        let log = self.control_log(&format!("proxy-{node}"));
        let mut last = String::new();
        let r = wait_for(
            timeout,
            &format!("mesh-proxy on {node} to be ready"),
            &log,
            || match http(
                &n.netns_path(),
                "GET",
                addr,
                "/healthz/ready",
                Duration::from_secs(2),
            ) {
                Ok((200, _)) => true,
                Ok((_, body)) => {
                    last = body.trim().to_owned();
                    false
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            },
        );
        r.map_err(|e| match e {
            Error::Timeout { cmd, after } => Error::Timeout {
                cmd: format!("{cmd} (last answer: {last})"),
                after,
            },
            e => e,
        })
    }

    /// GET on `node`'s admin port (localhost:15000 inside the node netns).
    pub fn admin_get(&self, node: &str, path: &str) -> Result<(u16, String), Error> {
        let n = self.node(node)?;
        http(
            &n.netns_path(),
            "GET",
            SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            path,
            Duration::from_secs(5),
        )
        .map_err(io("admin request", &n.netns_path()))
    }

    /// GET on `node`'s metrics port.
    pub fn metrics(&self, node: &str) -> Result<String, Error> {
        let n = self.node(node)?;
        let (status, body) = http(
            &n.netns_path(),
            "GET",
            SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)),
            "/metrics",
            Duration::from_secs(5),
        )
        .map_err(io("metrics request", &n.netns_path()))?;
        if status != 200 {
            return Err(Error::Io {
                what: "metrics request",
                path: n.netns_path(),
                source: std::io::Error::other(format!("status {status}: {body}")),
            });
        }
        Ok(body)
    }

    /// Pids of the processes running on `node` whose program is `program`
    /// (including a supervised proxy).
    pub fn node_pids(&self, node: &str, program: &Path) -> Vec<u32> {
        let want = program.display().to_string();
        let supervised = self.supervision(node).and_then(|s| s.proxy);
        let mut pids: Vec<u32> = self
            .state()
            .created
            .processes
            .iter()
            .chain(supervised.as_ref())
            .filter(|p| p.role == node && p.argv.first() == Some(&want))
            .filter(|p| Path::new("/proc").join(p.pid.to_string()).exists())
            .map(|p| p.pid)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

/// The last `n` lines of a log, for an error message.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n  ");
    format!("last lines of {}:\n  {tail}", log.display())
}

/// Polls `ok` every 50 ms until it holds or `timeout` passes.
pub(crate) fn wait_for(
    timeout: Duration,
    what: &str,
    log: &Path,
    mut ok: impl FnMut() -> bool,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                cmd: format!("waiting for {what}; {}", log_tail(log, 15)),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A server that answers one request with `answer`, verbatim.
    fn answering(answer: &'static str) -> SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req);
            c.write_all(answer.as_bytes()).unwrap();
        });
        addr
    }

    fn ask(addr: SocketAddr) -> std::io::Result<(u16, String)> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nonblocking(true)?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(exchange_with(tcp, http::Method::GET, addr, "/flows", None))
    }

    #[test]
    fn chunked_and_sized_bodies_are_read_whole() {
        let chunked = answering(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        );
        assert_eq!(ask(chunked).unwrap(), (200, "hello world".into()));
        let sized =
            answering("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready");
        assert_eq!(ask(sized).unwrap(), (503, "not ready".into()));
    }

    #[test]
    fn a_garbled_answer_is_an_error_naming_the_address() {
        let addr = answering("SSH-2.0-OpenSSH\r\n\r\n");
        let e = ask(addr).unwrap_err().to_string();
        assert!(e.contains(&format!("{addr}/flows")), "{e}");
    }
}
