//! The `FlashSale` reconciler: validate, apply the data plane, warm Redis when
//! the clock says so, report status; on deletion stop the data plane, wait for
//! accepted orders to be persisted, then clear the sale's Redis keys.

use std::sync::Arc;
use std::time::Duration;

use dataplane::spec::{Phase, SaleId, SpecProblem};
use dataplane::warm::{self, ProductCounters, ProductWarm, WarmError, WarmOutcome};
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::children::{self, BuildError, Children, Component, MANAGER};
use crate::clock::Clock;
use crate::conditions::{self, Observed};
use crate::metrics::Metrics;
use crate::redis_store::{self, RedisConnections};
use crate::resource::{
    API_VERSION, ConsumerStatus, FlashSale, FlashSaleSpec, FlashSaleStatus, GatewayStatus, KIND,
    ProductStatus, SalePhase, SecretKeyRef,
};
use crate::schedule::Schedule;

/// Held on every sale until its data plane is stopped and its Redis keys cleared.
pub const FINALIZER: &str = "flashsale.dev/cleanup";

/// Longest sale name whose children's names and labels stay within the
/// 63-character DNS label limit (`<name>-consumer`).
pub const MAX_NAME_LEN: usize = 54;

/// How the reconciler behaves; the binary fills it from flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image for gateways and consumers when a sale names none.
    pub dataplane_image: String,
    /// Longest wait between reconciles of a live sale (status counters move).
    pub refresh: Duration,
    /// Wait before retrying what depends on something outside (a Secret, Redis).
    pub retry: Duration,
    /// How long deletion waits for consumers to persist accepted orders
    /// before it stops them anyway and leaves the sale's Redis keys in place.
    pub drain_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            dataplane_image: default_image(),
            refresh: Duration::from_secs(15),
            retry: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(600),
        }
    }
}

/// The data plane image released with this operator version.
pub fn default_image() -> String {
    format!("ghcr.io/flashsale/dataplane:{}", env!("CARGO_PKG_VERSION"))
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub redis: RedisConnections,
    pub settings: Settings,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Kube {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("redis of sale {sale}: {source}")]
    Redis {
        sale: String,
        #[source]
        source: redis::RedisError,
    },
}

impl Error {
    /// A bounded label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::Build(_) => "build",
            Self::Redis { .. } => "redis",
        }
    }
}

fn kube_err(action: &'static str, object: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let object = object.into();
    move |source| Error::Kube {
        action,
        object,
        source,
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let sales = Api::<FlashSale>::all(ctx.client.clone());
    // Fail fast with a clear message when the CRD is not installed.
    sales
        .list(&ListParams::default().limit(1))
        .await
        .map_err(kube_err(
            "list",
            "flashsales.flashsale.dev (is the CRD installed?)",
        ))?;
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    Controller::new(sales, watcher::Config::default().any_semantic())
        .owns(Api::<Deployment>::all(ctx.client.clone()), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((sale, _)) => {
                    debug!(name = %sale.name, namespace = ?sale.namespace, "reconciled")
                }
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
    Ok(())
}

/// Retries a failed reconcile after a short pause (the error is already logged and counted).
pub fn error_policy(_sale: Arc<FlashSale>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.settings.retry.min(Duration::from_secs(10)))
}

pub async fn reconcile(sale: Arc<FlashSale>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let span = info_span!(
        "reconcile",
        namespace = sale.namespace().unwrap_or_default(),
        name = sale.name_any()
    );
    let result = reconcile_sale(&sale, &ctx).instrument(span.clone()).await;
    ctx.metrics
        .observe(started.elapsed(), result.as_ref().err().map(Error::kind));
    if sale.metadata.deletion_timestamp.is_some() {
        // A sale being deleted is not live: its gauges would only go stale.
        ctx.metrics
            .sales
            .forget_sale(&sale.namespace().unwrap_or_default(), &sale.name_any());
    }
    if let Err(e) = &result {
        span.in_scope(|| warn!(error = %e, "reconcile failed"));
    }
    result
}

async fn reconcile_sale(sale: &FlashSale, ctx: &Context) -> Result<Action, Error> {
    let ns = sale.namespace().ok_or(BuildError::Missing("namespace"))?;
    let sales: Api<FlashSale> = Api::namespaced(ctx.client.clone(), &ns);
    let has_finalizer = sale.finalizers().iter().any(|f| f == FINALIZER);
    if sale.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        return cleanup(sale, ctx, &sales, &ns).await;
    }
    if has_finalizer {
        apply(sale, ctx, &sales, &ns).await
    } else {
        let mut finalizers = sale.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let updated = patch_finalizers(&sales, sale, finalizers).await?;
        apply(&updated, ctx, &sales, &ns).await
    }
}

