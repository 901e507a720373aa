//! Token buckets in front of Redis: this pod's share of the sale's global rate,
//! per user and per client IP (governor's GCRA buckets).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::spec::{RateLimit, RateLimits};

/// Which bucket refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    User,
    Ip,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::User => "user",
            Self::Ip => "ip",
        }
    }
}

/// A refusal and how long until a retry can pass.
#[derive(Clone, Copy, Debug)]
pub struct Limited {
    pub scope: Scope,
    pub retry_after: Duration,
}

fn quota(limit: RateLimit, share: u32) -> Option<Quota> {
    let share = share.max(1);
    let rate = NonZeroU32::new(limit.requests_per_second.div_ceil(share))?;
    let burst = NonZeroU32::new(limit.burst.div_ceil(share))?;
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// The buckets of one set of limits. Each is shared, so a change of one
/// limit (or of the gateway count) rebuilds that bucket alone.
#[derive(Clone)]
struct Buckets {
    limits: RateLimits,
    global: Option<Arc<DefaultDirectRateLimiter>>,
    user: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    ip: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

fn global_bucket(limits: &RateLimits, gateways: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    limits
        .global
        .and_then(|l| quota(l, gateways))
        .map(|q| Arc::new(RateLimiter::direct(q)))
}

fn keyed_bucket<K: Clone + Eq + std::hash::Hash>(
    limit: Option<RateLimit>,
) -> Option<Arc<DefaultKeyedRateLimiter<K>>> {
    limit
        .and_then(|l| quota(l, 1))
        .map(|q| Arc::new(RateLimiter::keyed(q)))
}

pub struct RateLimiters {
    buckets: ArcSwap<Buckets>,
    gateways: std::sync::atomic::AtomicU32,
    clock: DefaultClock,
}

impl RateLimiters {
    pub fn new(limits: &RateLimits) -> Self {
        Self {
            buckets: ArcSwap::from_pointee(Buckets {
                limits: limits.clone(),
                global: global_bucket(limits, 1),
                user: keyed_bucket(limits.per_user),
                ip: keyed_bucket(limits.per_ip),
            }),
            gateways: std::sync::atomic::AtomicU32::new(1),
            clock: DefaultClock::default(),
        }
    }

    /// Takes the sale's new limits (a live spec change): a changed limit gets
    /// a fresh bucket, an unchanged one keeps its state. Returns whether
    /// anything changed.
    pub fn reconfigure(&self, limits: &RateLimits) -> bool {
        let gateways = self.gateway_count();
        let mut changed = false;
        self.buckets.rcu(|b| {
            let mut next = Buckets::clone(b);
            if b.limits.global != limits.global {
                next.global = global_bucket(limits, gateways);
            }
            if b.limits.per_user != limits.per_user {
                next.user = keyed_bucket(limits.per_user);
            }
            if b.limits.per_ip != limits.per_ip {
                next.ip = keyed_bucket(limits.per_ip);
            }
            changed = b.limits != *limits;
            next.limits = limits.clone();
            next
        });
        changed
    }

    /// The limits in force.
    pub fn limits(&self) -> RateLimits {
        self.buckets.load().limits.clone()
    }

    /// Re-splits the global budget when the number of live gateways changes.
    pub fn set_gateway_count(&self, gateways: u32) {
        let gateways = gateways.max(1);
        let previous = self
            .gateways
            .swap(gateways, std::sync::atomic::Ordering::Relaxed);
        if previous != gateways {
            self.buckets.rcu(|b| {
                let mut next = Buckets::clone(b);
                next.global = global_bucket(&b.limits, gateways);
                next
            });
        }
    }

    pub fn gateway_count(&self) -> u32 {
        self.gateways.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks the cheapest-to-refuse buckets first: IP, user, then the shared
    /// global one (so one abusive client does not spend everyone's budget).
    pub fn check(&self, user: &str, ip: IpAddr) -> Result<(), Limited> {
        let now = self.clock.now();
        let limited = |scope, wait: Duration| Limited {
            scope,
            retry_after: wait,
        };
        let b = self.buckets.load();
        if let Some(l) = &b.ip {
            l.check_key(&ip)
                .map_err(|n| limited(Scope::Ip, n.wait_time_from(now)))?;
        }
        if let Some(l) = &b.user {
            // Keyed by an owned String: a lookup allocates, which is cheaper
            // than the Redis round trip it may save.
            l.check_key(&user.to_string())
                .map_err(|n| limited(Scope::User, n.wait_time_from(now)))?;
        }
        if let Some(l) = &b.global {
            l.check()
                .map_err(|n| limited(Scope::Global, n.wait_time_from(now)))?;
        }
        Ok(())
    }

    /// Forgets idle keys so the per-user and per-IP maps do not grow forever.
    pub fn housekeeping(&self) {
        let b = self.buckets.load();
        if let Some(l) = &b.user {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &b.ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RateLimits {
        RateLimits {
            global: Some(RateLimit {
                requests_per_second: 100,
                burst: 10,
            }),
            per_user: Some(RateLimit {
                requests_per_second: 1,
                burst: 2,
            }),
            per_ip: None,
        }
    }

    #[test]
    fn per_user_burst_then_refused() {
        let r = RateLimiters::new(&limits());
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(r.check("u", ip).is_ok());
        assert!(r.check("u", ip).is_ok());
        let err = r.check("u", ip).err().map(|l| l.scope);
        assert_eq!(err, Some(Scope::User));
        assert!(r.check("v", ip).is_ok());
    }

    #[test]
    fn new_limits_apply_at_once_and_unchanged_buckets_keep_their_state() {
        let r = RateLimiters::new(&limits());
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(r.check("u", ip).is_ok());
        assert!(r.check("u", ip).is_ok());
        assert!(r.check("u", ip).is_err());
        // Same limits: nothing rebuilt, "u" is still out of burst.
        assert!(!r.reconfigure(&limits()));
        assert!(r.check("u", ip).is_err());
        // A raised per-user limit takes effect on the next request.
        let mut raised = limits();
        raised.per_user = Some(RateLimit {
            requests_per_second: 100,
            burst: 50,
        });
        raised.global = None;
        assert!(r.reconfigure(&raised));
        let passed = (0..50).filter(|_| r.check("u", ip).is_ok()).count();
        assert_eq!(passed, 50);
        assert_eq!(r.limits(), raised);
    }

    #[test]
    fn global_share_shrinks_with_more_gateways() {
        let r = RateLimiters::new(&limits());
        r.set_gateway_count(5);
        let ip: IpAddr = [127, 0, 0, 1].into();
        // burst 10 / 5 gateways = 2 per pod
        let passed = (0..10)
            .filter(|i| r.check(&format!("u{i}"), ip).is_ok())
            .count();
        assert_eq!(passed, 2);
    }
}
