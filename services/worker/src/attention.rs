//! One sequence's attention over its own KV cache, on host memory.
//!
//! The cache is a growable buffer per layer: a decode step appends one
//! entry and reads the rest in place. Keeping it as candle tensors meant
//! `Tensor::cat` copied every layer's whole cache on every step, and the
//! key transpose copied it again: with 8 streams at a few hundred tokens,
//! ~100 MB of copying per step, more than the attention itself.
//!
//! A decode step (one query) needs no mask: the cache is trimmed to what
//! that query sees first, and the scores, softmax and weighted sum run
//! straight over the buffer. A prefill chunk (many queries) runs as
//! batched matmuls with an additive mask.

// SIMD intrinsics need `unsafe`; it is confined to `score_tile` and `weighted_sum`
// and their AVX-512 and AVX2 kernels.
#![allow(unsafe_code)]

use candle_core::{DType, Device, Tensor};
use half::f16;

/// Rotary tables for one segment's positions: `cos` and `sin`, each
/// `[tokens][head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    /// Tables for positions `[start, start + len)`, with each pair's angle
    /// the previous one times the scale, in ggml's order.
    pub fn new(head_dim: usize, base: f32, start: usize, len: usize) -> Rope {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        let theta_scale = base.powf(-2.0 / head_dim as f32);
        for p in start..start + len {
            let mut theta = p as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Rope { cos, sin }
    }

    /// Rotates `x` (`[tokens][heads][head_dim]`) in place: pairs `(i, i +
    /// head_dim/2)` (NEOX, Gemma/Qwen) or `(2i, 2i+1)` (`interleaved`,
    /// Llama). The expressions are candle's rope kernels', so the rounding is too.
    pub fn rotate(&self, x: &mut [f32], head_dim: usize, interleaved: bool) {
        let half = head_dim / 2;
        let tokens = self.cos.len() / half;
        let per_token = x.len() / tokens;
        for (t, token) in x.chunks_exact_mut(per_token).enumerate() {
            let (cos, sin) = (&self.cos[t * half..(t + 1) * half], &self.sin[t * half..(t + 1) * half]);
            for head in token.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (x1, x2) = (head[a], head[b]);
                    head[a] = x1 * cos[i] - x2 * sin[i];
                    head[b] = x1 * sin[i] + x2 * cos[i];
                }
            }
        }
    }
}

/// Positions per key tile.
const TILE: usize = 16;

/// One layer's keys and values for one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Keys in tiles of 16 positions, each `[kv_heads][head_dim][16]`: a
    /// decode step scores 16 keys per vector, each lane summing its key's
    /// products in order. That is the order of the matmul prefill uses,
    /// and greedy agreement with llama.cpp turned out to depend on it.
    /// Stored as f16, as llama.cpp's default KV cache: half the memory and
    /// half the bytes a decode step reads, and the numbers are the same
    /// (they are rounded to f16 before they are stored either way).
    key_tiles: Vec<f16>,
    /// `[entries][kv_heads * head_dim]`.
    values: Vec<f16>,
    /// Entries in the buffers, the dead ones included.
    entries: usize,
    /// Entries before this index have left the window; whole tiles of them
    /// are dropped once they are a quarter of the buffer, so trimming is
    /// O(1) amortised and a sliding layer holds at most 4/3 of its window.
    dead: usize,
    /// Absolute position of the first live entry.
    start: usize,
}

impl LayerCache {
    fn len(&self) -> usize {
        self.entries - self.dead
    }

    fn push(&mut self, key: &[f32], value: &[f32]) {
        let width = key.len();
        let lane = self.entries % TILE;
        if lane == 0 {
            grow_for(&mut self.key_tiles, width * TILE);
            self.key_tiles.resize(self.key_tiles.len() + width * TILE, f16::ZERO);
        }
        let tile = self.key_tiles.len() - width * TILE;
        for (i, k) in key.iter().enumerate() {
            self.key_tiles[tile + i * TILE + lane] = f16::from_f32(*k);
        }
        grow_for(&mut self.values, width);
        self.values.extend(value.iter().map(|v| f16::from_f32(*v)));
        self.entries += 1;
    }

    /// Live keys as `[len][kv_heads * head_dim]`.
    fn keys(&self, width: usize) -> Vec<f32> {
        let mut keys = Vec::with_capacity(self.len() * width);
        for entry in self.dead..self.entries {
            let (tile, lane) = (entry / TILE, entry % TILE);
            keys.extend((0..width).map(|i| self.key_tiles[(tile * width + i) * TILE + lane].to_f32()));
        }
        keys
    }