/// Sets the finalizer list; the resourceVersion makes a concurrent change fail
/// (and be retried) instead of being overwritten.
async fn patch_finalizers(
    sales: &Api<FlashSale>,
    sale: &FlashSale,
    finalizers: Vec<String>,
) -> Result<FlashSale, Error> {
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": sale.resource_version(),
        }
    });
    sales
        .patch(
            &sale.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube_err("set finalizers of", sale.name_any()))
}

/// Everything one reconcile observed and wants to say.
struct Report<'a> {
    sale: &'a FlashSale,
    previous: FlashSaleStatus,
    next: FlashSaleStatus,
    observed: Vec<Observed>,
    events: Vec<Event>,
    now: Timestamp,
}

impl<'a> Report<'a> {
    fn new(sale: &'a FlashSale, now: Timestamp) -> Self {
        let previous = owned_status(sale.status.as_ref());
        let mut next = previous.clone();
        next.observed_generation = sale.metadata.generation;
        Self {
            sale,
            previous,
            next,
            observed: Vec::new(),
            events: Vec::new(),
            now,
        }
    }

    fn condition(&mut self, c: Observed) {
        self.observed.push(c);
    }

    fn event(&mut self, type_: EventType, reason: &str, action: &str, note: String) {
        self.events.push(Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        });
    }

    /// Ready=False for something the user must fix; a Warning event when the reason is new.
    fn not_ready(&mut self, reason: &str, message: String) {
        let before = conditions::find(&self.previous.conditions, conditions::READY);
        let is_new = before.is_none_or(|c| c.status != "False" || c.reason != reason);
        if is_new {
            self.event(EventType::Warning, reason, "Reconcile", message.clone());
        }
        self.condition(Observed::new(conditions::READY, false, reason, message));
    }

    /// Writes status when it changed and publishes the events.
    async fn publish(mut self, ctx: &Context, sales: &Api<FlashSale>) -> Result<(), Error> {
        self.next.conditions = conditions::merge(
            &self.previous.conditions,
            &self.observed,
            self.sale.metadata.generation,
            self.now,
        );
        let name = self.sale.name_any();
        if self.next != self.previous {
            let patch = json!({
                "apiVersion": API_VERSION,
                "kind": KIND,
                "status": self.next,
            });
            sales
                .patch_status(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
                .map_err(kube_err("patch status of", name.clone()))?;
        }
        let ns = self.sale.namespace().unwrap_or_default();
        ctx.metrics.sales.observe_status(&ns, &name, &self.next);
        let reference = self.sale.object_ref(&());
        for event in &self.events {
            // An event that cannot be published is not worth failing the reconcile.
            if let Err(e) = ctx.recorder.publish(event, &reference).await {
                warn!(reason = %event.reason, error = %e, "cannot publish event");
            }
        }
        Ok(())
    }
}

/// The part of the status this reconciler owns (the autoscaler owns the rest).
fn owned_status(status: Option<&FlashSaleStatus>) -> FlashSaleStatus {
    let Some(s) = status else {
        return FlashSaleStatus::default();
    };
    FlashSaleStatus {
        phase: s.phase,
        observed_generation: s.observed_generation,
        conditions: s
            .conditions
            .iter()
            .filter(|c| conditions::OWNED.contains(&c.type_.as_str()))
            .cloned()
            .collect(),
        remaining: s.remaining,
        products: s.products.clone(),
        warmed_generation: s.warmed_generation,
        gateway: s.gateway.as_ref().map(|g| GatewayStatus {
            available_replicas: g.available_replicas,
            ..Default::default()
        }),
        consumer: s.consumer.as_ref().map(|c| ConsumerStatus {
            available_replicas: c.available_replicas,
            ..Default::default()
        }),
    }
}

