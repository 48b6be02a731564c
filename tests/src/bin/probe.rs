//! `sockmesh-probe`: plays one role (app, proxy, server, loader) inside a
//! sandbox pod. It first joins the given cgroup, then the given network
//! namespace — before it creates any socket, because a socket belongs to the
//! cgroup and netns of the process that made it. Prints one JSON line per
//! event on stdout.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
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
    /// Fail on a spurious EAGAIN from a blocking read instead of retrying.
    #[arg(long)]
    strict_eagain: bool,
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
    /// An app server: for each connection, full-duplex transfer (`--send`
    /// bytes each way, digests printed).
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Serve the connections at once, a thread each (events of
        /// different connections interleave).
        #[arg(long)]
        concurrent: bool,
        #[command(flatten)]
        traffic: Traffic,
    },
    /// A benchmark server: echo every byte back (`--sink`: read until EOF,
    /// then reply with the byte count as 8 bytes).
    Bench {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        sink: bool,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// A benchmark client: request/response round trips of `--size` bytes,
    /// or (`--stream BYTES`) one-way throughput to a `--sink` server.
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        size: usize,
        #[arg(long, default_value_t = 10_000)]
        rounds: usize,
        #[arg(long)]
        stream: Option<u64>,
        /// Open and close this many connections one after another (1-byte
        /// echo each) and report the rate.
        #[arg(long)]
        connections: Option<usize>,
        /// With `--connections`: this many client threads, each opening
        /// its share one after another (a client that is not the
        /// bottleneck of the rate it measures).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Open this many connections, print `held`, keep them open until a
        /// line arrives on stdin.
        #[arg(long)]
        idle: Option<usize>,
        /// Carry the proxy's SO_MARK: bypass capture (the plain baseline).
        #[arg(long)]
        mark: bool,
    },
    /// A relay that does the least possible work (the floor a proxy is
    /// measured against): accept, dial `--to` for each connection, move the
    /// bytes both ways (a half-close is passed on), a thread per
    /// connection. No TLS, no HTTP/2, no original destination.
    ///
    /// Example: `sockmesh-probe relay --listen 127.0.0.1:19001 --to
    /// 10.77.2.5:9000 --copy userspace --count 3`
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        /// `splice`: splice(2) through a pipe per direction, the bytes
        /// never enter user space; `userspace`: a read/write loop.
        #[arg(long, value_enum, default_value_t = CopyMode::Splice)]
        copy: CopyMode,
        /// Exit once this many connections are accepted and relayed to
        /// their end (without it: until killed, or 10 minutes without a
        /// new connection).
        #[arg(long)]
        count: Option<usize>,
        /// The pipe's size (splice) or the buffer's (userspace), per
        /// direction, in bytes.
        #[arg(long, default_value_t = 64 << 10)]
        buffer: usize,
        /// Make the sockets that dial `--to` in this network namespace
        /// (e.g. /run/netns/NAME), as the node proxy makes its delivery
        /// socket in the destination pod's; the listener stays in the
        /// relay's own.
        #[arg(long)]
        to_netns: Option<PathBuf>,
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
        /// Give up connecting after this long (a dropped SYN otherwise
        /// blocks for minutes).
        #[arg(long)]
        connect_timeout_ms: Option<u64>,
        #[command(flatten)]
        traffic: Traffic,
    },
}

