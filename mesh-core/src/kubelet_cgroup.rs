//! Which cgroup the node proxy attaches its eBPF cgroup programs to in a
//! cluster: the one that holds every pod of the node (and the proxy's own
//! pod), found from the kubelet's cgroup layout, never above it.
//!
//! The kubelet puts pods under `kubepods.slice` with the systemd cgroup
//! driver and under `kubepods` with the cgroupfs driver, both at the root of
//! the cgroup v2 tree. That tree is the mount itself (unified layout) or, on
//! hybrid hosts, `/sys/fs/cgroup/unified`. Pure file-system reads, so the
//! tests run on fake trees in a temp dir.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// How the host mounts cgroup v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// cgroup v2 only: the mount point is the v2 root.
    Unified,
    /// v1 controllers, with the v2 tree at `<mount>/unified`.
    Hybrid,
}

/// The kubelet's cgroup driver, as its pods' parent shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    /// `kubepods.slice`
    Systemd,
    /// `kubepods`
    Cgroupfs,
    /// A path given as is.
    Explicit,
}

/// What the caller asks for (`mesh-proxy --cgroup`, `mesh check --pre`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Find it: `kubelet`.
    Auto,
    /// `kubelet:systemd` or `kubelet:cgroupfs`.
    Driver(Driver),
    /// A directory relative to the v2 root (`kubepods.slice`, `k3s/kubepods`).
    Path(PathBuf),
}

impl std::str::FromStr for Choice {
    type Err = CgroupError;
    fn from_str(s: &str) -> Result<Self, CgroupError> {
        match s {
            "kubelet" => Ok(Choice::Auto),
            "kubelet:systemd" => Ok(Choice::Driver(Driver::Systemd)),
            "kubelet:cgroupfs" => Ok(Choice::Driver(Driver::Cgroupfs)),
            _ if s.starts_with("kubelet:") => Err(CgroupError::BadChoice(s.to_owned())),
            _ => {
                let p = Path::new(s.trim_start_matches('/'));
                if s.is_empty()
                    || p.components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(CgroupError::BadChoice(s.to_owned()));
                }
                Ok(Choice::Path(p.to_owned()))
            }
        }
    }
}

/// The cgroup to attach to, and how it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attach {
    /// Absolute directory under the mount (what `--cgroup` gets).
    pub dir: PathBuf,
    /// Its path inside the v2 hierarchy (`/kubepods.slice`).
    pub cgroup_path: String,
    pub layout: Layout,
    pub driver: Driver,
    /// Whether the caller's own cgroup is inside it (None: not known, as
    /// inside a private cgroup namespace, where the own path reads `/`).
    pub holds_self: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy at {0} (neither {0}/cgroup.controllers nor {0}/unified/cgroup.procs): the node proxy needs cgroup v2"
    )]
    NoV2(PathBuf),
    #[error(
        "no kubelet pod cgroup under {0} (neither kubepods.slice, the systemd driver's, nor kubepods, the cgroupfs driver's): is this a Kubernetes node, or does its kubelet use another --cgroup-root? Name it with --cgroup PATH"
    )]
    NoKubepods(PathBuf),
    #[error(
        "both kubepods.slice and kubepods exist under {0}: name the kubelet's driver with --cgroup kubelet:systemd or kubelet:cgroupfs"
    )]
    Ambiguous(PathBuf),
    #[error("cgroup {0} does not exist (no cgroup.procs in it)")]
    Missing(PathBuf),
    #[error(
        "cgroup {dir}: the proxy's own cgroup {own:?} is not inside it, so its programs would miss the proxy's pod; attach to a cgroup that holds both"
    )]
    NotHoldingSelf { dir: PathBuf, own: String },
    #[error(
        "cgroup choice {0:?}: expected `kubelet`, `kubelet:systemd`, `kubelet:cgroupfs` or a relative path with no `..`"
    )]
    BadChoice(String),
}

