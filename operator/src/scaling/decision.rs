//! flashsale's scaling decision for one workload and one tick of the operator's
//! loop: load reports and spec settings in, the replica count to write out.
//! Pure: the caller reads Redis and the API server, passes `now`, writes the
//! `scale` subresource and keeps [`Decision::state`] for the next tick.

use std::collections::HashMap;
use std::fmt;

use jiff::{SignedDuration, Timestamp};

use super::behavior::ScalingBehavior;
use super::history::ScalingState;
use super::hpa::{self, HpaSpec, Outcome, Proposal, ScalingMetric};
use super::prescale::SaleWindow;
use super::rate_limit::Limit;
use super::replica_calc::{
    DEFAULT_TOLERANCE, MetricError, PodSample, external_per_pod_replicas, pod_average_replicas,
};
use super::stabilization::Stabilized;

/// Reports older than this count as missing: pods publish about once a second, so
/// five silent seconds mean the pod is stuck or gone.
pub const DEFAULT_REPORT_MAX_AGE: SignedDuration = SignedDuration::from_secs(5);

/// One gateway pod's load report as published to Redis.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    pub pod: String,
    pub connections: f64,
    pub requests_per_second: f64,
    pub reported_at: Timestamp,
}

/// A pod of the scaled Deployment, from the pod list (terminating and failed pods left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodReadiness {
    pub name: String,
    pub ready: bool,
}

/// The gateway's scaling settings, taken from the FlashSale spec.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayScaling {
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// `replicas.atStart`: the floor from `startTime − warmupSeconds` until `endTime`.
    pub at_start: Option<i32>,
    pub target_connections_per_pod: f64,
    pub target_requests_per_second_per_pod: f64,
    pub behavior: ScalingBehavior,
    /// The sale's window; `None` scales reactively only (as a stock HPA).
    pub sale: Option<SaleWindow>,
    pub tolerance: f64,
    pub report_max_age: SignedDuration,
}

/// What the loop observed for the gateway this tick.
#[derive(Clone, Copy, Debug)]
pub struct GatewayObservation<'a> {
    /// `spec.replicas` of the Deployment's scale subresource.
    pub current_replicas: i32,
    pub pods: &'a [PodReadiness],
    pub reports: &'a [LoadReport],
}

/// The consumers' scaling settings, taken from the FlashSale spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerScaling {
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub target_lag_per_pod: f64,
    pub behavior: ScalingBehavior,
    pub tolerance: f64,
}

/// What set the decided count, for status and Events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Metric(ScalingMetric),
    /// The sale's `atStart` floor.
    Schedule,
    /// The count was outside `min`/`max`.
    ReplicaBounds,
    /// Metrics were unusable; the count is held.
    None,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Driver::Metric(metric) => metric.fmt(f),
            Driver::Schedule => f.write_str("schedule"),
            Driver::ReplicaBounds => f.write_str("replicaBounds"),
            Driver::None => f.write_str("none"),
        }
    }
}

/// What keeps the count from where the driving metric would take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldBy {
    /// Lower recent recommendations hold a rise back (`scaleUp.stabilizationWindowSeconds`).
    ScaleUpStabilization,
    /// Higher recent recommendations hold a fall back (`scaleDown.stabilizationWindowSeconds`).
    ScaleDownStabilization,
    /// `scaleUp.policies` cut the rise.
    ScaleUpPolicy,
    /// `scaleDown.policies` cut the fall.
    ScaleDownPolicy,
}

impl fmt::Display for HeldBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeldBy::ScaleUpStabilization => "scaleUpStabilization",
            HeldBy::ScaleDownStabilization => "scaleDownStabilization",
            HeldBy::ScaleUpPolicy => "scaleUpPolicy",
            HeldBy::ScaleDownPolicy => "scaleDownPolicy",
        })
    }
}

/// A hold on the count, and until when it lasts if nothing else changes
/// (known for stabilization windows; policies free the count step by step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub by: HeldBy,
    pub until: Option<Timestamp>,
}

/// The outcome of one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub desired_replicas: i32,
    pub driver: Driver,
    /// Why the count is not where the driving metric proposes (`None`: it is,
    /// or the schedule or the bounds decided).
    pub hold: Option<Hold>,
    /// One line for the Event and status message.
    pub reason: String,
    /// History to pass to the next tick. It already records the change to
    /// `desired_replicas`; if the scale write fails, keep the previous state instead.
    pub state: ScalingState,
}

