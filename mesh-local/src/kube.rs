//! The local mesh's Kubernetes mode (`mesh up --kubernetes`): the same
//! fabric, nodes and pod namespaces, but the control plane reads a
//! Kubernetes API instead of the registry file.
//!
//! - **API server**: `kube-fake` (the fake API server the tests use; see
//!   ARCHITECTURE.md for how it differs from a real one), run as a process
//!   of the mesh on the first node (`mesh kube-api`, hidden), plain HTTP on
//!   the node's fabric address, port [`API_PORT`], so every node reaches
//!   it over the fabric. A Unix control socket next to it takes the test
//!   hooks (cut watches, 410, outage, tokens) — see [`Hook`].
//! - **Objects**: Namespaces (with their `sockmesh.io/mesh` label; a
//!   namespace the topology does not list is labelled `enabled`, the file
//!   registry's meaning), Nodes, one host-network `mesh-proxy-<node>` Pod per
//!   node in [`NAMESPACE`] (what a DaemonSet would make), the topology's
//!   Pods (IPs, labels, annotations, serviceAccount, nodeName, and an
//!   ownerReference to a ReplicaSet of a Deployment named after their `app`
//!   label), Services, EndpointSlices and AuthorizationPolicies.
//! - **CA**: `mesh-ca cluster` against the API: TokenReview, root in a
//!   Secret, leader Lease; the proxies' `--ca-bundle` is the `ca.crt` of
//!   the trust bundle ConfigMap it publishes (never the root Secret).
//! - **Proxies**: `mesh-proxy --registry-source kubernetes`, each with a
//!   projected-style token bound to its node's proxy Pod (audience
//!   `sockmesh-ca`, registered with the fake's TokenReview), and
//!   `--cni-socket`.
//! - **Runtime**: the harness plays the container runtime and the kubelet:
//!   for each pod it creates the Pod object, builds its netns, then runs
//!   `mesh-cni` ADD with the CNI environment (`CNI_NETNS`, `CNI_ARGS` with
//!   `K8S_POD_NAMESPACE/NAME/UID`, `prevResult` with the pod's addresses);
//!   removing a pod runs DEL first. Pods enroll through CNI as in a cluster.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::control::{Binaries, ControlOptions};
use crate::state::PodInfo;
use crate::topology::Pod;
use crate::{Error, Mesh, ipam};

/// The mesh's own namespace: the proxies' Pods and service account, the
/// CA's root Secret and Lease.
pub const NAMESPACE: &str = "sockmesh-system";
/// The API server's port on the first node's fabric address.
pub const API_PORT: u16 = 6443;
/// The node proxies' service account (in [`NAMESPACE`]).
pub const PROXY_SERVICE_ACCOUNT: &str = "mesh-proxy";
/// The audience of the proxies' tokens (the CA's TokenReview checks it).
pub const CA_AUDIENCE: &str = "sockmesh-ca";
/// The ConfigMap the CA's leader publishes the trust bundle in (key
/// `ca.crt`, root certificates only), in [`NAMESPACE`].
pub const TRUST_BUNDLE_CONFIGMAP: &str = "sockmesh-trust-bundle";
/// Field manager of the objects the harness writes.
const MANAGER: &str = "sockmesh-local";

/// What the state file keeps about the Kubernetes mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeInfo {
    /// The API server (plain HTTP), inside the first node's netns.
    pub api: SocketAddr,
    /// The node whose netns the API server runs in.
    pub api_node: String,
    pub kubeconfig: PathBuf,
    /// The API server process's hook socket ([`Hook`]).
    pub control_socket: PathBuf,
    /// Node name -> the Node object's uid.
    #[serde(default)]
    pub node_uids: BTreeMap<String, String>,
    /// The proxies' `--api-stale-seconds`.
    pub api_stale_seconds: u64,
    /// The CNI plugin the harness runs as the runtime.
    pub cni: PathBuf,
}

/// Options of [`Mesh::start_kube_control`].
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// A proxy reports itself stale (readiness) after this long without
    /// contact with the API server.
    pub api_stale_seconds: u64,
    /// Lifetime of the proxies' tokens.
    pub token_ttl: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            api_stale_seconds: 30,
            token_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// A request to the API server process's hook socket: the kube-fake test
/// hooks, for tests and benchmarks that break the API on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Hook {
    /// Every open watch ends mid-stream.
    CutWatches,
    /// The next `n` watches get 410 Gone.
    ExpireWatches {
        n: usize,
    },
    /// Forget the kept events (any older version gets 410).
    Compact,
    /// Close the listener and every connection for `seconds`.
    GoAway {
        seconds: u64,
    },
    /// Close the listener until [`Hook::ComeBack`].
    StopServing,
    ComeBack,
    /// Register a token for TokenReview; answers `{"token": ...}`.
    MintToken {
        namespace: String,
        service_account: String,
        audiences: Vec<String>,
        /// `(name, uid)` of the bound pod.
        pod: Option<(String, String)>,
        /// `(name, uid)` of the bound pod's node.
        node: Option<(String, String)>,
        /// Seconds from now (negative: already expired).
        expires_in: i64,
    },
    /// How many requests of `verb` reached `resource`; answers `{"count": n}`.
    Requests {
        verb: String,
        resource: String,
    },
}

