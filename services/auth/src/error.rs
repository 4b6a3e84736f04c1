use infermesh_service::{ErrorKind, MeshError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send it as `Authorization: Bearer im_...` or `X-API-Key`")]
    MissingKey,
    #[error("malformed API key: infermesh keys are `im_` followed by at least 32 letters and digits")]
    MalformedKey,
    #[error("unknown API key: check it was copied whole, or create one with POST /v1/auth/signup")]
    UnknownKey,
    #[error("this API key was revoked; create a new one")]
    RevokedKey,
    #[error("this API key is disabled by the operator")]
    DisabledKey,
    #[error("this API key expired; create a new one")]
    ExpiredKey,
    #[error("invalid email {0:?}: expected an address like me@example.com")]
    InvalidEmail(String),
    #[error("an account with email {0:?} already exists")]
    DuplicateEmail(String),
    #[error("no key {0:?} in this account")]
    KeyNotFound(String),
    #[error("storage error: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("{0}")]
    Database(#[from] infermesh_sql::SqlError),
}

impl From<AuthError> for MeshError {
    fn from(err: AuthError) -> MeshError {
        let kind = match &err {
            AuthError::MissingKey
            | AuthError::MalformedKey
            | AuthError::UnknownKey
            | AuthError::RevokedKey
            | AuthError::DisabledKey
            | AuthError::ExpiredKey => ErrorKind::Authentication,
            AuthError::InvalidEmail(_) => ErrorKind::InvalidRequest,
            AuthError::DuplicateEmail(_) => ErrorKind::Conflict,
            AuthError::KeyNotFound(_) => ErrorKind::NotFound,
            AuthError::Storage(_) | AuthError::Database(_) => {
                tracing::error!(error = %err, "auth storage failure");
                return MeshError::internal("auth storage failure; retry shortly");
            }
        };
        let mesh = MeshError::new(kind, err.to_string());
        if matches!(err, AuthError::InvalidEmail(_)) { mesh.with_param("email") } else { mesh }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> tonic::Status {
        MeshError::from(err).into()
    }
}
