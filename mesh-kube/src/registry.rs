//! The Kubernetes registry source: kube-runtime reflectors on Pods (of this
//! node, or of the cluster for the CA), Namespaces, Services,
//! EndpointSlices and AuthorizationPolicies (sockmesh's CRD; Istio's when
//! that CRD exists), folded into one indexed [`View`] after every change.
//!
//! Resilience: each watcher relists on 410 and retries errors with
//! exponential backoff; a reflector's store is only replaced when a relist
//! completes, so while the API server is unreachable the last known state
//! stays and nothing is removed. A probe (`GET /version`) and every watch
//! event mark contact; [`Health::stale`] says the state is older than
//! [`KubeConfig::stale_after`]. Bad objects are [`ObjectProblem`]s in the
//! view (logged once each), never a watcher failure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod as K8sPod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use mesh_core::registry::{IndexedSnapshot, Node, Pod, Service, Snapshot, WorkloadRegistry};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::convert::{self, Components, Endpoint, ObjectProblem};
use crate::crd;

/// Which pods to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodScope {
    /// Pods with `spec.nodeName` = this node (a node proxy).
    Node(String),
    /// Every pod (the CA: it authorizes by node, for every node).
    Cluster,
}

#[derive(Debug, Clone)]
pub struct KubeConfig {
    pub scope: PodScope,
    pub components: Components,
    /// After this long without contact with the API server the state is
    /// reported stale (still served).
    pub stale_after: Duration,
    /// How often the API server is probed.
    pub probe_every: Duration,
    /// Watch retry backoff: doubles from `min` to `max`, with jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Watch sockmesh's AuthorizationPolicies (the node proxy must: until
    /// the CRD exists it is not synced; the CA, which only needs pods, need
    /// not: see [`KubeConfig::for_ca`]).
    pub policies: bool,
    /// Watch Istio's AuthorizationPolicies too, once their CRD exists
    /// (checked every `istio_recheck`).
    pub istio_policies: bool,
    pub istio_recheck: Duration,
}

impl KubeConfig {
    /// The CA's: every pod, no policies.
    pub fn for_ca() -> Self {
        KubeConfig {
            policies: false,
            istio_policies: false,
            ..KubeConfig::new(PodScope::Cluster)
        }
    }

    pub fn new(scope: PodScope) -> Self {
        KubeConfig {
            scope,
            components: Components {
                own_pod: None,
                part_of: Some("sockmesh".into()),
            },
            stale_after: Duration::from_secs(30),
            probe_every: Duration::from_secs(5),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            policies: true,
            istio_policies: true,
            istio_recheck: Duration::from_secs(60),
        }
    }
}

/// The registry's view of the cluster: mesh-core's indexed snapshot (the
/// type the file source serves too), the Services' endpoints from their
/// EndpointSlices, and what was skipped.
#[derive(Debug, Default)]
pub struct View {
    pub snapshot: Arc<IndexedSnapshot>,
    endpoints: HashMap<(String, String), Vec<Endpoint>>,
    /// Objects skipped, with why.
    pub problems: Vec<ObjectProblem>,
    /// Bumped when the snapshot changes.
    pub generation: u64,
    /// Built from stores that had every kind listed once: a whole view,
    /// which may be reconciled against. A watcher's sync is recorded
    /// before the view that includes it is built, so `Health::synced` can
    /// be true a moment before the view is whole; this cannot. Once true it
    /// stays true (stores keep their objects through relists and outages).
    pub whole: bool,
}

