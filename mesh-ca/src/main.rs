#![forbid(unsafe_code)]
//! `mesh-ca`: the sockmesh certificate authority. Thin: parse and check the
//! configuration, build the runtime, call the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
#[cfg(feature = "kubernetes")]
use mesh_ca::TokenReviewAuthenticator;
#[cfg(feature = "kubernetes")]
use mesh_ca::cluster::{ClusterError, LeaderElection, RootSecret, TrustBundleConfigMap};
use mesh_ca::roots::{RootSource, RootStore};
use mesh_ca::server::ListenerLimits;
use mesh_ca::{Ca, CaConfig, CaServer, FileTokenAuthenticator, auth};
use mesh_core::registry::FileRegistry;
#[cfg(feature = "kubernetes")]
use mesh_kube::{KubeConfig, KubeRegistry};

const EXAMPLES: &str = "\
Examples:
  # Serve: generate a root on first start in the state dir, keep it after.
  mesh-ca --trust-domain cluster.local --state-dir /var/lib/sockmesh/ca \\
          --registry /etc/sockmesh/registry.yaml --listen 0.0.0.0:15012

  # Serve with a CA cert-manager wrote (tls.crt, tls.key, ca.crt in one dir).
  mesh-ca --trust-domain cluster.local --plugged-ca /etc/sockmesh/ca \\
          --tokens-dir /etc/sockmesh/node-tokens --registry /etc/sockmesh/registry.yaml

  # Create node-1's token (file mode 0600); its proxy presents it as a Bearer token.
  mesh-ca node-token --tokens-dir /var/lib/sockmesh/ca/node-tokens node-1

  # Rotate the generated root without downtime; a running CA picks each step up.
  mesh-ca root --state-dir /var/lib/sockmesh/ca --trust-domain cluster.local prepare
  #   ... wait until every proxy has fetched the new trust bundle, then:
  mesh-ca root --state-dir /var/lib/sockmesh/ca --trust-domain cluster.local activate
  #   ... wait until every certificate of the old root is renewed (one TTL), then:
  mesh-ca root --state-dir /var/lib/sockmesh/ca --trust-domain cluster.local retire

  # In a Kubernetes cluster (in-cluster config, or KUBECONFIG): proxies authenticate
  # with their projected token (audience sockmesh-ca), pods come from the API, the
  # root lives in Secret sockmesh-system/sockmesh-ca-root (created if absent), and
  # the leader publishes the roots (certificates only) in ConfigMap
  # sockmesh-system/sockmesh-trust-bundle, key ca.crt, for the proxies' --ca-bundle.
  mesh-ca cluster --trust-domain cluster.local --namespace sockmesh-system

Proxies trust <state-dir>/trust-bundle.pem (or ca.crt of a plugged CA) for the CA's
own TLS certificate; its names are set with --server-name.";

/// Signs short-lived SPIFFE X.509-SVIDs for meshed pods, over HTTPS (TLS 1.3),
/// for node proxies that prove which node they run on.
#[derive(Debug, Parser)]
#[command(name = "mesh-ca", version, after_help = EXAMPLES,
          args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Config {
    #[command(subcommand)]
    command: Option<Command>,

    /// Trust domain of the identities issued (spiffe://<trust-domain>/ns/…/sa/…).
    #[arg(long, required = true, value_name = "DOMAIN")]
    trust_domain: Option<String>,

    /// Keep a generated root (and, by default, the node tokens) in this directory.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "plugged_ca",
        conflicts_with = "plugged_ca"
    )]
    state_dir: Option<PathBuf>,

    /// Sign with the CA in this directory: tls.crt, tls.key, ca.crt (cert-manager layout).
    #[arg(long, value_name = "DIR")]
    plugged_ca: Option<PathBuf>,

    /// Directory of <node>.token files [default: <state-dir>/node-tokens].
    #[arg(long, value_name = "DIR")]
    tokens_dir: Option<PathBuf>,

    /// Workload registry file (nodes and pods), re-read when it changes.
    #[arg(long, required = true, value_name = "FILE")]
    registry: Option<PathBuf>,

    #[command(flatten)]
    serving: Serving,

    /// How often to look for changes of the registry and the root files.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    reload_interval: Duration,
}

