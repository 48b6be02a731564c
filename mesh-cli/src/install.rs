//! `mesh manifest`, `mesh install` and `mesh uninstall`: the objects of
//! [`crate::manifest`] applied server-side (field manager `sockmesh`),
//! compared for `--dry-run`, waited for, and deleted.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::Value;

use crate::cli::{ClusterArgs, InstallArgs, ManifestArgs, ManifestOptions, UninstallArgs};
use crate::failure::{Failure, code};
use crate::manifest::{self, FIELD_MANAGER, Object, Options};

pub const MANIFEST_HELP: &str = "\
Examples:
  mesh manifest > sockmesh.yaml                  # what deploy/sockmesh.yaml holds
  mesh manifest --service-monitor | kubectl apply --server-side --field-manager sockmesh -f -
  mesh manifest --image-prefix registry.example/sockmesh --tag 0.1.0

Every object is built from the Kubernetes API's Rust types (the CRD from
sockmesh's own type), so the YAML, `mesh install` and the tests agree.";

pub const INSTALL_HELP: &str = "\
Examples:
  mesh install                                  # the current kubeconfig context
  mesh install --dry-run                        # what would be created or changed
  mesh install --kubeconfig ./kc --context lab --timeout 600
  kubectl label namespace default sockmesh.io/mesh=enabled   # then opt a namespace in

Server-side apply with field manager `sockmesh`: a second run changes
nothing. Waits until the CA Deployment and the node DaemonSet are rolled
out (progress on stderr), then `mesh check` tells the rest.
Exits 7 when the API server cannot be reached or refuses (no kubeconfig,
RBAC denied, an object owned by another field manager); exits 1 when the
rollout did not finish within --timeout.";

pub const UNINSTALL_HELP: &str = "\
Examples:
  mesh uninstall                  # everything but the CRDs (policies stay)
  mesh uninstall --crds           # and the CRDs, with every AuthorizationPolicy
  mesh uninstall --dry-run

Deletes every object `mesh install` applied, the CA's root Secret, trust
bundle ConfigMap and Lease, and the sockmesh.io/status annotation the node
proxies wrote on pods. Each node proxy, on its shutdown, removes its eBPF programs, pins and
its CNI config entry. Safe to run twice.";

impl From<&ManifestOptions> for Options {
    fn from(m: &ManifestOptions) -> Self {
        Options {
            namespace: m.namespace.clone(),
            image_prefix: m.image_prefix.clone(),
            tag: m.tag.clone(),
            trust_domain: m.trust_domain.clone(),
            service_monitor: m.service_monitor,
            cni_bin_dir: m.cni_bin_dir.clone(),
            cni_conf_dir: m.cni_conf_dir.clone(),
            cgroup: m.proxy_cgroup.clone(),
        }
    }
}

/// `mesh manifest`.
pub fn manifest(args: &ManifestArgs) -> Result<u8> {
    let objects = manifest::objects(&Options::from(&args.manifest))?;
    let yaml = manifest::to_yaml(&objects)?;
    std::io::stdout()
        .write_all(yaml.as_bytes())
        .context("write the manifest")?;
    Ok(0)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// The kubeconfig file this command reads: --kubeconfig, then
/// $KUBECONFIG (its first file), then ~/.kube/config.
fn kubeconfig_path(args: &ClusterArgs) -> Result<PathBuf, Failure> {
    let explicit = args.kubeconfig.clone().or_else(|| {
        std::env::var_os("KUBECONFIG")
            .filter(|v| !v.is_empty())
            .and_then(|v| std::env::split_paths(&v).next())
    });
    let path = explicit.clone().or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube").join("config"))
    });
    match path {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(Failure::new(
            code::CLUSTER,
            format!("no kubeconfig: {} does not exist", p.display()),
        )
        .hint(if explicit.is_some() {
            "point --kubeconfig (or $KUBECONFIG) at the cluster's kubeconfig file"
        } else {
            "pass --kubeconfig FILE, set $KUBECONFIG, or write ~/.kube/config"
        })),
        None => Err(Failure::new(
            code::CLUSTER,
            "no kubeconfig: neither --kubeconfig, $KUBECONFIG nor $HOME is set",
        )
        .hint("pass --kubeconfig FILE")),
    }
}

