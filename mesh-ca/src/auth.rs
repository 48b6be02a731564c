//! Who is asking: authenticating the node proxy that calls the CA.
//!
//! One trait, [`Authenticator`], two designs:
//!
//! - **Local mesh** ([`FileTokenAuthenticator`], here): `mesh up` creates one
//!   random token per node ([`create_node_token`]), a file of mode 0600 in a
//!   0700 directory; the node proxy sends it as `Authorization: Bearer`. The
//!   CA compares it in constant time with every node's token.
//! - **Kubernetes** ([`TokenReviewAuthenticator`], here): the node proxy
//!   sends its projected service-account token, minted for the dedicated
//!   audience [`CA_AUDIENCE`]. The CA posts a `TokenReview` with
//!   `spec.audiences: ["sockmesh-ca"]` and accepts only if the review is
//!   authenticated, its `status.audiences` contains `sockmesh-ca` (never an
//!   audience-less fallback), the user is one of the proxy's service
//!   accounts (`system:serviceaccount:<mesh ns>:mesh-proxy`), and the token
//!   is bound to a pod (`status.user.extra["authentication.kubernetes.io/pod-name"]`
//!   and `pod-uid`). The node is that pod's `spec.nodeName`, read from the
//!   API (the pod must still exist with that uid); a `node-name` in the
//!   token's extra, when present, must agree. The result is the same
//!   [`Caller`]. Every refusal names its cause here (the CA log); the
//!   caller only ever sees an opaque 401.

use std::fmt;
use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use base64::Engine;
#[cfg(feature = "kubernetes")]
use mesh_core::display;
use mesh_core::display::Shown;
use rand::RngCore;
use subtle::ConstantTimeEq;

/// File name suffix of node token files: `<dir>/<node>.token`.
pub const TOKEN_SUFFIX: &str = ".token";

/// What the caller presented.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Bearer(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// An authenticated node proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node the proxy runs on: the CA signs only for pods of this node.
    pub node: String,
    /// Who the caller is, for logs (`node-token:<node>`, or a service account).
    pub principal: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token matches no node")]
    UnknownToken,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:o} lets others read the token; it must be 0600")]
    Permissions { path: PathBuf, mode: u32 },
    /// The name as shown: quoted, escaped once, bounded.
    #[error("node name {0} is not a DNS-1123 subdomain")]
    BadNodeName(Shown),
    #[error("{path}: token is empty or not base64url")]
    BadToken { path: PathBuf },
    /// The API server said no; its reason, control characters escaped, bounded.
    #[error("token review: not authenticated: {0}")]
    TokenRejected(String),
    /// Audiences quoted, escaped once, bounded.
    #[error("token review: the token is not for audience {want}, only for {got}")]
    WrongAudience { want: String, got: String },
    #[error("token review: {user} is not a node proxy service account (allowed: {allowed})")]
    NotProxy { user: String, allowed: String },
    #[error(
        "token review: {user}'s token is not bound to a pod (mount a projected service account token)"
    )]
    NotBound { user: String },
    #[error("token review: bound pod {pod}: {reason}")]
    BoundPod { pod: Shown, reason: String },
    #[error("token review: {0}")]
    Api(String),
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;

/// Authenticates a caller of the CA.
pub trait Authenticator: Send + Sync + fmt::Debug {
    fn authenticate<'a>(&'a self, credential: &'a Credential) -> AuthFuture<'a>;
}

/// Per-node tokens read from a directory of `<node>.token` files.
pub struct FileTokenAuthenticator {
    dir: PathBuf,
    tokens: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for FileTokenAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTokenAuthenticator")
            .field("dir", &self.dir)
            .field(
                "nodes",
                &self.tokens.iter().map(|t| &t.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl FileTokenAuthenticator {
    /// Reads every `<node>.token` in `dir`. Refuses files others can read.
    pub fn load(dir: impl Into<PathBuf>) -> Result<Self, AuthError> {
        let dir = dir.into();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| AuthError::Io { path, source }
        };
        let mut tokens = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name();
            let Some(node) = name.to_str().and_then(|n| n.strip_suffix(TOKEN_SUFFIX)) else {
                continue;
            };
            let node = node.to_owned();
            let path = entry.path();
            let token = read_node_token(&path)?;
            tokens.push((node, token.into_bytes()));
        }
        tokens.sort();
        Ok(FileTokenAuthenticator { dir, tokens })
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(|(n, _)| n.as_str())
    }

    fn check(&self, presented: &[u8]) -> Result<Caller, AuthError> {
        // Compare with every token, without stopping at a match.
        let mut found: Option<&str> = None;
        for (node, token) in &self.tokens {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(node);
            }
        }
        let node = found.ok_or(AuthError::UnknownToken)?;
        Ok(Caller {
            node: node.to_owned(),
            principal: format!("node-token:{node}"),
        })
    }
}

impl Authenticator for FileTokenAuthenticator {
    fn authenticate<'a>(&'a self, credential: &'a Credential) -> AuthFuture<'a> {
        Box::pin(async move {
            match credential {
                Credential::Bearer(token) => self.check(token.as_bytes()),
            }
        })
    }
}

/// The audience node proxies mint their service-account token for.
pub const CA_AUDIENCE: &str = "sockmesh-ca";

#[cfg(feature = "kubernetes")]
/// Kubernetes: node proxies authenticated by TokenReview of their projected
/// service-account token (see the module documentation).
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audience: String,
    /// `system:serviceaccount:<ns>:<name>` of the node proxies.
    proxies: Vec<String>,
}

#[cfg(feature = "kubernetes")]
impl fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("proxies", &self.proxies)
            .finish_non_exhaustive()
    }
}

