//! The operator's Prometheus metrics: reconciles, their errors and duration,
//! and whether this replica leads.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error's kind (`kube`, `redis`, …), never its message: bounded cardinality.
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub leader: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flashsale_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        // 1 ms .. ~16 s: a reconcile applies six objects and may warm Redis.
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "reconciles",
            "FlashSale reconciliations run",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "FlashSale reconciliations that failed, by error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one FlashSale reconciliation took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
        }
    }
}

impl Metrics {
    pub fn observe(&self, took: Duration, error_kind: Option<&str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = error_kind {
            self.errors
                .get_or_create(&ErrorLabels {
                    kind: kind.to_string(),
                })
                .inc();
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_reconciles_errors_and_duration() -> anyhow::Result<()> {
        let m = Metrics::default();
        m.observe(Duration::from_millis(3), None);
        m.observe(Duration::from_millis(5), Some("kube"));
        let text = m.render()?;
        assert!(
            text.contains("flashsale_operator_reconciles_total 2"),
            "{text}"
        );
        assert!(
            text.contains("flashsale_operator_reconcile_errors_total{kind=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("flashsale_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        Ok(())
    }
}
