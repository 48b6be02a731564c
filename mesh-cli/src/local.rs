//! The local mesh: `up`, `down`, `exec`, and opening a mesh that is up.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_local::control::{Binaries, ControlOptions};
use mesh_local::{Mesh, Options, PodInfo};

use crate::cli::{DownArgs, ExecArgs, SuperviseArgs, UpArgs};
use crate::demo;
use crate::failure::{Failure, code, name_flag, require_root};
use crate::hosts;
use crate::paint::Paint;

/// The mesh `name`, which must be up.
pub fn open(name: &str) -> Result<Mesh> {
    Ok(Mesh::open(name, &Options::default())?)
}

/// A pod of `mesh` by `namespace/name` (or `name` in `default`); unknown
/// pods fail with [`code::NOT_FOUND`] and the list of pods.
pub fn pod<'a>(mesh: &'a Mesh, pod: &str) -> Result<&'a PodInfo, Failure> {
    mesh.pod(pod).map_err(|_| {
        let known: Vec<String> = mesh.state().pods.iter().map(PodInfo::key).collect();
        Failure::new(
            code::NOT_FOUND,
            format!("mesh {} has no pod {pod:?}", mesh.name()),
        )
        .hint(format!("its pods: {}", known.join(", ")))
    })
}

/// `mesh-ca` and `mesh-proxy`, next to this program.
pub fn binaries() -> Result<Binaries> {
    let exe = std::env::current_exe().context("where is this program (current_exe)")?;
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no directory", exe.display()))?;
    let b = Binaries {
        ca: dir.join("mesh-ca"),
        proxy: dir.join("mesh-proxy"),
    };
    for p in [&b.ca, &b.proxy] {
        if !p.is_file() {
            anyhow::bail!(
                Failure::new(
                    code::FAILURE,
                    format!(
                        "{} is missing: `mesh` runs the mesh-ca and mesh-proxy programs next to it",
                        p.display()
                    )
                )
                .hint("build them with `cargo build --bins`")
            );
        }
    }
    Ok(b)
}

/// Prints numbered steps.
struct Steps {
    n: usize,
    start: Instant,
    paint: Paint,
}

impl Steps {
    fn say(&mut self, what: &str) {
        self.n += 1;
        let t = format!("{:>5.1}s", self.start.elapsed().as_secs_f64());
        // Progress only: a reader that went away is told by the summary.
        let _ = writeln!(
            std::io::stdout(),
            "{} {} {what}",
            self.paint.dim(&t),
            self.paint.green(&format!("[{:>2}]", self.n))
        );
        let _ = std::io::stdout().flush();
    }
}

