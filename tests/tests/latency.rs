//! Latency you can see, aggregated in the kernel: the tunnels'
//! RTT histograms agree with `ss -ti`, packet loss on one pair of pods
//! shows up as retransmissions of exactly that pair, and connections of
//! known lengths land in the right duration buckets. A whole local mesh
//! per test; needs root, fails (never skips) without it.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_ebpf::hist_bucket;
use mesh_local::control::ControlOptions;
use serde_json::Value;
use sockmesh_tests::e2e::*;

/// The fields of the admin API's `PathRtt` this test reads.
#[derive(Debug, serde::Deserialize)]
struct PathRtt {
    buckets: Vec<u64>,
    p50_us: u64,
    p99_us: u64,
    samples: u64,
    retransmits: u64,
}

/// The RTT the node proxy of `node` reports for the tunnels from `pod` to
/// the pod at `dst` (`GET /explain`, what `mesh explain` shows).
fn path_rtt(m: &TestMesh, node: &str, pod: &str, dst: &str) -> Result<Option<PathRtt>> {
    let (status, body) = m
        .mesh
        .admin_get(node, &format!("/explain?pod={pod}&dst={dst}"))?;
    ensure!(status == 200, "explain {pod} -> {dst}: {status} {body}");
    let v: Value = serde_json::from_str(&body)?;
    if v["rtt"].is_null() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_value(v["rtt"].clone())
            .with_context(|| format!("explain's rtt: {}", v["rtt"]))?,
    ))
}

/// The bucket holding the median of a log2 histogram.
fn median_bucket(buckets: &[u64]) -> Option<usize> {
    let total: u64 = buckets.iter().sum();
    let mut below = 0;
    for (i, c) in buckets.iter().enumerate() {
        below += c;
        if total > 0 && below * 2 >= total {
            return Some(i);
        }
    }
    None
}

