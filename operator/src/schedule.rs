//! Where a sale stands in time and when it next moves: the reconciler
//! requeues itself for that instant instead of polling.

use std::time::Duration;

use dataplane::spec::{Phase, SaleSpec};
use jiff::Timestamp;

/// The phase at `now` and the next boundary, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub phase: Phase,
    pub next: Option<(Phase, Timestamp)>,
    /// The end plus the payment timeout: until then orders accepted before
    /// the end are still paid or cancelled, and the status counters move.
    pub settled: Timestamp,
}

impl Schedule {
    pub fn at(spec: &SaleSpec, now: Timestamp) -> Self {
        let phase = spec.phase_at(now);
        let next = match phase {
            Phase::Pending => Some((Phase::Warming, spec.warmup_start())),
            Phase::Warming => Some((Phase::Active, spec.start_time)),
            Phase::Active => Some((Phase::Ended, spec.end_time)),
            Phase::Ended => None,
        };
        // Unpaid orders are cancelled up to the timeout after the end, and an
        // order persisted late up to 30 s after its row (the sweeper's grace).
        let settle = jiff::SignedDuration::from_secs(i64::from(spec.payment.timeout_seconds) + 30);
        let settled = spec.end_time.checked_add(settle).unwrap_or(Timestamp::MAX);
        Self {
            phase,
            next,
            settled,
        }
    }

    /// Time until the next boundary, rounded up to the millisecond so the
    /// requeued reconcile never lands just before it.
    pub fn until_next(&self, now: Timestamp) -> Option<Duration> {
        let (_, at) = self.next?;
        Some(until(now, at))
    }

    /// When to reconcile again: at the next boundary, and no later than
    /// `refresh` while the status counters move: while the sale is live, and
    /// after the end until the last unpaid order has timed out.
    pub fn requeue_after(&self, now: Timestamp, refresh: Duration) -> Option<Duration> {
        match self.phase {
            Phase::Warming | Phase::Active => Some(self.until_next(now)?.min(refresh)),
            Phase::Pending => self.until_next(now),
            Phase::Ended if now < self.settled => Some(until(now, self.settled).min(refresh)),
            Phase::Ended => None,
        }
    }
}

/// From `now` to `at`, rounded up to the millisecond.
fn until(now: Timestamp, at: Timestamp) -> Duration {
    let nanos = at.as_nanosecond() - now.as_nanosecond();
    let millis = (nanos + 999_999).div_euclid(1_000_000);
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn spec() -> SaleSpec {
        let doc = dataplane::spec::SaleDocument::parse(
            include_str!("../../examples/singles-day.yaml"),
            "singles-day.yaml",
        );
        match doc {
            Ok(d) => d.spec,
            Err(e) => panic!("example must parse: {e}"),
        }
    }

    fn at(spec: &SaleSpec, secs: i64) -> Timestamp {
        spec.start_time
            .checked_add(SignedDuration::from_secs(secs))
            .unwrap_or(Timestamp::MAX)
    }

    #[test]
    fn boundaries_follow_the_spec() {
        let s = spec();
        let refresh = Duration::from_secs(15);
        let cases = [
            // (seconds from start, phase, requeue)
            (-3600, Phase::Pending, Some(Duration::from_secs(3300))),
            (-301, Phase::Pending, Some(Duration::from_secs(1))),
            (-300, Phase::Warming, Some(Duration::from_secs(15))),
            (-5, Phase::Warming, Some(Duration::from_secs(5))),
            (0, Phase::Active, Some(Duration::from_secs(15))),
            (1795, Phase::Active, Some(Duration::from_secs(5))),
            // Ended, but orders still time out (payment.timeoutSeconds 600,
            // and 30 s for an order persisted late).
            (1800, Phase::Ended, Some(Duration::from_secs(15))),
            (2425, Phase::Ended, Some(Duration::from_secs(5))),
            (2430, Phase::Ended, None),
        ];
        for (secs, phase, requeue) in cases {
            let now = at(&s, secs);
            let sched = Schedule::at(&s, now);
            assert_eq!(sched.phase, phase, "at {secs}s");
            assert_eq!(sched.requeue_after(now, refresh), requeue, "at {secs}s");
        }
    }

    #[test]
    fn sub_millisecond_remainders_round_up() {
        let s = spec();
        let now = at(&s, -301)
            .checked_add(SignedDuration::from_nanos(400_000))
            .unwrap_or(Timestamp::MAX);
        let sched = Schedule::at(&s, now);
        // 0.9996 s left: waiting 999 ms would wake up still in Pending.
        assert_eq!(sched.until_next(now), Some(Duration::from_millis(1000)));
    }
}
