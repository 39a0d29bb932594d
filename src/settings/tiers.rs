//! The `[tiers.NAME]` tables of the `GATEWAY_CONFIG` file (CONTRACT §13): a tier's request
//! bucket and, optionally, its LLM-token limits. Read with `toml` itself, like the
//! registry, and validated with every error one line naming the tier.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{BudgetPeriod, SettingsError, Tier};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    capacity: u64,
    refill_rate: f64,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    token_budget: Option<u64>,
    #[serde(default)]
    budget_period: Option<BudgetPeriod>,
}

#[derive(Debug, Default, Deserialize)]
struct TiersFile {
    #[serde(default)]
    tiers: BTreeMap<String, TierFile>,
}

fn invalid(problem: String) -> SettingsError {
    SettingsError::registry(problem)
}

/// The tiers a file's text defines, in name order; unset token limits are `None` (the
/// defaults apply).
pub fn parse(text: &str) -> Result<Vec<Tier>, SettingsError> {
    let file: TiersFile = toml::from_str(text).map_err(|e| {
        let first = e.message().lines().next().unwrap_or("not valid TOML");
        invalid(format!("tiers: {first}"))
    })?;
    file.tiers
        .into_iter()
        .map(|(name, tier)| {
            let bad = |why: &str| invalid(format!("tier '{name}': {why}"));
            if !super::is_tier_name(&name) {
                return Err(bad("the name may only hold letters, digits, '-' and '_'"));
            }
            if tier.capacity == 0 {
                return Err(bad("capacity must be at least 1"));
            }
            if !(tier.refill_rate.is_finite() && tier.refill_rate > 0.0) {
                return Err(bad("refill_rate must be a number greater than 0"));
            }
            Ok(Tier {
                name,
                capacity: tier.capacity,
                refill_rate: tier.refill_rate,
                tokens_per_minute: tier.tokens_per_minute,
                token_budget: tier.token_budget,
                budget_period: tier.budget_period,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_read_with_their_token_limits() {
        let tiers = parse(
            r#"
            [providers.local]
            kind = "ollama"
            base_url = "http://127.0.0.1:1"

            [tiers.gold]
            capacity = 100
            refill_rate = 10
            tokens_per_minute = 90000
            token_budget = 2000000
            budget_period = "month"

            [tiers.free]
            capacity = 5
            refill_rate = 0.5
            "#,
        )
        .unwrap();
        assert_eq!(tiers.len(), 2);
        let gold = tiers.iter().find(|t| t.name == "gold").unwrap();
        assert_eq!(gold.tokens_per_minute, Some(90_000));
        assert_eq!(gold.token_budget, Some(2_000_000));
        assert_eq!(gold.budget_period, Some(BudgetPeriod::Month));
        let free = tiers.iter().find(|t| t.name == "free").unwrap();
        assert_eq!((free.capacity, free.tokens_per_minute), (5, None));
    }

    #[test]
    fn bad_tiers_are_refused_in_one_line_naming_them() {
        for (text, expected) in [
            (
                "[tiers.gold]\ncapacity = 0\nrefill_rate = 1",
                "tier 'gold': capacity",
            ),
            (
                "[tiers.gold]\ncapacity = 1\nrefill_rate = -1",
                "tier 'gold': refill_rate",
            ),
            (
                "[tiers.\"a b\"]\ncapacity = 1\nrefill_rate = 1",
                "tier 'a b': the name",
            ),
            (
                "[tiers.gold]\ncapacity = 1\nrefill_rate = 1\ntpm = 5",
                "unknown field",
            ),
            (
                "[tiers.gold]\ncapacity = 1\nrefill_rate = 1\nbudget_period = \"week\"",
                "unknown variant",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }
}
