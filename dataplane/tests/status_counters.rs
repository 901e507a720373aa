//! The status counters (`status.products`, read by `counters::product_counters`)
//! stay true: orders persisted, some paid, the rest cancelled by the payment
//! timeout sweeper, consumers restarted in between, the returned stock sold
//! again and settled the same way. At rest every counter equals what
//! PostgreSQL and Redis' own order records say.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use dataplane::counters::{ProductCounters, product_counters};
use dataplane::gateway::GatewaySettings;
use dataplane::gateway::payment::{self, PaymentSettings};
use dataplane::keys::ProductKeys;
use dataplane::order::{OrderRecord, OrderStatus};
use dataplane::spec::SaleDocument;
use dataplane::store::OrderStore;
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Long enough to pay every order meant to be paid, short enough to wait for.
const TIMEOUT_SECONDS: u32 = 8;
const BOUND: Duration = Duration::from_secs(40);

/// Buys one order per user; returns (user, order id) for every 202.
async fn buy_all(gw: &RunningGateway, sku: &str, qty: u32, users: &[String]) -> Vec<String> {
    let client = http();
    futures::stream::iter(users.to_vec())
        .map(|user| {
            let (client, url) = (client.clone(), gw.url("/v1/sales/counters/purchase"));
            async move {
                let resp = client
                    .post(url)
                    .bearer_auth(token(&user))
                    .json(&json!({"sku": sku, "quantity": qty}))
                    .send()
                    .await
                    .ok()?;
                let body: Value = resp.json().await.ok()?;
                Some(body["orderId"].as_str()?.to_string())
            }
        })
        .buffer_unordered(16)
        .filter_map(|o| async move { o })
        .collect()
        .await
}

/// Pays an order, retrying while it is not persisted yet (409).
async fn pay(gw: &RunningGateway, key: &SigningKey, order: &str, amount: &str) -> bool {
    let body = json!({"paymentId": format!("pay-{order}"), "orderId": order, "amount": amount,
        "currency": "USD", "status": "succeeded"})
    .to_string();
    let sig = payment::sign(key, body.as_bytes());
    eventually(Duration::from_secs(10), || {
        let (url, body, sig) = (gw.url("/v1/payments/callback"), body.clone(), sig.clone());
        async move {
            let sent = http()
                .post(url)
                .header("x-signature", sig)
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 200 => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["outcome"] == "paid"),
                _ => false,
            }
        }
    })
    .await
}

