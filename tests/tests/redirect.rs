//! Privileged tier: the eBPF redirection path in real network namespaces and
//! a test cgroup. Needs root; fails (never skips) without it.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_ebpf::{Datapath, FlowEntry, Mode};
use serde_json::Value;
use sockmesh_tests::{Probe, Sandbox, poll, run};

const T: Duration = Duration::from_secs(30);

fn expect_event(p: &mut Probe, event: &str) -> Result<Value> {
    let v = p.line(T)?;
    ensure!(v["event"] == event, "expected `{event}`, got {v}");
    Ok(v)
}

/// A sandbox with one enrolled pod netns and the data path installed.
fn pod_sandbox() -> Result<(Sandbox, std::path::PathBuf, Datapath)> {
    let mut sb = Sandbox::new(env!("CARGO_BIN_EXE_sockmesh-probe"))?;
    let pod = sb.add_netns("pod")?;
    let mut dp = Datapath::install(&sb.cgroup, &sb.pin_root)?;
    assert_eq!(dp.mode(), &Mode::Sockmap, "self-test on load failed");
    assert!(!dp.redirect()?, "redirect must be opt-in");
    dp.set_redirect(true)?;
    dp.enroll(&pod)?;
    Ok((sb, pod, dp))
}

fn start_proxy(sb: &Sandbox, pod: &Path, count: usize, extra: &[&str]) -> Result<Probe> {
    let pin = sb.pin_root.to_string_lossy().into_owned();
    let count = count.to_string();
    let mut args = vec![
        "proxy",
        "--pin-root",
        &pin,
        "--listen",
        "127.0.0.1:15001",
        "--listen",
        "[::1]:15001",
        "--count",
        &count,
    ];
    args.extend_from_slice(extra);
    let mut p = sb.probe(pod, &args)?;
    expect_event(&mut p, "listening")?;
    Ok(p)
}

fn banner(sb: &Sandbox, ns: &Path, to: &str, mark: bool) -> Result<String> {
    let mut args = vec!["connect", "--to", to];
    if mark {
        args.push("--mark");
    }
    let mut c = sb.probe(ns, &args)?;
    expect_event(&mut c, "connected")?;
    let v = expect_event(&mut c, "banner")?;
    c.wait(T)?;
    Ok(v["line"].as_str().unwrap_or_default().to_owned())
}

fn flow_to(dp: &Datapath, netns: u64, orig: &str) -> Result<Option<FlowEntry>> {
    let orig: SocketAddr = orig.parse()?;
    Ok(dp
        .flows()?
        .into_iter()
        .find(|f| f.netns == netns && f.original_dst == orig))
}

#[test]
fn connect_lands_on_the_outbound_listener_which_recovers_the_original_destination() -> Result<()> {
    let (sb, pod, _dp) = pod_sandbox()?;
    let mut proxy = start_proxy(&sb, &pod, 2, &[])?;

    assert_eq!(
        banner(&sb, &pod, "10.77.0.5:8080", false)?,
        "proxy 10.77.0.5:8080"
    );
    let v = expect_event(&mut proxy, "accepted")?;
    assert_eq!(v["orig"], "10.77.0.5:8080");
    assert!(
        v["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:"),
        "{v}"
    );

    assert_eq!(
        banner(&sb, &pod, "[fd77::5]:8443", false)?,
        "proxy [fd77::5]:8443"
    );
    let v = expect_event(&mut proxy, "accepted")?;
    assert_eq!(v["orig"], "[fd77::5]:8443");
    assert!(
        v["peer"].as_str().unwrap_or_default().starts_with("[::1]:"),
        "{v}"
    );
    proxy.wait(T)
}

