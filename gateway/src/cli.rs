//! `infermesh <command>`: every service of the mesh from one binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use infermesh_auth::AuthConfig;
use infermesh_billing::BillingConfig;
use infermesh_registry::RegistryConfig;
use infermesh_service::shutdown_signal;
use infermesh_worker::WorkerConfig;
use tokio::net::{TcpListener, TcpSocket};

use crate::up::UpArgs;
use crate::{GatewayConfig, PeerAddresses};

#[derive(Debug, Parser)]
#[command(
    name = "infermesh",
    version,
    about = "An OpenAI-compatible inference platform: gateway, auth, billing, registry, rate limits and candle workers."
)]
pub struct Cli {
    /// OTLP gRPC endpoint for traces (e.g. http://localhost:4317 for Jaeger).
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole mesh in one process (each service on its own loopback port).
    Up(Box<UpArgs>),
    /// The OpenAI HTTP gateway.
    Gateway(GatewayArgs),
    /// Accounts and API keys.
    Auth {
        #[arg(long, env = "INFERMESH_AUTH_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
        /// NATS server for key events (revocations reach every gateway at
        /// once); none means gateways wait out their key cache TTL.
        #[arg(long = "nats-url", env = "INFERMESH_NATS_URL")]
        nats_url: Option<String>,
        #[command(flatten)]
        config: AuthConfig,
    },
    /// Prepaid credit.
    Billing {
        #[arg(long, env = "INFERMESH_BILLING_LISTEN", default_value = "127.0.0.1:50052")]
        listen: String,
        /// NATS server for usage events; none means no events.
        #[arg(long = "nats-url", env = "INFERMESH_NATS_URL")]
        nats_url: Option<String>,
        #[command(flatten)]
        config: BillingConfig,
    },
    /// Model catalogue and worker pool.
    Registry {
        #[arg(long, env = "INFERMESH_REGISTRY_LISTEN", default_value = "127.0.0.1:50053")]
        listen: String,
        /// NATS server where catalogue edits are announced
        /// (`catalog.changed.v1`); gateways follow the registry's stream.
        #[arg(long = "nats-url", env = "INFERMESH_NATS_URL")]
        nats_url: Option<String>,
        #[command(flatten)]
        config: RegistryConfig,
    },
    /// Per-key rate limits.
    Ratelimit {
        #[arg(long, env = "INFERMESH_RATELIMIT_LISTEN", default_value = "127.0.0.1:50054")]
        listen: String,
    },
    /// Async jobs: the queue, retries with backoff, the dead letter (the
    /// gateways' job runners run them).
    Jobs {
        #[arg(long, env = "INFERMESH_JOBS_LISTEN", default_value = "127.0.0.1:50056")]
        listen: String,
        /// NATS server for `jobs.completed.v1` and `jobs.dead.v1`; none means no events.
        #[arg(long = "nats-url", env = "INFERMESH_NATS_URL")]
        nats_url: Option<String>,
        #[command(flatten)]
        config: infermesh_jobs::JobsConfig,
    },
    /// Inference on candle (CPU, or CUDA when built with `--features cuda`).
    Worker {
        #[arg(long, env = "INFERMESH_WORKER_LISTEN", default_value = "127.0.0.1:50055")]
        listen: String,
        #[command(flatten)]
        config: WorkerConfig,
    },
    /// Download and verify the default models into the models dir, then exit.
    FetchModels {
        #[command(flatten)]
        config: WorkerConfig,
    },
    /// Operator key commands against a running mesh (show, list, create,
    /// revoke, update limits), over gRPC to auth.
    Keys(crate::keys_cli::KeysArgs),
    /// Usage and credit events from NATS JetStream (`usage tail`: a durable
    /// consumer that prints them and resumes where it stopped).
    Usage(crate::usage_cli::UsageArgs),
    /// Measure the engine alone: prefill, then batched decode at several
    /// stream counts (tests/bench/engine.sh compares with llama.cpp).
    Bench(crate::up::BenchArgs),
    /// Measure admission: Acquire calls per second and their latency over
    /// loopback gRPC (tests/bench/ratelimit.sh adds the per-request overhead).
    BenchRatelimit(crate::bench_ratelimit::RateLimitBenchArgs),
    /// Measure the ledger: durable reserve + settle pairs per second.
    BenchBilling(crate::bench_billing::BillingBenchArgs),
    /// Latency the upstream-provider path adds: the same streamed request
    /// straight to an upstream and through a gateway in front of it.
    BenchProxy(crate::bench_proxy::ProxyBenchArgs),
    /// The async queue: jobs per second through the jobs service alone,
    /// what queueing adds to one short completion, and a saturating burst.
    BenchJobs(crate::bench_jobs::JobsBenchArgs),
    /// An instant OpenAI-compatible upstream (a fixed answer, whole or
    /// streamed with usage) for overhead benchmarks.
    MockUpstream(crate::mock_upstream::MockUpstreamArgs),
}

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    #[arg(long, env = "INFERMESH_HTTP", default_value = "127.0.0.1:8080")]
    pub http: String,
    #[arg(long = "auth-addr", env = "INFERMESH_AUTH_ADDR", default_value = "127.0.0.1:50051")]
    pub auth: String,
    #[arg(long = "billing-addr", env = "INFERMESH_BILLING_ADDR", default_value = "127.0.0.1:50052")]
    pub billing: String,
    #[arg(long = "registry-addr", env = "INFERMESH_REGISTRY_ADDR", default_value = "127.0.0.1:50053")]
    pub registry: String,
    /// Ratelimit replicas, comma-separated: each key is owned by one of
    /// them (rendezvous hashing), so give every gateway the same list.
    #[arg(long = "ratelimit-addr", env = "INFERMESH_RATELIMIT_ADDR", default_value = "127.0.0.1:50054")]
    pub ratelimit: String,
    /// The jobs service behind `/queue/v1/`; this gateway also runs its
    /// jobs (`--job-runner-slots` at a time). Unset: no queue routes.
    #[arg(long = "jobs-addr", env = "INFERMESH_JOBS_ADDR")]
    pub jobs: Option<String>,
    /// NATS server whose key events evict cached keys; none means a cached
    /// key is trusted for `--key-cache-ms`.
    #[arg(long = "nats-url", env = "INFERMESH_NATS_URL")]
    pub nats_url: Option<String>,
    #[command(flatten)]
    pub config: GatewayConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("{0}")]
    Service(String),
}

