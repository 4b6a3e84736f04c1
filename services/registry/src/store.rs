//! Run-time catalogue edits, kept so a restart replays them over the
//! catalogue file.

use infermesh_sql::{Migrations, Options, Pool, on_pool};
use sqlx::Row;

use crate::error::RegistryError;

#[derive(Clone, Debug)]
pub struct EditStore {
    pool: Pool,
}

/// One model's latest edit: its spec as JSON, or `None` when deleted.
pub struct Edit {
    pub model_id: String,
    pub spec_json: Option<String>,
}

fn store_error(err: impl std::fmt::Display) -> RegistryError {
    RegistryError::Store(err.to_string())
}

impl EditStore {
    pub async fn open(database_url: &str) -> Result<EditStore, RegistryError> {
        let migrations = Migrations {
            sqlite: sqlx::migrate!("./migrations/sqlite"),
            postgres: sqlx::migrate!("./migrations/postgres"),
        };
        let pool = Pool::open(database_url, &migrations, Options { max_connections: 2, ..Options::default() })
            .await
            .map_err(store_error)?;
        Ok(EditStore { pool })
    }

    /// Every model's latest edit, oldest first.
    pub async fn load(&self) -> Result<Vec<Edit>, RegistryError> {
        const SQL: &str = "SELECT model_id, spec FROM catalog_edits ORDER BY edited_at, model_id";
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL).fetch_all(pool).await.map_err(store_error)?;
            rows.iter()
                .map(|row| Ok(Edit { model_id: row.try_get(0).map_err(store_error)?, spec_json: row.try_get(1).map_err(store_error)? }))
                .collect()
        })
    }

    pub async fn record(&self, model_id: &str, spec_json: Option<&str>, at_unix_ms: i64) -> Result<(), RegistryError> {
        const SQL: &str = "INSERT INTO catalog_edits (model_id, spec, edited_at) VALUES ($1, $2, $3) \
             ON CONFLICT (model_id) DO UPDATE SET spec = excluded.spec, edited_at = excluded.edited_at";
        on_pool!(&self.pool, pool => {
            sqlx::query(SQL).bind(model_id).bind(spec_json).bind(at_unix_ms).execute(pool).await.map_err(store_error)?;
        });
        Ok(())
    }
}
