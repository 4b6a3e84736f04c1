//! A small OpenAI-compatible upstream that misbehaves on purpose, one way
//! per base URL: `/slow/v1` answers after `SLOW`, `/fail/v1` with a 500,
//! `/busy/v1` with a 429, `/reject/v1` with a 400, and `/cut/v1` streams
//! two tokens then drops the connection. Every request is counted per
//! way, so a test can tell which upstreams were tried.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

pub const SLOW: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
pub struct Misbehaving {
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Misbehaving {
    /// How many requests reached `/{way}/v1/…`.
    pub fn calls(&self, way: &str) -> usize {
        self.calls.lock().unwrap().get(way).copied().unwrap_or(0)
    }
}

/// Serves the misbehaving upstream on a free port; returns its base URL
/// (`http://127.0.0.1:port`) and the request counter.
pub async fn start() -> (String, Misbehaving) {
    let state = Misbehaving::default();
    let router = Router::new()
        .route("/{way}/v1/chat/completions", axum::routing::post(answer))
        .route("/{way}/v1/completions", axum::routing::post(answer))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (base, state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"message": message, "type": "server_error"}}))).into_response()
}

fn chunk(content: &str) -> Bytes {
    let body = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                      "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    Bytes::from(format!("data: {body}\n\n"))
}

async fn answer(State(state): State<Misbehaving>, Path(way): Path<String>, body: axum::Json<Value>) -> Response {
    *state.calls.lock().unwrap().entry(way.clone()).or_default() += 1;
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    match way.as_str() {
        "slow" => {
            tokio::time::sleep(SLOW).await;
            error(StatusCode::INTERNAL_SERVER_ERROR, "too late")
        }
        "fail" => error(StatusCode::INTERNAL_SERVER_ERROR, "the upstream fell over"),
        "busy" => error(StatusCode::TOO_MANY_REQUESTS, "slow down"),
        "reject" => error(StatusCode::BAD_REQUEST, "this upstream takes no such request"),
        "cut" if streaming => {
            // Two tokens, then the connection drops mid-stream.
            let parts = futures::stream::iter([Ok::<_, std::io::Error>(chunk("Hello")), Ok(chunk(" there"))]);
            let then_cut = futures::StreamExt::chain(
                parts,
                futures::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<Bytes, std::io::Error>(std::io::Error::other("cut"))
                }),
            );
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(then_cut))
                .unwrap()
        }
        _ => error(StatusCode::NOT_FOUND, "no such misbehaviour"),
    }
}
