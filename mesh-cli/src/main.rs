//! `mesh`: see `mesh --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mesh_cli::main()
}
