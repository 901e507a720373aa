//! Mid-sale changes reach running gateways and consumers without a restart,
//! through `stock::apply` (the operator's code path), and lose no accepted
//! order: stock raised three times and cut once under a crowd, an end time
//! extended, a rate limit raised, refused changes that change nothing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dataplane::spec::{RateLimit, SaleDocument, SaleSpec};
use dataplane::stock::{self, ApplyError};
use dataplane::store::OrderStore;
use dataplane::tools::audit::{audit, wait_drained};
use dataplane::tools::crowd::{CrowdConfig, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn with_stock(spec: &SaleSpec, sku: &str, stock: i64) -> SaleSpec {
    let mut next = spec.clone();
    for p in &mut next.products {
        if p.sku == sku {
            p.stock = stock;
        }
    }
    next
}

async fn apply(
    servers: &Servers,
    store: &OrderStore,
    doc: &SaleDocument,
    spec: &SaleSpec,
) -> Result<stock::Applied, ApplyError> {
    let mut conn = servers.redis_conn().await?;
    stock::apply(&mut conn, store, &doc.id(), spec, jiff::Timestamp::now()).await
}

/// Units sold of `sku` by Redis' counters.
async fn sold(servers: &Servers, doc: &SaleDocument, sku: &str) -> Result<i64, BoxError> {
    let mut conn = servers.redis_conn().await?;
    let counters = dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
    Ok(counters
        .iter()
        .flatten()
        .find(|c| c.sku == sku)
        .map(|c| c.sold())
        .unwrap_or(0))
}

async fn dead_letters(servers: &Servers, doc: &SaleDocument) -> Result<i64, BoxError> {
    let mut conn = servers.redis_conn().await?;
    let mut total = 0;
    for p in &doc.spec.products {
        let keys = dataplane::keys::ProductKeys::new(&doc.id(), &p.sku);
        let n: i64 = redis::cmd("XLEN")
            .arg(keys.dead_letter())
            .query_async(&mut conn)
            .await?;
        total += n;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_raised_three_times_and_cut_once_under_a_crowd_fails_no_order() -> TestResult {
    let servers = Servers::start()?;
    let store = servers.store().await?;
    // The pods boot with this document and are never restarted.
    let doc = sale("restock", &[("hot", 300, 1), ("calm", 50, 1)]);
    apply(&servers, &store, &doc, &doc.spec).await?;
    let consumers = RunningConsumers::start(&doc, &servers, 2).await?;
    let gw1 = RunningGateway::start(&doc, &servers.redis.url(), "gw-1").await?;
    let gw2 = RunningGateway::start(&doc, &servers.redis.url(), "gw-2").await?;
    let gateways: Vec<SocketAddr> = vec![gw1.addr, gw2.addr];

    let crowd = tokio::spawn(dataplane::tools::crowd::run(CrowdConfig {
        gateways,
        sale: "restock".into(),
        skus: vec!["hot".into(), "calm".into()],
        buyers: dataplane::tools::crowd::Buyers::Random(6_000),
        connections: 32,
        requests: 8_000,
        max_duration: Duration::from_secs(60),
        retry_fraction: 0.05,
        rate: Some(1_000.0),
        token_secret: SECRET.to_vec(),
        target: Target::Purchase,
        source_ips: 8,
    }));

    // Raise, raise, raise and at once cut part of it back, while buying.
    let mut spec = doc.spec.clone();
    let mut changes = Vec::new();
    for step in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let raise = if step == 2 { 600 } else { 300 };
        let raised = with_stock(&spec, "hot", spec.products[0].stock + raise);
        apply(&servers, &store, &doc, &raised).await?;
        changes.push(raised.products[0].stock);
        spec = raised;
    }
    // The cut races the crowd: what is sold moves under it, so a refused cut
    // is retried a little higher, as a person editing the sale would.
    let mut cut = None;
    for attempt in 0..10 {
        let current = spec.products[0].stock;
        let target = (current - 200).max(sold(&servers, &doc, "hot").await? + 20 * attempt);
        if target >= current {
            break;
        }
        let candidate = with_stock(&spec, "hot", target);
        match apply(&servers, &store, &doc, &candidate).await {
            Ok(_) => {
                cut = Some(candidate);
                break;
            }
            Err(ApplyError::Refused(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let Some(cut) = cut else {
        panic!("every cut was refused; changes so far {changes:?}");
    };
    changes.push(cut.products[0].stock);
    spec = cut;
    assert!(
        changes[3] < changes[2],
        "the last change is a cut: {changes:?}"
    );

    let result = crowd.await??;
    let tally = format!(
        "sent {} accepted {} sold_out {} limit {} 5xx {} transport {} other 4xx {} violations {}",
        result.sent,
        result.accepted,
        result.sold_out,
        result.limit_reached,
        result.server_errors,
        result.transport_errors,
        result.other_client_errors,
        result.idempotency_violations
    );
    // A 503 (Redis slow on this shared machine) is an honest answer that
    // sells nothing; what must hold is below: no 202 lost or failed.
    assert_eq!(
        result.transport_errors + result.other_client_errors,
        0,
        "{tally}"
    );
    assert!(result.server_errors * 100 <= result.sent, "{tally}");
    assert_eq!(result.idempotency_violations, 0, "{tally}");
    assert!(result.accepted > 300, "the raises sold more: {tally}");

    let mut conn = servers.redis_conn().await?;
    let live_doc = SaleDocument {
        metadata: doc.metadata.clone(),
        spec: spec.clone(),
    };
    assert!(
        wait_drained(
            &mut conn,
            &store,
            &live_doc.id(),
            &live_doc.spec,
            Duration::from_secs(60)
        )
        .await?
    );
    let report = audit(
        &mut conn,
        &store,
        &live_doc.id(),
        &live_doc.spec,
        &result.orders,
        0,
    )
    .await?;
    assert!(report.passed(), "{:?}", report.problems());
    assert_eq!(report.failed_orders, 0, "no accepted order failed");
    assert!(report.lost_orders.is_empty());
    assert_eq!(
        dead_letters(&servers, &doc).await?,
        0,
        "nothing dead-lettered"
    );
    // At rest both stores hold the final stock, and sold agrees.
    let inventory = store.inventory(&doc.id()).await?;
    for p in &report.products {
        let row = inventory.iter().find(|r| r.sku == p.sku);
        assert_eq!(row.map(|r| r.stock), Some(p.stock), "{p:?}");
        assert_eq!(row.map(|r| r.sold), Some(p.sold_in_redis), "{p:?}");
        assert_eq!(p.oversold, 0);
    }
    assert_eq!(report.products[0].stock, spec.products[0].stock);
    let accepted: i64 = report.products.iter().map(|p| p.units).sum();
    // A purchase answered 503 store_timeout may still have been decided
    // after the gateway stopped waiting (a loaded machine): its row is
    // persisted with no 202 seen for it, and such rows came only from 5xx.
    let unanswered = report.unanswered_rows.unwrap_or(0);
    assert_eq!(
        accepted as u64,
        result.accepted + unanswered as u64,
        "accepted + unanswered = persisted: {tally}"
    );
    assert!(unanswered as u64 <= result.server_errors, "{tally}");

    gw1.stop().await;
    gw2.stop().await;
    consumers.stop().await;
    Ok(())
}

/// One purchase of one unit of `sku` as `user`; the answer's status.
async fn buy(
    client: &reqwest::Client,
    gw: &RunningGateway,
    user: &str,
    sku: &str,
) -> Result<u16, BoxError> {
    let sale = gw.gateway.sale.name.clone();
    let r = client
        .post(gw.url(&format!("/v1/sales/{sale}/purchase")))
        .bearer_auth(token(user))
        .json(&serde_json::json!({ "sku": sku, "quantity": 1 }))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_time_and_rate_limit_change_in_running_gateways() -> TestResult {
    let servers = Servers::start()?;
    let store = servers.store().await?;
    let now = jiff::Timestamp::now();
    let mut doc = sale_window(
        "live",
        &[("phone", 10_000, 5)],
        now - jiff::SignedDuration::from_secs(1),
        now + jiff::SignedDuration::from_secs(4),
    );
    doc.spec.rate_limits.global = Some(RateLimit {
        requests_per_second: 2,
        burst: 2,
    });
    apply(&servers, &store, &doc, &doc.spec).await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-live").await?;
    let client = http();

    // The global budget of 2/s refuses most of a quick burst.
    let mut limited = 0;
    for i in 0..20 {
        if buy(&client, &gw, &format!("early-{i}"), "phone").await? == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 15, "{limited} of 20 rate limited");

    // Extend the end by a minute and raise the global rate, in one edit.
    let mut next = doc.spec.clone();
    next.end_time = now + jiff::SignedDuration::from_secs(60);
    next.rate_limits.global = Some(RateLimit {
        requests_per_second: 10_000,
        burst: 1_000,
    });
    let applied = apply(&servers, &store, &doc, &next).await?;
    assert!(applied.spec_changed);

    // Within a couple of seconds the running gateway takes both.
    let gateway = Arc::clone(&gw.gateway);
    let want = next.clone();
    assert!(
        eventually(Duration::from_secs(3), || {
            let g = Arc::clone(&gateway);
            let w = want.clone();
            async move {
                let spec = g.spec.load();
                spec.end_time == w.end_time && g.limits.limits() == w.rate_limits
            }
        })
        .await,
        "the gateway did not take the new spec"
    );
    let mut passed = 0;
    for i in 0..20 {
        if buy(&client, &gw, &format!("raised-{i}"), "phone").await? == 202 {
            passed += 1;
        }
    }
    assert_eq!(passed, 20, "the raised rate holds");

    // Past the old end, the same gateway process still sells.
    let old_end = doc.spec.end_time;
    while jiff::Timestamp::now() < old_end + jiff::SignedDuration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(buy(&client, &gw, "late-buyer", "phone").await?, 202);

    // A per-user limit cut applies too: late-buyer holds 1, the limit becomes 1.
    let mut cut = next.clone();
    cut.products[0].per_user_limit = 1;
    apply(&servers, &store, &doc, &cut).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(buy(&client, &gw, "late-buyer", "phone").await?, 409);

    gw.stop().await;
    consumers.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_cannot_apply_changes_nothing() -> TestResult {
    let servers = Servers::start()?;
    let store = servers.store().await?;
    let doc = sale("refuse", &[("phone", 100, 5)]);
    apply(&servers, &store, &doc, &doc.spec).await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-refuse").await?;
    let client = http();
    for i in 0..10 {
        assert_eq!(buy(&client, &gw, &format!("u{i}"), "phone").await?, 202);
    }
    let mut conn = servers.redis_conn().await?;
    let before = dataplane::live::read(&mut conn, &doc.id()).await?;

    let below = with_stock(&doc.spec, "phone", 5);
    let mut past = doc.spec.clone();
    past.end_time = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
    let mut zero_limit = doc.spec.clone();
    zero_limit.products[0].per_user_limit = 0;
    for (spec, reason) in [
        (below, "StockBelowSold"),
        (past, "EndInPast"),
        (zero_limit, "ZeroPerUserLimit"),
    ] {
        match apply(&servers, &store, &doc, &spec).await {
            Err(ApplyError::Refused(problems)) => {
                assert!(
                    problems.iter().any(|p| p.reason == reason),
                    "{reason}: {problems:?}"
                );
            }
            other => panic!("{reason}: expected a refusal, got {other:?}"),
        }
    }
    // Nothing moved: the published spec, both stocks, and the sale sells on.
    assert_eq!(dataplane::live::read(&mut conn, &doc.id()).await?, before);
    let row = store.inventory_row(&doc.id(), "phone").await?;
    assert_eq!(row.map(|r| r.stock), Some(100));
    assert_eq!(sold(&servers, &doc, "phone").await?, 10);
    let counters = dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
    assert_eq!(counters[0].as_ref().map(|c| c.stock), Some(100));
    assert_eq!(buy(&client, &gw, "after", "phone").await?, 202);

    gw.stop().await;
    consumers.stop().await;
    Ok(())
}

/// A product's catalog entry (stock, price, limit, window, rules) and the
/// units it has left.
async fn product_keys(
    conn: &mut redis::aio::ConnectionManager,
    keys: &dataplane::keys::ProductKeys,
) -> Result<(std::collections::BTreeMap<String, String>, i64), redis::RedisError> {
    let info = redis::cmd("HGETALL")
        .arg(keys.info())
        .query_async(conn)
        .await?;
    let left = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(conn)
        .await?;
    Ok((info, left))
}

/// Sales go on between an apply's check and its writes, so a cut the check
/// allowed may be below sold by the time it is written: that cut is refused,
/// and the cuts written before it are put back, rules and stock, so the
/// refusal changes nothing, as it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_overtaken_by_sales_puts_back_the_cuts_before_it() -> TestResult {
    let servers = Servers::start()?;
    let store = servers.store().await?;
    let doc = sale("overtaken", &[("phone", 100, 5), ("case", 100, 5)]);
    apply(&servers, &store, &doc, &doc.spec).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-overtaken").await?;
    let client = http();
    let mut conn = servers.redis_conn().await?;
    let id = doc.id();
    // What the apply's check read: nothing sold yet, so both cuts pass it.
    let checked = dataplane::counters::product_counters(&mut conn, &id, &doc.spec).await?;
    let mut next = with_stock(&with_stock(&doc.spec, "phone", 50), "case", 5);
    next.products[0].per_user_limit = 2;
    next.products[0].price = "29.99".parse()?;
    let phone = dataplane::keys::ProductKeys::new(&id, "phone");
    let before = product_keys(&mut conn, &phone).await?;
    // Then the crowd buys ten cases: the cut to five is now below sold.
    for i in 0..10 {
        assert_eq!(buy(&client, &gw, &format!("u{i}"), "case").await?, 202);
    }
    let written =
        dataplane::warm::write_products(&mut conn, &id, &next, &checked, Some(&doc.spec)).await;
    match written {
        Err(dataplane::warm::WarmError::BelowSold { sku, sold, .. }) => {
            assert_eq!((sku.as_str(), sold), ("case", 10));
        }
        other => panic!("expected the case's cut refused, got {other:?}"),
    }
    // The phone's cut, written first, is undone: stock, price, limit, rules.
    assert_eq!(product_keys(&mut conn, &phone).await?, before);
    assert_eq!(sold(&servers, &doc, "case").await?, 10);
    for i in 0..3 {
        assert_eq!(
            buy(&client, &gw, "phone-buyer", "phone").await?,
            202,
            "unit {i}"
        );
    }

    gw.stop().await;
    Ok(())
}

/// One apply of a sale at a time: while another holds the sale's lock, an
/// apply changes nothing and says who holds it; once released, it applies.
/// Applies racing each other with different stocks leave PostgreSQL covering
/// every unit Redis can sell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_of_one_sale_take_turns() -> TestResult {
    let servers = Servers::start()?;
    let store = servers.store().await?;
    let doc = sale("turns", &[("phone", 100, 5), ("case", 100, 5)]);
    apply(&servers, &store, &doc, &doc.spec).await?;
    let mut conn = servers.redis_conn().await?;
    let lock = dataplane::keys::SaleKeys::new(&doc.id()).apply_lock();
    // Released after a successful apply.
    let held: Option<String> = redis::cmd("GET").arg(&lock).query_async(&mut conn).await?;
    assert_eq!(held, None);

    redis::cmd("SET")
        .arg(&lock)
        .arg("other-operator/1/x")
        .exec_async(&mut conn)
        .await?;
    let raised = with_stock(&doc.spec, "phone", 300);
    match apply(&servers, &store, &doc, &raised).await {
        Err(ApplyError::Busy { holder }) => assert_eq!(holder, "other-operator/1/x"),
        other => panic!("expected Busy, got {other:?}"),
    }
    let counters = dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
    assert_eq!(counters[0].as_ref().map(|c| c.stock), Some(100));
    let row = store.inventory_row(&doc.id(), "phone").await?;
    assert_eq!(row.map(|r| r.stock), Some(100));
    redis::cmd("DEL").arg(&lock).exec_async(&mut conn).await?;
    apply(&servers, &store, &doc, &raised).await?;

    // Pairs of applies at once, one raising what the other cuts.
    for round in 0..20i64 {
        let a = with_stock(&with_stock(&doc.spec, "phone", 200 + round), "case", 50);
        let b = with_stock(&with_stock(&doc.spec, "phone", 60), "case", 250 + round);
        let (ra, rb) = tokio::join!(
            apply(&servers, &store, &doc, &a),
            apply(&servers, &store, &doc, &b)
        );
        for r in [&ra, &rb] {
            assert!(
                matches!(r, Ok(_) | Err(ApplyError::Busy { .. })),
                "round {round}: {r:?}"
            );
        }
        assert!(ra.is_ok() || rb.is_ok(), "round {round}: neither applied");
        let counters =
            dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
        for c in counters.iter().flatten() {
            let row = store.inventory_row(&doc.id(), &c.sku).await?;
            let database = row.map(|r| r.stock).unwrap_or(0);
            assert!(
                database >= c.stock,
                "round {round}: {} Redis {} above PostgreSQL {database}",
                c.sku,
                c.stock
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_removed_mid_sale_loses_no_accepted_order() -> TestResult {
    let servers = Servers::start()?;
    let store = servers.store().await?;
    let doc = sale("shrink", &[("phone", 100, 5), ("case", 100, 5)]);
    apply(&servers, &store, &doc, &doc.spec).await?;
    // A gateway of the old spec sells the case; its consumer pod is already
    // gone (rolled), so the orders wait in the case's stream.
    let old = RunningGateway::start(&doc, &servers.redis.url(), "gw-old").await?;
    let client = http();
    for i in 0..10 {
        assert_eq!(buy(&client, &old, &format!("c{i}"), "case").await?, 202);
    }

    // The case leaves the sale; the new consumer pods boot with the new spec.
    let mut next = doc.spec.clone();
    next.products.retain(|p| p.sku == "phone");
    apply(&servers, &store, &doc, &next).await?;
    let new_doc = SaleDocument {
        metadata: doc.metadata.clone(),
        spec: next.clone(),
    };
    let consumers = RunningConsumers::start(&new_doc, &servers, 1).await?;
    let new = RunningGateway::start(&new_doc, &servers.redis.url(), "gw-new").await?;

    // Every case order accepted before the removal is persisted.
    let case_rows = || async {
        let client = store.pool().get().await.ok()?;
        let row = client
            .query_one(
                "SELECT count(*) FROM flashsale_orders WHERE sale = $1 AND sku = 'case'",
                &[&doc.id().key()],
            )
            .await
            .ok()?;
        Some(row.get::<_, i64>(0))
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            case_rows().await == Some(10)
        })
        .await,
        "case orders persisted: {:?} of 10",
        case_rows().await
    );
    // A buyer looks their case order up on a new pod.
    let row = store
        .pool()
        .get()
        .await?
        .query_one(
            "SELECT order_id, user_id FROM flashsale_orders WHERE sale = $1 AND sku = 'case' LIMIT 1",
            &[&doc.id().key()],
        )
        .await?;
    let (order, user): (String, String) = (row.get(0), row.get(1));
    let looked = client
        .get(new.url(&format!("/v1/orders/{order}")))
        .bearer_auth(token(&user))
        .send()
        .await?;
    assert_eq!(looked.status().as_u16(), 200, "{:?}", looked.text().await);
    let mut conn = servers.redis_conn().await?;
    let lag = dataplane::lag::consumer_lag(&mut conn, &doc.id(), &next).await?;
    assert_eq!(lag.backlog(), 0, "{lag:?}");
    assert!(lag.streams.iter().any(|s| s.sku == "case"), "{lag:?}");

    // The new gateway does not sell the case; the old one stops once it has
    // read the live spec (within a second or so), and what it sold until
    // then is persisted too. Both sell the phone.
    assert_eq!(buy(&client, &new, "n1", "case").await?, 404);
    let mut late = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match buy(&client, &old, &format!("late{late}"), "case").await? {
            202 => late += 1,
            404 => break,
            other => panic!("the old gateway answered {other} for the removed product"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old gateway still sells the removed product"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        eventually(Duration::from_secs(15), || async {
            case_rows().await == Some(10 + late)
        })
        .await,
        "case orders persisted: {:?} of {}",
        case_rows().await,
        10 + late
    );
    assert_eq!(buy(&client, &old, "p1", "phone").await?, 202);
    assert_eq!(buy(&client, &new, "p2", "phone").await?, 202);

    old.stop().await;
    new.stop().await;
    // The audit of the live spec covers the removed product's books too.
    let drained = dataplane::tools::audit::wait_drained(
        &mut conn,
        &store,
        &doc.id(),
        &next,
        Duration::from_secs(15),
    )
    .await?;
    consumers.stop().await;
    assert!(drained, "both products' books agree");
    let report =
        dataplane::tools::audit::audit(&mut conn, &store, &doc.id(), &next, &[], 0).await?;
    let case = report
        .products
        .iter()
        .find(|p| p.sku == "case")
        .ok_or("the removed product is audited")?;
    assert_eq!((case.units, case.consistent), (10 + late, true), "{case:?}");
    assert!(report.passed(), "{:?}", report.problems());
    Ok(())
}
