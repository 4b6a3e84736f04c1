//! The durable copy of every job (SQLite or PostgreSQL): written before a
//! caller is answered, so an accepted job outlives any crash.

use infermesh_proto::v1::{Job, JobStatus};
use infermesh_sql::{Migrations, Options, Pool, on_pool};
use sqlx::Row;

use crate::error::JobsError;

#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

fn store_error(err: impl std::fmt::Display) -> JobsError {
    JobsError::Store(err.to_string())
}

/// The columns a [`Job`] is read from, as a literal for `concat!`: the
/// driver takes only static SQL.
macro_rules! columns {
    () => {
        "id, account_id, key_id, kind, model, body, status, result, error, retries, attempt, max_concurrent, \
         created_at, updated_at, run_after"
    };
}

fn job_of<R>(row: &R) -> Result<Job, JobsError>
where
    R: Row,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let count = |name: &str| -> Result<u32, JobsError> {
        u32::try_from(row.try_get::<i32, _>(name).map_err(store_error)?).map_err(store_error)
    };
    Ok(Job {
        id: row.try_get("id").map_err(store_error)?,
        account_id: row.try_get("account_id").map_err(store_error)?,
        key_id: row.try_get("key_id").map_err(store_error)?,
        kind: row.try_get("kind").map_err(store_error)?,
        model: row.try_get("model").map_err(store_error)?,
        body: row.try_get("body").map_err(store_error)?,
        status: row.try_get("status").map_err(store_error)?,
        result: row.try_get("result").map_err(store_error)?,
        error: row.try_get("error").map_err(store_error)?,
        retries: count("retries")?,
        attempt: count("attempt")?,
        max_concurrent: count("max_concurrent")?,
        created_at_ms: row.try_get("created_at").map_err(store_error)?,
        updated_at_ms: row.try_get("updated_at").map_err(store_error)?,
        run_after_ms: row.try_get("run_after").map_err(store_error)?,
    })
}

fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A completion or dead letter not yet acknowledged by NATS.
pub struct Announcement {
    pub job: Job,
}

impl Store {
    pub async fn open(database_url: &str) -> Result<Store, JobsError> {
        let migrations = Migrations {
            sqlite: sqlx::migrate!("./migrations/sqlite"),
            postgres: sqlx::migrate!("./migrations/postgres"),
        };
        let pool = Pool::open(database_url, &migrations, Options { max_connections: 4, ..Options::default() })
            .await
            .map_err(store_error)?;
        Ok(Store { pool })
    }

    pub async fn insert(&self, job: &Job) -> Result<(), JobsError> {
        const SQL: &str = concat!(
            "INSERT INTO jobs (",
            columns!(),
            ", announce) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 0)"
        );
        on_pool!(&self.pool, pool => {
            sqlx::query(SQL)
                .bind(&job.id)
                .bind(&job.account_id)
                .bind(&job.key_id)
                .bind(&job.kind)
                .bind(&job.model)
                .bind(&job.body)
                .bind(job.status)
                .bind(&job.result)
                .bind(&job.error)
                .bind(int(job.retries))
                .bind(int(job.attempt))
                .bind(int(job.max_concurrent))
                .bind(job.created_at_ms)
                .bind(job.updated_at_ms)
                .bind(job.run_after_ms)
                .execute(pool)
                .await
                .map_err(store_error)?;
        });
        Ok(())
    }

    /// Writes a job's new state (everything but what it was asked to do);
    /// `announce` queues its event for NATS in the same write. An event
    /// already queued stays queued whatever happens to the job next.
    pub async fn save(&self, job: &Job, announce: bool) -> Result<(), JobsError> {
        const SQL: &str = "UPDATE jobs SET status = $2, result = $3, error = $4, retries = $5, attempt = $6, \
                           max_concurrent = $7, updated_at = $8, run_after = $9, \
                           announce = CASE WHEN $10 = 1 THEN 1 ELSE announce END WHERE id = $1";
        on_pool!(&self.pool, pool => {
            sqlx::query(SQL)
                .bind(&job.id)
                .bind(job.status)
                .bind(&job.result)
                .bind(&job.error)
                .bind(int(job.retries))
                .bind(int(job.attempt))
                .bind(int(job.max_concurrent))
                .bind(job.updated_at_ms)
                .bind(job.run_after_ms)
                .bind(i32::from(announce))
                .execute(pool)
                .await
                .map_err(store_error)?;
        });
        Ok(())
    }

