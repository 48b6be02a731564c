//! `sockmesh-bench redirect [JSON]`: the app<->proxy leg through the sk_msg
//! redirect vs the same leg over plain loopback TCP, in one run, same
//! processes, same netns: request/response latency (1 B, 1 KiB) and
//! single-stream throughput. Prints a table with ratios, writes JSON.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mesh_ebpf::Datapath;
use serde_json::{Value, json};
use sockmesh_tests::Sandbox;

const T: Duration = Duration::from_secs(120);
const ROUNDS: &str = "20000";
const STREAM_BYTES: &str = "4294967296";

fn run_case(
    sb: &Sandbox,
    pod: &std::path::Path,
    redirect: bool,
    load: &[&str],
    sink: bool,
) -> Result<Value> {
    // Plain: the app connects to the listener on loopback (the hooks leave
    // loopback destinations alone). Redirect: the app connects to a remote
    // address, rewritten to the same kind of listener, sk_msg in between.
    let (listen, to) = if redirect {
        ("127.0.0.1:15001", "10.77.0.9:9000")
    } else {
        ("127.0.0.1:15002", "127.0.0.1:15002")
    };
    let mut server_args = vec!["bench", "--listen", listen];
    if sink {
        server_args.push("--sink");
    }
    let mut server = sb.probe(pod, &server_args)?;
    let v = server.line(T)?;
    ensure!(v["event"] == "listening", "{v}");
    let mut args = vec!["load", "--to", to];
    args.extend_from_slice(load);
    let mut client = sb.probe(pod, &args)?;
    let r = client.line(T)?;
    client.wait(T)?;
    server.wait(T)?;
    Ok(r)
}

