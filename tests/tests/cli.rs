//! End-to-end tier: the `mesh` command as a user runs it — `up` (the demo
//! topology, its apps and its DENY policy), `exec` through the mesh,
//! `top`, `explain`, `certs`, `status`, `down` — and its documented errors
//! and exit codes. Needs root; fails (never skips) without it.
//!
//! The binaries are the workspace's: build them first with
//! `cargo build --bins` (`./x test` does).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Target dir of this test binary (`target/<profile>/deps/cli-...`).
fn bin_dir() -> Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .context("test binary has no target dir")?
        .to_owned())
}

fn mesh_bin() -> Result<PathBuf> {
    let dir = bin_dir()?;
    for b in ["mesh", "mesh-proxy", "mesh-ca"] {
        ensure!(
            dir.join(b).is_file(),
            "{} is not built: run `cargo build --bins` first (./x test does)",
            dir.join(b).display()
        );
    }
    Ok(dir.join("mesh"))
}

/// Runs `mesh --name <name> ARGS...` (no colors, no stdin), killed after
/// `timeout`.
fn mesh(name: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut child = Command::new(mesh_bin()?)
        .arg("--name")
        .arg(name)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn mesh")?;
    let end = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "`mesh {}` did not finish within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn show(args: &[&str], o: &Output) -> String {
    format!(
        "`mesh {}` exited {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const T: Duration = Duration::from_secs(60);

/// Runs `mesh ARGS` and requires exit code `code`; returns stdout.
fn expect(name: &str, args: &[&str], code: i32) -> Result<String> {
    let o = mesh(name, args, T)?;
    ensure!(
        o.status.code() == Some(code),
        "want exit {code}: {}",
        show(args, &o)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs `mesh ARGS`, requires exit code `code` and `want` in stderr.
fn expect_error(name: &str, args: &[&str], code: i32, want: &str) -> Result<()> {
    let o = mesh(name, args, T)?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(code) && err.contains(want),
        "want exit {code} and {want:?} on stderr: {}",
        show(args, &o)
    );
    Ok(())
}

/// `mesh down` when the test ends, passed or failed.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        match mesh(&self.0, &["down"], T) {
            Ok(o) if o.status.success() => {}
            other => {
                eprintln!("mesh down {}: {other:?}; removing with the harness", self.0);
                let _ = mesh_local::down(&self.0, &mesh_local::Options::default());
            }
        }
    }
}

/// What of mesh `name` is still on the machine.
fn leftovers(name: &str) -> Vec<String> {
    let prefix = format!("sockmesh-{name}-");
    let mut left = Vec::new();
    for dir in ["/run/netns", "/sys/fs/bpf"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) || n == format!("sockmesh-{name}") {
                    left.push(format!("{dir}/{n}"));
                }
            }
        }
    }
    for p in [
        format!("/sys/fs/cgroup/unified/sockmesh-{name}"),
        format!("/run/sockmesh/{name}"),
    ] {
        if Path::new(&p).exists() {
            left.push(p);
        }
    }
    left
}

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))
}

