//! Continuous batching: one scheduler thread per chat model runs every
//! admitted sequence together. Each step is one forward over a ragged
//! batch (the decoding sequences' next tokens plus at most one prefill
//! chunk), so the weights are read once per step for all of them; new
//! requests join between steps and finished or abandoned ones leave,
//! freeing their KV cache. Requests beyond the batch wait in a bounded
//! queue; beyond that they are refused with a retry hint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};

use candle_core::Device;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::WorkerError;
use crate::models::ChatModel;
use crate::sampling::{Sampler, SamplingParams, Scored, logprobs};
use crate::tokenizer::Utf8Stream;
use crate::transformer::{KvCache, Segment};

/// Prompt tokens prefilled per step: long prompts go in chunks so running
/// streams keep getting tokens while they are read.
pub const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Choices generated from one prefill of the prompt.
    pub n: usize,
    /// `Some(k)`: report each token's log-probability and its `k` likeliest
    /// alternatives.
    pub logprobs: Option<usize>,
    /// Keep generating through end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: 16,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            n: 1,
            logprobs: None,
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub chosen: Scored,
    pub top: Vec<Scored>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text for choice `index`, always whole UTF-8 characters; `token_ids`
    /// (and `logprobs`, when asked for) are the tokens it came from.
    Delta {
        index: usize,
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: Finish,
        native_reason: String,
        completion_tokens: usize,
    },
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

/// Holds back text that could be the start of a stop string, and cuts the
/// output at the first stop string.
#[derive(Debug, Clone, Default)]
struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    fn new(stops: &[String]) -> StopScanner {
        StopScanner { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), ..StopScanner::default() }
    }

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

/// One output sequence: its cache, sampler and the text it has produced.
struct Choice {
    index: usize,
    cache: KvCache,
    sampler: Sampler,
    stops: StopScanner,
    utf8: Utf8Stream,
    generated: usize,
    pending_ids: Vec<u32>,
    pending_logprobs: Vec<TokenLogprob>,
    /// The token to feed next.
    last: u32,
    done: bool,
}

impl Choice {
    fn new(index: usize, cache: KvCache, sampler: Sampler, params: &GenerationParams) -> Choice {
        Choice {
            index,
            cache,
            sampler,
            stops: StopScanner::new(&params.stop),
            utf8: Utf8Stream::default(),
            generated: 0,
            pending_ids: Vec::new(),
            pending_logprobs: Vec::new(),
            last: 0,
            done: false,
        }
    }

    fn delta(&mut self, text: String) -> Event {
        Event::Delta {
            index: self.index,
            text,
            token_ids: std::mem::take(&mut self.pending_ids),
            logprobs: std::mem::take(&mut self.pending_logprobs),
        }
    }

    /// Everything held back, as a last delta (if any) and the finish.
    fn finish(&mut self, reason: Finish, native_reason: String, events: &mut Vec<Event>) {
        let tail = self.stops.push(&self.utf8.finish()).0 + &self.stops.finish();
        if !tail.is_empty() || !self.pending_ids.is_empty() {
            events.push(self.delta(tail));
        }
        events.push(Event::Finished { index: self.index, reason, native_reason, completion_tokens: self.generated });
        self.done = true;
    }

    /// Samples the next token from this choice's logits and turns it into
    /// events.
    fn advance(&mut self, logits: &mut [f32], model: &ChatModel, params: &GenerationParams) -> Vec<Event> {
        let (next, logprob) = pick(&mut self.sampler, logits, params.logprobs);
        self.accept(next, logprob, model, params)
    }

