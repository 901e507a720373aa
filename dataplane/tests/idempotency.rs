//! An Idempotency-Key is the buyer's for the whole sale: the same key and the
//! same request return the original order; the same key with another SKU or
//! quantity is 422 `idempotency_key_reused` naming the original order, and
//! never makes a second order. Another buyer's identical key is their own.

mod common;

use std::time::Duration;

use common::*;
use dataplane::tools::audit::wait_drained;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn keyed_purchase(
    client: &reqwest::Client,
    gw: &RunningGateway,
    sale: &str,
    user: &str,
    key: &str,
    sku: &str,
    quantity: i64,
) -> Result<(u16, serde_json::Value), BoxError> {
    let r = client
        .post(gw.url(&format!("/v1/sales/{sale}/purchase")))
        .bearer_auth(token(user))
        .header("Idempotency-Key", key)
        .json(&serde_json::json!({ "sku": sku, "quantity": quantity }))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

/// On one Redis server the key's binding runs inside the purchase call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holds_for_the_buyer_across_products_and_quantities() -> TestResult {
    key_holds(&Servers::start()?, "keys").await
}

/// On a Redis Cluster the binding (the sale's slot) is its own call before
/// the purchase (the product's slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holds_on_a_redis_cluster() -> TestResult {
    key_holds(&ClusterServers::start()?, "cluster-keys").await
}

async fn key_holds(servers: &impl Stores, name: &str) -> TestResult {
    let doc = sale(
        name,
        &[("phone", 100, 5), ("case", 100, 5), ("charger", 100, 5)],
    );
    warm(servers, &doc).await?;
    let consumers = RunningConsumers::start(&doc, servers, 1).await?;
    let gw = RunningGateway::start_with(&doc, &gateway_settings(servers, "gw-keys")).await?;
    let client = http();
    let buy = async |user: &str, key: &str, sku: &str, quantity: i64| {
        keyed_purchase(&client, &gw, name, user, key, sku, quantity).await
    };

    let (status, first) = buy("alice", "k-1", "phone", 1).await?;
    assert_eq!(status, 202, "{first}");
    let order = first["orderId"].clone();

    // The same key on other products: refused, naming the original order.
    for sku in ["case", "charger"] {
        let (status, body) = buy("alice", "k-1", sku, 1).await?;
        assert_eq!(status, 422, "{sku}: {body}");
        assert_eq!(body["error"], "idempotency_key_reused", "{body}");
        assert_eq!(body["orderId"], order, "{body}");
        assert_eq!(body["sku"], "phone", "{body}");
        assert_eq!(body["quantity"], 1, "{body}");
    }
    // The same key and product with another quantity: refused too.
    let (status, body) = buy("alice", "k-1", "phone", 2).await?;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["orderId"], order, "{body}");
    // The same request again: the original order.
    let (status, again) = buy("alice", "k-1", "phone", 1).await?;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["orderId"], order);
    // Another buyer's identical key is theirs.
    let (status, bob) = buy("bob", "k-1", "case", 1).await?;
    assert_eq!(status, 202, "{bob}");
    assert_ne!(bob["orderId"], order);
    // A new key from alice buys again (within her limits).
    let (status, second) = buy("alice", "k-2", "case", 1).await?;
    assert_eq!(status, 202, "{second}");

    // Three orders in all, each persisted once.
    let mut conn = redis_conn_of(servers).await?;
    let store = store_of(servers).await?;
    assert!(
        wait_drained(
            &mut conn,
            &store,
            &doc.id(),
            &doc.spec,
            Duration::from_secs(30)
        )
        .await?
    );
    let (rows, distinct) = order_rows(&store, &format!("test/{name}")).await?;
    assert_eq!((rows, distinct), (3, 3));
    // The bindings expire on their own, after the sale and its payment timeout.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(dataplane::keys::SaleKeys::new(&doc.id()).idempotency())
        .query_async(&mut conn)
        .await?;
    let floor = doc.spec.end_time.as_millisecond() - jiff::Timestamp::now().as_millisecond();
    assert!(ttl > floor, "ttl {ttl} ms, sale ends in {floor} ms");

    gw.stop().await;
    consumers.stop().await;
    Ok(())
}

/// A key's binding expires with the sale: the expiry moves later with a
/// later end, never earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_expire_later_never_earlier() -> TestResult {
    let (_redis, mut conn) = lone_redis().await?;
    let key = "fs:{test/expiry}:idem";
    let far = jiff::Timestamp::now().as_millisecond() + 3_600_000;
    let mut expiry_after = async |field: &str, until: i64| -> redis::RedisResult<i64> {
        let claim = dataplane::scripts::KeyClaim {
            hash: key,
            request: "item 1",
            keep_until_ms: until,
        };
        let _: (String, String, String) = claim.invocation(field).invoke_async(&mut conn).await?;
        redis::cmd("PEXPIRETIME")
            .arg(key)
            .query_async(&mut conn)
            .await
    };
    assert_eq!(expiry_after("a\x1fk1", far).await?, far);
    assert_eq!(
        expiry_after("b\x1fk2", far - 60_000).await?,
        far,
        "never earlier"
    );
    assert_eq!(
        expiry_after("c\x1fk3", far + 60_000).await?,
        far + 60_000,
        "later"
    );
    Ok(())
}