/// Most bytes of one hook request.
const MAX_HOOK: usize = 64 * 1024;
/// Hook connections served at once.
const MAX_HOOK_CONNECTIONS: usize = 16;

/// `mesh kube-api --listen ADDR --control SOCKET`: runs kube-fake with
/// sockmesh's CRD until killed, serving [`Hook`]s on `control`.
pub fn serve_api(listen: SocketAddr, control: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let api = kube_fake::FakeApiServer::start_with(kube_fake::Options {
            addr: listen,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("listen on {listen}: {e}"))?;
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(mesh_kube::crd::AuthorizationPolicy::crd())
            .map_err(|e| format!("CRD: {e}"))?;
        api.create(crd)
            .map_err(|e| format!("create the CRD: {e:?}"))?;
        let _ = std::fs::remove_file(control);
        let listener = tokio::net::UnixListener::bind(control)
            .map_err(|e| format!("control socket {}: {e}", control.display()))?;
        eprintln!(
            "kube-fake listening on {} (hooks on {})",
            api.url(),
            control.display()
        );
        let api = std::sync::Arc::new(api);
        // Bounded: at most MAX_HOOK_CONNECTIONS at once (more wait in the
        // backlog), each for 5 s and MAX_HOOK bytes.
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HOOK_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return Ok(());
            };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), hook(&api, stream)).await;
                drop(slot);
            });
        }
    })
}

async fn hook(
    api: &kube_fake::FakeApiServer,
    stream: tokio::net::UnixStream,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(r.take(MAX_HOOK as u64))
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<Hook>(&line) {
        Err(e) => json!({"error": format!("hook {:?}: {e}", line.trim())}),
        Ok(h) => run_hook(api, h),
    };
    w.write_all(format!("{answer}\n").as_bytes()).await?;
    w.shutdown().await
}

fn run_hook(api: &kube_fake::FakeApiServer, h: Hook) -> Value {
    match h {
        Hook::CutWatches => api.cut_watches(),
        Hook::ExpireWatches { n } => api.expire_next_watches(n),
        Hook::Compact => api.compact(),
        Hook::GoAway { seconds } => api.go_away(Duration::from_secs(seconds)),
        Hook::StopServing => api.stop_serving(),
        Hook::ComeBack => api.come_back(),
        Hook::MintToken {
            namespace,
            service_account,
            audiences,
            pod,
            node,
            expires_in,
        } => {
            let now = std::time::SystemTime::now();
            let d = Duration::from_secs(expires_in.unsigned_abs());
            let expires = if expires_in >= 0 { now + d } else { now - d };
            let token = api.mint_token(kube_fake::TokenSpec {
                namespace,
                service_account,
                audiences,
                pod,
                node,
                expires,
            });
            return json!({"token": token});
        }
        Hook::Requests { verb, resource } => {
            return json!({"count": api.requests(&verb, &resource)});
        }
    }
    json!({"ok": true})
}

/// The REST path of an object (or of its collection, `name` empty).
pub fn object_path(api_version: &str, kind: &str, namespace: &str, name: &str) -> String {
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "Node" => ("nodes", false),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "Pod" => ("pods", true),
        "Service" => ("services", true),
        "ServiceAccount" => ("serviceaccounts", true),
        "Secret" => ("secrets", true),
        "Event" => ("events", true),
        "EndpointSlice" => ("endpointslices", true),
        "AuthorizationPolicy" => ("authorizationpolicies", true),
        "Deployment" => ("deployments", true),
        "ReplicaSet" => ("replicasets", true),
        other => return format!("/unknown-kind/{other}"),
    };
    let mut p = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    if namespaced {
        p.push_str(&format!("/namespaces/{namespace}"));
    }
    p.push('/');
    p.push_str(plural);
    if !name.is_empty() {
        p.push('/');
        p.push_str(name);
    }
    p
}

fn api_error(what: String, status: u16, body: &str) -> Error {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(300).collect());
    Error::Command {
        cmd: what,
        status: format!("HTTP {status}"),
        stderr: message,
    }
}

impl Mesh {
    /// The Kubernetes mode's record, or an error naming the mesh.
    pub fn kube_info(&self) -> Result<&KubeInfo, Error> {
        self.state.kube.as_ref().ok_or_else(|| Error::State {
            path: self.options.state_file(&self.state.mesh),
            reason: "the mesh does not run in Kubernetes mode (mesh up --kubernetes)".into(),
        })
    }

