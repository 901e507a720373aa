//! The reconciler against a mocked API server (every request asserted in
//! order) and, where Redis is involved, a real throwaway `redis-server`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dataplane::keys::ProductKeys;
use dataplane::tools::servers::{PostgresServer, RedisServer};
use http::Method;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use super::*;
use crate::clock::ManualClock;
use crate::fixtures::{self, ApiServer};
use crate::served::ServedApis;

const SALE: &str = "/apis/flashsale.dev/v1alpha1/namespaces/shop/flashsales/singles-day";
const APPLY: &str = "?&force=true&fieldManager=flashsale-operator";
/// The finalizer merge patch, under the operator's field manager.
const FINALIZERS: &str = "?&fieldManager=flashsale-operator";

/// The six children in apply order: (path, is a Deployment).
const CHILDREN: [(&str, bool); 6] = [
    (
        "/api/v1/namespaces/shop/configmaps/singles-day-dataplane",
        false,
    ),
    (
        "/apis/apps/v1/namespaces/shop/deployments/singles-day-gateway",
        true,
    ),
    (
        "/api/v1/namespaces/shop/services/singles-day-gateway",
        false,
    ),
    (
        "/apis/apps/v1/namespaces/shop/deployments/singles-day-consumer",
        true,
    ),
    (
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/singles-day-gateway",
        false,
    ),
    (
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/singles-day-consumer",
        false,
    ),
];

/// The `RedisWarmed` event's note for the fixture sale's first warming.
const WARMED_NOTE: &str = "phone-17: 1000 units; earbuds-pro: 3000 units; charger-65w: 500 units";

/// Which children a reconcile writes (indexes into [`CHILDREN`]).
const ALL: &[usize] = &[0, 1, 2, 3, 4, 5];
/// None: everything is as this process last applied it.
const NONE: &[usize] = &[];
/// A change of a live sale setting (stock, limits, window): the ConfigMap
/// only; the pod templates, and so the pods, stay as they are.
const CONFIG: &[usize] = &[0];

fn at(base: Timestamp, secs: i64) -> Timestamp {
    base.checked_add(SignedDuration::from_secs(secs))
        .unwrap_or(Timestamp::MAX)
}

fn run(sale: &FlashSale, ctx: &Arc<Context>) -> tokio::task::JoinHandle<Result<Action, Error>> {
    tokio::spawn(reconcile(Arc::new(sale.clone()), ctx.clone()))
}

async fn finish(task: tokio::task::JoinHandle<Result<Action, Error>>) -> anyhow::Result<Action> {
    let joined = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .context("reconcile did not finish")?;
    Ok(joined.context("reconcile panicked")??)
}

/// Where a test's sale finds Redis and PostgreSQL (its Secrets' values).
struct Urls {
    redis: String,
    database: String,
}

impl Urls {
    /// For reconciles that never reach Redis or PostgreSQL.
    fn unused() -> Self {
        Self {
            redis: "redis://unused:6379".into(),
            database: "postgres://orders@unused/orders".into(),
        }
    }
}

/// A real Redis and PostgreSQL of the test's own: warming applies stock to
/// PostgreSQL before Redis sells it.
struct Stores {
    redis: RedisServer,
    pg: PostgresServer,
}

impl Stores {
    fn start() -> anyhow::Result<Self> {
        Ok(Self {
            redis: RedisServer::start()?,
            pg: PostgresServer::start()?,
        })
    }

    fn urls(&self) -> Urls {
        Urls {
            redis: self.redis.url(),
            database: self.pg.url(),
        }
    }
}

/// Answers the three Secret reads.
async fn serve_secrets(server: &mut ApiServer, urls: &Urls) {
    for (name, key, value) in [
        ("redis", "url", urls.redis.as_str()),
        ("orders-db", "url", urls.database.as_str()),
        ("shop-login", "hmac-secret", "s3cret"),
    ] {
        server
            .expect(
                Method::GET,
                &format!("/api/v1/namespaces/shop/secrets/{name}"),
            )
            .await
            .respond(200, &fixtures::secret(name, key, value));
    }
}

/// Answers the Secret reads and the applies of a reconcile that gets that far:
/// the children in `written` are applied, the other Deployments read (for
/// their status); Deployments come back with `available` pods. Returns the
/// applied bodies.
async fn serve_children(
    server: &mut ApiServer,
    urls: &Urls,
    available: i32,
    written: &[usize],
) -> Vec<Value> {
    serve_children_refusing(server, urls, available, written, None).await
}

/// [`serve_children`], with the apply of child `refused` answered by an error.
async fn serve_children_refusing(
    server: &mut ApiServer,
    urls: &Urls,
    available: i32,
    written: &[usize],
    refused: Option<(usize, u16, &Value)>,
) -> Vec<Value> {
    serve_secrets(server, urls).await;
    serve_applies(server, available, written, refused).await
}

/// The applies (and Deployment reads) of [`serve_children_refusing`], after
/// its Secret reads.
async fn serve_applies(
    server: &mut ApiServer,
    available: i32,
    written: &[usize],
    refused: Option<(usize, u16, &Value)>,
) -> Vec<Value> {
    serve_applies_with(server, &|_| available, written, refused).await
}

/// [`serve_applies`], each Deployment (by its index in `CHILDREN`) with
/// `available(i)` pods available.
async fn serve_applies_with(
    server: &mut ApiServer,
    available: &dyn Fn(usize) -> i32,
    written: &[usize],
    refused: Option<(usize, u16, &Value)>,
) -> Vec<Value> {
    let mut applied = Vec::new();
    for (i, (path, is_deployment)) in CHILDREN.into_iter().enumerate() {
        let n = available(i);
        let with_status = |mut body: Value| {
            body["status"] = json!({ "availableReplicas": n, "replicas": n });
            body
        };
        if written.contains(&i) {
            let call = server
                .expect(Method::PATCH, &format!("{path}{APPLY}"))
                .await;
            applied.push(call.body.clone());
            if let Some((_, code, error)) = refused.filter(|(r, _, _)| *r == i) {
                call.respond(code, error);
            } else if is_deployment {
                let body = with_status(call.body.clone());
                call.respond(200, &body);
            } else {
                call.echo();
            }
        } else if is_deployment {
            let name = path.rsplit('/').next().unwrap_or_default();
            server
                .expect(Method::GET, path)
                .await
                .respond(200, &with_status(deployment(name)));
        }
    }
    applied
}

/// A Deployment as the server would have it (only what status reads).
fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {}, "template": {}}
    })
}

