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

pub fn model_json(model: &Model) -> Value {
    let pricing = model.pricing.unwrap_or_default();
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
    fn prices_become_exact_dollars_per_token() {
        assert_eq!(per_token(30_000_000), "0.00000003");
        assert_eq!(per_token(0), "0");
        assert_eq!(per_token(2_500_000_000_000), "0.0025");
        assert_eq!(per_token(2_500_000_000_000_000), "2.5");
    }
}
