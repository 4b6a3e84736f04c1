//! Turning one sequence's logits into its next token: logit bias, the
//! repetition/frequency/presence penalties, then temperature with top-k,
//! top-p and min-p, drawn from the sequence's own seeded generator (so a
//! seed reproduces its output whatever else shares the batch).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 0 means off: tokens less likely than `min_p` times the likeliest go.
    pub min_p: f32,
    pub seed: u64,
    /// OpenAI's: per generated occurrence, and once per generated token.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// vLLM/HF's multiplicative penalty over prompt and output; 1 means off.
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 1e-6
    }
}

/// One candidate token with its log-probability under the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub id: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Generated tokens and how often each came.
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt, for the repetition penalty.
    prompt: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Sampler {
        let rng = StdRng::seed_from_u64(params.seed);
        let mut prompt = if params.repetition_penalty != 1.0 { prompt.to_vec() } else { Vec::new() };
        prompt.sort_unstable();
        prompt.dedup();
        Sampler { params, rng, generated: HashMap::new(), prompt }
    }

    /// The same sampler for choice `index` of `n`: its own stream of
    /// random numbers, still fixed by the request's seed.
    pub fn for_choice(&self, index: u64) -> Sampler {
        let mut sampler = self.clone();
        sampler.rng = StdRng::seed_from_u64(self.params.seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        sampler
    }

    /// Picks the next token from `logits` and records it as generated.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.adjust(logits);
        let next = if self.params.is_greedy() { argmax(logits) } else { self.draw(logits) };
        *self.generated.entry(next).or_insert(0) += 1;
        next
    }

    fn adjust(&self, logits: &mut [f32]) {
        for &(id, bias) in &self.params.logit_bias {
            if let Some(value) = logits.get_mut(id as usize) {
                *value += bias;
            }
        }
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            let seen = self
                .prompt
                .iter()
                .copied()
                .chain(self.generated.keys().copied().filter(|id| self.prompt.binary_search(id).is_err()));
            for id in seen {
                if let Some(value) = logits.get_mut(id as usize) {
                    *value = if *value > 0.0 { *value / penalty } else { *value * penalty };
                }
            }
        }
        let (frequency, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        if frequency != 0.0 || presence != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(value) = logits.get_mut(id as usize) {
                    *value -= frequency * count as f32 + presence;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let params = &self.params;
        let inv_t = 1.0 / params.temperature;
        let max = max_of(logits);
        // Unnormalised probabilities (the likeliest token's is exp(0) = 1),
        // 0 for the tokens min_p rules out.
        let weights: Vec<f32> = logits
            .iter()
            .map(|logit| {
                let p = exp_nonpositive((logit - max) * inv_t);
                if p >= params.min_p { p } else { 0.0 }
            })
            .collect();
        let listed = |floor: f32| -> Vec<(u32, f32)> {
            let above = weights.iter().enumerate().filter(|(_, p)| **p > 0.0 && **p >= floor);
            above.map(|(id, p)| (id as u32, *p)).collect()
        };
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let chosen = if params.top_k > 0 {
            let mut candidates = listed(0.0);
            if params.top_k < candidates.len() {
                candidates.select_nth_unstable_by(params.top_k - 1, by_weight);
                candidates.truncate(params.top_k);
            }
            if params.top_p < 1.0 {
                let total = candidates.iter().map(|c| c.1).sum::<f32>();
                let keep = nucleus(&mut candidates, params.top_p * total, by_weight);
                candidates.truncate(keep);
            }
            self.choose(&candidates)
        } else if params.top_p < 1.0 {
            let total = sum_of(&weights);
            // Tokens below this weigh less than 1 - top_p of the total even
            // all together, so the nucleus lies above them: only those
            // above are listed.
            let mut candidates = listed((1.0 - params.top_p) * total / weights.len() as f32);
            let keep = nucleus(&mut candidates, params.top_p * total, by_weight);
            candidates.truncate(keep);
            self.choose(&candidates)
        } else {
            self.choose_in_order(&weights)
        };
        chosen.unwrap_or_else(|| argmax(logits))
    }

    /// One of `candidates` drawn in proportion to its weight; `None` when
    /// none has any.
    fn choose(&mut self, candidates: &[(u32, f32)]) -> Option<u32> {
        let target = self.rng.random::<f32>() * candidates.iter().map(|c| c.1).sum::<f32>();
        match first_to_exceed(candidates.iter().map(|c| c.1), target) {
            Some(at) => Some(candidates[at].0),
            None => candidates.iter().rfind(|c| c.1 > 0.0).map(|c| c.0),
        }
    }

    /// [`Sampler::choose`] among every token, `weights` in id order: a
    /// block of 256 is walked only where the draw falls.
    fn choose_in_order(&mut self, weights: &[f32]) -> Option<u32> {
        const BLOCK: usize = 256;
        let mut target = self.rng.random::<f32>() * sum_of(weights);
        for (b, block) in weights.chunks(BLOCK).enumerate() {
            let mass = sum_of(block);
            // Rounding may leave the draw just short inside the block; it
            // then goes on to the next token with any weight.
            if target < mass
                && let Some(at) = first_to_exceed(block.iter().copied(), target)
            {
                return Some((b * BLOCK + at) as u32);
            }
            target -= mass;
        }
        weights.iter().rposition(|p| *p > 0.0).map(|id| id as u32)
    }
}