/// What the spec asks that no schema check caught (or an old schema let through).
fn spec_problems(sale: &FlashSale) -> Vec<SpecProblem> {
    let mut problems = sale.spec.sale.validate().err().unwrap_or_default();
    let name = sale.name_any();
    if name.len() > MAX_NAME_LEN {
        problems.push(SpecProblem {
            reason: "NameTooLong",
            message: format!(
                "name {name:?} is longer than {MAX_NAME_LEN} characters; its children's names would exceed 63"
            ),
        });
    }
    let g = &sale.spec.gateway.replicas;
    if g.min > g.max || g.at_start.is_some_and(|a| a < g.min || a > g.max) {
        problems.push(SpecProblem {
            reason: "InvalidReplicas",
            message: format!(
                "gateway.replicas needs min <= atStart <= max, got min {} atStart {:?} max {}",
                g.min, g.at_start, g.max
            ),
        });
    }
    let c = &sale.spec.consumer.replicas;
    if c.min > c.max {
        problems.push(SpecProblem {
            reason: "InvalidReplicas",
            message: format!(
                "consumer.replicas needs min <= max, got min {} max {}",
                c.min, c.max
            ),
        });
    }
    problems
}

/// Reads the Secrets a sale needs (three, four with a payment key); returns
/// the Redis URL, or what is missing.
async fn read_secrets(
    ctx: &Context,
    ns: &str,
    spec: &FlashSaleSpec,
) -> Result<Result<String, Vec<String>>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut missing = Vec::new();
    let mut redis_url = None;
    let refs = [
        ("redis", Some(&spec.redis.url_secret_ref)),
        ("database", Some(&spec.database.url_secret_ref)),
        ("token", Some(&spec.token_secret_ref)),
        ("payment key", spec.payment_key_secret_ref.as_ref()),
    ];
    for (what, r) in refs
        .into_iter()
        .filter_map(|(what, r)| r.map(|r| (what, r)))
    {
        match secret_value(&secrets, ns, r).await? {
            Ok(value) if what == "redis" => redis_url = Some(value),
            Ok(_) => {}
            Err(problem) => missing.push(problem),
        }
    }
    Ok(match redis_url {
        Some(url) if missing.is_empty() => Ok(url),
        _ => Err(missing),
    })
}

/// One Secret key's value, or why it cannot be had (the autoscaler reads the Redis URL this way too).
pub(crate) async fn secret_value(
    secrets: &Api<Secret>,
    ns: &str,
    r: &SecretKeyRef,
) -> Result<Result<String, String>, Error> {
    let secret = secrets
        .get_opt(&r.name)
        .await
        .map_err(kube_err("get secret", format!("{ns}/{}", r.name)))?;
    let Some(secret) = secret else {
        return Ok(Err(format!("Secret {ns}/{} not found", r.name)));
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string());
    Ok(match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("Secret {ns}/{} has no key {:?}", r.name, r.key)),
    })
}

async fn apply_one<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Serialize,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.name_any();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(kube_err("apply", format!("{} {ns}/{name}", K::kind(&()))))
}

/// Applies every child; returns the gateway and consumer Deployments as the server has them.
async fn apply_children(
    ctx: &Context,
    ns: &str,
    c: &Children,
) -> Result<(Deployment, Deployment), Error> {
    let client = &ctx.client;
    apply_one::<ConfigMap>(client, ns, &c.config_map).await?;
    let gateway = apply_one::<Deployment>(client, ns, &c.gateway).await?;
    apply_one::<Service>(client, ns, &c.gateway_service).await?;
    apply_one::<PodDisruptionBudget>(client, ns, &c.gateway_pdb).await?;
    let consumer = apply_one::<Deployment>(client, ns, &c.consumer).await?;
    apply_one::<PodDisruptionBudget>(client, ns, &c.consumer_pdb).await?;
    Ok((gateway, consumer))
}