/// Bounds on what the API server's answers put in a log line.
#[cfg(feature = "kubernetes")]
const REASON_BYTES: usize = 512;
#[cfg(feature = "kubernetes")]
const NAME_CHARS: usize = 320;

#[cfg(feature = "kubernetes")]
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
#[cfg(feature = "kubernetes")]
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
#[cfg(feature = "kubernetes")]
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

#[cfg(feature = "kubernetes")]
impl TokenReviewAuthenticator {
    /// `proxies`: the node proxies' service accounts, `(namespace, name)`.
    pub fn new(client: kube::Client, audience: &str, proxies: &[(String, String)]) -> Self {
        TokenReviewAuthenticator {
            client,
            audience: audience.to_owned(),
            proxies: proxies
                .iter()
                .map(|(ns, sa)| format!("system:serviceaccount:{ns}:{sa}"))
                .collect(),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        use k8s_openapi::api::core::v1::Pod;
        if token.is_empty() {
            return Err(AuthError::TokenRejected("empty token".into()));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviews: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let done = reviews
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Api(format!("posting the TokenReview: {e}")))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".into());
            return Err(AuthError::TokenRejected(display::text(&why, REASON_BYTES)));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(AuthError::WrongAudience {
                want: display::bounded(&self.audience, NAME_CHARS),
                got: display::bounded(&audiences.join(","), NAME_CHARS),
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if !self.proxies.contains(&username) {
            return Err(AuthError::NotProxy {
                user: display::bounded(&username, NAME_CHARS),
                allowed: self.proxies.join(", "),
            });
        }
        let namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, _)| ns.to_owned())
            .unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
            return Err(AuthError::NotBound {
                user: display::bounded(&username, NAME_CHARS),
            });
        };
        let shown = Shown::new(&format!("{namespace}/{pod_name}"));
        let bound = |reason: String| AuthError::BoundPod {
            pod: shown.clone(),
            reason,
        };
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &namespace);
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| bound(format!("reading it: {e}")))?
            .ok_or_else(|| bound("no longer exists".into()))?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(bound(format!(
                "uid {} is not the token's {pod_uid} (the pod was replaced)",
                pod.metadata.uid.unwrap_or_default()
            )));
        }
        let node = pod
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bound("not scheduled on a node".into()))?;
        if let Some(claimed) = one(EXTRA_NODE_NAME)
            && claimed != node
        {
            return Err(bound(format!(
                "runs on node {node}, the token says {}",
                Shown::new(&claimed)
            )));
        }
        Ok(Caller {
            node,
            principal: format!("{username} (pod {namespace}/{pod_name})"),
        })
    }
}

#[cfg(feature = "kubernetes")]
impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, credential: &'a Credential) -> AuthFuture<'a> {
        Box::pin(async move {
            match credential {
                Credential::Bearer(token) => self.review(token).await,
            }
        })
    }
}

/// Creates (or replaces) the token of `node` in `dir`: 32 random bytes,
/// base64url, in `<dir>/<node>.token`, mode 0600 (the directory 0700).
/// Returns the token.
pub fn create_node_token(dir: &Path, node: &str) -> Result<String, AuthError> {
    if mesh_core::identity::validate_service_account(node).is_err() {
        return Err(AuthError::BadNodeName(Shown::new(node)));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AuthError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let path = node_token_path(dir, node);
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(token.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(token)
}

/// Where the token of `node` lives in `dir`.
pub fn node_token_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}{TOKEN_SUFFIX}"))
}

/// Reads a token file, refusing one that group or others can read.
pub fn read_node_token(path: &Path) -> Result<String, AuthError> {
    let io = |source| AuthError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io)?;
    let token = text.trim();
    let valid = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(AuthError::BadToken {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_authenticate_their_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("tokens");
        let t1 = create_node_token(&d, "node-1").unwrap();
        let t2 = create_node_token(&d, "node-2").unwrap();
        assert_ne!(t1, t2);
        let mode = fs::metadata(node_token_path(&d, "node-1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let auth = FileTokenAuthenticator::load(&d).unwrap();
        let caller = auth
            .authenticate(&Credential::Bearer(t2.clone()))
            .await
            .unwrap();
        assert_eq!(caller.node, "node-2");
        let wrong = auth
            .authenticate(&Credential::Bearer(format!("{t1}x")))
            .await;
        assert!(matches!(wrong, Err(AuthError::UnknownToken)));
        let empty = auth.authenticate(&Credential::Bearer(String::new())).await;
        assert!(matches!(empty, Err(AuthError::UnknownToken)));
        assert!(!format!("{:?}", Credential::Bearer(t1)).contains(&t2));

        assert!(matches!(
            create_node_token(&d, "../x"),
            Err(AuthError::BadNodeName(_))
        ));
    }

    #[test]
    fn a_hostile_node_name_is_shown_once_escaped_once_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let name: String = (0..10 * 1024)
            .map(|i| char::from(1 + (i % 31) as u8))
            .collect();
        let msg = create_node_token(dir.path(), &name)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("node name \"\\u{1}\\u{2}"), "{msg}");
        assert!(
            msg.ends_with("… (10240 bytes)\" is not a DNS-1123 subdomain"),
            "{msg}"
        );
        let max = 64 + mesh_core::display::bounded_len(mesh_core::display::MAX_SHOWN_CHARS);
        assert_eq!(mesh_core::display::check_message(&msg, max, 0), Ok(()));
        assert!(!msg.contains("\\\\"), "escaped twice: {msg}");
    }

    #[test]
    fn readable_token_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        create_node_token(dir.path(), "node-1").unwrap();
        let path = node_token_path(dir.path(), "node-1");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = FileTokenAuthenticator::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("node-1.token") && err.contains("644"), "{err}");
    }
}