/// How the CA serves, the same in both modes: listeners, their bounds,
/// certificate lifetimes and its own names.
#[derive(Debug, clap::Args)]
struct Serving {
    /// Address of the HTTPS API.
    #[arg(long, default_value = "0.0.0.0:15012", value_name = "ADDR")]
    listen: SocketAddr,

    /// Also serve /metrics in plain HTTP here (it is always on the HTTPS port too).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,

    /// Lifetime of certificates when the request names none (e.g. 24h, 90m, 3600s).
    #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    default_ttl: Duration,

    /// Longest lifetime a request may ask for; longer requests are refused. At most 30d.
    #[arg(long, default_value = "48h", value_parser = parse_duration, value_name = "DURATION")]
    max_ttl: Duration,

    /// DNS name or IP of the CA's own TLS certificate (repeatable).
    #[arg(long = "server-name", value_name = "NAME",
          default_values_t = ["mesh-ca".to_string(), "localhost".to_string(), "127.0.0.1".to_string()])]
    server_names: Vec<String>,

    /// A client must finish its TLS handshake and send its first request within this
    /// (also the bound on each later request's headers). At most 60s.
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "DURATION")]
    handshake_timeout: Duration,

    /// Connections open at once on each listener; more are reset at accept.
    #[arg(long, default_value_t = ListenerLimits::default().max_connections, value_name = "N")]
    max_connections: usize,

    /// Connections open at once from one source IP address; more are reset at accept.
    #[arg(long, default_value_t = ListenerLimits::default().max_connections_per_peer, value_name = "N")]
    max_connections_per_peer: usize,
}

impl Serving {
    /// Checks the values, puts the lifetimes and names into `ca_config`,
    /// and returns the listeners' bounds.
    fn apply(&self, ca_config: &mut CaConfig) -> Result<ListenerLimits> {
        if self.metrics_listen == Some(self.listen) {
            bail!("--metrics-listen {} is the same as --listen", self.listen);
        }
        ca_config.default_ttl = self.default_ttl;
        ca_config.max_ttl = self.max_ttl;
        ca_config.server_names = self.server_names.clone();
        ca_config.validate()?;
        let limits = ListenerLimits {
            handshake_timeout: self.handshake_timeout,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
        };
        limits.validate().map_err(|e| {
            anyhow::anyhow!(
                "{e} (set by --handshake-timeout, --max-connections, --max-connections-per-peer)"
            )
        })?;
        Ok(limits)
    }

