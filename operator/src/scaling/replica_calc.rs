//! Replica count proposed by one metric (upstream `replica_calculator.go`): a
//! per-pod average against a per-pod target, with the HPA's tolerance and its
//! handling of pods that are not ready or have not reported.

/// Default tolerance: ratios within 10 % of the target propose no change
/// (`--horizontal-pod-autoscaler-tolerance`).
pub const DEFAULT_TOLERANCE: f64 = 0.1;

/// One pod of the scaled workload as one metric sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSample {
    /// The pod's Ready condition.
    pub ready: bool,
    /// Its current value; `None` when it has not reported or its report is stale.
    pub value: Option<f64>,
}

/// Why a metric proposes nothing (upstream: the metric is invalid this round).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    #[error("the target is not a positive number")]
    InvalidTarget,
    #[error("no ready pod has a fresh report")]
    NoReadyReports,
    #[error("the metric value is unavailable")]
    Unavailable,
}

fn within_tolerance(ratio: f64, tolerance: f64) -> bool {
    (1.0 - ratio).abs() <= tolerance
}

/// Replicas for a per-pod average metric (upstream `calcPlainMetricReplicas`).
///
/// Ready pods with a fresh value are averaged; ratio = average / target. With every
/// ready pod reporting and no unready pod held back, the proposal is
/// `ceil(ratio × reporting pods)` outside the tolerance. Otherwise the tentative
/// direction decides how the gaps count: on a scale-down missing pods count as
/// exactly at target, on a scale-up missing and unready pods count as 0. If that
/// lands inside the tolerance or flips the direction, the current count stays.
pub fn pod_average_replicas(
    current: i32,
    pods: &[PodSample],
    target_per_pod: f64,
    tolerance: f64,
) -> Result<i32, MetricError> {
    if !(target_per_pod.is_finite() && target_per_pod > 0.0) {
        return Err(MetricError::InvalidTarget);
    }
    let mut sum = 0.0;
    let mut reporting = 0usize;
    let mut missing = 0usize;
    let mut unready = 0usize;
    for pod in pods {
        match (pod.ready, pod.value) {
            // Unready pods are left out whatever they report: they carry no traffic yet.
            (false, _) => unready += 1,
            (true, Some(value)) if value.is_finite() && value >= 0.0 => {
                sum += value;
                reporting += 1;
            }
            (true, _) => missing += 1,
        }
    }
    if reporting == 0 {
        return Err(MetricError::NoReadyReports);
    }
    let ratio = sum / (reporting as f64 * target_per_pod);
    let scale_up_with_unready = unready > 0 && ratio > 1.0;

    if !scale_up_with_unready && missing == 0 {
        if within_tolerance(ratio, tolerance) {
            return Ok(current);
        }
        // ceil(ratio × reporting) computed as ceil(sum / target) to avoid a rounding step.
        return Ok(ceil_replicas(sum / target_per_pod));
    }

    // Fill in the gaps in the direction the reporting pods point to.
    let mut counted = reporting;
    if missing > 0 {
        if ratio < 1.0 {
            sum += missing as f64 * target_per_pod;
            counted += missing;
        } else if ratio > 1.0 {
            counted += missing;
        }
    }
    if scale_up_with_unready {
        counted += unready;
    }
    let new_ratio = sum / (counted as f64 * target_per_pod);
    let flipped = (ratio < 1.0 && new_ratio > 1.0) || (ratio > 1.0 && new_ratio < 1.0);
    if within_tolerance(new_ratio, tolerance) || flipped {
        return Ok(current);
    }
    let proposed = ceil_replicas(sum / target_per_pod);
    // Counting more pods than `current` must not turn a scale-down into a scale-up (or back).
    if (new_ratio < 1.0 && proposed > current) || (new_ratio > 1.0 && proposed < current) {
        return Ok(current);
    }
    Ok(proposed)
}

/// Replicas for a workload-wide total with a per-pod target, such as consumer lag
/// (upstream `GetExternalPerPodMetricReplicas`): `ceil(total / target)` unless the
/// current count is already within the tolerance.
pub fn external_per_pod_replicas(
    current: i32,
    total: f64,
    target_per_pod: f64,
    tolerance: f64,
) -> Result<i32, MetricError> {
    if !(target_per_pod.is_finite() && target_per_pod > 0.0) {
        return Err(MetricError::InvalidTarget);
    }
    if !(total.is_finite() && total >= 0.0) {
        return Err(MetricError::Unavailable);
    }
    if current > 0 && within_tolerance(total / (target_per_pod * f64::from(current)), tolerance) {
        return Ok(current);
    }
    Ok(ceil_replicas(total / target_per_pod))
}

