//! The CA's listener under abuse: idle and stalled pre-authentication
//! connections, from one address and from many, never keep a node from
//! renewing its certificates. Loopback only (127.0.0.0/8 gives each
//! simulated peer its own source address).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_ca::roots::RootSource;
use mesh_ca::server::ListenerLimits;
use mesh_ca::{Ca, CaConfig, CaServer, FileTokenAuthenticator, auth};
use mesh_core::ca::{SignRequest, SignResponse};
use mesh_core::identity::Identity;
use mesh_core::registry::FileRegistry;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

const TD: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
/// Bound on every wait that is not itself under test.
const WAIT: Duration = Duration::from_secs(30);
const IDLE_CONNECTIONS: usize = 1100;

const REGISTRY: &str = r#"
nodes:
  - name: node-1
pods:
  - {namespace: default, name: web-1, uid: u1, node: node-1, service_account: web, ips: [10.0.1.2]}
"#;

struct Mesh {
    _dir: tempfile::TempDir,
    ca: Ca,
    token: String,
}

impl Mesh {
    fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("registry.yaml"), REGISTRY).unwrap();
        let token = auth::create_node_token(&dir.path().join("tokens"), "node-1").unwrap();
        let ca = Ca::new(
            CaConfig::new(TD, RootSource::StateDir(dir.path().join("ca"))),
            Arc::new(FileTokenAuthenticator::load(dir.path().join("tokens")).unwrap()),
            Arc::new(FileRegistry::load(dir.path().join("registry.yaml")).unwrap()),
        )
        .unwrap();
        Mesh {
            _dir: dir,
            ca,
            token,
        }
    }

    async fn serve(&self, limits: &ListenerLimits) -> CaServer {
        CaServer::bind_with(self.ca.clone(), "127.0.0.1:0".parse().unwrap(), limits)
            .await
            .unwrap()
    }
}

/// Each idle client holds two descriptors (its end and the CA's): make
/// sure the soft limit allows them, as the proxies do at start.
fn raise_nofile(needed: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    if soft == "unlimited" || soft.parse::<u64>().unwrap() >= needed {
        return;
    }
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .unwrap();
    assert!(status.success(), "prlimit --nofile={hard}:{hard} failed");
    assert!(
        hard == "unlimited" || hard.parse::<u64>().unwrap() >= needed,
        "this test needs {needed} file descriptors; the hard limit is {hard} (ulimit -Hn)"
    );
}

/// A TCP connection from `source` (any 127.x.y.z address works on `lo`).
async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Opens `n` connections from `source` that never send a byte; each one's
/// task counts it in `closed` when the CA closes or resets it.
async fn idle_clients(
    source: IpAddr,
    addr: SocketAddr,
    n: usize,
    closed: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let mut tcp = match connect_from(source, addr).await {
            Ok(tcp) => tcp,
            // The CA's reset can overtake our end's view of the handshake.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            Err(e) => panic!("connect from {source} to {addr}: {e}"),
        };
        let closed = closed.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            // EOF or a reset: either way the CA let go of it.
            let _ = tcp.read(&mut buf).await;
            closed.fetch_add(1, Ordering::SeqCst);
        }));
    }
    tasks
}

/// The workspace's one async polling helper, bounded by `WAIT`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    if let Err(e) = sockmesh_test_support::eventually(what, WAIT, cond).await {
        panic!("{e:#}");
    }
}

fn csr_pem(key: &KeyPair) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// One certificate signing request from `source`, as a node proxy sends it.
async fn renew_from(
    source: IpAddr,
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    token: &str,
) -> Result<SignResponse> {
    let key = KeyPair::generate().unwrap();
    let body = serde_json::to_vec(&SignRequest {
        identity: Identity::parse(WEB).unwrap(),
        csr: csr_pem(&key),
        ttl_seconds: None,
    })?;
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = connect_from(source, addr).await.context("connect")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into()?, tcp)
        .await
        .context("TLS handshake")?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = http::Request::post("/v1/sign")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await.context("request")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status == 200,
        "status {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