    /// Binds the HTTPS API and, if asked, the plain metrics listener.
    async fn bind(&self, ca: &Ca, limits: &ListenerLimits) -> Result<(CaServer, Option<CaServer>)> {
        let server = CaServer::bind_with(ca.clone(), self.listen, limits).await?;
        let metrics = match self.metrics_listen {
            Some(addr) => Some(CaServer::bind_metrics_with(ca.clone(), addr, limits).await?),
            None => None,
        };
        Ok((server, metrics))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create (or replace) a node's token file and print its path.
    NodeToken {
        #[arg(long, value_name = "DIR")]
        tokens_dir: PathBuf,
        /// Node name, as in the registry.
        node: String,
    },
    /// Serve in a Kubernetes cluster: TokenReview, pods from the API, root in a Secret.
    #[cfg(feature = "kubernetes")]
    Cluster(Box<ClusterArgs>),
    /// Rotate the generated root, one step at a time.
    Root {
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        #[arg(long, value_name = "DOMAIN")]
        trust_domain: String,
        #[arg(value_enum)]
        step: RootStep,
    },
}

#[cfg(feature = "kubernetes")]
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// Trust domain of the identities issued.
    #[arg(long, value_name = "DOMAIN")]
    trust_domain: String,
    /// The mesh's namespace: the root Secret, the Lease and the proxies' service account.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sockmesh-system")]
    namespace: String,
    /// Secret holding the root (tls.crt, tls.key, ca.crt); created if absent, never overwritten.
    #[arg(long, default_value = "sockmesh-ca-root", value_name = "NAME")]
    root_secret: String,
    /// ConfigMap the leader publishes the trust bundle in (key ca.crt: the root
    /// certificates, PEM, never a key); kept equal to the roots, both during a rotation.
    #[arg(long, default_value = "sockmesh-trust-bundle", value_name = "NAME")]
    trust_bundle_configmap: String,
    /// How often the root Secret is read again (a rotation edits it) and the
    /// trust bundle ConfigMap checked.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    reload_interval: Duration,
    /// The node proxies' service account, `name` (in --namespace) or `namespace:name` (repeatable).
    #[arg(
        long = "proxy-service-account",
        default_value = "mesh-proxy",
        value_name = "SA"
    )]
    proxy_service_accounts: Vec<String>,
    /// The audience the proxies' projected tokens are minted for.
    #[arg(long, default_value = auth::CA_AUDIENCE)]
    audience: String,
    /// This replica's name in the leader Lease.
    #[arg(long, env = "POD_NAME", default_value = "mesh-ca")]
    identity: String,
    /// The leader Lease's name and duration.
    #[arg(long, default_value = "sockmesh-ca", value_name = "NAME")]
    lease: String,
    #[arg(long, default_value = "15s", value_parser = parse_duration, value_name = "DURATION")]
    lease_duration: Duration,
    /// Where the root is written for the signer (the key 0600).
    #[arg(long, default_value = "/var/run/sockmesh-ca", value_name = "DIR")]
    work_dir: PathBuf,
    #[command(flatten)]
    serving: Serving,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RootStep {
    /// Make a new root and trust it; the current root keeps signing.
    Prepare,
    /// Sign with the prepared root; the old one stays trusted.
    Activate,
    /// Stop trusting the previous roots.
    Retire,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d), e.g. 24h"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match config.command {
        Some(Command::NodeToken { tokens_dir, node }) => {
            auth::create_node_token(&tokens_dir, &node)
                .with_context(|| format!("creating the token of node {node}"))?;
            println!("{}", auth::node_token_path(&tokens_dir, &node).display());
            Ok(())
        }
        Some(Command::Root {
            state_dir,
            trust_domain,
            step,
        }) => {
            let store = RootStore::new(&state_dir);
            match step {
                RootStep::Prepare => store.prepare(&trust_domain, std::time::SystemTime::now()),
                RootStep::Activate => store.activate(&trust_domain),
                RootStep::Retire => store.retire(&trust_domain),
            }
            .with_context(|| format!("root {step:?} in {}", state_dir.display()))?;
            println!("{}", serde_json::to_string_pretty(&store.status()?)?);
            Ok(())
        }
        #[cfg(feature = "kubernetes")]
        Some(Command::Cluster(args)) => serve_cluster(*args),
        None => serve(config),
    }
}

