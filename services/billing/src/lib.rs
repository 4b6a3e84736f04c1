//! The billing service: prepaid credit per account.
//!
//! - [`ledger`]: grants, holds, settlements, releases, hold expiry, outbox.
//! - [`outbox`]: publishes usage events from the outbox to NATS JetStream.
//! - [`grpc`]: thin `infermesh.v1.BillingService` handlers.

pub mod book;
pub mod error;
pub mod grpc;
pub mod ledger;
pub mod outbox;
pub mod plans;
pub mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::billing_service_server::{BillingService, BillingServiceServer};
use infermesh_service::{BootstrapError, CancellationToken};
use tokio::net::TcpListener;

pub use error::BillingError;
pub use ledger::{Ledger, LedgerOptions, Reserved};

#[derive(clap::Args, Debug, Clone)]
pub struct BillingConfig {
    /// Where the ledger lives: `sqlite://…` (created if missing) or
    /// `postgres://…`; one billing process writes a database.
    #[arg(
        long = "billing-database-url",
        env = "INFERMESH_BILLING_DATABASE_URL",
        default_value = "sqlite://infermesh-billing.db"
    )]
    pub database_url: String,
    /// How long a hold lives before it is released on its own (a gateway
    /// that died mid-request must not keep credit stuck).
    #[arg(long = "hold-ttl-secs", env = "INFERMESH_HOLD_TTL_SECS", default_value_t = ledger::DEFAULT_HOLD_TTL_SECS)]
    pub hold_ttl_secs: u64,
    /// A TOML file whose `[[plans]]` (id, name, models, included_tokens_per_month)
    /// and `default_plan` replace the built-in Free / Starter / Pro / Ultimate;
    /// the same file `infermesh up --config` reads.
    #[arg(long = "plans", env = "INFERMESH_PLANS")]
    pub plans: Option<std::path::PathBuf>,
    /// `credit.low.v1` is announced when an account's balance falls below
    /// this percentage of everything it was granted.
    #[arg(long = "low-credit-percent", env = "INFERMESH_LOW_CREDIT_PERCENT", default_value_t = ledger::DEFAULT_LOW_CREDIT_PERCENT,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub low_credit_percent: u8,
    /// The ledger writes what it applied at most this often (sooner once
    /// 512 commands wait): each write costs a transaction, a sync and a few
    /// thread hand-offs whatever its size, and only settlements, grants and
    /// releases wait for it, not requests.
    #[arg(long = "ledger-write-interval-ms", env = "INFERMESH_LEDGER_WRITE_INTERVAL_MS",
          default_value_t = ledger::DEFAULT_WRITE_INTERVAL_MS)]
    pub write_interval_ms: u64,
}

impl BillingConfig {
    /// Reads and validates the plans, so a bad file fails at start-up.
    pub fn load_plans(&self) -> Result<plans::Plans, BillingError> {
        match &self.plans {
            None => Ok(plans::Plans::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|err| BillingError::Config(format!("cannot read {}: {err}", path.display())))?;
                plans::Plans::from_toml(&text)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error(transparent)]
    Serve(#[from] BootstrapError),
}

/// Serves billing. With `bus`, each settlement's usage event is published
/// on NATS from the outbox.
pub async fn run(
    config: BillingConfig,
    bus: Option<infermesh_bus::Bus>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let plans = config.load_plans()?;
    let options = LedgerOptions {
        plans,
        hold_ttl: Duration::from_secs(config.hold_ttl_secs),
        low_credit_percent: config.low_credit_percent,
        publish_events: bus.is_some(),
        write_interval: Duration::from_millis(config.write_interval_ms),
    };
    let ledger = Ledger::open(&config.database_url, options).await?;
    let background = CancellationToken::new();
    if let Some(bus) = bus {
        tokio::spawn(outbox::publish_forever(ledger.clone(), bus, background.clone()));
    }
    tokio::spawn(expire_holds_forever(ledger.clone(), background.clone()));
    let _stop_background = background.drop_guard();
    let handlers = Arc::new(grpc::BillingGrpc::new(ledger));
    let _in_process = infermesh_service::provide::<dyn BillingService>(
        listener.local_addr().map_err(BootstrapError::from)?,
        handlers.clone(),
    );
    let routes = tonic::service::Routes::new(BillingServiceServer::from_arc(handlers));
    infermesh_service::serve_grpc(listener, routes, &["infermesh.v1.BillingService"], shutdown).await?;
    Ok(())
}

async fn expire_holds_forever(ledger: Ledger, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match ledger.expire_holds().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(holds = n, "released expired credit holds"),
            Err(err) => tracing::warn!(error = %err, "hold expiry sweep failed"),
        }
    }
}
