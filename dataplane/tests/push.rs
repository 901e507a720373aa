//! Push over WebSocket: a buyer learns accepted then confirmed without
//! polling; a reconnect with what it last saw brings what it missed; an
//! event reaches only the gateway pod holding the user's socket.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use dataplane::keys::ProductKeys;
use dataplane::order::{OrderRecord, OrderStatus};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const BOUND: Duration = Duration::from_secs(10);

/// Connects with the token in the Authorization header.
async fn connect(
    gw: &RunningGateway,
    user: &str,
    query: &str,
) -> Result<Socket, Box<dyn std::error::Error + Send + Sync>> {
    let mut req = format!("ws://{}/v1/ws{query}", gw.addr).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", token(user)).parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(socket)
}

/// The next JSON text message, within the test's bound.
async fn next_json(socket: &mut Socket) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    loop {
        let msg = tokio::time::timeout(BOUND, socket.next())
            .await
            .map_err(|_| "no message within the bound")?
            .ok_or("socket closed")??;
        if let Message::Text(t) = msg {
            return Ok(serde_json::from_str(t.as_str())?);
        }
    }
}

/// The events a connection sends before `synced`, and the `synced` message.
async fn read_snapshot(
    socket: &mut Socket,
) -> Result<(Vec<Value>, Value), Box<dyn std::error::Error + Send + Sync>> {
    let mut events = Vec::new();
    loop {
        let e = next_json(socket).await?;
        if e["type"] == "synced" {
            return Ok((events, e));
        }
        events.push(e);
    }
}

