//! The operator's Prometheus metrics: reconciles, their errors and duration,
//! whether this replica leads, and per sale what the reconciler and the
//! autoscaler saw (phase, readiness, stock, scaling inputs and decisions), so
//! dashboards and alerts need no kube-state-metrics for the FlashSale status.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::conditions;
use crate::resource::{FlashSaleStatus, SalePhase};

const PHASES: [SalePhase; 5] = [
    SalePhase::Pending,
    SalePhase::Warming,
    SalePhase::Active,
    SalePhase::Ended,
    SalePhase::Failed,
];
const COMPONENTS: [&str; 2] = ["gateway", "consumer"];
/// `reconciler::Error::kind`'s values: registered at zero so the first error
/// of a kind shows in `increase()`.
pub const ERROR_KINDS: [&str; 4] = ["kube", "build", "apply", "redis"];
/// `scaling::Driver`'s names, registered at zero per workload for the same reason.
pub const DRIVERS: [&str; 6] = [
    "connections",
    "requestsPerSecond",
    "consumerLag",
    "schedule",
    "replicaBounds",
    "none",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error's kind (`kube`, `redis`, …), never its message: bounded cardinality.
    pub kind: String,
}

/// One sale. `namespace` is the sale's: scrape the operator with
/// `honor_labels` so the operator pod's own namespace does not replace it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SaleLabels {
    pub namespace: String,
    pub sale: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub sale: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProductLabels {
    pub namespace: String,
    pub sale: String,
    pub sku: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub namespace: String,
    pub sale: String,
    /// `gateway` or `consumer`.
    pub component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    pub namespace: String,
    pub sale: String,
    pub component: String,
    /// What set the count: `connections`, `requestsPerSecond`, `consumerLag`,
    /// `schedule`, `replicaBounds`, `none`.
    pub driver: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

/// Per-sale figures, each family keyed by the sale's labels.
#[derive(Default)]
pub struct SaleMetrics {
    pub phase: Family<PhaseLabels, Gauge>,
    pub ready: Family<SaleLabels, Gauge>,
    pub stock: Family<ProductLabels, Gauge>,
    pub remaining: Family<ProductLabels, Gauge>,
    pub sold: Family<ProductLabels, Gauge>,
    pub persisted: Family<ProductLabels, Gauge>,
    pub replicas: Family<WorkloadLabels, Gauge>,
    pub desired_replicas: Family<WorkloadLabels, Gauge>,
    pub scale_changes: Family<ScaleLabels, Counter>,
    pub gateway_connections: Family<SaleLabels, Gauge>,
    pub gateway_requests_per_second: Family<SaleLabels, GaugeF>,
    pub gateway_load_reports: Family<SaleLabels, Gauge>,
    pub consumer_lag: Family<SaleLabels, Gauge>,
    /// The SKUs each sale has series for, so products dropped from a spec
    /// (and deleted sales) leave no stale series behind.
    skus: Mutex<HashMap<(String, String), BTreeSet<String>>>,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub leader: Gauge<i64, AtomicI64>,
    pub sales: SaleMetrics,
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
        for kind in ERROR_KINDS {
            let _ = errors.get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            });
        }
        let sales = SaleMetrics::default();
        sales.register(&mut registry);
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            sales,
        }
    }
}