/// A client for the kubeconfig's cluster, checked to answer.
pub async fn connect(args: &ClusterArgs) -> Result<Client> {
    let path = kubeconfig_path(args)?;
    let kc = Kubeconfig::read_from(&path).map_err(|e| {
        Failure::new(code::CLUSTER, format!("kubeconfig {}: {e}", path.display()))
            .hint("fix the file, or pass another one with --kubeconfig")
    })?;
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let mut config = Config::from_custom_kubeconfig(kc, &options)
        .await
        .map_err(|e| {
            Failure::new(code::CLUSTER, format!("kubeconfig {}: {e}", path.display()))
                .hint("check its current context (or --context) and its cluster entry")
        })?;
    let timeout = Duration::from_secs(args.request_timeout.max(1));
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config)
        .map_err(|e| Failure::new(code::CLUSTER, format!("Kubernetes client for {url}: {e}")))?;
    client
        .apiserver_version()
        .await
        .map_err(|e| api_failure(e, &format!("the API server at {url}")))?;
    Ok(client)
}

/// One clear line for a Kubernetes API error, with its exit code and what
/// to do.
pub fn api_failure(e: kube::Error, what: &str) -> anyhow::Error {
    let f = match &e {
        kube::Error::Api(s) if s.code == 403 => Failure::new(
            code::CLUSTER,
            format!("{what}: the API server refused (403 Forbidden): {}", s.message),
        )
        .hint("mesh install needs cluster-admin rights (it creates a namespace, CRDs and ClusterRoles); check with `kubectl auth can-i '*' '*'`"),
        kube::Error::Api(s) if s.code == 401 => Failure::new(
            code::CLUSTER,
            format!("{what}: the API server does not know these credentials (401): {}", s.message),
        )
        .hint("refresh the kubeconfig's credentials"),
        kube::Error::Api(s) if s.code == 409 => Failure::new(
            code::CLUSTER,
            format!("{what} is owned by another field manager: {}", s.message),
        )
        .hint("another installation manages it: remove that installation first (mesh install never takes fields over)"),
        kube::Error::Api(s) => Failure::new(
            code::CLUSTER,
            format!("{what}: {} ({} {})", s.message, s.code, s.reason),
        ),
        other => Failure::new(
            code::CLUSTER,
            format!("cannot reach {what}: {}", error_chain(other)),
        )
        .hint("check that the cluster is up and the kubeconfig's server address is right (`kubectl cluster-info`)"),
    };
    anyhow::Error::new(f)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

fn api_for(client: &Client, obj: &Object) -> Api<DynamicObject> {
    match obj.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &obj.api_resource),
        None => Api::all_with(client.clone(), &obj.api_resource),
    }
}

/// What applying an object did, or would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created,
    /// The paths that differ (e.g. `spec.replicas`).
    Changed(Vec<String>),
    Unchanged,
}

/// The paths where `live` lacks or differs from a value `desired` sets.
/// Fields the server adds (defaults, status) are not differences.
pub fn differences(desired: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(desired, live, &mut String::new(), &mut out);
    out
}

fn diff_into(desired: &Value, live: &Value, path: &mut String, out: &mut Vec<String>) {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            for (k, dv) in d {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match l.get(k) {
                    Some(lv) => diff_into(dv, lv, path, out),
                    None if dv.is_null() => {}
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(d), Value::Array(l)) if d.len() == l.len() => {
            for (i, (dv, lv)) in d.iter().zip(l).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                diff_into(dv, lv, path, out);
                path.truncate(len);
            }
        }
        (d, l) if d == l => {}
        _ => out.push(path.clone()),
    }
}

/// The object as the cluster has it, or None when it (or its type: a
/// ServiceMonitor without the Prometheus operator) is not there.
async fn live(api: &Api<DynamicObject>, name: &str, what: &str) -> Result<Option<DynamicObject>> {
    match api.get_opt(name).await {
        Ok(l) => Ok(l),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(api_failure(e, what)),
    }
}

/// What `apply` would do to `obj` (a GET and a comparison; nothing written).
async fn plan(client: &Client, obj: &Object) -> Result<Change> {
    let api = api_for(client, obj);
    let Some(live) = live(&api, obj.name(), &obj.describe()).await? else {
        return Ok(Change::Created);
    };
    let live = serde_json::to_value(&live).context("the live object as JSON")?;
    let diffs = differences(&obj.value, &live);
    Ok(if diffs.is_empty() {
        Change::Unchanged
    } else {
        Change::Changed(diffs)
    })
}

