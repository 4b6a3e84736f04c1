//! `infermesh.v1.WorkerService`: generation streams from a blocking thread
//! through a channel; when the client goes away the channel closes and
//! generation stops at the next token.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::Stream;
use infermesh_proto::v1::worker_service_server::WorkerService;
use infermesh_proto::v1::{
    self as pb, DetokenizeRequest, DetokenizeResponse, EmbedRequest, EmbedResponse, Embedding, GenerateEvent,
    GenerateRequest, TokenizeRequest, TokenizeResponse, generate_event, generate_request, tokenize_request,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::chat::Message;
use crate::embed::EmbeddingModel;
use crate::engine::{self, Event, Finish, GenerationParams};
use crate::error::WorkerError;
use crate::models::ChatModel;

pub struct Load {
    pub active: AtomicU32,
    pub queued: AtomicU32,
}

pub struct WorkerGrpc {
    pub chat: Option<Arc<ChatModel>>,
    pub embedding: Option<(String, Arc<EmbeddingModel>)>,
    pub permits: Arc<Semaphore>,
    pub load: Arc<Load>,
}

impl WorkerGrpc {
    fn chat_model(&self, name: &str) -> Result<Arc<ChatModel>, WorkerError> {
        self.chat.clone().filter(|m| m.id == name).ok_or_else(|| WorkerError::UnknownModel(name.to_owned()))
    }
}

fn to_messages(chat: &pb::ChatMessages) -> Vec<Message> {
    chat.messages.iter().map(|m| Message { role: m.role.clone(), content: m.content.clone() }).collect()
}

fn params(request: &GenerateRequest, max_tokens: usize) -> GenerationParams {
    let sampling = request.sampling.unwrap_or_default();
    GenerationParams {
        max_tokens,
        temperature: f64::from(sampling.temperature),
        top_p: (sampling.top_p > 0.0 && sampling.top_p < 1.0).then_some(f64::from(sampling.top_p)),
        top_k: (sampling.top_k > 0).then_some(sampling.top_k as usize),
        seed: sampling.seed.unwrap_or_else(rand::random),
        stop: request.stop.clone(),
        frequency_penalty: sampling.frequency_penalty,
        presence_penalty: sampling.presence_penalty,
    }
}

fn to_proto(event: Event, prompt_tokens: u32) -> GenerateEvent {
    let event = match event {
        Event::Delta { text, token_ids } => generate_event::Event::Delta(pb::Delta { text, token_ids }),
        Event::Finished { reason, native_reason, completion_tokens } => generate_event::Event::Finished(pb::Finished {
            reason: match reason {
                Finish::Stop => pb::FinishReason::Stop,
                Finish::Length => pb::FinishReason::Length,
            }
            .into(),
            native_reason,
            usage: Some(pb::Usage {
                prompt_tokens,
                completion_tokens: u32::try_from(completion_tokens).unwrap_or(u32::MAX),
            }),
        }),
    };
    GenerateEvent { event: Some(event) }
}

#[tonic::async_trait]
impl WorkerService for WorkerGrpc {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let request = request.into_inner();
        let model = self.chat_model(&request.model)?;
        let prompt = match &request.prompt {
            Some(generate_request::Prompt::Chat(chat)) => model.chat_prompt(&to_messages(chat))?,
            Some(generate_request::Prompt::Text(text)) => model.text_prompt(text),
            Some(generate_request::Prompt::Tokens(tokens)) => {
                model.check_ids(&tokens.ids)?;
                tokens.ids.clone()
            }
            None => return Err(WorkerError::InvalidRequest("a prompt is required".into()).into()),
        };
        let max_tokens =
            engine::budget(prompt.len(), request.max_tokens as usize, model.context_length(), request.fit_to_context)?;
        let params = params(&request, max_tokens);
        let prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        let (tx, rx) = mpsc::channel(64);
        let _ = tx
            .send(Ok(GenerateEvent { event: Some(generate_event::Event::Started(pb::Started { prompt_tokens })) }))
            .await;
        let permits = self.permits.clone();
        let load = self.load.clone();
        tokio::spawn(async move {
            load.queued.fetch_add(1, Ordering::Relaxed);
            let permit = permits.acquire_owned().await;
            load.queued.fetch_sub(1, Ordering::Relaxed);
            let Ok(permit) = permit else {
                let _ = tx.send(Err(WorkerError::ShuttingDown.into())).await;
                return;
            };
            load.active.fetch_add(1, Ordering::Relaxed);
            let worker_tx = tx.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                engine::generate(&model.model, &model.tokenizer, &prompt, &params, |event| {
                    worker_tx.blocking_send(Ok(to_proto(event, prompt_tokens))).is_ok()
                })
            })
            .await;
            load.active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            let error = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(err)) => Status::from(err),
                Err(join) => Status::internal(format!("generation task failed: {join}")),
            };
            let _ = tx.send(Err(error)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let EmbedRequest { model, inputs } = request.into_inner();
        let embedding = match &self.embedding {
            Some((id, embedding)) if *id == model => embedding.clone(),
            _ => return Err(WorkerError::UnknownModel(model).into()),
        };
        let _permit = self.permits.acquire().await.map_err(|_| Status::from(WorkerError::ShuttingDown))?;
        let (vectors, tokens) = tokio::task::spawn_blocking(move || embedding.embed(&inputs))
            .await
            .map_err(|join| Status::internal(format!("embedding task failed: {join}")))??;
        Ok(Response::new(EmbedResponse {
            embeddings: vectors.into_iter().map(|values| Embedding { values }).collect(),
            prompt_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
        }))
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let TokenizeRequest { model, input, add_special_tokens } = request.into_inner();
        let chat = self.chat_model(&model)?;
        let tokens = match input {
            Some(tokenize_request::Input::Text(text)) => chat.tokenizer.encode(&text, add_special_tokens, true),
            // The chat template places BOS and turn markers itself.
            Some(tokenize_request::Input::Chat(messages)) => chat.chat_prompt(&to_messages(&messages))?,
            None => return Err(WorkerError::InvalidRequest("send a prompt or messages to tokenize".into()).into()),
        };
        Ok(Response::new(TokenizeResponse {
            tokens,
            max_model_len: u32::try_from(chat.context_length()).unwrap_or(u32::MAX),
        }))
    }

    async fn detokenize(&self, request: Request<DetokenizeRequest>) -> Result<Response<DetokenizeResponse>, Status> {
        let DetokenizeRequest { model, tokens } = request.into_inner();
        let chat = self.chat_model(&model)?;
        chat.check_ids(&tokens)?;
        Ok(Response::new(DetokenizeResponse { text: chat.tokenizer.decode(&tokens) }))
    }
}
