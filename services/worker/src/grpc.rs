//! `infermesh.v1.WorkerService`: generation requests go to the model's
//! batch scheduler and stream back through a channel; when the client goes
//! away the channel closes and the sequence leaves the batch at the next
//! step.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use infermesh_proto::v1::worker_service_server::WorkerService;
use infermesh_proto::v1::{
    self as pb, DetokenizeRequest, DetokenizeResponse, EmbedRequest, EmbedResponse, Embedding, GenerateEvent,
    GenerateRequest, TokenizeRequest, TokenizeResponse, generate_event, generate_request, tokenize_request,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::chat::Message;
use crate::embed::EmbedBatcher;
use crate::engine::{self, Batcher, Event, Finish, GenerationParams, Job};
use crate::error::WorkerError;
use crate::models::ChatModel;
use crate::sampling::{SamplingParams, Scored};

pub struct WorkerGrpc {
    /// Each chat model with its own scheduler.
    pub chat: Vec<(Arc<ChatModel>, Batcher)>,
    pub embedding: Option<(String, EmbedBatcher)>,
}

impl WorkerGrpc {
    fn chat_model(&self, name: &str) -> Result<&(Arc<ChatModel>, Batcher), WorkerError> {
        self.chat.iter().find(|(m, _)| m.id == name).ok_or_else(|| WorkerError::UnknownModel(name.to_owned()))
    }
}

fn to_messages(chat: &pb::ChatMessages) -> Vec<Message> {
    chat.messages.iter().map(|m| Message { role: m.role.clone(), content: m.content.clone() }).collect()
}

fn params(request: &GenerateRequest, max_tokens: usize) -> GenerationParams {
    let sampling = request.sampling.clone().unwrap_or_default();
    let mut logit_bias: Vec<(u32, f32)> = sampling.logit_bias.into_iter().collect();
    logit_bias.sort_by_key(|(id, _)| *id);
    GenerationParams {
        max_tokens,
        stop: request.stop.clone(),
        sampling: SamplingParams {
            temperature: sampling.temperature,
            top_p: if sampling.top_p > 0.0 && sampling.top_p < 1.0 { sampling.top_p } else { 1.0 },
            top_k: sampling.top_k as usize,
            min_p: sampling.min_p,
            seed: sampling.seed.unwrap_or_else(rand::random),
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
            repetition_penalty: if sampling.repetition_penalty > 0.0 { sampling.repetition_penalty } else { 1.0 },
            logit_bias,
        },
        n: request.n.max(1) as usize,
        logprobs: request.logprobs.then_some(request.top_logprobs as usize),
        ignore_eos: request.ignore_eos,
    }
}

fn to_proto(event: Event, prompt_tokens: u32, model: &ChatModel) -> GenerateEvent {
    let scored = |s: Scored| {
        let bytes = model.tokenizer.token_bytes(s.id);
        pb::TopLogprob { id: s.id, token: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob: s.logprob }
    };
    let event = match event {
        Event::Delta { index, text, token_ids, logprobs } => generate_event::Event::Delta(pb::Delta {
            text,
            token_ids,
            index: index as u32,
            logprobs: logprobs
                .into_iter()
                .map(|l| pb::TokenLogprob {
                    chosen: Some(scored(l.chosen)),
                    top: l.top.into_iter().map(scored).collect(),
                })
                .collect(),
        }),
        Event::Finished { index, reason, native_reason, completion_tokens } => {
            generate_event::Event::Finished(pb::Finished {
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
                index: index as u32,
            })
        }
    };
    GenerateEvent { event: Some(event) }
}

#[tonic::async_trait]
impl WorkerService for WorkerGrpc {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let request = request.into_inner();
        let (model, batcher) = self.chat_model(&request.model)?;
        let prompt = match &request.prompt {
            Some(generate_request::Prompt::Chat(chat)) => model.chat_prompt(&to_messages(chat))?,
            Some(generate_request::Prompt::Text(text)) => model.text_prompt(text)?,
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
        let (events, receiver) = mpsc::unbounded_channel();
        batcher.submit(Job { prompt, params, events })?;
        let model = model.clone();
        let started = GenerateEvent { event: Some(generate_event::Event::Started(pb::Started { prompt_tokens })) };
        let stream = tokio_stream::once(Ok(started)).chain(
            UnboundedReceiverStream::new(receiver)
                .map(move |event| event.map(|event| to_proto(event, prompt_tokens, &model)).map_err(Status::from)),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let EmbedRequest { model, inputs } = request.into_inner();
        let (vectors, tokens) = match &self.embedding {
            Some((id, batcher)) if *id == model => batcher.embed(inputs).await?,
            _ => return Err(WorkerError::UnknownModel(model).into()),
        };
        Ok(Response::new(EmbedResponse {
            embeddings: vectors.into_iter().map(|values| Embedding { values }).collect(),
            prompt_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
        }))
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let TokenizeRequest { model, input, add_special_tokens } = request.into_inner();
        let (chat, _) = self.chat_model(&model)?;
        let tokens = match input {
            Some(tokenize_request::Input::Text(text)) => chat.tokenizer.encode(&text, add_special_tokens, true)?,
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
        let (chat, _) = self.chat_model(&model)?;
        chat.check_ids(&tokens)?;
        Ok(Response::new(DetokenizeResponse { text: chat.tokenizer.decode(&tokens) }))
    }
}
