//! Sentence embeddings with a BERT model (all-MiniLM-L6-v2 by default) from
//! safetensors: mean pooling over real tokens, then L2 normalisation, as
//! sentence-transformers does for this model.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, Tokenizer};
use tokio::sync::{mpsc, oneshot};

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
        let tokens = self.check(inputs)?;
        Ok((self.embed_checked(inputs)?, tokens))
    }

    /// The tokens `inputs` will consume, or why one of them is refused.
    pub fn check(&self, inputs: &[String]) -> Result<usize, WorkerError> {
        let counts = self.count_tokens(inputs)?;
        if let Some((index, count)) = counts.iter().enumerate().find(|(_, c)| **c > self.max_tokens) {
            return Err(WorkerError::InvalidRequest(format!(
                "input[{index}] has {count} tokens; this model takes at most {}",
                self.max_tokens
            )));
        }
        Ok(counts.iter().sum())
    }

    /// Embeddings for inputs that passed [`EmbeddingModel::check`].
    fn embed_checked(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, WorkerError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
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
        Ok(unit.to_vec2::<f32>()?)
    }
}

type EmbedReply = oneshot::Sender<Result<(Vec<Vec<f32>>, usize), WorkerError>>;

struct EmbedJob {
    inputs: Vec<String>,
    reply: EmbedReply,
}

/// Batches embedding requests: whatever arrived while the previous batch
/// ran goes through BERT together (up to `max_inputs` inputs), so many
/// small requests cost about one forward. Each request is validated on its
/// own; a bad input fails only its request.
pub struct EmbedBatcher {
    queue: mpsc::Sender<EmbedJob>,
}

impl EmbedBatcher {
    pub fn start(model: Arc<EmbeddingModel>, max_inputs: usize, max_queued: usize) -> EmbedBatcher {
        let (queue, jobs) = mpsc::channel(max_queued.max(1));
        let spawned =
            std::thread::Builder::new().name("embed-batch".into()).spawn(move || batch_loop(&model, jobs, max_inputs));
        if let Err(err) = spawned {
            tracing::error!(error = %err, "cannot start the embedding batcher");
        }
        EmbedBatcher { queue }
    }

    pub async fn embed(&self, inputs: Vec<String>) -> Result<(Vec<Vec<f32>>, usize), WorkerError> {
        let (reply, answer) = oneshot::channel();
        self.queue.try_send(EmbedJob { inputs, reply }).map_err(|refused| match refused {
            mpsc::error::TrySendError::Full(_) => WorkerError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => WorkerError::ShuttingDown,
        })?;
        answer.await.map_err(|_| WorkerError::ShuttingDown)?
    }
}

fn batch_loop(model: &EmbeddingModel, mut jobs: mpsc::Receiver<EmbedJob>, max_inputs: usize) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        let mut inputs = batch[0].inputs.len();
        while inputs < max_inputs {
            match jobs.try_recv() {
                Ok(job) => {
                    inputs += job.inputs.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let mut accepted = Vec::with_capacity(batch.len());
        for job in batch {
            match model.check(&job.inputs) {
                Ok(tokens) => accepted.push((job, tokens)),
                Err(err) => {
                    let _ = job.reply.send(Err(err));
                }
            }
        }
        let all: Vec<String> = accepted.iter().flat_map(|(job, _)| job.inputs.iter().cloned()).collect();
        match model.embed_checked(&all) {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for (job, tokens) in accepted {
                    let mine: Vec<Vec<f32>> = vectors.by_ref().take(job.inputs.len()).collect();
                    let _ = job.reply.send(Ok((mine, tokens)));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "embedding batch failed");
                for (job, _) in accepted {
                    let _ = job.reply.send(Err(WorkerError::Model(err.to_string())));
                }
            }
        }
    }
}
