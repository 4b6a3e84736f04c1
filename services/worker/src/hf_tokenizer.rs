//! Tokenizers from Hugging Face's `tokenizer.json` (with the special tokens
//! named in `tokenizer_config.json` / `generation_config.json`), for models
//! laid out as HF repositories: a GGUF with its tokenizer files beside it.
//! Byte-level BPE (Llama 3, Qwen) and SentencePiece-style vocabularies
//! (`▁` for spaces, `<0xNN>` byte fallback) both map back to raw bytes,
//! so streaming never splits a UTF-8 character.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::WorkerError;

pub struct HfTokenizer {
    inner: Tokenizer,
    /// GPT-2's byte-to-printable mapping, reversed, when the vocabulary is
    /// byte-level.
    byte_level: Option<HashMap<char, u8>>,
    /// Added tokens marked special: they produce no text.
    special: Vec<bool>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub end_of_generation: Vec<u32>,
    pub chat_template: Option<String>,
}

/// GPT-2's table: bytes that are printable map to themselves, the rest to
/// code points from 256 up, in order.
fn bytes_to_unicode() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or('\u{fffd}');
                next += 1;
                c
            };
            (c, b)
        })
        .collect()
}

fn read_json(path: &Path) -> Option<Value> {
    std::fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

/// A token named in tokenizer_config.json: a string or `{"content": ..}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl HfTokenizer {
    /// Loads `tokenizer.json` from `dir`, with the optional config files.
    pub fn from_dir(dir: &Path) -> Result<HfTokenizer, WorkerError> {
        let path = dir.join("tokenizer.json");
        let inner =
            Tokenizer::from_file(&path).map_err(|err| WorkerError::Tokenizer(format!("{}: {err}", path.display())))?;
        let raw = read_json(&path).unwrap_or(Value::Null);
        let is_byte_level = |v: &Value| {
            v.get("type").and_then(Value::as_str) == Some("ByteLevel")
                || v.get("decoders")
                    .and_then(Value::as_array)
                    .is_some_and(|d| d.iter().any(|x| x.get("type").and_then(Value::as_str) == Some("ByteLevel")))
        };
        let byte_level = raw.get("decoder").is_some_and(is_byte_level).then(bytes_to_unicode);
        let vocab_size = inner.get_vocab_size(true);
        let mut special = vec![false; vocab_size];
        for (id, added) in inner.get_added_tokens_decoder() {
            if added.special
                && let Some(slot) = special.get_mut(id as usize)
            {
                *slot = true;
            }
        }
        let config = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
        let id_of = |text: Option<String>| text.and_then(|t| inner.token_to_id(&t));
        let bos = id_of(token_text(config.get("bos_token")));
        let eos = id_of(token_text(config.get("eos_token")));
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        // generation_config.json may list several (Llama 3: <|eot_id|> too).
        if let Some(ids) = read_json(&dir.join("generation_config.json")).and_then(|g| g.get("eos_token_id").cloned()) {
            let listed: Vec<u32> = match ids {
                Value::Number(n) => n.as_u64().into_iter().map(|n| n as u32).collect(),
                Value::Array(items) => items.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
                _ => Vec::new(),
            };
            end_of_generation.extend(listed);
        }
        for marker in ["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            end_of_generation.extend(inner.token_to_id(marker));
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let chat_template = config.get("chat_template").and_then(Value::as_str).map(str::to_owned);
        Ok(HfTokenizer { inner, byte_level, special, bos, eos, end_of_generation, chat_template })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids for `text`; `add_special` lets the post-processor add BOS.
    /// Special-token text in the input is always parsed as special here.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, WorkerError> {
        self.inner
            .encode(text, add_special)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|err| WorkerError::Tokenizer(err.to_string()))
    }

    /// The raw bytes a token stands for in generated text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if self.special.get(id as usize).copied().unwrap_or(false) {
            return Vec::new();
        }
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(table) = &self.byte_level {
            return piece.chars().map(|c| table.get(&c).copied().unwrap_or(b'?')).collect();
        }
        if let Some(byte) =
            piece.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            return vec![byte];
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }

    pub fn decode_special(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE over all 256 bytes plus two merges, in the
    /// tokenizer.json layout Llama 3 and Qwen ship.
    fn write_byte_level(dir: &Path) {
        let table = bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (c, b) in &table {
            vocab.insert(c.to_string(), Value::from(*b));
        }
        let space = table.iter().find(|(_, b)| **b == b' ').map(|(c, _)| *c).unwrap();
        vocab.insert(format!("{space}w"), Value::from(256));
        vocab.insert("he".into(), Value::from(257));
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let tokenizer = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 258, "content": "<|eot|>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": [format!("{space} w"), "h e".to_owned()]}
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|eot|>", "chat_template": "{{ x }}"}"#)
            .unwrap();
    }

    #[test]
    fn byte_level_tokens_map_back_to_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        write_byte_level(dir.path());
        let tokenizer = HfTokenizer::from_dir(dir.path()).unwrap();
        let text = "hello wörld 🎉<|eot|>";
        let ids = tokenizer.encode(text, false).unwrap();
        let eot = tokenizer.eos.unwrap();
        assert_eq!(*ids.last().unwrap(), eot, "special text is parsed as the special token");
        assert!(tokenizer.end_of_generation.contains(&eot));
        let bytes: Vec<u8> = ids.iter().flat_map(|id| tokenizer.token_bytes(*id)).collect();
        assert_eq!(bytes, "hello wörld 🎉".as_bytes());
        assert!(ids.len() < bytes.len(), "merges apply");
        assert_eq!(tokenizer.chat_template.as_deref(), Some("{{ x }}"));
        assert_eq!(tokenizer.decode_special(eot), "<|eot|>");
    }
}
