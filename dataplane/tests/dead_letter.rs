//! An entry the database keeps refusing goes to the dead-letter stream; its
//! order is marked failed and its stock and the buyer's limit are returned,
//! exactly once even if the dead-lettering is repeated after a crash.

mod common;

use std::time::Duration;

use common::*;
use dataplane::keys::{BuyerEntry, ProductKeys};
use dataplane::order::{OrderRecord, OrderStatus, new_order_id};
use dataplane::scripts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_entry_is_dead_lettered_and_its_stock_returned_once() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("dlq", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let mut conn = servers.redis_conn().await?;
    let keys = ProductKeys::new(&doc.id(), "item");

    // A real purchase through the script (stock 10 -> 9) whose stream entry
    // PostgreSQL refuses, plus an entry that cannot even be parsed.
    let id = buy_one_refused(&mut conn, &keys, 9).await?;
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
    let entry: Option<String> = redis::cmd("HGET")
        .arg(keys.buyers())
        .arg("alice")
        .query_async(&mut conn)
        .await?;
    let held = entry.as_deref().and_then(BuyerEntry::parse).map(|e| e.held);
    assert_eq!(held, Some(0), "alice may buy again");
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

/// Redis lost a buyer's entry after their first order was persisted (a
/// failover under `local` durability, say), so their next order got the same
/// sequence number. PostgreSQL refuses the clash (one row per buyer, product
/// and sequence): the new order must end failed, its unit returned, never
/// confirmed in Redis without a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_sequence_clashes_with_a_persisted_one_fails_explicitly() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("clash", &[("item", 10, 2)]);
    warm(&servers, &doc).await?;
    let mut conn = servers.redis_conn().await?;
    let keys = ProductKeys::new(&doc.id(), "item");
    let store = servers.store().await?;
    let earlier = new_order_id("item");
    persist_alices(&store, &doc, &earlier, "0-1").await?;
    // Redis has no entry for alice: this order is her "first", sequence 1.
    let (id, _) = buy_one(&mut conn, &keys, 9).await?;

    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let failed = order_reaches(
        &conn,
        &keys.orders(),
        &id,
        OrderStatus::Failed,
        Duration::from_secs(20),
    )
    .await;
    consumers.stop().await;
    let raw: Option<String> = redis::cmd("HGET")
        .arg(keys.orders())
        .arg(&id)
        .query_async(&mut conn)
        .await?;
    assert!(failed, "the clashing order ends failed, not {raw:?}");
    let stock: i64 = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(stock, 10, "its unit came back");
    // PostgreSQL holds the earlier order only.
    let client = store.pool().get().await?;
    let ids: Vec<String> = client
        .query("SELECT order_id FROM flashsale_orders", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [earlier]);
    Ok(())
}

/// An entry delivered more often than the limit whose order PostgreSQL
/// already holds (its commits kept losing their acknowledgement) is finished,
/// not dead-lettered: failing it would return stock PostgreSQL counts as sold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_delivered_entry_already_persisted_is_confirmed_not_failed() -> TestResult {
    over_delivered_entry_is_confirmed("redelivered", true).await
}

/// An entry delivered more often than the limit whose order PostgreSQL does
/// not hold yet (re-read while no replica confirmed, or claimed from a
/// consumer that died) is persisted, not failed: a delivery count is no
/// fault of the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_delivered_entry_never_persisted_is_persisted_not_failed() -> TestResult {
    over_delivered_entry_is_confirmed("reread", false).await
}

