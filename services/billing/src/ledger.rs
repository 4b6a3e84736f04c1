//! Prepaid credit per account: grants add, holds reserve, settlements
//! charge. Every change is one SQL transaction on a single writer
//! connection (SQLite or PostgreSQL), so concurrent requests serialise and
//! the available balance can never go below zero through a hold. One
//! billing process writes a database.

use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::{Balance, UsageEvent};
use infermesh_service::now_unix_ms;
use infermesh_sql::{Migrations, Options, Pool, SqliteSynchronous, on_pool};
use prost::Message;
use sqlx::Row;
use tokio::sync::Notify;

use crate::error::BillingError;

/// Takes a released or expired hold of `amount` out of its account's held balance.
macro_rules! unhold {
    ($executor:expr, $account_id:expr, $amount:expr) => {
        sqlx::query("UPDATE credit_accounts SET held_nanos = held_nanos - $1 WHERE account_id = $2")
            .bind($amount)
            .bind($account_id)
            .execute($executor)
            .await?
    };
}

pub const USAGE_SUBJECT: &str = infermesh_bus::subjects::USAGE_SETTLED;

#[derive(Clone, Debug)]
pub struct Ledger {
    pool: Pool,
    hold_ttl: Duration,
    /// Whether settlements write usage events to the outbox (only when a
    /// publisher drains it).
    outbox_enabled: bool,
    outbox_ready: Arc<Notify>,
}

pub struct Settlement<'a> {
    pub request_id: &'a str,
    pub cost_nanos: i64,
    pub model: &'a str,
    pub provider: &'a str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub subject: String,
    pub dedupe_id: String,
    pub payload: Vec<u8>,
}

impl Ledger {
    pub async fn open(database_url: &str, hold_ttl: Duration, outbox_enabled: bool) -> Result<Ledger, BillingError> {
        let migrations = Migrations {
            sqlite: sqlx::migrate!("./migrations/sqlite"),
            postgres: sqlx::migrate!("./migrations/postgres"),
        };
        // One connection: transactions serialise, which is what makes the
        // balance check and the hold atomic.
        let options = Options { max_connections: 1, sqlite_synchronous: SqliteSynchronous::Normal };
        let pool = Pool::open(database_url, &migrations, options).await?;
        Ok(Ledger { pool, hold_ttl, outbox_enabled, outbox_ready: Arc::new(Notify::new()) })
    }

