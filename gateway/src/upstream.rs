//! Backends of kind `openai_compatible`: the request goes, as the client
//! sent it (with the upstream's own model id), to another OpenAI-compatible
//! API, and its answer comes back in our shape: our id and model, the
//! serving `provider`, OpenAI's `finish_reason` with the upstream's raw one
//! in `native_finish_reason`, and `usage` with what we charged.
//!
//! Until the upstream produced its first token nothing reached the client,
//! so a refused connection, a 5xx, a 429 or a timeout hands the request to
//! the model's next backend ([`Failed::Next`]). After it, a failure ends
//! the stream with one error event, and the client pays for what it got.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use infermesh_proto::v1::{Backend, Usage};
use infermesh_service::{ErrorKind, MeshError};
use serde_json::{Value, json};

use crate::admission::Admission;
use crate::app::AppState;
use crate::error::ApiError;
use crate::routes::generate::{Failed, Flavor, Generation, usage_json};
use crate::routes::{unix_now, with_headers};

/// The most of an upstream's error body quoted back to the client.
const QUOTED_ERROR_CHARS: usize = 300;

fn upstream_error(provider: &str, what: impl std::fmt::Display) -> MeshError {
    MeshError::new(ErrorKind::UpstreamError, format!("upstream provider `{provider}` {what}"))
}

fn upstream_timeout(provider: &str, timeout: Duration) -> MeshError {
    MeshError::new(
        ErrorKind::UpstreamTimeout,
        format!("upstream provider `{provider}` did not answer within {} ms", timeout.as_millis()),
    )
}

/// The key to send: the caller's own (BYOK), else the backend's.
fn api_key(backend: &Backend, provider_key: Option<&str>) -> Result<Option<String>, MeshError> {
    if let Some(key) = provider_key {
        return Ok(Some(key.to_owned()));
    }
    if !backend.api_key_env.is_empty() {
        return std::env::var(&backend.api_key_env).map(Some).map_err(|_| {
            upstream_error(&backend.name, format_args!("has no API key: ${} is not set", backend.api_key_env))
        });
    }
    if !backend.api_key_file.is_empty() {
        return std::fs::read_to_string(&backend.api_key_file).map(|key| Some(key.trim().to_owned())).map_err(|err| {
            upstream_error(&backend.name, format_args!("has no API key: cannot read {}: {err}", backend.api_key_file))
        });
    }
    Ok((!backend.api_key.is_empty()).then(|| backend.api_key.clone()))
}

/// OpenAI's finish reason for an upstream's raw one.
fn openai_finish_reason(native: &str) -> &'static str {
    match native.to_ascii_lowercase().as_str() {
        "length" | "max_tokens" | "max_length" | "model_length" => "length",
        "tool_calls" | "tool_use" | "function_call" => "tool_calls",
        "content_filter" | "safety" | "recitation" => "content_filter",
        _ => "stop",
    }
}

/// Rewrites each choice's finish reason to OpenAI's, keeping the raw one.
fn normalize_choices(choices: &mut Value) {
    let Some(choices) = choices.as_array_mut() else { return };
    for choice in choices {
        let Some(native) = choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned) else { continue };
        if choice.get("native_finish_reason").is_none_or(Value::is_null) {
            choice["native_finish_reason"] = json!(native);
        }
        choice["finish_reason"] = json!(openai_finish_reason(&native));
    }
}

fn usage_of(body: &Value) -> Option<Usage> {
    let usage = body.get("usage")?;
    let count = |field: &str| usage.get(field).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
    Some(Usage { prompt_tokens: count("prompt_tokens")?, completion_tokens: count("completion_tokens")? })
}

/// Whether a chunk carries output: text, or a choice's end.
fn carries_output(chunk: &Value) -> bool {
    chunk.get("choices").and_then(Value::as_array).is_some_and(|choices| {
        choices.iter().any(|choice| {
            let text = choice.pointer("/delta/content").or_else(|| choice.get("text")).and_then(Value::as_str);
            text.is_some_and(|t| !t.is_empty())
                || choice.pointer("/delta/tool_calls").is_some()
                || choice.get("finish_reason").is_some_and(|r| !r.is_null())
        })
    })
}

