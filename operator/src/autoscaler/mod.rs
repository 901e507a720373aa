//! The autoscaler loop: every [`TICK`] it evaluates each FlashSale that needs
//! it with the pure algorithm in [`crate::scaling`], writes the gateway and
//! consumer Deployments' `scale` subresource, records an Event per change and
//! keeps its part of the status, all under its own field manager
//! [`FIELD_MANAGER`]. It runs on the leading replica, beside the reconciler.
//!
//! - [`step`]: one evaluation of one sale, and the in-memory scaling history.
//! - [`observe`]: what a step reads from the API server.
//! - [`actuate`]: the scale write and the Event.
//! - [`status`]: the autoscaler's status fields and when they are written.
//! - [`settings`]: the spec as the algorithm's settings.

pub mod actuate;
pub mod observe;
pub mod settings;
pub mod status;
pub mod step;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::MissedTickBehavior;
use tracing::{Instrument, debug, info_span, warn};

pub use step::{Autoscaler, Change, StepReport};

use crate::reconciler::Context;
use crate::resource::FlashSale;

/// The autoscaler's field manager, for the `scale` subresource and its status
/// fields; the reconciler applies everything else as `flashsale-operator`.
pub const FIELD_MANAGER: &str = "flashsale-scaler";

/// How often each sale is evaluated (the HPA's default is 15 s; a flash sale
/// cannot wait that long).
pub const TICK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Kube {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("FlashSale has no {0}")]
    Missing(&'static str),
}

/// Runs until `shutdown` resolves; a tick in progress is abandoned then, so a
/// replica that lost the lease writes nothing more.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send) {
    let (store, writer) = reflector::store();
    let sales = Api::<FlashSale>::all(ctx.client.clone());
    let watch = reflector::reflector(writer, watcher(sales, watcher::Config::default()))
        .default_backoff()
        .for_each(|event| async move {
            if let Err(e) = event {
                debug!(error = %e, "FlashSale watch interrupted; retrying");
            }
        });
    let mut scaler = Autoscaler::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown, watch);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = &mut watch => break,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = &mut watch => break,
            _ = evaluate_all(&ctx, &store, &mut scaler) => {}
        }
    }
}

/// One tick over every known sale; one sale's failure does not hold up the others.
async fn evaluate_all(ctx: &Context, store: &Store<FlashSale>, scaler: &mut Autoscaler) {
    let sales = store.state();
    let now = ctx.clock.now();
    for sale in &sales {
        let span = info_span!(
            "autoscale",
            namespace = sale.namespace().unwrap_or_default(),
            name = sale.name_any()
        );
        if let Err(e) = scaler.step(ctx, sale, now).instrument(span.clone()).await {
            span.in_scope(|| warn!(error = %e, "autoscaling step failed"));
        }
    }
    let live: HashSet<(String, String)> = sales
        .iter()
        .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    scaler.retain(|ns, name| live.contains(&(ns.to_string(), name.to_string())));
}
