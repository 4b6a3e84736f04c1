//! `POST /v1/chat/completions`, JSON or SSE.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use infermesh_proto::v1::{
    ChatMessage, ChatMessages, FinishReason, GenerateRequest, ModelKind, SamplingParams, generate_event,
    generate_request,
};
use infermesh_service::money::nanos_to_dollars;
use infermesh_service::{ErrorKind, MeshError};
use serde_json::{Value, json};

use crate::admission::{Admission, Settled, authenticate};
use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::mesh::peer_error;
use crate::openai::{ChatRequest, ValidChat};
use crate::routes::{RawBody, unix_now, with_headers};

/// An upper bound on prompt tokens from its bytes: every token covers at
/// least one byte, plus room for the chat template's own tokens.
fn prompt_token_bound(chat: &ValidChat) -> u32 {
    let bytes: usize = chat.messages.iter().map(|(role, content)| role.len() + content.len() + 8).sum();
    u32::try_from(bytes + 8).unwrap_or(u32::MAX)
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

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    let chat = parse_json::<ChatRequest>(&body)?.validate()?;
    let model = state.mesh.resolve_model(&chat.model)?;
    if model.kind() != ModelKind::Chat {
        return Err(ApiError::invalid(
            "model",
            format!("`{}` is an embedding model; use POST /v1/embeddings", model.id),
        ));
    }
    let (_, mut worker) = state.mesh.pick_worker(&model.id)?;
    let prompt_bound = prompt_token_bound(&chat).min(model.context_length);
    let max_tokens = chat.max_tokens.unwrap_or(model.max_output_tokens);
    let request_id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let admission =
        match Admission::admit(state.mesh.clone(), key, model, request_id.clone(), prompt_bound, max_tokens).await {
            Ok(admission) => Arc::new(admission),
            Err(refused) => return Ok(refused.into_response()),
        };
    let request = GenerateRequest {
        request_id: request_id.clone(),
        model: admission.model.id.clone(),
        prompt: Some(generate_request::Prompt::Chat(ChatMessages {
            messages: chat
                .messages
                .iter()
                .map(|(role, content)| ChatMessage { role: role.clone(), content: content.clone() })
                .collect(),
        })),
        max_tokens,
        sampling: Some(SamplingParams {
            temperature: chat.temperature,
            top_p: chat.top_p,
            top_k: chat.top_k,
            seed: chat.seed,
            frequency_penalty: chat.frequency_penalty,
            presence_penalty: chat.presence_penalty,
        }),
        stop: chat.stop.clone(),
        fit_to_context: chat.max_tokens.is_none(),
    };
    let mut events = worker.generate(request).await.map_err(peer_error("worker"))?.into_inner();
    // The worker validates the prompt (template, context window) before
    // its first event, so errors up to here are clean HTTP errors.
    match events.message().await.map_err(peer_error("worker"))? {
        Some(event) => match event.event {
            Some(generate_event::Event::Started(started)) => admission.work_started(started.prompt_tokens),
            _ => return Err(ApiError::new(ErrorKind::Internal, "the worker sent no start event")),
        },
        None => return Err(ApiError::new(ErrorKind::ModelUnavailable, "the worker closed the stream before starting")),
    }
    let headers = admission.rate_limit_headers();
    let created = unix_now();
    if chat.stream {
        let stream = sse_stream(admission, events, created, chat.include_usage);
        let sse = Sse::new(stream).keep_alive(KeepAlive::default());
        return Ok(with_headers(sse.into_response(), headers));
    }

    let mut content = String::new();
    let mut finished = None;
    while let Some(event) = events.message().await.map_err(peer_error("worker"))? {
        match event.event {
            Some(generate_event::Event::Delta(delta)) => {
                admission.add_completion_tokens(u32::try_from(delta.token_ids.len()).unwrap_or(0));
                content.push_str(&delta.text);
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
        "object": "chat.completion",
        "created": created,
        "model": admission.model.id,
        "provider": admission.provider,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": finish_reason(done.reason),
            "native_finish_reason": done.native_reason,
        }],
        "usage": usage_json(&settled),
    });
    Ok(with_headers(axum::Json(body).into_response(), headers))
}

fn chunk(admission: &Admission, created: u64, choices: Value, usage: Option<Value>, include_usage: bool) -> SseEvent {
    let mut body = json!({
        "id": admission.request_id,
        "object": "chat.completion.chunk",
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

fn sse_stream(
    admission: Arc<Admission>,
    mut events: tonic::Streaming<infermesh_proto::v1::GenerateEvent>,
    created: u64,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
        yield Ok(chunk(&admission, created, role, None, include_usage));
        loop {
            let next = events.message().await;
            match next {
                Ok(Some(event)) => match event.event {
                    Some(generate_event::Event::Delta(delta)) => {
                        admission.add_completion_tokens(u32::try_from(delta.token_ids.len()).unwrap_or(0));
                        if delta.text.is_empty() {
                            continue;
                        }
                        let choices = json!([{"index": 0, "delta": {"content": delta.text}, "logprobs": null, "finish_reason": null}]);
                        yield Ok(chunk(&admission, created, choices, None, include_usage));
                    }
                    Some(generate_event::Event::Finished(done)) => {
                        let choices = json!([{
                            "index": 0, "delta": {}, "logprobs": null,
                            "finish_reason": finish_reason(done.reason),
                            "native_finish_reason": done.native_reason,
                        }]);
                        yield Ok(chunk(&admission, created, choices, None, include_usage));
                        match admission.settle(done.usage).await {
                            Ok(settled) => {
                                if include_usage {
                                    yield Ok(chunk(&admission, created, json!([]), Some(usage_json(&settled)), true));
                                }
                            }
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