#[test]
fn marked_sockets_and_unenrolled_namespaces_are_not_redirected() -> Result<()> {
    let (mut sb, pod, mut dp) = pod_sandbox()?;
    let other = sb.add_netns("other")?;
    let mut servers = Vec::new();
    for ns in [&pod, &other] {
        // A local address (on lo: this kernel has no dummy driver); the
        // hooks only leave 127/8 and ::1 alone, so 10.77.0.5 is capturable.
        sb.ip(ns, &["addr", "add", "10.77.0.5/32", "dev", "lo"])?;
        let count = if ns == &pod { "2" } else { "1" };
        let mut s = sb.probe(
            ns,
            &["server", "--listen", "10.77.0.5:8080", "--count", count],
        )?;
        expect_event(&mut s, "listening")?;
        servers.push(s);
    }
    let proxy = start_proxy(&sb, &pod, 1, &[])?;

    // The proxy's own sockets carry its mark: they go where they asked.
    assert_eq!(
        banner(&sb, &pod, "10.77.0.5:8080", true)?,
        "server 10.77.0.5:8080"
    );
    // A namespace that is not enrolled is not touched.
    assert_eq!(
        banner(&sb, &other, "10.77.0.5:8080", false)?,
        "server 10.77.0.5:8080"
    );
    // Control: the same connect, unmarked, from the enrolled pod is captured.
    assert_eq!(
        banner(&sb, &pod, "10.77.0.5:8080", false)?,
        "proxy 10.77.0.5:8080"
    );
    proxy.wait(T)?;
    // Unenrolled, the pod's connects go where they asked again (twice: idempotent).
    let cookie = mesh_ebpf::netns::cookie(&pod)?;
    dp.unenroll(cookie)?;
    dp.unenroll(cookie)?;
    assert!(!dp.enrolled()?.contains(&cookie));
    assert_eq!(
        banner(&sb, &pod, "10.77.0.5:8080", false)?,
        "server 10.77.0.5:8080"
    );
    for s in servers {
        s.wait(T)?;
    }
    let stats = dp.stats()?;
    assert!(stats["connect_skipped_mark"] >= 1, "{stats:?}");
    Ok(())
}

#[test]
fn a_gibibyte_each_way_arrives_byte_exact_through_the_redirect_with_half_close() -> Result<()> {
    const GIB: u64 = 1 << 30;
    let (sb, pod, dp) = pod_sandbox()?;
    let netns = mesh_ebpf::netns::cookie(&pod)?;
    let before = dp.stats()?["msg_redirected"];
    let n = GIB.to_string();
    let mut proxy = start_proxy(&sb, &pod, 1, &["--send", &n, "--seed", "2"])?;
    let mut app = sb.probe(
        &pod,
        &[
            "connect",
            "--to",
            "10.77.0.9:9000",
            "--send",
            &n,
            "--seed",
            "1",
        ],
    )?;
    expect_event(&mut app, "connected")?;
    expect_event(&mut proxy, "accepted")?;
    let a = expect_event(&mut app, "transfer")?["transfer"].clone();
    let p = expect_event(&mut proxy, "transfer")?["transfer"].clone();
    app.wait(T)?;
    proxy.wait(T)?;

    assert_eq!(a["received"], GIB, "app received {a}");
    assert_eq!(p["received"], GIB, "proxy received {p}");
    assert_eq!(
        a["sent_sha256"], p["received_sha256"],
        "app -> proxy bytes differ"
    );
    assert_eq!(
        p["sent_sha256"], a["received_sha256"],
        "proxy -> app bytes differ"
    );

    // The bytes took the sk_msg path, not loopback TCP.
    let redirected = dp.stats()?["msg_redirected"] - before;
    assert!(
        redirected >= 2 * GIB / (256 * 1024),
        "only {redirected} messages redirected"
    );
    let flow = flow_to(&dp, netns, "10.77.0.9:9000")?.context("no flow entry")?;
    assert_eq!((flow.bytes_sent, flow.bytes_received), (GIB, GIB));
    Ok(())
}

/// An app in `pod` that connected to `to` (captured), sent 3,000,000
/// bytes and received 5,000,001 from the proxy, and now holds the
/// connection open until released.
fn held_flow(sb: &Sandbox, pod: &Path, to: &str) -> Result<(Probe, Probe)> {
    let proxy = start_proxy(sb, pod, 1, &["--send", "5000001", "--seed", "4"])?;
    let mut app = sb.probe(
        pod,
        &[
            "connect", "--to", to, "--send", "3000000", "--seed", "3", "--hold",
        ],
    )?;
    expect_event(&mut app, "connected")?;
    expect_event(&mut app, "holding")?;
    Ok((proxy, app))
}

