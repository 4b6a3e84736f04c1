//! The SentencePiece (SPM) tokenizer built from a GGUF's own vocabulary,
//! a port of llama.cpp's `llm_tokenizer_spm` so our ids equal its ids:
//!
//! 1. special-token partition: control, unknown and user-defined tokens
//!    (longest first) split the raw text; user-defined ones always,
//!    control ones only when `parse_special`;
//! 2. each remaining fragment has its spaces escaped to `▁` and is split
//!    into UTF-8 characters, then adjacent pairs are merged best-score
//!    first (ties: leftmost) while the merged text is a vocabulary entry;
//! 3. symbols that are not tokens are re-split along the merges that made
//!    them, down to `<0xNN>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file;

use crate::error::WorkerError;

const SPACE_ESCAPE: &str = "\u{2581}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_gguf(code: i64) -> TokenKind {
        match code {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

/// Token bytes joined, then read as UTF-8 (invalid sequences replaced).
fn decode_with(ids: &[u32], token_bytes: impl Fn(u32) -> Vec<u8>) -> String {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| token_bytes(*id)).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[derive(Debug)]
pub struct SpmTokenizer {
    texts: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<TokenKind>,
    by_text: HashMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    /// Control, unknown and user-defined tokens, longest text first.
    specials: Vec<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    add_space_prefix: bool,
    /// Tokens that end generation (eos plus e.g. Gemma's `<end_of_turn>`).
    pub end_of_generation: Vec<u32>,
}

fn metadata<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    content.metadata.get(key)
}

fn as_u32(value: Option<&gguf_file::Value>) -> Option<u32> {
    value.and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().and_then(|i| u32::try_from(i).ok())))
}

