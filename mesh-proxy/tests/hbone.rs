//! HBONE end to end over loopback: a real CA and SPIFFE leaf certificates
//! made here with rcgen, rustls mTLS (TLS 1.3, ALPN h2), the pool on one
//! side and `serve` on the other, plain TCP "apps" behind the handler.
//! Every wait is bounded by `within`.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use mesh_proxy::hbone::{
    CapExceeded, Connector, ConnectorError, H2Config, Handler, HboneError, Limiter, Pool, PoolKey,
    Refusal, ServeSummary, ServerLimits, Tunnel, TunnelClosed, serve, serve_tcp,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use sockmesh_test_support::ChainOnly;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/db";

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    sockmesh_test_support::within(what, WAIT, fut)
        .await
        .unwrap()
}

/// Polls `cond` until it holds, at most `WAIT`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    sockmesh_test_support::eventually(what, WAIT, cond)
        .await
        .unwrap()
}

// ---------------------------------------------------------------- PKI

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The shared test PKI with this file's server identity and provider.
struct Pki(sockmesh_test_support::Pki);

impl Pki {
    fn new() -> Pki {
        Pki(sockmesh_test_support::Pki::new().unwrap())
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.0.roots().unwrap()
    }

    /// mTLS required: clients must present a certificate chaining to the CA.
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.0.server_config(&provider(), SERVER_ID).unwrap()
    }

    /// `identity: None` presents no certificate.
    fn client_config(&self, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
        self.0.client_config(&provider(), identity).unwrap()
    }
}

fn spiffe_id(cert: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap()
}

// ---------------------------------------------------------------- server side

/// The proxy's decision, as tests want it: deny one port, connect to the
/// target otherwise; records what it saw.
#[derive(Default)]
struct TestHandler {
    deny_port: Option<u16>,
    peers: Mutex<Vec<String>>,
    closed: Mutex<Vec<TunnelClosed>>,
}

impl Handler for TestHandler {
    type Stream = TcpStream;

    async fn open(&self, tunnel: Tunnel) -> Result<TcpStream, Refusal> {
        let peer = tunnel
            .peer_certificates
            .first()
            .map(spiffe_id)
            .unwrap_or_default();
        self.peers.lock().unwrap().push(peer);
        if Some(tunnel.target.port()) == self.deny_port {
            return Err(Refusal::Forbidden(format!("port {}", tunnel.target.port())));
        }
        let stream = TcpStream::connect(tunnel.target)
            .await
            .map_err(|e| Refusal::BadGateway(format!("{}: {e}", tunnel.target)))?;
        stream.set_nodelay(true).unwrap();
        Ok(stream)
    }

    fn closed(&self, _upstream: TcpStream, closed: &TunnelClosed) {
        self.closed.lock().unwrap().push(closed.clone());
    }
}

/// One accepted connection: its drain signal and its `serve` task.
type ServedConn = (
    watch::Sender<bool>,
    JoinHandle<Result<ServeSummary, HboneError>>,
);

/// A test HBONE listener on 127.0.0.1:0. Each accepted connection gets its
/// own drain signal, so draining the current ones leaves later ones alone.
struct Server {
    addr: SocketAddr,
    handler: Arc<TestHandler>,
    accepts: Arc<AtomicUsize>,
    tls_errors: Arc<Mutex<Vec<String>>>,
    conns: Arc<Mutex<Vec<ServedConn>>>,
    accept_task: JoinHandle<()>,
}