impl SaleMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "sale_phase",
            "1 for the FlashSale's current phase (Pending, Warming, Active, Ended, Failed), 0 for the others",
            self.phase.clone(),
        );
        r.register(
            "sale_ready",
            "1 while the FlashSale's Ready condition is True, 0 while False",
            self.ready.clone(),
        );
        r.register(
            "product_stock",
            "Units of the product Redis holds for sale (the spec's, once warmed)",
            self.stock.clone(),
        );
        r.register(
            "product_remaining",
            "Units of the product still for sale, as the reconciler last read Redis",
            self.remaining.clone(),
        );
        r.register(
            "product_sold",
            "Units held by accepted, confirmed or paid orders",
            self.sold.clone(),
        );
        r.register(
            "product_persisted",
            "Units the consumers have written to PostgreSQL",
            self.persisted.clone(),
        );
        r.register(
            "replicas",
            "The workload's replica count as the autoscaler last read it",
            self.replicas.clone(),
        );
        r.register(
            "desired_replicas",
            "The replica count the autoscaler last decided",
            self.desired_replicas.clone(),
        );
        r.register(
            "scale_changes",
            "Replica count changes the autoscaler wrote, by the metric that drove them",
            self.scale_changes.clone(),
        );
        r.register(
            "gateway_connections",
            "Open WebSocket connections over the fresh gateway load reports",
            self.gateway_connections.clone(),
        );
        r.register(
            "gateway_requests_per_second",
            "Purchase requests per second over the fresh gateway load reports",
            self.gateway_requests_per_second.clone(),
        );
        r.register(
            "gateway_load_reports",
            "Fresh gateway load reports the autoscaler read (one per live gateway pod)",
            self.gateway_load_reports.clone(),
        );
        r.register(
            "consumer_lag",
            "Orders accepted but not yet persisted (undelivered plus pending stream entries)",
            self.consumer_lag.clone(),
        );
    }

    /// The reconciler's view of a sale, from the status it just computed.
    pub fn observe_status(&self, namespace: &str, sale: &str, status: &FlashSaleStatus) {
        let key = SaleLabels {
            namespace: namespace.to_string(),
            sale: sale.to_string(),
        };
        if let Some(current) = status.phase {
            for phase in PHASES {
                self.phase
                    .get_or_create(&phase_labels(&key, phase))
                    .set(i64::from(phase == current));
            }
        }
        match conditions::find(&status.conditions, conditions::READY) {
            Some(c) => {
                self.ready
                    .get_or_create(&key)
                    .set(i64::from(c.status == "True"));
            }
            None => {
                self.ready.remove(&key);
            }
        }
        let now: BTreeSet<String> = status.products.iter().map(|p| p.sku.clone()).collect();
        let before = self
            .skus
            .lock()
            .map(|mut skus| skus.insert((key.namespace.clone(), key.sale.clone()), now.clone()))
            .unwrap_or_default()
            .unwrap_or_default();
        for gone in before.difference(&now) {
            self.remove_product(&product_labels(&key, gone));
        }
        for p in &status.products {
            let labels = product_labels(&key, &p.sku);
            self.stock.get_or_create(&labels).set(p.stock);
            self.remaining.get_or_create(&labels).set(p.remaining);
            self.sold.get_or_create(&labels).set(p.sold);
            self.persisted.get_or_create(&labels).set(p.persisted);
        }
    }

    /// One autoscaler decision for one workload; `scaled` when the new count
    /// was written.
    pub fn observe_decision(
        &self,
        workload: &WorkloadLabels,
        current: i32,
        desired: i32,
        driver: &str,
        scaled: bool,
    ) {
        self.replicas
            .get_or_create(workload)
            .set(i64::from(if scaled { desired } else { current }));
        self.desired_replicas
            .get_or_create(workload)
            .set(i64::from(desired));
        let labels = |driver: &str| ScaleLabels {
            namespace: workload.namespace.clone(),
            sale: workload.sale.clone(),
            component: workload.component.clone(),
            driver: driver.to_string(),
        };
        for d in DRIVERS {
            let _ = self.scale_changes.get_or_create(&labels(d));
        }
        if scaled {
            self.scale_changes.get_or_create(&labels(driver)).inc();
        }
    }

    /// The gateway load the autoscaler read this tick.
    pub fn observe_gateway_load(
        &self,
        sale: &SaleLabels,
        connections: i64,
        rps: f64,
        reports: usize,
    ) {
        self.gateway_connections
            .get_or_create(sale)
            .set(connections);
        self.gateway_requests_per_second
            .get_or_create(sale)
            .set(rps);
        self.gateway_load_reports
            .get_or_create(sale)
            .set(i64::try_from(reports).unwrap_or(i64::MAX));
    }

    /// The consumer lag the autoscaler read this tick.
    pub fn observe_consumer_lag(&self, sale: &SaleLabels, lag: u64) {
        self.consumer_lag
            .get_or_create(sale)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    /// Drops every series of a deleted sale. Scale change counters stay:
    /// Prometheus needs a counter's last value to see its final increase.
    pub fn forget_sale(&self, namespace: &str, sale: &str) {
        let key = SaleLabels {
            namespace: namespace.to_string(),
            sale: sale.to_string(),
        };
        for phase in PHASES {
            self.phase.remove(&phase_labels(&key, phase));
        }
        self.ready.remove(&key);
        let skus = self
            .skus
            .lock()
            .map(|mut skus| skus.remove(&(key.namespace.clone(), key.sale.clone())))
            .unwrap_or_default()
            .unwrap_or_default();
        for sku in &skus {
            self.remove_product(&product_labels(&key, sku));
        }
        for component in COMPONENTS {
            let w = WorkloadLabels {
                namespace: key.namespace.clone(),
                sale: key.sale.clone(),
                component: component.to_string(),
            };
            self.replicas.remove(&w);
            self.desired_replicas.remove(&w);
        }
        self.gateway_connections.remove(&key);
        self.gateway_requests_per_second.remove(&key);
        self.gateway_load_reports.remove(&key);
        self.consumer_lag.remove(&key);
    }

    fn remove_product(&self, labels: &ProductLabels) {
        self.stock.remove(labels);
        self.remaining.remove(labels);
        self.sold.remove(labels);
        self.persisted.remove(labels);
    }
}