pub fn up(name: &str, args: &UpArgs) -> Result<()> {
    require_root("up")?;
    mesh_local::names::validate_mesh_name(name).map_err(|reason| {
        Failure::new(code::USAGE, format!("mesh name {name:?}: {reason}"))
            .hint("use 1-16 lowercase letters and digits, starting with a letter, e.g. --name lab")
    })?;
    let opts = Options::default();
    // Refuse before printing anything when the mesh is plainly up (the
    // harness refuses the subtler cases: leftovers, an `up` under way).
    if let Ok(Some(state)) = mesh_local::State::load(&opts.state_file(name))
        && state.complete
        && !state.alive().is_empty()
    {
        let down = if name == "demo" {
            "mesh down".to_owned()
        } else {
            format!("mesh down {name}")
        };
        anyhow::bail!(
            Failure::new(
                code::MESH_STATE,
                format!(
                    "mesh {name} is already up (state {})",
                    opts.state_file(name).display()
                )
            )
            .hint(format!(
                "use it (`mesh{} status`), or remove it first with `{down}`, or pick another --name",
                name_flag(name)
            ))
        );
    }
    let bins = binaries()?;
    let (topology, policies, is_demo) = match &args.file {
        Some(f) => {
            let (t, p) = demo::load_file(f)?;
            (t, p, false)
        }
        None => (
            demo::topology(usize::from(args.nodes)),
            Some(demo::policies()),
            true,
        ),
    };
    let paint = Paint::stdout();
    writeln!(
        std::io::stdout(),
        "{} mesh {} ({} nodes, {} pods){}",
        paint.bold("Building"),
        paint.bold(name),
        topology.nodes.len(),
        topology.pods.len(),
        if is_demo { " with the demo apps" } else { "" }
    )?;
    let mut steps = Steps {
        n: 0,
        start: Instant::now(),
        paint,
    };
    // Ctrl-C: finish the step under way, then remove what was built (the
    // `Mesh` handle downs on drop); a second Ctrl-C exits at once.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        interrupted.clone(),
    )?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    let check = |what: &str| -> Result<()> {
        if interrupted.load(Ordering::Relaxed) {
            anyhow::bail!(Failure::new(
                code::INTERRUPTED,
                format!("interrupted after {what}; removed what was built")
            ));
        }
        Ok(())
    };
    let mut mesh = mesh_local::up(name, &topology, &opts, &mut |p| steps.say(&p.to_string()))?;
    check("building the namespaces")?;
    // From here on, `mesh` downs everything again if we fail (dropped).
    let control = ControlOptions {
        policies,
        ready_timeout: Duration::from_secs(args.ready_timeout.max(1)),
        ..ControlOptions::default()
    };
    let started = if args.kubernetes {
        mesh.start_kube_control(
            &bins,
            &control,
            &mesh_local::kube::KubeOptions::default(),
            &mut |s| steps.say(s),
        )
    } else {
        mesh.start_control(&bins, &control, &mut |s| steps.say(s))
    };
    started.with_context(|| {
        format!(
            "starting the control plane (logs in {})",
            mesh.state_dir().join("control").display()
        )
    })?;
    check("starting the control plane")?;
    let namespaces = hosts::write_all(&mesh)?;
    steps.say(&format!(
        "wrote hosts files for namespaces {} (service names resolve in `mesh exec`)",
        namespaces.join(", ")
    ));
    if is_demo {
        start_apps(&mesh, &mut steps)?;
    }
    check("starting the apps")?;
    let policy_names = policy_names(control.policies.as_ref());
    let state = mesh.detach();
    let n = name_flag(name);
    let p = steps.paint;
    writeln!(
        std::io::stdout(),
        "\n{} mesh {name} is up ({:.0}s); state {}",
        p.green("✓"),
        steps.start.elapsed().as_secs_f64(),
        state.display()
    )?;
    if !policy_names.is_empty() {
        writeln!(std::io::stdout(), "  policies: {}", policy_names.join(", "))?;
    }
    writeln!(std::io::stdout(), "\n{}", p.bold("Try next:"))?;
    let tries: Vec<(String, &str)> = if is_demo {
        vec![
            (
                format!("mesh{n} exec default/client -- curl -s http://web:8080/"),
                "over mTLS between node proxies",
            ),
            (
                format!("mesh{n} top"),
                "live flows from the kernel's flow maps",
            ),
            (
                format!("mesh{n} exec other/iperf -- curl -sS -m 3 http://web.default:8080/"),
                "refused: the DENY policy",
            ),
            (
                format!("mesh{n} explain other/iperf web.default:8080"),
                "why: names the policy and rule",
            ),
            (
                format!("mesh{n} exec default/client -- iperf3 -c iperf.other -t 5"),
                "then watch `mesh top`",
            ),
            (
                format!("mesh{n} status"),
                "nodes, proxies, pods, certificates",
            ),
            (format!("mesh{n} certs default/client"), "the pod's SVID"),
            (
                format!(
                    "mesh down{}",
                    if name == "demo" {
                        String::new()
                    } else {
                        format!(" {name}")
                    }
                ),
                "remove everything",
            ),
        ]
    } else {
        let first = mesh_first_pod(name);
        vec![
            (
                format!("mesh{n} status"),
                "nodes, proxies, pods, certificates",
            ),
            (format!("mesh{n} exec {first} -- sh"), "a shell in a pod"),
            (format!("mesh{n} top"), "live flows"),
            (format!("mesh down {name}"), "remove everything"),
        ]
    };
    let width = tries.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (cmd, why) in tries {
        writeln!(
            std::io::stdout(),
            "  {}  {}",
            p.cyan(&format!("{cmd:width$}")),
            p.dim(&format!("# {why}"))
        )?;
    }
    Ok(())
}

fn mesh_first_pod(name: &str) -> String {
    open(name)
        .ok()
        .and_then(|m| m.state().pods.first().map(PodInfo::key))
        .unwrap_or_else(|| "NAMESPACE/POD".into())
}