impl Server {
    async fn start(pki: &Pki, handler: TestHandler) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let handler = Arc::new(handler);
        let accepts = Arc::new(AtomicUsize::new(0));
        let tls_errors = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept_task = tokio::spawn({
            let (handler, accepts, tls_errors, conns) = (
                handler.clone(),
                accepts.clone(),
                tls_errors.clone(),
                conns.clone(),
            );
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    accepts.fetch_add(1, Ordering::SeqCst);
                    tcp.set_nodelay(true).unwrap();
                    let tls = match tokio::time::timeout(WAIT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tls_errors.lock().unwrap().push(e.to_string());
                            continue;
                        }
                        Err(_) => {
                            tls_errors.lock().unwrap().push("timeout".into());
                            continue;
                        }
                    };
                    let (drain_tx, mut drain_rx) = watch::channel(false);
                    let handler = handler.clone();
                    let task = tokio::spawn(async move {
                        let drain = async move {
                            let _ = drain_rx.wait_for(|d| *d).await;
                        };
                        serve(
                            tls,
                            handler,
                            drain,
                            &H2Config::default(),
                            &ServerLimits::default(),
                        )
                        .await
                    });
                    conns.lock().unwrap().push((drain_tx, task));
                }
            }
        });
        Server {
            addr,
            handler,
            accepts,
            tls_errors,
            conns,
            accept_task,
        }
    }

    fn drain_current(&self) {
        for (tx, _) in self.conns.lock().unwrap().iter() {
            let _ = tx.send(true);
        }
    }

    fn kill_current(&self) {
        for (_, task) in self.conns.lock().unwrap().iter() {
            task.abort();
        }
    }

    /// The result of the `n`th connection's `serve`.
    async fn finished(&self, n: usize) -> Result<ServeSummary, HboneError> {
        let task = {
            let mut conns = self.conns.lock().unwrap();
            let (_, task) = &mut conns[n];
            std::mem::replace(task, tokio::spawn(std::future::pending()))
        };
        within("serve to return", task).await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.kill_current();
    }
}

// ---------------------------------------------------------------- client side

struct TestConnector {
    tls: Arc<rustls::ClientConfig>,
    expect_peer: String,
    dials: AtomicUsize,
    /// Dial from this loopback address (each is a separate peer).
    source: Option<std::net::IpAddr>,
}

impl TestConnector {
    fn new(pki: &Pki, identity: Option<&str>) -> TestConnector {
        TestConnector {
            tls: pki.client_config(identity),
            expect_peer: SERVER_ID.into(),
            dials: AtomicUsize::new(0),
            source: None,
        }
    }
}

impl Connector for TestConnector {
    async fn dial(&self, key: &PoolKey) -> io::Result<TcpStream> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        match self.source {
            Some(ip) => connect_from(ip, key.dest).await,
            None => TcpStream::connect(key.dest).await,
        }
    }

    fn tls(
        &self,
        _key: &PoolKey,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), ConnectorError> {
        Ok((
            self.tls.clone(),
            ServerName::try_from("hbone.invalid").unwrap(),
        ))
    }

    fn verify(
        &self,
        _key: &PoolKey,
        peer: &[CertificateDer<'static>],
    ) -> Result<(), ConnectorError> {
        let id = peer.first().map(spiffe_id).unwrap_or_default();
        if id == self.expect_peer {
            Ok(())
        } else {
            Err(format!("peer is {id:?}, expected {:?}", self.expect_peer).into())
        }
    }
}

fn pool(pki: &Pki) -> Pool<TestConnector> {
    Pool::new(
        TestConnector::new(pki, Some(CLIENT_ID)),
        H2Config::default(),
    )
}

fn key(server: &Server) -> PoolKey {
    PoolKey::new(CLIENT_ID, server.addr)
}

// ---------------------------------------------------------------- apps

/// Echoes until EOF, then closes.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// 1 MiB blocks of pseudo-random bytes, each stamped with its index.
fn block(seed: u64, index: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(1 << 20);
    for _ in 0..(1 << 17) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out[..8].copy_from_slice(&index.to_le_bytes());
    out
}

/// Writes `mib` blocks and returns their SHA-256.
async fn send_blocks(w: &mut (impl AsyncWrite + Unpin), seed: u64, mib: u64) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut b = block(seed, 0);
    for i in 0..mib {
        b[..8].copy_from_slice(&i.to_le_bytes());
        hash.update(&b);
        w.write_all(&b).await.unwrap();
    }
    hash.finalize().into()
}

/// Reads to EOF; returns (bytes, SHA-256).
async fn read_all(r: &mut (impl AsyncRead + Unpin)) -> (u64, [u8; 32]) {
    let mut hash = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    let mut n = 0;
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        hash.update(&buf[..k]);
        n += k as u64;
    }
    (n, hash.finalize().into())
}

const MIB: u64 = 64;

