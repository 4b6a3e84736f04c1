//! The model catalogue: ids, aliases, prices, limits, capabilities. Loaded
//! from TOML (the built-in default is [`DEFAULT_CATALOG`]); prices are in
//! dollars per million tokens there and nano-dollars inside.

use infermesh_proto::v1::{Backend, Model, ModelKind, Pricing};
use infermesh_service::MeshError;
use infermesh_service::models::find_model;
use infermesh_service::money::dollars_to_nanos;
use serde::Deserialize;

use crate::error::RegistryError;

pub const DEFAULT_CATALOG: &str = r#"
[[models]]
id = "infermesh/gemma-3-270m"
aliases = ["gemma-3-270m"]
owned_by = "google"
kind = "chat"
description = "Gemma 3 270M (Q4_K_M GGUF) on infermesh workers"
context_length = 32768
max_output_tokens = 8192
capabilities = ["chat", "completions", "streaming"]
pricing = { prompt = 0.03, completion = 0.06 }

[[models]]
id = "infermesh/all-minilm-l6-v2"
aliases = ["all-minilm-l6-v2"]
owned_by = "sentence-transformers"
kind = "embedding"
description = "all-MiniLM-L6-v2 sentence embeddings, 384 dimensions"
context_length = 512
max_output_tokens = 0
capabilities = ["embeddings"]
pricing = { prompt = 0.005, completion = 0.0 }
"#;

/// Other top-level tables (plans, limits) belong to other services; a
/// file without `[[models]]` keeps the built-in catalogue.
#[derive(Debug, Deserialize)]
struct CatalogFile {
    models: Option<Vec<ModelEntry>>,
}

/// One model as the catalogue file and `PUT /admin/v1/models/{id}` spell
/// it (prices in dollars per million tokens).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    /// Optional in a PUT body, whose path names the model.
    #[serde(default)]
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    /// Defaults to the id's owner.
    #[serde(default)]
    owned_by: String,
    #[serde(default = "chat")]
    kind: String,
    #[serde(default)]
    description: String,
    context_length: u32,
    /// Defaults to the context length.
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    capabilities: Vec<String>,
    pricing: PriceEntry,
    /// Defaults to this mesh's workers alone.
    #[serde(default)]
    backends: Vec<BackendEntry>,
    /// Plans that include the model, besides those whose patterns name it.
    #[serde(default)]
    plans: Vec<String>,
}

fn chat() -> String {
    "chat".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    prompt: f64,
    completion: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    api_key_env: String,
    #[serde(default)]
    api_key_file: String,
    #[serde(default)]
    api_key: String,
    #[serde(default)]
    timeout_ms: Option<u32>,
}

/// Backend kinds.
pub const WORKERS: &str = "workers";
pub const OPENAI_COMPATIBLE: &str = "openai_compatible";
/// The provider name of this mesh's own workers.
pub const WORKERS_PROVIDER: &str = "infermesh";
const DEFAULT_UPSTREAM_TIMEOUT_MS: u32 = 60_000;

