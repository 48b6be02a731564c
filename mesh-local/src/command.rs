//! Running the programs the harness drives (`ip`, `nsenter`, `sh`), every
//! one with a deadline.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// How a command is shown in errors: program and arguments, shell-like.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion within `timeout`; its stdout on success, an
/// error with its stderr otherwise.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String, Error> {
    let out = output(cmd, timeout)?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`.
pub fn ip<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Result<String, Error> {
    run(Command::new("ip").args(args), timeout)
}

/// Runs `cmd` with piped stdout and stderr (stdin closed) and collects both;
/// kills it after `timeout`.
pub fn output(cmd: &mut Command, timeout: Duration) -> Result<Output, Error> {
    let what = describe(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: what.clone(),
            source,
        })?;
    wait_output(child, timeout, &what)
}

/// Collects a spawned child's piped output, killing it after `timeout`.
pub fn wait_output(mut child: Child, timeout: Duration, what: &str) -> Result<Output, Error> {
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                // The readers end when the pipes close (the killed child's
                // own children could keep them open: don't wait for them).
                return Err(Error::Timeout {
                    cmd: what.to_owned(),
                    after: timeout,
                });
            }
            Err(source) => {
                return Err(Error::Spawn {
                    cmd: what.to_owned(),
                    source,
                });
            }
        }
    };
    // A background child of the command may hold the pipes open: wait for
    // them until the deadline, at least a moment.
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(200));
        rx.recv_timeout(left).map_err(|_| Error::Timeout {
            cmd: format!("{what} (its output pipes stay open)"),
            after: timeout,
        })
    };
    let stdout = collect(out)?;
    let stderr = collect(err)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}
