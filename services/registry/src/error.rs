use infermesh_service::{ErrorKind, MeshError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid catalogue: {0}")]
    Config(String),
    #[error("cannot read the catalogue file {path}: {source}")]
    ConfigFile { path: String, source: std::io::Error },
    #[error("the model {name:?} does not exist; available models: {}", known.join(", "))]
    UnknownModel { name: String, known: Vec<String> },
    #[error("worker_id and address are required to register a worker")]
    IncompleteWorker,
}

impl From<RegistryError> for MeshError {
    fn from(err: RegistryError) -> MeshError {
        let kind = match &err {
            RegistryError::Config(_) | RegistryError::ConfigFile { .. } | RegistryError::IncompleteWorker => {
                ErrorKind::InvalidRequest
            }
            RegistryError::UnknownModel { .. } => ErrorKind::ModelNotFound,
        };
        let mesh = MeshError::new(kind, err.to_string());
        if matches!(err, RegistryError::UnknownModel { .. }) { mesh.with_param("model") } else { mesh }
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(err: RegistryError) -> tonic::Status {
        MeshError::from(err).into()
    }
}