fn model_of(entry: ModelEntry, created_unix: i64) -> Result<Model, RegistryError> {
    let id = entry.id;
    let bad = |field: &str, why: &str| RegistryError::Config(format!("model {id:?}: {field} {why}"));
    let Some((owner, name)) = id.split_once('/') else {
        return Err(bad("id", "must be owner/name"));
    };
    if owner.is_empty() || name.is_empty() || id.chars().any(char::is_whitespace) {
        return Err(bad("id", "must be owner/name"));
    }
    let kind = match entry.kind.as_str() {
        "chat" => ModelKind::Chat,
        "embedding" => ModelKind::Embedding,
        _ => return Err(bad("kind", "must be \"chat\" or \"embedding\"")),
    };
    if entry.context_length == 0 {
        return Err(bad("context_length", "must be positive"));
    }
    let price = |dollars: f64, field: &str| {
        dollars_to_nanos(dollars).filter(|n| *n >= 0).ok_or_else(|| bad(field, "must be a non-negative number"))
    };
    let pricing = Pricing {
        prompt_nanos_per_mtok: price(entry.pricing.prompt, "pricing.prompt")?,
        completion_nanos_per_mtok: price(entry.pricing.completion, "pricing.completion")?,
    };
    let mut backends = Vec::with_capacity(entry.backends.len().max(1));
    for (index, backend) in entry.backends.into_iter().enumerate() {
        let field = |name: &str| format!("backends[{index}].{name}");
        let backend = match backend.kind.as_str() {
            WORKERS => Backend {
                kind: WORKERS.to_owned(),
                name: if backend.name.is_empty() { WORKERS_PROVIDER.to_owned() } else { backend.name },
                ..Backend::default()
            },
            OPENAI_COMPATIBLE => {
                let base_url = backend.base_url.trim_end_matches('/').to_owned();
                let Some(host) = base_url.strip_prefix("http://").or_else(|| base_url.strip_prefix("https://")) else {
                    return Err(bad(&field("base_url"), "must be an http:// or https:// URL"));
                };
                let host = host.split(['/', ':']).next().unwrap_or_default().to_owned();
                if host.is_empty() {
                    return Err(bad(&field("base_url"), "must name a host"));
                }
                let keys = [&backend.api_key_env, &backend.api_key_file, &backend.api_key];
                if keys.iter().filter(|k| !k.is_empty()).count() > 1 {
                    return Err(bad(&field("api_key"), "give at most one of api_key_env, api_key_file, api_key"));
                }
                if backend.timeout_ms == Some(0) {
                    return Err(bad(&field("timeout_ms"), "must be positive"));
                }
                Backend {
                    kind: OPENAI_COMPATIBLE.to_owned(),
                    name: if backend.name.is_empty() { host } else { backend.name },
                    base_url,
                    model: if backend.model.is_empty() { name.to_owned() } else { backend.model },
                    api_key_env: backend.api_key_env,
                    api_key_file: backend.api_key_file,
                    api_key: backend.api_key,
                    timeout_ms: backend.timeout_ms.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_MS),
                }
            }
            _ => return Err(bad(&field("kind"), "must be \"workers\" or \"openai_compatible\"")),
        };
        backends.push(backend);
    }
    if backends.is_empty() {
        backends.push(Backend { kind: WORKERS.to_owned(), name: WORKERS_PROVIDER.to_owned(), ..Backend::default() });
    }
    let mut aliases = entry.aliases;
    // The bare name always resolves.
    if !aliases.iter().any(|a| a == name) {
        aliases.push(name.to_owned());
    }
    Ok(Model {
        aliases,
        owned_by: if entry.owned_by.is_empty() { owner.to_owned() } else { entry.owned_by },
        kind: kind.into(),
        context_length: entry.context_length,
        max_output_tokens: entry.max_output_tokens.unwrap_or(entry.context_length),
        capabilities: entry.capabilities,
        pricing: Some(pricing),
        created_unix,
        description: entry.description,
        backends,
        plans: entry.plans,
        id,
    })
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: Vec<Model>,
}

impl Catalog {
    /// Parses and validates a catalogue; errors name the bad model and field.
    pub fn from_toml(text: &str, created_unix: i64) -> Result<Catalog, RegistryError> {
        let file: CatalogFile = toml::from_str(text).map_err(|err| RegistryError::Config(err.to_string()))?;
        let Some(entries) = file.models else {
            return Catalog::from_toml(DEFAULT_CATALOG, created_unix);
        };
        let models = entries.into_iter().map(|entry| model_of(entry, created_unix)).collect::<Result<_, _>>()?;
        let catalog = Catalog { models };
        catalog.check_unique_names()?;
        Ok(catalog)
    }

