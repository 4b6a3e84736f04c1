//! The registry service: the model catalogue and the pool of workers.
//!
//! - [`catalog`]: TOML catalogue, validation, id/alias resolution.
//! - [`pool`]: worker leases and the snapshot every watcher receives.
//! - [`grpc`]: thin `infermesh.v1.RegistryService` handlers.

pub mod catalog;
pub mod error;
pub mod grpc;
pub mod pool;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use infermesh_proto::v1::registry_service_server::RegistryServiceServer;
use infermesh_service::{BootstrapError, CancellationToken, now_unix_ms};
use tokio::net::TcpListener;

pub use catalog::{Catalog, DEFAULT_CATALOG};
pub use error::RegistryError;
pub use pool::Registry;

#[derive(clap::Args, Debug, Clone)]
pub struct RegistryConfig {
    /// Catalogue TOML (`[[models]]` entries); the two default models when unset.
    #[arg(long = "catalog", env = "INFERMESH_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// How long a worker stays in the pool without a heartbeat.
    #[arg(long = "worker-lease-ms", env = "INFERMESH_WORKER_LEASE_MS", default_value_t = 10_000)]
    pub worker_lease_ms: u64,
    /// Where catalogue edits made at run time are kept (`sqlite://…` or
    /// `postgres://…`); unset, they last until the registry restarts.
    #[arg(long = "registry-database-url", env = "INFERMESH_REGISTRY_DATABASE_URL")]
    pub database_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Serve(#[from] BootstrapError),
}

impl RegistryConfig {
    /// Reads and validates the catalogue, so a bad file fails at start-up.
    pub fn load_catalog(&self) -> Result<Catalog, RegistryError> {
        let text = match &self.catalog {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| RegistryError::ConfigFile { path: path.display().to_string(), source })?,
            None => DEFAULT_CATALOG.to_owned(),
        };
        Catalog::from_toml(&text, now_unix_ms() / 1000)
    }
}

/// Serves the registry; catalogue edits are announced on `bus` when there is one.
pub async fn run(
    config: RegistryConfig,
    bus: Option<infermesh_bus::Bus>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let mut registry =
        Registry::new(config.load_catalog()?, Duration::from_millis(config.worker_lease_ms)).with_bus(bus);
    if let Some(url) = &config.database_url {
        registry = registry.with_store(store::EditStore::open(url).await?).await?;
    }
    let stop = CancellationToken::new();
    let sweeper = registry.clone();
    let sweeper_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = sweeper_stop.cancelled() => return,
                _ = tick.tick() => {
                    let dropped = sweeper.expire();
                    if dropped > 0 {
                        tracing::warn!(workers = dropped, "worker lease lapsed; removed from the pool");
                    }
                }
            }
        }
    });
    let _stop = stop.drop_guard();
    let routes = tonic::service::Routes::new(RegistryServiceServer::new(grpc::RegistryGrpc::new(registry)));
    infermesh_service::serve_grpc(listener, routes, &["infermesh.v1.RegistryService"], shutdown).await?;
    Ok(())
}
