//! Gemma 3 (text) from a GGUF, our own module rather than
//! candle-transformers' `quantized_gemma3`, which differs from the reference
//! (llama.cpp) in ways that change the output:
//!
//! - the MLP gate is GELU (tanh form), not SiLU;
//! - rotary angles are computed for the positions in each call, not from
//!   131,072-position tables built per layer (~2.3 GB);
//! - sliding-window layers attend to exactly `window` positions (the query
//!   and the `window - 1` before it), in prefill and decode alike, and
//!   their cache is trimmed to the window;
//! - a multi-token forward at any position works (chunked prefill);
//! - the KV cache belongs to a sequence ([`KvCache`]), not to the weights,
//!   so one loaded model serves many sequences at once.
//!
//! The token embedding is read row by row from the quantized table, as
//! llama.cpp's `get_rows` does, instead of dequantizing 262,144 rows.

use std::io::{Read, Seek};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::error::WorkerError;

#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub sliding_window: usize,
    /// Every `sliding_window_pattern`-th layer is global; the rest slide.
    pub sliding_window_pattern: usize,
    pub rope_base_global: f32,
    pub rope_base_local: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

enum Embeddings {
    /// Raw Q8_0 blocks: per 32 values, an f16 scale then 32 i8.
    Q8_0 {
        blocks: Vec<u8>,
        hidden: usize,
    },
    Dense(Tensor),
}

impl Embeddings {
    fn lookup(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Embeddings::Q8_0 { blocks, hidden } => {
                const BLOCK: usize = 34;
                let per_row = hidden / 32;
                let mut out = Vec::with_capacity(ids.len() * hidden);
                for &id in ids {
                    let row = &blocks[id as usize * per_row * BLOCK..(id as usize + 1) * per_row * BLOCK];
                    for block in row.chunks_exact(BLOCK) {
                        let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                        out.extend(block[2..].iter().map(|q| f32::from(*q as i8) * scale));
                    }
                }
                Tensor::from_vec(out, (1, ids.len(), *hidden), device)
            }
            Embeddings::Dense(table) => {
                let ids = Tensor::new(ids, device)?;
                table.index_select(&ids, 0)?.unsqueeze(0)
            }
        }
    }
}

struct Layer {
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    q_norm: Tensor,
    k_norm: Tensor,
    attn_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    post_ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    sliding: bool,
}

pub struct Gemma3 {
    pub config: Gemma3Config,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    device: Device,
}

/// One sequence's keys and values, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Tokens seen so far: the position of the next token.
    pub position: usize,
}

#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    /// Absolute position of the first cached entry (sliding layers drop
    /// what falls out of the window).
    start: usize,
}

fn md<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, WorkerError> {
    content.metadata.get(key).ok_or_else(|| WorkerError::Model(format!("GGUF metadata has no {key}")))
}

