//! End-to-end tier: the local mesh restarts a crashed node proxy the way a
//! DaemonSet would — a supervisor per node (`mesh supervise`) restarts it
//! with a growing backoff, counts the restarts for `mesh status`, leaves a
//! drained proxy down, can hold a crashed one down for a test, and goes
//! away with `mesh down`. Needs root; fails (never skips) without it.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_local::Mesh;
use mesh_local::control::{Binaries, ControlOptions};
use mesh_local::state::ProcessRecord;
use mesh_local::supervise::{Exit, Phase, Supervision};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use sockmesh_tests::e2e::{TestMesh, attempt, serve};

const NODE: &str = "node-a";

/// A mesh with `opts`; `down` on drop, even when the test fails. Checks
/// that the supervisor (`mesh`) is built, so supervision cannot silently
/// be off.
fn up(tag: &str, opts: ControlOptions) -> Result<TestMesh> {
    let m = TestMesh::up(tag, opts)?;
    let sup = m.bins.supervisor();
    ensure!(
        sup.exists(),
        "{} is not built: run `cargo build --bins` (./x test does)",
        sup.display()
    );
    Ok(m)
}

/// Polls `ok` every 50 ms until it gives a value, failing after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, ok: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    sockmesh_tests::poll(what, timeout, Duration::from_millis(50), ok)
}

fn record(m: &Mesh) -> Result<Supervision> {
    m.supervision(NODE).with_context(|| {
        format!(
            "no supervision record {}",
            m.supervision_file(NODE).display()
        )
    })
}

fn signal(pid: u32, sig: Signal) -> Result<()> {
    kill(Pid::from_raw(i32::try_from(pid)?), sig)?;
    Ok(())
}

/// Kills the (ready) proxy with SIGKILL and waits until its supervisor has
/// started another one and that one is ready; returns the new pid.
fn kill_and_wait_restart(m: &Mesh) -> Result<u32> {
    let old = m.proxy_pid(NODE).context("no proxy running on node-a")?;
    signal(old, Signal::SIGKILL)?;
    let new = wait_for(
        "the restart of the killed proxy",
        Duration::from_secs(30),
        || Ok(m.proxy_pid(NODE).filter(|p| *p != old)),
    )?;
    m.wait_proxy_ready(NODE, Duration::from_secs(30))?;
    Ok(new)
}

fn log(m: &Mesh) -> String {
    std::fs::read_to_string(m.control_log(&format!("proxy-{NODE}"))).unwrap_or_default()
}