fn available(d: &Deployment) -> i32 {
    d.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

fn availability(type_: &'static str, what: &str, d: &Deployment) -> Observed {
    let n = available(d);
    if n > 0 {
        Observed::new(
            type_,
            true,
            "PodsAvailable",
            format!("{n} {what} pod(s) available"),
        )
    } else {
        Observed::new(
            type_,
            false,
            "NoPodsAvailable",
            format!("no {what} pod is available yet"),
        )
    }
}

/// The reconcile of a sale that exists.
async fn apply(
    sale: &FlashSale,
    ctx: &Context,
    sales: &Api<FlashSale>,
    ns: &str,
) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let mut report = Report::new(sale, now);

    let problems = spec_problems(sale);
    if let Some(first) = problems.first() {
        let message = problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        info!(reason = first.reason, %message, "spec cannot run");
        report.next.phase = Some(SalePhase::Failed);
        report.not_ready(first.reason, message);
        report.publish(ctx, sales).await?;
        // A spec edit is the only way out: it triggers a reconcile.
        return Ok(Action::await_change());
    }

    let redis_url = match read_secrets(ctx, ns, &sale.spec).await? {
        Ok(url) => url,
        Err(missing) => {
            let message = missing.join("; ");
            info!(%message, "secrets missing");
            report.next.phase = Some(SalePhase::Failed);
            report.not_ready("SecretMissing", message);
            report.publish(ctx, sales).await?;
            // Secrets are not watched: look again after a while.
            return Ok(Action::requeue(ctx.settings.retry));
        }
    };

    let children = children::build(sale, &ctx.settings.dataplane_image)?;
    let (gateway, consumer) = apply_children(ctx, ns, &children).await?;
    report.next.gateway = Some(GatewayStatus {
        available_replicas: Some(available(&gateway)),
        ..Default::default()
    });
    report.next.consumer = Some(ConsumerStatus {
        available_replicas: Some(available(&consumer)),
        ..Default::default()
    });
    report.condition(availability(
        conditions::GATEWAY_AVAILABLE,
        "gateway",
        &gateway,
    ));
    report.condition(availability(
        conditions::CONSUMERS_AVAILABLE,
        "consumer",
        &consumer,
    ));

    let spec = &sale.spec.sale;
    let schedule = Schedule::at(spec, now);
    let phase = SalePhase::from(schedule.phase);
    report.next.phase = Some(phase);
    if report.previous.phase != Some(phase) {
        let note = match report.previous.phase {
            Some(before) => format!("{before} → {phase}"),
            None => format!("{phase}"),
        };
        info!(%note, "phase changed");
        // The phase is the reason: the recorder merges events of equal reason
        // into one series, and each phase is entered once.
        report.event(EventType::Normal, &phase.to_string(), "Schedule", note);
    }

    let live = matches!(schedule.phase, Phase::Warming | Phase::Active);
    let generation = sale.metadata.generation;
    let warm_now = live && report.previous.warmed_generation != generation;
    let mut redis_trouble = false;
    if warm_now || report.previous.warmed_generation.is_some() {
        redis_trouble = sync_redis(sale, ctx, &redis_url, warm_now, &mut report).await;
    } else {
        report.next.products = spec
            .products
            .iter()
            .map(|p| ProductStatus {
                sku: p.sku.clone(),
                stock: p.stock,
                remaining: p.stock,
                sold: 0,
                persisted: 0,
            })
            .collect();
        let (reason, message) = match schedule.phase {
            Phase::Ended => (
                "SaleEnded",
                "the sale ended before Redis was warmed".to_string(),
            ),
            _ => (
                "NotYetWarming",
                format!("warming starts at {}", spec.warmup_start()),
            ),
        };
        report.condition(Observed::new(
            conditions::REDIS_WARMED,
            false,
            reason,
            message,
        ));
    }
    report.next.remaining = Some(report.next.products.iter().map(|p| p.remaining).sum());

    let ready_set = report.observed.iter().any(|o| o.type_ == conditions::READY);
    if !ready_set {
        if live && available(&gateway) == 0 {
            report.not_ready(
                "GatewayUnavailable",
                "the sale is live and no gateway pod is available".to_string(),
            );
        } else {
            let message = match schedule.next {
                Some((Phase::Warming, at)) => format!("warming starts at {at}"),
                Some((Phase::Active, at)) => format!("the sale opens at {at}"),
                Some((_, at)) => format!("the sale closes at {at}"),
                None => format!("the sale ended at {}", spec.end_time),
            };
            report.condition(Observed::new(
                conditions::READY,
                true,
                "Reconciled",
                message,
            ));
        }
    }
    report.publish(ctx, sales).await?;

    let after = schedule.requeue_after(now, ctx.settings.refresh);
    Ok(match (after, redis_trouble) {
        (Some(d), true) => Action::requeue(d.min(ctx.settings.retry)),
        (None, true) => Action::requeue(ctx.settings.retry),
        (Some(d), false) => Action::requeue(d),
        (None, false) => Action::await_change(),
    })
}

