//! Finding a catalogue model by name, the same way wherever the catalogue
//! is held (the registry, and each gateway's cached copy).

use infermesh_proto::v1::Model;

use crate::{ErrorKind, MeshError};

/// The model whose id or alias is `name`, case-insensitively. An unknown
/// name is a 404 `model_not_found` that suggests the closest known id.
pub fn find_model<'a>(models: &'a [Model], name: &str) -> Result<&'a Model, MeshError> {
    models
        .iter()
        .find(|m| m.id.eq_ignore_ascii_case(name) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name)))
        .ok_or_else(|| {
            let known: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            let hint = match closest(models, name) {
                Some(id) => format!("; did you mean `{id}`?"),
                None => ".".to_owned(),
            };
            MeshError::new(
                ErrorKind::ModelNotFound,
                format!("the model `{name}` does not exist{hint} Available models: {}", known.join(", ")),
            )
            .with_param("model")
        })
}

/// The id of the model one of whose names is nearest to `name` in edit
/// distance, when near enough to be a likely typo or a missing owner.
fn closest<'a>(models: &'a [Model], name: &str) -> Option<&'a str> {
    let wanted = name.to_ascii_lowercase();
    let bare_wanted = wanted.rsplit('/').next().unwrap_or(&wanted);
    models
        .iter()
        .flat_map(|m| std::iter::once(&m.id).chain(&m.aliases).map(move |n| (m.id.as_str(), n.to_ascii_lowercase())))
        .map(|(id, candidate)| {
            let bare = candidate.rsplit('/').next().unwrap_or(&candidate).to_owned();
            let distance = edit_distance(&wanted, &candidate).min(edit_distance(bare_wanted, &bare));
            (distance, bare.len(), id)
        })
        .filter(|(distance, len, _)| *distance <= (*len.max(&bare_wanted.len()) / 3).max(2))
        .min_by_key(|(distance, _, _)| *distance)
        .map(|(_, _, id)| id)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: &str, aliases: &[&str]) -> Model {
        Model { id: id.into(), aliases: aliases.iter().map(|a| (*a).into()).collect(), ..Model::default() }
    }

    #[test]
    fn names_resolve_and_typos_get_a_suggestion() {
        let models =
            [model("infermesh/gemma-3-270m", &["gemma-3-270m"]), model("openai/gpt-4o-mini", &["gpt-4o-mini"])];
        assert_eq!(find_model(&models, "GEMMA-3-270M").unwrap().id, "infermesh/gemma-3-270m");
        let err = find_model(&models, "gemma-3-270").unwrap_err();
        assert_eq!(err.kind, ErrorKind::ModelNotFound);
        assert!(err.message.contains("did you mean `infermesh/gemma-3-270m`?"), "{}", err.message);
        let err = find_model(&models, "acme/gpt-4o-mini").unwrap_err();
        assert!(err.message.contains("did you mean `openai/gpt-4o-mini`?"), "{}", err.message);
        let err = find_model(&models, "llama-70b-instruct").unwrap_err();
        assert!(!err.message.contains("did you mean"), "{}", err.message);
        assert!(err.message.contains("infermesh/gemma-3-270m, openai/gpt-4o-mini"), "{}", err.message);
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
