#![forbid(unsafe_code)]
//! A small Kubernetes API server for tests, in process, over plain HTTP/1.1
//! on loopback: the subset kube-rs (client, runtime watcher, discovery) and
//! kubectl use. Objects are JSON, with real `resourceVersion` semantics (one
//! global counter, watch replay from a version, `410 Gone` past a kept
//! window), label and field selectors, server-side apply with managed
//! fields, TokenReview of tokens the test registers, and hooks to break
//! things on purpose: cut every watch, expire the next one, go away.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let api = kube_fake::FakeApiServer::start().await?;
//! let url = api.url(); // http://127.0.0.1:<port>, a kube-rs cluster URL
//! api.cut_watches();
//! api.go_away(std::time::Duration::from_secs(3));
//! # Ok(()) }
//! ```
//!
//! Every difference from a real API server is listed in ARCHITECTURE.md,
//! "The fake API server".

pub mod discovery;
pub mod select;
mod server;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::{broadcast, watch};

pub use store::{ApiError, Event, EventType};

/// A service-account token the fake's TokenReview accepts.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    /// The audiences the token was minted for.
    pub audiences: Vec<String>,
    /// The pod the token is bound to: (name, uid). TokenReview fails once
    /// that pod is gone or has another uid, as for a real bound token.
    pub pod: Option<(String, String)>,
    /// The node of the bound pod: (name, uid).
    pub node: Option<(String, String)>,
    pub expires: SystemTime,
}

/// Options of [`FakeApiServer::start_with`].
#[derive(Debug, Clone)]
pub struct Options {
    pub addr: SocketAddr,
    /// How many events are kept for watch replay; older versions get 410.
    pub window: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            window: 10_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Default)]
struct Hooks {
    /// Watches started from now on answer 410 Gone (this many of them).
    expire_watches: usize,
    /// (verb, resource) pairs answered 403 Forbidden, as RBAC would.
    denied: Vec<(String, String)>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Mutex<store::Store>,
    pub(crate) events: broadcast::Sender<Arc<Event>>,
    /// Bumped to end every open watch mid-stream.
    pub(crate) cut: watch::Sender<u64>,
    /// Bumped to drop every connection (go away).
    pub(crate) kill: watch::Sender<u64>,
    /// Whether the listener is up.
    pub(crate) up: watch::Sender<bool>,
    hooks: Mutex<Hooks>,
    pub(crate) tokens: Mutex<HashMap<String, TokenSpec>>,
    counts: Mutex<BTreeMap<(String, String), u64>>,
    pub(crate) options: Options,
}

impl Shared {
    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, store::Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn count(&self, verb: &str, resource: &str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((verb.to_owned(), resource.to_owned()))
            .or_default() += 1;
    }

    pub(crate) fn take_expired_watch(&self) -> bool {
        let mut h = self.hooks.lock().unwrap_or_else(PoisonError::into_inner);
        if h.expire_watches > 0 {
            h.expire_watches -= 1;
            true
        } else {
            false
        }
    }

    /// Whether `verb` on `resource` is refused (see [`FakeApiServer::deny`]).
    pub(crate) fn denied(&self, verb: &str, resource: &str) -> bool {
        self.hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .denied
            .iter()
            .any(|(v, r)| (v == verb || v == "*") && (r == resource || r == "*"))
    }

    pub(crate) fn publish(&self, ev: Option<Arc<Event>>) {
        if let Some(ev) = ev {
            // No receiver is fine: nobody watches.
            let _ = self.events.send(ev);
        }
    }
}

