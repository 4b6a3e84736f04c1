//! `infermesh mock-upstream`: an instant OpenAI-compatible upstream for
//! overhead benchmarks. Every chat completion gets the same small answer
//! at once, whole or as a fixed SSE stream with usage, so whatever a
//! gateway in front of it adds is the gateway's own time.

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::cli::{CliError, bind};

#[derive(Debug, clap::Args)]
pub struct MockUpstreamArgs {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
}

const CONTENT: [&str; 3] = ["Hello", " from", " the mock."];
const PROMPT_TOKENS: u32 = 12;

fn model_of(body: &Value) -> &str {
    body.get("model").and_then(Value::as_str).unwrap_or("mock")
}

fn whole(model: &str) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": CONTENT.concat(), "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CONTENT.len(), "total_tokens": PROMPT_TOKENS as usize + CONTENT.len()},
    })
}

/// The whole SSE body: role, one chunk per piece of content, the finish,
/// usage, `[DONE]`.
fn stream(model: &str) -> String {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    events.extend(CONTENT.iter().map(|piece| chunk(json!({"content": piece}), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    events.push(json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
                       "model": model, "choices": [],
                       "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CONTENT.len(),
                                 "total_tokens": PROMPT_TOKENS as usize + CONTENT.len()}}));
    let mut body: String = events.iter().map(|event| format!("data: {event}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    body
}

async fn chat_completions(body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = model_of(&body);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        ([(header::CONTENT_TYPE, "text/event-stream")], stream(model)).into_response()
    } else {
        axum::Json(whole(model)).into_response()
    }
}

async fn models() -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "mock"}]}))
}

pub async fn run(args: MockUpstreamArgs) -> Result<(), CliError> {
    let listener = bind(&args.listen).await?;
    infermesh_service::announce("mock-upstream", &listener).map_err(|e| CliError::Service(e.to_string()))?;
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/models", get(models));
    axum::serve(listener, router).await.map_err(|e| CliError::Service(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_ends_with_usage_and_done() {
        let body = stream("m");
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), CONTENT.len() + 4);
        assert_eq!(events.last(), Some(&"data: [DONE]"));
        let usage: Value = serde_json::from_str(events[events.len() - 2].trim_start_matches("data: ")).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], CONTENT.len());
        assert_eq!(whole("m")["choices"][0]["message"]["content"], "Hello from the mock.");
    }
}
