//! `POST /tokenize` and `POST /detokenize`, in vLLM's shape.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use infermesh_proto::v1::{ChatMessage, ChatMessages, DetokenizeRequest, TokenizeRequest, tokenize_request};
use serde_json::{Value, json};

use crate::admission::authenticate;
use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::mesh::peer_error;
use crate::openai::{DetokenizeBody, TokenizeBody, chat_messages};
use crate::routes::RawBody;
use crate::routes::generate::chat_model;

/// `{model, prompt | messages, add_special_tokens}` -> `{tokens, count, max_model_len}`.
pub async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state.mesh, &headers).await?;
    let body: TokenizeBody = parse_json(&body)?;
    let model = chat_model(&state, &body.model)?;
    let input = match (body.prompt, body.messages) {
        (Some(prompt), None) => tokenize_request::Input::Text(prompt),
        (None, Some(messages)) => tokenize_request::Input::Chat(ChatMessages {
            messages: chat_messages(messages)?
                .into_iter()
                .map(|(role, content)| ChatMessage { role, content })
                .collect(),
        }),
        _ => return Err(ApiError::invalid("prompt", "send exactly one of `prompt` or `messages`")),
    };
    let picked = state.mesh.pick_worker(&model.id, &[])?;
    let mut worker = picked.client.clone();
    let response = worker
        .tokenize(TokenizeRequest {
            model: model.id,
            input: Some(input),
            add_special_tokens: body.add_special_tokens.unwrap_or(true),
        })
        .await
        .map_err(peer_error("worker"))?
        .into_inner();
    Ok(Json(
        json!({"tokens": response.tokens, "count": response.tokens.len(), "max_model_len": response.max_model_len}),
    ))
}

/// `{model, tokens}` -> `{prompt}`.
pub async fn detokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state.mesh, &headers).await?;
    let body: DetokenizeBody = parse_json(&body)?;
    let model = chat_model(&state, &body.model)?;
    let picked = state.mesh.pick_worker(&model.id, &[])?;
    let mut worker = picked.client.clone();
    let response = worker
        .detokenize(DetokenizeRequest { model: model.id, tokens: body.tokens })
        .await
        .map_err(peer_error("worker"))?
        .into_inner();
    Ok(Json(json!({"prompt": response.text})))
}
