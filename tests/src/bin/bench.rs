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
    if what != "redirect" {
        bail!("unknown benchmark {what:?}; this binary runs `redirect`");
    }
    let json_out = argv.next();
    let probe = std::env::current_exe()?.with_file_name("sockmesh-probe");
    let mut sb = Sandbox::new(&probe)?;
    let pod = sb.add_netns("pod")?;
    let mut dp = Datapath::install(&sb.cgroup, &sb.pin_root)?;
    ensure!(dp.mode() == &mesh_ebpf::Mode::Sockmap, "mode {}", dp.mode());
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