    /// Live values as `[len][kv_heads * head_dim]`.
    fn values(&self, width: usize) -> Vec<f32> {
        self.values[self.dead * width..].iter().map(|v| v.to_f32()).collect()
    }

    /// Drops the entries before absolute position `keep_from`.
    fn trim_to(&mut self, keep_from: usize, width: usize) {
        if keep_from <= self.start {
            return;
        }
        let drop = (keep_from - self.start).min(self.len());
        self.dead += drop;
        self.start += drop;
        let dead_tiles = self.dead / TILE;
        if dead_tiles > 0 && self.dead * 4 >= self.entries {
            self.key_tiles.drain(..dead_tiles * TILE * width);
            self.values.drain(..dead_tiles * TILE * width);
            self.entries -= dead_tiles * TILE;
            self.dead -= dead_tiles * TILE;
        }
    }
}

/// Makes room for `additional` more values, growing by a quarter of what
/// is there (at least what is asked) instead of `Vec`'s doubling: the
/// caches are most of a busy worker's memory beside the weights, and
/// doubling left up to half of each one allocated and unused.
fn grow_for(buffer: &mut Vec<f16>, additional: usize) {
    if buffer.capacity() - buffer.len() < additional {
        buffer.reserve_exact(additional.max(buffer.len() / 4));
    }
}

/// Shape of a model's attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rotary pairs `(2i, 2i+1)` instead of `(i, i + head_dim/2)`.
    pub interleaved_rope: bool,
}

/// One sequence's new tokens at one layer.
pub struct Step<'a> {
    /// `[seq][heads][head_dim]`, before rotation.
    pub q: &'a [f32],
    /// `[seq][kv_heads][head_dim]`, before rotation.
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub rope: &'a Rope,
    /// Absolute position of the first new token.
    pub position: usize,
    /// Sliding-window layers: how many positions a query sees, itself included.
    pub window: Option<usize>,
}

impl Heads {
    /// Appends the step's keys and values to `cache` and returns the
    /// attention output `[seq][heads * head_dim]`.
    pub fn attend(
        &self,
        step: Step<'_>,
        cache: &mut Option<LayerCache>,
        device: &Device,
    ) -> candle_core::Result<Vec<f32>> {
        let width = self.kv_heads * self.head_dim;
        let seq = step.k.len() / width;
        let mut q = step.q.to_vec();
        step.rope.rotate(&mut q, self.head_dim, self.interleaved_rope);
        let mut k = step.k.to_vec();
        step.rope.rotate(&mut k, self.head_dim, self.interleaved_rope);
        let cache = cache.get_or_insert_with(|| LayerCache { start: step.position, ..LayerCache::default() });
        for (key, value) in k.chunks_exact(width).zip(step.v.chunks_exact(width)) {
            cache.push(key, value);
        }
        // What the first query can see; later queries see no further back.
        if let Some(window) = step.window {
            cache.trim_to((step.position + 1).saturating_sub(window), width);
        }
        let out = if seq == 1 {
            self.decode(&q, cache)
        } else {
            self.prefill(&q, seq, step.position, step.window, cache, device)?
        };
        if let Some(window) = step.window {
            cache.trim_to((step.position + seq).saturating_sub(window), width);
        }
        Ok(out)
    }

    /// One query over every live entry (all of them visible to it).
    fn decode(&self, q: &[f32], cache: &LayerCache) -> Vec<f32> {
        let (dim, width) = (self.head_dim, self.kv_heads * self.head_dim);
        let values = &cache.values[cache.dead * width..];
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (dim as f32).sqrt();
        let (first_tile, last_tile) = (cache.dead / TILE, cache.entries.div_ceil(TILE));
        let skip = cache.dead % TILE;
        let mut out = vec![0f32; self.heads * dim];
        // `[group][tiles * 16]`: the scores of this KV head's query heads.
        let mut tile_scores = vec![0f32; group * (last_tile - first_tile) * TILE];
        for kv_head in 0..self.kv_heads {
            let queries = &q[kv_head * group * dim..(kv_head + 1) * group * dim];
            for (t, tile) in (first_tile..last_tile).enumerate() {
                let keys = &cache.key_tiles[(tile * width + kv_head * dim) * TILE..][..dim * TILE];
                score_tile(queries, keys, &mut tile_scores, t * TILE);
            }
            let per_head = tile_scores.len() / group;
            for (in_group, scores) in tile_scores.chunks_exact_mut(per_head).enumerate() {
                let scores = &mut scores[skip..skip + cache.len()];
                scores.iter_mut().for_each(|score| *score *= scale);
                softmax(scores);
                let out = &mut out[(kv_head * group + in_group) * dim..][..dim];
                weighted_sum(scores, &values[kv_head * dim..], width, out);
            }
        }
        out
    }

