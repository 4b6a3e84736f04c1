//! The auth service: accounts, API keys and their limits.
//!
//! - [`keys`]: key generation, hashing, shape checks.
//! - [`accounts`]: sign-up, key lifecycle and verification (the logic).
//! - [`store`]: sqlx storage; this service owns `accounts` and `api_keys`.
//! - [`grpc`]: thin `infermesh.v1.AuthService` handlers.

pub mod accounts;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod store;

use std::future::Future;

use infermesh_proto::v1::auth_service_server::AuthServiceServer;
use infermesh_service::BootstrapError;
use tokio::net::TcpListener;

pub use accounts::Accounts;
pub use error::AuthError;

#[derive(clap::Args, Debug, Clone)]
pub struct AuthConfig {
    /// Where accounts and keys live: `sqlite://…` (created if missing) or
    /// `postgres://…` (migrated on start).
    #[arg(
        long = "auth-database-url",
        env = "INFERMESH_AUTH_DATABASE_URL",
        default_value = "sqlite://infermesh-auth.db"
    )]
    pub database_url: String,
    /// Requests per minute for a key with no limit of its own.
    #[arg(long = "default-requests-per-minute", env = "INFERMESH_DEFAULT_RPM", default_value_t = 500)]
    pub default_requests_per_minute: u32,
    /// Tokens per minute for a key with no limit of its own.
    #[arg(long = "default-tokens-per-minute", env = "INFERMESH_DEFAULT_TPM", default_value_t = 1_000_000)]
    pub default_tokens_per_minute: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Serve(#[from] BootstrapError),
}

/// Serves auth; key revocations are announced on `bus` when there is one.
pub async fn run(
    config: AuthConfig,
    bus: Option<infermesh_bus::Bus>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let accounts = Accounts::open(&config, bus).await?;
    let routes = tonic::service::Routes::new(AuthServiceServer::new(grpc::AuthGrpc::new(accounts)));
    infermesh_service::serve_grpc(listener, routes, &["infermesh.v1.AuthService"], shutdown).await?;
    Ok(())
}
