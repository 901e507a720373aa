//! One HPA evaluation (upstream `reconcileAutoscaler` from the scale read to the
//! scale write): out-of-range counts first, then the maximum over the metrics'
//! proposals, then stabilization and rate limits.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::behavior::ScalingBehavior;
use super::history::{Recommendation, ScalingState};
use super::rate_limit::{Limit, limit_rate};
use super::replica_calc::MetricError;
use super::stabilization::{Stabilized, held_until, stabilize};

/// The metrics flashsale scales on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ScalingMetric {
    /// Open WebSocket connections per gateway pod.
    Connections,
    /// Requests per second per gateway pod.
    RequestsPerSecond,
    /// Stream entries not yet persisted, per consumer pod.
    ConsumerLag,
}

impl fmt::Display for ScalingMetric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScalingMetric::Connections => "connections",
            ScalingMetric::RequestsPerSecond => "requestsPerSecond",
            ScalingMetric::ConsumerLag => "consumerLag",
        })
    }
}

/// One metric's proposal for this round.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub metric: ScalingMetric,
    pub replicas: Result<i32, MetricError>,
}

/// Replica bounds and rate rules of one scaled workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HpaSpec {
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub behavior: ScalingBehavior,
}

/// What settled the count of an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Metrics proposed a count; `limit` says whether policies or bounds cut it.
    Metric {
        metric: ScalingMetric,
        proposed: i32,
        stabilized: Stabilized,
        /// When the stabilization window stops holding the count (with `stabilized`).
        held_until: Option<Timestamp>,
        limit: Limit,
    },
    /// The current count was outside min/max and is brought back without looking at metrics.
    OutOfRange,
    /// No usable metric, or an invalid one while the others say scale down: hold.
    MetricsInvalid,
}

/// Result of one evaluation: the count to write and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub replicas: i32,
    pub outcome: Outcome,
    pub reason: String,
}

/// The maximum over the metrics' proposals (upstream `computeReplicasForMetrics`).
///
/// Invalid metrics are skipped, but if every metric is invalid, or some are invalid
/// and the valid ones would scale down, nothing may change: the missing metric might
/// have asked for more.
pub fn combine(current: i32, proposals: &[Proposal]) -> Result<(i32, ScalingMetric), String> {
    let mut best: Option<(i32, ScalingMetric)> = None;
    let mut invalid: Vec<String> = Vec::new();
    for proposal in proposals {
        match &proposal.replicas {
            Ok(replicas) => {
                if best.is_none_or(|(b, _)| *replicas > b) {
                    best = Some((*replicas, proposal.metric));
                }
            }
            Err(err) => invalid.push(format!("{}: {err}", proposal.metric)),
        }
    }
    match best {
        None if invalid.is_empty() => Err("no metrics configured".to_string()),
        None => Err(format!("all metrics invalid ({})", invalid.join("; "))),
        Some((replicas, _)) if !invalid.is_empty() && replicas < current => Err(format!(
            "not scaling down to {replicas} while a metric is invalid ({})",
            invalid.join("; ")
        )),
        Some(best) => Ok(best),
    }
}

