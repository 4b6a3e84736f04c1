//! OpenAI request bodies as clients send them, and their validation.
//! Response bodies are built with `serde_json::json!` in the routes, next
//! to the OpenAI schema they follow.

use serde::Deserialize;

use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and streaming fields shared by chat and legacy completions.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    // Beyond OpenAI, as vLLM and OpenRouter take them.
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Sampling settings that passed validation.
#[derive(Debug, Clone)]
pub struct ValidSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub logit_bias: std::collections::HashMap<u32, f32>,
    pub ignore_eos: bool,
    /// Choices per request.
    pub n: u32,
    /// `Some(k)`: per-token log-probabilities with `k` alternatives.
    pub logprobs: Option<u32>,
    /// OpenAI's `user`: the caller's end user, carried into usage events.
    pub end_user: String,
}

/// A chat request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidChat {
    pub model: String,
    pub messages: Vec<(String, String)>,
    pub max_tokens: Option<u32>,
    pub sampling: ValidSampling,
    /// Why this mesh's own workers cannot serve it (a content part other
    /// than text, e.g. an image): an upstream provider still may.
    pub beyond_text: Option<ApiError>,
}

/// The most choices one request may ask for.
pub const MAX_CHOICES: u32 = 16;
/// The most alternatives per token (OpenAI's limit for chat).
pub const MAX_TOP_LOGPROBS: u32 = 20;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn in_range(param: &str, value: Option<f32>, low: f32, high: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(low..=high).contains(&v) || v.is_nan() => {
            Err(ApiError::invalid(param, format!("`{param}` must be between {low} and {high}; got {v}")))
        }
        _ => Ok(()),
    }
}

/// A message's text; a part of another kind (image, audio) is noted in
/// `beyond_text`, first one only, for the backends that take text alone.
fn text_of(index: usize, content: Option<Content>, beyond_text: &mut Option<ApiError>) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match content {
        None => Ok(String::new()),
        Some(Content::Text(text)) => Ok(text),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (i, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(ApiError::invalid(&format!("{param}[{i}].text"), "a text part needs `text`"));
                    }
                    (other, _) => {
                        beyond_text.get_or_insert_with(|| {
                            ApiError::invalid(
                                &format!("{param}[{i}].type"),
                                format!("content part type {other:?} is not supported by this model; send text"),
                            )
                        });
                    }
                }
            }
            Ok(text)
        }
    }
}

impl SamplingFields {
    pub fn validate(self) -> Result<ValidSampling, ApiError> {
        if let Some(n) = self.n
            && !(1..=MAX_CHOICES).contains(&n)
        {
            return Err(ApiError::invalid("n", format!("`n` must be between 1 and {MAX_CHOICES}; got {n}")));
        }
        let mut logit_bias = std::collections::HashMap::new();
        for (token, bias) in self.logit_bias.unwrap_or_default() {
            let id = token.parse::<u32>().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`logit_bias` keys are token ids; got {token:?}"))
            })?;
            in_range("logit_bias", Some(bias), -100.0, 100.0)?;
            logit_bias.insert(id, bias);
        }
        in_range("temperature", self.temperature, 0.0, 2.0)?;
        in_range("top_p", self.top_p, 0.0, 1.0)?;
        in_range("min_p", self.min_p, 0.0, 1.0)?;
        in_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?;
        in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(many)) => many,
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid("stop", format!("at most 4 stop sequences; got {}", stop.len())));
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid("stream_options", "`stream_options` is only allowed when `stream` is true"));
        }
        Ok(ValidSampling {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            stop,
            seed: self.seed.map(|s| s as u64),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            logit_bias,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            n: self.n.unwrap_or(1),
            logprobs: None,
            end_user: end_user(self.user)?,
        })
    }
}

/// The most characters of an end-user id kept for billing records.
const MAX_END_USER_CHARS: usize = 256;

fn end_user(user: Option<String>) -> Result<String, ApiError> {
    let user = user.unwrap_or_default();
    if user.chars().count() > MAX_END_USER_CHARS {
        return Err(ApiError::invalid("user", format!("`user` may be at most {MAX_END_USER_CHARS} characters")));
    }
    Ok(user)
}

fn require_model(model: &str) -> Result<(), ApiError> {
    if model.trim().is_empty() {
        return Err(ApiError::invalid("model", "`model` must name a model, e.g. infermesh/gemma-3-270m"));
    }
    Ok(())
}