fn main() -> Result<()> {
    let mut argv = std::env::args().skip(1);
    let what = argv.next().unwrap_or_else(|| "redirect".into());
    let json_out = argv.next();
    match what.as_str() {
        "redirect" => {}
        "mesh" => return mesh(json_out),
        "kube" => {
            let rest: Vec<String> = json_out.into_iter().chain(argv).collect();
            return sockmesh_tests::kube_bench::run(&rest);
        }
        _ => bail!("unknown benchmark {what:?}: `redirect`, `mesh` or `kube`"),
    }
    let probe = std::env::current_exe()?.with_file_name("sockmesh-probe");
    let mut sb = Sandbox::new(&probe)?;
    let pod = sb.add_netns("pod")?;
    let mut dp = Datapath::install(&sb.cgroup, &sb.pin_root)?;
    ensure!(dp.mode() == &mesh_ebpf::Mode::Sockmap, "mode {}", dp.mode());
    // The leg under test is the sk_msg redirect (opt-in in the mesh).
    dp.set_redirect(true)?;
    dp.enroll(&pod)?;

    let mut rows = Vec::new();
    for (name, load, sink, key) in [
        (
            "RR 1 B",
            vec!["--size", "1", "--rounds", ROUNDS],
            false,
            "rr",
        ),
        (
            "RR 1 KiB",
            vec!["--size", "1024", "--rounds", ROUNDS],
            false,
            "rr",
        ),
        (
            "stream 4 GiB",
            vec!["--stream", STREAM_BYTES],
            true,
            "stream",
        ),
    ] {
        eprintln!("running {name} (plain, then redirect)...");
        let plain = run_case(&sb, &pod, false, &load, sink)?;
        let redir = run_case(&sb, &pod, true, &load, sink)?;
        ensure!(
            plain["event"] == key && redir["event"] == key,
            "{plain} {redir}"
        );
        rows.push((name, plain, redir));
    }
    let stats = dp.stats()?;
    ensure!(
        stats["msg_redirected"] > 0,
        "nothing was redirected: {stats:?}"
    );

    println!(
        "\nsockmesh bench redirect: app<->proxy leg, plain loopback TCP vs sk_msg redirect (one run)"
    );
    println!(
        "{:<26} {:>14} {:>14} {:>10}",
        "metric", "plain TCP", "redirect", "ratio"
    );
    let mut out = Vec::new();
    for (name, plain, redir) in &rows {
        let metrics: &[(&str, &str)] = if plain["event"] == "rr" {
            &[("p50_us", "p50 (us)"), ("p99_us", "p99 (us)")]
        } else {
            &[("gbit_per_s", "throughput (Gbit/s)")]
        };
        for (k, label) in metrics {
            let (a, b) = (
                plain[k].as_f64().unwrap_or(f64::NAN),
                redir[k].as_f64().unwrap_or(f64::NAN),
            );
            println!(
                "{:<26} {:>14.2} {:>14.2} {:>9.2}x",
                format!("{name} {label}"),
                a,
                b,
                b / a
            );
            out.push(json!({"case": name, "metric": k, "plain": a, "redirect": b, "ratio": b / a}));
        }
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = json!({"benchmark": "redirect", "kernel": kernel.trim(),
                     "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                     "results": out});
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("\nJSON: {path}");
    }
    Ok(())
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15: indexes 11 and 12 after ')'.
    (get(11) + get(12)) / ticks
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct MeshRun {
    mesh: mesh_local::Mesh,
    probe: std::path::PathBuf,
}

impl MeshRun {
    fn spawn(
        &self,
        pod: &str,
        args: &[&str],
    ) -> Result<(
        std::process::Child,
        std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    )> {
        use std::io::BufRead;
        let mut argv = vec![self.probe.display().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut cmd = self.mesh.pod_command(pod, &argv)?;
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdout"))?;
        Ok((child, std::io::BufReader::new(out).lines()))
    }

    /// Runs a bench server in `server_pod` and a load client in the client
    /// pod; returns the client's result line.
    fn case(
        &self,
        client_pod: &str,
        server_pod: &str,
        server: &[&str],
        load: &[&str],
    ) -> Result<Value> {
        let (mut s, mut sl) = self.spawn(server_pod, server)?;
        let first: Value =
            serde_json::from_str(&sl.next().ok_or_else(|| anyhow::anyhow!("server died"))??)?;
        ensure!(first["event"] == "listening", "{first}");
        let (mut c, mut cl) = self.spawn(client_pod, load)?;
        let line = cl
            .next()
            .ok_or_else(|| anyhow::anyhow!("client printed nothing: {load:?}"))??;
        let v: Value = serde_json::from_str(&line)?;
        let _ = c.wait();
        let _ = s.kill();
        let _ = s.wait();
        Ok(v)
    }
}

/// One measured case: a client pod, a server pod and the address the
/// client dials.
struct Case {
    label: &'static str,
    client: &'static str,
    server: &'static str,
    to: String,
    /// The relays the case runs through (the floor cases), in the order
    /// the bytes cross them; none for the other cases.
    relays: Vec<RelaySpec>,
}

/// One `sockmesh-probe relay`, its sockets where a node proxy makes its
/// own: it listens in `pod`'s netns and dials from there, or from
/// `to_netns` (the destination pod's) when given.
struct RelaySpec {
    pod: &'static str,
    listen: String,
    to: String,
    to_netns: Option<std::path::PathBuf>,
    copy: &'static str,
}

/// The relays of one case, running; killed and waited for when dropped
/// (also when the case fails).
struct Relays(Vec<std::process::Child>);

impl Relays {
    /// Starts `specs` from the last (the one that dials the server) to the
    /// first, each once it prints that it listens. `count`: connections
    /// each relays before it exits by itself.
    fn start(run: &MeshRun, specs: &[RelaySpec], count: usize) -> Result<Relays> {
        use std::io::BufRead;
        let mut relays = Relays(Vec::new());
        let count = count.to_string();
        for r in specs.iter().rev() {
            let mut argv = vec![
                run.probe.display().to_string(),
                "relay".into(),
                "--listen".into(),
                r.listen.clone(),
                "--to".into(),
                r.to.clone(),
                "--copy".into(),
                r.copy.into(),
                "--count".into(),
                count.clone(),
                // The proxies' copy buffer (and splice pipe): 256 KiB.
                "--buffer".into(),
                (256 << 10).to_string(),
            ];
            if let Some(ns) = &r.to_netns {
                argv.extend(["--to-netns".into(), ns.display().to_string()]);
            }
            let mut cmd = run.mesh.pod_command(r.pod, &argv)?;
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped());
            let mut child = cmd
                .spawn()
                .with_context(|| format!("start the relay in {}", r.pod))?;
            let out = child.stdout.take();
            relays.0.push(child);
            let line = out
                .and_then(|o| std::io::BufReader::new(o).lines().next())
                .transpose()?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "the relay in {} on {} exited before listening",
                        r.pod,
                        r.listen
                    )
                })?;
            let v: Value = serde_json::from_str(&line)?;
            ensure!(v["event"] == "listening", "relay in {}: {v}", r.pod);
        }
        Ok(relays)
    }

    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(std::process::Child::id).collect()
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One repetition of a case.
#[derive(Clone, Copy, Default)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    gbit_s: f64,
    cpu_s_per_gib: f64,
    conn_per_s: f64,
}

/// Median and spread of a series.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(v: &[f64]) -> Spread {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Spread {
        median,
        min: s[0],
        max: s[n - 1],
    }
}

