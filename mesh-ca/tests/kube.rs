//! The CA in the cluster, against the fake API server: node proxies
//! authenticated by TokenReview, authorized by the pods the API places on
//! their node; the root in a Secret; one leader by Lease.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube_fake::{FakeApiServer, TokenSpec};
use mesh_ca::auth::CA_AUDIENCE;
use mesh_ca::cluster::{ClusterError, LeaderElection, RootSecret};
use mesh_ca::{Ca, CaConfig, CaServer, TokenReviewAuthenticator};
use mesh_core::ca::{SIGN_PATH, SignRequest, SignResponse};
use mesh_core::identity::Identity;
use mesh_kube::{KubeConfig, KubeRegistry};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

const TD: &str = "cluster.local";
const MESH_NS: &str = "sockmesh-system";

fn client(api: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

fn pod(ns: &str, name: &str, node: &str, sa: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": format!("10.0.{}.{}", name.len(), ns.len())}]},
    })
}

/// A log sink: what the CA writes, for the assertions on its refusals.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Cluster {
    api: FakeApiServer,
    ca: Ca,
    server: CaServer,
    _registry: Arc<KubeRegistry>,
    _dir: tempfile::TempDir,
}

/// Proxies on node-a and node-b; web runs on node-a, db on node-b.
async fn cluster() -> Cluster {
    let api = FakeApiServer::start().await.unwrap();
    for (ns, name, node, sa) in [
        (MESH_NS, "proxy-a", "node-a", "mesh-proxy"),
        (MESH_NS, "proxy-b", "node-b", "mesh-proxy"),
        ("shop", "web-1", "node-a", "web"),
        ("shop", "db-1", "node-b", "db"),
    ] {
        api.create(pod(ns, name, node, sa)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = RootSecret {
        namespace: MESH_NS.into(),
        name: "sockmesh-ca-root".into(),
    };
    let roots = secret
        .load_or_create(&client(&api), TD, dir.path(), true, SystemTime::now())
        .await
        .unwrap();
    let registry = Arc::new(KubeRegistry::start(client(&api), KubeConfig::for_ca()));
    assert!(registry.wait_synced(Duration::from_secs(10)).await);
    let auth = TokenReviewAuthenticator::new(
        client(&api),
        CA_AUDIENCE,
        &[(MESH_NS.into(), "mesh-proxy".into())],
    );
    let ca = Ca::new(CaConfig::new(TD, roots), Arc::new(auth), registry.clone()).unwrap();
    let server = CaServer::bind(ca.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Cluster {
        api,
        ca,
        server,
        _registry: registry,
        _dir: dir,
    }
}

impl Cluster {
    fn uid(&self, ns: &str, name: &str) -> String {
        self.api.object("", "pods", ns, name).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A projected token of `sa`, bound to pod `ns/pod` on `node`.
    fn token(&self, ns: &str, sa: &str, pod: &str, node: &str, audience: &str, ttl: i64) -> String {
        let expires = if ttl >= 0 {
            SystemTime::now() + Duration::from_secs(ttl as u64)
        } else {
            SystemTime::now() - Duration::from_secs((-ttl) as u64)
        };
        self.api.mint_token(TokenSpec {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: vec![audience.into()],
            pod: Some((pod.into(), self.uid(ns, pod))),
            node: Some((node.into(), format!("uid-{node}"))),
            expires,
        })
    }

    /// POST /v1/sign for `identity` with `token`: (status, body).
    async fn sign(&self, token: &str, identity: &str) -> (u16, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let body = serde_json::to_vec(&SignRequest {
            identity: Identity::parse(identity).unwrap(),
            csr,
            ttl_seconds: None,
        })
        .unwrap();
        call(
            self.server.local_addr(),
            &self.ca.trust_bundle(),
            token,
            body,
        )
        .await
    }
}

async fn call(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    token: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(SIGN_PATH)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

#[tokio::test]
async fn a_node_proxy_gets_certificates_only_for_service_accounts_with_a_pod_on_its_node() {
    let log = Log::default();
    let sink = log.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish(),
    );
    let c = cluster().await;
    let a = c.token(MESH_NS, "mesh-proxy", "proxy-a", "node-a", CA_AUDIENCE, 600);
    let b = c.token(MESH_NS, "mesh-proxy", "proxy-b", "node-b", CA_AUDIENCE, 600);

    let (status, body) = c.sign(&a, WEB).await;
    assert_eq!(status, 200, "{body}");
    let issued: SignResponse = serde_json::from_str(&body).unwrap();
    let leaf = CertificateDer::from_pem_slice(issued.certificate_chain[0].as_bytes()).unwrap();
    assert!(!leaf.is_empty());
    assert_eq!(c.sign(&b, DB).await.0, 200);

    // node-a's proxy asks for db, whose only pod runs on node-b.
    let (status, body) = c.sign(&a, DB).await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"request refused"}"#)
    );
    let text = log.text();
    assert!(
        text.contains("no pod of spiffe://cluster.local/ns/shop/sa/db is scheduled on node node-a"),
        "{text}"
    );
    assert!(
        text.contains("node=\"node-a\"") || text.contains("node=node-a"),
        "{text}"
    );

    // The request cannot choose the node: db's pod moves to node-a in the API,
    // and only then does node-a's proxy get db.
    c.api.delete("", "pods", "shop", "db-1").unwrap();
    c.api.create(pod("shop", "db-2", "node-a", "db")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = c.sign(&a, DB).await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "db never allowed on node-a"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.sign(&b, DB).await.0, 403, "and node-b no longer may");
}

#[tokio::test]
async fn forged_expired_wrong_audience_and_unbound_tokens_are_refused_opaquely_and_logged_clearly()
{
    let log = Log::default();
    let sink = log.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish(),
    );
    let c = cluster().await;
    let expired = c.token(MESH_NS, "mesh-proxy", "proxy-a", "node-a", CA_AUDIENCE, -5);
    let wrong_audience = c.token(
        MESH_NS,
        "mesh-proxy",
        "proxy-a",
        "node-a",
        "https://kubernetes.default.svc",
        600,
    );
    let not_proxy = c.token("shop", "web", "web-1", "node-a", CA_AUDIENCE, 600);
    let pod_gone = c.token(MESH_NS, "mesh-proxy", "proxy-b", "node-b", CA_AUDIENCE, 600);
    // Bound to proxy-a (on node-a) but claiming node-b: the API's pod wins.
    let wrong_node = c.token(MESH_NS, "mesh-proxy", "proxy-a", "node-b", CA_AUDIENCE, 600);
    c.api.delete("", "pods", MESH_NS, "proxy-b").unwrap();
    let unbound = c.api.mint_token(TokenSpec {
        namespace: MESH_NS.into(),
        service_account: "mesh-proxy".into(),
        audiences: vec![CA_AUDIENCE.into()],
        pod: None,
        node: None,
        expires: SystemTime::now() + Duration::from_secs(600),
    });
    for (token, logged) in [
        (
            "forged.jwt.token",
            "token review: not authenticated: [invalid bearer token",
        ),
        (expired.as_str(), "service account token has expired"),
        (
            wrong_audience.as_str(),
            "is invalid for the target audiences",
        ),
        (
            not_proxy.as_str(),
            "\"system:serviceaccount:shop:web\" is not a node proxy service account",
        ),
        (pod_gone.as_str(), "pods \"proxy-b\" not found"),
        (unbound.as_str(), "is not bound to a pod"),
        (
            wrong_node.as_str(),
            "runs on node node-a, the token says \"node-b\"",
        ),
    ] {
        let (status, body) = c.sign(token, WEB).await;
        assert_eq!(
            (status, body.as_str()),
            (401, r#"{"error":"request refused"}"#),
            "{logged}"
        );
        let text = log.text();
        assert!(text.contains(logged), "log lacks {logged:?}:\n{text}");
        assert!(
            !text.contains(token) || token == "forged.jwt.token",
            "the token itself is never logged"
        );
    }
    assert_eq!(
        c.api
            .requests("create", "tokenreviews.authentication.k8s.io"),
        7
    );
}

#[tokio::test]
async fn the_root_secret_is_created_once_and_never_overwritten() {
    let api = FakeApiServer::start().await.unwrap();
    let secret = RootSecret {
        namespace: MESH_NS.into(),
        name: "sockmesh-ca-root".into(),
    };
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let follower = secret
        .load_or_create(&client(&api), TD, d1.path(), false, SystemTime::now())
        .await;
    assert!(
        matches!(follower, Err(ClusterError::NotYet { .. })),
        "{follower:?}"
    );
    let first = secret
        .load_or_create(&client(&api), TD, d1.path(), true, SystemTime::now())
        .await
        .unwrap();
    let rv = api
        .object("", "secrets", MESH_NS, "sockmesh-ca-root")
        .unwrap()["metadata"]["resourceVersion"]
        .clone();
    let second = secret
        .load_or_create(&client(&api), TD, d2.path(), true, SystemTime::now())
        .await
        .unwrap();
    let read = |s: &mesh_ca::RootSource, f: &str| match s {
        mesh_ca::RootSource::Plugged(dir) => std::fs::read(dir.join(f)).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(read(&first, "tls.crt"), read(&second, "tls.crt"));
    assert_eq!(read(&first, "tls.key"), read(&second, "tls.key"));
    assert_eq!(api.requests("create", "secrets"), 1);
    assert_eq!(
        api.requests("update", "secrets") + api.requests("patch", "secrets"),
        0
    );
    assert_eq!(
        api.object("", "secrets", MESH_NS, "sockmesh-ca-root")
            .unwrap()["metadata"]["resourceVersion"],
        rv
    );
    use std::os::unix::fs::PermissionsExt;
    let mesh_ca::RootSource::Plugged(dir) = &first else {
        unreachable!()
    };
    assert_eq!(
        std::fs::metadata(dir.join("tls.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // The CA signs with it.
    Ca::new(
        CaConfig::new(TD, second),
        Arc::new(mesh_ca::FileTokenAuthenticator::load(d2.path()).unwrap()),
        Arc::new(mesh_core::registry::FileRegistry::load(write_empty(d2.path())).unwrap()),
    )
    .unwrap();
}

fn write_empty(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("registry.yaml");
    std::fs::write(&p, "").unwrap();
    p
}

#[tokio::test]
async fn one_replica_leads_by_lease_and_another_takes_over_when_it_stops_renewing() {
    let api = FakeApiServer::start().await.unwrap();
    let elector = |id: &str| LeaderElection {
        client: client(&api),
        namespace: MESH_NS.into(),
        name: "sockmesh-ca".into(),
        identity: id.into(),
        lease: Duration::from_secs(1),
    };
    let (a, b) = (elector("ca-a"), elector("ca-b"));
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap());
    assert!(a.try_acquire_or_renew().await.unwrap(), "renewed");
    assert!(!b.try_acquire_or_renew().await.unwrap());
    // a stops renewing; once its lease has run out b takes over.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert!(!a.try_acquire_or_renew().await.unwrap());
    let lease = api
        .object("coordination.k8s.io", "leases", MESH_NS, "sockmesh-ca")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "ca-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // The loop form.
    let (leads, task) = elector("ca-c").run();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!*leads.borrow(), "b still holds it");
    task.abort();
}

/// A self-signed CA certificate (PEM): the second root of a rotation.
fn another_root() -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sockmesh root next");
    params.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn the_trust_bundle_configmap_holds_the_roots_only_is_kept_exact_and_follows_a_rotation() {
    use mesh_ca::cluster::{TRUST_BUNDLE_MANAGER, TrustBundleConfigMap, sync_roots};
    let api = FakeApiServer::start().await.unwrap();
    let kc = client(&api);
    let dir = tempfile::tempdir().unwrap();
    let secret = RootSecret {
        namespace: MESH_NS.into(),
        name: "sockmesh-ca-root".into(),
    };
    let bundle = TrustBundleConfigMap {
        namespace: MESH_NS.into(),
        name: "sockmesh-trust-bundle".into(),
    };
    let roots = secret
        .load_or_create(&kc, TD, dir.path(), true, SystemTime::now())
        .await
        .unwrap();
    let ca = Ca::new(
        CaConfig::new(TD, roots),
        Arc::new(mesh_ca::FileTokenAuthenticator::load(dir.path()).unwrap()),
        Arc::new(mesh_core::registry::FileRegistry::load(write_empty(dir.path())).unwrap()),
    )
    .unwrap();
    let secret_obj = || {
        api.object("", "secrets", MESH_NS, "sockmesh-ca-root")
            .unwrap()
    };
    let secret_ca_crt = |s: &serde_json::Value| {
        use base64::Engine;
        let b64 = s["data"]["ca.crt"].as_str().unwrap();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    };
    let cm = || {
        api.object("", "configmaps", MESH_NS, "sockmesh-trust-bundle")
            .unwrap()
    };

    // A follower publishes nothing.
    assert!(
        !sync_roots(&kc, &secret, &bundle, &ca, dir.path(), false)
            .await
            .unwrap()
    );
    assert!(
        api.object("", "configmaps", MESH_NS, "sockmesh-trust-bundle")
            .is_none()
    );

    // The leader creates it: exactly the Secret's ca.crt, no key material.
    assert!(
        sync_roots(&kc, &secret, &bundle, &ca, dir.path(), true)
            .await
            .unwrap()
    );
    let root_pem = secret_ca_crt(&secret_obj());
    let v = cm();
    assert_eq!(v["data"], json!({"ca.crt": root_pem}), "{v}");
    assert!(v.get("binaryData").is_none(), "{v}");
    let text = v.to_string();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let key_b64 = secret_obj()["data"]["tls.key"].as_str().unwrap().to_owned();
    assert!(!text.contains(&key_b64));
    assert_eq!(
        v["metadata"]["managedFields"][0]["manager"],
        TRUST_BUNDLE_MANAGER
    );
    assert_eq!(
        v["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "sockmesh"
    );
    assert_eq!(
        CertificateDer::pem_slice_iter(root_pem.as_bytes()).count(),
        1
    );

    // Unchanged roots: nothing written.
    let rv = v["metadata"]["resourceVersion"].clone();
    assert!(
        !sync_roots(&kc, &secret, &bundle, &ca, dir.path(), true)
            .await
            .unwrap()
    );
    assert_eq!(cm()["metadata"]["resourceVersion"], rv);
    assert_eq!(api.requests("patch", "configmaps"), 0);

    // Someone else writes into it: the next round puts the bundle back,
    // and only the bundle.
    api.patch(
        "",
        "configmaps",
        MESH_NS,
        "sockmesh-trust-bundle",
        &json!({"data": {"ca.crt": another_root(), "extra": "x"}, "binaryData": {"k": "AAAA"}}),
    )
    .unwrap();
    assert!(bundle.publish(&kc, &ca.trust_bundle()).await.unwrap());
    let v = cm();
    assert_eq!(v["data"], json!({"ca.crt": root_pem}), "{v}");
    assert!(v.get("binaryData").is_none(), "{v}");

    // Rotation, as the Secret's owner does it: the new root joins ca.crt.
    // The CA re-reads the Secret and the ConfigMap carries both roots.
    let next = another_root();
    let both = format!("{root_pem}{next}");
    {
        use base64::Engine;
        let enc = base64::engine::general_purpose::STANDARD.encode(&both);
        api.patch(
            "",
            "secrets",
            MESH_NS,
            "sockmesh-ca-root",
            &json!({"data": {"ca.crt": enc}}),
        )
        .unwrap();
    }
    assert!(
        sync_roots(&kc, &secret, &bundle, &ca, dir.path(), true)
            .await
            .unwrap()
    );
    assert_eq!(ca.trust_bundle().len(), 2, "the signer reloaded the roots");
    let published = cm()["data"]["ca.crt"].as_str().unwrap().to_owned();
    let certs: Vec<_> = CertificateDer::pem_slice_iter(published.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(certs, ca.trust_bundle());
    assert!(published.contains(next.trim()), "{published}");
    assert!(!published.contains("PRIVATE KEY"));
}
