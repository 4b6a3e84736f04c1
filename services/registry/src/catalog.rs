//! The model catalogue: ids, aliases, prices, limits, capabilities. Loaded
//! from TOML (the built-in default is [`DEFAULT_CATALOG`]); prices are in
//! dollars per million tokens there and nano-dollars inside.

use infermesh_proto::v1::{Model, ModelKind, Pricing};
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    owned_by: String,
    kind: String,
    #[serde(default)]
    description: String,
    context_length: u32,
    max_output_tokens: u32,
    #[serde(default)]
    capabilities: Vec<String>,
    pricing: PriceEntry,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    prompt: f64,
    completion: f64,
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
        let mut models = Vec::with_capacity(entries.len());
        for entry in entries {
            let bad = |field: &str, why: &str| RegistryError::Config(format!("model {:?}: {field} {why}", entry.id));
            let Some((owner, name)) = entry.id.split_once('/') else {
                return Err(bad("id", "must be owner/name"));
            };
            if owner.is_empty() || name.is_empty() {
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
            let mut aliases = entry.aliases.clone();
            // The bare name always resolves.
            if !aliases.iter().any(|a| a == name) {
                aliases.push(name.to_owned());
            }
            models.push(Model {
                id: entry.id.clone(),
                aliases,
                owned_by: entry.owned_by,
                kind: kind.into(),
                context_length: entry.context_length,
                max_output_tokens: entry.max_output_tokens,
                capabilities: entry.capabilities,
                pricing: Some(pricing),
                created_unix,
                description: entry.description,
            });
        }
        let catalog = Catalog { models };
        catalog.check_unique_names()?;
        Ok(catalog)
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
    pub fn resolve(&self, name: &str) -> Result<&Model, RegistryError> {
        self.models
            .iter()
            .find(|m| m.id.eq_ignore_ascii_case(name) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name)))
            .ok_or_else(|| RegistryError::UnknownModel {
                name: name.to_owned(),
                known: self.models.iter().map(|m| m.id.clone()).collect(),
            })
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
        assert!(err.to_string().contains("infermesh/gemma-3-270m"));
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
}