    /// Marks jobs as claimed (processing, their attempt counted) in one
    /// transaction: one sync to disk for a runner's whole claim.
    pub async fn claimed(&self, jobs: &[Job]) -> Result<(), JobsError> {
        const SQL: &str = "UPDATE jobs SET status = $2, attempt = $3, updated_at = $4 WHERE id = $1";
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await.map_err(store_error)?;
            for job in jobs {
                sqlx::query(SQL)
                    .bind(&job.id)
                    .bind(job.status)
                    .bind(int(job.attempt))
                    .bind(job.updated_at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
            }
            tx.commit().await.map_err(store_error)?;
        });
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>, JobsError> {
        const SQL: &str = concat!("SELECT ", columns!(), " FROM jobs WHERE id = $1");
        on_pool!(&self.pool, pool => {
            let row = sqlx::query(SQL).bind(id).fetch_optional(pool).await.map_err(store_error)?;
            row.as_ref().map(job_of).transpose()
        })
    }

    /// Queued and processing jobs, for the queue at start-up.
    pub async fn open_jobs(&self) -> Result<Vec<Job>, JobsError> {
        const SQL: &str = concat!("SELECT ", columns!(), " FROM jobs WHERE status IN ($1, $2)");
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL)
                .bind(JobStatus::Queued as i32)
                .bind(JobStatus::Processing as i32)
                .fetch_all(pool)
                .await
                .map_err(store_error)?;
            rows.iter().map(job_of).collect()
        })
    }

    /// Jobs in `status`, newest first.
    pub async fn list(&self, status: JobStatus, limit: u32) -> Result<Vec<Job>, JobsError> {
        const SQL: &str =
            concat!("SELECT ", columns!(), " FROM jobs WHERE status = $1 ORDER BY updated_at DESC LIMIT $2");
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL)
                .bind(status as i32)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(store_error)?;
            rows.iter().map(job_of).collect()
        })
    }

    /// How many jobs are in each finished state.
    pub async fn finished_counts(&self) -> Result<Vec<(i32, i64)>, JobsError> {
        const SQL: &str = "SELECT status, COUNT(*) FROM jobs WHERE status > $1 GROUP BY status";
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL).bind(JobStatus::Processing as i32).fetch_all(pool).await.map_err(store_error)?;
            rows.iter()
                .map(|row| Ok((row.try_get::<i32, _>(0).map_err(store_error)?, row.try_get::<i64, _>(1).map_err(store_error)?)))
                .collect()
        })
    }

    /// Forgets finished jobs (dead letters excepted: they wait for an
    /// operator) last changed before `before_ms`.
    pub async fn delete_finished_before(&self, before_ms: i64) -> Result<u64, JobsError> {
        const SQL: &str = "DELETE FROM jobs WHERE status IN ($1, $2, $3) AND updated_at < $4";
        on_pool!(&self.pool, pool => {
            let done = sqlx::query(SQL)
                .bind(JobStatus::Complete as i32)
                .bind(JobStatus::Failed as i32)
                .bind(JobStatus::Cancelled as i32)
                .bind(before_ms)
                .execute(pool)
                .await
                .map_err(store_error)?;
            Ok(done.rows_affected())
        })
    }

    /// Up to `limit` events waiting for NATS, oldest first.
    pub async fn announcements(&self, limit: u32) -> Result<Vec<Announcement>, JobsError> {
        const SQL: &str = concat!("SELECT ", columns!(), " FROM jobs WHERE announce = 1 ORDER BY updated_at LIMIT $1");
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL).bind(i64::from(limit)).fetch_all(pool).await.map_err(store_error)?;
            rows.iter().map(|row| Ok(Announcement { job: job_of(row)? })).collect()
        })
    }

    pub async fn announced(&self, ids: &[String]) -> Result<(), JobsError> {
        const SQL: &str = "UPDATE jobs SET announce = 0 WHERE id = $1";
        on_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await.map_err(store_error)?;
            for id in ids {
                sqlx::query(SQL).bind(id).execute(&mut *tx).await.map_err(store_error)?;
            }
            tx.commit().await.map_err(store_error)?;
        });
        Ok(())
    }
}