/// A running fake API server. Dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.kill.send_modify(|g| *g += 1);
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 on a free port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(options.addr).await?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(store::Store::new(options.window)),
            events,
            cut: watch::channel(0).0,
            kill: watch::channel(0).0,
            up: watch::channel(true).0,
            hooks: Mutex::new(Hooks::default()),
            tokens: Mutex::new(HashMap::new()),
            counts: Mutex::new(BTreeMap::new()),
            options,
        });
        let task = tokio::spawn(server::serve(shared.clone(), listener, addr));
        Ok(FakeApiServer { shared, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for kubectl (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: {}}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: default}}\ncurrent-context: fake\n",
            self.url()
        )
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Ends every open watch mid-stream (the connection is dropped without
    /// the chunked terminator, as when a load balancer or the server dies).
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// The next `n` watch requests get `410 Gone` (an ERROR event with
    /// code 410, as a real server sends for a too old resourceVersion).
    pub fn expire_next_watches(&self, n: usize) {
        self.shared
            .hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expire_watches += n;
    }

    /// From now on, `verb` (get, list, watch, create, update, patch,
    /// delete, or `*`) on `resource` (`clusterroles.rbac.authorization.k8s.io`,
    /// `pods`, or `*`) is refused with 403 Forbidden, worded as RBAC words it
    /// (the fake has no users or roles: this is the whole of its RBAC).
    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared
            .hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .denied
            .push((verb.to_owned(), resource.to_owned()));
    }

    /// Forgets every kept event: a watch from any earlier version gets 410.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Closes the listener and every connection; connections are refused
    /// until [`FakeApiServer::come_back`]. The state is kept.
    pub fn stop_serving(&self) {
        self.shared.up.send_replace(false);
        self.shared.kill.send_modify(|g| *g += 1);
    }

    /// Listens again on the same address.
    pub fn come_back(&self) {
        self.shared.up.send_replace(true);
    }

    /// Goes away for `d`, then comes back by itself.
    pub fn go_away(&self, d: Duration) {
        self.stop_serving();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            shared.up.send_replace(true);
        });
    }

    /// How many requests of `verb` (get, list, watch, create, update,
    /// patch, delete) reached `resource` (`pods`, `leases.coordination.k8s.io`).
    pub fn requests(&self, verb: &str, resource: &str) -> u64 {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Registers a token TokenReview will accept (within its audiences,
    /// until it expires, while its bound pod exists).
    pub fn register_token(&self, token: &str, spec: TokenSpec) {
        self.shared
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.to_owned(), spec);
    }

    /// Registers a random token and returns it.
    pub fn mint_token(&self, spec: TokenSpec) -> String {
        let raw: [u8; 24] = rand::random();
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.register_token(&token, spec);
        token
    }

    /// Direct access for tests: the object, as stored.
    pub fn object(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .store()
            .get(
                &(group.to_owned(), plural.to_owned()),
                &(namespace.to_owned(), name.to_owned()),
            )
            .cloned()
    }

    /// Creates an object directly (no HTTP), as `manager`; `api_version`
    /// and `kind` pick the type. Returns it as stored.
    pub fn create(&self, object: Value) -> Result<Value, ApiError> {
        let (rt, ns) = self.type_of(&object)?;
        let (obj, ev) = self
            .shared
            .store()
            .create(&rt, &ns, object, "kube-fake-test")?;
        self.shared.publish(Some(ev));
        Ok(obj)
    }

    /// Applies a JSON merge patch directly (no HTTP).
    pub fn patch(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let rt = self.rt(group, plural)?;
        let (obj, ev) = self.shared.store().merge_patch(
            &rt,
            &(namespace.to_owned(), name.to_owned()),
            patch,
            "kube-fake-test",
        )?;
        self.shared.publish(ev);
        Ok(obj)
    }

    /// Deletes directly (no HTTP).
    pub fn delete(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let rt = self.rt(group, plural)?;
        let (obj, ev) = self
            .shared
            .store()
            .delete(&rt, &(namespace.to_owned(), name.to_owned()))?;
        self.shared.publish(Some(ev));
        Ok(obj)
    }

    fn rt(&self, group: &str, plural: &str) -> Result<discovery::ResourceType, ApiError> {
        self.shared
            .store()
            .types
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("no resource {plural} in group {group:?}"),
                )
            })
    }

    fn type_of(&self, object: &Value) -> Result<(discovery::ResourceType, String), ApiError> {
        let api_version = object["apiVersion"].as_str().unwrap_or("");
        let kind = object["kind"].as_str().unwrap_or("");
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let rt = self
            .shared
            .store()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(404, "NotFound", format!("no kind {kind} in {api_version}"))
            })?;
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(if rt.namespaced { "default" } else { "" })
            .to_owned();
        Ok((rt, ns))
    }
}
