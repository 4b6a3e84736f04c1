//! Open routes: `/health` (every service's gRPC health and the worker
//! pool), `/readyz` (200 once a request could be served), `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infermesh_proto::v1::JobStatsRequest;
use serde_json::{Value, json};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::app::AppState;
use crate::ratelimit_shards::replica_addresses;

async fn service_status(address: &str) -> &'static str {
    let Ok(channel) = infermesh_service::channel(address) else {
        return "unreachable";
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest { service: String::new() });
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(response)) if response.get_ref().status == 1 => "serving",
        Ok(Ok(_)) => "not_serving",
        Ok(Err(_)) | Err(_) => "unreachable",
    }
}

/// Every replica must serve for the ratelimit service to count as serving.
async fn replicas_status(addresses: &str, enabled: bool) -> &'static str {
    if !enabled {
        return "off";
    }
    let statuses = futures::future::join_all(replica_addresses(addresses).map(service_status)).await;
    statuses.into_iter().find(|status| *status != "serving").unwrap_or("serving")
}

async fn report(state: &AppState) -> (bool, Value) {
    let peers = &state.mesh.peers;
    let (auth, billing, registry, ratelimit) = tokio::join!(
        service_status(&peers.auth),
        service_status(&peers.billing),
        service_status(&peers.registry),
        replicas_status(&peers.ratelimit, state.mesh.ratelimit.enabled()),
    );
    let snapshot = state.mesh.snapshot();
    let workers: Vec<Value> = snapshot
        .iter()
        .flat_map(|s| s.workers.iter())
        .map(|w| {
            let load = w.load.unwrap_or_default();
            json!({"id": w.worker_id, "address": w.address, "models": w.models, "active_sequences": load.active_sequences, "queued": load.queued})
        })
        .collect();
    let all_serving =
        [auth, billing, registry].iter().all(|s| *s == "serving") && matches!(ratelimit, "serving" | "off");
    // A mesh whose models are all served by upstream providers needs no worker.
    let needs_workers = snapshot
        .iter()
        .flat_map(|s| s.models.iter())
        .any(|m| m.backends.iter().any(|b| b.kind == infermesh_registry::catalog::WORKERS));
    let ready = all_serving && snapshot.is_some() && (!workers.is_empty() || !needs_workers);
    let body = json!({
        "status": if ready { "ok" } else { "degraded" },
        "services": {"auth": auth, "billing": billing, "registry": registry, "ratelimit": ratelimit},
        "catalog_version": snapshot.as_ref().map(|s| s.version),
        "models": snapshot.as_ref().map(|s| s.models.len()).unwrap_or(0),
        "workers": workers,
    });
    (ready, body)
}

/// The jobs service's state and the queue's numbers; a queue that cannot
/// be reached does not make the gateway unready (the `/v1/` routes work).
async fn queue_report(state: &AppState) -> (&'static str, Value) {
    let Some(mut jobs) = state.mesh.jobs.clone() else {
        return ("off", Value::Null);
    };
    match tokio::time::timeout(Duration::from_secs(2), jobs.stats(JobStatsRequest {})).await {
        Ok(Ok(stats)) => {
            let stats = stats.into_inner();
            let queue = json!({
                "depth": stats.queued,
                "processing": stats.processing,
                "completed": stats.completed,
                "failed": stats.failed,
                "dead": stats.dead,
                "cancelled": stats.cancelled,
                "oldest_queued_age_ms": stats.oldest_queued_age_ms,
            });
            ("serving", queue)
        }
        Ok(Err(_)) | Err(_) => ("unreachable", Value::Null),
    }
}

/// `/health`: the readiness report plus the queue's numbers, which a
/// readiness probe has no use for (they cost the jobs service a count).
pub async fn health(State(state): State<AppState>) -> Response {
    let ((ready, mut body), (jobs, queue)) = tokio::join!(report(&state), queue_report(&state));
    body["services"]["jobs"] = json!(jobs);
    body["queue"] = queue;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

pub async fn readyz(State(state): State<AppState>) -> StatusCode {
    if report(&state).await.0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}