/// Takes the status patch, checks its envelope, answers with the updated
/// object and stores the status on `sale` as the server would.
async fn serve_status(server: &mut ApiServer, sale: &mut FlashSale) -> anyhow::Result<Value> {
    let call = server
        .expect(Method::PATCH, &format!("{SALE}/status{APPLY}"))
        .await;
    assert_eq!(call.body["apiVersion"], json!("flashsale.dev/v1alpha1"));
    assert_eq!(call.body["kind"], json!("FlashSale"));
    let status = call.body["status"].clone();
    sale.status = Some(serde_json::from_value(status.clone())?);
    call.respond(200, &serde_json::to_value(&*sale)?);
    Ok(status)
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == json!(type_)).cloned())
        .unwrap_or(Value::Null)
}

/// A sale whose window is open now by the real clock (the purchase script
/// checks the window against Redis' own clock).
fn live_sale(now: Timestamp) -> FlashSale {
    let mut sale = fixtures::sale_with_finalizer();
    sale.spec.sale.start_time = at(now, -60);
    sale.spec.sale.end_time = at(now, 3600);
    sale
}

async fn redis_conn(server: &RedisServer) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(server.url())?;
    Ok(ConnectionManager::new(client).await?)
}

/// `n` buyers take one unit each of `sku` through the gateway's purchase script.
async fn buy(conn: &mut ConnectionManager, sku: &str, n: usize) -> anyhow::Result<()> {
    let keys = ProductKeys::new(&SaleId::new("shop", "singles-day"), sku);
    for i in 0..n {
        let answer: dataplane::scripts::PurchaseAnswer = dataplane::scripts::Purchase {
            keys: &keys.purchase_keys(),
            user: &format!("user-{i}"),
            quantity: 1,
            order_id: &format!("order-{sku}-{i}"),
            idempotency_field: "",
            ticket: None,
        }
        .invocation()
        .invoke_async(conn)
        .await?;
        assert!(
            matches!(answer, dataplane::scripts::PurchaseAnswer::Accepted { .. }),
            "purchase {i} of {sku}: {answer:?}"
        );
    }
    Ok(())
}

async fn remaining(conn: &mut ConnectionManager, sku: &str) -> anyhow::Result<i64> {
    let keys = ProductKeys::new(&SaleId::new("shop", "singles-day"), sku);
    Ok(redis::cmd("GET")
        .arg(keys.stock())
        .query_async(conn)
        .await?)
}

#[tokio::test]
async fn first_reconcile_adds_the_finalizer_applies_children_and_reports_status()
-> anyhow::Result<()> {
    let sale = fixtures::sale();
    let now = at(sale.spec.sale.start_time, -3600);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    let task = run(&sale, &ctx);

    let call = server
        .expect(Method::PATCH, &format!("{SALE}{FINALIZERS}"))
        .await;
    assert_eq!(
        call.body,
        json!({"metadata": {"finalizers": ["flashsale.dev/cleanup"], "resourceVersion": "100"}})
    );
    let mut stored = fixtures::sale_with_finalizer();
    call.respond(200, &serde_json::to_value(&stored)?);

    let applied = serve_children(&mut server, &Urls::unused(), 0, ALL).await;
    let [
        config_map,
        gateway,
        service,
        consumer,
        gateway_pdb,
        consumer_pdb,
    ] = &applied[..]
    else {
        panic!("six children");
    };
    let owner = json!([{
        "apiVersion": "flashsale.dev/v1alpha1", "kind": "FlashSale", "name": "singles-day",
        "uid": "0b5a1c1e-0000-4000-8000-000000000001",
        "controller": true
    }]);
    for child in &applied {
        assert_eq!(child["metadata"]["ownerReferences"], owner, "{child}");
        assert_eq!(child["metadata"]["namespace"], json!("shop"));
    }
    let document = config_map["data"]["sale.yaml"].as_str().unwrap_or_default();
    let parsed = dataplane::spec::SaleDocument::parse(document, "ConfigMap")?;
    assert_eq!(parsed.id(), SaleId::new("shop", "singles-day"));
    assert_eq!(parsed.spec, sale.spec.sale);

    for (deployment, component, env) in [
        (
            gateway,
            "gateway",
            ["REDIS_URL", "TOKEN_SECRET", "POD_NAME"],
        ),
        (
            consumer,
            "consumer",
            ["REDIS_URL", "DATABASE_URL", "POD_NAME"],
        ),
    ] {
        assert!(deployment["spec"].get("replicas").is_none(), "{deployment}");
        let pod = &deployment["spec"]["template"];
        assert!(pod["metadata"]["annotations"]["flashsale.dev/products-checksum"].is_string());
        let container = &pod["spec"]["containers"][0];
        assert_eq!(
            container["image"],
            json!("ghcr.io/flashsale/dataplane:test")
        );
        assert_eq!(
            container["args"],
            json!([component, "--config", "/etc/flashsale/sale.yaml"])
        );
        let names: Vec<&str> = container["env"]
            .as_array()
            .map(|e| e.iter().filter_map(|v| v["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, env);
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"],
            json!(true)
        );
    }
    assert_eq!(
        gateway["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"],
        json!({"secretKeyRef": {"name": "redis", "key": "url", "optional": false}})
    );
    assert_eq!(
        service["spec"]["ports"],
        json!([
            {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"},
            {"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP"}
        ])
    );
    for (pdb, component) in [(gateway_pdb, "gateway"), (consumer_pdb, "consumer")] {
        assert_eq!(pdb["spec"]["maxUnavailable"], json!(1));
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            json!({"app.kubernetes.io/instance": "singles-day", "app.kubernetes.io/component": component})
        );
    }

    let status = serve_status(&mut server, &mut stored).await?;
    let since = "2026-11-10T23:00:00Z";
    let product = |sku: &str, stock: i64| json!({"sku": sku, "stock": stock, "remaining": stock, "sold": 0, "persisted": 0, "paid": 0, "cancelled": 0, "failed": 0});
    assert_eq!(
        status,
        json!({
            "phase": "Pending",
            "observedGeneration": 1,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Reconciled",
                 "message": "warming starts at 2026-11-10T23:55:00Z",
                 "observedGeneration": 1, "lastTransitionTime": since},
                {"type": "RedisWarmed", "status": "False", "reason": "NotYetWarming",
                 "message": "warming starts at 2026-11-10T23:55:00Z",
                 "observedGeneration": 1, "lastTransitionTime": since},
                {"type": "GatewayAvailable", "status": "False", "reason": "NoPodsAvailable",
                 "message": "no gateway pod is available yet",
                 "observedGeneration": 1, "lastTransitionTime": since},
                {"type": "ConsumersAvailable", "status": "False", "reason": "NoPodsAvailable",
                 "message": "no consumer pod is available yet",
                 "observedGeneration": 1, "lastTransitionTime": since},
                {"type": "PodDisruptionBudgets", "status": "True", "reason": "Applied",
                 "message": "gateway and consumer PodDisruptionBudgets applied",
                 "observedGeneration": 1, "lastTransitionTime": since}
            ],
            "remaining": 4500,
            "products": [product("phone-17", 1000), product("earbuds-pro", 3000), product("charger-65w", 500)],
            "gateway": {"availableReplicas": 0},
            "consumer": {"availableReplicas": 0}
        })
    );
    server.expect_event("Normal", "Pending", "Pending").await;

    // Pending: requeued exactly for warmup start (55 minutes away).
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(55 * 60))
    );
    Ok(())
}

