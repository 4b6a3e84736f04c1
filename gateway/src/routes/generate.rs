//! What chat and legacy completions share: admission, the worker's token
//! stream, settlement, and the JSON or SSE body. The two differ only in
//! how a choice is spelled ([`Flavor`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use infermesh_proto::v1::worker_service_client::WorkerServiceClient;
use infermesh_proto::v1::{
    Delta, FinishReason, Finished, GenerateEvent, GenerateRequest, KeyInfo, Model, ModelKind, SamplingParams,
    TokenLogprob, TopLogprob, Usage, generate_event, generate_request,
};
use infermesh_registry::catalog::{OPENAI_COMPATIBLE, WORKERS, WORKERS_PROVIDER};
use infermesh_service::TracedChannel;
use infermesh_service::money::nanos_to_dollars;
use infermesh_service::{ErrorKind, MeshError};
use serde_json::{Value, json};

use crate::admission::{Admission, Ask, Settled};
use crate::app::AppState;
use crate::error::ApiError;
use crate::mesh::{Mesh, Picked, peer_error};
use crate::openai::ValidSampling;
use crate::routes::{unix_now, with_headers};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Chat,
    Completion,
}

impl Flavor {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Flavor::Chat => "chatcmpl",
            Flavor::Completion => "cmpl",
        }
    }

    pub fn object(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Flavor::Chat, false) => "chat.completion",
            (Flavor::Chat, true) => "chat.completion.chunk",
            (Flavor::Completion, _) => "text_completion",
        }
    }

    /// The choice of a streamed chunk carrying `text`.
    fn delta(self, index: u32, text: &str, logprobs: Value) -> Value {
        match self {
            Flavor::Chat => {
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            Flavor::Completion => json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null}),
        }
    }

    /// The choice of the last streamed chunk of choice `index`.
    fn finish(self, index: u32, reason: &str, native: &str) -> Value {
        let mut choice = self.delta(index, "", Value::Null);
        if self == Flavor::Chat {
            choice["delta"] = json!({});
        }
        choice["finish_reason"] = json!(reason);
        choice["native_finish_reason"] = json!(native);
        choice
    }

    /// One choice of a non-streamed response.
    fn whole(self, index: u32, text: String, done: &Finished, logprobs: Value) -> Value {
        let mut choice = self.finish(index, finish_reason(done.reason), &done.native_reason);
        choice["logprobs"] = logprobs;
        match self {
            Flavor::Chat => {
                choice.as_object_mut().map(|c| c.remove("delta"));
                choice["message"] = json!({"role": "assistant", "content": text, "refusal": null, "annotations": []});
            }
            Flavor::Completion => choice["text"] = json!(text),
        }
        choice
    }

    /// Log-probabilities in this flavor's shape; `text_offset` is where the
    /// tokens' text starts in the choice's output (legacy completions).
    fn logprobs(self, tokens: &[TokenLogprob], mut text_offset: usize) -> Value {
        let entry = |t: &TopLogprob| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes});
        match self {
            Flavor::Chat => {
                let content: Vec<Value> = tokens
                    .iter()
                    .filter_map(|t| {
                        let chosen = t.chosen.as_ref()?;
                        let mut value = entry(chosen);
                        value["top_logprobs"] = t.top.iter().map(entry).collect();
                        Some(value)
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Flavor::Completion => {
                let (mut names, mut values, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
                for token in tokens {
                    let Some(chosen) = &token.chosen else { continue };
                    names.push(json!(chosen.token));
                    values.push(json!(chosen.logprob));
                    let top: serde_json::Map<String, Value> =
                        token.top.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect();
                    tops.push(Value::Object(top));
                    offsets.push(json!(text_offset));
                    text_offset += chosen.token.chars().count();
                }
                json!({"tokens": names, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
            }
        }
    }
}

/// The catalogue entry for `name`, which must be a text-generation model.
pub fn chat_model(state: &AppState, name: &str) -> Result<Model, ApiError> {
    let model = state.mesh.resolve_model(name)?;
    if model.kind() != ModelKind::Chat {
        return Err(ApiError::invalid(
            "model",
            format!("`{}` is an embedding model; use POST /v1/embeddings", model.id),
        ));
    }
    Ok(model)
}

/// One validated generation request, in the worker's terms.
pub struct Generation {
    pub flavor: Flavor,
    pub prompt: generate_request::Prompt,
    /// An upper bound on prompt tokens, for the credit hold.
    pub prompt_bound: u32,
    pub max_tokens: u32,
    /// The caller left max_tokens unset: shrink it to the context window.
    pub fit_to_context: bool,
    pub sampling: ValidSampling,
    /// The request body as the client sent it, for upstream providers.
    pub body: bytes::Bytes,
    /// The caller's own key for upstream providers (`X-Provider-Key`).
    pub provider_key: Option<String>,
    /// Set when the request holds more than text, which only upstream
    /// providers take: why the workers cannot serve it.
    pub text_only: Option<MeshError>,
    /// When the request reached its handler.
    pub arrived: std::time::Instant,
    /// The idempotency key for its hold and settlement (and its response id).
    pub request_id: String,
    /// Whether an answer that fails midway is billed for the tokens
    /// generated. A queued job's failed attempt is not: it is retried under
    /// the same request id and billed once, when it completes.
    pub bill_unfinished: bool,
    /// `request_id` was minted for this call (a job's retries reuse theirs).
    pub fresh_request_id: bool,
}

/// The caller's own upstream key (BYOK), from `X-Provider-Key`.
pub fn provider_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("x-provider-key") {
        None => Ok(None),
        Some(value) => match value.to_str().map(str::trim) {
            Ok(key) if !key.is_empty() => Ok(Some(key.to_owned())),
            _ => Err(ApiError::invalid("X-Provider-Key", "the X-Provider-Key header must be a non-empty key")),
        },
    }
}

fn finish_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Stop | FinishReason::Cancelled | FinishReason::Unspecified) | Err(_) => "stop",
    }
}