/// `namespace/name` of each policy document.
pub fn policy_names(policies: Option<&serde_norway::Value>) -> Vec<String> {
    let Some(list) = policies.and_then(|p| p.as_sequence()) else {
        return Vec::new();
    };
    list.iter()
        .map(|d| {
            let m = &d["metadata"];
            format!(
                "{}/{} ({})",
                m["namespace"].as_str().unwrap_or("?"),
                m["name"].as_str().unwrap_or("?"),
                d["spec"]["action"].as_str().unwrap_or("ALLOW")
            )
        })
        .collect()
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .take(64)
            .any(|d| d.join(program).is_file())
    })
}

/// Starts the demo app of every pod: a long-lived process in the pod's
/// cgroup (so `down` kills it), in its own process group, output to
/// `<state>/apps/<ns>_<pod>.log`; waits until servers listen.
fn start_apps(mesh: &Mesh, steps: &mut Steps) -> Result<()> {
    let dir = mesh.state_dir().join("apps");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut waits = Vec::new();
    for p in &mesh.state().pods {
        let root = dir.join(format!("{}_{}", p.namespace, p.name));
        let Some(app) = demo::app(p.labels.get("app").map(String::as_str), &root) else {
            continue;
        };
        let program = &app.argv[0];
        if !in_path(program) {
            steps.say(&format!(
                "{} {}: `{program}` is not installed; the pod runs no app",
                steps.paint.yellow("skipped"),
                p.key()
            ));
            continue;
        }
        if app.port == Some(8080) {
            std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
            std::fs::write(
                root.join("index.html"),
                format!("hello from {} on {} ({})\n", p.key(), p.node, p.ip),
            )
            .with_context(|| format!("write {}", root.display()))?;
        }
        let log = dir.join(format!("{}_{}.log", p.namespace, p.name));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("open {}", log.display()))?;
        let mut cmd = mesh.pod_command(&p.key(), &app.argv)?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("pod {}: start {}", p.key(), app.argv.join(" ")))?;
        steps.say(&format!(
            "started {} in {} (pid {}, `{}`; log {})",
            app.what,
            p.key(),
            child.id(),
            app.argv.join(" "),
            log.display()
        ));
        if let Some(port) = app.port {
            waits.push((p.clone(), port, log));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for (p, port, log) in waits {
        loop {
            if listening(&p.netns_path(), port) {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "pod {}: nothing listens on port {port} after 15s; see {}",
                    p.key(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    steps.say("the apps are listening");
    Ok(())
}

/// Whether a TCP socket listens on `port` inside the netns at `netns`.
fn listening(netns: &Path, port: u16) -> bool {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "ss", "-Hltn"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .any(|local| local.rsplit(':').next() == Some(&port.to_string())),
        Err(_) => false,
    }
}

pub fn down(name: &str, args: &DownArgs) -> Result<u8> {
    require_root("down")?;
    let report = match mesh_local::down(name, &Options::default()) {
        Ok(r) => r,
        Err(mesh_local::Error::DownIncomplete { report, .. }) => {
            print_down(&report, args.output.json())?;
            anyhow::bail!(
                "mesh {name}: down could not remove everything: {}",
                report.problems.join("; ")
            );
        }
        Err(e) => return Err(e.into()),
    };
    print_down(&report, args.output.json())?;
    Ok(0)
}

fn print_down(r: &mesh_local::DownReport, json: bool) -> std::io::Result<()> {
    if json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::json!({
                "mesh": r.mesh, "removed": !r.is_empty(), "killed": r.killed, "netns": r.netns,
                "veths": r.veths, "cgroups": r.cgroups, "pins": r.pins, "files": r.files,
                "state_dir": r.state_dir, "problems": r.problems,
            })
        )?;
    } else if r.is_empty() {
        writeln!(
            std::io::stdout(),
            "mesh {}: nothing to remove (it is not up)",
            r.mesh
        )?;
    } else {
        write!(std::io::stdout(), "{r}")?;
    }
    Ok(())
}

/// Runs a program in a pod; returns its exit code (128+N when killed by
/// signal N).
pub fn exec(name: &str, args: &ExecArgs) -> Result<u8> {
    require_root("exec")?;
    let mesh = open(name)?;
    let p = pod(&mesh, &args.pod)?.clone();
    let hosts_file = hosts::path(&mesh.state_dir(), &p.namespace);
    let argv: Vec<OsString> = if hosts_file.is_file() && in_path("unshare") {
        hosts::wrap(&hosts_file, &args.command)
    } else {
        args.command.clone()
    };
    let mut cmd = mesh.pod_command(&p.key(), &argv)?;
    // Ctrl-C reaches the program (same process group); we only wait for it.
    let interrupted = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone());
    let _ = signal_hook::flag::register(signal_hook::consts::SIGQUIT, interrupted);
    let status = cmd.status().with_context(|| {
        format!(
            "pod {}: run {:?}",
            p.key(),
            args.command
                .first()
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    })?;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => 128u8.saturating_add(u8::try_from(sig).unwrap_or(0)),
        _ => 1,
    })
}

