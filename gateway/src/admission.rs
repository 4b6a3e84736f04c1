//! One request's passage through the mesh's checks, in DESIGN order:
//! key (auth, cached) → rate limit (ratelimit.Acquire) → credit hold
//! (billing.Reserve). The returned [`Admission`] must end in
//! [`Admission::settle`]; if it is dropped first (client gone, error),
//! its `Drop` settles what was delivered or releases the hold, in a
//! spawned task that outlives the request.
//!
//! Settlement is off the response's path: the charge is computed here with
//! the ledger's own formula from what Reserve covered, the response goes
//! out, and the settlement (and the rate limiter's commit) follow in a task
//! that retries until the ledger has written them. Reads of an account's
//! spend through this gateway wait for its settlements in flight
//! ([`PendingSettlements`]), so a caller still reads its own writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use infermesh_proto::v1::{
    AcquireRequest, CommitRequest, KeyInfo, LimitState, Model, ReleaseAdmissionRequest, ReleaseRequest, ReserveRequest,
    SettleRequest, SettleResponse, Usage,
};
use infermesh_service::money::{charge_after_included, token_cost_nanos};
use infermesh_service::{ErrorKind, MeshError};
use tonic::Code;

use crate::error::ApiError;
use crate::mesh::{Mesh, peer_error};

/// The API key from `Authorization: Bearer`, `X-API-Key` or `x-api-key`.
pub fn api_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value =
            value.to_str().map_err(|_| ApiError::new(ErrorKind::Authentication, "malformed Authorization header"))?;
        return match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => Ok(key.trim()),
            _ => Err(ApiError::new(ErrorKind::Authentication, "the Authorization header must be `Bearer <key>`")),
        };
    }
    if let Some(value) = headers.get("x-api-key") {
        return value
            .to_str()
            .map(str::trim)
            .map_err(|_| ApiError::new(ErrorKind::Authentication, "malformed X-API-Key header"));
    }
    Err(ApiError::new(
        ErrorKind::Authentication,
        "missing API key: send it as `Authorization: Bearer im_...` or `X-API-Key`; get one from POST /v1/auth/signup",
    ))
}

pub async fn authenticate(mesh: &Mesh, headers: &HeaderMap) -> Result<KeyInfo, ApiError> {
    let key = api_key(headers)?;
    Ok(mesh.verify_key(key).await?)
}

/// Cost of a request at a model's prices.
pub fn cost_nanos(model: &Model, prompt_tokens: u64, completion_tokens: u64) -> i64 {
    let pricing = model.pricing.unwrap_or_default();
    token_cost_nanos(prompt_tokens, pricing.prompt_nanos_per_mtok)
        .saturating_add(token_cost_nanos(completion_tokens, pricing.completion_nanos_per_mtok))
}

/// What a request is charged: its cost at the model's prices, or with the
/// caller's own provider key (BYOK) only the platform's fee, that share of
/// the cost rounded up to the nano-dollar.
pub fn charge_nanos(model: &Model, prompt_tokens: u64, completion_tokens: u64, byok_fee_percent: Option<u32>) -> i64 {
    let cost = cost_nanos(model, prompt_tokens, completion_tokens);
    match byok_fee_percent {
        None => cost,
        Some(percent) => {
            let fee = (u128::try_from(cost).unwrap_or(0) * u128::from(percent)).div_ceil(100);
            i64::try_from(fee).unwrap_or(i64::MAX)
        }
    }
}

/// `X-RateLimit-*` headers for the key's current window.
pub fn rate_limit_headers(state: &LimitState) -> Vec<(HeaderName, HeaderValue)> {
    let reset = |ms: u64| format!("{}s", ms.div_ceil(1000));
    [
        ("x-ratelimit-limit-requests", state.limit_requests.to_string()),
        ("x-ratelimit-remaining-requests", state.remaining_requests.to_string()),
        ("x-ratelimit-reset-requests", reset(state.reset_requests_ms)),
        ("x-ratelimit-limit-tokens", state.limit_tokens.to_string()),
        ("x-ratelimit-remaining-tokens", state.remaining_tokens.to_string()),
        ("x-ratelimit-reset-tokens", reset(state.reset_tokens_ms)),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some((HeaderName::from_static(name), HeaderValue::from_str(&value).ok()?)))
    .collect()
}

