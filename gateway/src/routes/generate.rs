//! What chat and legacy completions share: admission, the worker's token
//! stream, settlement, and the JSON or SSE body. The two differ only in
//! how a choice is spelled ([`Flavor`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use infermesh_proto::v1::{
    FinishReason, GenerateEvent, GenerateRequest, KeyInfo, Model, ModelKind, SamplingParams, generate_event,
    generate_request,
};
use infermesh_service::money::nanos_to_dollars;
use infermesh_service::{ErrorKind, MeshError};
use serde_json::{Value, json};

use crate::admission::{Admission, Settled};
use crate::app::AppState;
use crate::error::ApiError;
use crate::mesh::peer_error;
use crate::openai::ValidSampling;
use crate::routes::{unix_now, with_headers};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Chat,
    Completion,
}

impl Flavor {
    fn id_prefix(self) -> &'static str {
        match self {
            Flavor::Chat => "chatcmpl",
            Flavor::Completion => "cmpl",
        }
    }

    fn object(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Flavor::Chat, false) => "chat.completion",
            (Flavor::Chat, true) => "chat.completion.chunk",
            (Flavor::Completion, _) => "text_completion",
        }
    }

    /// The choice of a streamed chunk carrying `text`.
    fn delta(self, text: &str) -> Value {
        match self {
            Flavor::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}),
            Flavor::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}),
        }
    }

    /// The choice of the last streamed chunk before usage.
    fn finish(self, reason: &str, native: &str) -> Value {
        let mut choice = self.delta("");
        if self == Flavor::Chat {
            choice["delta"] = json!({});
        }
        choice["finish_reason"] = json!(reason);
        choice["native_finish_reason"] = json!(native);
        choice
    }

    /// The one choice of a non-streamed response.
    fn whole(self, text: String, reason: &str, native: &str) -> Value {
        let mut choice = self.finish(reason, native);
        match self {
            Flavor::Chat => {
                choice.as_object_mut().map(|c| c.remove("delta"));
                choice["message"] = json!({"role": "assistant", "content": text, "refusal": null, "annotations": []});
            }
            Flavor::Completion => choice["text"] = json!(text),
        }
        choice
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
}

fn finish_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Stop | FinishReason::Cancelled | FinishReason::Unspecified) | Err(_) => "stop",
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
        "is_byok": false,
    })
}

/// Admits, runs and bills one generation, answering in `flavor`'s shape.
pub async fn serve(state: &AppState, key: KeyInfo, model: Model, generation: Generation) -> Result<Response, ApiError> {
    let (_, mut worker) = state.mesh.pick_worker(&model.id)?;
    let flavor = generation.flavor;
    let request_id = format!("{}-{}", flavor.id_prefix(), uuid::Uuid::new_v4().simple());
    let prompt_bound = generation.prompt_bound.min(model.context_length);
    let admission =
        match Admission::admit(state.mesh.clone(), key, model, request_id.clone(), prompt_bound, generation.max_tokens)
            .await
        {
            Ok(admission) => Arc::new(admission),
            Err(refused) => return Ok(refused.into_response()),
        };
    let sampling = &generation.sampling;
    let request = GenerateRequest {
        request_id,
        model: admission.model.id.clone(),
        prompt: Some(generation.prompt),
        max_tokens: generation.max_tokens,
        sampling: Some(SamplingParams {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            seed: sampling.seed,
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
        }),
        stop: sampling.stop.clone(),
        fit_to_context: generation.fit_to_context,
    };
    let mut events = worker.generate(request).await.map_err(peer_error("worker"))?.into_inner();
    // The worker validates the prompt (template, context window) before
    // its first event, so errors up to here are clean HTTP errors.
    match events.message().await.map_err(peer_error("worker"))? {
        Some(GenerateEvent { event: Some(generate_event::Event::Started(started)) }) => {
            admission.work_started(started.prompt_tokens);
        }
        Some(_) => return Err(ApiError::new(ErrorKind::Internal, "the worker sent no start event")),
        None => return Err(ApiError::new(ErrorKind::ModelUnavailable, "the worker closed the stream before starting")),
    }
    let headers = admission.rate_limit_headers();
    let created = unix_now();
    if sampling.stream {
        let sse = Sse::new(sse_stream(flavor, admission, events, created, sampling.include_usage));
        return Ok(with_headers(sse.keep_alive(KeepAlive::default()).into_response(), headers));
    }

    let mut text = String::new();
    let mut finished = None;
    while let Some(event) = events.message().await.map_err(peer_error("worker"))? {
        match event.event {
            Some(generate_event::Event::Delta(delta)) => {
                admission.add_completion_tokens(u32::try_from(delta.token_ids.len()).unwrap_or(0));
                text.push_str(&delta.text);
            }
            Some(generate_event::Event::Finished(done)) => {
                finished = Some(done);
                break;
            }
            Some(generate_event::Event::Started(_)) | None => {}
        }
    }
    let done = finished.ok_or_else(|| {
        ApiError::new(
            ErrorKind::UpstreamError,
            "the worker stopped before finishing; you were charged only for tokens generated",
        )
    })?;
    let settled = admission.settle(done.usage).await?;
    let body = json!({
        "id": admission.request_id,
        "object": flavor.object(false),
        "created": created,
        "model": admission.model.id,
        "provider": admission.provider,
        "choices": [flavor.whole(text, finish_reason(done.reason), &done.native_reason)],
        "usage": usage_json(&settled),
    });
    Ok(with_headers(axum::Json(body).into_response(), headers))
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
        "provider": admission.provider,
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
    flavor: Flavor,
    admission: Arc<Admission>,
    mut events: tonic::Streaming<GenerateEvent>,
    created: u64,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        if flavor == Flavor::Chat {
            let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
            yield Ok(chunk(flavor, &admission, created, role, None, include_usage));
        }
        loop {
            match events.message().await {
                Ok(Some(event)) => match event.event {
                    Some(generate_event::Event::Delta(delta)) => {
                        admission.add_completion_tokens(u32::try_from(delta.token_ids.len()).unwrap_or(0));
                        if delta.text.is_empty() {
                            continue;
                        }
                        yield Ok(chunk(flavor, &admission, created, json!([flavor.delta(&delta.text)]), None, include_usage));
                    }
                    Some(generate_event::Event::Finished(done)) => {
                        let last = json!([flavor.finish(finish_reason(done.reason), &done.native_reason)]);
                        yield Ok(chunk(flavor, &admission, created, last, None, include_usage));
                        match admission.settle(done.usage).await {
                            Ok(settled) if include_usage => {
                                yield Ok(chunk(flavor, &admission, created, json!([]), Some(usage_json(&settled)), true));
                            }
                            Ok(_) => {}
                            Err(err) => yield Ok(error_event(&err.0)),
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
                    yield Ok(error_event(&peer_error("worker")(status)));
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}
