//! Decoder-only transformers from GGUF files: Gemma 3, Llama, Qwen2 and
//! Qwen3, our own code rather than candle-transformers' quantized models,
//! which differ from the reference (llama.cpp) in ways that change the
//! output or rule out batching:
//!
//! - Gemma 3's MLP gate is GELU (tanh form), not SiLU;
//! - rotary angles are computed for the positions in each call, not from
//!   131,072-position tables built per layer (~2.3 GB);
//! - sliding-window layers attend to exactly `window` positions (the query
//!   and the `window - 1` before it), in prefill and decode alike, and
//!   their cache is trimmed to the window;
//! - a multi-token forward at any position works (chunked prefill);
//! - the KV cache belongs to a sequence ([`KvCache`]), not to the weights,
//!   and one forward runs a ragged batch of sequences ([`Segment`]): the
//!   weight matmuls see every sequence's rows at once, attention runs per
//!   sequence over its own cache.
//!
//! The token embedding is read row by row from the quantized table, as
//! llama.cpp's `get_rows` does, instead of dequantizing 262,144 rows.

use std::io::{Read, Seek};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, Device, Module, Tensor};

use crate::attention::{Heads, LayerCache, Rope, Step};
use crate::error::WorkerError;
use crate::q8_0::PackedQ8_0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gemma3,
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    fn from_gguf_name(name: &str) -> Option<Arch> {
        Some(match name {
            "gemma3" => Arch::Gemma3,
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            _ => return None,
        })
    }

    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3",
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// llama.cpp's converter permutes Llama's q/k rows for the interleaved
    /// (GPT-J) rotation; the others keep the NEOX halves layout.
    fn interleaved_rope(self) -> bool {
        self == Arch::Llama
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    /// Gemma 3: local layers see this many positions; `None` elsewhere.
    pub sliding_window: Option<usize>,
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
    /// Tied to the output projection: rows read from its packed weights,
    /// so the 262,144-row table is in memory once.
    Tied(Arc<PackedQ8_0>),
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
            Embeddings::Tied(packed) => {
                let mut out = Vec::with_capacity(ids.len() * packed.cols());
                for &id in ids {
                    packed.dequantize_row(id as usize, &mut out);
                }
                Tensor::from_vec(out, (1, ids.len(), packed.cols()), device)
            }
            Embeddings::Dense(table) => {
                let ids = Tensor::new(ids, device)?;
                table.index_select(&ids, 0)?.unsqueeze(0)
            }
        }
    }
}

enum Matmul {
    Candle(QMatMul),
    /// Q8_0 on AVX-512 VNNI: one pass over the weights for all rows.
    Packed(Arc<PackedQ8_0>),
}

/// A quantized projection with an optional bias (Qwen2's q/k/v).
struct Linear {
    weight: Matmul,
    bias: Option<Tensor>,
    /// candle runs Q6_K with one kernel for a single row and another (with
    /// other rounding) for several; a lone row is run as two so a
    /// sequence's numbers never depend on how many share its step.
    pad_single_row: bool,
}

impl Linear {
    fn new(qtensor: QTensor, bias: Option<Tensor>) -> candle_core::Result<Linear> {
        let cpu = qtensor.device().is_cpu();
        let qtensor = if qtensor.dtype() == GgmlDType::Q5_0 && cpu { widen_q5_0(&qtensor)? } else { qtensor };
        let pad_single_row = qtensor.dtype() == GgmlDType::Q6K;
        if qtensor.dtype() == GgmlDType::Q8_0 && cpu && PackedQ8_0::supported() {
            let (rows, cols) = qtensor.shape().dims2()?;
            if let Some(packed) = PackedQ8_0::pack(&qtensor.data()?, rows, cols) {
                return Ok(Linear { weight: Matmul::Packed(Arc::new(packed)), bias, pad_single_row });
            }
        }
        Ok(Linear { weight: Matmul::Candle(QMatMul::from_qtensor(qtensor)?), bias, pad_single_row })
    }

