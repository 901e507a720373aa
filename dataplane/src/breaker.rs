//! A small circuit breaker around Redis: after a run of failures the gateway
//! answers 503 at once for a cool-down instead of queueing behind a sick
//! server. Hand-written: it is a few atomics, and the crates that offer one
//! bring a policy framework the hot path does not need.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicU64,
    threshold: u32,
    cool_down: Duration,
    epoch: Instant,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            threshold,
            cool_down,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a call may go through. While open, none does; after the
    /// cool-down, calls go through again and the next result decides.
    pub fn allow(&self) -> bool {
        self.now_ms() >= self.open_until_ms.load(Ordering::Relaxed)
    }

    pub fn is_open(&self) -> bool {
        !self.allow()
    }

    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    pub fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold {
            let until = self.now_ms() + u64::try_from(self.cool_down.as_millis()).unwrap_or(0);
            self.open_until_ms.store(until, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_closes_after_cool_down() {
        let b = Breaker::new(3, Duration::from_millis(30));
        b.failure();
        b.failure();
        assert!(b.allow());
        b.failure();
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.success();
        assert!(b.allow());
    }
}
