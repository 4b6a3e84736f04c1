//! Accounts and keys in SQL: SQLite for the embedded default, PostgreSQL
//! for a shared deployment (the database URL chooses).

use infermesh_sql::{Migrations, Options, Pool, on_pool};
use sqlx::Row;

use crate::error::AuthError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub prefix: String,
    pub key_hash: String,
    pub limit_nanos: Option<i64>,
    pub disabled: bool,
    pub revoked_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub tokens_per_day: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub created_at: i64,
    pub is_free_tier: bool,
}

pub struct NewKey<'a> {
    pub id: &'a str,
    pub account_id: &'a str,
    pub name: &'a str,
    pub prefix: &'a str,
    pub key_hash: &'a str,
    pub limit_nanos: Option<i64>,
    pub expires_at: Option<i64>,
    pub created_at: i64,
}

/// An operator's change to a key: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChange {
    pub disabled: Option<bool>,
    pub limit_nanos: Option<i64>,
    pub clear_limit: bool,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub tokens_per_day: Option<u32>,
    pub max_concurrent: Option<u32>,
}

/// The unique columns a key can be found by.
#[derive(Clone, Copy)]
enum KeyColumn {
    Hash,
    Id,
}

/// A [`KeyRecord`] from a row of [`KEY_COLUMNS`], for either backend's row type.
macro_rules! key_from_row {
    ($row:expr) => {{
        let row = $row;
        let limit = |column: &str| -> Result<Option<u32>, sqlx::Error> {
            let value: Option<i64> = row.try_get(column)?;
            Ok(value.and_then(|v| u32::try_from(v).ok()))
        };
        Ok::<_, AuthError>(KeyRecord {
            id: row.try_get("id")?,
            account_id: row.try_get("account_id")?,
            name: row.try_get("name")?,
            prefix: row.try_get("prefix")?,
            key_hash: row.try_get("key_hash")?,
            limit_nanos: row.try_get("limit_nanos")?,
            disabled: row.try_get("disabled")?,
            revoked_at: row.try_get("revoked_at")?,
            expires_at: row.try_get("expires_at")?,
            requests_per_minute: limit("requests_per_minute")?,
            tokens_per_minute: limit("tokens_per_minute")?,
            tokens_per_day: limit("tokens_per_day")?,
            max_concurrent: limit("max_concurrent")?,
            created_at: row.try_get("created_at")?,
            is_free_tier: row.try_get("is_free_tier")?,
        })
    }};
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

/// Inserts a key row; shared by sign-up (with its account) and key creation.
macro_rules! insert_key {
    ($executor:expr, $key:expr) => {
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, limit_nanos, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind($key.id)
        .bind($key.account_id)
        .bind($key.name)
        .bind($key.prefix)
        .bind($key.key_hash)
        .bind($key.limit_nanos)
        .bind($key.expires_at)
        .bind($key.created_at)
        .execute($executor)
        .await
    };
}

const KEY_COLUMNS: &str = "k.id, k.account_id, k.name, k.prefix, k.key_hash, k.limit_nanos, \
     k.disabled, k.revoked_at, k.expires_at, k.requests_per_minute, k.tokens_per_minute, \
     k.tokens_per_day, k.max_concurrent, k.created_at, a.is_free_tier";

impl Store {
    pub async fn open(database_url: &str) -> Result<Store, AuthError> {
        let migrations = Migrations {
            sqlite: sqlx::migrate!("./migrations/sqlite"),
            postgres: sqlx::migrate!("./migrations/postgres"),
        };
        Ok(Store { pool: Pool::open(database_url, &migrations, Options::default()).await? })
    }

    /// Creates the account and its first key in one transaction.
    pub async fn create_account(&self, account_id: &str, email: &str, first_key: &NewKey<'_>) -> Result<(), AuthError> {
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO accounts (id, email, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (email) DO NOTHING",
            )
            .bind(account_id)
            .bind(email)
            .bind(first_key.created_at)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Err(AuthError::DuplicateEmail(email.to_owned()));
            }
            insert_key!(&mut *tx, first_key)?;
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn create_key(&self, key: &NewKey<'_>) -> Result<(), AuthError> {
        on_pool!(&self.pool, pool => insert_key!(pool, key).map(drop)?);
        Ok(())
    }

    pub async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyRecord>, AuthError> {
        self.key_where(KeyColumn::Hash, key_hash).await
    }

    pub async fn key_by_id(&self, key_id: &str) -> Result<Option<KeyRecord>, AuthError> {
        self.key_where(KeyColumn::Id, key_id).await
    }

    async fn key_where(&self, column: KeyColumn, value: &str) -> Result<Option<KeyRecord>, AuthError> {
        let column = match column {
            KeyColumn::Hash => "key_hash",
            KeyColumn::Id => "id",
        };
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.{column} = $1"
        );
        on_pool!(&self.pool, pool => {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(value).fetch_optional(pool).await?;
            row.map(|row| key_from_row!(row)).transpose()
        })
    }

    pub async fn keys_of_account(&self, account_id: &str) -> Result<Vec<KeyRecord>, AuthError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             WHERE k.account_id = $1 AND k.revoked_at IS NULL ORDER BY k.created_at, k.id"
        );
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(account_id).fetch_all(pool).await?;
            rows.iter().map(|row| key_from_row!(row)).collect()
        })
    }

    /// Applies the set fields of `change`; false when no live key has `key_id`.
    pub async fn update_key(&self, key_id: &str, change: &KeyChange) -> Result<bool, AuthError> {
        const SQL: &str = "UPDATE api_keys SET \
               disabled = COALESCE($1, disabled), \
               limit_nanos = CASE WHEN $2 THEN NULL ELSE COALESCE($3, limit_nanos) END, \
               requests_per_minute = COALESCE($4, requests_per_minute), \
               tokens_per_minute = COALESCE($5, tokens_per_minute), \
               tokens_per_day = COALESCE($6, tokens_per_day), \
               max_concurrent = COALESCE($7, max_concurrent) \
             WHERE id = $8 AND revoked_at IS NULL";
        let done = on_pool!(&self.pool, pool => sqlx::query(SQL)
            .bind(change.disabled)
            .bind(change.clear_limit)
            .bind(change.limit_nanos)
            .bind(change.requests_per_minute.map(i64::from))
            .bind(change.tokens_per_minute.map(i64::from))
            .bind(change.tokens_per_day.map(i64::from))
            .bind(change.max_concurrent.map(i64::from))
            .bind(key_id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Returns false when the account holds no such live key.
    pub async fn revoke_key(&self, account_id: &str, key_id: &str, now: i64) -> Result<bool, AuthError> {
        const SQL: &str = "UPDATE api_keys SET revoked_at = $1 \
             WHERE id = $2 AND account_id = $3 AND revoked_at IS NULL";
        let done = on_pool!(&self.pool, pool => sqlx::query(SQL)
            .bind(now)
            .bind(key_id)
            .bind(account_id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }
}