/// `mesh status -o json` of the mesh, from the real `mesh` program.
fn status_json(m: &Mesh, bins: &Binaries) -> Result<Value> {
    let out = Command::new(bins.supervisor())
        .args(["--name", m.name(), "status", "-o", "json"])
        .env("NO_COLOR", "1")
        .output()?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "mesh status -o json printed {:?} ({})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn node_status<'a>(status: &'a Value, node: &str) -> Result<&'a Value> {
    status["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == node))
        .with_context(|| format!("no node {node} in {status:#}"))
}

#[test]
fn a_killed_proxy_is_restarted_ready_and_counted_in_mesh_status() -> Result<()> {
    let t = up("sa", ControlOptions::default())?;
    let (m, bins) = (&t.mesh, &t.bins);
    let r = record(m)?;
    ensure!(
        r.supervisor_alive() && r.restarts == 0 && r.phase == Phase::Running,
        "{r:?}"
    );
    let before = m.proxy_pid(NODE).context("no proxy on node-a")?;
    ensure!(
        m.node_pids(NODE, &bins.proxy) == [before],
        "node_pids sees the supervised proxy"
    );

    let killed_at = Instant::now();
    let after = kill_and_wait_restart(m)?;
    eprintln!("SIGKILL to ready again: {:?}", killed_at.elapsed());
    let (code, _) = m.admin_get(NODE, "/config_dump")?;
    ensure!(code == 200, "admin port after the restart: {code}");
    ensure!(after != before);

    let r = record(m)?;
    ensure!(r.restarts == 1, "restarts: {r:?}");
    let want = Exit::Signal {
        signal: 9,
        name: "SIGKILL".into(),
    };
    ensure!(r.history.len() == 1 && r.history[0].exit == want, "{r:?}");
    ensure!(r.proxy_pid() == Some(after), "{r:?}");
    ensure!(
        log(m).contains("killed by SIGKILL"),
        "the supervisor's line is in the proxy log:\n{}",
        log(m)
    );

    // What a user sees.
    let st = status_json(m, bins)?;
    let n = node_status(&st, NODE)?;
    ensure!(
        n["proxy_pid"] == after
            && n["proxy_state"] == "running"
            && n["restarts"] == 1
            && n["last_exit"]["reason"] == "killed by SIGKILL"
            && n["supervisor_pid"] == r.supervisor.pid,
        "status of {NODE}: {n:#}"
    );
    let other = node_status(&st, "node-b")?;
    ensure!(other["restarts"] == 0, "node-b: {other:#}");
    Ok(())
}

#[test]
fn repeated_crashes_wait_longer_each_time_and_down_leaves_nothing() -> Result<()> {
    let t = up("sb", ControlOptions::default())?;
    let m = &t.mesh;
    for _ in 0..3 {
        kill_and_wait_restart(m)?;
    }
    let r = record(m)?;
    ensure!(r.restarts == 3, "{r:?}");
    let delays: Vec<u64> = r.history.iter().map(|h| h.delay_ms).collect();
    ensure!(delays == [500, 1000, 2000], "backoff: {delays:?}");
    // The recorded times: each restart came after its backoff, later than
    // the one before.
    let mut gaps = Vec::new();
    for h in &r.history {
        let restarted = h.restarted_unix_ms.context("a restart without its time")?;
        let gap = restarted.saturating_sub(h.exited_unix_ms);
        ensure!(gap >= h.delay_ms && !h.kicked, "{h:?}");
        gaps.push(gap);
    }
    ensure!(gaps.windows(2).all(|w| w[1] > w[0]), "gaps {gaps:?}");

    // down: supervisors, proxies and everything else gone.
    let records: Vec<Supervision> = m
        .state()
        .nodes
        .iter()
        .filter_map(|n| m.supervision(&n.name))
        .collect();
    let supervisors: Vec<ProcessRecord> = records.iter().map(|s| s.supervisor.clone()).collect();
    let proxies: Vec<ProcessRecord> = records.iter().filter_map(|s| s.proxy.clone()).collect();
    ensure!(supervisors.len() == 2 && proxies.len() == 2, "{records:?}");
    let name = m.name().to_owned();
    let state_dir = m.state_dir();
    let report = t.mesh.down()?;
    for p in supervisors.iter().chain(&proxies) {
        ensure!(
            !p.alive(),
            "pid {} ({}) survived down",
            p.pid,
            p.argv.join(" ")
        );
        ensure!(report.killed.contains(&p.pid), "{report}");
    }
    ensure!(
        !state_dir.exists(),
        "{} is still there",
        state_dir.display()
    );
    let left: Vec<String> = std::fs::read_dir("/run/netns")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("sockmesh-{name}")))
        .collect();
    ensure!(left.is_empty(), "netns left: {left:?}");
    let cg = mesh_local::Options::default().mesh_cgroup(&name);
    ensure!(!cg.exists(), "{} is still there", cg.display());
    Ok(())
}

