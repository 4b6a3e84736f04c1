//! The worker against llama.cpp on the real Gemma 3 270M GGUF: token ids
//! (48 golden strings, 3,000 fuzz strings) and greedy continuations over
//! the prefix where llama.cpp agrees with itself across KV-cache precisions.
//! The model is fetched into the models cache if it is not there yet.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

use serde::Deserialize;

mod common;

use common::{fixtures, model};

#[derive(Deserialize)]
struct TokenCase {
    text: String,
    special: bool,
    ids: Vec<u32>,
}

fn check_tokens(file: &str) {
    let cases: Vec<TokenCase> = serde_json::from_slice(&std::fs::read(fixtures().join(file)).unwrap()).unwrap();
    let tokenizer = &model().tokenizer;
    let mut mismatches = Vec::new();
    for case in &cases {
        let ours = tokenizer.encode(&case.text, true, case.special).unwrap();
        if ours != case.ids {
            mismatches
                .push(format!("{:?} (special={}): llama.cpp {:?}, ours {:?}", case.text, case.special, case.ids, ours));
        }
        // SentencePiece decodes a literal `▁` as a space, as llama.cpp does.
        if !case.special && !case.text.contains('\u{2581}') {
            assert_eq!(tokenizer.decode(&ours), case.text, "decode(encode(x)) != x");
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ from llama.cpp:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn golden_token_ids_equal_llama_cpp() {
    check_tokens("golden_tokens.json");
}

#[test]
fn fuzz_token_ids_equal_llama_cpp() {
    check_tokens("fuzz_tokens.json");
}

#[derive(Deserialize)]
struct GreedyFile {
    cases: Vec<GreedyCase>,
}

#[derive(Deserialize)]
struct GreedyCase {
    prompt: String,
    special: bool,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    common_prefix_len_default_vs_f32kv: usize,
}

/// Feeds llama.cpp's own greedy ids and counts the steps where our argmax
/// picks the same next token (greedy runs drift apart for good after one
/// low-margin step, so this is the stable measure of the forward pass).
/// Over each case's common prefix every argmax must agree.
#[test]
fn teacher_forced_top1_agreement_with_llama_cpp_is_at_least_95_percent() {
    let file: GreedyFile =
        serde_json::from_slice(&std::fs::read(fixtures().join("golden_greedy.json")).unwrap()).unwrap();
    let chat = model();
    let (mut agree, mut total) = (0usize, 0usize);
    for case in &file.cases {
        assert_eq!(
            chat.tokenizer.encode(&case.prompt, true, case.special).unwrap(),
            case.prompt_ids,
            "prompt ids for {:?}",
            case.prompt
        );
        let mut forced = case.prompt_ids.clone();
        forced.extend_from_slice(&case.greedy_ids[..case.greedy_ids.len() - 1]);
        let mut cache = chat.model.new_cache();
        let logits = chat.model.forward(&forced, &mut cache, true).unwrap();
        let first = case.prompt_ids.len() - 1;
        let mut strict_prefix = None;
        for (step, expected) in case.greedy_ids.iter().enumerate() {
            let row = logits.get(first + step).unwrap().to_vec1::<f32>().unwrap();
            let ours = infermesh_worker::sampling::argmax(&row);
            total += 1;
            if ours == *expected {
                agree += 1;
            } else if strict_prefix.is_none() {
                strict_prefix = Some(step);
            }
        }
        eprintln!(
            "{:?}: greedy equal for the first {} of {} steps (llama.cpp self-consistent for {})",
            case.prompt,
            strict_prefix.unwrap_or(case.greedy_ids.len()),
            case.greedy_ids.len(),
            case.common_prefix_len_default_vs_f32kv
        );
        let equal_for = strict_prefix.unwrap_or(case.greedy_ids.len());
        assert!(
            equal_for >= case.common_prefix_len_default_vs_f32kv,
            "{:?}: our argmax departs from llama.cpp's at step {equal_for}, inside the prefix where llama.cpp agrees \
             with itself ({})",
            case.prompt,
            case.common_prefix_len_default_vs_f32kv
        );
    }
    let rate = agree as f64 / total as f64;
    eprintln!("teacher-forced top-1 agreement with llama.cpp: {agree}/{total} = {:.1}%", rate * 100.0);
    assert!(rate >= 0.95, "teacher-forced top-1 agreement {agree}/{total} is below 95%");
}

#[test]
fn chunked_prefill_equals_one_shot_prefill() {
    let chat = model();
    let ids = chat
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog. It was a sunny day in the park.", true, false)
        .unwrap();
    let mut whole = chat.model.new_cache();
    let one_shot = chat.model.forward(&ids, &mut whole, false).unwrap().to_vec1::<f32>().unwrap();
    let mut chunked = chat.model.new_cache();
    let (head, tail) = ids.split_at(ids.len() / 2);
    chat.model.forward(head, &mut chunked, false).unwrap();
    let step = chat.model.forward(tail, &mut chunked, false).unwrap().to_vec1::<f32>().unwrap();
    let max_diff = one_shot.iter().zip(&step).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_diff < 1e-2, "chunked prefill differs by {max_diff}");
}
