//! The `FlashSale` reconciler: validate, apply the data plane, warm Redis when
//! the clock says so, report status; on deletion stop the data plane, wait for
//! accepted orders to be persisted, then clear the sale's Redis keys.

use std::sync::Arc;
use std::time::Duration;

use dataplane::counters;
use dataplane::spec::{Phase, SaleId, SaleSpec, SpecProblem};
use dataplane::stock::{self, ApplyError};
use dataplane::warm::{self, ProductWarm, WarmError, WarmOutcome};
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{PredicateConfig, WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::children::{self, BuildError, Component, MANAGER};
use crate::clock::Clock;
use crate::conditions::{self, Observed};
use crate::metrics::Metrics;
use crate::order_stores::OrderStores;
use crate::redis_store::{self, RedisConnections};
use crate::resource::{
    API_VERSION, ConsumerStatus, FlashSale, FlashSaleSpec, FlashSaleStatus, GatewayStatus, KIND,
    ProductStatus, SalePhase, SecretKeyRef,
};
use crate::schedule::Schedule;
use crate::served::ServedApis;

mod apply;
mod triggers;
pub use apply::{AppliedCache, Failure, Pdbs};

/// Held on every sale until its data plane is stopped and its Redis keys cleared.
pub const FINALIZER: &str = "flashsale.dev/cleanup";

/// Longest sale name whose children's names and labels stay within the
/// 63-character DNS label limit (`<name>-consumer`).
pub const MAX_NAME_LEN: usize = 54;

/// How the reconciler behaves; the binary fills it from flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The image for gateways and consumers when a sale names none, and
    /// the pull Secrets their pods name.
    pub dataplane: children::PodDefaults,
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
            dataplane: children::PodDefaults {
                image: default_image(),
                image_pull_secrets: Vec::new(),
            },
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
    pub stores: OrderStores,
    pub settings: Settings,
    /// Which optional APIs the server serves (discovered once).
    pub served: ServedApis,
    /// What was last applied per child, so unchanged children are not written.
    pub applied: AppliedCache,
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
    #[error("{count} child object(s) not applied, first {first}")]
    Apply { count: usize, first: Failure },
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
            Self::Apply { .. } => "apply",
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
    // Reconcile for changes that matter only (see `triggers`).
    let (reader, writer) = reflector::store();
    let sale_changes = watcher(sales, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(triggers::sale_change, PredicateConfig::default());
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let deployment_changes = triggers::deployment_changes(
        watcher(Api::<Deployment>::all(ctx.client.clone()), owned).default_backoff(),
    );
    Controller::for_stream(sale_changes, reader)
        .owns_stream(deployment_changes)
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

/// Sets the finalizer list under the operator's field manager; the
/// resourceVersion makes a concurrent change fail (and be retried) instead of
/// being overwritten.
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
            &PatchParams {
                field_manager: Some(MANAGER.to_string()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube_err("set finalizers of", sale.name_any()))
}

/// The longest Event note `events.k8s.io/v1` accepts, in bytes.
const NOTE_MAX: usize = 1024;

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

    fn event(&mut self, type_: EventType, reason: &str, action: &str, mut note: String) {
        // The API refuses a note over 1 kB (a long admission message, say).
        if note.len() > NOTE_MAX {
            let mut end = NOTE_MAX - '…'.len_utf8();
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push('…');
        }
        self.events.push(Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        });
    }

    /// Records the phase; entering a new one says so in an Event whose action
    /// names the transition (the recorder merges Events of equal type, reason
    /// and action into one series that keeps the first note).
    fn enter(&mut self, phase: SalePhase) {
        self.next.phase = Some(phase);
        let before = self.previous.phase;
        if before == Some(phase) {
            return;
        }
        let (note, action) = match before {
            Some(before) => (format!("{before} → {phase}"), format!("{before}To{phase}")),
            None => (phase.to_string(), format!("To{phase}")),
        };
        info!(%note, "phase changed");
        let type_ = match phase {
            SalePhase::Failed => EventType::Warning,
            _ => EventType::Normal,
        };
        self.event(type_, &phase.to_string(), &action, note);
    }

    /// Ready=False naming every child the server refused, and a Warning Event
    /// per refusal the Ready condition did not already name.
    fn apply_failures(&mut self, failures: &[Failure]) {
        if failures.is_empty() {
            return;
        }
        let said = conditions::find(&self.previous.conditions, conditions::READY)
            .filter(|c| c.status == "False" && c.reason == conditions::APPLY_FAILED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let lines: Vec<String> = failures.iter().map(Failure::to_string).collect();
        for (failure, line) in failures.iter().zip(&lines) {
            if !said.contains(line.as_str()) {
                let action = format!("Apply{}", failure.kind);
                self.event(
                    EventType::Warning,
                    conditions::APPLY_FAILED,
                    &action,
                    line.clone(),
                );
            }
        }
        self.condition(Observed::new(
            conditions::READY,
            false,
            conditions::APPLY_FAILED,
            format!("cannot apply {}", lines.join("; cannot apply ")),
        ));
    }

    /// The PodDisruptionBudgets condition, and a Warning Event when the server
    /// turns out not to serve them.
    fn pdbs(&mut self, pdbs: Pdbs) {
        let observed = match pdbs {
            Pdbs::Applied => Observed::new(
                conditions::POD_DISRUPTION_BUDGETS,
                true,
                "Applied",
                "gateway and consumer PodDisruptionBudgets applied",
            ),
            Pdbs::Unsupported => Observed::new(
                conditions::POD_DISRUPTION_BUDGETS,
                false,
                "APIUnavailable",
                format!(
                    "the API server does not serve {} (Kubernetes 1.21+): no PodDisruptionBudgets are made, so a node drain may evict several gateway or consumer pods at once",
                    crate::served::PDB_API
                ),
            ),
            Pdbs::Failed => Observed::new(
                conditions::POD_DISRUPTION_BUDGETS,
                false,
                conditions::APPLY_FAILED,
                "see the Ready condition",
            ),
        };
        let before = conditions::find(
            &self.previous.conditions,
            conditions::POD_DISRUPTION_BUDGETS,
        );
        let new = before.is_none_or(|c| c.reason != observed.reason);
        if new && pdbs == Pdbs::Unsupported {
            self.event(
                EventType::Warning,
                "APIUnavailable",
                "ApplyPodDisruptionBudget",
                observed.message.clone(),
            );
        }
        self.condition(observed);
    }

    /// Redis does not hold the spec of this generation, for `reason`: both
    /// `RedisWarmed` and `Ready` say so.
    fn not_warmed(&mut self, reason: &str, message: String) {
        self.condition(Observed::new(
            conditions::REDIS_WARMED,
            false,
            reason,
            message.clone(),
        ));
        self.not_ready(reason, message);
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
    if !is_dns1035_label(&name) {
        problems.push(SpecProblem {
            reason: "InvalidName",
            message: format!(
                "name {name:?} must start with a letter and hold only lowercase letters, digits and '-': its Services are named after it, and a Service name is a DNS-1035 label"
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

/// `[a-z]([-a-z0-9]*[a-z0-9])?`, what a Service's name must be; a FlashSale's
/// own name may also start with a digit or hold dots (a DNS-1123 subdomain).
fn is_dns1035_label(name: &str) -> bool {
    let b = name.as_bytes();
    b.first().is_some_and(u8::is_ascii_lowercase)
        && b.last()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Where a sale's Redis and order database are.
struct SaleUrls {
    redis: String,
    database: String,
}

/// Reads the Secrets a sale needs (three, four with a payment key); returns
/// the Redis and database URLs, or what is missing.
async fn read_secrets(
    ctx: &Context,
    ns: &str,
    spec: &FlashSaleSpec,
) -> Result<Result<SaleUrls, Vec<String>>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut missing = Vec::new();
    let mut redis_url = None;
    let mut database_url = None;
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
            Ok(value) if what == "database" => database_url = Some(value),
            Ok(_) => {}
            Err(problem) => missing.push(problem),
        }
    }
    Ok(match (redis_url, database_url) {
        (Some(redis), Some(database)) if missing.is_empty() => Ok(SaleUrls { redis, database }),
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

fn available(d: Option<&Deployment>) -> i32 {
    d.and_then(|d| d.status.as_ref())
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

fn availability(type_: &'static str, what: &str, d: Option<&Deployment>) -> Observed {
    let n = available(d);
    if d.is_none() {
        Observed::new(
            type_,
            false,
            "NotApplied",
            format!("the {what} Deployment is not applied"),
        )
    } else if n > 0 {
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

    // A warmed sale is running: a spec it cannot take leaves it as it was.
    let warmed_before = report.previous.warmed_generation.is_some();
    let problems = spec_problems(sale);
    if let Some(first) = problems.first()
        && !warmed_before
    {
        let message = problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        info!(reason = first.reason, %message, "spec cannot run");
        report.enter(SalePhase::Failed);
        report.not_ready(first.reason, message);
        report.publish(ctx, sales).await?;
        // A spec edit is the only way out: it triggers a reconcile.
        return Ok(Action::await_change());
    }

    let urls = match read_secrets(ctx, ns, &sale.spec).await? {
        Ok(urls) => urls,
        Err(missing) => {
            let message = missing.join("; ");
            info!(%message, "secrets missing");
            // A warmed sale is selling on pods that already hold the values:
            // it keeps the clock's phase, so the autoscaler keeps scaling it
            // and the alerts on a live sale keep watching; Ready=False says
            // what to fix. Before warming nothing runs yet: Failed.
            report.enter(if warmed_before {
                SalePhase::from(Schedule::at(&sale.spec.sale, now).phase)
            } else {
                SalePhase::Failed
            });
            report.not_ready("SecretMissing", message);
            report.publish(ctx, sales).await?;
            // Secrets are not watched: look again after a while.
            return Ok(Action::requeue(ctx.settings.retry));
        }
    };

    // The first warm waits for the warmup window; later generations apply
    // whenever they come (an edit of an ended sale too, so its refusal or
    // its reopening is decided by the same rules).
    let new_phase = Schedule::at(&sale.spec.sale, now).phase;
    let live_by_new = matches!(new_phase, Phase::Warming | Phase::Active);
    let generation = sale.metadata.generation;
    let apply_now =
        report.previous.warmed_generation != generation && (warmed_before || live_by_new);
    let mut retry: Option<Duration> = None;
    let mut sync_events = 0..0;
    let spec = if warmed_before || apply_now {
        let before = report.events.len();
        let synced = sync_stores(sale, ctx, &urls, apply_now, problems, &mut report).await?;
        sync_events = before..report.events.len();
        retry = synced.retry;
        synced.spec
    } else {
        let spec = &sale.spec.sale;
        report.next.products = spec
            .products
            .iter()
            .map(|p| ProductStatus {
                sku: p.sku.clone(),
                stock: p.stock,
                remaining: p.stock,
                ..Default::default()
            })
            .collect();
        let (reason, message) = match new_phase {
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
        spec.clone()
    };

    let children = children::build(sale, &spec, &ctx.settings.dataplane)?;
    let applied = apply::children(ctx, ns, &children).await;
    debug!(
        writes = applied.writes,
        refused = applied.failures.len(),
        "children applied"
    );
    let gateway = applied.gateway.as_ref();
    let consumer = applied.consumer.as_ref();
    report.next.gateway = Some(GatewayStatus {
        available_replicas: Some(available(gateway)),
        ..Default::default()
    });
    report.next.consumer = Some(ConsumerStatus {
        available_replicas: Some(available(consumer)),
        ..Default::default()
    });
    report.apply_failures(&applied.failures);
    report.pdbs(applied.pdbs);
    report.condition(availability(
        conditions::GATEWAY_AVAILABLE,
        "gateway",
        gateway,
    ));
    report.condition(availability(
        conditions::CONSUMERS_AVAILABLE,
        "consumer",
        consumer,
    ));

    let schedule = Schedule::at(&spec, now);
    report.enter(SalePhase::from(schedule.phase));
    // What warming did is told after the phase it happens in.
    let warmed: Vec<Event> = report.events.drain(sync_events).collect();
    report.events.extend(warmed);

    let live = matches!(schedule.phase, Phase::Warming | Phase::Active);
    report.next.remaining = Some(report.next.products.iter().map(|p| p.remaining).sum());

    let ready_set = report.observed.iter().any(|o| o.type_ == conditions::READY);
    if !ready_set {
        if live && available(gateway) == 0 {
            report.not_ready(
                "GatewayUnavailable",
                "the sale is live and no gateway pod is available".to_string(),
            );
        } else if live && available(consumer) == 0 {
            // Gateways still answer 202, but nothing persists the orders:
            // they wait in Redis, which a Redis without AOF could lose.
            report.not_ready(
                "ConsumerUnavailable",
                "the sale is live and no consumer pod is available: accepted orders wait in Redis, unpersisted".to_string(),
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
    if let Some(first) = applied.failures.first() {
        // Counted and retried like any failed reconcile; status already says what.
        return Err(Error::Apply {
            count: applied.failures.len(),
            first: first.clone(),
        });
    }

    let after = schedule.requeue_after(now, ctx.settings.refresh);
    Ok(match (after, retry) {
        (Some(d), Some(r)) => Action::requeue(d.min(r)),
        (None, Some(r)) => Action::requeue(r),
        (Some(d), None) => Action::requeue(d),
        (None, None) => Action::await_change(),
    })
}

/// How soon an edit refused because another apply of the sale held its
/// lock is tried again.
const APPLY_BUSY_RETRY: Duration = Duration::from_secs(2);

/// What `sync_stores` decided.
struct Synced {
    /// The spec the sale runs on: the new one, or the one applied before
    /// when the new one cannot apply to the running sale.
    spec: SaleSpec,
    /// Redis or PostgreSQL needs another look, after this long at most.
    retry: Option<Duration>,
}

/// Applies the spec to PostgreSQL and Redis (when `apply_now`) through
/// `dataplane::stock` — raises to PostgreSQL first, cuts to Redis first, the
/// settings published for running pods — and reads the counters into the
/// report. `problems` are the new spec's own; with any, or when the running
/// sale refuses the change, nothing changes and the sale keeps running on the
/// spec it had, which is said in `Ready=False` and a Warning event.
async fn sync_stores(
    sale: &FlashSale,
    ctx: &Context,
    urls: &SaleUrls,
    apply_now: bool,
    problems: Vec<SpecProblem>,
    report: &mut Report<'_>,
) -> Result<Synced, Error> {
    let id = SaleId::new(sale.namespace().unwrap_or_default(), sale.name_any());
    let new = &sale.spec.sale;
    let generation = sale.metadata.generation;
    // Until a warmed sale's new spec applies, its pods keep the one they run.
    let edited = report
        .previous
        .warmed_generation
        .is_some_and(|w| Some(w) != generation);
    let held = |running: Option<SaleSpec>| in_force(ctx, sale, edited, running);
    let trouble = |spec: SaleSpec| Synced {
        spec,
        retry: Some(ctx.settings.retry),
    };
    let mut conn = match ctx.redis.for_sale(&sale.spec.redis, &urls.redis).await {
        Ok(c) => c,
        Err(e) => {
            redis_unavailable(report, &e);
            return Ok(trouble(held(None).await?));
        }
    };
    let running = match dataplane::live::read(&mut conn, &id).await {
        Ok(live) => live.map(|l| l.spec),
        Err(dataplane::live::LiveError::Redis(e)) => {
            redis_unavailable(report, &e);
            return Ok(trouble(held(None).await?));
        }
        // Unreadable: the next apply publishes a fresh one.
        Err(e) => {
            warn!(error = %e, "published spec unreadable");
            None
        }
    };
    let store = match ctx.stores.get(&urls.database).await {
        Ok(s) => Some(s),
        Err(e) => {
            database_unavailable(report, &e);
            None
        }
    };
    let mut refused = (!problems.is_empty()).then_some(problems);
    if refused.is_none() && apply_now {
        let Some(store) = &store else {
            return Ok(trouble(held(running.clone()).await?));
        };
        match stock::apply(&mut conn, store, &id, new, report.now).await {
            Ok(applied) => {
                report.next.warmed_generation = generation;
                warm_events(report, &applied.products, generation);
            }
            Err(ApplyError::Refused(p)) => refused = Some(p),
            Err(ApplyError::Redis(e) | ApplyError::Warm(WarmError::Redis(e))) => {
                redis_unavailable(report, &e);
                return Ok(trouble(held(running.clone()).await?));
            }
            Err(ApplyError::Live(dataplane::live::LiveError::Redis(e))) => {
                redis_unavailable(report, &e);
                return Ok(trouble(held(running.clone()).await?));
            }
            Err(ApplyError::Store(e)) => {
                database_unavailable(report, &e);
                return Ok(trouble(held(running.clone()).await?));
            }
            Err(e @ ApplyError::Busy { .. }) => {
                report.not_warmed("ApplyInProgress", e.to_string());
                // Another apply takes milliseconds (or its lock lapses).
                return Ok(Synced {
                    spec: held(running.clone()).await?,
                    retry: Some(APPLY_BUSY_RETRY.min(ctx.settings.retry)),
                });
            }
            Err(e) => {
                let message = e.to_string();
                warn!(%message, "applying the spec failed");
                report.not_warmed("WarmFailed", message);
                return Ok(trouble(held(running.clone()).await?));
            }
        }
    }
    let spec = match &refused {
        None => new.clone(),
        // Redis may have lost the published spec with the rest of the sale:
        // then the pods keep what their ConfigMap holds, not the refused edit.
        Some(_) => held(running.clone()).await?,
    };

    let counters = match counters::product_counters(&mut conn, &id, &spec).await {
        Ok(c) => c,
        Err(e) => {
            redis_unavailable(report, &e);
            return Ok(trouble(spec));
        }
    };
    let inventory = match &store {
        Some(store) => store.inventory(&id).await.unwrap_or_else(|e| {
            warn!(error = %e, "inventory not read");
            Vec::new()
        }),
        None => Vec::new(),
    };
    report.next.products = spec
        .products
        .iter()
        .zip(&counters)
        .map(|(p, c)| {
            let database_stock = inventory
                .iter()
                .find(|row| row.sku == p.sku)
                .map(|row| row.stock);
            match c {
                Some(c) => ProductStatus::from_counters(c, database_stock),
                None => ProductStatus {
                    sku: p.sku.clone(),
                    stock: p.stock,
                    database_stock,
                    ..Default::default()
                },
            }
        })
        .collect();
    if let Some(problems) = refused {
        let reason = problems.first().map_or("SpecRefused", |p| p.reason);
        let running_from = report.previous.warmed_generation.unwrap_or_default();
        let message = format!(
            "{}; nothing changed: the sale keeps running on generation {running_from}'s settings",
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
        info!(reason, %message, "spec change refused");
        report.not_warmed(reason, message);
        // Lost keys are looked at again soon (a person may restore them);
        // an edit's own problems wait for the next edit.
        let lost = problems.iter().any(|p| p.reason == "StockMissing");
        return Ok(Synced {
            spec,
            retry: lost.then_some(ctx.settings.retry),
        });
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
        Ok(Synced {
            spec,
            retry: store.is_none().then_some(ctx.settings.retry),
        })
    } else {
        // Redis lost keys it had (a restart without AOF?): re-warming would
        // sell stock twice, so a person decides.
        let message = format!(
            "Redis has no stock for {} although it was warmed; check Redis persistence, then restore Redis from its AOF/RDB or rebuild the products from PostgreSQL with `flashsale warm --restore`",
            missing.join(", ")
        );
        report.not_warmed("StockMissing", message);
        Ok(Synced {
            spec,
            retry: Some(ctx.settings.retry),
        })
    }
}

/// The spec a sale's data plane runs on while its own cannot apply: the one
/// Redis published (`running`), else, when the sale was warmed and `edited`
/// since, the one its ConfigMap holds; else the sale's own. A ConfigMap that
/// cannot be read fails the reconcile (retried), so its children stay as
/// they are rather than take the unapplied edit.
async fn in_force(
    ctx: &Context,
    sale: &FlashSale,
    edited: bool,
    running: Option<SaleSpec>,
) -> Result<SaleSpec, Error> {
    if let Some(running) = running {
        return Ok(running);
    }
    if edited && let Some(deployed) = deployed_spec(ctx, sale).await? {
        return Ok(deployed);
    }
    Ok(sale.spec.sale.clone())
}

/// The spec in the sale's ConfigMap, the one its pods run; `None` if there
/// is none yet (or its document does not parse: written by another version).
async fn deployed_spec(ctx: &Context, sale: &FlashSale) -> Result<Option<SaleSpec>, Error> {
    let ns = sale.namespace().unwrap_or_default();
    let name = children::config_map_name(&sale.name_any());
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let map = maps.get_opt(&name).await.map_err(|source| Error::Kube {
        action: "read",
        object: format!("ConfigMap {ns}/{name}"),
        source,
    })?;
    let Some(document) = map.and_then(|m| m.data?.remove(children::CONFIG_KEY)) else {
        return Ok(None);
    };
    match dataplane::spec::SaleDocument::parse(&document, "ConfigMap") {
        Ok(doc) => Ok(Some(doc.spec)),
        Err(e) => {
            warn!(error = %e, "the sale's ConfigMap does not parse");
            Ok(None)
        }
    }
}

fn database_unavailable(report: &mut Report<'_>, e: &dataplane::store::StoreError) {
    let message = format!("cannot reach the order database: {e}");
    warn!(error = %e, "database unavailable");
    report.not_ready("DatabaseUnavailable", message);
}

fn redis_unavailable(report: &mut Report<'_>, e: &redis::RedisError) {
    let message = format!("cannot reach Redis: {e}");
    warn!(error = %e, "redis unavailable");
    report.not_warmed("RedisUnavailable", message);
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
    let redis_error = |source| Error::Redis {
        sale: id.to_string(),
        source,
    };
    // Until the drain timeout, a Redis that cannot be read or cleared is
    // waited for like a backlog; after it the keys are left for a person
    // (RedisNotCleared), so a sale whose Redis is gone can still be deleted.
    let waited = deletion_age(sale, ctx.clock.now());
    let in_time = waited < ctx.settings.drain_timeout;
    let gave_up = |why: String| {
        format!(
            "{why} after {}s; the sale's Redis keys stay in place",
            ctx.settings.drain_timeout.as_secs()
        )
    };
    if let Some(url) = &clear_with {
        let backlog = async {
            let mut conn = ctx.redis.for_sale(&sale.spec.redis, url).await?;
            redis_store::unpersisted(&mut conn, &id, &sale.spec.sale).await
        }
        .await;
        match backlog {
            Ok(0) => {}
            Ok(backlog) if in_time => {
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
            Ok(backlog) => {
                let why = format!("{backlog} accepted order(s) still unpersisted");
                publish("RedisNotCleared", EventType::Warning, gave_up(why)).await;
                clear_with = None;
            }
            Err(e) if in_time => return Err(redis_error(e)),
            Err(e) => {
                let why = format!("Redis unreachable ({e})");
                publish("RedisNotCleared", EventType::Warning, gave_up(why)).await;
                clear_with = None;
            }
        }
    }

    if !stop(ctx, ns, &name, Component::Consumer).await? {
        info!("waiting for consumers to stop");
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    if let Some(url) = &clear_with {
        let cleared = async {
            let mut conn = ctx.redis.for_sale(&sale.spec.redis, url).await?;
            warm::clear_sale(&mut conn, &id, &skus).await
        }
        .await;
        match cleared {
            Ok(deleted) => {
                info!(deleted, "redis keys cleared");
                let note = format!(
                    "deleted {deleted} Redis key(s) of the sale; orders in the database are kept"
                );
                publish("RedisCleared", EventType::Normal, note).await;
            }
            Err(e) if in_time => return Err(redis_error(e)),
            Err(e) => {
                let why = format!("Redis unreachable ({e})");
                publish("RedisNotCleared", EventType::Warning, gave_up(why)).await;
            }
        }
    }

    let finalizers = sale
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(sales, sale, finalizers).await?;
    ctx.applied.forget_sale(ns, &name);
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
