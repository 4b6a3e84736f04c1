//! `POST /v1/embeddings`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use infermesh_proto::v1::{EmbedRequest, KeyInfo, Model, ModelKind, Usage};
use infermesh_service::money::nanos_to_dollars;
use serde_json::{Value, json};

use crate::admission::{Admission, Ask, authenticate};
use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::mesh::peer_error;
use crate::openai::{EmbeddingRequest, EncodingFormat, ValidEmbedding};
use crate::routes::{RawBody, with_headers};
use infermesh_registry::catalog::WORKERS_PROVIDER;

pub async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let key = authenticate(&state.mesh, &headers).await?;
    let (model, request) = embedding_request(&state, &body)?;
    embed(&state, key, model, request, (infermesh_service::new_request_id("embd"), true), arrived).await
}

/// An embeddings body checked in full, with the model it names.
pub fn embedding_request(state: &AppState, body: &[u8]) -> Result<(Model, ValidEmbedding), ApiError> {
    let request = parse_json::<EmbeddingRequest>(body)?.validate()?;
    let model = state.mesh.resolve_model(&request.model)?;
    if model.kind() != ModelKind::Embedding {
        return Err(ApiError::invalid(
            "model",
            format!("`{}` is not an embedding model; try infermesh/all-minilm-l6-v2", model.id),
        ));
    }
    Ok((model, request))
}

/// Admits, embeds and bills one request under `request_id`: (id, minted
/// for this call).
pub async fn embed(
    state: &AppState,
    key: KeyInfo,
    model: Model,
    request: ValidEmbedding,
    (request_id, fresh_request_id): (String, bool),
    arrived: std::time::Instant,
) -> Result<Response, ApiError> {
    let picked = state.mesh.pick_worker(&model.id, &[])?;
    let mut worker = picked.client.clone();
    // Each token covers at least one byte (plus [CLS]/[SEP]).
    let bound: usize = request.inputs.iter().map(|s| s.len() + 2).sum();
    let prompt_bound = u32::try_from(bound).unwrap_or(u32::MAX);
    let ask = Ask {
        request_id,
        fresh_request_id,
        prompt_tokens: prompt_bound,
        output_tokens: 0,
        end_user: request.end_user.clone(),
        byok_fee_percent: None,
        arrived,
    };
    let admission = match Admission::admit(state.mesh.clone(), key, model, ask).await {
        Ok(admission) => admission,
        Err(refused) => return Ok(refused.into_response()),
    };
    admission.set_provider(WORKERS_PROVIDER);
    let response = admission
        .on_backend(worker.embed(EmbedRequest { model: admission.model.id.clone(), inputs: request.inputs }))
        .await
        .map_err(peer_error("worker"))?
        .into_inner();
    let dimensions = response.embeddings.first().map_or(0, |e| e.values.len());
    if let Some(wanted) = request.dimensions
        && wanted as usize != dimensions
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!("{} produces {dimensions} dimensions; got dimensions={wanted}", admission.model.id),
        ));
    }
    admission.work_started(response.prompt_tokens);
    let settled = admission.settle(Some(Usage { prompt_tokens: response.prompt_tokens, completion_tokens: 0 }));
    let data: Vec<Value> = response
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| {
            let vector = match request.format {
                EncodingFormat::Float => json!(embedding.values),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = embedding.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": admission.model.id,
        "provider": admission.provider(),
        "usage": {
            "prompt_tokens": settled.prompt_tokens,
            "total_tokens": settled.prompt_tokens,
            "cost": nanos_to_dollars(settled.cost_nanos),
            "is_byok": false,
        },
    });
    let mut headers = admission.rate_limit_headers();
    headers.push(admission.overhead_header());
    Ok(with_headers(axum::Json(body).into_response(), headers))
}
