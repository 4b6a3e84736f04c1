//! The gateway's job runner: claims queued jobs from the jobs service,
//! serves each exactly as the synchronous route would (same admission,
//! backends, billing and response body), and reports how it ended.
//!
//! A job's request id is derived from its id, so however often it is
//! attempted (a retry, a runner or jobs-service crash), its credit hold and
//! settlement are one, and it is charged once. Cancellation reaches the
//! runner at its next lease renewal (every second), which drops the
//! request: the worker stops generating and the hold is settled for what
//! was generated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infermesh_proto::v1::jobs_service_client::JobsServiceClient;
use infermesh_proto::v1::{ClaimRequest, FinishRequest, GetKeyInfoRequest, Job, JobOutcome, KeyInfo, RenewRequest};
use infermesh_service::{CancellationToken, ErrorKind, MeshError, TracedChannel};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::app::AppState;
use crate::error::ApiError;
use crate::mesh::peer_error;
use crate::routes::chat::chat_generation;
use crate::routes::embeddings::{embed, embedding_request};
use crate::routes::generate::{Flavor, serve};

/// `Job.kind` of a queued chat completion.
pub const CHAT_COMPLETIONS: &str = "chat.completions";
/// `Job.kind` of a queued embeddings request.
pub const EMBEDDINGS: &str = "embeddings";

/// How long one claim waits for work before asking again.
const CLAIM_WAIT_MS: u32 = 10_000;
/// How often leases are renewed (and cancellations learnt).
const RENEW_EVERY: Duration = Duration::from_secs(1);

pub struct JobRunner {
    state: AppState,
    jobs: JobsServiceClient<TracedChannel>,
    id: String,
    slots: u32,
    running: Mutex<HashMap<String, AbortHandle>>,
    freed: Notify,
}

/// How an attempt ended, for the jobs service.
struct Ending {
    outcome: JobOutcome,
    result: Vec<u8>,
    error: Vec<u8>,
    retry_after_ms: u64,
}

impl Ending {
    fn error(outcome: JobOutcome, error: Vec<u8>, retry_after_ms: u64) -> Ending {
        Ending { outcome, result: Vec::new(), error, retry_after_ms }
    }
}

/// The request id of `job`'s every attempt: its id under the route's prefix.
pub fn request_id_of(job: &Job, prefix: &str) -> String {
    format!("{prefix}-{}", job.id.strip_prefix("job-").unwrap_or(&job.id))
}