#[tokio::test]
async fn a_second_reconcile_changes_nothing() -> anyhow::Result<()> {
    let mut sale = fixtures::sale_with_finalizer();
    let now = at(sale.spec.sale.start_time, -3600);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));

    let task = run(&sale, &ctx);
    let first = serve_children(&mut server, &Urls::unused(), 0, ALL).await;
    assert_eq!(first.len(), 6);
    serve_status(&mut server, &mut sale).await?;
    server.expect_event("Normal", "Pending", "Pending").await;
    let first_action = finish(task).await?;

    // Same object, same clock: no child written (the Deployments are read for
    // their status), no status write, no event.
    let task = run(&sale, &ctx);
    let second = serve_children(&mut server, &Urls::unused(), 0, NONE).await;
    assert_eq!(second, Vec::<Value>::new());
    assert_eq!(finish(task).await?, first_action);

    // A Deployment someone deleted is applied again at once.
    let task = run(&sale, &ctx);
    serve_secrets(&mut server, &Urls::unused()).await;
    let (gateway, _) = CHILDREN[1];
    server.expect(Method::GET, gateway).await.respond(
        404,
        &fixtures::not_found("deployments \"singles-day-gateway\""),
    );
    server
        .expect(Method::PATCH, &format!("{gateway}{APPLY}"))
        .await
        .echo();
    let (consumer, _) = CHILDREN[3];
    server
        .expect(Method::GET, consumer)
        .await
        .respond(200, &deployment("singles-day-consumer"));
    assert_eq!(finish(task).await?, first_action);
    Ok(())
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_creates_nothing() -> anyhow::Result<()> {
    let mut sale = fixtures::sale_with_finalizer();
    sale.spec.sale.end_time = sale.spec.sale.start_time;
    let now = at(sale.spec.sale.start_time, -3600);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));

    let task = run(&sale, &ctx);
    let status = serve_status(&mut server, &mut sale).await?;
    let message = "endTime 2026-11-11T00:00:00Z is not after startTime 2026-11-11T00:00:00Z";
    assert_eq!(
        status,
        json!({
            "phase": "Failed",
            "observedGeneration": 1,
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "EndBeforeStart",
                "message": message, "observedGeneration": 1,
                "lastTransitionTime": "2026-11-10T23:00:00Z"
            }]
        })
    );
    server.expect_event("Warning", "Failed", "Failed").await;
    server
        .expect_event("Warning", "EndBeforeStart", message)
        .await;
    // Nothing else: no Secret read, no child applied; only an edit helps.
    assert_eq!(finish(task).await?, Action::await_change());
    Ok(())
}

/// A FlashSale may be named `11-11-sale` or `double11.2026`, but its Services
/// could not be: a spec problem, so the sale is refused (`Failed`) before
/// anything is warmed or applied, as `an_invalid_spec_is_reported_and_creates_nothing` shows.
#[test]
fn a_name_no_service_can_take_is_a_spec_problem() {
    for name in ["11-11-sale", "double11.2026"] {
        let mut sale = fixtures::sale_with_finalizer();
        sale.metadata.name = Some(name.to_string());
        let problems = super::spec_problems(&sale);
        assert_eq!(
            problems.iter().map(|p| p.reason).collect::<Vec<_>>(),
            ["InvalidName"],
            "{name}"
        );
        assert!(problems[0].message.contains(name), "{name}");
    }
    assert!(super::spec_problems(&fixtures::sale_with_finalizer()).is_empty());
}

#[test]
fn service_names_follow_dns_1035() {
    for ok in ["a", "singles-day", "sale-2026", "x1"] {
        assert!(super::is_dns1035_label(ok), "{ok}");
    }
    for bad in ["", "1sale", "sale-", "Sale", "double11.2026", "-a", "a_b"] {
        assert!(!super::is_dns1035_label(bad), "{bad}");
    }
}