impl Spread {
    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// A performance target: the measured value (median of the paired
/// repetitions, spread), the goal, and whether the median meets it.
struct Target {
    name: &'static str,
    unit: &'static str,
    value: Spread,
    goal: f64,
    /// `true`: the value must be at least the goal; `false`: at most.
    at_least: bool,
    /// The same measure through the relays that only move bytes (the
    /// floor cases), paired alike: what even a minimal relay reaches.
    floors: Vec<(&'static str, Spread)>,
}

impl Target {
    fn pass(&self) -> bool {
        if self.at_least {
            self.value.median >= self.goal
        } else {
            self.value.median <= self.goal
        }
    }
}

const CASE_PLAIN_CROSS: &str = "plain cross-node";
const CASE_PLAIN_SAME: &str = "plain same-node";
const CASE_MESH_CROSS: &str = "mesh cross-node";
const CASE_MESH_SAME: &str = "mesh same-node";
const CASE_MESH_NOHIST: &str = "mesh cross, no hist";
const CASE_MESH_NOACCT: &str = "mesh cross, no acct";
const CASE_MESH_SPLICE: &str = "mesh same, proxy";
const CASE_SCRAPES: &str = "cross + scrapes";
const CASE_CURLS: &str = "cross + curl loop";
// The floors: plain pods, the same TCP connections as the mesh, each in
// the netns where the mesh has it, through relays that only move bytes (no
// TLS, no HTTP/2, no eBPF steering). Cross-node: client -> loopback ->
// relay in the client's netns -> the plain path -> relay in the server's
// netns -> the server's address (three connections); same-node: client ->
// loopback -> relay -> a socket in the server's netns -> the server's
// address (two).
const CASE_RELAY_CROSS: &str = "relay cross-node";
const CASE_RELAY_SAME: &str = "relay same-node";
const CASE_RELAY_COPY: &str = "relay cross, copy";
const FLOOR_SPLICE_CHAIN: &str = "splice relay chain (no TLS)";
const FLOOR_COPY_CHAIN: &str = "user-copy relay chain (no TLS)";
const FLOOR_SPLICE: &str = "splice relay (no TLS)";

/// A measured value as the target table prints it.
fn fmt_measured(unit: &str, v: Spread) -> String {
    if unit == "x" {
        format!("{:.2}x ({:.2}-{:.2})", v.median, v.min, v.max)
    } else if unit == "us" {
        format!("{:+.1} ({:+.1}..{:+.1}) us", v.median, v.min, v.max)
    } else {
        format!("{:.2} ({:.2}-{:.2}) {}", v.median, v.min, v.max, unit)
    }
}

fn mesh(json_out: Option<String>) -> Result<()> {
    use mesh_local::control::{Binaries, ControlOptions};
    let started = std::time::Instant::now();
    let dir = std::env::current_exe()?
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no exe dir"))?
        .to_owned();
    let bins = Binaries {
        ca: dir.join("mesh-ca"),
        proxy: dir.join("mesh-proxy"),
    };
    let env_num = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(default)
    };
    // Every case runs this many times, interleaved (rep 1 of every case,
    // then rep 2, ...), so drift of the machine hits all cases alike.
    let reps = env_num("SOCKMESH_BENCH_REPS", 5).max(1);
    let name = format!("b{}", std::process::id() % 100_000);
    let _ = mesh_local::down(&name, &mesh_local::Options::default());
    eprintln!("bringing up the local mesh {name} (2 nodes)...");
    // The demo topology plus pods opted out of the mesh: the plain TCP
    // baselines cross the same fabric and node hops (cross-node), or the
    // same node (same-node), uncaptured.
    let mut topology = mesh_local::Topology::demo();
    // A meshed client of its own for the case with the kernel histograms
    // off: its tunnel to web is made while they are off, so it gets no
    // per-ACK callback at all (a tunnel made while they are on keeps its
    // callbacks, which then return at once).
    topology.pods.push(mesh_local::Pod {
        namespace: "default".into(),
        name: "nohist-client".into(),
        uid: None,
        node: "node-a".into(),
        service_account: "client".into(),
        ips: Vec::new(),
        labels: [("app".to_owned(), "nohist-client".to_owned())].into(),
        annotations: Default::default(),
    });
    for (name, node) in [
        ("plain-client", "node-a"),
        ("plain-server", "node-b"),
        ("plain-server-a", "node-a"),
    ] {
        topology.pods.push(mesh_local::Pod {
            namespace: "default".into(),
            name: name.into(),
            uid: None,
            node: node.into(),
            service_account: "plain".into(),
            ips: Vec::new(),
            labels: Default::default(),
            annotations: [("sockmesh.io/mesh".to_owned(), "disabled".to_owned())].into(),
        });
    }
    let mut mesh = mesh_local::up(
        &name,
        &topology,
        &mesh_local::Options::default(),
        &mut |_| {},
    )?;
    let opts = ControlOptions {
        log: "warn".into(),
        proxy_workers: env_num(
            "SOCKMESH_BENCH_WORKERS",
            ControlOptions::default().proxy_workers,
        ),
        // A benchmark measures; a crash must fail it, not be hidden by a
        // restart (and the release build has no `mesh` supervisor).
        restart_proxies: false,
        ..ControlOptions::default()
    };
    mesh.start_control(&bins, &opts, &mut |_| {})?;
    let run = MeshRun {
        mesh,
        probe: dir.join("sockmesh-probe"),
    };
    let result = measure(&run, &bins, reps, json_out, started);
    let _ = run.mesh.down();
    result
}

fn measure(
    run: &MeshRun,
    bins: &mesh_local::control::Binaries,
    reps: usize,
    json_out: Option<String>,
    started: std::time::Instant,
) -> Result<()> {
    let ip = |pod: &str| -> Result<String> { Ok(run.mesh.pod(pod)?.ip.to_string()) };
    let proxies: Vec<u32> = ["node-a", "node-b"]
        .iter()
        .flat_map(|n| run.mesh.node_pids(n, &bins.proxy))
        .collect();
    ensure!(proxies.len() == 2, "expected 2 proxies, found {proxies:?}");
    let case = |label, client, server, pod: &str| -> Result<Case> {
        Ok(Case {
            label,
            client,
            server,
            to: format!("{}:9000", ip(pod)?),
            relays: Vec::new(),
        })
    };
    let relay = |pod, listen: &str, to: &str, to_netns: Option<&str>, copy| -> Result<RelaySpec> {
        Ok(RelaySpec {
            pod,
            listen: listen.into(),
            to: to.into(),
            to_netns: to_netns
                .map(|p| run.mesh.pod(p).map(|p| p.netns_path()))
                .transpose()?,
            copy,
        })
    };
    // A relay case: the plain client dials the first relay on loopback
    // in its own netns (as a meshed app's connect is steered to the proxy's
    // 127.0.0.1:15001 there).
    let relay_case = |label, server, relays: Vec<RelaySpec>| -> Result<Case> {
        Ok(Case {
            label,
            client: "default/plain-client",
            server,
            to: relays[0].listen.clone(),
            relays,
        })
    };
    let (server_b, server_a) = (ip("default/plain-server")?, ip("default/plain-server-a")?);
    // Cross-node: a relay in the client's netns dials one in the server's
    // (the HBONE leg: the same veth, node and fabric hops as plain), which
    // dials the server on its own address (the delivery leg).
    let cross = |ports: (u16, u16), copy| -> Result<Vec<RelaySpec>> {
        Ok(vec![
            relay(
                "default/plain-client",
                &format!("127.0.0.1:{}", ports.0),
                &format!("{server_b}:{}", ports.1),
                None,
                copy,
            )?,
            relay(
                "default/plain-server",
                &format!("{server_b}:{}", ports.1),
                &format!("{server_b}:9000"),
                None,
                copy,
            )?,
        ])
    };
    let cases = [
        case(
            CASE_PLAIN_CROSS,
            "default/plain-client",
            "default/plain-server", // node-b
            "default/plain-server",
        )?,
        case(
            CASE_PLAIN_SAME,
            "default/plain-client",
            "default/plain-server-a", // node-a, the client's node
            "default/plain-server-a",
        )?,
        case(
            CASE_MESH_CROSS,
            "default/client",
            "default/web", // node-b
            "default/web",
        )?,
        case(
            CASE_MESH_SAME,
            "default/client",
            "default/web-2", // node-a
            "default/web-2",
        )?,
        // The cross-node case with the kernel's latency histograms off on
        // both nodes (what they cost), then on again.
        case(
            CASE_MESH_NOHIST,
            "default/nohist-client",
            "default/web",
            "default/web",
        )?,
        // The cross-node case with the kernel's byte accounting off on both
        // nodes for the case's connections (what counting costs).
        case(
            CASE_MESH_NOACCT,
            "default/client",
            "default/web",
            "default/web",
        )?,
        // The same-node case through the proxy's splice: the kernel
        // same-node path's authorizations voided for the case (what a
        // pod's first connection to an address takes, and every one with
        // `--same-node-direct off`).
        case(
            CASE_MESH_SPLICE,
            "default/client",
            "default/web-2",
            "default/web-2",
        )?,
        // The cross-node path while an opted-out pod on the client's node
        // scrapes that node's /metrics in a loop: scrapes run on the
        // control runtime and take no lock of the data path, so latency
        // must move no more than under the same loop of curl processes
        // that scrape nothing (a closed port): the next case. A regression
        // check, not a target.
        case(CASE_SCRAPES, "default/client", "default/web", "default/web")?,
        case(CASE_CURLS, "default/client", "default/web", "default/web")?,
        // The floors (see CASE_RELAY_CROSS).
        relay_case(
            CASE_RELAY_CROSS,
            "default/plain-server", // node-b
            cross((19001, 19002), "splice")?,
        )?,
        // Same-node: one relay, listening in the client's netns, dialing
        // from a socket in the server's (two loopback legs, as the node
        // proxy's same-node path).
        relay_case(
            CASE_RELAY_SAME,
            "default/plain-server-a", // node-a
            vec![relay(
                "default/plain-client",
                "127.0.0.1:19003",
                &format!("{server_a}:9000"),
                Some("default/plain-server-a"),
                "splice",
            )?],
        )?,
        relay_case(
            CASE_RELAY_COPY,
            "default/plain-server", // node-b
            cross((19004, 19005), "userspace")?,
        )?,
    ];
    let metrics_url = format!(
        "http://{}:15020/metrics",
        run.mesh.node("node-a")?.fabric_ip
    );
    const GIB: u64 = 1 << 30;
    let stream_bytes = 2 * GIB;
    let conns = 4000usize;
    // Client threads for the connection rate: enough that the client is
    // not what limits it. Each thread opens its connections one after
    // another, so few threads measure the client's round trips: plain TCP
    // cross-node made 915/s with 1 thread, ~3,500/s with 4, 11,539/s with
    // 16 and 9,770/s with 64 (the machine is saturated by then).
    // `SOCKMESH_BENCH_CONN_THREADS` sets it.
    let conn_threads = std::env::var("SOCKMESH_BENCH_CONN_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(16)
        .max(1);
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); cases.len()];
    for rep in 0..reps {
        for (i, c) in cases.iter().enumerate() {
            eprintln!(
                "[{:>4.0}s] rep {}/{reps}: {}...",
                started.elapsed().as_secs_f64(),
                rep + 1,
                c.label
            );
            // Bounded: 3000 curls or 5 minutes, killed when the case ends.
            let hammer_url = match c.label {
                CASE_SCRAPES => Some(metrics_url.as_str()),
                // Port 9 in the scraper's own netns: refused at once.
                CASE_CURLS => Some("http://127.0.0.1:9/"),
                _ => None,
            };
            let mut hammer = if let Some(url) = hammer_url {
                let script = format!(
                    "end=$(($(date +%s)+300)); i=0; while [ $i -lt 3000 ] && [ $(date +%s) -lt $end ]; \
                     do curl -s -o /dev/null {url}; i=$((i+1)); done"
                );
                Some(
                    run.mesh
                        .pod_command("default/plain-client", &["sh", "-c", &script])?
                        .spawn()?,
                )
            } else {
                None
            };
            let histograms_off = c.label == CASE_MESH_NOHIST;
            if histograms_off {
                set_histograms(run, false)?;
            }
            let accounting_off = c.label == CASE_MESH_NOACCT;
            if accounting_off {
                set_accounting(run, false)?;
            }
            let voided = if c.label == CASE_MESH_SPLICE {
                Some(void_same_node_direct(run)?)
            } else {
                None
            };
            // A relay case: the relays run for this case only (their CPU
            // is reported instead of the proxies'), each exits after the
            // case's connections (RR, stream, then the rate), and is
            // killed and waited for when the case ends, also on an error.
            let sample = Relays::start(run, &c.relays, 3 + conns).and_then(|relays| {
                let cpu_pids = if c.relays.is_empty() {
                    proxies.clone()
                } else {
                    relays.pids()
                };
                mesh_case(
                    run,
                    c,
                    &cpu_pids,
                    stream_bytes,
                    conns,
                    conn_threads,
                    rep == 0,
                )
            });
            if let Some(h) = hammer.as_mut() {
                let _ = h.kill();
                let _ = h.wait();
            }
            if histograms_off {
                set_histograms(run, true)?;
            }
            if accounting_off {
                set_accounting(run, true)?;
            }
            if let Some(generations) = voided {
                restore_same_node_direct(run, &generations)?;
            }
            samples[i].push(sample?);
        }
    }

