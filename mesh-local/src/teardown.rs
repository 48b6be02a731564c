//! `down`: removes a mesh, from the state file and by name, from any
//! process, after a clean `up`, a failed one or a killed one. Idempotent.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::ip;
use crate::state::{self, ProcessRecord, State};
use crate::supervise::Supervision;
use crate::{Error, Options, cgroup, names};

/// What `down` removed, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    pub mesh: String,
    pub killed: Vec<u32>,
    pub netns: Vec<String>,
    pub veths: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    pub pins: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
    /// The state directory, when there was one.
    pub state_dir: Option<PathBuf>,
    /// What could not be removed (empty when `down` succeeded).
    pub problems: Vec<String>,
}

impl DownReport {
    /// Nothing was there to remove.
    pub fn is_empty(&self) -> bool {
        self.killed.is_empty()
            && self.netns.is_empty()
            && self.veths.is_empty()
            && self.cgroups.is_empty()
            && self.pins.is_empty()
            && self.files.is_empty()
            && self.state_dir.is_none()
    }

    /// One line: counts of what was removed.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "nothing to remove".into();
        }
        format!(
            "killed {} processes; removed {} network namespaces, {} veths, {} cgroups, {} pin roots, {} files{}",
            self.killed.len(),
            self.netns.len(),
            self.veths.len(),
            self.cgroups.len(),
            self.pins.len(),
            self.files.len(),
            if self.state_dir.is_some() {
                ", the state directory"
            } else {
                ""
            }
        )
    }
}

impl fmt::Display for DownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mesh {}: {}", self.mesh, self.summary())?;
        for pid in &self.killed {
            writeln!(f, "  killed pid {pid}")?;
        }
        for n in &self.netns {
            writeln!(f, "  netns {n}")?;
        }
        for c in &self.cgroups {
            writeln!(f, "  cgroup {}", c.display())?;
        }
        for p in &self.pins {
            writeln!(f, "  pins {}", p.display())?;
        }
        for p in &self.files {
            writeln!(f, "  file {}", p.display())?;
        }
        if let Some(d) = &self.state_dir {
            writeln!(f, "  state {}", d.display())?;
        }
        for p in &self.problems {
            writeln!(f, "  NOT REMOVED: {p}")?;
        }
        Ok(())
    }
}

/// Most entries `down` looks at in one directory (`/run/netns`, bpffs).
const MAX_ENTRIES: usize = 100_000;

/// Entries of `dir` named `<exact>` or `<prefix>...`.
fn named(dir: &Path, exact: &str, prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .take(MAX_ENTRIES)
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == exact || n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

/// The mesh's network namespaces found by name.
fn netns_by_name(mesh: &str) -> Vec<String> {
    let prefix = names::mesh_prefix(mesh);
    named(Path::new("/run/netns"), &prefix, &prefix)
}

/// The mesh's pin roots found by name (`sockmesh-<mesh>` and
/// `sockmesh-<mesh>-*`).
fn pins_by_name(mesh: &str, options: &Options) -> Vec<PathBuf> {
    named(
        &options.bpffs,
        &names::mesh_cgroup(mesh),
        &names::mesh_prefix(mesh),
    )
    .into_iter()
    .map(|n| options.bpffs.join(n))
    .collect()
}

/// Objects of the mesh on the machine, found by name (no state file
/// needed). Empty when the mesh is fully gone.
pub fn leftovers(mesh: &str, options: &Options) -> Vec<String> {
    let mut left: Vec<String> = netns_by_name(mesh)
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    let cg = options.mesh_cgroup(mesh);
    if cg.exists() {
        left.push(format!("cgroup {}", cg.display()));
    }
    left.extend(
        pins_by_name(mesh, options)
            .into_iter()
            .map(|p| format!("pins {}", p.display())),
    );
    let dir = options.state_dir(mesh);
    if dir.exists() {
        left.push(format!("state {}", dir.display()));
    }
    left
}

/// Most supervisor records `down` reads (one per node).
const MAX_SUPERVISORS: usize = 1_000;

/// The proxies' supervisors still running: from their records in the
/// state directory and from the state file.
fn supervisors(dir: &Path, state: Option<&State>) -> Vec<ProcessRecord> {
    let mut found: Vec<ProcessRecord> = std::fs::read_dir(dir.join("control"))
        .into_iter()
        .flatten()
        .flatten()
        .take(MAX_ENTRIES)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("supervise-") && n.ends_with(".json")
        })
        .take(MAX_SUPERVISORS)
        .filter_map(|e| Supervision::load(&e.path()).ok().flatten())
        .map(|s| s.supervisor)
        .collect();
    if let Some(s) = state {
        found.extend(
            s.created
                .processes
                .iter()
                .filter(|p| p.argv.get(1).map(String::as_str) == Some("supervise"))
                .cloned(),
        );
    }
    found.retain(|p| p.pid != std::process::id() && p.alive());
    found.sort_by_key(|p| p.pid);
    found.dedup_by_key(|p| p.pid);
    found
}

