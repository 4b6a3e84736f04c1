//! `POST /v1/completions`: the legacy text API; `prompt` may be text or
//! token ids.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use infermesh_proto::v1::{TokenIds, generate_request};

use crate::admission::authenticate;
use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::openai::{CompletionRequest, ValidPrompt};
use crate::routes::RawBody;
use crate::routes::generate::{Flavor, Generation, chat_model, provider_key, serve};

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let key = authenticate(&state.mesh, &headers).await?;
    let request = parse_json::<CompletionRequest>(&body)?.validate()?;
    let model = chat_model(&state, &request.model)?;
    let (prompt, prompt_bound) = match request.prompt {
        // Each token covers at least one byte, plus BOS.
        ValidPrompt::Text(text) => {
            let bound = u32::try_from(text.len() + 1).unwrap_or(u32::MAX);
            (generate_request::Prompt::Text(text), bound)
        }
        ValidPrompt::Tokens(ids) => {
            let count = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            (generate_request::Prompt::Tokens(TokenIds { ids }), count)
        }
    };
    let generation = Generation {
        flavor: Flavor::Completion,
        prompt,
        prompt_bound,
        max_tokens: request.max_tokens,
        fit_to_context: false,
        sampling: request.sampling,
        text_only: None,
        provider_key: provider_key(&headers)?,
        arrived,
        body,
        request_id: infermesh_service::new_request_id(Flavor::Completion.id_prefix()),
        bill_unfinished: true,
        fresh_request_id: true,
    };
    serve(&state, key, model, generation).await
}