/// The state directory of `name` (whether or not it is up).
pub fn state_dir(name: &str) -> PathBuf {
    Options::default().state_dir(name)
}

/// `mesh supervise ...` (the arguments after `supervise`): parses them and
/// runs [`supervise`]; the exit code.
/// `mesh kube-api --listen ADDR --control SOCKET` (hidden): the Kubernetes
/// mode's API server (kube-fake), run by `mesh up --kubernetes` on the
/// first node; `mesh down` ends it.
pub fn kube_api_main() -> std::process::ExitCode {
    use clap::Parser;
    #[derive(Debug, Parser)]
    #[command(name = "mesh kube-api")]
    struct KubeApiArgs {
        /// Address to serve the API on (plain HTTP).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Unix socket for the test hooks (cut watches, 410, outage, tokens).
        #[arg(long)]
        control: std::path::PathBuf,
    }
    let argv = std::iter::once(OsString::from("mesh kube-api")).chain(std::env::args_os().skip(2));
    let args = KubeApiArgs::parse_from(argv);
    match mesh_local::kube::serve_api(args.listen, &args.control) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{} mesh-kube-api: {e}", log_time());
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn supervise_main() -> std::process::ExitCode {
    use clap::Parser;
    let argv = std::iter::once(OsString::from("mesh supervise")).chain(std::env::args_os().skip(2));
    let args = SuperviseArgs::parse_from(argv);
    match supervise(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{} mesh-supervise[{}]: {e:#}", log_time(), args.node);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a node's proxy until it exits cleanly, the supervisor gets
/// SIGTERM/SIGINT (the proxy gets SIGTERM and drains) or the mesh goes
/// down; restarts it when it crashes. Its lines go to stderr (the proxy's
/// log).
pub fn supervise(args: &SuperviseArgs) -> Result<()> {
    use mesh_local::supervise::{self, Config, RestartPolicy};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    // A hangup does not stop the proxy.
    signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(AtomicBool::new(false)),
    )?;
    let cfg = Config {
        node: args.node.clone(),
        argv: args.proxy.clone(),
        record: args.record.clone(),
        hold: args.hold.clone(),
        kick: args.kick.clone(),
        mesh_state: args.mesh_state.clone(),
        policy: RestartPolicy {
            initial: Duration::from_millis(args.backoff_initial_ms.max(1)),
            max: Duration::from_millis(args.backoff_max_ms.max(args.backoff_initial_ms)),
            healthy_after: Duration::from_millis(args.healthy_after_ms),
            stop_timeout: Duration::from_millis(args.stop_timeout_ms),
        },
    };
    let node = args.node.clone();
    let mut say = |line: &str| eprintln!("{} mesh-supervise[{node}]: {line}", log_time());
    say(&format!(
        "supervising the proxy (pid {})",
        std::process::id()
    ));
    let outcome = supervise::run(&cfg, &stop, &mut say)?;
    say(&match outcome {
        supervise::Outcome::ProxyStopped(e) => format!("exiting: the proxy {e}"),
        supervise::Outcome::Stopped(e) => format!("exiting as told: the proxy {e}"),
        supervise::Outcome::MeshGone => "exiting: the mesh is down".into(),
    });
    Ok(())
}

/// `2025-11-25T08:12:00.123456Z`, as the proxy's own log lines begin.
fn log_time() -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_default()
}
