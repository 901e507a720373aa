//! Payment callbacks: signature-verified, amount- and order-checked,
//! idempotent by payment id, and never resurrecting a cancelled order; a paid
//! order is never cancelled by the timeout sweeper.

mod common;

use std::time::Duration;

use common::*;
use dataplane::gateway::payment;
use dataplane::keys::ProductKeys;
use dataplane::order::{OrderRecord, OrderStatus};
use dataplane::spec::SaleDocument;
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Error = Box<dyn std::error::Error + Send + Sync>;
const BOUND: Duration = Duration::from_secs(15);

struct Rig {
    servers: Servers,
    doc: SaleDocument,
    gw: RunningGateway,
    key: SigningKey,
}

async fn rig(name: &str, timeout_seconds: u32) -> Result<Rig, Error> {
    let servers = Servers::start()?;
    let mut doc = sale(name, &[("item", 10, 1)]);
    doc.spec.payment.timeout_seconds = timeout_seconds;
    warm(&servers, &doc).await?;
    let (settings, private) = settings_with_payments(&servers)?;
    let gw = RunningGateway::start_with(&doc, &settings).await?;
    Ok(Rig {
        servers,
        doc,
        gw,
        key: payment::parse_private_key(&private)?,
    })
}

fn body(payment_id: &str, order_id: &str, amount: &str, status: &str) -> String {
    json!({"paymentId": payment_id, "orderId": order_id, "amount": amount, "currency": "USD", "status": status})
        .to_string()
}

async fn post(rig: &Rig, body: &str, signature: &str) -> Result<(u16, Value), Error> {
    post_to(&rig.gw, body, signature).await
}

/// The callback `body`, signed with `signature`, at gateway `gw`.
async fn post_to(gw: &RunningGateway, body: &str, signature: &str) -> Result<(u16, Value), Error> {
    let resp = http()
        .post(gw.url("/v1/payments/callback"))
        .header("content-type", "application/json")
        .header("x-signature", signature)
        .body(body.to_string())
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

async fn pay(rig: &Rig, body: &str) -> Result<(u16, Value), Error> {
    post(rig, body, &payment::sign(&rig.key, body.as_bytes())).await
}

/// `callback` paid while Redis is paused (SIGSTOP): answered 503 `store_unavailable`.
async fn paid_while_redis_is_silent_is_503(rig: &mut Rig, callback: &str) -> Result<(), Error> {
    rig.servers.redis.pause();
    let answered = pay(rig, callback).await;
    rig.servers.redis.resume();
    let (status, answer) = answered?;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("store_unavailable")),
        "{answer}"
    );
    Ok(())
}

async fn buy(rig: &Rig, user: &str) -> Result<(u16, String), Error> {
    let resp = http()
        .post(
            rig.gw
                .url(&format!("/v1/sales/{}/purchase", rig.doc.metadata.name)),
        )
        .bearer_auth(token(user))
        .json(&json!({"sku": "item", "quantity": 1}))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await?;
    Ok((status, body["orderId"].as_str().unwrap_or("").to_string()))
}

