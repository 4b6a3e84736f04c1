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
    #[command(flatten)]
    pub limits: TierLimits,
}

/// The limits of a key that sets none of its own, by its account's tier;
/// 0 is unlimited. Operators override them per key (`PATCH /admin/v1/keys/{id}`).
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierLimits {
    /// Free tier: requests per minute per key, across all models.
    #[arg(long = "free-requests-per-minute", env = "INFERMESH_FREE_RPM", default_value_t = 500)]
    pub free_requests_per_minute: u32,
    /// Free tier: tokens (prompt + completion) per minute per key.
    #[arg(long = "free-tokens-per-minute", env = "INFERMESH_FREE_TPM", default_value_t = 1_000_000)]
    pub free_tokens_per_minute: u32,
    /// Free tier: tokens per day per key.
    #[arg(long = "free-tokens-per-day", env = "INFERMESH_FREE_TPD", default_value_t = 10_000_000)]
    pub free_tokens_per_day: u32,
    /// Free tier: requests of one key in flight at once.
    #[arg(long = "free-max-concurrent", env = "INFERMESH_FREE_CONCURRENT", default_value_t = 16)]
    pub free_max_concurrent: u32,
    /// Paid tier: requests per minute per key.
    #[arg(long = "paid-requests-per-minute", env = "INFERMESH_PAID_RPM", default_value_t = 5_000)]
    pub paid_requests_per_minute: u32,
    /// Paid tier: tokens per minute per key.
    #[arg(long = "paid-tokens-per-minute", env = "INFERMESH_PAID_TPM", default_value_t = 10_000_000)]
    pub paid_tokens_per_minute: u32,
    /// Paid tier: tokens per day per key.
    #[arg(long = "paid-tokens-per-day", env = "INFERMESH_PAID_TPD", default_value_t = 0)]
    pub paid_tokens_per_day: u32,
    /// Paid tier: requests of one key in flight at once.
    #[arg(long = "paid-max-concurrent", env = "INFERMESH_PAID_CONCURRENT", default_value_t = 64)]
    pub paid_max_concurrent: u32,
}

impl TierLimits {
    pub fn for_tier(&self, free: bool) -> infermesh_proto::v1::RateLimit {
        use infermesh_proto::v1::RateLimit;
        if free {
            RateLimit {
                requests_per_minute: self.free_requests_per_minute,
                tokens_per_minute: self.free_tokens_per_minute,
                tokens_per_day: self.free_tokens_per_day,
                max_concurrent: self.free_max_concurrent,
            }
        } else {
            RateLimit {
                requests_per_minute: self.paid_requests_per_minute,
                tokens_per_minute: self.paid_tokens_per_minute,
                tokens_per_day: self.paid_tokens_per_day,
                max_concurrent: self.paid_max_concurrent,
            }
        }
    }
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
