//! `behavior`: how fast replicas may change, with the HorizontalPodAutoscaler's
//! `autoscaling/v2` field names, semantics and defaults.
//!
//! These types are plain serde + schemars structs (no kube types) so the FlashSale
//! CRD can embed them as `spec.scaling` (`ScalingBehavior`). Every field is optional
//! and defaulted exactly as the HPA defaults `spec.behavior`; [`ScalingBehavior::validate`]
//! applies the HPA's validation rules for the reconciler's `Ready=False` reason.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest stabilization window the HPA accepts (one hour).
pub const MAX_STABILIZATION_WINDOW_SECONDS: i32 = 3600;
/// Longest policy period the HPA accepts (30 minutes).
pub const MAX_PERIOD_SECONDS: i32 = 1800;
/// The HPA's default scale-down stabilization window (`--horizontal-pod-autoscaler-downscale-stabilization`).
pub const DEFAULT_SCALE_DOWN_WINDOW_SECONDS: u32 = 300;

/// Scale-up and scale-down rules, as the HPA's `spec.behavior`.
///
/// Unset directions use the HPA defaults: scale up without stabilization by at most
/// 4 pods or 100 % per 15 s (whichever is more); scale down after a 300 s
/// stabilization window by up to 100 % per 15 s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingBehavior {
    /// Rules for adding replicas. Defaults: window 0 s, policies Pods 4/15 s and Percent 100/15 s, selectPolicy Max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,
    /// Rules for removing replicas. Defaults: window 300 s, policy Percent 100/15 s, selectPolicy Max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,
}

/// Rules for one direction, as the HPA's `HPAScalingRules`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// Seconds of past recommendations to consider: scale-up uses the lowest
    /// recommendation in the window, scale-down the highest. 0–3600; defaults to 0
    /// for scale-up and 300 for scale-down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: Option<i32>,
    /// Which policy wins when several apply: `Max` (the largest change, default),
    /// `Min` (the smallest) or `Disabled` (no change in this direction).
    #[serde(default)]
    pub select_policy: SelectPolicy,
    /// Rate limits; an empty or missing list means the direction's default policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub policies: Vec<ScalingPolicy>,
}

/// One rate limit: at most `value` pods (or percent of the count at the period's
/// start) per `periodSeconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicy {
    /// `Pods` (an absolute number of replicas) or `Percent` (of the replicas at the period's start).
    #[serde(rename = "type")]
    pub policy_type: PolicyType,
    /// Amount of change allowed per period; must be greater than zero.
    #[schemars(range(min = 1))]
    pub value: i32,
    /// Length of the period the change is counted over, 1–1800 s.
    #[schemars(range(min = 1, max = 1800))]
    pub period_seconds: i32,
}

/// Unit of a [`ScalingPolicy`] value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyType {
    /// An absolute number of replicas.
    Pods,
    /// A percentage of the replicas at the period's start.
    Percent,
}

/// How several policies of one direction combine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectPolicy {
    /// The policy that allows the largest change.
    #[default]
    Max,
    /// The policy that allows the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// A direction's rules with every default filled in (out-of-range numbers, which
/// [`ScalingBehavior::validate`] rejects, are clamped to the nearest valid value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRules {
    pub stabilization_window_seconds: u32,
    pub select_policy: SelectPolicy,
    pub policies: Vec<ScalingPolicy>,
}

impl ResolvedRules {
    /// Longest `periodSeconds` among the policies: how much scale-event history matters.
    pub fn longest_period_seconds(&self) -> u32 {
        self.policies
            .iter()
            .map(ScalingPolicy::period)
            .max()
            .unwrap_or(0)
    }
}

/// Why a `ScalingBehavior` would be rejected by the HPA's validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BehaviorError {
    #[error(
        "{direction}.stabilizationWindowSeconds {value} must be within 0..={MAX_STABILIZATION_WINDOW_SECONDS}"
    )]
    BadWindow { direction: &'static str, value: i32 },
    #[error("{direction}.policies[{index}].value must be greater than zero")]
    ZeroValue {
        direction: &'static str,
        index: usize,
    },
    #[error(
        "{direction}.policies[{index}].periodSeconds {value} must be within 1..={MAX_PERIOD_SECONDS}"
    )]
    BadPeriod {
        direction: &'static str,
        index: usize,
        value: i32,
    },
}

impl ScalingBehavior {
    /// Scale-up rules with the HPA defaults filled in.
    pub fn scale_up_rules(&self) -> ResolvedRules {
        resolve(
            self.scale_up.as_ref(),
            0,
            &[
                ScalingPolicy {
                    policy_type: PolicyType::Pods,
                    value: 4,
                    period_seconds: 15,
                },
                ScalingPolicy {
                    policy_type: PolicyType::Percent,
                    value: 100,
                    period_seconds: 15,
                },
            ],
        )
    }

    /// Scale-down rules with the HPA defaults filled in.
    pub fn scale_down_rules(&self) -> ResolvedRules {
        resolve(
            self.scale_down.as_ref(),
            DEFAULT_SCALE_DOWN_WINDOW_SECONDS,
            &[ScalingPolicy {
                policy_type: PolicyType::Percent,
                value: 100,
                period_seconds: 15,
            }],
        )
    }

