//! Purchase tickets against a real Redis and a real gateway: a ticket sale
//! refuses a purchase without a valid ticket (missing, forged, another
//! buyer's or sale's, expired, reused) with 403 and touches no stock; a
//! ticket wins once per product; tickets are issued only from a minute
//! before the start; the setting follows the live spec both ways.

mod common;

use std::time::Duration;

use common::*;
use dataplane::keys::ProductKeys;
use dataplane::spec::{PurchaseTicketSpec, SaleDocument, SaleId};
use dataplane::ticket::TicketSigner;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn with_tickets(mut doc: SaleDocument) -> SaleDocument {
    doc.spec.purchase_ticket = PurchaseTicketSpec {
        enabled: true,
        ttl_seconds: 10,
    };
    doc
}

async fn fetch_ticket(
    client: &reqwest::Client,
    gw: &RunningGateway,
    sale: &str,
    user: &str,
) -> Result<(u16, serde_json::Value), BoxError> {
    let r = client
        .post(gw.url(&format!("/v1/sales/{sale}/tickets")))
        .bearer_auth(token(user))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

async fn ticket(
    client: &reqwest::Client,
    gw: &RunningGateway,
    sale: &str,
    user: &str,
) -> Result<String, BoxError> {
    let (status, body) = fetch_ticket(client, gw, sale, user).await?;
    assert_eq!(status, 201, "{body}");
    Ok(body["ticket"].as_str().unwrap_or_default().to_string())
}

async fn buy(
    client: &reqwest::Client,
    gw: &RunningGateway,
    sale: &str,
    user: &str,
    sku: &str,
    key: &str,
    ticket: Option<&str>,
) -> Result<(u16, serde_json::Value), BoxError> {
    let mut req = client
        .post(gw.url(&format!("/v1/sales/{sale}/purchase")))
        .bearer_auth(token(user))
        .header("Idempotency-Key", key)
        .json(&serde_json::json!({ "sku": sku, "quantity": 1 }));
    if let Some(t) = ticket {
        req = req.header("Purchase-Ticket", t);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

/// What a purchase may have touched: stock left, buyers, orders, stream entries.
async fn footprint(
    conn: &mut redis::aio::ConnectionManager,
    doc: &SaleDocument,
    sku: &str,
) -> Result<(i64, i64, i64, i64), BoxError> {
    let k = ProductKeys::new(&doc.id(), sku);
    let (stock, buyers, orders, stream): (i64, i64, i64, i64) = redis::pipe()
        .get(k.stock())
        .hlen(k.buyers())
        .hlen(k.orders())
        .xlen(k.stream())
        .query_async(conn)
        .await?;
    Ok((stock, buyers, orders, stream))
}

fn assert_refused(status: u16, body: &serde_json::Value, code: &str, reason: Option<&str>) {
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], code, "{body}");
    if let Some(r) = reason {
        assert_eq!(body["reason"], r, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_sale_refuses_bad_tickets_and_wins_once_per_product() -> TestResult {
    let redis = dataplane::tools::servers::RedisServer::start()?;
    let doc = with_tickets(sale("tix", &[("phone", 5, 3), ("case", 5, 3)]));
    let mut conn = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
    let gw = RunningGateway::start(&doc, &redis.url(), "gw-tix").await?;
    let client = http();
    let untouched = footprint(&mut conn, &doc, "phone").await?;
    assert_eq!(untouched, (5, 0, 0, 0));

    // The ticket endpoint: token required, sale named.
    let r = client.post(gw.url("/v1/sales/tix/tickets")).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    let (status, body) = fetch_ticket(&client, &gw, "nope", "alice").await?;
    assert_eq!((status, &body["error"]), (404, &"unknown_sale".into()));
    let (status, issued) = fetch_ticket(&client, &gw, "tix", "alice").await?;
    assert_eq!(status, 201, "{issued}");
    let expires = issued["expiresAtMs"].as_i64().unwrap_or_default();
    let now = jiff::Timestamp::now().as_millisecond();
    assert!(expires > now && expires <= now + 10_000, "{issued}");
    let alice = issued["ticket"].as_str().unwrap_or_default().to_string();

    // Refusals, none touching stock.
    let bob = ticket(&client, &gw, "tix", "bob").await?;
    let far = jiff::Timestamp::now().as_millisecond() + 60_000;
    let past = jiff::Timestamp::now().as_millisecond() - 1;
    let signed = |secret: &[u8], sale: SaleId, expires: i64| -> Result<String, BoxError> {
        Ok(TicketSigner::new(secret, &sale)?
            .issue("alice", expires)?
            .token)
    };
    let refusals = [
        (None, "ticket_required", None),
        (
            Some("garbage".to_string()),
            "ticket_invalid",
            Some("malformed"),
        ),
        (Some(bob), "ticket_invalid", Some("other_buyer")),
        (
            Some(signed(SECRET, SaleId::new("test", "other"), far)?),
            "ticket_invalid",
            Some("other_sale"),
        ),
        (
            Some(signed(b"not-the-secret", doc.id(), far)?),
            "ticket_invalid",
            Some("bad_signature"),
        ),
        (
            Some(signed(SECRET, doc.id(), past)?),
            "ticket_invalid",
            Some("expired"),
        ),
        // A login token is not a ticket.
        (
            Some(token("alice")),
            "ticket_invalid",
            Some("bad_signature"),
        ),
    ];
    for (t, code, reason) in &refusals {
        let (status, body) = buy(&client, &gw, "tix", "alice", "phone", "k0", t.as_deref()).await?;
        assert_refused(status, &body, code, *reason);
    }
    assert_eq!(footprint(&mut conn, &doc, "phone").await?, untouched);

    // A valid ticket wins.
    let (status, won) = buy(&client, &gw, "tix", "alice", "phone", "k1", Some(&alice)).await?;
    assert_eq!(status, 202, "{won}");
    let after_win = footprint(&mut conn, &doc, "phone").await?;
    assert_eq!(after_win, (4, 1, 1, 1));
    // The retry of that request (same key, same ticket) gets its order.
    let (status, again) = buy(&client, &gw, "tix", "alice", "phone", "k1", Some(&alice)).await?;
    assert_eq!(
        (status, &again["orderId"]),
        (202, &won["orderId"]),
        "{again}"
    );
    // A new request with the spent ticket: refused, nothing touched.
    let (status, body) = buy(&client, &gw, "tix", "alice", "phone", "k2", Some(&alice)).await?;
    assert_refused(status, &body, "ticket_invalid", Some("used"));
    assert_eq!(footprint(&mut conn, &doc, "phone").await?, after_win);
    // Single use is per product (the record lives in the product's slot).
    let (status, case) = buy(&client, &gw, "tix", "alice", "case", "k3", Some(&alice)).await?;
    assert_eq!(status, 202, "{case}");
    // A fresh ticket buys again, within the per-user limit.
    let fresh = ticket(&client, &gw, "tix", "alice").await?;
    let (status, body) = buy(&client, &gw, "tix", "alice", "phone", "k4", Some(&fresh)).await?;
    assert_eq!(status, 202, "{body}");
    // The spent tickets' records expire with the tickets.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(ProductKeys::new(&doc.id(), "phone").ticket(&ticket_id(&alice)?))
        .query_async(&mut conn)
        .await?;
    assert!(ttl > 0 && ttl <= 10_000, "ttl {ttl}");

    gw.stop().await;
    Ok(())
}

/// The `jti` claim of a ticket (the test reads it to find its Redis record).
fn ticket_id(ticket: &str) -> Result<String, BoxError> {
    use base64::Engine;
    let payload = ticket.split('.').nth(1).unwrap_or_default();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    let claims: serde_json::Value = serde_json::from_slice(&json)?;
    Ok(claims["jti"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_refuses_a_ticket_expired_by_redis_clock_without_touching_stock() -> TestResult {
    let (_redis, mut conn) = lone_redis().await?;
    let doc = with_tickets(sale("clock", &[("phone", 5, 3)]));
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
    let k = ProductKeys::new(&doc.id(), "phone");
    let keys = k.purchase_keys();
    let call = |expires_at_ms: i64| {
        let ticket = (k.ticket("01ARZ3NDEKTSV4RRFFQ69G5FAV"), expires_at_ms);
        dataplane::scripts::Purchase {
            ticket: Some(&ticket),
            ..dataplane::scripts::Purchase::new_buyer(&keys, "alice", "phone.x")
        }
        .invocation()
    };
    let past = jiff::Timestamp::now().as_millisecond() - 1_000;
    let answer: dataplane::scripts::PurchaseAnswer = call(past).invoke_async(&mut conn).await?;
    assert_eq!(
        answer,
        dataplane::scripts::PurchaseAnswer::Other("ticket".into(), "expired".into(), String::new())
    );
    assert_eq!(footprint(&mut conn, &doc, "phone").await?, (5, 0, 0, 0));
    let exists: bool = redis::cmd("EXISTS")
        .arg(k.ticket("01ARZ3NDEKTSV4RRFFQ69G5FAV"))
        .query_async(&mut conn)
        .await?;
    assert!(!exists, "an expired ticket leaves no record");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_issued_from_a_minute_before_the_start_until_the_end() -> TestResult {
    let redis = dataplane::tools::servers::RedisServer::start()?;
    let client = http();
    let now = jiff::Timestamp::now();
    let secs = |s: i64| now + jiff::SignedDuration::from_secs(s);

    // Two minutes before the start: not yet, and told when.
    let early = with_tickets(sale_window(
        "early",
        &[("phone", 5, 1)],
        secs(120),
        secs(600),
    ));
    let gw = RunningGateway::start(&early, &redis.url(), "gw-early").await?;
    let (status, body) = fetch_ticket(&client, &gw, "early", "alice").await?;
    assert_eq!(
        (status, &body["error"]),
        (425, &"tickets_not_open".into()),
        "{body}"
    );
    assert_eq!(body["opensAtMs"], secs(60).as_millisecond(), "{body}");
    gw.stop().await;

    // Thirty seconds before: issued, valid for ttlSeconds after the start;
    // the purchase itself still waits for the start.
    let soon = with_tickets(sale_window("soon", &[("phone", 5, 1)], secs(30), secs(600)));
    let gw = RunningGateway::start(&soon, &redis.url(), "gw-soon").await?;
    let (status, body) = fetch_ticket(&client, &gw, "soon", "alice").await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["expiresAtMs"], secs(40).as_millisecond(), "{body}");
    let t = body["ticket"].as_str().unwrap_or_default().to_string();
    let (status, body) = buy(&client, &gw, "soon", "alice", "phone", "k", Some(&t)).await?;
    assert_eq!(
        (status, &body["error"]),
        (425, &"not_started".into()),
        "{body}"
    );
    gw.stop().await;

    // After the end: gone.
    let over = with_tickets(sale_window(
        "over",
        &[("phone", 5, 1)],
        secs(-600),
        secs(-1),
    ));
    let gw = RunningGateway::start(&over, &redis.url(), "gw-over").await?;
    let (status, body) = fetch_ticket(&client, &gw, "over", "alice").await?;
    assert_eq!((status, &body["error"]), (410, &"ended".into()), "{body}");
    gw.stop().await;
    Ok(())
}

/// Whether a purchase without a ticket is answered `status` within 5 s
/// (each attempt with a new Idempotency-Key).
async fn answers_without_ticket(
    client: &reqwest::Client,
    gw: &RunningGateway,
    keys: &str,
    status: u16,
) -> bool {
    let mut n = 0;
    eventually(Duration::from_secs(5), || {
        n += 1;
        let key = format!("{keys}-{n}");
        async move {
            matches!(buy(client, gw, "live", "alice", "phone", &key, None).await,
                Ok((s, _)) if s == status)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_follow_the_live_spec() -> TestResult {
    let redis = dataplane::tools::servers::RedisServer::start()?;
    let doc = sale("live", &[("phone", 1000, 1000)]);
    let mut conn = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
    let gw = RunningGateway::start(&doc, &redis.url(), "gw-live").await?;
    let client = http();

    // Off: no tickets to be had, none needed.
    let (status, body) = fetch_ticket(&client, &gw, "live", "alice").await?;
    assert_eq!(
        (status, &body["error"]),
        (404, &"ticket_not_enabled".into()),
        "{body}"
    );
    let (status, body) = buy(&client, &gw, "live", "alice", "phone", "k1", None).await?;
    assert_eq!(status, 202, "{body}");

    // Switched on mid-sale: purchases need one within about a second.
    let on = with_tickets(doc.clone());
    dataplane::live::publish(&mut conn, &doc.id(), &on.spec).await?;
    let required = answers_without_ticket(&client, &gw, "on", 403).await;
    assert!(required, "tickets were not required after the live change");
    let t = ticket(&client, &gw, "live", "alice").await?;
    let (status, body) = buy(&client, &gw, "live", "alice", "phone", "k2", Some(&t)).await?;
    assert_eq!(status, 202, "{body}");

    // Switched off again: the header is ignored.
    dataplane::live::publish(&mut conn, &doc.id(), &doc.spec).await?;
    let free = answers_without_ticket(&client, &gw, "off", 202).await;
    let last = buy(&client, &gw, "live", "alice", "phone", "last", None).await?;
    assert!(
        free,
        "tickets were still required after switching them off: {last:?}"
    );
    gw.stop().await;
    Ok(())
}
