//! `sockmesh-soak`: the integrity soak for a person (`./x soak`). Minutes
//! of many concurrent full-duplex streams with connection churn over every
//! path of a local mesh (cross-node, same-node, a Service VIP), each
//! stream's bytes checked end to end (SHA-256 both ways), then the
//! kernel-counted metrics checked against the bytes moved. Prints progress
//! and a summary; exits 1 on any mismatch.
//!
//! Usage: `sockmesh-soak [--minutes M] [--workers W] [--max-mib X] [--json FILE]`

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use mesh_local::control::ControlOptions;
use serde_json::{Value, json};
use sockmesh_tests::e2e::*;
use sockmesh_tests::flowdata;

#[derive(Parser)]
#[command(about = "Minutes of checksummed, churning streams over every path of a local mesh")]
struct Args {
    /// How long to keep opening streams.
    #[arg(long, default_value_t = 3.0)]
    minutes: f64,
    /// Streams in flight at once.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Largest stream, MiB each way (sizes are drawn from 1 KiB up to it).
    #[arg(long, default_value_t = 256)]
    max_mib: u64,
    /// Where to write the summary as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What every server sends back on each connection.
const ANSWER: u64 = 1 << 20;
const SERVER_SEED: u64 = 22;

struct Path {
    name: &'static str,
    to: String,
    /// Digests of what the server received, as its transfers finish.
    received: Arc<Mutex<HashSet<String>>>,
    streams: AtomicU64,
    bytes: AtomicU64,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("sockmesh-soak: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let args = Args::parse();
    ensure!(
        args.minutes > 0.0 && args.workers > 0 && args.max_mib > 0,
        "--minutes, --workers and --max-mib must be more than 0"
    );
    eprintln!("soak: bringing up a local mesh...");
    let m = TestMesh::up_with("sk", &soak_topology(), ControlOptions::default())?;
    let expected_answer = {
        let mut sink = std::io::sink();
        flowdata::send(&mut sink, SERVER_SEED, ANSWER)?
    };
    let targets = [
        ("cross-node", "default/web", m.ip("default/web")?, 9200),
        ("same-node", "default/web-2", m.ip("default/web-2")?, 9201),
        ("service", "other/iperf", m.vip("other/iperf")?, 8080),
    ];
    let mut servers = Vec::new();
    let mut paths = Vec::new();
    for (name, pod, ip, port) in targets {
        let mut server = serve_concurrent(&m, pod, port, 1_000_000, ANSWER)?;
        let received = Arc::new(Mutex::new(HashSet::new()));
        let sink = received.clone();
        let lines = server.lines.take().context("server output")?;
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["event"] == "transfer"
                    && let Some(d) = v["transfer"]["received_sha256"].as_str()
                {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(d.to_owned());
                }
            }
        });
        servers.push(server);
        paths.push(Path {
            name,
            to: format!("{ip}:{port}"),
            received,
            streams: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
    }
    let before = counted_by_kernel(&m)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.minutes * 60.0);
    let failed = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<String>::new());
    let next_seed = AtomicU64::new(1000);
    let sent_total = AtomicU64::new(0);
    eprintln!(
        "soak: {} workers for {} min over {} paths, streams of 1 KiB..{} MiB each way",
        args.workers,
        args.minutes,
        paths.len(),
        args.max_mib
    );
    std::thread::scope(|scope| {
        for w in 0..args.workers {
            let (m, paths, failed, failures) = (&m, &paths, &failed, &failures);
            let (next_seed, sent_total, expected) = (&next_seed, &sent_total, &expected_answer);
            let max = args.max_mib << 20;
            scope.spawn(move || {
                let mut i = w;
                while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                    let path = &paths[i % paths.len()];
                    i += 1;
                    let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                    // A log-uniform size: many small streams, some large.
                    let size = 1024u64 << (seed.wrapping_mul(0x9e37_79b9) % 64 % 19);
                    let size = size.min(max) + seed % 997;
                    match one_stream(m, path, seed, size, expected) {
                        Ok(()) => {
                            sent_total.fetch_add(size, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            failures
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(format!("{} seed {seed} ({size} B): {e:#}", path.name));
                        }
                    }
                }
            });
        }
        // Progress every 10 s.
        scope.spawn(|| {
            while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(10).min(
                    deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
                ));
                let streams: u64 = paths
                    .iter()
                    .map(|p| p.streams.load(Ordering::Relaxed))
                    .sum();
                let bytes: u64 = paths.iter().map(|p| p.bytes.load(Ordering::Relaxed)).sum();
                eprintln!(
                    "soak: {:>4.0}s  {streams} streams  {:.2} GiB checked",
                    start.elapsed().as_secs_f64(),
                    bytes as f64 / (1u64 << 30) as f64
                );
            }
        });
    });
    let secs = start.elapsed().as_secs_f64();
    for s in &mut servers {
        let _ = s.child.kill();
    }
    let failures = failures
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The kernel's counts (through the source proxy's metrics) moved by
    // exactly what the clients sent and received.
    let sent = sent_total.load(Ordering::Relaxed);
    let streams: u64 = paths
        .iter()
        .map(|p| p.streams.load(Ordering::Relaxed))
        .sum();
    let want = (before.0 + sent, before.1 + streams * ANSWER);
    let mut counted = before;
    let counts_ok = failures.is_empty()
        && wait_until("the kernel's counts", Duration::from_secs(15), || {
            counted = counted_by_kernel(&m)?;
            Ok(counted == want)
        })
        .is_ok();
    let moved: u64 = paths.iter().map(|p| p.bytes.load(Ordering::Relaxed)).sum();
    println!("\nsockmesh soak: {secs:.0} s, {} workers", args.workers);
    println!("{:<12} {:>9} {:>12}", "path", "streams", "GiB checked");
    for p in &paths {
        println!(
            "{:<12} {:>9} {:>12.2}",
            p.name,
            p.streams.load(Ordering::Relaxed),
            p.bytes.load(Ordering::Relaxed) as f64 / (1u64 << 30) as f64
        );
    }
    println!(
        "total: {streams} streams, {:.2} GiB both ways, {:.2} Gbit/s; kernel counts {} (source sent {} / received {} over the run)",
        moved as f64 / (1u64 << 30) as f64,
        moved as f64 * 8.0 / secs / 1e9,
        if counts_ok { "exact" } else { "WRONG" },
        counted.0 - before.0,
        counted.1 - before.1,
    );
    for f in &failures {
        println!("FAILED: {f}");
    }
    let ok = failures.is_empty() && counts_ok;
    println!("soak: {}", if ok { "PASS" } else { "FAIL" });
    if let Some(path) = args.json {
        let doc = json!({"seconds": secs, "workers": args.workers, "streams": streams,
            "bytes_checked": moved, "kernel_counts_exact": counts_ok, "failures": failures,
            "paths": paths.iter().map(|p| json!({"path": p.name,
                "streams": p.streams.load(Ordering::Relaxed),
                "bytes": p.bytes.load(Ordering::Relaxed)})).collect::<Vec<_>>()});
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    }
    let _ = m.mesh;
    Ok(ok)
}

