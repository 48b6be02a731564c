//! The node's certificate manager against a real CA (in process, on
//! 127.0.0.1:0): mTLS between workloads, renewal, CA outage, shared
//! requests, root rotation. Time is a ManualClock shared by the CA and the
//! proxies; nothing sleeps for time to pass.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use mesh_ca::roots::RootSource;
use mesh_ca::{Ca, CaConfig, CaServer, Caller, FileTokenAuthenticator, auth};
use mesh_core::ca::{SignRequest, SignResponse, TrustBundleResponse};
use mesh_core::identity::{Clock, Identity, ManualClock};
use mesh_core::registry::FileRegistry;
use mesh_proxy::identity::{
    CaClient, CaClientConfig, CaClientError, CaFuture, CertManager, CertManagerConfig,
    HttpsCaClient, KeyAlgorithm, peer_identity, peer_server_name,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(20);
const REGISTRY: &str = r#"
nodes: [{name: node-1}, {name: node-2}]
pods:
  - {namespace: default, name: web-1, uid: u1, node: node-1, service_account: web}
  - {namespace: default, name: db-1, uid: u2, node: node-2, service_account: db}
"#;

fn web() -> Identity {
    Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
}
fn db() -> Identity {
    Identity::parse("spiffe://cluster.local/ns/default/sa/db").unwrap()
}

struct Mesh {
    dir: tempfile::TempDir,
    clock: ManualClock,
}

impl Mesh {
    fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("registry.yaml"), REGISTRY).unwrap();
        for node in ["node-1", "node-2"] {
            auth::create_node_token(&dir.path().join("tokens"), node).unwrap();
        }
        Mesh {
            dir,
            clock: ManualClock::new(SystemTime::now()),
        }
    }

    fn ca(&self) -> Ca {
        let mut config = CaConfig::new(TD, RootSource::StateDir(self.dir.path().join("ca")));
        config.clock = Arc::new(self.clock.clone());
        Ca::new(
            config,
            Arc::new(FileTokenAuthenticator::load(self.dir.path().join("tokens")).unwrap()),
            Arc::new(FileRegistry::load(self.dir.path().join("registry.yaml")).unwrap()),
        )
        .unwrap()
    }

    fn token(&self, node: &str) -> String {
        auth::read_node_token(&auth::node_token_path(
            &self.dir.path().join("tokens"),
            node,
        ))
        .unwrap()
    }

    /// A node proxy's manager, talking HTTPS to `addr`, bootstrapped from
    /// the trust bundle file the CA wrote.
    fn proxy(&self, node: &str, addr: SocketAddr) -> CertManager {
        let anchors = mesh_proxy::identity::load_pem_certs(
            &self.dir.path().join("ca").join("trust-bundle.pem"),
        )
        .unwrap();
        let mut cfg = CaClientConfig::new(addr, "localhost", anchors.clone(), self.token(node));
        cfg.clock = Arc::new(self.clock.clone());
        cfg.timeout = Duration::from_secs(5);
        CertManager::new(
            Arc::new(HttpsCaClient::new(cfg).unwrap()),
            Arc::new(self.clock.clone()),
            CertManagerConfig::new(TD),
            anchors,
        )
    }
}

async fn start(ca: &Ca, addr: &str) -> CaServer {
    CaServer::bind(ca.clone(), addr.parse().unwrap())
        .await
        .unwrap()
}