    /// Many queries: batched matmuls with a causal (and sliding) mask.
    fn prefill(
        &self,
        q: &[f32],
        seq: usize,
        position: usize,
        window: Option<usize>,
        cache: &LayerCache,
        device: &Device,
    ) -> candle_core::Result<Vec<f32>> {
        let (heads, kv_heads, dim) = (self.heads, self.kv_heads, self.head_dim);
        let width = kv_heads * dim;
        let (keys, values) = (cache.keys(width), cache.values(width));
        let kv_len = cache.len();
        let group = heads / kv_heads;
        // Grouped-query attention without copying K/V per head: the query
        // heads of each KV head are folded into the row dimension.
        let q = Tensor::from_slice(q, (seq, heads, dim), device)?.transpose(0, 1)?.contiguous()?.reshape((
            kv_heads,
            group * seq,
            dim,
        ))?;
        let per_head = |x: &[f32]| Tensor::from_slice(x, (kv_len, kv_heads, dim), device)?.transpose(0, 1);
        let keys_t = per_head(&keys)?.transpose(1, 2)?.contiguous()?;
        let values = per_head(&values)?.contiguous()?;
        let scale = 1.0 / (dim as f64).sqrt();
        let scores = (q.matmul(&keys_t)? * scale)?;
        let mask = attention_mask(seq, position, cache.start, kv_len, window, group, device)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let out = probs.matmul(&values)?.reshape((heads, seq, dim))?.transpose(0, 1)?;
        out.flatten_all()?.to_vec1::<f32>()
    }
}