impl GatewayScaling {
    /// Settings with the HPA's tolerance and report age defaults.
    pub fn new(
        min_replicas: i32,
        max_replicas: i32,
        target_connections_per_pod: f64,
        target_requests_per_second_per_pod: f64,
    ) -> Self {
        GatewayScaling {
            min_replicas,
            max_replicas,
            at_start: None,
            target_connections_per_pod,
            target_requests_per_second_per_pod,
            behavior: ScalingBehavior::default(),
            sale: None,
            tolerance: DEFAULT_TOLERANCE,
            report_max_age: DEFAULT_REPORT_MAX_AGE,
        }
    }
}

/// Decides the gateway's replica count: the HPA algorithm over connections and
/// requests per second, raised to the sale's `atStart` floor while it applies.
pub fn decide_gateway(
    settings: &GatewayScaling,
    observed: &GatewayObservation<'_>,
    state: &ScalingState,
    now: Timestamp,
) -> Decision {
    let fresh = fresh_reports(observed.reports, settings.report_max_age, now);
    let samples = |value: fn(&LoadReport) -> f64| -> Vec<PodSample> {
        observed
            .pods
            .iter()
            .map(|pod| PodSample {
                ready: pod.ready,
                value: fresh.get(pod.name.as_str()).map(|r| value(r)),
            })
            .collect()
    };
    let current = observed.current_replicas;
    let proposals = [
        Proposal {
            metric: ScalingMetric::Connections,
            replicas: pod_average_replicas(
                current,
                &samples(|r| r.connections),
                settings.target_connections_per_pod,
                settings.tolerance,
            ),
        },
        Proposal {
            metric: ScalingMetric::RequestsPerSecond,
            replicas: pod_average_replicas(
                current,
                &samples(|r| r.requests_per_second),
                settings.target_requests_per_second_per_pod,
                settings.tolerance,
            ),
        },
    ];
    let spec = HpaSpec {
        min_replicas: settings.min_replicas,
        max_replicas: settings.max_replicas,
        behavior: settings.behavior.clone(),
    };
    let floor = settings.sale.and_then(|sale| {
        sale.floor(
            settings.at_start,
            settings.min_replicas,
            settings.max_replicas,
            now,
        )
    });
    decide(current, &proposals, &spec, floor, state, now)
}

/// Decides the consumers' replica count from the stream lag (`None` when it could
/// not be read): `ceil(lag / targetLagPerPod)` with the HPA's tolerance and behavior.
pub fn decide_consumer(
    settings: &ConsumerScaling,
    current_replicas: i32,
    lag: Option<u64>,
    state: &ScalingState,
    now: Timestamp,
) -> Decision {
    let replicas = match lag {
        // u64 → f64 loses precision only above 2^53 entries, far beyond any stream.
        Some(lag) => external_per_pod_replicas(
            current_replicas,
            lag as f64,
            settings.target_lag_per_pod,
            settings.tolerance,
        ),
        None => Err(MetricError::Unavailable),
    };
    let spec = HpaSpec {
        min_replicas: settings.min_replicas,
        max_replicas: settings.max_replicas,
        behavior: settings.behavior.clone(),
    };
    decide(
        current_replicas,
        &[Proposal {
            metric: ScalingMetric::ConsumerLag,
            replicas,
        }],
        &spec,
        None,
        state,
        now,
    )
}

fn decide(
    current: i32,
    proposals: &[Proposal],
    spec: &HpaSpec,
    floor: Option<i32>,
    state: &ScalingState,
    now: Timestamp,
) -> Decision {
    let mut state = state.clone();
    let evaluation = hpa::evaluate(current, proposals, spec, &mut state, now);
    let reactive = evaluation.replicas;
    let (desired, driver, hold, reason) = match floor {
        Some(floor) if floor > reactive => (
            floor,
            Driver::Schedule,
            None,
            format!(
                "sale floor atStart {floor} (reactive {reactive}: {})",
                evaluation.reason
            ),
        ),
        _ => {
            let (driver, hold) = match evaluation.outcome {
                Outcome::Metric {
                    metric,
                    stabilized,
                    held_until,
                    limit,
                    ..
                } => (Driver::Metric(metric), hold(stabilized, held_until, limit)),
                Outcome::OutOfRange => (Driver::ReplicaBounds, None),
                Outcome::MetricsInvalid => (Driver::None, None),
            };
            (reactive, driver, hold, evaluation.reason)
        }
    };
    // Only reactive steps count against the rate limits: the floor is a baseline, so
    // the part of a rise that merely reaches it is not a scale event.
    let baseline = floor.map_or(current, |floor| floor.max(current));
    if desired > baseline {
        state.record_change(baseline, desired, now);
    } else if desired < current {
        state.record_change(current, desired, now);
    }
    Decision {
        desired_replicas: desired,
        driver,
        hold,
        reason,
        state,
    }
}

