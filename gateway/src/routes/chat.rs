//! `POST /v1/chat/completions`, JSON or SSE.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use infermesh_proto::v1::{ChatMessage, ChatMessages, Model, generate_request};

use crate::admission::authenticate;
use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::openai::ChatRequest;
use crate::routes::RawBody;
use crate::routes::generate::{Flavor, Generation, chat_model, provider_key, serve};
use infermesh_registry::catalog::OPENAI_COMPATIBLE;

/// An upper bound on prompt tokens from its bytes: every token covers at
/// least one byte, plus room for the chat template's own tokens.
fn prompt_token_bound(messages: &[(String, String)]) -> u32 {
    let bytes: usize = messages.iter().map(|(role, content)| role.len() + content.len() + 8).sum();
    u32::try_from(bytes + 8).unwrap_or(u32::MAX)
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let key = authenticate(&state.mesh, &headers).await?;
    let (model, generation) = chat_generation(&state, body, provider_key(&headers)?, arrived)?;
    serve(&state, key, model, generation).await
}

/// A chat body checked in full (fields, model, what its backends take)
/// and turned into the generation it asks for.
pub fn chat_generation(
    state: &AppState,
    body: bytes::Bytes,
    provider_key: Option<String>,
    arrived: std::time::Instant,
) -> Result<(Model, Generation), ApiError> {
    let chat = parse_json::<ChatRequest>(&body)?.validate()?;
    let model = chat_model(state, &chat.model)?;
    let upstream = model.backends.iter().any(|b| b.kind == OPENAI_COMPATIBLE);
    let text_only = chat.beyond_text.map(|err| err.0);
    if let (false, Some(err)) = (upstream, &text_only) {
        return Err(ApiError(err.clone()));
    }
    let generation = Generation {
        flavor: Flavor::Chat,
        prompt_bound: prompt_token_bound(&chat.messages),
        max_tokens: chat.max_tokens.unwrap_or(model.max_output_tokens),
        fit_to_context: chat.max_tokens.is_none(),
        prompt: generate_request::Prompt::Chat(ChatMessages {
            messages: chat.messages.into_iter().map(|(role, content)| ChatMessage { role, content }).collect(),
        }),
        sampling: chat.sampling,
        text_only,
        provider_key,
        arrived,
        body,
        request_id: infermesh_service::new_request_id(Flavor::Chat.id_prefix()),
        bill_unfinished: true,
        fresh_request_id: true,
    };
    Ok((model, generation))
}