/// Serves `generation` through `backend`.
pub async fn serve(
    state: &AppState,
    admission: &Arc<Admission>,
    backend: &Backend,
    generation: &Generation,
) -> Result<Response, Failed> {
    let provider = backend.name.as_str();
    let timeout = Duration::from_millis(u64::from(backend.timeout_ms.max(1)));
    let mut body: Value = serde_json::from_slice(&generation.body)
        .map_err(|err| Failed::Final(MeshError::new(ErrorKind::InvalidRequest, err.to_string())))?;
    body["model"] = json!(backend.model);
    if generation.sampling.stream {
        // Usage is what the request is charged on.
        body["stream_options"] = json!({"include_usage": true});
    }
    let path = match generation.flavor {
        Flavor::Chat => "chat/completions",
        Flavor::Completion => "completions",
    };
    let key = api_key(backend, generation.provider_key.as_deref()).map_err(Failed::Next)?;
    let mut request = state.upstream.post(format!("{}/{path}", backend.base_url)).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = match admission.on_backend(tokio::time::timeout(timeout, request.send())).await {
        Err(_) => return Err(Failed::Next(upstream_timeout(provider, timeout))),
        Ok(Err(err)) => return Err(Failed::Next(upstream_error(provider, format_args!("is unreachable: {err}")))),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if !status.is_success() {
        let text = tokio::time::timeout(timeout, response.text()).await.ok().and_then(Result::ok).unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or(text);
        let message: String = message.chars().take(QUOTED_ERROR_CHARS).collect();
        let err = upstream_error(provider, format_args!("answered {status}: {message}"));
        // The request itself is at fault: another provider would refuse it too.
        return Err(if matches!(status.as_u16(), 400 | 413 | 422) {
            Failed::Final(MeshError::new(ErrorKind::InvalidRequest, err.message))
        } else {
            Failed::Next(err)
        });
    }
    // Until the upstream's usage says otherwise, a disconnect is billed on
    // a rough count: about four bytes per prompt token.
    let prompt_estimate = generation.prompt_bound.div_ceil(4);
    if generation.sampling.stream {
        let mut events = sse_data(response.bytes_stream());
        let mut opening = Vec::new();
        loop {
            let data = match admission.on_backend(tokio::time::timeout(timeout, events.next())).await {
                Err(_) => return Err(Failed::Next(upstream_timeout(provider, timeout))),
                Ok(None) => {
                    return Err(Failed::Next(upstream_error(provider, "ended the stream before its first token")));
                }
                Ok(Some(Err(err))) => {
                    return Err(Failed::Next(upstream_error(provider, format_args!("broke the stream: {err}"))));
                }
                Ok(Some(Ok(data))) => data,
            };
            if data == "[DONE]" {
                return Err(Failed::Next(upstream_error(provider, "ended the stream before its first token")));
            }
            let chunk: Value = serde_json::from_str(&data)
                .map_err(|_| Failed::Next(upstream_error(provider, "sent a stream chunk that is not JSON")))?;
            if let Some(message) = chunk.pointer("/error/message").and_then(Value::as_str) {
                return Err(Failed::Next(upstream_error(provider, format_args!("failed: {message}"))));
            }
            let first_output = carries_output(&chunk);
            opening.push(chunk);
            if first_output {
                break;
            }
        }
        admission.set_provider(provider);
        admission.work_started(prompt_estimate);
        let headers = admission.rate_limit_headers();
        let relay = Relay {
            admission: admission.clone(),
            flavor: generation.flavor,
            include_usage: generation.sampling.include_usage,
            created: unix_now(),
            provider: provider.to_owned(),
            timeout,
        };
        let sse = Sse::new(relay.stream(opening, events));
        return Ok(with_headers(sse.keep_alive(KeepAlive::default()).into_response(), headers));
    }
    let bytes = match admission.on_backend(tokio::time::timeout(timeout, response.bytes())).await {
        Err(_) => return Err(Failed::Next(upstream_timeout(provider, timeout))),
        Ok(Err(err)) => {
            return Err(Failed::Next(upstream_error(provider, format_args!("broke off its answer: {err}"))));
        }
        Ok(Ok(bytes)) => bytes,
    };
    let mut answer: Value = serde_json::from_slice(&bytes)
        .map_err(|_| Failed::Next(upstream_error(provider, "answered with a body that is not JSON")))?;
    if answer.get("choices").and_then(Value::as_array).is_none() {
        return Err(Failed::Next(upstream_error(provider, "answered without `choices`")));
    }
    admission.set_provider(provider);
    admission.work_started(prompt_estimate);
    let headers = admission.rate_limit_headers();
    let usage = usage_of(&answer);
    if usage.is_none() {
        let text: usize = answer["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.pointer("/message/content").or_else(|| c.get("text")).and_then(Value::as_str))
            .map(str::len)
            .sum();
        admission.add_completion_tokens(u32::try_from(text.div_ceil(4)).unwrap_or(u32::MAX));
    }
    let settled = admission.settle(usage);
    normalize_choices(&mut answer["choices"]);
    answer["id"] = json!(admission.request_id);
    answer["object"] = json!(generation.flavor.object(false));
    answer["model"] = json!(admission.model.id);
    answer["provider"] = json!(provider);
    answer["usage"] = usage_json(&settled);
    let mut headers = headers;
    headers.push(admission.overhead_header());
    Ok(with_headers(axum::Json(answer).into_response(), headers))
}

/// Carries an upstream's stream to the client in our shape.
struct Relay {
    admission: Arc<Admission>,
    flavor: Flavor,
    include_usage: bool,
    created: u64,
    provider: String,
    timeout: Duration,
}

impl Relay {
    /// One upstream chunk in our shape: our id, model and provider, and
    /// OpenAI's finish reasons; `None` for a chunk with no choices.
    fn rewrite(&self, mut chunk: Value) -> Option<Value> {
        if chunk.get("choices").and_then(Value::as_array).is_none_or(Vec::is_empty) {
            return None;
        }
        normalize_choices(&mut chunk["choices"]);
        chunk["id"] = json!(self.admission.request_id);
        chunk["object"] = json!(self.flavor.object(true));
        chunk["created"] = json!(self.created);
        chunk["model"] = json!(self.admission.model.id);
        chunk["provider"] = json!(self.provider);
        if let Some(object) = chunk.as_object_mut() {
            object.remove("usage");
        }
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        Some(chunk)
    }

    fn count_output(&self, chunk: &Value) {
        let texts = chunk["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c.pointer("/delta/content")
                    .or_else(|| c.get("text"))
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty())
            })
            .count();
        self.admission.add_completion_tokens(u32::try_from(texts).unwrap_or(u32::MAX));
    }

    fn error_event(err: &MeshError) -> SseEvent {
        SseEvent::default().data(ApiError(err.clone()).body().to_string())
    }

    fn stream(
        self,
        opening: Vec<Value>,
        mut events: impl Stream<Item = Result<String, reqwest::Error>> + Send + Unpin + 'static,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        async_stream::stream! {
            let mut usage: Option<Usage> = None;
            let mut pending = opening.into_iter();
            let mut cut: Option<MeshError> = None;
            loop {
                let chunk = if let Some(chunk) = pending.next() {
                    chunk
                } else {
                    let data = match self.admission.on_backend(tokio::time::timeout(self.timeout, events.next())).await {
                        Err(_) => {
                            cut = Some(upstream_timeout(&self.provider, self.timeout));
                            break;
                        }
                        Ok(None) => {
                            cut = Some(upstream_error(&self.provider, "ended the stream without finishing"));
                            break;
                        }
                        Ok(Some(Err(err))) => {
                            cut = Some(upstream_error(&self.provider, format_args!("broke the stream: {err}")));
                            break;
                        }
                        Ok(Some(Ok(data))) => data,
                    };
                    if data == "[DONE]" {
                        break;
                    }
                    match serde_json::from_str::<Value>(&data) {
                        Ok(chunk) => chunk,
                        Err(_) => {
                            cut = Some(upstream_error(&self.provider, "sent a stream chunk that is not JSON"));
                            break;
                        }
                    }
                };
                if let Some(message) = chunk.pointer("/error/message").and_then(Value::as_str) {
                    cut = Some(upstream_error(&self.provider, format_args!("failed mid-stream: {message}")));
                    break;
                }
                if let Some(reported) = usage_of(&chunk) {
                    usage = Some(reported);
                }
                self.count_output(&chunk);
                if let Some(chunk) = self.rewrite(chunk) {
                    yield Ok(SseEvent::default().data(chunk.to_string()));
                }
            }
            if let Some(err) = &cut {
                let err = MeshError::new(err.kind, format!("{}; you were charged only for tokens delivered", err.message));
                yield Ok(Self::error_event(&err));
            }
            // A cut stream is charged on what was counted, not on a usage
            // the upstream may have reported for more than it delivered.
            let usage = if cut.is_some() { None } else { usage };
            let settled = self.admission.settle(usage);
            if self.include_usage && cut.is_none() {
                    let body = json!({
                        "id": self.admission.request_id,
                        "object": self.flavor.object(true),
                        "created": self.created,
                        "model": self.admission.model.id,
                        "provider": self.provider,
                        "choices": [],
                        "usage": usage_json(&settled),
                    });
                    yield Ok(SseEvent::default().data(body.to_string()));
            }
            yield Ok(SseEvent::default().data("[DONE]"));
        }
    }
}

