//! The HTTP edge of the error table: every failure leaves the gateway as
//! OpenAI's `{"error":{"message","type","param","code"}}` with the status
//! from [`ErrorKind::class`], plus `Retry-After` where a retry can work.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infermesh_service::{ErrorKind, MeshError};
use serde::de::DeserializeOwned;
use serde_json::json;

/// An error on its way to an HTTP client.
#[derive(Clone, Debug)]
pub struct ApiError(pub MeshError);

impl<E: Into<MeshError>> From<E> for ApiError {
    fn from(err: E) -> Self {
        ApiError(err.into())
    }
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError(MeshError::new(kind, message))
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError(MeshError::invalid(param, message))
    }

    pub fn body(&self) -> serde_json::Value {
        let class = self.0.kind.class();
        json!({
            "error": {
                "message": self.0.message,
                "type": class.openai_type,
                "param": self.0.param,
                "code": class.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let class = self.0.kind.class();
        let status = StatusCode::from_u16(class.http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(code = class.code, message = %self.0.message, "request failed");
        }
        metrics::counter!("infermesh_gateway_errors_total", "code" => class.code).increment(1);
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(ms) = self.0.retry_after_ms
            && let Ok(value) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// Parses a JSON body; every failure is an OpenAI-shaped 400 with `param`
/// naming the offending field when there is one.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(ErrorKind::InvalidRequest, "the request body is empty; send a JSON object"));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(ErrorKind::InvalidRequest, format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::new(ErrorKind::InvalidRequest, format!("invalid request body: {inner}"))
        } else {
            ApiError::invalid(&path, format!("invalid value for `{path}`: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[expect(dead_code, reason = "only parsed")]
        max_tokens: u32,
    }

    #[test]
    fn malformed_and_mistyped_bodies_say_what_is_wrong() {
        let err = parse_json::<Body>(b"{not json").unwrap_err();
        assert_eq!(err.0.kind, ErrorKind::InvalidRequest);
        assert!(err.0.message.contains("not valid JSON"));
        let err = parse_json::<Body>(br#"{"max_tokens":"ten"}"#).unwrap_err();
        assert_eq!(err.0.param.as_deref(), Some("max_tokens"));
        let err = parse_json::<Body>(b"{}").unwrap_err();
        assert!(err.0.message.contains("max_tokens"), "{}", err.0.message);
        assert!(parse_json::<Body>(b"  ").is_err());
    }

    #[test]
    fn body_has_openai_shape() {
        let body = ApiError::new(ErrorKind::InsufficientQuota, "top up").body();
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(body["error"]["code"], "insufficient_quota");
        assert!(body["error"]["param"].is_null());
    }
}
