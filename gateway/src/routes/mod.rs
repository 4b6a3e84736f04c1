//! HTTP handlers, one module per surface.

pub mod account;
pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod generate;
pub mod health;
pub mod models;
pub mod tokenize;

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use infermesh_service::ErrorKind;

use crate::error::ApiError;

/// The raw body, with an over-size body reported as a 413 in OpenAI's
/// shape. Handlers parse it after authenticating, so a bad key is a 401
/// whatever the body holds.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(request, state).await.map(RawBody).map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorKind::PayloadTooLarge, "the request body is too large; send a smaller body")
            } else {
                ApiError::new(ErrorKind::InvalidRequest, format!("cannot read the request body: {rejection}"))
            }
        })
    }
}

pub fn with_headers(mut response: Response, headers: Vec<(HeaderName, HeaderValue)>) -> Response {
    response.headers_mut().extend(headers);
    response
}

pub fn unix_now() -> u64 {
    u64::try_from(infermesh_service::now_unix_ms() / 1000).unwrap_or(0)
}
