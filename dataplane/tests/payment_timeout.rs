//! 1,000 unpaid orders time out with three sweepers (consumer processes)
//! running at once and one SIGKILLed mid-way: the stock comes back exactly
//! 1,000 units, buyers may buy again, and no order is both paid and cancelled.

mod common;

use std::time::Duration;

use common::*;
use dataplane::gateway::GatewaySettings;
use dataplane::gateway::payment::{self, PaymentSettings};
use dataplane::keys::{BuyerEntry, ProductKeys};
use dataplane::order::{OrderRecord, OrderStatus};
use futures::StreamExt;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

const UNPAID: usize = 1_000;
const PAID: usize = 10;

async fn count(store: &dataplane::store::OrderStore, sql: &str) -> i64 {
    match store.pool().get().await {
        Ok(c) => c.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(-1),
        Err(_) => -1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_unpaid_orders_time_out_once_across_three_sweepers_one_killed() -> Result<(), Error>
{
    let servers = Servers::start()?;
    let total = UNPAID + PAID;
    let mut doc = sale("sweep", &[("item", total as i64, 1)]);
    doc.spec.payment.timeout_seconds = 6;
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
    let dir = tempfile::tempdir()?;
    let config = write_doc(dir.path(), &doc)?;
    // Small batches and a pause between commit and apply: sweeps overlap,
    // and a kill most likely lands after a commit, before its Redis apply.
    let flags = [
        "--sweep-every-ms",
        "100",
        "--sweep-batch",
        "25",
        "--sweep-apply-delay-ms",
        "300",
    ];
    let mut sweepers = Vec::new();
    for i in 0..3 {
        let log = dir.path().join(format!("c{i}.log"));
        sweepers.push(spawn_consumer_process_with(
            &config,
            &servers,
            &format!("c{i}"),
            200,
            &flags,
            &log,
        )?);
    }

    // Every user buys one unit.
    let client = http();
    let orders: Vec<(String, String)> = futures::stream::iter(0..total)
        .map(|i| {
            let (client, url) = (client.clone(), gw.url("/v1/sales/sweep/purchase"));
            async move {
                let user = format!("u{i}");
                let resp = client
                    .post(url)
                    .bearer_auth(token(&user))
                    .json(&json!({"sku": "item", "quantity": 1}))
                    .send()
                    .await
                    .ok()?;
                let body: Value = resp.json().await.ok()?;
                Some((user, body["orderId"].as_str()?.to_string()))
            }
        })
        .buffer_unordered(32)
        .filter_map(|o| async move { o })
        .collect()
        .await;
    assert_eq!(orders.len(), total, "every purchase accepted");

    // The last buyers pay (their orders are the youngest, furthest from the
    // timeout); a callback before persistence is told to retry.
    let paid: Vec<&String> = orders.iter().rev().take(PAID).map(|(_, o)| o).collect();
    for order in &paid {
        let body = json!({"paymentId": format!("pay-{order}"), "orderId": order, "amount": "19.99", "currency": "USD", "status": "succeeded"}).to_string();
        let sig = payment::sign(&key, body.as_bytes());
        let done = eventually(Duration::from_secs(5), || {
            let (client, url, body, sig) = (
                client.clone(),
                gw.url("/v1/payments/callback"),
                body.clone(),
                sig.clone(),
            );
            async move {
                match client
                    .post(url)
                    .header("x-signature", sig)
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => r.status() == 200,
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(done, "payment for {order} accepted");
    }

    // Kill one sweeper once cancelling is under way.
    let store = servers.store().await?;
    let cancelled_sql =
        "SELECT count(*) FROM flashsale_orders WHERE sale = 'test/sweep' AND status = 'cancelled'";
    let under_way = eventually(Duration::from_secs(60), || async {
        count(&store, cancelled_sql).await >= 100
    })
    .await;
    assert!(
        under_way,
        "cancelling started: {}",
        std::fs::read_to_string(dir.path().join("c0.log"))?
    );
    sweepers[0].kill()?;
    sweepers[0].wait()?;
    let cancelled_at_kill = count(&store, cancelled_sql).await;
    let unapplied_at_kill = count(
        &store,
        "SELECT count(*) FROM flashsale_outbox WHERE applied_at IS NULL",
    )
    .await;
    eprintln!(
        "at the kill: {cancelled_at_kill} cancelled, {unapplied_at_kill} outbox rows unapplied"
    );
    assert!((cancelled_at_kill as usize) < UNPAID, "killed mid-way");

    // The survivors finish, including whatever the killed one left unapplied.
    let finished = eventually(Duration::from_secs(60), || async {
        count(&store, cancelled_sql).await == UNPAID as i64
            && count(
                &store,
                "SELECT count(*) FROM flashsale_outbox WHERE applied_at IS NULL",
            )
            .await
                == 0
    })
    .await;
    assert!(finished, "all unpaid orders cancelled and applied");

    let mut conn = servers.redis_conn().await?;
    let keys = ProductKeys::new(&doc.id(), "item");
    let stock: i64 = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(stock, UNPAID as i64, "exactly the unpaid units came back");
    let records: Vec<String> = redis::cmd("HVALS")
        .arg(keys.orders())
        .query_async(&mut conn)
        .await?;
    let statuses: Vec<OrderStatus> = records
        .iter()
        .filter_map(|r| OrderRecord::decode("", r))
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == OrderStatus::Cancelled)
            .count(),
        UNPAID
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == OrderStatus::Paid).count(),
        PAID
    );
    let entries: Vec<String> = redis::cmd("HVALS")
        .arg(keys.buyers())
        .query_async(&mut conn)
        .await?;
    let holders = entries
        .iter()
        .filter_map(|e| BuyerEntry::parse(e))
        .filter(|e| e.held > 0)
        .count();
    assert_eq!(holders, PAID, "only payers still hold a unit");
    assert_eq!(
        count(
            &store,
            "SELECT sold FROM flashsale_inventory WHERE sale = 'test/sweep'"
        )
        .await,
        PAID as i64
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM flashsale_orders WHERE sale = 'test/sweep' AND status = 'paid'"
        )
        .await,
        PAID as i64
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM flashsale_orders o JOIN flashsale_payments p
             ON p.order_id = o.order_id AND p.outcome = 'paid' WHERE o.status <> 'paid'"
        )
        .await,
        0,
        "no order both paid and cancelled"
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM (SELECT order_id FROM flashsale_outbox GROUP BY order_id HAVING count(*) > 1) d").await,
        0,
        "one outbox row per cancelled order"
    );
    // The status counters followed every move, across the killed sweeper.
    let counters = dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
    let c = counters
        .first()
        .and_then(Option::as_ref)
        .ok_or("item not warmed")?;
    assert_eq!(
        (c.persisted, c.paid, c.cancelled, c.failed, c.sold()),
        (PAID as i64, PAID as i64, UNPAID as i64, 0, PAID as i64)
    );

    // Buyers whose orders timed out may buy again (the gateway's sold-out
    // flag clears once stock is back).
    for (user, _) in orders.iter().take(20) {
        let again = eventually(Duration::from_secs(5), || {
            let (client, url, user) = (
                client.clone(),
                gw.url("/v1/sales/sweep/purchase"),
                user.clone(),
            );
            async move {
                client
                    .post(url)
                    .bearer_auth(token(&user))
                    .json(&json!({"sku": "item", "quantity": 1}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 202)
            }
        })
        .await;
        assert!(again, "{user} buys again");
    }

    for mut s in sweepers.into_iter().skip(1) {
        s.kill()?;
        s.wait()?;
    }
    gw.stop().await;
    Ok(())
}

/// On a Redis Cluster one sweep releases orders of products on different
/// masters (one pipeline per product's slot): every unit comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_orders_of_products_on_different_masters_time_out_on_a_redis_cluster()
-> Result<(), Error> {
    let servers = tokio::task::spawn_blocking(ClusterServers::start).await??;
    // These two products hash to slots served by different masters.
    let skus = ["small", "large"];
    let mut doc = sale("crowd-cluster", &[(skus[0], 5, 1), (skus[1], 5, 1)]);
    let masters: Vec<u16> = skus
        .iter()
        .map(|sku| {
            let key = ProductKeys::new(&doc.id(), sku).stock();
            servers.cluster.master_of(&key).map(|m| m.port)
        })
        .collect::<Result<_, _>>()?;
    assert_ne!(masters[0], masters[1]);
    doc.spec.payment.timeout_seconds = 3;
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start_on(&doc, &servers, "gw").await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let client = http();
    for sku in skus {
        for i in 0..5 {
            let resp = client
                .post(gw.url("/v1/sales/crowd-cluster/purchase"))
                .bearer_auth(token(&format!("{sku}-{i}")))
                .json(&json!({"sku": sku, "quantity": 1}))
                .send()
                .await?;
            assert_eq!(resp.status(), 202);
        }
    }
    let mut conn = redis_conn_of(&servers).await?;
    let all_back = eventually(Duration::from_secs(30), || {
        let (mut conn, doc) = (conn.clone(), doc.clone());
        async move {
            dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec)
                .await
                .is_ok_and(|c| {
                    c.iter().all(|p| {
                        p.as_ref()
                            .is_some_and(|p| p.remaining == 5 && p.cancelled == 5)
                    })
                })
        }
    })
    .await;
    let counters = dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
    assert!(all_back, "{counters:?}");
    consumers.stop().await;
    gw.stop().await;
    Ok(())
}