    /// Turns the token sampled for this choice into events.
    fn accept(
        &mut self,
        next: u32,
        logprob: Option<TokenLogprob>,
        model: &ChatModel,
        params: &GenerationParams,
    ) -> Vec<Event> {
        self.generated += 1;
        let mut events = Vec::new();
        if !params.ignore_eos && model.tokenizer.end_of_generation().contains(&next) {
            self.pending_logprobs.extend(logprob);
            let native = model.tokenizer.decode_special(next);
            self.finish(Finish::Stop, native, &mut events);
            return events;
        }
        self.pending_ids.push(next);
        self.pending_logprobs.extend(logprob);
        let (text, hit_stop) = self.stops.push(&self.utf8.push(&model.tokenizer.token_bytes(next)));
        if !text.is_empty() || hit_stop {
            events.push(self.delta(text));
        }
        if hit_stop {
            events.push(Event::Finished {
                index: self.index,
                reason: Finish::Stop,
                native_reason: "stop_sequence".into(),
                completion_tokens: self.generated,
            });
            self.done = true;
        } else if self.generated >= params.max_tokens {
            self.finish(Finish::Length, "length".into(), &mut events);
        }
        self.last = next;
        events
    }
}

/// The next token from `logits`, with its log-probability and `top`
/// alternatives when asked for (computed before sampling adjusts them).
fn pick(sampler: &mut Sampler, logits: &mut [f32], top: Option<usize>) -> (u32, Option<TokenLogprob>) {
    let raw = top.map(|top| (logits.to_vec(), top));
    let next = sampler.sample(logits);
    let logprob = raw.map(|(raw, top)| {
        let (chosen, top) = logprobs(&raw, next, top);
        TokenLogprob { chosen, top }
    });
    (next, logprob)
}

/// [`pick`] for every decoding choice at once, across the thread pool:
/// a pass over 262,144 logits (and the exponentials of a temperature
/// draw) per sequence would otherwise run on this thread alone while the
/// pool waits. `rows` holds their logits in the order of `choices`.
fn pick_all(choices: Vec<(&mut Sampler, Option<usize>)>, rows: &mut [f32]) -> Vec<(u32, Option<TokenLogprob>)> {
    if choices.is_empty() {
        return Vec::new();
    }
    let vocab = rows.len() / choices.len();
    let work: Vec<_> = choices
        .into_iter()
        .zip(rows.chunks_exact_mut(vocab))
        .map(|((sampler, top), logits)| std::sync::Mutex::new((sampler, logits, top, None)))
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(work.len(), |range| {
        for item in &work[range] {
            let mut item = item.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (sampler, logits, top, picked) = &mut *item;
            *picked = Some(pick(sampler, logits, *top));
        }
    });
    work.into_iter().filter_map(|item| item.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner).3).collect()
}

pub type EventSender = UnboundedSender<Result<Event, WorkerError>>;

/// One admitted request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    pub events: EventSender,
}

enum Phase {
    Prefill { cache: KvCache, done: usize },
    Decode(Vec<Choice>),
}

struct Group {
    job: Job,
    phase: Phase,
}

impl Group {
    fn sequences(&self) -> usize {
        match &self.phase {
            Phase::Prefill { .. } => self.job.params.n.max(1),
            Phase::Decode(choices) => choices.iter().filter(|c| !c.done).count(),
        }
    }

    /// Tokens this group holds in KV caches.
    fn kv_tokens(&self) -> usize {
        match &self.phase {
            Phase::Prefill { cache, .. } => cache.position,
            Phase::Decode(choices) => choices.iter().filter(|c| !c.done).map(|c| c.cache.position).sum(),
        }
    }

    fn finished(&self) -> bool {
        self.job.events.is_closed() || matches!(&self.phase, Phase::Decode(choices) if choices.iter().all(|c| c.done))
    }

    fn send(&self, events: Vec<Event>) {
        for event in events {
            // A closed channel means the caller left; the group is dropped
            // (and its KV freed) after this step.
            let _ = self.job.events.send(Ok(event));
        }
    }
}

/// What the scheduler is doing, for the registry and /health.
#[derive(Debug, Default)]
pub struct Load {
    pub active: AtomicU32,
    pub queued: AtomicU32,
    /// Tokens held in the running sequences' KV caches.
    pub kv_tokens: std::sync::atomic::AtomicU64,
    /// What the batch may hold: every place filled to the context window.
    pub kv_capacity_tokens: std::sync::atomic::AtomicU64,
}