    /// The HPA's validation of `behavior` (the CRD schema repeats the ranges).
    pub fn validate(&self) -> Result<(), BehaviorError> {
        for (direction, rules) in [("scaleUp", &self.scale_up), ("scaleDown", &self.scale_down)] {
            let Some(rules) = rules else { continue };
            if let Some(value) = rules.stabilization_window_seconds
                && !(0..=MAX_STABILIZATION_WINDOW_SECONDS).contains(&value)
            {
                return Err(BehaviorError::BadWindow { direction, value });
            }
            for (index, policy) in rules.policies.iter().enumerate() {
                if policy.value <= 0 {
                    return Err(BehaviorError::ZeroValue { direction, index });
                }
                if !(1..=MAX_PERIOD_SECONDS).contains(&policy.period_seconds) {
                    return Err(BehaviorError::BadPeriod {
                        direction,
                        index,
                        value: policy.period_seconds,
                    });
                }
            }
        }
        Ok(())
    }
}

impl ScalingPolicy {
    /// `periodSeconds` as a count of seconds (negative clamps to 0).
    pub fn period(&self) -> u32 {
        u32::try_from(self.period_seconds).unwrap_or(0)
    }
}

fn resolve(
    rules: Option<&ScalingRules>,
    default_window: u32,
    default_policies: &[ScalingPolicy],
) -> ResolvedRules {
    let Some(rules) = rules else {
        return ResolvedRules {
            stabilization_window_seconds: default_window,
            select_policy: SelectPolicy::Max,
            policies: default_policies.to_vec(),
        };
    };
    ResolvedRules {
        stabilization_window_seconds: rules
            .stabilization_window_seconds
            .map_or(default_window, |w| u32::try_from(w).unwrap_or(0)),
        select_policy: rules.select_policy,
        policies: if rules.policies.is_empty() {
            default_policies.to_vec()
        } else {
            rules.policies.clone()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Mirrors the defaults upstream fills in (pkg/apis/autoscaling/v2
    // GenerateHPAScaleUpRules / GenerateHPAScaleDownRules, exercised by
    // TestGenerateScaleUpRules / TestGenerateScaleDownRules).
    #[test]
    fn unset_behavior_gets_hpa_defaults() {
        let behavior = ScalingBehavior::default();
        let up = behavior.scale_up_rules();
        assert_eq!(up.stabilization_window_seconds, 0);
        assert_eq!(up.select_policy, SelectPolicy::Max);
        assert_eq!(
            up.policies,
            vec![
                ScalingPolicy {
                    policy_type: PolicyType::Pods,
                    value: 4,
                    period_seconds: 15
                },
                ScalingPolicy {
                    policy_type: PolicyType::Percent,
                    value: 100,
                    period_seconds: 15
                },
            ]
        );
        let down = behavior.scale_down_rules();
        assert_eq!(down.stabilization_window_seconds, 300);
        assert_eq!(
            down.policies,
            vec![ScalingPolicy {
                policy_type: PolicyType::Percent,
                value: 100,
                period_seconds: 15
            }]
        );
    }

    #[test]
    fn partially_set_rules_keep_their_fields_and_default_the_rest() {
        let behavior: ScalingBehavior = serde_json::from_str(
            r#"{"scaleDown": {"selectPolicy": "Min"},
                "scaleUp": {"stabilizationWindowSeconds": 60,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]}}"#,
        )
        .expect("valid JSON in test");
        let down = behavior.scale_down_rules();
        assert_eq!(down.stabilization_window_seconds, 300);
        assert_eq!(down.select_policy, SelectPolicy::Min);
        assert_eq!(down.policies.len(), 1);
        let up = behavior.scale_up_rules();
        assert_eq!(up.stabilization_window_seconds, 60);
        assert_eq!(up.select_policy, SelectPolicy::Max);
        assert_eq!(
            up.policies,
            vec![ScalingPolicy {
                policy_type: PolicyType::Pods,
                value: 2,
                period_seconds: 30
            }]
        );
        assert_eq!(up.longest_period_seconds(), 30);
    }

    #[test]
    fn validation_follows_the_hpa_ranges() {
        let mut behavior = ScalingBehavior {
            scale_up: Some(ScalingRules {
                stabilization_window_seconds: Some(3601),
                ..ScalingRules::default()
            }),
            scale_down: None,
        };
        assert!(matches!(
            behavior.validate(),
            Err(BehaviorError::BadWindow { value: 3601, .. })
        ));
        behavior.scale_up = Some(ScalingRules {
            policies: vec![ScalingPolicy {
                policy_type: PolicyType::Percent,
                value: 10,
                period_seconds: 1801,
            }],
            ..ScalingRules::default()
        });
        assert!(matches!(
            behavior.validate(),
            Err(BehaviorError::BadPeriod { value: 1801, .. })
        ));
        behavior.scale_up = Some(ScalingRules {
            policies: vec![ScalingPolicy {
                policy_type: PolicyType::Pods,
                value: 0,
                period_seconds: 15,
            }],
            ..ScalingRules::default()
        });
        assert!(matches!(
            behavior.validate(),
            Err(BehaviorError::ZeroValue { index: 0, .. })
        ));
        assert_eq!(ScalingBehavior::default().validate(), Ok(()));
    }

    #[test]
    fn schema_uses_hpa_field_names() {
        let schema = serde_json::to_value(schemars::schema_for!(ScalingBehavior)).expect("schema");
        let text = schema.to_string();
        for field in [
            "scaleUp",
            "scaleDown",
            "stabilizationWindowSeconds",
            "selectPolicy",
            "periodSeconds",
            "\"type\"",
        ] {
            assert!(text.contains(field), "schema lacks {field}: {text}");
        }
        for value in [
            "\"Pods\"",
            "\"Percent\"",
            "\"Max\"",
            "\"Min\"",
            "\"Disabled\"",
        ] {
            assert!(text.contains(value), "schema lacks {value}");
        }
    }
}
