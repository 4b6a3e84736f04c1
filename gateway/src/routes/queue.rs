//! `/queue/v1/`: async jobs. A body is checked in full before it is
//! queued (a bad one is a 400 now, not a failed job later); the job runs
//! when capacity allows and is polled for. `"stream": true` skips the
//! queue and streams as `/v1/chat/completions` does.
//!
//! Operators: `GET /admin/v1/jobs?status=dead`, `POST /admin/v1/jobs/{id}/requeue`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use infermesh_proto::v1::jobs_service_client::JobsServiceClient;
use infermesh_proto::v1::{
    CancelJobRequest, EnqueueRequest, GetJobRequest, Job, JobStatus, KeyInfo, ListJobsRequest, RequeueRequest,
};
use infermesh_service::{ErrorKind, MeshError, TracedChannel};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::authenticate;
use crate::app::AppState;
use crate::error::ApiError;
use crate::job_runner::{CHAT_COMPLETIONS, EMBEDDINGS};
use crate::mesh::peer_error;
use crate::routes::RawBody;
use crate::routes::admin::Admin;
use crate::routes::chat::chat_generation;
use crate::routes::embeddings::embedding_request;
use crate::routes::generate::{provider_key, serve};

fn jobs_client(state: &AppState) -> Result<JobsServiceClient<TracedChannel>, ApiError> {
    state.mesh.jobs.clone().ok_or_else(|| {
        ApiError(
            MeshError::new(
                ErrorKind::ModelUnavailable,
                "the job queue is off on this gateway (start it with --jobs-addr)",
            )
            .with_retry_after_ms(60_000),
        )
    })
}

fn bytes_json(bytes: &[u8]) -> Value {
    if bytes.is_empty() { Value::Null } else { serde_json::from_slice(bytes).unwrap_or(Value::Null) }
}

/// A job as its owner sees it.
pub fn job_json(job: &Job) -> Value {
    json!({
        "id": job.id,
        "object": "queue.job",
        "status": infermesh_jobs::status_name(job.status()),
        "model": job.model,
        "result": bytes_json(&job.result),
        "error": bytes_json(&job.error),
        "retries": job.retries,
        "created_at": job.created_at_ms / 1000,
        "updated_at": job.updated_at_ms / 1000,
        "poll": poll_path(&job.id),
    })
}

fn poll_path(id: &str) -> String {
    format!("/queue/v1/results/{id}")
}

async fn enqueue(state: &AppState, key: &KeyInfo, kind: &str, model: &str, body: &[u8]) -> Result<Response, ApiError> {
    let job = jobs_client(state)?
        .enqueue(EnqueueRequest {
            account_id: key.account_id.clone(),
            key_id: key.key_id.clone(),
            kind: kind.to_owned(),
            model: model.to_owned(),
            body: body.to_vec(),
            max_concurrent: key.rate_limit.map_or(0, |limits| limits.max_concurrent),
        })
        .await
        .map_err(peer_error("jobs"))?
        .into_inner();
    let body = json!({"id": job.id, "object": "queue.job", "status": "queued", "poll": poll_path(&job.id)});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The caller's own provider key would have to be stored with the job;
/// it never is.
fn no_provider_key(headers: &HeaderMap) -> Result<(), ApiError> {
    match provider_key(headers)? {
        Some(_) => Err(ApiError::invalid(
            "X-Provider-Key",
            "X-Provider-Key is not accepted on queued requests (it would have to be stored); use /v1/ or \"stream\": true",
        )),
        None => Ok(()),
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let key = authenticate(&state.mesh, &headers).await?;
    let (model, generation) = chat_generation(&state, body.clone(), provider_key(&headers)?, arrived)?;
    if generation.sampling.stream {
        return serve(&state, key, model, generation).await;
    }
    no_provider_key(&headers)?;
    enqueue(&state, &key, CHAT_COMPLETIONS, &model.id, &body).await
}

pub async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    let (model, _) = embedding_request(&state, &body)?;
    enqueue(&state, &key, EMBEDDINGS, &model.id, &body).await
}

pub async fn result(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    let request = GetJobRequest { id, account_id: key.account_id };
    let job = jobs_client(&state)?.get(request).await.map_err(peer_error("jobs"))?.into_inner();
    Ok(Json(job_json(&job)))
}

pub async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    let request = CancelJobRequest { id, account_id: key.account_id };
    let job = jobs_client(&state)?.cancel(request).await.map_err(peer_error("jobs"))?.into_inner();
    Ok(Json(job_json(&job)))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

fn parse_status(name: &str) -> Result<JobStatus, ApiError> {
    [
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Complete,
        JobStatus::Failed,
        JobStatus::Dead,
        JobStatus::Cancelled,
    ]
    .into_iter()
    .find(|status| infermesh_jobs::status_name(*status) == name)
    .ok_or_else(|| {
        ApiError::invalid(
            "status",
            format!("unknown job status `{name}`; one of queued, processing, complete, failed, dead, cancelled"),
        )
    })
}

/// A job as operators see it: whose it is, too.
fn admin_job_json(job: &Job) -> Value {
    let mut value = job_json(job);
    value["account_id"] = json!(job.account_id);
    value["key_id"] = json!(job.key_id);
    value["attempts"] = json!(job.attempt);
    value
}

/// `GET /admin/v1/jobs?status=dead&limit=100` (dead letters by default).
pub async fn admin_list(
    _admin: Admin,
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = parse_status(query.status.as_deref().unwrap_or("dead"))?;
    let request = ListJobsRequest { status: status as i32, limit: query.limit.unwrap_or(100) };
    let jobs = jobs_client(&state)?.list(request).await.map_err(peer_error("jobs"))?.into_inner().jobs;
    Ok(Json(json!({"object": "list", "data": jobs.iter().map(admin_job_json).collect::<Vec<_>>()})))
}

/// `POST /admin/v1/jobs/{id}/requeue`: a dead (or failed, or cancelled)
/// job runs again with its retries reset.
pub async fn admin_requeue(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = jobs_client(&state)?.requeue(RequeueRequest { id }).await.map_err(peer_error("jobs"))?.into_inner();
    Ok(Json(admin_job_json(&job)))
}