#[tokio::test]
async fn a_missing_secret_is_reported_and_creates_nothing() -> anyhow::Result<()> {
    let mut sale = fixtures::sale_with_finalizer();
    let now = at(sale.spec.sale.start_time, -3600);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));

    let task = run(&sale, &ctx);
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/redis")
        .await
        .respond(404, &fixtures::not_found("secrets \"redis\""));
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/orders-db")
        .await
        .respond(200, &fixtures::secret("orders-db", "url", "postgres://db"));
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/shop-login")
        .await
        .respond(200, &fixtures::secret("shop-login", "other-key", "x"));
    let status = serve_status(&mut server, &mut sale).await?;
    let message = "Secret shop/redis not found; Secret shop/shop-login has no key \"hmac-secret\"";
    assert_eq!(status["phase"], json!("Failed"));
    assert_eq!(
        condition(&status, "Ready"),
        json!({
            "type": "Ready", "status": "False", "reason": "SecretMissing", "message": message,
            "observedGeneration": 1, "lastTransitionTime": "2026-11-10T23:00:00Z"
        })
    );
    server.expect_event("Warning", "Failed", "Failed").await;
    server
        .expect_event("Warning", "SecretMissing", message)
        .await;
    // Secrets are not watched: look again after the retry pause.
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(30))
    );
    // What the FlashSaleNotReady alert and the sale dashboard read.
    let metrics = ctx.metrics.render()?;
    for line in [
        r#"flashsale_operator_sale_ready{namespace="shop",sale="singles-day"} 0"#,
        r#"flashsale_operator_sale_phase{namespace="shop",sale="singles-day",phase="Failed"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn phases_change_at_their_instants_and_requeue_for_the_next() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let redis_server = &stores.redis;
    let url = stores.urls();
    let mut conn = redis_conn(redis_server).await?;
    let mut sale = fixtures::sale_with_finalizer();
    let spec = sale.spec.sale.clone();
    let warmup = spec.warmup_start();
    let clock = Arc::new(ManualClock::new(
        warmup
            .checked_sub(SignedDuration::from_millis(1))
            .unwrap_or(warmup),
    ));
    let (ctx, mut server) = fixtures::context(clock.clone());

    // 1 ms before warmup: Pending, nothing in Redis, back in exactly 1 ms.
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2, ALL).await;
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(status["phase"], json!("Pending"));
    server.expect_event("Normal", "Pending", "Pending").await;
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_millis(1))
    );
    assert_eq!(remaining(&mut conn, "phone-17").await.ok(), None);

    // At warmup start: Warming, Redis warmed once, counters in status, back
    // after the refresh interval (the sale opens in 300 s).
    clock.set(warmup);
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2, NONE).await;
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(status["phase"], json!("Warming"));
    assert_eq!(status["warmedGeneration"], json!(1));
    assert_eq!(condition(&status, "RedisWarmed")["reason"], json!("Warmed"));
    assert_eq!(
        condition(&status, "Ready")["message"],
        json!("the sale opens at 2026-11-11T00:00:00Z")
    );
    assert_eq!(status["remaining"], json!(4500));
    server
        .expect_event("Normal", "Warming", "Pending → Warming")
        .await;
    server
        .expect_event("Normal", "RedisWarmed", WARMED_NOTE)
        .await;
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(15))
    );
    assert_eq!(remaining(&mut conn, "phone-17").await?, 1000);

    // 5 s before start: nothing changed, back at the opening instant.
    clock.set(at(spec.start_time, -5));
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2, NONE).await;
    assert_eq!(finish(task).await?, Action::requeue(Duration::from_secs(5)));

    // At start: Active; no second warming.
    clock.set(spec.start_time);
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2, NONE).await;
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(status["phase"], json!("Active"));
    assert_eq!(
        condition(&status, "Ready")["message"],
        json!("the sale closes at 2026-11-11T00:30:00Z")
    );
    server
        .expect_event("Normal", "Active", "Warming → Active")
        .await;
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(15))
    );

    // At end: Ended; the counters still move while unpaid orders time out
    // (payment.timeoutSeconds after the end), so it still refreshes.
    clock.set(spec.end_time);
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2, NONE).await;
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(status["phase"], json!("Ended"));
    assert_eq!(
        condition(&status, "Ready")["message"],
        json!("the sale ended at 2026-11-11T00:30:00Z")
    );
    server
        .expect_event("Normal", "Ended", "Active → Ended")
        .await;
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(15))
    );
    Ok(())
}

/// Runs one reconcile of a live sale whose spec changed (a new generation)
/// and returns the status it wrote.
async fn rewarm(
    server: &mut ApiServer,
    ctx: &Arc<Context>,
    sale: &mut FlashSale,
    url: &Urls,
    written: &[usize],
    events: &[(&str, &str, &str)],
) -> anyhow::Result<Value> {
    let task = run(sale, ctx);
    serve_children(server, url, 2, written).await;
    let status = serve_status(server, sale).await?;
    for (type_, reason, note) in events {
        server.expect_event(type_, reason, note).await;
    }
    finish(task).await?;
    Ok(status)
}

fn product(status: &Value, sku: &str) -> Value {
    status["products"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["sku"] == json!(sku)).cloned())
        .unwrap_or(Value::Null)
}

/// Starts a live sale with Redis warmed at generation 1.
async fn warmed_live_sale(stores: &Stores) -> anyhow::Result<(Arc<Context>, ApiServer, FlashSale)> {
    let now = Timestamp::now();
    let mut sale = live_sale(now);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    let status = rewarm(
        &mut server,
        &ctx,
        &mut sale,
        &stores.urls(),
        ALL,
        &[
            ("Normal", "Active", "Active"),
            ("Normal", "RedisWarmed", WARMED_NOTE),
        ],
    )
    .await?;
    assert_eq!(status["warmedGeneration"], json!(1));
    Ok((ctx, server, sale))
}

/// The operator's own connections follow `redis.mode`: a sale on a Redis
/// Cluster is warmed through the seed nodes its Secret lists, and its pods
/// are told the mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_on_a_redis_cluster_is_warmed_through_its_seeds() -> anyhow::Result<()> {
    use dataplane::redis_conn::{ConnSettings, RedisMode, RedisTarget};
    let cluster =
        tokio::task::spawn_blocking(dataplane::tools::servers::RedisCluster::start).await??;
    let pg = PostgresServer::start()?;
    let urls = Urls {
        redis: cluster.url(),
        database: pg.url(),
    };
    let now = Timestamp::now();
    let mut sale = live_sale(now);
    sale.spec.redis.mode = RedisMode::Cluster;
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));

    let task = run(&sale, &ctx);
    let applied = serve_children(&mut server, &urls, 2, ALL).await;
    let status = serve_status(&mut server, &mut sale).await?;
    server.expect_event("Normal", "Active", "Active").await;
    server
        .expect_event("Normal", "RedisWarmed", WARMED_NOTE)
        .await;
    finish(task).await?;
    assert_eq!(status["warmedGeneration"], json!(1));
    assert_eq!(status["remaining"], json!(4500));
    for (i, (_, is_deployment)) in CHILDREN.into_iter().enumerate() {
        if is_deployment {
            let env = &applied[i]["spec"]["template"]["spec"]["containers"][0]["env"];
            let mode = env
                .as_array()
                .and_then(|all| all.iter().find(|e| e["name"] == json!("REDIS_MODE")));
            assert_eq!(mode.map(|e| &e["value"]), Some(&json!("cluster")), "{env}");
        }
    }

    let mut conn = RedisTarget::parse(&cluster.url(), Some(RedisMode::Cluster))?
        .connect(&ConnSettings::default())
        .await?;
    let sale_id = dataplane::spec::SaleId::new("shop", "singles-day");
    for (sku, stock) in [
        ("phone-17", 1000),
        ("earbuds-pro", 3000),
        ("charger-65w", 500),
    ] {
        let remaining: i64 = redis::cmd("GET")
            .arg(ProductKeys::new(&sale_id, sku).stock())
            .query_async(&mut conn)
            .await?;
        assert_eq!(remaining, stock, "{sku}");
    }
    Ok(())
}

