use infermesh_service::{ErrorKind, MeshError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("model error: {0}")]
    Model(String),
    #[error("inference error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("this worker does not serve model {0:?}")]
    UnknownModel(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt} tokens and max_tokens is {max_tokens}, {} in all, beyond the model's context length of {context}; shorten the prompt or lower max_tokens", prompt + max_tokens)]
    ContextLength { prompt: usize, max_tokens: usize, context: usize },
    #[error("chat template error: {0}")]
    Template(#[from] minijinja::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("cannot fetch model {name}: {reason}")]
    Fetch { name: String, reason: String },
    #[error("io error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("the model is at capacity: its batch and queue are full; retry shortly")]
    Overloaded,
}

impl WorkerError {
    pub fn io(path: impl AsRef<std::path::Path>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let path = path.as_ref().display().to_string();
        move |source| WorkerError::Io { path, source }
    }
}

impl From<WorkerError> for MeshError {
    fn from(err: WorkerError) -> MeshError {
        let kind = match &err {
            WorkerError::UnknownModel(_) => ErrorKind::ModelNotFound,
            WorkerError::InvalidRequest(_) | WorkerError::Template(_) => ErrorKind::InvalidRequest,
            WorkerError::ContextLength { .. } => ErrorKind::ContextLengthExceeded,
            WorkerError::ShuttingDown => ErrorKind::ModelUnavailable,
            WorkerError::Overloaded => {
                return MeshError::new(ErrorKind::ModelUnavailable, err.to_string()).with_retry_after_ms(1000);
            }
            WorkerError::Model(_)
            | WorkerError::Candle(_)
            | WorkerError::Tokenizer(_)
            | WorkerError::Fetch { .. }
            | WorkerError::Io { .. } => {
                tracing::error!(error = %err, "worker failure");
                ErrorKind::Internal
            }
        };
        MeshError::new(kind, err.to_string())
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(err: WorkerError) -> tonic::Status {
        MeshError::from(err).into()
    }
}
