//! Sentence embeddings with a BERT model (all-MiniLM-L6-v2 by default) from
//! safetensors: mean pooling over real tokens, then L2 normalisation, as
//! sentence-transformers does for this model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, Tokenizer};

use crate::error::WorkerError;

pub struct EmbeddingModel {
    bert: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    pub max_tokens: usize,
    pub dimensions: usize,
}

impl EmbeddingModel {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<EmbeddingModel, WorkerError> {
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(WorkerError::io(dir.join(name)));
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|err| WorkerError::Model(format!("{}: {err}", dir.join("config.json").display())))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|err| WorkerError::Tokenizer(err.to_string()))?;
        let max_tokens = config.max_position_embeddings;
        tokenizer.with_truncation(None).map_err(|err| WorkerError::Tokenizer(err.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        let weights = read("model.safetensors")?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)?;
        let dimensions = config.hidden_size;
        let bert = BertModel::load(vb, &config)?;
        Ok(EmbeddingModel { bert, tokenizer, device: device.clone(), max_tokens, dimensions })
    }

    /// Token counts per input, used to refuse over-long inputs up front.
    pub fn count_tokens(&self, inputs: &[String]) -> Result<Vec<usize>, WorkerError> {
        inputs
            .iter()
            .map(|input| {
                self.tokenizer
                    .encode(input.as_str(), true)
                    .map(|e| e.get_ids().len())
                    .map_err(|err| WorkerError::Tokenizer(err.to_string()))
            })
            .collect()
    }

    /// Unit-length embeddings, one per input, and the tokens consumed.
    pub fn embed(&self, inputs: &[String]) -> Result<(Vec<Vec<f32>>, usize), WorkerError> {
        if inputs.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let counts = self.count_tokens(inputs)?;
        if let Some((index, count)) = counts.iter().enumerate().find(|(_, c)| **c > self.max_tokens) {
            return Err(WorkerError::InvalidRequest(format!(
                "input[{index}] has {count} tokens; this model takes at most {}",
                self.max_tokens
            )));
        }
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|err| WorkerError::Tokenizer(err.to_string()))?;
        let rows = encodings.len();
        let width = encodings.first().map_or(0, |e| e.get_ids().len());
        let ids: Vec<u32> = encodings.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = encodings.iter().flat_map(|e| e.get_attention_mask().to_vec()).collect();
        let ids = Tensor::from_vec(ids, (rows, width), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, width), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?;
        let lengths = mask_f.sum(1)?;
        let mean = summed.broadcast_div(&lengths)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norms)?;
        Ok((unit.to_vec2::<f32>()?, counts.iter().sum()))
    }
}
