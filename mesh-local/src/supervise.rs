//! The node proxy's supervisor: what the kubelet does for a DaemonSet's
//! crashed pod, for the local mesh. `mesh up` returns to the shell, so a
//! small process per node (`mesh supervise`, started where the proxy used
//! to be: the node's `proxy/` cgroup and netns) runs the proxy as its
//! child and, when it crashes (killed by a signal, non-zero exit), starts
//! it again after an exponential backoff. A clean exit (SIGTERM drained it)
//! is not restarted: the supervisor exits too.
//!
//! Everything it knows is in a small record file ([`Supervision`]), written
//! atomically at every change, that `mesh status`, [`crate::Mesh::node_pids`]
//! and the tests read. Two more files steer it: while the *hold* file
//! exists a crashed proxy stays down; the *kick* file ends a backoff (or
//! hold) at once. It exits when the mesh goes down (its state file is gone).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::state::{ProcessRecord, read_json, write_json};

/// How often the supervisor looks at its child, the hold and kick files
/// and the mesh's state file.
const POLL: Duration = Duration::from_millis(50);
/// Restarts kept in [`Supervision::history`] (the count goes on).
pub const HISTORY: usize = 32;

/// When to restart a crashed proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// The first wait after a crash.
    pub initial: Duration,
    /// Waits double up to this.
    pub max: Duration,
    /// A proxy that ran this long was healthy: the next wait is `initial`
    /// again.
    pub healthy_after: Duration,
    /// How long a proxy told to stop (the supervisor got SIGTERM) may drain
    /// before it is killed.
    pub stop_timeout: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(10),
            healthy_after: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(15),
        }
    }
}

/// Exponential backoff between restarts: `initial`, doubling to `max`,
/// back to `initial` after a run of `healthy_after`.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RestartPolicy,
    next: Duration,
}

impl Backoff {
    pub fn new(policy: RestartPolicy) -> Self {
        Backoff {
            policy,
            next: policy.initial,
        }
    }

    /// The wait before restarting a process that crashed after running
    /// for `ran`.
    pub fn after_crash(&mut self, ran: Duration) -> Duration {
        if ran >= self.policy.healthy_after {
            self.next = self.policy.initial;
        }
        let wait = self.next.min(self.policy.max);
        self.next = wait.saturating_mul(2).min(self.policy.max);
        wait
    }
}

/// How a proxy ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Exit {
    /// It exited with this code.
    Code { code: i32 },
    /// A signal killed it.
    Signal { signal: i32, name: String },
    /// It could not be started.
    Spawn { error: String },
}

impl Exit {
    pub fn from_status(status: ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code { code },
            (None, Some(signal)) => Exit::Signal {
                signal,
                name: Signal::try_from(signal)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| format!("signal {signal}")),
            },
            (None, None) => Exit::Code { code: -1 },
        }
    }

    /// Anything but a clean exit: the supervisor restarts it.
    pub fn is_crash(&self) -> bool {
        !matches!(self, Exit::Code { code: 0 })
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code { code } => write!(f, "exited {code}"),
            Exit::Signal { name, .. } => write!(f, "killed by {name}"),
            Exit::Spawn { error } => write!(f, "could not start: {error}"),
        }
    }
}

/// Where the supervisor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The proxy runs.
    Running,
    /// The proxy crashed; it starts again at `next_start_unix_ms`.
    Backoff,
    /// The proxy crashed and the hold file keeps it down.
    Held,
    /// The proxy exited cleanly (or the supervisor was told to stop): not
    /// restarted; the supervisor has exited.
    Stopped,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Running => "running",
            Phase::Backoff => "backoff",
            Phase::Held => "held",
            Phase::Stopped => "stopped",
        })
    }
}

/// One crash and the restart that followed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub exit: Exit,
    /// When the supervisor saw the proxy end (ms since the epoch).
    pub exited_unix_ms: u64,
    /// How long that proxy had run.
    pub ran_ms: u64,
    /// The backoff chosen.
    pub delay_ms: u64,
    /// When the next proxy started (`None` while it has not).
    pub restarted_unix_ms: Option<u64>,
    /// Started early by a kick (`Mesh::start_proxy`) or a lifted hold.
    #[serde(default)]
    pub kicked: bool,
}