#[test]
fn flow_counters_equal_the_bytes_moved_while_open_and_after_close() -> Result<()> {
    let (sb, pod, dp) = pod_sandbox()?;
    let netns = mesh_ebpf::netns::cookie(&pod)?;
    let (proxy, mut app) = held_flow(&sb, &pod, "10.77.0.7:7000")?;

    let open = flow_to(&dp, netns, "10.77.0.7:7000")?.context("no flow entry while open")?;
    assert_eq!(open.bytes_sent, 3_000_000, "{open:?}");
    assert_eq!(open.bytes_received, 5_000_001, "{open:?}");
    assert_eq!(open.end_ns, 0, "open flow has an end time: {open:?}");
    assert!(!open.is_closed());
    assert!(open.start_ns > 0);
    assert_eq!(open.dst.port(), 15001);

    app.release()?;
    expect_event(&mut app, "transfer")?;
    app.wait(T)?;
    proxy.wait(T)?;
    let closed = wait_flow(&dp, netns, "10.77.0.7:7000", |f| f.is_closed())?;
    assert!(closed.is_closed(), "flow not closed: {closed:?}");
    assert!(closed.end_ns >= closed.start_ns);
    assert_eq!(
        (closed.bytes_sent, closed.bytes_received),
        (3_000_000, 5_000_001)
    );
    Ok(())
}

fn one_transfer(sb: &Sandbox, pod: &Path, to: &str, n: &str) -> Result<Value> {
    let mut proxy = start_proxy(sb, pod, 1, &["--send", n, "--seed", "6"])?;
    let mut app = sb.probe(pod, &["connect", "--to", to, "--send", n, "--seed", "5"])?;
    expect_event(&mut app, "connected")?;
    let accepted = expect_event(&mut proxy, "accepted")?;
    let t = expect_event(&mut app, "transfer")?["transfer"].clone();
    app.wait(T)?;
    proxy.wait(T)?;
    ensure!(accepted["orig"] == to, "proxy saw {accepted}");
    ensure!(
        t["received"].as_u64().map(|r| r.to_string()).as_deref() == Some(n),
        "{t}"
    );
    Ok(t)
}

#[test]
fn a_restarted_loader_reopens_the_pins_and_counters_carry_on() -> Result<()> {
    let mut sb = Sandbox::new(env!("CARGO_BIN_EXE_sockmesh-probe"))?;
    let pod = sb.add_netns("pod")?;
    let cg = sb.cgroup.to_string_lossy().into_owned();
    let pin = sb.pin_root.to_string_lossy().into_owned();
    let install = ["install", "--attach-cgroup", &cg, "--pin-root", &pin];

    let mut loader = sb.probe_in(None, &install)?;
    let v = expect_event(&mut loader, "installed")?;
    assert_eq!(
        (v["mode"].as_str(), v["reopened"].as_bool()),
        (Some("sockmap"), Some(false)),
        "{v}"
    );
    let mut dp = Datapath::open(&sb.pin_root)?;
    dp.set_redirect(true)?;
    let netns = dp.enroll(&pod)?;

    one_transfer(&sb, &pod, "10.77.0.1:1000", "1000000")?;
    let first = flow_to(&dp, netns, "10.77.0.1:1000")?.context("first flow")?;
    assert_eq!(first.bytes_sent, 1_000_000);
    let redirected = dp.stats()?["msg_redirected"];

    // kill -9: nothing runs its cleanup; the pins keep everything attached.
    loader.kill();
    one_transfer(&sb, &pod, "10.77.0.2:2000", "1000000")?;

    let mut loader2 = sb.probe_in(None, &install)?;
    let v = expect_event(&mut loader2, "installed")?;
    assert_eq!(
        (v["mode"].as_str(), v["reopened"].as_bool()),
        (Some("sockmap"), Some(true)),
        "{v}"
    );
    one_transfer(&sb, &pod, "10.77.0.3:3000", "1000000")?;

    let again = flow_to(&dp, netns, "10.77.0.1:1000")?.context("first flow lost")?;
    assert_eq!(
        (again.bytes_sent, again.bytes_received),
        (first.bytes_sent, first.bytes_received)
    );
    for orig in ["10.77.0.2:2000", "10.77.0.3:3000"] {
        let f = flow_to(&dp, netns, orig)?.with_context(|| format!("no flow to {orig}"))?;
        assert_eq!(
            (f.bytes_sent, f.bytes_received),
            (1_000_000, 1_000_000),
            "{orig}"
        );
    }
    assert!(
        dp.stats()?["msg_redirected"] > redirected,
        "counters were reset"
    );
    Ok(())
}