/// A live sale whose gateways answer but whose consumers are all down (an
/// unschedulable request, a bad image) is not Ready: its 202s wait in Redis,
/// unpersisted.
#[tokio::test]
async fn a_live_sale_without_a_consumer_is_not_ready() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;
    let (consumer, _) = CHILDREN[3];
    assert!(consumer.ends_with("singles-day-consumer"));

    let task = run(&sale, &ctx);
    serve_secrets(&mut server, &stores.urls()).await;
    serve_applies_with(&mut server, &|i| if i == 3 { 0 } else { 2 }, NONE, None).await;
    let status = serve_status(&mut server, &mut sale).await?;
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("ConsumerUnavailable")),
        "{ready}"
    );
    server
        .expect_event(
            "Warning",
            "ConsumerUnavailable",
            "the sale is live and no consumer pod is available: accepted orders wait in Redis, unpersisted",
        )
        .await;
    finish(task).await?;
    Ok(())
}

#[tokio::test]
async fn warming_twice_leaves_stock_unchanged() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let redis_server = &stores.redis;
    let mut conn = redis_conn(redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;

    // An operator restart or a re-reconcile of the same generation: no warming.
    let task = run(&sale, &ctx);
    serve_children(&mut server, &stores.urls(), 2, NONE).await;
    finish(task).await?;

    // A spec edit that leaves stock alone warms again and changes nothing.
    sale.metadata.generation = Some(2);
    sale.spec.gateway.replicas.max = 60;
    let status = rewarm(&mut server, &ctx, &mut sale, &stores.urls(), NONE, &[]).await?;
    assert_eq!(status["warmedGeneration"], json!(2));
    assert_eq!(remaining(&mut conn, "phone-17").await?, 1000);
    assert_eq!(status["remaining"], json!(4500));
    Ok(())
}

#[tokio::test]
async fn warming_after_30_sales_keeps_what_was_sold() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let redis_server = &stores.redis;
    let mut conn = redis_conn(redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;
    buy(&mut conn, "phone-17", 30).await?;

    sale.metadata.generation = Some(2);
    sale.spec.gateway.replicas.max = 60;
    let status = rewarm(&mut server, &ctx, &mut sale, &stores.urls(), NONE, &[]).await?;
    assert_eq!(remaining(&mut conn, "phone-17").await?, 970);
    assert_eq!(
        product(&status, "phone-17"),
        json!({"sku": "phone-17", "stock": 1000, "databaseStock": 1000, "remaining": 970, "sold": 30, "persisted": 0, "paid": 0, "cancelled": 0, "failed": 0})
    );
    assert_eq!(status["remaining"], json!(4470));
    Ok(())
}

#[tokio::test]
async fn a_stock_raise_mid_sale_adds_the_difference() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let redis_server = &stores.redis;
    let mut conn = redis_conn(redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;
    buy(&mut conn, "phone-17", 30).await?;

    sale.metadata.generation = Some(2);
    sale.spec.sale.products[0].stock = 1500;
    let status = rewarm(
        &mut server,
        &ctx,
        &mut sale,
        &stores.urls(),
        CONFIG,
        &[(
            "Normal",
            "StockChanged",
            "phone-17: stock +500, 1470 remaining",
        )],
    )
    .await?;
    assert_eq!(remaining(&mut conn, "phone-17").await?, 1470);
    assert_eq!(
        product(&status, "phone-17"),
        json!({"sku": "phone-17", "stock": 1500, "databaseStock": 1500, "remaining": 1470, "sold": 30, "persisted": 0, "paid": 0, "cancelled": 0, "failed": 0})
    );
    Ok(())
}

#[tokio::test]
async fn a_stock_cut_below_sold_is_refused_with_a_condition() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let redis_server = &stores.redis;
    let mut conn = redis_conn(redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;
    buy(&mut conn, "phone-17", 30).await?;

    sale.metadata.generation = Some(2);
    sale.spec.sale.products[0].stock = 10;
    let message = "sku phone-17: stock 10 is below the 30 units already sold; nothing changed: the sale keeps running on generation 1's settings";
    let status = rewarm(
        &mut server,
        &ctx,
        &mut sale,
        &stores.urls(),
        NONE,
        &[("Warning", "StockBelowSold", message)],
    )
    .await?;
    assert_eq!(
        condition(&status, "Ready")["reason"],
        json!("StockBelowSold")
    );
    assert_eq!(
        condition(&status, "RedisWarmed")["reason"],
        json!("StockBelowSold")
    );
    // Still warmed from generation 1; nothing in Redis or PostgreSQL moved.
    assert_eq!(status["warmedGeneration"], json!(1));
    assert_eq!(status["phase"], json!("Active"));
    assert_eq!(remaining(&mut conn, "phone-17").await?, 970);
    assert_eq!(
        product(&status, "phone-17"),
        json!({"sku": "phone-17", "stock": 1000, "databaseStock": 1000, "remaining": 970, "sold": 30, "persisted": 0, "paid": 0, "cancelled": 0, "failed": 0})
    );
    Ok(())
}

/// An edit while another apply holds the sale's lock (an operator replica
/// that lost its Lease finishing one): nothing changes, the condition names
/// the holder, and the edit is tried again in seconds, not after the 30 s a
/// Redis outage waits.
#[tokio::test]
async fn an_edit_while_another_apply_holds_the_sale_is_retried_soon() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let mut conn = redis_conn(&stores.redis).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;
    let lock = dataplane::keys::SaleKeys::new(&SaleId::new("shop", "singles-day")).apply_lock();
    redis::cmd("SET")
        .arg(&lock)
        .arg("old-leader/7/x")
        .exec_async(&mut conn)
        .await?;

    sale.metadata.generation = Some(2);
    sale.spec.sale.products[0].stock = 1500;
    let task = run(&sale, &ctx);
    serve_children(&mut server, &stores.urls(), 2, NONE).await;
    let status = serve_status(&mut server, &mut sale).await?;
    let message = "another apply of this sale is in progress (old-leader/7/x); retry shortly";
    server
        .expect_event("Warning", "ApplyInProgress", message)
        .await;
    assert_eq!(finish(task).await?, Action::requeue(Duration::from_secs(2)));
    assert_eq!(
        condition(&status, "Ready")["reason"],
        json!("ApplyInProgress")
    );
    assert_eq!(status["warmedGeneration"], json!(1));
    assert_eq!(remaining(&mut conn, "phone-17").await?, 1000);

    // The holder done, the edit applies.
    redis::cmd("DEL").arg(&lock).exec_async(&mut conn).await?;
    let status = rewarm(
        &mut server,
        &ctx,
        &mut sale,
        &stores.urls(),
        CONFIG,
        &[(
            "Normal",
            "StockChanged",
            "phone-17: stock +500, 1500 remaining",
        )],
    )
    .await?;
    assert_eq!(status["warmedGeneration"], json!(2));
    assert_eq!(remaining(&mut conn, "phone-17").await?, 1500);
    Ok(())
}