/// Where the choices of one request stand, as the worker's events arrive.
struct Choices {
    flavor: Flavor,
    want_logprobs: bool,
    texts: Vec<String>,
    logprobs: Vec<Vec<TokenLogprob>>,
    /// Characters streamed so far per choice, for `text_offset`.
    streamed_chars: Vec<usize>,
    finished: Vec<Option<Finished>>,
}

impl Choices {
    fn new(flavor: Flavor, n: u32, want_logprobs: bool) -> Choices {
        let n = n.max(1) as usize;
        Choices {
            flavor,
            want_logprobs,
            texts: vec![String::new(); n],
            logprobs: vec![Vec::new(); n],
            streamed_chars: vec![0; n],
            finished: vec![None; n],
        }
    }

    fn all_finished(&self) -> bool {
        self.finished.iter().all(Option::is_some)
    }

    /// Records a delta for the non-streamed answer.
    fn absorb(&mut self, delta: Delta) {
        let Some(index) = self.slot(delta.index) else { return };
        self.texts[index].push_str(&delta.text);
        self.logprobs[index].extend(delta.logprobs);
    }

    /// A delta as one streamed choice; `None` when it carries nothing.
    fn stream_delta(&mut self, delta: Delta) -> Option<Value> {
        let index = self.slot(delta.index)?;
        if delta.text.is_empty() && (!self.want_logprobs || delta.logprobs.is_empty()) {
            return None;
        }
        let logprobs = if self.want_logprobs {
            self.flavor.logprobs(&delta.logprobs, self.streamed_chars[index])
        } else {
            Value::Null
        };
        self.streamed_chars[index] += delta.text.chars().count();
        Some(self.flavor.delta(delta.index, &delta.text, logprobs))
    }

    fn finish(&mut self, done: Finished) {
        if let Some(index) = self.slot(done.index) {
            self.finished[index] = Some(done);
        }
    }

    fn slot(&self, index: u32) -> Option<usize> {
        let index = index as usize;
        (index < self.finished.len()).then_some(index)
    }

    /// Usage over every choice: the prompt once, every choice's output.
    fn usage(&self) -> Option<Usage> {
        let mut usage: Option<Usage> = None;
        for done in self.finished.iter().flatten() {
            let Some(part) = done.usage else { continue };
            let total = usage.get_or_insert(Usage { prompt_tokens: part.prompt_tokens, completion_tokens: 0 });
            total.completion_tokens += part.completion_tokens;
        }
        usage
    }

    fn whole(self) -> Vec<Value> {
        let flavor = self.flavor;
        let want_logprobs = self.want_logprobs;
        self.texts
            .into_iter()
            .zip(self.logprobs)
            .zip(self.finished)
            .enumerate()
            .filter_map(|(index, ((text, logprobs), done))| {
                let done = done?;
                let logprobs = if want_logprobs { flavor.logprobs(&logprobs, 0) } else { Value::Null };
                Some(flavor.whole(index as u32, text, &done, logprobs))
            })
            .collect()
    }
}

