//! The command line: every command, its arguments and its help (each
//! teaches with an example).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const ROOT_HELP: &str = "\
Get started (as root):
  mesh up                                          # a 2-node mesh with demo apps, in seconds
  mesh exec default/client -- curl -s http://web:8080/
  mesh top                                         # live flows, counted by the kernel
  mesh explain other/iperf web.default:8080        # why is this connection refused?
  mesh down

In a Kubernetes cluster (the current kubeconfig context):
  mesh check --pre                                 # on a node: can it run the proxy?
  mesh install                                     # then: kubectl label ns NS sockmesh.io/mesh=enabled
  mesh check                                       # CA, every node proxy, every opted-in pod
  mesh uninstall

Exit codes (scripts can rely on them):
  0  success
  1  failure (the message says what failed and the value that made it fail);
     `mesh status` also exits 1 when it found problems
  2  usage: bad arguments or option values
  3  not root (the local mesh needs root)
  4  the mesh is not up (status, exec, ...) or already up (up)
  5  unknown pod, service or flow
  6  the machine lacks something the mesh needs (kernel feature, program);
     `mesh check --pre` exits 6 when a node check fails
  7  the Kubernetes API: no kubeconfig, server unreachable, or it refused
     (RBAC denied, an object owned by another field manager)
  130  interrupted (Ctrl-C during `mesh up` removes what it had built)
  `mesh exec` exits with its program's code (128+N when killed by signal N).

Colors only on a terminal; NO_COLOR=1 turns them off.";

#[derive(Debug, Parser)]
#[command(
    name = "mesh",
    version,
    about = "sockmesh: a sidecarless service mesh; this command runs a whole mesh on one Linux machine, or installs and checks one in a Kubernetes cluster",
    after_help = ROOT_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// The local mesh to act on: 1-16 lowercase letters and digits,
    /// starting with a letter.
    #[arg(long, global = true, env = "SOCKMESH_MESH", default_value = "demo")]
    pub name: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Clone, Copy, Default, Args)]
