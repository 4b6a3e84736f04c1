//! Text generation for one sequence: prefill in chunks, then decode token
//! by token, sampling each, until an end-of-generation token, a stop
//! string, `max_tokens`, or the caller going away.

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::WorkerError;
use crate::gemma3::Gemma3;
use crate::tokenizer::{SpmTokenizer, Utf8Stream};

/// Prefill is split so the attention scratch stays small on long prompts.
const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    pub stop: Vec<String>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta { text: String, token_ids: Vec<u32> },
    Finished { reason: Finish, native_reason: String, completion_tokens: usize },
}

/// Checks the request fits the context window; returns the token budget.
/// With `fit_to_context` (or `max_tokens` 0) the budget shrinks to the room
/// left in the window instead of being refused.
pub fn budget(
    prompt_tokens: usize,
    max_tokens: usize,
    context: usize,
    fit_to_context: bool,
) -> Result<usize, WorkerError> {
    let room = context.saturating_sub(prompt_tokens);
    let max_tokens = if max_tokens == 0 {
        room
    } else if fit_to_context {
        max_tokens.min(room)
    } else {
        max_tokens
    };
    if prompt_tokens == 0 {
        return Err(WorkerError::InvalidRequest("the prompt is empty".into()));
    }
    if prompt_tokens + max_tokens > context || max_tokens == 0 {
        return Err(WorkerError::ContextLength { prompt: prompt_tokens, max_tokens, context });
    }
    Ok(max_tokens)
}

fn sampler(params: &GenerationParams) -> LogitsProcessor {
    let sampling = if params.temperature <= 1e-6 {
        Sampling::ArgMax
    } else {
        let temperature = params.temperature;
        match (params.top_k, params.top_p.filter(|p| *p < 1.0)) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    };
    LogitsProcessor::from_sampling(params.seed, sampling)
}

fn apply_penalties(
    logits: &Tensor,
    counts: &std::collections::HashMap<u32, u32>,
    params: &GenerationParams,
) -> Result<Tensor, WorkerError> {
    if (params.frequency_penalty == 0.0 && params.presence_penalty == 0.0) || counts.is_empty() {
        return Ok(logits.clone());
    }
    let mut values = logits.to_vec1::<f32>()?;
    for (&id, &count) in counts {
        if let Some(v) = values.get_mut(id as usize) {
            *v -= params.frequency_penalty * count as f32 + params.presence_penalty;
        }
    }
    Ok(Tensor::from_vec(values, logits.dims1()?, logits.device())?)
}

/// Holds back text that could be the start of a stop string, and cuts the
/// output at the first stop string.
struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    /// Returns (text safe to emit now, whether a stop string was hit).
    fn push(&mut self, delta: &str) -> (String, bool) {
        self.text.push_str(delta);
        let search_from = self.emitted.saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        if let Some(at) =
            self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| i + search_from)).min()
        {
            let out = self.text[self.emitted.min(at)..at].to_owned();
            self.emitted = at;
            return (out, true);
        }
        let hold = self.stops.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        let safe = floor_char_boundary(&self.text, self.text.len().saturating_sub(hold)).max(self.emitted);
        let out = self.text[self.emitted..safe].to_owned();
        self.emitted = safe;
        (out, false)
    }

    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Generates a continuation of `prompt`, calling `emit` for each event;
/// `emit` returning false means the receiver is gone and generation stops.
pub fn generate(
    model: &Gemma3,
    tokenizer: &SpmTokenizer,
    prompt: &[u32],
    params: &GenerationParams,
    mut emit: impl FnMut(Event) -> bool,
) -> Result<(), WorkerError> {
    let mut cache = model.new_cache();
    let mut logits = None;
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        logits = Some(model.forward(chunk, &mut cache, false)?);
    }
    let mut logits = logits.ok_or_else(|| WorkerError::InvalidRequest("the prompt is empty".into()))?;
    let mut sampler = sampler(params);
    let mut counts = std::collections::HashMap::new();
    let mut utf8 = Utf8Stream::default();
    let mut stops = StopScanner {
        stops: params.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
        text: String::new(),
        emitted: 0,
    };
    let mut generated = 0usize;
    let mut pending_ids = Vec::new();
    let finish = |reason, native: &str, generated| Event::Finished {
        reason,
        native_reason: native.to_owned(),
        completion_tokens: generated,
    };
    loop {
        let scored = apply_penalties(&logits, &counts, params)?;
        let next = sampler.sample(&scored)?;
        generated += 1;
        if tokenizer.end_of_generation.contains(&next) {
            let tail = stops.push(&utf8.finish()).0 + &stops.finish();
            if !tail.is_empty() && !emit(Event::Delta { text: tail, token_ids: std::mem::take(&mut pending_ids) }) {
                return Ok(());
            }
            let native = tokenizer.decode_special(next);
            emit(finish(Finish::Stop, &native, generated));
            return Ok(());
        }
        *counts.entry(next).or_insert(0u32) += 1;
        pending_ids.push(next);
        let (text, hit_stop) = stops.push(&utf8.push(&tokenizer.token_bytes(next)));
        if !text.is_empty() || hit_stop {
            let delta = Event::Delta { text, token_ids: std::mem::take(&mut pending_ids) };
            if !emit(delta) {
                return Ok(());
            }
        }
        if hit_stop {
            emit(finish(Finish::Stop, "stop_sequence", generated));
            return Ok(());
        }
        if generated >= params.max_tokens {
            let tail = stops.push(&utf8.finish()).0 + &stops.finish();
            if (!tail.is_empty() || !pending_ids.is_empty())
                && !emit(Event::Delta { text: tail, token_ids: std::mem::take(&mut pending_ids) })
            {
                return Ok(());
            }
            emit(finish(Finish::Length, "length", generated));
            return Ok(());
        }
        logits = model.forward(&[next], &mut cache, false)?;
    }
}

/// Device selection: CUDA when built with it and present, else CPU.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return device;
    }
    Device::Cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_enforces_the_context_window() {
        assert_eq!(budget(10, 0, 100, false).unwrap(), 90);
        assert_eq!(budget(10, 20, 100, false).unwrap(), 20);
        let err = budget(90, 20, 100, false).unwrap_err().to_string();
        assert!(err.contains("90") && err.contains("20") && err.contains("100"), "{err}");
        assert_eq!(budget(90, 20, 100, true).unwrap(), 10);
        assert!(budget(100, 20, 100, true).is_err(), "no room at all");
        assert!(budget(0, 1, 100, false).is_err());
    }

    #[test]
    fn stop_strings_cut_output_even_across_deltas() {
        let mut scanner = StopScanner { stops: vec!["END".into()], text: String::new(), emitted: 0 };
        let (a, hit) = scanner.push("hello E");
        assert!(!hit);
        let (b, hit) = scanner.push("NDmore");
        assert!(hit);
        assert_eq!(format!("{a}{b}"), "hello ");
    }

    #[test]
    fn no_stop_strings_emit_everything_at_once() {
        let mut scanner = StopScanner { stops: vec![], text: String::new(), emitted: 0 };
        assert_eq!(scanner.push("héllo").0, "héllo");
        assert_eq!(scanner.finish(), "");
    }
}
