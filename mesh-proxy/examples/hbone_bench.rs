//! HBONE against plain TCP on loopback: single-stream throughput and 1 KiB
//! request/response latency, per rustls crypto provider.
//!
//! ```text
//! cargo run --release -p mesh-proxy --example hbone_bench [--features aws-lc] -- OUT.json [BYTES] [ROUNDS]
//! ```
//!
//! The client, both proxies' HBONE halves and the apps share one process
//! and one runtime (2 workers), as a pod-to-pod path on one 2-core machine
//! would share its cores. Plain TCP is app to app; HBONE is app to the
//! client pool, mTLS HTTP/2 to `serve`, TCP to the app. Every transfer and
//! round count is bounded; every wait has a timeout.

#![allow(clippy::unwrap_used)]

/// The same allocator as the `mesh-proxy` binary.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mesh_proxy::hbone::{
    Connector, ConnectorError, H2Config, Pool, PoolKey, Refusal, ServerLimits, Tunnel, accept,
    handler_fn, serve,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(300);
const BUF: usize = 256 * 1024;
const MSG: usize = 1024;

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    sockmesh_test_support::within(what, WAIT, fut).await
}

// ------------------------------------------------------------------ PKI
// The shared test PKI (sockmesh-test-support): SVIDs for the two ends.

const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";

// ------------------------------------------------------------------ apps

/// Reads to EOF, answers the byte count (8 bytes LE), closes.
async fn sink_app() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; BUF];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&n.to_le_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Echoes until EOF.
async fn echo_app() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

// ------------------------------------------------------------------ HBONE

/// An HBONE server half on 127.0.0.1:0 whose handler connects to the target.
async fn hbone_server(tls: Arc<rustls::ServerConfig>, h2: H2Config) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handler = Arc::new(handler_fn(|t: Tunnel| async move {
        let s = TcpStream::connect(t.target)
            .await
            .map_err(|e| Refusal::BadGateway(e.to_string()))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, handler, h2) = (acceptor.clone(), handler.clone(), h2.clone());
            tokio::spawn(async move {
                let Ok(tls) = accept(&acceptor, tcp, WAIT).await else {
                    return;
                };
                let _ = serve(
                    tls,
                    handler,
                    std::future::pending(),
                    &h2,
                    &ServerLimits::default(),
                )
                .await;
            });
        }
    });
    Ok(addr)
}

struct Dialer(Arc<rustls::ClientConfig>);

impl Connector for Dialer {
    async fn dial(&self, key: &PoolKey) -> io::Result<TcpStream> {
        TcpStream::connect(key.dest).await
    }

    fn tls(
        &self,
        _: &PoolKey,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), ConnectorError> {
        let name = ServerName::try_from("hbone.invalid")?;
        Ok((self.0.clone(), name))
    }
}

// ------------------------------------------------------------------ measurements

/// CPU seconds (user + system, all threads) this process has used so far,
/// from /proc/self/stat (USER_HZ = 100, as on every Linux ABI in use).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command: utime is the 12th, stime the 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / 100.0
}

/// Sends `bytes` and half-closes; the sink's count must match.
/// Writes are `chunk` bytes, as the proxy's copy loop would hand them on.
async fn throughput<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    bytes: u64,
    chunk: usize,
) -> Result<Throughput> {
    let buf = vec![0x5au8; chunk];
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = (left as usize).min(chunk);
        s.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    if u64::from_le_bytes(count) != bytes {
        bail!(
            "sink counted {} bytes, sent {bytes}",
            u64::from_le_bytes(count)
        );
    }
    Ok(Throughput {
        gbps: bytes as f64 * 8.0 / secs / 1e9,
        cpu_s_per_gib: cpu / (bytes as f64 / f64::from(1u32 << 30)),
    })
}

struct Throughput {
    gbps: f64,
    /// CPU time of the whole path (sender, proxies, receiver) per GiB moved.
    cpu_s_per_gib: f64,
}

