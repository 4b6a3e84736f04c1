//! What the model-backed tests share: the fixtures dir and the real Gemma
//! 3 270M, fetched into the models cache if it is not there yet.

#![allow(dead_code, reason = "each test binary uses its own subset")]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use infermesh_worker::models::ChatModel;

pub fn fixtures() -> PathBuf {
    std::env::var_os("INFERMESH_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
        let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        manifest.join("../../tests/fixtures")
    })
}

pub fn model() -> &'static Arc<ChatModel> {
    static MODEL: OnceLock<Arc<ChatModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = std::env::var_os("INFERMESH_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(infermesh_worker::default_models_dir);
        let gguf = infermesh_worker::fetch::ensure_gemma(&dir).expect("fetch the default chat model");
        Arc::new(ChatModel::load("infermesh/gemma-3-270m", &gguf, &Device::Cpu).expect("load the chat model"))
    })
}
