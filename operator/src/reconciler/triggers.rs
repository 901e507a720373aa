//! What wakes the reconciler: a sale's spec, deletion or finalizers changing,
//! and an owned Deployment's generation or available pods changing or the
//! Deployment disappearing. Status-only churn (a rollout's counters, the
//! autoscaler's figures, the reconciler's own status writes) does not: the
//! reconciler requeues itself for what the clock and Redis change.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt, future};
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::runtime::watcher;

use crate::resource::FlashSale;

/// The part of a sale whose change needs a reconcile (a predicate for
/// `predicate_filter`).
pub fn sale_change(sale: &FlashSale) -> Option<u64> {
    let mut h = DefaultHasher::new();
    sale.metadata.generation.hash(&mut h);
    sale.metadata.deletion_timestamp.is_some().hash(&mut h);
    sale.finalizers().hash(&mut h);
    Some(h.finish())
}

/// The part of an owned Deployment the reconciler reads: its spec (through the
/// generation) and its available pods (status and conditions).
fn deployment_signature(d: &Deployment) -> (Option<i64>, i32) {
    let available = d
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    (d.metadata.generation, available)
}

/// Filters a watch of owned Deployments down to the changes that matter; a
/// deleted Deployment always passes, so the reconciler makes it again.
pub fn deployment_changes<S>(events: S) -> impl Stream<Item = Result<Deployment, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<Deployment>, watcher::Error>>,
{
    let mut seen: HashMap<String, (Option<i64>, i32)> = HashMap::new();
    events.filter_map(move |event| {
        let passed = match event {
            Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                let key = d.uid().unwrap_or_else(|| d.name_any());
                let signature = deployment_signature(&d);
                (seen.insert(key, signature) != Some(signature)).then_some(Ok(d))
            }
            Ok(watcher::Event::Delete(d)) => {
                seen.remove(&d.uid().unwrap_or_else(|| d.name_any()));
                Some(Ok(d))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        future::ready(passed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use kube::api::ObjectMeta;

    fn deployment(generation: i64, available: i32, updated: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("singles-day-gateway".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                generation: Some(generation),
                ..Default::default()
            },
            status: Some(DeploymentStatus {
                available_replicas: Some(available),
                updated_replicas: Some(updated),
                replicas: Some(updated),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn only_generation_availability_and_deletion_pass() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let events = vec![
            Ok(Init),
            Ok(InitApply(deployment(1, 0, 0))),
            Ok(InitDone),
            // A rollout's counters move: no reconcile.
            Ok(Apply(deployment(1, 0, 1))),
            Ok(Apply(deployment(1, 0, 2))),
            // A pod became available.
            Ok(Apply(deployment(1, 1, 2))),
            // The autoscaler wrote the scale subresource.
            Ok(Apply(deployment(2, 1, 2))),
            Ok(Apply(deployment(2, 1, 3))),
            Ok(Delete(deployment(2, 1, 3))),
            // Made again by the reconciler.
            Ok(Apply(deployment(1, 0, 0))),
        ];
        let passed: Vec<(Option<i64>, i32)> = deployment_changes(stream::iter(events))
            .filter_map(|r| future::ready(r.ok()))
            .map(|d| deployment_signature(&d))
            .collect()
            .await;
        assert_eq!(
            passed,
            [
                (Some(1), 0),
                (Some(1), 1),
                (Some(2), 1),
                (Some(2), 1),
                (Some(1), 0)
            ]
        );
    }

    #[test]
    fn status_changes_of_a_sale_do_not_count() {
        let sale = crate::fixtures::sale_with_finalizer();
        let mut with_status = sale.clone();
        with_status.status = Some(crate::resource::FlashSaleStatus {
            remaining: Some(12),
            ..Default::default()
        });
        assert_eq!(sale_change(&sale), sale_change(&with_status));
        let mut edited = sale.clone();
        edited.metadata.generation = Some(2);
        assert_ne!(sale_change(&sale), sale_change(&edited));
        let mut deleted = sale.clone();
        deleted.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        assert_ne!(sale_change(&sale), sale_change(&deleted));
        assert_ne!(
            sale_change(&sale),
            sale_change(&crate::fixtures::sale()),
            "the finalizer being added counts"
        );
    }
}
