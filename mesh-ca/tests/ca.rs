//! The CA over its real HTTPS endpoint: issued certificates checked by
//! openssl and x509-parser, every refusal, restart, rotation, plugged roots.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_ca::roots::RootSource;
use mesh_ca::{Ca, CaConfig, CaServer, FileTokenAuthenticator, auth};
use mesh_core::ca::{SignRequest, SignResponse, TrustBundleResponse};
use mesh_core::identity::Identity;
use mesh_core::registry::FileRegistry;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::{GeneralName, ParsedExtension};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(20);

const REGISTRY: &str = r#"
nodes:
  - name: node-1
  - name: node-2
pods:
  - {namespace: default, name: web-1, uid: u1, node: node-1, service_account: web, ips: [10.0.1.2]}
  - {namespace: default, name: db-1, uid: u2, node: node-2, service_account: db, ips: [10.0.2.2]}
"#;

struct Mesh {
    dir: tempfile::TempDir,
    tokens: Vec<String>,
}

impl Mesh {
    fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("registry.yaml"), REGISTRY).unwrap();
        let tokens = ["node-1", "node-2"]
            .iter()
            .map(|n| auth::create_node_token(&dir.path().join("tokens"), n).unwrap())
            .collect();
        Mesh { dir, tokens }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn ca_with(&self, roots: RootSource) -> Ca {
        Ca::new(
            CaConfig::new(TD, roots),
            Arc::new(FileTokenAuthenticator::load(self.dir.path().join("tokens")).unwrap()),
            Arc::new(FileRegistry::load(self.dir.path().join("registry.yaml")).unwrap()),
        )
        .unwrap()
    }

    fn ca(&self) -> Ca {
        self.ca_with(RootSource::StateDir(self.state()))
    }
}

async fn start(ca: &Ca) -> CaServer {
    CaServer::bind(ca.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// One HTTPS request, trusting `roots`. Returns (status, body).
async fn call(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>)> {
    tokio::time::timeout(WAIT, async {
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(roots.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into()?, tcp)
            .await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok((status, body))
    })
    .await
    .context("request timed out")?
}

fn csr(identity: &str, extra: Vec<SanType>, key: &KeyPair) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    params.subject_alt_names.extend(extra);
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn sign_body(identity: &str, csr: String, ttl: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&SignRequest {
        identity: Identity::parse(identity).unwrap(),
        csr,
        ttl_seconds: ttl,
    })
    .unwrap()
}

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

fn openssl() -> &'static str {
    let path = "/usr/bin/openssl";
    assert!(
        Path::new(path).exists(),
        "{path} is missing: these tests check certificates with a real verifier; install openssl"
    );
    path
}