impl View {
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.snapshot.pod_by_ip(ip)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.snapshot.pod(namespace, name)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.snapshot.service_by_vip(ip)
    }

    /// The ready endpoints of a Service, from its EndpointSlices (pods of
    /// every node), sorted.
    pub fn endpoints(&self, namespace: &str, service: &str) -> &[Endpoint] {
        self.endpoints
            .get(&(namespace.to_owned(), service.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

/// How fresh the registry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Every watcher has listed once.
    pub synced: bool,
    /// No contact with the API server for longer than `stale_after`.
    pub stale: bool,
    /// Time since the last contact (a probe or a watch event).
    pub since_contact: Duration,
    /// The last watch or probe error, if any since the last contact.
    pub last_error: Option<String>,
    /// Lists done by all watchers (the first ones included): a relist
    /// after 410 or an error shows here.
    pub lists: u64,
}

#[derive(Debug)]
struct Contact {
    last_ok: Instant,
    last_error: Option<String>,
}

struct Stores {
    pods: Store<K8sPod>,
    namespaces: Store<Namespace>,
    services: Store<K8sService>,
    slices: Store<EndpointSlice>,
    policies: Store<DynamicObject>,
    istio: Mutex<Option<Store<DynamicObject>>>,
}

struct Shared {
    config: KubeConfig,
    view: RwLock<Arc<View>>,
    changed: watch::Sender<u64>,
    dirty: Notify,
    contact: Mutex<Contact>,
    lists: AtomicU64,
    synced: Mutex<BTreeSet<&'static str>>,
    watchers: Mutex<usize>,
    stores: Stores,
    logged: Mutex<BTreeSet<ObjectProblem>>,
}

impl Shared {
    /// Whether every watcher has listed once.
    fn all_listed(&self) -> bool {
        let synced = self
            .synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        let watchers = *self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
        synced >= watchers && watchers > 0
    }

    fn ok(&self) {
        let mut c = self.contact.lock().unwrap_or_else(PoisonError::into_inner);
        c.last_ok = Instant::now();
        c.last_error = None;
    }

    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        let msg = format!("{what}: {e}");
        tracing::debug!(error = %msg, "kubernetes watch");
        self.contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_error = Some(msg);
    }
}

impl PartialOrd for ObjectProblem {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ObjectProblem {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.object, &self.reason).cmp(&(&other.object, &other.reason))
    }
}

/// The Kubernetes source. Dropping it stops its watchers.
pub struct KubeRegistry {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Debug for KubeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("scope", &self.shared.config.scope)
            .field("generation", &self.view().generation)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Exponential backoff with jitter, reset on success (kube-runtime's
/// `StreamBackoff` calls `reset` after an Ok item).
struct Backoff {
    min: Duration,
    max: Duration,
    next: Option<Duration>,
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next.map_or(self.min, |d| (d * 2).min(self.max));
        self.next = Some(d);
        // ±20% jitter, from the clock's low bits (no RNG needed).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos())
            .unwrap_or(0);
        let permille = 800 + u64::from(nanos % 401);
        Some(Duration::from_millis(
            d.as_millis() as u64 * permille / 1000,
        ))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = None;
    }
}

impl KubeRegistry {
    /// Starts the watchers on the current tokio runtime. Returns at once;
    /// see [`KubeRegistry::wait_synced`].
    pub fn start(client: Client, config: KubeConfig) -> KubeRegistry {
        let (pods, pods_w) = reflector::store::<K8sPod>();
        let (namespaces, ns_w) = reflector::store::<Namespace>();
        let (services, svc_w) = reflector::store::<K8sService>();
        let (slices, slices_w) = reflector::store::<EndpointSlice>();
        let policy_ar = crd::sockmesh_policy_resource();
        let policies_w = Writer::<DynamicObject>::new(policy_ar.clone());
        let policies = policies_w.as_reader();
        let shared = Arc::new(Shared {
            view: RwLock::new(Arc::new(View::default())),
            changed: watch::channel(0).0,
            dirty: Notify::new(),
            contact: Mutex::new(Contact {
                last_ok: Instant::now(),
                last_error: None,
            }),
            lists: AtomicU64::new(0),
            synced: Mutex::new(BTreeSet::new()),
            watchers: Mutex::new(0),
            stores: Stores {
                pods,
                namespaces,
                services,
                slices,
                policies,
                istio: Mutex::new(None),
            },
            logged: Mutex::new(BTreeSet::new()),
            config: config.clone(),
        });
        let pod_cfg = match &config.scope {
            PodScope::Node(node) => {
                watcher::Config::default().fields(&format!("spec.nodeName={node}"))
            }
            PodScope::Cluster => watcher::Config::default(),
        };
        let mut tasks = vec![
            reflect(&shared, "pods", Api::all(client.clone()), pod_cfg, pods_w),
            reflect(
                &shared,
                "namespaces",
                Api::all(client.clone()),
                watcher::Config::default(),
                ns_w,
            ),
            reflect(
                &shared,
                "services",
                Api::all(client.clone()),
                watcher::Config::default(),
                svc_w,
            ),
            reflect(
                &shared,
                "endpointslices",
                Api::all(client.clone()),
                watcher::Config::default(),
                slices_w,
            ),
            tokio::spawn(rebuild_loop(shared.clone())),
            tokio::spawn(probe_loop(shared.clone(), client.clone())),
        ];
        if config.policies {
            tasks.push(reflect(
                &shared,
                "authorizationpolicies.security.sockmesh.io",
                Api::all_with(client.clone(), &policy_ar),
                watcher::Config::default(),
                policies_w,
            ));
        }
        if config.istio_policies {
            tasks.push(tokio::spawn(istio_loop(shared.clone(), client)));
        }
        KubeRegistry { shared, tasks }
    }