#[test]
fn uninstall_leaves_no_attachment_pin_or_map_behind() -> Result<()> {
    let (sb, _pod, dp) = pod_sandbox()?;
    let ids = dp.kernel_ids()?;
    assert_eq!(ids.links.len(), 5, "4 links + 1 sk_lookup link: {ids:?}");
    // 9 of the data path, 2 of the latency histograms (sm_tcp_hist,
    // sm_hist_zero), 2 of the kernel same-node path (sm_direct_allow,
    // sm_direct).
    assert_eq!(ids.maps.len(), 13, "{ids:?}");
    drop(dp);

    let report = mesh_ebpf::uninstall(&sb.pin_root)?;
    assert!(report.pins.len() >= 12, "removed only {:?}", report.pins);
    assert!(!sb.pin_root.exists(), "pin root still there");
    assert!(
        mesh_ebpf::uninstall(&sb.pin_root)?.pins.is_empty(),
        "second uninstall not a no-op"
    );

    // The kernel frees objects once the last reference goes (RCU): poll.
    let mut still = Vec::new();
    poll(
        "the uninstalled objects to be freed",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let progs: Vec<u32> = aya::programs::loaded_programs()
                .filter_map(|p| p.ok())
                .map(|p| p.id())
                .collect();
            let maps: Vec<u32> = aya::maps::loaded_maps()
                .filter_map(|m| m.ok())
                .map(|m| m.id())
                .collect();
            let links: Vec<u32> = aya::programs::loaded_links()
                .filter_map(|l| l.ok())
                .map(|l| l.id())
                .collect();
            let left: Vec<String> = ids
                .programs
                .iter()
                .filter(|i| progs.contains(i))
                .map(|i| format!("prog {i}"))
                .chain(
                    ids.maps
                        .iter()
                        .filter(|i| maps.contains(i))
                        .map(|i| format!("map {i}")),
                )
                .chain(
                    ids.links
                        .iter()
                        .filter(|i| links.contains(i))
                        .map(|i| format!("link {i}")),
                )
                .collect();
            let freed = left.is_empty();
            still = left;
            Ok(freed.then_some(()))
        },
    )
    .with_context(|| format!("still loaded after uninstall: {still:?}"))?;
    let attached = run(std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&sb.cgroup))
    .context("bpftool (installed by ./x setup)")?;
    assert!(
        attached.trim().is_empty(),
        "still attached to the cgroup: {attached}"
    );
    Ok(())
}

#[test]
fn inbound_tcp_is_steered_to_the_pods_15006_listener_except_hbone_and_the_pod_itself() -> Result<()>
{
    let (mut sb, pod, mut dp) = pod_sandbox()?;
    let peer = sb.add_netns("peer")?;
    let pod_name = pod
        .file_name()
        .and_then(|n| n.to_str())
        .context("pod name")?
        .to_owned();
    let peer_name = peer
        .file_name()
        .and_then(|n| n.to_str())
        .context("peer name")?
        .to_owned();
    run(std::process::Command::new("ip").args([
        "link", "add", "sm-p", "netns", &peer_name, "type", "veth", "peer", "name", "sm-q",
        "netns", &pod_name,
    ]))?;
    sb.ip(&peer, &["addr", "add", "10.77.1.1/24", "dev", "sm-p"])?;
    sb.ip(&peer, &["link", "set", "sm-p", "up"])?;
    sb.ip(&pod, &["addr", "add", "10.77.1.2/24", "dev", "sm-q"])?;
    sb.ip(&pod, &["link", "set", "sm-q", "up"])?;

    // The pod's app, and the proxy's inbound listener (made in the pod netns).
    let mut app = sb.probe(
        &pod,
        &["server", "--listen", "10.77.1.2:8080", "--count", "1"],
    )?;
    expect_event(&mut app, "listening")?;
    let inbound: TcpListener =
        mesh_ebpf::netns::run_in(&pod, || TcpListener::bind("0.0.0.0:15006"))??;
    dp.set_inbound_listener("10.77.1.2".parse()?, &inbound)?;
    inbound.set_nonblocking(false)?;
    let accept = std::thread::spawn(move || -> Result<String> {
        let (mut s, _) = inbound.accept()?;
        let local = s.local_addr()?.to_string();
        std::io::Write::write_all(&mut s, format!("inbound-capture {local}\n").as_bytes())?;
        Ok(local)
    });

    // From another host: captured by 15006 (the connection keeps its
    // original destination as local address).
    assert_eq!(
        banner(&sb, &peer, "10.77.1.2:8080", false)?,
        "inbound-capture 10.77.1.2:8080"
    );
    assert_eq!(
        accept
            .join()
            .map_err(|_| anyhow::anyhow!("accept panicked"))??,
        "10.77.1.2:8080"
    );
    // HBONE is not steered: nothing listens on 15008, so it is refused.
    let mut c = sb.probe(&peer, &["connect", "--to", "10.77.1.2:15008"])?;
    assert!(
        c.line(T).is_err() || c.wait(T).is_err(),
        "15008 was answered"
    );
    // From the pod itself: reaches the app.
    assert_eq!(
        banner(&sb, &pod, "10.77.1.2:8080", true)?,
        "server 10.77.1.2:8080"
    );
    app.wait(T)?;
    assert!(dp.stats()?["lookup_steered"] >= 1);
    Ok(())
}

