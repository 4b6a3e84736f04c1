//! HTTP handlers, one module per surface.

pub mod account;
pub mod admin;
pub mod catalog;
pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod generate;
pub mod health;
pub mod models;
pub mod queue;
pub mod tokenize;

use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use infermesh_service::ErrorKind;

use crate::error::ApiError;

/// The largest request body the gateway accepts, set once by the router.
#[derive(Clone, Copy)]
pub struct MaxBodyBytes(pub usize);

/// How much of an over-size body is read and thrown away before the 413
/// goes out. Answering before the client has finished sending makes the
/// server close a half-read connection, and most clients (httpx, reqwest)
/// then report a broken pipe instead of the 413; past this much, the
/// connection is cut anyway.
const OVERSIZE_DRAIN_BYTES: usize = 64 * 1024 * 1024;
const OVERSIZE_DRAIN_TIME: Duration = Duration::from_secs(10);

/// The raw body, with an over-size body reported as a 413 in OpenAI's
/// shape. Handlers parse it after authenticating, so a bad key is a 401
/// whatever the body holds.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = request.extensions().get::<MaxBodyBytes>().map_or(usize::MAX, |max| max.0);
        let mut frames = request.into_body().into_data_stream();
        let mut body = BytesMut::new();
        while let Some(frame) = frames.next().await {
            let chunk = frame.map_err(|error| {
                ApiError::new(ErrorKind::InvalidRequest, format!("cannot read the request body: {error}"))
            })?;
            if body.len() + chunk.len() > limit {
                let drain = async {
                    let mut seen = body.len() + chunk.len();
                    while seen <= OVERSIZE_DRAIN_BYTES {
                        match frames.next().await {
                            Some(Ok(more)) => seen += more.len(),
                            _ => break,
                        }
                    }
                };
                let _ = tokio::time::timeout(OVERSIZE_DRAIN_TIME, drain).await;
                return Err(ApiError::new(
                    ErrorKind::PayloadTooLarge,
                    format!("the request body is larger than {limit} bytes; send a smaller body"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(RawBody(body.freeze()))
    }
}

pub fn with_headers(mut response: Response, headers: Vec<(HeaderName, HeaderValue)>) -> Response {
    response.headers_mut().extend(headers);
    response
}

pub fn unix_now() -> u64 {
    u64::try_from(infermesh_service::now_unix_ms() / 1000).unwrap_or(0)
}
