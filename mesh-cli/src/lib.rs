//! The `mesh` command. The local mesh (`up`, `down`, `exec`) is built with
//! the `mesh-local` harness; `status`, `top`, `explain` and `certs` talk to
//! the node proxies only through their admin API (localhost:15000 inside
//! each node's network namespace).
//!
//! Every command returns `anyhow::Result`; [`failure::exit_code`] turns an
//! error into the documented exit code (see [`failure::code`]).
#![forbid(unsafe_code)]

pub mod admin;
pub mod certs;
pub mod check;
pub mod cli;
pub mod demo;
pub mod explain;
pub mod failure;
pub mod hosts;
pub mod install;
pub mod local;
pub mod manifest;
pub mod paint;
pub mod status;
pub mod table;
pub mod top;
pub mod units;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};
use paint::Paint;

/// Parses the command line, runs the command, prints errors and returns
/// the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        // Rust ignores SIGPIPE, so `mesh top --once | head` sees its next
        // write fail once `head` exits: end quietly, with the status a
        // shell gives a process killed by SIGPIPE (128 + 13).
        Err(e) if broken_pipe(&e) => 141,
        Err(e) => {
            let err = Paint::stderr();
            let _ = std::io::stdout().flush();
            eprintln!("{} {e:#}", err.red_bold("error:"));
            if let Some(hint) = failure::hint(&e) {
                for line in hint.lines() {
                    eprintln!("  {} {line}", err.dim("hint:"));
                }
            }
            failure::exit_code(&e)
        }
    };
    ExitCode::from(code)
}

/// Whether `e` comes from writing to a pipe whose reader is gone.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs one parsed command; `Ok(code)` is the exit code of a command that
/// ran (`exec` passes its program's code through, `status` returns 1 when
/// it found problems).
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let name = cli.name;
    match cli.command {
        Command::Up(args) => local::up(&name, &args).map(|()| 0),
        Command::Down(args) => local::down(args.name.as_deref().unwrap_or(&name), &args),
        Command::Exec(args) => local::exec(&name, &args),
        Command::Status(args) => status::run(&name, &args),
        Command::Top(args) => top::run(&name, &args).map(|()| 0),
        Command::Explain(args) => explain::run(&name, &args).map(|()| 0),
        Command::Certs(args) => certs::run(&name, &args).map(|()| 0),
        Command::Manifest(args) => install::manifest(&args),
        Command::Install(args) => install::install(&args),
        Command::Uninstall(args) => install::uninstall(&args),
        Command::Check(args) => check::run(&args),
        Command::Version(args) => {
            let v = env!("CARGO_PKG_VERSION");
            if args.output.json() {
                writeln!(
                    std::io::stdout(),
                    "{}",
                    serde_json::json!({"mesh": v, "state_root": "/run/sockmesh"})
                )?;
            } else {
                writeln!(
                    std::io::stdout(),
                    "mesh {v} (sockmesh local mesh; state in /run/sockmesh)"
                )?;
            }
            Ok(0)
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "mesh", &mut script);
            std::io::stdout()
                .write_all(&script)
                .map_err(|e| anyhow::Error::new(e).context("write the completion script"))?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_went_away_is_told_from_other_write_errors() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(broken_pipe(&anyhow::Error::new(pipe())));
        assert!(broken_pipe(
            &anyhow::Error::new(pipe()).context("write the table")
        ));
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert!(!broken_pipe(&anyhow::Error::new(full)));
        assert!(!broken_pipe(&anyhow::anyhow!("Broken pipe")));
    }
}