/// mTLS over loopback: `client` connects as `me`, expecting `peer`; the
/// server side serves as `peer`. Returns what each side saw of the other,
/// or the first error.
async fn handshake(
    server: &CertManager,
    server_id: &Identity,
    client: &CertManager,
    client_id: &Identity,
    expected: &Identity,
) -> Result<(Identity, Identity), String> {
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(server_id).unwrap());
    let connector =
        tokio_rustls::TlsConnector::from(client.client_config(client_id, expected).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        peer_identity(&peer).map_err(|e| e.to_string())
    });
    let cli = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(peer_server_name(expected), tcp)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // AES-128-GCM first (cheaper per byte than AES-256-GCM; both are
        // in Istio's profile).
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        peer_identity(&peer).map_err(|e| e.to_string())
    };
    tokio::time::timeout(WAIT, async {
        let client_saw = cli.await;
        let server_saw = srv.await.map_err(|e| e.to_string())?;
        match (client_saw, server_saw) {
            (Ok(c), Ok(s)) => Ok((c, s)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    })
    .await
    .map_err(|_| "handshake timed out".to_string())?
}

#[tokio::test]
async fn workloads_get_certificates_and_talk_mtls_with_checked_spiffe_ids() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let server = start(&ca, "127.0.0.1:0").await;
    let node1 = mesh.proxy("node-1", server.local_addr());
    let node2 = mesh.proxy("node-2", server.local_addr());

    let w = node1.fetch(&web()).await.unwrap();
    assert_eq!(w.identity, web());
    node2.fetch(&db()).await.unwrap();
    // node-1 may not have db's certificate: the CA refuses, opaquely.
    let err = node1.fetch(&db()).await.unwrap_err().to_string();
    assert!(
        err.contains("403") && err.contains("request refused"),
        "{err}"
    );

    let (client_saw, server_saw) = handshake(&node2, &db(), &node1, &web(), &db())
        .await
        .unwrap();
    assert_eq!((client_saw, server_saw), (db(), web()));
    // Expecting someone else: refused by the client's SPIFFE check.
    let other = Identity::parse("spiffe://cluster.local/ns/default/sa/payments").unwrap();
    let err = handshake(&node2, &db(), &node1, &web(), &other)
        .await
        .unwrap_err();
    assert!(
        err.contains("expected spiffe://cluster.local/ns/default/sa/payments"),
        "{err}"
    );

    // Other key types work end to end too.
    for alg in [KeyAlgorithm::EcdsaP384, KeyAlgorithm::Ed25519] {
        let anchors = ca.trust_bundle();
        let mut cfg = CaClientConfig::new(
            server.local_addr(),
            "localhost",
            anchors.clone(),
            mesh.token("node-1"),
        );
        cfg.clock = Arc::new(mesh.clock.clone());
        let mut mc = CertManagerConfig::new(TD);
        mc.key_algorithm = alg;
        let m = CertManager::new(
            Arc::new(HttpsCaClient::new(cfg).unwrap()),
            Arc::new(mesh.clock.clone()),
            mc,
            anchors,
        );
        m.fetch(&web()).await.unwrap();
        let (c, s) = handshake(&node2, &db(), &m, &web(), &db()).await.unwrap();
        assert_eq!((c, s), (db(), web()), "{alg:?}");
    }
    let state = node1.state(&web()).unwrap();
    assert_eq!(state.serial.as_deref(), Some(w.serial.as_str()));
    assert!(state.valid && state.last_error.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn renews_at_half_life_keeps_serving_through_an_outage_and_backs_off() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let server = start(&ca, "127.0.0.1:0").await;
    let addr = server.local_addr();
    let node1 = mesh.proxy("node-1", addr);
    let clock = mesh.clock.clone();

    node1.track(&web());
    assert_eq!(
        node1.refresh_due().await,
        1,
        "tracked identity fetched ahead of need"
    );
    let first = node1.current(&web()).unwrap();
    let life = first.not_after.duration_since(first.not_before).unwrap();
    assert_eq!(life, Duration::from_secs(24 * 3600 + 300));
    let due = node1.next_due().unwrap();
    let lo = first.not_before + life.mul_f64(0.45);
    let hi = first.not_before + life.mul_f64(0.55);
    assert!(due >= lo && due <= hi, "renewal at 50% ± 5% of life");
    assert_eq!(node1.refresh_due().await, 0, "nothing due yet");

    // The CA goes away. At renewal time the attempt fails; the old
    // certificate stays in use.
    server.shutdown().await;
    clock.set(due);
    assert_eq!(node1.refresh_due().await, 1);
    let st = node1.state(&web()).unwrap();
    assert!(
        st.last_error.as_deref().unwrap().contains("connect"),
        "{st:?}"
    );
    assert_eq!(st.consecutive_failures, 1);
    assert_eq!(node1.fetch(&web()).await.unwrap().serial, first.serial);
    assert_eq!(node1.current(&web()).unwrap().serial, first.serial);

    // Exponential backoff: 1s, 2s, 4s, 8s (each + up to 25% jitter).
    let mut backoff = Duration::from_secs(1);
    for attempt in 2..=5u32 {
        let now = clock.now();
        let next = node1.next_due().unwrap();
        let wait = next.duration_since(now).unwrap();
        assert!(
            wait >= backoff && wait <= backoff.mul_f64(1.25),
            "attempt {attempt}: {wait:?} vs {backoff:?}"
        );
        clock.set(next);
        assert_eq!(node1.refresh_due().await, 1);
        assert_eq!(node1.state(&web()).unwrap().consecutive_failures, attempt);
        backoff *= 2;
    }
    let node2 = mesh.proxy("node-2", addr);
    // node-2 has no certificate and the CA is down: an on-demand fetch fails fast.
    assert!(node2.fetch(&db()).await.is_err());

    // The CA returns on the same address with the same root.
    let ca = mesh.ca();
    let server = start(&ca, &addr.to_string()).await;
    clock.set(node1.next_due().unwrap());
    assert_eq!(node1.refresh_due().await, 1);
    let renewed = node1.current(&web()).unwrap();
    assert_ne!(renewed.serial, first.serial);
    let st = node1.state(&web()).unwrap();
    assert_eq!((st.last_error, st.consecutive_failures), (None, 0));
    assert!(renewed.not_before > first.not_before);

    node2.fetch(&db()).await.unwrap();
    let (c, s) = handshake(&node2, &db(), &node1, &web(), &db())
        .await
        .unwrap();
    assert_eq!((c, s), (db(), web()));

    // Without a CA past expiry, the certificate is no longer served.
    server.shutdown().await;
    clock.set(renewed.not_after + Duration::from_secs(1));
    assert!(node1.current(&web()).is_none());
    node1.refresh_due().await;
    assert!(node1.fetch(&web()).await.is_err());
    assert!(!node1.state(&web()).unwrap().valid);
    let err = handshake(&node2, &db(), &node1, &web(), &db())
        .await
        .unwrap_err();
    assert!(!err.is_empty());
}

/// A CaClient that signs in process, counting calls and holding each until
/// released.
#[derive(Debug)]
struct GatedCa {
    ca: Ca,
    caller: Caller,
    calls: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl CaClient for GatedCa {
    fn sign<'a>(&'a self, request: &'a SignRequest) -> CaFuture<'a, SignResponse> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let _p = self.gate.acquire().await.unwrap();
            self.ca
                .sign(&self.caller, request)
                .map_err(|r| CaClientError::Status {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    path: "/v1/sign",
                    status: r.status,
                    message: r.reason.to_string(),
                })
        })
    }

    fn trust_bundle(&self) -> CaFuture<'_, TrustBundleResponse> {
        Box::pin(async move {
            Ok(TrustBundleResponse {
                trust_domain: TD.into(),
                roots: self.ca.trust_bundle_pem(),
            })
        })
    }
}