/// A request the checks turned away, with the key's limits when known so
/// even a refusal carries `X-RateLimit-*` headers.
pub struct Refused {
    pub error: ApiError,
    pub limits: Option<LimitState>,
}

impl axum::response::IntoResponse for Refused {
    fn into_response(self) -> axum::response::Response {
        let mut response = self.error.into_response();
        if let Some(limits) = &self.limits {
            response.headers_mut().extend(rate_limit_headers(limits));
        }
        response
    }
}

/// Settlements this gateway has sent but the ledger has not yet written:
/// each has a sequence number, kept per account and overall until it ends.
#[derive(Default)]
pub struct PendingSettlements {
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<OpenSettlements>,
    ended: tokio::sync::Notify,
}

#[derive(Default)]
struct OpenSettlements {
    by_account: std::collections::HashMap<String, std::collections::BTreeSet<u64>>,
    all: std::collections::BTreeSet<u64>,
}

impl PendingSettlements {
    fn begin(self: &Arc<Self>, account_id: &str) -> PendingSettlement {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.by_account.entry(account_id.to_owned()).or_default().insert(seq);
        open.all.insert(seq);
        PendingSettlement { pending: self.clone(), account_id: account_id.to_owned(), seq }
    }

    /// Waits until the settlements of `account_id` (or of every account)
    /// sent before this call ended, at most [`SETTLE_RETRY_FOR`]; later
    /// ones are not waited for, so a busy account cannot hold a read back.
    pub async fn written(&self, account_id: Option<&str>) {
        let before = self.next.load(Ordering::Relaxed);
        let _ = tokio::time::timeout(SETTLE_RETRY_FOR, async {
            loop {
                let ended = self.ended.notified();
                let oldest = {
                    let open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    match account_id {
                        Some(account_id) => open.by_account.get(account_id).and_then(|seqs| seqs.first().copied()),
                        None => open.all.first().copied(),
                    }
                };
                if oldest.is_none_or(|seq| seq >= before) {
                    return;
                }
                ended.await;
            }
        })
        .await;
    }
}

/// One settlement in flight; counts until dropped.
struct PendingSettlement {
    pending: Arc<PendingSettlements>,
    account_id: String,
    seq: u64,
}

impl Drop for PendingSettlement {
    fn drop(&mut self) {
        let mut open = self.pending.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.all.remove(&self.seq);
        if let Some(seqs) = open.by_account.get_mut(&self.account_id) {
            seqs.remove(&self.seq);
            if seqs.is_empty() {
                open.by_account.remove(&self.account_id);
            }
        }
        drop(open);
        self.pending.ended.notify_waiters();
    }
}

pub struct Admission {
    mesh: Arc<Mesh>,
    pub request_id: String,
    pub key: KeyInfo,
    pub model: Model,
    /// The key's limits after admission; none when rate limits are off.
    pub limits: Option<LimitState>,
    /// Tokens the account's plan covers, as Reserve said.
    covered_tokens: i64,
    /// The backend serving the request, once one does.
    provider: std::sync::Mutex<String>,
    /// Billed as bring-your-own-key: this share (percent) of the cost.
    byok_fee_percent: Option<u32>,
    /// The caller's end user (OpenAI's `user`), for the usage event.
    end_user: String,
    started: Instant,
    arrived: Instant,
    /// Time spent waiting on a backend (worker or upstream), in nanoseconds.
    backend_wait_ns: std::sync::atomic::AtomicU64,
    prompt_tokens: AtomicU32,
    completion_tokens: AtomicU32,
    /// Set once the request has produced (or may have produced) billable
    /// work, so a drop settles rather than releases.
    started_work: AtomicBool,
    finished: AtomicBool,
}

/// What a settled request cost.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cost_nanos: i64,
    pub is_byok: bool,
}

/// What one request asks of the checks.
pub struct Ask {
    pub request_id: String,
    /// `request_id` was minted for this call, so billing need not look for
    /// an earlier hold under it.
    pub fresh_request_id: bool,
    /// An upper bound on its prompt's tokens.
    pub prompt_tokens: u32,
    /// The most it may generate.
    pub output_tokens: u32,
    /// OpenAI's `user`.
    pub end_user: String,
    /// Set when the caller brings its own provider key.
    pub byok_fee_percent: Option<u32>,
    /// When the request reached its handler, for the gateway's overhead.
    pub arrived: Instant,
}