    /// The model `id` as a PUT body (JSON) spells it, validated.
    pub fn model_from_json(id: &str, spec_json: &str, created_unix: i64) -> Result<Model, RegistryError> {
        let mut entry: ModelEntry =
            serde_json::from_str(spec_json).map_err(|err| RegistryError::Config(format!("model {id:?}: {err}")))?;
        if !entry.id.is_empty() && entry.id != id {
            return Err(RegistryError::Config(format!(
                "model {id:?}: the body's id {:?} differs from the path's",
                entry.id
            )));
        }
        entry.id = id.to_owned();
        model_of(entry, created_unix)
    }

    /// Adds `model`, or replaces the model with its id; refused when one of
    /// its names belongs to another model.
    pub fn put(&mut self, model: Model) -> Result<(), RegistryError> {
        let mut next = self.clone();
        match next.models.iter_mut().find(|m| m.id == model.id) {
            Some(existing) => *existing = model,
            None => next.models.push(model),
        }
        next.check_unique_names()?;
        *self = next;
        Ok(())
    }

    /// Removes the model with this exact id; false when there was none.
    pub fn remove(&mut self, id: &str) -> bool {
        let before = self.models.len();
        self.models.retain(|m| m.id != id);
        self.models.len() != before
    }

    fn check_unique_names(&self) -> Result<(), RegistryError> {
        let mut seen = std::collections::HashSet::new();
        for model in &self.models {
            let own: std::collections::BTreeSet<String> =
                std::iter::once(&model.id).chain(&model.aliases).map(|n| n.to_ascii_lowercase()).collect();
            for name in own {
                if !seen.insert(name.clone()) {
                    return Err(RegistryError::Config(format!("name {name:?} is used by two models")));
                }
            }
        }
        Ok(())
    }

    pub fn models(&self) -> &[Model] {
        &self.models
    }

