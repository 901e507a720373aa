//! Stabilization windows (upstream `stabilizeRecommendationWithBehaviors`): the
//! replica count only rises to the lowest recommendation of the scale-up window and
//! only falls to the highest recommendation of the scale-down window, so a single
//! noisy sample cannot move it.

use jiff::Timestamp;

use super::history::{Recommendation, ScalingState, cutoff};

/// Which way stabilization held the recommendation back, if it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stabilized {
    /// The recommendation passes unchanged.
    No,
    /// Recent recommendations were lower; the lowest of them applies.
    ScaleUp,
    /// Recent recommendations were higher; the highest of them applies.
    ScaleDown,
}

/// Stabilizes `desired` against the recommendations inside the windows, then records
/// `desired` (unstabilized) in `state`.
pub fn stabilize(
    current: i32,
    desired: i32,
    up_window_seconds: u32,
    down_window_seconds: u32,
    state: &mut ScalingState,
    now: Timestamp,
) -> (i32, Stabilized) {
    let up_cutoff = cutoff(now, up_window_seconds);
    let down_cutoff = cutoff(now, down_window_seconds);
    let mut up = desired;
    let mut down = desired;
    for rec in &state.recommendations {
        if rec.at > up_cutoff {
            up = up.min(rec.replicas);
        }
        if rec.at > down_cutoff {
            down = down.max(rec.replicas);
        }
    }
    // Start from the current count and move only as far as both windows agree.
    let stabilized = current.max(up).min(down);
    state.recommendations.push(Recommendation {
        replicas: desired,
        at: now,
    });
    let how = if stabilized == desired {
        Stabilized::No
    } else if desired >= current {
        Stabilized::ScaleUp
    } else {
        Stabilized::ScaleDown
    };
    (stabilized, how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn ago(now: Timestamp, seconds: i64) -> Timestamp {
        now - SignedDuration::from_secs(seconds)
    }

    // Table mirrors TestNormalizeDesiredReplicasWithBehavior in horizontal_test.go
    // (which calls stabilizeRecommendationWithBehaviors): same recommendations,
    // windows and expected replica counts.
    #[test]
    fn stabilize_recommendation_with_behaviors() {
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24);
        struct Case {
            name: &'static str,
            recs: Vec<(i32, i64)>,
            current: i32,
            desired: i32,
            up_window: u32,
            down_window: u32,
            expected: i32,
        }
        let cases = [
            Case {
                name: "empty recommendations for scaling down",
                recs: vec![],
                current: 100,
                desired: 5,
                up_window: 0,
                down_window: 0,
                expected: 5,
            },
            Case {
                name: "simple scale down stabilization",
                recs: vec![(4, 120), (5, 60)],
                current: 100,
                desired: 3,
                up_window: 0,
                down_window: 180,
                expected: 5,
            },
            Case {
                name: "simple scale up stabilization",
                recs: vec![(4, 120), (5, 60)],
                current: 1,
                desired: 7,
                up_window: 300,
                down_window: 0,
                expected: 4,
            },
            Case {
                name: "no scale down stabilization",
                recs: vec![(1, 120), (2, 60)],
                current: 100,
                desired: 3,
                up_window: 300,
                down_window: 0,
                expected: 3,
            },
            Case {
                name: "no scale up stabilization",
                recs: vec![(4, 120), (5, 60)],
                current: 1,
                desired: 3,
                up_window: 0,
                down_window: 300,
                expected: 3,
            },
            Case {
                name: "no scale down stabilization, reuse recommendation element",
                recs: vec![(10, 600), (9, 540)],
                current: 100,
                desired: 3,
                up_window: 0,
                down_window: 0,
                expected: 3,
            },
            Case {
                name: "no scale up stabilization, reuse recommendation element",
                recs: vec![(10, 600), (9, 540)],
                current: 1,
                desired: 100,
                up_window: 0,
                down_window: 0,
                expected: 100,
            },
            Case {
                name: "scale down stabilization, reuse one of obsolete recommendation element",
                recs: vec![(10, 600), (4, 60), (5, 120), (9, 540)],
                current: 100,
                desired: 3,
                up_window: 0,
                down_window: 180,
                expected: 5,
            },
            Case {
                name: "scale up stabilization, reuse one of obsolete recommendation element",
                recs: vec![(10, 6000), (6, 60), (5, 120), (9, 180)],
                current: 1,
                desired: 100,
                up_window: 300,
                down_window: 0,
                expected: 5,
            },
        ];
        for case in cases {
            let mut state = ScalingState {
                recommendations: case
                    .recs
                    .iter()
                    .map(|&(replicas, age)| Recommendation {
                        replicas,
                        at: ago(now, age),
                    })
                    .collect(),
                ..ScalingState::default()
            };
            let before = state.recommendations.len();
            let (got, _) = stabilize(
                case.current,
                case.desired,
                case.up_window,
                case.down_window,
                &mut state,
                now,
            );
            assert_eq!(got, case.expected, "{}", case.name);
            assert_eq!(state.recommendations.len(), before + 1, "{}", case.name);
            assert_eq!(
                state.recommendations.last().map(|r| r.replicas),
                Some(case.desired),
                "{}",
                case.name
            );
        }
    }

    // Mirrors TestNormalizeDesiredReplicas ("stabilize - old recommendations"):
    // only recommendations inside the 5-minute scale-down window count.
    #[test]
    fn old_recommendations_do_not_hold_back_a_scale_down() {
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24);
        let mut state = ScalingState {
            recommendations: vec![
                Recommendation {
                    replicas: 10,
                    at: ago(now, 600),
                },
                Recommendation {
                    replicas: 4,
                    at: ago(now, 60),
                },
                Recommendation {
                    replicas: 5,
                    at: ago(now, 120),
                },
                Recommendation {
                    replicas: 9,
                    at: ago(now, 540),
                },
            ],
            ..ScalingState::default()
        };
        assert_eq!(
            stabilize(10, 3, 0, 300, &mut state, now),
            (5, Stabilized::ScaleDown)
        );
    }
}