pub struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl OutputArg {
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a local mesh: node and pod namespaces, the CA, one proxy per node, demo apps.
    #[command(after_help = "\
Examples:
  mesh up                     # demo: 2 nodes, default/{client,web,web-2}, other/iperf, one DENY policy
                              # (default/legacy stays out of the mesh: annotation sockmesh.io/mesh: disabled)
  mesh up --nodes 4           # the demo on 4 nodes (more web pods)
  mesh up -f mesh.yaml --name lab
                              # your own nodes, pods, services and `policies:`
  mesh up --kubernetes --name kube
                              # the cluster path: a Kubernetes API server (kube-fake) holds the
                              # pods, services and policies; the CA uses TokenReview, the proxies
                              # watch the API, pods enroll through mesh-cni (ADD per pod)

Without -f, the web pods run `python3 -m http.server 8080`, other/iperf runs
`iperf3 -s`, and the policy `default/deny-other-to-web` denies namespace
`other` from reaching `app: web`. Everything stays up after `mesh up` exits;
`mesh down` removes it all.")]
    Up(UpArgs),

    /// Remove a local mesh: processes, namespaces, cgroups, eBPF pins, files. Safe to run twice.
    #[command(after_help = "\
Examples:
  mesh down                   # the mesh named demo
  mesh down lab               # or: mesh down --name lab")]
    Down(DownArgs),

    /// Run a program inside a pod (its network namespace, cgroup and /etc/hosts).
    #[command(after_help = "\
Examples:
  mesh exec default/client -- curl -s http://web:8080/
  mesh exec default/client -- iperf3 -c iperf.other -t 5
  mesh exec other/iperf -- curl -s -m 3 http://web.default:8080/     # denied by policy
  mesh exec client -- sh                                              # `client` = default/client

Service names resolve inside the pod (web, web.default,
web.default.svc.cluster.local). Stdin, stdout and stderr are the terminal's;
the exit code is the program's.")]
    Exec(ExecArgs),

    /// Nodes, proxies, pods (meshed?, identity, certificate expiry) and policies, with problems highlighted.
    #[command(after_help = "\
Examples:
  mesh status
  mesh status -o json | jq '.problems'

Exits 1 when it found problems (a proxy down or not ready, a pod not
enrolled, a certificate not valid).")]
    Status(StatusArgs),

    /// Live table of flows, counted by the kernel's flow maps on every node.
    #[command(after_help = "\
Examples:
  mesh top                           # refreshes every second; Ctrl-C quits
  mesh top --sort bytes
  mesh top --sort rtt                # the slowest workload pair first (RTT p99 across the fabric)
  mesh top --once                    # one snapshot (rates measured over --interval)
  mesh top --once -o json | jq '.flows[] | select(.bytes_sent > 0)'")]
    Top(TopArgs),

    /// Why a connection goes where it goes, or is refused: kernel, proxy and policy in one answer.
    #[command(after_help = "\
Examples:
  mesh explain default/client web:8080           # a Service in the pod's namespace
  mesh explain other/iperf web.default:8080      # names the policy and rule that deny it
  mesh explain default/client 10.77.2.2:8080     # an address
  mesh explain default/client                    # the pod's latest flows
  mesh explain --flow 4113                       # a flow id from `mesh top`")]
    Explain(ExplainArgs),

    /// A pod's certificate: SPIFFE ID, serial, validity, next renewal.
    #[command(after_help = "\
Examples:
  mesh certs default/client
  mesh certs web -o json")]
    Certs(CertsArgs),

    /// Print every Kubernetes object sockmesh installs, as YAML (what deploy/sockmesh.yaml holds).
    #[command(after_help = crate::install::MANIFEST_HELP)]
    Manifest(ManifestArgs),

    /// Install sockmesh in a Kubernetes cluster (server-side apply), then wait for the CA and every node proxy.
    #[command(after_help = crate::install::INSTALL_HELP)]
    Install(InstallArgs),

    /// Remove everything `mesh install` made (the CRDs only with --crds).
    #[command(after_help = crate::install::UNINSTALL_HELP)]
    Uninstall(UninstallArgs),

    /// Check a cluster's sockmesh (CA, node proxies, pods), or with --pre this node's kernel and host.
    #[command(after_help = crate::check::CHECK_HELP)]
    Check(CheckArgs),

    /// Print the version.
    #[command(after_help = "Example:\n  mesh version -o json")]
    Version(VersionArgs),

    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  mesh completions bash > /etc/bash_completion.d/mesh
  mesh completions zsh > \"${fpath[1]}/_mesh\"")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// A topology file (nodes, pods, services, and optional `policies:`);
    /// without it, the demo topology and its apps.
    #[arg(short = 'f', long = "file", value_name = "mesh.yaml")]
    pub file: Option<PathBuf>,

    /// Number of nodes of the demo topology (1-26).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=26), conflicts_with = "file")]
    pub nodes: u8,

    /// How long to wait for each proxy to become ready, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub ready_timeout: u64,

    /// Run the Kubernetes path: a fake API server (kube-fake) on the first
    /// node holds nodes, namespaces, pods, services, EndpointSlices and
    /// policies; the CA runs `mesh-ca cluster` (TokenReview); the proxies
    /// read the API (`--registry-source kubernetes`) and each pod enrolls
    /// through mesh-cni ADD, as in a cluster. Its kubeconfig is
    /// <state>/control/kubeconfig (run kubectl inside the first node's netns).
    #[arg(long)]
    pub kubernetes: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DownArgs {
    /// The mesh to remove (default: --name). Its own id, so that the
    /// global `--name` still works after `down`.
    #[arg(id = "mesh", value_name = "NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// The pod: NAMESPACE/NAME, or NAME in namespace default.
    pub pod: String,

    /// The program and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<OsString>,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// Bytes per second, both ways (highest first).
    Rate,
    /// Bytes moved, both ways (most first).
    Bytes,
    /// Age (newest first).
    Age,
    /// p99 round-trip time of the flow's tunnels across the fabric
    /// (slowest first): the slow pair is on top.
    Rtt,
}