/// The last exit of the node's proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    pub exit: Exit,
    pub unix_ms: u64,
    pub ran_ms: u64,
}

/// The supervisor's record file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Supervision {
    pub node: String,
    /// The supervisor itself.
    pub supervisor: ProcessRecord,
    pub phase: Phase,
    /// The proxy now running (`argv` set), if any.
    pub proxy: Option<ProcessRecord>,
    pub proxy_started_unix_ms: Option<u64>,
    /// Crashes handled (each one restarts the proxy, unless held), over
    /// the life of the mesh (a new supervisor carries the count on).
    pub restarts: u32,
    pub last_exit: Option<LastExit>,
    /// While in backoff: when the proxy starts again.
    pub next_start_unix_ms: Option<u64>,
    /// The latest restarts, oldest first (at most [`HISTORY`]).
    pub history: Vec<Restart>,
}

impl Supervision {
    /// Reads a record; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Supervision>, Error> {
        read_json(path, "read supervision record")
    }

    /// Writes the record atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        write_json(path, self, "rename supervision record")
    }

    /// The supervisor still runs.
    pub fn supervisor_alive(&self) -> bool {
        self.supervisor.alive()
    }

    /// The pid of the proxy, when it runs.
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().filter(|p| p.alive()).map(|p| p.pid)
    }
}

/// What the supervisor is given (see [`Config::to_args`] for its command
/// line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: String,
    /// The proxy's program and arguments.
    pub argv: Vec<OsString>,
    /// The record file.
    pub record: PathBuf,
    /// While this exists, a crashed proxy stays down.
    pub hold: PathBuf,
    /// When this appears, a backoff (or hold) ends at once.
    pub kick: PathBuf,
    /// The mesh's state file: once it is gone, the mesh is down and the
    /// supervisor stops its proxy and exits.
    pub mesh_state: PathBuf,
    pub policy: RestartPolicy,
}

impl Config {
    /// The arguments of `mesh supervise` that give this configuration
    /// (the proxy's argv after `--`).
    pub fn to_args(&self) -> Vec<OsString> {
        let ms = |d: Duration| d.as_millis().to_string().into();
        let mut a: Vec<OsString> = vec![
            "--node".into(),
            self.node.clone().into(),
            "--record".into(),
            self.record.clone().into(),
            "--hold".into(),
            self.hold.clone().into(),
            "--kick".into(),
            self.kick.clone().into(),
            "--mesh-state".into(),
            self.mesh_state.clone().into(),
            "--backoff-initial-ms".into(),
            ms(self.policy.initial),
            "--backoff-max-ms".into(),
            ms(self.policy.max),
            "--healthy-after-ms".into(),
            ms(self.policy.healthy_after),
            "--stop-timeout-ms".into(),
            ms(self.policy.stop_timeout),
            "--".into(),
        ];
        a.extend(self.argv.iter().cloned());
        a
    }
}

/// Why [`run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The proxy exited cleanly: not restarted.
    ProxyStopped(Exit),
    /// The supervisor was told to stop (SIGTERM); it stopped the proxy.
    Stopped(Exit),
    /// The mesh went down; the proxy was killed.
    MeshGone,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Supervises the proxy of `cfg` until it exits cleanly, `stop` is set