#[tokio::test]
async fn an_edit_a_running_sale_cannot_take_keeps_it_running_as_it_was() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;

    // An end time already past and an invalid limit, in one edit.
    sale.metadata.generation = Some(2);
    let now = ctx.clock.now();
    sale.spec.sale.end_time = now.checked_sub(SignedDuration::from_secs(5))?;
    sale.spec.sale.products[1].per_user_limit = 0;
    let task = run(&sale, &ctx);
    let applied = serve_children(&mut server, &stores.urls(), 2, NONE).await;
    let status = serve_status(&mut server, &mut sale).await?;
    server
        .expect_event(
            "Warning",
            "ZeroPerUserLimit",
            "sku \"earbuds-pro\" has perUserLimit 0; nothing changed: the sale keeps running on generation 1's settings",
        )
        .await;
    finish(task).await?;

    // Not Failed: the sale runs on, and says why the edit did not apply.
    assert_eq!(status["phase"], json!("Active"));
    assert_eq!(status["warmedGeneration"], json!(1));
    assert_eq!(
        condition(&status, "Ready")["reason"],
        json!("ZeroPerUserLimit")
    );
    // Nothing written: the ConfigMap still holds the running spec.
    assert_eq!(applied, Vec::<Value>::new());
    Ok(())
}

/// Redis out of reach while a warmed sale is edited (a product added): the
/// edit cannot apply, so the pods keep the spec their ConfigMap holds; a
/// rollout onto products Redis never warmed would sell nothing of them.
#[tokio::test]
async fn an_edit_while_redis_is_unreachable_rolls_no_pods() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;
    let deployed = children::build(&sale, &sale.spec.sale, &ctx.settings.dataplane)?;

    sale.metadata.generation = Some(2);
    let mut added = sale.spec.sale.products[0].clone();
    added.sku = "case-17".into();
    sale.spec.sale.products.push(added);
    let unreachable = Urls {
        redis: format!(
            "redis://127.0.0.1:{}",
            dataplane::tools::servers::free_port()?
        ),
        database: stores.pg.url(),
    };
    const CONFIG_MAP: &str = "/api/v1/namespaces/shop/configmaps/singles-day-dataplane";
    // The ConfigMap cannot be read: the reconcile fails (and is retried)
    // before it writes anything.
    let task = run(&sale, &ctx);
    serve_secrets(&mut server, &unreachable).await;
    server.expect(Method::GET, CONFIG_MAP).await.respond(
        403,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "configmaps is forbidden"}),
    );
    let failed = tokio::time::timeout(Duration::from_secs(10), task).await??;
    assert!(
        matches!(&failed, Err(Error::Kube { action: "read", .. })),
        "{failed:?}"
    );

    let task = run(&sale, &ctx);
    serve_secrets(&mut server, &unreachable).await;
    server
        .expect(Method::GET, CONFIG_MAP)
        .await
        .respond(200, &serde_json::to_value(&deployed.config_map)?);
    let applied = serve_applies(&mut server, 2, NONE, None).await;
    let status = serve_status(&mut server, &mut sale).await?;
    server
        .expect_event(
            "Warning",
            "RedisUnavailable",
            "cannot reach Redis: Connection refused (os error 111)",
        )
        .await;
    finish(task).await?;

    assert_eq!(applied, Vec::<Value>::new(), "children rewritten");
    assert_eq!(
        condition(&status, "RedisWarmed")["reason"],
        json!("RedisUnavailable")
    );
    assert_eq!(status["warmedGeneration"], json!(1));
    Ok(())
}

