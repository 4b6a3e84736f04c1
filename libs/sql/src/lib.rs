//! One connection pool over SQLite (the embedded default) or PostgreSQL,
//! chosen by the database URL, so a service's store is written once.
//!
//! Queries are written once inside [`on_pool!`], which type-checks the same
//! body against each backend. Both backends take `$1`-style bind parameters;
//! each service keeps a migration set per backend because their column
//! types differ (an `INTEGER` is 64-bit in SQLite, 32-bit in PostgreSQL).

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};

pub use sqlx::sqlite::SqliteSynchronous;

#[cfg(feature = "test-postgres")]
pub mod test_postgres;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A service's migrations for each backend (`sqlx::migrate!` of each dir).
pub struct Migrations {
    pub sqlite: Migrator,
    pub postgres: Migrator,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub max_connections: u32,
    /// SQLite's `synchronous`: FULL syncs every commit; NORMAL (in WAL mode)
    /// survives a process crash but may lose the last commits to a power cut.
    pub sqlite_synchronous: SqliteSynchronous,
    /// Checkpoint SQLite's write-ahead log from a background task instead
    /// of inside whichever commit crosses the threshold, so a writer that
    /// commits back to back never stalls on copying pages.
    pub sqlite_background_checkpoint: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { max_connections: 4, sqlite_synchronous: SqliteSynchronous::Full, sqlite_background_checkpoint: false }
    }
}

/// How often the background checkpoint runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

impl Pool {
    /// Connects to `postgres://…` / `postgresql://…`, or else opens (creating
    /// it if needed) the SQLite database at the URL, then migrates it.
    pub async fn open(database_url: &str, migrations: &Migrations, options: Options) -> Result<Pool, SqlError> {
        if is_postgres(database_url) {
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect(database_url)
                .await?;
            migrations.postgres.run(&pool).await?;
            Ok(Pool::Postgres(pool))
        } else {
            let connect = SqliteConnectOptions::from_str(database_url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(options.sqlite_synchronous)
                .busy_timeout(Duration::from_secs(5))
                // Pages through the OS page cache rather than a read() per
                // page once a table outgrows SQLite's own small cache, which
                // stays small (2 MiB per connection): with the file mapped,
                // a bigger one saved no measurable CPU and cost the gateway
                // ~15 MiB of resident memory under load.
                .pragma("mmap_size", "268435456")
                .pragma("cache_size", "-2048")
                .pragma("temp_store", "memory")
                .thread_name(|id| format!("{SQLITE_THREAD_PREFIX}{id}"));
            let connect =
                if options.sqlite_background_checkpoint { connect.pragma("wal_autocheckpoint", "0") } else { connect };
            let pool = sqlite_pool_options().max_connections(options.max_connections).connect_with(connect).await?;
            migrations.sqlite.run(&pool).await?;
            if options.sqlite_background_checkpoint {
                tokio::spawn(checkpoint_forever(pool.clone()));
            }
            Ok(Pool::Sqlite(pool))
        }
    }

    /// A pool of one long-lived connection to the same database, for a task
    /// that does all of a store's writing. SQLite drops a connection's page
    /// cache whenever another connection wrote since it last read, so a
    /// writer that moves between connections reads every page back from the
    /// log; on its own connection the pages it keeps touching stay cached.
    pub async fn single_connection(&self) -> Result<Pool, SqlError> {
        Ok(match self {
            Pool::Sqlite(pool) => Pool::Sqlite(
                sqlite_pool_options()
                    .max_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with((*pool.connect_options()).clone())
                    .await?,
            ),
            Pool::Postgres(pool) => Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with((*pool.connect_options()).clone())
                    .await?,
            ),
        })
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }
}

/// sqlx runs each SQLite connection on a thread of its own, named with this.
const SQLITE_THREAD_PREFIX: &str = "sqlite-conn-";

/// The nice value of those threads: a commit's page writes and fsync are
/// work a request never waits for on the hot path (holds are answered from
/// memory, settlements after the response), so on a busy core they should
/// yield to request handling rather than delay it. Measured on 2 vCPUs at
/// 1,000 RPS: the gateway's p99 drops by about half a millisecond.
const SQLITE_THREAD_NICE: i32 = 10;

fn sqlite_pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new().after_connect(|_, _| {
        Box::pin(async {
            lower_sqlite_threads_priority();
            Ok(())
        })
    })
}

/// A connection's thread exists once it is connected; sqlx gives no hook on
/// that thread itself, so it is found by its name.
#[cfg(target_os = "linux")]
fn lower_sqlite_threads_priority() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for task in tasks.flatten() {
        let is_sqlite =
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(SQLITE_THREAD_PREFIX));
        let Some(thread_id) = task.file_name().to_str().and_then(|tid| tid.parse::<libc::id_t>().ok()) else {
            continue;
        };
        if is_sqlite {
            // SAFETY: setpriority only reads its integer arguments; a thread
            // that has exited meanwhile makes it fail with ESRCH, ignored.
            #[allow(unsafe_code)]
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, thread_id, SQLITE_THREAD_NICE);
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_sqlite_threads_priority() {}

/// PASSIVE checkpoints never block a writer; the log is reused once one
/// has copied every frame.
async fn checkpoint_forever(pool: SqlitePool) {
    while !pool.is_closed() {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await
            && !pool.is_closed()
        {
            tracing::warn!(error = %err, "SQLite checkpoint failed; the write-ahead log grows until one succeeds");
        }
    }
}

pub fn is_postgres(database_url: &str) -> bool {
    database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
}

/// Runs `$body` with `$pool` bound to the backend's typed pool: the body is
/// written once and compiled for each backend.
#[macro_export]
macro_rules! on_pool {
    ($pool:expr, $bound:ident => $body:expr) => {
        match $pool {
            $crate::Pool::Sqlite($bound) => $body,
            $crate::Pool::Postgres($bound) => $body,
        }
    };
}