#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// Print one snapshot and exit.
    #[arg(long)]
    pub once: bool,

    /// Stop after this many refreshes (default: until Ctrl-C on a
    /// terminal, 1 otherwise).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,

    /// Seconds between refreshes (rates are measured over it).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,

    /// Sort order.
    #[arg(long, value_enum, default_value_t = SortKey::Rate)]
    pub sort: SortKey,

    /// Also show closed flows still in the kernel's flow map (shown by
    /// default with --once).
    #[arg(long)]
    pub all: bool,

    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The source pod: NAMESPACE/NAME, or NAME in namespace default.
    #[arg(required_unless_present = "flow", conflicts_with = "flow")]
    pub pod: Option<String>,

    /// The destination: IP:PORT, SERVICE:PORT, SERVICE.NAMESPACE:PORT or
    /// POD.NAMESPACE:PORT (default: the pod's latest flows).
    pub dest: Option<String>,

    /// A flow id (the kernel's socket cookie, as `mesh top` shows it).
    #[arg(long, value_name = "ID")]
    pub flow: Option<u64>,

    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    /// The pod: NAMESPACE/NAME, or NAME in namespace default.
    pub pod: String,

    #[command(flatten)]
    pub output: OutputArg,
}

/// What the manifests are built with (`mesh manifest` and `mesh install`).
#[derive(Debug, Clone, Args)]
pub struct ManifestOptions {
    /// The mesh's namespace (the CA, the node DaemonSet, the root Secret).
    #[arg(
        long = "mesh-namespace",
        default_value = "sockmesh-system",
        value_name = "NS"
    )]
    pub namespace: String,
    /// Image prefix: images are PREFIX/mesh-proxy:TAG, PREFIX/mesh-ca:TAG, PREFIX/mesh-cni:TAG.
    #[arg(long, default_value = "localhost/sockmesh", value_name = "PREFIX")]
    pub image_prefix: String,
    /// Image tag (default: this version).
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub tag: String,
    /// Trust domain of the workload identities.
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    pub trust_domain: String,
    /// Also a ServiceMonitor for the Prometheus operator.
    #[arg(long)]
    pub service_monitor: bool,
    /// The node's CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin", value_name = "DIR")]
    pub cni_bin_dir: String,
    /// The node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d", value_name = "DIR")]
    pub cni_conf_dir: String,
    /// The cgroup the node proxy attaches to: `kubelet` (found from the
    /// kubelet's cgroup layout) or a path under the host's /sys/fs/cgroup.
    #[arg(long, default_value = "kubelet", value_name = "kubelet|PATH")]
    pub proxy_cgroup: String,
}

#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// How long one request to the API server may take, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub request_timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ManifestArgs {
    #[command(flatten)]
    pub manifest: ManifestOptions,
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub manifest: ManifestOptions,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print what would change (created, changed, unchanged) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not wait for the CA and the node proxies to be ready.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the rollout, in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub manifest: ManifestOptions,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Also delete the CRDs (and with them every AuthorizationPolicy in the cluster).
    #[arg(long)]
    pub crds: bool,
    /// Print what would be deleted and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Check this node before installing: kernel, BTF, cgroup v2, bpffs,
    /// the CNI conf dir, privileges, and the cgroup the proxy would attach to.
    #[arg(long)]
    pub pre: bool,
    /// With --pre: the root of the cgroup2 tree to inspect.
    #[arg(long, default_value = "/sys/fs/cgroup", value_name = "DIR")]
    pub cgroup_root: PathBuf,
    /// With --pre: the CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d", value_name = "DIR")]
    pub cni_conf_dir: PathBuf,
    /// The mesh's namespace.
    #[arg(
        long = "mesh-namespace",
        default_value = "sockmesh-system",
        value_name = "NS"
    )]
    pub namespace: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct VersionArgs {
    #[command(flatten)]
    pub output: OutputArg,
}

