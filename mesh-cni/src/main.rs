//! `mesh-cni`: run by the container runtime as a CNI plugin (when
//! `CNI_COMMAND` is set), or by the node DaemonSet as `mesh-cni install` /
//! `mesh-cni uninstall`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_cni::install::{self, PluginEntry};
use mesh_cni::plugin;
use mesh_cni::spec::{self, Env, NetConf};

#[derive(Parser)]
#[command(
    version,
    about = "sockmesh's chained CNI plugin and its installer",
    long_about = "sockmesh's chained CNI plugin. The container runtime runs it with CNI_COMMAND set \
(ADD, DEL, CHECK, STATUS, GC, VERSION); it hands each new pod to the node proxy's enrollment socket \
and returns only once the pod is captured.\n\n\
Without CNI_COMMAND it installs itself: `mesh-cni install --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d --watch`."
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy this binary into the CNI bin dir and chain mesh-cni last in the
    /// first conflist of the conf dir (atomically); with --watch, keep it
    /// there until SIGTERM (then uninstall).
    Install {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The node proxy's enrollment socket (`mesh-proxy --cni-socket`).
        #[arg(long, default_value = spec::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Where the plugin logs (default: the runtime's stderr).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Namespaces whose pods start unmeshed while the node proxy is down.
        #[arg(long = "fail-open-namespace")]
        fail_open_namespaces: Vec<String>,
        #[arg(long, default_value_t = 30)]
        timeout_seconds: u64,
        /// Keep the entry in the conflist (the primary CNI may rewrite it).
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
        /// Stop watching after this many seconds (default: until SIGTERM).
        #[arg(long)]
        watch_seconds: Option<u64>,
    },
    /// Take mesh-cni out of every conflist in the conf dir and remove the binary.
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return run_plugin();
    }
    match installer(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_log(conf: &NetConf) {
    let filter = tracing_subscriber::EnvFilter::new(&conf.log_level);
    let file = conf.log_file.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    match file {
        Some(f) => b.with_writer(std::sync::Mutex::new(f)).init(),
        None => b.with_writer(std::io::stderr).init(),
    }
}

/// The CNI exec protocol: result or error JSON on stdout, exit status 0/1.
fn run_plugin() -> ExitCode {
    let input = plugin::read_stdin(std::io::stdin().lock());
    let version = input
        .as_ref()
        .ok()
        .and_then(|b| spec::declared_version(b))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::CURRENT_VERSION.into());
    let result = input.and_then(|stdin| {
        let env = Env::parse(|k| std::env::var(k).ok())?;
        if env.command == spec::Command::Version {
            return Ok(Some(spec::version_info()));
        }
        let conf = NetConf::parse(&stdin, env.command)?;
        init_log(&conf);
        let r = plugin::execute(&env, &conf);
        if let Err(e) = &r {
            tracing::error!(command = ?env.command, container = %env.container_id, code = e.code as u32, error = %e, "failed");
        }
        r
    });
    let mut out = std::io::stdout().lock();
    match result {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

fn installer(args: Args) -> anyhow::Result<()> {
    match args.command {
        Cmd::Install {
            bin_dir,
            conf_dir,
            socket,
            log_file,
            fail_open_namespaces,
            timeout_seconds,
            watch,
            poll_ms,
            watch_seconds,
        } => {
            anyhow::ensure!(
                (1..=spec::MAX_TIMEOUT_SECONDS).contains(&timeout_seconds),
                "--timeout-seconds {timeout_seconds}: must be 1..={}",
                spec::MAX_TIMEOUT_SECONDS
            );
            anyhow::ensure!(
                (10..=60_000).contains(&poll_ms),
                "--poll-ms {poll_ms}: must be 10..=60000"
            );
            for ns in &fail_open_namespaces {
                mesh_core::identity::validate_namespace(ns)
                    .map_err(|e| anyhow::anyhow!("--fail-open-namespace: {e}"))?;
            }
            let entry = PluginEntry {
                socket,
                log_file,
                fail_open_namespaces,
                timeout_seconds,
            };
            let me = std::env::current_exe()?;
            let list = install::install(&me, &bin_dir, &conf_dir, &entry)?;
            println!(
                "mesh-cni: installed {} and chained into {}",
                bin_dir.join(install::BINARY_NAME).display(),
                list.display()
            );
            if watch {
                let stop = Arc::new(AtomicBool::new(false));
                for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                    signal_hook::flag::register(sig, stop.clone())?;
                }
                let n = install::keep_inserted(
                    &conf_dir,
                    &entry,
                    Duration::from_millis(poll_ms),
                    watch_seconds.map(Duration::from_secs),
                    &|| stop.load(Ordering::Relaxed),
                    &mut |e| println!("mesh-cni: {e}"),
                );
                println!("mesh-cni: watch ended ({n} repairs)");
                if stop.load(Ordering::Relaxed) {
                    let changed = install::uninstall(&bin_dir, &conf_dir)?;
                    println!(
                        "mesh-cni: uninstalled ({} conflists changed)",
                        changed.len()
                    );
                }
            }
            Ok(())
        }
        Cmd::Uninstall { bin_dir, conf_dir } => {
            let changed = install::uninstall(&bin_dir, &conf_dir)?;
            for c in &changed {
                println!("mesh-cni: removed from {}", c.display());
            }
            println!("mesh-cni: uninstalled");
            Ok(())
        }
    }
}