impl SaleLabels {
    pub fn new(namespace: &str, sale: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            sale: sale.to_string(),
        }
    }

    pub fn workload(&self, component: &str) -> WorkloadLabels {
        WorkloadLabels {
            namespace: self.namespace.clone(),
            sale: self.sale.clone(),
            component: component.to_string(),
        }
    }
}

fn phase_labels(sale: &SaleLabels, phase: SalePhase) -> PhaseLabels {
    PhaseLabels {
        namespace: sale.namespace.clone(),
        sale: sale.sale.clone(),
        phase: phase.to_string(),
    }
}

fn product_labels(sale: &SaleLabels, sku: &str) -> ProductLabels {
    ProductLabels {
        namespace: sale.namespace.clone(),
        sale: sale.sale.clone(),
        sku: sku.to_string(),
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
        assert!(
            text.contains("flashsale_operator_reconcile_errors_total{kind=\"redis\"} 0"),
            "{text}"
        );
        Ok(())
    }

    fn status(phase: SalePhase, ready: &str, skus: &[(&str, i64)]) -> FlashSaleStatus {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        FlashSaleStatus {
            phase: Some(phase),
            conditions: vec![Condition {
                type_: conditions::READY.into(),
                status: ready.into(),
                reason: "Test".into(),
                message: String::new(),
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
                observed_generation: Some(1),
            }],
            products: skus
                .iter()
                .map(|(sku, remaining)| crate::resource::ProductStatus {
                    sku: sku.to_string(),
                    stock: 10,
                    remaining: *remaining,
                    sold: 10 - remaining,
                    persisted: 1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_sale_shows_its_phase_readiness_and_stock_and_goes_when_deleted() -> anyhow::Result<()> {
        let m = Metrics::default();
        m.sales.observe_status(
            "shop",
            "sd",
            &status(SalePhase::Active, "True", &[("a", 7), ("b", 3)]),
        );
        let text = m.render()?;
        for line in [
            r#"flashsale_operator_sale_phase{namespace="shop",sale="sd",phase="Active"} 1"#,
            r#"flashsale_operator_sale_phase{namespace="shop",sale="sd",phase="Pending"} 0"#,
            r#"flashsale_operator_sale_ready{namespace="shop",sale="sd"} 1"#,
            r#"flashsale_operator_product_remaining{namespace="shop",sale="sd",sku="a"} 7"#,
            r#"flashsale_operator_product_sold{namespace="shop",sale="sd",sku="b"} 7"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }

        // Product b dropped from the spec; the sale went not ready.
        m.sales.observe_status(
            "shop",
            "sd",
            &status(SalePhase::Ended, "False", &[("a", 0)]),
        );
        let text = m.render()?;
        assert!(text.contains(r#"flashsale_operator_sale_ready{namespace="shop",sale="sd"} 0"#));
        assert!(text.contains(r#"sale="sd",phase="Ended"} 1"#), "{text}");
        assert!(!text.contains(r#"sku="b""#), "{text}");

        m.sales.forget_sale("shop", "sd");
        let text = m.render()?;
        assert!(!text.contains(r#"sale="sd""#), "{text}");
        Ok(())
    }

    #[test]
    fn decisions_count_changes_by_driver_from_zero() -> anyhow::Result<()> {
        let m = Metrics::default();
        let w = SaleLabels::new("shop", "sd").workload("gateway");
        m.sales.observe_decision(&w, 2, 2, "none", false);
        let text = m.render()?;
        assert!(text.contains(
            r#"flashsale_operator_scale_changes_total{namespace="shop",sale="sd",component="gateway",driver="connections"} 0"#
        ), "{text}");
        m.sales.observe_decision(&w, 2, 6, "connections", true);
        let text = m.render()?;
        assert!(text.contains(
            r#"flashsale_operator_scale_changes_total{namespace="shop",sale="sd",component="gateway",driver="connections"} 1"#
        ), "{text}");
        assert!(
            text.contains(
                r#"flashsale_operator_replicas{namespace="shop",sale="sd",component="gateway"} 6"#
            ),
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn driver_names_are_the_algorithms() {
        use crate::scaling::{Driver, ScalingMetric};
        let names: Vec<String> = [
            Driver::Metric(ScalingMetric::Connections),
            Driver::Metric(ScalingMetric::RequestsPerSecond),
            Driver::Metric(ScalingMetric::ConsumerLag),
            Driver::Schedule,
            Driver::ReplicaBounds,
            Driver::None,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(names, DRIVERS);
    }
}