/// (SIGTERM: the proxy gets SIGTERM too and may drain) or the mesh goes
/// down. `say` gets one line per event (the supervisor's log).
pub fn run(cfg: &Config, stop: &AtomicBool, say: &mut dyn FnMut(&str)) -> Result<Outcome, Error> {
    let program = cfg.argv.first().ok_or_else(|| Error::Spawn {
        cmd: format!("supervisor of node {}", cfg.node),
        source: std::io::Error::other("no program to run"),
    })?;
    // A record of an earlier supervisor of this node: carry its counts on.
    let earlier = Supervision::load(&cfg.record).ok().flatten();
    let mut rec = Supervision {
        node: cfg.node.clone(),
        supervisor: ProcessRecord::new(std::process::id(), &cfg.node),
        phase: Phase::Running,
        proxy: None,
        proxy_started_unix_ms: None,
        restarts: earlier.as_ref().map_or(0, |e| e.restarts),
        last_exit: earlier.as_ref().and_then(|e| e.last_exit.clone()),
        next_start_unix_ms: None,
        history: earlier.map(|e| e.history).unwrap_or_default(),
    };
    let mut backoff = Backoff::new(cfg.policy);
    let mesh_gone = || !cfg.mesh_state.exists();
    let mut kicked = false;
    loop {
        if mesh_gone() {
            say("the mesh is down; exiting");
            return Ok(Outcome::MeshGone);
        }
        // Start the proxy (a kick now would be for this start).
        let _ = std::fs::remove_file(&cfg.kick);
        let started = Instant::now();
        let spawned = Command::new(program)
            .args(&cfg.argv[1..])
            .stdin(Stdio::null())
            .spawn();
        let now = now_ms();
        if let Some(last) = rec.history.last_mut()
            && last.restarted_unix_ms.is_none()
        {
            last.restarted_unix_ms = Some(now);
            last.kicked = kicked;
        }
        let exit = match spawned {
            Ok(mut child) => {
                let mut proxy = ProcessRecord::new(child.id(), &cfg.node);
                proxy.argv = cfg
                    .argv
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect();
                say(&format!("started mesh-proxy (pid {})", child.id()));
                rec.phase = Phase::Running;
                rec.proxy = Some(proxy);
                rec.proxy_started_unix_ms = Some(now);
                rec.next_start_unix_ms = None;
                rec.save(&cfg.record)?;
                match watch(&mut child, cfg, stop, &mesh_gone) {
                    Watched::Exited(exit) => exit,
                    Watched::MeshGone => {
                        say("the mesh is down; killed the proxy, exiting");
                        return Ok(Outcome::MeshGone);
                    }
                    Watched::Stopped(exit) => {
                        say(&format!("told to stop; mesh-proxy {exit}"));
                        rec.proxy = None;
                        rec.phase = Phase::Stopped;
                        rec.last_exit = Some(LastExit {
                            exit: exit.clone(),
                            unix_ms: now_ms(),
                            ran_ms: ms(started.elapsed()),
                        });
                        rec.save(&cfg.record)?;
                        return Ok(Outcome::Stopped(exit));
                    }
                }
            }
            Err(e) => Exit::Spawn {
                error: format!("{}: {e}", Path::new(program).display()),
            },
        };
        let ran = started.elapsed();
        let exited = now_ms();
        let who = match &rec.proxy {
            Some(p) => format!("mesh-proxy (pid {})", p.pid),
            None => "mesh-proxy".to_owned(),
        };
        rec.proxy = None;
        rec.last_exit = Some(LastExit {
            exit: exit.clone(),
            unix_ms: exited,
            ran_ms: ms(ran),
        });
        if !exit.is_crash() {
            say(&format!(
                "{who} {exit} after {ran:.1?}: a clean exit, not restarted"
            ));
            rec.phase = Phase::Stopped;
            rec.save(&cfg.record)?;
            return Ok(Outcome::ProxyStopped(exit));
        }
        let delay = backoff.after_crash(ran);
        rec.restarts = rec.restarts.saturating_add(1);
        rec.history.push(Restart {
            exit: exit.clone(),
            exited_unix_ms: exited,
            ran_ms: ms(ran),
            delay_ms: ms(delay),
            restarted_unix_ms: None,
            kicked: false,
        });
        if rec.history.len() > HISTORY {
            let extra = rec.history.len() - HISTORY;
            rec.history.drain(..extra);
        }
        let deadline = Instant::now() + delay;
        rec.next_start_unix_ms = Some(exited.saturating_add(ms(delay)));
        rec.phase = Phase::Backoff;
        say(&format!(
            "{who} {exit} after {ran:.1?}: restart {} in {delay:.1?}",
            rec.restarts
        ));
        rec.save(&cfg.record)?;
        // Wait out the backoff; the hold file can stretch it, a kick end it.
        kicked = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                say("told to stop while the proxy was down; exiting");
                rec.phase = Phase::Stopped;
                rec.next_start_unix_ms = None;
                rec.save(&cfg.record)?;
                return Ok(Outcome::Stopped(exit));
            }
            if mesh_gone() {
                say("the mesh is down; exiting");
                return Ok(Outcome::MeshGone);
            }
            let held = cfg.hold.exists();
            if cfg.kick.exists() {
                kicked = true;
                break;
            }
            if held && rec.phase != Phase::Held {
                say(&format!(
                    "held ({} exists): the proxy stays down",
                    cfg.hold.display()
                ));
                rec.phase = Phase::Held;
                rec.next_start_unix_ms = None;
                rec.save(&cfg.record)?;
            } else if !held && rec.phase == Phase::Held {
                say("hold lifted");
                kicked = true;
                break;
            }
            if !held && Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
    }
}