/// Evaluates one round and updates `state` (recommendations, pruning). Scale events
/// are recorded by the caller once it knows the count it will write.
pub fn evaluate(
    current: i32,
    proposals: &[Proposal],
    spec: &HpaSpec,
    state: &mut ScalingState,
    now: Timestamp,
) -> Evaluation {
    let up = spec.behavior.scale_up_rules();
    let down = spec.behavior.scale_down_rules();
    state.prune(
        up.stabilization_window_seconds
            .max(down.stabilization_window_seconds),
        up.longest_period_seconds()
            .max(down.longest_period_seconds()),
        now,
    );
    // Upstream seeds the history with the current count the first time it sees a
    // target, so a fresh controller does not scale down before a full window.
    if !state.initialized {
        state.initialized = true;
        state.recommendations.push(Recommendation {
            replicas: current,
            at: now,
        });
    }

    let (min, max) = (spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    if current > max {
        return Evaluation {
            replicas: max,
            outcome: Outcome::OutOfRange,
            reason: format!("current replicas {current} above maxReplicas {max}"),
        };
    }
    if current < min {
        return Evaluation {
            replicas: min,
            outcome: Outcome::OutOfRange,
            reason: format!("current replicas {current} below minReplicas {min}"),
        };
    }

    let (proposed, metric) = match combine(current, proposals) {
        Ok(found) => found,
        Err(reason) => {
            return Evaluation {
                replicas: current,
                outcome: Outcome::MetricsInvalid,
                reason,
            };
        }
    };
    let (stabilized_count, stabilized) = stabilize(
        current,
        proposed,
        up.stabilization_window_seconds,
        down.stabilization_window_seconds,
        state,
        now,
    );
    let held_until = held_until(
        stabilized_count,
        stabilized,
        up.stabilization_window_seconds,
        down.stabilization_window_seconds,
        state,
        now,
    );
    let (replicas, limit) = limit_rate(current, stabilized_count, min, max, &up, &down, state, now);

    let mut reason = match proposed.cmp(&current) {
        std::cmp::Ordering::Greater => format!("{metric} above target: {proposed} proposed"),
        std::cmp::Ordering::Less => format!("all metrics below target: {proposed} proposed"),
        std::cmp::Ordering::Equal => format!("{metric} within tolerance"),
    };
    match stabilized {
        Stabilized::No => {}
        Stabilized::ScaleUp => reason.push_str(&format!(
            ", held at {stabilized_count} by the lowest recommendation of the {} s scale-up window",
            up.stabilization_window_seconds
        )),
        Stabilized::ScaleDown => reason.push_str(&format!(
            ", held at {stabilized_count} by the highest recommendation of the {} s scale-down window",
            down.stabilization_window_seconds
        )),
    }
    if limit != Limit::DesiredWithinRange {
        reason.push_str(&format!(", limited to {replicas} ({limit})"));
    }
    Evaluation {
        replicas,
        outcome: Outcome::Metric {
            metric,
            proposed,
            stabilized,
            held_until,
            limit,
        },
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaling::behavior::{PolicyType, ScalingPolicy, ScalingRules, SelectPolicy};
    use crate::scaling::replica_calc::{DEFAULT_TOLERANCE, PodSample, pod_average_replicas};
    use jiff::SignedDuration;

    fn now() -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24)
    }

    fn spec(min: i32, max: i32) -> HpaSpec {
        HpaSpec {
            min_replicas: min,
            max_replicas: max,
            behavior: ScalingBehavior::default(),
        }
    }

    fn pods(values: &[f64]) -> Vec<PodSample> {
        values
            .iter()
            .map(|&v| PodSample {
                ready: true,
                value: Some(v),
            })
            .collect()
    }

    fn cpu(current: i32, values: &[f64], target: f64) -> Proposal {
        Proposal {
            metric: ScalingMetric::Connections,
            replicas: pod_average_replicas(current, &pods(values), target, DEFAULT_TOLERANCE),
        }
    }

    fn invalid(metric: ScalingMetric) -> Proposal {
        Proposal {
            metric,
            replicas: Err(MetricError::Unavailable),
        }
    }

    /// A known target with no recent recommendations (upstream tests pass
    /// `recommendations: []timestampedRecommendation{}` for this).
    fn settled() -> ScalingState {
        ScalingState {
            initialized: true,
            ..ScalingState::default()
        }
    }

    fn run(current: i32, proposals: &[Proposal], spec: &HpaSpec, mut state: ScalingState) -> i32 {
        evaluate(current, proposals, spec, &mut state, now()).replicas
    }

    // Each case names the horizontal_test.go test whose inputs and expected
    // desired replicas it repeats.
    #[test]
    fn mirrors_upstream_horizontal_controller_cases() {
        // TestScaleUp: 3 pods at 300/500/700 m, 30 % target → 5.
        assert_eq!(
            run(
                3,
                &[cpu(3, &[300.0, 500.0, 700.0], 300.0)],
                &spec(2, 6),
                settled()
            ),
            5
        );
        // TestScaleDown: 5 pods, 1400 m at a 50 % target → 3.
        assert_eq!(
            run(
                5,
                &[cpu(5, &[100.0, 300.0, 500.0, 250.0, 250.0], 500.0)],
                &spec(2, 6),
                settled()
            ),
            3
        );
        // TestScaleDownStabilizeInitialSize: the same inputs with no history stay at 5
        // (the seeded recommendation holds the 300 s scale-down window).
        assert_eq!(
            run(
                5,
                &[cpu(5, &[100.0, 300.0, 500.0, 250.0, 250.0], 500.0)],
                &spec(2, 6),
                ScalingState::default()
            ),
            5
        );
        // TestScaleUpOneMetricInvalid: CPU says 4, the other metric is invalid → 4.
        assert_eq!(
            run(
                3,
                &[
                    cpu(3, &[300.0, 400.0, 500.0], 300.0),
                    invalid(ScalingMetric::RequestsPerSecond)
                ],
                &spec(2, 6),
                settled()
            ),
            4
        );
        // TestNoScaleDownOneMetricInvalid / TestScaleDownOneMetricInvalid (current
        // upstream): CPU says 3 but another metric is invalid → stay at 5.
        assert_eq!(
            run(
                5,
                &[
                    cpu(5, &[100.0, 300.0, 500.0, 250.0, 250.0], 500.0),
                    invalid(ScalingMetric::RequestsPerSecond)
                ],
                &spec(2, 6),
                settled()
            ),
            5
        );
        // TestScaleUpBothMetricsEmpty: nothing valid → hold 3.
        assert_eq!(
            run(
                3,
                &[
                    invalid(ScalingMetric::Connections),
                    invalid(ScalingMetric::RequestsPerSecond)
                ],
                &spec(2, 6),
                settled()
            ),
            3
        );
        // TestMinReplicas: 10/95/10 m at 90 % of ~1000 m proposes 1 → clamped to min 2.
        assert_eq!(
            run(
                3,
                &[cpu(3, &[10.0, 95.0, 10.0], 900.0)],
                &spec(2, 5),
                settled()
            ),
            2
        );
        // TestZeroMinReplicasDesiredZero: zero load with min 0 → 0.
        assert_eq!(
            run(
                3,
                &[cpu(3, &[0.0, 0.0, 0.0], 900.0)],
                &spec(0, 5),
                settled()
            ),
            0
        );
        // TestMaxReplicas: 8000/9500/1000 m at 90 % → far above max 5 → 5.
        assert_eq!(
            run(
                3,
                &[cpu(3, &[8000.0, 9500.0, 1000.0], 900.0)],
                &spec(2, 5),
                settled()
            ),
            5
        );
        // TestTooFewReplicas / TestScaleUpRCImmediately: below min scales to min at once, metrics unread.
        assert_eq!(run(2, &[], &spec(3, 5), settled()), 3);
        assert_eq!(run(1, &[], &spec(2, 6), settled()), 2);
        // TestTooManyReplicas / TestScaleDownRCImmediately: above max goes to max at once.
        assert_eq!(run(10, &[], &spec(3, 5), settled()), 5);
        // TestMissingReports: the one reporting pod runs at 200 % → 2 (a scale-down from 4).
        assert_eq!(
            run(4, &[cpu(4, &[200.0], 100.0)], &spec(1, 5), settled()),
            2
        );
        // TestTolerance: 102 % of target → no change.
        assert_eq!(
            run(
                3,
                &[cpu(3, &[1010.0, 1030.0, 1020.0], 1000.0)],
                &spec(1, 5),
                settled()
            ),
            3
        );
    }

    // TestUpscaleCap / TestUpscaleCapGreaterThanMaxReplicas: Percent 700 per 60 s from 3 → 24, or max 20.
    #[test]
    fn upscale_cap_follows_the_percent_policy() {
        let behavior = ScalingBehavior {
            scale_up: Some(ScalingRules {
                stabilization_window_seconds: Some(0),
                select_policy: SelectPolicy::Max,
                policies: vec![ScalingPolicy {
                    policy_type: PolicyType::Percent,
                    value: 700,
                    period_seconds: 60,
                }],
            }),
            scale_down: None,
        };
        let load = [cpu(3, &[1000.0, 2000.0, 3000.0], 100.0)];
        let capped = HpaSpec {
            min_replicas: 1,
            max_replicas: 100,
            behavior: behavior.clone(),
        };
        let mut state = settled();
        let e = evaluate(3, &load, &capped, &mut state, now());
        assert_eq!(e.replicas, 24);
        assert!(matches!(
            e.outcome,
            Outcome::Metric {
                proposed: 60,
                limit: Limit::ScaleUpLimit,
                ..
            }
        ));
        let max20 = HpaSpec {
            max_replicas: 20,
            ..capped
        };
        assert_eq!(run(3, &load, &max20, settled()), 20);
    }

    #[test]
    fn several_metrics_take_the_maximum_and_name_it() {
        let proposals = [
            Proposal {
                metric: ScalingMetric::Connections,
                replicas: Ok(4),
            },
            Proposal {
                metric: ScalingMetric::RequestsPerSecond,
                replicas: Ok(9),
            },
        ];
        assert_eq!(
            combine(3, &proposals),
            Ok((9, ScalingMetric::RequestsPerSecond))
        );
        let mut state = settled();
        let e = evaluate(3, &proposals, &spec(1, 10), &mut state, now());
        assert_eq!(e.replicas, 7, "default scale-up policy: max(3 + 4, 3 × 2)");
        assert_eq!(
            e.reason,
            "requestsPerSecond above target: 9 proposed, limited to 7 (ScaleUpLimit)"
        );
    }

    // A scale-down through the whole pipeline: the 300 s window holds the highest
    // recent recommendation, then the count falls once the window has passed.
    #[test]
    fn default_scale_down_waits_for_the_window() {
        let spec = spec(1, 20);
        let mut state = ScalingState::default();
        let t0 = now();
        let high = [Proposal {
            metric: ScalingMetric::Connections,
            replicas: Ok(10),
        }];
        let low = [Proposal {
            metric: ScalingMetric::Connections,
            replicas: Ok(2),
        }];
        assert_eq!(evaluate(10, &high, &spec, &mut state, t0).replicas, 10);
        let held = evaluate(
            10,
            &low,
            &spec,
            &mut state,
            t0 + SignedDuration::from_secs(60),
        );
        assert_eq!(held.replicas, 10);
        assert!(held.reason.contains("scale-down window"), "{}", held.reason);
        assert_eq!(
            evaluate(
                10,
                &low,
                &spec,
                &mut state,
                t0 + SignedDuration::from_secs(301)
            )
            .replicas,
            2
        );
    }
}