/// Connects from `ns` to `to` with a short timeout; `Ok(true)` if any byte
/// came back from the server.
fn answered(sb: &Sandbox, ns: &Path, to: &str) -> Result<bool> {
    let mut c = sb.probe(ns, &["connect", "--to", to, "--connect-timeout-ms", "1500"])?;
    let answered = matches!(c.line(Duration::from_secs(10)), Ok(v) if v["event"] == "connected");
    c.kill();
    Ok(answered)
}

#[test]
fn a_captured_pod_with_no_inbound_listener_drops_plaintext_on_ipv4_and_ipv6() -> Result<()> {
    let (mut sb, pod, mut dp) = pod_sandbox()?;
    let peer = sb.add_netns("peer")?;
    let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    let (pod_name, peer_name) = (name(&pod).context("pod")?, name(&peer).context("peer")?);
    run(std::process::Command::new("ip").args([
        "link", "add", "sm-p", "netns", &peer_name, "type", "veth", "peer", "name", "sm-q",
        "netns", &pod_name,
    ]))?;
    sb.ip(&peer, &["addr", "add", "10.77.1.1/24", "dev", "sm-p"])?;
    sb.ip(
        &peer,
        &["addr", "add", "fd77:1::1/64", "dev", "sm-p", "nodad"],
    )?;
    sb.ip(&peer, &["link", "set", "sm-p", "up"])?;
    sb.ip(&pod, &["addr", "add", "10.77.1.2/24", "dev", "sm-q"])?;
    sb.ip(
        &pod,
        &["addr", "add", "fd77:1::2/64", "dev", "sm-q", "nodad"],
    )?;
    sb.ip(&pod, &["link", "set", "sm-q", "up"])?;
    // The app listens on every address; the proxy has no 15006 listener
    // (down, restarting, draining, or the pod has no certificate yet).
    let mut app = sb.probe(&pod, &["server", "--listen", "[::]:8080", "--count", "1"])?;
    expect_event(&mut app, "listening")?;
    let before = dp.stats()?["lookup_refused"];
    for to in ["10.77.1.2:8080", "[fd77:1::2]:8080"] {
        assert!(
            !answered(&sb, &peer, to)?,
            "plaintext to {to} reached the app"
        );
    }
    assert!(
        dp.stats()?["lookup_refused"] >= before + 2,
        "{:?}",
        dp.stats()?
    );
    // The pod's own connections to itself (the proxy delivering) pass.
    assert_eq!(
        banner(&sb, &pod, "[fd77:1::2]:8080", true)?,
        "server [::]:8080"
    );
    app.wait(T)?;
    // A listener that goes away (proxy crash) leaves the pod closed again.
    let l: TcpListener = mesh_ebpf::netns::run_in(&pod, || TcpListener::bind("[::]:15006"))??;
    dp.set_inbound_listener("10.77.1.2".parse()?, &l)?;
    drop(l);
    assert!(
        !answered(&sb, &peer, "10.77.1.2:8080")?,
        "steered to a closed listener"
    );
    // Unenrolled: plain TCP again (nothing listens now, so it is refused
    // by the kernel rather than dropped: the connect fails fast).
    dp.unenroll(mesh_ebpf::netns::cookie(&pod)?)?;
    let refused_before = dp.stats()?["lookup_refused"];
    assert!(!answered(&sb, &peer, "10.77.1.2:8080")?);
    assert_eq!(
        dp.stats()?["lookup_refused"],
        refused_before,
        "unenrolled pod still filtered"
    );
    Ok(())
}