    /// A Q8_0 weight packed straight from the file, when the kernel runs
    /// here; `None` leaves it to [`Linear::new`].
    fn read_packed<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        name: &str,
        device: &Device,
    ) -> Result<Option<Linear>, WorkerError> {
        let Some(info) = content.tensor_infos.get(name) else { return Ok(None) };
        let Ok((rows, cols)) = info.shape.dims2() else { return Ok(None) };
        if info.ggml_dtype != GgmlDType::Q8_0 || !device.is_cpu() || !PackedQ8_0::supported() {
            return Ok(None);
        }
        let io = |err: std::io::Error| WorkerError::Model(format!("reading {name}: {err}"));
        reader.seek(std::io::SeekFrom::Start(content.tensor_data_offset + info.offset)).map_err(io)?;
        Ok(PackedQ8_0::read(reader, rows, cols).map_err(io)?.map(|packed| Linear {
            weight: Matmul::Packed(Arc::new(packed)),
            bias: None,
            pad_single_row: false,
        }))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Matmul::Packed(packed) => {
                let mut shape = x.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = packed.rows();
                }
                Tensor::from_vec(packed_matmul(packed, x)?, shape, x.device())?
            }
            Matmul::Candle(weight) if self.pad_single_row && x.elem_count() == x.dim(D::Minus1)? => {
                let doubled = Tensor::cat(&[x, x], x.rank() - 2)?;
                weight.forward(&doubled)?.narrow(x.rank() - 2, 0, 1)?
            }
            Matmul::Candle(weight) => weight.forward(x)?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    /// As [`Linear::forward`], flattened into host memory.
    fn forward_to_host(&self, x: &Tensor) -> candle_core::Result<Vec<f32>> {
        match (&self.weight, &self.bias) {
            (Matmul::Packed(packed), None) => packed_matmul(packed, x),
            _ => self.forward(x)?.flatten_all()?.to_vec1::<f32>(),
        }
    }
}

/// `x · weightᵀ` for every row of `x`, into host memory `[rows][weight rows]`.
fn packed_matmul(packed: &PackedQ8_0, x: &Tensor) -> candle_core::Result<Vec<f32>> {
    let rows = x.elem_count() / x.dim(D::Minus1)?;
    let input = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(packed.matmul(&input, rows))
}

/// Projections of one input (q/k/v, gate/up). Where every part is a
/// packed Q8_0 weight without bias they run as one stacked matmul: the
/// activations are quantized once and the pool is woken once.
enum Projections {
    Stacked { weight: PackedQ8_0, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Projections {
        let packed_alone = |linear: &Linear| match &linear.weight {
            Matmul::Packed(p) if Arc::strong_count(p) == 1 && linear.bias.is_none() => Some(p.cols()),
            _ => None,
        };
        let inputs: Option<Vec<usize>> = parts.iter().map(packed_alone).collect();
        let same_input = inputs.is_some_and(|i| i.windows(2).all(|pair| pair[0] == pair[1]));
        if parts.len() < 2 || !same_input {
            return Projections::Separate(parts);
        }
        let mut packed = Vec::with_capacity(parts.len());
        for linear in parts {
            let Matmul::Packed(weight) = linear.weight else { unreachable!("checked: every part is packed") };
            match Arc::try_unwrap(weight) {
                Ok(weight) => packed.push(weight),
                Err(_) => unreachable!("checked: no other owner"),
            }
        }
        let widths = packed.iter().map(PackedQ8_0::rows).collect();
        match PackedQ8_0::stack(packed) {
            Some(weight) => Projections::Stacked { weight, widths },
            None => unreachable!("checked: the parts share their input width"),
        }
    }

    /// Each part's output for the rows of `x`, in host memory `[rows][width]`.
    fn forward_to_host(&self, x: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|part| part.forward_to_host(x)).collect(),
            Projections::Stacked { weight, widths } => {
                let out = packed_matmul(weight, x)?;
                let rows = out.len() / weight.rows();
                let mut parts: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(rows * w)).collect();
                for row in out.chunks_exact(weight.rows()) {
                    let mut rest = row;
                    for (part, width) in parts.iter_mut().zip(widths) {
                        let (mine, others) = rest.split_at(*width);
                        part.extend_from_slice(mine);
                        rest = others;
                    }
                }
                Ok(parts)
            }
        }
    }
}