    /// Finds a model by id or alias, case-insensitively.
    pub fn resolve(&self, name: &str) -> Result<&Model, MeshError> {
        find_model(&self.models, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_catalog_resolves_ids_aliases_and_bare_names() {
        let catalog = Catalog::from_toml(DEFAULT_CATALOG, 0).unwrap();
        assert_eq!(catalog.models().len(), 2);
        for name in ["infermesh/gemma-3-270m", "gemma-3-270m", "GEMMA-3-270M"] {
            assert_eq!(catalog.resolve(name).unwrap().id, "infermesh/gemma-3-270m");
        }
        assert_eq!(catalog.resolve("all-minilm-l6-v2").unwrap().id, "infermesh/all-minilm-l6-v2");
        let gemma = catalog.resolve("gemma-3-270m").unwrap();
        assert_eq!(gemma.pricing.unwrap().prompt_nanos_per_mtok, 30_000_000);
        let err = catalog.resolve("gpt-9").unwrap_err();
        assert!(err.message.contains("infermesh/gemma-3-270m"));
        assert!(gemma.backends.iter().all(|b| b.kind == WORKERS && b.name == WORKERS_PROVIDER));
    }

    #[test]
    fn the_example_config_spells_out_the_built_in_catalogue() {
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/infermesh.example.toml"))
                .unwrap();
        assert_eq!(
            Catalog::from_toml(&example, 0).unwrap().models(),
            Catalog::from_toml(DEFAULT_CATALOG, 0).unwrap().models()
        );
    }

    #[test]
    fn a_config_without_models_keeps_the_built_in_catalogue() {
        let catalog = Catalog::from_toml("default_plan = \"free\"\n[[plans]]\nid = \"free\"\n", 0).unwrap();
        assert_eq!(catalog.models().len(), 2);
    }

    #[test]
    fn bad_entries_name_the_field() {
        let bad = DEFAULT_CATALOG.replace("kind = \"chat\"", "kind = \"video\"");
        let err = Catalog::from_toml(&bad, 0).unwrap_err().to_string();
        assert!(err.contains("kind") && err.contains("gemma"), "{err}");
        let bad = DEFAULT_CATALOG.replace("prompt = 0.03", "prompt = -1.0");
        assert!(Catalog::from_toml(&bad, 0).unwrap_err().to_string().contains("pricing.prompt"));
        let dup = DEFAULT_CATALOG.replace(r#"aliases = ["all-minilm-l6-v2"]"#, r#"aliases = ["GEMMA-3-270m"]"#);
        assert_ne!(dup, DEFAULT_CATALOG, "the test must introduce a duplicate");
        let err = Catalog::from_toml(&dup, 0).unwrap_err().to_string();
        assert!(err.contains("used by two models"), "{err}");
    }

    #[test]
    fn run_time_edits_add_replace_and_remove_models() {
        let mut catalog = Catalog::from_toml(DEFAULT_CATALOG, 0).unwrap();
        let spec = r#"{"aliases": ["mini"], "context_length": 128000, "max_output_tokens": 16384,
            "capabilities": ["chat", "streaming", "tools"], "pricing": {"prompt": 0.15, "completion": 0.6},
            "backends": [{"kind": "openai_compatible", "name": "openai", "base_url": "https://api.openai.com/v1/",
                          "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}, {"kind": "workers"}]}"#;
        let model = Catalog::model_from_json("openai/gpt-4o-mini", spec, 7).unwrap();
        assert_eq!(model.owned_by, "openai");
        assert_eq!(model.aliases, ["mini", "gpt-4o-mini"]);
        assert_eq!(model.backends[0].base_url, "https://api.openai.com/v1");
        assert_eq!(model.backends[0].timeout_ms, DEFAULT_UPSTREAM_TIMEOUT_MS);
        assert_eq!(model.backends[1].name, WORKERS_PROVIDER);
        catalog.put(model).unwrap();
        assert_eq!(catalog.resolve("MINI").unwrap().id, "openai/gpt-4o-mini");
        let cheaper = spec.replace("0.15", "0.1");
        catalog.put(Catalog::model_from_json("openai/gpt-4o-mini", &cheaper, 8).unwrap()).unwrap();
        assert_eq!(catalog.models().len(), 3);
        assert_eq!(catalog.resolve("mini").unwrap().pricing.unwrap().prompt_nanos_per_mtok, 100_000_000);
        // A name already taken by another model is refused, and changes nothing.
        let clash = spec.replace(r#"["mini"]"#, r#"["gemma-3-270m"]"#);
        let err = catalog.put(Catalog::model_from_json("openai/gpt-4o-mini", &clash, 9).unwrap()).unwrap_err();
        assert!(err.to_string().contains("used by two models"), "{err}");
        assert!(catalog.resolve("mini").is_ok());
        assert!(catalog.remove("openai/gpt-4o-mini"));
        assert!(!catalog.remove("openai/gpt-4o-mini"));
        assert!(catalog.resolve("mini").is_err());
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            (r#"{"context_length": 10}"#, "pricing"),
            (r#"{"context_length": 10, "pricing": {"prompt": 1, "completion": 1}, "colour": 1}"#, "colour"),
            (
                r#"{"context_length": 10, "pricing": {"prompt": 1, "completion": 1}, "backends": [{"kind": "grpc"}]}"#,
                "backends[0].kind",
            ),
            (
                r#"{"context_length": 10, "pricing": {"prompt": 1, "completion": 1}, "backends": [{"kind": "openai_compatible", "base_url": "ftp://x"}]}"#,
                "backends[0].base_url",
            ),
            (
                r#"{"context_length": 10, "pricing": {"prompt": 1, "completion": 1}, "backends": [{"kind": "openai_compatible", "base_url": "http://x", "api_key": "k", "api_key_env": "K"}]}"#,
                "backends[0].api_key",
            ),
            (r#"{"id": "b/c", "context_length": 10, "pricing": {"prompt": 1, "completion": 1}}"#, "differs"),
        ];
        for (spec, named) in cases {
            let err = Catalog::model_from_json("a/b", spec, 0).unwrap_err().to_string();
            assert!(err.contains(named), "{spec}: {err}");
        }
        let err = Catalog::model_from_json(
            "no-owner",
            r#"{"context_length": 1, "pricing": {"prompt": 0, "completion": 0}}"#,
            0,
        );
        assert!(err.unwrap_err().to_string().contains("owner/name"));
    }
}
