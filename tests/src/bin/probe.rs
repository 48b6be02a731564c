//! `sockmesh-probe`: plays one role (app, proxy, server, loader) inside a
//! sandbox pod. It first joins the given cgroup, then the given network
//! namespace — before it creates any socket, because a socket belongs to the
//! cgroup and netns of the process that made it. Prints one JSON line per
//! event on stdout.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket, sockopt,
};
use serde_json::json;
use sockmesh_tests::flowdata;

const IO_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Args {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Network namespace to enter (e.g. /run/netns/NAME).
    #[arg(long)]
    netns: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install (or re-open) the data path, print the mode, then wait for a
    /// line on stdin (like a proxy would stay up).
    Install {
        #[arg(long)]
        attach_cgroup: PathBuf,
        #[arg(long)]
        pin_root: PathBuf,
    },
    /// The in-pod outbound listener: accept, recover the original
    /// destination from the kernel, then banner or transfer.
    Proxy {
        #[arg(long)]
        pin_root: PathBuf,
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[command(flatten)]
        traffic: Traffic,
    },
    /// A plain server: answers every connection with a banner.
    Server {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// An app: connect somewhere, then banner or transfer.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        /// Carry the proxy's SO_MARK (the connect hooks must skip it).
        #[arg(long)]
        mark: bool,
        /// After the transfer, print `holding` and wait for a stdin line
        /// before half-closing (the flow stays open meanwhile).
        #[arg(long)]
        hold: bool,
        #[command(flatten)]
        traffic: Traffic,
    },
}

#[derive(clap::Args)]
struct Traffic {
    /// Bytes to send (full duplex with the peer); without it, exchange a
    /// banner line instead.
    #[arg(long)]
    send: Option<u64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn wait_stdin() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(cg) = &args.cgroup {
        let procs = cg.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("join cgroup {}", procs.display()))?;
    }
    if let Some(ns) = &args.netns {
        let f = std::fs::File::open(ns).with_context(|| format!("open netns {}", ns.display()))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {}", ns.display()))?;
    }
    match args.cmd {
        Cmd::Install {
            attach_cgroup,
            pin_root,
        } => {
            let existed = pin_root.exists();
            let dp = mesh_ebpf::Datapath::install(&attach_cgroup, &pin_root)?;
            emit(json!({"event": "installed", "mode": dp.mode().to_string(), "reopened": existed}));
            wait_stdin();
        }
        Cmd::Proxy {
            pin_root,
            listen,
            count,
            traffic,
        } => proxy(&pin_root, &listen, count, &traffic)?,
        Cmd::Server { listen, count } => {
            let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
            emit(json!({"event": "listening"}));
            for _ in 0..count {
                let (mut s, peer) = l.accept()?;
                writeln!(s, "server {listen}")?;
                emit(json!({"event": "accepted", "peer": peer.to_string()}));
            }
        }
        Cmd::Connect {
            to,
            mark,
            hold,
            traffic,
        } => {
            let s = dial(to, mark)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            emit(
                json!({"event": "connected", "local": s.local_addr()?.to_string(),
                        "peer": s.peer_addr()?.to_string()}),
            );
            match traffic.send {
                None => {
                    let mut line = String::new();
                    std::io::BufReader::new(&s).read_line(&mut line)?;
                    emit(json!({"event": "banner", "line": line.trim_end()}));
                }
                Some(n) => {
                    let hold_fn = || {
                        emit(json!({"event": "holding"}));
                        wait_stdin();
                    };
                    let t = flowdata::duplex(
                        &s,
                        traffic.seed,
                        n,
                        if hold { Some(&hold_fn) } else { None },
                    )?;
                    emit(json!({"event": "transfer", "transfer": t}));
                }
            }
        }
    }
    Ok(())
}

fn dial(to: SocketAddr, mark: bool) -> Result<TcpStream> {
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    if mark {
        setsockopt(&fd, sockopt::Mark, &mesh_ebpf::PROXY_MARK).context("set SO_MARK")?;
    }
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(to),
    )
    .with_context(|| format!("connect {to}"))?;
    Ok(TcpStream::from(fd))
}

fn proxy(
    pin_root: &std::path::Path,
    listen: &[SocketAddr],
    count: usize,
    traffic: &Traffic,
) -> Result<()> {
    let dp = mesh_ebpf::Datapath::open(pin_root)?;
    let listeners = listen
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("bind {a}")))
        .collect::<Result<Vec<_>>>()?;
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    emit(json!({"event": "listening"}));
    let mut served = 0;
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while served < count {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no connection within {IO_TIMEOUT:?}"
        );
        let mut accepted = None;
        for l in &listeners {
            match l.accept() {
                Ok(c) => {
                    accepted = Some(c);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some((s, peer)) = accepted else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let netns = mesh_ebpf::netns::cookie_of_socket(&s)?;
        let orig = dp.original_dst(netns, peer)?;
        emit(json!({"event": "accepted", "peer": peer.to_string(),
                    "orig": orig.map(|o| o.to_string()), "netns": netns}));
        match traffic.send {
            None => {
                let mut w = &s;
                writeln!(
                    w,
                    "proxy {}",
                    orig.map(|o| o.to_string())
                        .unwrap_or_else(|| "unknown".into())
                )?;
            }
            Some(n) => {
                let t = flowdata::duplex(&s, traffic.seed, n, None)?;
                emit(json!({"event": "transfer", "transfer": t}));
            }
        }
        served += 1;
    }
    Ok(())
}