fn positive(param: &str, value: Option<u32>) -> Result<(), ApiError> {
    if value == Some(0) {
        return Err(ApiError::invalid(param, "must be at least 1"));
    }
    Ok(())
}

impl ChatRequest {
    pub fn validate(self) -> Result<ValidChat, ApiError> {
        require_model(&self.model)?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "`messages` must hold at least one message"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        let mut beyond_text = None;
        for (index, message) in self.messages.into_iter().enumerate() {
            if !ROLES.contains(&message.role.as_str()) {
                return Err(ApiError::invalid(
                    &format!("messages[{index}].role"),
                    format!("unknown role {:?}; expected one of {}", message.role, ROLES.join(", ")),
                ));
            }
            let role = if message.role == "developer" { "system".to_owned() } else { message.role };
            messages.push((role, text_of(index, message.content, &mut beyond_text)?));
        }
        positive("max_completion_tokens", self.max_completion_tokens)?;
        positive("max_tokens", self.max_tokens)?;
        if let Some(top) = self.top_logprobs {
            if top > MAX_TOP_LOGPROBS {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}; got {top}"),
                ));
            }
            if self.logprobs != Some(true) {
                return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
            }
        }
        let mut sampling = self.sampling.validate()?;
        sampling.logprobs = (self.logprobs == Some(true)).then_some(self.top_logprobs.unwrap_or(0));
        Ok(ValidChat {
            model: self.model,
            messages,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            sampling,
            beyond_text,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// A legacy `/v1/completions` body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidPrompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub struct ValidCompletion {
    pub model: String,
    pub prompt: ValidPrompt,
    pub max_tokens: u32,
    pub sampling: ValidSampling,
}

/// OpenAI's default for `/v1/completions`.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;

impl CompletionRequest {
    pub fn validate(self) -> Result<ValidCompletion, ApiError> {
        require_model(&self.model)?;
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(ApiError::invalid("prompt", format!("send one prompt per request; got {n}")))
            }
        };
        let prompt = match self.prompt {
            PromptInput::Text(text) => ValidPrompt::Text(text),
            PromptInput::Texts(mut texts) => {
                one(texts.len())?;
                ValidPrompt::Text(texts.remove(0))
            }
            PromptInput::Tokens(ids) => ValidPrompt::Tokens(ids),
            PromptInput::TokenBatches(mut batches) => {
                one(batches.len())?;
                ValidPrompt::Tokens(batches.remove(0))
            }
        };
        if matches!(&prompt, ValidPrompt::Text(t) if t.is_empty())
            || matches!(&prompt, ValidPrompt::Tokens(ids) if ids.is_empty())
        {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid("echo", "`echo` is not supported; the prompt is not repeated in the output"));
        }
        if let Some(top) = self.logprobs
            && top > MAX_TOP_LOGPROBS
        {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}; got {top}"),
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "`suffix` (fill-in-the-middle) is not supported by this model"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("best_of", "only best_of=1 is supported"));
        }
        positive("max_tokens", self.max_tokens)?;
        let mut sampling = self.sampling.validate()?;
        sampling.logprobs = self.logprobs;
        Ok(ValidCompletion {
            model: self.model,
            prompt,
            max_tokens: self.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS),
            sampling,
        })
    }
}

