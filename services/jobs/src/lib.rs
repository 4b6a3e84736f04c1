//! The jobs service: async requests accepted now and run when capacity
//! allows, with retries, backoff and a dead letter.
//!
//! - [`queue`]: who runs next (fair across tenants, within each tenant's
//!   concurrency, after backoff), in memory.
//! - [`store`]: the durable copy of every job (SQLite or PostgreSQL).
//! - [`service`]: the operations, each stored before it is answered, and
//!   the outbox of `jobs.*` events for NATS.
//! - [`grpc`]: thin `infermesh.v1.JobsService` handlers.
//!
//! Jobs run in the gateways' job runners, which claim them here, serve
//! them through the usual admission and backends, and report back.

pub mod error;
pub mod grpc;
pub mod queue;
pub mod service;
pub mod store;

use std::future::Future;
use std::time::Duration;

use infermesh_proto::v1::jobs_service_server::JobsServiceServer;
use infermesh_service::{BootstrapError, CancellationToken};
use tokio::net::TcpListener;

pub use error::JobsError;
pub use service::{Jobs, Policy, status_name};

#[derive(clap::Args, Debug, Clone)]
pub struct JobsConfig {
    /// Where jobs are kept (`sqlite://…` or `postgres://…`) [default:
    /// sqlite://jobs.db; under `up`, jobs.db in its data dir].
    #[arg(long = "jobs-database-url", env = "INFERMESH_JOBS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Backoff before a job's first retry; it doubles with each retry.
    #[arg(long = "job-retry-base-ms", env = "INFERMESH_JOB_RETRY_BASE_MS", default_value_t = 10_000)]
    pub retry_base_ms: u64,
    /// The longest backoff between retries.
    #[arg(long = "job-retry-max-ms", env = "INFERMESH_JOB_RETRY_MAX_MS", default_value_t = 300_000)]
    pub retry_max_ms: u64,
    /// Retries after which a job goes to the dead letter.
    #[arg(long = "job-max-retries", env = "INFERMESH_JOB_MAX_RETRIES", default_value_t = 50)]
    pub max_retries: u32,
    /// How long finished jobs' results are kept, in seconds (dead letters
    /// stay until an operator requeues them).
    #[arg(long = "job-retention-secs", env = "INFERMESH_JOB_RETENTION_SECS", default_value_t = 86_400)]
    pub retention_secs: u64,
    /// How long a runner holds a job without renewing; after that the job
    /// is retried elsewhere.
    #[arg(long = "job-lease-ms", env = "INFERMESH_JOB_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// A tenant's jobs processing at once (its key's `max_concurrent` when
    /// lower); more wait in the queue.
    #[arg(long = "job-tenant-concurrency", env = "INFERMESH_JOB_TENANT_CONCURRENCY", default_value_t = 2)]
    pub tenant_concurrency: u32,
}

impl JobsConfig {
    pub fn policy(&self) -> Policy {
        let ms = |n: u64| i64::try_from(n).unwrap_or(i64::MAX / 4);
        Policy {
            retry_base_ms: self.retry_base_ms,
            retry_max_ms: self.retry_max_ms,
            max_retries: self.max_retries,
            retention_ms: ms(self.retention_secs.saturating_mul(1000)),
            lease_ms: ms(self.lease_ms.max(1000)),
            default_max_concurrent: self.tenant_concurrency.max(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Jobs(#[from] JobsError),
    #[error(transparent)]
    Serve(#[from] BootstrapError),
}

/// Serves the queue; completions and dead letters are announced on `bus`
/// when there is one.
pub async fn run(
    config: JobsConfig,
    bus: Option<infermesh_bus::Bus>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let store = store::Store::open(config.database_url.as_deref().unwrap_or("sqlite://jobs.db")).await?;
    let jobs = Jobs::open(store, config.policy(), bus.is_some()).await?;
    let stop = CancellationToken::new();
    if let Some(bus) = bus {
        tokio::spawn(jobs.clone().announce_forever(bus, stop.clone()));
    }
    tokio::spawn(sweep_forever(jobs.clone(), stop.clone()));
    let _stop = stop.drop_guard();
    let routes = tonic::service::Routes::new(JobsServiceServer::new(grpc::JobsGrpc::new(jobs)));
    infermesh_service::serve_grpc(listener, routes, &["infermesh.v1.JobsService"], shutdown).await?;
    Ok(())
}

/// Lapsed leases are looked for twice a second; results past retention
/// about every minute (a read past retention is refused anyway).
async fn sweep_forever(jobs: Jobs, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                ticks += 1;
                if let Err(err) = jobs.sweep(ticks % 120 == 1).await {
                    tracing::warn!(error = %err, "job sweep failed; retrying");
                }
            }
        }
    }
}
