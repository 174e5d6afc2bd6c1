//! Pricing: what a request costs in quota, from New API's ratio options.
//!
//! `quota = round(((prompt − cached) + cached × CacheRatio + completion × CompletionRatio) × ModelRatio ×
//! GroupRatio)`, at least 1 when the ratio product is non-zero; fixed-price models cost
//! `ModelPrice × 500000 × GroupRatio` per call. Ratios are looked up by the model name the client asked
//! for, never the upstream's mapped name. The pre-deduction prices the estimated prompt plus `max_tokens`
//! (or a configured default) as completion, so it covers the request unless the prompt estimate is low or
//! the upstream writes past `max_tokens`.

use std::collections::HashMap;

use crate::model::{QUOTA_PER_USD, Quota};

/// The ratio options in force, parsed from the option table (`ModelRatio`, `CompletionRatio`,
/// `GroupRatio`, `ModelPrice`, `CacheRatio`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    pub model_ratio: HashMap<String, f64>,
    pub completion_ratio: HashMap<String, f64>,
    pub group_ratio: HashMap<String, f64>,
    pub model_price: HashMap<String, f64>,
    /// Price of a cached prompt token relative to an uncached one; 1 when a model has none.
    pub cache_ratio: HashMap<String, f64>,
}

/// How a model is priced, once looked up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Price {
    Ratio { model_ratio: f64, completion_ratio: f64, group_ratio: f64, cache_ratio: f64 },
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

/// Cache ratios shipped for common models: the price of a cached prompt token relative to a fresh one.
/// A model without one pays cached tokens in full (ratio 1).
pub fn default_cache_ratios() -> HashMap<String, f64> {
    [
        ("gpt-4o", 0.5),
        ("gpt-4o-mini", 0.5),
        ("gpt-4.1", 0.25),
        ("gpt-4.1-mini", 0.25),
        ("claude-3-5-sonnet-20241022", 0.1),
        ("claude-3-5-haiku-20241022", 0.1),
        ("gemini-1.5-flash", 0.25),
        ("gemini-2.0-flash", 0.25),
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
        let cache_ratio = self.cache_ratio.get(model).copied().unwrap_or(1.0);
        Some(Price::Ratio { model_ratio, completion_ratio, group_ratio, cache_ratio })
    }
}

impl Price {
    /// The same price with `CacheRatio` set (looked up by the client-facing model name).
    pub fn with_cache_ratio(self, ratio: f64) -> Price {
        match self {
            Price::Ratio { model_ratio, completion_ratio, group_ratio, .. } => {
                Price::Ratio { model_ratio, completion_ratio, group_ratio, cache_ratio: ratio }
            }
            per_call @ Price::PerCall { .. } => per_call,
        }
    }

    /// Quota for the given usage, no prompt tokens cached.
    pub fn quota(&self, prompt_tokens: i64, completion_tokens: i64) -> Quota {
        self.quota_cached(prompt_tokens, 0, completion_tokens)
    }

    /// Quota for the given usage, `cached_tokens` of the prompt served from the provider's cache
    /// (clamped to the prompt).
    pub fn quota_cached(&self, prompt_tokens: i64, cached_tokens: i64, completion_tokens: i64) -> Quota {
        match *self {
            Price::Ratio { model_ratio, completion_ratio, group_ratio, cache_ratio } => {
                let ratio = model_ratio * group_ratio;
                let prompt = prompt_tokens.max(0);
                let cached = cached_tokens.clamp(0, prompt);
                let tokens = (prompt - cached) as f64
                    + cached as f64 * cache_ratio
                    + completion_tokens.max(0) as f64 * completion_ratio;
                let q = (tokens * ratio).round() as Quota;
                if ratio != 0.0 && q == 0 { 1 } else { q }
            }
            Price::PerCall { usd, group_ratio } => {
                (usd * QUOTA_PER_USD as f64 * group_ratio).round() as Quota
            }
        }
    }

    /// What to set aside before forwarding: the estimated prompt plus the completion the request may
    /// produce (`max_tokens`, or `default_max_tokens` when the client set none), priced as usage.
    pub fn pre_deduction(
        &self,
        estimated_prompt: i64,
        max_tokens: Option<i64>,
        default_max_tokens: i64,
    ) -> Quota {
        self.quota(estimated_prompt, max_tokens.unwrap_or(default_max_tokens))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn table() -> PriceTable {
        PriceTable {
            cache_ratio: HashMap::new(),
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

    #[test]
    fn cached_prompt_tokens_cost_the_cache_ratio() {
        let p = table().price("gpt-4o", "default").unwrap().with_cache_ratio(0.5);
        // ((100 − 40) + 40 × 0.5 + 50 × 4) × 1.25 = 350
        assert_eq!(p.quota_cached(100, 40, 50), 350);
    }

    #[test]
    fn without_a_cache_ratio_cached_tokens_cost_in_full() {
        let p = table().price("gpt-4o", "default").unwrap();
        assert_eq!(p.quota_cached(100, 40, 50), p.quota(100, 50));
    }

    #[test]
    fn the_pre_deduction_prices_max_tokens_as_completion() {
        let p = table().price("gpt-4o", "default").unwrap();
        assert_eq!(p.pre_deduction(100, Some(50), 4096), 375);
        assert_eq!(p.pre_deduction(100, None, 50), 375);
    }

    fn ratio_price() -> impl Strategy<Value = Price> {
        (0.0f64..10.0, 0.0f64..8.0, 0.0f64..4.0, 0.0f64..=1.0).prop_map(|(m, c, g, k)| Price::Ratio {
            model_ratio: m,
            completion_ratio: c,
            group_ratio: g,
            cache_ratio: k,
        })
    }

    proptest! {
        #[test]
        fn caching_never_makes_a_request_dearer(
            price in ratio_price(), p in 0i64..1_000_000, cached in 0i64..1_000_000, c in 0i64..100_000,
        ) {
            prop_assert!(price.quota_cached(p, cached, c) <= price.quota(p, c));
        }

        #[test]
        fn the_pre_deduction_covers_any_usage_within_the_estimate(
            price in ratio_price(), est in 0i64..200_000, max in 0i64..32_000,
            used_p in 0i64..200_000, used_c in 0i64..32_000, cached in 0i64..200_000,
        ) {
            let (used_p, used_c) = (used_p.min(est), used_c.min(max));
            prop_assert!(price.quota_cached(used_p, cached, used_c) <= price.pre_deduction(est, Some(max), 0));
        }

        #[test]
        fn quota_is_never_negative(price in ratio_price(), p in any::<i64>(), cached in any::<i64>(), c in any::<i64>()) {
            prop_assert!(price.quota_cached(p, cached, c) >= 0);
        }

        #[test]
        fn cost_is_monotonic_in_tokens(p in 0i64..1_000_000, c in 0i64..1_000_000, extra in 0i64..1000) {
            let price = table().price("gpt-4o-mini", "default").unwrap();
            prop_assert!(price.quota(p + extra, c) >= price.quota(p, c));
            prop_assert!(price.quota(p, c + extra) >= price.quota(p, c));
        }
    }
}