/// vLLM's `/tokenize` body: a prompt or chat messages.
#[derive(Debug, Deserialize)]
pub struct TokenizeBody {
    pub model: String,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

/// vLLM's `/detokenize` body.
#[derive(Debug, Deserialize)]
pub struct DetokenizeBody {
    pub model: String,
    pub tokens: Vec<u32>,
}

/// Validated chat messages as (role, text) pairs.
pub fn chat_messages(messages: Vec<ChatMessage>) -> Result<Vec<(String, String)>, ApiError> {
    ChatRequest {
        model: "-".into(),
        messages,
        max_tokens: None,
        max_completion_tokens: None,
        logprobs: None,
        top_logprobs: None,
        sampling: SamplingFields::default(),
    }
    .validate()
    .map(|chat| chat.messages)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    Float,
    Base64,
}

pub struct ValidEmbedding {
    pub model: String,
    pub inputs: Vec<String>,
    pub format: EncodingFormat,
    pub dimensions: Option<u32>,
    pub end_user: String,
}

/// The most inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

impl EmbeddingRequest {
    pub fn validate(self) -> Result<ValidEmbedding, ApiError> {
        let inputs = match self.input {
            EmbeddingInput::One(s) => vec![s],
            EmbeddingInput::Many(many) => many,
            EmbeddingInput::Tokens(_) | EmbeddingInput::TokenBatches(_) => {
                return Err(ApiError::invalid(
                    "input",
                    "token-id input is not supported for embeddings here; send text",
                ));
            }
        };
        if inputs.is_empty() {
            return Err(ApiError::invalid("input", "`input` must not be an empty array"));
        }
        if inputs.len() > MAX_EMBEDDING_INPUTS {
            return Err(ApiError::invalid(
                "input",
                format!("at most {MAX_EMBEDDING_INPUTS} inputs per request; got {}", inputs.len()),
            ));
        }
        if let Some(i) = inputs.iter().position(String::is_empty) {
            return Err(ApiError::invalid(&format!("input[{i}]"), "inputs must not be empty strings"));
        }
        let format = match self.encoding_format.as_deref() {
            None | Some("float") => EncodingFormat::Float,
            Some("base64") => EncodingFormat::Base64,
            Some(other) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("expected \"float\" or \"base64\"; got {other:?}"),
                ));
            }
        };
        Ok(ValidEmbedding {
            model: self.model,
            inputs,
            format,
            dimensions: self.dimensions,
            end_user: end_user(self.user)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::parse_json;

    fn chat(body: &str) -> Result<ValidChat, ApiError> {
        parse_json::<ChatRequest>(body.as_bytes())?.validate()
    }

    #[test]
    fn accepts_text_and_parts() {
        let valid = chat(r#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"stop":"x"}"#).unwrap();
        assert_eq!(valid.messages[0], ("system".to_owned(), "ab".to_owned()));
        assert!(valid.sampling.include_usage && valid.sampling.stream);
        assert_eq!(valid.sampling.stop, vec!["x".to_owned()]);
    }

    #[test]
    fn refuses_out_of_range_values_naming_the_param() {
        let cases = [
            (r#"{"model":"m","messages":[]}"#, "messages"),
            (r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#, "messages[0].role"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":0}"#, "n"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":17}"#, "n"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"min_p":1.5}"#, "min_p"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#, "logit_bias"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"5":101}}"#, "logit_bias"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#, "top_logprobs"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"repetition_penalty":0}"#,
                "repetition_penalty",
            ),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-5}"#, "max_tokens"),
        ];
        let image = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#).unwrap();
        assert_eq!(image.beyond_text.unwrap().0.param.as_deref(), Some("messages[0].content[0].type"));
        for (body, param) in cases {
            let err = chat(body).unwrap_err();
            assert_eq!(err.0.param.as_deref(), Some(param), "{body}: {}", err.0.message);
        }
    }

    #[test]
    fn completion_prompts_are_text_or_token_ids() {
        let parse = |body: &str| parse_json::<CompletionRequest>(body.as_bytes()).and_then(CompletionRequest::validate);
        let text = parse(r#"{"model":"m","prompt":"Once"}"#).unwrap();
        assert_eq!(text.prompt, ValidPrompt::Text("Once".into()));
        assert_eq!(text.max_tokens, DEFAULT_COMPLETION_TOKENS);
        assert_eq!(parse(r#"{"model":"m","prompt":[2,818]}"#).unwrap().prompt, ValidPrompt::Tokens(vec![2, 818]));
        assert_eq!(parse(r#"{"model":"m","prompt":[[2,818]]}"#).unwrap().prompt, ValidPrompt::Tokens(vec![2, 818]));
        for (body, param) in [
            (r#"{"model":"m","prompt":["a","b"]}"#, "prompt"),
            (r#"{"model":"m","prompt":""}"#, "prompt"),
            (r#"{"model":"m","prompt":"a","echo":true}"#, "echo"),
            (r#"{"model":"m","prompt":"a","temperature":-1}"#, "temperature"),
        ] {
            assert_eq!(parse(body).err().and_then(|e| e.0.param).as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn embedding_inputs() {
        let valid = parse_json::<EmbeddingRequest>(br#"{"model":"e","input":["a","b"],"encoding_format":"base64"}"#)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(valid.inputs.len(), 2);
        assert_eq!(valid.format, EncodingFormat::Base64);
        assert!(parse_json::<EmbeddingRequest>(br#"{"model":"e","input":[]}"#).unwrap().validate().is_err());
        assert!(
            parse_json::<EmbeddingRequest>(br#"{"model":"e","input":"a","encoding_format":"hex"}"#)
                .unwrap()
                .validate()
                .is_err()
        );
    }
}
