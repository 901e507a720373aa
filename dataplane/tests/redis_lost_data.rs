//! Redis loses a running sale's data (a restart without AOF; here FLUSHALL,
//! with the gateway and consumer processes running through it). A spec edit
//! then must not warm the product anew: its sold units would sell twice. A
//! person restores it from PostgreSQL (`flashsale warm --restore`): stock
//! left, buyers' holdings and order records come back, a product that had
//! sold nothing is warmed anew, the consumer that ran through the loss reads
//! both streams again, and the books agree.

mod common;

use std::time::Duration;

use common::*;
use dataplane::spec::SaleSpec;
use dataplane::stock::{self, ApplyError};
use dataplane::tools::audit::{audit, wait_drained};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn buy(
    client: &reqwest::Client,
    gw: &RunningGateway,
    user: &str,
) -> Result<(u16, serde_json::Value), BoxError> {
    buy_sku(client, gw, user, "phone").await
}

async fn buy_sku(
    client: &reqwest::Client,
    gw: &RunningGateway,
    user: &str,
    sku: &str,
) -> Result<(u16, serde_json::Value), BoxError> {
    let r = client
        .post(gw.url("/v1/sales/lost/purchase"))
        .bearer_auth(token(user))
        .json(&serde_json::json!({ "sku": sku, "quantity": 1 }))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_redis_lost_is_refused_a_new_warm_and_restored_from_postgres() -> TestResult {
    let servers = Servers::start()?;
    let store = servers.store().await?;
    // The case sells nothing before the loss: it is simply warmed again.
    let doc = sale("lost", &[("phone", 20, 3), ("case", 5, 1)]);
    let id = doc.id();
    let mut conn = servers.redis_conn().await?;
    let now = jiff::Timestamp::now;
    stock::apply(&mut conn, &store, &id, &doc.spec, now()).await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-lost").await?;
    let client = http();
    let mut first = None;
    for user in ["alice", "alice", "bob", "carol"] {
        let (status, body) = buy(&client, &gw, user).await?;
        assert_eq!(status, 202, "{body}");
        first.get_or_insert(body["orderId"].as_str().unwrap_or_default().to_string());
    }
    let persisted = || async { order_rows(&store, &id.key()).await.map(|r| r.0).ok() };
    assert!(
        eventually(Duration::from_secs(10), || async {
            persisted().await == Some(4)
        })
        .await
    );

    // Redis loses everything.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;

    // An edit must not warm the phone anew at its full stock.
    let mut raised: SaleSpec = doc.spec.clone();
    raised.products[0].stock = 30;
    match stock::apply(&mut conn, &store, &id, &raised, now()).await {
        Err(ApplyError::Refused(problems)) => {
            assert!(
                problems.iter().any(|p| p.reason == "StockMissing"),
                "{problems:?}"
            );
        }
        other => panic!("expected StockMissing, got {other:?}"),
    }
    let counters = dataplane::counters::product_counters(&mut conn, &id, &raised).await?;
    assert!(counters[0].is_none(), "nothing was warmed: {counters:?}");

    // The deliberate way back: restore from PostgreSQL, then the edit.
    let restored = dataplane::restore::restore_lost(&mut conn, &store, &id, &raised).await?;
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(
        (restored[0].orders, restored[0].buyers, restored[0].sold),
        (4, 3, 4)
    );
    assert_eq!(restored[0].remaining, 26);
    stock::apply(&mut conn, &store, &id, &raised, now()).await?;

    // Buyers keep what they hold: alice (2 of 3) may buy one more, not two.
    assert_eq!(buy(&client, &gw, "alice").await?.0, 202);
    let (status, body) = buy(&client, &gw, "alice").await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["held"], 3, "{body}");
    assert_eq!(buy(&client, &gw, "dave").await?.0, 202);
    // The consumer that ran through the loss persists them, although the
    // case's stream (nothing sold of it since) does not exist yet.
    assert!(
        eventually(Duration::from_secs(10), || async {
            persisted().await == Some(6)
        })
        .await,
        "the phone orders after the restore were not persisted: {:?}",
        persisted().await
    );
    assert_eq!(buy_sku(&client, &gw, "erin", "case").await?.0, 202);
    // Her first order can still be looked up.
    let first = first.unwrap_or_default();
    let r = client
        .get(gw.url(&format!("/v1/orders/{first}")))
        .bearer_auth(token("alice"))
        .send()
        .await?;
    let status = r.status().as_u16();
    let order: serde_json::Value = r.json().await?;
    assert_eq!(status, 200, "{order}");
    assert_eq!(order["status"], "confirmed", "{order}");

    // The case's order too, and Redis' counters agree with PostgreSQL again.
    let doc_now = dataplane::spec::SaleDocument {
        metadata: doc.metadata.clone(),
        spec: raised.clone(),
    };
    assert!(
        wait_drained(
            &mut conn,
            &store,
            &id,
            &doc_now.spec,
            Duration::from_secs(20)
        )
        .await?,
        "the orders after the restore were not persisted"
    );
    assert_eq!(persisted().await, Some(7));
    let report = audit(&mut conn, &store, &id, &doc_now.spec, &[], 0).await?;
    assert!(report.passed(), "{:?}", report.problems());
    let p = &report.products[0];
    assert_eq!((p.stock, p.remaining, p.units), (30, 24, 6), "{p:?}");
    let c = &report.products[1];
    assert_eq!((c.stock, c.remaining, c.units), (5, 4, 1), "{c:?}");

    gw.stop().await;
    consumers.stop().await;
    Ok(())
}