fn run_openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new(openssl()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

async fn sign_ok(
    server: &CaServer,
    roots: &[CertificateDer<'static>],
    token: &str,
    id: &str,
    csr: String,
) -> SignResponse {
    let (status, body) = call(
        server.local_addr(),
        roots,
        "POST",
        "/v1/sign",
        Some(token),
        sign_body(id, csr, None),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn ders(pems: &[String]) -> Vec<CertificateDer<'static>> {
    pems.iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
        .collect()
}

#[tokio::test]
async fn issued_certificates_follow_the_spiffe_rules_per_openssl_and_x509_parser() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let server = start(&ca).await;
    let roots = ca.trust_bundle();
    let tmp = mesh.dir.path();

    for (alg, name) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, "p256"),
        (&rcgen::PKCS_ECDSA_P384_SHA384, "p384"),
        (&rcgen::PKCS_ED25519, "ed25519"),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let before = SystemTime::now();
        let resp = sign_ok(
            &server,
            &roots,
            &mesh.tokens[0],
            WEB,
            csr(WEB, vec![], &key),
        )
        .await;
        assert_eq!(resp.certificate_chain.len(), 1, "root-signed: leaf only");
        assert_eq!(resp.trust_bundle, ca.trust_bundle_pem());
        let leaf = write(tmp, &format!("{name}.pem"), &resp.certificate_chain[0]);
        let bundle = write(tmp, "bundle.pem", &resp.trust_bundle.concat());

        // A real verifier accepts it, for both TLS purposes.
        for purpose in ["sslserver", "sslclient"] {
            let (ok, out) =
                run_openssl(&["verify", "-purpose", purpose, "-CAfile", &bundle, &leaf]);
            assert!(ok && out.contains(": OK"), "{name} {purpose}: {out}");
        }
        let (ok, text) = run_openssl(&["x509", "-in", &leaf, "-noout", "-text"]);
        assert!(ok, "{text}");
        for want in [
            "X509v3 Subject Alternative Name: critical",
            &format!("URI:{WEB}"),
            "X509v3 Basic Constraints: critical",
            "CA:FALSE",
            "X509v3 Key Usage: critical",
            "Digital Signature",
            "TLS Web Server Authentication, TLS Web Client Authentication",
        ] {
            assert!(
                text.contains(want),
                "{name}: openssl x509 -text lacks {want:?}:\n{text}"
            );
        }
        assert!(!text.contains("DNS:"), "{text}");
        assert!(!text.contains("Key Encipherment"), "{name}: {text}");

        // In-process: x509-parser agrees.
        let der = CertificateDer::from_pem_slice(resp.certificate_chain[0].as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let mut uris = vec![];
        let mut other_sans = 0;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for n in &san.general_names {
                        match n {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            _ => other_sans += 1,
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
                ParsedExtension::KeyUsage(ku) => {
                    assert!(ext.critical);
                    assert!(
                        ku.digital_signature() && !ku.key_cert_sign() && !ku.key_encipherment()
                    );
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    assert!(eku.server_auth && eku.client_auth)
                }
                _ => {}
            }
        }
        assert_eq!(uris, vec![WEB.to_string()]);
        assert_eq!(other_sans, 0);
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        let now = before
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (now - 305..=now - 295).contains(&nb),
            "NotBefore backdated ~5 min"
        );
        assert_eq!(na - nb, 24 * 3600 + 300, "24h TTL by default");
        assert_eq!(resp.not_after as i64, na);
        assert_eq!(
            format!("{:x}", cert.serial),
            resp.serial.trim_start_matches('0')
        );
    }

    // An RSA CSR made by openssl: accepted, and keyEncipherment is added.
    let key_path = tmp.join("rsa.key");
    let csr_path = tmp.join("rsa.csr");
    let (ok, out) = run_openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=ignored",
        "-keyout",
        key_path.to_str().unwrap(),
        "-out",
        csr_path.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let rsa_csr = std::fs::read_to_string(&csr_path).unwrap();
    let resp = sign_ok(&server, &roots, &mesh.tokens[0], WEB, rsa_csr).await;
    let leaf = write(tmp, "rsa.pem", &resp.certificate_chain[0]);
    let bundle = write(tmp, "bundle.pem", &resp.trust_bundle.concat());
    let (ok, out) = run_openssl(&["verify", "-CAfile", &bundle, &leaf]);
    assert!(ok, "{out}");
    let (_, text) = run_openssl(&["x509", "-in", &leaf, "-noout", "-text"]);
    assert!(
        text.contains("Digital Signature, Key Encipherment"),
        "{text}"
    );
    assert!(
        !text.contains("ignored"),
        "subject of the CSR is not copied: {text}"
    );

    // Trust bundle endpoint.
    let (status, body) = call(
        server.local_addr(),
        &roots,
        "GET",
        "/v1/trust-bundle",
        None,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let tb: TrustBundleResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(tb.trust_domain, TD);
    assert_eq!(tb.roots, ca.trust_bundle_pem());

    // Metrics.
    let (status, body) = call(server.local_addr(), &roots, "GET", "/metrics", None, vec![])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("sockmesh_ca_certificates_issued_total 4"),
        "{text}"
    );
    assert!(
        text.contains("sockmesh_ca_signing_duration_seconds_count 4"),
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn refusals_have_a_clear_status_an_opaque_body_and_no_certificate() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let server = start(&ca).await;
    let roots = ca.trust_bundle();
    let key = KeyPair::generate().unwrap();
    let good_csr = csr(WEB, vec![], &key);
    let node1 = mesh.tokens[0].as_str();

    let mut tampered =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(good_csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
    let n = tampered.len();
    tampered[n - 4] ^= 0x5a;
    let tampered_pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64_encode(&tampered)
    );
    let extra_san = csr(
        WEB,
        vec![SanType::DnsName("web.default.svc".try_into().unwrap())],
        &key,
    );
    let other_uri = {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(DB.try_into().unwrap())];
        p.serialize_request(&key).unwrap().pem().unwrap()
    };

    // (what, token, body, status, public text, reason counted)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no token",
            None,
            sign_body(WEB, good_csr.clone(), None),
            401,
            "request refused",
            "missing_credentials",
        ),
        (
            "wrong token",
            Some("not-a-token"),
            sign_body(WEB, good_csr.clone(), None),
            401,
            "request refused",
            "unauthenticated",
        ),
        (
            "pod on another node",
            Some(node1),
            sign_body(DB, csr(DB, vec![], &key), None),
            403,
            "request refused",
            "not_on_node",
        ),
        (
            "other trust domain",
            Some(node1),
            sign_body(
                "spiffe://evil.local/ns/default/sa/web",
                csr("spiffe://evil.local/ns/default/sa/web", vec![], &key),
                None,
            ),
            403,
            "request refused",
            "wrong_trust_domain",
        ),
        (
            "CSR with an extra SAN",
            Some(node1),
            sign_body(WEB, extra_san, None),
            403,
            "request refused",
            "csr_not_allowed",
        ),
        (
            "CSR for another URI",
            Some(node1),
            sign_body(WEB, other_uri, None),
            403,
            "request refused",
            "csr_not_allowed",
        ),
        (
            "bad CSR signature",
            Some(node1),
            sign_body(WEB, tampered_pem, None),
            400,
            "bad request",
            "bad_csr_signature",
        ),
        (
            "malformed PEM",
            Some(node1),
            sign_body(
                WEB,
                "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n".into(),
                None,
            ),
            400,
            "bad request",
            "malformed_csr",
        ),
        (
            "malformed JSON",
            Some(node1),
            b"{\"identity\":".to_vec(),
            400,
            "bad request",
            "malformed_request",
        ),
        (
            "TTL over the cap",
            Some(node1),
            sign_body(WEB, good_csr.clone(), Some(49 * 3600)),
            400,
            "bad request",
            "ttl_over_cap",
        ),
        (
            "oversize body",
            Some(node1),
            vec![b' '; 64 * 1024],
            413,
            "request too large",
            "body_too_large",
        ),
    ];
    for (what, token, body, want_status, want_text, reason) in cases {
        let before = ca.metrics().refused_total(reason);
        let (status, resp) = call(server.local_addr(), &roots, "POST", "/v1/sign", token, body)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert_eq!(status, want_status, "{what}: {text}");
        assert_eq!(
            text,
            format!("{{\"error\":\"{want_text}\"}}"),
            "{what}: opaque body"
        );
        assert!(!text.contains("CERTIFICATE"), "{what}");
        assert_eq!(
            ca.metrics().refused_total(reason),
            before + 1,
            "{what}: counted as {reason}"
        );
    }
    assert_eq!(ca.metrics().issued_total(), 0);

    // The same node's own identity, with a TTL under the cap, is fine.
    let (status, _) = call(
        server.local_addr(),
        &roots,
        "POST",
        "/v1/sign",
        Some(node1),
        sign_body(WEB, good_csr, Some(3600)),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // And node-2 may have db.
    let (status, _) = call(
        server.local_addr(),
        &roots,
        "POST",
        "/v1/sign",
        Some(&mesh.tokens[1]),
        sign_body(DB, csr(DB, vec![], &key), None),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (status, _) = call(
        server.local_addr(),
        &roots,
        "GET",
        "/v1/sign",
        Some(node1),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 405);
    let text = ca.metrics().render();
    assert!(
        text.contains("sockmesh_ca_requests_refused_total{reason=\"not_on_node\"} 1"),
        "{text}"
    );
    server.shutdown().await;
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn restart_keeps_the_root_and_key_files_are_private() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let first = ca.trust_bundle();
    let server = start(&ca).await;
    let addr = server.local_addr();
    server.shutdown().await;
    drop(ca);

    let ca = mesh.ca();
    assert_eq!(ca.trust_bundle(), first, "same root after restart");
    // Same address again, certificates from the same root.
    let server = CaServer::bind(ca.clone(), addr).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let resp = sign_ok(
        &server,
        &first,
        &mesh.tokens[0],
        WEB,
        csr(WEB, vec![], &key),
    )
    .await;
    assert_eq!(ders(&resp.trust_bundle), first);
    server.shutdown().await;

    let mut keys = 0;
    for entry in walk(&mesh.state()) {
        if entry.file_name().is_some_and(|n| n == "key.pem") {
            keys += 1;
            let mode = std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", entry.display());
        }
    }
    assert_eq!(keys, 1);
    assert_eq!(
        std::fs::metadata(mesh.state())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let file = std::fs::read(mesh.state().join("trust-bundle.pem")).unwrap();
    assert_eq!(
        CertificateDer::pem_slice_iter(&file)
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        first
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn root_rotation_keeps_old_and_new_trusted_during_the_overlap() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    let server = start(&ca).await;
    let tmp = mesh.dir.path();
    let key = KeyPair::generate().unwrap();
    let old_root = ca.trust_bundle();
    assert_eq!(old_root.len(), 1);
    let old_leaf = sign_ok(
        &server,
        &old_root,
        &mesh.tokens[0],
        WEB,
        csr(WEB, vec![], &key),
    )
    .await;
    let old_leaf = write(tmp, "old.pem", &old_leaf.certificate_chain[0]);

    // 1: new root trusted, old one still signs.
    ca.prepare_root_rotation().unwrap();
    let overlap = ca.trust_bundle();
    assert_eq!(overlap.len(), 2);
    assert_eq!(overlap[0], old_root[0], "active root first");
    let mid = sign_ok(
        &server,
        &old_root,
        &mesh.tokens[0],
        WEB,
        csr(WEB, vec![], &key),
    )
    .await;
    let (ok, out) = run_openssl(&[
        "verify",
        "-CAfile",
        &write(tmp, "old-root.pem", &mesh_ca::roots::bundle_pem(&old_root)),
        &write(tmp, "mid.pem", &mid.certificate_chain[0]),
    ]);
    assert!(ok, "still signed by the old root: {out}");

    // 2: new root signs; the CA's own TLS cert moves too (a client that
    // trusts only the old root can no longer reach it).
    ca.activate_next_root().unwrap();
    assert!(
        call(
            server.local_addr(),
            &old_root,
            "GET",
            "/v1/trust-bundle",
            None,
            vec![]
        )
        .await
        .is_err()
    );
    let new_leaf = sign_ok(
        &server,
        &overlap,
        &mesh.tokens[0],
        WEB,
        csr(WEB, vec![], &key),
    )
    .await;
    assert_eq!(ders(&new_leaf.trust_bundle).len(), 2);
    let new_leaf = write(tmp, "new.pem", &new_leaf.certificate_chain[0]);
    let both = write(
        tmp,
        "both.pem",
        &mesh_ca::roots::bundle_pem(&ca.trust_bundle()),
    );
    for leaf in [&old_leaf, &new_leaf] {
        let (ok, out) = run_openssl(&["verify", "-CAfile", &both, leaf]);
        assert!(ok, "both roots trusted during the overlap: {out}");
    }

    // A restart in the middle of a rotation keeps its phase.
    server.shutdown().await;
    let ca = mesh.ca();
    assert_eq!(ca.trust_bundle().len(), 2);
    let server = start(&ca).await;

    // 3: old root retired.
    ca.retire_previous_roots().unwrap();
    let new_only = ca.trust_bundle();
    assert_eq!(new_only.len(), 1);
    assert_ne!(new_only[0], old_root[0]);
    let new_file = write(tmp, "new-root.pem", &mesh_ca::roots::bundle_pem(&new_only));
    let (ok, _) = run_openssl(&["verify", "-CAfile", &new_file, &new_leaf]);
    assert!(ok);
    let (ok, _) = run_openssl(&["verify", "-CAfile", &new_file, &old_leaf]);
    assert!(!ok, "a certificate of the retired root no longer verifies");
    let (status, _) = call(
        server.local_addr(),
        &new_only,
        "GET",
        "/v1/trust-bundle",
        None,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn rotation_steps_from_the_binary_are_picked_up_by_a_running_ca() {
    let mesh = Mesh::new();
    let ca = mesh.ca();
    assert!(!ca.reload_roots_if_changed().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-ca"))
        .args([
            "root",
            "--state-dir",
            mesh.state().to_str().unwrap(),
            "--trust-domain",
            TD,
            "prepare",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"next\""));
    assert!(ca.reload_roots_if_changed().unwrap());
    assert_eq!(ca.trust_bundle().len(), 2);
}

/// A CA made with openssl (root -> intermediate, SEC1 key), in the layout
/// cert-manager writes.
#[tokio::test]
async fn plugged_intermediate_in_cert_manager_layout() {
    let mesh = Mesh::new();
    let dir = mesh.dir.path().join("plugged");
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| dir.join(n).display().to_string();
    let ext = write(
        &dir,
        "ext.cnf",
        "[v3_ca]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    );
    let steps: Vec<Vec<String>> = vec![
        vec![
            "ecparam".into(),
            "-name".into(),
            "prime256v1".into(),
            "-genkey".into(),
            "-noout".into(),
            "-out".into(),
            p("root.key"),
        ],
        vec![
            "req".into(),
            "-x509".into(),
            "-new".into(),
            "-key".into(),
            p("root.key"),
            "-subj".into(),
            "/O=corp/CN=corp root".into(),
            "-days".into(),
            "30".into(),
            "-out".into(),
            p("ca.crt"),
        ],
        vec![
            "ecparam".into(),
            "-name".into(),
            "prime256v1".into(),
            "-genkey".into(),
            "-noout".into(),
            "-out".into(),
            p("tls.key"),
        ],
        vec![
            "req".into(),
            "-new".into(),
            "-key".into(),
            p("tls.key"),
            "-subj".into(),
            "/O=corp/CN=mesh intermediate".into(),
            "-out".into(),
            p("int.csr"),
        ],
        vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            p("int.csr"),
            "-CA".into(),
            p("ca.crt"),
            "-CAkey".into(),
            p("root.key"),
            "-CAcreateserial".into(),
            "-days".into(),
            "20".into(),
            "-extfile".into(),
            ext.clone(),
            "-extensions".into(),
            "v3_ca".into(),
            "-out".into(),
            p("tls.crt"),
        ],
    ];
    for args in steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = run_openssl(&args);
        assert!(ok, "openssl {args:?}: {out}");
    }
    assert!(
        std::fs::read_to_string(p("tls.key"))
            .unwrap()
            .contains("EC PRIVATE KEY"),
        "SEC1 key"
    );

    let ca = mesh.ca_with(RootSource::Plugged(dir.clone()));
    let server = start(&ca).await;
    let roots = ca.trust_bundle();
    assert_eq!(roots.len(), 1);
    let key = KeyPair::generate().unwrap();
    let resp = sign_ok(
        &server,
        &roots,
        &mesh.tokens[0],
        WEB,
        csr(WEB, vec![], &key),
    )
    .await;
    assert_eq!(resp.certificate_chain.len(), 2, "leaf and intermediate");
    let leaf = write(&dir, "leaf.pem", &resp.certificate_chain[0]);
    let int = write(&dir, "int.pem", &resp.certificate_chain[1]);
    let (ok, out) = run_openssl(&["verify", "-CAfile", &p("ca.crt"), "-untrusted", &int, &leaf]);
    assert!(ok, "{out}");
    server.shutdown().await;

    // Rotation is not ours with a plugged CA.
    assert!(ca.prepare_root_rotation().is_err());
    // A key that does not match tls.crt is refused, naming the file.
    std::fs::copy(p("root.key"), p("tls.key")).unwrap();
    let err = Ca::new(
        CaConfig::new(TD, RootSource::Plugged(dir.clone())),
        Arc::new(FileTokenAuthenticator::load(mesh.dir.path().join("tokens")).unwrap()),
        Arc::new(FileRegistry::load(mesh.dir.path().join("registry.yaml")).unwrap()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tls.key") && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn binary_help_teaches_and_bad_values_are_named_before_binding() -> Result<()> {
    let bin = env!("CARGO_BIN_EXE_mesh-ca");
    let out = Command::new(bin).arg("--help").output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("Examples:") && help.contains("mesh-ca --trust-domain"),
        "{help}"
    );

    let mesh = Mesh::new();
    let registry = mesh.dir.path().join("registry.yaml");
    let state = mesh.state();
    let tokens = mesh.dir.path().join("tokens");
    let base = |extra: &[&str]| -> Result<(bool, String)> {
        let mut args = vec![
            ("--trust-domain", TD),
            ("--state-dir", state.to_str().unwrap()),
            ("--tokens-dir", tokens.to_str().unwrap()),
            ("--registry", registry.to_str().unwrap()),
            ("--listen", "127.0.0.1:0"),
        ];
        for pair in extra.chunks(2) {
            args.retain(|(k, _)| *k != pair[0]);
            args.push((pair[0], pair[1]));
        }
        let flat: Vec<&str> = args.iter().flat_map(|(k, v)| [*k, *v]).collect();
        let out = Command::new(bin).args(&flat).output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let cases: [(&[&str], &str); 8] = [
        (&["--trust-domain", "Bad_TD"], "Bad_TD"),
        (&["--max-ttl", "90d"], "max TTL"),
        (&["--default-ttl", "5x"], "\"5x\""),
        (&["--listen", "nowhere:1"], "nowhere:1"),
        (
            &["--registry", "/nonexistent/registry.yaml"],
            "/nonexistent/registry.yaml",
        ),
        (&["--handshake-timeout", "90s"], "handshake timeout 90s"),
        (&["--max-connections", "0"], "max connections 0"),
        (
            &[
                "--max-connections",
                "10",
                "--max-connections-per-peer",
                "20",
            ],
            "max connections per peer 20: over max connections 10",
        ),
    ];
    for (extra, want) in cases {
        let (ok, err) = base(extra)?;
        if ok {
            bail!("{extra:?} was accepted");
        }
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    Ok(())
}