async fn pg_status(rig: &Rig, order: &str) -> Result<Option<String>, Error> {
    let store = rig.servers.store().await?;
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            "SELECT status FROM flashsale_orders WHERE order_id = $1",
            &[&order],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

async fn redis_status(rig: &Rig, order: &str) -> Result<Option<OrderStatus>, Error> {
    let mut conn = rig.servers.redis_conn().await?;
    let raw: Option<String> = redis::cmd("HGET")
        .arg(ProductKeys::new(&rig.doc.id(), "item").orders())
        .arg(order)
        .query_async(&mut conn)
        .await?;
    Ok(raw
        .and_then(|r| OrderRecord::decode(order, &r))
        .map(|r| r.status))
}

async fn payments_rows(rig: &Rig) -> Result<i64, Error> {
    let store = rig.servers.store().await?;
    let client = store.pool().get().await?;
    Ok(client
        .query_one("SELECT count(*) FROM flashsale_payments", &[])
        .await?
        .get(0))
}

async fn until_status(rig: &Rig, order: &str, want: &str) -> bool {
    eventually(BOUND, || async {
        matches!(pg_status(rig, order).await, Ok(Some(s)) if s == want)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_verified_checked_and_idempotent() -> Result<(), Error> {
    let rig = rig("pay", 600).await?;
    let (status, o1) = buy(&rig, "u1").await?;
    assert_eq!(status, 202);
    let (_, o2) = buy(&rig, "u2").await?;

    // Accepted but not yet in PostgreSQL (no consumer yet): retry later, nothing recorded.
    let (status, answer) = pay(&rig, &body("p-early", &o1, "19.99", "succeeded")).await?;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("not_persisted")),
        "{answer}"
    );

    let consumers = RunningConsumers::start(&rig.doc, &rig.servers, 1).await?;
    assert!(until_status(&rig, &o1, "confirmed").await);
    assert!(until_status(&rig, &o2, "confirmed").await);

    // Forged: signed by another key, or the body changed after signing.
    let good = body("p1", &o1, "19.99", "succeeded");
    let other_key = payment::parse_private_key(&payment::keygen().0)?;
    let (status, answer) = post(&rig, &good, &payment::sign(&other_key, good.as_bytes())).await?;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated")),
        "{answer}"
    );
    let tampered = body("p1", &o1, "0.01", "succeeded");
    let (status, _) = post(&rig, &tampered, &payment::sign(&rig.key, good.as_bytes())).await?;
    assert_eq!(status, 401);
    let (status, _) = post(&rig, &good, "not-a-signature").await?;
    assert_eq!(status, 401);
    assert_eq!(
        payments_rows(&rig).await?,
        0,
        "nothing recorded for forged callbacks"
    );
    // Signed but out of bounds (a NUL, which PostgreSQL text refuses, or a
    // currency that is no ISO code): a 400 naming it, not a 503; nothing recorded.
    for bad in [
        body("p\u{0}1", &o1, "19.99", "succeeded"),
        body("p1", &format!("{o1}\u{0}"), "19.99", "succeeded"),
        json!({"paymentId": "p1", "orderId": o1, "amount": "19.99", "currency": "usd\u{0}", "status": "succeeded"}).to_string(),
    ] {
        let (status, answer) = pay(&rig, &bad).await?;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_callback")),
            "{bad}: {answer}"
        );
    }
    let text = body("p-text", &o1, "19.99", "succeeded");
    let resp = http()
        .post(rig.gw.url("/v1/payments/callback"))
        .header("content-type", "text/plain")
        .header("x-signature", payment::sign(&rig.key, text.as_bytes()))
        .body(text)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 415);
    assert_eq!(
        payments_rows(&rig).await?,
        0,
        "nothing recorded for bad callbacks"
    );

    // Wrong amount: rejected and recorded; the order stays unpaid. A replay answers the same.
    let wrong = body("p-wrong", &o1, "9.99", "succeeded");
    let first = pay(&rig, &wrong).await?;
    assert_eq!(first.0, 422, "{}", first.1);
    assert_eq!(first.1["outcome"], "rejected");
    assert_eq!(first.1["reason"], "amount_mismatch");
    assert_eq!(pay(&rig, &wrong).await?, first, "replay answers the same");
    assert_eq!(pg_status(&rig, &o1).await?.as_deref(), Some("confirmed"));
    let currency = json!({"paymentId": "p-eur", "orderId": o1, "amount": "19.99", "currency": "EUR", "status": "succeeded"}).to_string();
    let (status, answer) = pay(&rig, &currency).await?;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (422, Some("currency_mismatch"))
    );

    // The right payment, while the buyer listens: paid in PostgreSQL and Redis, and pushed.
    let url = format!("ws://{}/v1/ws?token={}", rig.gw.addr, token("u1"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    let paid = pay(&rig, &good).await?;
    assert_eq!(paid.0, 200, "{}", paid.1);
    assert_eq!(
        paid.1,
        json!({"paymentId": "p1", "orderId": o1, "outcome": "paid"})
    );
    assert_eq!(pg_status(&rig, &o1).await?.as_deref(), Some("paid"));
    assert_eq!(redis_status(&rig, &o1).await?, Some(OrderStatus::Paid));
    let pushed = tokio::time::timeout(BOUND, async {
        while let Some(Ok(msg)) = socket.next().await {
            if let Message::Text(t) = msg
                && let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                && v["type"] == "order.paid"
            {
                return Some(v);
            }
        }
        None
    })
    .await?;
    assert!(matches!(pushed, Some(v) if v["orderId"] == o1.as_str()));

    // Replayed: same answer, nothing changes.
    let rows = payments_rows(&rig).await?;
    assert_eq!(pay(&rig, &good).await?, paid);
    assert_eq!(payments_rows(&rig).await?, rows);
    // A second, different payment for the paid order is money to give back.
    let (status, answer) = pay(&rig, &body("p2", &o1, "19.99", "succeeded")).await?;
    assert_eq!(
        (
            status,
            answer["outcome"].as_str(),
            answer["reason"].as_str()
        ),
        (200, Some("refund_due"), Some("already_paid"))
    );
    // A known payment id with another body is refused, not applied.
    let (status, answer) = pay(&rig, &body("p1", &o2, "19.99", "succeeded")).await?;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("payment_id_reused"))
    );
    assert_eq!(pg_status(&rig, &o2).await?.as_deref(), Some("confirmed"));
    // Unknown order: recorded for refund.
    let (status, answer) = pay(
        &rig,
        &body(
            "p3",
            "item.01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "19.99",
            "succeeded",
        ),
    )
    .await?;
    assert_eq!(
        (
            status,
            answer["outcome"].as_str(),
            answer["reason"].as_str()
        ),
        (200, Some("refund_due"), Some("unknown_order"))
    );
    // A failed payment is recorded and changes nothing.
    let (status, answer) = pay(&rig, &body("p4", &o2, "19.99", "failed")).await?;
    assert_eq!(
        (
            status,
            answer["outcome"].as_str(),
            answer["reason"].as_str()
        ),
        (200, Some("rejected"), Some("payment_failed"))
    );
    assert_eq!(pg_status(&rig, &o2).await?.as_deref(), Some("confirmed"));

    consumers.stop().await;
    rig.gw.stop().await;
    Ok(())
}