/// Additive mask `[group * seq, kv_len]`: query `i` (absolute position
/// `position + i`) sees key `j` (absolute `start + j`) when the key is not
/// in its future and, for sliding layers, `query - key < window`.
fn attention_mask(
    seq: usize,
    position: usize,
    start: usize,
    kv_len: usize,
    window: Option<usize>,
    group: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut mask = Vec::with_capacity(group * seq * kv_len);
    for _ in 0..group {
        for i in 0..seq {
            let query = position + i;
            for j in 0..kv_len {
                let key = start + j;
                let visible = key <= query && window.is_none_or(|w| query - key < w);
                mask.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(mask, (group * seq, kv_len), device)?.to_dtype(DType::F32)
}

fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        sum += *score;
    }
    scores.iter_mut().for_each(|score| *score /= sum);
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernels' AVX2 variants, for CPUs without AVX-512: the same fused
/// multiply-add chains, 8 lanes at a time, so the same bits.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Scores of 16 keys (`keys`: `[head_dim][16]`) against each query in
/// `queries` (`[n][head_dim]`), into `scores[query][at..at + 16]`
/// (`scores` holds the same number of values per query). Each lane is a
/// chain of fused multiply-adds in dimension order.
fn score_tile(queries: &[f32], keys: &[f16], scores: &mut [f32], at: usize) {
    let dim = keys.len() / TILE;
    let per_query = scores.len() / (queries.len() / dim);
    #[cfg(target_arch = "x86_64")]
    if avx512() || avx2() {
        let wide = avx512();
        for (n, query) in queries.chunks(4 * dim).enumerate() {
            let mut sums = [[0f32; TILE]; 4];
            // SAFETY: the CPU has the kernel's features; `keys` holds `dim` rows of 16.
            unsafe {
                if wide { score_tile_avx512(query, keys, &mut sums) } else { score_tile_avx2(query, keys, &mut sums) }
            };
            for (i, sum) in sums.iter().take(query.len() / dim).enumerate() {
                scores[(n * 4 + i) * per_query + at..][..TILE].copy_from_slice(sum);
            }
        }
        return;
    }
    for (i, query) in queries.chunks_exact(dim).enumerate() {
        for lane in 0..TILE {
            let sum = query.iter().enumerate().fold(0f32, |acc, (d, q)| q.mul_add(keys[d * TILE + lane].to_f32(), acc));
            scores[i * per_query + at + lane] = sum;
        }
    }
}

/// Up to 4 queries at once, so their chains overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn score_tile_avx512(queries: &[f32], keys: &[f16], sums: &mut [[f32; TILE]; 4]) {
    use std::arch::x86_64::*;
    let dim = keys.len() / TILE;
    let n = queries.len() / dim;
    // SAFETY: loads stay below `dim * 16` in `keys` and `n * dim` in `queries`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 4];
        for d in 0..dim {
            let row = _mm512_cvtph_ps(_mm256_loadu_si256(keys.as_ptr().add(d * TILE).cast()));
            for (i, acc) in acc.iter_mut().enumerate().take(n) {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*queries.get_unchecked(i * dim + d)), row, *acc);
            }
        }
        for (sum, acc) in sums.iter_mut().zip(acc).take(n) {
            _mm512_storeu_ps(sum.as_mut_ptr(), acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn score_tile_avx2(queries: &[f32], keys: &[f16], sums: &mut [[f32; TILE]; 4]) {
    use std::arch::x86_64::*;
    let dim = keys.len() / TILE;
    let n = queries.len() / dim;
    // SAFETY: loads stay below `dim * 16` in `keys` and `n * dim` in `queries`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for d in 0..dim {
            let row = keys.as_ptr().add(d * TILE);
            let low = _mm256_cvtph_ps(_mm_loadu_si128(row.cast()));
            let high = _mm256_cvtph_ps(_mm_loadu_si128(row.add(8).cast()));
            for (i, acc) in acc.iter_mut().enumerate().take(n) {
                let q = _mm256_set1_ps(*queries.get_unchecked(i * dim + d));
                acc[0] = _mm256_fmadd_ps(q, low, acc[0]);
                acc[1] = _mm256_fmadd_ps(q, high, acc[1]);
            }
        }
        for (sum, acc) in sums.iter_mut().zip(acc).take(n) {
            _mm256_storeu_ps(sum.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(sum.as_mut_ptr().add(8), acc[1]);
        }
    }
}

/// `out[d] = Σ_j probs[j] · values[j * stride + d]`, each element a chain
/// of fused multiply-adds in `j` order (the order of candle's matmul in the
/// prefill path).
fn weighted_sum(probs: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() && out.len().is_multiple_of(128) {
        // SAFETY: the CPU has AVX-512F; row `j` of `values` holds `out.len()`
        // values from `j * stride` for every `j < probs.len()`.
        return unsafe { weighted_sum_avx512(probs, values, stride, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() && out.len().is_multiple_of(64) {
        // SAFETY: as above, with AVX2, FMA and F16C.
        return unsafe { weighted_sum_avx2(probs, values, stride, out) };
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, p) in probs.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&values[j * stride..]) {
            *o = p.mul_add(v.to_f32(), *o);
        }
    }
}

/// 128 outputs at a time held in registers across all the rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_avx512(probs: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(probs.is_empty() || (probs.len() - 1) * stride + out.len() <= values.len());
    // SAFETY: checked above: every row read stays inside `values`.
    unsafe {
        for start in (0..out.len()).step_by(128) {
            let mut acc = [_mm512_setzero_ps(); 8];
            for (j, p) in probs.iter().enumerate() {
                let p = _mm512_set1_ps(*p);
                let row = values.as_ptr().add(j * stride + start);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let value = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(i * 16).cast()));
                    *acc = _mm512_fmadd_ps(p, value, *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(start + i * 16), *acc);
            }
        }
    }
}

