use infermesh_service::{ErrorKind, MeshError};

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job store: {0}")]
    Store(String),
    #[error("no job has the id {0:?} (results are kept for a limited time)")]
    NotFound(String),
    #[error("job {id} is {status}; only dead, failed or cancelled jobs can be requeued")]
    NotRequeueable { id: String, status: &'static str },
    #[error("{0}")]
    Invalid(String),
}

impl From<JobsError> for MeshError {
    fn from(err: JobsError) -> MeshError {
        let kind = match &err {
            JobsError::Store(_) => ErrorKind::Internal,
            JobsError::NotFound(_) => ErrorKind::NotFound,
            JobsError::NotRequeueable { .. } => ErrorKind::Conflict,
            JobsError::Invalid(_) => ErrorKind::InvalidRequest,
        };
        MeshError::new(kind, err.to_string())
    }
}

impl From<JobsError> for tonic::Status {
    fn from(err: JobsError) -> tonic::Status {
        MeshError::from(err).into()
    }
}