#[tokio::test]
async fn deletion_stops_the_data_plane_then_clears_redis_and_releases() -> anyhow::Result<()> {
    let redis_server = RedisServer::start()?;
    let url = redis_server.url();
    let mut conn = redis_conn(&redis_server).await?;
    let now = Timestamp::now();
    let mut sale = live_sale(now);
    dataplane::warm::warm_sale(
        &mut conn,
        &SaleId::new("shop", "singles-day"),
        &sale.spec.sale,
    )
    .await?;
    buy(&mut conn, "phone-17", 3).await?;
    sale.status = Some(FlashSaleStatus {
        warmed_generation: Some(1),
        ..Default::default()
    });
    sale.metadata.deletion_timestamp = Some(Time(now));
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    ctx.metrics.sales.observe_status(
        "shop",
        "singles-day",
        &FlashSaleStatus {
            phase: Some(SalePhase::Active),
            ..Default::default()
        },
    );
    let deployments = "/apis/apps/v1/namespaces/shop/deployments";
    let foreground = json!({"propagationPolicy": "Foreground"});

    // Gateways are still terminating: wait, Redis untouched.
    let task = run(&sale, &ctx);
    let call = server
        .expect(
            Method::DELETE,
            &format!("{deployments}/singles-day-gateway?"),
        )
        .await;
    assert_eq!(call.body, foreground);
    let terminating = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "singles-day-gateway", "namespace": "shop",
                     "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["foregroundDeletion"]},
        "spec": {"selector": {}, "template": {}}
    });
    call.respond(200, &terminating);
    server
        .expect_event(
            "Normal",
            "StoppingGateways",
            "gateways stopping; no new orders are accepted",
        )
        .await;
    assert_eq!(finish(task).await?, Action::requeue(Duration::from_secs(2)));

    // Gateways gone, but three accepted orders are not persisted yet: the
    // consumers keep running.
    let task = run(&sale, &ctx);
    gateways_gone_redis_secret_served(&mut server, &url).await;
    server
        .expect_event(
            "Normal",
            "DrainingOrders",
            "3 accepted order(s) not yet persisted; consumers keep running",
        )
        .await;
    assert_eq!(finish(task).await?, Action::requeue(Duration::from_secs(5)));

    persist_everything(&mut conn, "phone-17").await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await?;

    // Drained: consumers stopped, Redis cleared, finalizer released.
    let task = run(&sale, &ctx);
    gateways_gone_redis_secret_served(&mut server, &url).await;
    let call = server
        .expect(
            Method::DELETE,
            &format!("{deployments}/singles-day-consumer?"),
        )
        .await;
    assert_eq!(call.body, foreground);
    call.respond(404, &fixtures::not_found("deployment"));
    let cleared = keys.len();
    let call = server.call().await;
    assert_eq!(call.method, Method::POST, "{}", call.uri);
    assert_eq!(call.body["reason"], json!("RedisCleared"));
    assert_eq!(
        call.body["note"],
        json!(format!(
            "deleted {cleared} Redis key(s) of the sale; orders in the database are kept"
        ))
    );
    call.echo();
    let call = server
        .expect(Method::PATCH, &format!("{SALE}{FINALIZERS}"))
        .await;
    assert_eq!(
        call.body,
        json!({"metadata": {"finalizers": [], "resourceVersion": "100"}})
    );
    call.respond(200, &serde_json::to_value(&sale)?);
    assert_eq!(finish(task).await?, Action::await_change());

    let left: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await?;
    assert_eq!(left, Vec::<String>::new());
    // A deleted sale leaves no series behind.
    let metrics = ctx.metrics.render()?;
    assert!(!metrics.contains(r#"sale="singles-day""#), "{metrics}");
    Ok(())
}

/// A sale whose Redis is gone (torn down first, or out of reach) is waited
/// for like a backlog until the drain timeout, then deleted with its keys
/// left in place, instead of hanging in Terminating for good.
#[tokio::test]
async fn deletion_with_redis_unreachable_waits_out_the_drain_timeout_then_releases()
-> anyhow::Result<()> {
    let url = format!(
        "redis://127.0.0.1:{}",
        dataplane::tools::servers::free_port()?
    );
    let now = Timestamp::now();
    let mut sale = live_sale(now);
    sale.status = Some(FlashSaleStatus {
        warmed_generation: Some(1),
        ..Default::default()
    });
    sale.metadata.deletion_timestamp = Some(Time(now));
    let clock = Arc::new(ManualClock::new(now));
    let (ctx, mut server) = fixtures::context(clock.clone());
    let deployments = "/apis/apps/v1/namespaces/shop/deployments";

    // Within the drain timeout: an error, retried; consumers keep running.
    let task = run(&sale, &ctx);
    gateways_gone_redis_secret_served(&mut server, &url).await;
    let outcome = tokio::time::timeout(Duration::from_secs(15), task).await??;
    assert!(matches!(outcome, Err(Error::Redis { .. })), "{outcome:?}");

    // Past it: consumers stopped, keys left, finalizer released.
    clock.set(at(
        now,
        i64::try_from(ctx.settings.drain_timeout.as_secs())? + 1,
    ));
    let task = run(&sale, &ctx);
    gateways_gone_redis_secret_served(&mut server, &url).await;
    let call = server.call().await;
    assert_eq!(call.method, Method::POST, "{}", call.uri);
    assert_eq!(call.body["reason"], json!("RedisNotCleared"));
    let note = call.body["note"].as_str().unwrap_or_default().to_string();
    assert!(
        note.starts_with("Redis unreachable")
            && note.ends_with("the sale's Redis keys stay in place"),
        "{note}"
    );
    call.echo();
    server
        .expect(
            Method::DELETE,
            &format!("{deployments}/singles-day-consumer?"),
        )
        .await
        .respond(404, &fixtures::not_found("deployment"));
    server
        .expect(Method::PATCH, &format!("{SALE}{FINALIZERS}"))
        .await
        .respond(200, &serde_json::to_value(&sale)?);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(15), task).await???,
        Action::await_change()
    );
    Ok(())
}

/// A deletion's first two calls once the gateways are gone: their delete
/// (404) and the Redis Secret's read.
async fn gateways_gone_redis_secret_served(server: &mut ApiServer, url: &str) {
    server
        .expect(
            Method::DELETE,
            "/apis/apps/v1/namespaces/shop/deployments/singles-day-gateway?",
        )
        .await
        .respond(404, &fixtures::not_found("deployment"));
    serve_redis_secret(server, url).await;
}

async fn serve_redis_secret(server: &mut ApiServer, url: &str) {
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/redis")
        .await
        .respond(200, &fixtures::secret("redis", "url", url));
}

/// Does what the consumers do: read the stream in the group and acknowledge.
async fn persist_everything(conn: &mut ConnectionManager, sku: &str) -> anyhow::Result<()> {
    let stream = ProductKeys::new(&SaleId::new("shop", "singles-day"), sku).stream();
    let group = dataplane::keys::CONSUMER_GROUP;
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(group)
        .arg("0")
        .query_async(conn)
        .await;
    if let Err(e) = created {
        assert_eq!(e.code(), Some("BUSYGROUP"), "{e}");
    }
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("test-consumer")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(conn)
        .await?;
    for key in read.keys {
        for entry in key.ids {
            let _: i64 = redis::cmd("XACK")
                .arg(&stream)
                .arg(group)
                .arg(&entry.id)
                .query_async(conn)
                .await?;
        }
    }
    Ok(())
}

const QUOTA: &str = "services \"singles-day-gateway\" is forbidden: exceeded quota: no-services, requested: services=1, used: services=0, limited: services=0";

fn forbidden(message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": "Forbidden", "code": 403
    })
}

#[tokio::test]
async fn a_refused_child_is_reported_and_the_others_still_applied() -> anyhow::Result<()> {
    let mut sale = fixtures::sale_with_finalizer();
    let now = at(sale.spec.sale.start_time, -3600);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    let refused = forbidden(QUOTA);
    let service = 2;

    // Every child is tried; the Service is refused, the five others applied.
    let task = run(&sale, &ctx);
    let applied = serve_children_refusing(
        &mut server,
        &Urls::unused(),
        0,
        ALL,
        Some((service, 403, &refused)),
    )
    .await;
    assert_eq!(applied.len(), 6);
    let status = serve_status(&mut server, &mut sale).await?;
    let line = format!("Service shop/singles-day-gateway: {QUOTA}");
    assert_eq!(
        condition(&status, "Ready"),
        json!({
            "type": "Ready", "status": "False", "reason": "ApplyFailed",
            "message": format!("cannot apply {line}"),
            "observedGeneration": 1, "lastTransitionTime": "2026-11-10T23:00:00Z"
        })
    );
    assert_eq!(status["phase"], json!("Pending"));
    assert_eq!(
        condition(&status, "PodDisruptionBudgets")["status"],
        json!("True")
    );
    let event = server.expect_event("Warning", "ApplyFailed", &line).await;
    assert_eq!(event["action"], json!("ApplyService"));
    server.expect_event("Normal", "Pending", "Pending").await;
    let error = finish(task).await.err().map(|e| format!("{e:#}"));
    assert_eq!(
        error,
        Some(format!("1 child object(s) not applied, first {line}"))
    );

    // Still refused: only the Service is tried again; status and Events
    // already say it, so nothing else is written.
    let task = run(&sale, &ctx);
    serve_children_refusing(
        &mut server,
        &Urls::unused(),
        0,
        &[service],
        Some((service, 403, &refused)),
    )
    .await;
    assert!(finish(task).await.is_err());

    // The quota lifted: the Service is applied and the sale is Ready.
    let task = run(&sale, &ctx);
    serve_children(&mut server, &Urls::unused(), 0, &[service]).await;
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(condition(&status, "Ready")["reason"], json!("Reconciled"));
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(55 * 60))
    );
    Ok(())
}