    // Proxy memory with 1000 idle mesh connections (cross-node).
    eprintln!("holding 1000 idle connections...");
    let idle = 1000u64;
    let rss_before: u64 = proxies.iter().map(|p| rss_kib(*p)).sum();
    let (mut s, mut sl) = run.spawn(
        "default/web",
        &[
            "bench",
            "--listen",
            "0.0.0.0:9000",
            "--count",
            &idle.to_string(),
        ],
    )?;
    let _ = sl.next();
    let (mut c, mut cl) = run.spawn(
        "default/client",
        &[
            "load",
            "--to",
            &format!("{}:9000", ip("default/web")?),
            "--idle",
            &idle.to_string(),
        ],
    )?;
    let held: Value = serde_json::from_str(
        &cl.next()
            .ok_or_else(|| anyhow::anyhow!("idle client died"))??,
    )?;
    ensure!(held["event"] == "held", "{held}");
    let rss_held: u64 = proxies.iter().map(|p| rss_kib(*p)).sum();
    if let Some(stdin) = c.stdin.as_mut() {
        use std::io::Write;
        let _ = stdin.write_all(b"go\n");
    }
    let _ = c.wait();
    let _ = s.kill();
    let _ = s.wait();
    let rss_per_conn = (rss_held as f64 - rss_before as f64) / idle as f64;

