//! What one tick reads: a workload's `scale` subresource, the gateway pods'
//! readiness, and the data plane's load reports, as the algorithm's inputs.

use dataplane::gateway::load_report;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::Error;
use crate::children::{self, Component};
use crate::scaling::{LoadReport, PodReadiness};

/// A workload's replica count and pod selector, from its `scale` subresource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadScale {
    pub replicas: i32,
    /// `status.selector`: the Deployment's label selector as a string.
    pub selector: Option<String>,
}

/// The `scale` of the sale's `component` Deployment; `None` while it does not
/// exist (the reconciler has not applied it yet, or deletion removed it).
pub async fn scale(
    deployments: &Api<Deployment>,
    sale: &str,
    component: Component,
) -> Result<Option<WorkloadScale>, Error> {
    let name = children::workload_name(sale, component);
    match deployments.get_scale(&name).await {
        Ok(scale) => Ok(Some(WorkloadScale {
            replicas: scale.spec.and_then(|s| s.replicas).unwrap_or(0),
            selector: scale.status.and_then(|s| s.selector),
        })),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(None),
        Err(source) => Err(Error::Kube {
            action: "get scale of",
            object: name,
            source,
        }),
    }
}

/// The gateway pods that count: listed by the Deployment's own selector,
/// terminating and finished pods left out (as the HPA does).
pub async fn gateway_pods(
    pods: &Api<Pod>,
    sale: &str,
    selector: Option<&str>,
) -> Result<Vec<PodReadiness>, Error> {
    let selector = match selector {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => default_selector(sale),
    };
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Kube {
            action: "list pods",
            object: selector.clone(),
            source,
        })?;
    Ok(list.items.iter().filter_map(readiness).collect())
}

/// The selector the reconciler gives the gateway Deployment.
fn default_selector(sale: &str) -> String {
    let labels = children::labels(sale, Some(Component::Gateway));
    ["app.kubernetes.io/instance", "app.kubernetes.io/component"]
        .iter()
        .filter_map(|k| labels.get(*k).map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
}

fn readiness(pod: &Pod) -> Option<PodReadiness> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    ) {
        return None;
    }
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Some(PodReadiness {
        name: pod.metadata.name.clone()?,
        ready,
    })
}

/// The data plane's reports in the algorithm's terms; a report with an
/// impossible timestamp is dropped as it would be if it were stale.
pub fn reports(published: &[load_report::LoadReport]) -> Vec<LoadReport> {
    published
        .iter()
        .filter_map(|r| {
            Some(LoadReport {
                pod: r.pod.clone(),
                // i64 → f64 is exact far beyond any connection count.
                connections: r.connections as f64,
                requests_per_second: r.requests_per_second,
                reported_at: Timestamp::from_millisecond(r.at_ms).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, phase: &str, ready: &str, terminating: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                deletion_timestamp: terminating.then_some(Time(Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_live_pods_count_and_ready_means_the_condition() {
        let pods = [
            pod("a", "Running", "True", false),
            pod("b", "Running", "False", false),
            pod("c", "Pending", "False", false),
            pod("d", "Running", "True", true),
            pod("e", "Succeeded", "False", false),
            pod("f", "Failed", "False", false),
        ];
        let seen: Vec<(String, bool)> = pods
            .iter()
            .filter_map(readiness)
            .map(|p| (p.name, p.ready))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("a".to_string(), true),
                ("b".to_string(), false),
                ("c".to_string(), false)
            ]
        );
    }

    #[test]
    fn selector_matches_the_deployment() {
        assert_eq!(
            default_selector("singles-day"),
            "app.kubernetes.io/instance=singles-day,app.kubernetes.io/component=gateway"
        );
    }

    #[test]
    fn reports_convert_with_their_time() {
        let published = [load_report::LoadReport {
            pod: "gw-0".into(),
            at_ms: 1_700_000_000_123,
            connections: 1200,
            requests_per_second: 33.5,
        }];
        let converted = reports(&published);
        assert_eq!(converted.len(), 1);
        assert_eq!(converted[0].connections, 1200.0);
        assert_eq!(converted[0].reported_at.as_millisecond(), 1_700_000_000_123);
    }
}