/// The v2 root under `mount` and its layout.
pub fn v2_root(mount: &Path) -> Result<(PathBuf, Layout), CgroupError> {
    if mount.join("cgroup.controllers").is_file() {
        return Ok((mount.to_owned(), Layout::Unified));
    }
    let unified = mount.join("unified");
    if unified.join("cgroup.procs").is_file() {
        return Ok((unified, Layout::Hybrid));
    }
    Err(CgroupError::NoV2(mount.to_owned()))
}

/// The v2 path of a process from its `/proc/PID/cgroup` text (the `0::`
/// line).
pub fn own_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Finds the cgroup to attach to under `mount` (the host's cgroup mount,
/// `/sys/fs/cgroup` or where it is mounted in the container). `own` is the
/// caller's v2 cgroup path (from [`own_path`]); `/` means unknown.
pub fn detect(mount: &Path, choice: &Choice, own: Option<&str>) -> Result<Attach, CgroupError> {
    let (root, layout) = v2_root(mount)?;
    let has = |rel: &str| root.join(rel).join("cgroup.procs").is_file();
    let (rel, driver) = match choice {
        Choice::Auto => match (has("kubepods.slice"), has("kubepods")) {
            (true, false) => ("kubepods.slice".to_owned(), Driver::Systemd),
            (false, true) => ("kubepods".to_owned(), Driver::Cgroupfs),
            (true, true) => {
                // Only one of them can hold this process.
                match own.filter(|o| *o != "/") {
                    Some(o) if inside(o, "/kubepods.slice") => {
                        ("kubepods.slice".to_owned(), Driver::Systemd)
                    }
                    Some(o) if inside(o, "/kubepods") => ("kubepods".to_owned(), Driver::Cgroupfs),
                    _ => return Err(CgroupError::Ambiguous(root)),
                }
            }
            (false, false) => return Err(CgroupError::NoKubepods(root)),
        },
        Choice::Driver(Driver::Systemd) => ("kubepods.slice".to_owned(), Driver::Systemd),
        Choice::Driver(_) => ("kubepods".to_owned(), Driver::Cgroupfs),
        Choice::Path(p) => (p.to_string_lossy().into_owned(), Driver::Explicit),
    };
    let dir = root.join(&rel);
    if !dir.join("cgroup.procs").is_file() {
        return Err(CgroupError::Missing(dir));
    }
    let cgroup_path = format!("/{rel}");
    let holds_self = match own {
        Some(o) if o != "/" => Some(inside(o, &cgroup_path)),
        _ => None,
    };
    if holds_self == Some(false) {
        return Err(CgroupError::NotHoldingSelf {
            dir,
            own: own.unwrap_or_default().to_owned(),
        });
    }
    Ok(Attach {
        dir,
        cgroup_path,
        layout,
        driver,
        holds_self,
    })
}

/// `mesh-proxy --cgroup VALUE --cgroup-root ROOT`: an absolute directory
/// is taken as it is; `kubelet`, `kubelet:systemd`, `kubelet:cgroupfs` or a
/// relative path are looked up under ROOT (the host's cgroup mount) with
/// [`detect`], checked against this process's own cgroup.
pub fn resolve_flag(value: &Path, root: &Path) -> Result<PathBuf, CgroupError> {
    if value.is_absolute() {
        return Ok(value.to_owned());
    }
    let choice: Choice = value.to_string_lossy().parse()?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| own_path(&t));
    detect(root, &choice, own.as_deref()).map(|a| a.dir)
}