    /// One request to the API server (from inside its node's netns):
    /// status and body.
    pub fn kube_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, String), Error> {
        let k = self.kube_info()?;
        let n = self.node(&k.api_node)?;
        let body = body.map(|b| b.to_string());
        crate::control::http_request(
            &n.netns_path(),
            method,
            k.api,
            path,
            content_type.zip(body.as_deref()),
            Duration::from_secs(10),
        )
        .map_err(|source| Error::Io {
            what: "Kubernetes API request",
            path: PathBuf::from(format!("{} {}{path}", method, k.api)),
            source,
        })
    }

    /// GET of an object; `None` when it does not exist.
    pub fn kube_get(&self, path: &str) -> Result<Option<Value>, Error> {
        let (status, body) = self.kube_request("GET", path, None, None)?;
        match status {
            200 => serde_json::from_str(&body)
                .map(Some)
                .map_err(|e| api_error(format!("GET {path}"), status, &e.to_string())),
            404 => Ok(None),
            _ => Err(api_error(format!("GET {path}"), status, &body)),
        }
    }

    /// Creates `object` (by its apiVersion and kind); returns it as stored.
    pub fn kube_create(&self, object: &Value) -> Result<Value, Error> {
        let s = |k: &str| object[k].as_str().unwrap_or("").to_owned();
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let path = object_path(&s("apiVersion"), &s("kind"), ns, "");
        let path = format!("{path}?fieldManager={MANAGER}");
        let (status, body) =
            self.kube_request("POST", &path, Some("application/json"), Some(object))?;
        if status != 201 && status != 200 {
            return Err(api_error(
                format!("create {} at {path}", s("kind")),
                status,
                &body,
            ));
        }
        serde_json::from_str(&body)
            .map_err(|e| api_error(format!("create at {path}"), status, &e.to_string()))
    }

    /// A JSON merge patch of the object at `path`.
    pub fn kube_patch(&self, path: &str, patch: &Value) -> Result<Value, Error> {
        let full = format!("{path}?fieldManager={MANAGER}");
        let (status, body) = self.kube_request(
            "PATCH",
            &full,
            Some("application/merge-patch+json"),
            Some(patch),
        )?;
        if status != 200 {
            return Err(api_error(format!("patch {path}"), status, &body));
        }
        serde_json::from_str(&body)
            .map_err(|e| api_error(format!("patch {path}"), status, &e.to_string()))
    }

    /// Deletes the object at `path` (gone already is fine).
    pub fn kube_delete(&self, path: &str) -> Result<(), Error> {
        let (status, body) = self.kube_request("DELETE", path, None, None)?;
        match status {
            200 | 202 | 404 => Ok(()),
            _ => Err(api_error(format!("delete {path}"), status, &body)),
        }
    }

    /// Sends a [`Hook`] to the API server process; its JSON answer.
    pub fn kube_hook(&self, h: &Hook) -> Result<Value, Error> {
        let k = self.kube_info()?;
        let sock = k.control_socket.clone();
        let io = |source: std::io::Error| Error::Io {
            what: "API server hook",
            path: sock.clone(),
            source,
        };
        let mut s = std::os::unix::net::UnixStream::connect(&sock).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let line = serde_json::to_string(h).map_err(|e| io(std::io::Error::other(e)))?;
        s.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
        let mut answer = String::new();
        std::io::BufReader::new(s)
            .read_line(&mut answer)
            .map_err(io)?;
        let v: Value = serde_json::from_str(&answer).map_err(|e| io(std::io::Error::other(e)))?;
        if let Some(e) = v["error"].as_str() {
            return Err(io(std::io::Error::other(e.to_owned())));
        }
        Ok(v)
    }

    /// The pod's object path.
    pub fn pod_path(&self, key: &str) -> Result<String, Error> {
        let p = self.pod(key)?;
        Ok(object_path("v1", "Pod", &p.namespace, &p.name))
    }

    /// The pod's `sockmesh.io/status` annotation, parsed, as the API has
    /// it (written by its node proxy); `None` while there is none.
    pub fn pod_status_annotation(&self, key: &str) -> Result<Option<Value>, Error> {
        let path = self.pod_path(key)?;
        Ok(self.kube_get(&path)?.and_then(|o| {
            o.pointer("/metadata/annotations")
                .and_then(|a| a.get(mesh_core::opt_in::STATUS_ANNOTATION))
                .and_then(Value::as_str)
                .and_then(|s| serde_json::from_str(s).ok())
        }))
    }

    /// Sets (or with `None` removes) annotation `key` of pod `pod`, in the
    /// API and in the state.
    pub fn set_pod_annotation(
        &mut self,
        pod: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), Error> {
        let path = self.pod_path(pod)?;
        self.kube_patch(&path, &json!({"metadata": {"annotations": {key: value}}}))?;
        let p = self.pod(pod)?.clone();
        if let Some(q) = self
            .state
            .pods
            .iter_mut()
            .find(|q| q.namespace == p.namespace && q.name == p.name)
        {
            match value {
                Some(v) => q.annotations.insert(key.to_owned(), v.to_owned()),
                None => q.annotations.remove(key),
            };
        }
        self.state.save(&self.options.state_file(&self.state.mesh))
    }

    /// Sets (or removes) label `key` of namespace `namespace`, in the API
    /// and in the state.
    pub fn set_namespace_label(
        &mut self,
        namespace: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), Error> {
        let path = object_path("v1", "Namespace", "", namespace);
        self.kube_patch(&path, &json!({"metadata": {"labels": {key: value}}}))?;
        let labels = self
            .state
            .namespaces
            .entry(namespace.to_owned())
            .or_default();
        match value {
            Some(v) => labels.insert(key.to_owned(), v.to_owned()),
            None => labels.remove(key),
        };
        self.state.save(&self.options.state_file(&self.state.mesh))
    }

    fn kubeconfig_text(api: SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sockmesh-local\n  cluster: {{server: \"http://{api}\"}}\nusers:\n- name: sockmesh-local\n  user: {{}}\ncontexts:\n- name: sockmesh-local\n  context: {{cluster: sockmesh-local, user: sockmesh-local, namespace: default}}\ncurrent-context: sockmesh-local\n"
        )
    }

    /// The CA's work directory in Kubernetes mode (the root from its
    /// Secret, in `root-secret/`, key included: the CA's alone).
    pub fn kube_ca_dir(&self) -> PathBuf {
        self.state_dir().join("control").join("ca-cluster")
    }

    /// The proxies' `--ca-bundle` in Kubernetes mode: `ca.crt` of the
    /// trust bundle ConfigMap the CA publishes, as a ConfigMap volume
    /// would hold it.
    pub fn kube_trust_bundle_file(&self) -> PathBuf {
        self.state_dir()
            .join("control")
            .join("trust-bundle")
            .join("ca.crt")
    }

    /// Node `node`'s proxy token (projected-style, bound to its Pod).
    pub fn kube_token_file(&self, node: &str) -> PathBuf {
        self.state_dir()
            .join("control")
            .join("tokens")
            .join(format!("{node}.kube-token"))
    }

    /// The name of node `node`'s proxy Pod (in [`NAMESPACE`]).
    pub fn proxy_pod_name(node: &str) -> String {
        format!("mesh-proxy-{node}")
    }

    /// Starts the Kubernetes mode's control plane on a mesh that is up:
    /// the API server, the objects, the CA (cluster mode), the proxies
    /// (Kubernetes source, CNI socket), then CNI ADD of every pod; returns
    /// once each proxy is ready. `progress` gets one line per step.
    pub fn start_kube_control(
        &mut self,
        bins: &Binaries,
        opts: &ControlOptions,
        kube: &KubeOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), Error> {
        let control = self.state_dir().join("control");
        std::fs::create_dir_all(control.join("tokens")).map_err(|source| Error::Io {
            what: "create dir",
            path: control.join("tokens"),
            source,
        })?;
        let first = self
            .state
            .nodes
            .first()
            .cloned()
            .ok_or_else(|| Error::Names("the mesh has no node".into()))?;
        let api = SocketAddr::new(first.fabric_ip.into(), API_PORT);
        let kubeconfig = control.join("kubeconfig");
        crate::state::write_file(&kubeconfig, Self::kubeconfig_text(api).as_bytes())?;
        let control_socket = control.join("kube-api.sock");
        self.state.kube = Some(KubeInfo {
            api,
            api_node: first.name.clone(),
            kubeconfig: kubeconfig.clone(),
            control_socket: control_socket.clone(),
            node_uids: BTreeMap::new(),
            api_stale_seconds: kube.api_stale_seconds,
            cni: bins.cni(),
        });
        self.state
            .save(&self.options.state_file(&self.state.mesh))?;

        // The API server.
        let argv: Vec<String> = vec![
            bins.supervisor().display().to_string(),
            "kube-api".into(),
            "--listen".into(),
            api.to_string(),
            "--control".into(),
            control_socket.display().to_string(),
        ];
        let log = self.control_log("kube-api");
        self.spawn_node_process(&first.name, &argv, &log)?;
        crate::control::wait_for(opts.ready_timeout, "the API server to answer", &log, || {
            matches!(
                self.kube_request("GET", "/version", None, None),
                Ok((200, _))
            ) && std::os::unix::net::UnixStream::connect(&control_socket).is_ok()
        })?;
        progress(&format!(
            "started the Kubernetes API server (kube-fake) on {} at http://{api}; kubeconfig {}",
            first.name,
            kubeconfig.display()
        ));

        // Namespaces, nodes, the proxies' pods and tokens.
        let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for p in &self.state.pods {
            namespaces.entry(p.namespace.clone()).or_default();
        }
        for s in &self.state.services {
            namespaces.entry(s.namespace.clone()).or_default();
        }
        for (ns, labels) in namespaces.iter_mut() {
            match self.state.namespaces.get(ns) {
                Some(l) => labels.clone_from(l),
                // The file registry's meaning: not listed = enabled.
                None => {
                    labels.insert(
                        mesh_core::opt_in::MESH_KEY.into(),
                        mesh_core::opt_in::ENABLED.into(),
                    );
                }
            }
        }
        namespaces.insert(NAMESPACE.into(), BTreeMap::new());
        for (ns, labels) in &namespaces {
            self.kube_create(&json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels},
            }))?;
        }
        self.state.namespaces = namespaces
            .into_iter()
            .filter(|(n, _)| n != NAMESPACE)
            .collect();
        let mut node_uids = BTreeMap::new();
        for n in self.state.nodes.clone() {
            let node = self.kube_create(&json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
                "spec": {"podCIDR": n.pod_cidr},
                "status": {"addresses": [{"type": "InternalIP", "address": n.fabric_ip.to_string()}],
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))?;
            let uid = node
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            node_uids.insert(n.name.clone(), uid);
        }
        if let Some(k) = self.state.kube.as_mut() {
            k.node_uids = node_uids;
        }
        self.kube_create(&json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": PROXY_SERVICE_ACCOUNT, "namespace": NAMESPACE},
        }))?;
        for n in self.state.nodes.clone() {
            self.proxy_pod_and_token(&n.name, kube.token_ttl)?;
        }
        progress(&format!(
            "wrote {} nodes and their proxy pods with bound tokens (audience {CA_AUDIENCE})",
            self.state.nodes.len()
        ));

        // The app pods (the harness knows their addresses ahead: they are
        // the IPAM result the runtime would report), services, slices,
        // policies.
        for i in 0..self.state.pods.len() {
            let p = self.state.pods[i].clone();
            let stored = self.kube_create(&pod_object(&p))?;
            if let Some(uid) = stored.pointer("/metadata/uid").and_then(Value::as_str) {
                self.state.pods[i].uid = uid.to_owned();
            }
        }
        for s in self.state.services.clone() {
            self.kube_create(&json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace},
                "spec": {"clusterIP": s.vip.to_string(), "clusterIPs": [s.vip.to_string()],
                         "selector": s.selector,
                         "ports": s.ports.iter().map(|(p, t)| json!({
                             "name": format!("tcp-{p}"), "port": p, "targetPort": t, "protocol": "TCP"})).collect::<Vec<_>>()},
            }))?;
        }
        self.write_endpoint_slices()?;
        let mut policies = 0;
        if let Some(list) = opts.policies.as_ref().and_then(|p| p.as_sequence()) {
            for p in list {
                let v =
                    serde_json::to_value(p).map_err(|e| Error::Names(format!("policy: {e}")))?;
                self.kube_create(&v)?;
                policies += 1;
            }
        }
        self.state
            .save(&self.options.state_file(&self.state.mesh))?;
        progress(&format!(
            "wrote {} pods, {} services with their EndpointSlices and {policies} AuthorizationPolicies",
            self.state.pods.len(),
            self.state.services.len()
        ));

        // The CA, in cluster mode.
        let ca_dir = self.kube_ca_dir();
        let ca_argv: Vec<String> = vec![
            "env".into(),
            format!("KUBECONFIG={}", kubeconfig.display()),
            bins.ca.display().to_string(),
            "cluster".into(),
            "--trust-domain".into(),
            opts.trust_domain.clone(),
            "--namespace".into(),
            NAMESPACE.into(),
            "--work-dir".into(),
            ca_dir.display().to_string(),
            "--listen".into(),
            format!("0.0.0.0:{}", crate::control::CA_PORT),
        ];
        let ca_log = self.control_log("ca");
        self.spawn_node_process(&first.name, &ca_argv, &ca_log)?;
        // The proxies' --ca-bundle: what the CA's leader publishes in its
        // ConfigMap (root certificates only), written to a file as the
        // kubelet's ConfigMap volume does in a cluster.
        let cm_path = format!("/api/v1/namespaces/{NAMESPACE}/configmaps/{TRUST_BUNDLE_CONFIGMAP}");
        let mut published: Option<String> = None;
        crate::control::wait_for(
            opts.ready_timeout,
            &format!("the CA to publish ConfigMap {NAMESPACE}/{TRUST_BUNDLE_CONFIGMAP}"),
            &ca_log,
            || {
                published = self
                    .kube_get(&cm_path)
                    .ok()
                    .flatten()
                    .and_then(|cm| cm.pointer("/data/ca.crt")?.as_str().map(str::to_owned));
                published.is_some()
            },
        )?;
        let bundle = self.kube_trust_bundle_file();
        if let Some(dir) = bundle.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                what: "create the trust bundle directory",
                path: dir.to_owned(),
                source,
            })?;
        }
        crate::state::write_file(&bundle, published.unwrap_or_default().as_bytes())?;
        progress(&format!(
            "started the CA in cluster mode on {} (TokenReview; root in Secret {NAMESPACE}/sockmesh-ca-root; trust bundle from ConfigMap {NAMESPACE}/{TRUST_BUNDLE_CONFIGMAP} in {})",
            first.name,
            bundle.display()
        ));

        let nodes: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        for node in &nodes {
            self.start_proxy(node, bins, opts)?;
            progress(&format!(
                "started mesh-proxy on {node} (Kubernetes source; log {})",
                self.control_log(&format!("proxy-{node}")).display()
            ));
        }
        // The runtime: CNI ADD for every pod, once its proxy serves CNI.
        for node in &nodes {
            let sock = self.cni_socket(node);
            crate::control::wait_for(
                opts.ready_timeout,
                &format!("mesh-proxy on {node} to serve CNI at {}", sock.display()),
                &self.control_log(&format!("proxy-{node}")),
                || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
            )?;
        }
        let keys: Vec<String> = self.state.pods.iter().map(PodInfo::key).collect();
        for key in &keys {
            self.cni_add_retrying(key, opts.ready_timeout)?;
        }
        progress(&format!("CNI ADD of {} pods (mesh-cni)", keys.len()));
        for node in &nodes {
            self.wait_proxy_ready(node, opts.ready_timeout)?;
            progress(&format!("mesh-proxy on {node} is ready"));
        }
        Ok(())
    }

    /// Creates node `node`'s proxy Pod (host network, part of sockmesh)
    /// and writes its token file.
    fn proxy_pod_and_token(&mut self, node: &str, ttl: Duration) -> Result<(), Error> {
        let n = self.node(node)?.clone();
        let name = Self::proxy_pod_name(node);
        let pod = self.kube_create(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"app": "mesh-proxy", "app.kubernetes.io/part-of": "sockmesh"}},
            "spec": {"nodeName": node, "hostNetwork": true,
                     "serviceAccountName": PROXY_SERVICE_ACCOUNT,
                     "containers": [{"name": "mesh-proxy", "image": "sockmesh/mesh-proxy"}]},
            "status": {"phase": "Running", "podIP": n.fabric_ip.to_string(),
                       "podIPs": [{"ip": n.fabric_ip.to_string()}]},
        }))?;
        let uid = pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let node_uid = self
            .kube_info()?
            .node_uids
            .get(node)
            .cloned()
            .unwrap_or_default();
        let token = self.kube_hook(&Hook::MintToken {
            namespace: NAMESPACE.into(),
            service_account: PROXY_SERVICE_ACCOUNT.into(),
            audiences: vec![CA_AUDIENCE.into()],
            pod: Some((name, uid)),
            node: Some((node.to_owned(), node_uid)),
            expires_in: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        })?;
        let token = token["token"].as_str().unwrap_or("").to_owned();
        let file = self.kube_token_file(node);
        crate::state::write_file(&file, token.as_bytes())?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|source| Error::Io {
                what: "chmod token",
                path: file.clone(),
                source,
            })?;
        Ok(())
    }

    /// The proxy's command line in Kubernetes mode: `base` with the file
    /// registry and node token swapped for the API and the bound token.
    pub(crate) fn kube_proxy_argv(
        &self,
        node: &str,
        base: Vec<String>,
    ) -> Result<Vec<String>, Error> {
        let k = self.kube_info()?.clone();
        let mut argv = Vec::with_capacity(base.len() + 12);
        let mut it = base.into_iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--registry" | "--token-file" | "--ca-bundle" | "--cni-socket" => {
                    it.next();
                }
                _ => argv.push(a),
            }
        }
        argv.extend([
            "--registry-source".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            k.kubeconfig.display().to_string(),
            "--pod-name".into(),
            Self::proxy_pod_name(node),
            "--pod-namespace".into(),
            NAMESPACE.into(),
            "--api-stale-seconds".into(),
            k.api_stale_seconds.to_string(),
            "--token-file".into(),
            self.kube_token_file(node).display().to_string(),
            "--ca-bundle".into(),
            self.kube_trust_bundle_file().display().to_string(),
            "--cni-socket".into(),
            self.cni_socket(node).display().to_string(),
        ]);
        Ok(argv)
    }

    /// Rewrites every Service's EndpointSlice from the pods that exist
    /// (the EndpointSlice controller's job).
    fn write_endpoint_slices(&mut self) -> Result<(), Error> {
        for i in 0..self.state.services.len() {
            let s = self.state.services[i].clone();
            let eps: Vec<&PodInfo> = self
                .state
                .pods
                .iter()
                .filter(|p| {
                    p.namespace == s.namespace
                        && !s.selector.is_empty()
                        && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .collect();
            let endpoints: Vec<Value> = eps
                .iter()
                .map(|p| {
                    json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true},
                           "nodeName": p.node,
                           "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name, "uid": p.uid}})
                })
                .collect();
            self.state.services[i].endpoints = eps.iter().map(|p| p.key()).collect();
            let name = format!("{}-local", s.name);
            let object = json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": s.namespace,
                             "labels": {"kubernetes.io/service-name": s.name,
                                        "endpointslice.kubernetes.io/managed-by": MANAGER}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": s.ports.iter().map(|(p, t)| json!({"name": format!("tcp-{p}"), "port": t, "protocol": "TCP"})).collect::<Vec<_>>(),
            });
            let path = object_path("discovery.k8s.io/v1", "EndpointSlice", &s.namespace, &name);
            if self.kube_get(&path)?.is_some() {
                self.kube_patch(
                    &path,
                    &json!({"endpoints": object["endpoints"], "ports": object["ports"]}),
                )?;
            } else {
                self.kube_create(&object)?;
            }
        }
        Ok(())
    }

    /// Runs mesh-cni `command` (ADD, DEL, CHECK) for pod `key` as the
    /// container runtime does, inside the pod's node netns: `Ok(result)`,
    /// or `Err` with the plugin's CNI error object.
    pub fn cni(&self, command: &str, key: &str) -> Result<Result<Value, Value>, Error> {
        let p = self.pod(key)?.clone();
        let node = self.node(&p.node)?.clone();
        let bin = self.cni_binary();
        let mut ips = vec![
            json!({"address": format!("{}/32", p.ip), "gateway": node.gateway.to_string(), "interface": 0}),
        ];
        if let Some(v6) = p.ip6 {
            ips.push(json!({"address": format!("{v6}/128"), "interface": 0}));
        }
        let prev = json!({"cniVersion": "1.0.0",
                          "interfaces": [{"name": p.interface, "sandbox": p.netns_path()}],
                          "ips": ips});
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "sockmesh-local", "type": "mesh-cni",
            "socket": self.cni_socket(&p.node),
            "logFile": self.control_log(&format!("cni-{}", p.node)),
            "timeoutSeconds": 30,
        });
        if command != "DEL" || !p.uid.is_empty() {
            conf["prevResult"] = prev;
        }
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.netns_path().display()))
            .arg("--")
            .arg(&bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("sandbox-{}", p.uid))
            .env("CNI_NETNS", p.netns_path())
            .env("CNI_IFNAME", &p.interface)
            .env(
                "CNI_PATH",
                bin.parent().map(Path::to_path_buf).unwrap_or_default(),
            )
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                    p.namespace, p.name, p.uid
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("mesh-cni {command} {key}");
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            cmd: what.clone(),
            source,
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = crate::command::wait_output(child, Duration::from_secs(60), &what)?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            return Ok(Err(v));
        }
        if command == "ADD" {
            // The sandbox's network is up: kubelet reports the pod running
            // with its addresses.
            self.report_running(key)?;
        }
        Ok(Ok(v))
    }

    /// Sets pod `key`'s status to running with its addresses (kubelet's
    /// status update); once is enough, again changes nothing.
    pub fn report_running(&self, key: &str) -> Result<(), Error> {
        let p = self.pod(key)?;
        self.kube_patch(
            &format!("{}/status", self.pod_path(key)?),
            &json!({"status": pod_status(p)}),
        )?;
        Ok(())
    }

    fn cni_binary(&self) -> PathBuf {
        self.state
            .kube
            .as_ref()
            .map(|k| k.cni.clone())
            .unwrap_or_else(|| PathBuf::from("mesh-cni"))
    }

    /// CNI ADD of `key`, retried as a runtime retries a failed sandbox
    /// (the proxy may not have seen the pod in its watch yet), for up to
    /// `timeout`.
    pub fn cni_add_retrying(&self, key: &str, timeout: Duration) -> Result<Value, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.cni("ADD", key)? {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(pod = key, error = %e, "CNI ADD refused; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(Error::Command {
                        cmd: format!("mesh-cni ADD {key}"),
                        status: format!("code {}", e["code"]),
                        stderr: e["msg"].as_str().unwrap_or("").to_owned()
                            + " "
                            + e["details"].as_str().unwrap_or(""),
                    });
                }
            }
        }
    }

    /// Makes a pod the way a cluster does: the Pod object in the API
    /// (scheduled to `pod.node`, with its address), its network namespace
    /// (the primary network's job), then, with `cni`, mesh-cni ADD once
    /// (`Ok(Err(cni error))` when the plugin refuses: the caller decides
    /// whether to retry). Without `cni` the pod runs unannounced, as a pod
    /// that predates the mesh's install. Its cgroup carries the pod UID,
    /// as kubelet's do.
    pub fn add_pod(&mut self, pod: &Pod, cni: bool) -> Result<Result<Value, Value>, Error> {
        let mut t = self.topology_now();
        let mut new = pod.clone();
        new.uid = None;
        new.ips.clear();
        t.pods.push(new);
        let resolved = ipam::resolve(&t, self.state.ipv6, "new pod")?;
        let planned = resolved
            .pods
            .last()
            .cloned()
            .ok_or_else(|| Error::Names("no pod".into()))?;
        let mut info = crate::mesh::plan_pod(&self.state.mesh, &self.state.nodes, &planned)?;
        let stored = self.kube_create(&pod_object(&info))?;
        info.uid = stored
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        info.cgroup = info
            .cgroup
            .with_file_name(format!("{}_{}-pod{}", info.namespace, info.name, info.uid));
        let key = info.key();
        self.state
            .namespaces
            .entry(info.namespace.clone())
            .or_default();
        self.build_pod(info)?;
        self.write_endpoint_slices()?;
        self.state
            .save(&self.options.state_file(&self.state.mesh))?;
        if !cni {
            // Running, unannounced (it predates the mesh's install).
            self.report_running(&key)?;
            return Ok(Ok(Value::Null));
        }
        self.cni("ADD", &key)
    }

    /// Deletes a pod as a cluster does: CNI DEL, the Pod object, then its
    /// netns and cgroup.
    pub fn delete_pod(&mut self, key: &str) -> Result<(), Error> {
        let p = self.pod(key)?.clone();
        let del = self.cni("DEL", key)?;
        if let Err(e) = del {
            tracing::warn!(pod = key, error = %e, "CNI DEL failed");
        }
        self.kube_delete(&object_path("v1", "Pod", &p.namespace, &p.name))?;
        self.unbuild_pod(&p.namespace, &p.name)?;
        self.write_endpoint_slices()?;
        self.state.save(&self.options.state_file(&self.state.mesh))
    }

    /// The mesh as a topology, every address and uid explicit (for
    /// assigning a new pod's around them).
    fn topology_now(&self) -> crate::topology::Topology {
        let st = &self.state;
        crate::topology::Topology {
            nodes: st
                .nodes
                .iter()
                .map(|n| crate::topology::Node {
                    name: n.name.clone(),
                })
                .collect(),
            pods: st
                .pods
                .iter()
                .map(|p| Pod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    uid: Some(p.uid.clone()).filter(|u| !u.is_empty()),
                    node: p.node.clone(),
                    service_account: p.service_account.clone(),
                    ips: std::iter::once(std::net::IpAddr::V4(p.ip))
                        .chain(p.ip6.map(std::net::IpAddr::V6))
                        .collect(),
                    labels: p.labels.clone(),
                    annotations: BTreeMap::new(),
                })
                .collect(),
            services: Vec::new(),
            namespaces: Vec::new(),
        }
    }
}

