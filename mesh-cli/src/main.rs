//! `mesh`: see `mesh --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // `mesh supervise` (hidden): the local mesh's proxy supervisor.
    if std::env::args_os().nth(1).is_some_and(|a| a == "supervise") {
        return mesh_cli::local::supervise_main();
    }
    // `mesh kube-api` (hidden): the API server of `mesh up --kubernetes`.
    if std::env::args_os().nth(1).is_some_and(|a| a == "kube-api") {
        return mesh_cli::local::kube_api_main();
    }
    mesh_cli::main()
}
