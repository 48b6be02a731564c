//! The mesh-owned cgroup v2 subtree: `sockmesh-<mesh>/node-<name>/{proxy,
//! pods/<ns>_<pod>}` under the v2 root. Never the root cgroup itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Error;

/// Deepest directory level and most directories `walk` visits: the mesh
/// makes 4 levels; a proxy may add a few.
const MAX_DEPTH: usize = 12;
const MAX_DIRS: usize = 20_000;

/// Where cgroup v2 is mounted on hosts that have no mount table to say.
const DEFAULT_CGROUP2_ROOT: &str = "/sys/fs/cgroup";

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mounts`:
/// `/sys/fs/cgroup` on unified hosts (most distributions),
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn v2_root() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| v2_root_in(&m))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CGROUP2_ROOT))
}

/// The first `cgroup2` mount of a mount table.
pub fn v2_root_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
        // Mount points escape spaces and tabs as octal (`\040`).
        (fstype == "cgroup2").then(|| PathBuf::from(mnt.replace("\\040", " ")))
    })
}

pub fn create(path: &Path) -> Result<(), Error> {
    std::fs::create_dir(path).map_err(|source| Error::Io {
        what: "create cgroup",
        path: path.to_owned(),
        source,
    })
}

/// The cgroup path as `/proc/<pid>/cgroup` shows it (`0::/sockmesh-...`).
pub fn relative(root: &Path, cgroup: &Path) -> String {
    match cgroup.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => cgroup.display().to_string(),
    }
}

/// The v2 cgroup of `pid`, relative to the v2 root.
pub fn of_pid(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// `root` and every cgroup below it, parents first (bounded).
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if !dir.join("cgroup.procs").exists() || out.len() >= MAX_DIRS {
            continue;
        }
        if depth < MAX_DEPTH
            && let Ok(rd) = std::fs::read_dir(&dir)
        {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        out.push(dir);
    }
    out
}

/// Pids in the subtree.
pub fn procs(root: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = walk(root)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn populated(root: &Path) -> bool {
    match std::fs::read_to_string(root.join("cgroup.events")) {
        Ok(t) => t.lines().any(|l| l.trim() == "populated 1"),
        // No events file: look at the processes.
        Err(_) => !procs(root).is_empty(),
    }
}

/// Kills every process in the subtree (`cgroup.kill`, or SIGKILL one by one
/// on kernels without it) and waits, at most `timeout`, until it is empty.
/// Returns the pids it killed.
pub fn kill_tree(root: &Path, timeout: Duration) -> Result<Vec<u32>, Error> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let pids = procs(root);
    if pids.is_empty() && !populated(root) {
        return Ok(pids);
    }
    let kill_file = root.join("cgroup.kill");
    if kill_file.exists() {
        std::fs::write(&kill_file, "1").map_err(|source| Error::Io {
            what: "kill cgroup",
            path: kill_file.clone(),
            source,
        })?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        if !populated(root) {
            return Ok(pids);
        }
        if Instant::now() > deadline {
            return Err(Error::Stuck {
                what: format!("processes {:?} in cgroup {}", procs(root), root.display()),
                after: timeout,
            });
        }
        if !kill_file.exists() {
            for pid in procs(root) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes the subtree, children first. Returns the removed directories.
pub fn remove_tree(root: &Path, timeout: Duration) -> Result<Vec<PathBuf>, Error> {
    let mut dirs = walk(root);
    // Children before parents: deeper paths first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let mut removed = Vec::with_capacity(dirs.len());
    for d in dirs {
        // rmdir can race the last exit for a moment (EBUSY).
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(source) if Instant::now() > deadline => {
                    return Err(Error::Io {
                        what: "remove cgroup",
                        path: d,
                        source,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        removed.push(d);
    }
    Ok(removed)
}

#[cfg(test)]
mod root_tests {
    use super::*;

    #[test]
    fn the_v2_root_is_where_cgroup2_is_mounted() {
        let unified = "sysfs /sys sysfs rw 0 0\n\
                       cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(v2_root_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(
            v2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            v2_root_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(
            v2_root_in("none /mnt/my\\040cg cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }
}