async fn buy(
    gw: &RunningGateway,
    sale: &str,
    user: &str,
    sku: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let (status, body) = buy_one(gw, sale, user, sku).await?;
    assert_eq!(status, 202, "{body}");
    Ok(body["orderId"].as_str().ok_or("no orderId")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyer_is_told_accepted_then_confirmed() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("push", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-a").await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;

    let mut socket = connect(&gw, "alice", "").await?;
    let hello = next_json(&mut socket).await?;
    assert_eq!(hello, serde_json::json!({"type": "synced", "orders": 0}));

    let order = buy(&gw, "push", "alice", "item").await?;
    let first = next_json(&mut socket).await?;
    assert_eq!(first["type"], "order.accepted", "{first}");
    assert_eq!(first["orderId"], order.as_str());
    assert_eq!(first["sku"], "item");
    let second = next_json(&mut socket).await?;
    assert_eq!(second["type"], "order.confirmed", "{second}");
    assert_eq!(second["orderId"], order.as_str());
    assert_eq!(second["status"], "confirmed");
    assert_eq!(gw.gateway.load.connections.load(Ordering::Relaxed), 1);

    socket.close(None).await?;
    let closed = eventually(BOUND, || async {
        gw.gateway.load.connections.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(closed, "the connection count goes back to 0");
    // The registry entry went with the last socket.
    let mut conn = servers.redis_conn().await?;
    let entry: Option<String> = redis::cmd("GET")
        .arg(dataplane::keys::SaleKeys::new(&doc.id()).push_user("alice"))
        .query_async(&mut conn)
        .await?;
    assert_eq!(entry, None);

    // Unauthenticated upgrades are refused before the handshake.
    let bad = format!("ws://{}/v1/ws?token=forged", gw.addr);
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());
    consumers.stop().await;
    gw.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_what_was_seen_brings_what_was_missed() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("resume", &[("item", 10, 2), ("other", 10, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-a").await?;

    // No consumer yet: the order stays accepted while the client is connected.
    let mut socket = connect(&gw, "bob", "").await?;
    assert_eq!(next_json(&mut socket).await?["type"], "synced");
    let order = buy(&gw, "resume", "bob", "item").await?;
    let seen = next_json(&mut socket).await?;
    assert_eq!(
        (seen["type"].as_str(), seen["orderId"].as_str()),
        (Some("order.accepted"), Some(order.as_str()))
    );
    socket.close(None).await?;
    drop(socket);

    // Disconnected: the order is confirmed meanwhile.
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;
    let conn = servers.redis_conn().await?;
    let orders_key = ProductKeys::new(&doc.id(), "item").orders();
    let confirmed = order_reaches(&conn, &orders_key, &order, OrderStatus::Confirmed, BOUND).await;
    assert!(confirmed, "the consumer confirmed the order");
    let raw: String = redis::cmd("HGET")
        .arg(&orders_key)
        .arg(&order)
        .query_async(&mut conn.clone())
        .await?;
    let changed_at = OrderRecord::decode(&order, &raw)
        .and_then(|r| r.status_at)
        .ok_or("the confirmation is stamped on the record")?;
    // Later than the change, so a snapshot stamped with its own time would differ.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Reconnect (token by query, as a browser would) saying what was seen:
    // the update arrives, marked as resumed, with the time of the change
    // (not of the snapshot), then the end of the snapshot.
    let url = format!(
        "ws://{}/v1/ws?token={}&seen={order}:accepted",
        gw.addr,
        token("bob")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    let update = next_json(&mut socket).await?;
    assert_eq!(update["type"], "order.confirmed", "{update}");
    assert_eq!(update["orderId"], order.as_str());
    assert_eq!(update["resumed"], true);
    assert_eq!(update["at"].as_i64(), Some(changed_at), "{update}");
    assert_eq!(
        next_json(&mut socket).await?,
        serde_json::json!({"type": "synced", "orders": 1})
    );

    // Asking again with everything seen sends nothing but the marker.
    let resume = serde_json::json!({"type": "resume", "seen": {order.as_str(): "confirmed"}});
    socket
        .send(Message::Text(resume.to_string().into()))
        .await?;
    assert_eq!(
        next_json(&mut socket).await?,
        serde_json::json!({"type": "synced", "orders": 1})
    );

    // A second order on another SKU: live events keep flowing after a resume.
    let second = buy(&gw, "resume", "bob", "other").await?;
    let mut got = Vec::new();
    while got.len() < 2 {
        let e = next_json(&mut socket).await?;
        assert_eq!(e["orderId"], second.as_str(), "{e}");
        got.push(e["type"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(got, ["order.accepted", "order.confirmed"]);
    consumers.stop().await;
    gw.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_lists_every_order_of_the_user_across_skus() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("chain", &[("item", 20, 3), ("other", 20, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-a").await?;

    // Carol's orders interleave with Dave's; one of hers fails, which frees
    // her limit, and she buys again: a user's orders are a chain in Redis.
    let mut carol = Vec::new();
    for _ in 0..3 {
        carol.push(buy(&gw, "chain", "carol", "item").await?);
        buy(&gw, "chain", "dave", "item").await?;
    }
    carol.push(buy(&gw, "chain", "carol", "other").await?);
    let keys = ProductKeys::new(&doc.id(), "item");
    let mut conn = servers.redis_conn().await?;
    let (released, _): (String, String) = dataplane::scripts::RELEASE
        .key(keys.orders())
        .key(keys.stock())
        .key(keys.buyers())
        .key(keys.info())
        .arg(&carol[1])
        .arg("failed")
        .arg("refused by the database")
        .invoke_async(&mut conn)
        .await?;
    assert_eq!(released, "released");
    carol.push(buy(&gw, "chain", "carol", "item").await?);

    let mut socket = connect(&gw, "carol", "").await?;
    // (The last buy's live order.accepted may race the snapshot; either
    // way each order is sent once in its current status.)
    let (events, synced) = read_snapshot(&mut socket).await?;
    assert_eq!(synced["orders"], 5, "{synced}");
    let mut snapshot: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["orderId"].as_str().unwrap_or("").to_string(),
                e["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String)> = carol
        .iter()
        .map(|id| (id.clone(), "accepted".to_string()))
        .collect();
    expected[1].1 = "failed".into();
    snapshot.sort();
    expected.sort();
    assert_eq!(snapshot, expected, "all of carol's orders, none of dave's");
    gw.stop().await;
    Ok(())
}

/// A pod whose spec does not list a product the sale warmed (booted after
/// the product was removed, or before it was added) still brings the
/// buyer's orders of it in the snapshot: the sale's `meta` lists them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_on_a_pod_that_does_not_sell_a_product_still_lists_its_orders() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("removed", &[("item", 20, 3), ("other", 20, 1)]);
    warm(&servers, &doc).await?;
    let old = RunningGateway::start(&doc, &servers.redis.url(), "gw-old").await?;
    let mut carol = vec![
        buy(&old, "removed", "carol", "item").await?,
        buy(&old, "removed", "carol", "other").await?,
    ];
    old.stop().await;
    let mut without = doc.clone();
    without.spec.products.retain(|p| p.sku == "item");
    let new = RunningGateway::start(&without, &servers.redis.url(), "gw-new").await?;

    let mut socket = connect(&new, "carol", "").await?;
    let (events, synced) = read_snapshot(&mut socket).await?;
    assert_eq!(synced["orders"], 2, "{synced}");
    let mut snapshot: Vec<String> = events
        .iter()
        .map(|e| e["orderId"].as_str().unwrap_or("").to_string())
        .collect();
    snapshot.sort();
    carol.sort();
    assert_eq!(snapshot, carol);
    new.stop().await;
    Ok(())
}

/// A buyer reconnects to pod B while pod A still holds their old socket
/// (half-open after a network switch, found dead only after two silent pings):
/// A's registry refresh must not take the user back from B, or their events
/// go to A's dead socket until A notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_s_refresh_leaves_a_user_who_reconnected_elsewhere_with_that_pod() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("moved", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    // A refreshes every second; B not within the test.
    let mut fast = gateway_settings(&servers, "gw-a");
    fast.push.registry_ttl = Duration::from_secs(3);
    let a = RunningGateway::start_with(&doc, &fast).await?;
    let b = RunningGateway::start_on(&doc, &servers, "gw-b").await?;
    let mut old = connect(&a, "erin", "").await?;
    assert_eq!(next_json(&mut old).await?["type"], "synced");
    let mut new = connect(&b, "erin", "").await?;
    assert_eq!(next_json(&mut new).await?["type"], "synced");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let entry = dataplane::keys::SaleKeys::new(&doc.id()).push_user("erin");
    let mut conn = servers.redis_conn().await?;
    let holder: Option<String> = redis::cmd("GET").arg(&entry).query_async(&mut conn).await?;
    assert_eq!(
        holder.as_deref(),
        Some("gw-b"),
        "the newest connection holds the entry"
    );
    let ttl: i64 = redis::cmd("TTL").arg(&entry).query_async(&mut conn).await?;
    assert!(ttl > 3, "B's expiry, not A's: {ttl}");

    // A user whose entry expired (or Redis lost) is written again by the pod
    // holding their socket.
    redis::cmd("DEL").arg(&entry).exec_async(&mut conn).await?;
    drop(new);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let holder: Option<String> = redis::cmd("GET").arg(&entry).query_async(&mut conn).await?;
    assert_eq!(holder.as_deref(), Some("gw-a"));
    drop(old);
    a.stop().await;
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_reaches_only_the_pod_holding_the_socket() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("route", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let a = RunningGateway::start(&doc, &servers.redis.url(), "gw-a").await?;
    let b = RunningGateway::start(&doc, &servers.redis.url(), "gw-b").await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;

    // Someone is connected to B too, so B's channel is live and listening.
    let mut other = connect(&b, "carol", "").await?;
    assert_eq!(next_json(&mut other).await?["type"], "synced");
    let mut socket = connect(&a, "dave", "").await?;
    assert_eq!(next_json(&mut socket).await?["type"], "synced");

    // Dave buys through B; his socket is on A.
    let order = buy(&b, "route", "dave", "item").await?;
    let accepted = next_json(&mut socket).await?;
    assert_eq!(
        (accepted["type"].as_str(), accepted["orderId"].as_str()),
        (Some("order.accepted"), Some(order.as_str()))
    );
    let confirmed = next_json(&mut socket).await?;
    assert_eq!(
        (confirmed["type"].as_str(), confirmed["orderId"].as_str()),
        (Some("order.confirmed"), Some(order.as_str()))
    );

    assert_eq!(a.gateway.push.counters.received.load(Ordering::Relaxed), 2);
    assert_eq!(
        b.gateway.push.counters.received.load(Ordering::Relaxed),
        0,
        "gateway B never received dave's events"
    );
    other.close(None).await?;
    consumers.stop().await;
    a.stop().await;
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_pings_is_dropped() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let servers = Servers::start()?;
    let doc = sale("heartbeat", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let mut settings =
        dataplane::gateway::GatewaySettings::new(servers.redis.url(), SECRET.to_vec());
    settings.pod = "gw-a".into();
    settings.push.ping_interval = Duration::from_millis(200);
    let gw = RunningGateway::start_with(&doc, &settings).await?;

    // A client that completes the handshake and then goes silent: it never
    // reads, so it never answers a ping (a dead peer behind a live socket).
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await?;
    let request = format!(
        "GET /v1/ws?token={} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("erin")
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(BOUND, tcp.read(&mut head)).await??;
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let open = eventually(BOUND, || async {
        gw.gateway.load.connections.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(open, "the session started");
    let dropped = eventually(BOUND, || async {
        gw.gateway.load.connections.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(
        dropped,
        "the silent peer is dropped after the missed-pong window"
    );
    drop(tcp);
    gw.stop().await;
    Ok(())
}

/// On a Redis Cluster a gateway subscribes on one node; when that node dies
/// (here the master of the product's slot, so its replica takes over) the
/// gateway subscribes on another seed and events reach the buyer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_survives_the_death_of_the_subscribed_cluster_node() -> TestResult {
    let mut servers = tokio::task::spawn_blocking(ClusterServers::start).await??;
    let doc = sale("push-cluster", &[("item", 10, 3)]);
    warm(&servers, &doc).await?;
    let stock_key = ProductKeys::new(&doc.id(), "item").stock();
    // The gateway subscribes on the first seed: make it the product's master.
    let master = servers.cluster.master_of(&stock_key)?;
    let mut seeds = servers.cluster.seed_urls();
    seeds.retain(|u| *u != master.url());
    seeds.insert(0, master.url());
    let mut settings = dataplane::gateway::GatewaySettings::new(seeds.join(","), SECRET.to_vec());
    settings.pod = "gw-a".into();
    // This test is about the push subscription. Under `replica` durability
    // the promoted master could not sell until the dead node rejoins as its
    // replica (tests/redis_failover.rs covers that), and nothing restarts it here.
    settings.durability = Some(dataplane::durability::Durability::Local);
    let gw = RunningGateway::start_with(&doc, &settings).await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;

    let mut socket = connect(&gw, "frank", "").await?;
    assert_eq!(next_json(&mut socket).await?["type"], "synced");
    let order = buy(&gw, "push-cluster", "frank", "item").await?;
    let accepted = next_json(&mut socket).await?;
    assert_eq!(accepted["orderId"], order.as_str(), "{accepted}");

    let killed = servers.cluster.kill_master_of(&stock_key)?;
    tokio::task::spawn_blocking(move || killed.wait_promoted(20)).await??;
    let received = gw.gateway.push.counters.received.load(Ordering::Relaxed);
    // The gateway's next purchase succeeds once its client sees the new master.
    // A 503 may come from a script that ran but answered too late, so the
    // retries carry one Idempotency-Key, as a client's should: they can only
    // ever make one order.
    let mut second = None;
    for _ in 0..100 {
        let resp = http()
            .post(gw.url("/v1/sales/push-cluster/purchase"))
            .bearer_auth(token("frank"))
            .header("Idempotency-Key", "frank-after-failover")
            .json(&serde_json::json!({"sku": "item", "quantity": 1}))
            .send()
            .await?;
        if resp.status() == 202 {
            let body: Value = resp.json().await?;
            second = body["orderId"].as_str().map(str::to_string);
            break;
        }
        assert_eq!(resp.status(), 503, "only 503 while the master is away");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = second.ok_or("no purchase after the failover")?;
    // Its event arrives by the new subscription (a resync may come first).
    loop {
        let msg = next_json(&mut socket).await?;
        if msg["orderId"] == second.as_str() {
            break;
        }
    }
    assert!(gw.gateway.push.counters.received.load(Ordering::Relaxed) > received);
    consumers.stop().await;
    gw.stop().await;
    Ok(())
}
