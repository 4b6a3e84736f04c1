//! Llama, Qwen2 and Qwen3 (and a tiny Gemma 3) GGUFs load and run. Only
//! Gemma ships offline here, so each test writes a small random-weight
//! GGUF in the layout llama.cpp's converter produces, then checks shapes,
//! determinism, chunked prefill and batched decode against one-at-a-time.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

use std::io::Seek;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use infermesh_worker::transformer::{Arch, Segment, Transformer};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 128;
const LAYERS: usize = 2;
const VOCAB: usize = 96;

struct Tiny {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
    seed: u64,
}

impl Tiny {
    fn new(arch: Arch) -> Tiny {
        let name = arch.gguf_name();
        let mut tiny = Tiny { metadata: Vec::new(), tensors: Vec::new(), seed: 1 };
        let mut meta = |key: &str, value: Value| tiny.metadata.push((key.to_owned(), value));
        meta("general.architecture", Value::String(name.to_owned()));
        meta(&format!("{name}.embedding_length"), Value::U32(HIDDEN as u32));
        meta(&format!("{name}.block_count"), Value::U32(LAYERS as u32));
        meta(&format!("{name}.attention.head_count"), Value::U32(HEADS as u32));
        meta(&format!("{name}.attention.head_count_kv"), Value::U32(KV_HEADS as u32));
        meta(&format!("{name}.attention.key_length"), Value::U32(HEAD_DIM as u32));
        meta(&format!("{name}.feed_forward_length"), Value::U32(FFN as u32));
        meta(&format!("{name}.context_length"), Value::U32(256));
        meta(&format!("{name}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6));
        meta(&format!("{name}.rope.freq_base"), Value::F32(10_000.0));
        if arch == Arch::Gemma3 {
            meta(&format!("{name}.attention.sliding_window"), Value::U32(8));
        }
        let tokens = (0..VOCAB).map(|i| Value::String(format!("t{i}"))).collect();
        meta("tokenizer.ggml.tokens", Value::Array(tokens));

        tiny.add("token_embd.weight", &[VOCAB, HIDDEN], GgmlDType::Q8_0);
        tiny.add("output_norm.weight", &[HIDDEN], GgmlDType::F32);
        if arch != Arch::Gemma3 {
            tiny.add("output.weight", &[VOCAB, HIDDEN], GgmlDType::Q8_0);
        }
        for layer in 0..LAYERS {
            let p = format!("blk.{layer}");
            tiny.add(&format!("{p}.attn_norm.weight"), &[HIDDEN], GgmlDType::F32);
            tiny.add(&format!("{p}.attn_q.weight"), &[HEADS * HEAD_DIM, HIDDEN], GgmlDType::Q8_0);
            tiny.add(&format!("{p}.attn_k.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], GgmlDType::Q8_0);
            tiny.add(&format!("{p}.attn_v.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], GgmlDType::Q8_0);
            tiny.add(&format!("{p}.attn_output.weight"), &[HIDDEN, HEADS * HEAD_DIM], GgmlDType::Q8_0);
            tiny.add(&format!("{p}.ffn_norm.weight"), &[HIDDEN], GgmlDType::F32);
            tiny.add(&format!("{p}.ffn_gate.weight"), &[FFN, HIDDEN], GgmlDType::Q8_0);
            tiny.add(&format!("{p}.ffn_up.weight"), &[FFN, HIDDEN], GgmlDType::Q8_0);
            tiny.add(&format!("{p}.ffn_down.weight"), &[HIDDEN, FFN], GgmlDType::Q8_0);
            if arch == Arch::Qwen2 {
                tiny.add(&format!("{p}.attn_q.bias"), &[HEADS * HEAD_DIM], GgmlDType::F32);
                tiny.add(&format!("{p}.attn_k.bias"), &[KV_HEADS * HEAD_DIM], GgmlDType::F32);
                tiny.add(&format!("{p}.attn_v.bias"), &[KV_HEADS * HEAD_DIM], GgmlDType::F32);
            }
            if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
                tiny.add(&format!("{p}.attn_q_norm.weight"), &[HEAD_DIM], GgmlDType::F32);
                tiny.add(&format!("{p}.attn_k_norm.weight"), &[HEAD_DIM], GgmlDType::F32);
            }
            if arch == Arch::Gemma3 {
                tiny.add(&format!("{p}.post_attention_norm.weight"), &[HIDDEN], GgmlDType::F32);
                tiny.add(&format!("{p}.post_ffw_norm.weight"), &[HIDDEN], GgmlDType::F32);
            }
        }
        tiny
    }

    /// Random weights from a fixed seed; norms near 1 as trained ones are.
    fn add(&mut self, name: &str, shape: &[usize], dtype: GgmlDType) {
        let count: usize = shape.iter().product();
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            // xorshift: deterministic without a dependency.
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            values.push((self.seed % 2001) as f32 / 1000.0 - 1.0);
        }
        if name.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v = 1.0 + *v * 0.1);
        } else {
            values.iter_mut().for_each(|v| *v *= 0.2);
        }
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        self.tensors.push((name.to_owned(), QTensor::quantize(&tensor, dtype).unwrap()));
    }

    fn try_load(&self) -> Result<Transformer, infermesh_worker::WorkerError> {
        let mut file = tempfile::tempfile().unwrap();
        let metadata: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
        file.rewind().unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        Transformer::from_gguf(&content, &mut file, &Device::Cpu)
    }

    fn load(&self) -> Transformer {
        self.try_load().unwrap()
    }
}

fn logits(model: &Transformer, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    model.forward(tokens, &mut cache, false).unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check_architecture(arch: Arch) {
    let model = Tiny::new(arch).load();
    assert_eq!(model.config.arch, arch);
    assert_eq!((model.config.heads, model.config.kv_heads, model.config.head_dim), (HEADS, KV_HEADS, HEAD_DIM));
    let prompt: Vec<u32> = (0..20).map(|i| (i * 7 % VOCAB) as u32).collect();

    let once = logits(&model, &prompt);
    assert_eq!(once.len(), VOCAB);
    assert!(once.iter().all(|v| v.is_finite()), "{arch:?}: non-finite logits");
    assert_eq!(once, logits(&model, &prompt), "{arch:?}: the same input gave different logits");
    assert_ne!(once, logits(&model, &prompt[..19]), "{arch:?}: the last token made no difference");

    // Chunked prefill matches one shot.
    let mut cache = model.new_cache();
    model.forward(&prompt[..7], &mut cache, false).unwrap();
    let chunked: Vec<f32> = model.forward(&prompt[7..], &mut cache, false).unwrap().to_vec1().unwrap();
    assert!(max_diff(&once, &chunked) < 1e-3, "{arch:?}: chunked prefill differs by {}", max_diff(&once, &chunked));

    // A batched decode step gives each sequence what it gets alone.
    let (a, b) = (&prompt[..12], &prompt[3..17]);
    let (mut cache_a, mut cache_b) = (model.new_cache(), model.new_cache());
    model.forward(a, &mut cache_a, false).unwrap();
    model.forward(b, &mut cache_b, false).unwrap();
    let (next_a, next_b) = ([5u32], [9u32]);
    let batched = model
        .forward_batch(&mut [
            Segment { tokens: &next_a, cache: &mut cache_a },
            Segment { tokens: &next_b, cache: &mut cache_b },
        ])
        .unwrap();
    let batched: Vec<&[f32]> = batched.chunks(batched.len() / 2).collect();
    let alone_a = logits(&model, &[a, &next_a].concat());
    let alone_b = logits(&model, &[b, &next_b].concat());
    assert!(max_diff(batched[0], &alone_a) < 1e-3, "{arch:?}: batched row 0 differs");
    assert!(max_diff(batched[1], &alone_b) < 1e-3, "{arch:?}: batched row 1 differs");
}

#[test]
fn llama_loads_and_runs() {
    check_architecture(Arch::Llama);
}

#[test]
fn qwen2_loads_and_runs_with_qkv_bias() {
    check_architecture(Arch::Qwen2);
}

#[test]
fn qwen3_loads_and_runs_with_qk_norm() {
    check_architecture(Arch::Qwen3);
}

#[test]
fn gemma3_with_sliding_window_loads_and_runs() {
    check_architecture(Arch::Gemma3);
}

#[test]
fn an_unknown_architecture_is_named_in_the_error() {
    let mut tiny = Tiny::new(Arch::Llama);
    tiny.metadata[0].1 = Value::String("mamba".into());
    let err = tiny.try_load().err().expect("mamba must be refused");
    assert!(err.to_string().contains("mamba"), "{err}");
}
