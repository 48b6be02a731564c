//! `mesh`: see `mesh --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `mesh top --once | head` would panic on the
    // next print once `head` exits. Exit quietly instead, with the status a
    // shell gives a process killed by SIGPIPE (128 + 13).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    // `mesh supervise` (hidden): the local mesh's proxy supervisor.
    if std::env::args_os().nth(1).is_some_and(|a| a == "supervise") {
        return mesh_cli::local::supervise_main();
    }
    mesh_cli::main()
}
