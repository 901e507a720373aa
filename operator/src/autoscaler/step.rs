//! One evaluation of one sale: observe, decide with the pure algorithm, write
//! what changed. The scaling history lives here, in memory, per sale and workload.

use std::collections::HashMap;

use dataplane::gateway::load_report;
use dataplane::lag::{self, LagReading};
use dataplane::redis_conn::RedisConn;
use dataplane::spec::{Phase, SaleId};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use tracing::{debug, info, warn};

use super::status::ScalerStatus;
use super::{Error, FIELD_MANAGER, actuate, observe, settings};
use crate::children::Component;
use crate::conditions;
use crate::metrics::SaleLabels;
use crate::reconciler::{self, Context};
use crate::resource::{ConsumerStatus, FlashSale, GatewayStatus, SalePhase};
use crate::scaling::{
    Decision, GatewayObservation, Hold, ScalingState, decide_consumer, decide_gateway,
};

/// How long a Redis URL read from the sale's Secret is reused before it is read again.
const REDIS_URL_REFRESH: SignedDuration = SignedDuration::from_secs(60);

/// The autoscaler's memory: per sale (namespace, name), the scaling history of
/// both workloads and what it last wrote.
#[derive(Default)]
pub struct Autoscaler {
    sales: HashMap<(String, String), SaleMemory>,
}

#[derive(Default)]
struct SaleMemory {
    /// A sale deleted and created again under the same name starts afresh.
    uid: Option<String>,
    gateway: ScalingState,
    consumer: ScalingState,
    redis_url: Option<(String, Timestamp)>,
    status_written: Option<Timestamp>,
}

/// What one step did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Why nothing was evaluated (`None` when something was).
    pub idle: Option<&'static str>,
    pub gateway: Option<Change>,
    pub consumer: Option<Change>,
    pub status_written: bool,
}

/// One workload's decision this step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: i32,
    pub to: i32,
    pub driver: String,
    /// What holds the count short of the driver's proposal.
    pub hold: Option<Hold>,
}

impl Autoscaler {
    /// Forgets sales that are gone.
    pub fn retain(&mut self, live: impl Fn(&str, &str) -> bool) {
        self.sales.retain(|(ns, name), _| live(ns, name));
    }

    /// Evaluates `sale` at `now`: both workloads from creation (Pending: held
    /// within `min`/`max`, the `atStart` floor not yet applying) through
    /// Warming and Active, and after it ended until they are back at `min`
    /// (consumers also while orders still wait in the streams).
    pub async fn step(
        &mut self,
        ctx: &Context,
        sale: &FlashSale,
        now: Timestamp,
    ) -> Result<StepReport, Error> {
        let ns = sale.namespace().ok_or(Error::Missing("namespace"))?;
        let name = sale.name_any();
        let key = (ns.clone(), name.clone());
        let failed = sale
            .status
            .as_ref()
            .is_some_and(|s| s.phase == Some(SalePhase::Failed));
        let idle = if sale.metadata.deletion_timestamp.is_some() {
            Some("being deleted")
        } else if failed {
            Some("spec cannot run")
        } else {
            None
        };
        if let Some(why) = idle {
            self.sales.remove(&key);
            return Ok(StepReport {
                idle: Some(why),
                ..Default::default()
            });
        }
        if half_made(sale) {
            // Hold the counts (and the history) until every child is applied.
            return Ok(StepReport {
                idle: Some("children not all applied"),
                ..Default::default()
            });
        }
        let memory = self.sales.entry(key).or_default();
        if memory.uid != sale.metadata.uid {
            *memory = SaleMemory {
                uid: sale.metadata.uid.clone(),
                ..Default::default()
            };
        }
        memory.step(ctx, sale, &ns, &name, now).await
    }
}

