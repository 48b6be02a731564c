//! `sockmesh-bench redirect [JSON]`: the app<->proxy leg through the sk_msg
//! redirect vs the same leg over plain loopback TCP, in one run, same
//! processes, same netns: request/response latency (1 B, 1 KiB) and
//! single-stream throughput. Prints a table with ratios, writes JSON.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
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

fn mesh(json_out: Option<String>) -> Result<()> {
    use mesh_local::control::{Binaries, ControlOptions};
    let dir = std::env::current_exe()?
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no exe dir"))?
        .to_owned();
    let bins = Binaries {
        ca: dir.join("mesh-ca"),
        proxy: dir.join("mesh-proxy"),
    };
    let name = format!("b{}", std::process::id() % 100_000);
    let _ = mesh_local::down(&name, &mesh_local::Options::default());
    eprintln!("bringing up the local mesh {name} (2 nodes)...");
    // The demo topology plus two pods opted out of the mesh: the plain TCP
    // baseline crosses the same fabric and node hops, uncaptured.
    let mut topology = mesh_local::Topology::demo();
    for (name, node) in [("plain-client", "node-a"), ("plain-server", "node-b")] {
        topology.pods.push(mesh_local::Pod {
            namespace: "default".into(),
            name: name.into(),
            uid: None,
            node: node.into(),
            service_account: "plain".into(),
            ips: Vec::new(),
            labels: [("sockmesh.io/mesh".to_owned(), "disabled".to_owned())].into(),
            annotations: Default::default(),
        });
    }
    let mut mesh = mesh_local::up(
        &name,
        &topology,
        &mesh_local::Options::default(),
        &mut |_| {},
    )?;
    let workers: usize = std::env::var("SOCKMESH_BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(ControlOptions::default().proxy_workers);
    let opts = ControlOptions {
        log: "warn".into(),
        proxy_workers: workers,
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
    let web = run.mesh.pod("default/web")?.ip.to_string(); // node-b
    let web2 = run.mesh.pod("default/web-2")?.ip.to_string(); // node-a (client's node)
    let proxies: Vec<u32> = ["node-a", "node-b"]
        .iter()
        .flat_map(|n| run.mesh.node_pids(n, &bins.proxy))
        .collect();
    let plain_server = run.mesh.pod("default/plain-server")?.ip.to_string(); // node-b
    let cases: [(&str, &str, &str, &str); 4] = [
        (
            "plain TCP",
            "default/plain-client",
            "default/plain-server",
            plain_server.as_str(),
        ),
        (
            "mesh cross-node",
            "default/client",
            "default/web",
            web.as_str(),
        ),
        (
            "mesh same-node",
            "default/client",
            "default/web-2",
            web2.as_str(),
        ),
        // The same path while an opted-out pod on the client's node scrapes
        // that node's /metrics in a loop: scrapes run on the control
        // runtime and take no lock of the data path, so connect and RR
        // latency must not move.
        (
            "cross + scrapes",
            "default/client",
            "default/web",
            web.as_str(),
        ),
    ];
    let metrics_url = format!(
        "http://{}:15020/metrics",
        run.mesh.node("node-a")?.fabric_ip
    );
    const GIB: u64 = 1 << 30;
    let stream_bytes = 2 * GIB;
    let mut table: Vec<(String, Vec<f64>)> = Vec::new();
    let mut results = Vec::new();
    for (label, client, pod, ip) in cases {
        eprintln!("running {label}...");
        // Bounded: 3000 scrapes or 5 minutes, killed when the case ends.
        let mut hammer = if label == "cross + scrapes" {
            let script = format!(
                "end=$(($(date +%s)+300)); i=0; while [ $i -lt 3000 ] && [ $(date +%s) -lt $end ]; \
                 do curl -s -o /dev/null {metrics_url}; i=$((i+1)); done"
            );
            Some(
                run.mesh
                    .pod_command("default/plain-client", &["sh", "-c", &script])?
                    .spawn()?,
            )
        } else {
            None
        };
        let to = format!("{ip}:9000");
        let with = |base: &[&str]| -> Vec<String> { base.iter().map(|s| s.to_string()).collect() };
        fn args(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let rr_args = with(&["load", "--to", &to, "--size", "1024", "--rounds", "20000"]);
        let rr = run.case(
            client,
            pod,
            &["bench", "--listen", "0.0.0.0:9000"],
            &args(&rr_args),
        )?;
        let cpu0: f64 = proxies.iter().map(|p| cpu_seconds(*p)).sum();
        let st_args = with(&["load", "--to", &to, "--stream", &stream_bytes.to_string()]);
        let st = run.case(
            client,
            pod,
            &["bench", "--listen", "0.0.0.0:9000", "--sink"],
            &args(&st_args),
        )?;
        let cpu = proxies.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
        let cn_args = with(&["load", "--to", &to, "--connections", "2000"]);
        let cn = run.case(
            client,
            pod,
            &["bench", "--listen", "0.0.0.0:9000", "--count", "2000"],
            &args(&cn_args),
        )?;
        if let Some(h) = hammer.as_mut() {
            let _ = h.kill();
            let _ = h.wait();
        }
        ensure!(
            rr["event"] == "rr" && st["event"] == "stream" && cn["event"] == "connections",
            "{rr} {st} {cn}"
        );
        let row = vec![
            rr["p50_us"].as_f64().unwrap_or(f64::NAN),
            rr["p99_us"].as_f64().unwrap_or(f64::NAN),
            st["gbit_per_s"].as_f64().unwrap_or(f64::NAN),
            cpu / (stream_bytes as f64 / GIB as f64),
            cn["per_second"].as_f64().unwrap_or(f64::NAN),
        ];
        results.push(
            json!({"case": label, "rr_1kib_p50_us": row[0], "rr_1kib_p99_us": row[1],
                            "throughput_gbit_s": row[2], "proxy_cpu_s_per_gib": row[3],
                            "new_connections_per_s": row[4]}),
        );
        table.push((label.to_owned(), row));
    }
    // Proxy memory with 1000 idle mesh connections (cross-node).
    eprintln!("holding 1000 idle connections...");
    let rss_before: u64 = proxies.iter().map(|p| rss_kib(*p)).sum();
    let (mut s, mut sl) = run.spawn(
        "default/web",
        &["bench", "--listen", "0.0.0.0:9000", "--count", "1000"],
    )?;
    let _ = sl.next();
    let (mut c, mut cl) = run.spawn(
        "default/client",
        &["load", "--to", &format!("{web}:9000"), "--idle", "1000"],
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

    println!(
        "\nsockmesh bench mesh: pod -> pod on the local 2-node mesh (one run; proxies log at warn)"
    );
    println!(
        "{:<18} {:>14} {:>14} {:>16} {:>14} {:>14}",
        "case",
        "RR 1KiB p50 us",
        "RR 1KiB p99 us",
        "stream Gbit/s",
        "proxy CPU s/GiB",
        "new conn/s"
    );
    for (label, r) in &table {
        println!(
            "{label:<18} {:>14.1} {:>14.1} {:>16.2} {:>14.2} {:>14.0}",
            r[0], r[1], r[2], r[3], r[4]
        );
    }
    let base = &table[0].1;
    for (label, r) in table.iter().skip(1) {
        println!(
            "{:<18} p50 {:+.1} us, p99 {:+.1} us, throughput {:.2}x, conn/s {:.2}x of plain TCP",
            label,
            r[0] - base[0],
            r[1] - base[1],
            r[2] / base[2],
            r[4] / base[4]
        );
    }
    println!(
        "proxy RSS (both nodes): {} KiB idle mesh -> {} KiB with 1000 idle cross-node connections (+{:.1} KiB/connection)",
        rss_before,
        rss_held,
        (rss_held as f64 - rss_before as f64) / 1000.0
    );
    let doc = json!({"benchmark": "mesh", "results": results,
                     "proxy_rss_kib": {"before": rss_before, "with_1000_idle": rss_held}});
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("JSON: {path}");
    }
    let _ = run.mesh.down();
    Ok(())
}