/// `path` is `dir` or below it (whole components).
fn inside(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A cgroup and its parents, each with its cgroup.procs, as cgroupfs shows them.
    fn cg(root: &Path, rel: &str) {
        let mut d = root.to_owned();
        for part in rel.split('/') {
            d.push(part);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
        }
    }

    fn unified() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory").unwrap();
        fs::write(t.path().join("cgroup.procs"), "").unwrap();
        t
    }

    const SYSTEMD_SELF: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-ab.scope\n";

    #[test]
    fn the_systemd_driver_is_found_and_holds_the_proxy() {
        let t = unified();
        cg(t.path(), "kubepods.slice/kubepods-burstable.slice");
        cg(t.path(), "system.slice");
        let own = own_path(SYSTEMD_SELF);
        let a = detect(t.path(), &Choice::Auto, own.as_deref()).unwrap();
        assert_eq!(a.dir, t.path().join("kubepods.slice"));
        assert_eq!((a.layout, a.driver), (Layout::Unified, Driver::Systemd));
        assert_eq!(a.cgroup_path, "/kubepods.slice");
        assert_eq!(a.holds_self, Some(true));
    }

    #[test]
    fn the_cgroupfs_driver_in_a_hybrid_layout() {
        let t = tempfile::tempdir().unwrap();
        // v1 controllers beside the v2 tree at unified/.
        fs::create_dir_all(t.path().join("memory/kubepods")).unwrap();
        cg(t.path(), "unified");
        cg(t.path(), "unified/kubepods/besteffort");
        let a = detect(t.path(), &Choice::Auto, Some("/")).unwrap();
        assert_eq!(a.dir, t.path().join("unified/kubepods"));
        assert_eq!((a.layout, a.driver), (Layout::Hybrid, Driver::Cgroupfs));
        assert_eq!(a.holds_self, None, "a private cgroup namespace says /");
    }

    #[test]
    fn no_v2_no_kubelet_and_two_drivers_are_errors_that_say_what_to_do() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("memory")).unwrap();
        let e = detect(t.path(), &Choice::Auto, None).unwrap_err();
        assert!(matches!(e, CgroupError::NoV2(_)), "{e}");
        assert!(e.to_string().contains("needs cgroup v2"));

        let t = unified();
        cg(t.path(), "system.slice");
        let e = detect(t.path(), &Choice::Auto, None).unwrap_err();
        assert!(e.to_string().contains("--cgroup PATH"), "{e}");

        cg(t.path(), "kubepods.slice");
        cg(t.path(), "kubepods");
        let e = detect(t.path(), &Choice::Auto, None).unwrap_err();
        assert!(e.to_string().contains("kubelet:systemd"), "{e}");
        // The proxy's own cgroup decides between them.
        let a = detect(t.path(), &Choice::Auto, Some("/kubepods/pod1/c")).unwrap();
        assert_eq!(a.driver, Driver::Cgroupfs);
        let a = detect(t.path(), &Choice::Driver(Driver::Systemd), None).unwrap();
        assert_eq!(a.cgroup_path, "/kubepods.slice");
    }

    #[test]
    fn the_proxy_flag_takes_a_path_as_is_and_looks_kubelet_up() {
        let t = unified();
        cg(t.path(), "kubepods");
        let abs = t.path().join("kubepods");
        assert_eq!(resolve_flag(&abs, Path::new("/nonexistent")).unwrap(), abs);
        // This test process is not in a kubepods cgroup: only a private
        // cgroup namespace (own path `/`) or a host without kubelet lets
        // the lookup through, so name the cgroup the way the check wants.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        match resolve_flag(Path::new("kubelet"), t.path()) {
            Ok(dir) => assert_eq!(dir, abs),
            Err(CgroupError::NotHoldingSelf { own: o, .. }) => {
                assert_eq!(Some(o), own_path(&own))
            }
            Err(e) => panic!("{e}"),
        }
        let e = resolve_flag(Path::new("kubelet:crio"), t.path()).unwrap_err();
        assert!(matches!(e, CgroupError::BadChoice(_)), "{e}");
    }

    #[test]
    fn never_a_cgroup_that_misses_the_proxy_and_never_above_the_root() {
        let t = unified();
        cg(t.path(), "kubepods.slice");
        cg(t.path(), "other");
        let e = detect(
            t.path(),
            &"other".parse().unwrap(),
            own_path(SYSTEMD_SELF).as_deref(),
        )
        .unwrap_err();
        assert!(matches!(e, CgroupError::NotHoldingSelf { .. }), "{e}");
        // `kubepods.slicex` is not inside `kubepods.slice`.
        assert!(!inside("/kubepods.slicex/a", "/kubepods.slice"));
        for bad in ["../x", "a/../../b", "", "kubelet:containerd"] {
            let e = bad.parse::<Choice>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let e = detect(t.path(), &"nope".parse().unwrap(), None).unwrap_err();
        assert!(matches!(e, CgroupError::Missing(_)), "{e}");
    }
}
