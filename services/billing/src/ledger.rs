//! Prepaid credit per account: grants add, holds reserve, settlements
//! charge, as double-entry movements (`book.rs`). Changes go through the
//! group-commit writer (`writer.rs`), which answers once they are durable;
//! reads go straight to the database (SQLite or PostgreSQL).

use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::{Balance, DailyUsage, UsageEvent};
use infermesh_sql::{Migrations, Options, Pool, SqliteSynchronous, on_pool};
use sqlx::Row;
use tokio::sync::{Notify, mpsc, oneshot};

pub use crate::book::HoldRequest;
use crate::error::BillingError;
use crate::plans::{Plan, Plans, month_of};
pub use crate::writer::Reserved;
use crate::writer::{Command, OwnedSettlement, Writer};

pub const USAGE_SUBJECT: &str = infermesh_bus::subjects::USAGE_SETTLED;

#[derive(Clone, Debug)]
pub struct Ledger {
    pool: Pool,
    commands: mpsc::Sender<Command>,
    outbox_ready: Arc<Notify>,
    plans: Arc<Plans>,
}

/// How long a hold lives by default before it is released on its own.
pub const DEFAULT_HOLD_TTL_SECS: u64 = 900;
/// By default a balance below this share of everything granted is low.
pub const DEFAULT_LOW_CREDIT_PERCENT: u8 = 10;
/// By default the ledger writes at most this often.
pub const DEFAULT_WRITE_INTERVAL_MS: u64 = 10;

/// How a ledger behaves.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    pub plans: Plans,
    /// How long a hold lives before it is released on its own.
    pub hold_ttl: Duration,
    /// A balance below this share of everything granted is low.
    pub low_credit_percent: u8,
    /// Write usage and credit events to the outbox (for NATS).
    pub publish_events: bool,
    /// The least time between the starts of two writes.
    pub write_interval: Duration,
}

impl Default for LedgerOptions {
    fn default() -> LedgerOptions {
        LedgerOptions {
            plans: Plans::default(),
            hold_ttl: Duration::from_secs(DEFAULT_HOLD_TTL_SECS),
            low_credit_percent: DEFAULT_LOW_CREDIT_PERCENT,
            publish_events: false,
            write_interval: Duration::from_millis(DEFAULT_WRITE_INTERVAL_MS),
        }
    }
}

/// An account's plan and its use this month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountPlan {
    pub plan: Plan,
    /// `year * 100 + month`, UTC.
    pub month: i64,
    pub included_tokens_used: u64,
}

pub struct Settlement<'a> {
    pub request_id: &'a str,
    pub cost_nanos: i64,
    pub model: &'a str,
    pub provider: &'a str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u32,
    pub end_user: &'a str,
    /// Whose hold it was and what Reserve covered: a settlement whose hold
    /// was never written is charged with them (empty: not known).
    pub account_id: &'a str,
    pub key_id: &'a str,
    pub covered_tokens: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub subject: String,
    pub dedupe_id: String,
    pub payload: Vec<u8>,
}

/// What [`Ledger::check_books`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BooksCheck {
    /// The sum of every entry: zero when each movement balanced.
    pub total_nanos: i64,
    /// Books whose entries disagree with the cached balances, as
    /// `(book, from entries, from credit_accounts)`.
    pub mismatches: Vec<(String, i64, i64)>,
    /// Everything charged, over all accounts.
    pub revenue_nanos: i64,
}

impl BooksCheck {
    pub fn balanced(&self) -> bool {
        self.total_nanos == 0 && self.mismatches.is_empty()
    }
}

/// The ledger's schema, for either backend.
pub(crate) fn migrations() -> Migrations {
    Migrations { sqlite: sqlx::migrate!("./migrations/sqlite"), postgres: sqlx::migrate!("./migrations/postgres") }
}