pub fn usage_json(settled: &Settled) -> Value {
    json!({
        "prompt_tokens": settled.prompt_tokens,
        "completion_tokens": settled.completion_tokens,
        "total_tokens": settled.prompt_tokens + settled.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "cost": nanos_to_dollars(settled.cost_nanos),
        "is_byok": settled.is_byok,
    })
}

/// What ended one backend's attempt before anything reached the client.
pub enum Failed {
    /// Try the model's next backend (nothing served, nothing delivered).
    Next(MeshError),
    /// Answer with this error: the request itself was refused.
    Final(MeshError),
}

/// Admits and bills one generation, serving it from the first of the
/// model's backends that can: a backend that fails before the first token
/// hands the request to the next one. Answers in `flavor`'s shape.
pub async fn serve(state: &AppState, key: KeyInfo, model: Model, generation: Generation) -> Result<Response, ApiError> {
    let prompt_bound = generation.prompt_bound.min(model.context_length);
    // Every choice may use the whole budget.
    let output_bound = generation.max_tokens.saturating_mul(generation.sampling.n.max(1));
    let byok = generation.provider_key.is_some() && model.backends.iter().any(|b| b.kind == OPENAI_COMPATIBLE);
    let backends = model.backends.clone();
    let ask = Ask {
        request_id: generation.request_id.clone(),
        fresh_request_id: generation.fresh_request_id,
        prompt_tokens: prompt_bound,
        output_tokens: output_bound,
        end_user: generation.sampling.end_user.clone(),
        byok_fee_percent: byok.then_some(state.byok_fee_percent),
        arrived: generation.arrived,
    };
    let admission = match Admission::admit(state.mesh.clone(), key, model, ask).await {
        Ok(admission) => Arc::new(admission),
        Err(refused) => return Ok(refused.into_response()),
    };
    let mut last_failure = None;
    for backend in &backends {
        let attempt = match backend.kind.as_str() {
            // The caller's key is for upstream providers: our own workers
            // are not what the BYOK fee pays for.
            WORKERS if byok => continue,
            WORKERS => on_workers(state, &admission, &generation).await,
            OPENAI_COMPATIBLE => crate::upstream::serve(state, &admission, backend, &generation).await,
            other => Err(Failed::Next(MeshError::internal(format!("unknown backend kind `{other}`")))),
        };
        match attempt {
            Ok(response) => return Ok(response),
            Err(Failed::Final(err)) => return Err(ApiError(err)),
            Err(Failed::Next(err)) => {
                tracing::warn!(provider = %backend.name, error = %err.message, "backend failed before the first token; trying the next");
                last_failure = Some(err);
            }
        }
    }
    Err(ApiError(last_failure.unwrap_or_else(|| {
        MeshError::new(ErrorKind::ModelUnavailable, format!("`{}` has no backend to serve it", admission.model.id))
            .with_retry_after_ms(2000)
    })))
}

pub type Events = std::pin::Pin<Box<dyn Stream<Item = Result<GenerateEvent, tonic::Status>> + Send>>;

/// Serves the generation on this mesh's workers, least loaded first. A
/// worker that fails before its first token passes the request to the
/// next, here or (once the response has begun) inside the stream, so the
/// client never sees the difference.
async fn on_workers(state: &AppState, admission: &Arc<Admission>, generation: &Generation) -> Result<Response, Failed> {
    if let Some(err) = &generation.text_only {
        return Err(Failed::Next(err.clone()));
    }
    let request = worker_request(admission, generation);
    let mut tried = Vec::new();
    let (events, prompt_tokens, picked) =
        admission.on_backend(start_on_workers(&state.mesh, &request, &mut tried)).await?;
    admission.set_provider(WORKERS_PROVIDER);
    admission.work_started(prompt_tokens);
    let failover = Failover { mesh: state.mesh.clone(), request, tried, current: events, picked, delivered: false };
    Ok(respond(admission.clone(), generation, failover.into_events()).await)
}

/// Starts `request` on the least-loaded worker not yet `tried` that
/// accepts it; returns its stream once started, and the prompt's tokens.
async fn start_on_workers(
    mesh: &Mesh,
    request: &GenerateRequest,
    tried: &mut Vec<String>,
) -> Result<(tonic::Streaming<GenerateEvent>, u32, Picked), Failed> {
    let mut last_failure = None;
    loop {
        let picked = match mesh.pick_worker(&request.model, tried) {
            Ok(picked) => picked,
            Err(none) => return Err(Failed::Next(last_failure.unwrap_or(none))),
        };
        tried.push(picked.worker.worker_id.clone());
        match start_on_worker(picked.client.clone(), request.clone()).await {
            Ok((events, prompt_tokens)) => return Ok((events, prompt_tokens, picked)),
            Err(Failed::Next(err)) => {
                tracing::warn!(worker = %picked.worker.worker_id, error = %err.message, "worker failed before starting; trying another");
                last_failure = Some(err);
            }
            Err(Failed::Final(err)) => return Err(Failed::Final(err)),
        }
    }
}

