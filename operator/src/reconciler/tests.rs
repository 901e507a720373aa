//! The reconciler against a mocked API server (every request asserted in
//! order) and, where Redis is involved, a real throwaway `redis-server`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dataplane::keys::ProductKeys;
use dataplane::servers::RedisServer;
use http::Method;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use super::*;
use crate::clock::ManualClock;
use crate::fixtures::{self, ApiServer};

const SALE: &str = "/apis/flashsale.dev/v1alpha1/namespaces/shop/flashsales/singles-day";
const APPLY: &str = "?&force=true&fieldManager=flashsale-operator";

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
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/singles-day-gateway",
        false,
    ),
    (
        "/apis/apps/v1/namespaces/shop/deployments/singles-day-consumer",
        true,
    ),
    (
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/singles-day-consumer",
        false,
    ),
];

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

/// Answers the three Secret reads.
async fn serve_secrets(server: &mut ApiServer, redis_url: &str) {
    for (name, key, value) in [
        ("redis", "url", redis_url),
        ("orders-db", "url", "postgres://orders@db/orders"),
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

/// Answers the Secret reads and the six applies of a reconcile that gets that
/// far; Deployments come back with `available` pods. Returns the applied bodies.
async fn serve_children(server: &mut ApiServer, redis_url: &str, available: i32) -> Vec<Value> {
    serve_secrets(server, redis_url).await;
    let mut applied = Vec::new();
    for (path, is_deployment) in CHILDREN {
        let call = server
            .expect(Method::PATCH, &format!("{path}{APPLY}"))
            .await;
        applied.push(call.body.clone());
        if is_deployment {
            let mut body = call.body.clone();
            body["status"] = json!({ "availableReplicas": available, "replicas": available });
            call.respond(200, &body);
        } else {
            call.echo();
        }
    }
    applied
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
        let (outcome, _, _): (String, String, String) = dataplane::scripts::purchase(
            &keys.purchase_keys(),
            &format!("user-{i}"),
            1,
            &format!("order-{sku}-{i}"),
            "",
        )
        .invoke_async(conn)
        .await?;
        assert_eq!(outcome, "ok", "purchase {i} of {sku}");
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

    let call = server.expect(Method::PATCH, &format!("{SALE}?")).await;
    assert_eq!(
        call.body,
        json!({"metadata": {"finalizers": ["flashsale.dev/cleanup"], "resourceVersion": "100"}})
    );
    let mut stored = fixtures::sale_with_finalizer();
    call.respond(200, &serde_json::to_value(&stored)?);

    let applied = serve_children(&mut server, "redis://unused:6379", 0).await;
    let [
        config_map,
        gateway,
        service,
        gateway_pdb,
        consumer,
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
        assert!(pod["metadata"]["annotations"]["flashsale.dev/config-checksum"].is_string());
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
    let product = |sku: &str, stock: i64| json!({"sku": sku, "stock": stock, "remaining": stock, "sold": 0, "persisted": 0});
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
    let first = serve_children(&mut server, "redis://unused:6379", 0).await;
    serve_status(&mut server, &mut sale).await?;
    server.expect_event("Normal", "Pending", "Pending").await;
    let first_action = finish(task).await?;

    // Same object, same clock: the same applies (no-ops on the server), no
    // status write, no event.
    let task = run(&sale, &ctx);
    let second = serve_children(&mut server, "redis://unused:6379", 0).await;
    assert_eq!(first, second);
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
    server
        .expect_event("Warning", "EndBeforeStart", message)
        .await;
    // Nothing else: no Secret read, no child applied; only an edit helps.
    assert_eq!(finish(task).await?, Action::await_change());
    Ok(())
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
    let redis_server = RedisServer::start()?;
    let url = redis_server.url();
    let mut conn = redis_conn(&redis_server).await?;
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
    serve_children(&mut server, &url, 2).await;
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
    serve_children(&mut server, &url, 2).await;
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
        .expect_event(
            "Normal",
            "RedisWarmed",
            "phone-17: 1000 units; earbuds-pro: 3000 units; charger-65w: 500 units",
        )
        .await;
    assert_eq!(
        finish(task).await?,
        Action::requeue(Duration::from_secs(15))
    );
    assert_eq!(remaining(&mut conn, "phone-17").await?, 1000);

    // 5 s before start: nothing changed, back at the opening instant.
    clock.set(at(spec.start_time, -5));
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2).await;
    assert_eq!(finish(task).await?, Action::requeue(Duration::from_secs(5)));

    // At start: Active; no second warming.
    clock.set(spec.start_time);
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2).await;
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

    // At end: Ended, nothing left to wait for.
    clock.set(spec.end_time);
    let task = run(&sale, &ctx);
    serve_children(&mut server, &url, 2).await;
    let status = serve_status(&mut server, &mut sale).await?;
    assert_eq!(status["phase"], json!("Ended"));
    assert_eq!(
        condition(&status, "Ready")["message"],
        json!("the sale ended at 2026-11-11T00:30:00Z")
    );
    server
        .expect_event("Normal", "Ended", "Active → Ended")
        .await;
    assert_eq!(finish(task).await?, Action::await_change());
    Ok(())
}

/// Runs one reconcile of a live sale whose spec changed (a new generation)
/// and returns the status it wrote.
async fn rewarm(
    server: &mut ApiServer,
    ctx: &Arc<Context>,
    sale: &mut FlashSale,
    url: &str,
    events: &[(&str, &str, &str)],
) -> anyhow::Result<Value> {
    let task = run(sale, ctx);
    serve_children(server, url, 2).await;
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
async fn warmed_live_sale(
    redis_server: &RedisServer,
) -> anyhow::Result<(Arc<Context>, ApiServer, FlashSale)> {
    let now = Timestamp::now();
    let mut sale = live_sale(now);
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    let status = rewarm(
        &mut server,
        &ctx,
        &mut sale,
        &redis_server.url(),
        &[
            ("Normal", "Active", "Active"),
            (
                "Normal",
                "RedisWarmed",
                "phone-17: 1000 units; earbuds-pro: 3000 units; charger-65w: 500 units",
            ),
        ],
    )
    .await?;
    assert_eq!(status["warmedGeneration"], json!(1));
    Ok((ctx, server, sale))
}

#[tokio::test]
async fn warming_twice_leaves_stock_unchanged() -> anyhow::Result<()> {
    let redis_server = RedisServer::start()?;
    let mut conn = redis_conn(&redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&redis_server).await?;

    // An operator restart or a re-reconcile of the same generation: no warming.
    let task = run(&sale, &ctx);
    serve_children(&mut server, &redis_server.url(), 2).await;
    finish(task).await?;

    // A spec edit that leaves stock alone warms again and changes nothing.
    sale.metadata.generation = Some(2);
    sale.spec.gateway.replicas.max = 60;
    let status = rewarm(&mut server, &ctx, &mut sale, &redis_server.url(), &[]).await?;
    assert_eq!(status["warmedGeneration"], json!(2));
    assert_eq!(remaining(&mut conn, "phone-17").await?, 1000);
    assert_eq!(status["remaining"], json!(4500));
    Ok(())
}

#[tokio::test]
async fn warming_after_30_sales_keeps_what_was_sold() -> anyhow::Result<()> {
    let redis_server = RedisServer::start()?;
    let mut conn = redis_conn(&redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&redis_server).await?;
    buy(&mut conn, "phone-17", 30).await?;

    sale.metadata.generation = Some(2);
    sale.spec.gateway.replicas.max = 60;
    let status = rewarm(&mut server, &ctx, &mut sale, &redis_server.url(), &[]).await?;
    assert_eq!(remaining(&mut conn, "phone-17").await?, 970);
    assert_eq!(
        product(&status, "phone-17"),
        json!({"sku": "phone-17", "stock": 1000, "remaining": 970, "sold": 30, "persisted": 0})
    );
    assert_eq!(status["remaining"], json!(4470));
    Ok(())
}

#[tokio::test]
async fn a_stock_raise_mid_sale_adds_the_difference() -> anyhow::Result<()> {
    let redis_server = RedisServer::start()?;
    let mut conn = redis_conn(&redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&redis_server).await?;
    buy(&mut conn, "phone-17", 30).await?;

    sale.metadata.generation = Some(2);
    sale.spec.sale.products[0].stock = 1500;
    let status = rewarm(
        &mut server,
        &ctx,
        &mut sale,
        &redis_server.url(),
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
        json!({"sku": "phone-17", "stock": 1500, "remaining": 1470, "sold": 30, "persisted": 0})
    );
    Ok(())
}

#[tokio::test]
async fn a_stock_cut_below_sold_is_refused_with_a_condition() -> anyhow::Result<()> {
    let redis_server = RedisServer::start()?;
    let mut conn = redis_conn(&redis_server).await?;
    let (ctx, mut server, mut sale) = warmed_live_sale(&redis_server).await?;
    buy(&mut conn, "phone-17", 30).await?;

    sale.metadata.generation = Some(2);
    sale.spec.sale.products[0].stock = 10;
    let message =
        "sku phone-17: stock 10 is below the 30 units already sold; Redis keeps the previous stock";
    let status = rewarm(
        &mut server,
        &ctx,
        &mut sale,
        &redis_server.url(),
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
    // Still warmed from generation 1; nothing in Redis moved.
    assert_eq!(status["warmedGeneration"], json!(1));
    assert_eq!(remaining(&mut conn, "phone-17").await?, 970);
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
    server
        .expect(
            Method::DELETE,
            &format!("{deployments}/singles-day-gateway?"),
        )
        .await
        .respond(404, &fixtures::not_found("deployment"));
    serve_redis_secret(&mut server, &url).await;
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
    server
        .expect(
            Method::DELETE,
            &format!("{deployments}/singles-day-gateway?"),
        )
        .await
        .respond(404, &fixtures::not_found("deployment"));
    serve_redis_secret(&mut server, &url).await;
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
    let call = server.expect(Method::PATCH, &format!("{SALE}?")).await;
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