impl Ledger {
    pub async fn open(database_url: &str, options: LedgerOptions) -> Result<Ledger, BillingError> {
        let LedgerOptions { plans, hold_ttl, low_credit_percent, publish_events, write_interval } = options;
        // Each batch is synced before anyone hears of it: group commit
        // makes that one sync per batch, not per request.
        let options = Options {
            max_connections: 4,
            sqlite_synchronous: SqliteSynchronous::Full,
            sqlite_background_checkpoint: true,
        };
        let pool = Pool::open(database_url, &migrations(), options).await?;
        let outbox_ready = Arc::new(Notify::new());
        let ttl_ms = i64::try_from(hold_ttl.as_millis()).unwrap_or(i64::MAX);
        let plans = Arc::new(plans);
        let mut writer = Writer::new(
            pool.single_connection().await?,
            plans.clone(),
            ttl_ms,
            low_credit_percent,
            publish_events,
            outbox_ready.clone(),
        );
        writer.write_interval = write_interval;
        writer.load_open_holds().await?;
        // Commands waiting for the writer, at most: a saturated gateway
        // waits here instead of queueing more (each waiting settlement
        // holds memory); 1,024 keeps the ledger bench's throughput.
        let (commands, queue) = mpsc::channel(1024);
        tokio::spawn(writer.run(queue));
        Ok(Ledger { pool, commands, outbox_ready, plans })
    }

    pub fn outbox_ready(&self) -> Arc<Notify> {
        self.outbox_ready.clone()
    }