/// What held the metric's proposal back: a policy that cut the last step, else
/// a stabilization window.
fn hold(stabilized: Stabilized, until: Option<Timestamp>, limit: Limit) -> Option<Hold> {
    let by = match (limit, stabilized) {
        (Limit::ScaleUpLimit, _) => HeldBy::ScaleUpPolicy,
        (Limit::ScaleDownLimit, _) => HeldBy::ScaleDownPolicy,
        (_, Stabilized::ScaleUp) => HeldBy::ScaleUpStabilization,
        (_, Stabilized::ScaleDown) => HeldBy::ScaleDownStabilization,
        (_, Stabilized::No) => return None,
    };
    let until = match by {
        HeldBy::ScaleUpStabilization | HeldBy::ScaleDownStabilization => until,
        HeldBy::ScaleUpPolicy | HeldBy::ScaleDownPolicy => None,
    };
    Some(Hold { by, until })
}

/// The newest report per pod, if it is recent enough.
fn fresh_reports(
    reports: &[LoadReport],
    max_age: SignedDuration,
    now: Timestamp,
) -> HashMap<&str, &LoadReport> {
    let mut newest: HashMap<&str, &LoadReport> = HashMap::new();
    for report in reports {
        if now.duration_since(report.reported_at) > max_age {
            continue;
        }
        newest
            .entry(report.pod.as_str())
            .and_modify(|kept| {
                if report.reported_at > kept.reported_at {
                    *kept = report;
                }
            })
            .or_insert(report);
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(seconds)
    }

    fn pods(n: usize, ready: usize) -> Vec<PodReadiness> {
        (0..n)
            .map(|i| PodReadiness {
                name: format!("gw-{i}"),
                ready: i < ready,
            })
            .collect()
    }

    fn report(pod: usize, connections: f64, rps: f64, t: i64) -> LoadReport {
        LoadReport {
            pod: format!("gw-{pod}"),
            connections,
            requests_per_second: rps,
            reported_at: at(t),
        }
    }

    fn settings() -> GatewayScaling {
        GatewayScaling {
            at_start: Some(10),
            sale: Some(SaleWindow {
                start: at(600),
                end: at(2400),
                warmup: SignedDuration::from_secs(300),
            }),
            ..GatewayScaling::new(2, 50, 20_000.0, 15_000.0)
        }
    }

    fn known() -> ScalingState {
        ScalingState {
            initialized: true,
            ..ScalingState::default()
        }
    }

    #[test]
    fn connections_drive_a_scale_up_and_are_named() {
        let pods = pods(4, 4);
        let reports: Vec<_> = (0..4).map(|i| report(i, 30_000.0, 1_000.0, 99)).collect();
        let observed = GatewayObservation {
            current_replicas: 4,
            pods: &pods,
            reports: &reports,
        };
        let d = decide_gateway(&settings(), &observed, &known(), at(100));
        assert_eq!(d.desired_replicas, 6);
        assert_eq!(d.driver, Driver::Metric(ScalingMetric::Connections));
        assert_eq!(d.driver.to_string(), "connections");
        assert_eq!(d.state.scale_up_events.len(), 1);
        assert_eq!(d.state.scale_up_events[0].change, 2);
    }

    #[test]
    fn a_policy_cut_is_named_as_the_hold() {
        let pods = pods(4, 4);
        let reports: Vec<_> = (0..4).map(|i| report(i, 200_000.0, 0.0, 99)).collect();
        let observed = GatewayObservation {
            current_replicas: 4,
            pods: &pods,
            reports: &reports,
        };
        // 40 proposed; the default scale-up policies allow doubling per 15 s.
        let d = decide_gateway(&settings(), &observed, &known(), at(100));
        assert_eq!(d.desired_replicas, 8);
        assert_eq!(d.driver, Driver::Metric(ScalingMetric::Connections));
        assert_eq!(
            d.hold,
            Some(Hold {
                by: HeldBy::ScaleUpPolicy,
                until: None
            })
        );
    }

    #[test]
    fn requests_per_second_win_when_higher() {
        let pods = pods(4, 4);
        let reports: Vec<_> = (0..4).map(|i| report(i, 10_000.0, 30_000.0, 100)).collect();
        let observed = GatewayObservation {
            current_replicas: 4,
            pods: &pods,
            reports: &reports,
        };
        let d = decide_gateway(&settings(), &observed, &known(), at(100));
        assert_eq!(
            (d.desired_replicas, d.driver),
            (8, Driver::Metric(ScalingMetric::RequestsPerSecond))
        );
    }

    // Stale or duplicate reports: a pod's newest fresh report counts, older than
    // report_max_age is missing (scale-up: missing counts as 0, as upstream).
    #[test]
    fn stale_reports_count_as_missing() {
        let pods = pods(4, 4);
        let reports = vec![
            report(0, 1_000.0, 0.0, 90),
            report(0, 40_000.0, 0.0, 99),
            report(1, 40_000.0, 0.0, 100),
            report(2, 40_000.0, 0.0, 80),
            report(3, 40_000.0, 0.0, 94),
        ];
        let observed = GatewayObservation {
            current_replicas: 4,
            pods: &pods,
            reports: &reports,
        };
        // Fresh: gw-0 and gw-1 at 40 000 (ratio 2); gw-2, gw-3 missing → 80 000 over 4 pods → 4 pods: hold.
        let d = decide_gateway(&settings(), &observed, &known(), at(100));
        assert_eq!(d.desired_replicas, 4);
    }

    #[test]
    fn floor_applies_from_warmup_without_a_scale_event() {
        let pods = pods(2, 2);
        let reports: Vec<_> = (0..2).map(|i| report(i, 1_000.0, 10.0, 300)).collect();
        let observed = GatewayObservation {
            current_replicas: 2,
            pods: &pods,
            reports: &reports,
        };
        let before = decide_gateway(&settings(), &observed, &known(), at(299));
        assert_eq!(before.desired_replicas, 2);
        let d = decide_gateway(&settings(), &observed, &known(), at(300));
        assert_eq!((d.desired_replicas, d.driver), (10, Driver::Schedule));
        assert!(
            d.state.scale_up_events.is_empty(),
            "the floor is not rate-limited history"
        );
        assert!(
            d.reason.starts_with("sale floor atStart 10"),
            "{}",
            d.reason
        );
    }

    // After endTime the floor lifts and the scale-down behavior takes over: the
    // 300 s window still holds the highest recent recommendation, then 100 %/15 s
    // lets the count drop to min at once.
    #[test]
    fn after_end_scales_down_by_the_behavior() {
        let s = settings();
        let ten = pods(10, 10);
        let busy: Vec<_> = (0..10).map(|i| report(i, 30_000.0, 0.0, 2200)).collect();
        let d = decide_gateway(
            &s,
            &GatewayObservation {
                current_replicas: 10,
                pods: &ten,
                reports: &busy,
            },
            &known(),
            at(2200),
        );
        assert_eq!(
            (d.desired_replicas, d.driver),
            (15, Driver::Metric(ScalingMetric::Connections))
        );

        let fifteen = pods(15, 15);
        let quiet = |t| {
            (0..15)
                .map(|i| report(i, 2_000.0, 0.0, t))
                .collect::<Vec<_>>()
        };
        let reports = quiet(2400);
        let held = decide_gateway(
            &s,
            &GatewayObservation {
                current_replicas: 15,
                pods: &fifteen,
                reports: &reports,
            },
            &d.state,
            at(2400),
        );
        assert_eq!(held.desired_replicas, 15);
        assert!(held.reason.contains("scale-down window"), "{}", held.reason);
        // The metric still drives; the window holds the count until the
        // recommendation of 15 at 2200 s leaves it.
        assert_eq!(held.driver, Driver::Metric(ScalingMetric::Connections));
        assert_eq!(
            held.hold,
            Some(Hold {
                by: HeldBy::ScaleDownStabilization,
                until: Some(at(2500)),
            })
        );
        assert_eq!(
            held.hold.map(|h| h.by.to_string()),
            Some("scaleDownStabilization".to_string())
        );
        assert_eq!(d.hold, None);

        let reports = quiet(2501);
        let ended = decide_gateway(
            &s,
            &GatewayObservation {
                current_replicas: 15,
                pods: &fifteen,
                reports: &reports,
            },
            &held.state,
            at(2501),
        );
        assert_eq!(
            (ended.desired_replicas, ended.driver),
            (2, Driver::Metric(ScalingMetric::Connections))
        );
        assert_eq!(
            ended.state.scale_down_events.last().map(|e| e.change),
            Some(13)
        );
        assert_eq!(ended.hold, None);
    }

    #[test]
    fn consumers_scale_on_lag_and_hold_without_it() {
        let s = ConsumerScaling {
            min_replicas: 1,
            max_replicas: 20,
            target_lag_per_pod: 5_000.0,
            behavior: ScalingBehavior::default(),
            tolerance: DEFAULT_TOLERANCE,
        };
        let d = decide_consumer(&s, 2, Some(23_000), &known(), at(100));
        assert_eq!(
            (d.desired_replicas, d.driver),
            (5, Driver::Metric(ScalingMetric::ConsumerLag))
        );
        let held = decide_consumer(&s, 2, None, &known(), at(100));
        assert_eq!((held.desired_replicas, held.driver), (2, Driver::None));
        assert!(held.reason.contains("consumerLag"), "{}", held.reason);
    }
}