async fn apply(client: &Client, obj: &Object) -> Result<Change> {
    let api = api_for(client, obj);
    let before = live(&api, obj.name(), &obj.describe()).await?;
    let desired = obj.dynamic()?;
    let after = api
        .patch(
            obj.name(),
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 && obj.api_resource.kind == "ServiceMonitor" => {
                anyhow::Error::new(
                    Failure::new(
                        code::CLUSTER,
                        format!(
                            "{}: the cluster has no ServiceMonitor type (monitoring.coreos.com/v1)",
                            obj.describe()
                        ),
                    )
                    .hint("install the Prometheus operator first, or leave out --service-monitor"),
                )
            }
            e => api_failure(e, &obj.describe()),
        })?;
    Ok(match before {
        None => Change::Created,
        Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
            Change::Unchanged
        }
        Some(b) => {
            let b = serde_json::to_value(&b).context("the object as JSON")?;
            Change::Changed(differences(&obj.value, &b))
        }
    })
}

fn describe_change(c: &Change) -> String {
    match c {
        Change::Created => "created".into(),
        Change::Unchanged => "unchanged".into(),
        Change::Changed(paths) if paths.is_empty() => "configured".into(),
        Change::Changed(paths) => {
            let shown: Vec<_> = paths.iter().take(5).cloned().collect();
            let more = paths.len().saturating_sub(5);
            if more > 0 {
                format!("changed: {} (+{more} more)", shown.join(", "))
            } else {
                format!("changed: {}", shown.join(", "))
            }
        }
    }
}

/// `mesh install`.
pub fn install(args: &InstallArgs) -> Result<u8> {
    let objects = manifest::objects(&Options::from(&args.manifest))?;
    runtime()?.block_on(install_async(args, &objects))
}

async fn install_async(args: &InstallArgs, objects: &[Object]) -> Result<u8> {
    let client = connect(&args.cluster).await?;
    let mut out = std::io::stdout();
    if args.dry_run {
        let mut changes = 0;
        for obj in objects {
            let c = plan(&client, obj).await?;
            if c != Change::Unchanged {
                changes += 1;
            }
            let verb = match &c {
                Change::Created => "would create".to_owned(),
                Change::Unchanged => "unchanged".to_owned(),
                c => format!("would be {}", describe_change(c)),
            };
            writeln!(out, "{}: {verb}", obj.describe())?;
        }
        writeln!(
            out,
            "dry run: {changes} of {} objects would change; nothing was written",
            objects.len()
        )?;
        return Ok(0);
    }
    let mut done: Vec<String> = Vec::new();
    let mut changed = 0;
    for obj in objects {
        match apply(&client, obj).await {
            Ok(c) => {
                if c != Change::Unchanged {
                    changed += 1;
                }
                writeln!(out, "{}: {}", obj.describe(), describe_change(&c))?;
                done.push(obj.describe());
            }
            Err(e) => {
                let left = if done.is_empty() {
                    "nothing was installed".to_owned()
                } else {
                    format!(
                        "{} of {} objects were applied before it ({}); `mesh uninstall` removes them",
                        done.len(),
                        objects.len(),
                        done.join(", ")
                    )
                };
                return Err(e.context(format!("install stopped: {left}")));
            }
        }
    }
    writeln!(
        out,
        "applied {} objects ({changed} created or changed, {} unchanged)",
        objects.len(),
        objects.len() - changed
    )?;
    if args.no_wait {
        return Ok(0);
    }
    let ns = args.manifest.namespace.as_str();
    wait_rollout(&client, ns, Duration::from_secs(args.timeout)).await?;
    writeln!(
        out,
        "sockmesh is installed: the CA and every node proxy are ready. Opt a namespace in with `kubectl label namespace NS sockmesh.io/mesh=enabled`; see it with `mesh check`."
    )?;
    Ok(0)
}

/// The rollout state of the CA Deployment and the node DaemonSet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollout {
    pub ca_ready: i32,
    pub ca_wanted: i32,
    pub nodes_ready: i32,
    pub nodes_wanted: i32,
    pub nodes_updated: i32,
    /// Both controllers have seen the latest spec.
    pub observed: bool,
}

impl Rollout {
    pub fn done(&self) -> bool {
        self.observed
            && self.ca_wanted > 0
            && self.ca_ready >= self.ca_wanted
            && self.nodes_wanted > 0
            && self.nodes_ready >= self.nodes_wanted
            && self.nodes_updated >= self.nodes_wanted
    }

    pub fn line(&self) -> String {
        format!(
            "CA {}/{} ready, node proxies {}/{} ready ({} updated){}",
            self.ca_ready,
            self.ca_wanted,
            self.nodes_ready,
            self.nodes_wanted,
            self.nodes_updated,
            if self.observed {
                ""
            } else {
                ", waiting for the controllers to see the new spec"
            }
        )
    }
}

