//! Running programs in a pod or on a node: the process joins the cgroup
//! first (so everything it does is seen by the node's cgroup programs),
//! then the network namespace, then execs the program. `nsenter --net`
//! only switches the netns; mounts (`/sys/fs/cgroup`, `/sys/fs/bpf`) stay
//! as the machine has them, which a node proxy needs.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::state::ProcessRecord;
use crate::{Error, Mesh, cgroup, command};

/// `$1`: the cgroup's `cgroup.procs`; `$2`: the netns path; the rest: argv.
/// Exits 125 when the process cannot join the cgroup.
const ENTER: &str =
    r#"echo $$ > "$1" || exit 125; ns="$2"; shift 2; exec nsenter --net="$ns" -- "$@""#;

fn enter<S: AsRef<OsStr>>(cgroup: &Path, netns: &Path, argv: &[S]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(ENTER)
        .arg("sockmesh-enter")
        .arg(cgroup.join("cgroup.procs"))
        .arg(netns)
        .args(argv);
    cmd
}

impl Mesh {
    /// A command that runs `argv` inside `pod` (`namespace/name`, or `name`
    /// in `default`): in the pod's cgroup and network namespace. Set its
    /// stdio and spawn it as you like.
    pub fn pod_command<S: AsRef<OsStr>>(&self, pod: &str, argv: &[S]) -> Result<Command, Error> {
        let p = self.pod(pod)?;
        Ok(enter(&p.cgroup, &p.netns_path(), argv))
    }

    /// Starts `argv` inside `pod` (stdio inherited).
    pub fn exec<S: AsRef<OsStr>>(&self, pod: &str, argv: &[S]) -> Result<Child, Error> {
        let mut cmd = self.pod_command(pod, argv)?;
        cmd.spawn().map_err(|source| Error::Spawn {
            cmd: format!("{pod}: {}", command::describe(&cmd)),
            source,
        })
    }

    /// Runs `argv` inside `pod` to completion (killed after `timeout`) and
    /// returns its status and output; a non-zero exit is not an error here.
    pub fn exec_output<S: AsRef<OsStr>>(
        &self,
        pod: &str,
        argv: &[S],
        timeout: Duration,
    ) -> Result<Output, Error> {
        let mut cmd = self.pod_command(pod, argv)?;
        command::output(&mut cmd, timeout)
    }

    /// A command that runs `argv` on `node`: in the node's `proxy/` cgroup
    /// and the node's network namespace.
    pub fn node_command<S: AsRef<OsStr>>(&self, node: &str, argv: &[S]) -> Result<Command, Error> {
        let n = self.node(node)?;
        Ok(enter(&n.proxy_cgroup, &n.netns_path(), argv))
    }

    /// Starts a long-lived process on `node` (the node proxy): in the
    /// node's `proxy/` cgroup and netns, in its own process group (a Ctrl-C
    /// at the terminal does not reach it), stdout and stderr appended to
    /// `log`. Returns once the process is in its cgroup; its pid is kept in
    /// the state, so `down` kills it.
    pub fn spawn_node_process<S: AsRef<OsStr>>(
        &mut self,
        node: &str,
        argv: &[S],
        log: &Path,
    ) -> Result<Child, Error> {
        let n = self.node(node)?.clone();
        let existed = log.exists();
        let open = || {
            File::options()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| Error::Io {
                    what: "open log",
                    path: log.to_owned(),
                    source,
                })
        };
        let stdout = open()?;
        let stderr = open()?;
        if !existed && !log.starts_with(self.state_dir()) {
            self.state.created.files.push(log.to_owned());
        }
        let mut cmd = enter(&n.proxy_cgroup, &n.netns_path(), argv);
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let what = format!("node {node}: {}", command::describe(&cmd));
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            cmd: what.clone(),
            source,
        })?;
        let mut record = ProcessRecord::new(child.id(), node);
        record.argv = argv
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        record.log = Some(log.to_owned());
        self.state.created.processes.push(record);
        self.state
            .save(&self.options.state_file(&self.state.mesh))?;

        // Wait (bounded) until it has joined the proxy cgroup.
        let want = cgroup::relative(&self.options.cgroup_root, &n.proxy_cgroup);
        let deadline = Instant::now() + self.options.command_timeout;
        loop {
            if cgroup::of_pid(child.id()).as_deref() == Some(want.as_str()) {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Command {
                    cmd: what,
                    status: status.to_string(),
                    stderr: format!("exited before joining cgroup {want}; see {}", log.display()),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    cmd: format!("{what} (joining cgroup {want})"),
                    after: self.options.command_timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