/// Whether a worker's failure is one to route around: it could not answer
/// at all, rather than explaining a refusal (bad prompt, context, busy).
fn unexplained(status: &tonic::Status) -> bool {
    status.metadata().get("x-infermesh-error").is_none()
}

fn worker_request(admission: &Admission, generation: &Generation) -> GenerateRequest {
    let sampling = &generation.sampling;
    GenerateRequest {
        request_id: admission.request_id.clone(),
        model: admission.model.id.clone(),
        prompt: Some(generation.prompt.clone()),
        max_tokens: generation.max_tokens,
        sampling: Some(SamplingParams {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            seed: sampling.seed,
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
            min_p: sampling.min_p,
            repetition_penalty: sampling.repetition_penalty,
            logit_bias: sampling.logit_bias.clone(),
        }),
        stop: sampling.stop.clone(),
        fit_to_context: generation.fit_to_context,
        n: sampling.n,
        logprobs: sampling.logprobs.is_some(),
        top_logprobs: sampling.logprobs.unwrap_or(0),
        ignore_eos: sampling.ignore_eos,
    }
}

/// Opens the worker's stream and reads its start: the worker validates
/// the prompt (template, context window) first, so a refusal here is a
/// clean HTTP error.
async fn start_on_worker(
    mut worker: WorkerServiceClient<TracedChannel>,
    request: GenerateRequest,
) -> Result<(tonic::Streaming<GenerateEvent>, u32), Failed> {
    let failed = |status: tonic::Status| {
        let next = unexplained(&status);
        let err = peer_error("worker")(status);
        if next { Failed::Next(err) } else { Failed::Final(err) }
    };
    let mut events = worker.generate(request).await.map_err(failed)?.into_inner();
    match events.message().await.map_err(failed)? {
        Some(GenerateEvent { event: Some(generate_event::Event::Started(started)) }) => {
            Ok((events, started.prompt_tokens))
        }
        Some(_) => Err(Failed::Next(MeshError::internal("the worker sent no start event"))),
        None => Err(Failed::Next(MeshError::new(
            ErrorKind::ModelUnavailable,
            "the worker closed the stream before starting",
        ))),
    }
}

/// A worker's event stream that, if the worker fails before delivering
/// anything, starts the request again on another worker.
struct Failover {
    mesh: Arc<Mesh>,
    request: GenerateRequest,
    tried: Vec<String>,
    current: tonic::Streaming<GenerateEvent>,
    /// The worker serving it, counted in its load while the stream lives.
    picked: Picked,
    /// A token or an end reached the client: from here a failure is final.
    delivered: bool,
}

impl Failover {
    fn into_events(self) -> Events {
        Box::pin(futures::stream::unfold(Some(self), |state| async move {
            let mut state = state?;
            loop {
                let failure = match state.current.message().await {
                    Ok(Some(event)) => {
                        if matches!(
                            event.event,
                            Some(generate_event::Event::Delta(_) | generate_event::Event::Finished(_))
                        ) {
                            state.delivered = true;
                        }
                        return Some((Ok(event), Some(state)));
                    }
                    Ok(None) if state.delivered => return None,
                    Ok(None) => tonic::Status::unavailable("the worker ended the stream before its first token"),
                    Err(status) if state.delivered || !unexplained(&status) => return Some((Err(status), None)),
                    Err(status) => status,
                };
                tracing::warn!(error = %failure.message(), "worker failed before its first token; starting again on another");
                match start_on_workers(&state.mesh, &state.request, &mut state.tried).await {
                    Ok((events, _, picked)) => (state.current, state.picked) = (events, picked),
                    Err(_) => return Some((Err(failure), None)),
                }
            }
        }))
    }
}

