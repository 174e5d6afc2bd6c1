//! Channel selection: abilities (group × model → channels) in priority tiers, weighted pick.
//!
//! Built once per configuration snapshot from the enabled channels; read by every worker without
//! locks. Selection is a pure function of the index, the channels already tried in this request and a
//! random source, so it is deterministic under a seeded [`fastrand::Rng`].

use std::collections::{BTreeSet, HashMap};

use crate::model::{Channel, STATUS_ENABLED};

/// One channel inside a priority tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub channel_id: i64,
    pub weight: u64,
}

/// Channels of equal priority for one (group, model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub priority: i64,
    pub candidates: Vec<Candidate>,
}

/// Abilities of all enabled channels, indexed by group then model; tiers sorted by priority, highest first.
#[derive(Debug, Clone, Default)]
pub struct AbilityIndex {
    by_group: HashMap<String, HashMap<String, Vec<Tier>>>,
}

impl AbilityIndex {
    /// Indexes every enabled channel under each of its groups and models.
    pub fn build(channels: &[Channel]) -> Self {
        let mut by_group: HashMap<String, HashMap<String, Vec<Tier>>> = HashMap::new();
        for ch in channels.iter().filter(|c| c.status == STATUS_ENABLED) {
            let weight = u64::try_from(ch.weight).unwrap_or(0);
            for group in ch.group_list() {
                let models = by_group.entry(group.to_string()).or_default();
                for model in ch.model_list() {
                    let tiers = models.entry(model.to_string()).or_default();
                    let candidate = Candidate { channel_id: ch.id, weight };
                    match tiers.iter_mut().find(|t| t.priority == ch.priority) {
                        Some(t) => {
                            if !t.candidates.iter().any(|c| c.channel_id == ch.id) {
                                t.candidates.push(candidate)
                            }
                        }
                        None => tiers.push(Tier { priority: ch.priority, candidates: vec![candidate] }),
                    }
                }
            }
        }
        for models in by_group.values_mut() {
            for tiers in models.values_mut() {
                tiers.sort_by_key(|t| std::cmp::Reverse(t.priority));
            }
        }
        AbilityIndex { by_group }
    }

    /// The tiers serving `model` for `group`, highest priority first.
    pub fn tiers(&self, group: &str, model: &str) -> &[Tier] {
        self.by_group.get(group).and_then(|m| m.get(model)).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether any enabled channel serves (group, model).
    pub fn serves(&self, group: &str, model: &str) -> bool {
        !self.tiers(group, model).is_empty()
    }

    /// Every model some channel serves for `group`, sorted.
    pub fn models(&self, group: &str) -> BTreeSet<&str> {
        self.by_group.get(group).map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default()
    }

    /// The next channel to try: the highest tier that still has an untried channel, weighted random
    /// inside it. `None` when every candidate has been tried.
    pub fn pick(&self, group: &str, model: &str, tried: &[i64], rng: &mut fastrand::Rng) -> Option<i64> {
        for tier in self.tiers(group, model) {
            let open = || tier.candidates.iter().filter(|c| !tried.contains(&c.channel_id));
            let count = open().count();
            if count == 0 {
                continue;
            }
            let total: u64 = open().map(|c| c.weight).sum();
            if total == 0 {
                return open().nth(rng.usize(..count)).map(|c| c.channel_id);
            }
            let mut ticket = rng.u64(..total);
            for c in open() {
                if ticket < c.weight {
                    return Some(c.channel_id);
                }
                ticket -= c.weight;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::model::{ChannelType, STATUS_DISABLED};

    fn channel(id: i64, models: &str, group: &str, priority: i64, weight: i64) -> Channel {
        Channel {
            id,
            name: format!("c{id}"),
            kind: ChannelType::OpenAi,
            base_url: "http://127.0.0.1:1".into(),
            key: "k".into(),
            models: models.into(),
            group: group.into(),
            priority,
            weight,
            model_mapping: BTreeMap::new(),
            tag: String::new(),
            proxy: String::new(),
            status: STATUS_ENABLED,
            test_model: String::new(),
            created_time: 0,
            test_time: 0,
            response_time: 0,
            used_quota: 0,
            auto_disabled_reason: String::new(),
            auto_disabled_time: 0,
        }
    }

    #[test]
    fn a_group_only_reaches_channels_listing_it() {
        let idx = AbilityIndex::build(&[channel(1, "m", "vip", 0, 0), channel(2, "m", "default,vip", 0, 0)]);
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..50 {
            assert_eq!(idx.pick("default", "m", &[], &mut rng), Some(2));
        }
        assert!(idx.serves("vip", "m"));
        assert!(!idx.serves("default", "other"));
    }

    #[test]
    fn disabled_channels_are_not_indexed() {
        let mut c = channel(1, "m", "default", 0, 0);
        c.status = STATUS_DISABLED;
        assert!(!AbilityIndex::build(&[c]).serves("default", "m"));
    }

    #[test]
    fn higher_priority_is_tried_first_then_lower_tiers() {
        let idx = AbilityIndex::build(&[
            channel(1, "m", "default", 0, 0),
            channel(2, "m", "default", 10, 0),
            channel(3, "m", "default", 5, 0),
        ]);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut tried = vec![];
        while let Some(id) = idx.pick("default", "m", &tried, &mut rng) {
            tried.push(id);
        }
        assert_eq!(tried, [2, 3, 1]);
    }

    #[test]
    fn weights_shape_the_choice_inside_a_tier() {
        let idx = AbilityIndex::build(&[channel(1, "m", "default", 0, 1), channel(2, "m", "default", 0, 9)]);
        let mut rng = fastrand::Rng::with_seed(3);
        let picks2 = (0..10_000).filter(|_| idx.pick("default", "m", &[], &mut rng) == Some(2)).count();
        assert!((8_500..9_500).contains(&picks2), "{picks2}");
    }

    #[test]
    fn models_lists_what_a_group_can_use() {
        let idx = AbilityIndex::build(&[channel(1, "a,b", "default", 0, 0), channel(2, "c", "vip", 0, 0)]);
        assert_eq!(idx.models("default").into_iter().collect::<Vec<_>>(), ["a", "b"]);
    }

    proptest! {
        #[test]
        fn pick_never_repeats_a_tried_channel_and_exhausts_all(
            specs in proptest::collection::vec((0i64..4, 0i64..5), 1..12),
            seed in any::<u64>(),
        ) {
            let channels: Vec<_> = specs.iter().enumerate()
                .map(|(i, (p, w))| channel(i as i64 + 1, "m", "default", *p, *w)).collect();
            let idx = AbilityIndex::build(&channels);
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut tried = vec![];
            let mut last_priority = i64::MAX;
            while let Some(id) = idx.pick("default", "m", &tried, &mut rng) {
                prop_assert!(!tried.contains(&id));
                let p = channels[(id - 1) as usize].priority;
                prop_assert!(p <= last_priority);
                last_priority = p;
                tried.push(id);
            }
            prop_assert_eq!(tried.len(), channels.len());
        }
    }
}