impl Admission {
    /// Admits a request that may use up to `estimated_prompt_tokens` +
    /// `max_output_tokens`; refusals carry the rate-limit headers.
    pub async fn admit(mesh: Arc<Mesh>, key: KeyInfo, model: Model, ask: Ask) -> Result<Admission, Refused> {
        let Ask {
            request_id,
            fresh_request_id,
            prompt_tokens: estimated_prompt_tokens,
            output_tokens: max_output_tokens,
            end_user,
            byok_fee_percent,
            arrived,
        } = ask;
        let estimate = estimated_prompt_tokens.saturating_add(max_output_tokens);
        let asked = Instant::now();
        let acquired = mesh
            .ratelimit
            .acquire(AcquireRequest {
                key_id: key.key_id.clone(),
                request_id: request_id.clone(),
                estimated_tokens: estimate,
                limits: key.rate_limit,
            })
            .await
            .map_err(|s| Refused { error: ApiError(peer_error("ratelimit")(s)), limits: None })?;
        // What admission adds to every request before its work starts.
        metrics::histogram!("infermesh_gateway_ratelimit_acquire_seconds").record(asked.elapsed().as_secs_f64());
        let limits = acquired.state;
        if !acquired.allowed {
            let limits = limits.unwrap_or_default();
            let err = MeshError::new(
                ErrorKind::RateLimited,
                format!(
                    "rate limit reached for this key ({}); its limits are {} requests and {} tokens per minute; \
                     retry after {} s",
                    acquired.refused_by,
                    limits.limit_requests,
                    limits.limit_tokens,
                    acquired.retry_after_ms.div_ceil(1000).max(1)
                ),
            )
            .with_retry_after_ms(acquired.retry_after_ms);
            return Err(Refused { error: ApiError(err), limits: Some(limits) });
        }
        let hold =
            charge_nanos(&model, u64::from(estimated_prompt_tokens), u64::from(max_output_tokens), byok_fee_percent);
        let reserved = infermesh_service::call_peer!(
            mesh.billing_in_process,
            mesh.billing.clone(),
            reserve,
            ReserveRequest {
                request_id: request_id.clone(),
                account_id: key.account_id.clone(),
                key_id: key.key_id.clone(),
                amount_nanos: hold,
                key_limit_nanos: key.limit_nanos,
                model: model.id.clone(),
                max_tokens: u64::from(estimate),
                catalog_plans: model.plans.clone(),
                fresh_request_id,
            }
        );
        let covered_tokens = match reserved {
            Ok(reserved) => reserved.covered_tokens,
            Err(status) => {
                let _ = mesh
                    .ratelimit
                    .release(ReleaseAdmissionRequest { key_id: key.key_id.clone(), request_id: request_id.clone() })
                    .await;
                return Err(Refused { error: ApiError(peer_error("billing")(status)), limits });
            }
        };
        Ok(Admission {
            mesh,
            request_id,
            key,
            model,
            limits,
            covered_tokens,
            provider: std::sync::Mutex::new(String::new()),
            byok_fee_percent,
            end_user,
            started: Instant::now(),
            arrived,
            backend_wait_ns: std::sync::atomic::AtomicU64::new(0),
            prompt_tokens: AtomicU32::new(estimated_prompt_tokens),
            completion_tokens: AtomicU32::new(0),
            started_work: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        })
    }

    /// The worker accepted the prompt: from now on a disconnect is billed.
    pub fn work_started(&self, prompt_tokens: u32) {
        self.prompt_tokens.store(prompt_tokens, Ordering::Relaxed);
        self.started_work.store(true, Ordering::Relaxed);
    }

    /// The work done so far is not to be billed: the hold is released
    /// rather than settled if the request ends without [`Admission::settle`].
    pub fn forget_work(&self) {
        self.started_work.store(false, Ordering::Relaxed);
    }

    pub fn set_provider(&self, name: &str) {
        *self.provider.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = name.to_owned();
    }