    /// Sends a command to the writer and waits for its durable answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, BillingError>>) -> Command,
    ) -> Result<T, BillingError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| BillingError::Stopped)?;
        answer.await.map_err(|_| BillingError::Stopped)?
    }

    /// Adds credit once per `idempotency_key`.
    pub async fn grant(
        &self,
        account_id: &str,
        amount_nanos: i64,
        idempotency_key: &str,
        reason: &str,
    ) -> Result<Balance, BillingError> {
        if amount_nanos < 0 {
            return Err(BillingError::NegativeAmount { field: "amount_nanos", value: amount_nanos });
        }
        require("account_id", account_id)?;
        require("idempotency_key", idempotency_key)?;
        self.ask(|reply| Command::Grant {
            account_id: account_id.to_owned(),
            amount: amount_nanos,
            idempotency_key: idempotency_key.to_owned(),
            reason: reason.to_owned(),
            reply,
        })
        .await?;
        self.balance(account_id).await
    }

    /// The account's balance, holds answered before this call included
    /// (they are written first).
    pub async fn balance(&self, account_id: &str) -> Result<Balance, BillingError> {
        self.ask(|reply| Command::Flush { reply }).await?;
        const SQL: &str = "SELECT granted_nanos, used_nanos, held_nanos FROM credit_accounts WHERE account_id = $1";
        let (granted, used, held): (i64, i64, i64) = on_pool!(&self.pool, pool => {
            match sqlx::query(SQL).bind(account_id).fetch_optional(pool).await? {
                Some(row) => (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?),
                None => (0, 0, 0),
            }
        });
        Ok(Balance {
            account_id: account_id.to_owned(),
            granted_nanos: granted,
            used_nanos: used,
            held_nanos: held,
            available_nanos: granted - used - held,
        })
    }

    /// Holds what `request` may cost beyond the tokens its account's plan
    /// still includes this month; a repeat returns the first hold. With a
    /// key limit, the key's settled spend plus its open holds plus this one
    /// must stay within that cap as well. Returns the hold and what the
    /// account has available after it.
    /// Holds credit for a request. Answered from memory: see `writer.rs`.
    pub async fn reserve(&self, request: &HoldRequest<'_>) -> Result<Reserved, BillingError> {
        for (field, value) in [("amount_nanos", request.amount), ("max_tokens", request.max_tokens)] {
            if value < 0 {
                return Err(BillingError::NegativeAmount { field, value });
            }
        }
        require("request_id", request.request_id)?;
        require("account_id", request.account_id)?;
        require("model", request.model)?;
        self.ask(|reply| Command::Reserve {
            request_id: request.request_id.to_owned(),
            account_id: request.account_id.to_owned(),
            key_id: request.key_id.to_owned(),
            model: request.model.to_owned(),
            amount: request.amount,
            max_tokens: request.max_tokens,
            key_limit: request.key_limit,
            catalog_plans: request.catalog_plans.to_vec(),
            fresh_request_id: request.fresh_request_id,
            reply,
        })
        .await
    }

    pub fn plans(&self) -> &Plans {
        &self.plans
    }

    /// Moves an account to the plan `plan_id`; its included tokens used
    /// this month carry over.
    pub async fn set_plan(&self, account_id: &str, plan_id: &str) -> Result<AccountPlan, BillingError> {
        require("account_id", account_id)?;
        if plan_id.is_empty() || self.plans.get(plan_id).is_none() {
            return Err(BillingError::UnknownPlan(plan_id.to_owned()));
        }
        let (account, plan) = (account_id.to_owned(), plan_id.to_owned());
        self.ask(|reply| Command::SetPlan { account_id: account, plan_id: plan, reply }).await?;
        self.account_plan(account_id).await
    }

    pub async fn account_plan(&self, account_id: &str) -> Result<AccountPlan, BillingError> {
        const SQL: &str = "SELECT plan_id, month, tokens_used FROM account_plans WHERE account_id = $1";
        let stored: Option<(String, i64, i64)> = on_pool!(&self.pool, pool => {
            match sqlx::query(SQL).bind(account_id).fetch_optional(pool).await? {
                Some(row) => Some((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)),
                None => None,
            }
        });
        let this_month = month_of(infermesh_service::now_unix_ms());
        let (plan_id, used) = match stored {
            Some((plan_id, month, used)) => (plan_id, if month == this_month { used } else { 0 }),
            None => (String::new(), 0),
        };
        Ok(AccountPlan {
            plan: self.plans.of_account(&plan_id).clone(),
            month: this_month,
            included_tokens_used: u64::try_from(used).unwrap_or(0),
        })
    }

    /// Charges the actual cost and frees the rest of the hold. Settling a
    /// request twice charges once and returns the first charge.
    pub async fn settle(&self, settlement: &Settlement<'_>) -> Result<i64, BillingError> {
        if settlement.cost_nanos < 0 {
            return Err(BillingError::NegativeAmount { field: "cost_nanos", value: settlement.cost_nanos });
        }
        let settlement = OwnedSettlement {
            request_id: settlement.request_id.to_owned(),
            cost_nanos: settlement.cost_nanos,
            model: settlement.model.to_owned(),
            provider: settlement.provider.to_owned(),
            prompt_tokens: settlement.prompt_tokens,
            completion_tokens: settlement.completion_tokens,
            latency_ms: settlement.latency_ms,
            end_user: settlement.end_user.to_owned(),
            account_id: settlement.account_id.to_owned(),
            key_id: settlement.key_id.to_owned(),
            covered_tokens: settlement.covered_tokens,
        };
        self.ask(|reply| Command::Settle { settlement, reply }).await
    }

    /// Gives a hold back; releasing twice, or after settling, changes nothing.
    pub async fn release(&self, request_id: &str) -> Result<(), BillingError> {
        self.ask(|reply| Command::Release { request_id: request_id.to_owned(), reply }).await
    }

    /// Releases holds whose lease lapsed (their gateway died), so credit is
    /// never stuck. Returns how many.
    pub async fn expire_holds(&self) -> Result<u64, BillingError> {
        self.ask(|reply| Command::Expire { reply }).await
    }

    /// Proves the books: every entry sums to zero, and each customer's and
    /// hold book's entries add up to the balances `credit_accounts` caches.
    pub async fn check_books(&self) -> Result<BooksCheck, BillingError> {
        const ENTRIES: &str = "SELECT book, CAST(SUM(amount_nanos) AS BIGINT) FROM entries GROUP BY book";
        const CACHED: &str = "SELECT account_id, granted_nanos, used_nanos, held_nanos FROM credit_accounts";
        /// An account's cached `(id, granted, used, held)`.
        type Cached = (String, i64, i64, i64);
        let (books, cached): (Vec<(String, i64)>, Vec<Cached>) = on_pool!(&self.pool, pool => {
            let books = sqlx::query(ENTRIES).fetch_all(pool).await?;
            let cached = sqlx::query(CACHED).fetch_all(pool).await?;
            (
                books.iter().map(|r| Ok::<_, BillingError>((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, _>>()?,
                cached
                    .iter()
                    .map(|r| Ok::<_, BillingError>((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
                    .collect::<Result<_, _>>()?,
            )
        });
        let from_entries: std::collections::HashMap<String, i64> = books.iter().cloned().collect();
        let entry = |book: &str| from_entries.get(book).copied().unwrap_or(0);
        let mut mismatches = Vec::new();
        let (mut granted_total, mut used_total) = (0i64, 0i64);
        for (account, granted, used, held) in &cached {
            granted_total += granted;
            used_total += used;
            for (book, expected) in
                [(crate::book::customer(account), granted - used - held), (crate::book::holds(account), *held)]
            {
                if entry(&book) != expected {
                    mismatches.push((book.clone(), entry(&book), expected));
                }
            }
        }
        for (book, expected) in [(crate::book::GRANTS, -granted_total), (crate::book::REVENUE, used_total)] {
            if entry(book) != expected {
                mismatches.push((book.to_owned(), entry(book), expected));
            }
        }
        Ok(BooksCheck {
            total_nanos: books.iter().map(|(_, amount)| amount).sum(),
            mismatches,
            revenue_nanos: entry(crate::book::REVENUE),
        })
    }

    /// Lifetime spend of one key: (cost, prompt tokens, completion tokens, calls).
    pub async fn key_usage(&self, key_id: &str) -> Result<(i64, u64, u64, u64), BillingError> {
        const SQL: &str = "SELECT CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT), \
             CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
             COUNT(*) FROM usage_records WHERE key_id = $1";
        let sums: [i64; 4] = on_pool!(&self.pool, pool => {
            let row = sqlx::query(SQL).bind(key_id).fetch_one(pool).await?;
            [row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?]
        });
        let count = |value: i64| u64::try_from(value).unwrap_or(0);
        Ok((sums[0], count(sums[1]), count(sums[2]), count(sums[3])))
    }

    /// What `key_id` spent each UTC day since `since_unix_ms`, oldest first.
    pub async fn key_daily_usage(&self, key_id: &str, since_unix_ms: i64) -> Result<Vec<DailyUsage>, BillingError> {
        const DAY_MS: i64 = 86_400_000;
        const SQL: &str = "SELECT CAST(created_at / 86400000 AS BIGINT) AS day, COUNT(*), \
             CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT), \
             CAST(SUM(cost_nanos) AS BIGINT) FROM usage_records WHERE key_id = $1 AND created_at >= $2 \
             GROUP BY day ORDER BY day";
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL).bind(key_id).bind(since_unix_ms).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    let count = |i: usize| -> Result<u64, BillingError> {
                        Ok(u64::try_from(row.try_get::<i64, _>(i)?).unwrap_or(0))
                    };
                    Ok(DailyUsage {
                        day_start_unix: row.try_get::<i64, _>(0)? * DAY_MS / 1000,
                        calls: count(1)?,
                        prompt_tokens: count(2)?,
                        completion_tokens: count(3)?,
                        cost_nanos: row.try_get(4)?,
                    })
                })
                .collect()
        })
    }

    pub async fn generation(&self, request_id: &str) -> Result<UsageEvent, BillingError> {
        const SQL: &str = "SELECT account_id, key_id, model, provider, prompt_tokens, completion_tokens, \
             cost_nanos, latency_ms, created_at, end_user FROM usage_records WHERE request_id = $1";
        on_pool!(&self.pool, pool => {
            let row = sqlx::query(SQL)
                .bind(request_id)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| BillingError::UnknownGeneration(request_id.to_owned()))?;
            let small = |i: usize| -> Result<u32, BillingError> {
                Ok(u32::try_from(row.try_get::<i64, _>(i)?).unwrap_or(u32::MAX))
            };
            Ok(UsageEvent {
                request_id: request_id.to_owned(),
                account_id: row.try_get(0)?,
                key_id: row.try_get(1)?,
                model: row.try_get(2)?,
                provider: row.try_get(3)?,
                usage: Some(infermesh_proto::v1::Usage { prompt_tokens: small(4)?, completion_tokens: small(5)? }),
                cost_nanos: row.try_get(6)?,
                latency_ms: small(7)?,
                settled_at_unix_ms: row.try_get(8)?,
                end_user: row.try_get(9)?,
            })
        })
    }

    pub async fn outbox_batch(&self, limit: i64) -> Result<Vec<OutboxRow>, BillingError> {
        const SQL: &str = "SELECT seq, subject, dedupe_id, payload FROM outbox ORDER BY seq LIMIT $1";
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL).bind(limit).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    Ok(OutboxRow {
                        seq: row.try_get(0)?,
                        subject: row.try_get(1)?,
                        dedupe_id: row.try_get(2)?,
                        payload: row.try_get(3)?,
                    })
                })
                .collect()
        })
    }

    /// Forgets every outbox row up to `seq`, once they were published: rows
    /// are numbered in commit order by the one writer, which also deletes
    /// them (a second writer would empty its page cache).
    pub async fn outbox_delete_through(&self, seq: i64) -> Result<(), BillingError> {
        self.ask(|reply| Command::ForgetOutbox { through_seq: seq, reply }).await
    }
}

