//! The sandbox privileged tests, demos and benchmarks run in: network
//! namespaces, a cgroup subtree and a bpffs pin root, all named
//! `sockmesh-t<pid>-<n>…` and all removed on drop — also when a test panics.
//! Nothing here touches the machine's own netns, routes, sysctls or root
//! cgroup.
#![forbid(unsafe_code)]

pub mod e2e;
pub mod flowdata;
pub mod kube_bench;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Root of the cgroup v2 hierarchy on this machine, from the mount table
/// (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones).
pub fn cgroup2_root() -> std::path::PathBuf {
    mesh_local::cgroup2_root()
}
pub const BPFFS: &str = "/sys/fs/bpf";
/// Every sandbox object's name starts with this.
pub const PREFIX: &str = "sockmesh-t";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The one way the tests wait for something observable (never a fixed
/// sleep before an assert).
pub use sockmesh_test_support::poll;

/// Fails (never skips) when the privileged tier cannot run here.
pub fn require_privileges() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "privileged tests must run as root (they create network namespaces, cgroups and load eBPF); \
         run them with `./x test` as root"
    );
    let root = cgroup2_root();
    assert!(
        root.join("cgroup.procs").exists(),
        "no cgroup v2 hierarchy at {}",
        root.display()
    );
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Sandbox {
    pub name: String,
    /// The `sockmesh-probe` binary (integration tests pass
    /// `env!("CARGO_BIN_EXE_sockmesh-probe")`).
    probe_bin: PathBuf,
    pub cgroup: PathBuf,
    pub pin_root: PathBuf,
    netns: Vec<String>,
}

impl Sandbox {
    pub fn new(probe_bin: impl Into<PathBuf>) -> Result<Self> {
        require_privileges();
        sweep_stale();
        mesh_ebpf::mount_bpffs(Path::new(BPFFS)).context("mount bpffs")?;
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = cgroup2_root().join(&name);
        std::fs::create_dir(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        Ok(Sandbox {
            probe_bin: probe_bin.into(),
            pin_root: Path::new(BPFFS).join(&name),
            cgroup,
            name,
            netns: Vec::new(),
        })
    }

    /// Creates a network namespace `<sandbox>-<suffix>` with loopback up.
    /// Returns its path (`/run/netns/...`).
    pub fn add_netns(&mut self, suffix: &str) -> Result<PathBuf> {
        let name = format!("{}-{suffix}", self.name);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.netns.push(name.clone());
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(PathBuf::from("/run/netns").join(name))
    }

    /// Runs `ip -n <netns> ARGS...`.
    pub fn ip(&self, netns: &Path, args: &[&str]) -> Result<String> {
        let name = netns
            .file_name()
            .and_then(|n| n.to_str())
            .context("netns path has no name")?;
        run(Command::new("ip").arg("-n").arg(name).args(args))
    }

    /// Starts the probe binary as a process of the sandbox cgroup inside
    /// `netns`.
    pub fn probe(&self, netns: &Path, args: &[&str]) -> Result<Probe> {
        self.probe_in(Some(netns), args)
    }

    /// Starts the probe binary in the sandbox cgroup, inside `netns` or, with
    /// `None`, in the test's own netns (for a loader, which opens no
    /// connections but its loopback self-test).
    pub fn probe_in(&self, netns: Option<&Path>, args: &[&str]) -> Result<Probe> {
        let bin = &self.probe_bin;
        let mut cmd = Command::new(bin);
        cmd.arg("--cgroup").arg(&self.cgroup);
        if let Some(ns) = netns {
            cmd.arg("--netns").arg(ns);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stdout = BufReader::new(child.stdout.take().context("probe stdout")?);
        let stdin = child.stdin.take();
        Ok(Probe {
            child,
            stdout,
            stdin,
            what: args.join(" "),
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.cgroup) {
            eprintln!("sandbox cleanup: {e:#}");
        }
        for ns in &self.netns {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
                eprintln!("sandbox cleanup: {e:#}");
            }
        }
        if let Err(e) = mesh_ebpf::uninstall(&self.pin_root) {
            eprintln!("sandbox cleanup: {e:#}");
        }
    }
}

/// Kills every process in the cgroup, then removes it.
fn remove_cgroup(cg: &Path) -> Result<()> {
    if !cg.exists() {
        return Ok(());
    }
    std::fs::write(cg.join("cgroup.kill"), "1")
        .with_context(|| format!("kill {}", cg.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{}: processes still running: {}",
                cg.display(),
                procs.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // rmdir can race the last exit for a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(cg) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("rmdir {}", cg.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn pid_of(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn alive(pid: i32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes sandboxes left by test processes that no longer exist (a test
/// binary killed mid-run cannot run its destructors).
pub fn sweep_stale() {
    let stale = |name: &str| pid_of(name).is_some_and(|p| !alive(p));
    if let Ok(rd) = std::fs::read_dir(cgroup2_root()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                let _ = remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                let _ = run(Command::new("ip").args(["netns", "del", &n]));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(BPFFS) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                let _ = mesh_ebpf::uninstall(&e.path());
            }
        }
    }
}

/// A probe process: reads its JSON lines, feeds its stdin, is killed on drop.
pub struct Probe {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stdin: Option<ChildStdin>,
    what: String,
}

impl Probe {
    /// Next line of output as JSON, waiting at most `timeout`.
    pub fn line(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        // The probe prints a line per event; a blocked read is bounded by the
        // probe's own timeouts (every probe wait has one) and by `timeout`
        // through a watchdog that kills it.
        let pid = self.child.id() as i32;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let watchdog = std::thread::spawn(move || {
            let end = Instant::now() + timeout;
            while Instant::now() < end {
                if flag.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            true
        });
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line);
        done.store(true, Ordering::Relaxed);
        let killed = watchdog.join().unwrap_or(false);
        ensure!(
            !killed,
            "probe `{}` printed nothing within {timeout:?}",
            self.what
        );
        let n = n.with_context(|| format!("read from probe `{}`", self.what))?;
        ensure!(n > 0, "probe `{}` exited without output", self.what);
        serde_json::from_str(&line)
            .with_context(|| format!("probe `{}` printed {line:?}", self.what))
    }

    /// Writes a line to the probe's stdin (releases a `--hold`).
    pub fn release(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for exit (bounded), failing on a non-zero status.
    pub fn wait(mut self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                ensure!(st.success(), "probe `{}` exited with {st}", self.what);
                return Ok(());
            }
            if Instant::now() > end {
                bail!("probe `{}` still running after {timeout:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.kill();
    }
}