    pub fn provider(&self) -> String {
        self.provider.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn add_completion_tokens(&self, n: u32) {
        self.completion_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn rate_limit_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.limits.as_ref().map(rate_limit_headers).unwrap_or_default()
    }

    /// Awaits `backend` (a worker's or an upstream's answer), counting the
    /// wait as the backend's time rather than the gateway's.
    pub async fn on_backend<T>(&self, backend: impl std::future::Future<Output = T>) -> T {
        let asked = Instant::now();
        let answer = backend.await;
        let waited = u64::try_from(asked.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.backend_wait_ns.fetch_add(waited, Ordering::Relaxed);
        answer
    }

    /// The gateway's own time on this request so far: everything since it
    /// arrived except waiting on backends.
    pub fn overhead(&self) -> Duration {
        self.arrived.elapsed().saturating_sub(Duration::from_nanos(self.backend_wait_ns.load(Ordering::Relaxed)))
    }

    /// `x-infermesh-overhead-ms`: the gateway's own time, for a response
    /// sent whole (LiteLLM and TensorZero report theirs the same way).
    pub fn overhead_header(&self) -> (HeaderName, HeaderValue) {
        let ms = format!("{:.3}", self.overhead().as_secs_f64() * 1000.0);
        (
            HeaderName::from_static("x-infermesh-overhead-ms"),
            HeaderValue::from_str(&ms).unwrap_or(HeaderValue::from_static("0")),
        )
    }

    /// What `usage` (defaulting to the counts seen so far) is charged; the
    /// charge and the rate limiter's commit are sent in a task of their own
    /// (see the module's notes), which a client going away cannot cancel.
    pub fn settle(&self, usage: Option<Usage>) -> Settled {
        self.finished.store(true, Ordering::Relaxed);
        let usage = usage.unwrap_or(Usage {
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
        });
        let bill = self.bill();
        let settled = bill.charge(usage);
        tokio::spawn(tracing::Instrument::instrument(settle_in_background(bill, usage), tracing::Span::current()));
        metrics::histogram!("infermesh_gateway_overhead_seconds").record(self.overhead().as_secs_f64());
        settled
    }

    fn bill(&self) -> Bill {
        Bill {
            mesh: self.mesh.clone(),
            pending: self.mesh.settlements.begin(&self.key.account_id),
            request_id: self.request_id.clone(),
            account_id: self.key.account_id.clone(),
            covered_tokens: self.covered_tokens,
            key_id: self.key.key_id.clone(),
            model: self.model.clone(),
            provider: self.provider(),
            end_user: self.end_user.clone(),
            started: self.started,
            byok_fee_percent: self.byok_fee_percent,
        }
    }
}

/// What a settlement needs of its admission, owned, so it can outlive it.
struct Bill {
    mesh: Arc<Mesh>,
    /// Counts toward the account's settlements in flight until dropped.
    pending: PendingSettlement,
    request_id: String,
    account_id: String,
    covered_tokens: i64,
    key_id: String,
    model: Model,
    provider: String,
    end_user: String,
    started: Instant,
    byok_fee_percent: Option<u32>,
}

impl Bill {
    /// What the ledger will charge for `usage`: the same formula it applies.
    fn charge(&self, usage: Usage) -> Settled {
        let full = self.full_cost(usage);
        let tokens = i64::from(usage.prompt_tokens) + i64::from(usage.completion_tokens);
        Settled {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost_nanos: charge_after_included(full, tokens, self.covered_tokens),
            is_byok: self.byok_fee_percent.is_some(),
        }
    }

    /// The cost at full price (or the BYOK fee), before included tokens.
    fn full_cost(&self, usage: Usage) -> i64 {
        let (prompt, completion) = (u64::from(usage.prompt_tokens), u64::from(usage.completion_tokens));
        charge_nanos(&self.model, prompt, completion, self.byok_fee_percent)
    }
}

async fn settle_in_background(bill: Bill, usage: Usage) {
    let (request_id, told) = (bill.request_id.clone(), bill.charge(usage).cost_nanos);
    match settle_task(bill, usage).await {
        Ok(settled) if settled.cost_nanos == told => tracing::debug!(request_id, cost_nanos = told, "settled"),
        // The hold lapsed before the settlement (its covered tokens went
        // back to the plan): the caller was told less than was charged.
        Ok(settled) => tracing::warn!(
            request_id,
            told_nanos = told,
            charged_nanos = settled.cost_nanos,
            "the ledger charged other than the response said"
        ),
        Err(err) => tracing::error!(
            request_id,
            error = %err.0.message,
            "settlement failed; the hold expires on its own and the work goes unbilled"
        ),
    }
}

async fn settle_task(bill: Bill, usage: Usage) -> Result<Settled, ApiError> {
    let cost = bill.full_cost(usage);
    let Bill {
        mesh,
        pending: _pending,
        request_id,
        account_id,
        covered_tokens,
        key_id,
        model,
        provider,
        end_user,
        started,
        byok_fee_percent,
    } = bill;
    let latency_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
    let commit = mesh.ratelimit.commit(CommitRequest {
        key_id: key_id.clone(),
        request_id: request_id.clone(),
        actual_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
    });
    let settle = settle_durably(
        &mesh,
        SettleRequest {
            request_id,
            cost_nanos: cost,
            model: model.id.clone(),
            provider,
            usage: Some(usage),
            latency_ms,
            end_user,
            account_id,
            key_id,
            covered_tokens,
        },
    );
    let (committed, settled) = tokio::join!(commit, settle);
    if let Err(status) = committed {
        tracing::warn!(error = %status.message(), "rate-limit commit failed");
    }
    let charged = settled.map_err(peer_error("billing"))?.charged_nanos;
    metrics::counter!("infermesh_tokens_total", "model" => model.id.clone(), "direction" => "prompt")
        .increment(u64::from(usage.prompt_tokens));
    metrics::counter!("infermesh_tokens_total", "model" => model.id, "direction" => "completion")
        .increment(u64::from(usage.completion_tokens));
    Ok(Settled {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cost_nanos: charged,
        is_byok: byok_fee_percent.is_some(),
    })
}

/// How long a settlement keeps retrying while billing is unreachable.
const SETTLE_RETRY_FOR: Duration = Duration::from_secs(30);

/// Settles, retrying while billing cannot answer (restarting, a failed
/// write): Settle is idempotent by request id, so a retry never charges
/// twice, and the work already done must be charged and reported, not lost.
async fn settle_durably(mesh: &Mesh, request: SettleRequest) -> Result<SettleResponse, tonic::Status> {
    let deadline = Instant::now() + SETTLE_RETRY_FOR;
    let mut pause = Duration::from_millis(50);
    loop {
        match infermesh_service::call_peer!(mesh.billing_in_process, mesh.billing.clone(), settle, request.clone()) {
            Ok(response) => return Ok(response),
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled)
                    && Instant::now() + pause < deadline =>
            {
                tracing::warn!(error = %status.message(), request_id = %request.request_id, "settlement failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(status) => return Err(status),
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.finished.load(Ordering::Relaxed) {
            return;
        }
        if self.started_work.load(Ordering::Relaxed) {
            // Charge for what was generated before the client left.
            let usage = Usage {
                prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
                completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            };
            let task = settle_in_background(self.bill(), usage);
            tokio::spawn(tracing::Instrument::instrument(task, tracing::Span::current()));
        } else {
            let (mesh, request_id, key_id) = (self.mesh.clone(), self.request_id.clone(), self.key.key_id.clone());
            tokio::spawn(async move {
                let request = ReleaseRequest { request_id: request_id.clone() };
                let release = async {
                    infermesh_service::call_peer!(mesh.billing_in_process, mesh.billing.clone(), release, request)
                };
                let unlimit = mesh.ratelimit.release(ReleaseAdmissionRequest { key_id, request_id });
                let (released, _) = tokio::join!(release, unlimit);
                if let Err(status) = released {
                    tracing::warn!(error = %status.message(), "hold release failed; it expires on its own");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_every_accepted_header() {
        let mut headers = HeaderMap::new();
        assert!(api_key(&headers).is_err());
        headers.insert("x-api-key", HeaderValue::from_static("im_abc"));
        assert_eq!(api_key(&headers).unwrap(), "im_abc");
        headers.insert("authorization", HeaderValue::from_static("Bearer im_xyz"));
        assert_eq!(api_key(&headers).unwrap(), "im_xyz");
        headers.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert!(api_key(&headers).is_err());
    }

    #[test]
    fn cost_sums_both_directions() {
        let model = Model {
            pricing: Some(infermesh_proto::v1::Pricing {
                prompt_nanos_per_mtok: 1_000_000,
                completion_nanos_per_mtok: 2_000_000,
            }),
            ..Default::default()
        };
        assert_eq!(cost_nanos(&model, 10, 5), 20);
    }
}
