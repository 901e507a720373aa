//! What the algorithm remembers between evaluations: past recommendations (for
//! stabilization windows) and past scale events (for `periodSeconds` rate limits).
//! The HPA keeps the same two lists in memory per HPA object; here they are an
//! explicit value so the decision stays a pure function and the caller chooses
//! where to keep it.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// One unstabilized recommendation, as upstream's `timestampedRecommendation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub replicas: i32,
    pub at: Timestamp,
}

/// One applied change, as upstream's `timestampedScaleEvent` (always a positive count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleEvent {
    pub change: i32,
    pub at: Timestamp,
}

/// History for one scaled workload (one sale's gateway, or its consumers).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingState {
    /// Set once the first evaluation has seeded `recommendations` with the count it
    /// found (upstream tells a new HPA by a nil recommendation list).
    #[serde(default)]
    pub initialized: bool,
    pub recommendations: Vec<Recommendation>,
    pub scale_up_events: Vec<ScaleEvent>,
    pub scale_down_events: Vec<ScaleEvent>,
}

impl ScalingState {
    /// Replicas added within the `period_seconds` before `now` (events strictly after the cutoff, as upstream).
    pub fn added_within(&self, period_seconds: u32, now: Timestamp) -> i32 {
        sum_within(&self.scale_up_events, period_seconds, now)
    }

    /// Replicas removed within the `period_seconds` before `now`.
    pub fn removed_within(&self, period_seconds: u32, now: Timestamp) -> i32 {
        sum_within(&self.scale_down_events, period_seconds, now)
    }

    /// Records an applied change from `from` to `to` replicas.
    pub fn record_change(&mut self, from: i32, to: i32, now: Timestamp) {
        if to > from {
            self.scale_up_events.push(ScaleEvent {
                change: to - from,
                at: now,
            });
        } else if to < from {
            self.scale_down_events.push(ScaleEvent {
                change: from - to,
                at: now,
            });
        }
    }

    /// Drops entries older than every window and period that could still read them,
    /// so the state stays small however long a sale runs.
    pub fn prune(
        &mut self,
        recommendation_horizon_seconds: u32,
        event_horizon_seconds: u32,
        now: Timestamp,
    ) {
        let keep = |at: Timestamp, horizon: u32| at > cutoff(now, horizon);
        self.recommendations
            .retain(|r| keep(r.at, recommendation_horizon_seconds));
        self.scale_up_events
            .retain(|e| keep(e.at, event_horizon_seconds));
        self.scale_down_events
            .retain(|e| keep(e.at, event_horizon_seconds));
    }
}

/// `now - seconds`, saturating at the earliest representable instant.
pub(crate) fn cutoff(now: Timestamp, seconds: u32) -> Timestamp {
    now.checked_sub(SignedDuration::from_secs(i64::from(seconds)))
        .unwrap_or(Timestamp::MIN)
}

fn sum_within(events: &[ScaleEvent], period_seconds: u32, now: Timestamp) -> i32 {
    let from = cutoff(now, period_seconds);
    events
        .iter()
        .filter(|e| e.at > from)
        .fold(0i32, |sum, e| sum.saturating_add(e.change))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(seconds)
    }

    // Mirrors TestStoreScaleEvents (horizontal_test.go): the change counted over a
    // 60 s period includes events 58–59 s old and excludes 61 s old ones.
    #[test]
    fn changes_are_counted_strictly_inside_the_period() {
        let now = at(1000);
        let state = ScalingState {
            scale_up_events: vec![
                ScaleEvent {
                    change: 8,
                    at: at(1000 - 29),
                },
                ScaleEvent {
                    change: 6,
                    at: at(1000 - 59),
                },
                ScaleEvent {
                    change: 7,
                    at: at(1000 - 61),
                },
                ScaleEvent {
                    change: 9,
                    at: at(1000 - 60),
                },
            ],
            ..ScalingState::default()
        };
        assert_eq!(state.added_within(60, now), 14);
        assert_eq!(state.added_within(30, now), 8);
        assert_eq!(state.removed_within(60, now), 0);
    }

    #[test]
    fn prune_keeps_only_what_a_window_can_read() {
        let now = at(1000);
        let mut state = ScalingState::default();
        state.recommendations.push(Recommendation {
            replicas: 3,
            at: at(600),
        });
        state.recommendations.push(Recommendation {
            replicas: 4,
            at: at(800),
        });
        state.record_change(2, 5, at(900));
        state.record_change(5, 4, at(990));
        state.prune(300, 60, now);
        assert_eq!(
            state.recommendations,
            vec![Recommendation {
                replicas: 4,
                at: at(800)
            }]
        );
        assert!(state.scale_up_events.is_empty());
        assert_eq!(
            state.scale_down_events,
            vec![ScaleEvent {
                change: 1,
                at: at(990)
            }]
        );
    }
}