/// Sends MIB MiB while reading the peer's to EOF; after EOF it sends the
/// SHA-256 of what it read (so that direction outlives the half-close),
/// then closes.
async fn transfer_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let reader = tokio::spawn(async move { read_all(&mut r).await });
        send_blocks(&mut w, 2, MIB).await;
        let (n, digest) = reader.await.unwrap();
        w.write_all(&n.to_le_bytes()).await.unwrap();
        w.write_all(&digest).await.unwrap();
        w.shutdown().await.unwrap();
    });
    addr
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_64mib_both_ways_with_half_close() {
    let pki = Pki::new();
    let server = Server::start(&pki, TestHandler::default()).await;
    let app = transfer_app().await;
    let pool = pool(&pki);

    let tunnel = within("connect", pool.connect(&key(&server), app))
        .await
        .unwrap();
    assert_eq!(spiffe_id(&tunnel.peer_certificates()[0]), SERVER_ID);
    transfer_through(tunnel, &server).await;
}

/// The proxy's outbound relay: app socket <-> `copy_tunnel` <-> tunnel,
/// every byte both ways, each half-close passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_64mib_both_ways_through_the_proxy_relay() {
    let pki = Pki::new();
    let server = Server::start(&pki, TestHandler::default()).await;
    let app = transfer_app().await;
    let pool = pool(&pki);

    let mut tunnel = within("connect", pool.connect(&key(&server), app))
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut down, _) = listener.accept().await.unwrap();
    let relay = tokio::spawn(async move {
        mesh_proxy::hbone::copy_tunnel(&mut down, tunnel.stream_mut(), 256 * 1024).await
    });
    transfer_through(client, &server).await;
    let moved = within("relay", relay).await.unwrap().unwrap();
    assert_eq!(moved, (MIB << 20, (MIB << 20) + 40));
}

