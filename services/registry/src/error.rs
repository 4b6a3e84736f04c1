use infermesh_service::{ErrorKind, MeshError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid catalogue: {0}")]
    Config(String),
    #[error("cannot read the catalogue file {path}: {source}")]
    ConfigFile { path: String, source: std::io::Error },
    #[error("no model has the id {0:?}")]
    NoSuchModel(String),
    #[error("catalogue store: {0}")]
    Store(String),
    #[error("worker_id and address are required to register a worker")]
    IncompleteWorker,
}

impl From<RegistryError> for MeshError {
    fn from(err: RegistryError) -> MeshError {
        let kind = match &err {
            RegistryError::Config(_) | RegistryError::ConfigFile { .. } | RegistryError::IncompleteWorker => {
                ErrorKind::InvalidRequest
            }
            RegistryError::NoSuchModel(_) => ErrorKind::ModelNotFound,
            RegistryError::Store(_) => ErrorKind::Internal,
        };
        MeshError::new(kind, err.to_string())
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(err: RegistryError) -> tonic::Status {
        MeshError::from(err).into()
    }
}