impl SaleMemory {
    async fn step(
        &mut self,
        ctx: &Context,
        sale: &FlashSale,
        ns: &str,
        name: &str,
        now: Timestamp,
    ) -> Result<StepReport, Error> {
        let spec = &sale.spec;
        let ended = spec.sale.phase_at(now) == Phase::Ended;
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let gateway_scale = observe::scale(&deployments, name, Component::Gateway).await?;
        let consumer_scale = observe::scale(&deployments, name, Component::Consumer).await?;
        if gateway_scale.is_none() && consumer_scale.is_none() {
            return Ok(StepReport {
                idle: Some("no Deployments yet"),
                ..Default::default()
            });
        }
        // After the end the gateway only needs to come down to min.
        let gateway_scale =
            gateway_scale.filter(|s| !ended || s.replicas != spec.gateway.replicas.min);
        let consumers_off_min = consumer_scale
            .as_ref()
            .is_some_and(|s| s.replicas != spec.consumer.replicas.min);

        let id = SaleId::new(ns, name);
        let mut redis = self.redis(ctx, ns, sale, now).await;
        let mut report = StepReport::default();
        let current_status = ScalerStatus::from_sale(sale.status.as_ref());
        let mut next_status = current_status.clone();
        let mut first_error = None;

        if let Some(scale) = gateway_scale {
            let published = match redis.as_mut() {
                Some(conn) => load_report::read_reports(conn, &id, now.as_millisecond())
                    .await
                    .unwrap_or_else(|e| {
                        warn!(error = %e, "cannot read gateway load reports");
                        Vec::new()
                    }),
                None => Vec::new(),
            };
            // Pods only count through their reports: with none (Redis not
            // reachable, gateways not up yet) the list could not change the
            // decision, so it is not asked for.
            let pods = if published.is_empty() {
                Vec::new()
            } else {
                let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
                observe::gateway_pods(&pods, name, scale.selector.as_deref()).await?
            };
            let reports = observe::reports(&published);
            let decision = decide_gateway(
                &settings::gateway(spec),
                &GatewayObservation {
                    current_replicas: scale.replicas,
                    pods: &pods,
                    reports: &reports,
                },
                &self.gateway,
                now,
            );
            let connections: i64 = published.iter().map(|r| r.connections).sum();
            // A fold from +0.0: an empty `sum` of f64 is -0.0 ("-0 requests/s").
            let rps = published
                .iter()
                .fold(0.0, |sum, r| sum + r.requests_per_second);
            let rps = (rps * 10.0).round() / 10.0;
            ctx.metrics.sales.observe_gateway_load(
                &SaleLabels::new(ns, name),
                connections,
                rps,
                published.len(),
            );
            let note = format!(
                "{} → {} replicas ({}; {connections} connections, {rps} requests/s over {} report(s)): {}",
                scale.replicas,
                decision.desired_replicas,
                decision.driver,
                published.len(),
                decision.reason
            );
            let previous = next_status.gateway.take().unwrap_or_default();
            let result = self
                .apply(
                    ctx,
                    &deployments,
                    sale,
                    Component::Gateway,
                    scale.replicas,
                    decision,
                    note,
                )
                .await;
            let (change, scaled) = settled(result, &mut first_error);
            next_status.gateway = Some(GatewayStatus {
                available_replicas: None,
                replicas: Some(scale.replicas),
                desired_replicas: change.as_ref().map(|c| c.to).or(previous.desired_replicas),
                connections: Some(connections),
                requests_per_second: Some(rps),
                last_scale_time: if scaled {
                    Some(now)
                } else {
                    previous.last_scale_time
                },
                driving_metric: change
                    .as_ref()
                    .map(|c| c.driver.clone())
                    .or(previous.driving_metric),
                held_by: held_by(change.as_ref(), previous.held_by),
                held_until: held_until(change.as_ref(), previous.held_until),
            });
            report.gateway = change;
        }

        if let Some(scale) = consumer_scale {
            let reading = match redis.as_mut() {
                Some(conn) => lag::consumer_lag(conn, &id, &spec.sale)
                    .await
                    .inspect_err(|e| warn!(error = %e, "cannot read consumer lag"))
                    .ok(),
                None => None,
            };
            let backlog = reading.as_ref().map(LagReading::backlog);
            if let Some(lag) = backlog {
                ctx.metrics
                    .sales
                    .observe_consumer_lag(&SaleLabels::new(ns, name), lag);
            }
            if !ended || consumers_off_min || backlog.is_some_and(|b| b > 0) {
                let decision = decide_consumer(
                    &settings::consumer(spec),
                    scale.replicas,
                    backlog,
                    &self.consumer,
                    now,
                );
                let lag_note = match &reading {
                    // Before the first order (a Pending sale: Redis not warmed yet).
                    Some(r) if r.streams.is_empty() => {
                        "0 not persisted: no order stream yet".to_string()
                    }
                    Some(r) => format!(
                        "{} not persisted: {} undelivered, {} pending, from {}",
                        r.backlog(),
                        r.undelivered,
                        r.pending,
                        r.source
                    ),
                    None => "lag unreadable".to_string(),
                };
                let note = format!(
                    "{} → {} replicas ({}; {lag_note}): {}",
                    scale.replicas, decision.desired_replicas, decision.driver, decision.reason
                );
                let previous = next_status.consumer.take().unwrap_or_default();
                let result = self
                    .apply(
                        ctx,
                        &deployments,
                        sale,
                        Component::Consumer,
                        scale.replicas,
                        decision,
                        note,
                    )
                    .await;
                let (change, scaled) = settled(result, &mut first_error);
                next_status.consumer = Some(ConsumerStatus {
                    available_replicas: None,
                    replicas: Some(scale.replicas),
                    desired_replicas: change.as_ref().map(|c| c.to).or(previous.desired_replicas),
                    lag: backlog.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
                    last_scale_time: if scaled {
                        Some(now)
                    } else {
                        previous.last_scale_time
                    },
                    held_by: held_by(change.as_ref(), previous.held_by),
                    held_until: held_until(change.as_ref(), previous.held_until),
                });
                report.consumer = change;
            }
        }

        if report.gateway.is_none() && report.consumer.is_none() && first_error.is_none() {
            report.idle = Some("at min after the end");
        }
        if next_status.worth_writing(&current_status, self.status_written, now) {
            let sales: Api<FlashSale> = Api::namespaced(ctx.client.clone(), ns);
            sales
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(next_status.patch()),
                )
                .await
                .map_err(|source| Error::Kube {
                    action: "patch status of",
                    object: name.to_string(),
                    source,
                })?;
            self.status_written = Some(now);
            report.status_written = true;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Writes the decided count if it differs and keeps the decision's history;
    /// returns the decision and whether the count was written. A failed write
    /// keeps the previous history, as the algorithm asks.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &mut self,
        ctx: &Context,
        deployments: &Api<Deployment>,
        sale: &FlashSale,
        component: Component,
        current: i32,
        decision: Decision,
        note: String,
    ) -> Result<(Option<Change>, bool), Error> {
        let change = Change {
            from: current,
            to: decision.desired_replicas,
            driver: decision.driver.to_string(),
            hold: decision.hold,
        };
        let scaled = change.to != current;
        if scaled {
            actuate::write_scale(deployments, &sale.name_any(), component, change.to).await?;
            info!(component = component.as_str(), %note, "scaled");
            actuate::record(&ctx.recorder, sale, component, change.from, change.to, note).await;
        } else {
            debug!(component = component.as_str(), %note, "no change");
        }
        let workload = SaleLabels::new(&sale.namespace().unwrap_or_default(), &sale.name_any())
            .workload(component.as_str());
        ctx.metrics
            .sales
            .observe_decision(&workload, current, change.to, &change.driver, scaled);
        let state = match component {
            Component::Gateway => &mut self.gateway,
            Component::Consumer => &mut self.consumer,
        };
        *state = decision.state;
        Ok((Some(change), scaled))
    }

