//! What `up` needs from the machine, checked before anything is made. The
//! kernel's bridge and veth support is checked in the fresh fabric netns
//! (see `mesh::Builder::fabric`), where trying is harmless.

use std::path::{Path, PathBuf};

use crate::{Error, Options};

/// What the machine offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub ipv6: bool,
}

/// Programs the harness runs.
const TOOLS: [(&str, &str); 3] = [
    ("ip", "the `ip` program (iproute2)"),
    ("nsenter", "the `nsenter` program (util-linux)"),
    ("sh", "a POSIX shell `sh`"),
];

pub fn check(options: &Options) -> Result<Machine, Error> {
    let uid = nix::unistd::Uid::effective();
    if !uid.is_root() {
        return Err(Error::NotRoot { uid: uid.as_raw() });
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Err(Error::Missing {
            what: "network namespaces (CONFIG_NET_NS)".into(),
            detail: "/proc/self/ns/net does not exist".into(),
        });
    }
    // `cgroup.controllers` exists only in cgroup v2.
    let root = &options.cgroup_root;
    if !root.join("cgroup.controllers").exists() || !root.join("cgroup.procs").exists() {
        return Err(Error::Missing {
            what: format!("cgroup v2 at {}", root.display()),
            detail: format!(
                "{} has no cgroup.controllers (not a cgroup2 mount)",
                root.display()
            ),
        });
    }
    for (tool, what) in TOOLS {
        if find_in_path(tool).is_none() {
            return Err(Error::Missing {
                what: what.into(),
                detail: format!("{tool} not found in PATH"),
            });
        }
    }
    Ok(Machine {
        ipv6: Path::new("/proc/sys/net/ipv6").exists(),
    })
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .take(64)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