/// The smoothed RTTs (microseconds) `ss -ti` shows for the established
/// TCP sockets in `pod`'s netns connected to `peer` port 15008: the
/// proxy's tunnel ends there.
fn ss_rtts(m: &TestMesh, pod: &str, peer: &str) -> Result<Vec<u64>> {
    let argv = [
        "ss",
        "-tinH",
        "state",
        "established",
        "dst",
        &format!("{peer}:15008"),
    ];
    let out = m.mesh.pod_command(pod, &argv)?.output()?;
    ensure!(
        out.status.success(),
        "ss in {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rtts_of(&String::from_utf8_lossy(&out.stdout))
}

/// The `rtt:` values of `ss -ti` output, in microseconds.
fn rtts_of(text: &str) -> Result<Vec<u64>> {
    let mut rtts = Vec::new();
    for tok in text.split_whitespace() {
        if let Some(v) = tok.strip_prefix("rtt:") {
            let ms: f64 = v
                .split('/')
                .next()
                .unwrap_or("")
                .parse()
                .with_context(|| format!("ss rtt {tok:?} in {text}"))?;
            rtts.push((ms * 1000.0).round() as u64);
        }
    }
    Ok(rtts)
}

/// A connection from `client` to `to` that moves a little each way, then
/// stays open until the returned process is told to finish.
fn held(m: &TestMesh, client: &str, to: &str) -> Result<Proc> {
    let mut p = m.spawn(
        client,
        &[
            "connect", "--to", to, "--send", "20000", "--seed", "7", "--hold",
        ],
    )?;
    p.event("connected")?;
    p.event("holding")?;
    Ok(p)
}

fn finish(mut p: Proc) -> Result<()> {
    p.child
        .stdin
        .as_mut()
        .context("stdin")?
        .write_all(b"go\n")?;
    p.event("transfer")?;
    p.wait()
}

/// Checks that `ss` agrees with the kernel's histogram of the tunnels
/// from the client to `peer`, within one bucket. The RTT wanders on a
/// busy machine (tens of microseconds to milliseconds on a veth), so the
/// comparison is over one quiet window: the samples one more exchange
/// added (`after - before`) against the srtt `ss` shows once it is done
/// (srtt is a moving average, each sample moves it an eighth).
fn tunnel_agrees(
    m: &TestMesh,
    peer: &str,
    what: &str,
    exchange: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let to = format!("{peer}:8080");
    let rtt = || {
        path_rtt(m, "node-a", "default/client", &to)?
            .with_context(|| format!("{what}: no kernel RTT for client -> {peer}"))
    };
    let before = rtt()?;
    exchange()?;
    let ss = ss_rtts(m, "default/client", peer)?;
    let after = rtt()?;
    ensure!(!ss.is_empty(), "{what}: ss shows no tunnel to {peer}:15008");
    let window: Vec<u64> = after
        .buckets
        .iter()
        .zip(before.buckets.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let kernel = median_bucket(&window)
        .with_context(|| format!("{what}: the exchange added no RTT sample: {after:?}"))?;
    for us in &ss {
        let b = hist_bucket(*us);
        assert!(
            b.abs_diff(kernel) <= 1,
            "{what}: ss says srtt {us} us (bucket {b}), the kernel's samples of the window have \
             their median in bucket {kernel}: {window:?} (all: {after:?})"
        );
    }
    eprintln!(
        "{what}: ss srtt {ss:?} us; window median bucket {kernel} ({window:?}); kernel p50 {} us \
         p99 {} us over {} samples",
        after.p50_us, after.p99_us, after.samples
    );
    Ok(())
}

/// A same-node connection the proxy splices on the node (no tunnel, no
/// fabric): the kernel's RTT of its delivery leg (the flow's `srtt_us`)
/// agrees with `ss` for that socket, and no tunnel RTT is claimed.
fn spliced_agrees(m: &TestMesh, peer: &str, what: &str) -> Result<()> {
    let to = format!("{peer}:8080");
    ensure!(
        path_rtt(m, "node-a", "default/client", &to)?.is_none(),
        "{what}: a tunnel RTT for a pair that has no tunnel"
    );
    let (_, flows) = m.mesh.admin_get("node-a", "/flows")?;
    let flows: Value = serde_json::from_str(&flows)?;
    // The held connection's delivery: the youngest into `to`.
    let delivery = flows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["direction"] == "inbound" && f["original_dst"] == to.as_str())
        .min_by_key(|f| f["age_ms"].as_u64().unwrap_or(u64::MAX))
        .with_context(|| format!("{what}: no delivery to {to} in {flows}"))?;
    let kernel = delivery["srtt_us"].as_u64().context("srtt_us")?;
    // The proxy's delivering socket in the destination pod's netns, or on
    // the kernel same-node path (no proxy socket) the app's own accepted
    // socket, whose peer is the client's. That very socket (not only
    // established: the server has already half-closed).
    let src = delivery["app_socket"].as_str().context("app_socket")?;
    let ss_of = |from: &str, to: &str| -> Result<Vec<u64>> {
        let argv = ["ss", "-tinH", "src", from, "dst", to];
        let out = m.mesh.pod_command("default/web-2", &argv)?.output()?;
        rtts_of(&String::from_utf8_lossy(&out.stdout))
    };
    let mut ss = ss_of(src, &to)?;
    if ss.is_empty() {
        ss = ss_of(&to, src)?;
    }
    ensure!(!ss.is_empty(), "{what}: ss shows no socket to {to}");
    let near = ss
        .iter()
        .any(|us| hist_bucket(*us).abs_diff(hist_bucket(kernel)) <= 1);
    assert!(
        near,
        "{what}: ss says srtt {ss:?} us, the kernel's delivery flow {kernel} us"
    );
    eprintln!("{what}: spliced on the node; ss srtt {ss:?} us, kernel {kernel} us");
    Ok(())
}

/// Runs `mesh --name <this mesh> ARGS` (bounded), requiring success.
fn mesh_cli(m: &TestMesh, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("timeout")
        .arg("30")
        .arg(m.bins.supervisor())
        .arg("--name")
        .arg(m.mesh.name())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "mesh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a user sees of a path's RTT: `mesh top --sort rtt` lists the pair
/// with its RTT, `mesh explain` shows it for the path.
fn cli_shows_the_rtt(m: &TestMesh, to: &str) -> Result<()> {
    let top: Value = serde_json::from_str(
        mesh_cli(
            m,
            &[
                "top",
                "--once",
                "--interval",
                "0.2",
                "--sort",
                "rtt",
                "-o",
                "json",
            ],
        )?
        .trim(),
    )?;
    let pair = top["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["source_workload"] == "default/client"
                && p["destination_workload"] == "default/web"
                && p["direction"] == "outbound"
        })
        .with_context(|| format!("mesh top: no client -> web pair: {top:#}"))?;
    ensure!(
        pair["rtt"]["samples"].as_u64() > Some(0) && pair["rtt"]["p99_us"].as_u64() > Some(0),
        "mesh top: {pair:#}"
    );
    // Sorted by RTT: no flow with an RTT comes after one without.
    let rtts: Vec<bool> = top["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| !f["rtt"].is_null())
        .collect();
    ensure!(
        rtts.windows(2).all(|w| w[0] || !w[1]),
        "mesh top --sort rtt: {rtts:?}"
    );
    let explain = mesh_cli(m, &["explain", "default/client", to])?;
    ensure!(
        explain.contains("RTT") && explain.contains("samples"),
        "mesh explain:\n{explain}"
    );
    Ok(())
}

#[test]
fn a_tunnels_kernel_rtt_agrees_with_ss_within_one_bucket_cross_node_and_same_node() -> Result<()> {
    let m = TestMesh::up("r", ControlOptions::default())?;
    let web = m.ip("default/web")?; // node-b: across the fabric
    let web2 = m.ip("default/web-2")?; // node-a, the client's node
    for (peer, pod, what) in [
        (&web, "default/web", "cross-node"),
        (&web2, "default/web-2", "same-node"),
    ] {
        let to = format!("{peer}:8080");
        let mut s = serve_concurrent(&m, pod, 8080, 22, 20_000)?;
        // Round trips through the pooled tunnel, then one connection held
        // open so the tunnel stays up for `ss`.
        for i in 0..20 {
            transfer(&m, "default/client", &to, &mut s, 20_000, 20_000)
                .with_context(|| format!("{what} transfer {i}"))?;
        }
        let h = held(&m, "default/client", &to)?;
        s.event("accepted")?;
        let mut exchange = || -> Result<()> {
            transfer(&m, "default/client", &to, &mut s, 20_000, 20_000).map(drop)
        };
        if !ss_rtts(&m, "default/client", peer)?.is_empty() {
            // Across the fabric (or same node through a tunnel).
            tunnel_agrees(&m, peer, what, &mut exchange)?;
            cli_shows_the_rtt(&m, &to)?;
        } else {
            ensure!(
                what == "same-node",
                "{what}: ss shows no tunnel to {peer}:15008"
            );
            spliced_agrees(&m, peer, what)?;
            exchange()?;
        }
        finish(h)?;
        s.event("transfer")?;
        s.wait()?;
    }
    // The cross-node RTT on :15020, labelled like istio_tcp_*: node-a
    // reports the client end, node-b the server end.
    for (node, reporter) in [("node-a", "source"), ("node-b", "destination")] {
        let text = m.mesh.metrics(node)?;
        let count = metric(
            &text,
            "sockmesh_tcp_rtt_seconds_count",
            &[
                ("reporter", reporter),
                ("source_workload", "client"),
                ("destination_workload", "web"),
                ("connection_security_policy", "mutual_tls"),
            ],
        );
        ensure!(
            count.is_some_and(|c| c > 0),
            "{node}: no {reporter} RTT histogram for client -> web:\n{text}"
        );
    }
    Ok(())
}

/// Runs `nft -f -` with `script` inside `node`'s network namespace.
fn nft(m: &TestMesh, node: &str, script: &str) -> Result<()> {
    let mut child = m
        .mesh
        .node_command(node, &["nft", "-f", "-"])?
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("nft (Debian package nftables; `./x setup` installs it)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft in {node}: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Removes the loss rule from `node` when dropped (a failed test leaves
/// no rule behind, though the whole netns goes with the mesh anyway).
struct Loss<'a> {
    m: &'a TestMesh,
    node: &'static str,
    on: bool,
}

const LOSS_TABLE: &str = "sockmesh_test_loss";

impl Loss<'_> {
    fn remove(&mut self) -> Result<()> {
        if self.on {
            nft(
                self.m,
                self.node,
                &format!("delete table inet {LOSS_TABLE}\n"),
            )?;
            self.on = false;
        }
        Ok(())
    }
}

impl Drop for Loss<'_> {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

fn retransmits(m: &TestMesh, dst: &str) -> Result<u64> {
    Ok(path_rtt(m, "node-a", "default/client", dst)?
        .map(|r| r.retransmits)
        .unwrap_or(0))
}

#[test]
fn dropping_a_pairs_fabric_packets_raises_its_retransmits_only_and_stops_when_lifted() -> Result<()>
{
    let m = TestMesh::up("l", ControlOptions::default())?;
    let client = m.ip("default/client")?;
    let web = m.ip("default/web")?;
    let pairs = [
        (format!("{web}:8080"), "default/web"), // the affected pair
        (format!("{}:8080", m.ip("other/iperf")?), "other/iperf"),
        (format!("{}:8080", m.ip("default/web-2")?), "default/web-2"),
    ];
    const SIZE: u64 = 2_000_000;
    let mut servers = Vec::new();
    for (_, pod) in &pairs {
        servers.push(serve(&m, pod, 8080, 3, SIZE)?);
    }
    let run = |servers: &mut Vec<Proc>| -> Result<()> {
        for ((to, _), s) in pairs.iter().zip(servers.iter_mut()) {
            transfer(&m, "default/client", to, s, SIZE, SIZE)?;
        }
        Ok(())
    };
    // Tunnels up, no loss yet.
    run(&mut servers)?;
    let before: Vec<u64> = pairs
        .iter()
        .map(|(to, _)| retransmits(&m, to))
        .collect::<Result<_>>()?;
    let metrics_before = m.mesh.metrics("node-a")?;

    // One pair's fabric packets, one way (client -> web, the tunnel's
    // port), dropped at random in node-a's netns: 20% of them (veths
    // carry GSO segments of up to 64 KiB, so a 2 MB transfer is only a
    // few dozen packets: at 20% one with no loss at all is unlikely).
    let mut loss = Loss {
        m: &m,
        node: "node-a",
        on: false,
    };
    nft(
        &m,
        "node-a",
        &format!(
            "table inet {LOSS_TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    \
             ip saddr {client} ip daddr {web} tcp dport 15008 numgen random mod 100 < 20 counter drop\n  }}\n}}\n"
        ),
    )?;
    loss.on = true;
    run(&mut servers)?;
    let during: Vec<u64> = pairs
        .iter()
        .map(|(to, _)| retransmits(&m, to))
        .collect::<Result<_>>()?;
    assert!(
        during[0] > before[0],
        "client -> web lost packets but its retransmits stayed at {}",
        before[0]
    );
    for i in 1..pairs.len() {
        assert_eq!(
            during[i], before[i],
            "client -> {} lost nothing but its retransmits moved",
            pairs[i].1
        );
    }
    // The same on :15020, by workload pair.
    let text = m.mesh.metrics("node-a")?;
    fn series(dst: &str) -> [(&'static str, &str); 3] {
        [
            ("reporter", "source"),
            ("source_workload", "client"),
            ("destination_workload", dst),
        ]
    }
    let rt = "sockmesh_tcp_retransmits_total";
    let web_rt = metric(&text, rt, &series("web")).unwrap_or(0);
    ensure!(
        web_rt > metric(&metrics_before, rt, &series("web")).unwrap_or(0),
        "sockmesh_tcp_retransmits_total client -> web did not rise:\n{text}"
    );
    assert_eq!(
        metric(&text, rt, &series("iperf")),
        metric(&metrics_before, rt, &series("iperf")),
        "client -> iperf lost nothing:\n{text}"
    );

    // Lifted: the counter stops.
    loss.remove()?;
    // What the loss left in flight (a last frame dropped just before the
    // rule went) is retransmitted once: wait until the tunnel has nothing
    // unacknowledged, then the count must stay.
    wait_until(
        "the client -> web tunnel to have nothing unacknowledged",
        Duration::from_secs(20),
        || {
            let argv = ["ss", "-tinH", "dst", &format!("{web}:15008")];
            let out = m.mesh.pod_command("default/client", &argv)?.output()?;
            Ok(!String::from_utf8_lossy(&out.stdout).contains("unacked:"))
        },
    )?;
    let lifted = retransmits(&m, &pairs[0].0)?;
    transfer(
        &m,
        "default/client",
        &pairs[0].0,
        &mut servers[0],
        SIZE,
        SIZE,
    )?;
    let after = retransmits(&m, &pairs[0].0)?;
    assert_eq!(
        after, lifted,
        "client -> web kept retransmitting once the loss was lifted"
    );
    eprintln!("retransmits: before {before:?}, with 20% loss {during:?}, after {after}");
    for s in servers {
        // Each served 3 connections except web's (the last transfer).
        drop(s);
    }
    Ok(())
}

/// The count of the duration bucket `(lo, hi]` seconds for client -> iperf.
fn in_bucket(text: &str, lo: &str, hi: &str) -> Result<u64> {
    let le = |b: &str| {
        metric(
            text,
            "sockmesh_tcp_connection_duration_seconds_bucket",
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_workload", "iperf"),
                ("le", b),
            ],
        )
        .with_context(|| format!("no duration bucket le={b} for client -> iperf:\n{text}"))
    };
    Ok(le(hi)? - le(lo)?)
}

#[test]
fn connections_of_known_lengths_land_in_their_duration_buckets() -> Result<()> {
    let m = TestMesh::up("u", ControlOptions::default())?;
    let to = format!("{}:8080", m.ip("other/iperf")?);
    let mut s = serve(&m, "other/iperf", 8080, 3, 1000)?;
    // A short one, one held 300 ms, one held 1.2 s.
    transfer(&m, "default/client", &to, &mut s, 1000, 1000)?;
    for hold in [Duration::from_millis(300), Duration::from_millis(1200)] {
        let mut p = m.spawn(
            "default/client",
            &[
                "connect", "--to", &to, "--send", "1000", "--seed", "7", "--hold",
            ],
        )?;
        p.event("connected")?;
        let held_at = Instant::now();
        p.event("holding")?;
        s.event("accepted")?;
        // The length of the connection is the point of this test.
        std::thread::sleep(hold.saturating_sub(held_at.elapsed()));
        finish(p)?;
        s.event("transfer")?;
    }
    s.wait()?;
    let mut text = String::new();
    wait_until(
        "three durations in the histogram",
        Duration::from_secs(10),
        || {
            text = m.mesh.metrics("node-a")?;
            Ok(metric(
                &text,
                "sockmesh_tcp_connection_duration_seconds_count",
                &[
                    ("source_workload", "client"),
                    ("destination_workload", "iperf"),
                ],
            ) == Some(3))
        },
    )
    .with_context(|| format!("node-a metrics:\n{text}"))?;
    // Bounds: le = (2^(i+1) - 1) ms.
    assert_eq!(in_bucket(&text, "0.255", "0.511")?, 1, "300 ms:\n{text}");
    assert_eq!(in_bucket(&text, "1.023", "2.047")?, 1, "1.2 s:\n{text}");
    let short = metric(
        &text,
        "sockmesh_tcp_connection_duration_seconds_bucket",
        &[
            ("source_workload", "client"),
            ("destination_workload", "iperf"),
            ("le", "0.255"),
        ],
    );
    if short != Some(1) {
        bail!("the short connection is not under 256 ms:\n{text}");
    }
    Ok(())
}