/// The client's answer from a started worker stream: SSE, or one JSON body.
async fn respond(admission: Arc<Admission>, generation: &Generation, mut events: Events) -> Response {
    let flavor = generation.flavor;
    let sampling = &generation.sampling;
    let headers = admission.rate_limit_headers();
    let created = unix_now();
    let choices = Choices::new(flavor, sampling.n, sampling.logprobs.is_some());
    if sampling.stream {
        let sse = Sse::new(sse_stream(choices, admission, events, created, sampling.include_usage));
        return with_headers(sse.keep_alive(KeepAlive::default()).into_response(), headers);
    }
    let whole = async {
        let mut choices = choices;
        while !choices.all_finished() {
            let Some(event) = admission.on_backend(events.next()).await else { break };
            match event.map_err(peer_error("worker"))?.event {
                Some(generate_event::Event::Delta(delta)) => {
                    admission.add_completion_tokens(u32::try_from(delta.token_ids.len()).unwrap_or(0));
                    choices.absorb(delta);
                }
                Some(generate_event::Event::Finished(done)) => choices.finish(done),
                Some(generate_event::Event::Started(_)) | None => {}
            }
        }
        if !choices.all_finished() {
            return Err(ApiError::new(
                ErrorKind::UpstreamError,
                "the worker stopped before finishing; you were charged only for tokens generated",
            ));
        }
        let settled = admission.settle(choices.usage());
        Ok(json!({
            "id": admission.request_id,
            "object": flavor.object(false),
            "created": created,
            "model": admission.model.id,
            "provider": admission.provider(),
            "choices": choices.whole(),
            "usage": usage_json(&settled),
        }))
    };
    let mut headers = headers;
    let response = match whole.await {
        Ok(body) => axum::Json(body).into_response(),
        Err(err) => {
            if !generation.bill_unfinished {
                admission.forget_work();
            }
            err.into_response()
        }
    };
    headers.push(admission.overhead_header());
    with_headers(response, headers)
}

fn chunk(
    flavor: Flavor,
    admission: &Admission,
    created: u64,
    choices: Value,
    usage: Option<Value>,
    include_usage: bool,
) -> SseEvent {
    let mut body = json!({
        "id": admission.request_id,
        "object": flavor.object(true),
        "created": created,
        "model": admission.model.id,
        "provider": admission.provider(),
        "choices": choices,
    });
    if include_usage {
        body["usage"] = usage.unwrap_or(Value::Null);
    }
    SseEvent::default().data(body.to_string())
}

fn error_event(err: &MeshError) -> SseEvent {
    SseEvent::default().data(ApiError(err.clone()).body().to_string())
}

/// Deltas as SSE chunks; a failure midway is one error event, and every
/// stream ends with `[DONE]`. Dropping the stream (client gone) drops the
/// worker call, which stops generation; the admission then bills what was
/// delivered.
fn sse_stream(
    mut choices: Choices,
    admission: Arc<Admission>,
    mut events: Events,
    created: u64,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let flavor = choices.flavor;
    async_stream::stream! {
        if flavor == Flavor::Chat {
            for index in 0..choices.finished.len() {
                let role = json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                yield Ok(chunk(flavor, &admission, created, role, None, include_usage));
            }
        }
        loop {
            match admission.on_backend(events.next()).await.transpose() {
                Ok(Some(event)) => match event.event {
                    Some(generate_event::Event::Delta(delta)) => {
                        admission.add_completion_tokens(u32::try_from(delta.token_ids.len()).unwrap_or(0));
                        if let Some(choice) = choices.stream_delta(delta) {
                            yield Ok(chunk(flavor, &admission, created, json!([choice]), None, include_usage));
                        }
                    }
                    Some(generate_event::Event::Finished(done)) => {
                        let last = json!([flavor.finish(done.index, finish_reason(done.reason), &done.native_reason)]);
                        choices.finish(done);
                        yield Ok(chunk(flavor, &admission, created, last, None, include_usage));
                        if !choices.all_finished() {
                            continue;
                        }
                        let settled = admission.settle(choices.usage());
                        if include_usage {
                            yield Ok(chunk(flavor, &admission, created, json!([]), Some(usage_json(&settled)), true));
                        }
                        break;
                    }
                    Some(generate_event::Event::Started(_)) | None => {}
                },
                Ok(None) => {
                    let err = MeshError::new(ErrorKind::UpstreamError, "the worker ended the stream early; you were charged only for tokens delivered");
                    yield Ok(error_event(&err));
                    break;
                }
                Err(status) => {
                    let cause = peer_error("worker")(status);
                    let err = MeshError::new(
                        ErrorKind::UpstreamError,
                        format!("the worker failed mid-stream ({}); you were charged only for tokens delivered", cause.message),
                    );
                    yield Ok(error_event(&err));
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}