    /// The sale's Redis, through the Secret the reconciler reads too; `None`
    /// (the metrics count as unavailable, the schedule floor still applies)
    /// when the Secret or Redis is missing.
    async fn redis(
        &mut self,
        ctx: &Context,
        ns: &str,
        sale: &FlashSale,
        now: Timestamp,
    ) -> Option<RedisConn> {
        let cached = self
            .redis_url
            .as_ref()
            .filter(|(_, at)| now.duration_since(*at) < REDIS_URL_REFRESH)
            .map(|(url, _)| url.clone());
        let url = match cached {
            Some(url) => url,
            None => {
                let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
                match reconciler::secret_value(&secrets, ns, &sale.spec.redis.url_secret_ref).await
                {
                    Ok(Ok(url)) => {
                        self.redis_url = Some((url.clone(), now));
                        url
                    }
                    Ok(Err(problem)) => {
                        debug!(%problem, "no Redis URL; scaling on the schedule alone");
                        return None;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot read the Redis Secret");
                        return None;
                    }
                }
            }
        };
        match ctx.redis.for_sale(&sale.spec.redis, &url).await {
            Ok(conn) => Some(conn),
            Err(e) => {
                warn!(error = %e, "cannot reach Redis; scaling on the schedule alone");
                None
            }
        }
    }
}

/// The status' `heldBy`: this step's hold, or the previous one when the step
/// decided nothing (a failed scale write).
fn held_by(change: Option<&Change>, previous: Option<String>) -> Option<String> {
    match change {
        Some(c) => c.hold.map(|h| h.by.to_string()),
        None => previous,
    }
}

fn held_until(change: Option<&Change>, previous: Option<Timestamp>) -> Option<Timestamp> {
    match change {
        Some(c) => c.hold.and_then(|h| h.until),
        None => previous,
    }
}

/// Whether the reconciler reports a child the API server refused: a sale
/// missing its Service or a Deployment is not scaled until it is whole.
fn half_made(sale: &FlashSale) -> bool {
    sale.status.as_ref().is_some_and(|s| {
        conditions::find(&s.conditions, conditions::READY)
            .is_some_and(|c| c.status == "False" && c.reason == conditions::APPLY_FAILED)
    })
}

/// What `apply` did, keeping its error (the first of the step's) for the
/// step's result so the other workload and the status are still handled.
fn settled(
    result: Result<(Option<Change>, bool), Error>,
    first_error: &mut Option<Error>,
) -> (Option<Change>, bool) {
    result.unwrap_or_else(|e| {
        first_error.get_or_insert(e);
        (None, false)
    })
}