/// `rounds` 1 KiB request/response exchanges, after warm-up; (p50, p99) µs.
async fn latency<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, rounds: usize) -> Result<(f64, f64)> {
    let req = vec![7u8; MSG];
    let mut resp = vec![0u8; MSG];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let start = Instant::now();
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        if i >= rounds / 10 {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

struct Row {
    name: String,
    gbps: f64,
    cpu: f64,
    p50: f64,
    p99: f64,
}

async fn plain(sink: SocketAddr, echo: SocketAddr, bytes: u64, rounds: usize) -> Result<Row> {
    let s = TcpStream::connect(sink).await?;
    s.set_nodelay(true)?;
    let tp = within("plain throughput", throughput(s, bytes, BUF)).await??;
    let s = TcpStream::connect(echo).await?;
    s.set_nodelay(true)?;
    let (p50, p99) = within("plain latency", latency(s, rounds)).await??;
    Ok(Row {
        name: "plain TCP".into(),
        gbps: tp.gbps,
        cpu: tp.cpu_s_per_gib,
        p50,
        p99,
    })
}

async fn hbone(
    name: &str,
    provider: CryptoProvider,
    h2: H2Config,
    sink: SocketAddr,
    echo: SocketAddr,
    bytes: u64,
    rounds: usize,
) -> Result<Row> {
    let provider = Arc::new(provider);
    let pki = sockmesh_test_support::Pki::new()?;
    let server = hbone_server(pki.server_config(&provider, SERVER_ID)?, h2.clone()).await?;
    let chunk = h2.copy_buffer;
    let pool = Pool::new(Dialer(pki.client_config(&provider, Some(CLIENT_ID))?), h2);
    let key = PoolKey::new("spiffe://cluster.local/ns/bench/sa/client", server);
    // Connection set-up is not what is measured: open it first.
    drop(within("warm-up", pool.connect(&key, echo)).await??);
    let t = within("connect", pool.connect(&key, sink)).await??;
    let tp = within("hbone throughput", throughput(t, bytes, chunk)).await??;
    let t = within("connect", pool.connect(&key, echo)).await??;
    let (p50, p99) = within("hbone latency", latency(t, rounds)).await??;
    Ok(Row {
        name: name.into(),
        gbps: tp.gbps,
        cpu: tp.cpu_s_per_gib,
        p50,
        p99,
    })
}

/// `H2Config::default()`, with overrides from the environment for
/// sweeps: HBONE_STREAM_WINDOW, HBONE_CONN_WINDOW, HBONE_FRAME,
/// HBONE_COPY_BUFFER, HBONE_SEND_BUF (bytes).
fn h2_config() -> Result<H2Config> {
    let mut c = H2Config::default();
    let var = |name: &str| -> Result<Option<u64>> {
        std::env::var(name)
            .ok()
            .map(|v| v.parse::<u64>().with_context(|| format!("{name}={v}")))
            .transpose()
    };
    if let Some(v) = var("HBONE_STREAM_WINDOW")? {
        c.stream_window = v.try_into()?;
    }
    if let Some(v) = var("HBONE_CONN_WINDOW")? {
        c.connection_window = v.try_into()?;
    }
    if let Some(v) = var("HBONE_FRAME")? {
        c.max_frame_size = v.try_into()?;
    }
    if let Some(v) = var("HBONE_COPY_BUFFER")? {
        c.copy_buffer = v.try_into()?;
    }
    if let Some(v) = var("HBONE_SEND_BUF")? {
        c.max_send_buf_size = v.try_into()?;
    }
    Ok(c)
}

async fn run(bytes: u64, rounds: usize) -> Result<Vec<Row>> {
    let sink = sink_app().await?;
    let echo = echo_app().await?;
    let mut rows = vec![plain(sink, echo, bytes, rounds).await?];
    let fixed = h2_config()?;
    rows.push(
        hbone(
            "HBONE ring",
            rustls::crypto::ring::default_provider(),
            fixed.clone(),
            sink,
            echo,
            bytes,
            rounds,
        )
        .await?,
    );
    #[cfg(feature = "aws-lc")]
    rows.push(
        hbone(
            "HBONE aws-lc-rs",
            rustls::crypto::aws_lc_rs::default_provider(),
            fixed,
            sink,
            echo,
            bytes,
            rounds,
        )
        .await?,
    );
    Ok(rows)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .context("usage: hbone_bench OUT.json [BYTES] [ROUNDS]")?;
    let bytes: u64 = args.next().map_or(Ok(2 << 30), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rows = rt.block_on(run(bytes, rounds))?;

    let base = &rows[0];
    println!(
        "{:<28} {:>8} {:>7} {:>11} {:>9} {:>9} {:>8} {:>8}",
        "path", "Gbit/s", "x TCP", "CPU s/GiB", "p50 µs", "p99 µs", "+p50", "+p99"
    );
    let mut json = Vec::new();
    for r in &rows {
        println!(
            "{:<28} {:>8.2} {:>7.2} {:>11.2} {:>9.1} {:>9.1} {:>8.1} {:>8.1}",
            r.name,
            r.gbps,
            r.gbps / base.gbps,
            r.cpu,
            r.p50,
            r.p99,
            r.p50 - base.p50,
            r.p99 - base.p99
        );
        json.push(serde_json::json!({
            "path": r.name,
            "throughput_gbit_s": r.gbps,
            "throughput_ratio_to_tcp": r.gbps / base.gbps,
            "cpu_seconds_per_gib": r.cpu,
            "rr_1k_p50_us": r.p50,
            "rr_1k_p99_us": r.p99,
            "rr_1k_p50_added_us": r.p50 - base.p50,
            "rr_1k_p99_added_us": r.p99 - base.p99,
        }));
    }
    let doc = serde_json::json!({
        "bench": "hbone",
        "bytes": bytes,
        "rounds": rounds,
        "message_bytes": MSG,
        "worker_threads": 2,
        "results": json,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("write {out}"))?;
    println!("wrote {out}");
    Ok(())
}