    // The table: every case, median (min-max) of its repetitions.
    let by = |label: &str| -> &Vec<Sample> {
        let i = cases.iter().position(|c| c.label == label).unwrap_or(0);
        &samples[i]
    };
    type Field = fn(&Sample) -> f64;
    let fields: [(&str, &str, Field); 5] = [
        ("rr_1kib_p50_us", "RR 1KiB p50 us", |s| s.p50_us),
        ("rr_1kib_p99_us", "RR 1KiB p99 us", |s| s.p99_us),
        ("throughput_gbit_s", "stream Gbit/s", |s| s.gbit_s),
        ("proxy_cpu_s_per_gib", "proxy CPU s/GiB", |s| {
            s.cpu_s_per_gib
        }),
        ("new_connections_per_s", "new conn/s", |s| s.conn_per_s),
    ];
    println!(
        "\nsockmesh bench mesh: pod -> pod on the local 2-node mesh, {reps} repetitions \
         interleaved, median (min-max); proxies log at warn; {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    print!("{:<18}", "case");
    for (_, head, _) in &fields {
        print!(" {head:>22}");
    }
    println!();
    let mut cases_json = serde_json::Map::new();
    for (c, ss) in cases.iter().zip(&samples) {
        print!("{:<18}", c.label);
        let mut m = serde_json::Map::new();
        for (key, _, f) in &fields {
            let v: Vec<f64> = ss.iter().map(f).collect();
            let sp = spread(&v);
            let cell = if sp.median >= 100.0 {
                format!("{:.0} ({:.0}-{:.0})", sp.median, sp.min, sp.max)
            } else {
                format!("{:.2} ({:.2}-{:.2})", sp.median, sp.min, sp.max)
            };
            print!(" {cell:>22}");
            let mut j = sp.json();
            j["samples"] = json!(v);
            m.insert((*key).into(), j);
        }
        println!();
        cases_json.insert(c.label.into(), Value::Object(m));
    }

    // Targets: each from the repetitions paired with the plain baseline of
    // the same repetition (ratio or difference), median and spread.
    let paired = |mesh: &str, plain: &str, f: Field, ratio: bool| -> Spread {
        let v: Vec<f64> = by(mesh)
            .iter()
            .zip(by(plain))
            .map(|(m, p)| if ratio { f(m) / f(p) } else { f(m) - f(p) })
            .collect();
        spread(&v)
    };
    let single = |v: f64| Spread {
        median: v,
        min: v,
        max: v,
    };
    // The cross-node floors of a measure, paired with plain cross-node.
    let cross_floors = |f: Field, ratio: bool| {
        vec![
            (
                FLOOR_SPLICE_CHAIN,
                paired(CASE_RELAY_CROSS, CASE_PLAIN_CROSS, f, ratio),
            ),
            (
                FLOOR_COPY_CHAIN,
                paired(CASE_RELAY_COPY, CASE_PLAIN_CROSS, f, ratio),
            ),
        ]
    };
    let cpu = |label: &str| {
        spread(
            &by(label)
                .iter()
                .map(|s| s.cpu_s_per_gib)
                .collect::<Vec<_>>(),
        )
    };
    let targets = [
        Target {
            name: "cross-node throughput / plain",
            unit: "x",
            value: paired(CASE_MESH_CROSS, CASE_PLAIN_CROSS, |s| s.gbit_s, true),
            goal: 0.5,
            at_least: true,
            floors: cross_floors(|s| s.gbit_s, true),
        },
        Target {
            name: "cross-node RR 1KiB p50 delta",
            unit: "us",
            value: paired(CASE_MESH_CROSS, CASE_PLAIN_CROSS, |s| s.p50_us, false),
            goal: 60.0,
            at_least: false,
            floors: cross_floors(|s| s.p50_us, false),
        },
        Target {
            name: "cross-node RR 1KiB p99 delta",
            unit: "us",
            value: paired(CASE_MESH_CROSS, CASE_PLAIN_CROSS, |s| s.p99_us, false),
            goal: 120.0,
            at_least: false,
            floors: cross_floors(|s| s.p99_us, false),
        },
        Target {
            name: "same-node throughput / plain",
            unit: "x",
            value: paired(CASE_MESH_SAME, CASE_PLAIN_SAME, |s| s.gbit_s, true),
            goal: 0.9,
            at_least: true,
            floors: vec![(
                FLOOR_SPLICE,
                paired(CASE_RELAY_SAME, CASE_PLAIN_SAME, |s| s.gbit_s, true),
            )],
        },
        Target {
            name: "same-node RR 1KiB p50 delta",
            unit: "us",
            value: paired(CASE_MESH_SAME, CASE_PLAIN_SAME, |s| s.p50_us, false),
            goal: 20.0,
            at_least: false,
            floors: vec![(
                FLOOR_SPLICE,
                paired(CASE_RELAY_SAME, CASE_PLAIN_SAME, |s| s.p50_us, false),
            )],
        },
        Target {
            name: "proxy CPU cross-node (both)",
            unit: "s/GiB",
            value: cpu(CASE_MESH_CROSS),
            goal: 1.0,
            at_least: false,
            // The relays' CPU (both relays of the chain).
            floors: vec![
                (FLOOR_SPLICE_CHAIN, cpu(CASE_RELAY_CROSS)),
                (FLOOR_COPY_CHAIN, cpu(CASE_RELAY_COPY)),
            ],
        },
        Target {
            name: "idle RSS per connection",
            unit: "KiB",
            value: single(rss_per_conn),
            goal: 16.0,
            at_least: false,
            floors: Vec::new(),
        },
        Target {
            name: "new conn/s cross-node / plain",
            unit: "x",
            value: paired(CASE_MESH_CROSS, CASE_PLAIN_CROSS, |s| s.conn_per_s, true),
            goal: 1.0,
            at_least: true,
            floors: cross_floors(|s| s.conn_per_s, true),
        },
    ];
    println!(
        "\nperformance targets, median of {reps} paired repetitions (min-max); pass = median meets the goal"
    );
    println!(
        "{:<32} {:>26} {:>12} {:>5}",
        "target", "measured", "goal", ""
    );
    let mut targets_json = Vec::new();
    for t in &targets {
        let v = t.value;
        let measured = fmt_measured(t.unit, v);
        let goal = format!(
            "{} {}{}",
            if t.at_least { ">=" } else { "<=" },
            t.goal,
            if t.unit == "x" { "x" } else { t.unit }
        );
        println!(
            "{:<32} {:>26} {:>12} {:>5}",
            t.name,
            measured,
            goal,
            if t.pass() { "PASS" } else { "FAIL" }
        );
        targets_json.push(json!({"target": t.name, "unit": t.unit, "value": v.json(),
                                 "goal": t.goal, "at_least": t.at_least, "pass": t.pass()}));
    }
    println!(
        "proxy RSS (both nodes): {rss_before} KiB idle mesh -> {rss_held} KiB with {idle} idle \
         cross-node connections"
    );
    // What the kernel histograms cost: the same cross-node case
    // with them on and off, paired by repetition.
    let hist_tput = paired(CASE_MESH_CROSS, CASE_MESH_NOHIST, |s| s.gbit_s, true);
    let hist_p99 = paired(CASE_MESH_CROSS, CASE_MESH_NOHIST, |s| s.p99_us, false);
    let hist_p50 = paired(CASE_MESH_CROSS, CASE_MESH_NOHIST, |s| s.p50_us, false);
    println!(
        "latency histograms on vs off (cross-node): throughput {:.2}x ({:.2}-{:.2}), \
         RR p50 {:+.1} us ({:+.1}..{:+.1}), p99 {:+.1} us ({:+.1}..{:+.1})",
        hist_tput.median,
        hist_tput.min,
        hist_tput.max,
        hist_p50.median,
        hist_p50.min,
        hist_p50.max,
        hist_p99.median,
        hist_p99.min,
        hist_p99.max
    );
    // What the kernel's byte accounting costs, and what the kernel
    // same-node path gains over the proxy's splice, paired the same way.
    let versus = |a: &str, b: &str| {
        (
            paired(a, b, |s| s.gbit_s, true),
            paired(a, b, |s| s.p50_us, false),
            paired(a, b, |s| s.p99_us, false),
            paired(a, b, |s| s.cpu_s_per_gib, false),
            paired(a, b, |s| s.conn_per_s, true),
        )
    };
    let show_versus = |what: &str, v: &(Spread, Spread, Spread, Spread, Spread)| {
        println!(
            "{what}: throughput {:.2}x ({:.2}-{:.2}), RR p50 {:+.1} us ({:+.1}..{:+.1}), \
             p99 {:+.1} us ({:+.1}..{:+.1}), proxy CPU {:+.2} s/GiB ({:+.2}..{:+.2}), \
             new conn/s {:.2}x ({:.2}-{:.2})",
            v.0.median,
            v.0.min,
            v.0.max,
            v.1.median,
            v.1.min,
            v.1.max,
            v.2.median,
            v.2.min,
            v.2.max,
            v.3.median,
            v.3.min,
            v.3.max,
            v.4.median,
            v.4.min,
            v.4.max
        );
    };
    let versus_json = |v: &(Spread, Spread, Spread, Spread, Spread)| {
        json!({"throughput_ratio": v.0.json(), "rr_p50_delta_us": v.1.json(),
               "rr_p99_delta_us": v.2.json(), "proxy_cpu_delta_s_per_gib": v.3.json(),
               "new_connections_ratio": v.4.json()})
    };
    let scrapes = versus(CASE_SCRAPES, CASE_CURLS);
    show_versus(
        "scrapes vs the same curl loop scraping nothing (cross-node)",
        &scrapes,
    );
    let acct = versus(CASE_MESH_CROSS, CASE_MESH_NOACCT);
    show_versus("byte accounting on vs off (cross-node)", &acct);
    let kernel_path = versus(CASE_MESH_SAME, CASE_MESH_SPLICE);
    show_versus("same-node: kernel path vs the proxy's splice", &kernel_path);
    // The floors: for each target that fails, what the relays that only
    // move bytes reach on the same measure (the JSON has every target's).
    println!(
        "\nfloors: the mesh's TCP connections, in the same netns, through relays that only move \
         bytes (no TLS, no HTTP/2; cross-node 3 connections, same-node 2), paired per repetition \
         with plain like the targets; the proxy CPU of a relay case is its relays' CPU"
    );
    let mut floors_json = Vec::new();
    let mut printed = 0;
    for t in targets.iter().filter(|t| !t.floors.is_empty()) {
        let floors: Vec<String> = t
            .floors
            .iter()
            .map(|(label, v)| format!("{label} {}", fmt_measured(t.unit, *v)))
            .collect();
        if !t.pass() {
            println!(
                "{}: mesh {}; {}",
                t.name,
                fmt_measured(t.unit, t.value),
                floors.join("; ")
            );
            printed += 1;
        }
        floors_json.push(json!({
            "target": t.name, "unit": t.unit, "pass": t.pass(), "mesh": t.value.json(),
            "floors": t.floors.iter().map(|(label, v)| json!({"floor": label, "value": v.json()}))
                .collect::<Vec<_>>(),
        }));
    }
    if printed == 0 {
        println!("(every target with a floor passes)");
    }
    let secs = started.elapsed().as_secs_f64();
    println!("bench mesh took {secs:.0} s");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = json!({"benchmark": "mesh", "repetitions": reps, "kernel": kernel.trim(),
                     "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                     "stream_bytes": stream_bytes, "connections": conns,
                     "connection_threads": conn_threads,
                     "cases": cases_json, "targets": targets_json, "floors": floors_json,
                     "histograms_on_vs_off": {"throughput_ratio": hist_tput.json(),
                                              "rr_p50_delta_us": hist_p50.json(),
                                              "rr_p99_delta_us": hist_p99.json()},
                     "accounting_on_vs_off": versus_json(&acct),
                     "scrapes_vs_curl_loop": versus_json(&scrapes),
                     "same_node_kernel_vs_splice": versus_json(&kernel_path),
                     "proxy_rss_kib": {"before": rss_before, "with_idle": rss_held,
                                       "idle_connections": idle, "per_connection": rss_per_conn},
                     "seconds": secs});
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("JSON: {path}");
    }
    Ok(())
}

