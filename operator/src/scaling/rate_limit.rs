//! Rate limits from `behavior` policies and the min/max clamps (upstream
//! `convertDesiredReplicasWithBehaviorRate`, `calculateScaleUpLimitWithScalingRules`,
//! `calculateScaleDownLimitWithBehaviors`).

use std::fmt;

use jiff::Timestamp;

use super::behavior::{PolicyType, ResolvedRules, SelectPolicy};
use super::history::ScalingState;

/// What bounded the result, named as the HPA's `ScalingLimited` condition reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    DesiredWithinRange,
    ScaleUpLimit,
    ScaleDownLimit,
    TooManyReplicas,
    TooFewReplicas,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::DesiredWithinRange => "DesiredWithinRange",
            Limit::ScaleUpLimit => "ScaleUpLimit",
            Limit::ScaleDownLimit => "ScaleDownLimit",
            Limit::TooManyReplicas => "TooManyReplicas",
            Limit::TooFewReplicas => "TooFewReplicas",
        })
    }
}

/// The replica count at the start of a policy's period: the changes made within the
/// period are undone, so several small steps cannot add up past the policy.
fn period_start(current: i32, period_seconds: u32, state: &ScalingState, now: Timestamp) -> i32 {
    current
        .saturating_sub(state.added_within(period_seconds, now))
        .saturating_add(state.removed_within(period_seconds, now))
}

/// Highest count the scale-up policies allow now.
pub fn scale_up_limit(
    current: i32,
    rules: &ResolvedRules,
    state: &ScalingState,
    now: Timestamp,
) -> i32 {
    let proposals = rules.policies.iter().map(|policy| {
        let start = period_start(current, policy.period(), state, now);
        match policy.policy_type {
            PolicyType::Pods => start.saturating_add(policy.value),
            // Rounded up, or a small deployment could never grow by a percentage.
            PolicyType::Percent => {
                to_i32((f64::from(start) * (1.0 + f64::from(policy.value) / 100.0)).ceil())
            }
        }
    });
    match rules.select_policy {
        SelectPolicy::Disabled => current,
        SelectPolicy::Max => proposals.max().unwrap_or(current),
        SelectPolicy::Min => proposals.min().unwrap_or(current),
    }
}

/// Lowest count the scale-down policies allow now.
pub fn scale_down_limit(
    current: i32,
    rules: &ResolvedRules,
    state: &ScalingState,
    now: Timestamp,
) -> i32 {
    let proposals = rules.policies.iter().map(|policy| {
        let start = period_start(current, policy.period(), state, now);
        match policy.policy_type {
            PolicyType::Pods => start.saturating_sub(policy.value),
            // Truncated, as upstream's int32 conversion.
            PolicyType::Percent => {
                to_i32((f64::from(start) * (1.0 - f64::from(policy.value) / 100.0)).trunc())
            }
        }
    });
    match rules.select_policy {
        SelectPolicy::Disabled => current,
        // The biggest change down is the lowest count, the smallest change the highest.
        SelectPolicy::Max => proposals.min().unwrap_or(current),
        SelectPolicy::Min => proposals.max().unwrap_or(current),
    }
}

/// Bounds a (stabilized) recommendation by the policies and by min/max.
#[allow(clippy::too_many_arguments)]
pub fn limit_rate(
    current: i32,
    desired: i32,
    min: i32,
    max: i32,
    up: &ResolvedRules,
    down: &ResolvedRules,
    state: &ScalingState,
    now: Timestamp,
) -> (i32, Limit) {
    if desired > current {
        // Earlier events may put the limit below the current count; never shrink on a scale-up.
        let up_limit = scale_up_limit(current, up, state, now).max(current);
        let (allowed, reason) = if max > up_limit {
            (up_limit, Limit::ScaleUpLimit)
        } else {
            (max, Limit::TooManyReplicas)
        };
        if desired > allowed {
            return (allowed, reason);
        }
    } else if desired < current {
        let down_limit = scale_down_limit(current, down, state, now).min(current);
        let (allowed, reason) = if min < down_limit {
            (down_limit, Limit::ScaleDownLimit)
        } else {
            (min, Limit::TooFewReplicas)
        };
        if desired < allowed {
            return (allowed, reason);
        }
    }
    (desired, Limit::DesiredWithinRange)
}