struct Layer {
    /// Query, key and value projections.
    qkv: Projections,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    attn_norm: Tensor,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    post_ffn_norm: Option<Tensor>,
    /// The MLP's gate and up projections.
    gate_up: Projections,
    down: Linear,
    sliding: bool,
}

pub struct Transformer {
    pub config: ModelConfig,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    device: Device,
}

/// One sequence's keys and values, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Tokens seen so far: the position of the next token.
    pub position: usize,
}

/// A segment's global-layer rotary tables, and its sliding-layer ones (Gemma 3).
type SegmentRope = (Rope, Option<Rope>);

/// One sequence's share of a batched forward: its next tokens (a prefill
/// chunk, or the one token being decoded) and its cache.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

fn md<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, WorkerError> {
    content.metadata.get(key).ok_or_else(|| WorkerError::Model(format!("GGUF metadata has no {key}")))
}

impl Transformer {
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Transformer, WorkerError> {
        let arch_name = md(content, "general.architecture")?.to_string()?.clone();
        let arch = Arch::from_gguf_name(&arch_name).ok_or_else(|| {
            WorkerError::Model(format!(
                "architecture {arch_name:?} is not supported; this worker runs gemma3, llama, qwen2 and qwen3 GGUFs"
            ))
        })?;
        let prefix = arch.gguf_name();
        let u = |key: &str| -> Result<usize, WorkerError> {
            Ok(md(content, &format!("{prefix}.{key}"))?.to_u32()? as usize)
        };
        let f = |key: &str, default: f32| {
            content.metadata.get(&format!("{prefix}.{key}")).and_then(|v| v.to_f32().ok()).unwrap_or(default)
        };
        let vocab_size = md(content, "tokenizer.ggml.tokens")?.to_vec()?.len();
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let gemma = arch == Arch::Gemma3;
        let config = ModelConfig {
            arch,
            hidden,
            layers: u("block_count")?,
            heads,
            kv_heads: u("attention.head_count_kv").unwrap_or(heads),
            head_dim: u("attention.key_length").unwrap_or(hidden / heads.max(1)),
            rms_eps: f("attention.layer_norm_rms_epsilon", if gemma { 1e-6 } else { 1e-5 }),
            sliding_window: if gemma { Some(u("attention.sliding_window")?) } else { None },
            sliding_window_pattern: if gemma { u("attention.sliding_window_type").unwrap_or(6) } else { 1 },
            rope_base_global: f("rope.freq_base", if gemma { 1_000_000.0 } else { 10_000.0 }),
            rope_base_local: f("rope.local_freq_base", 10_000.0),
            context_length: u("context_length")?,
            vocab_size,
        };
        if !config.heads.is_multiple_of(config.kv_heads.max(1)) {
            return Err(WorkerError::Model(format!(
                "{} query heads do not group evenly over {} KV heads",
                config.heads, config.kv_heads
            )));
        }
        let names: std::collections::HashSet<&str> = content.tensor_infos.keys().map(String::as_str).collect();
        // Tied embeddings: without `output.weight` the output projection is
        // the embedding table.
        let tied = !names.contains("output.weight");
        let output_name = if tied { "token_embd.weight" } else { "output.weight" };
        let packed_output = Linear::read_packed(content, reader, output_name, device)?;
        let mut tensor = |name: &str| -> Result<QTensor, WorkerError> { Ok(content.tensor(reader, name, device)?) };
        let dense = |q: QTensor| -> Result<Tensor, WorkerError> { Ok(q.dequantize(device)?) };

        let output = match packed_output {
            Some(packed) => packed,
            None => Linear::new(tensor(output_name)?, None)?,
        };
        let embeddings = match (&output.weight, tied) {
            (Matmul::Packed(packed), true) => Embeddings::Tied(packed.clone()),
            _ => {
                let embed_q = tensor("token_embd.weight")?;
                if embed_q.dtype() == GgmlDType::Q8_0 && config.hidden.is_multiple_of(32) {
                    Embeddings::Q8_0 { blocks: embed_q.data()?.into_owned(), hidden: config.hidden }
                } else {
                    Embeddings::Dense(embed_q.dequantize(device)?)
                }
            }
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("blk.{i}");
            let has = |name: &str| names.contains(format!("{p}.{name}").as_str());
            let mut load = |name: &str| tensor(&format!("{p}.{name}"));
            let mut linear = |name: &str| -> Result<Linear, WorkerError> {
                let weight = load(&format!("{name}.weight"))?;
                let bias =
                    if has(&format!("{name}.bias")) { Some(dense(load(&format!("{name}.bias"))?)?) } else { None };
                Ok(Linear::new(weight, bias)?)
            };
            let (q, k, v) = (linear("attn_q")?, linear("attn_k")?, linear("attn_v")?);
            let (o, gate, up, down) =
                (linear("attn_output")?, linear("ffn_gate")?, linear("ffn_up")?, linear("ffn_down")?);
            let mut norm = |name: &str| -> Result<Option<Tensor>, WorkerError> {
                let full = format!("{p}.{name}.weight");
                if names.contains(full.as_str()) { Ok(Some(dense(tensor(&full)?)?)) } else { Ok(None) }
            };
            let required = |t: Option<Tensor>, name: &str| {
                t.ok_or_else(|| WorkerError::Model(format!("GGUF has no {p}.{name}.weight")))
            };
            layers.push(Layer {
                qkv: Projections::new(vec![q, k, v]),
                o,
                q_norm: norm("attn_q_norm")?,
                k_norm: norm("attn_k_norm")?,
                attn_norm: required(norm("attn_norm")?, "attn_norm")?,
                post_attn_norm: norm("post_attention_norm")?,
                ffn_norm: required(norm("ffn_norm")?, "ffn_norm")?,
                post_ffn_norm: norm("post_ffw_norm")?,
                gate_up: Projections::new(vec![gate, up]),
                down,
                sliding: config.sliding_window.is_some() && (i + 1) % config.sliding_window_pattern != 0,
            });
        }
        let norm = dense(tensor("output_norm.weight")?)?;
        Ok(Transformer { config, embeddings, layers, norm, output, device: device.clone() })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: vec![None; self.layers.len()], position: 0 }
    }

    /// Runs `tokens` at the cache's position and appends them to the cache.
    /// Returns logits `[vocab]` for the last token, or `[tokens, vocab]`
    /// with `all_logits`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Tensor, WorkerError> {
        let mut segments = [Segment { tokens, cache }];
        let x = self.hidden_states(&mut segments)?;
        let x = if all_logits { x } else { x.narrow(1, tokens.len() - 1, 1)? };
        let logits = self.logits(&x)?.squeeze(0)?;
        Ok(if all_logits { logits } else { logits.squeeze(0)? })
    }

    /// One step over a ragged batch: every segment's tokens run at its
    /// cache's position and are appended to its cache. Returns the logits
    /// of each segment's last token, `[segments][vocab]` flat, in host
    /// memory (the sampler's side; the 262,144-wide rows are not copied
    /// again on the way).
    ///
    /// A sequence's logits do not depend on what else is in the batch: the
    /// matmuls treat rows independently and attention is per segment.
    pub fn forward_batch(&self, segments: &mut [Segment<'_>]) -> Result<Vec<f32>, WorkerError> {
        let x = self.hidden_states(segments)?;
        let mut last_rows = Vec::with_capacity(segments.len());
        let mut offset = 0u32;
        for segment in segments.iter() {
            offset += segment.tokens.len() as u32;
            last_rows.push(offset - 1);
        }
        let rows = Tensor::new(last_rows.as_slice(), &self.device)?;
        let x = x.squeeze(0)?.index_select(&rows, 0)?.unsqueeze(0)?;
        let x = rms_norm(&x, &self.norm, self.config.rms_eps)?;
        Ok(self.output.forward_to_host(&x)?)
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = rms_norm(x, &self.norm, self.config.rms_eps)?;
        self.output.forward(&x)
    }

    /// Final hidden states `[1, total tokens, hidden]`, before the output norm.
    fn hidden_states(&self, segments: &mut [Segment<'_>]) -> candle_core::Result<Tensor> {
        if segments.is_empty() || segments.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("forward needs at least one token per sequence");
        }
        let cfg = &self.config;
        let mut ids = Vec::with_capacity(segments.iter().map(|s| s.tokens.len()).sum());
        for segment in segments.iter_mut() {
            if segment.cache.layers.len() != self.layers.len() {
                *segment.cache = self.new_cache();
            }
            ids.extend_from_slice(segment.tokens);
        }
        let mut x = self.embeddings.lookup(&ids, &self.device)?;
        if cfg.arch == Arch::Gemma3 {
            x = (x * (cfg.hidden as f64).sqrt())?;
        }
        let mut ropes = Vec::with_capacity(segments.len());
        for segment in segments.iter() {
            let (position, len) = (segment.cache.position, segment.tokens.len());
            let global = Rope::new(cfg.head_dim, cfg.rope_base_global, position, len);
            let local = cfg.sliding_window.map(|_| Rope::new(cfg.head_dim, cfg.rope_base_local, position, len));
            ropes.push((global, local));
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let residual = x.clone();
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let h = self.attention(index, layer, &h, segments, &ropes)?;
            let h = match &layer.post_attn_norm {
                Some(norm) => rms_norm(&h, norm, cfg.rms_eps)?,
                None => h,
            };
            let x_mid = (h + residual)?;
            let h = rms_norm(&x_mid, &layer.ffn_norm, cfg.rms_eps)?;
            let (mut gate, up) = match <[Vec<f32>; 2]>::try_from(layer.gate_up.forward_to_host(&h)?) {
                Ok([gate, up]) => (gate, up),
                Err(_) => candle_core::bail!("gate and up projections"),
            };
            match cfg.arch {
                Arch::Gemma3 => crate::ggml_ops::gelu_mul(&mut gate, &up),
                _ => crate::ggml_ops::silu_mul(&mut gate, &up),
            }
            let width = gate.len() / h.dims()[..h.rank() - 1].iter().product::<usize>();
            let mut shape = h.dims().to_vec();
            if let Some(last) = shape.last_mut() {
                *last = width;
            }
            let h = layer.down.forward(&Tensor::from_vec(gate, shape, &self.device)?)?;
            let h = match &layer.post_ffn_norm {
                Some(norm) => rms_norm(&h, norm, cfg.rms_eps)?,
                None => h,
            };
            x = (h + x_mid)?;
        }
        for segment in segments.iter_mut() {
            segment.cache.position += segment.tokens.len();
        }
        Ok(x)
    }

    fn attention(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        ropes: &[SegmentRope],
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let total = x.dim(1)?;
        let (mut q, mut k, v) = match <[Vec<f32>; 3]>::try_from(layer.qkv.forward_to_host(x)?) {
            Ok([q, k, v]) => (q, k, v),
            Err(_) => candle_core::bail!("query, key and value projections"),
        };
        // Per head, so over head_dim-wide rows.
        if let Some(norm) = &layer.q_norm {
            crate::ggml_ops::rms_norm(&mut q, &norm.to_vec1::<f32>()?, cfg.rms_eps);
        }
        if let Some(norm) = &layer.k_norm {
            crate::ggml_ops::rms_norm(&mut k, &norm.to_vec1::<f32>()?, cfg.rms_eps);
        }
        let heads = Heads {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            interleaved_rope: cfg.arch.interleaved_rope(),
        };
        let window = if layer.sliding { cfg.sliding_window } else { None };
        let (q_width, kv_width) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        // Each sequence attends over its own cache, independently of the
        // others, so a decode batch spreads them over the pool's threads.
        struct Work<'c> {
            offset: usize,
            seq: usize,
            position: usize,
            rope: &'c Rope,
            cache: Mutex<&'c mut Option<LayerCache>>,
            out: Mutex<Option<candle_core::Result<Vec<f32>>>>,
        }
        let mut offset = 0;
        let mut work = Vec::with_capacity(segments.len());
        for (segment, (global, local)) in segments.iter_mut().zip(ropes) {
            let seq = segment.tokens.len();
            let rope = match (layer.sliding, local) {
                (true, Some(local)) => local,
                _ => global,
            };
            let position = segment.cache.position;
            let cache = Mutex::new(&mut segment.cache.layers[index]);
            work.push(Work { offset, seq, position, rope, cache, out: Mutex::new(None) });
            offset += seq;
        }
        let run = |item: &Work<'_>| -> candle_core::Result<Vec<f32>> {
            fn rows<'x>(x: &'x [f32], item: &Work<'_>, width: usize) -> &'x [f32] {
                &x[item.offset * width..(item.offset + item.seq) * width]
            }
            let step = Step {
                q: rows(&q, item, q_width),
                k: rows(&k, item, kv_width),
                v: rows(&v, item, kv_width),
                rope: item.rope,
                position: item.position,
                window,
            };
            let mut cache = item.cache.lock().map_err(|_| candle_core::Error::Msg("poisoned KV cache".into()))?;
            heads.attend(step, &mut cache, &self.device)
        };
        let execute = |item: &Work<'_>| {
            let result = run(item);
            if let Ok(mut out) = item.out.lock() {
                *out = Some(result);
            }
        };
        if work.len() > 1 {
            candle_core::utils::barrier_pool()
                .execute_chunked(work.len(), |range| work[range].iter().for_each(execute));
        } else {
            work.iter().for_each(execute);
        }
        let mut out = Vec::with_capacity(total * q_width);
        for item in work {
            let part = item.out.into_inner().ok().flatten();
            out.extend(part.unwrap_or_else(|| Err(candle_core::Error::Msg("attention did not run".into())))?);
        }
        layer.o.forward(&Tensor::from_vec(out, (1, total, q_width), &self.device)?)
    }
}