/// A payment for an order that Redis holds and PostgreSQL does not yet,
/// while Redis answers nothing: whether the order exists is unknown, so the
/// answer is a 503 and nothing is recorded. The provider's retry, once Redis
/// is back and the order persisted, pays it (a recorded refund would have
/// been the answer to every retry, and the won order would time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_not_refunded_while_redis_cannot_say_the_order_exists() -> Result<(), Error> {
    let mut rig = rig("stall", 600).await?;
    let (status, order) = buy(&rig, "u1").await?;
    assert_eq!(status, 202);
    let callback = body("p-stall", &order, "19.99", "succeeded");

    paid_while_redis_is_silent_is_503(&mut rig, &callback).await?;
    assert_eq!(
        payments_rows(&rig).await?,
        0,
        "nothing recorded while Redis was silent"
    );

    let consumers = RunningConsumers::start(&rig.doc, &rig.servers, 1).await?;
    assert!(until_status(&rig, &order, "confirmed").await);
    let (status, answer) = pay(&rig, &callback).await?;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("paid")),
        "{answer}"
    );
    assert_eq!(pg_status(&rig, &order).await?.as_deref(), Some("paid"));
    consumers.stop().await;
    rig.gw.stop().await;
    Ok(())
}

/// A payment committed in PostgreSQL while Redis does not answer: the order's
/// Redis record cannot move to paid, so the answer is a 503 (nothing pushed)
/// with the payment recorded; the provider's retry is answered from the
/// record and moves the record. Before, the answer was 200 and nothing ever
/// retried, so the order's page showed "confirmed" for a paid order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_whose_record_redis_did_not_take_is_marked_on_the_retry() -> Result<(), Error>
{
    let mut rig = rig("mark", 600).await?;
    let (status, order) = buy(&rig, "u1").await?;
    assert_eq!(status, 202);
    let consumers = RunningConsumers::start(&rig.doc, &rig.servers, 1).await?;
    assert!(until_status(&rig, &order, "confirmed").await);
    consumers.stop().await;
    let callback = body("p-mark", &order, "19.99", "succeeded");

    paid_while_redis_is_silent_is_503(&mut rig, &callback).await?;
    assert_eq!(pg_status(&rig, &order).await?.as_deref(), Some("paid"));
    assert_eq!(payments_rows(&rig).await?, 1, "the payment is recorded");
    assert_eq!(
        redis_status(&rig, &order).await?,
        Some(OrderStatus::Confirmed)
    );

    let (status, answer) = pay(&rig, &callback).await?;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("paid")),
        "{answer}"
    );
    assert_eq!(redis_status(&rig, &order).await?, Some(OrderStatus::Paid));
    assert_eq!(payments_rows(&rig).await?, 1);
    rig.gw.stop().await;
    Ok(())
}

