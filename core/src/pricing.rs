//! Pricing: what a request costs in quota, from New API's ratio options.
//!
//! `quota = round((prompt + completion × CompletionRatio) × ModelRatio × GroupRatio)`, at least 1 when
//! the ratio product is non-zero; fixed-price models cost `ModelPrice × 500000 × GroupRatio` per call.
//! Ratios are looked up by the model name the client asked for, never the upstream's mapped name.

use std::collections::HashMap;

use crate::model::{QUOTA_PER_USD, Quota};

/// The ratio options in force, parsed from the option table (`ModelRatio`, `CompletionRatio`,
/// `GroupRatio`, `ModelPrice`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    pub model_ratio: HashMap<String, f64>,
    pub completion_ratio: HashMap<String, f64>,
    pub group_ratio: HashMap<String, f64>,
    pub model_price: HashMap<String, f64>,
}

/// How a model is priced, once looked up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Price {
    Ratio { model_ratio: f64, completion_ratio: f64, group_ratio: f64 },
    PerCall { usd: f64, group_ratio: f64 },
}

/// Ratios shipped for common models (ModelRatio 1 = 2 USD per million prompt tokens).
pub fn default_model_ratios() -> HashMap<String, f64> {
    [
        ("gpt-4o", 1.25),
        ("gpt-4o-mini", 0.075),
        ("gpt-4.1", 1.0),
        ("gpt-4.1-mini", 0.2),
        ("gpt-3.5-turbo", 0.25),
        ("text-embedding-3-small", 0.01),
        ("text-embedding-3-large", 0.065),
        ("claude-3-5-sonnet-20241022", 1.5),
        ("claude-3-5-haiku-20241022", 0.4),
        ("gemini-1.5-flash", 0.0375),
        ("gemini-2.0-flash", 0.05),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Completion ratios shipped for common models.
pub fn default_completion_ratios() -> HashMap<String, f64> {
    [
        ("gpt-4o", 4.0),
        ("gpt-4o-mini", 4.0),
        ("gpt-4.1", 4.0),
        ("gpt-4.1-mini", 4.0),
        ("gpt-3.5-turbo", 3.0),
        ("claude-3-5-sonnet-20241022", 5.0),
        ("claude-3-5-haiku-20241022", 5.0),
        ("gemini-1.5-flash", 4.0),
        ("gemini-2.0-flash", 4.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl PriceTable {
    /// Parses one ratio option value (a JSON object of name → number).
    pub fn parse_ratio_map(json: &str) -> Result<HashMap<String, f64>, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The price of `model` for `group`; `None` when the model has neither a ratio nor a price.
    pub fn price(&self, model: &str, group: &str) -> Option<Price> {
        let group_ratio = self.group_ratio.get(group).copied().unwrap_or(1.0);
        if let Some(usd) = self.model_price.get(model) {
            return Some(Price::PerCall { usd: *usd, group_ratio });
        }
        let model_ratio = *self.model_ratio.get(model)?;
        let completion_ratio = self.completion_ratio.get(model).copied().unwrap_or(1.0);
        Some(Price::Ratio { model_ratio, completion_ratio, group_ratio })
    }
}

impl Price {
    /// Quota for the given usage.
    pub fn quota(&self, prompt_tokens: i64, completion_tokens: i64) -> Quota {
        match *self {
            Price::Ratio { model_ratio, completion_ratio, group_ratio } => {
                let ratio = model_ratio * group_ratio;
                let tokens = prompt_tokens.max(0) as f64 + completion_tokens.max(0) as f64 * completion_ratio;
                let q = (tokens * ratio).round() as Quota;
                if ratio != 0.0 && q == 0 { 1 } else { q }
            }
            Price::PerCall { usd, group_ratio } => {
                (usd * QUOTA_PER_USD as f64 * group_ratio).round() as Quota
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn table() -> PriceTable {
        PriceTable {
            model_ratio: default_model_ratios(),
            completion_ratio: default_completion_ratios(),
            group_ratio: [("vip".to_string(), 0.5)].into_iter().collect(),
            model_price: [("dall-e-3".to_string(), 0.04)].into_iter().collect(),
        }
    }

    #[test]
    fn ratio_pricing_follows_the_formula() {
        let p = table().price("gpt-4o", "default").unwrap();
        // (100 + 50 × 4) × 1.25 = 375
        assert_eq!(p.quota(100, 50), 375);
        let vip = table().price("gpt-4o", "vip").unwrap();
        assert_eq!(vip.quota(100, 50), 188); // 187.5 rounds half away from zero
    }

    #[test]
    fn a_nonzero_ratio_costs_at_least_one() {
        let p = table().price("text-embedding-3-small", "default").unwrap();
        assert_eq!(p.quota(1, 0), 1);
    }

    #[test]
    fn per_call_prices_ignore_tokens() {
        let p = table().price("dall-e-3", "default").unwrap();
        assert_eq!(p.quota(10_000, 10_000), 20_000);
    }

    #[test]
    fn unknown_models_have_no_price() {
        assert!(table().price("mystery", "default").is_none());
    }

    proptest! {
        #[test]
        fn cost_is_monotonic_in_tokens(p in 0i64..1_000_000, c in 0i64..1_000_000, extra in 0i64..1000) {
            let price = table().price("gpt-4o-mini", "default").unwrap();
            prop_assert!(price.quota(p + extra, c) >= price.quota(p, c));
            prop_assert!(price.quota(p, c + extra) >= price.quota(p, c));
        }
    }
}
