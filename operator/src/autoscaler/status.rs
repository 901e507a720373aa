//! The autoscaler's part of the FlashSale status, written by server-side apply
//! under its own field manager. The reconciler applies the rest under
//! `flashsale-operator`; since each manager only ever sends its own fields,
//! neither removes or overwrites the other's.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};

use crate::resource::{API_VERSION, ConsumerStatus, FlashSaleStatus, GatewayStatus, KIND};

/// Metric figures alone (connections, requests/s, lag, a moved hold end) are
/// written at most this often: status is for people, and each write costs the
/// API server a write and every FlashSale watcher an event.
pub const FIGURES_REFRESH: SignedDuration = SignedDuration::from_secs(15);

/// The fields the autoscaler owns; `availableReplicas` stays the reconciler's.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScalerStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<ConsumerStatus>,
}

impl ScalerStatus {
    /// The autoscaler's fields as the sale's status has them now.
    pub fn from_sale(status: Option<&FlashSaleStatus>) -> Self {
        let Some(s) = status else {
            return Self::default();
        };
        let gateway = s
            .gateway
            .as_ref()
            .map(|g| GatewayStatus {
                available_replicas: None,
                ..g.clone()
            })
            .filter(|g| *g != GatewayStatus::default());
        let consumer = s
            .consumer
            .as_ref()
            .map(|c| ConsumerStatus {
                available_replicas: None,
                ..c.clone()
            })
            .filter(|c| *c != ConsumerStatus::default());
        Self { gateway, consumer }
    }

    /// Whether `self` (this tick's) is worth a write over `current`: a new
    /// decision always is, new figures only once [`FIGURES_REFRESH`] has passed.
    pub fn worth_writing(
        &self,
        current: &ScalerStatus,
        last_write: Option<Timestamp>,
        now: Timestamp,
    ) -> bool {
        if self == current {
            return false;
        }
        if self.decisions() != current.decisions() {
            return true;
        }
        last_write.is_none_or(|at| now.duration_since(at) >= FIGURES_REFRESH)
    }

    /// Everything but the measured figures (and a hold's end, which moves
    /// with every new recommendation while the hold lasts).
    fn decisions(&self) -> ScalerStatus {
        ScalerStatus {
            gateway: self.gateway.as_ref().map(|g| GatewayStatus {
                connections: None,
                requests_per_second: None,
                held_until: None,
                ..g.clone()
            }),
            consumer: self.consumer.as_ref().map(|c| ConsumerStatus {
                lag: None,
                held_until: None,
                ..c.clone()
            }),
        }
    }

    /// The server-side apply body for the status subresource.
    pub fn patch(&self) -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "status": self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(secs)
    }

    fn status(desired: i32, connections: i64) -> ScalerStatus {
        ScalerStatus {
            gateway: Some(GatewayStatus {
                replicas: Some(2),
                desired_replicas: Some(desired),
                connections: Some(connections),
                requests_per_second: Some(10.0),
                driving_metric: Some("connections".into()),
                ..Default::default()
            }),
            consumer: None,
        }
    }

    #[test]
    fn the_reconcilers_field_is_not_ours() {
        let sale = FlashSaleStatus {
            gateway: Some(GatewayStatus {
                available_replicas: Some(3),
                ..Default::default()
            }),
            consumer: Some(ConsumerStatus {
                available_replicas: Some(1),
                lag: Some(7),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ours = ScalerStatus::from_sale(Some(&sale));
        assert_eq!(ours.gateway, None);
        assert_eq!(ours.consumer.and_then(|c| c.available_replicas), None);
        assert_eq!(
            status(4, 10).patch()["status"]["gateway"],
            json!({"replicas": 2, "desiredReplicas": 4, "connections": 10,
                   "requestsPerSecond": 10.0, "drivingMetric": "connections"})
        );
    }

    #[test]
    fn decisions_are_written_at_once_figures_every_refresh() {
        let written = status(2, 100);
        assert!(!status(2, 100).worth_writing(&written, Some(at(0)), at(1)));
        assert!(status(3, 100).worth_writing(&written, Some(at(0)), at(1)));
        assert!(!status(2, 120).worth_writing(&written, Some(at(0)), at(14)));
        assert!(status(2, 120).worth_writing(&written, Some(at(0)), at(15)));
        assert!(status(2, 120).worth_writing(&written, None, at(1)));
    }
}
