//! From a FlashSale's spec to the pure algorithm's settings.

use jiff::SignedDuration;

use crate::resource::{self, FlashSaleSpec};
use crate::scaling::{
    ConsumerScaling, DEFAULT_TOLERANCE, GatewayScaling, PolicyType, SaleWindow, ScalingBehavior,
    ScalingPolicy, ScalingRules, SelectPolicy,
};

pub fn gateway(spec: &FlashSaleSpec) -> GatewayScaling {
    let g = &spec.gateway;
    GatewayScaling {
        at_start: g.replicas.at_start,
        behavior: behavior(&spec.scaling),
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
        behavior: behavior(&spec.scaling),
        tolerance: DEFAULT_TOLERANCE,
    }
}

/// The CRD's `spec.scaling` and the algorithm's `behavior` have the same shape;
/// the algorithm fills in the HPA defaults for what is left out.
fn behavior(b: &resource::ScalingBehavior) -> ScalingBehavior {
    ScalingBehavior {
        scale_up: b.scale_up.as_ref().map(rules),
        scale_down: b.scale_down.as_ref().map(rules),
    }
}

fn rules(r: &resource::ScalingRules) -> ScalingRules {
    ScalingRules {
        stabilization_window_seconds: r.stabilization_window_seconds,
        select_policy: match r.select_policy {
            resource::SelectPolicy::Max => SelectPolicy::Max,
            resource::SelectPolicy::Min => SelectPolicy::Min,
            resource::SelectPolicy::Disabled => SelectPolicy::Disabled,
        },
        policies: r
            .policies
            .iter()
            .map(|p| ScalingPolicy {
                policy_type: match p.type_ {
                    resource::ScalingPolicyType::Pods => PolicyType::Pods,
                    resource::ScalingPolicyType::Percent => PolicyType::Percent,
                },
                value: p.value,
                period_seconds: p.period_seconds,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    // Both types claim the HPA's field names: the converted behavior must
    // serialize exactly as the CRD's did.
    #[test]
    fn behavior_keeps_every_field() -> Result<(), serde_json::Error> {
        let crd: resource::ScalingBehavior = serde_json::from_value(json!({
            "scaleUp": {"stabilizationWindowSeconds": 30, "selectPolicy": "Min",
                        "policies": [{"type": "Pods", "value": 3, "periodSeconds": 20},
                                     {"type": "Percent", "value": 50, "periodSeconds": 60}]},
            "scaleDown": {"selectPolicy": "Disabled"}
        }))?;
        assert_eq!(
            serde_json::to_value(behavior(&crd))?,
            serde_json::to_value(&crd)?
        );
        Ok(())
    }

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
