//! Plans: which models an account may use and how many tokens a month its
//! plan includes before credit is charged. Read from the `[[plans]]` tables
//! of the config file (deploy/infermesh.example.toml spells out the
//! built-in default); other top-level tables belong to other services.

use serde::Deserialize;

use crate::error::BillingError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    pub name: String,
    /// Model ids, `owner/*` for every model of an owner, or `*`.
    pub models: Vec<String>,
    pub included_tokens_per_month: u64,
}

impl Plan {
    pub fn includes(&self, model: &str) -> bool {
        patterns_include(&self.models, model)
    }
}

/// Whether a plan's model list (ids, `owner/*`, `*`) names `model`.
pub fn patterns_include(patterns: &[String], model: &str) -> bool {
    patterns.iter().any(|pattern| match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    })
}

#[derive(Debug, Clone)]
pub struct Plans {
    plans: Vec<Plan>,
    default_index: usize,
}

#[derive(Deserialize)]
struct PlansFile {
    default_plan: Option<String>,
    #[serde(default)]
    plans: Vec<PlanEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanEntry {
    id: String,
    name: Option<String>,
    models: Vec<String>,
    #[serde(default)]
    included_tokens_per_month: u64,
}

/// The example plans a fresh install sells: the free and starter plans serve
/// the platform's own models, the paid ones every model (upstream providers
/// included). Only the paid plans include tokens.
impl Default for Plans {
    fn default() -> Plans {
        let plan = |id: &str, name: &str, models: &str, included_tokens_per_month| Plan {
            id: id.to_owned(),
            name: name.to_owned(),
            models: vec![models.to_owned()],
            included_tokens_per_month,
        };
        Plans {
            plans: vec![
                plan("free", "Free", "infermesh/*", 0),
                plan("starter", "Starter", "infermesh/*", 1_000_000),
                plan("pro", "Pro", "*", 10_000_000),
                plan("ultimate", "Ultimate", "*", 100_000_000),
            ],
            default_index: 0,
        }
    }
}

impl Plans {
    /// Parses the `[[plans]]` of a config file; a file without any keeps
    /// the built-in plans. Errors name the bad plan.
    pub fn from_toml(text: &str) -> Result<Plans, BillingError> {
        let file: PlansFile = toml::from_str(text).map_err(|err| BillingError::Config(err.to_string()))?;
        if file.plans.is_empty() {
            if let Some(default) = file.default_plan {
                return Err(BillingError::Config(format!(
                    "default_plan {default:?} names a plan but none are defined"
                )));
            }
            return Ok(Plans::default());
        }
        let mut plans: Vec<Plan> = Vec::with_capacity(file.plans.len());
        for entry in file.plans {
            let bad = |why: &str| BillingError::Config(format!("plan {:?}: {why}", entry.id));
            if entry.id.is_empty() || entry.id.contains(char::is_whitespace) {
                return Err(bad("id must be a non-empty word"));
            }
            if plans.iter().any(|plan| plan.id == entry.id) {
                return Err(bad("is defined twice"));
            }
            if entry.models.is_empty() || entry.models.iter().any(|model| model.trim().is_empty()) {
                return Err(bad("models must list model ids, `owner/*` or `*`"));
            }
            plans.push(Plan {
                name: entry.name.unwrap_or_else(|| entry.id.clone()),
                id: entry.id,
                models: entry.models,
                included_tokens_per_month: entry.included_tokens_per_month,
            });
        }
        let default_index = match file.default_plan {
            None => 0,
            Some(id) => plans
                .iter()
                .position(|plan| plan.id == id)
                .ok_or_else(|| BillingError::Config(format!("default_plan {id:?} is not one of the plans")))?,
        };
        Ok(Plans { plans, default_index })
    }

    pub fn all(&self) -> &[Plan] {
        &self.plans
    }

    /// The plan with `id`; the empty id is the default plan.
    pub fn get(&self, id: &str) -> Option<&Plan> {
        if id.is_empty() {
            return Some(self.default_plan());
        }
        self.plans.iter().find(|plan| plan.id == id)
    }

    /// The plan of an account that was never given one.
    pub fn default_plan(&self) -> &Plan {
        &self.plans[self.default_index]
    }

    /// An account's plan, falling back to the default when the plan it was
    /// given is no longer configured.
    pub fn of_account(&self, plan_id: &str) -> &Plan {
        self.get(plan_id).unwrap_or_else(|| self.default_plan())
    }

    /// Names of the plans that include `model`, for a refusal to point at.
    /// Names of the plans that include `model`: by their patterns, or as
    /// the catalogue lists (`catalog_plans`, plan ids).
    pub fn including(&self, model: &str, catalog_plans: &[String]) -> Vec<String> {
        self.plans
            .iter()
            .filter(|plan| plan.includes(model) || catalog_plans.contains(&plan.id))
            .map(|plan| plan.name.clone())
            .collect()
    }
}

/// The calendar month (UTC) of a moment, as `year * 100 + month`: included
/// tokens count per month.
pub fn month_of(unix_ms: i64) -> i64 {
    // Howard Hinnant's civil-from-days.
    let days = unix_ms.div_euclid(86_400_000) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    year * 100 + month
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_plans_route_models_by_pattern() {
        let plans = Plans::default();
        assert_eq!(plans.default_plan().name, "Free");
        assert!(plans.default_plan().includes("infermesh/gemma-3-270m"));
        assert!(!plans.default_plan().includes("openai/gpt-4o"));
        assert_eq!(plans.including("openai/gpt-4o", &[]), ["Pro", "Ultimate"]);
        assert_eq!(plans.including("openai/gpt-4o", &["starter".to_owned()]), ["Starter", "Pro", "Ultimate"]);
        assert_eq!(plans.get("pro").unwrap().included_tokens_per_month, 10_000_000);
        assert_eq!(plans.of_account("retired"), plans.default_plan());
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/infermesh.example.toml"))
                .unwrap();
        assert_eq!(Plans::from_toml(&example).unwrap().all(), plans.all(), "the example spells out the default");
    }

    #[test]
    fn a_config_replaces_the_plans_and_bad_ones_are_named() {
        let plans = Plans::from_toml(
            "default_plan = \"basic\"\n[[models]]\nid = \"x/y\"\n\
             [[plans]]\nid = \"basic\"\nmodels = [\"x/y\"]\n\
             [[plans]]\nid = \"big\"\nname = \"Big\"\nmodels = [\"*\"]\nincluded_tokens_per_month = 5\n",
        )
        .unwrap();
        assert_eq!(plans.default_plan().name, "basic");
        assert_eq!(plans.including("x/z", &[]), ["Big"]);
        assert_eq!(Plans::from_toml("[[models]]\nid = \"x/y\"\n").unwrap().all().len(), 4);
        let err = Plans::from_toml("[[plans]]\nid = \"a\"\nmodels = []\n").unwrap_err();
        assert!(err.to_string().contains("plan \"a\""), "{err}");
        let err = Plans::from_toml("default_plan = \"b\"\n[[plans]]\nid = \"a\"\nmodels = [\"*\"]\n").unwrap_err();
        assert!(err.to_string().contains("default_plan \"b\""), "{err}");
    }

    #[test]
    fn months_follow_the_utc_calendar() {
        assert_eq!(month_of(0), 197_001);
        // 2024-02-29T23:59:59.999Z, then 2024-03-01T00:00:00Z.
        assert_eq!(month_of(1_709_251_199_999), 202_402);
        assert_eq!(month_of(1_709_251_200_000), 202_403);
        // 2026-12-31T12:00:00Z.
        assert_eq!(month_of(1_798_718_400_000), 202_612);
    }
}
