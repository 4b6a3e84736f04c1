//! The HTTP router and its middleware stack.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use infermesh_service::{ErrorKind, MeshError};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::mesh::Mesh;
use crate::routes::{
    MaxBodyBytes, account, admin, catalog, chat, completions, embeddings, health, models, queue, tokenize,
};

#[derive(Clone)]
pub struct AppState {
    pub mesh: Arc<Mesh>,
    pub signup_credit_nanos: i64,
    /// Sign-ups allowed per source IP per minute (0: no limit).
    pub signups_per_minute_per_ip: u32,
    /// The operator token for `/admin/v1/`; none turns those routes off.
    pub admin_token: Option<Arc<str>>,
    pub metrics: Option<PrometheusHandle>,
    /// Calls upstream providers (`openai_compatible` backends).
    pub upstream: reqwest::Client,
    /// With the caller's own provider key, the share of the cost charged.
    pub byok_fee_percent: u32,
}

/// Builds the gateway's router.
///
/// Layers, outermost first:
/// 1. metrics + trace: an `http.request` span per request (the root of
///    the trace every gRPC hop joins) and request count/latency by route
///    and status;
/// 2. in-flight limit: beyond `max_concurrent_requests` (0: none) a request
///    is refused with a 503 and `Retry-After` before any work is done;
/// 3. body limit: `RawBody` refuses bodies over `max_body_bytes` with a
///    413 in OpenAI's shape (every handler reads its body through it).
///
/// Client routes authenticate inside their handlers (deny by default:
/// every handler but the open ones below calls `authenticate` first).
/// Open routes: `/health`, `/readyz`, `/metrics`, `/v1/auth/signup`.
pub fn router(state: AppState, max_body_bytes: usize, max_concurrent_requests: usize) -> Router {
    let router = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route("/queue/v1/chat/completions", post(queue::chat_completions))
        .route("/queue/v1/embeddings", post(queue::embeddings))
        .route("/queue/v1/results/{id}", get(queue::result).delete(queue::cancel))
        .route("/v1/auth/signup", post(account::signup))
        .route("/v1/auth/key", get(account::current_key))
        .route("/v1/credits", get(account::credits))
        .route("/v1/generation", get(account::generation))
        .route("/v1/keys", get(account::list_keys).post(account::create_key))
        .route("/v1/keys/{id}", axum::routing::delete(account::revoke_key))
        .route("/admin/v1/keys/{id}", axum::routing::patch(admin::update_key))
        .route("/admin/v1/keys/{id}/usage", get(admin::key_daily_usage))
        .route("/admin/v1/accounts/{id}/credits", post(admin::top_up))
        .route("/admin/v1/accounts/{id}/plan", get(admin::account_plan).put(admin::set_account_plan))
        .route("/admin/v1/plans", get(admin::list_plans))
        .route("/admin/v1/ledger", get(admin::check_books))
        .route("/admin/v1/models", get(catalog::list_models))
        .route("/admin/v1/models/{*id}", axum::routing::put(catalog::put_model).delete(catalog::delete_model))
        .route("/admin/v1/workers", get(catalog::list_workers))
        .route("/admin/v1/jobs", get(queue::admin_list))
        .route("/admin/v1/jobs/{id}/requeue", post(queue::admin_requeue))
        .route("/health", get(health::health))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::disable())
        .layer(axum::Extension(MaxBodyBytes(max_body_bytes)));
    let router = if max_concurrent_requests > 0 {
        let in_flight =
            InFlight { permits: Arc::new(Semaphore::new(max_concurrent_requests)), max: max_concurrent_requests };
        router.layer(middleware::from_fn_with_state(in_flight, limit_in_flight))
    } else {
        router
    };
    router.layer(middleware::from_fn(observe)).with_state(state)
}

/// The requests being served, bounded. Under a flood, a request refused at
/// once costs the gateway almost nothing and tells the client when to come
/// back; one queued behind thousands would time out after using memory and
/// CPU, and make every other request late too.
#[derive(Clone)]
struct InFlight {
    permits: Arc<Semaphore>,
    max: usize,
}

/// Routes a load balancer or scraper must reach while the gateway is busy.
const NEVER_REFUSED: [&str; 3] = ["/health", "/readyz", "/metrics"];

async fn limit_in_flight(State(in_flight): State<InFlight>, request: Request, next: Next) -> Response {
    if NEVER_REFUSED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Ok(permit) = in_flight.permits.try_acquire_owned() else {
        return ApiError(
            MeshError::new(
                ErrorKind::ModelUnavailable,
                format!("this gateway is serving its limit of {} requests at once; retry shortly", in_flight.max),
            )
            .with_retry_after_ms(1000),
        )
        .into_response();
    };
    next.run(request).await.map(|body| Body::new(HoldsPermit { body, _permit: permit }))
}

/// A response body that keeps its request's in-flight permit until it is
/// sent or dropped: a stream is in flight until its last event.
struct HoldsPermit {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for HoldsPermit {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

async fn not_found(request: Request) -> Response {
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no route {} {}; see /v1/models, /v1/chat/completions, /v1/embeddings",
            request.method(),
            request.uri().path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    let mut response = ApiError::new(
        ErrorKind::InvalidRequest,
        format!("method {} is not allowed on {}", request.method(), request.uri().path()),
    )
    .into_response();
    *response.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    response
}

async fn observe(request: Request, next: Next) -> Response {
    crate::heap::note_request();
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!("http.request", method = %request.method(), route = %route);
    let started = Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("infermesh_http_requests_total", "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("infermesh_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