/// Q5_0 weights rewritten as Q8_0 with the same scale and the same
/// integers (5-bit values fit in i8), so the products are exactly the
/// same, but candle runs them with its SIMD Q8_0 kernel instead of its
/// scalar Q5_0 one (most of the decode time for Gemma 3 270M, whose
/// 640-wide rows cannot use k-quants). Costs 12 more bytes per 32 weights.
fn widen_q5_0(q5: &QTensor) -> candle_core::Result<QTensor> {
    const Q5_BLOCK: usize = 22;
    let data = q5.data()?;
    let mut out = Vec::with_capacity(data.len() / Q5_BLOCK * 34);
    for block in data.chunks_exact(Q5_BLOCK) {
        let (scale, rest) = block.split_at(2);
        let (high, low) = rest.split_at(4);
        let high = u32::from_le_bytes([high[0], high[1], high[2], high[3]]);
        out.extend_from_slice(scale);
        let mut values = [0u8; 32];
        for (j, byte) in low.iter().enumerate() {
            let high_0 = ((high >> j) << 4) as u8 & 0x10;
            let high_1 = (high >> (j + 12)) as u8 & 0x10;
            values[j] = (((byte & 0x0f) | high_0) as i8 - 16) as u8;
            values[j + 16] = (((byte >> 4) | high_1) as i8 - 16) as u8;
        }
        out.extend_from_slice(&values);
    }
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        GgmlDType::Q8_0,
        &out,
        q5.shape().dims().to_vec(),
        &q5.device(),
    )
}

/// RMS norm over the last dimension ([`crate::ggml_ops::rms_norm`] on CPU).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps);
    }
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    crate::ggml_ops::rms_norm(&mut values, &weight.to_vec1::<f32>()?, eps);
    Tensor::from_vec(values, x.shape(), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q5_0_widens_to_q8_0_without_changing_a_weight() {
        let values: Vec<f32> = (0..4 * 64).map(|i| ((i * 37 % 61) as f32 - 30.0) / 7.0).collect();
        let dense = Tensor::from_vec(values, (4, 64), &Device::Cpu).unwrap();
        let q5 = QTensor::quantize(&dense, GgmlDType::Q5_0).unwrap();
        let q8 = widen_q5_0(&q5).unwrap();
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        let a = q5.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = q8.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
    }
}