/// The `data` of each server-sent event in a byte stream.
fn sse_data(
    bytes: impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
) -> impl Stream<Item = Result<String, reqwest::Error>> + Send + Unpin + 'static {
    Box::pin(async_stream::stream! {
        let mut bytes = std::pin::pin!(bytes);
        let mut buffer = BytesMut::new();
        loop {
            while let Some(end) = event_end(&buffer) {
                let event = buffer.split_to(end.0);
                let _separator = buffer.split_to(end.1);
                let text = String::from_utf8_lossy(&event);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(|data| data.strip_prefix(' ').unwrap_or(data))
                    .collect();
                if !data.is_empty() {
                    yield Ok(data.join("\n"));
                }
            }
            match bytes.next().await {
                Some(Ok(more)) => buffer.extend_from_slice(&more),
                Some(Err(err)) => {
                    yield Err(err);
                    return;
                }
                None => return,
            }
        }
    })
}

/// Where the first complete event in `buffer` ends: its length and the
/// blank line's.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    (0..buffer.len()).find_map(|at| {
        let rest = &buffer[at..];
        if rest.starts_with(b"\r\n\r\n") {
            Some((at, 4))
        } else if rest.starts_with(b"\n\n") {
            Some((at, 2))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_map_to_openai_and_keep_the_raw_one() {
        let mut choices = json!([
            {"index": 0, "finish_reason": "max_tokens"},
            {"index": 1, "finish_reason": "end_turn"},
            {"index": 2, "finish_reason": "stop", "native_finish_reason": "eos"},
            {"index": 3, "finish_reason": null},
        ]);
        normalize_choices(&mut choices);
        assert_eq!(choices[0]["finish_reason"], "length");
        assert_eq!(choices[0]["native_finish_reason"], "max_tokens");
        assert_eq!(choices[1]["finish_reason"], "stop");
        assert_eq!(choices[2]["native_finish_reason"], "eos");
        assert!(choices[3]["finish_reason"].is_null());
    }

    #[tokio::test]
    async fn server_sent_events_split_across_reads_come_out_whole() {
        let parts = ["data: {\"a\"", ":1}\n\n: comment\n\ndata: x\r\n\r\nda", "ta: [DONE]\n\n"];
        let bytes = futures::stream::iter(parts.map(|p| Ok::<_, reqwest::Error>(Bytes::from(p))));
        let data: Vec<String> = sse_data(bytes).map(Result::unwrap).collect().await;
        assert_eq!(data, ["{\"a\":1}", "x", "[DONE]"]);
    }

    #[test]
    fn keys_come_from_the_caller_then_env_then_file_then_config() {
        let backend = Backend { name: "up".into(), api_key: "configured".into(), ..Backend::default() };
        assert_eq!(api_key(&backend, Some("mine")).unwrap().as_deref(), Some("mine"));
        assert_eq!(api_key(&backend, None).unwrap().as_deref(), Some("configured"));
        let unset = Backend { name: "up".into(), api_key_env: "INFERMESH_TEST_UNSET_KEY".into(), ..Backend::default() };
        assert!(api_key(&unset, None).unwrap_err().message.contains("INFERMESH_TEST_UNSET_KEY"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "from-file\n").unwrap();
        let file = Backend {
            name: "up".into(),
            api_key_file: dir.path().join("key").display().to_string(),
            ..Backend::default()
        };
        assert_eq!(api_key(&file, None).unwrap().as_deref(), Some("from-file"));
        assert_eq!(api_key(&Backend::default(), None).unwrap(), None);
    }
}