fn require(field: &'static str, value: &str) -> Result<(), BillingError> {
    if value.is_empty() { Err(BillingError::MissingField(field)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use infermesh_proto::v1::CreditEvent;
    use prost::Message;

    use super::*;

    infermesh_sql::on_sqlite_and_postgres!(
        grant_is_idempotent,
        reserve_settle_charges_actual_cost_once,
        refuses_what_it_cannot_cover_and_never_goes_negative,
        a_key_limit_caps_spend_plus_open_holds,
        release_and_expiry_free_the_hold,
        the_books_balance_after_a_mixed_load,
        a_plan_gates_models_and_its_included_tokens_cost_nothing,
        credit_events_announce_grants_then_low_then_exhausted_once_per_grant,
        a_settlement_whose_hold_was_never_written_is_charged_once_as_reserve_said,
    );

    fn hold<'a>(
        request_id: &'a str,
        account_id: &'a str,
        key_id: &'a str,
        amount: i64,
        key_limit: Option<i64>,
    ) -> HoldRequest<'a> {
        HoldRequest {
            request_id,
            account_id,
            key_id,
            model: "infermesh/m",
            amount,
            max_tokens: 100,
            key_limit,
            catalog_plans: &[],
            fresh_request_id: false,
        }
    }

    async fn usage_rows(ledger: &Ledger) -> Vec<OutboxRow> {
        let mut rows = ledger.outbox_batch(10_000).await.unwrap();
        rows.retain(|row| row.subject == USAGE_SUBJECT);
        rows
    }

    fn options(hold_ttl: Duration) -> LedgerOptions {
        LedgerOptions { hold_ttl, publish_events: true, ..LedgerOptions::default() }
    }

    fn settlement(request_id: &str, cost_nanos: i64) -> Settlement<'_> {
        Settlement {
            request_id,
            cost_nanos,
            model: "m",
            provider: "p",
            prompt_tokens: 3,
            completion_tokens: 4,
            latency_ms: 5,
            end_user: "",
            account_id: "",
            key_id: "",
            covered_tokens: 0,
        }
    }

    async fn grant_is_idempotent(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        ledger.grant("a", 100, "signup:a", "free").await.unwrap();
        let balance = ledger.grant("a", 100, "signup:a", "free").await.unwrap();
        assert_eq!(balance.granted_nanos, 100);
        assert_eq!(balance.available_nanos, 100);
    }

    async fn reserve_settle_charges_actual_cost_once(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        ledger.grant("a", 1000, "g", "free").await.unwrap();
        let first = Reserved { held: 600, available: 400, covered_tokens: 0 };
        assert_eq!(ledger.reserve(&hold("r1", "a", "k", 600, None)).await.unwrap(), first);
        assert_eq!(ledger.reserve(&hold("r1", "a", "k", 600, None)).await.unwrap().held, 600, "idempotent");
        assert_eq!(ledger.balance("a").await.unwrap().held_nanos, 600);
        assert_eq!(ledger.settle(&settlement("r1", 250)).await.unwrap(), 250);
        assert_eq!(ledger.settle(&settlement("r1", 999)).await.unwrap(), 250, "idempotent");
        let balance = ledger.balance("a").await.unwrap();
        assert_eq!((balance.used_nanos, balance.held_nanos, balance.available_nanos), (250, 0, 750));
        assert_eq!(ledger.key_usage("k").await.unwrap(), (250, 3, 4, 1));
        assert_eq!(ledger.key_usage("other").await.unwrap(), (0, 0, 0, 0));
        let days = ledger.key_daily_usage("k", 0).await.unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!((days[0].calls, days[0].cost_nanos, days[0].prompt_tokens), (1, 250, 3));
        assert_eq!(days[0].day_start_unix % 86_400, 0);
        assert!(ledger.key_daily_usage("k", i64::MAX).await.unwrap().is_empty());
        let record = ledger.generation("r1").await.unwrap();
        assert_eq!((record.cost_nanos, record.account_id.as_str(), record.latency_ms), (250, "a", 5));
        assert!(matches!(ledger.generation("nope").await, Err(BillingError::UnknownGeneration(_))));
        let outbox = usage_rows(&ledger).await;
        assert_eq!(outbox.len(), 1);
        let event = UsageEvent::decode(outbox[0].payload.as_slice()).unwrap();
        assert_eq!((event.cost_nanos, event.account_id.as_str()), (250, "a"));
    }

    async fn refuses_what_it_cannot_cover_and_never_goes_negative(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        ledger.grant("a", 1000, "g", "free").await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                ledger.reserve(&hold(&format!("r{i}"), "a", "k", 100, None)).await.is_ok()
            }));
        }
        let mut admitted = 0;
        for task in tasks {
            admitted += usize::from(task.await.unwrap());
        }
        assert_eq!(admitted, 10);
        let err = ledger.reserve(&hold("late", "a", "k", 1, None)).await.unwrap_err();
        assert!(matches!(err, BillingError::InsufficientCredit { available_nanos: 0, needed_nanos: 1 }));
        assert!(err.to_string().contains("top up"));
    }

    async fn a_key_limit_caps_spend_plus_open_holds(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        ledger.grant("a", 10_000, "g", "free").await.unwrap();
        ledger.reserve(&hold("r1", "a", "k", 400, Some(1000))).await.unwrap();
        ledger.settle(&settlement("r1", 300)).await.unwrap();
        ledger.reserve(&hold("r2", "a", "k", 500, Some(1000))).await.unwrap();
        // 300 spent + 500 held + 300 more > 1000.
        let err = ledger.reserve(&hold("r3", "a", "k", 300, Some(1000))).await.unwrap_err();
        assert!(matches!(err, BillingError::KeyLimit { spent_nanos: 800, .. }), "{err}");
        // Another key of the same account is not capped by it.
        ledger.reserve(&hold("r4", "a", "k2", 300, Some(1000))).await.unwrap();
    }

    async fn release_and_expiry_free_the_hold(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_millis(0))).await.unwrap();
        ledger.grant("a", 1000, "g", "free").await.unwrap();
        ledger.reserve(&hold("r1", "a", "k", 300, None)).await.unwrap();
        ledger.release("r1").await.unwrap();
        ledger.release("r1").await.unwrap();
        assert_eq!(ledger.balance("a").await.unwrap().available_nanos, 1000);
        ledger.reserve(&hold("r2", "a", "k", 300, None)).await.unwrap();
        assert_eq!(ledger.expire_holds().await.unwrap(), 1);
        assert_eq!(ledger.balance("a").await.unwrap().held_nanos, 0);
        // A late settlement after expiry still charges what was used.
        ledger.settle(&settlement("r2", 100)).await.unwrap();
        let balance = ledger.balance("a").await.unwrap();
        assert_eq!((balance.used_nanos, balance.held_nanos), (100, 0));
    }

    async fn the_books_balance_after_a_mixed_load(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_millis(50))).await.unwrap();
        let mut tasks = Vec::new();
        for account in 0..4 {
            // Enough for all 50 of the account's holds at once.
            ledger.grant(&format!("a{account}"), 15_000, &format!("signup:{account}"), "free").await.unwrap();
        }
        let repeated = ledger.grant("a0", 15_000, "signup:0", "free").await.unwrap();
        assert_eq!(repeated.granted_nanos, 15_000, "a repeated grant adds nothing");
        ledger.grant("a1", 5_000, "topup:1", "top-up").await.unwrap();
        for i in 0..200 {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let (id, account) = (format!("r{i}"), format!("a{}", i % 4));
                ledger.reserve(&hold(&id, &account, "k", 300, None)).await.unwrap();
                match i % 5 {
                    0 => ledger.release(&id).await.unwrap(),
                    1 => {} // abandoned: its hold lapses
                    _ => {
                        ledger.settle(&settlement(&id, (i % 7) * 40)).await.unwrap();
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let expired = ledger.expire_holds().await.unwrap();
        assert!(expired > 0, "abandoned holds lapse");
        let check = ledger.check_books().await.unwrap();
        assert!(check.balanced(), "{check:?}");
        let mut charged = 0;
        for account in 0..4 {
            let balance = ledger.balance(&format!("a{account}")).await.unwrap();
            assert_eq!(balance.held_nanos, 0);
            assert!(balance.available_nanos >= 0);
            charged += balance.used_nanos;
        }
        let usage: i64 = (0..200).filter(|i| i % 5 >= 2).map(|i| (i % 7) * 40).sum();
        assert_eq!(charged, usage, "every settlement charged once");
        let settled = (0..200).filter(|i| i % 5 >= 2).count();
        assert_eq!(usage_rows(&ledger).await.len(), settled, "one usage event per settlement");
    }

    async fn a_plan_gates_models_and_its_included_tokens_cost_nothing(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        ledger.grant("a", 1_000, "g", "top-up").await.unwrap();
        let upstream = HoldRequest { model: "openai/gpt-4o", ..hold("r1", "a", "k", 600, None) };
        let err = ledger.reserve(&upstream).await.unwrap_err();
        assert!(err.to_string().contains("plan (Free); the Pro and Ultimate plans include it"), "{err}");
        assert!(matches!(ledger.set_plan("a", "gold").await, Err(BillingError::UnknownPlan(_))));
        let plan = ledger.set_plan("a", "pro").await.unwrap();
        assert_eq!((plan.plan.name.as_str(), plan.included_tokens_used), ("Pro", 0));
        // Every token is included: nothing held, nothing charged.
        let all_covered = Reserved { held: 0, available: 1_000, covered_tokens: 100 };
        assert_eq!(ledger.reserve(&upstream).await.unwrap(), all_covered);
        assert_eq!(ledger.settle(&settlement("r1", 500)).await.unwrap(), 0);
        assert_eq!(ledger.generation("r1").await.unwrap().cost_nanos, 0);
        assert_eq!(ledger.account_plan("a").await.unwrap().included_tokens_used, 7);
        // The writer's memory and the database agree after a restart.
        drop(ledger);
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        assert_eq!(ledger.account_plan("a").await.unwrap().plan.id, "pro");
        assert_eq!(ledger.reserve(&HoldRequest { request_id: "r2", ..upstream }).await.unwrap().held, 0);
        assert!(ledger.check_books().await.unwrap().balanced());
    }

    /// Reserve is answered before its hold is written; a crash in between
    /// loses the hold but not the charge: the settlement names the account.
    async fn a_settlement_whose_hold_was_never_written_is_charged_once_as_reserve_said(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        ledger.grant("a", 10_000, "g", "top-up").await.unwrap();
        let unknown = ledger.settle(&settlement("lost", 900)).await.unwrap_err();
        assert!(matches!(unknown, BillingError::UnknownHold(_)), "without the account it cannot be charged");
        // Reserve had said 3 of its tokens were included: 3/7 of the cost is free.
        let lost = Settlement { account_id: "a", key_id: "k", covered_tokens: 3, ..settlement("lost", 700) };
        assert_eq!(ledger.settle(&lost).await.unwrap(), 400);
        assert_eq!(ledger.settle(&lost).await.unwrap(), 400, "a repeat charges once");
        drop(ledger);
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        assert_eq!(ledger.settle(&lost).await.unwrap(), 400, "also after a restart");
        assert_eq!(ledger.generation("lost").await.unwrap().cost_nanos, 400);
        let balance = ledger.balance("a").await.unwrap();
        assert_eq!((balance.used_nanos, balance.held_nanos), (400, 0));
        assert_eq!(usage_rows(&ledger).await.len(), 1);
        assert!(ledger.check_books().await.unwrap().balanced());
    }

    async fn credit_events_announce_grants_then_low_then_exhausted_once_per_grant(url: String) {
        let ledger = Ledger::open(&url, options(Duration::from_secs(60))).await.unwrap();
        let subjects = |rows: &[OutboxRow]| rows.iter().map(|row| row.subject.clone()).collect::<Vec<_>>();
        ledger.grant("a", 1_000, "signup:a", "signup").await.unwrap();
        // 850 used: 15% left, not yet low (below 10%).
        ledger.reserve(&hold("r1", "a", "k", 900, None)).await.unwrap();
        ledger.settle(&Settlement { end_user: "user-42", ..settlement("r1", 850) }).await.unwrap();
        // 900, then 950 used: low from the second on, announced once.
        for id in ["r2", "r3"] {
            ledger.reserve(&hold(id, "a", "k", 50, None)).await.unwrap();
            ledger.settle(&settlement(id, 50)).await.unwrap();
        }
        // Refused while low: exhausted, announced once.
        for id in ["r4", "r5"] {
            assert!(matches!(
                ledger.reserve(&hold(id, "a", "k", 100, None)).await,
                Err(BillingError::InsufficientCredit { .. })
            ));
        }
        // A refusal is answered before its alert is written; a balance
        // read waits for that write.
        ledger.balance("a").await.unwrap();
        let rows = ledger.outbox_batch(100).await.unwrap();
        assert_eq!(
            subjects(&rows),
            [
                "credit.granted.v1",
                "usage.settled.v1",
                "usage.settled.v1",
                "usage.settled.v1",
                "credit.low.v1",
                "credit.exhausted.v1"
            ]
        );
        let granted = CreditEvent::decode(rows[0].payload.as_slice()).unwrap();
        assert_eq!((granted.amount_nanos, granted.available_nanos, granted.reason.as_str()), (1_000, 1_000, "signup"));
        assert_eq!(rows[0].dedupe_id, "credit.granted:signup:a");
        let usage = UsageEvent::decode(rows[1].payload.as_slice()).unwrap();
        assert_eq!(usage.end_user, "user-42");
        assert_eq!(ledger.generation("r1").await.unwrap().end_user, "user-42");
        let low = CreditEvent::decode(rows[4].payload.as_slice()).unwrap();
        assert_eq!((low.used_nanos, low.request_id.as_str()), (950, "r3"));
        assert_eq!(rows[4].dedupe_id, "credit.low:a:1000");
        let exhausted = CreditEvent::decode(rows[5].payload.as_slice()).unwrap();
        assert_eq!((exhausted.available_nanos, exhausted.request_id.as_str()), (50, "r4"));
        // A top-up starts a new period: low can be announced again.
        ledger.grant("a", 100, "topup:1", "top-up").await.unwrap();
        ledger.reserve(&hold("r6", "a", "k", 100, None)).await.unwrap();
        ledger.settle(&settlement("r6", 100)).await.unwrap();
        let rows = ledger.outbox_batch(100).await.unwrap();
        assert_eq!(subjects(&rows[6..]), ["credit.granted.v1", "usage.settled.v1", "credit.low.v1"]);
    }
}