#[test]
fn count_only_flows_take_loopback_tcp_and_are_still_counted_exactly() -> Result<()> {
    let (sb, pod, mut dp) = pod_sandbox()?;
    dp.set_redirect(false)?;
    let netns = mesh_ebpf::netns::cookie(&pod)?;
    let before = dp.stats()?;
    let n = (256u64 << 20).to_string();
    let mut proxy = start_proxy(&sb, &pod, 1, &["--send", &n, "--seed", "8"])?;
    // A blocking app that fails on a spurious EAGAIN: its socket is not in
    // the socket map in count-only mode, so it sees plain TCP.
    let mut app = sb.probe(
        &pod,
        &[
            "--strict-eagain",
            "connect",
            "--to",
            "10.77.0.8:8000",
            "--send",
            &n,
            "--seed",
            "7",
        ],
    )?;
    expect_event(&mut app, "connected")?;
    expect_event(&mut proxy, "accepted")?;
    let a = expect_event(&mut app, "transfer")?["transfer"].clone();
    let p = expect_event(&mut proxy, "transfer")?["transfer"].clone();
    app.wait(T)?;
    proxy.wait(T)?;
    assert_eq!(a["sent_sha256"], p["received_sha256"]);
    assert_eq!(p["sent_sha256"], a["received_sha256"]);
    let after = dp.stats()?;
    // Neither end joined the socket map, so no sk_msg program saw a byte.
    for stat in ["msg_redirected", "msg_passthrough", "sock_inserted"] {
        assert_eq!(after[stat], before[stat], "{stat}: {after:?}");
    }
    let flow = wait_flow(&dp, netns, "10.77.0.8:8000", |f| f.is_closed())?;
    assert!(!flow.redirected);
    assert_eq!(
        (flow.bytes_sent, flow.bytes_received),
        (256 << 20, 256 << 20)
    );
    Ok(())
}

/// Polls the flow to `orig` until `done` holds (5 s at most), returning
/// the last state seen.
fn wait_flow(
    dp: &Datapath,
    netns: u64,
    orig: &str,
    done: impl Fn(&FlowEntry) -> bool,
) -> Result<FlowEntry> {
    // At the deadline, the flow as it is: the caller's asserts say what
    // is wrong with it.
    let mut last = None;
    let waited = poll(
        "the flow",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let f = flow_to(dp, netns, orig)?.context("no flow entry")?;
            if done(&f) {
                return Ok(Some(f));
            }
            last = Some(f);
            Ok(None)
        },
    );
    waited.or_else(|e| last.ok_or(e))
}

#[test]
fn count_only_counters_equal_the_bytes_moved_while_open_and_after_close() -> Result<()> {
    let (sb, pod, mut dp) = pod_sandbox()?;
    dp.set_redirect(false)?;
    let netns = mesh_ebpf::netns::cookie(&pod)?;
    let (proxy, mut app) = held_flow(&sb, &pod, "10.77.0.6:6000")?;
    // Counted from each sender's acknowledged bytes: exact once acked (no
    // SYN, no FIN, no byte twice), while the connection is still open.
    let open = wait_flow(&dp, netns, "10.77.0.6:6000", |f| {
        (f.bytes_sent, f.bytes_received) == (3_000_000, 5_000_001)
    })?;
    assert_eq!(
        (open.bytes_sent, open.bytes_received),
        (3_000_000, 5_000_001),
        "{open:?}"
    );
    assert!(!open.is_closed(), "{open:?}");
    app.release()?;
    expect_event(&mut app, "transfer")?;
    app.wait(T)?;
    proxy.wait(T)?;
    let closed = wait_flow(&dp, netns, "10.77.0.6:6000", |f| f.is_closed())?;
    assert!(closed.is_closed(), "flow not closed: {closed:?}");
    assert_eq!(
        (closed.bytes_sent, closed.bytes_received),
        (3_000_000, 5_000_001),
        "FIN counted as data, or a byte lost: {closed:?}"
    );
    Ok(())
}