#[test]
fn a_held_proxy_stays_down_failing_closed_until_started_and_a_drained_one_is_not_restarted()
-> Result<()> {
    let mut t = up("sc", ControlOptions::default())?;
    let web = format!("{}:8080", t.ip("default/web")?);
    let mut server = serve(&t, "default/web", 8080, 1, 100)?;
    // Held: the crash is recorded and the proxy stays down.
    t.mesh.hold_proxy(NODE)?;
    let old = t.mesh.proxy_pid(NODE).context("no proxy")?;
    signal(old, Signal::SIGKILL)?;
    let r = wait_for("the supervisor to hold", Duration::from_secs(10), || {
        Ok(t.mesh.supervision(NODE).filter(|r| r.phase == Phase::Held))
    })?;
    ensure!(r.restarts == 1 && r.supervisor_alive(), "{r:?}");
    ensure!(t.mesh.proxy_pid(NODE).is_none() && t.mesh.node_pids(NODE, &t.bins.proxy).is_empty());
    // Meanwhile node-a fails closed: its pod's connection is refused (and
    // the server, which takes one connection, never sees it).
    let during = attempt(&t, "default/client", &web)?;
    ensure!(during.is_err(), "got through with no proxy: {during:?}");
    let st = status_json(&t.mesh, &t.bins)?;
    let n = node_status(&st, NODE)?;
    ensure!(
        n["proxy_state"] == "held" && n["proxy_pid"].is_null(),
        "{n:#}"
    );

    // On demand: start_proxy lifts the hold; the same supervisor starts it.
    let opts = t.opts.clone();
    t.mesh.start_proxy(NODE, &t.bins, &opts)?;
    t.mesh.wait_proxy_ready(NODE, Duration::from_secs(30))?;
    ensure!(attempt(&t, "default/client", &web)? == Ok(100));
    server.event("accepted")?;
    let m = &t.mesh;
    let r = record(m)?;
    ensure!(r.history.last().is_some_and(|h| h.kicked), "{r:?}");
    ensure!(!m.proxy_hold_file(NODE).exists());

    // SIGTERM drains the proxy: a clean exit is not restarted, and the
    // supervisor leaves.
    let pid = m.proxy_pid(NODE).context("no proxy after start_proxy")?;
    let supervisor = r.supervisor.clone();
    signal(pid, Signal::SIGTERM)?;
    let r = wait_for("the supervisor to stop", Duration::from_secs(20), || {
        Ok(m.supervision(NODE)
            .filter(|r| r.phase == Phase::Stopped && !r.supervisor_alive()))
    })?;
    ensure!(
        r.restarts == 1 && m.proxy_pid(NODE).is_none() && !supervisor.alive(),
        "{r:?}"
    );
    ensure!(
        r.last_exit.as_ref().map(|e| &e.exit) == Some(&Exit::Code { code: 0 }),
        "{r:?}"
    );
    let st = status_json(m, &t.bins)?;
    let n = node_status(&st, NODE)?;
    ensure!(n["proxy_state"] == "stopped", "{n:#}");
    let problems = st["problems"].as_array().context("no problems list")?;
    ensure!(
        problems.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.contains("exited 0, not restarted"))),
        "{st:#}"
    );

    // Started again: a new supervisor carries the count on.
    t.mesh.start_proxy(NODE, &t.bins, &opts)?;
    t.mesh.wait_proxy_ready(NODE, Duration::from_secs(30))?;
    let r = record(&t.mesh)?;
    ensure!(
        r.supervisor.pid != supervisor.pid && r.restarts == 1 && r.phase == Phase::Running,
        "{r:?}"
    );
    Ok(())
}

#[test]
fn without_supervision_a_killed_proxy_is_left_to_start_proxy() -> Result<()> {
    let opts = ControlOptions {
        restart_proxies: false,
        ..ControlOptions::default()
    };
    let mut t = up("sd", opts.clone())?;
    ensure!(t.mesh.supervision(NODE).is_none());
    let pids = t.mesh.node_pids(NODE, &t.bins.proxy);
    ensure!(pids.len() == 1, "{pids:?}");
    signal(pids[0], Signal::SIGKILL)?;
    wait_for("the proxy's death", Duration::from_secs(5), || {
        Ok(t.mesh.proxy_pid(NODE).is_none().then_some(()))
    })?;
    t.mesh.start_proxy(NODE, &t.bins, &opts)?;
    t.mesh.wait_proxy_ready(NODE, Duration::from_secs(30))?;
    ensure!(
        t.mesh.supervision(NODE).is_none(),
        "start_proxy made a supervisor"
    );
    Ok(())
}
