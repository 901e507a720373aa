//! Pre-scaling for the schedule: a flash sale's wall of traffic arrives at a known second, so
//! from `startTime − warmupSeconds` until `endTime` the gateway never runs below
//! `replicas.atStart`. The floor is not a scaling step — it is not rate-limited
//! by the scale-up policies and not recorded as a scale event — and when it lifts
//! at `endTime` the ordinary scale-down behaviour takes the count back to `min`.

use jiff::{SignedDuration, Timestamp};

/// When a sale runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaleWindow {
    pub start: Timestamp,
    pub end: Timestamp,
    /// How long before `start` capacity is pre-scaled (`warmupSeconds`).
    pub warmup: SignedDuration,
}

/// Where `now` lies relative to the sale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SalePhase {
    /// Before `start − warmup`: reactive scaling only.
    BeforeWarmup,
    /// From `start − warmup` to `start`: pre-scaled.
    Warmup,
    /// From `start` to `end`.
    Running,
    /// From `end` on: reactive scaling only.
    Ended,
}

impl SaleWindow {
    /// The start of pre-scaling; saturates at the earliest instant for absurd warmups.
    pub fn prescale_from(&self) -> Timestamp {
        self.start
            .checked_sub(self.warmup)
            .unwrap_or(Timestamp::MIN)
    }

    pub fn phase(&self, now: Timestamp) -> SalePhase {
        if now >= self.end {
            SalePhase::Ended
        } else if now >= self.start {
            SalePhase::Running
        } else if now >= self.prescale_from() {
            SalePhase::Warmup
        } else {
            SalePhase::BeforeWarmup
        }
    }

    /// The replica floor at `now`: `at_start` while pre-scaled or running, clamped to `[min, max]`.
    pub fn floor(&self, at_start: Option<i32>, min: i32, max: i32, now: Timestamp) -> Option<i32> {
        match self.phase(now) {
            SalePhase::Warmup | SalePhase::Running => at_start.map(|n| n.clamp(min, max.max(min))),
            SalePhase::BeforeWarmup | SalePhase::Ended => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(seconds)
    }

    #[test]
    fn floor_holds_from_warmup_until_end() {
        let sale = SaleWindow {
            start: at(600),
            end: at(2400),
            warmup: SignedDuration::from_secs(300),
        };
        let floor = |t| sale.floor(Some(10), 2, 50, at(t));
        assert_eq!(floor(299), None);
        assert_eq!(floor(300), Some(10));
        assert_eq!(floor(600), Some(10));
        assert_eq!(floor(2399), Some(10));
        assert_eq!(floor(2400), None);
        assert_eq!(sale.phase(at(450)), SalePhase::Warmup);
        assert_eq!(sale.phase(at(601)), SalePhase::Running);
        // atStart outside the bounds is clamped; no atStart, no floor.
        assert_eq!(sale.floor(Some(80), 2, 50, at(600)), Some(50));
        assert_eq!(sale.floor(Some(1), 2, 50, at(600)), Some(2));
        assert_eq!(sale.floor(None, 2, 50, at(600)), None);
    }
}