/// Units per status, by PostgreSQL.
async fn pg_units(store: &OrderStore, sku: &str) -> Result<HashMap<String, i64>, Error> {
    let client = store.pool().get().await?;
    let rows = client
        .query(
            "SELECT status, sum(quantity)::bigint FROM flashsale_orders
             WHERE sale = 'test/counters' AND sku = $1 GROUP BY status",
            &[&sku],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Units per status, by Redis' order records.
async fn redis_units(
    conn: &mut redis::aio::ConnectionManager,
    doc: &SaleDocument,
    sku: &str,
) -> Result<HashMap<&'static str, i64>, Error> {
    let records: Vec<String> = redis::cmd("HVALS")
        .arg(ProductKeys::new(&doc.id(), sku).orders())
        .query_async(conn)
        .await?;
    let mut out = HashMap::new();
    for raw in records {
        let rec = OrderRecord::decode("", &raw).ok_or("not an order record")?;
        *out.entry(rec.status.as_str()).or_insert(0) += i64::from(rec.qty);
    }
    Ok(out)
}

async fn counters(
    conn: &mut redis::aio::ConnectionManager,
    doc: &SaleDocument,
) -> Result<Vec<ProductCounters>, Error> {
    Ok(product_counters(conn, &doc.id(), &doc.spec)
        .await?
        .into_iter()
        .flatten()
        .collect())
}

/// Waits until no order of the sale is left unpaid and unsettled: every
/// row paid or cancelled, every outbox row applied, every Redis record final.
async fn settled(
    store: &OrderStore,
    conn: &redis::aio::ConnectionManager,
    doc: &SaleDocument,
) -> bool {
    eventually(BOUND, || async {
        let Ok(client) = store.pool().get().await else {
            return false;
        };
        let open: i64 = client
            .query_one(
                "SELECT (SELECT count(*) FROM flashsale_orders
                         WHERE sale = 'test/counters' AND status = 'confirmed')
                      + (SELECT count(*) FROM flashsale_outbox WHERE applied_at IS NULL)",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        let mut conn = conn.clone();
        let mut live = 0;
        for p in &doc.spec.products {
            match redis_units(&mut conn, doc, &p.sku).await {
                Ok(u) => {
                    live += u.get("accepted").copied().unwrap_or(0)
                        + u.get("confirmed").copied().unwrap_or(0)
                }
                Err(_) => return false,
            }
        }
        open == 0 && live == 0
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_equal_postgres_and_redis_after_payments_cancellations_and_restarts()
-> Result<(), Error> {
    let servers = Servers::start()?;
    let mut doc = sale("counters", &[("item", 40, 1), ("pair", 10, 2)]);
    doc.spec.payment.timeout_seconds = TIMEOUT_SECONDS;
    warm(&servers, &doc).await?;
    let (private, public) = payment::keygen();
    let key = payment::parse_private_key(&private)?;
    let mut settings = GatewaySettings::new(servers.redis.url(), SECRET.to_vec());
    settings.pod = "gw".into();
    settings.payment = Some(PaymentSettings {
        public_key: payment::parse_public_key(&public)?,
        database_url: servers.pg.url(),
        currency: "USD".into(),
    });
    let gw = RunningGateway::start_with(&doc, &settings).await?;
    let store = servers.store().await?;
    let mut conn = servers.redis_conn().await?;
    let consumers = RunningConsumers::start(&doc, &servers, 2).await?;

    // Round one: 30 single units and 5 pairs; 6 singles and 2 pairs paid.
    let singles: Vec<String> = (0..30).map(|i| format!("a{i}")).collect();
    let pairs: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    let item_orders = buy_all(&gw, "item", 1, &singles).await;
    let pair_orders = buy_all(&gw, "pair", 2, &pairs).await;
    assert_eq!((item_orders.len(), pair_orders.len()), (30, 5));
    for o in item_orders.iter().take(6) {
        assert!(pay(&gw, &key, o, "19.99").await, "{o} paid");
    }
    for o in pair_orders.iter().take(2) {
        assert!(pay(&gw, &key, o, "39.98").await, "{o} paid");
    }
    // Everything persisted, before the timeout: persisted counts all of it.
    let persisted = eventually(Duration::from_secs(10), || {
        let (mut conn, doc) = (conn.clone(), &doc);
        async move {
            counters(&mut conn, doc)
                .await
                .is_ok_and(|c| c.iter().map(|c| c.persisted).sum::<i64>() == 40)
        }
    })
    .await;
    assert!(persisted, "30 + 5 × 2 units persisted");

    // Consumers (and their sweepers) restart while the rest times out.
    consumers.stop().await;
    let consumers = RunningConsumers::start(&doc, &servers, 2).await?;
    assert!(settled(&store, &conn, &doc).await, "round one settled");

    // Round two: the returned stock sells again; 4 of 10 paid.
    let again: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    let item_orders = buy_all(&gw, "item", 1, &again).await;
    assert_eq!(item_orders.len(), 10);
    for o in item_orders.iter().take(4) {
        assert!(pay(&gw, &key, o, "19.99").await, "{o} paid");
    }
    assert!(settled(&store, &conn, &doc).await, "round two settled");
    consumers.stop().await;

    // At rest: every counter equals PostgreSQL and Redis' order records.
    let expected: HashMap<&str, (i64, i64, i64)> =
        [("item", (10, 10, 30)), ("pair", (4, 4, 6))].into();
    for c in counters(&mut conn, &doc).await? {
        let pg = pg_units(&store, &c.sku).await?;
        let pg = |s: &str| pg.get(s).copied().unwrap_or(0);
        let rd = redis_units(&mut conn, &doc, &c.sku).await?;
        let rd = |s: OrderStatus| rd.get(s.as_str()).copied().unwrap_or(0);
        let inventory: i64 = store
            .pool()
            .get()
            .await?
            .query_one(
                "SELECT stock, sold FROM flashsale_inventory WHERE sale = 'test/counters' AND sku = $1",
                &[&c.sku],
            )
            .await
            .map(|r| r.get::<_, i64>(1))?;
        let spec_stock = doc
            .spec
            .products
            .iter()
            .find(|p| p.sku == c.sku)
            .map(|p| p.stock);
        let sku = c.sku.as_str();
        assert_eq!(Some(c.stock), spec_stock, "{sku}: stock");
        assert_eq!(
            c.persisted,
            pg("confirmed") + pg("paid"),
            "{sku}: persisted"
        );
        assert_eq!(c.persisted, inventory, "{sku}: persisted = inventory sold");
        assert_eq!(
            c.persisted,
            rd(OrderStatus::Confirmed) + rd(OrderStatus::Paid)
        );
        assert_eq!(c.sold(), c.persisted, "{sku}: sold = persisted at rest");
        assert_eq!(c.remaining, c.stock - c.persisted, "{sku}: remaining");
        assert_eq!(c.paid, pg("paid"), "{sku}: paid");
        assert_eq!(c.paid, rd(OrderStatus::Paid));
        assert_eq!(c.cancelled, pg("cancelled"), "{sku}: cancelled");
        assert_eq!(c.cancelled, rd(OrderStatus::Cancelled));
        assert_eq!(c.failed, rd(OrderStatus::Failed), "{sku}: failed");
        assert_eq!(
            c.accepted(),
            rd(OrderStatus::Paid) + rd(OrderStatus::Cancelled)
        );
        let (persisted, paid, cancelled) = expected[sku];
        assert_eq!(
            (c.persisted, c.paid, c.cancelled, c.failed),
            (persisted, paid, cancelled, 0),
            "{sku}"
        );
    }
    let report =
        dataplane::tools::audit::audit(&mut conn, &store, &doc.id(), &doc.spec, &[], 0).await?;
    assert!(report.passed(), "audit: {:?}", report.problems());
    gw.stop().await;
    Ok(())
}
