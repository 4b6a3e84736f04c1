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

use axum::http::{HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use infermesh_proto::v1::{Backend, Usage};
use infermesh_service::{ErrorKind, MeshError};
use serde_json::json;

use crate::admission::Admission;
use crate::app::AppState;
use crate::error::ApiError;
use crate::raw_json::{Null, ObjectWriter, RawObject, into_text, write_array};
use crate::routes::generate::{Failed, Flavor, Generation, usage_json};
use crate::routes::{unix_now, with_headers};

const JSON_CONTENT_TYPE: &str = "application/json";

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

/// The members of an upstream's answer or chunk that we write ourselves.
const OUR_MEMBERS: [&str; 7] = ["id", "object", "created", "model", "provider", "choices", "usage"];

/// Writes a choice with OpenAI's finish reason, keeping the raw one in
/// `native_finish_reason`; the rest as it came.
fn write_choice(out: &mut Vec<u8>, choice: &RawObject) {
    let mut writer = ObjectWriter::open(out);
    let Some(native) = choice.get_as::<String>("finish_reason") else {
        for (name, value) in choice.others(&[]) {
            writer.raw(name, value);
        }
        writer.close();
        return;
    };
    for (name, value) in choice.others(&["finish_reason", "native_finish_reason"]) {
        writer.raw(name, value);
    }
    writer.value("finish_reason", openai_finish_reason(&native));
    match choice.get("native_finish_reason").filter(|_| choice.has("native_finish_reason")) {
        Some(upstream_native) => writer.raw("native_finish_reason", upstream_native),
        None => writer.value("native_finish_reason", &native),
    };
    writer.close();
}

fn write_choices(out: &mut Vec<u8>, choices: &[RawObject]) {
    write_array(out, choices, write_choice);
}

#[derive(serde::Deserialize)]
struct UsageCounts {
    prompt_tokens: u32,
    completion_tokens: u32,
}

fn usage_of(object: &RawObject) -> Option<Usage> {
    let counts: UsageCounts = object.get_as("usage")?;
    Some(Usage { prompt_tokens: counts.prompt_tokens, completion_tokens: counts.completion_tokens })
}

/// The choices of an answer or chunk; `None` when it has no array of them.
fn choices_of<'a>(object: &RawObject<'a>) -> Option<Vec<RawObject<'a>>> {
    Some(object.array("choices")?.into_iter().filter_map(RawObject::of).collect())
}

