//! Exit codes and the errors that carry them.

use std::fmt;

/// The documented exit codes (`mesh --help` lists them).
pub mod code {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_ROOT: u8 = 3;
    /// The mesh is not up (or, for `up`, already up / left over).
    pub const MESH_STATE: u8 = 4;
    /// Unknown pod, service or flow.
    pub const NOT_FOUND: u8 = 5;
    /// The machine lacks a kernel feature or program.
    pub const MACHINE: u8 = 6;
    /// The Kubernetes API: no kubeconfig, unreachable, or it refused
    /// (RBAC, another field manager's object).
    pub const CLUSTER: u8 = 7;
    /// Ctrl-C (`up` removes what it had built).
    pub const INTERRUPTED: u8 = 130;
}

/// An error of the CLI itself, with its exit code and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Fails with [`code::NOT_ROOT`] unless `euid` is 0.
pub fn require_root_uid(euid: u32, command: &str) -> Result<(), Failure> {
    if euid == 0 {
        return Ok(());
    }
    Err(Failure::new(
        code::NOT_ROOT,
        format!(
            "`mesh {command}` needs root (effective uid is {euid}): the local mesh lives in network namespaces and cgroups"
        ),
    )
    .hint(format!("run it as root, e.g. `sudo mesh {command} ...`")))
}

/// Fails with [`code::NOT_ROOT`] unless this process runs as root.
pub fn require_root(command: &str) -> Result<(), Failure> {
    require_root_uid(nix::unistd::Uid::effective().as_raw(), command)
}

/// The exit code of a harness error.
pub fn local_code(e: &mesh_local::Error) -> u8 {
    use mesh_local::Error as E;
    match e {
        E::NotRoot { .. } => code::NOT_ROOT,
        E::Missing { .. } => code::MACHINE,
        E::MeshName { .. } => code::USAGE,
        E::AlreadyUp { .. } | E::Leftovers { .. } | E::NotUp { .. } | E::State { .. } => {
            code::MESH_STATE
        }
        E::Unknown { .. } => code::NOT_FOUND,
        E::Up { source, .. } => local_code(source),
        _ => code::FAILURE,
    }
}

/// The exit code for an error: the first [`Failure`] or harness error in
/// its chain decides; anything else is a general failure.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        if let Some(l) = cause.downcast_ref::<mesh_local::Error>() {
            return local_code(l);
        }
    }
    code::FAILURE
}

/// What to do about an error, when we know.
pub fn hint(e: &anyhow::Error) -> Option<String> {
    use mesh_local::Error as E;
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.hint.clone();
        }
        if let Some(l) = cause.downcast_ref::<mesh_local::Error>() {
            return match l {
                E::NotUp { mesh, .. } => Some(format!(
                    "start it with `mesh up{}`, or pick another mesh with --name",
                    name_flag(mesh)
                )),
                E::Missing { .. } => Some(
                    "install what is missing (on Debian: `./x setup` installs the prerequisites) and try again".into(),
                ),
                E::NotRoot { .. } => Some("run it as root".into()),
                E::Up { source, .. } => up_hint(source),
                _ => None,
            };
        }
    }
    None
}

fn up_hint(source: &mesh_local::Error) -> Option<String> {
    match source {
        mesh_local::Error::Missing { .. } => Some(
            "install what is missing (on Debian: `./x setup` installs the prerequisites) and try again"
                .into(),
        ),
        _ => None,
    }
}

/// ` --name X` unless X is the default mesh name.
pub fn name_flag(mesh: &str) -> String {
    if mesh == "demo" {
        String::new()
    } else {
        format!(" --name {mesh}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_root_is_refused_with_code_3() {
        assert_eq!(require_root_uid(0, "up"), Ok(()));
        let e = require_root_uid(1000, "up").unwrap_err();
        assert_eq!(e.code, code::NOT_ROOT);
        assert!(e.message.contains("needs root") && e.message.contains("1000"));
        assert_eq!(exit_code(&anyhow::Error::new(e)), 3);
    }

    #[test]
    fn harness_errors_map_to_documented_codes() {
        let not_up = mesh_local::Error::NotUp {
            mesh: "demo".into(),
            path: "/run/sockmesh/demo/state.json".into(),
        };
        let e = anyhow::Error::new(not_up).context("mesh exec");
        assert_eq!(exit_code(&e), code::MESH_STATE);
        assert!(hint(&e).unwrap_or_default().contains("mesh up"));
        let up = mesh_local::Error::Up {
            mesh: "demo".into(),
            source: Box::new(mesh_local::Error::Missing {
                what: "bridge support (CONFIG_BRIDGE)".into(),
                detail: "x".into(),
            }),
            cleanup: "removed".into(),
        };
        assert_eq!(exit_code(&anyhow::Error::new(up)), code::MACHINE);
        assert_eq!(exit_code(&anyhow::anyhow!("plain")), code::FAILURE);
        let unknown = Failure::new(code::NOT_FOUND, "no pod");
        assert_eq!(
            exit_code(&anyhow::Error::new(unknown).context("explain")),
            5
        );
    }
}