/// SIGKILLs `victims` and waits (at most `timeout`) until they are gone.
fn kill_all(victims: &[ProcessRecord], timeout: Duration, report: &mut DownReport) {
    for r in victims {
        if let Ok(raw) = i32::try_from(r.pid) {
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + timeout;
    while victims.iter().any(ProcessRecord::alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for r in victims {
        if r.alive() {
            report
                .problems
                .push(format!("pid {} survived SIGKILL", r.pid));
        }
    }
    report.killed.extend(victims.iter().map(|r| r.pid));
    report.killed.sort_unstable();
    report.killed.dedup();
}

/// Removes everything of mesh `mesh`: kills its processes (the mesh cgroup,
/// the recorded node processes, anything inside its network namespaces),
/// removes its bpffs pins, veths, network namespaces, cgroups, files and
/// state directory. Works without a state file (by name), and twice.
/// `Err(DownIncomplete)` lists what is still there.
pub fn down(mesh: &str, options: &Options) -> Result<DownReport, Error> {
    crate::check_mesh_name(mesh)?;
    let timeout = options.command_timeout;
    let mut report = DownReport {
        mesh: mesh.to_owned(),
        ..DownReport::default()
    };
    let dir = options.state_dir(mesh);
    let state = match State::load(&options.state_file(mesh)) {
        Ok(s) => s,
        Err(e) => {
            // Unreadable state: remove by name, and say so.
            tracing::warn!(mesh, "{e}; removing by name");
            None
        }
    };
    let mut netns: Vec<String> = state
        .as_ref()
        .map(|s| s.created.netns.clone())
        .unwrap_or_default();
    netns.extend(netns_by_name(mesh));
    netns.sort();
    netns.dedup();
    netns.retain(|n| state::netns_path(n).exists());

    // 1. Processes: the proxies' supervisors first (so none restarts a
    // proxy being killed), then the cgroup subtree, then recorded node
    // processes that are still themselves (start time checked), then
    // anything left inside the mesh's network namespaces.
    let supervisors = supervisors(&dir, state.as_ref());
    if !supervisors.is_empty() {
        kill_all(&supervisors, options.kill_timeout, &mut report);
    }
    let mesh_cg = options.mesh_cgroup(mesh);
    match cgroup::kill_tree(&mesh_cg, options.kill_timeout) {
        Ok(pids) => report.killed.extend(pids),
        Err(e) => report.problems.push(e.to_string()),
    }
    let mut victims: Vec<u32> = state
        .as_ref()
        .map(|s| {
            s.created
                .processes
                .iter()
                .filter(|p| p.alive())
                .map(|p| p.pid)
                .collect()
        })
        .unwrap_or_default();
    for n in &netns {
        if let Ok(out) = ip(&["netns", "pids", n], timeout) {
            victims.extend(out.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    victims.retain(|p| *p != std::process::id());
    victims.sort_unstable();
    victims.dedup();
    if !victims.is_empty() {
        let records: Vec<ProcessRecord> = victims
            .iter()
            .map(|pid| ProcessRecord::new(*pid, "victim"))
            .collect();
        kill_all(&records, options.kill_timeout, &mut report);
    }

    // 2. bpffs pins (links first would be kinder to a running proxy; it is
    // dead by now, so unlinking in any order detaches everything).
    let mut pins = pins_by_name(mesh, options);
    if let Some(s) = &state {
        pins.extend(s.created.pin_roots.iter().filter(|p| p.exists()).cloned());
    }
    pins.sort();
    pins.dedup();
    for pin in pins {
        let removed = if pin.is_dir() {
            std::fs::remove_dir_all(&pin)
        } else {
            std::fs::remove_file(&pin)
        };
        match removed {
            Ok(()) => report.pins.push(pin),
            Err(e) => report.problems.push(format!("pins {}: {e}", pin.display())),
        }
    }

    // 3. veths (deterministic, even if something still holds a netns),
    // then the network namespaces.
    if let Some(s) = &state {
        for v in &s.created.veths {
            if !state::netns_path(&v.netns).exists() {
                continue;
            }
            let present = ip(&["-n", &v.netns, "link", "show", "dev", &v.name], timeout).is_ok();
            if !present {
                continue;
            }
            match ip(&["-n", &v.netns, "link", "del", "dev", &v.name], timeout) {
                Ok(_) => report.veths.push(format!("{}/{}", v.netns, v.name)),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
    }
    for n in netns {
        match ip(&["netns", "del", &n], timeout) {
            Ok(_) => report.netns.push(n),
            Err(e) if !state::netns_path(&n).exists() => {
                tracing::debug!(netns = %n, "already gone: {e}");
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }

    // 4. Cgroups, children first.
    match cgroup::remove_tree(&mesh_cg, Duration::from_secs(2)) {
        Ok(removed) => report.cgroups.extend(removed),
        Err(e) => report.problems.push(e.to_string()),
    }
    if let Some(s) = &state {
        // Anything recorded outside the mesh cgroup (none today).
        for cg in s.created.cgroups.iter().rev() {
            if cg.starts_with(&mesh_cg) || !cg.exists() {
                continue;
            }
            match std::fs::remove_dir(cg) {
                Ok(()) => report.cgroups.push(cg.clone()),
                Err(e) => report
                    .problems
                    .push(format!("cgroup {}: {e}", cg.display())),
            }
        }
    }

    // 5. Files outside the state directory, then the state directory.
    if let Some(s) = &state {
        for f in &s.created.files {
            if f.starts_with(&dir) {
                report.files.push(f.clone());
                continue;
            }
            match std::fs::remove_file(f) {
                Ok(()) => report.files.push(f.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report.problems.push(format!("file {}: {e}", f.display())),
            }
        }
    }
    if dir.exists() {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => report.state_dir = Some(dir),
            Err(e) => report
                .problems
                .push(format!("state {}: {e}", dir.display())),
        }
    }

    // 6. Check by name that nothing is left.
    for left in leftovers(mesh, options) {
        let problem = format!("{left} is still there");
        if !report.problems.contains(&problem) {
            report.problems.push(problem);
        }
    }
    if report.problems.is_empty() {
        tracing::info!(mesh, "down: {}", report.summary());
        Ok(report)
    } else {
        Err(Error::DownIncomplete {
            mesh: mesh.to_owned(),
            report: Box::new(report),
        })
    }
}