/// One stream: `size` bytes of stream `seed` up, the server's answer down,
/// both checked.
fn one_stream(m: &TestMesh, path: &Path, seed: u64, size: u64, answer: &str) -> Result<()> {
    let mut c = strict_client(m, "default/client", &path.to, size, seed)?;
    c.event("connected")?;
    let t = c.event("transfer")?["transfer"].clone();
    c.wait()?;
    ensure!(t["sent"] == size, "client sent {t}");
    ensure!(
        t["received"] == ANSWER && t["received_sha256"] == answer,
        "the server's answer arrived altered: {t}"
    );
    let digest = t["sent_sha256"].as_str().unwrap_or_default().to_owned();
    // The server's transfer may finish a moment after the client's.
    wait_until(
        "the server's digest of this stream",
        Duration::from_secs(30),
        || {
            Ok(path
                .received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&digest))
        },
    )
    .with_context(|| format!("no server received the {size} bytes of seed {seed} intact"))?;
    path.streams.fetch_add(1, Ordering::Relaxed);
    path.bytes.fetch_add(size + ANSWER, Ordering::Relaxed);
    Ok(())
}

/// The client node's `istio_tcp_{received,sent}_bytes_total` from the
/// source reporter for the client workload: what it sent and received.
fn counted_by_kernel(m: &TestMesh) -> Result<(u64, u64)> {
    let text = m.mesh.metrics("node-a")?;
    let l = [("reporter", "source"), ("source_workload", "client")];
    if !text.contains("istio_tcp_") && !text.contains("sockmesh_") {
        bail!("node-a's metrics look empty:\n{text}");
    }
    Ok((
        metric_sum(&text, "istio_tcp_received_bytes_total", &l),
        metric_sum(&text, "istio_tcp_sent_bytes_total", &l),
    ))
}