    pub fn view(&self) -> Arc<View> {
        self.shared
            .view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The indexed snapshot, the type `FileRegistry::snapshot` serves.
    pub fn snapshot(&self) -> Arc<IndexedSnapshot> {
        self.view().snapshot.clone()
    }

    /// A receiver that changes with [`View::generation`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    pub fn health(&self) -> Health {
        let contact = self
            .shared
            .contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let since = contact.last_ok.elapsed();
        Health {
            synced: self.shared.all_listed(),
            stale: since > self.shared.config.stale_after,
            since_contact: since,
            last_error: contact.last_error.clone(),
            lists: self.shared.lists.load(Ordering::Relaxed),
        }
    }

    /// Waits until every watcher has listed once (or `timeout`).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut changes = self.changes();
        loop {
            if self.view().whole {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(50)), changes.changed()).await;
        }
    }
}

fn reflect<K>(
    shared: &Arc<Shared>,
    what: &'static str,
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    *shared
        .watchers
        .lock()
        .unwrap_or_else(PoisonError::into_inner) += 1;
    let shared = shared.clone();
    let backoff = Backoff {
        min: shared.config.backoff_min,
        max: shared.config.backoff_max,
        next: None,
    };
    tokio::spawn(async move {
        // managedFields are most of a stored object and nothing here reads
        // them (the node proxy holds every pod of the cluster).
        let watch = watcher::watcher(api, config)
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .backoff(backoff);
        let stream = reflector::reflector(writer, watch);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    shared.ok();
                    match event {
                        watcher::Event::Init => {
                            shared.lists.fetch_add(1, Ordering::Relaxed);
                        }
                        watcher::Event::InitDone => {
                            shared
                                .synced
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(what);
                            shared.dirty.notify_one();
                        }
                        watcher::Event::InitApply(_) => {}
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                            shared.dirty.notify_one()
                        }
                    }
                }
                Err(e) => shared.error(what, &e),
            }
        }
    })
}

async fn probe_loop(shared: Arc<Shared>, client: Client) {
    let every = shared.config.probe_every;
    loop {
        match tokio::time::timeout(
            every.max(Duration::from_millis(100)),
            client.apiserver_version(),
        )
        .await
        {
            Ok(Ok(_)) => shared.ok(),
            Ok(Err(e)) => shared.error("probe", &e),
            Err(_) => shared.error("probe", &"timed out"),
        }
        tokio::time::sleep(every).await;
    }
}

async fn istio_loop(shared: Arc<Shared>, client: Client) {
    let ar: ApiResource = crd::istio_policy_resource();
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::debug!(error = %e, "checking for Istio's AuthorizationPolicy CRD"),
        }
        tokio::time::sleep(shared.config.istio_recheck).await;
    }
    tracing::info!(
        "Istio's AuthorizationPolicy CRD exists: watching security.istio.io/v1 policies too"
    );
    let writer = Writer::<DynamicObject>::new(ar);
    *shared
        .stores
        .istio
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(writer.as_reader());
    let task = reflect(
        &shared,
        "authorizationpolicies.security.istio.io",
        api,
        watcher::Config::default(),
        writer,
    );
    let _ = task.await;
}