/// How a relay moves bytes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CopyMode {
    Splice,
    Userspace,
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
    flowdata::STRICT_EAGAIN.store(args.strict_eagain, std::sync::atomic::Ordering::Relaxed);
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
        Cmd::Bench {
            listen,
            sink,
            count,
        } => bench_server(&listen, sink, count)?,
        Cmd::Serve {
            listen,
            count,
            concurrent,
            traffic,
        } => {
            let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
            l.set_nonblocking(true)?;
            emit(json!({"event": "listening"}));
            let (seed, send) = (traffic.seed, traffic.send.unwrap_or(0));
            let serve_one = move |s: TcpStream| -> Result<()> {
                let t = flowdata::duplex(&s, seed, send, None)?;
                emit(json!({"event": "transfer", "transfer": t}));
                Ok(())
            };
            let mut threads = Vec::new();
            for _ in 0..count {
                let s = accept_any(std::slice::from_ref(&l))?;
                let peer = s.peer_addr()?;
                emit(
                    json!({"event": "accepted", "peer": peer.to_string(), "local": s.local_addr()?.to_string()}),
                );
                if concurrent {
                    threads.push(std::thread::spawn(move || serve_one(s)));
                } else {
                    serve_one(s)?;
                }
            }
            for t in threads {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a connection's thread panicked"))??;
            }
        }
        Cmd::Load {
            to,
            size,
            rounds,
            stream,
            connections,
            parallel,
            idle,
            mark,
        } => load(
            to,
            size,
            rounds,
            stream,
            (connections, parallel),
            idle,
            mark,
        )?,
        Cmd::Relay {
            listen,
            to,
            copy,
            count,
            buffer,
            to_netns,
        } => relay(listen, to, copy, count, buffer, to_netns.as_deref())?,
        Cmd::Connect {
            to,
            mark,
            hold,
            connect_timeout_ms,
            traffic,
        } => {
            let s = dial(to, mark, connect_timeout_ms.map(Duration::from_millis))?;
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

fn dial(to: SocketAddr, mark: bool, timeout: Option<Duration>) -> Result<TcpStream> {
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    if mark {
        setsockopt(&fd, sockopt::Mark, &mesh_ebpf::PROXY_MARK).context("set SO_MARK")?;
    }
    if let Some(t) = timeout {
        // A blocking connect gives up after SO_SNDTIMEO.
        let tv = nix::sys::time::TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64);
        setsockopt(&fd, sockopt::SendTimeout, &tv).context("set SO_SNDTIMEO")?;
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

fn accept_any(listeners: &[TcpListener]) -> Result<TcpStream> {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    loop {
        for l in listeners {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no connection within {IO_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn bench_server(listen: &[SocketAddr], sink: bool, count: usize) -> Result<()> {
    let listeners = listen
        .iter()
        .map(|a| {
            let l = TcpListener::bind(a).with_context(|| format!("bind {a}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .collect::<Result<Vec<_>>>()?;
    emit(json!({"event": "listening"}));
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..count {
            let s = accept_any(&listeners)?;
            scope.spawn(move || {
                if let Err(e) = serve_bench_conn(s, sink) {
                    eprintln!("bench connection: {e:#}");
                }
            });
        }
        Ok(())
    })
}

fn serve_bench_conn(mut s: TcpStream, sink: bool) -> Result<()> {
    use std::io::Read;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut buf = vec![0u8; if sink { 1 << 20 } else { 64 << 10 }];
    let mut total = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The FIN quirk of blocking sockets in the socket map.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        total += n as u64;
        if !sink {
            s.write_all(&buf[..n])?;
        }
    }
    if sink {
        s.write_all(&total.to_le_bytes())?;
    }
    Ok(())
}

fn load(
    to: SocketAddr,
    size: usize,
    rounds: usize,
    stream: Option<u64>,
    (connections, parallel): (Option<usize>, usize),
    idle: Option<usize>,
    mark: bool,
) -> Result<()> {
    use std::io::Read;
    use std::time::Instant;
    if let Some(n) = connections {
        let threads = parallel.clamp(1, n.max(1));
        let start = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    // Thread t opens connections t, t + threads, ...
                    scope.spawn(move || -> Result<()> {
                        for i in (t..n).step_by(threads) {
                            let mut c = dial(to, mark, None)?;
                            c.set_nodelay(true)?;
                            c.set_read_timeout(Some(IO_TIMEOUT))?;
                            c.write_all(b"x")?;
                            let mut b = [0u8; 1];
                            c.read_exact(&mut b)
                                .with_context(|| format!("connection {i}"))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a connection thread panicked"))??;
            }
            Ok(())
        })?;
        let secs = start.elapsed().as_secs_f64();
        emit(
            json!({"event": "connections", "count": n, "seconds": secs, "per_second": n as f64 / secs}),
        );
        return Ok(());
    }
    if let Some(n) = idle {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = dial(to, mark, None)?;
            c.set_read_timeout(Some(IO_TIMEOUT))?;
            c.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
            held.push(c);
        }
        emit(json!({"event": "held", "count": held.len()}));
        wait_stdin();
        return Ok(());
    }
    let mut s = dial(to, mark, None)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    if let Some(total) = stream {
        let buf = vec![0x42u8; 1 << 20];
        let start = Instant::now();
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut got = [0u8; 8];
        s.read_exact(&mut got)?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(
            u64::from_le_bytes(got) == total,
            "sink counted {} of {total} bytes",
            u64::from_le_bytes(got)
        );
        emit(json!({"event": "stream", "bytes": total, "seconds": secs,
                    "gbit_per_s": total as f64 * 8.0 / secs / 1e9}));
        return Ok(());
    }
    let req = vec![0x17u8; size];
    let mut resp = vec![0u8; size];
    let mut lat_ns: Vec<u64> = Vec::with_capacity(rounds);
    // Warm-up rounds are not recorded.
    for i in 0..rounds + rounds / 10 {
        let t = Instant::now();
        s.write_all(&req)?;
        let mut got = 0;
        while got < size {
            match s.read(&mut resp[got..]) {
                Ok(0) => anyhow::bail!("server closed after {i} rounds"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if i >= rounds / 10 {
            lat_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    s.shutdown(std::net::Shutdown::Write)?;
    lat_ns.sort_unstable();
    let pct = |p: f64| lat_ns[((lat_ns.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    emit(json!({"event": "rr", "size": size, "rounds": lat_ns.len(),
                "p50_us": pct(0.50), "p99_us": pct(0.99),
                "mean_us": lat_ns.iter().sum::<u64>() as f64 / lat_ns.len() as f64 / 1000.0}));
    Ok(())
}

/// How long a relay waits for a connection, or for a byte on one.
const RELAY_IDLE: Duration = Duration::from_secs(600);

fn relay(
    listen: SocketAddr,
    to: SocketAddr,
    copy: CopyMode,
    count: Option<usize>,
    buffer: usize,
    to_netns: Option<&std::path::Path>,
) -> Result<()> {
    anyhow::ensure!(
        buffer > 0,
        "--buffer {buffer}: the relay needs at least 1 byte"
    );
    // Lives as long as the process; every connection's thread reads it.
    let to_netns: Option<&'static std::fs::File> = match to_netns {
        Some(p) => Some(Box::leak(Box::new(
            std::fs::File::open(p).with_context(|| format!("open --to-netns {}", p.display()))?,
        ))),
        None => None,
    };
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    // accept(2) honours SO_RCVTIMEO: an idle relay gives up.
    let idle = nix::sys::time::TimeVal::new(RELAY_IDLE.as_secs() as i64, 0);
    setsockopt(&l, sockopt::ReceiveTimeout, &idle).context("set SO_RCVTIMEO")?;
    emit(
        json!({"event": "listening", "listen": l.local_addr()?.to_string(),
                "to": to.to_string(), "copy": format!("{copy:?}").to_lowercase()}),
    );
    let workers = Workers::default();
    let open = Arc::new((Mutex::new(0usize), Condvar::new()));
    let mut n = 0usize;
    let accepting = (|| -> Result<()> {
        while count.is_none_or(|c| n < c) {
            let down = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::bail!("relay {listen}: no connection within {RELAY_IDLE:?}")
                }
                Err(e) => return Err(e).with_context(|| format!("accept on {listen}")),
            };
            n += 1;
            let conn = Open::new(&open);
            let w = workers.clone();
            let i = n;
            workers.run(Box::new(move || {
                let _open = conn;
                if let Err(e) = relay_conn(down, to, to_netns, copy, buffer, &w) {
                    eprintln!("relay connection {i} to {to}: {e:#}");
                }
            }))?;
        }
        Ok(())
    })();
    // Every accepted connection relayed to its end (each read gives up
    // after RELAY_IDLE).
    let (lock, ended) = &*open;
    let mut left = lock.lock().unwrap_or_else(PoisonError::into_inner);
    while *left > 0 {
        left = ended.wait(left).unwrap_or_else(PoisonError::into_inner);
    }
    accepting?;
    emit(json!({"event": "done", "connections": n}));
    Ok(())
}

/// One open connection of the relay, counted until dropped.
struct Open(Arc<(Mutex<usize>, Condvar)>);

impl Open {
    fn new(open: &Arc<(Mutex<usize>, Condvar)>) -> Open {
        *open.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        *self.0.0.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        self.0.1.notify_all();
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The relay's threads, reused: a thread that finished its job waits for
/// the next, so a connection costs no thread creation once the relay has
/// as many threads as it has directions in flight (a relay that spawned
/// two threads per connection measured its spawns in the connection
/// rate). Idle threads wait until the process exits; there are never more
/// than the directions open at once.
#[derive(Clone, Default)]
struct Workers {
    idle: Arc<Mutex<Vec<std::sync::mpsc::Sender<Job>>>>,
}

impl Workers {
    fn run(&self, mut job: Job) -> Result<()> {
        loop {
            let next = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match next {
                // An idle thread waits in recv(), so the send succeeds;
                // should it not, the job comes back: try the next.
                Some(tx) => match tx.send(job) {
                    Ok(()) => return Ok(()),
                    Err(std::sync::mpsc::SendError(j)) => job = j,
                },
                None => break,
            }
        }
        let idle = self.idle.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                let mut job = Some(job);
                while let Some(j) = job.take() {
                    j();
                    idle.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(tx.clone());
                    job = rx.recv().ok();
                }
            })
            .context("spawn a relay thread")?;
        Ok(())
    }
}

/// Relays one accepted connection to a new one to `to` (from a socket made
/// in `to_netns` if given), both directions (the other on another of
/// `workers`), until both have ended. The netns switch is this thread's
/// only (and every dial of the relay makes the same).
fn relay_conn(
    down: TcpStream,
    to: SocketAddr,
    to_netns: Option<&std::fs::File>,
    copy: CopyMode,
    buffer: usize,
    workers: &Workers,
) -> Result<()> {
    if let Some(ns) = to_netns {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns --to-netns")?;
    }
    let up = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .with_context(|| format!("connect {to}"))?;
    for s in [&down, &up] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(RELAY_IDLE))?;
        s.set_write_timeout(Some(RELAY_IDLE))?;
    }
    let (down, up) = (Arc::new(down), Arc::new(up));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (down, up) = (down.clone(), up.clone());
        workers.run(Box::new(move || {
            let _ = tx.send(pump(&down, &up, copy, buffer));
        }))?;
    }
    let downward = pump(&up, &down, copy, buffer);
    rx.recv()
        .map_err(|_| anyhow::anyhow!("the relay's upward direction ended without a result"))?
        .context("client -> server")?;
    downward.context("server -> client")?;
    Ok(())
}

/// One direction: `from` until EOF into `to`, then a half-close of `to`.
/// On an error both sockets are shut down, which ends the other direction.
fn pump(from: &TcpStream, to: &TcpStream, copy: CopyMode, buffer: usize) -> Result<u64> {
    let moved = match copy {
        CopyMode::Splice => pump_splice(from, to, buffer),
        CopyMode::Userspace => pump_userspace(from, to, buffer),
    };
    match moved {
        Ok(n) => {
            let _ = to.shutdown(std::net::Shutdown::Write);
            Ok(n)
        }
        Err(e) => {
            let _ = from.shutdown(std::net::Shutdown::Both);
            let _ = to.shutdown(std::net::Shutdown::Both);
            Err(e)
        }
    }
}

fn pump_splice(from: &TcpStream, to: &TcpStream, pipe_size: usize) -> Result<u64> {
    use nix::errno::Errno;
    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
    let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // The kernel may refuse a larger pipe (pipe-max-size): the default
    // (64 KiB) still works, with more calls.
    let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(pipe_size as libc::c_int));
    let mut total = 0u64;
    loop {
        let n = match splice(
            from,
            None,
            &pipe_w,
            None,
            pipe_size,
            SpliceFFlags::SPLICE_F_MOVE,
        ) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => anyhow::bail!("no byte within {RELAY_IDLE:?}"),
            Err(e) => return Err(e).context("splice from the socket"),
        };
        let mut left = n;
        while left > 0 {
            match splice(&pipe_r, None, to, None, left, SpliceFFlags::SPLICE_F_MOVE) {
                Ok(0) => anyhow::bail!("splice into the socket moved 0 of {left} bytes"),
                Ok(m) => left -= m,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("splice into the socket"),
            }
        }
        total += n as u64;
    }
}

fn pump_userspace(mut from: &TcpStream, mut to: &TcpStream, buffer: usize) -> Result<u64> {
    use std::io::Read;
    let mut buf = vec![0u8; buffer];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                anyhow::bail!("no byte within {RELAY_IDLE:?}")
            }
            Err(e) => return Err(e).context("read"),
        };
        to.write_all(&buf[..n]).context("write")?;
        total += n as u64;
    }
}