impl Load {
    /// KV room left, in tokens.
    pub fn kv_tokens_free(&self) -> u64 {
        self.kv_capacity_tokens.load(Ordering::Relaxed).saturating_sub(self.kv_tokens.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Sequences decoded together; more requests wait in the queue.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; more are refused.
    pub max_queued: usize,
}

/// The handle requests are submitted through.
pub struct Batcher {
    queue: SyncSender<Job>,
    load: Arc<Load>,
}

impl Batcher {
    /// Starts the scheduler thread for `model`; it stops when the last
    /// handle is dropped.
    pub fn start(model: Arc<ChatModel>, limits: BatchLimits, load: Arc<Load>) -> Batcher {
        let (queue, jobs) = std::sync::mpsc::sync_channel(limits.max_queued.max(1));
        let thread_load = load.clone();
        let capacity = limits.max_batch.max(1).saturating_mul(model.context_length());
        load.kv_capacity_tokens.store(capacity as u64, Ordering::Relaxed);
        let name = format!("batch-{}", model.id);
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn(move || schedule(&model, &jobs, limits.max_batch.max(1), &thread_load));
        if let Err(err) = spawned {
            tracing::error!(error = %err, "cannot start the batch scheduler");
        }
        Batcher { queue, load }
    }

    /// Queues `job`, or refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), WorkerError> {
        self.load.queued.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(refused) => {
                self.load.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match refused {
                    TrySendError::Full(_) => WorkerError::Overloaded,
                    TrySendError::Disconnected(_) => WorkerError::ShuttingDown,
                })
            }
        }
    }
}

fn schedule(model: &ChatModel, jobs: &Receiver<Job>, max_batch: usize, load: &Load) {
    let mut groups: Vec<Group> = Vec::new();
    loop {
        while groups.iter().map(Group::sequences).sum::<usize>() < max_batch {
            let job = if groups.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            load.queued.fetch_sub(1, Ordering::Relaxed);
            groups.push(Group { job, phase: Phase::Prefill { cache: model.model.new_cache(), done: 0 } });
        }
        groups.retain(|group| !group.job.events.is_closed());
        load.active.store(groups.iter().map(Group::sequences).sum::<usize>() as u32, Ordering::Relaxed);
        if !groups.is_empty() {
            step(model, &mut groups);
            groups.retain(|group| !group.finished());
        }
        load.active.store(groups.iter().map(Group::sequences).sum::<usize>() as u32, Ordering::Relaxed);
        load.kv_tokens.store(groups.iter().map(Group::kv_tokens).sum::<usize>() as u64, Ordering::Relaxed);
    }
}

/// Which sequence a row of the step's logits belongs to.
enum Slot {
    /// A prefill chunk of group `.0` ending at prompt position `.1`.
    Prefill(usize, usize),
    /// Choice `.1` of group `.0`.
    Decode(usize, usize),
}

