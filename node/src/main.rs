//! `kiln`: the command line of a Kiln node.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln_node::config::Config;
use kiln_node::worker::bot::WorkerOptions;

/// mimalloc: FindMissingBlobs and the Action Cache allocate many small strings per call, and
/// glibc's malloc spent a quarter of FindMissingBlobs' time on them. Without transparent huge
/// pages (`no_thp`), which left a node's RSS three times as large after the benchmark.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: a remote execution and caching cluster for build tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags that override the configuration of a node.
#[derive(clap::Args)]
struct NodeOverrides {
    /// gRPC listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP listen address (metrics, status pages).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Data directory.
    #[arg(long)]
    data: Option<PathBuf>,
}

impl NodeOverrides {
    fn apply(self, cfg: &mut Config) {
        if let Some(l) = self.listen {
            cfg.node.listen = l;
        }
        if let Some(h) = self.http {
            cfg.node.http = h;
        }
        if let Some(d) = self.data {
            cfg.node.data_dir = d;
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// A single node for development: gRPC on 127.0.0.1:8980, HTTP on 127.0.0.1:9980, data in ./.kiln.
    Dev {
        #[command(flatten)]
        overrides: NodeOverrides,
    },
    /// Executes actions for a cluster: connects to the endpoints (in turn, failing over) as
    /// Remote Workers API bots.
    Worker {
        /// gRPC endpoints of cluster nodes, comma-separated (grpc://host:port).
        #[arg(long, value_delimiter = ',', required = true)]
        endpoint: Vec<String>,
        /// Actions run at once. Default: the number of CPUs.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Leases taken ahead while every slot is busy, so that a freed slot starts its next
        /// action at once (one bot session per slot and per prefetched lease). Worth it for a
        /// worker that is the only one, or for many short actions; with several workers a
        /// prefetched action waits behind this worker's running ones while others may be idle.
        #[arg(long, default_value_t = 0)]
        prefetch: usize,
        /// Work directory: action directories and the local content cache.
        #[arg(long, default_value = "./.kiln-worker")]
        work_dir: PathBuf,
        /// A platform property offered to actions, KEY=VALUE (repeatable).
        #[arg(long, value_parser = parse_property)]
        platform: Vec<(String, String)>,
        /// Stable worker name; bot ids are NAME-SLOT. Default: the host name.
        #[arg(long)]
        name: Option<String>,
        /// Instance name to register under.
        #[arg(long, default_value = "")]
        instance_name: String,
        /// Local content cache size in bytes.
        #[arg(long, default_value_t = 4 << 30)]
        cache_max_bytes: u64,
    },
    /// Cluster membership and health.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Build-event streams received through the Build Event Service.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
    /// One node as described by a configuration file (flags override it).
    Serve {
        /// The TOML configuration file (see scripts/config/node.toml).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        overrides: NodeOverrides,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Members, leader, term, applied index, ring version and each node's health.
    Status {
        /// Any node of the cluster (grpc://host:port).
        #[arg(long)]
        endpoint: String,
    },
    /// Adds a node (started with the same cluster config) as a voting member.
    Add {
        #[arg(long)]
        endpoint: String,
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's gRPC address as the others reach it (host:port).
        #[arg(long)]
        address: String,
    },
    /// Removes a member.
    Remove {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum EventsAction {
    /// Streams whose id (build_id.component.invocation_id) matches a regular expression.
    List {
        /// Any node of the cluster (grpc://host:port).
        #[arg(long, default_value = "grpc://127.0.0.1:8980")]
        endpoint: String,
        /// Regular expression searched for in the stream id (empty: every stream).
        #[arg(long = "match", default_value = "")]
        pattern: String,
        /// Streams shown at most.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// A stream's index entry and its events in sequence order.
    Show {
        /// The stream id, as `kiln events list` prints it.
        stream: String,
        #[arg(long, default_value = "grpc://127.0.0.1:8980")]
        endpoint: String,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn default_concurrency() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "kiln-worker".into())
}

async fn run_node(cfg: Config) -> anyhow::Result<()> {
    kiln_node::http::install_recorder();
    let node = kiln_node::server::start(cfg.clone()).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = cfg.worker.enabled.then(|| {
        let opts = WorkerOptions {
            endpoints: vec![format!("http://{}", node.grpc_addr)],
            concurrency: cfg.worker.concurrency.unwrap_or_else(default_concurrency),
            prefetch: cfg.worker.prefetch.unwrap_or(0),
            work_dir: cfg.worker.work_dir.clone().unwrap_or_else(|| cfg.node.data_dir.join("worker")),
            platform: cfg.worker.platform.clone().into_iter().collect(),
            name: format!("{}-node{}", host_name(), cfg.node.id),
            instance_name: String::new(),
            cache_max_bytes: cfg.worker.cache_max_bytes,
        };
        tokio::spawn(kiln_node::worker::bot::run(opts, stop_rx))
    });
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(w) = worker {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), w).await;
    }
    node.shutdown().await;
    Ok(())
}

async fn run_worker(opts: WorkerOptions) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let w = tokio::spawn(kiln_node::worker::bot::run(opts, stop_rx));
    tokio::select! {
        r = w => return r?,
        _ = shutdown_signal() => {}
    }
    tracing::info!("worker shutting down");
    let _ = stop_tx.send(true);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("kiln").build()?;
    match cli.command {
        Command::Dev { overrides } => {
            let mut cfg = Config::dev();
            overrides.apply(&mut cfg);
            // The embedded worker is the only one: nothing is kept from another worker.
            if cfg.worker.prefetch.is_none() {
                cfg.worker.prefetch = Some(cfg.worker.concurrency.unwrap_or_else(default_concurrency));
            }
            rt.block_on(run_node(cfg))
        }
        Command::Worker { endpoint, concurrency, prefetch, work_dir, platform, name, instance_name, cache_max_bytes } => {
            let opts = WorkerOptions {
                endpoints: endpoint,
                concurrency: concurrency.unwrap_or_else(default_concurrency),
                prefetch,
                work_dir,
                platform,
                name: name.unwrap_or_else(host_name),
                instance_name,
                cache_max_bytes,
            };
            rt.block_on(run_worker(opts))
        }
        Command::Cluster { action } => rt.block_on(kiln_node::cluster_cli::run(match action {
            ClusterAction::Status { endpoint } => kiln_node::cluster_cli::Action::Status { endpoint },
            ClusterAction::Add { endpoint, id, address } => kiln_node::cluster_cli::Action::Add { endpoint, id, address },
            ClusterAction::Remove { endpoint, id } => kiln_node::cluster_cli::Action::Remove { endpoint, id },
        })),
        Command::Events { action } => rt.block_on(kiln_node::events_cli::run(match action {
            EventsAction::List { endpoint, pattern, limit } => kiln_node::events_cli::Action::List { endpoint, pattern, limit },
            EventsAction::Show { stream, endpoint } => kiln_node::events_cli::Action::Show { endpoint, stream },
        })),
        Command::Serve { config, overrides } => {
            let mut cfg = Config::load(&config)?;
            overrides.apply(&mut cfg);
            rt.block_on(run_node(cfg))
        }
    }
}
