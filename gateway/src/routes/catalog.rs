//! Operator routes over the catalogue and the worker pool:
//! `GET /admin/v1/models`, `PUT`/`DELETE /admin/v1/models/{id}` (ids
//! contain `/`), `GET /admin/v1/workers`. The registry validates and keeps
//! each edit; every gateway's `WatchCatalog` stream carries it at once.

use axum::Json;
use axum::extract::{Path, State};
use infermesh_proto::v1::{Backend, DeleteModelRequest, ListModelsRequest, Model, PutModelRequest};
use infermesh_service::ErrorKind;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::mesh::peer_error;
use crate::routes::RawBody;
use crate::routes::admin::Admin;
use crate::routes::models::model_json;

/// A backend for operators: where it points, never the key itself.
fn backend_json(backend: &Backend) -> Value {
    json!({
        "kind": backend.kind,
        "name": backend.name,
        "base_url": backend.base_url,
        "model": backend.model,
        "timeout_ms": backend.timeout_ms,
        "api_key_env": backend.api_key_env,
        "api_key_file": backend.api_key_file,
        "api_key": if backend.api_key.is_empty() { Value::Null } else { json!("(set)") },
    })
}

fn admin_model_json(model: &Model) -> Value {
    let mut value = model_json(model);
    value["backends"] = model.backends.iter().map(backend_json).collect();
    value
}

pub async fn list_models(_admin: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let models = state.mesh.registry.clone().list_models(ListModelsRequest {}).await.map_err(peer_error("registry"))?;
    let data: Vec<Value> = models.into_inner().models.iter().map(admin_model_json).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `PUT /admin/v1/models/{id}`: adds or replaces the model; the body is
/// the catalogue file's fields as JSON.
pub async fn put_model(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let spec: Value = parse_json(&body)?;
    if !spec.is_object() {
        return Err(ApiError::new(ErrorKind::InvalidRequest, "the body must be a JSON object describing the model"));
    }
    let request = PutModelRequest { id, spec_json: spec.to_string() };
    let model = state.mesh.registry.clone().put_model(request).await.map_err(peer_error("registry"))?.into_inner();
    state.mesh.until_catalog(|catalog| catalog.models.contains(&model)).await;
    Ok(Json(admin_model_json(&model)))
}

pub async fn delete_model(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let request = DeleteModelRequest { id: id.clone() };
    state.mesh.registry.clone().delete_model(request).await.map_err(peer_error("registry"))?;
    state.mesh.until_catalog(|catalog| catalog.models.iter().all(|model| model.id != id)).await;
    Ok(Json(json!({"id": id, "object": "model", "deleted": true})))
}

/// The worker pool as this gateway sees it (from its catalogue stream).
pub async fn list_workers(_admin: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let snapshot = state.mesh.snapshot().unwrap_or_default();
    let data: Vec<Value> = snapshot
        .workers
        .iter()
        .map(|worker| {
            let load = worker.load.unwrap_or_default();
            json!({
                "id": worker.worker_id,
                "address": worker.address,
                "models": worker.models,
                "active_sequences": load.active_sequences,
                "queued": load.queued,
                "kv_tokens_free": load.kv_tokens_free,
                "in_flight_from_this_gateway": state.mesh.in_flight_on(&worker.worker_id),
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "catalog_version": snapshot.version})))
}