#[cfg(feature = "kubernetes")]
fn serve_cluster(args: ClusterArgs) -> Result<()> {
    let proxies: Vec<(String, String)> = args
        .proxy_service_accounts
        .iter()
        .map(|sa| match sa.split_once(':') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (args.namespace.clone(), sa.clone()),
        })
        .collect();
    let mut ca_config = CaConfig::new(
        &args.trust_domain,
        RootSource::Plugged(args.work_dir.clone()),
    );
    let limits = args.serving.apply(&mut ca_config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
        let (leads, _election) = LeaderElection {
            client: client.clone(),
            namespace: args.namespace.clone(),
            name: args.lease.clone(),
            identity: args.identity.clone(),
            lease: args.lease_duration,
        }
        .run();
        let secret = RootSecret {
            namespace: args.namespace.clone(),
            name: args.root_secret.clone(),
        };
        let roots = loop {
            let may_create = *leads.borrow();
            match secret
                .load_or_create(&client, &args.trust_domain, &args.work_dir, may_create, std::time::SystemTime::now())
                .await
            {
                Ok(roots) => break roots,
                Err(e @ ClusterError::NotYet { .. }) => tracing::info!("{e}"),
                Err(e) => tracing::warn!(error = %e, "root Secret; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        ca_config.roots = roots;
        let registry = Arc::new(KubeRegistry::start(client.clone(), KubeConfig::for_ca()));
        if !registry.wait_synced(Duration::from_secs(60)).await {
            tracing::warn!(health = ?registry.health(), "pods not listed yet: sign requests are refused until they are");
        }
        let authenticator = TokenReviewAuthenticator::new(client.clone(), &args.audience, &proxies);
        let ca = Ca::new(ca_config, Arc::new(authenticator), registry.clone())?;
        let (server, metrics) = args.serving.bind(&ca, &limits).await?;
        let bundle = TrustBundleConfigMap {
            namespace: args.namespace.clone(),
            name: args.trust_bundle_configmap.clone(),
        };
        let mut tick = tokio::time::interval(args.reload_interval.max(Duration::from_secs(1)));
        loop {
            tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    r.context("waiting for a signal")?;
                    break;
                }
                _ = tick.tick() => {
                    let leads = *leads.borrow();
                    if let Err(e) = mesh_ca::cluster::sync_roots(&client, &secret, &bundle, &ca, &args.work_dir, leads).await {
                        tracing::warn!(error = %e, "root Secret and trust bundle; keeping the current roots, retrying");
                    }
                }
            }
        }
        tracing::info!("shutting down");
        server.shutdown().await;
        if let Some(m) = metrics {
            m.shutdown().await;
        }
        anyhow::Ok(())
    })
}

fn serve(config: Config) -> Result<()> {
    // Everything is checked and loaded before any socket is bound.
    let (Some(trust_domain), Some(registry_path)) = (config.trust_domain, config.registry) else {
        bail!("--trust-domain and --registry are required");
    };
    let (roots, tokens_dir) = match (config.state_dir, config.plugged_ca) {
        (Some(dir), None) => {
            let tokens = config.tokens_dir.unwrap_or_else(|| dir.join("node-tokens"));
            (RootSource::StateDir(dir), tokens)
        }
        (None, Some(dir)) => {
            let Some(tokens) = config.tokens_dir else {
                bail!(
                    "--tokens-dir is required with --plugged-ca {}",
                    dir.display()
                );
            };
            (RootSource::Plugged(dir), tokens)
        }
        _ => bail!("give exactly one of --state-dir and --plugged-ca"),
    };
    let mut ca_config = CaConfig::new(&trust_domain, roots);
    let limits = config.serving.apply(&mut ca_config)?;
    let registry = Arc::new(FileRegistry::load(&registry_path)?);
    let authenticator = FileTokenAuthenticator::load(&tokens_dir)
        .with_context(|| format!("loading node tokens from {}", tokens_dir.display()))?;
    if authenticator.nodes().next().is_none() {
        tracing::warn!(dir = %tokens_dir.display(), "no node tokens: every sign request will be refused");
    }
    let ca = Ca::new(ca_config, Arc::new(authenticator), registry.clone())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async move {
        let (server, metrics) = config.serving.bind(&ca, &limits).await?;
        let mut tick = tokio::time::interval(config.reload_interval);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick() => {
                    match registry.reload_if_changed() {
                        Ok(true) => tracing::info!(path = %registry.path().display(), "registry reloaded"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "registry reload failed; keeping the last good one"),
                    }
                    if let Err(e) = ca.reload_roots_if_changed() {
                        tracing::warn!(error = %e, "root reload failed; keeping the current roots");
                    }
                }
            }
        }
        tracing::info!("shutting down");
        server.shutdown().await;
        if let Some(m) = metrics {
            m.shutdown().await;
        }
        anyhow::Ok(())
    })
}