#[tokio::test]
async fn concurrent_callers_share_one_request_per_identity() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let gated = Arc::new(GatedCa {
        ca: ca.clone(),
        caller: Caller {
            node: "node-1".into(),
            principal: "test".into(),
        },
        calls: AtomicUsize::new(0),
        gate: tokio::sync::Semaphore::new(0),
    });
    let m = CertManager::new(
        gated.clone(),
        Arc::new(mesh.clock.clone()),
        CertManagerConfig::new(TD),
        ca.trust_bundle(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let m = m.clone();
        tasks.spawn(async move { m.fetch(&web()).await.map(|c| c.serial.clone()) });
    }
    // Wait (bounded) until the first request reaches the CA, then let it through.
    tokio::time::timeout(WAIT, async {
        while gated.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    gated.gate.add_permits(100);
    let mut serials = vec![];
    while let Some(r) = tokio::time::timeout(WAIT, tasks.join_next()).await.unwrap() {
        serials.push(r.unwrap().unwrap());
    }
    assert_eq!(serials.len(), 16);
    assert!(
        serials.windows(2).all(|w| w[0] == w[1]),
        "one certificate for all"
    );
    assert_eq!(
        gated.calls.load(Ordering::SeqCst),
        1,
        "one request in flight"
    );

    // The run loop fetches tracked identities by itself.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(m.clone().run(stop_rx));
    m.forget(&web());
    assert!(m.current(&web()).is_none());
    m.track(&web());
    tokio::time::timeout(WAIT, async {
        while m.current(&web()).is_none() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, runner).await.unwrap().unwrap();
}

#[tokio::test]
async fn root_rotation_without_breaking_live_workloads() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let server = start(&ca, "127.0.0.1:0").await;
    let node1 = mesh.proxy("node-1", server.local_addr());
    let node2 = mesh.proxy("node-2", server.local_addr());
    let old_web = node1.fetch(&web()).await.unwrap();
    node2.fetch(&db()).await.unwrap();
    let old_root = ca.trust_bundle();

    // 1: the new root is trusted everywhere before anyone uses it.
    ca.prepare_root_rotation().unwrap();
    for n in [&node1, &node2] {
        assert_eq!(n.refresh_trust_bundle().await.unwrap(), 2);
    }
    handshake(&node2, &db(), &node1, &web(), &db())
        .await
        .unwrap();

    // 2: the new root signs. db renews onto it; web still holds the old one.
    ca.activate_next_root().unwrap();
    let new_db = node2.renew(&db()).await.unwrap();
    assert_eq!(node1.current(&web()).unwrap().serial, old_web.serial);
    assert_ne!(
        chain_root_issuer(&new_db.chain[0]),
        chain_root_issuer(&old_web.chain[0])
    );
    // Mixed roots talk both ways.
    assert_eq!(
        handshake(&node2, &db(), &node1, &web(), &db())
            .await
            .unwrap(),
        (db(), web())
    );
    assert_eq!(
        handshake(&node1, &web(), &node2, &db(), &web())
            .await
            .unwrap(),
        (web(), db())
    );

    // 3: web renews, then the old root is retired.
    node1.renew(&web()).await.unwrap();
    ca.retire_previous_roots().unwrap();
    for n in [&node1, &node2] {
        assert_eq!(n.refresh_trust_bundle().await.unwrap(), 1);
    }
    assert_eq!(
        handshake(&node2, &db(), &node1, &web(), &db())
            .await
            .unwrap(),
        (db(), web())
    );
    assert_ne!(ca.trust_bundle(), old_root);
    // A certificate of the retired root is now refused.
    let stale = node1.trust_bundle();
    let parsed = rustls::server::ParsedCertificate::try_from(&old_web.chain[0]).unwrap();
    let now = rustls::pki_types::UnixTime::now();
    assert!(
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &stale.root_store(),
            &[],
            now,
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .is_err()
    );
    server.shutdown().await;
}

fn chain_root_issuer(cert: &CertificateDer<'_>) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(cert).unwrap();
    c.issuer().to_string()
}