pub async fn rollout(client: &Client, ns: &str) -> Result<Rollout> {
    let deploy: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let d = deploy
        .get("mesh-ca")
        .await
        .map_err(|e| api_failure(e, &format!("Deployment {ns}/mesh-ca")))?;
    let n = ds
        .get("mesh-node")
        .await
        .map_err(|e| api_failure(e, &format!("DaemonSet {ns}/mesh-node")))?;
    let d_status = d.status.clone().unwrap_or_default();
    let n_status = n.status.clone().unwrap_or_default();
    let observed = d_status.observed_generation >= d.metadata.generation
        && n_status.observed_generation >= n.metadata.generation
        && d.status.is_some()
        && n.status.is_some();
    Ok(Rollout {
        ca_ready: d_status.ready_replicas.unwrap_or(0),
        ca_wanted: d.spec.and_then(|s| s.replicas).unwrap_or(1),
        nodes_ready: n_status.number_ready,
        nodes_wanted: n_status.desired_number_scheduled,
        nodes_updated: n_status.updated_number_scheduled.unwrap_or(0),
        observed,
    })
}

async fn wait_rollout(client: &Client, ns: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    let mut err = std::io::stderr();
    loop {
        let r = rollout(client, ns).await?;
        let line = r.line();
        if line != last {
            writeln!(
                err,
                "[{:>4}s] waiting for the rollout: {line}",
                start.elapsed().as_secs()
            )?;
            last = line;
        }
        if r.done() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(anyhow::Error::new(
                Failure::new(
                    code::FAILURE,
                    format!(
                        "the rollout did not finish within {}s: {}",
                        timeout.as_secs(),
                        r.line()
                    ),
                )
                .hint(format!(
                    "see why with `kubectl -n {ns} describe daemonset/mesh-node deployment/mesh-ca` and `mesh check`; the objects stay applied"
                )),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `mesh uninstall`.
pub fn uninstall(args: &UninstallArgs) -> Result<u8> {
    // Whatever `--service-monitor` said at install time, remove it too.
    let options = Options {
        service_monitor: true,
        ..Options::from(&args.manifest)
    };
    let objects = manifest::objects(&options)?;
    runtime()?.block_on(uninstall_async(args, &objects))
}

/// What the CA makes at run time in the mesh's namespace (a real API server
/// deletes them with the namespace; deleting them by name makes uninstall
/// complete however the namespace goes).
fn runtime_objects(ns: &str) -> Vec<(kube::core::ApiResource, String, String)> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    vec![
        (
            kube::core::ApiResource::erase::<ConfigMap>(&()),
            ns.to_owned(),
            manifest::TRUST_BUNDLE_CONFIGMAP.to_owned(),
        ),
        (
            kube::core::ApiResource::erase::<Secret>(&()),
            ns.to_owned(),
            "sockmesh-ca-root".to_owned(),
        ),
        (
            kube::core::ApiResource::erase::<Lease>(&()),
            ns.to_owned(),
            "sockmesh-ca".to_owned(),
        ),
    ]
}

async fn uninstall_async(args: &UninstallArgs, objects: &[Object]) -> Result<u8> {
    let client = connect(&args.cluster).await?;
    let mut out = std::io::stdout();
    let mut targets: Vec<(kube::core::ApiResource, Option<String>, String, String)> = Vec::new();
    for (ar, ns, name) in runtime_objects(&args.manifest.namespace) {
        let what = format!("{} {ns}/{name}", ar.kind);
        targets.push((ar, Some(ns), name, what));
    }
    // Workloads first, the namespace and the CRDs last.
    for obj in objects.iter().rev() {
        if obj.is_crd() && !args.crds {
            writeln!(
                out,
                "{}: kept (pass --crds to delete it and every policy of its kind)",
                obj.describe()
            )?;
            continue;
        }
        targets.push((
            obj.api_resource.clone(),
            obj.namespace().map(str::to_owned),
            obj.name().to_owned(),
            obj.describe(),
        ));
    }
    let mut deleted = 0;
    for (ar, ns, name, what) in targets {
        let api: Api<DynamicObject> = match &ns {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        if args.dry_run {
            if live(&api, &name, &what).await?.is_some() {
                writeln!(out, "{what}: would delete")?;
                deleted += 1;
            } else {
                writeln!(out, "{what}: not there")?;
            }
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {
                writeln!(out, "{what}: deleted")?;
                deleted += 1;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => writeln!(out, "{what}: not there")?,
            Err(e) => {
                return Err(api_failure(e, &what).context(format!(
                    "uninstall stopped after deleting {deleted} objects; run it again once fixed"
                )));
            }
        }
    }
    // After the DaemonSet: its proxies are stopping and write no more.
    let annotated = remove_status_annotations(&client, args.dry_run).await?;
    if args.dry_run {
        writeln!(
            out,
            "dry run: {deleted} objects would be deleted; {STATUS_ANNOTATION} would be removed from {annotated} pods"
        )?;
    } else {
        writeln!(
            out,
            "uninstalled: {deleted} objects deleted; {STATUS_ANNOTATION} removed from {annotated} pods"
        )?;
    }
    Ok(0)
}

/// The annotation the node proxies keep on each pod of their node.
pub use mesh_core::opt_in::STATUS_ANNOTATION;

/// Removes [`STATUS_ANNOTATION`] from every pod of the cluster that carries
/// it (pods in every namespace, listed 500 at a time), with progress on
/// stderr; returns how many pods carried it.
///
/// A JSON merge patch setting the key to null, rather than an empty
/// server-side apply as `sockmesh-node`: the apply removes only the fields
/// that manager alone owns, so an annotation another manager co-owns (a
/// `kubectl apply` of a pod copied from the live object, an older proxy
/// under another manager name) would stay. The merge patch removes the key
/// whoever wrote it, on kube-fake and on a real API server alike, needs
/// `patch` on pods only, and leaves every other annotation as it is.
async fn remove_status_annotations(client: &Client, dry_run: bool) -> Result<usize> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ListParams;
    let pods: Api<Pod> = Api::all(client.clone());
    let mut carrying: Vec<(String, String)> = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = pods
            .list_metadata(&params)
            .await
            .map_err(|e| api_failure(e, "listing pods"))?;
        for p in &page.items {
            let has = p
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(STATUS_ANNOTATION));
            if has {
                carrying.push((
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                ));
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    let total = carrying.len();
    let mut err = std::io::stderr();
    let verb = if dry_run { "would remove" } else { "removing" };
    writeln!(
        err,
        "{total} pods carry {STATUS_ANNOTATION}: {verb} it from each"
    )?;
    if dry_run {
        return Ok(total);
    }
    let patch = serde_json::json!({"metadata": {"annotations": {STATUS_ANNOTATION: null}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let start = Instant::now();
    let mut last = Instant::now();
    for (i, (ns, name)) in carrying.iter().enumerate() {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        match api.patch(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Gone since the list: nothing left to clean.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(
                    api_failure(e, &format!("Pod {ns}/{name}")).context(format!(
                        "removing {STATUS_ANNOTATION} stopped after {i} of {total} pods; run `mesh uninstall` again once fixed"
                    )),
                );
            }
        }
        if i + 1 == total || last.elapsed() >= Duration::from_secs(1) {
            writeln!(
                err,
                "[{:>4}s] {STATUS_ANNOTATION} removed from {}/{total} pods",
                start.elapsed().as_secs(),
                i + 1
            )?;
            last = Instant::now();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_are_not_differences_but_changed_values_are() {
        let desired = json!({"spec": {"replicas": 2, "template": {"containers": [{"name": "a", "image": "x:1"}]}}});
        let live = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10,
            "template": {"containers": [{"name": "a", "image": "x:1", "terminationMessagePath": "/dev/termination-log"}]}},
            "status": {"readyReplicas": 1}});
        assert!(differences(&desired, &live).is_empty());
        let live2 = json!({"spec": {"replicas": 3, "template": {"containers": [{"name": "a", "image": "x:0"}]}}});
        assert_eq!(
            differences(&desired, &live2),
            ["spec.replicas", "spec.template.containers[0].image"]
        );
        let live3 = json!({"spec": {"template": {"containers": []}}});
        assert_eq!(
            differences(&desired, &live3),
            ["spec.replicas", "spec.template.containers"]
        );
    }

    #[test]
    fn a_rollout_is_done_only_when_every_wanted_pod_is_ready_and_updated() {
        let mut r = Rollout {
            ca_ready: 2,
            ca_wanted: 2,
            nodes_ready: 3,
            nodes_wanted: 3,
            nodes_updated: 3,
            observed: true,
        };
        assert!(r.done());
        r.nodes_updated = 2;
        assert!(!r.done());
        r.nodes_updated = 3;
        r.observed = false;
        assert!(!r.done());
        assert!(r.line().contains("node proxies 3/3 ready"));
    }
}