async fn rebuild_loop(shared: Arc<Shared>) {
    loop {
        shared.dirty.notified().await;
        // Read before the stores: a watcher marks itself synced only after
        // its store holds the whole list.
        let all_listed = shared.all_listed();
        let view = build(&shared);
        let mut current = shared.view.write().unwrap_or_else(PoisonError::into_inner);
        let whole = current.whole || all_listed;
        if current.snapshot.snapshot() == view.snapshot.snapshot()
            && current.problems == view.problems
            && current.whole == whole
            && current.generation > 0
        {
            continue;
        }
        let generation = current.generation + 1;
        *current = Arc::new(View {
            generation,
            whole,
            ..view
        });
        drop(current);
        shared.changed.send_replace(generation);
    }
}

fn build(shared: &Shared) -> View {
    let stores = &shared.stores;
    let namespaces: HashMap<String, Arc<Namespace>> = stores
        .namespaces
        .state()
        .into_iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n)))
        .collect();
    let mut problems = Vec::new();
    let mut pods: Vec<Pod> = Vec::new();
    for p in stores.pods.state() {
        let ns = p
            .metadata
            .namespace
            .as_deref()
            .and_then(|n| namespaces.get(n));
        match convert::pod(&p, ns.map(|n| n.as_ref()), &shared.config.components) {
            Ok(pod) => pods.push(pod),
            Err(e) => problems.push(e),
        }
    }
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut services: Vec<Service> = Vec::new();
    for s in stores.services.state() {
        match convert::service(&s) {
            Ok(Some(svc)) => services.push(svc),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut endpoints: HashMap<(String, String), Vec<Endpoint>> = HashMap::new();
    for s in stores.slices.state() {
        match convert::endpoints(&s) {
            Ok((svc, eps)) => endpoints.entry(svc).or_default().extend(eps),
            Err(e) => problems.push(e),
        }
    }
    for eps in endpoints.values_mut() {
        eps.sort();
        eps.dedup();
    }
    let mut policy_objects = stores.policies.state();
    if let Some(istio) = stores
        .istio
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        policy_objects.extend(istio.state());
    }
    let mut policies = Vec::new();
    for obj in policy_objects {
        let value = match serde_json::to_value(obj.as_ref()) {
            Ok(v) => v,
            Err(e) => {
                problems.push(ObjectProblem {
                    object: format!(
                        "authorizationpolicy {}",
                        obj.metadata.name.clone().unwrap_or_default()
                    ),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        match convert::policy(&value) {
            Ok(p) => policies.push(p),
            Err(e) => problems.push(e),
        }
    }
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut node_names: BTreeSet<String> = pods.iter().map(|p| p.node.clone()).collect();
    if let PodScope::Node(n) = &shared.config.scope {
        node_names.insert(n.clone());
    }
    problems.sort();
    {
        let mut logged = shared.logged.lock().unwrap_or_else(PoisonError::into_inner);
        for p in &problems {
            if logged.insert(p.clone()) {
                tracing::warn!(object = %p.object, reason = %p.reason, "kubernetes object skipped");
            }
        }
        logged.retain(|p| problems.contains(p));
    }
    let snapshot = Snapshot {
        nodes: node_names.into_iter().map(|name| Node { name }).collect(),
        pods,
        services,
        policies,
    };
    View {
        snapshot: Arc::new(IndexedSnapshot::new(snapshot)),
        endpoints,
        problems,
        generation: 0,
        whole: false,
    }
}

impl WorkloadRegistry for KubeRegistry {
    fn current(&self) -> Arc<IndexedSnapshot> {
        self.snapshot()
    }
}

/// Counts of what the view holds, for logs and `/workloads`.
pub fn summary(view: &View) -> BTreeMap<&'static str, usize> {
    BTreeMap::from([
        ("pods", view.snapshot.pods.len()),
        (
            "meshed",
            view.snapshot.pods.iter().filter(|p| p.meshed()).count(),
        ),
        ("services", view.snapshot.services.len()),
        ("policies", view.snapshot.policies.len()),
        ("problems", view.problems.len()),
    ])
}
