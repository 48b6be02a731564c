//! `mesh-proxy`: the sockmesh node proxy. Thin: parse and check the
//! configuration, set up logging, run the library.

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_proxy::config::{Config, InboundMode, SourceKind};
use mesh_proxy::run::{LogControl, run};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

/// jemalloc, not glibc malloc: glibc serves the data path's large,
/// short-lived buffers with mmap/munmap each time, and page faults took
/// ~15% of HBONE's CPU; with jemalloc the same tunnel moves ~2x the bytes at
/// ~40% less CPU per GiB (`./x bench hbone`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "sockmesh node proxy: carries this node's meshed pods' TCP over mutual TLS (HBONE)",
    long_about = "sockmesh node proxy. Enrolls the meshed pods the registry places on --node: opens \
their in-pod listeners (15001 outbound, 15006 inbound plaintext, 15008 HBONE), enrolls their \
network namespaces with the eBPF redirect, obtains their certificates from the CA, and carries \
their connections to other nodes' proxies over mTLS.\n\n\
The registry is a YAML file (--registry-source file, the default: the local mesh) or the \
Kubernetes API (--registry-source kubernetes): pods, namespaces, services, endpointslices and \
authorizationpolicies, watched (pods of every node: routing needs them; the pods of --node are \
enrolled); a pod is meshed when its \
annotation sockmesh.io/mesh is \"enabled\" or its namespace's label sockmesh.io/mesh is \
\"enabled\" (the pod's \"disabled\" wins); the proxy writes each pod's annotation \
sockmesh.io/status (server-side apply, field manager sockmesh-node) and Warning Events on \
failures. Readiness (:15021/healthz/ready) says not ready until the API is synced, and once no \
list/watch succeeded for --api-stale-seconds; the last known state keeps being served.\n\n\
Example, in a Kubernetes DaemonSet (POD_NAME, POD_NAMESPACE and NODE_NAME from the downward API; \
the token projected for audience sockmesh-ca):\n  \
mesh-proxy --registry-source kubernetes --node \"$NODE_NAME\" \\\n    \
--ca mesh-ca.sockmesh.svc:15012 --ca-server-name mesh-ca.sockmesh.svc \\\n    \
--ca-bundle /var/run/secrets/sockmesh/ca/ca.crt \\\n    \
--token-file /var/run/secrets/sockmesh/token \\\n    \
--cgroup kubelet --cni-socket /var/run/sockmesh/cni.sock\n\n\
Example, against a test API server with a kubeconfig file:\n  \
mesh-proxy --registry-source kubernetes --kubeconfig /run/sockmesh/kube/kubeconfig \\\n    \
--node node-a --pod-name mesh-proxy-node-a --pod-namespace sockmesh ...\n\n\
Example (what `mesh up` runs in each node namespace):\n  \
mesh-proxy --node node-a --registry /run/sockmesh/demo/registry.yaml \\\n    \
--ca 10.77.0.254:15012 --ca-bundle /run/sockmesh/demo/ca/trust-bundle.pem \\\n    \
--token-file /run/sockmesh/demo/tokens/node-a.token \\\n    \
--cgroup /sys/fs/cgroup/unified/sockmesh-demo/node-node-a --pin-root /sys/fs/bpf/sockmesh-demo-node-a"
)]
struct Args {
    /// This node's name in the registry (Kubernetes: the Node, the pods'
    /// spec.nodeName).
    #[arg(long)]
    node: String,
    /// Where workloads come from: `file` (--registry) or `kubernetes`
    /// (the API server: see --kubeconfig).
    #[arg(long, default_value = "file", value_name = "file|kubernetes")]
    registry_source: SourceKind,
    /// Registry file (nodes, pods, services, policies); re-read when it
    /// changes. Required with --registry-source file, refused otherwise.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// kubeconfig for --registry-source kubernetes. Unset: $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The proxy's own pod (never meshed), with --pod-namespace.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// The namespace of the proxy's own pod.
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// Seconds without a successful list/watch of the Kubernetes API after
    /// which readiness reports the registry stale (its last state stays in
    /// force: nothing is unenrolled because the API is unreachable).
    #[arg(long, default_value_t = 60)]
    api_stale_seconds: u64,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Address of the CA's signing port: IP:PORT, [IPv6]:PORT, or HOST:PORT with a
    /// DNS name (resolved at each connect, every address tried), e.g.
    /// mesh-ca.sockmesh-system.svc:15012. The TLS name is --ca-server-name.
    #[arg(long, value_name = "HOST:PORT")]
    ca: mesh_proxy::identity::CaAddress,
    /// Name on the CA's serving certificate.
    #[arg(long, default_value = "mesh-ca")]
    ca_server_name: String,
    /// PEM roots that verify the CA (its trust bundle file).
    #[arg(long)]
    ca_bundle: PathBuf,
    /// This node's CA token file, read again for every request to the CA
    /// (a projected ServiceAccount token rotates).
    #[arg(long)]
    token_file: PathBuf,
    /// cgroup v2 directory holding this node's pods and this proxy; or, in
    /// a cluster, `kubelet` (the kubelet's pod cgroup, kubepods.slice or
    /// kubepods, under --cgroup-root), `kubelet:systemd`, `kubelet:cgroupfs`,
    /// or a path relative to --cgroup-root. Never one that misses the
    /// proxy's own pod.
    #[arg(long, value_name = "DIR|kubelet")]
    cgroup: PathBuf,
    /// Where the host's cgroup2 tree is mounted (for --cgroup kubelet).
    #[arg(long, default_value = "/sys/fs/cgroup", value_name = "DIR")]
    cgroup_root: PathBuf,
    /// bpffs directory for this node's pinned programs and maps.
    #[arg(long, default_value = "/sys/fs/bpf/sockmesh")]
    pin_root: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness: SocketAddr,
    /// STRICT refuses plaintext to meshed pods; PERMISSIVE forwards it.
    #[arg(long, default_value = "STRICT")]
    inbound_mode: InboundMode,
    /// Data-plane worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Log filter (RUST_LOG syntax); switchable at run time on the admin port.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// Seconds SIGTERM waits for open connections.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
    /// File where TCP metric totals persist, so `istio_tcp_*` counters
    /// continue across a restart (written atomically at scrapes and on
    /// shutdown). Unset: counters restart from zero with the proxy.
    #[arg(long)]
    metrics_state: Option<std::path::PathBuf>,
    /// Seconds the series of a workload that is gone stay exported.
    #[arg(long, default_value_t = 3600)]
    metrics_retention_seconds: u64,
    /// Seconds an inbound HBONE connection has to finish its mTLS
    /// handshake before it is closed.
    #[arg(long, default_value_t = 3)]
    hbone_handshake_seconds: u64,
    /// HBONE connections open at once on this node (over it: reset
    /// before TLS).
    #[arg(long, default_value_t = 4096)]
    hbone_max_connections: usize,
    /// HBONE connections open at once from one source address.
    #[arg(long, default_value_t = 256)]
    hbone_max_connections_per_peer: usize,
    /// Seconds an HBONE connection with no open tunnel stays open.
    #[arg(long, default_value_t = 120)]
    hbone_idle_seconds: u64,
    /// Seconds a tunnel that moves no byte either way stays open.
    #[arg(long, default_value_t = 3600)]
    tunnel_idle_seconds: u64,
    /// Unix socket where the mesh-cni plugin hands over new pods
    /// (e.g. /var/run/sockmesh/cni.sock). Off by default.
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    /// Kernel TCP histograms (tunnel RTT, retransmits, connection
    /// durations: the sockmesh_tcp_* metrics, `mesh top` RTT): `on` or
    /// `off`. Off, the kernel records nothing and new tunnels get no
    /// per-ACK callback (e.g. `--tcp-histograms off` to measure the cost).
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, hide_possible_values = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    tcp_histograms: bool,
    /// The kernel same-node path: `on` or `off`. On, once this proxy has
    /// allowed a connection between two pods of this node (same checks and
    /// policy as a tunnel), later connects of that pod to that address and
    /// port go straight to the pod in the kernel (no proxy copy), for as
    /// long as nothing in the registry, policies or enrollment changes and
    /// the proxy is up; the access log and metrics still record them.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, hide_possible_values = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    same_node_direct: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mesh-proxy: --log {:?}: {e}", args.log);
            return std::process::ExitCode::from(2);
        }
    };
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_ansi(false))
        .init();
    let log = LogControl {
        set: Box::new(move |f: &str| {
            let new = EnvFilter::try_new(f)?;
            Ok(handle.modify(|cur| *cur = new)?)
        }),
        current: Mutex::new(args.log.clone()),
    };
    let cgroup = match mesh_core::kubelet_cgroup::resolve_flag(&args.cgroup, &args.cgroup_root) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-proxy: --cgroup {}: {e}", args.cgroup.display());
            return std::process::ExitCode::from(2);
        }
    };
    let cfg = Config {
        node: args.node,
        registry_source: args.registry_source,
        registry: args.registry,
        kubeconfig: args.kubeconfig,
        pod_name: args.pod_name,
        pod_namespace: args.pod_namespace,
        api_stale_after: Duration::from_secs(args.api_stale_seconds),
        trust_domain: args.trust_domain,
        ca_addr: args.ca,
        ca_server_name: args.ca_server_name,
        ca_bundle: args.ca_bundle,
        token_file: args.token_file,
        cgroup,
        pin_root: args.pin_root,
        admin_addr: args.admin,
        metrics_addr: args.metrics,
        readiness_addr: args.readiness,
        inbound_mode: args.inbound_mode,
        workers: args.workers,
        registry_poll: Duration::from_millis(500),
        drain_deadline: Duration::from_secs(args.drain_seconds),
        metrics_state: args.metrics_state,
        metrics_retention: Duration::from_secs(args.metrics_retention_seconds),
        hbone_limits: mesh_proxy::hbone::ServerLimits {
            handshake_timeout: Duration::from_secs(args.hbone_handshake_seconds),
            max_connections: args.hbone_max_connections,
            max_connections_per_peer: args.hbone_max_connections_per_peer,
            connection_idle_timeout: Duration::from_secs(args.hbone_idle_seconds),
            tunnel_idle_timeout: Duration::from_secs(args.tunnel_idle_seconds),
        },
        h2: mesh_proxy::hbone::H2Config::default(),
        dial_timeout: mesh_proxy::config::DEFAULT_DIAL_TIMEOUT,
        cni_socket: args.cni_socket,
        tcp_histograms: args.tcp_histograms,
        same_node_direct: args.same_node_direct,
    };
    match run(cfg, log) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "mesh-proxy failed");
            eprintln!("mesh-proxy: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