/// `mesh supervise`: not a user command (hidden from `mesh --help`). The
/// local mesh starts one per node, where the proxy runs; it runs the proxy
/// and restarts it when it crashes (see `mesh_local::supervise`). `main`
/// dispatches on it before parsing [`Cli`]; `mesh_local::supervise::Config::to_args`
/// writes this command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "mesh supervise",
    hide = true,
    about = "Run a node's proxy and restart it when it crashes (started by `mesh up`)",
    after_help = "Example (as the local mesh starts it):\n  mesh supervise --node node-a --record R --hold H --kick K --mesh-state S -- mesh-proxy ..."
)]
pub struct SuperviseArgs {
    /// The node whose proxy this is.
    #[arg(long)]
    pub node: String,
    /// The record file (restarts, last exit, the proxy's pid).
    #[arg(long, value_name = "FILE")]
    pub record: PathBuf,
    /// While this file exists, a crashed proxy stays down.
    #[arg(long, value_name = "FILE")]
    pub hold: PathBuf,
    /// When this file appears, a backoff ends at once.
    #[arg(long, value_name = "FILE")]
    pub kick: PathBuf,
    /// The mesh's state file: when it is gone, the supervisor stops.
    #[arg(long, value_name = "FILE")]
    pub mesh_state: PathBuf,
    #[arg(long, default_value_t = 500, value_name = "MS")]
    pub backoff_initial_ms: u64,
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub backoff_max_ms: u64,
    /// A proxy that ran this long starts the backoff over.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    pub healthy_after_ms: u64,
    /// How long a proxy may drain when the supervisor gets SIGTERM.
    #[arg(long, default_value_t = 15_000, value_name = "MS")]
    pub stop_timeout_ms: u64,
    /// The proxy's program and arguments (after `--`).
    #[arg(required = true, last = true, value_name = "PROXY")]
    pub proxy: Vec<OsString>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn supervise_reads_the_command_line_the_harness_writes() {
        use mesh_local::supervise::{Config, RestartPolicy};
        use std::time::Duration;
        let cfg = Config {
            node: "node-a".into(),
            argv: vec!["/t/mesh-proxy".into(), "--node".into(), "node-a".into()],
            record: "/run/x/r.json".into(),
            hold: "/run/x/h".into(),
            kick: "/run/x/k".into(),
            mesh_state: "/run/x/state.json".into(),
            policy: RestartPolicy {
                initial: Duration::from_millis(100),
                ..RestartPolicy::default()
            },
        };
        let argv = std::iter::once(OsString::from("mesh supervise")).chain(cfg.to_args());
        let a = SuperviseArgs::try_parse_from(argv).unwrap();
        assert_eq!(a.node, "node-a");
        assert_eq!(a.mesh_state, PathBuf::from("/run/x/state.json"));
        assert_eq!((a.backoff_initial_ms, a.backoff_max_ms), (100, 10_000));
        assert_eq!(a.proxy, cfg.argv);
        SuperviseArgs::command().debug_assert();
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_teaches_with_an_example() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains("mesh "),
                "`mesh {} --help` has no example",
                sub.get_name()
            );
        }
    }

    #[test]
    fn exec_takes_everything_after_the_pod() {
        let cli = Cli::parse_from([
            "mesh",
            "exec",
            "default/client",
            "--",
            "curl",
            "-s",
            "http://web:8080/",
        ]);
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.pod, "default/client");
        assert_eq!(a.command, ["curl", "-s", "http://web:8080/"]);
        let cli = Cli::parse_from(["mesh", "--name", "x1", "exec", "client", "ls", "-l"]);
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!((cli.name.as_str(), a.command.len()), ("x1", 2));
    }

    #[test]
    fn global_options_work_after_any_verb() {
        let cli = Cli::parse_from(["mesh", "down", "--name", "x1"]);
        let Command::Down(a) = &cli.command else {
            panic!("not down")
        };
        assert_eq!((cli.name.as_str(), a.name.as_deref()), ("x1", None));
        let cli = Cli::parse_from(["mesh", "down", "lab"]);
        let Command::Down(a) = &cli.command else {
            panic!("not down")
        };
        assert_eq!(a.name.as_deref(), Some("lab"));
        for verb in [
            &["status"][..],
            &["top", "--once"],
            &["certs", "web"],
            &["exec", "client", "ls"],
            &["version"],
            &["manifest"],
            &["install"],
            &["uninstall"],
            &["check", "--pre"],
            &["up"],
        ] {
            let mut argv = vec!["mesh"];
            argv.extend_from_slice(verb);
            if verb[0] == "exec" {
                argv.insert(2, "--name");
                argv.insert(3, "x2");
            } else {
                argv.extend(["--name", "x2"]);
            }
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(cli.name, "x2", "{argv:?}");
        }
    }

    #[test]
    fn usage_errors_exit_2() {
        let e = Cli::try_parse_from(["mesh", "top", "--sort", "nope"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = Cli::try_parse_from(["mesh", "explain"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