/// Warms Redis (when `warm`) and reads the counters into the report; returns
/// whether Redis needs another look soon.
async fn sync_redis(
    sale: &FlashSale,
    ctx: &Context,
    url: &str,
    warm: bool,
    report: &mut Report<'_>,
) -> bool {
    let id = SaleId::new(sale.namespace().unwrap_or_default(), sale.name_any());
    let spec = &sale.spec.sale;
    let mut conn = match ctx.redis.get(url).await {
        Ok(c) => c,
        Err(e) => {
            redis_unavailable(report, &e);
            return true;
        }
    };
    let generation = sale.metadata.generation;
    let mut warm_problem = None;
    if warm {
        match warm::warm_sale(&mut conn, &id, spec).await {
            Ok(products) => {
                report.next.warmed_generation = generation;
                warm_events(report, &products, generation);
            }
            Err(WarmError::BelowSold { sku, stock, sold }) => {
                warm_problem = Some(format!(
                    "sku {sku}: stock {stock} is below the {sold} units already sold; Redis keeps the previous stock"
                ));
            }
            Err(WarmError::Redis(e)) => {
                redis_unavailable(report, &e);
                return true;
            }
            Err(e @ WarmError::Protocol { .. }) => {
                warm_problem = Some(e.to_string());
            }
        }
    }
    let counters = match warm::product_counters(&mut conn, &id, spec).await {
        Ok(c) => c,
        Err(e) => {
            redis_unavailable(report, &e);
            return true;
        }
    };
    report.next.products = spec
        .products
        .iter()
        .zip(&counters)
        .map(|(p, c)| match c {
            Some(c) => product_status(c),
            None => ProductStatus {
                sku: p.sku.clone(),
                stock: p.stock,
                remaining: 0,
                sold: 0,
                persisted: 0,
            },
        })
        .collect();
    if let Some(message) = warm_problem {
        report.condition(Observed::new(
            conditions::REDIS_WARMED,
            false,
            "StockBelowSold",
            message.clone(),
        ));
        report.not_ready("StockBelowSold", message);
        return false;
    }
    let missing: Vec<&str> = spec
        .products
        .iter()
        .zip(&counters)
        .filter(|(_, c)| c.is_none())
        .map(|(p, _)| p.sku.as_str())
        .collect();
    if missing.is_empty() {
        let from = report.next.warmed_generation.unwrap_or_default();
        report.condition(Observed::new(
            conditions::REDIS_WARMED,
            true,
            "Warmed",
            format!(
                "{} product(s) warmed from generation {from}",
                spec.products.len()
            ),
        ));
        false
    } else {
        // Redis lost keys it had (a restart without AOF?): re-warming would
        // sell stock twice, so a person decides.
        let message = format!(
            "Redis has no stock for {} although it was warmed; check Redis persistence",
            missing.join(", ")
        );
        report.condition(Observed::new(
            conditions::REDIS_WARMED,
            false,
            "StockMissing",
            message.clone(),
        ));
        report.not_ready("StockMissing", message);
        true
    }
}

fn redis_unavailable(report: &mut Report<'_>, e: &redis::RedisError) {
    let message = format!("cannot reach Redis: {e}");
    warn!(error = %e, "redis unavailable");
    report.condition(Observed::new(
        conditions::REDIS_WARMED,
        false,
        "RedisUnavailable",
        message.clone(),
    ));
    report.not_ready("RedisUnavailable", message);
}

fn product_status(c: &ProductCounters) -> ProductStatus {
    ProductStatus {
        sku: c.sku.clone(),
        stock: c.stock,
        remaining: c.remaining,
        sold: c.sold(),
        persisted: c.persisted,
    }
}

/// Events for what warming changed: a first warm, or stock moved by a spec
/// edit. A re-warm that changed nothing says nothing.
fn warm_events(report: &mut Report<'_>, products: &[ProductWarm], generation: Option<i64>) {
    let created: Vec<String> = products
        .iter()
        .filter(|p| p.outcome == WarmOutcome::Created)
        .map(|p| format!("{}: {} units", p.sku, p.remaining))
        .collect();
    let resized: Vec<String> = products
        .iter()
        .filter_map(|p| match p.outcome {
            WarmOutcome::Resized { delta } => Some(format!(
                "{}: stock {delta:+}, {} remaining",
                p.sku, p.remaining
            )),
            _ => None,
        })
        .collect();
    if !created.is_empty() {
        let note = created.join("; ");
        info!(%note, "redis warmed");
        report.event(EventType::Normal, "RedisWarmed", "Warm", note);
    }
    if !resized.is_empty() {
        let note = resized.join("; ");
        info!(%note, "stock changed");
        // The recorder merges events of equal reason and action into a series
        // that keeps the first note; the generation keeps each change visible.
        let action = format!("WarmGeneration{}", generation.unwrap_or_default());
        report.event(EventType::Normal, "StockChanged", &action, note);
    }
}