impl JobRunner {
    pub fn new(state: AppState, jobs: JobsServiceClient<TracedChannel>, slots: u32) -> JobRunner {
        JobRunner {
            state,
            jobs,
            id: infermesh_service::new_request_id("runner"),
            slots: slots.max(1),
            running: Mutex::new(HashMap::new()),
            freed: Notify::new(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, AbortHandle>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims and runs jobs until `stop`, at most `slots` at once.
    pub async fn run(self, stop: CancellationToken) {
        let runner = Arc::new(self);
        tokio::spawn(runner.clone().renew_forever(stop.clone()));
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let free = runner.slots.saturating_sub(u32::try_from(runner.running().len()).unwrap_or(u32::MAX));
            if free == 0 {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = runner.freed.notified() => continue,
                }
            }
            let mut jobs = runner.jobs.clone();
            let claim =
                jobs.claim(ClaimRequest { runner_id: runner.id.clone(), max_jobs: free, wait_ms: CLAIM_WAIT_MS });
            let claimed = tokio::select! {
                () = stop.cancelled() => return,
                claimed = claim => claimed,
            };
            match claimed {
                Ok(response) => {
                    unreachable_since = None;
                    for job in response.into_inner().jobs {
                        runner.start(job);
                    }
                }
                Err(status) => {
                    if unreachable_since.is_none_or(|since| since.elapsed() > Duration::from_secs(30)) {
                        tracing::warn!(error = %status.message(), "cannot claim jobs; retrying");
                        unreachable_since = Some(Instant::now());
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    fn start(self: &Arc<Self>, job: Job) {
        let runner = self.clone();
        let id = job.id.clone();
        // Held across the spawn, so the task cannot finish and remove its
        // entry before the entry exists.
        let mut running = self.running();
        let task = tokio::spawn(async move {
            let ending = runner.attempt(&job).await;
            let outcome = match ending.outcome {
                JobOutcome::Complete => "complete",
                JobOutcome::Failed | JobOutcome::Unspecified => "failed",
                JobOutcome::Retry => "retry",
                JobOutcome::Defer => "defer",
            };
            metrics::counter!("infermesh_job_attempts_total", "outcome" => outcome).increment(1);
            runner.report(&job, ending).await;
            runner.running().remove(&job.id);
            runner.freed.notify_one();
        });
        running.insert(id, task.abort_handle());
    }

    /// Keeps the leases of running jobs and stops the ones the jobs
    /// service gave up on (cancelled, or retried elsewhere).
    async fn renew_forever(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let job_ids: Vec<String> = self.running().keys().cloned().collect();
            if job_ids.is_empty() {
                continue;
            }
            // While the jobs service is away the jobs keep running: a
            // restarted service grants their leases afresh.
            let Ok(renewed) = self.jobs.clone().renew(RenewRequest { runner_id: self.id.clone(), job_ids }).await
            else {
                continue;
            };
            for id in renewed.into_inner().stop {
                if let Some(task) = self.running().remove(&id) {
                    tracing::info!(job = %id, "job cancelled or taken back; stopping it");
                    task.abort();
                    self.freed.notify_one();
                }
            }
        }
    }

    /// Reports until the jobs service has it: the work is done and must
    /// not be lost to a restart of the service.
    async fn report(&self, job: &Job, ending: Ending) {
        let finish = FinishRequest {
            id: job.id.clone(),
            attempt: job.attempt,
            outcome: ending.outcome as i32,
            result: ending.result,
            error: ending.error,
            retry_after_ms: ending.retry_after_ms,
        };
        let mut pause = Duration::from_millis(100);
        loop {
            match self.jobs.clone().finish(finish.clone()).await {
                Ok(_) => return,
                Err(status) if status.code() == tonic::Code::NotFound => return,
                Err(status) => {
                    tracing::warn!(job = %job.id, error = %status.message(), "cannot report a finished job yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One attempt at `job`, as the caller's key would make it now.
    async fn attempt(&self, job: &Job) -> Ending {
        let key = match self.key_of(job).await {
            Ok(key) => key,
            Err(err) => return ending_of(err.into_response()).await,
        };
        let state = &self.state;
        let arrived = Instant::now();
        let response = match job.kind.as_str() {
            CHAT_COMPLETIONS => match chat_generation(state, bytes::Bytes::from(job.body.clone()), None, arrived) {
                Ok((model, mut generation)) => {
                    generation.request_id = request_id_of(job, Flavor::Chat.id_prefix());
                    generation.bill_unfinished = false;
                    generation.fresh_request_id = false;
                    generation.sampling.stream = false;
                    serve(state, key, model, generation).await
                }
                Err(err) => Err(err),
            },
            EMBEDDINGS => match embedding_request(state, &job.body) {
                Ok((model, request)) => {
                    embed(state, key, model, request, (request_id_of(job, "embd"), false), arrived).await
                }
                Err(err) => Err(err),
            },
            other => Err(ApiError(MeshError::internal(format!("unknown job kind `{other}`")))),
        };
        ending_of(response.unwrap_or_else(IntoResponse::into_response)).await
    }

    /// The key that queued the job, as auth knows it now: a key revoked or
    /// expired since then ends the job.
    async fn key_of(&self, job: &Job) -> Result<KeyInfo, ApiError> {
        let key = self
            .state
            .mesh
            .auth
            .clone()
            .get_key_info(GetKeyInfoRequest { key_id: job.key_id.clone() })
            .await
            .map_err(peer_error("auth"))?
            .into_inner();
        let expired = key.expires_at_unix.is_some_and(|at| at * 1000 <= infermesh_service::now_unix_ms());
        if key.disabled || expired {
            return Err(ApiError::new(
                ErrorKind::Authentication,
                "the API key that queued this job has been revoked, disabled or has expired",
            ));
        }
        Ok(key)
    }
}

/// Sorts an answer into the job's outcome: a response is complete; the
/// key's own limits make it wait without counting a retry; a backend or
/// service that could not serve it now is retried; anything else (the
/// request itself, its key, its credit) fails at once.
async fn ending_of(response: Response) -> Ending {
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap_or_default();
    if status.is_success() {
        return Ending { outcome: JobOutcome::Complete, result: body.to_vec(), error: Vec::new(), retry_after_ms: 0 };
    }
    let error = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|mut value| value.get_mut("error").map(serde_json::Value::take))
        .map_or_else(|| body.to_vec(), |error| error.to_string().into_bytes());
    let retry_after_ms = headers
        .get(axum::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map_or(1000, |secs| secs * 1000);
    let own_limits = headers.contains_key("x-ratelimit-limit-requests");
    match status {
        StatusCode::TOO_MANY_REQUESTS if own_limits => Ending::error(JobOutcome::Defer, error, retry_after_ms),
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::INTERNAL_SERVER_ERROR
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Ending::error(JobOutcome::Retry, error, 0),
        _ => Ending::error(JobOutcome::Failed, error, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_sort_into_outcomes() {
        let error = |kind: ErrorKind| ApiError::new(kind, "why").into_response();
        assert_eq!(
            ending_of(axum::Json(serde_json::json!({"id": 1})).into_response()).await.outcome,
            JobOutcome::Complete
        );
        for kind in
            [ErrorKind::ModelUnavailable, ErrorKind::UpstreamError, ErrorKind::UpstreamTimeout, ErrorKind::Internal]
        {
            assert_eq!(ending_of(error(kind)).await.outcome, JobOutcome::Retry, "{kind:?}");
        }
        for kind in [
            ErrorKind::InvalidRequest,
            ErrorKind::ContextLengthExceeded,
            ErrorKind::InsufficientQuota,
            ErrorKind::PermissionDenied,
            ErrorKind::ModelNotFound,
            ErrorKind::Authentication,
        ] {
            let ending = ending_of(error(kind)).await;
            assert_eq!(ending.outcome, JobOutcome::Failed, "{kind:?}");
            let error: serde_json::Value = serde_json::from_slice(&ending.error).unwrap();
            assert_eq!(error["message"], "why");
        }
        assert_eq!(ending_of(error(ErrorKind::RateLimited)).await.outcome, JobOutcome::Retry, "a backend's 429");
        let mut own = error(ErrorKind::RateLimited);
        own.headers_mut().insert("x-ratelimit-limit-requests", axum::http::HeaderValue::from_static("10"));
        own.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("7"));
        let deferred = ending_of(own).await;
        assert_eq!((deferred.outcome, deferred.retry_after_ms), (JobOutcome::Defer, 7000));
    }

    #[test]
    fn every_attempt_of_a_job_bills_under_one_request_id() {
        let job = Job { id: "job-0190abc".into(), ..Default::default() };
        assert_eq!(request_id_of(&job, "chatcmpl"), "chatcmpl-0190abc");
    }
}