fn to_i32(value: f64) -> i32 {
    // `as` saturates and maps NaN to 0; inputs here are finite replica arithmetic.
    value as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaling::behavior::{ScalingBehavior, ScalingPolicy, ScalingRules};
    use crate::scaling::history::ScaleEvent;
    use jiff::SignedDuration;

    /// upstream's `generateScalingRules(pods, podsPeriod, percent, percentPeriod, window)`.
    fn rules(
        pods: i32,
        pods_period: i32,
        percent: i32,
        percent_period: i32,
        window: i32,
    ) -> ScalingRules {
        let mut policies = Vec::new();
        if pods != 0 {
            policies.push(ScalingPolicy {
                policy_type: PolicyType::Pods,
                value: pods,
                period_seconds: pods_period,
            });
        }
        if percent != 0 {
            policies.push(ScalingPolicy {
                policy_type: PolicyType::Percent,
                value: percent,
                period_seconds: percent_period,
            });
        }
        ScalingRules {
            stabilization_window_seconds: Some(window),
            select_policy: SelectPolicy::Max,
            policies,
        }
    }

    /// upstream's `generateEventsUniformDistribution`: events spread evenly over the
    /// last `period` seconds, each in the middle of its segment.
    fn uniform_events(changes: &[i32], period: i64, now: Timestamp) -> Vec<ScaleEvent> {
        let segment = period as f64 / changes.len() as f64;
        changes
            .iter()
            .enumerate()
            .map(|(i, &change)| {
                let age = period as f64 - segment * (i as f64 + 1.0) + segment / 2.0;
                ScaleEvent {
                    change,
                    at: now - SignedDuration::from_secs_f64(age),
                }
            })
            .collect()
    }

    // Table mirrors TestScalingWithRules (horizontal_test.go): same rules, events,
    // bounds and expected replicas and ScalingLimited reasons.
    #[test]
    fn scaling_with_rules() {
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24);
        struct Case {
            name: &'static str,
            up_events: Vec<i32>,
            down_events: Vec<i32>,
            min: i32,
            max: i32,
            up: Option<ScalingRules>,
            down: Option<ScalingRules>,
            current: i32,
            desired: i32,
            expected: i32,
            reason: Limit,
        }
        let c = |name, min, max, up, down, current, desired, expected, reason| Case {
            name,
            up_events: vec![],
            down_events: vec![],
            min,
            max,
            up,
            down,
            current,
            desired,
            expected,
            reason,
        };
        use Limit::*;
        let cases = vec![
            c(
                "prenormalized desired replicas within range",
                3,
                8,
                None,
                None,
                5,
                7,
                7,
                DesiredWithinRange,
            ),
            c(
                "prenormalized desired replicas < minReplicas",
                2,
                8,
                None,
                None,
                3,
                1,
                2,
                TooFewReplicas,
            ),
            c(
                "prenormalized desired replicas within range when minReplicas is 0",
                0,
                10,
                None,
                None,
                1,
                0,
                0,
                DesiredWithinRange,
            ),
            c(
                "maxReplicas is the limit because maxReplicas < scaleUpLimit",
                1,
                10,
                None,
                None,
                20,
                1000,
                10,
                TooManyReplicas,
            ),
            c(
                "desired replica count is more than the maximum replica count",
                100,
                150,
                None,
                None,
                100,
                1000,
                150,
                TooManyReplicas,
            ),
            c(
                "scaleUpLimit is the limit because scaleUpLimit < maxReplicas with user policies",
                1,
                2000,
                Some(rules(0, 0, 1, 60, 0)),
                None,
                3,
                1000,
                4,
                ScaleUpLimit,
            ),
            c(
                "scaleDownLimit is the limit because scaleDownLimit > minReplicas with user defined policies",
                3,
                2000,
                None,
                Some(rules(20, 60, 0, 0, 0)),
                1000,
                3,
                980,
                ScaleDownLimit,
            ),
            c(
                "scaleUp with default behavior",
                1,
                1000,
                None,
                None,
                10,
                50,
                20,
                ScaleUpLimit,
            ),
            c(
                "scaleUp with pods policy larger than percent policy",
                1,
                1000,
                Some(rules(100, 60, 100, 60, 0)),
                None,
                10,
                500,
                110,
                ScaleUpLimit,
            ),
            c(
                "scaleUp with percent policy larger than pods policy",
                1,
                1000,
                Some(rules(2, 60, 100, 60, 0)),
                None,
                10,
                500,
                20,
                ScaleUpLimit,
            ),
            c(
                "scaleUp with spec MaxReplicas limitation with large pod policy",
                1,
                1000,
                Some(rules(100, 60, 0, 0, 0)),
                None,
                10,
                50,
                50,
                DesiredWithinRange,
            ),
            c(
                "scaleUp with spec MaxReplicas limitation with large percent policy",
                1,
                1000,
                Some(rules(10000, 60, 0, 0, 0)),
                None,
                10,
                50,
                50,
                DesiredWithinRange,
            ),
            c(
                "scaleUp with pod policy limitation",
                1,
                1000,
                Some(rules(30, 60, 0, 0, 0)),
                None,
                10,
                50,
                40,
                ScaleUpLimit,
            ),
            c(
                "scaleUp with percent policy limitation",
                1,
                1000,
                Some(rules(0, 0, 200, 60, 0)),
                None,
                10,
                50,
                30,
                ScaleUpLimit,
            ),
            c(
                "scaleDown with percent policy larger than pod policy",
                1,
                1000,
                None,
                Some(rules(20, 60, 1, 60, 300)),
                100,
                2,
                80,
                ScaleDownLimit,
            ),
            c(
                "scaleDown with pod policy larger than percent policy",
                1,
                1000,
                None,
                Some(rules(2, 60, 1, 60, 300)),
                100,
                2,
                98,
                ScaleDownLimit,
            ),
            c(
                "scaleDown with spec MinReplicas limitation with large pod policy",
                1,
                1000,
                None,
                Some(rules(100, 60, 0, 0, 300)),
                10,
                0,
                1,
                TooFewReplicas,
            ),
            c(
                "scaleDown with spec MinReplicas limitation with large percent policy",
                5,
                1000,
                None,
                Some(rules(0, 0, 100, 60, 300)),
                10,
                2,
                5,
                TooFewReplicas,
            ),
            c(
                "scaleDown with pod policy limitation",
                1,
                1000,
                None,
                Some(rules(5, 60, 0, 0, 300)),
                10,
                2,
                5,
                ScaleDownLimit,
            ),
            c(
                "scaleDown with percent policy limitation",
                1,
                1000,
                None,
                Some(rules(0, 0, 50, 60, 300)),
                10,
                5,
                5,
                DesiredWithinRange,
            ),
            Case {
                up_events: vec![1, 5, 9],
                ..c(
                    "scaleUp with spec MaxReplicas limitation with large pod policy and events",
                    1,
                    200,
                    Some(rules(300, 60, 0, 0, 0)),
                    None,
                    100,
                    500,
                    200,
                    TooManyReplicas,
                )
            },
            Case {
                up_events: vec![1, 5, 9],
                ..c(
                    "scaleUp with spec MaxReplicas limitation with large percent policy and events",
                    1,
                    200,
                    Some(rules(0, 0, 10000, 60, 0)),
                    None,
                    100,
                    500,
                    200,
                    TooManyReplicas,
                )
            },
            // 120 s ago there were 100 - 15 replicas and Pods allows 5: the limit (90) is below current, so hold.
            Case {
                up_events: vec![1, 5, 9],
                ..c(
                    "scaleUp with currentReplicas limitation with rate.PeriodSeconds with a lot of recent scale up events",
                    1,
                    1000,
                    Some(rules(5, 120, 0, 0, 0)),
                    None,
                    100,
                    500,
                    100,
                    ScaleUpLimit,
                )
            },
            Case {
                up_events: vec![1, 5, 9],
                ..c(
                    "scaleUp with pod policy and previous scale up events",
                    1,
                    1000,
                    Some(rules(150, 120, 0, 0, 0)),
                    None,
                    100,
                    500,
                    235,
                    ScaleUpLimit,
                )
            },
            Case {
                up_events: vec![1, 5, 9],
                ..c(
                    "scaleUp with percent policy and previous scale up events",
                    1,
                    1000,
                    Some(rules(0, 0, 200, 120, 0)),
                    None,
                    100,
                    500,
                    255,
                    ScaleUpLimit,
                )
            },
            Case {
                down_events: vec![1, 5, 9],
                ..c(
                    "scaleDown with default policy and previous events",
                    1,
                    1000,
                    None,
                    None,
                    10,
                    5,
                    5,
                    DesiredWithinRange,
                )
            },
            Case {
                down_events: vec![1, 5, 9],
                ..c(
                    "scaleDown with spec MinReplicas=nil limitation with large pod policy and previous events",
                    1,
                    1000,
                    None,
                    Some(rules(115, 120, 0, 0, 300)),
                    100,
                    0,
                    1,
                    TooFewReplicas,
                )
            },
            Case {
                down_events: vec![1, 5, 9],
                ..c(
                    "scaleDown with spec MinReplicas limitation with large pod policy and previous events",
                    5,
                    1000,
                    None,
                    Some(rules(130, 120, 0, 0, 300)),
                    100,
                    0,
                    5,
                    TooFewReplicas,
                )
            },
            Case {
                down_events: vec![1, 5, 9],
                ..c(
                    "scaleDown with spec MinReplicas limitation with large percent policy and previous events",
                    5,
                    1000,
                    None,
                    Some(rules(0, 0, 100, 120, 300)),
                    100,
                    2,
                    5,
                    TooFewReplicas,
                )
            },
            Case {
                down_events: vec![1, 5, 9],
                ..c(
                    "scaleDown with pod policy limitation and previous events",
                    1,
                    1000,
                    None,
                    Some(rules(5, 120, 0, 0, 300)),
                    100,
                    2,
                    100,
                    ScaleDownLimit,
                )
            },
            Case {
                down_events: vec![2, 4, 6],
                ..c(
                    "scaleDown with percent policy limitation and previous events",
                    1,
                    1000,
                    None,
                    Some(rules(0, 0, 50, 120, 300)),
                    100,
                    0,
                    56,
                    ScaleDownLimit,
                )
            },
            Case {
                down_events: vec![10, 10, 10],
                ..c(
                    "scaleDown with previous events preventing further scale down",
                    1,
                    1000,
                    None,
                    Some(rules(0, 0, 10, 120, 300)),
                    100,
                    0,
                    100,
                    ScaleDownLimit,
                )
            },
            Case {
                down_events: vec![10, 10, 10],
                ..c(
                    "scaleDown with with previous events still allowing more scale down",
                    1,
                    1000,
                    None,
                    Some(rules(0, 0, 1000, 120, 300)),
                    10,
                    5,
                    5,
                    DesiredWithinRange,
                )
            },
            Case {
                up_events: vec![8, 12, 9, 11],
                ..c(
                    "check 'outdated' flag for events for one behavior for up",
                    1,
                    1000,
                    Some(rules(1000, 60, 0, 0, 0)),
                    None,
                    100,
                    200,
                    200,
                    DesiredWithinRange,
                )
            },
            Case {
                up_events: vec![8, 12, 9, 11],
                ..c(
                    "check that events were not marked 'outdated' for two different policies in the behavior for up",
                    1,
                    1000,
                    Some(rules(1000, 120, 100, 60, 0)),
                    None,
                    100,
                    200,
                    200,
                    DesiredWithinRange,
                )
            },
            Case {
                down_events: vec![8, 12, 9, 11],
                ..c(
                    "check 'outdated' flag for events for one behavior for down",
                    1,
                    1000,
                    None,
                    Some(rules(1000, 60, 0, 0, 300)),
                    100,
                    5,
                    5,
                    DesiredWithinRange,
                )
            },
        ];
        for case in cases {
            let behavior = ScalingBehavior {
                scale_up: case.up,
                scale_down: case.down,
            };
            let state = ScalingState {
                initialized: true,
                recommendations: vec![],
                scale_up_events: uniform_events(&case.up_events, 120, now),
                scale_down_events: uniform_events(&case.down_events, 120, now),
            };
            let got = limit_rate(
                case.current,
                case.desired,
                case.min,
                case.max,
                &behavior.scale_up_rules(),
                &behavior.scale_down_rules(),
                &state,
                now,
            );
            assert_eq!(got, (case.expected, case.reason), "{}", case.name);
        }
    }

    // Mirror TestCalculateScaleUpLimitWithScalingRules and
    // TestCalculateScaleDownLimitWithBehaviors: selectPolicy Min picks the smaller change.
    #[test]
    fn select_policy_min_picks_the_smaller_change() {
        let now = Timestamp::UNIX_EPOCH;
        let rules = |select_policy| ResolvedRules {
            stabilization_window_seconds: 300,
            select_policy,
            policies: vec![
                ScalingPolicy {
                    policy_type: PolicyType::Pods,
                    value: 2,
                    period_seconds: 60,
                },
                ScalingPolicy {
                    policy_type: PolicyType::Percent,
                    value: 50,
                    period_seconds: 60,
                },
            ],
        };
        let empty = ScalingState::default();
        assert_eq!(scale_up_limit(1, &rules(SelectPolicy::Min), &empty, now), 2);
        assert_eq!(
            scale_down_limit(5, &rules(SelectPolicy::Min), &empty, now),
            3
        );
        // Max takes the larger change: up from 1 → max(3, 2) = 3; down from 5 → min(3, 2) = 2.
        assert_eq!(scale_up_limit(1, &rules(SelectPolicy::Max), &empty, now), 3);
        assert_eq!(
            scale_down_limit(5, &rules(SelectPolicy::Max), &empty, now),
            2
        );
    }

    #[test]
    fn select_policy_disabled_blocks_the_direction() {
        let now = Timestamp::UNIX_EPOCH;
        let disabled = ScalingRules {
            select_policy: SelectPolicy::Disabled,
            ..ScalingRules::default()
        };
        let behavior = ScalingBehavior {
            scale_up: Some(disabled.clone()),
            scale_down: Some(disabled),
        };
        let (up, down) = (behavior.scale_up_rules(), behavior.scale_down_rules());
        let empty = ScalingState::default();
        assert_eq!(
            limit_rate(5, 9, 1, 10, &up, &down, &empty, now),
            (5, Limit::ScaleUpLimit)
        );
        assert_eq!(
            limit_rate(5, 2, 1, 10, &up, &down, &empty, now),
            (5, Limit::ScaleDownLimit)
        );
    }
}
