//! Status conditions in the Kubernetes shape, and the types this operator sets.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The sale can run as specified (and, while live, has Redis warmed and gateways serving).
pub const READY: &str = "Ready";
/// Redis holds the sale's catalog and stock for the current spec.
pub const REDIS_WARMED: &str = "RedisWarmed";
/// At least one gateway pod is available.
pub const GATEWAY_AVAILABLE: &str = "GatewayAvailable";
/// At least one consumer pod is available.
pub const CONSUMERS_AVAILABLE: &str = "ConsumersAvailable";

/// The gateway's and consumers' PodDisruptionBudgets exist (or why not).
pub const POD_DISRUPTION_BUDGETS: &str = "PodDisruptionBudgets";

/// The `Ready` reason (and Event reason) for a child the API server refused.
pub const APPLY_FAILED: &str = "ApplyFailed";

/// The condition types the reconciler owns; others (the autoscaler's) are left alone.
pub const OWNED: [&str; 5] = [
    READY,
    REDIS_WARMED,
    GATEWAY_AVAILABLE,
    CONSUMERS_AVAILABLE,
    POD_DISRUPTION_BUDGETS,
];

/// One condition as the reconciler sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Observed {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges `observed` into the previous conditions: a condition whose status
/// did not change keeps its `lastTransitionTime`; types not observed now keep
/// their previous value. Only owned types are returned, sorted as in [`OWNED`].
pub fn merge(
    previous: &[Condition],
    observed: &[Observed],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    OWNED
        .iter()
        .filter_map(|t| {
            let before = previous.iter().find(|c| c.type_ == *t);
            let Some(o) = observed.iter().find(|o| o.type_ == *t) else {
                return before.cloned();
            };
            let status = if o.status { "True" } else { "False" };
            let since = match before {
                Some(b) if b.status == status => b.last_transition_time.clone(),
                _ => Time(now),
            };
            Some(Condition {
                type_: o.type_.to_string(),
                status: status.to_string(),
                reason: o.reason.clone(),
                message: o.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            })
        })
        .collect()
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = t0
            .checked_add(SignedDuration::from_secs(60))
            .unwrap_or(Timestamp::MAX);
        let first = merge(
            &[],
            &[Observed::new(READY, false, "SecretMissing", "a")],
            Some(1),
            t0,
        );
        let same = merge(
            &first,
            &[Observed::new(READY, false, "EndBeforeStart", "b")],
            Some(2),
            t1,
        );
        assert_eq!(same[0].last_transition_time, Time(t0));
        assert_eq!(same[0].reason, "EndBeforeStart");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            &[Observed::new(READY, true, "Reconciled", "c")],
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, Time(t1));
    }

    #[test]
    fn foreign_and_unobserved_types() {
        let t0 = Timestamp::UNIX_EPOCH;
        let mut previous = merge(
            &[],
            &[Observed::new(REDIS_WARMED, true, "Warmed", "ok")],
            Some(1),
            t0,
        );
        previous.push(Condition {
            type_: "ScalingActive".into(),
            status: "True".into(),
            reason: "x".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(t0),
        });
        let merged = merge(
            &previous,
            &[Observed::new(READY, true, "Reconciled", "")],
            Some(1),
            t0,
        );
        let types: Vec<_> = merged.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [READY, REDIS_WARMED]);
    }
}
