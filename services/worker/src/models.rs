//! The models a worker has loaded, shared by every request.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file;

use crate::chat::{ChatTemplate, Message};
use crate::error::WorkerError;
use crate::hf_tokenizer::HfTokenizer;
use crate::tokenizer::{SpmTokenizer, TextTokenizer};
use crate::transformer::Transformer;

pub struct ChatModel {
    pub id: String,
    pub model: Transformer,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
}

impl ChatModel {
    pub fn load(id: &str, gguf: &Path, device: &Device) -> Result<ChatModel, WorkerError> {
        let mut file = std::fs::File::open(gguf).map_err(WorkerError::io(gguf))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|err| WorkerError::Model(format!("{}: {err}", gguf.display())))?;
        // A tokenizer.json beside the GGUF (an HF repository layout) wins:
        // it is the model's own; otherwise the GGUF's vocabulary.
        let dir = gguf.parent().unwrap_or(Path::new("."));
        let (tokenizer, hf_template) = if dir.join("tokenizer.json").is_file() {
            let hf = HfTokenizer::from_dir(dir)?;
            let template = hf.chat_template.clone();
            (TextTokenizer::Hf(Box::new(hf)), template)
        } else {
            (TextTokenizer::Spm(Box::new(SpmTokenizer::from_gguf(&content)?)), None)
        };
        let model = Transformer::from_gguf(&content, &mut file, device)?;
        let template_source =
            content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned().or(hf_template);
        let token_text = |id: Option<u32>| id.map(|id| tokenizer.decode_special(id)).unwrap_or_default();
        let template = ChatTemplate::new(template_source, token_text(tokenizer.bos()), token_text(tokenizer.eos()))?;
        Ok(ChatModel { id: id.to_owned(), model, tokenizer, template })
    }

    pub fn context_length(&self) -> usize {
        self.model.config.context_length
    }

    /// Prompt ids for chat messages: the template adds BOS itself.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, WorkerError> {
        let text = self.template.render(messages)?;
        self.tokenizer.encode(&text, false, true)
    }

    /// Prompt ids for raw text, as llama.cpp's server tokenizes it.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, WorkerError> {
        self.tokenizer.encode(text, true, true)
    }

    pub fn check_ids(&self, ids: &[u32]) -> Result<(), WorkerError> {
        let vocab = self.tokenizer.vocab_size();
        match ids.iter().find(|id| **id as usize >= vocab) {
            Some(bad) => {
                Err(WorkerError::InvalidRequest(format!("token id {bad} is outside the vocabulary (size {vocab})")))
            }
            None => Ok(()),
        }
    }
}

pub type SharedChat = Arc<ChatModel>;
