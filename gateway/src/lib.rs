//! The gateway: OpenAI's HTTP surface in front of the mesh's gRPC services,
//! and the `infermesh` binary that runs any service or all of them.
//!
//! - [`app`]: router and middleware; [`routes`]: one module per surface.
//! - [`openai`]: request bodies and validation; [`error`]: the HTTP edge
//!   of the error table.
//! - [`mesh`]: gRPC clients and caches (keys, catalogue, workers).
//! - [`admission`]: key → rate limit → credit hold → settlement.
//! - [`cli`]: subcommands; [`up`]: the whole mesh in one process.

pub mod admission;
pub mod app;
pub mod bench_billing;
pub mod bench_jobs;
pub mod bench_proxy;
pub mod bench_ratelimit;
pub mod cli;
pub mod error;
pub mod heap;
pub mod job_runner;
pub mod keys_cli;
pub mod mesh;
pub mod mock_upstream;
pub mod openai;
pub mod ratelimit_shards;
pub mod raw_json;
pub mod routes;
pub mod up;
pub mod upstream;
pub mod usage_cli;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use infermesh_service::{BootstrapError, CancellationToken};
use tokio::net::TcpListener;

pub use mesh::PeerAddresses;

#[derive(clap::Args, Debug, Clone)]
pub struct GatewayConfig {
    /// Largest accepted request body, in bytes.
    #[arg(long = "max-body-bytes", env = "INFERMESH_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Requests this gateway serves at once (a stream counts until its last
    /// event); beyond it a request is refused at once with a 503 and
    /// `Retry-After` instead of queueing toward a timeout. Health and
    /// metrics routes are never refused. 0: no limit.
    #[arg(long = "max-concurrent-requests", env = "INFERMESH_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    /// Free credit for a new account, in dollars.
    #[arg(long = "signup-credit", env = "INFERMESH_SIGNUP_CREDIT", default_value_t = 1.0)]
    pub signup_credit: f64,
    /// How long a verified key is trusted before auth is asked again.
    #[arg(long = "key-cache-ms", env = "INFERMESH_KEY_CACHE_MS", default_value_t = 5_000)]
    pub key_cache_ms: u64,
    /// Sign-ups allowed per source IP per minute, counted by the ratelimit
    /// service so every gateway shares the count (0: no limit).
    #[arg(long = "signups-per-minute-per-ip", env = "INFERMESH_SIGNUPS_PER_MINUTE_PER_IP", default_value_t = 3)]
    pub signups_per_minute_per_ip: u32,
    /// Admit every request without asking the ratelimit service (no
    /// per-key limits, no `X-RateLimit-*` headers, no sign-up limit).
    #[arg(long = "no-rate-limits", env = "INFERMESH_NO_RATE_LIMITS")]
    pub no_rate_limits: bool,
    /// Token for the operator routes under `/admin/v1/`; unset turns them off.
    #[arg(long = "admin-token", env = "INFERMESH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// With the caller's own upstream key (`X-Provider-Key`), the share of
    /// the model's price charged as the platform's fee, in percent.
    #[arg(long = "byok-fee-percent", env = "INFERMESH_BYOK_FEE_PERCENT", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub byok_fee_percent: u32,
    /// Queued jobs this gateway runs at once (with `--jobs-addr`); 0 only
    /// enqueues, leaving the running to other gateways.
    #[arg(long = "job-runner-slots", env = "INFERMESH_JOB_RUNNER_SLOTS", default_value_t = 8)]
    pub job_runner_slots: u32,
}

/// One pooled HTTP client for every upstream provider; time limits are
/// per backend, per call.
fn upstream_client() -> Result<reqwest::Client, RunError> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .build()
        .map_err(|err| RunError::Upstream(err.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot build the upstream HTTP client: {0}")]
    Upstream(String),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("invalid --signup-credit {0}: must be a non-negative dollar amount")]
    SignupCredit(f64),
    #[error("cannot subscribe to key events: {0}")]
    KeyEvents(String),
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
}

/// Serves the HTTP API; with a `bus`, key events evict cached keys at once.
pub async fn run(
    config: GatewayConfig,
    peers: PeerAddresses,
    bus: Option<infermesh_bus::Bus>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let signup_credit_nanos = infermesh_service::money::dollars_to_nanos(config.signup_credit)
        .filter(|n| *n >= 0)
        .ok_or(RunError::SignupCredit(config.signup_credit))?;
    let mesh = mesh::Mesh::connect(peers, Duration::from_millis(config.key_cache_ms), !config.no_rate_limits)?;
    let stop = CancellationToken::new();
    tokio::spawn(mesh.clone().watch_catalog(stop.clone()));
    if let Some(bus) = bus {
        let events = bus
            .client()
            .subscribe(infermesh_bus::subjects::KEYS_ALL)
            .await
            .map_err(|err| RunError::KeyEvents(err.to_string()))?;
        tokio::spawn(mesh.clone().evict_on_key_events(events, stop.clone()));
    }
    let state = app::AppState {
        mesh,
        signup_credit_nanos,
        signups_per_minute_per_ip: config.signups_per_minute_per_ip,
        admin_token: config.admin_token.as_deref().filter(|t| !t.is_empty()).map(Arc::from),
        metrics: infermesh_telemetry::metrics_handle(),
        upstream: upstream_client()?,
        byok_fee_percent: config.byok_fee_percent,
    };
    if let Some(jobs) = state.mesh.jobs.clone()
        && config.job_runner_slots > 0
    {
        let runner = job_runner::JobRunner::new(state.clone(), jobs, config.job_runner_slots);
        tokio::spawn(runner.run(stop.clone()));
    }
    let router = app::router(state, config.max_body_bytes, config.max_concurrent_requests);
    let _stop = stop.drop_guard();
    // Streams write one small SSE event per token: without TCP_NODELAY,
    // Nagle's algorithm holds each behind the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY not set on a connection");
        }
    });
    // The peer address feeds the per-IP sign-up limit.
    axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