/// Where `weights` (walked in order, subtracting each) first exceed `target`.
fn first_to_exceed(weights: impl Iterator<Item = f32>, mut target: f32) -> Option<usize> {
    for (at, weight) in weights.enumerate().filter(|(_, w)| *w > 0.0) {
        if target < weight {
            return Some(at);
        }
        target -= weight;
    }
    None
}

/// The sum over 16 lanes, a form that vectorizes.
fn sum_of(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` for `x ≤ 0` within a couple of ulp (Cephes' `expf` polynomial),
/// and 0 below -87 (where f32 turns subnormal) or for NaN. Branch-free so
/// it vectorizes: a libm `expf` call per logit was ~2.6 ms a token, the
/// largest cost of a temperature draw over 262,144 logits.
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 × 2^23: adding it rounds to an integer
    let finite = x >= -87.0;
    let x = if finite { x } else { 0.0 };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let mantissa = p * r * r + r + 1.0;
    // 2^n from n's integer, held in the low bits of `shifted`.
    let exponent = shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    if finite { mantissa * f32::from_bits(exponent) } else { 0.0 }
}

/// How many of the likeliest `candidates` first reach `mass`, with those
/// moved to the front in order (all of them if none do). Sorting all
/// 262,144 of Gemma's candidates took ~19 ms a token, and a nucleus is
/// usually far smaller: the likeliest 256 are selected first and only they
/// are sorted, the selection widening until it holds the nucleus.
fn nucleus(
    candidates: &mut [(u32, f32)],
    mass: f32,
    by_weight: impl Fn(&(u32, f32), &(u32, f32)) -> std::cmp::Ordering + Copy,
) -> usize {
    let mut selected = 256.min(candidates.len());
    loop {
        if selected < candidates.len() {
            candidates.select_nth_unstable_by(selected - 1, by_weight);
        }
        candidates[..selected].sort_unstable_by(by_weight);
        let mut kept = 0.0;
        for (i, candidate) in candidates[..selected].iter().enumerate() {
            kept += candidate.1;
            if kept >= mass {
                return i + 1;
            }
        }
        if selected == candidates.len() {
            return selected;
        }
        selected = (selected * 8).min(candidates.len());
    }
}

/// The first index of the largest value: the lowest id wins a tie, as a
/// scan from the front would.
pub fn argmax(values: &[f32]) -> u32 {
    let max = max_of(values);
    values.iter().position(|v| *v == max).unwrap_or(0) as u32
}

/// The largest value, NaN ignored; max over 16 lanes, a form that vectorizes.
fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = if *v > *lane { *v } else { *lane };
        }
    }
    lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |a, v| if *v > a { *v } else { a })
}

/// The log-probability of `chosen` under the model's raw logits, with the
/// `top` likeliest alternatives, likeliest first.
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (Scored, Vec<Scored>) {
    let max = max_of(logits);
    let log_total = logits.iter().map(|l| exp_nonpositive(l - max)).sum::<f32>().ln() + max;
    let scored = |id: u32| Scored { id, logprob: logits[id as usize] - log_total };
    let mut alternatives = Vec::new();
    if top > 0 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let top = top.min(ids.len());
        if top < ids.len() {
            ids.select_nth_unstable_by(top - 1, order);
            ids.truncate(top);
        }
        ids.sort_unstable_by(order);
        alternatives = ids.into_iter().map(scored).collect();
    }
    (scored(chosen), alternatives)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_softmax_and_stay_in_the_nucleus() {
        // 1,000 tokens (blocks of 256 walked in order), four likely ones.
        let mut logits = vec![-12.0f32; 1000];
        let likely = [(3, 2.0), (777, 1.5), (300, 1.0), (999, 0.5)];
        for (id, logit) in likely {
            logits[id] = logit;
        }
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        // top_p 0.8 keeps the first three (0.455 + 0.276 + 0.167 of the mass).
        for (top_p, kept) in [(1.0, 4), (0.8, 3)] {
            let mut sampler = Sampler::new(SamplingParams { top_p, ..params(1.0) }, &[]);
            let mut counts = HashMap::new();
            let draws = 20_000;
            for _ in 0..draws {
                *counts.entry(sampler.sample(&mut logits.clone())).or_insert(0) += 1;
            }
            let nucleus: f32 = likely[..kept].iter().map(|(_, l)| l.exp() / z).sum();
            let tail = if kept == 4 { 1.0 - nucleus } else { 0.0 };
            for (id, logit) in &likely[..kept] {
                let expected = logit.exp() / z / (nucleus + tail);
                let seen = *counts.get(&(*id as u32)).unwrap_or(&0) as f32 / draws as f32;
                assert!((seen - expected).abs() < 0.015, "top_p {top_p}, token {id}: {seen} vs {expected}");
            }
            let outside =
                draws - likely[..kept].iter().map(|(id, _)| counts.get(&(*id as u32)).unwrap_or(&0)).sum::<i32>();
            assert!(outside as f32 / draws as f32 <= tail + 0.002, "top_p {top_p}: {outside} draws outside");
        }
    }

    #[test]
    fn the_nucleus_is_the_prefix_a_full_sort_gives() {
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Ties (weights repeat every 97 ids) and a long tail.
        let weights: Vec<(u32, f32)> =
            (0..5000u32).map(|id| (id, exp_nonpositive(-((id * 7919 % 97) as f32) * 0.37))).collect();
        let total: f32 = weights.iter().map(|c| c.1).sum();
        for top_p in [0.01, 0.3, 0.9, 0.999, 1.5] {
            let mut sorted = weights.clone();
            sorted.sort_by(by_weight);
            let mut kept = 0.0;
            let keep = sorted.iter().position(|c| {
                kept += c.1;
                kept >= top_p * total
            });
            let expected = &sorted[..keep.map_or(sorted.len(), |i| i + 1)];
            let mut candidates = weights.clone();
            let keep = nucleus(&mut candidates, top_p * total, by_weight);
            assert_eq!(&candidates[..keep], expected, "top_p {top_p}");
        }
    }

    #[test]
    fn exp_nonpositive_matches_libm_and_drops_what_underflows() {
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            assert!((ours - libm).abs() <= 3.0 * f32::EPSILON * libm, "{x}: {ours} vs {libm}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        for x in [-87.01, -1e4, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(exp_nonpositive(x), 0.0, "{x}");
        }
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: 7, ..SamplingParams::default() }
    }

    #[test]
    fn greedy_takes_the_largest_logit_after_bias() {
        let mut sampler = Sampler::new(SamplingParams { logit_bias: vec![(0, 10.0)], ..params(0.0) }, &[]);
        assert_eq!(sampler.sample(&mut [1.0, 3.0, 2.0]), 0);
        let mut plain = Sampler::new(params(0.0), &[]);
        assert_eq!(plain.sample(&mut [1.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima_in_lanes_and_tail() {
        let mut values = vec![0.0f32; 53];
        assert_eq!(argmax(&values), 0);
        values[7] = 2.0;
        values[39] = 2.0;
        assert_eq!(argmax(&values), 7);
        values[51] = 3.0;
        assert_eq!(argmax(&values), 51, "the tail beyond the last 16 counts");
        assert_eq!(argmax(&[-5.0, -1.0, -1.0]), 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut sampler = Sampler::new(SamplingParams { seed, ..params(1.0) }, &[]);
            (0..20).map(|_| sampler.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -1.0];
        for p in [SamplingParams { top_k: 1, ..params(5.0) }, SamplingParams { top_p: 0.01, ..params(5.0) }] {
            let mut sampler = Sampler::new(p, &[]);
            assert!((0..50).all(|_| sampler.sample(&mut logits.clone()) == 1));
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // exp(-3) ≈ 0.05 < 0.1: only the first two survive.
        let logits = [3.0, 2.9, 0.0, 0.0, 0.0];
        let mut sampler = Sampler::new(SamplingParams { min_p: 0.1, ..params(1.0) }, &[]);
        assert!((0..200).all(|_| sampler.sample(&mut logits.clone()) < 2));
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut sampler = Sampler::new(SamplingParams { frequency_penalty: 2.0, ..params(0.0) }, &[]);
        assert_eq!(sampler.sample(&mut [1.0, 0.5]), 0);
        // 1.0 - 2.0 < 0.5 now.
        assert_eq!(sampler.sample(&mut [1.0, 0.5]), 1);
        let mut repetition = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..params(0.0) }, &[0]);
        let mut logits = [1.0, 0.6];
        assert_eq!(repetition.sample(&mut logits), 1);
        assert_eq!(logits[0], 0.5);
    }

    #[test]
    fn logprobs_are_normalised_and_ordered() {
        let logits = [1.0, 3.0, 2.0];
        let (chosen, top) = logprobs(&logits, 2, 2);
        let log_total = 2.0 - chosen.logprob;
        let total: f32 = logits.iter().map(|l| (l - log_total).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(top.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(top[1], chosen);
    }
}