/// A release left in the outbox for a product this sweeper's spec does not
/// know (a pod of the new spec cancelled an order of a product added in the
/// rollout, then died before applying it; an old pod picks the row up) is
/// applied all the same: the keys come from the sale and the SKU. Before, it
/// was marked applied without touching Redis, and the unit never came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_release_of_a_product_the_sweeper_does_not_know_is_applied()
-> Result<(), Error> {
    use dataplane::order::new_order_id;
    use dataplane::payment_timeout::{Sweeper, SweeperSettings};
    use dataplane::scripts;

    let servers = Servers::start()?;
    let new_spec = sale("rollout", &[("item", 10, 1), ("gadget", 10, 1)]);
    warm(&servers, &new_spec).await?;
    let mut conn = servers.redis_conn().await?;
    let gadget = ProductKeys::new(&new_spec.id(), "gadget");
    let order = new_order_id("gadget");
    let answer: scripts::PurchaseAnswer =
        scripts::Purchase::new_buyer(&gadget.purchase_keys(), "alice", &order)
            .invocation()
            .invoke_async(&mut conn)
            .await?;
    assert_eq!(answer, scripts::PurchaseAnswer::Accepted { remaining: 9 });

    let store = servers.store().await?;
    let client = store.pool().get().await?;
    client
        .execute(
            "INSERT INTO flashsale_outbox (sale, sku, order_id, user_id, action, created_at)
             VALUES ($1, 'gadget', $2, 'alice', 'release', now() - interval '1 minute')",
            &[&new_spec.id().key(), &order],
        )
        .await?;

    let mut old_spec = new_spec.clone();
    old_spec.spec.products.retain(|p| p.sku == "item");
    let sweeper = Sweeper::new(
        &old_spec,
        store.clone(),
        redis_conn_of(&servers).await?,
        SweeperSettings::default(),
    );
    sweeper.sweep().await?;

    let raw: Option<String> = redis::cmd("HGET")
        .arg(gadget.orders())
        .arg(&order)
        .query_async(&mut conn)
        .await?;
    let status = raw
        .as_deref()
        .and_then(|r| OrderRecord::decode(&order, r))
        .map(|r| r.status);
    assert_eq!(status, Some(OrderStatus::Cancelled), "{raw:?}");
    let stock: i64 = redis::cmd("GET")
        .arg(gadget.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(stock, 10, "the unit came back");
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM flashsale_outbox WHERE applied_at IS NULL"
        )
        .await,
        0
    );
    Ok(())
}