/// A topology pod as a Kubernetes Pod, as scheduled: `Pending`, no
/// addresses yet (kubelet reports them once CNI ADD set the network up,
/// [`pod_status`]), owned by a ReplicaSet of the Deployment named after its
/// `app` label.
/// A pod's `status` once its network is up: running, with its addresses
/// (what kubelet reports after CNI ADD).
fn pod_status(p: &PodInfo) -> Value {
    let mut ips = vec![json!({"ip": p.ip.to_string()})];
    if let Some(v6) = p.ip6 {
        ips.push(json!({"ip": v6.to_string()}));
    }
    json!({"phase": "Running", "podIP": p.ip.to_string(), "podIPs": ips})
}

fn pod_object(p: &PodInfo) -> Value {
    let mut meta = json!({
        "name": p.name, "namespace": p.namespace,
        "labels": p.labels, "annotations": p.annotations,
    });
    if let Some(app) = p.labels.get("app") {
        let hash = format!(
            "{:010x}",
            crate::names::fnv64(app.as_bytes()) & 0xff_ffff_ffff
        );
        meta["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-{hash}"),
            "uid": crate::ipam::pod_uid(&p.namespace, &format!("rs-{app}")),
            "controller": true, "blockOwnerDeletion": true,
        }]);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                 "containers": [{"name": "app", "image": "sockmesh/local-app"}]},
        "status": {"phase": "Pending"},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_api_layout() {
        assert_eq!(
            object_path("v1", "Pod", "default", "web"),
            "/api/v1/namespaces/default/pods/web"
        );
        assert_eq!(
            object_path("v1", "Namespace", "", "other"),
            "/api/v1/namespaces/other"
        );
        assert_eq!(
            object_path("discovery.k8s.io/v1", "EndpointSlice", "default", ""),
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        );
        assert_eq!(
            object_path(
                "security.sockmesh.io/v1",
                "AuthorizationPolicy",
                "default",
                "deny"
            ),
            "/apis/security.sockmesh.io/v1/namespaces/default/authorizationpolicies/deny"
        );
    }

    #[test]
    fn hooks_read_as_json_lines() {
        let h: Hook = serde_json::from_str(r#"{"op":"go-away","seconds":30}"#).unwrap();
        assert_eq!(h, Hook::GoAway { seconds: 30 });
        assert!(serde_json::from_str::<Hook>(r#"{"op":"format-disk"}"#).is_err());
    }
}
