//! A product warmed by a data plane with another Redis key layout (an
//! earlier version's, which had no `rules` field, or a later one's) is
//! refused by the purchase script with 503 `redis_layout` before anything is
//! written, and a re-warm (a stock raise mid-sale) keeps the layout it had;
//! the sale's other products keep selling.

mod common;

use common::*;
use dataplane::keys::ProductKeys;

async fn buy(
    gw: &RunningGateway,
    user: &str,
    sku: &str,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let r = http()
        .post(gw.url("/v1/sales/layout/purchase"))
        .bearer_auth(token(user))
        .json(&serde_json::json!({ "sku": sku, "quantity": 1 }))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

/// Stock left and what a purchase writes: buyers, orders, stream entries.
async fn footprint(
    conn: &mut redis::aio::ConnectionManager,
    k: &ProductKeys,
) -> redis::RedisResult<(i64, i64, i64, i64)> {
    redis::pipe()
        .get(k.stock())
        .hlen(k.buyers())
        .hlen(k.orders())
        .xlen(k.stream())
        .query_async(conn)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_of_another_key_layout_is_refused_and_left_untouched() -> TestResult {
    let (redis, mut conn) = lone_redis().await?;
    let doc = sale("layout", &[("old", 5, 2), ("new", 5, 2)]);
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
    let old = ProductKeys::new(&doc.id(), "old");
    // What an earlier data plane's warm left: the fields, no `rules`.
    redis::cmd("HDEL")
        .arg(old.info())
        .arg("rules")
        .exec_async(&mut conn)
        .await?;
    let gw = RunningGateway::start(&doc, &redis.url(), "gw-0").await?;

    let (status, body) = buy(&gw, "alice", "old").await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "redis_layout", "{body}");
    assert_eq!(footprint(&mut conn, &old).await?, (5, 0, 0, 0));

    // A stock raise through warm keeps the product's layout.
    let mut raised = doc.clone();
    raised.spec.products[0].stock = 8;
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &raised.spec).await?;
    let rules: Option<String> = redis::cmd("HGET")
        .arg(old.info())
        .arg("rules")
        .query_async(&mut conn)
        .await?;
    assert_eq!(rules, None, "a re-warm must not relabel a layout-1 product");
    let (status, body) = buy(&gw, "alice", "old").await?;
    assert_eq!(
        (status, &body["error"]),
        (503, &serde_json::json!("redis_layout"))
    );
    assert_eq!(footprint(&mut conn, &old).await?, (8, 0, 0, 0));

    // A later layout is refused the same way.
    redis::cmd("HSET")
        .arg(old.info())
        .arg("rules")
        .arg("3 0 4102444700000 2 19.99")
        .exec_async(&mut conn)
        .await?;
    let (status, body) = buy(&gw, "bob", "old").await?;
    assert_eq!(
        (status, &body["error"]),
        (503, &serde_json::json!("redis_layout"))
    );
    assert_eq!(footprint(&mut conn, &old).await?, (8, 0, 0, 0));

    // The product warmed by this data plane sells, and re-warming it keeps
    // its layout and carries the new limit into the rules.
    let (status, body) = buy(&gw, "alice", "new").await?;
    assert_eq!(status, 202, "{body}");
    let new = ProductKeys::new(&doc.id(), "new");
    assert_eq!(footprint(&mut conn, &new).await?, (4, 1, 1, 1));
    let mut limited = doc.clone();
    limited.spec.products[1].per_user_limit = 1;
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &limited.spec).await?;
    let rules: String = redis::cmd("HGET")
        .arg(new.info())
        .arg("rules")
        .query_async(&mut conn)
        .await?;
    let words: Vec<&str> = rules.split(' ').collect();
    assert_eq!(
        (words[0], words[3]),
        (dataplane::keys::LAYOUT, "1"),
        "{rules}"
    );

    gw.stop().await;
    Ok(())
}

/// `release.lua` on a sale an earlier data plane started: its buyer entries
/// are the units alone, and a released order still gives its units back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_1_buyer_gets_released_units_back() -> TestResult {
    let (_redis, mut conn) = lone_redis().await?;
    let k = ProductKeys::new(&dataplane::spec::SaleId::new("test", "old"), "item");
    // What layout 1 left: two orders of one unit, the buyer holding 2.
    redis::pipe()
        .hset(k.orders(), "item.a", "accepted 1 1763700000000 9.99 alice ")
        .hset(k.orders(), "item.b", "accepted 1 1763700000001 9.99 alice ")
        .hset(k.buyers(), "alice", "2")
        .set(k.stock(), 3)
        .exec_async(&mut conn)
        .await?;
    let release = async |conn: &mut redis::aio::ConnectionManager, id: &str| {
        dataplane::scripts::RELEASE
            .key(k.orders())
            .key(k.stock())
            .key(k.buyers())
            .key(k.info())
            .arg(id)
            .arg("failed")
            .arg("test")
            .invoke_async::<(String, String)>(conn)
            .await
    };
    assert_eq!(release(&mut conn, "item.a").await?.0, "released");
    let held = || redis::cmd("HGET").arg(k.buyers()).arg("alice").clone();
    let entry: Option<String> = held().query_async(&mut conn).await?;
    assert_eq!(entry.as_deref(), Some("1"));
    assert_eq!(
        release(&mut conn, "item.b").await?,
        ("released".into(), "5".into())
    );
    let entry: Option<String> = held().query_async(&mut conn).await?;
    assert_eq!(entry, None, "a layout-1 entry goes at 0, as it did");
    Ok(())
}