enum Watched {
    Exited(Exit),
    Stopped(Exit),
    MeshGone,
}

/// Waits for the proxy to end, for a stop request or for the mesh to go.
fn watch(
    child: &mut Child,
    cfg: &Config,
    stop: &AtomicBool,
    mesh_gone: &dyn Fn() -> bool,
) -> Watched {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Watched::Exited(Exit::from_status(status)),
            Ok(None) => {}
            Err(e) => {
                // Cannot wait for it: kill it, and report that as its end.
                let _ = child.kill();
                let _ = child.wait();
                return Watched::Exited(Exit::Spawn {
                    error: format!("waiting for pid {}: {e}", child.id()),
                });
            }
        }
        if stop.load(Ordering::Relaxed) {
            return Watched::Stopped(terminate(child, cfg.policy.stop_timeout));
        }
        if mesh_gone() {
            let _ = child.kill();
            let _ = child.wait();
            return Watched::MeshGone;
        }
        std::thread::sleep(POLL);
    }
}

/// SIGTERM (the proxy drains), then SIGKILL after `timeout`.
fn terminate(child: &mut Child, timeout: Duration) -> Exit {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Exit::from_status(status);
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    match child.wait() {
        Ok(status) => Exit::from_status(status),
        Err(e) => Exit::Spawn {
            error: format!("waiting for pid {}: {e}", child.id()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn policy(initial_ms: u64, max_ms: u64, healthy_ms: u64) -> RestartPolicy {
        RestartPolicy {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            healthy_after: Duration::from_millis(healthy_ms),
            stop_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_healthy_run() {
        let mut b = Backoff::new(RestartPolicy::default());
        let short = Duration::from_secs(1);
        let waits: Vec<u64> = (0..7).map(|_| ms(b.after_crash(short))).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        // Ran 30 s: healthy, so the next crash waits the initial time again.
        assert_eq!(ms(b.after_crash(Duration::from_secs(30))), 500);
        assert_eq!(ms(b.after_crash(short)), 1000);
    }

    #[test]
    fn exits_say_what_ended_the_proxy() {
        use std::os::unix::process::ExitStatusExt;
        let killed = Exit::from_status(ExitStatus::from_raw(9));
        assert_eq!(killed.to_string(), "killed by SIGKILL");
        assert!(killed.is_crash());
        let failed = Exit::from_status(ExitStatus::from_raw(1 << 8));
        assert_eq!(failed.to_string(), "exited 1");
        assert!(failed.is_crash());
        assert!(!Exit::from_status(ExitStatus::from_raw(0)).is_crash());
    }

    #[test]
    fn the_command_line_carries_every_setting_and_the_proxy_argv_last() {
        let cfg = Config {
            node: "node-a".into(),
            argv: vec!["/bin/proxy".into(), "--node".into(), "node-a".into()],
            record: "/r".into(),
            hold: "/h".into(),
            kick: "/k".into(),
            mesh_state: "/s".into(),
            policy: RestartPolicy::default(),
        };
        let args: Vec<String> = cfg
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let dash = args.iter().position(|a| a == "--").unwrap();
        assert_eq!(args[dash + 1..], ["/bin/proxy", "--node", "node-a"]);
        assert!(
            args.windows(2)
                .any(|w| w == ["--backoff-initial-ms", "500"])
        );
    }

    /// A supervisor over `sh` scripts in a temporary "mesh" (no root).
    struct Fixture {
        dir: tempfile::TempDir,
        cfg: Config,
    }

    fn fixture(script: &str, p: RestartPolicy) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        std::fs::write(&state, "{}").unwrap();
        let cfg = Config {
            node: "node-a".into(),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            record: dir.path().join("supervise-node-a.json"),
            hold: dir.path().join("hold-node-a"),
            kick: dir.path().join("start-node-a"),
            mesh_state: state,
            policy: p,
        };
        Fixture { dir, cfg }
    }

    fn wait_record(cfg: &Config, what: &str, ok: impl Fn(&Supervision) -> bool) -> Supervision {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(r)) = Supervision::load(&cfg.record)
                && ok(&r)
            {
                return r;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_crashing_program_is_restarted_with_growing_waits_until_it_exits_cleanly() {
        // Exits 3 twice, is killed by SIGKILL once, then exits 0.
        let mut f = fixture("", policy(20, 1000, 60_000));
        let count = f.dir.path().join("runs");
        f.cfg.argv[2] = format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; \
             case $n in 1|2) exit 3;; 3) kill -9 $$;; *) exit 0;; esac",
            c = count.display()
        )
        .into();
        let cfg = f.cfg.clone();
        let stop = AtomicBool::new(false);
        let mut lines = Vec::new();
        let out = run(&cfg, &stop, &mut |l| lines.push(l.to_owned())).unwrap();
        assert_eq!(out, Outcome::ProxyStopped(Exit::Code { code: 0 }));
        let r = Supervision::load(&cfg.record).unwrap().unwrap();
        assert_eq!(r.restarts, 3, "{lines:?}");
        assert_eq!(r.phase, Phase::Stopped);
        let exits: Vec<String> = r.history.iter().map(|h| h.exit.to_string()).collect();
        assert_eq!(exits, ["exited 3", "exited 3", "killed by SIGKILL"]);
        let delays: Vec<u64> = r.history.iter().map(|h| h.delay_ms).collect();
        assert_eq!(delays, [20, 40, 80]);
        for h in &r.history {
            let gap = h.restarted_unix_ms.unwrap() - h.exited_unix_ms;
            assert!(gap >= h.delay_ms, "restarted after {gap} ms: {h:?}");
        }
        assert_eq!(
            r.last_exit.map(|e| e.exit),
            Some(Exit::Code { code: 0 }),
            "{lines:?}"
        );
    }

    #[test]
    fn a_held_program_stays_down_until_kicked_and_the_supervisor_leaves_with_the_mesh() {
        let f = fixture("exit 1", policy(10, 100, 60_000));
        std::fs::write(&f.cfg.hold, "").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = f.cfg.clone();
        let s = stop.clone();
        let t = std::thread::spawn(move || run(&cfg, &s, &mut |_| {}));
        let r = wait_record(&f.cfg, "held", |r| r.phase == Phase::Held);
        assert_eq!((r.restarts, r.proxy_pid()), (1, None));
        // A kick starts it at once (it crashes again and, the hold file
        // being still there, is held again).
        std::fs::write(&f.cfg.kick, "").unwrap();
        let r3 = wait_record(&f.cfg, "the second crash", |r| r.restarts == 2);
        assert!(r3.history[0].kicked, "{r3:?}");
        // The mesh goes down: the supervisor exits.
        std::fs::remove_file(&f.cfg.mesh_state).unwrap();
        let out = t.join().unwrap().unwrap();
        assert_eq!(out, Outcome::MeshGone);
    }

    #[test]
    fn a_stopped_supervisor_lets_its_program_drain_and_does_not_restart_it() {
        let f = fixture(
            "trap 'exit 0' TERM; while :; do sleep 0.05; done",
            policy(10, 100, 60_000),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = f.cfg.clone();
        let s = stop.clone();
        let t = std::thread::spawn(move || run(&cfg, &s, &mut |_| {}));
        wait_record(&f.cfg, "running", |r| r.proxy_pid().is_some());
        stop.store(true, Ordering::Relaxed);
        let out = t.join().unwrap().unwrap();
        assert_eq!(out, Outcome::Stopped(Exit::Code { code: 0 }));
        let r = Supervision::load(&f.cfg.record).unwrap().unwrap();
        assert_eq!((r.phase, r.restarts), (Phase::Stopped, 0));
    }
}