impl SpmTokenizer {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<SpmTokenizer, WorkerError> {
        let bad = |what: &str| WorkerError::Model(format!("GGUF tokenizer: {what}"));
        let model = metadata(content, "tokenizer.ggml.model").and_then(|v| v.to_string().ok().cloned());
        if model.as_deref() != Some("llama") {
            return Err(bad(&format!(
                "unsupported tokenizer model {model:?}; only SentencePiece (\"llama\") is supported"
            )));
        }
        let tokens = metadata(content, "tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| bad("missing tokenizer.ggml.tokens"))?;
        let texts: Vec<String> = tokens
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| bad("a token is not a string")))
            .collect::<Result<_, _>>()?;
        let scores: Vec<f32> = match metadata(content, "tokenizer.ggml.scores").and_then(|v| v.to_vec().ok()) {
            Some(values) => values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
            None => vec![0.0; texts.len()],
        };
        let kinds: Vec<TokenKind> = match metadata(content, "tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            Some(values) => values.iter().map(|v| TokenKind::from_gguf(v.to_i32().map_or(1, i64::from))).collect(),
            None => vec![TokenKind::Normal; texts.len()],
        };
        if scores.len() != texts.len() || kinds.len() != texts.len() {
            return Err(bad("tokens, scores and token types differ in length"));
        }
        let flag = |key: &str, default: bool| metadata(content, key).and_then(|v| v.to_bool().ok()).unwrap_or(default);
        let bos = as_u32(metadata(content, "tokenizer.ggml.bos_token_id"));
        let eos = as_u32(metadata(content, "tokenizer.ggml.eos_token_id"));
        Ok(Self::new(
            texts,
            scores,
            kinds,
            bos,
            eos,
            flag("tokenizer.ggml.add_bos_token", true),
            flag("tokenizer.ggml.add_space_prefix", true),
        ))
    }

    pub fn new(
        texts: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<TokenKind>,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        add_space_prefix: bool,
    ) -> SpmTokenizer {
        let mut by_text = HashMap::with_capacity(texts.len());
        let mut byte_tokens = [None; 256];
        let mut specials = Vec::new();
        for (id, text) in texts.iter().enumerate() {
            let id = id as u32;
            // Later ids win on duplicate texts, as in llama.cpp.
            by_text.insert(text.clone(), id);
            match kinds[id as usize] {
                TokenKind::Byte => {
                    if let Some(byte) = text
                        .strip_prefix("<0x")
                        .and_then(|t| t.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        byte_tokens[usize::from(byte)] = Some(id);
                    }
                }
                TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined if !text.is_empty() => {
                    specials.push(id)
                }
                _ => {}
            }
        }
        specials.sort_by(|a, b| texts[*b as usize].len().cmp(&texts[*a as usize].len()).then(a.cmp(b)));
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for name in ["<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>"] {
            if let Some(&id) = by_text.get(name)
                && !end_of_generation.contains(&id)
            {
                end_of_generation.push(id);
            }
        }
        SpmTokenizer {
            texts,
            scores,
            kinds,
            by_text,
            byte_tokens,
            specials,
            bos,
            eos,
            add_bos,
            add_space_prefix,
            end_of_generation,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    /// Token ids for `text`; with `add_special`, BOS first when the model
    /// wants it; with `parse_special`, control-token text becomes the token.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut output = Vec::new();
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            output.push(bos);
        }
        let mut previous_was_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    output.push(id);
                    previous_was_special = true;
                }
                Fragment::Text(raw) => {
                    let mut text = String::with_capacity(raw.len() + 3);
                    if self.add_space_prefix && previous_was_special {
                        text.push(' ');
                    }
                    text.push_str(raw);
                    let escaped = text.replace(' ', SPACE_ESCAPE);
                    self.encode_fragment(&escaped, &mut output);
                    previous_was_special = false;
                }
            }
        }
        output
    }

    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = vec![Fragment::Text(text)];
        for &id in &self.specials {
            let kind = self.kinds[id as usize];
            if !parse_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
                continue;
            }
            let needle = self.texts[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + needle.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    fn encode_fragment(&self, text: &str, output: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (index, (start, ch)) in text.char_indices().enumerate() {
            let end = start + ch.len_utf8();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: index as isize - 1,
                next: if end == text.len() { -1 } else { index as isize + 1 },
            });
        }
        let mut queue = BinaryHeap::new();
        let mut rev_merge: HashMap<&str, (usize, usize)> = HashMap::new();
        for right in 1..symbols.len() {
            self.try_add_bigram(text, &symbols, right - 1, right as isize, &mut queue, &mut rev_merge);
        }
        while let Some(bigram) = queue.pop() {
            let (left_len, right_len) = (symbols[bigram.left].len, symbols[bigram.right].len);
            if left_len == 0 || right_len == 0 || left_len + right_len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += right_len;
            symbols[bigram.right].len = 0;
            let right_next = symbols[bigram.right].next;
            symbols[bigram.left].next = right_next;
            if right_next >= 0 {
                symbols[right_next as usize].prev = bigram.left as isize;
            }
            let left_prev = symbols[bigram.left].prev;
            if left_prev >= 0 {
                self.try_add_bigram(
                    text,
                    &symbols,
                    left_prev as usize,
                    bigram.left as isize,
                    &mut queue,
                    &mut rev_merge,
                );
            }
            self.try_add_bigram(text, &symbols, bigram.left, right_next, &mut queue, &mut rev_merge);
        }
        let mut index: isize = if symbols.is_empty() { -1 } else { 0 };
        while index >= 0 {
            let symbol = symbols[index as usize];
            self.resegment(text, &symbols, symbol, &rev_merge, output);
            index = symbol.next;
        }
    }

    fn try_add_bigram<'t>(
        &self,
        text: &'t str,
        symbols: &[Symbol],
        left: usize,
        right: isize,
        queue: &mut BinaryHeap<Bigram>,
        rev_merge: &mut HashMap<&'t str, (usize, usize)>,
    ) {
        if right < 0 {
            return;
        }
        let right = right as usize;
        let start = symbols[left].start;
        let size = symbols[left].len + symbols[right].len;
        let Some(merged) = text.get(start..start + size) else {
            return;
        };
        let Some(&id) = self.by_text.get(merged) else {
            return;
        };
        queue.push(Bigram { left, right, score: self.scores[id as usize], size });
        rev_merge.insert(merged, (left, right));
    }

    fn resegment(
        &self,
        text: &str,
        symbols: &[Symbol],
        symbol: Symbol,
        rev_merge: &HashMap<&str, (usize, usize)>,
        output: &mut Vec<u32>,
    ) {
        let piece = &text[symbol.start..symbol.start + symbol.len];
        if let Some(&id) = self.by_text.get(piece) {
            output.push(id);
            return;
        }
        match rev_merge.get(piece) {
            Some(&(left, right)) => {
                self.resegment(text, symbols, symbols[left], rev_merge, output);
                self.resegment(text, symbols, symbols[right], rev_merge, output);
            }
            None => {
                for byte in piece.bytes() {
                    if let Some(id) = self.byte_tokens[usize::from(byte)] {
                        output.push(id);
                    }
                }
            }
        }
    }

    /// The bytes a token stands for in generated text (control tokens and
    /// unused ones produce nothing).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.texts.get(id as usize) else {
            return Vec::new();
        };
        match self.kinds[id as usize] {
            TokenKind::Normal => text.replace(SPACE_ESCAPE, " ").into_bytes(),
            TokenKind::UserDefined => text.clone().into_bytes(),
            TokenKind::Byte => text
                .strip_prefix("<0x")
                .and_then(|t| t.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map(|b| vec![b])
                .unwrap_or_default(),
            TokenKind::Control | TokenKind::Unknown | TokenKind::Unused => Vec::new(),
        }
    }

    /// A token's text including control tokens, e.g. `<end_of_turn>`.
    pub fn decode_special(&self, id: u32) -> String {
        self.texts.get(id as usize).cloned().unwrap_or_default()
    }

    /// The text of a whole id sequence (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        decode_with(ids, |id| self.token_bytes(id))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