/// One order's entry delivered twelve times (its row committed first when
/// `persisted`) and two more delivered once, all pending on one consumer, so
/// its first read holds the three: every order ends confirmed with one row,
/// nothing dead-lettered, no stock given back, every entry acknowledged.
async fn over_delivered_entry_is_confirmed(name: &str, persisted: bool) -> TestResult {
    let servers = Servers::start()?;
    let doc = sale(name, &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let mut conn = servers.redis_conn().await?;
    let keys = ProductKeys::new(&doc.id(), "item");
    let (id, entry) = buy_one(&mut conn, &keys, 9).await?;
    let store = servers.store().await?;
    if persisted {
        // The row committed, as by a consumer that then died before XACK.
        assert_eq!(persist_alices(&store, &doc, &id, &entry).await?, 1);
    }
    deliver_many_times(&mut conn, &keys, &entry, 12).await?;
    let (bob, _) = buy_as(&mut conn, &keys, "bob", 8).await?;
    let (carol, _) = buy_as(&mut conn, &keys, "carol", 7).await?;
    deliver_new(&mut conn, &keys).await?;

    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let confirmed = order_reaches(
        &conn,
        &keys.orders(),
        &id,
        OrderStatus::Confirmed,
        Duration::from_secs(15),
    )
    .await;
    for other in [&bob, &carol] {
        let done = order_reaches(
            &conn,
            &keys.orders(),
            other,
            OrderStatus::Confirmed,
            Duration::from_secs(15),
        )
        .await;
        assert!(done, "{other} confirmed");
    }
    consumers.stop().await;
    let record: Option<String> = redis::cmd("HGET")
        .arg(keys.orders())
        .arg(&id)
        .query_async(&mut conn)
        .await?;
    assert!(confirmed, "the order is confirmed, not failed: {record:?}");
    let rows = store.product_orders(&doc.id(), "item").await?;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let dead: i64 = redis::cmd("XLEN")
        .arg(keys.dead_letter())
        .query_async(&mut conn)
        .await?;
    assert_eq!(dead, 0, "nothing dead-lettered");
    let remaining: i64 = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(remaining, 7, "no stock given back");
    let pending: (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("persist")
        .query_async(&mut conn)
        .await?;
    assert_eq!(pending.0, 0, "acknowledged");
    Ok(())
}

/// Redis out of memory (maxmemory with noeviction) refuses the consumer's
/// writes but not its reads, nor an XACK: a committed order's confirmation
/// and a refused order's release both fail, and neither entry may be
/// acknowledged before its order is ended. Once memory is back, the good
/// order ends confirmed and the refused one failed with its unit returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_entry_is_acknowledged_while_redis_refuses_its_order_s_writes() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("oom", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let mut conn = servers.redis_conn().await?;
    let keys = ProductKeys::new(&doc.id(), "item");
    // PostgreSQL refuses alice's order.
    let bad = buy_one_refused(&mut conn, &keys, 9).await?;
    let (good, _) = buy_as(&mut conn, &keys, "bob", 8).await?;
    let admin = conn.clone();
    let memory = |limit: &'static str| {
        let mut conn = admin.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg("noeviction")
                .arg("maxmemory")
                .arg(limit)
                .exec_async(&mut conn)
                .await
        }
    };
    // The consumer starts with memory to spare (it creates its group), and
    // reads both entries while a lock holds its inserts back; memory runs
    // out before the inserts go on.
    let store = servers.store().await?;
    let mut locker = store.pool().get().await?;
    let lock = locker.transaction().await?;
    lock.batch_execute("LOCK TABLE flashsale_orders IN ACCESS EXCLUSIVE MODE")
        .await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let read = pending_becomes(&conn, &keys, 2, Duration::from_secs(20)).await;
    assert!(read, "the consumer read both entries");
    memory("1").await?;
    lock.rollback().await?;
    // Read and attempted at least twice, still out of memory.
    let retried = eventually(Duration::from_secs(20), || {
        let mut conn = conn.clone();
        let stream = keys.stream();
        async move {
            let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(&stream)
                .arg("persist")
                .arg("-")
                .arg("+")
                .arg(10)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            pending.len() == 2 && pending.iter().all(|p| p.3 >= 2)
        }
    })
    .await;
    let pending: (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("persist")
        .query_async(&mut conn)
        .await?;
    let statuses = (
        order_status(&mut conn, &keys, &bad).await?,
        order_status(&mut conn, &keys, &good).await?,
    );
    memory("0").await?;
    assert!(retried, "both entries read again while out of memory");
    assert_eq!(
        pending.0, 2,
        "nothing acknowledged while its order's writes are refused"
    );
    assert_eq!(statuses, (OrderStatus::Accepted, OrderStatus::Accepted));

    for (id, end) in [(&good, OrderStatus::Confirmed), (&bad, OrderStatus::Failed)] {
        let reached = order_reaches(&conn, &keys.orders(), id, end, Duration::from_secs(20)).await;
        assert!(reached, "{id} ends {end:?}");
    }
    let acknowledged = pending_becomes(&conn, &keys, 0, Duration::from_secs(10)).await;
    consumers.stop().await;
    assert!(
        acknowledged,
        "both entries acknowledged once their orders ended"
    );
    let dead: i64 = redis::cmd("XLEN")
        .arg(keys.dead_letter())
        .query_async(&mut conn)
        .await?;
    assert_eq!(dead, 1, "alice's entry dead-lettered once");
    let remaining: i64 = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(remaining, 9, "alice's unit came back, bob's stays sold");
    assert_eq!(order_rows(&store, "test/oom").await?, (1, 1));
    Ok(())
}