/// The client's request as an upstream takes it: its own model id, and in
/// a stream the usage chunk, which is what the request is charged on.
fn upstream_body(sent: &[u8], model: &str, stream: bool) -> serde_json::Result<Vec<u8>> {
    let request = RawObject::parse(sent)?;
    let mut out = Vec::with_capacity(sent.len() + 64);
    let mut writer = ObjectWriter::open(&mut out);
    for (name, value) in request.others(&["model", "stream_options"]) {
        writer.raw(name, value);
    }
    writer.value("model", model);
    if stream {
        writer.with("stream_options", |out| out.extend_from_slice(br#"{"include_usage":true}"#));
    }
    writer.close();
    Ok(out)
}

/// One chunk of an upstream's stream, read as far as the relay needs.
struct Chunk<'a> {
    object: RawObject<'a>,
    choices: Vec<RawObject<'a>>,
}

impl<'a> Chunk<'a> {
    fn parse(data: &'a str) -> Option<Self> {
        let object = RawObject::parse(data.as_bytes()).ok()?;
        let choices = choices_of(&object).unwrap_or_default();
        Some(Chunk { object, choices })
    }

    fn error_message(&self) -> Option<String> {
        RawObject::of(self.object.get("error")?)?.get_as("message")
    }

    /// How many of its choices carry text.
    fn texts(&self) -> usize {
        self.choices.iter().filter(|choice| carries_text(choice)).count()
    }

    /// Whether it carries output: text, a tool call, or a choice's end.
    fn carries_output(&self) -> bool {
        self.choices.iter().any(|choice| {
            carries_text(choice)
                || RawObject::of_member(choice, "delta").is_some_and(|delta| delta.has("tool_calls"))
                || choice.has("finish_reason")
        })
    }
}

fn carries_text(choice: &RawObject) -> bool {
    choice.has_text("text") || RawObject::of_member(choice, "delta").is_some_and(|delta| delta.has_text("content"))
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
    let body = upstream_body(&generation.body, &backend.model, generation.sampling.stream)
        .map_err(|err| Failed::Final(MeshError::new(ErrorKind::InvalidRequest, err.to_string())))?;
    let path = match generation.flavor {
        Flavor::Chat => "chat/completions",
        Flavor::Completion => "completions",
    };
    let key = api_key(backend, generation.provider_key.as_deref()).map_err(Failed::Next)?;
    let mut request = state
        .upstream
        .post(format!("{}/{path}", backend.base_url))
        .header(header::CONTENT_TYPE, JSON_CONTENT_TYPE)
        .body(body);
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
        let message = RawObject::parse(text.as_bytes())
            .ok()
            .and_then(|answer| RawObject::of_member(&answer, "error")?.get_as::<String>("message"))
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
            let chunk = Chunk::parse(&data)
                .ok_or_else(|| Failed::Next(upstream_error(provider, "sent a stream chunk that is not JSON")))?;
            if let Some(message) = chunk.error_message() {
                return Err(Failed::Next(upstream_error(provider, format_args!("failed: {message}"))));
            }
            let first_output = chunk.carries_output();
            opening.push(data);
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
    let answer = RawObject::parse(&bytes)
        .map_err(|_| Failed::Next(upstream_error(provider, "answered with a body that is not JSON")))?;
    let choices =
        choices_of(&answer).ok_or_else(|| Failed::Next(upstream_error(provider, "answered without `choices`")))?;
    admission.set_provider(provider);
    admission.work_started(prompt_estimate);
    let mut headers = admission.rate_limit_headers();
    let usage = usage_of(&answer);
    if usage.is_none() {
        let text: usize = choices
            .iter()
            .filter_map(|choice| {
                RawObject::of_member(choice, "message")
                    .and_then(|message| message.get_as::<String>("content"))
                    .or_else(|| choice.get_as::<String>("text"))
            })
            .map(|text| text.len())
            .sum();
        admission.add_completion_tokens(u32::try_from(text.div_ceil(4)).unwrap_or(u32::MAX));
    }
    let settled = admission.settle(usage);
    let mut out = Vec::with_capacity(bytes.len() + 256);
    let mut writer = ObjectWriter::open(&mut out);
    writer
        .value("id", &admission.request_id)
        .value("object", generation.flavor.object(false))
        .value("model", &admission.model.id)
        .value("provider", provider);
    if let Some(created) = answer.get("created") {
        writer.raw("created", created);
    }
    for (name, value) in answer.others(&OUR_MEMBERS) {
        writer.raw(name, value);
    }
    writer.with("choices", |out| write_choices(out, &choices)).value("usage", &usage_json(&settled));
    writer.close();
    headers.push(admission.overhead_header());
    let json = [(header::CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE))];
    Ok(with_headers((json, out).into_response(), headers))
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
    fn rewrite(&self, chunk: &Chunk, size_hint: usize) -> Option<String> {
        if chunk.choices.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(size_hint + 128);
        let mut writer = ObjectWriter::open(&mut out);
        writer
            .value("id", &self.admission.request_id)
            .value("object", self.flavor.object(true))
            .value("created", &self.created)
            .value("model", &self.admission.model.id)
            .value("provider", &self.provider);
        for (name, value) in chunk.object.others(&OUR_MEMBERS) {
            writer.raw(name, value);
        }
        writer.with("choices", |out| write_choices(out, &chunk.choices));
        if self.include_usage {
            writer.value("usage", &Null);
        }
        writer.close();
        Some(into_text(out))
    }

    fn error_event(err: &MeshError) -> SseEvent {
        SseEvent::default().data(ApiError(err.clone()).body().to_string())
    }

    fn stream(
        self,
        opening: Vec<String>,
        mut events: impl Stream<Item = Result<String, reqwest::Error>> + Send + Unpin + 'static,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        async_stream::stream! {
            let mut usage: Option<Usage> = None;
            let mut pending = opening.into_iter();
            let mut cut: Option<MeshError> = None;
            loop {
                let data = if let Some(data) = pending.next() {
                    data
                } else {
                    match self.admission.on_backend(tokio::time::timeout(self.timeout, events.next())).await {
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
                    }
                };
                if data == "[DONE]" {
                    break;
                }
                let Some(chunk) = Chunk::parse(&data) else {
                    cut = Some(upstream_error(&self.provider, "sent a stream chunk that is not JSON"));
                    break;
                };
                if let Some(message) = chunk.error_message() {
                    cut = Some(upstream_error(&self.provider, format_args!("failed mid-stream: {message}")));
                    break;
                }
                if let Some(reported) = usage_of(&chunk.object) {
                    usage = Some(reported);
                }
                self.admission.add_completion_tokens(u32::try_from(chunk.texts()).unwrap_or(u32::MAX));
                if let Some(rewritten) = self.rewrite(&chunk, data.len()) {
                    yield Ok(SseEvent::default().data(rewritten));
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

/// The `data` of each server-sent event in a byte stream: its `data:`
/// lines, joined by newlines.
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
                let mut data: Option<String> = None;
                for line in text.lines().filter_map(|line| line.strip_prefix("data:")) {
                    let line = line.strip_prefix(' ').unwrap_or(line);
                    match &mut data {
                        None => data = Some(line.to_owned()),
                        Some(joined) => {
                            joined.push('\n');
                            joined.push_str(line);
                        }
                    }
                }
                if let Some(data) = data {
                    yield Ok(data);
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
        let chunk = r#"{"id":"up","system_fingerprint":"fp","choices":[
            {"index": 0, "finish_reason": "max_tokens"},
            {"index": 1, "finish_reason": "end_turn", "delta": {"content": ""}},
            {"index": 2, "finish_reason": "stop", "native_finish_reason": "eos"},
            {"index": 3, "finish_reason": null, "delta": {"content": "hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let chunk = Chunk::parse(chunk).unwrap();
        assert_eq!(chunk.texts(), 1);
        assert!(chunk.carries_output());
        assert_eq!(usage_of(&chunk.object), Some(Usage { prompt_tokens: 3, completion_tokens: 4 }));
        let mut out = Vec::new();
        write_choices(&mut out, &chunk.choices);
        let choices: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(choices[0]["finish_reason"], "length");
        assert_eq!(choices[0]["native_finish_reason"], "max_tokens");
        assert_eq!(choices[1]["finish_reason"], "stop");
        assert_eq!(choices[1]["delta"]["content"], "");
        assert_eq!(choices[2]["native_finish_reason"], "eos");
        assert!(choices[3]["finish_reason"].is_null());
        assert!(choices[3].get("native_finish_reason").is_none());
    }

    #[test]
    fn a_chunk_without_output_or_choices_is_told_apart() {
        let opening = Chunk::parse(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#).unwrap();
        assert!(!opening.carries_output());
        let tool = Chunk::parse(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#).unwrap();
        assert!(tool.carries_output() && tool.texts() == 0);
        let usage_only = Chunk::parse(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#).unwrap();
        assert!(usage_only.choices.is_empty());
        let failed = Chunk::parse(r#"{"error":{"message":"overloaded"}}"#).unwrap();
        assert_eq!(failed.error_message().as_deref(), Some("overloaded"));
        assert!(Chunk::parse("not json").is_none());
    }

    #[test]
    fn the_upstream_gets_its_model_id_and_a_stream_its_usage() {
        let sent = br#"{"model":"ours/m","messages":[{"role":"user","content":"h\u00e9"}],"stream":true,"stream_options":{"include_usage":false}}"#;
        let body: serde_json::Value = serde_json::from_slice(&upstream_body(sent, "theirs", true).unwrap()).unwrap();
        assert_eq!(body["model"], "theirs");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"][0]["content"], "h\u{e9}");
        let plain: serde_json::Value =
            serde_json::from_slice(&upstream_body(br#"{"model":"m"}"#, "t", false).unwrap()).unwrap();
        assert_eq!(plain, json!({"model": "t"}));
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