/// Retries like the proxies' certificate manager (short backoff here)
/// until a renewal succeeds; returns how long it took.
async fn renew_retrying(
    source: IpAddr,
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    token: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        match tokio::time::timeout(WAIT, renew_from(source, addr, roots, token)).await {
            Ok(Ok(resp)) => {
                assert_eq!(resp.identity.to_string(), WEB);
                return start.elapsed();
            }
            Ok(Err(e)) => {
                assert!(start.elapsed() < WAIT, "renewal still failing: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => panic!("one renewal attempt hung for {WAIT:?}"),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_idle_connections_from_one_address_do_not_stop_a_renewal() {
    raise_nofile(4 * IDLE_CONNECTIONS as u64);
    let mesh = Mesh::new();
    let limits = ListenerLimits::default();
    let server = mesh.serve(&limits).await;
    let addr = server.local_addr();
    let roots = mesh.ca.trust_bundle();

    let closed = Arc::new(AtomicUsize::new(0));
    let flooder = ip("127.0.0.1");
    let _idle = idle_clients(flooder, addr, IDLE_CONNECTIONS, &closed).await;
    let over = IDLE_CONNECTIONS - limits.max_connections_per_peer;
    // Over the per-peer cap: reset at once, before any TLS, and counted.
    eventually("the connections over the per-peer cap reset", || {
        closed.load(Ordering::SeqCst) >= over
    })
    .await;
    let stats = server.connections();
    assert_eq!(stats.refused_per_peer_cap, over as u64, "{stats:?}");
    assert_eq!(stats.open, limits.max_connections_per_peer, "{stats:?}");

    // Another node renews at once, while the flood's connections are held.
    let took = renew_retrying(ip("127.0.0.2"), addr, &roots, &mesh.token).await;
    assert!(
        took < limits.handshake_timeout,
        "renewal from another address took {took:?}"
    );
    assert!(
        server.connections().open >= limits.max_connections_per_peer,
        "the idle connections were still held: {:?}",
        server.connections()
    );

    // Even the flooding address renews as soon as the handshake budget has
    // closed its idle connections.
    let took = renew_retrying(flooder, addr, &roots, &mesh.token).await;
    assert!(
        took < limits.handshake_timeout + Duration::from_secs(3),
        "renewal from the flooding address took {took:?}"
    );
    eventually("every idle connection closed", || {
        closed.load(Ordering::SeqCst) == IDLE_CONNECTIONS
    })
    .await;
    assert_eq!(
        server.connections().handshake_timeouts,
        limits.max_connections_per_peer as u64
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_idle_connections_from_many_addresses_hold_the_cap_only_for_the_budget() {
    raise_nofile(4 * IDLE_CONNECTIONS as u64);
    let mesh = Mesh::new();
    let limits = ListenerLimits::default();
    let server = mesh.serve(&limits).await;
    let addr = server.local_addr();
    let roots = mesh.ca.trust_bundle();

    // 20 addresses, 55 each: under the per-peer cap, over the global one.
    let closed = Arc::new(AtomicUsize::new(0));
    let flood_start = Instant::now();
    let mut idle = Vec::new();
    for i in 1..=20u8 {
        let source = IpAddr::from([127, 0, 1, i]);
        idle.extend(idle_clients(source, addr, IDLE_CONNECTIONS / 20, &closed).await);
    }
    let over = IDLE_CONNECTIONS - limits.max_connections;
    eventually("the connections over the global cap reset", || {
        server.connections().refused_total_cap == over as u64
    })
    .await;
    assert_eq!(server.connections().refused_per_peer_cap, 0);

    // A node renewing now gets in once the budget has closed the idle
    // ones: the flood delays it by at most the budget.
    let took = renew_retrying(ip("127.0.0.2"), addr, &roots, &mesh.token).await;
    let bound = limits.handshake_timeout + Duration::from_secs(3);
    assert!(
        flood_start.elapsed() < bound + Duration::from_secs(5),
        "opening the flood took too long to measure anything"
    );
    assert!(took < bound, "renewal took {took:?}");
    eventually("every idle connection closed", || {
        closed.load(Ordering::SeqCst) == IDLE_CONNECTIONS
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_before_authenticating_is_closed_after_the_budget() {
    let mesh = Mesh::new();
    let limits = ListenerLimits {
        handshake_timeout: Duration::from_millis(600),
        ..ListenerLimits::default()
    };
    let server = mesh.serve(&limits).await;
    let addr = server.local_addr();
    let roots = mesh.ca.trust_bundle();

    /// How long until the CA closes `tcp` (EOF or reset).
    async fn closed_after(mut tcp: impl tokio::io::AsyncRead + Unpin, since: Instant) -> Duration {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return since.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("not closed within {WAIT:?}"),
            }
        }
    }
    let budget = limits.handshake_timeout;

    // Sends nothing at all.
    let start = Instant::now();
    let silent = TcpStream::connect(addr).await.unwrap();
    let silent = tokio::spawn(closed_after(silent, start));

    // A slowloris: one byte of a TLS record every 100 ms, forever.
    let start = Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let trickle = tokio::spawn(async move {
        let mut header = [0x16u8, 0x03, 0x01, 0x02, 0x00].into_iter().cycle();
        let mut wrote = 0u32;
        loop {
            let byte = [header.next().unwrap_or(0)];
            if slow.write_all(&byte).await.is_err() {
                return (start.elapsed(), wrote);
            }
            wrote += 1;
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await;
            if let Ok(Ok(0) | Err(_)) = read {
                return (start.elapsed(), wrote);
            }
            assert!(start.elapsed() < WAIT, "the slow client was never closed");
        }
    });

    // Finishes TLS, then never sends its request (the token).
    let start = Instant::now();
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            "localhost".try_into().unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        )
        .await
        .unwrap();
    let mute = tokio::spawn(closed_after(tls, start));

    let silent = silent.await.unwrap();
    let (slow, bytes) = trickle.await.unwrap();
    let mute = mute.await.unwrap();
    for (who, took) in [("silent", silent), ("slow", slow), ("mute after TLS", mute)] {
        assert!(
            took >= budget,
            "{who}: closed after {took:?}, before the budget"
        );
        assert!(
            took < budget + Duration::from_secs(2),
            "{who}: closed only after {took:?}"
        );
    }
    assert!(bytes >= 3, "the slow client kept sending ({bytes} bytes)");
    // The server counts a timeout as it closes; the client may see the
    // close a moment before the count lands.
    eventually("three handshake timeouts counted", || {
        server.connections().handshake_timeouts == 3
    })
    .await;
    eventually("no connection left open", || server.connections().open == 0).await;

    // A well-behaved client is unaffected.
    renew_retrying(ip("127.0.0.1"), addr, &roots, &mesh.token).await;
    server.shutdown().await;
}

#[test]
fn listener_limits_name_the_bad_value() {
    let ok = ListenerLimits::default();
    ok.validate().unwrap();
    let cases = [
        (
            ListenerLimits {
                handshake_timeout: Duration::ZERO,
                ..ok.clone()
            },
            "handshake timeout 0ns",
        ),
        (
            ListenerLimits {
                max_connections: 0,
                ..ok.clone()
            },
            "max connections 0",
        ),
        (
            ListenerLimits {
                max_connections_per_peer: 0,
                ..ok.clone()
            },
            "max connections per peer 0",
        ),
        (
            ListenerLimits {
                max_connections_per_peer: 2048,
                ..ok.clone()
            },
            "max connections per peer 2048: over max connections 1024",
        ),
    ];
    for (limits, want) in cases {
        let err = limits.validate().unwrap_err().to_string();
        assert!(err.contains(want), "{limits:?}: {err}");
    }
}
