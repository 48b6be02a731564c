//! `--token-file` is read again for every request to the CA: a projected
//! ServiceAccount token the kubelet rotates (an atomic swap of the file)
//! reaches the CA without a restart. A real CA in process on 127.0.0.1,
//! whose authenticator records what it was shown.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use mesh_ca::auth::{AuthError, AuthFuture, Authenticator, Credential};
use mesh_ca::roots::RootSource;
use mesh_ca::{Ca, CaConfig, CaServer, Caller};
use mesh_core::identity::{Identity, SystemClock};
use mesh_core::registry::FileRegistry;
use mesh_proxy::identity::{CaClientConfig, CertManager, CertManagerConfig, HttpsCaClient, Token};

const TD: &str = "cluster.local";
const REGISTRY: &str = r#"
nodes: [{name: node-1}]
pods:
  - {namespace: default, name: web-1, uid: u1, node: node-1, service_account: web}
  - {namespace: default, name: db-1, uid: u2, node: node-1, service_account: db}
  - {namespace: default, name: api-1, uid: u3, node: node-1, service_account: api}
  - {namespace: default, name: jobs-1, uid: u4, node: node-1, service_account: jobs}
"#;

/// Accepts tokens starting with `projected-` as node-1's proxy; records
/// every token it is shown.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<String>>,
}

impl Authenticator for Recorder {
    fn authenticate<'a>(&'a self, credential: &'a Credential) -> AuthFuture<'a> {
        let Credential::Bearer(token) = credential;
        self.seen.lock().unwrap().push(token.clone());
        let ok = token.starts_with("projected-");
        Box::pin(async move {
            if ok {
                Ok(Caller {
                    node: "node-1".into(),
                    principal: "system:serviceaccount:sockmesh:mesh-proxy".into(),
                })
            } else {
                Err(AuthError::UnknownToken)
            }
        })
    }
}

/// Replaces the token file atomically, as the kubelet does.
fn rotate(path: &Path, token: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa).unwrap()
}

#[tokio::test]
async fn a_rotated_token_file_reaches_the_ca_on_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("registry.yaml"), REGISTRY).unwrap();
    let recorder = Arc::new(Recorder::default());
    let ca = Ca::new(
        CaConfig::new(TD, RootSource::StateDir(dir.path().join("ca"))),
        recorder.clone(),
        Arc::new(FileRegistry::load(dir.path().join("registry.yaml")).unwrap()),
    )
    .unwrap();
    let server = CaServer::bind(ca.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let token = dir.path().join("token");
    rotate(&token, "projected-one\n");
    let anchors = ca.trust_bundle();
    let client = HttpsCaClient::new(CaClientConfig::new(
        server.local_addr(),
        "localhost",
        anchors.clone(),
        Token::File(token.clone()),
    ))
    .unwrap();
    let certs = CertManager::new(
        Arc::new(client),
        Arc::new(SystemClock),
        CertManagerConfig::new(TD),
        anchors,
    );
    let last = || recorder.seen.lock().unwrap().last().cloned();

    certs.fetch(&id("web")).await.unwrap();
    assert_eq!(last().as_deref(), Some("projected-one"), "trimmed");

    rotate(&token, "projected-two");
    certs.fetch(&id("db")).await.unwrap();
    assert_eq!(
        last().as_deref(),
        Some("projected-two"),
        "no restart needed"
    );

    // A token the CA does not accept is sent as it is, and refused there.
    rotate(&token, "expired-three");
    let e = certs.fetch(&id("api")).await.unwrap_err().to_string();
    assert_eq!(last().as_deref(), Some("expired-three"));
    assert!(e.contains("401"), "{e}");

    // A file that cannot be a token is refused here, naming the file; the
    // CA is not called.
    let before = recorder.seen.lock().unwrap().len();
    // (A new identity each time: the manager backs off per identity.)
    for (n, content, why) in [(1, "  \n", "empty"), (2, "a b", "not one token")] {
        rotate(&token, content);
        let e = certs
            .fetch(&id(&format!("other-{n}")))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("CA token file {}", token.display())) && e.contains(why),
            "{e}"
        );
    }
    std::fs::remove_file(&token).unwrap();
    let e = certs.fetch(&id("other-3")).await.unwrap_err().to_string();
    assert!(e.contains(&token.display().to_string()), "{e}");
    assert_eq!(recorder.seen.lock().unwrap().len(), before);

    rotate(&token, "projected-four");
    certs.fetch(&id("jobs")).await.unwrap();
    assert_eq!(last().as_deref(), Some("projected-four"));
}

/// `--ca HOST:PORT`: a DNS name (here `localhost`) is resolved at connect
/// and the client reaches a real CA through it; the TLS name stays the
/// configured server name.
#[tokio::test]
async fn a_ca_address_with_a_host_name_reaches_the_ca() {
    use mesh_proxy::identity::CaAddress;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("registry.yaml"), REGISTRY).unwrap();
    let ca = Ca::new(
        CaConfig::new(TD, RootSource::StateDir(dir.path().join("ca"))),
        Arc::new(Recorder::default()),
        Arc::new(FileRegistry::load(dir.path().join("registry.yaml")).unwrap()),
    )
    .unwrap();
    let server = CaServer::bind(ca.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address: CaAddress = format!("localhost:{}", server.local_addr().port())
        .parse()
        .unwrap();
    assert!(matches!(address, CaAddress::Host { .. }), "{address:?}");
    let anchors = ca.trust_bundle();
    let manager = |address: CaAddress| {
        let client = HttpsCaClient::new(CaClientConfig::new(
            address,
            "localhost",
            anchors.clone(),
            Token::Value("projected-by-name".into()),
        ))
        .unwrap();
        CertManager::new(
            Arc::new(client),
            Arc::new(SystemClock),
            CertManagerConfig::new(TD),
            anchors.clone(),
        )
    };
    let cert = manager(address.clone()).fetch(&id("web")).await.unwrap();
    assert_eq!(cert.identity, id("web"));

    // Once the CA is gone, the error names the address as given.
    server.shutdown().await;
    let e = manager(address)
        .fetch(&id("db"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("CA localhost:"), "{e}");
    assert!(e.contains("connect: localhost resolves to"), "{e}");
}