/// A server without the scripts (restarted, failed over to a node that never
/// loaded them, `SCRIPT FLUSH`) still answers: the call loads the script and
/// sends itself again, for the key's binding and for the purchase alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_scripts_loads_them_and_answers() -> TestResult {
    let (_redis, mut conn) = lone_redis().await?;
    let sale = dataplane::spec::SaleId::new("test", "noscript");
    let keys = dataplane::keys::ProductKeys::new(&sale, "item").purchase_keys();
    let far = jiff::Timestamp::now().as_millisecond() + 3_600_000;
    for round in ["first", "second"] {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await?;
        let claim = dataplane::scripts::KeyClaim {
            hash: "fs:{test/noscript}:idem",
            request: "item 1",
            keep_until_ms: far,
        };
        let (verdict, first, _): (String, String, String) = claim
            .invocation(&format!("alice\x1f{round}"))
            .invoke_async(&mut conn)
            .await?;
        assert_eq!(
            (verdict.as_str(), first.as_str()),
            ("new", "item 1"),
            "{round}"
        );
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await?;
        // Nothing warmed: the script runs and says the sale is not ready.
        let answer: dataplane::scripts::PurchaseAnswer = dataplane::scripts::Purchase::new_buyer(
            &keys,
            "alice",
            "item.01ARZ3NDEKTSV4RRFFQ69G5FAV",
        )
        .invocation()
        .invoke_async(&mut conn)
        .await?;
        assert_eq!(
            answer,
            dataplane::scripts::PurchaseAnswer::Other(
                "nosale".into(),
                String::new(),
                String::new()
            ),
            "{round}"
        );
    }
    Ok(())
}

/// A sold-out pod answers a keyed request from its snapshot of the winners'
/// keys. A unit that comes back (a payment timeout) and is sold again before
/// this pod's stock reading sees it leaves the pod sold out, and the new
/// winner's retry must still find their order there, not a 410.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_resold_while_a_pod_stays_sold_out_is_found_by_its_winner_s_retry() -> TestResult {
    use dataplane::keys::ProductKeys;
    use dataplane::order::new_order_id;
    use dataplane::scripts;

    let servers = Servers::start()?;
    let doc = sale("resold", &[("item", 1, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw").await?;
    let client = http();
    let (status, first) = keyed_purchase(&client, &gw, "resold", "alice", "ka", "item", 1).await?;
    assert_eq!(status, 202, "{first}");
    let (status, _) = keyed_purchase(&client, &gw, "resold", "bob", "kb", "item", 1).await?;
    assert_eq!(status, 410);
    // The snapshot is loaded once an unused key is answered without a token.
    let loaded = eventually(Duration::from_secs(5), || async {
        client
            .post(gw.url("/v1/sales/resold/purchase"))
            .header("idempotency-key", "never-used")
            .json(&serde_json::json!({"sku": "item", "quantity": 1}))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 410)
    })
    .await;
    assert!(loaded, "replay snapshot loaded");

    // Alice's unit comes back and carol wins it at once, by another pod.
    let keys = ProductKeys::new(&doc.id(), "item");
    let mut conn = servers.redis_conn().await?;
    let alices = first["orderId"].as_str().ok_or("no orderId")?;
    let (released, _): (String, String) = scripts::RELEASE
        .key(keys.orders())
        .key(keys.stock())
        .key(keys.buyers())
        .key(keys.info())
        .arg(alices)
        .arg("cancelled")
        .arg("payment timeout")
        .invoke_async(&mut conn)
        .await?;
    assert_eq!(released, "released");
    let carols = new_order_id("item");
    let purchase_keys = keys.purchase_keys();
    let answer: scripts::PurchaseAnswer = scripts::Purchase {
        idempotency_field: "carol\x1fkc",
        ..scripts::Purchase::new_buyer(&purchase_keys, "carol", &carols)
    }
    .invocation()
    .invoke_async(&mut conn)
    .await?;
    assert_eq!(answer, scripts::PurchaseAnswer::Accepted { remaining: 0 });

    let found = eventually(Duration::from_secs(5), || async {
        keyed_purchase(&client, &gw, "resold", "carol", "kc", "item", 1)
            .await
            .is_ok_and(|(s, body)| s == 202 && body["orderId"] == carols.as_str())
    })
    .await;
    assert!(found, "carol's retry gets her order on the sold-out pod");
    gw.stop().await;
    Ok(())
}
