//! `sockmesh-demo`: the eBPF redirect path, live, in a sandbox it makes and
//! removes: loads the programs, captures an app's connects to the in-pod
//! outbound listener, moves real bytes both ways and prints the kernel's
//! per-flow counters.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mesh_ebpf::{Datapath, FlowEntry};
use sockmesh_tests::{Probe, Sandbox};

const T: Duration = Duration::from_secs(60);

fn step(n: usize, msg: &str) {
    println!("[{n}/5] {msg}");
}

fn expect(p: &mut Probe, event: &str) -> Result<serde_json::Value> {
    let v = p.line(T)?;
    ensure!(v["event"] == event, "expected {event}, got {v}");
    Ok(v)
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_flows(flows: &[FlowEntry]) {
    println!(
        "      {:<20} {:<22} {:<18} {:>12} {:>12} {:<7} {:>8}",
        "COOKIE", "APP SOCKET", "ORIGINAL DST", "SENT", "RECEIVED", "STATE", "AGE"
    );
    for f in flows {
        println!(
            "      {:<20} {:<22} {:<18} {:>12} {:>12} {:<7} {:>7.1}s",
            f.cookie,
            f.src.to_string(),
            f.original_dst.to_string(),
            human(f.bytes_sent),
            human(f.bytes_received),
            if f.is_closed() { "closed" } else { "open" },
            mesh_ebpf::age(f.start_ns).as_secs_f64()
        );
    }
}

fn main() -> Result<()> {
    let started = Instant::now();
    let probe = std::env::current_exe()?.with_file_name("sockmesh-probe");
    ensure!(
        probe.exists(),
        "{} not built (run `./x demo`)",
        probe.display()
    );
    println!("sockmesh demo: the eBPF redirect path\n");

    let mut sb = Sandbox::new(&probe)?;
    let pod = sb.add_netns("pod")?;
    step(
        1,
        &format!(
            "sandbox: netns {}, cgroup {}, pins {}",
            pod.display(),
            sb.cgroup.display(),
            sb.pin_root.display()
        ),
    );

    let mut dp = Datapath::install(&sb.cgroup, &sb.pin_root)?;
    step(
        2,
        &format!(
            "loaded connect4/6 + sockops on the cgroup, sk_msg on sm_socks; self-test: mode {}",
            dp.mode()
        ),
    );
    dp.set_redirect(true)?;
    let cookie = dp.enroll(&pod)?;
    step(
        3,
        &format!("enrolled the pod's netns (cookie {cookie}); sk_lookup attached there"),
    );

    let pin = sb.pin_root.to_string_lossy().into_owned();
    let mut proxy = sb.probe(
        &pod,
        &[
            "proxy",
            "--pin-root",
            &pin,
            "--listen",
            "127.0.0.1:15001",
            "--listen",
            "[::1]:15001",
            "--count",
            "2",
            "--send",
            "33554432",
            "--seed",
            "2",
        ],
    )?;
    expect(&mut proxy, "listening")?;
    let mut app = sb.probe(
        &pod,
        &[
            "connect",
            "--to",
            "10.77.0.9:9000",
            "--send",
            "67108864",
            "--seed",
            "1",
        ],
    )?;
    let c = expect(&mut app, "connected")?;
    let a = expect(&mut proxy, "accepted")?;
    let t = expect(&mut app, "transfer")?;
    let p = expect(&mut proxy, "transfer")?;
    ensure!(
        t["transfer"]["sent_sha256"] == p["transfer"]["received_sha256"]
            && p["transfer"]["sent_sha256"] == t["transfer"]["received_sha256"],
        "bytes differ: app {t} proxy {p}"
    );
    step(
        4,
        &format!(
            "app asked for 10.77.0.9:9000, kernel connected it to {}; the proxy read the original \
             destination {} from sm_orig_dst; 64 MiB up / 32 MiB down arrived intact (sha256)",
            c["peer"].as_str().unwrap_or("?"),
            a["orig"].as_str().unwrap_or("?")
        ),
    );
    // A second flow kept open, so the table shows a live one too.
    let mut held = sb.probe(
        &pod,
        &[
            "connect",
            "--to",
            "[fd77::9]:443",
            "--send",
            "1000000",
            "--seed",
            "3",
            "--hold",
        ],
    )?;
    expect(&mut held, "connected")?;
    expect(&mut proxy, "accepted")?;
    expect(&mut held, "holding")?;

    step(
        5,
        "the kernel's flow map (sm_flows), read without copying any traffic:",
    );
    let flows: Vec<FlowEntry> = dp
        .flows()?
        .into_iter()
        .filter(|f| f.netns == cookie)
        .collect();
    print_flows(&flows);
    let stats = dp.stats()?;
    println!(
        "      kernel counters: {}",
        stats
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    held.release()?;
    expect(&mut held, "transfer")?;
    held.wait(T)?;
    proxy.wait(T)?;
    app.wait(T)?;
    drop(dp);
    let pins = sb.pin_root.clone();
    drop(sb);
    ensure!(!pins.exists(), "{} left behind", pins.display());
    println!(
        "\ncleaned up: namespaces, cgroup and pins removed ({:.1}s). Next: `./x test` runs every test; \
         `./x bench redirect` measures the redirect against plain loopback TCP.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