async fn order_status(
    conn: &mut redis::aio::ConnectionManager,
    keys: &ProductKeys,
    id: &str,
) -> Result<OrderStatus, Box<dyn std::error::Error + Send + Sync>> {
    let raw: String = redis::cmd("HGET")
        .arg(keys.orders())
        .arg(id)
        .query_async(conn)
        .await?;
    Ok(OrderRecord::decode(id, &raw)
        .ok_or("not an order record")?
        .status)
}

/// Delivers `entry` (not yet delivered) to `test-consumer-0` `times` times,
/// as re-reads and claims would.
async fn deliver_many_times(
    conn: &mut redis::aio::ConnectionManager,
    keys: &ProductKeys,
    entry: &str,
    times: usize,
) -> TestResult {
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys.stream())
        .arg("persist")
        .arg("0")
        .exec_async(conn)
        .await?;
    deliver_new(conn, keys).await?;
    for _ in 1..times {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(keys.stream())
            .arg("persist")
            .arg("test-consumer-0")
            .arg(0)
            .arg(entry)
            .query_async(conn)
            .await?;
    }
    Ok(())
}

/// Delivers the stream's undelivered entries to `test-consumer-0` once.
async fn deliver_new(conn: &mut redis::aio::ConnectionManager, keys: &ProductKeys) -> TestResult {
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("persist")
        .arg("test-consumer-0")
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(())
}

/// Alice's one-unit order `order_id`, sequence 1, committed in PostgreSQL
/// as a consumer would have; how many rows were inserted.
async fn persist_alices(
    store: &dataplane::store::OrderStore,
    doc: &dataplane::spec::SaleDocument,
    order_id: &str,
    stream_id: &str,
) -> Result<u64, dataplane::store::StoreError> {
    store.ensure_inventory(&doc.id(), &doc.spec).await?;
    let row = dataplane::store::OrderRow {
        order_id: order_id.to_string(),
        sku: "item".into(),
        user_id: "alice".into(),
        seq: 1,
        quantity: 1,
        unit_price: "19.99".into(),
        // Now, so the payment timeout leaves it alone.
        accepted_at_ms: jiff::Timestamp::now().as_millisecond(),
        stream_id: stream_id.to_string(),
    };
    Ok(store.persist_batch(&doc.id(), &[row]).await?.inserted)
}

/// One unit bought by alice through the purchase script, leaving `remaining`;
/// the order id and its stream entry's id.
async fn buy_one(
    conn: &mut redis::aio::ConnectionManager,
    keys: &ProductKeys,
    remaining: i64,
) -> Result<(String, String), Box<dyn std::error::Error + Send + Sync>> {
    buy_as(conn, keys, "alice", remaining).await
}

/// [`buy_one`], its stream entry then replaced by one PostgreSQL refuses
/// (quantity -1 breaks the CHECK); the order id.
async fn buy_one_refused(
    conn: &mut redis::aio::ConnectionManager,
    keys: &ProductKeys,
    remaining: i64,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let (id, entry) = buy_one(conn, keys, remaining).await?;
    redis::cmd("XDEL")
        .arg(keys.stream())
        .arg(&entry)
        .exec_async(conn)
        .await?;
    let fields = [
        ("id", id.as_str()),
        ("user", "alice"),
        ("qty", "-1"),
        ("seq", "1"),
        ("price", "19.99"),
        ("at", "1763700000000"),
    ];
    redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg(&fields)
        .exec_async(conn)
        .await?;
    Ok(id)
}

/// Whether the stream's pending count becomes `count` within `timeout`.
async fn pending_becomes(
    conn: &redis::aio::ConnectionManager,
    keys: &ProductKeys,
    count: u64,
    timeout: Duration,
) -> bool {
    eventually(timeout, || {
        let mut conn = conn.clone();
        let stream = keys.stream();
        async move {
            redis::cmd("XPENDING")
                .arg(&stream)
                .arg("persist")
                .query_async::<(u64, Option<String>, Option<String>, redis::Value)>(&mut conn)
                .await
                .is_ok_and(|p| p.0 == count)
        }
    })
    .await
}

/// [`buy_one`] for `user`.
async fn buy_as(
    conn: &mut redis::aio::ConnectionManager,
    keys: &ProductKeys,
    user: &str,
    remaining: i64,
) -> Result<(String, String), Box<dyn std::error::Error + Send + Sync>> {
    let id = new_order_id("item");
    let answer: scripts::PurchaseAnswer =
        scripts::Purchase::new_buyer(&keys.purchase_keys(), user, &id)
            .invocation()
            .invoke_async(conn)
            .await?;
    assert_eq!(answer, scripts::PurchaseAnswer::Accepted { remaining });
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(keys.stream())
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await?;
    let entry = entries
        .last()
        .map(|e| e.0.clone())
        .ok_or("no stream entry")?;
    Ok((id, entry))
}
