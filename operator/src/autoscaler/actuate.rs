//! What a decision writes: the Deployment's `scale` subresource and an Event.

use k8s_openapi::api::apps::v1::Deployment;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::json;
use tracing::warn;

use super::{Error, FIELD_MANAGER};
use crate::children::{self, Component};
use crate::resource::FlashSale;

/// Sets `spec.replicas` through the `scale` subresource by server-side apply.
/// Forced: the count is the autoscaler's alone (the reconciler's Deployment
/// leaves `replicas` out), so a hand-made `kubectl scale` is taken back.
pub async fn write_scale(
    deployments: &Api<Deployment>,
    sale: &str,
    component: Component,
    replicas: i32,
) -> Result<(), Error> {
    let name = children::workload_name(sale, component);
    let patch = json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "spec": { "replicas": replicas },
    });
    deployments
        .patch_scale(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Kube {
            action: "patch scale of",
            object: name,
            source,
        })?;
    Ok(())
}

/// `ScaledGateway` / `ScaledConsumer` on the sale. The recorder merges events
/// of equal reason and action into one series that keeps the first note, so
/// the action names the change (`Scale2To6`): a repeat of the same change
/// joins its series, a different change gets its own.
pub async fn record(
    recorder: &Recorder,
    sale: &FlashSale,
    component: Component,
    from: i32,
    to: i32,
    note: String,
) {
    let reason = match component {
        Component::Gateway => "ScaledGateway",
        Component::Consumer => "ScaledConsumer",
    };
    let event = Event {
        type_: EventType::Normal,
        reason: reason.to_string(),
        note: Some(truncate(note, 1024)),
        action: format!("Scale{from}To{to}"),
        secondary: None,
    };
    // An Event that cannot be published is no reason to undo a scale.
    if let Err(e) = recorder.publish(&event, &sale.object_ref(&())).await {
        warn!(reason, error = %e, "cannot publish event");
    }
}

/// Events notes are limited to 1 KiB; cut at a character boundary.
fn truncate(mut note: String, max: usize) -> String {
    if note.len() > max {
        let mut end = max;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("2 → 6".into(), 3), "2 ");
        assert_eq!(truncate("2 → 6".into(), 100), "2 → 6");
    }
}
