//! From a FlashSale's spec to the pure algorithm's settings.

use jiff::SignedDuration;

use crate::resource::FlashSaleSpec;
use crate::scaling::{ConsumerScaling, DEFAULT_TOLERANCE, GatewayScaling, SaleWindow};

pub fn gateway(spec: &FlashSaleSpec) -> GatewayScaling {
    let g = &spec.gateway;
    GatewayScaling {
        at_start: g.replicas.at_start,
        behavior: spec.scaling.clone(),
        sale: Some(SaleWindow {
            start: spec.sale.start_time,
            end: spec.sale.end_time,
            warmup: SignedDuration::from_secs(i64::from(spec.sale.warmup_seconds)),
        }),
        ..GatewayScaling::new(
            g.replicas.min,
            g.replicas.max,
            f64::from(g.target_connections_per_pod),
            f64::from(g.target_requests_per_second_per_pod),
        )
    }
}

pub fn consumer(spec: &FlashSaleSpec) -> ConsumerScaling {
    let c = &spec.consumer;
    ConsumerScaling {
        min_replicas: c.replicas.min,
        max_replicas: c.replicas.max,
        target_lag_per_pod: f64::from(c.target_lag_per_pod),
        behavior: spec.scaling.clone(),
        tolerance: DEFAULT_TOLERANCE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_sale_settings() {
        let sale = crate::fixtures::sale();
        let g = gateway(&sale.spec);
        assert_eq!(
            (g.min_replicas, g.max_replicas, g.at_start),
            (2, 50, Some(10))
        );
        assert_eq!(
            (
                g.target_connections_per_pod,
                g.target_requests_per_second_per_pod
            ),
            (20_000.0, 15_000.0)
        );
        let window = g.sale.map(|w| (w.prescale_from(), w.end));
        assert_eq!(
            window.map(|(from, end)| (from.to_string(), end.to_string())),
            Some((
                "2026-11-10T23:55:00Z".to_string(),
                "2026-11-11T00:30:00Z".to_string()
            ))
        );
        let c = consumer(&sale.spec);
        assert_eq!(
            (c.min_replicas, c.max_replicas, c.target_lag_per_pod),
            (1, 20, 5_000.0)
        );
    }
}