#[tokio::test]
async fn deployments_wait_for_their_config_map() -> anyhow::Result<()> {
    let mut sale = fixtures::sale_with_finalizer();
    let now = at(sale.spec.sale.start_time, -3600);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    let message = "configmaps \"singles-day-dataplane\" is forbidden: exceeded quota: cm";

    let task = run(&sale, &ctx);
    serve_secrets(&mut server, &Urls::unused()).await;
    let (config_map, _) = CHILDREN[0];
    server
        .expect(Method::PATCH, &format!("{config_map}{APPLY}"))
        .await
        .respond(403, &forbidden(message));
    // Not applied (their pods would roll onto a config that is not there);
    // read for their status instead — here, not made yet.
    let (gateway, _) = CHILDREN[1];
    server
        .expect(Method::GET, gateway)
        .await
        .respond(404, &fixtures::not_found("deployments"));
    let (service, _) = CHILDREN[2];
    server
        .expect(Method::PATCH, &format!("{service}{APPLY}"))
        .await
        .echo();
    let (consumer, _) = CHILDREN[3];
    server
        .expect(Method::GET, consumer)
        .await
        .respond(404, &fixtures::not_found("deployments"));
    for (pdb, _) in &CHILDREN[4..] {
        server
            .expect(Method::PATCH, &format!("{pdb}{APPLY}"))
            .await
            .echo();
    }
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(
        condition(&status, "Ready")["message"],
        json!(format!(
            "cannot apply ConfigMap shop/singles-day-dataplane: {message}"
        ))
    );
    assert_eq!(
        condition(&status, "GatewayAvailable")["reason"],
        json!("NotApplied")
    );
    server
        .expect_event(
            "Warning",
            "ApplyFailed",
            &format!("ConfigMap shop/singles-day-dataplane: {message}"),
        )
        .await;
    server.expect_event("Normal", "Pending", "Pending").await;
    assert!(finish(task).await.is_err());
    Ok(())
}

#[tokio::test]
async fn pdbs_are_skipped_with_a_condition_where_policy_v1_is_not_served() -> anyhow::Result<()> {
    let mut sale = fixtures::sale_with_finalizer();
    let now = at(sale.spec.sale.start_time, -3600);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    let ctx = Arc::new(Context {
        client: ctx.client.clone(),
        recorder: ctx.recorder.clone(),
        clock: ctx.clock.clone(),
        metrics: ctx.metrics.clone(),
        redis: Default::default(),
        stores: Default::default(),
        settings: ctx.settings.clone(),
        served: ServedApis::default(),
        applied: Default::default(),
    });

    let task = run(&sale, &ctx);
    let applied = serve_children(&mut server, &Urls::unused(), 0, &[0, 1, 2, 3]).await;
    assert_eq!(applied.len(), 4);
    // Kubernetes 1.20 answers discovery of an unknown group version with a plain 404.
    let call = server.expect(Method::GET, "/apis/policy/v1").await;
    let response = http::Response::builder()
        .status(404)
        .body(kube::client::Body::from(b"404 page not found\n".to_vec()))?;
    call.send_raw(response);
    let status = serve_status(&mut server, &mut sale).await?;
    let message = "the API server does not serve policy/v1 (Kubernetes 1.21+): no PodDisruptionBudgets are made, so a node drain may evict several gateway or consumer pods at once";
    assert_eq!(
        condition(&status, "PodDisruptionBudgets"),
        json!({
            "type": "PodDisruptionBudgets", "status": "False", "reason": "APIUnavailable",
            "message": message, "observedGeneration": 1,
            "lastTransitionTime": "2026-11-10T23:00:00Z"
        })
    );
    // The sale itself runs.
    assert_eq!(condition(&status, "Ready")["status"], json!("True"));
    server
        .expect_event("Warning", "APIUnavailable", message)
        .await;
    server.expect_event("Normal", "Pending", "Pending").await;
    finish(task).await?;

    // Asked once: the next reconcile neither asks again nor writes anything.
    let task = run(&sale, &ctx);
    serve_children(&mut server, &Urls::unused(), 0, NONE).await;
    finish(task).await?;
    Ok(())
}

#[tokio::test]
async fn a_running_sale_whose_secret_goes_missing_keeps_its_phase() -> anyhow::Result<()> {
    let stores = Stores::start()?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&stores).await?;

    // The token Secret goes missing mid-sale: the pods already hold it and
    // keep selling, so the sale stays Active (the autoscaler and the live
    // sale's alerts go on); Ready=False names the Secret.
    let task = run(&sale, &ctx);
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/redis")
        .await
        .respond(200, &fixtures::secret("redis", "url", &stores.redis.url()));
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/orders-db")
        .await
        .respond(200, &fixtures::secret("orders-db", "url", "postgres://db"));
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/shop-login")
        .await
        .respond(404, &fixtures::not_found("secrets \"shop-login\""));
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(status["phase"], json!("Active"));
    assert_eq!(
        condition(&status, "Ready")["reason"],
        json!("SecretMissing")
    );
    // No phase Event: the first Event is the Secret's.
    server
        .expect_event(
            "Warning",
            "SecretMissing",
            "Secret shop/shop-login not found",
        )
        .await;
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(30))
    );

    // Back: Ready again, still Active, no phase Event.
    let task = run(&sale, &ctx);
    serve_children(&mut server, &stores.urls(), 2, NONE).await;
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(status["phase"], json!("Active"));
    assert_eq!(condition(&status, "Ready")["status"], json!("True"));
    finish(task).await?;
    Ok(())
}

#[test]
fn a_long_event_note_is_cut_to_what_the_api_accepts() {
    let sale = fixtures::sale();
    let mut report = Report::new(&sale, Timestamp::UNIX_EPOCH);
    report.event(
        EventType::Warning,
        "ApplyFailed",
        "ApplyService",
        "é".repeat(600),
    );
    let note = report.events[0].note.clone().unwrap_or_default();
    assert!(note.len() <= NOTE_MAX, "{}", note.len());
    assert!(note.starts_with("éé") && note.ends_with('…'), "{note}");
}
