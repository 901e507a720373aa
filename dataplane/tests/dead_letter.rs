//! An entry the database keeps refusing goes to the dead-letter stream; its
//! order is marked failed and its stock and the buyer's limit are returned,
//! exactly once even if the dead-lettering is repeated after a crash.

mod common;

use std::time::Duration;

use common::*;
use dataplane::keys::ProductKeys;
use dataplane::order::{OrderRecord, OrderStatus, new_order_id};
use dataplane::scripts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_entry_is_dead_lettered_and_its_stock_returned_once() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("dlq", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let mut conn = servers.redis_conn().await?;
    let keys = ProductKeys::new(&doc.id(), "item");

    // A real purchase through the script (stock 10 -> 9) ...
    let id = new_order_id("item");
    let (verdict, _, remaining): (String, String, String) =
        scripts::purchase(&keys.purchase_keys(), "alice", 1, &id, "")
            .invoke_async(&mut conn)
            .await?;
    assert_eq!((verdict.as_str(), remaining.as_str()), ("ok", "9"));
    // ... whose stream entry is then corrupted so PostgreSQL refuses it
    // (quantity -1 breaks the CHECK), plus an entry that cannot even be parsed.
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(keys.stream())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await?;
    redis::cmd("XDEL")
        .arg(keys.stream())
        .arg(&entries[0].0)
        .exec_async(&mut conn)
        .await?;
    redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg(&[
            "id",
            id.as_str(),
            "user",
            "alice",
            "qty",
            "-1",
            "seq",
            "1",
            "price",
            "19.99",
            "at",
            "1763700000000",
        ])
        .exec_async(&mut conn)
        .await?;
    redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg(&["garbage", "1"])
        .exec_async(&mut conn)
        .await?;

    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let dead = eventually(Duration::from_secs(20), || {
        let mut conn = conn.clone();
        let dead = keys.dead_letter();
        async move {
            redis::cmd("XLEN")
                .arg(&dead)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap_or(0)
                == 2
        }
    })
    .await;
    assert!(dead, "both entries dead-lettered");
    consumers.stop().await;

    let raw: String = redis::cmd("HGET")
        .arg(keys.orders())
        .arg(&id)
        .query_async(&mut conn)
        .await?;
    let rec = OrderRecord::decode(&id, &raw).ok_or("not an order record")?;
    assert_eq!(rec.status, OrderStatus::Failed);
    let stock: i64 = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(stock, 10, "the unit came back");
    let held: Option<i64> = redis::cmd("HGET")
        .arg(keys.buyers())
        .arg("alice")
        .query_async(&mut conn)
        .await?;
    assert_eq!(held, None, "alice may buy again");
    let pending: (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("persist")
        .query_async(&mut conn)
        .await?;
    assert_eq!(pending.0, 0, "dead-lettered entries are acknowledged");

    // Repeating the release (a crash between dead-lettering and XACK) returns nothing twice.
    let (outcome, status): (String, String) = scripts::RELEASE
        .key(keys.orders())
        .key(keys.stock())
        .key(keys.buyers())
        .key(keys.info())
        .arg(&id)
        .arg("failed")
        .arg("again")
        .invoke_async(&mut conn)
        .await?;
    assert_eq!((outcome.as_str(), status.as_str()), ("noop", "failed"));
    let stock: i64 = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(stock, 10);
    // The status counters saw one failed unit, once, and nothing persisted.
    let counters = dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
    let c = counters
        .first()
        .and_then(Option::as_ref)
        .ok_or("item not warmed")?;
    assert_eq!((c.failed, c.persisted, c.cancelled, c.sold()), (1, 0, 0, 0));
    let store = servers.store().await?;
    assert_eq!(order_rows(&store, "test/dlq").await?, (0, 0));
    Ok(())
}