/// 64 outputs at a time held in registers across all the rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2(probs: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(probs.is_empty() || (probs.len() - 1) * stride + out.len() <= values.len());
    // SAFETY: checked above: every row read stays inside `values`.
    unsafe {
        for start in (0..out.len()).step_by(64) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, p) in probs.iter().enumerate() {
                let p = _mm256_set1_ps(*p);
                let row = values.as_ptr().add(j * stride + start);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let value = _mm256_cvtph_ps(_mm_loadu_si128(row.add(i * 8).cast()));
                    *acc = _mm256_fmadd_ps(p, value, *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(start + i * 8), *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(mask: &Tensor) -> Vec<Vec<bool>> {
        mask.to_vec2::<f32>().unwrap().into_iter().map(|row| row.into_iter().map(|v| v == 0.0).collect()).collect()
    }

    #[test]
    fn sliding_mask_admits_exactly_window_positions() {
        let window = 512;
        let seq = 600;
        let mask = attention_mask(seq, 0, 0, seq, Some(window), 1, &Device::Cpu).unwrap();
        let rows = visible(&mask);
        assert_eq!(rows[599].iter().filter(|v| **v).count(), window);
        assert!(!rows[599][599 - window]);
        assert!(rows[599][600 - window]);
        assert_eq!(rows[10].iter().filter(|v| **v).count(), 11);
    }

    #[test]
    fn decode_mask_respects_window_and_cache_offset() {
        // Decoding position 1000 with a cache that starts at 488.
        let mask = attention_mask(1, 1000, 488, 513, Some(512), 1, &Device::Cpu).unwrap();
        let row = &visible(&mask)[0];
        assert!(!row[0], "position 488 is 512 behind: outside the window");
        assert!(row[1..].iter().all(|v| *v));
        let global = attention_mask(2, 5, 0, 7, None, 2, &Device::Cpu).unwrap();
        let rows = visible(&global);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].iter().filter(|v| **v).count(), 6);
        assert_eq!(rows[3].iter().filter(|v| **v).count(), 7);
    }

    #[test]
    fn rope_tables_start_at_the_given_position() {
        let rope = Rope::new(4, 10_000.0, 3, 2);
        assert!((rope.cos[0] - 3f32.cos()).abs() < 1e-6);
        assert!((rope.sin[2] - 4f32.sin()).abs() < 1e-6);
        assert!((rope.sin[1] - (3.0f32 * 0.01).sin()).abs() < 1e-6);
    }

    #[test]
    fn rotation_matches_candle_rope_kernels() {
        let (tokens, heads, dim) = (3, 2, 8);
        let rope = Rope::new(dim, 10_000.0, 5, tokens);
        let x: Vec<f32> = (0..tokens * heads * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let cos = Tensor::from_slice(&rope.cos, (tokens, dim / 2), &Device::Cpu).unwrap();
        let sin = Tensor::from_slice(&rope.sin, (tokens, dim / 2), &Device::Cpu).unwrap();
        for interleaved in [false, true] {
            let mut ours = x.clone();
            rope.rotate(&mut ours, dim, interleaved);
            let candle_rope = if interleaved { candle_nn::rotary_emb::rope_i } else { candle_nn::rotary_emb::rope };
            let t = Tensor::from_slice(&x, (1, tokens, heads, dim), &Device::Cpu).unwrap().transpose(1, 2).unwrap();
            let expected = candle_rope(&t.contiguous().unwrap(), &cos, &sin).unwrap();
            let expected = expected.transpose(1, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(ours, expected, "interleaved: {interleaved}");
        }
    }

    #[test]
    fn vector_kernels_give_the_bits_of_the_scalar_chains() {
        let dim = 256;
        let f16s = |n: usize, salt: f32| -> Vec<f16> {
            (0..n).map(|i| f16::from_f32(((i as f32 + salt) * 0.61).sin())).collect()
        };
        let keys = f16s(dim * TILE, 1.0);
        let queries: Vec<f32> = (0..3 * dim).map(|i| (i as f32 * 0.17).cos()).collect();
        let mut scores = vec![0f32; 3 * 2 * TILE];
        score_tile(&queries, &keys, &mut scores, TILE);
        for (i, query) in queries.chunks_exact(dim).enumerate() {
            for lane in 0..TILE {
                let sum =
                    query.iter().enumerate().fold(0f32, |acc, (d, q)| q.mul_add(keys[d * TILE + lane].to_f32(), acc));
                assert_eq!(scores[i * 2 * TILE + TILE + lane].to_bits(), sum.to_bits(), "query {i} lane {lane}");
            }
        }
        let (rows, stride) = (37, 320);
        let values = f16s(rows * stride, 2.0);
        let probs: Vec<f32> = (0..rows).map(|j| 1.0 / (j as f32 + 2.0)).collect();
        let mut out = vec![0f32; 256];
        weighted_sum(&probs, &values[64..], stride, &mut out);
        for (d, o) in out.iter().enumerate() {
            let sum =
                probs.iter().enumerate().fold(0f32, |acc, (j, p)| p.mul_add(values[64 + j * stride + d].to_f32(), acc));
            assert_eq!(o.to_bits(), sum.to_bits(), "output {d}");
        }
    }

    /// Allocated entries of a cache: what it costs in memory.
    fn allocated_entries(cache: &LayerCache, width: usize) -> usize {
        cache.key_tiles.capacity().max(cache.values.capacity()) / width
    }

    #[test]
    fn caches_hold_f16_and_allocate_little_beyond_their_entries() {
        let heads = Heads { heads: 4, kv_heads: 1, head_dim: 256, interleaved_rope: false };
        let width = 256;
        let values = |n: usize, salt: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 + salt) * 0.37).sin()).collect() };
        let mut cache = None;
        // A short prompt, then one token at a time: what a decoding stream does.
        let prompt = 10;
        let (q, k, v) = (values(prompt * 4 * width, 1.0), values(prompt * width, 2.0), values(prompt * width, 3.0));
        let rope = Rope::new(256, 10_000.0, 0, prompt);
        let step = Step { q: &q, k: &k, v: &v, rope: &rope, position: 0, window: None };
        heads.attend(step, &mut cache, &Device::Cpu).unwrap();
        for position in prompt..138 {
            let (q, k, v) = (values(4 * width, 4.0), values(width, 5.0), values(width, 6.0));
            let rope = Rope::new(256, 10_000.0, position, 1);
            let step = Step { q: &q, k: &k, v: &v, rope: &rope, position, window: None };
            heads.attend(step, &mut cache, &Device::Cpu).unwrap();
        }
        let cache = cache.unwrap();
        assert_eq!(cache.len(), 138);
        assert_eq!(size_of_val(&cache.values[0]), 2, "values are f16");
        assert_eq!(size_of_val(&cache.key_tiles[0]), 2, "keys are f16");
        // Vec's doubling would hold 256 entries here.
        let allocated = allocated_entries(&cache, width);
        assert!(allocated * 4 <= 138 * 5 + 4 * TILE, "{allocated} entries allocated for 138");
    }

    #[test]
    fn a_sliding_cache_stays_near_its_window() {
        let heads = Heads { heads: 1, kv_heads: 1, head_dim: 32, interleaved_rope: false };
        let (width, window) = (32, 512);
        let row: Vec<f32> = (0..width).map(|i| i as f32 * 0.01).collect();
        let mut cache = None;
        for position in 0..3000 {
            let rope = Rope::new(32, 10_000.0, position, 1);
            let step = Step { q: &row, k: &row, v: &row, rope: &rope, position, window: Some(window) };
            heads.attend(step, &mut cache, &Device::Cpu).unwrap();
        }
        let cache = cache.unwrap();
        assert_eq!(cache.len(), window);
        // Dead entries are dropped at a quarter of the buffer: at most 4/3
        // of the window, plus a quarter of growth.
        let allocated = allocated_entries(&cache, width);
        assert!(allocated <= window * 4 / 3 * 5 / 4 + TILE, "{allocated} entries allocated for a window of {window}");
    }

    #[test]
    fn decode_equals_the_masked_prefill_path() {
        let heads = Heads { heads: 4, kv_heads: 2, head_dim: 16, interleaved_rope: false };
        let (width, q_width) = (2 * 16, 4 * 16);
        let window = Some(5);
        // Long enough that whole tiles of keys leave the sliding window.
        let tokens = 40;
        let values = |n: usize, salt: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 + salt) * 0.731).sin()).collect() };
        let (q, k, v) = (values(tokens * q_width, 1.0), values(tokens * width, 2.0), values(tokens * width, 3.0));
        // All at once (masked) against one token at a time.
        let rope = Rope::new(16, 10_000.0, 0, tokens);
        let mut prefill_cache = None;
        let step = Step { q: &q, k: &k, v: &v, rope: &rope, position: 0, window };
        let all = heads.attend(step, &mut prefill_cache, &Device::Cpu).unwrap();
        let mut cache = None;
        for t in 0..tokens {
            let rope = Rope::new(16, 10_000.0, t, 1);
            let step = Step {
                q: &q[t * q_width..(t + 1) * q_width],
                k: &k[t * width..(t + 1) * width],
                v: &v[t * width..(t + 1) * width],
                rope: &rope,
                position: t,
                window,
            };
            let one = heads.attend(step, &mut cache, &Device::Cpu).unwrap();
            for (a, b) in one.iter().zip(&all[t * q_width..(t + 1) * q_width]) {
                assert!((a - b).abs() < 1e-5, "token {t}: {a} vs {b}");
            }
            let cache = cache.as_ref().unwrap();
            assert_eq!(cache.len(), (t + 1).min(5), "the sliding cache keeps the window");
        }
        assert_eq!(prefill_cache.unwrap().len(), 5);
    }
}
