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
    Connector, H2Config, Handler, HboneError, Pool, PoolKey, Refusal, ServeSummary, Tunnel,
    TunnelClosed, serve,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/db";

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {WAIT:?}"),
    }
}

/// Polls `cond` until it holds, at most `WAIT`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------- PKI

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Pki {
    ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "sockmesh test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An X.509-SVID: one URI SAN, not a CA, digitalSignature, server+client auth.
    fn leaf(&self, spiffe: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        Arc::new(roots)
    }

    /// mTLS required: clients must present a certificate chaining to the CA.
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .build()
            .unwrap();
        let (chain, key) = self.leaf(SERVER_ID);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// `identity: None` presents no certificate.
    fn client_config(&self, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: self.roots(),
                provider: provider(),
            }));
        let mut config = match identity {
            Some(id) => {
                let (chain, key) = self.leaf(id);
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

/// SVIDs carry no DNS name: check the chain only; the SPIFFE ID is checked
/// by `Connector::verify`.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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

    fn closed(&self, closed: &TunnelClosed) {
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
                        serve(tls, handler, drain, &H2Config::default()).await
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
}

impl TestConnector {
    fn new(pki: &Pki, identity: Option<&str>) -> TestConnector {
        TestConnector {
            tls: pki.client_config(identity),
            expect_peer: SERVER_ID.into(),
            dials: AtomicUsize::new(0),
        }
    }
}

impl Connector for TestConnector {
    async fn dial(&self, key: &PoolKey) -> io::Result<TcpStream> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        TcpStream::connect(key.dest).await
    }

    fn tls(
        &self,
        _key: &PoolKey,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), String> {
        Ok((
            self.tls.clone(),
            ServerName::try_from("hbone.invalid").unwrap(),
        ))
    }

    fn verify(&self, _key: &PoolKey, peer: &[CertificateDer<'static>]) -> Result<(), String> {
        let id = peer.first().map(spiffe_id).unwrap_or_default();
        if id == self.expect_peer {
            Ok(())
        } else {
            Err(format!("peer is {id:?}, expected {:?}", self.expect_peer))
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
    let (mut r, mut w) = tokio::io::split(tunnel);
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
    let res = within(
        "CONNECT",
        send.send_request(request(http::Method::CONNECT, &app.to_string())),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
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
    let res = within(
        "CONNECT",
        send.send_request(request(http::Method::CONNECT, &app.to_string())),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    let mut open =
        hyper_util::rt::TokioIo::new(within("upgrade", hyper::upgrade::on(res)).await.unwrap());

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
    // hyper reports a GOAWAY on the next request: the pool then retries
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
        c.dangerous().set_certificate_verifier(Arc::new(ChainOnly {
            roots: pki.roots(),
            provider: provider(),
        }));
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