fn step(model: &ChatModel, groups: &mut [Group]) {
    // The prefill chunk runs as its own forward: how many rows a matmul
    // gets picks candle's kernel (and its rounding), so a prompt's numbers
    // must depend on its chunking alone, never on who else is decoding.
    let mut prefill = None;
    let mut decode_slots = Vec::new();
    let mut decode_segments = Vec::new();
    // Each decode slot's sampler and logprobs request, in slot order.
    let mut decode_samplers = Vec::new();
    let mut involved = Vec::new();
    for (g, group) in groups.iter_mut().enumerate() {
        match &mut group.phase {
            Phase::Prefill { cache, done } => {
                // One prefill chunk per step keeps decode latency bounded.
                if prefill.is_some() {
                    continue;
                }
                let end = (*done + PREFILL_CHUNK).min(group.job.prompt.len());
                involved.push(g);
                prefill = Some((Slot::Prefill(g, end), Segment { tokens: &group.job.prompt[*done..end], cache }));
            }
            Phase::Decode(choices) => {
                involved.push(g);
                for (c, choice) in choices.iter_mut().enumerate().filter(|(_, c)| !c.done) {
                    decode_segments
                        .push(Segment { tokens: std::slice::from_ref(&choice.last), cache: &mut choice.cache });
                    decode_slots.push(Slot::Decode(g, c));
                    decode_samplers.push((&mut choice.sampler, group.job.params.logprobs));
                }
            }
        }
    }
    let forward = |segments: &mut [Segment<'_>]| -> Result<Vec<f32>, WorkerError> {
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        model.model.forward_batch(segments)
    };
    let mut slots = Vec::new();
    let mut outcome = forward(&mut decode_segments);
    if outcome.is_ok() {
        slots.append(&mut decode_slots);
    }
    drop(decode_segments);
    if let (Ok(rows), Some((slot, segment))) = (&mut outcome, prefill) {
        let mut segments = [segment];
        match forward(&mut segments) {
            Ok(more) => {
                // Exactly: the rows are a MiB each, and doubling the buffer
                // for one more would hold up to a full batch of them twice.
                rows.reserve_exact(more.len());
                rows.extend(more);
                slots.push(slot);
            }
            Err(err) => outcome = Err(err),
        }
    }
    let mut rows = match outcome {
        Ok(rows) => rows,
        Err(err) => {
            // Every sequence in this step may have a half-written cache.
            tracing::error!(error = %err, "batched forward failed");
            let message = err.to_string();
            for g in involved {
                let _ = groups[g].job.events.send(Err(WorkerError::Model(message.clone())));
                groups[g].phase = Phase::Decode(Vec::new());
            }
            return;
        }
    };
    // The output projection's width, which may exceed the tokenizer's.
    let vocab = rows.len() / slots.len().max(1);
    // The decode slots' rows come first.
    let decoding = decode_samplers.len() * vocab;
    let mut picks = pick_all(decode_samplers, &mut rows[..decoding]).into_iter();
    for (slot, logits) in slots.into_iter().zip(rows.chunks_exact_mut(vocab)) {
        match slot {
            Slot::Prefill(g, end) => {
                let group = &mut groups[g];
                let Phase::Prefill { cache, done } = &mut group.phase else { continue };
                *done = end;
                if end < group.job.prompt.len() {
                    continue;
                }
                let params = &group.job.params;
                let first = Sampler::new(params.sampling.clone(), &group.job.prompt);
                let mut choices: Vec<Choice> = (0..params.n.max(1))
                    .map(|index| {
                        let sampler = if index == 0 { first.clone() } else { first.for_choice(index as u64) };
                        Choice::new(index, cache.clone(), sampler, params)
                    })
                    .collect();
                let mut events = Vec::new();
                for choice in &mut choices {
                    events.extend(choice.advance(&mut logits.to_vec(), model, params));
                }
                group.phase = Phase::Decode(choices);
                group.send(events);
            }
            Slot::Decode(g, c) => {
                let group = &mut groups[g];
                let Phase::Decode(choices) = &mut group.phase else { continue };
                let Some((next, logprob)) = picks.next() else { continue };
                let events = choices[c].accept(next, logprob, model, &group.job.params);
                group.send(events);
            }
        }
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
        let mut scanner = StopScanner::new(&["END".into()]);
        let (a, hit) = scanner.push("hello E");
        assert!(!hit);
        let (b, hit) = scanner.push("NDmore");
        assert!(hit);
        assert_eq!(format!("{a}{b}"), "hello ");
    }

    #[test]
    fn no_stop_strings_emit_everything_at_once() {
        let mut scanner = StopScanner::new(&[]);
        assert_eq!(scanner.push("héllo").0, "héllo");
        assert_eq!(scanner.finish(), "");
    }
}
