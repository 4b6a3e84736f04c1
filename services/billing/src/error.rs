use infermesh_service::money::format_usd;
use infermesh_service::{ErrorKind, MeshError};

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(
        "insufficient credit: this request may cost up to {} and the account has {} available; \
         top up or lower max_tokens",
        format_usd(*needed_nanos),
        format_usd(*available_nanos)
    )]
    InsufficientCredit { available_nanos: i64, needed_nanos: i64 },
    #[error(
        "this key's credit limit is {}: it has used or holds {} and this request may cost up to {}; \
         raise the key's limit or use another key",
        format_usd(*limit_nanos),
        format_usd(*spent_nanos),
        format_usd(*needed_nanos)
    )]
    KeyLimit { limit_nanos: i64, spent_nanos: i64, needed_nanos: i64 },
    #[error("{}", not_in_plan(model, plan, including))]
    NotInPlan { model: String, plan: String, including: Vec<String> },
    #[error("no plan {0:?}; the plans are listed at GET /admin/v1/plans")]
    UnknownPlan(String),
    #[error("invalid plans config: {0}")]
    Config(String),
    #[error("no credit hold for request {0:?}")]
    UnknownHold(String),
    #[error("no generation with id {0:?}; ids are the `id` of a completed response")]
    UnknownGeneration(String),
    #[error("{field} must not be negative (got {value})")]
    NegativeAmount { field: &'static str, value: i64 },
    #[error("{0} must not be empty")]
    MissingField(&'static str),
    #[error("storage error: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("{0}")]
    Database(#[from] infermesh_sql::SqlError),
    /// The batch holding this change was not written; nothing of it stands.
    #[error("ledger write failed: {0}")]
    WriteFailed(String),
    #[error("the ledger is shutting down")]
    Stopped,
}

fn not_in_plan(model: &str, plan: &str, including: &[String]) -> String {
    let upgrade = match including {
        [] => "no plan includes it".to_owned(),
        [one] => format!("the {one} plan includes it"),
        [rest @ .., last] => format!("the {} and {last} plans include it", rest.join(", ")),
    };
    format!("the model {model} is not included in this account's plan ({plan}); {upgrade}")
}

impl From<BillingError> for MeshError {
    fn from(err: BillingError) -> MeshError {
        let kind = match &err {
            BillingError::InsufficientCredit { .. } | BillingError::KeyLimit { .. } => ErrorKind::InsufficientQuota,
            BillingError::NotInPlan { .. } => ErrorKind::PermissionDenied,
            BillingError::UnknownHold(_) | BillingError::UnknownGeneration(_) | BillingError::UnknownPlan(_) => {
                ErrorKind::NotFound
            }
            BillingError::NegativeAmount { .. } | BillingError::MissingField(_) => ErrorKind::InvalidRequest,
            BillingError::Config(_)
            | BillingError::Storage(_)
            | BillingError::Database(_)
            | BillingError::WriteFailed(_)
            | BillingError::Stopped => {
                tracing::error!(error = %err, "billing storage failure");
                return MeshError::internal("billing storage failure; retry shortly");
            }
        };
        MeshError::new(kind, err.to_string())
    }
}

impl From<BillingError> for tonic::Status {
    fn from(err: BillingError) -> tonic::Status {
        MeshError::from(err).into()
    }
}