/// Connections the kernel queues until they are accepted (capped by
/// `net.core.somaxconn`). With std's and tokio's 128, a burst of clients
/// connecting at once overflowed the queue, and each dropped connect waited
/// a second for its retry: a timeout instead of an answer or a quick 503.
const ACCEPT_BACKLOG: u32 = 4096;

pub async fn bind(address: &str) -> Result<TcpListener, CliError> {
    let bind_error = |source| CliError::Bind { address: address.to_owned(), source };
    let mut refused = None;
    for socket_address in tokio::net::lookup_host(address).await.map_err(bind_error)? {
        let socket = if socket_address.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
        let socket = socket.map_err(bind_error)?;
        // As std and tokio bind: a restarted server reuses its port at once.
        socket.set_reuseaddr(true).map_err(bind_error)?;
        match socket.bind(socket_address) {
            Ok(()) => return socket.listen(ACCEPT_BACKLOG).map_err(bind_error),
            Err(err) => refused = Some(err),
        }
    }
    Err(bind_error(
        refused.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolves to nothing")
        }),
    ))
}

fn service_error(err: impl std::fmt::Display) -> CliError {
    CliError::Service(err.to_string())
}

async fn connect_bus(url: Option<&str>) -> Result<Option<infermesh_bus::Bus>, CliError> {
    match url {
        Some(url) => Ok(Some(infermesh_bus::Bus::connect(url).await.map_err(service_error)?)),
        None => Ok(None),
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Up(args) => crate::up::run(*args).await,
        Command::Gateway(args) => {
            let listener = bind(&args.http).await?;
            infermesh_service::announce("gateway", &listener).map_err(service_error)?;
            let peers = PeerAddresses {
                auth: args.auth,
                billing: args.billing,
                registry: args.registry,
                ratelimit: args.ratelimit,
                jobs: args.jobs,
            };
            let bus = connect_bus(args.nats_url.as_deref()).await?;
            crate::run(args.config, peers, bus, listener, shutdown_signal()).await.map_err(service_error)
        }
        Command::Auth { listen, nats_url, config } => {
            let listener = bind(&listen).await?;
            infermesh_service::announce("auth", &listener).map_err(service_error)?;
            let bus = connect_bus(nats_url.as_deref()).await?;
            infermesh_auth::run(config, bus, listener, shutdown_signal()).await.map_err(service_error)
        }
        Command::Billing { listen, nats_url, config } => {
            let bus = connect_bus(nats_url.as_deref()).await?;
            let listener = bind(&listen).await?;
            infermesh_service::announce("billing", &listener).map_err(service_error)?;
            infermesh_billing::run(config, bus, listener, shutdown_signal()).await.map_err(service_error)
        }
        Command::Registry { listen, nats_url, config } => {
            config.load_catalog().map_err(service_error)?;
            let bus = connect_bus(nats_url.as_deref()).await?;
            let listener = bind(&listen).await?;
            infermesh_service::announce("registry", &listener).map_err(service_error)?;
            infermesh_registry::run(config, bus, listener, shutdown_signal()).await.map_err(service_error)
        }
        Command::Ratelimit { listen } => {
            let listener = bind(&listen).await?;
            infermesh_service::announce("ratelimit", &listener).map_err(service_error)?;
            infermesh_ratelimit::run(listener, shutdown_signal()).await.map_err(service_error)
        }
        Command::Jobs { listen, nats_url, config } => {
            let bus = connect_bus(nats_url.as_deref()).await?;
            let listener = bind(&listen).await?;
            infermesh_service::announce("jobs", &listener).map_err(service_error)?;
            infermesh_jobs::run(config, bus, listener, shutdown_signal()).await.map_err(service_error)
        }
        Command::Worker { listen, config } => {
            let listener = bind(&listen).await?;
            infermesh_service::announce("worker", &listener).map_err(service_error)?;
            infermesh_worker::run(config, listener, shutdown_signal()).await.map_err(service_error)
        }
        Command::FetchModels { config } => {
            let (chat, embedding) = tokio::task::spawn_blocking(move || infermesh_worker::prepare_models(&config))
                .await
                .map_err(service_error)?
                .map_err(service_error)?;
            println!("chat model: {}\nembedding model: {}", chat.display(), embedding.display());
            Ok(())
        }
        Command::Keys(args) => crate::keys_cli::run(args).await,
        Command::Usage(args) => crate::usage_cli::run(args).await,
        Command::Bench(args) => crate::up::bench(args).await,
        Command::BenchRatelimit(args) => crate::bench_ratelimit::run(args).await,
        Command::BenchBilling(args) => crate::bench_billing::run(args).await,
        Command::BenchProxy(args) => crate::bench_proxy::run(args).await,
        Command::BenchJobs(args) => crate::bench_jobs::run(args).await,
        Command::MockUpstream(args) => crate::mock_upstream::run(args).await,
    }
}

/// `~/.local/share/infermesh` (or `$XDG_DATA_HOME/infermesh`).
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("infermesh")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// More clients than tokio's default backlog (128) connect at once:
    /// every handshake completes while the server accepts none of them.
    #[tokio::test]
    async fn a_burst_of_connections_is_queued_for_accept_not_dropped() {
        const CLIENTS: usize = 1500;
        allow_open_files(CLIENTS + 64);
        let listener = bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connects = (0..CLIENTS)
            .map(|_| tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(address)));
        let results = futures::future::join_all(connects).await;
        let connected: Vec<_> = results.into_iter().filter_map(|result| result.ok()?.ok()).collect();
        assert_eq!(connected.len(), CLIENTS, "connects beyond the backlog wait a second for their retry");
    }

    /// Raises this process's open-file limit (often 1,024 by default) up to
    /// `files`, within the hard limit.
    fn allow_open_files(files: usize) {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit only read and write the struct given.
        #[allow(unsafe_code)]
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && (limit.rlim_cur as usize) < files {
                limit.rlim_cur = (files as libc::rlim_t).min(limit.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}