/// One product whose releases Redis refuses (here its order records are not
/// a hash; in a cluster, its shard's master down, or under `replica` a
/// promoted master with no replica) holds back no other product's timeouts:
/// the other product's release is applied and marked, the broken one's row
/// waits for the next sweep, and the sweep reports the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_product_redis_refuses_holds_back_no_other_product_s_timeouts() -> Result<(), Error> {
    use dataplane::order::new_order_id;
    use dataplane::payment_timeout::{Sweeper, SweeperSettings};
    use dataplane::scripts;

    let servers = Servers::start()?;
    let doc = sale("apart", &[("item", 10, 1), ("gadget", 10, 1)]);
    warm(&servers, &doc).await?;
    let mut conn = servers.redis_conn().await?;
    let store = servers.store().await?;
    let client = store.pool().get().await?;
    let mut orders = Vec::new();
    for (sku, user) in [("item", "alice"), ("gadget", "bob")] {
        let keys = ProductKeys::new(&doc.id(), sku);
        let order = new_order_id(sku);
        let answer: scripts::PurchaseAnswer =
            scripts::Purchase::new_buyer(&keys.purchase_keys(), user, &order)
                .invocation()
                .invoke_async(&mut conn)
                .await?;
        assert_eq!(answer, scripts::PurchaseAnswer::Accepted { remaining: 9 });
        client
            .execute(
                "INSERT INTO flashsale_outbox (sale, sku, order_id, user_id, action, created_at)
                 VALUES ($1, $2, $3, $4, 'release', now() - interval '1 minute')",
                &[&doc.id().key(), &sku, &order, &user],
            )
            .await?;
        orders.push((keys, order));
    }
    // item's order records become a string: its release fails (WRONGTYPE).
    let item_orders = orders[0].0.orders();
    redis::cmd("DEL")
        .arg(&item_orders)
        .exec_async(&mut conn)
        .await?;
    redis::cmd("SET")
        .arg(&item_orders)
        .arg("not a hash")
        .exec_async(&mut conn)
        .await?;

    let sweeper = Sweeper::new(
        &doc,
        store.clone(),
        redis_conn_of(&servers).await?,
        SweeperSettings::default(),
    );
    assert!(sweeper.sweep().await.is_err(), "item's failure is reported");

    let (gadget, order) = &orders[1];
    let raw: Option<String> = redis::cmd("HGET")
        .arg(gadget.orders())
        .arg(order)
        .query_async(&mut conn)
        .await?;
    let status = raw
        .as_deref()
        .and_then(|r| OrderRecord::decode(order, r))
        .map(|r| r.status);
    assert_eq!(status, Some(OrderStatus::Cancelled), "{raw:?}");
    let unapplied = |sku: &str| {
        format!("SELECT count(*) FROM flashsale_outbox WHERE applied_at IS NULL AND sku = '{sku}'")
    };
    assert_eq!(
        count(&store, &unapplied("gadget")).await,
        0,
        "gadget's row applied"
    );
    assert_eq!(
        count(&store, &unapplied("item")).await,
        1,
        "item's row waits"
    );
    Ok(())
}