/// One repetition of `c`: RR 1 KiB, a one-way stream (with both proxies'
/// CPU), then the rate of new connections.
fn mesh_case(
    run: &MeshRun,
    c: &Case,
    proxies: &[u32],
    stream_bytes: u64,
    conns: usize,
    conn_threads: usize,
    first: bool,
) -> Result<Sample> {
    const GIB: f64 = (1u64 << 30) as f64;
    let to = c.to.as_str();
    // One short exchange first: what is measured is the path's steady
    // state (a pooled tunnel up; the kernel same-node path authorized).
    let warm = run.case(
        c.client,
        c.server,
        &["bench", "--listen", "0.0.0.0:9000"],
        &["load", "--to", to, "--size", "1024", "--rounds", "10"],
    )?;
    ensure!(warm["event"] == "rr", "{}: warm-up: {warm}", c.label);
    let rr = run.case(
        c.client,
        c.server,
        &["bench", "--listen", "0.0.0.0:9000"],
        &["load", "--to", to, "--size", "1024", "--rounds", "20000"],
    )?;
    // SOCKMESH_BENCH_PERF=FILE: `perf record -g` on both proxies during
    // the first cross-node stream (the profile ARCHITECTURE.md quotes).
    let perf = match std::env::var_os("SOCKMESH_BENCH_PERF") {
        Some(out) if c.label == CASE_MESH_CROSS && first => {
            let pids: Vec<String> = proxies.iter().map(u32::to_string).collect();
            Some(
                std::process::Command::new("perf")
                    .args(["record", "-g", "-q", "-o"])
                    .arg(out)
                    .args(["-p", &pids.join(",")])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .context("perf record (SOCKMESH_BENCH_PERF)")?,
            )
        }
        _ => None,
    };
    let cpu0: f64 = proxies.iter().map(|p| cpu_seconds(*p)).sum();
    let bytes = stream_bytes.to_string();
    let st = run.case(
        c.client,
        c.server,
        &["bench", "--listen", "0.0.0.0:9000", "--sink"],
        &["load", "--to", to, "--stream", &bytes],
    )?;
    let cpu = proxies.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
    if let Some(mut perf) = perf {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(perf.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = perf.wait();
    }
    let (n, threads) = (conns.to_string(), conn_threads.to_string());
    let cn = run.case(
        c.client,
        c.server,
        &["bench", "--listen", "0.0.0.0:9000", "--count", &n],
        &[
            "load",
            "--to",
            to,
            "--connections",
            &n,
            "--parallel",
            &threads,
        ],
    )?;
    ensure!(
        rr["event"] == "rr" && st["event"] == "stream" && cn["event"] == "connections",
        "{}: {rr} {st} {cn}",
        c.label
    );
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Sample {
        p50_us: num(&rr, "p50_us"),
        p99_us: num(&rr, "p99_us"),
        gbit_s: num(&st, "gbit_per_s"),
        cpu_s_per_gib: cpu / (stream_bytes as f64 / GIB),
        conn_per_s: num(&cn, "per_second"),
    })
}