impl Gemma3 {
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Gemma3, WorkerError> {
        let arch = md(content, "general.architecture")?.to_string()?.clone();
        if arch != "gemma3" {
            return Err(WorkerError::Model(format!("expected a gemma3 GGUF, found architecture {arch:?}")));
        }
        let u =
            |key: &str| -> Result<usize, WorkerError> { Ok(md(content, &format!("gemma3.{key}"))?.to_u32()? as usize) };
        let f = |key: &str, default: f32| {
            content.metadata.get(&format!("gemma3.{key}")).and_then(|v| v.to_f32().ok()).unwrap_or(default)
        };
        let vocab_size = md(content, "tokenizer.ggml.tokens")?.to_vec()?.len();
        let config = Gemma3Config {
            hidden: u("embedding_length")?,
            layers: u("block_count")?,
            heads: u("attention.head_count")?,
            kv_heads: u("attention.head_count_kv")?,
            head_dim: u("attention.key_length")?,
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
            sliding_window: u("attention.sliding_window")?,
            sliding_window_pattern: u("attention.sliding_window_type").unwrap_or(6),
            rope_base_global: f("rope.freq_base", 1_000_000.0),
            rope_base_local: f("rope.local_freq_base", 10_000.0),
            context_length: u("context_length")?,
            vocab_size,
        };
        let mut tensor = |name: &str| -> Result<QTensor, WorkerError> { Ok(content.tensor(reader, name, device)?) };
        let dense = |q: QTensor| -> Result<Tensor, WorkerError> { Ok(q.dequantize(device)?) };

        let embed_q = tensor("token_embd.weight")?;
        let embeddings = if embed_q.dtype() == GgmlDType::Q8_0 && config.hidden.is_multiple_of(32) {
            Embeddings::Q8_0 { blocks: embed_q.data()?.into_owned(), hidden: config.hidden }
        } else {
            Embeddings::Dense(embed_q.dequantize(device)?)
        };
        let output = match tensor("output.weight") {
            Ok(t) => t,
            // Tied embeddings: the output projection is the embedding table.
            Err(_) => tensor("token_embd.weight")?,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("blk.{i}");
            let mut q = |name: &str| -> Result<QMatMul, WorkerError> {
                Ok(QMatMul::from_qtensor(tensor(&format!("{p}.{name}.weight"))?)?)
            };
            let (wq, wk, wv, wo) = (q("attn_q")?, q("attn_k")?, q("attn_v")?, q("attn_output")?);
            let (gate, up, down) = (q("ffn_gate")?, q("ffn_up")?, q("ffn_down")?);
            let mut n = |name: &str| -> Result<Tensor, WorkerError> { dense(tensor(&format!("{p}.{name}.weight"))?) };
            layers.push(Layer {
                q: wq,
                k: wk,
                v: wv,
                o: wo,
                q_norm: n("attn_q_norm")?,
                k_norm: n("attn_k_norm")?,
                attn_norm: n("attn_norm")?,
                post_attn_norm: n("post_attention_norm")?,
                ffn_norm: n("ffn_norm")?,
                post_ffn_norm: n("post_ffw_norm")?,
                gate,
                up,
                down,
                sliding: (i + 1) % config.sliding_window_pattern != 0,
            });
        }
        let norm = dense(tensor("output_norm.weight")?)?;
        Ok(Gemma3 { config, embeddings, layers, norm, output: QMatMul::from_qtensor(output)?, device: device.clone() })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: vec![None; self.layers.len()], position: 0 }
    }

    /// Runs `tokens` at the cache's position and appends them to the cache.
    /// Returns logits `[vocab]` for the last token, or `[tokens, vocab]`
    /// with `all_logits`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Tensor, WorkerError> {
        Ok(self.forward_inner(tokens, cache, all_logits)?)
    }

    fn forward_inner(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> candle_core::Result<Tensor> {
        let seq = tokens.len();
        if seq == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        if cache.layers.len() != self.layers.len() {
            *cache = self.new_cache();
        }
        let position = cache.position;
        let cfg = &self.config;
        let mut x = (self.embeddings.lookup(tokens, &self.device)? * (cfg.hidden as f64).sqrt())?;
        let rope_local = rope_tables(cfg.head_dim, cfg.rope_base_local, position, seq, &self.device)?;
        let rope_global = rope_tables(cfg.head_dim, cfg.rope_base_global, position, seq, &self.device)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let rope = if layer.sliding { &rope_local } else { &rope_global };
            let window = layer.sliding.then_some(cfg.sliding_window);
            let residual = x.clone();
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let h = self.attention(layer, &h, rope, position, window, layer_cache)?;
            let h = rms_norm(&h, &layer.post_attn_norm, cfg.rms_eps)?;
            let x_mid = (h + residual)?;
            let h = rms_norm(&x_mid, &layer.ffn_norm, cfg.rms_eps)?;
            let gated = (layer.gate.forward(&h)?.gelu()? * layer.up.forward(&h)?)?;
            let h = layer.down.forward(&gated)?;
            let h = rms_norm(&h, &layer.post_ffn_norm, cfg.rms_eps)?;
            x = (h + x_mid)?;
        }
        cache.position += seq;
        let x = if all_logits { x } else { x.narrow(1, seq - 1, 1)? };
        let x = rms_norm(&x, &self.norm, cfg.rms_eps)?;
        let logits = self.output.forward(&x)?.squeeze(0)?;
        if all_logits { Ok(logits) } else { logits.squeeze(0) }
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        position: usize,
        window: Option<usize>,
        cache: &mut Option<LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, seq, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, seq, heads, cfg.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = split(layer.q.forward(x)?, cfg.heads)?;
        let k = split(layer.k.forward(x)?, cfg.kv_heads)?;
        let v = split(layer.v.forward(x)?, cfg.kv_heads)?;
        let q = rms_norm(&q, &layer.q_norm, cfg.rms_eps)?;
        let k = rms_norm(&k, &layer.k_norm, cfg.rms_eps)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;

        let (k, v, start) = match cache.take() {
            Some(prev) => (Tensor::cat(&[&prev.k, &k], 2)?, Tensor::cat(&[&prev.v, &v], 2)?, prev.start),
            None => (k, v, position),
        };
        let kv_len = k.dim(2)?;
        // Keep only what a later query can still see.
        let keep_from = match window {
            Some(w) => (position + seq).saturating_sub(w).max(start),
            None => start,
        };
        *cache = Some(if keep_from > start {
            let drop = keep_from - start;
            LayerCache { k: k.narrow(2, drop, kv_len - drop)?, v: v.narrow(2, drop, kv_len - drop)?, start: keep_from }
        } else {
            LayerCache { k: k.clone(), v: v.clone(), start }
        });

        // Grouped-query attention without copying K/V per head: fold the
        // query heads of each KV head into the row dimension.
        let group = cfg.heads / cfg.kv_heads;
        let q = q.reshape((b, cfg.kv_heads, group * seq, cfg.head_dim))?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let mask = attention_mask(seq, position, start, kv_len, window, group, &self.device)?;
        let scores = scores.broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?;
        let out = out.reshape((b, cfg.heads, seq, cfg.head_dim))?.transpose(1, 2)?.reshape((
            b,
            seq,
            cfg.heads * cfg.head_dim,
        ))?;
        layer.o.forward(&out)
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)
}

/// NEOX-style rotary tables for positions `[start, start + len)`.
fn rope_tables(
    head_dim: usize,
    base: f32,
    start: usize,
    len: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in start..start + len {
        for i in 0..half {
            let theta = base.powf(-2.0 * i as f32 / head_dim as f32);
            let angle = p as f32 * theta;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((Tensor::from_vec(cos, (len, half), device)?, Tensor::from_vec(sin, (len, half), device)?))
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

/// Greedy next token.
pub fn argmax(logits: &Tensor) -> Result<u32, WorkerError> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
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
        let (cos, sin) = rope_tables(4, 10_000.0, 3, 2, &Device::Cpu).unwrap();
        let cos = cos.to_vec2::<f32>().unwrap();
        let sin = sin.to_vec2::<f32>().unwrap();
        assert!((cos[0][0] - 3f32.cos()).abs() < 1e-6);
        assert!((sin[1][0] - 4f32.sin()).abs() < 1e-6);
        assert!((sin[0][1] - (3.0f32 * 0.01).sin()).abs() < 1e-6);
    }
}