#[test]
fn up_exec_top_explain_certs_status_down() -> Result<()> {
    sockmesh_tests::require_privileges();
    let name = format!("c{}", std::process::id() % 100_000);
    let _ = mesh_local::down(&name, &mesh_local::Options::default());
    let _down = Down(name.clone());

    let out = mesh(&name, &["up"], Duration::from_secs(240))?;
    ensure!(out.status.success(), "{}", show(&["up"], &out));
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains(&format!("mesh {name} is up"))
            && text.contains("Try next:")
            && text.contains(&format!("mesh --name {name} exec default/client -- curl")),
        "up output:\n{text}"
    );

    // A second `up` is refused: exit 4.
    expect_error(&name, &["up"], 4, "already up")?;

    // Through the mesh, by Service name (hosts file in the pod).
    let body = expect(
        &name,
        &[
            "exec",
            "default/client",
            "--",
            "curl",
            "-sS",
            "-m",
            "10",
            "http://web:8080/",
        ],
        0,
    )?;
    ensure!(body.contains("hello from default/web"), "curl got {body:?}");
    // Exit codes pass through.
    expect(&name, &["exec", "client", "--", "sh", "-c", "exit 7"], 7)?;
    // The DENY policy refuses other -> app: web.
    let o = mesh(
        &name,
        &[
            "exec",
            "other/iperf",
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            "http://web.default:8080/",
        ],
        T,
    )?;
    ensure!(
        !o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("hello"),
        "other/iperf reached web: {}",
        show(&["exec", "other/iperf", "curl"], &o)
    );
    // Unknown pod: exit 5.
    expect_error(
        &name,
        &["exec", "default/nope", "--", "true"],
        5,
        "has no pod \"default/nope\"",
    )?;

    // The kernel counted the client's flow.
    let top = json(&expect(
        &name,
        &["top", "--once", "--interval", "0.2", "-o", "json"],
        0,
    )?)?;
    let flows = top["flows"].as_array().context("flows")?;
    let seen = flows.iter().find(|f| {
        f["source_workload"] == "default/client"
            && f["destination_workload"]
                .as_str()
                .is_some_and(|d| d.starts_with("default/web"))
            && f["bytes_sent"].as_u64().unwrap_or(0) > 0
            && f["bytes_received"].as_u64().unwrap_or(0) > 0
    });
    ensure!(seen.is_some(), "no client->web flow with bytes: {top:#}");
    let table = expect(
        &name,
        &["top", "--once", "--interval", "0.2", "--sort", "bytes"],
        0,
    )?;
    ensure!(
        table.contains("default/client") && table.contains("mTLS") && table.contains("flows ("),
        "top table:\n{table}"
    );

    // explain names the policy and rule of the denial.
    let x = json(&expect(
        &name,
        &["explain", "other/iperf", "web.default:8080", "-o", "json"],
        0,
    )?)?;
    ensure!(
        x["policy"]["allowed"] == false
            && x["policy"]["policy"]
                .as_str()
                .is_some_and(|p| p.contains("deny-other-to-web"))
            && !x["policy"]["rule"].is_null(),
        "explain: {x:#}"
    );
    let human = expect(&name, &["explain", "other/iperf", "web.default:8080"], 0)?;
    ensure!(
        human.starts_with("VERDICT") && human.contains("DENIED by default/deny-other-to-web"),
        "explain:\n{human}"
    );
    let ok = json(&expect(
        &name,
        &["explain", "default/client", "web:8080", "-o", "json"],
        0,
    )?)?;
    ensure!(
        ok["policy"]["allowed"] == true && ok["route"]["kind"] == "mesh",
        "explain client->web: {ok:#}"
    );
    expect_error(
        &name,
        &["explain", "default/client", "nope:80"],
        5,
        "no Service or pod",
    )?;

    // certs: a valid SVID with the pod's SPIFFE ID.
    let c = json(&expect(
        &name,
        &["certs", "default/client", "-o", "json"],
        0,
    )?)?;
    ensure!(
        c["identity"] == "spiffe://cluster.local/ns/default/sa/client" && c["valid"] == true,
        "certs: {c:#}"
    );
    let ct = expect(&name, &["certs", "default/client"], 0)?;
    ensure!(
        ct.contains("SPIFFE ID") && ct.contains("valid"),
        "certs:\n{ct}"
    );

    let st = expect(&name, &["status"], 0)?;
    ensure!(
        st.contains("no problems found") && st.contains("deny-other-to-web"),
        "status:\n{st}"
    );

    // down removes everything, and is safe twice.
    let d = expect(&name, &["down"], 0)?;
    ensure!(d.contains("removed") || d.contains("killed"), "down:\n{d}");
    let left = leftovers(&name);
    ensure!(left.is_empty(), "left after down: {left:?}");
    let again = expect(&name, &["down"], 0)?;
    ensure!(again.contains("nothing to remove"), "second down:\n{again}");
    expect_error(
        &name,
        &["exec", "default/client", "--", "true"],
        4,
        "is not up",
    )?;
    Ok(())
}

#[test]
fn commands_on_a_mesh_that_is_not_up_exit_4() -> Result<()> {
    sockmesh_tests::require_privileges();
    let name = format!("n{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    expect_error(
        &name,
        &["exec", "default/client", "--", "true"],
        4,
        "is not up",
    )?;
    expect_error(&name, &["status"], 4, "mesh up")?;
    expect_error(&name, &["top", "--once"], 4, "is not up")?;
    // Usage errors exit 2.
    let o = mesh(&name, &["top", "--sort", "sideways"], T)?;
    ensure!(o.status.code() == Some(2), "{}", show(&["top"], &o));
    let o = mesh("Bad-Name", &["up"], T)?;
    ensure!(o.status.code() == Some(2), "{}", show(&["up"], &o));
    Ok(())
}