/// Runs the transfer app's exchange over `io` (a tunnel to it) and checks
/// both directions and the server's counts.
async fn transfer_through(io: impl AsyncRead + AsyncWrite + Send + 'static, server: &Server) {
    let (mut r, mut w) = tokio::io::split(io);
    let sender = tokio::spawn(async move {
        let digest = send_blocks(&mut w, 1, MIB).await;
        // Half-close: the app sees EOF, and still answers.
        w.shutdown().await.unwrap();
        (digest, w)
    });
    let mut received = Vec::new();
    let (n, app_digest) = within("read", async {
        let mut hash = Sha256::new();
        let mut buf = vec![0; 256 * 1024];
        let mut n = 0u64;
        let body = MIB << 20;
        loop {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            let body_part = (body.saturating_sub(n) as usize).min(k);
            hash.update(&buf[..body_part]);
            received.extend_from_slice(&buf[body_part..k]);
            n += k as u64;
        }
        (n, <[u8; 32]>::from(hash.finalize()))
    })
    .await;
    let (sent_digest, _w) = within("send", sender).await.unwrap();

    // What we got: the app's 64 MiB, intact, then its trailer, then EOF.
    assert_eq!(n, (MIB << 20) + 40);
    let mut expected = Sha256::new();
    let mut b = block(2, 0);
    for i in 0..MIB {
        b[..8].copy_from_slice(&i.to_le_bytes());
        expected.update(&b);
    }
    assert_eq!(app_digest, <[u8; 32]>::from(expected.finalize()));
    // What the app got: our 64 MiB, intact.
    assert_eq!(
        u64::from_le_bytes(received[..8].try_into().unwrap()),
        MIB << 20
    );
    assert_eq!(received[8..], sent_digest);

    // The server counted each byte once.
    eventually("tunnel closed", || {
        !server.handler.closed.lock().unwrap().is_empty()
    })
    .await;
    let closed = server.handler.closed.lock().unwrap()[0].clone();
    assert_eq!(closed.bytes_from_peer, MIB << 20);
    assert_eq!(closed.bytes_to_peer, (MIB << 20) + 40);
    assert_eq!(closed.error, None);
    assert_eq!(server.handler.peers.lock().unwrap()[0], CLIENT_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_tunnels_share_one_connection() {
    let pki = Pki::new();
    let server = Server::start(&pki, TestHandler::default()).await;
    let app = echo_app().await;
    let pool = pool(&pki);
    let k = key(&server);

    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let (pool, k) = (pool.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = pool.connect(&k, app).await.unwrap();
            let msg = format!("tunnel {i} ").repeat(1000);
            t.write_all(msg.as_bytes()).await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = Vec::new();
            t.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
            t.connection_id()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(within("tunnel", t).await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "tunnels used connections {ids:?}");
    assert_eq!(pool.connector().dials.load(Ordering::SeqCst), 1);
    assert_eq!(server.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connection_count(), 1);
    eventually("64 tunnels closed", || {
        server.handler.closed.lock().unwrap().len() == 64
    })
    .await;
}

/// A raw HTTP/2 client over mTLS, to send what the pool never would.
async fn raw_client(
    pki: &Pki,
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config(Some(CLIENT_ID)))
        .connect(ServerName::try_from("hbone.invalid").unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A tunnel to `app` opened by hand on a raw HTTP/2 connection (200, then
/// the upgraded stream).
async fn raw_tunnel(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    app: SocketAddr,
) -> hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    let res = within(
        "CONNECT",
        send.send_request(request(http::Method::CONNECT, &app.to_string())),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    hyper_util::rt::TokioIo::new(within("upgrade", hyper::upgrade::on(res)).await.unwrap())
}

fn request(method: http::Method, uri: &str) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_connect_and_bad_authority_are_refused() {
    let pki = Pki::new();
    let server = Server::start(&pki, TestHandler::default()).await;
    let app = echo_app().await;
    let mut send = within("raw client", raw_client(&pki, server.addr)).await;

    let res = within(
        "GET",
        send.send_request(request(http::Method::GET, "https://hbone.invalid/")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), http::StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()[http::header::ALLOW], "CONNECT");
    let res = within(
        "POST",
        send.send_request(request(http::Method::POST, "https://10.0.0.1:80/")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), http::StatusCode::METHOD_NOT_ALLOWED);

    for bad in [
        "example.com:80",
        "10.0.0.1:0",
        "0.0.0.0:80",
        "[::ffff:127.0.0.1]:80",
        "user@127.0.0.1:80",
    ] {
        let res = within(
            "CONNECT",
            send.send_request(request(http::Method::CONNECT, bad)),
        )
        .await;
        match res {
            Ok(res) => assert_eq!(res.status(), http::StatusCode::BAD_REQUEST, "{bad}"),
            // The HTTP layer may refuse a malformed authority itself.
            Err(e) => assert!(bad.contains('@'), "{bad}: {e}"),
        }
    }

    // The connection still carries good tunnels.
    drop(raw_tunnel(&mut send, app).await);
    // None of the refused requests reached the handler.
    assert_eq!(server.handler.peers.lock().unwrap().len(), 1);

    // Through the pool: port 0 is a 400, named in the error.
    let err = within(
        "pool",
        pool(&pki).connect(&key(&server), "127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err}");
    assert!(err.to_string().contains("127.0.0.1:0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_refusals_map_to_statuses() {
    let pki = Pki::new();
    let app = echo_app().await;
    let handler = TestHandler {
        deny_port: Some(app.port()),
        ..Default::default()
    };
    let server = Server::start(&pki, handler).await;
    let pool = pool(&pki);

    let err = within("denied", pool.connect(&key(&server), app))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::FORBIDDEN), "{err}");
    assert!(matches!(err, HboneError::Status { target, .. } if target == app));
    assert!(err.to_string().contains("403"), "{err}");

    // Nothing listens there: the handler's connect fails, 502.
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let err = within("refused", pool.connect(&key(&server), closed_port))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_GATEWAY), "{err}");
    // Refusals are per stream: the connection is still the one.
    assert_eq!(pool.connector().dials.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_reconnects_after_the_server_connection_dies() {
    let pki = Pki::new();
    let server = Server::start(&pki, TestHandler::default()).await;
    let app = echo_app().await;
    let pool = pool(&pki);
    let k = key(&server);

    async fn ping(pool: &Pool<TestConnector>, k: &PoolKey, app: SocketAddr) -> u64 {
        let mut t = within("connect", pool.connect(k, app)).await.unwrap();
        t.write_all(b"ping").await.unwrap();
        t.shutdown().await.unwrap();
        let mut back = Vec::new();
        within("echo", t.read_to_end(&mut back)).await.unwrap();
        assert_eq!(back, b"ping");
        t.connection_id()
    }

    let first = ping(&pool, &k, app).await;
    server.kill_current();
    eventually("pool to notice", || pool.connection_count() == 0).await;
    let second = ping(&pool, &k, app).await;
    assert_ne!(first, second);
    assert_eq!(pool.connector().dials.load(Ordering::SeqCst), 2);
    assert_eq!(server.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_open_tunnels_and_refuses_new_streams() {
    let pki = Pki::new();
    let server = Server::start(&pki, TestHandler::default()).await;
    let app = echo_app().await;

    // Raw: an open tunnel survives the drain; a new stream is refused.
    let mut send = within("raw client", raw_client(&pki, server.addr)).await;
    let mut open = raw_tunnel(&mut send, app).await;

    server.drain_current();
    // Streams opened before the GOAWAY reaches us are still served; once it
    // has, every new stream is refused.
    within("a stream refused", async {
        loop {
            let req = request(http::Method::CONNECT, &app.to_string());
            match send.send_request(req).await {
                Err(_) => break,
                Ok(res) => {
                    assert_eq!(res.status(), http::StatusCode::OK);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .await;

    open.write_all(b"still here").await.unwrap();
    let mut buf = [0; 10];
    within("echo", open.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still here");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF", open.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    drop(open);

    let summary = server.finished(0).await.unwrap();
    assert!(summary.tunnels >= 1, "{summary:?}");
    assert_eq!(summary.bytes_from_peer, 10);
    assert_eq!(summary.bytes_to_peer, 10);

    // Pool: after GOAWAY, new tunnels go over a new connection while the
    // old one finishes its tunnel.
    let pool = pool(&pki);
    let k = key(&server);
    let mut old = within("connect", pool.connect(&k, app)).await.unwrap();
    server.drain_current();
    // h2 reports a GOAWAY on the next request: the pool then retries
    // that request on a new connection.
    let mut new = within("a tunnel on a new connection", async {
        loop {
            let t = pool.connect(&k, app).await.unwrap();
            if t.connection_id() != old.connection_id() {
                break t;
            }
            drop(t);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_ne!(old.connection_id(), new.connection_id());
    assert_eq!(pool.connector().dials.load(Ordering::SeqCst), 2);
    for t in [&mut old, &mut new] {
        t.write_all(b"abc").await.unwrap();
        t.shutdown().await.unwrap();
        let mut back = Vec::new();
        within("echo", t.read_to_end(&mut back)).await.unwrap();
        assert_eq!(back, b"abc");
    }
    drop(old);
    let summary = server.finished(1).await.unwrap();
    assert!(summary.tunnels >= 1, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_is_required_and_the_peer_identity_checked() {
    let pki = Pki::new();
    let server = Server::start(&pki, TestHandler::default()).await;
    let app = echo_app().await;

    // No client certificate: the server's client auth refuses it.
    let anonymous = Pool::new(TestConnector::new(&pki, None), H2Config::default());
    let err = within("anonymous", anonymous.connect(&key(&server), app))
        .await
        .unwrap_err();
    assert!(err.status().is_none(), "{err}");
    eventually("server TLS error", || {
        !server.tls_errors.lock().unwrap().is_empty()
    })
    .await;
    let tls_error = server.tls_errors.lock().unwrap()[0].clone();
    assert!(
        tls_error.to_lowercase().contains("certificate"),
        "{tls_error}"
    );
    assert!(server.handler.peers.lock().unwrap().is_empty());
    eventually("nothing pooled", || anonymous.connection_count() == 0).await;

    // A certificate from another CA: refused too.
    let other = Pki::new();
    let mut connector = TestConnector::new(&pki, Some(CLIENT_ID));
    connector.tls = {
        let mut c = (*other.client_config(Some(CLIENT_ID))).clone();
        // Trust our server, present the foreign certificate.
        c.dangerous()
            .set_certificate_verifier(Arc::new(ChainOnly::new(pki.roots(), provider())));
        Arc::new(c)
    };
    let foreign = Pool::new(connector, H2Config::default());
    assert!(
        within("foreign", foreign.connect(&key(&server), app))
            .await
            .is_err()
    );

    // The server is not who the client expects: rejected before pooling.
    let mut connector = TestConnector::new(&pki, Some(CLIENT_ID));
    connector.expect_peer = "spiffe://cluster.local/ns/default/sa/other".into();
    let wrong_peer = Pool::new(connector, H2Config::default());
    let err = within("wrong peer", wrong_peer.connect(&key(&server), app))
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::PeerRejected { .. }), "{err}");
    assert!(err.to_string().contains(SERVER_ID), "{err}");
    assert_eq!(wrong_peer.connection_count(), 0);
}

// ---------------------------------------------------------------- limits

/// A TCP connection from `source` (any 127.x.y.z address works on `lo`).
async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// An HBONE listener as the node proxy runs it: every accepted connection
/// goes through `serve_tcp` with one shared `Limiter`.
struct LimitedServer {
    addr: SocketAddr,
    handler: Arc<TestHandler>,
    limiter: Arc<Limiter>,
    errors: Arc<Mutex<Vec<HboneError>>>,
    accept_task: JoinHandle<()>,
}

/// A CA and a server whose limits `set` changes from the defaults.
async fn limited(set: impl FnOnce(&mut ServerLimits)) -> (Pki, LimitedServer) {
    let pki = Pki::new();
    let mut limits = ServerLimits::default();
    set(&mut limits);
    let server = LimitedServer::start(&pki, limits).await;
    (pki, server)
}

impl LimitedServer {
    async fn start(pki: &Pki, limits: ServerLimits) -> LimitedServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = pki.server_config();
        let handler = Arc::new(TestHandler::default());
        let limiter = Limiter::new(limits);
        let errors = Arc::new(Mutex::new(Vec::new()));
        let accept_task = tokio::spawn({
            let (handler, limiter, errors) = (handler.clone(), limiter.clone(), errors.clone());
            async move {
                while let Ok((tcp, peer)) = listener.accept().await {
                    let (tls, handler, limiter, errors) = (
                        tls.clone(),
                        handler.clone(),
                        limiter.clone(),
                        errors.clone(),
                    );
                    tokio::spawn(async move {
                        let drain = std::future::pending();
                        let h2 = H2Config::default();
                        if let Err(e) =
                            serve_tcp(tcp, peer, tls, handler, drain, &limiter, &h2).await
                        {
                            errors.lock().unwrap().push(e);
                        }
                    });
                }
            }
        });
        LimitedServer {
            addr,
            handler,
            limiter,
            errors,
            accept_task,
        }
    }

    fn caps_hit(&self) -> Vec<CapExceeded> {
        let errors = self.errors.lock().unwrap();
        errors
            .iter()
            .filter_map(|e| e.cap_exceeded().cloned())
            .collect()
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Time until the server closes `tcp` (EOF or reset), reading and
/// discarding whatever it sends.
async fn closed_after(mut tcp: impl AsyncRead + Unpin, since: tokio::time::Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match within("the server to close", tcp.read(&mut buf)).await {
            Ok(0) | Err(_) => return since.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_a_cap_are_reset_before_tls_and_other_peers_still_get_in() {
    let pki = Pki::new();
    let limits = ServerLimits {
        max_connections: 6,
        max_connections_per_peer: 4,
        // Held for the whole test: only the caps are under test here.
        handshake_timeout: WAIT,
        ..ServerLimits::default()
    };
    let server = LimitedServer::start(&pki, limits).await;
    let app = echo_app().await;

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(ip("127.0.0.1"), server.addr).await.unwrap());
    }
    eventually("4 admitted", || server.limiter.stats().open == 4).await;

    // The fifth from the same address: reset at once, no TLS, counted.
    let start = tokio::time::Instant::now();
    if let Ok(fifth) = connect_from(ip("127.0.0.1"), server.addr).await {
        let took = closed_after(fifth, start).await;
        assert!(took < Duration::from_secs(5), "reset only after {took:?}");
    }
    eventually("the refusal counted", || {
        server.limiter.stats().refused_per_peer_cap == 1
    })
    .await;
    assert_eq!(
        server.caps_hit(),
        [CapExceeded::PerPeer {
            peer: ip("127.0.0.1"),
            max: 4
        }]
    );

    // Another address gets in, up to the node-wide cap.
    for _ in 0..2 {
        held.push(connect_from(ip("127.0.0.2"), server.addr).await.unwrap());
    }
    eventually("6 admitted", || server.limiter.stats().open == 6).await;
    if let Ok(seventh) = connect_from(ip("127.0.0.3"), server.addr).await {
        closed_after(seventh, tokio::time::Instant::now()).await;
    }
    eventually("the global refusal counted", || {
        server.limiter.stats().refused_total_cap == 1
    })
    .await;
    assert!(server.caps_hit().contains(&CapExceeded::Total {
        peer: ip("127.0.0.3"),
        max: 6
    }));
    assert_eq!(server.limiter.open_from(ip("127.0.0.3")), 0);

    // A closed connection gives its place back: a real tunnel from the
    // third address now works.
    held.pop();
    eventually("a place freed", || server.limiter.stats().open == 5).await;
    let mut connector = TestConnector::new(&pki, Some(CLIENT_ID));
    connector.source = Some(ip("127.0.0.3"));
    let pool = Pool::new(connector, H2Config::default());
    let mut t = within(
        "tunnel",
        pool.connect(&PoolKey::new(CLIENT_ID, server.addr), app),
    )
    .await
    .unwrap();
    t.write_all(b"in").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    within("echo", t.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, b"in");
    assert_eq!(server.limiter.open_from(ip("127.0.0.3")), 1);
}

/// An HTTP/2 client written frame by frame, to open more streams than the
/// server's SETTINGS allow (the h2 crate never would: it queues them).
mod raw_h2 {
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const REFUSED_STREAM: u32 = 7;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// HPACK, literal fields without indexing, names from the static
    /// table: `:method CONNECT` (index 2), `:authority` (index 1).
    pub fn connect_headers(authority: &str) -> Vec<u8> {
        let mut block = vec![0x02, 7];
        block.extend_from_slice(b"CONNECT");
        block.push(0x01);
        block.push(authority.len() as u8);
        block.extend_from_slice(authority.as_bytes());
        block
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_cap_on_one_connection_are_refused_with_refused_stream() {
    use raw_h2::*;
    let pki = Pki::new();
    let server = LimitedServer::start(&pki, ServerLimits::default()).await;
    let app = echo_app().await;
    let cap = H2Config::default().max_concurrent_streams as usize;
    let asked = cap + 20;

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(Some(CLIENT_ID)))
        .connect(ServerName::try_from("hbone.invalid").unwrap(), tcp)
        .await
        .unwrap();
    // Preface, our SETTINGS, and every stream at once, before reading the
    // server's SETTINGS (which announce the cap).
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for i in 0..asked as u32 {
        out.extend(frame(
            HEADERS,
            END_HEADERS,
            2 * i + 1,
            &connect_headers(&app.to_string()),
        ));
    }
    tls.write_all(&out).await.unwrap();

    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    within("an answer on every stream", async {
        while ok.len() + refused.len() < asked {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await.unwrap();
            match kind {
                // `:status 200` is static-table entry 8: 0x88.
                HEADERS => {
                    assert_eq!(payload.first(), Some(&0x88), "stream {stream}: not 200");
                    ok.push(stream);
                }
                RST_STREAM => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    assert_eq!(code, REFUSED_STREAM, "stream {stream} reset with {code}");
                    refused.push(stream);
                }
                SETTINGS if flags & ACK == 0 => {
                    tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
                }
                GOAWAY => panic!("GOAWAY after {} ok, {} refused", ok.len(), refused.len()),
                _ => {}
            }
        }
    })
    .await;
    // The first `cap` streams are tunnels; the rest were refused without
    // reaching the handler.
    assert_eq!(ok.len(), cap, "{} ok, {} refused", ok.len(), refused.len());
    assert_eq!(refused.len(), asked - cap);
    assert!(refused.iter().all(|id| *id > 2 * cap as u32), "{refused:?}");
    assert_eq!(server.handler.peers.lock().unwrap().len(), cap);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_its_idle_timeout_and_a_busy_one_is_not() {
    let idle = Duration::from_millis(500);
    let (pki, server) = limited(|l| l.tunnel_idle_timeout = idle).await;
    let app = echo_app().await;
    let pool = pool(&pki);
    let mut t = within(
        "tunnel",
        pool.connect(&PoolKey::new(CLIENT_ID, server.addr), app),
    )
    .await
    .unwrap();

    // Busy for three idle timeouts: a byte each way every 100 ms keeps it.
    let busy_until = tokio::time::Instant::now() + 3 * idle;
    let mut buf = [0u8; 1];
    let mut last_byte = tokio::time::Instant::now();
    while tokio::time::Instant::now() < busy_until {
        t.write_all(b"x").await.unwrap();
        within("echo", t.read_exact(&mut buf)).await.unwrap();
        last_byte = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.handler.closed.lock().unwrap().is_empty());

    // Then silent: closed once the timeout has passed since the last byte
    // (the last echo, not the end of the pause after it).
    let quiet_since = last_byte;
    let took = closed_after(&mut t, quiet_since).await;
    assert!(
        took >= idle - Duration::from_millis(100),
        "closed after {took:?}"
    );
    assert!(
        took < idle + Duration::from_secs(5),
        "closed only after {took:?}"
    );
    eventually("the close recorded", || {
        !server.handler.closed.lock().unwrap().is_empty()
    })
    .await;
    let closed = server.handler.closed.lock().unwrap()[0].clone();
    let error = closed.error.clone().unwrap_or_default();
    assert!(error.contains("no byte either way"), "{error}");
    assert!(closed.bytes_from_peer >= 3, "{closed:?}");
    assert_eq!(server.limiter.stats().idle_tunnels_closed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_open_stream_is_closed_after_its_idle_timeout() {
    let idle = Duration::from_millis(500);
    let (pki, server) = limited(|l| l.connection_idle_timeout = idle).await;
    let app = echo_app().await;
    let mut send = within("raw client", raw_client(&pki, server.addr)).await;

    // A silent tunnel keeps the connection: it has an open stream.
    let mut open = raw_tunnel(&mut send, app).await;
    tokio::time::sleep(3 * idle).await;
    open.write_all(b"still").await.unwrap();
    let mut buf = [0; 5];
    within("echo", open.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still");
    assert_eq!(server.limiter.stats().idle_connections_closed, 0);

    // Once the last stream closes, the idle timeout runs: GOAWAY, closed.
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF", open.read_to_end(&mut rest)).await.unwrap();
    drop(open);
    let last_stream = tokio::time::Instant::now();
    eventually("the connection closed", || send.is_closed()).await;
    assert!(last_stream.elapsed() >= idle - Duration::from_millis(100));
    eventually("its place given back", || server.limiter.stats().open == 0).await;
    assert_eq!(server.limiter.stats().idle_connections_closed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pre_authentication_connection_is_closed_after_the_handshake_budget() {
    let budget = Duration::from_millis(500);
    let (_pki, server) = limited(|l| l.handshake_timeout = budget).await;

    // Sends nothing.
    let start = tokio::time::Instant::now();
    let silent = TcpStream::connect(server.addr).await.unwrap();
    let silent = tokio::spawn(closed_after(silent, start));
    // A slowloris: one byte of a TLS record header every 100 ms.
    let start = tokio::time::Instant::now();
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let slow = tokio::spawn(async move {
        for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00].into_iter().cycle() {
            if slow.write_all(&[byte]).await.is_err() {
                break;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                _ => assert!(start.elapsed() < WAIT, "never closed"),
            }
        }
        start.elapsed()
    });
    for (who, took) in [
        ("silent", within("silent", silent).await.unwrap()),
        ("slow", within("slow", slow).await.unwrap()),
    ] {
        assert!(
            took >= budget,
            "{who}: closed after {took:?}, before the budget"
        );
        assert!(
            took < budget + Duration::from_secs(3),
            "{who}: closed after {took:?}"
        );
    }
    eventually("both counted", || {
        server.limiter.stats().handshake_timeouts == 2
    })
    .await;
    eventually("their places given back", || {
        server.limiter.stats().open == 0
    })
    .await;
    let errors = server.errors.lock().unwrap();
    assert!(
        errors
            .iter()
            .all(|e| e.to_string().contains("TLS handshake took over")),
        "{errors:?}"
    );
}
