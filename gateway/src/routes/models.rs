//! `GET /v1/models` and `GET /v1/models/{id}` (ids contain `/`): OpenAI's
//! model object plus OpenRouter's `pricing` (dollars per token, as strings),
//! `context_length`, our `capabilities`, and the `plans` that include it.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Json;
use infermesh_billing::plans::patterns_include;
use infermesh_proto::v1::{ListPlansRequest, Model, ModelKind, Plan};
use serde_json::{Value, json};

use crate::admission::authenticate;
use crate::app::AppState;
use crate::error::ApiError;

fn per_token(nanos_per_mtok: i64) -> String {
    // nano-dollars per million tokens -> dollars per token, exactly.
    let femto = i128::from(nanos_per_mtok); // 1e-15 dollars per token
    let whole = femto / 1_000_000_000_000_000;
    let frac = (femto % 1_000_000_000_000_000).abs();
    let text = format!("{whole}.{frac:015}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() { "0".to_owned() } else { text.to_owned() }
}

/// Request parameters a chat model takes, in OpenRouter's
/// `supported_parameters` terms; an upstream-served model takes what its
/// provider does, so tools and structured output follow its capabilities.
fn supported_parameters(model: &Model) -> Vec<&'static str> {
    if model.kind() == ModelKind::Embedding {
        return vec!["dimensions", "encoding_format", "user"];
    }
    let mut params = vec![
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "n",
        "user",
    ];
    let has = |capability: &str| model.capabilities.iter().any(|c| c == capability);
    if has("tools") {
        params.extend(["tools", "tool_choice"]);
    }
    if has("json") || has("structured_output") || has("structured_outputs") {
        params.extend(["response_format", "structured_outputs"]);
    }
    params
}

pub fn model_json(model: &Model) -> Value {
    let pricing = model.pricing.unwrap_or_default();
    let embedding = model.kind() == ModelKind::Embedding;
    let vision = model.capabilities.iter().any(|c| c == "vision");
    let inputs: &[&str] = if vision { &["text", "image"] } else { &["text"] };
    let outputs: &[&str] = if embedding { &["embeddings"] } else { &["text"] };
    json!({
        "id": model.id,
        "object": "model",
        "created": model.created_unix,
        "owned_by": model.owned_by,
        "name": model.id,
        "description": model.description,
        "aliases": model.aliases,
        "context_length": model.context_length,
        "max_output_tokens": model.max_output_tokens,
        "type": if model.kind() == ModelKind::Embedding { "embedding" } else { "chat" },
        "capabilities": model.capabilities,
        "pricing": {
            "prompt": per_token(pricing.prompt_nanos_per_mtok),
            "completion": per_token(pricing.completion_nanos_per_mtok),
        },
        "architecture": {
            "modality": format!("{}->{}", inputs.join("+"), outputs.join("+")),
            "input_modalities": inputs,
            "output_modalities": outputs,
        },
        "top_provider": {
            "context_length": model.context_length,
            "max_completion_tokens": model.max_output_tokens,
            "is_moderated": false,
        },
        "supported_parameters": supported_parameters(model),
    })
}

/// Billing's plans, to say which include each model; without billing the
/// listing still answers, without `plans`.
async fn plans(state: &AppState) -> Option<Vec<Plan>> {
    match state.mesh.billing.clone().list_plans(ListPlansRequest {}).await {
        Ok(plans) => Some(plans.into_inner().plans),
        Err(status) => {
            tracing::warn!(error = %status.message(), "cannot list plans; models listed without them");
            None
        }
    }
}

fn listing_json(model: &Model, plans: Option<&[Plan]>) -> Value {
    let mut value = model_json(model);
    if let Some(plans) = plans {
        value["plans"] = plans
            .iter()
            .filter(|p| patterns_include(&p.models, &model.id) || model.plans.contains(&p.id))
            .map(|p| p.id.clone())
            .collect();
    }
    value
}

pub async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authenticate(&state.mesh, &headers).await?;
    let snapshot = state.mesh.snapshot().ok_or_else(|| {
        ApiError::new(infermesh_service::ErrorKind::ModelUnavailable, "the model catalogue is not loaded yet")
    })?;
    let plans = plans(&state).await;
    let data: Vec<Value> = snapshot.models.iter().map(|m| listing_json(m, plans.as_deref())).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state.mesh, &headers).await?;
    let model = state.mesh.resolve_model(&id)?;
    Ok(Json(listing_json(&model, plans(&state).await.as_deref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_carry_openrouter_fields() {
        let model = Model {
            id: "openai/gpt-4o-mini".into(),
            context_length: 128_000,
            max_output_tokens: 16_384,
            capabilities: vec!["chat".into(), "tools".into(), "vision".into()],
            ..Model::default()
        };
        let listed = model_json(&model);
        assert_eq!(listed["architecture"]["modality"], "text+image->text");
        assert_eq!(listed["top_provider"]["max_completion_tokens"], 16_384);
        let params = listed["supported_parameters"].as_array().unwrap();
        assert!(params.contains(&json!("tools")) && !params.contains(&json!("response_format")));
        let embedding = Model { kind: ModelKind::Embedding.into(), ..Model::default() };
        assert_eq!(model_json(&embedding)["architecture"]["output_modalities"], json!(["embeddings"]));
    }

    #[test]
    fn prices_become_exact_dollars_per_token() {
        assert_eq!(per_token(30_000_000), "0.00000003");
        assert_eq!(per_token(0), "0");
        assert_eq!(per_token(2_500_000_000_000), "0.0025");
        assert_eq!(per_token(2_500_000_000_000_000), "2.5");
    }
}
