//! The one table that maps an error kind to its HTTP status, gRPC code and
//! OpenAI `type`/`code`. Every crate converts its own errors into an
//! [`ErrorKind`] and nowhere else picks a status code.

use tonic::{Code, Status};

/// Why a request failed, as callers of any surface need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    InvalidRequest,
    ContextLengthExceeded,
    PayloadTooLarge,
    Authentication,
    InsufficientQuota,
    PermissionDenied,
    ModelNotFound,
    NotFound,
    Conflict,
    RateLimited,
    ModelUnavailable,
    UpstreamError,
    UpstreamTimeout,
    Internal,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorClass {
    pub http_status: u16,
    pub grpc_code: Code,
    /// OpenAI's `error.type`.
    pub openai_type: &'static str,
    /// OpenAI's `error.code`, also the stable name of the kind.
    pub code: &'static str,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 14] = [
        ErrorKind::InvalidRequest,
        ErrorKind::ContextLengthExceeded,
        ErrorKind::PayloadTooLarge,
        ErrorKind::Authentication,
        ErrorKind::InsufficientQuota,
        ErrorKind::PermissionDenied,
        ErrorKind::ModelNotFound,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::RateLimited,
        ErrorKind::ModelUnavailable,
        ErrorKind::UpstreamError,
        ErrorKind::UpstreamTimeout,
        ErrorKind::Internal,
    ];

    pub const fn class(self) -> ErrorClass {
        const fn row(http_status: u16, grpc_code: Code, openai_type: &'static str, code: &'static str) -> ErrorClass {
            ErrorClass { http_status, grpc_code, openai_type, code }
        }
        match self {
            ErrorKind::InvalidRequest => {
                row(400, Code::InvalidArgument, "invalid_request_error", "invalid_request_error")
            }
            ErrorKind::ContextLengthExceeded => {
                row(400, Code::OutOfRange, "invalid_request_error", "context_length_exceeded")
            }
            ErrorKind::PayloadTooLarge => row(413, Code::InvalidArgument, "invalid_request_error", "payload_too_large"),
            ErrorKind::Authentication => row(401, Code::Unauthenticated, "authentication_error", "invalid_api_key"),
            ErrorKind::InsufficientQuota => {
                row(402, Code::FailedPrecondition, "insufficient_quota", "insufficient_quota")
            }
            ErrorKind::PermissionDenied => row(403, Code::PermissionDenied, "permission_denied", "permission_denied"),
            ErrorKind::ModelNotFound => row(404, Code::NotFound, "invalid_request_error", "model_not_found"),
            ErrorKind::NotFound => row(404, Code::NotFound, "invalid_request_error", "not_found"),
            ErrorKind::Conflict => row(409, Code::AlreadyExists, "invalid_request_error", "conflict"),
            ErrorKind::RateLimited => row(429, Code::ResourceExhausted, "rate_limit_exceeded", "rate_limit_exceeded"),
            ErrorKind::ModelUnavailable => row(503, Code::Unavailable, "model_unavailable", "model_unavailable"),
            ErrorKind::UpstreamError => row(502, Code::Unknown, "upstream_error", "upstream_error"),
            ErrorKind::UpstreamTimeout => row(504, Code::DeadlineExceeded, "upstream_error", "upstream_timeout"),
            ErrorKind::Internal => row(500, Code::Internal, "server_error", "internal_error"),
        }
    }

    /// The kind named by [`ErrorClass::code`].
    pub fn from_code(code: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|kind| kind.class().code == code)
    }

    /// The closest kind for a bare gRPC code, used when a peer sent no kind.
    pub fn from_grpc_code(code: Code) -> ErrorKind {
        match code {
            Code::InvalidArgument => ErrorKind::InvalidRequest,
            Code::OutOfRange => ErrorKind::ContextLengthExceeded,
            Code::Unauthenticated => ErrorKind::Authentication,
            Code::FailedPrecondition => ErrorKind::InsufficientQuota,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::Conflict,
            Code::ResourceExhausted => ErrorKind::RateLimited,
            Code::Unavailable => ErrorKind::ModelUnavailable,
            Code::DeadlineExceeded => ErrorKind::UpstreamTimeout,
            Code::Ok
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => ErrorKind::Internal,
        }
    }
}

/// An error that crosses a service boundary: a kind, a message that tells the
/// caller how to fix it, and for some kinds a retry hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MeshError {
    pub kind: ErrorKind,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    pub param: Option<String>,
}

const KIND_METADATA: &str = "x-infermesh-error";
const RETRY_METADATA: &str = "x-infermesh-retry-after-ms";
const PARAM_METADATA: &str = "x-infermesh-param";

impl MeshError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_after_ms: None, param: None }
    }

    pub fn with_retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message).with_param(param)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<MeshError> for Status {
    fn from(err: MeshError) -> Status {
        let mut status = Status::new(err.kind.class().grpc_code, err.message);
        let meta = status.metadata_mut();
        if let Ok(value) = err.kind.class().code.parse() {
            meta.insert(KIND_METADATA, value);
        }
        if let Some(ms) = err.retry_after_ms
            && let Ok(value) = ms.to_string().parse()
        {
            meta.insert(RETRY_METADATA, value);
        }
        if let Some(param) = err.param
            && let Ok(value) = param.parse()
        {
            meta.insert(PARAM_METADATA, value);
        }
        status
    }
}

impl From<Status> for MeshError {
    /// Keeps the kind a peer sent; falls back to the gRPC code, so a
    /// transport failure reads as the service being unavailable.
    fn from(status: Status) -> MeshError {
        let meta = status.metadata();
        let text = |name: &str| meta.get(name).and_then(|v| v.to_str().ok());
        let kind = text(KIND_METADATA)
            .and_then(ErrorKind::from_code)
            .unwrap_or_else(|| ErrorKind::from_grpc_code(status.code()));
        MeshError {
            kind,
            message: status.message().to_owned(),
            retry_after_ms: text(RETRY_METADATA).and_then(|v| v.parse().ok()),
            param: text(PARAM_METADATA).map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_a_grpc_round_trip() {
        for kind in ErrorKind::ALL {
            let err = MeshError::new(kind, "why").with_retry_after_ms(1500).with_param("model");
            let back = MeshError::from(Status::from(err.clone()));
            assert_eq!(back, err);
        }
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<_> = ErrorKind::ALL.iter().map(|k| k.class().code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn bare_unavailable_status_reads_as_model_unavailable() {
        let err = MeshError::from(Status::unavailable("connection refused"));
        assert_eq!(err.kind, ErrorKind::ModelUnavailable);
    }
}
