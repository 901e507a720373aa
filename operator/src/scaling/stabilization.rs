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

/// When the window stops holding the count at `held_at`: the instant the last
/// recommendation that holds it (at least `held_at` for a scale-down, at most
/// for a scale-up) leaves its window. `None` when nothing holds it.
pub fn held_until(
    held_at: i32,
    how: Stabilized,
    up_window_seconds: u32,
    down_window_seconds: u32,
    state: &ScalingState,
    now: Timestamp,
) -> Option<Timestamp> {
    let (window, holds): (u32, fn(i32, i32) -> bool) = match how {
        Stabilized::No => return None,
        Stabilized::ScaleUp => (up_window_seconds, |rec, held| rec <= held),
        Stabilized::ScaleDown => (down_window_seconds, |rec, held| rec >= held),
    };
    let since = cutoff(now, window);
    let span = jiff::SignedDuration::from_secs(i64::from(window));
    state
        .recommendations
        .iter()
        .filter(|rec| rec.at > since && holds(rec.replicas, held_at))
        .map(|rec| rec.at + span)
        .max()
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
        // Held at 5 by the recommendation of 120 s ago: 180 s more.
        assert_eq!(
            held_until(5, Stabilized::ScaleDown, 0, 300, &state, now),
            Some(now + SignedDuration::from_secs(180))
        );
    }

    #[test]
    fn a_hold_lasts_until_its_last_holding_recommendation_leaves_the_window() {
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24);
        let rec = |replicas, age| Recommendation {
            replicas,
            at: ago(now, age),
        };
        struct Case {
            name: &'static str,
            recs: Vec<Recommendation>,
            held_at: i32,
            how: Stabilized,
            until: Option<i64>,
        }
        let cases = [
            Case {
                name: "not held",
                recs: vec![rec(8, 10)],
                held_at: 8,
                how: Stabilized::No,
                until: None,
            },
            Case {
                name: "scale-down: the newest of the high ones",
                recs: vec![rec(8, 200), rec(8, 100), rec(2, 50), rec(2, 0)],
                held_at: 8,
                how: Stabilized::ScaleDown,
                until: Some(200),
            },
            Case {
                name: "scale-down: a lower one does not hold",
                recs: vec![rec(8, 200), rec(6, 100), rec(2, 0)],
                held_at: 8,
                how: Stabilized::ScaleDown,
                until: Some(100),
            },
            Case {
                name: "scale-down: outside the window does not hold",
                recs: vec![rec(9, 400), rec(8, 290), rec(2, 0)],
                held_at: 8,
                how: Stabilized::ScaleDown,
                until: Some(10),
            },
            Case {
                name: "scale-up: the newest of the low ones",
                recs: vec![rec(3, 120), rec(4, 60), rec(10, 0)],
                held_at: 4,
                how: Stabilized::ScaleUp,
                until: Some(240),
            },
        ];
        for case in cases {
            let state = ScalingState {
                recommendations: case.recs,
                ..ScalingState::default()
            };
            let until = case.until.map(|secs| now + SignedDuration::from_secs(secs));
            assert_eq!(
                held_until(case.held_at, case.how, 300, 300, &state, now),
                until,
                "{}",
                case.name
            );
        }
    }
}