/// Runs `f` on the data path of each node of the bench mesh (opened from
/// the proxies' pins), naming the node when it fails.
fn each_node<T>(
    run: &MeshRun,
    mut f: impl FnMut(&str, &mut Datapath) -> Result<T>,
) -> Result<Vec<(String, T)>> {
    let mut out = Vec::new();
    for node in ["node-a", "node-b"] {
        let pins = &run.mesh.node(node)?.pin_root;
        let mut dp = Datapath::open(pins)
            .map_err(|e| anyhow::anyhow!("open the data path at {}: {e}", pins.display()))?;
        let v = f(node, &mut dp).with_context(|| format!("on {node}"))?;
        out.push((node.to_owned(), v));
    }
    Ok(out)
}

/// Switches the kernel's byte accounting on every node of the bench mesh
/// (flows established from then on).
fn set_accounting(run: &MeshRun, on: bool) -> Result<()> {
    each_node(run, |_, dp| Ok(dp.set_accounting(on)?)).map(drop)
}

/// Voids the kernel same-node path's authorizations on every node (the
/// kernel honours generation 0 for none) and returns the generations to
/// restore; the proxies keep authorizing in theirs, which the kernel
/// ignores until [`restore_same_node_direct`].
fn void_same_node_direct(run: &MeshRun) -> Result<Vec<(String, u64)>> {
    each_node(run, |_, dp| {
        let generation = dp.direct_generation()?;
        dp.set_direct_generation(0)?;
        Ok(generation)
    })
}

fn restore_same_node_direct(run: &MeshRun, saved: &[(String, u64)]) -> Result<()> {
    each_node(run, |node, dp| {
        let generation = saved.iter().find(|(n, _)| n == node).map_or(0, |(_, g)| *g);
        Ok(dp.set_direct_generation(generation)?)
    })
    .map(drop)
}

/// Switches the kernel's latency histograms on every node of the bench
/// mesh (through the proxies' pinned config map).
fn set_histograms(run: &MeshRun, on: bool) -> Result<()> {
    each_node(run, |_, dp| Ok(dp.set_histograms(on)?)).map(drop)
}
