//! `infermesh bench-billing`: durable reserve + settle pairs per second on
//! the ledger (SQLite by default, or any `--database-url`), called as the
//! billing service calls it, from many concurrent requests over many
//! accounts. Each pair returns only once both are committed.

use std::time::{Duration, Instant};

use infermesh_billing::ledger::{HoldRequest, OutboxRow, Settlement};
use infermesh_billing::{Ledger, LedgerOptions};

use crate::cli::CliError;

#[derive(Debug, clap::Args)]
pub struct BillingBenchArgs {
    /// The ledger's database; unset makes a SQLite file in a temp dir.
    #[arg(long = "database-url")]
    database_url: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Accounts the requests spread over.
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Seconds measured, after one second of warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

pub async fn run(args: BillingBenchArgs) -> Result<(), CliError> {
    let failed = |err: infermesh_billing::BillingError| CliError::Service(err.to_string());
    let dir = tempfile::tempdir().map_err(|err| CliError::Service(err.to_string()))?;
    let url = args.database_url.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("billing.db").display()));
    let options = LedgerOptions { publish_events: true, ..LedgerOptions::default() };
    let ledger = Ledger::open(&url, options).await.map_err(failed)?;
    let accounts = args.accounts.max(1);
    for account in 0..accounts {
        ledger
            .grant(&format!("acct_{account}"), i64::MAX / 4, &format!("bench-{account}"), "bench")
            .await
            .map_err(failed)?;
    }
    // The outbox drains as it does in service, minus the network: the
    // publisher only counts what it was handed.
    let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop_draining = infermesh_service::CancellationToken::new();
    let drainer = tokio::spawn(infermesh_billing::outbox::publish_forever(
        ledger.clone(),
        Counter(published.clone()),
        stop_draining.clone(),
    ));
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + Duration::from_secs(args.seconds);
    let callers = (0..args.concurrency.max(1)).map(|caller| {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let mut pairs = Vec::new();
            for call in 0usize.. {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let account = format!("acct_{}", (caller * 7919 + call) % accounts);
                // Ids as the gateway makes them.
                let request_id = infermesh_service::new_request_id("chatcmpl");
                ledger
                    .reserve(&HoldRequest {
                        request_id: &request_id,
                        account_id: &account,
                        key_id: "key_bench",
                        model: "infermesh/bench-model",
                        amount: 2_000,
                        max_tokens: 30,
                        key_limit: None,
                        catalog_plans: &[],
                        fresh_request_id: true,
                    })
                    .await?;
                let settlement = Settlement {
                    request_id: &request_id,
                    cost_nanos: 1_234,
                    model: "infermesh/bench-model",
                    provider: "bench",
                    prompt_tokens: 10,
                    completion_tokens: 20,
                    latency_ms: 5,
                    end_user: "",
                    account_id: &account,
                    key_id: "key_bench",
                    covered_tokens: 0,
                };
                ledger.settle(&settlement).await?;
                if started >= warm_until {
                    pairs.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
            }
            Ok::<_, infermesh_billing::BillingError>(pairs)
        })
    });
    let mut pairs = Vec::new();
    for caller in futures::future::join_all(callers).await {
        pairs.extend(caller.map_err(|err| CliError::Service(err.to_string()))?.map_err(failed)?);
    }
    stop_draining.cancel();
    let _ = drainer.await;
    pairs.sort_unstable();
    let at =
        |p: f64| pairs.get(((pairs.len() as f64 - 1.0) * p).round() as usize).map_or(0.0, |us| f64::from(*us) / 1000.0);
    let backend = if infermesh_sql::is_postgres(&url) { "postgres" } else { "sqlite" };
    println!(
        "billing bench: {backend}, {} requests in flight, {accounts} accounts, {} s",
        args.concurrency, args.seconds
    );
    println!("usage events drained from the outbox: {}", published.load(std::sync::atomic::Ordering::Relaxed));
    println!(
        "reserve+settle: {:.0} pairs/s, pair latency p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        pairs.len() as f64 / args.seconds as f64,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

/// A publisher that only counts the events it was handed.
struct Counter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl infermesh_billing::outbox::Publisher for Counter {
    async fn publish(&self, rows: &[OutboxRow]) -> Result<(), infermesh_billing::outbox::BoxError> {
        self.0.fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