fn ceil_replicas(value: f64) -> i32 {
    // Saturating conversion; the max clamp applies later.
    value.ceil() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(values: &[f64]) -> Vec<PodSample> {
        values
            .iter()
            .map(|&v| PodSample {
                ready: true,
                value: Some(v),
            })
            .collect()
    }
    fn missing() -> PodSample {
        PodSample {
            ready: true,
            value: None,
        }
    }
    fn unready(value: Option<f64>) -> PodSample {
        PodSample {
            ready: false,
            value,
        }
    }

    // CPU cases from replica_calculator_test.go / horizontal_test.go are expressed as a
    // per-pod value against a per-pod target (request 1000m × utilization target).
    #[test]
    fn mirrors_upstream_replica_calculator_cases() {
        struct Case {
            upstream: &'static str,
            current: i32,
            pods: Vec<PodSample>,
            target: f64,
            expected: i32,
        }
        let cases = vec![
            // 300+500+700 m at a 30 % target: average 500 / 300 → ceil(5.0) = 5.
            Case {
                upstream: "TestReplicaCalcScaleUp / TestScaleUp",
                current: 3,
                pods: ready(&[300.0, 500.0, 700.0]),
                target: 300.0,
                expected: 5,
            },
            // qps 20, 10, 30 against 15 per pod → 4.
            Case {
                upstream: "TestScaleUpCM / TestReplicaCalcScaleUpCM",
                current: 3,
                pods: ready(&[20.0, 10.0, 30.0]),
                target: 15.0,
                expected: 4,
            },
            // 100+300+500+250+250 m at 50 % → 1400/500 → 3.
            Case {
                upstream: "TestScaleDown / TestReplicaCalcScaleDown",
                current: 5,
                pods: ready(&[100.0, 300.0, 500.0, 250.0, 250.0]),
                target: 500.0,
                expected: 3,
            },
            // qps 12 ×5 against 20 → 3.
            Case {
                upstream: "TestScaleDownCM",
                current: 5,
                pods: ready(&[12.0; 5]),
                target: 20.0,
                expected: 3,
            },
            // 20, 20.001, 21 against 20: ratio 1.0168 inside the tolerance.
            Case {
                upstream: "TestToleranceCM",
                current: 3,
                pods: ready(&[20.0, 20.001, 21.0]),
                target: 20.0,
                expected: 3,
            },
            // Unready pod 0 is held back; on the scale-up it counts as 0: (0+500+700)/3 = 400 → 4.
            Case {
                upstream: "TestReplicaCalcScaleUpUnreadyLessScale",
                current: 3,
                pods: vec![
                    unready(Some(300.0)),
                    PodSample {
                        ready: true,
                        value: Some(500.0),
                    },
                    PodSample {
                        ready: true,
                        value: Some(700.0),
                    },
                ],
                target: 300.0,
                expected: 4,
            },
            // One ready pod at 400 suggests up, two unready at 0 flip it down: hold 3.
            Case {
                upstream: "TestReplicaCalcScaleUpUnreadyNoScale",
                current: 3,
                pods: vec![
                    PodSample {
                        ready: true,
                        value: Some(400.0),
                    },
                    unready(Some(500.0)),
                    unready(Some(700.0)),
                ],
                target: 300.0,
                expected: 3,
            },
            // 400 and 95 against 1000, two pods missing, scale-down: missing at target → (400+95+2000)/1000 → 3.
            Case {
                upstream: "TestReplicaCalcMissingMetrics",
                current: 4,
                pods: vec![
                    PodSample {
                        ready: true,
                        value: Some(400.0),
                    },
                    PodSample {
                        ready: true,
                        value: Some(95.0),
                    },
                    missing(),
                    missing(),
                ],
                target: 1000.0,
                expected: 3,
            },
            // Exactly at target with a pod missing: no fill-in, inside tolerance.
            Case {
                upstream: "TestReplicaCalcMissingMetricsNoChangeEq",
                current: 2,
                pods: vec![
                    PodSample {
                        ready: true,
                        value: Some(1000.0),
                    },
                    missing(),
                ],
                target: 1000.0,
                expected: 2,
            },
            Case {
                upstream: "TestPlainMetricReplicaCalcMissingMetricsNoChangeEq",
                current: 5,
                pods: vec![
                    PodSample {
                        ready: true,
                        value: Some(20000.0),
                    },
                    PodSample {
                        ready: true,
                        value: Some(19000.0),
                    },
                    PodSample {
                        ready: true,
                        value: Some(21000.0),
                    },
                    missing(),
                    missing(),
                ],
                target: 20000.0,
                expected: 5,
            },
            // 1900 vs 1000 suggests up; the missing pod at 0 brings it to 0.95, inside tolerance.
            Case {
                upstream: "TestReplicaCalcMissingMetricsNoChangeGt",
                current: 2,
                pods: vec![
                    PodSample {
                        ready: true,
                        value: Some(1900.0),
                    },
                    missing(),
                ],
                target: 1000.0,
                expected: 2,
            },
            // 600 vs 1000 suggests down; the missing pod at target gives 0.8 → ceil(1.6) = 2 = current.
            Case {
                upstream: "TestReplicaCalcMissingMetricsNoChangeLt",
                current: 2,
                pods: vec![
                    PodSample {
                        ready: true,
                        value: Some(600.0),
                    },
                    missing(),
                ],
                target: 1000.0,
                expected: 2,
            },
            // 450 vs 500 (down), missing at target → 0.95: inside tolerance, hold 3.
            Case {
                upstream: "TestReplicaCalcMissingMetricsUnreadyChange",
                current: 3,
                pods: vec![
                    unready(Some(100.0)),
                    PodSample {
                        ready: true,
                        value: Some(450.0),
                    },
                    missing(),
                ],
                target: 500.0,
                expected: 3,
            },
            // 2000 vs 500 (up): unready and missing count as 0 → 2000/3/500 = 1.33 → 4.
            Case {
                upstream: "TestReplicaCalcMissingMetricsUnreadyScaleUp",
                current: 3,
                pods: vec![
                    unready(Some(100.0)),
                    PodSample {
                        ready: true,
                        value: Some(2000.0),
                    },
                    missing(),
                ],
                target: 500.0,
                expected: 4,
            },
        ];
        for case in cases {
            let got =
                pod_average_replicas(case.current, &case.pods, case.target, DEFAULT_TOLERANCE);
            assert_eq!(got, Ok(case.expected), "{}", case.upstream);
        }
    }

    // Mirrors TestTolerance: 1010, 1030, 1020 m against requests 0.9, 1.0, 1.1 at a
    // 100 % target is a 102 % ratio → no change.
    #[test]
    fn tolerance_holds_small_deviations() {
        assert_eq!(
            pod_average_replicas(
                3,
                &ready(&[1010.0, 1030.0, 1020.0]),
                1000.0,
                DEFAULT_TOLERANCE
            ),
            Ok(3)
        );
        // Just outside the tolerance on either side it moves.
        assert_eq!(
            pod_average_replicas(10, &ready(&[1110.0; 10]), 1000.0, DEFAULT_TOLERANCE),
            Ok(12)
        );
        assert_eq!(
            pod_average_replicas(10, &ready(&[890.0; 10]), 1000.0, DEFAULT_TOLERANCE),
            Ok(9)
        );
    }

    #[test]
    fn no_ready_reports_or_bad_target_is_an_invalid_metric() {
        assert_eq!(
            pod_average_replicas(2, &[missing(), unready(Some(5.0))], 10.0, DEFAULT_TOLERANCE),
            Err(MetricError::NoReadyReports)
        );
        assert_eq!(
            pod_average_replicas(2, &ready(&[1.0]), 0.0, DEFAULT_TOLERANCE),
            Err(MetricError::InvalidTarget)
        );
        assert_eq!(
            external_per_pod_replicas(2, f64::NAN, 10.0, DEFAULT_TOLERANCE),
            Err(MetricError::Unavailable)
        );
    }

    // Mirror TestScaleUpPerPodCMExternal / TestScaleDownPerPodCMExternal /
    // TestReplicaCalcScaleUpCMExternalPerPod style cases: total 8.6 against 2.222/pod → 4,
    // against 3/pod → 3; TestTolerancePerPodCMExternal: 8.6 vs 2.2 × 4 pods holds 4.
    #[test]
    fn external_per_pod_total() {
        assert_eq!(
            external_per_pod_replicas(3, 8.6, 2.222, DEFAULT_TOLERANCE),
            Ok(4)
        );
        assert_eq!(
            external_per_pod_replicas(5, 8.6, 3.0, DEFAULT_TOLERANCE),
            Ok(3)
        );
        assert_eq!(
            external_per_pod_replicas(4, 8.6, 2.2, DEFAULT_TOLERANCE),
            Ok(4)
        );
        // Consumer lag: 23 000 entries against 5 000 per pod → 5 pods; zero lag → 0 (min clamps later).
        assert_eq!(
            external_per_pod_replicas(1, 23_000.0, 5_000.0, DEFAULT_TOLERANCE),
            Ok(5)
        );
        assert_eq!(
            external_per_pod_replicas(3, 0.0, 5_000.0, DEFAULT_TOLERANCE),
            Ok(0)
        );
    }
}