/// Deletion: stop gateways (no new orders), wait until consumers persisted
/// every accepted order, stop consumers, clear the sale's Redis keys, release
/// the finalizer. Orders in the database are never touched.
async fn cleanup(
    sale: &FlashSale,
    ctx: &Context,
    sales: &Api<FlashSale>,
    ns: &str,
) -> Result<Action, Error> {
    let name = sale.name_any();
    let reference = sale.object_ref(&());
    let publish = |reason: &'static str, type_: EventType, note: String| {
        let reference = reference.clone();
        async move {
            let event = Event {
                type_,
                reason: reason.to_string(),
                note: Some(note),
                action: "Cleanup".to_string(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                warn!(reason, error = %e, "cannot publish event");
            }
        }
    };

    if !stop(ctx, ns, &name, Component::Gateway).await? {
        info!("waiting for gateways to stop");
        publish(
            "StoppingGateways",
            EventType::Normal,
            "gateways stopping; no new orders are accepted".to_string(),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    let warmed = sale
        .status
        .as_ref()
        .and_then(|s| s.warmed_generation)
        .is_some();
    let mut clear_with = None;
    if warmed {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        match secret_value(&secrets, ns, &sale.spec.redis.url_secret_ref).await? {
            Ok(url) => clear_with = Some(url),
            Err(problem) => {
                publish(
                    "RedisNotCleared",
                    EventType::Warning,
                    format!("{problem}: the sale's Redis keys stay in place"),
                )
                .await;
            }
        }
    }

    let id = SaleId::new(ns, &name);
    let skus: Vec<String> = sale
        .spec
        .sale
        .products
        .iter()
        .map(|p| p.sku.clone())
        .collect();
    if let Some(url) = &clear_with {
        let mut conn = ctx.redis.get(url).await.map_err(|source| Error::Redis {
            sale: id.to_string(),
            source,
        })?;
        let backlog = redis_store::unpersisted(&mut conn, &id, &sale.spec.sale)
            .await
            .map_err(|source| Error::Redis {
                sale: id.to_string(),
                source,
            })?;
        if backlog > 0 {
            let waited = deletion_age(sale, ctx.clock.now());
            if waited < ctx.settings.drain_timeout {
                info!(backlog, "waiting for consumers to persist accepted orders");
                publish(
                    "DrainingOrders",
                    EventType::Normal,
                    format!(
                        "{backlog} accepted order(s) not yet persisted; consumers keep running"
                    ),
                )
                .await;
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            // Consumers cannot drain: keep the streams for a person to recover.
            publish(
                "RedisNotCleared",
                EventType::Warning,
                format!(
                    "{backlog} accepted order(s) still unpersisted after {}s; the sale's Redis keys stay in place",
                    ctx.settings.drain_timeout.as_secs()
                ),
            )
            .await;
            clear_with = None;
        }
    }

    if !stop(ctx, ns, &name, Component::Consumer).await? {
        info!("waiting for consumers to stop");
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    if let Some(url) = &clear_with {
        let mut conn = ctx.redis.get(url).await.map_err(|source| Error::Redis {
            sale: id.to_string(),
            source,
        })?;
        let deleted = warm::clear_sale(&mut conn, &id, &skus)
            .await
            .map_err(|source| Error::Redis {
                sale: id.to_string(),
                source,
            })?;
        info!(deleted, "redis keys cleared");
        publish(
            "RedisCleared",
            EventType::Normal,
            format!("deleted {deleted} Redis key(s) of the sale; orders in the database are kept"),
        )
        .await;
    }

    let finalizers = sale
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(sales, sale, finalizers).await?;
    Ok(Action::await_change())
}

fn deletion_age(sale: &FlashSale, now: Timestamp) -> Duration {
    let since = sale
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let age = now.duration_since(since).max(SignedDuration::ZERO);
    Duration::try_from(age).unwrap_or_default()
}

/// Deletes a workload (foreground, so it lasts until its pods are gone); true once it is gone.
async fn stop(ctx: &Context, ns: &str, sale: &str, component: Component) -> Result<bool, Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let name = children::workload_name(sale, component);
    match deployments.delete(&name, &DeleteParams::foreground()).await {
        Ok(either) => Ok(either.is_right()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(true),
        Err(e) => Err(kube_err("delete deployment", format!("{ns}/{name}"))(e)),
    }
}

#[cfg(test)]
mod tests;