#[derive(Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Highest score first; on a tie, the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

/// Turns token bytes into text deltas that never split a UTF-8 character:
/// bytes of an unfinished character wait for the next token.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(err) => match err.error_len() {
                // An incomplete character at the end: keep it for later.
                None => err.valid_up_to(),
                // Bytes that can never become valid: emit them replaced.
                Some(_) => self.pending.len(),
            },
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Whatever is left at the end of generation.
    pub fn finish(&mut self) -> String {
        let out = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A chat model's tokenizer: llama.cpp's SentencePiece from the GGUF, or
/// Hugging Face's `tokenizer.json` when the model directory has one.
pub enum TextTokenizer {
    Spm(Box<SpmTokenizer>),
    Hf(Box<crate::hf_tokenizer::HfTokenizer>),
}

impl TextTokenizer {
    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Spm(t) => t.vocab_size(),
            TextTokenizer::Hf(t) => t.vocab_size(),
        }
    }

    /// Ids for `text`: `add_special` adds BOS; `parse_special` reads
    /// special-token text as those tokens (always, with tokenizer.json).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, WorkerError> {
        match self {
            TextTokenizer::Spm(t) => Ok(t.encode(text, add_special, parse_special)),
            TextTokenizer::Hf(t) => t.encode(text, add_special),
        }
    }

    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self {
            TextTokenizer::Spm(t) => t.token_bytes(id),
            TextTokenizer::Hf(t) => t.token_bytes(id),
        }
    }

    pub fn decode_special(&self, id: u32) -> String {
        match self {
            TextTokenizer::Spm(t) => t.decode_special(id),
            TextTokenizer::Hf(t) => t.decode_special(id),
        }
    }

    /// The text of a whole id sequence (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        decode_with(ids, |id| self.token_bytes(id))
    }

    pub fn bos(&self) -> Option<u32> {
        match self {
            TextTokenizer::Spm(t) => t.bos,
            TextTokenizer::Hf(t) => t.bos,
        }
    }

    pub fn eos(&self) -> Option<u32> {
        match self {
            TextTokenizer::Spm(t) => t.eos,
            TextTokenizer::Hf(t) => t.eos,
        }
    }

    /// Tokens that end generation.
    pub fn end_of_generation(&self) -> &[u32] {
        match self {
            TextTokenizer::Spm(t) => &t.end_of_generation,
            TextTokenizer::Hf(t) => &t.end_of_generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> SpmTokenizer {
        let mut texts: Vec<String> =
            vec!["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n\n", "▁", "a", "b", "ab", "▁ab", "c"]
                .into_iter()
                .map(str::to_owned)
                .collect();
        let mut kinds = vec![
            TokenKind::Control,
            TokenKind::Control,
            TokenKind::Control,
            TokenKind::Control,
            TokenKind::Control,
            TokenKind::UserDefined,
        ];
        kinds.extend([TokenKind::Normal; 6]);
        let mut scores = vec![0.0; texts.len()];
        scores[9] = -1.0;
        scores[10] = -0.5;
        for byte in 0..=255u8 {
            texts.push(format!("<0x{byte:02X}>"));
            kinds.push(TokenKind::Byte);
            scores.push(0.0);
        }
        SpmTokenizer::new(texts, scores, kinds, Some(2), Some(1), true, false)
    }

    #[test]
    fn merges_best_pair_first_and_falls_back_to_bytes() {
        let tok = toy();
        assert_eq!(tok.encode(" ab", false, false), vec![10]);
        assert_eq!(tok.encode("abc", true, false), vec![2, 9, 11]);
        // "é" is not in the vocabulary: two byte tokens.
        let ids = tok.encode("é", false, false);
        assert_eq!(ids.len(), 2);
        assert_eq!(tok.decode(&ids), "é");
    }

    #[test]
    fn user_defined_tokens_split_always_control_tokens_only_when_asked() {
        let tok = toy();
        assert_eq!(tok.encode("a\n\nb", false, false), vec![7, 5, 8]);
        let literal = tok.encode("<start_of_turn>", false, false);
        assert!(literal.len() > 1);
        assert_eq!(tok.encode("<start_of_turn>", false, true), vec![4]);
        assert_eq!(tok.decode(&[4, 7]), "a");
    }

    #[test]
    fn utf8_stream_never_emits_half_a_character() {
        let mut stream = Utf8Stream::default();
        let bytes = "é🙂".as_bytes();
        assert_eq!(stream.push(&bytes[..1]), "");
        assert_eq!(stream.push(&bytes[1..3]), "é");
        assert_eq!(stream.push(&bytes[3..5]), "");
        assert_eq!(stream.push(&bytes[5..]), "🙂");
        assert_eq!(stream.finish(), "");
    }
}