/// The same, with a provider that never calls again: the mark is owed in the
/// outbox, committed with the payment, and the sweeper (in the consumers)
/// applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_whose_record_redis_did_not_take_is_marked_without_a_retry()
-> Result<(), Error> {
    let mut rig = rig("owed", 600).await?;
    let (status, order) = buy(&rig, "u1").await?;
    assert_eq!(status, 202);
    let consumers = RunningConsumers::start(&rig.doc, &rig.servers, 1).await?;
    assert!(until_status(&rig, &order, "confirmed").await);
    let callback = body("p-owed", &order, "19.99", "succeeded");
    paid_while_redis_is_silent_is_503(&mut rig, &callback).await?;
    assert_eq!(pg_status(&rig, &order).await?.as_deref(), Some("paid"));

    let marked = eventually(BOUND, || async {
        redis_status(&rig, &order).await.ok().flatten() == Some(OrderStatus::Paid)
    })
    .await;
    consumers.stop().await;
    assert!(marked, "the sweeper marks the paid order in Redis");
    let client = rig.servers.store().await?.pool().get().await?;
    let unapplied: i64 = client
        .query_one(
            "SELECT count(*) FROM flashsale_outbox WHERE action = 'paid' AND applied_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(unapplied, 0);
    rig.gw.stop().await;
    Ok(())
}

/// During a rollout that adds a product, a gateway of the old spec gets the
/// callback for a new product's order not yet persisted: it finds the order
/// in Redis all the same (the key comes from the sale and the id's SKU) and
/// answers "retry", not a refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_of_the_old_spec_does_not_refund_a_new_products_order() -> Result<(), Error> {
    let servers = Servers::start()?;
    let new_spec = sale("rollout", &[("item", 10, 1), ("gadget", 10, 1)]);
    warm(&servers, &new_spec).await?;
    let (settings, private) = settings_with_payments(&servers)?;
    let key = payment::parse_private_key(&private)?;
    let new_pod = RunningGateway::start_with(&new_spec, &settings).await?;
    let mut old_spec = new_spec.clone();
    old_spec.spec.products.retain(|p| p.sku == "item");
    let old_pod = RunningGateway::start_with(&old_spec, &settings).await?;

    let resp = http()
        .post(new_pod.url("/v1/sales/rollout/purchase"))
        .bearer_auth(token("u1"))
        .json(&json!({"sku": "gadget", "quantity": 1}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 202);
    let order = resp.json::<Value>().await?["orderId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let callback = body("p-rollout", &order, "19.99", "succeeded");
    let signature = payment::sign(&key, callback.as_bytes());
    let (status, answer) = post_to(&old_pod, &callback, &signature).await?;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("not_persisted")),
        "{answer}"
    );
    old_pod.stop().await;
    new_pod.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_callback_is_refund_due_and_paid_orders_are_never_cancelled() -> Result<(), Error> {
    let rig = rig("late", 2).await?;
    let (_, unpaid) = buy(&rig, "alice").await?;
    let (_, paid) = buy(&rig, "bob").await?;
    let consumers = RunningConsumers::start(&rig.doc, &rig.servers, 1).await?;
    assert!(until_status(&rig, &paid, "confirmed").await);
    let (status, answer) = pay(&rig, &body("p-bob", &paid, "19.99", "succeeded")).await?;
    assert_eq!(status, 200, "{answer}");

    // Alice never pays: cancelled after the timeout, her unit back in Redis.
    assert!(
        until_status(&rig, &unpaid, "cancelled").await,
        "the unpaid order times out"
    );
    let cancelled_in_redis = eventually(BOUND, || async {
        matches!(
            redis_status(&rig, &unpaid).await,
            Ok(Some(OrderStatus::Cancelled))
        )
    })
    .await;
    assert!(cancelled_in_redis);
    let mut conn = rig.servers.redis_conn().await?;
    let keys = ProductKeys::new(&rig.doc.id(), "item");
    let stock: i64 = redis::cmd("GET")
        .arg(keys.stock())
        .query_async(&mut conn)
        .await?;
    assert_eq!(stock, 9, "one unit back; bob's paid unit stays sold");

    // Her payment arrives late: recorded for refund, the order stays cancelled.
    let late = body("p-alice", &unpaid, "19.99", "succeeded");
    let first = pay(&rig, &late).await?;
    assert_eq!(first.0, 200);
    assert_eq!(first.1["outcome"], "refund_due");
    assert_eq!(first.1["reason"], "order_cancelled");
    assert_eq!(pay(&rig, &late).await?, first, "replay answers the same");
    assert_eq!(
        pg_status(&rig, &unpaid).await?.as_deref(),
        Some("cancelled")
    );
    assert_eq!(
        redis_status(&rig, &unpaid).await?,
        Some(OrderStatus::Cancelled)
    );

    // Bob's paid order outlived the timeout untouched.
    assert_eq!(pg_status(&rig, &paid).await?.as_deref(), Some("paid"));
    assert_eq!(redis_status(&rig, &paid).await?, Some(OrderStatus::Paid));
    // Alice may buy again.
    let (status, _) = buy(&rig, "alice").await?;
    assert_eq!(status, 202);

    let store = rig.servers.store().await?;
    let client = store.pool().get().await?;
    let both: i64 = client
        .query_one(
            "SELECT count(*) FROM flashsale_orders o JOIN flashsale_payments p
             ON p.order_id = o.order_id AND p.outcome = 'paid' WHERE o.status <> 'paid'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(both, 0, "no order both paid and cancelled");
    let sold: i64 = client
        .query_one(
            "SELECT sold FROM flashsale_inventory WHERE sale = 'test/late'",
            &[],
        )
        .await?
        .get(0);
    assert!(sold >= 1, "bob's unit stays sold");
    consumers.stop().await;
    rig.gw.stop().await;
    Ok(())
}

/// An order persisted only after its payment timeout (the consumers lagged,
/// or PostgreSQL was down, while the provider's callback was refused with
/// `not_persisted`) is not cancelled the moment its row appears: the
/// provider's retry finds it and pays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_persisted_after_its_timeout_can_still_be_paid() -> Result<(), Error> {
    let rig = rig("late", 4).await?;
    let (status, order) = buy(&rig, "u1").await?;
    assert_eq!(status, 202);
    let paid = body("p-late", &order, "19.99", "succeeded");
    let (status, answer) = pay(&rig, &paid).await?;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("not_persisted"))
    );

    // The consumers come back after the timeout has passed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let consumers = RunningConsumers::start(&rig.doc, &rig.servers, 1).await?;
    assert!(until_status(&rig, &order, "confirmed").await);
    // A few sweeps later (one a second), the provider retries.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, answer) = pay(&rig, &paid).await?;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("paid")),
        "{answer}"
    );
    assert_eq!(pg_status(&rig, &order).await?.as_deref(), Some("paid"));
    consumers.stop().await;
    Ok(())
}