    pub fn outbox_ready(&self) -> Arc<Notify> {
        self.outbox_ready.clone()
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
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO grants (idempotency_key, account_id, amount_nanos, reason, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(idempotency_key)
            .bind(account_id)
            .bind(amount_nanos)
            .bind(reason)
            .bind(now_unix_ms())
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 1 {
                sqlx::query(
                    "INSERT INTO credit_accounts (account_id, granted_nanos) VALUES ($1, $2) \
                     ON CONFLICT (account_id) DO UPDATE \
                     SET granted_nanos = credit_accounts.granted_nanos + excluded.granted_nanos",
                )
                .bind(account_id)
                .bind(amount_nanos)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        self.balance(account_id).await
    }

    pub async fn balance(&self, account_id: &str) -> Result<Balance, BillingError> {
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

    /// Holds `amount_nanos` for `request_id`; a repeat returns the first
    /// hold. With `key_limit_nanos`, the key's settled spend plus its open
    /// holds plus this one must stay within that cap as well.
    pub async fn reserve(
        &self,
        request_id: &str,
        account_id: &str,
        key_id: &str,
        amount_nanos: i64,
        key_limit_nanos: Option<i64>,
    ) -> Result<(i64, i64), BillingError> {
        if amount_nanos < 0 {
            return Err(BillingError::NegativeAmount { field: "amount_nanos", value: amount_nanos });
        }
        require("request_id", request_id)?;
        require("account_id", account_id)?;
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await?;
            let existing = sqlx::query("SELECT amount_nanos FROM holds WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(&mut *tx)
                .await?;
            let available: i64 = sqlx::query(
                "SELECT granted_nanos - used_nanos - held_nanos FROM credit_accounts WHERE account_id = $1",
            )
            .bind(account_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?
            .unwrap_or(0);
            if let Some(row) = existing {
                return Ok((row.try_get(0)?, available));
            }
            if available < amount_nanos {
                return Err(BillingError::InsufficientCredit { available_nanos: available, needed_nanos: amount_nanos });
            }
            if let Some(limit_nanos) = key_limit_nanos {
                let spent: i64 = sqlx::query(
                    "SELECT CAST((SELECT COALESCE(SUM(cost_nanos), 0) FROM usage_records WHERE key_id = $1) + \
                     (SELECT COALESCE(SUM(amount_nanos), 0) FROM holds WHERE key_id = $1 AND state = 'held') AS BIGINT)",
                )
                .bind(key_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
                if spent + amount_nanos > limit_nanos {
                    return Err(BillingError::KeyLimit { limit_nanos, spent_nanos: spent, needed_nanos: amount_nanos });
                }
            }
            let now = now_unix_ms();
            let ttl_ms = i64::try_from(self.hold_ttl.as_millis()).unwrap_or(i64::MAX);
            sqlx::query(
                "INSERT INTO holds (request_id, account_id, key_id, amount_nanos, state, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, 'held', $5, $6)",
            )
            .bind(request_id)
            .bind(account_id)
            .bind(key_id)
            .bind(amount_nanos)
            .bind(now)
            .bind(now.saturating_add(ttl_ms))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE credit_accounts SET held_nanos = held_nanos + $1 WHERE account_id = $2")
                .bind(amount_nanos)
                .bind(account_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok((amount_nanos, available - amount_nanos))
        })
    }

    /// Charges the actual cost and frees the rest of the hold. Settling a
    /// request twice charges once and returns the first charge.
    pub async fn settle(&self, settlement: &Settlement<'_>) -> Result<i64, BillingError> {
        if settlement.cost_nanos < 0 {
            return Err(BillingError::NegativeAmount { field: "cost_nanos", value: settlement.cost_nanos });
        }
        let charged = on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await?;
            let hold = sqlx::query("SELECT account_id, key_id, amount_nanos, state FROM holds WHERE request_id = $1")
                .bind(settlement.request_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| BillingError::UnknownHold(settlement.request_id.to_owned()))?;
            let account_id: String = hold.try_get(0)?;
            let key_id: String = hold.try_get(1)?;
            let held: i64 = hold.try_get(2)?;
            let state: String = hold.try_get(3)?;
            if state == "settled" {
                let charged = sqlx::query("SELECT cost_nanos FROM usage_records WHERE request_id = $1")
                    .bind(settlement.request_id)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get(0)?;
                return Ok::<_, BillingError>(charged);
            }
            // An expired or released hold no longer counts in held_nanos.
            let still_held = if state == "held" { held } else { 0 };
            sqlx::query(
                "UPDATE credit_accounts SET held_nanos = held_nanos - $1, used_nanos = used_nanos + $2 \
                 WHERE account_id = $3",
            )
            .bind(still_held)
            .bind(settlement.cost_nanos)
            .bind(&account_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE holds SET state = 'settled' WHERE request_id = $1")
                .bind(settlement.request_id)
                .execute(&mut *tx)
                .await?;
            let now = now_unix_ms();
            sqlx::query(
                "INSERT INTO usage_records (request_id, account_id, key_id, model, provider, prompt_tokens, \
                 completion_tokens, cost_nanos, latency_ms, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(settlement.request_id)
            .bind(&account_id)
            .bind(&key_id)
            .bind(settlement.model)
            .bind(settlement.provider)
            .bind(i64::from(settlement.prompt_tokens))
            .bind(i64::from(settlement.completion_tokens))
            .bind(settlement.cost_nanos)
            .bind(i64::from(settlement.latency_ms))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if self.outbox_enabled {
                let event = UsageEvent {
                    request_id: settlement.request_id.to_owned(),
                    account_id,
                    key_id,
                    model: settlement.model.to_owned(),
                    provider: settlement.provider.to_owned(),
                    usage: Some(infermesh_proto::v1::Usage {
                        prompt_tokens: settlement.prompt_tokens,
                        completion_tokens: settlement.completion_tokens,
                    }),
                    cost_nanos: settlement.cost_nanos,
                    settled_at_unix_ms: now,
                    latency_ms: settlement.latency_ms,
                };
                sqlx::query("INSERT INTO outbox (subject, dedupe_id, payload, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(USAGE_SUBJECT)
                    .bind(settlement.request_id)
                    .bind(event.encode_to_vec())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, BillingError>(settlement.cost_nanos)
        })?;
        if self.outbox_enabled {
            self.outbox_ready.notify_one();
        }
        Ok(charged)
    }

    /// Gives a hold back; releasing twice, or after settling, changes nothing.
    pub async fn release(&self, request_id: &str) -> Result<(), BillingError> {
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await?;
            let released = sqlx::query(
                "UPDATE holds SET state = 'released' WHERE request_id = $1 AND state = 'held' \
                 RETURNING account_id, amount_nanos",
            )
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = released {
                unhold!(&mut *tx, row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Releases holds whose lease lapsed (their gateway died), so credit is
    /// never stuck. Returns how many.
    pub async fn expire_holds(&self) -> Result<u64, BillingError> {
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await?;
            let expired = sqlx::query(
                "UPDATE holds SET state = 'expired' WHERE state = 'held' AND expires_at <= $1 \
                 RETURNING account_id, amount_nanos",
            )
            .bind(now_unix_ms())
            .fetch_all(&mut *tx)
            .await?;
            for row in &expired {
                unhold!(&mut *tx, row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
            tx.commit().await?;
            Ok(expired.len() as u64)
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

    pub async fn generation(&self, request_id: &str) -> Result<UsageEvent, BillingError> {
        const SQL: &str = "SELECT account_id, key_id, model, provider, prompt_tokens, completion_tokens, \
             cost_nanos, latency_ms, created_at FROM usage_records WHERE request_id = $1";
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

    pub async fn outbox_delete(&self, seq: i64) -> Result<(), BillingError> {
        on_pool!(&self.pool, pool => sqlx::query("DELETE FROM outbox WHERE seq = $1").bind(seq).execute(pool).await.map(drop)?);
        Ok(())
    }
}

fn require(field: &'static str, value: &str) -> Result<(), BillingError> {
    if value.is_empty() { Err(BillingError::MissingField(field)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    infermesh_sql::on_sqlite_and_postgres!(
        grant_is_idempotent,
        reserve_settle_charges_actual_cost_once,
        refuses_what_it_cannot_cover_and_never_goes_negative,
        a_key_limit_caps_spend_plus_open_holds,
        release_and_expiry_free_the_hold,
    );

    fn settlement(request_id: &str, cost_nanos: i64) -> Settlement<'_> {
        Settlement {
            request_id,
            cost_nanos,
            model: "m",
            provider: "p",
            prompt_tokens: 3,
            completion_tokens: 4,
            latency_ms: 5,
        }
    }

    async fn grant_is_idempotent(url: String) {
        let ledger = Ledger::open(&url, Duration::from_secs(60), true).await.unwrap();
        ledger.grant("a", 100, "signup:a", "free").await.unwrap();
        let balance = ledger.grant("a", 100, "signup:a", "free").await.unwrap();
        assert_eq!(balance.granted_nanos, 100);
        assert_eq!(balance.available_nanos, 100);
    }

    async fn reserve_settle_charges_actual_cost_once(url: String) {
        let ledger = Ledger::open(&url, Duration::from_secs(60), true).await.unwrap();
        ledger.grant("a", 1000, "g", "free").await.unwrap();
        assert_eq!(ledger.reserve("r1", "a", "k", 600, None).await.unwrap(), (600, 400));
        assert_eq!(ledger.reserve("r1", "a", "k", 600, None).await.unwrap().0, 600, "idempotent");
        assert_eq!(ledger.balance("a").await.unwrap().held_nanos, 600);
        assert_eq!(ledger.settle(&settlement("r1", 250)).await.unwrap(), 250);
        assert_eq!(ledger.settle(&settlement("r1", 999)).await.unwrap(), 250, "idempotent");
        let balance = ledger.balance("a").await.unwrap();
        assert_eq!((balance.used_nanos, balance.held_nanos, balance.available_nanos), (250, 0, 750));
        assert_eq!(ledger.key_usage("k").await.unwrap(), (250, 3, 4, 1));
        assert_eq!(ledger.key_usage("other").await.unwrap(), (0, 0, 0, 0));
        let record = ledger.generation("r1").await.unwrap();
        assert_eq!((record.cost_nanos, record.account_id.as_str(), record.latency_ms), (250, "a", 5));
        assert!(matches!(ledger.generation("nope").await, Err(BillingError::UnknownGeneration(_))));
        let outbox = ledger.outbox_batch(10).await.unwrap();
        assert_eq!(outbox.len(), 1);
        let event = UsageEvent::decode(outbox[0].payload.as_slice()).unwrap();
        assert_eq!((event.cost_nanos, event.account_id.as_str()), (250, "a"));
    }

    async fn refuses_what_it_cannot_cover_and_never_goes_negative(url: String) {
        let ledger = Ledger::open(&url, Duration::from_secs(60), true).await.unwrap();
        ledger.grant("a", 1000, "g", "free").await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let ledger = ledger.clone();
            tasks
                .push(tokio::spawn(async move { ledger.reserve(&format!("r{i}"), "a", "k", 100, None).await.is_ok() }));
        }
        let mut admitted = 0;
        for task in tasks {
            admitted += usize::from(task.await.unwrap());
        }
        assert_eq!(admitted, 10);
        let err = ledger.reserve("late", "a", "k", 1, None).await.unwrap_err();
        assert!(matches!(err, BillingError::InsufficientCredit { available_nanos: 0, needed_nanos: 1 }));
        assert!(err.to_string().contains("top up"));
    }

    async fn a_key_limit_caps_spend_plus_open_holds(url: String) {
        let ledger = Ledger::open(&url, Duration::from_secs(60), true).await.unwrap();
        ledger.grant("a", 10_000, "g", "free").await.unwrap();
        ledger.reserve("r1", "a", "k", 400, Some(1000)).await.unwrap();
        ledger.settle(&settlement("r1", 300)).await.unwrap();
        ledger.reserve("r2", "a", "k", 500, Some(1000)).await.unwrap();
        // 300 spent + 500 held + 300 more > 1000.
        let err = ledger.reserve("r3", "a", "k", 300, Some(1000)).await.unwrap_err();
        assert!(matches!(err, BillingError::KeyLimit { spent_nanos: 800, .. }), "{err}");
        // Another key of the same account is not capped by it.
        ledger.reserve("r4", "a", "k2", 300, Some(1000)).await.unwrap();
    }

    async fn release_and_expiry_free_the_hold(url: String) {
        let ledger = Ledger::open(&url, Duration::from_millis(0), true).await.unwrap();
        ledger.grant("a", 1000, "g", "free").await.unwrap();
        ledger.reserve("r1", "a", "k", 300, None).await.unwrap();
        ledger.release("r1").await.unwrap();
        ledger.release("r1").await.unwrap();
        assert_eq!(ledger.balance("a").await.unwrap().available_nanos, 1000);
        ledger.reserve("r2", "a", "k", 300, None).await.unwrap();
        assert_eq!(ledger.expire_holds().await.unwrap(), 1);
        assert_eq!(ledger.balance("a").await.unwrap().held_nanos, 0);
        // A late settlement after expiry still charges what was used.
        ledger.settle(&settlement("r2", 100)).await.unwrap();
        let balance = ledger.balance("a").await.unwrap();
        assert_eq!((balance.used_nanos, balance.held_nanos), (100, 0));
    }
}
