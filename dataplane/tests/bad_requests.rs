//! Bad input gets a clear 4xx with a JSON body naming the problem, and
//! nothing is written to Redis.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::Value;

/// Everything the purchase path could write, as one comparable snapshot.
async fn redis_state(
    conn: &mut redis::aio::ConnectionManager,
) -> redis::RedisResult<Vec<(String, String)>> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("fs:*").query_async(conn).await?;
    keys.retain(|k| !k.contains("gateways") && !k.contains("gwreports"));
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(conn).await?;
        let summary = match kind.as_str() {
            "string" => {
                redis::cmd("GET")
                    .arg(&k)
                    .query_async::<String>(conn)
                    .await?
            }
            "hash" => format!(
                "{:?}",
                redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async::<Vec<String>>(conn)
                    .await?
            ),
            "stream" => redis::cmd("XLEN")
                .arg(&k)
                .query_async::<u64>(conn)
                .await?
                .to_string(),
            other => other.to_string(),
        };
        out.push((k, summary));
    }
    Ok(out)
}

/// (name, url, Authorization, body, status, error code, a word the message names)
type Case<'a> = (
    &'a str,
    String,
    Option<&'a str>,
    String,
    StatusCode,
    &'a str,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors_and_write_nothing() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("bad", &[("item", 10, 2)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw").await?;
    let mut conn = servers.redis_conn().await?;
    let before = redis_state(&mut conn).await?;
    let http = http();
    let good = format!("Bearer {}", token("alice"));
    let forged = format!(
        "Bearer {}",
        dataplane::token::issue(b"not-the-secret", "alice", 3600)?
    );
    let expired = {
        // Signed correctly, expired an hour ago.
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = serde_json::json!({"sub": "alice", "exp": jsonwebtoken::get_current_timestamp() - 3600});
        format!(
            "Bearer {}",
            encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(SECRET)
            )?
        )
    };
    let purchase = gw.url("/v1/sales/bad/purchase");
    let big = format!(
        r#"{{"sku":"item","quantity":1,"pad":"{}"}}"#,
        "x".repeat(4096)
    );
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            purchase.clone(),
            Some(&good),
            "{\"sku\": ".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "request body",
        ),
        (
            "missing field",
            purchase.clone(),
            Some(&good),
            r#"{"sku":"item"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "quantity",
        ),
        (
            "unknown field",
            purchase.clone(),
            Some(&good),
            r#"{"sku":"item","quantity":1,"price":0}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "price",
        ),
        (
            "unknown SKU",
            purchase.clone(),
            Some(&good),
            r#"{"sku":"nope","quantity":1}"#.into(),
            StatusCode::NOT_FOUND,
            "unknown_sku",
            "nope",
        ),
        (
            "unknown sale",
            gw.url("/v1/sales/other/purchase"),
            Some(&good),
            r#"{"sku":"item","quantity":1}"#.into(),
            StatusCode::NOT_FOUND,
            "unknown_sale",
            "other",
        ),
        (
            "a sale name that is not UTF-8",
            gw.url("/v1/sales/%FF/purchase"),
            Some(&good),
            r#"{"sku":"item","quantity":1}"#.into(),
            StatusCode::NOT_FOUND,
            "unknown_sale",
            "%FF",
        ),
        (
            "missing token",
            purchase.clone(),
            None,
            r#"{"sku":"item","quantity":1}"#.into(),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "missing",
        ),
        (
            "forged token",
            purchase.clone(),
            Some(&forged),
            r#"{"sku":"item","quantity":1}"#.into(),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "signature",
        ),
        (
            "expired token",
            purchase.clone(),
            Some(&expired),
            r#"{"sku":"item","quantity":1}"#.into(),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "expired",
        ),
        (
            "garbage token",
            purchase.clone(),
            Some("Bearer abc.def.ghi"),
            r#"{"sku":"item","quantity":1}"#.into(),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "malformed",
        ),
        (
            "oversized body",
            purchase.clone(),
            Some(&good),
            big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "1024",
        ),
        (
            "zero quantity",
            purchase.clone(),
            Some(&good),
            r#"{"sku":"item","quantity":0}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_quantity",
            "at least 1",
        ),
        (
            "negative quantity",
            purchase.clone(),
            Some(&good),
            r#"{"sku":"item","quantity":-3}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_quantity",
            "at least 1",
        ),
        (
            "quantity over limit",
            purchase.clone(),
            Some(&good),
            r#"{"sku":"item","quantity":3}"#.into(),
            StatusCode::CONFLICT,
            "limit_reached",
            "per-user limit of 2",
        ),
        (
            "non-integer quantity",
            purchase.clone(),
            Some(&good),
            r#"{"sku":"item","quantity":1.5}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "quantity",
        ),
    ];
    for (name, url, auth, body, status, code, mentions) in cases {
        let mut req = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await?;
        let got = resp.status();
        let text = resp.text().await?;
        assert_eq!(got, status, "{name}: {text}");
        let json: Value = serde_json::from_str(&text)?;
        assert_eq!(json["error"], code, "{name}: {json}");
        let message = json["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(mentions),
            "{name}: message {message:?} should mention {mentions:?}"
        );
    }
    // A bad Idempotency-Key header.
    let resp = http
        .post(&purchase)
        .header("authorization", &good)
        .header("idempotency-key", "x".repeat(200))
        .body(r#"{"sku":"item","quantity":1}"#)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await?["error"], "bad_header");
    // Unknown route: JSON 404 too.
    let resp = http.get(gw.url("/v2/nothing")).send().await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.json::<Value>().await?["error"], "not_found");
    // A known route, another method: JSON 405 naming it, with Allow.
    let resp = http.get(&purchase).send().await?;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        resp.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    assert_eq!(resp.json::<Value>().await?["error"], "method_not_allowed");
    // A body that says it is not JSON is not parsed as JSON.
    let resp = http
        .post(&purchase)
        .header("authorization", &good)
        .header("content-type", "text/plain")
        .body(r#"{"sku":"item","quantity":1}"#)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let json: Value = resp.json().await?;
    assert_eq!(
        (json["error"].as_str(), json["contentType"].as_str()),
        (Some("unsupported_media_type"), Some("text/plain"))
    );
    // A path segment that is not UTF-8 once decoded: the route's JSON 404
    // naming it, as every other unknown name gets.
    for (url, code) in [
        ("/v1/orders/%FF", "unknown_order"),
        ("/v1/sales/%FF", "unknown_sale"),
        ("/shop/%FF", "unknown_sale"),
    ] {
        let resp = http
            .get(gw.url(url))
            .header("authorization", &good)
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{url}");
        let json: Value = resp.json().await?;
        assert_eq!(json["error"], code, "{url}: {json}");
        assert!(
            json["message"].as_str().unwrap_or_default().contains("%FF"),
            "{url}: {json}"
        );
    }
    let resp = http
        .post(gw.url("/v1/sales/%FF/tickets"))
        .header("authorization", &good)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.json::<Value>().await?["error"], "unknown_sale");
    // An oversized Authorization header is a 400 on every route that reads it.
    let huge = format!("Bearer {}", "x".repeat(5000));
    for url in [
        purchase.clone(),
        gw.url("/v1/orders/item.01KAJ000000000000000000000"),
    ] {
        let req = if url.ends_with("purchase") {
            http.post(&url).body(r#"{"sku":"item","quantity":1}"#)
        } else {
            http.get(&url)
        };
        let resp = req.header("authorization", &huge).send().await?;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(resp.json::<Value>().await?["error"], "bad_header", "{url}");
    }

    assert_eq!(
        redis_state(&mut conn).await?,
        before,
        "no bad request wrote to Redis"
    );
    gw.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_follow_the_contract() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("contract", &[("item", 2, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw").await?;
    let http = http();
    let url = gw.url("/v1/sales/contract/purchase");
    let buy = |user: &str, key: Option<&str>| {
        let mut req = http
            .post(&url)
            .header("authorization", format!("Bearer {}", token(user)))
            .body(r#"{"sku":"item","quantity":1}"#);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.send()
    };
    let first = buy("alice", Some("k1")).await?;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await?;
    let order_id = first["orderId"].as_str().unwrap_or_default().to_string();
    assert_eq!(first["statusUrl"], format!("/v1/orders/{order_id}"));
    // Same key: the same order, not a 409.
    let replay: Value = buy("alice", Some("k1")).await?.json().await?;
    assert_eq!(replay["orderId"], order_id.as_str());
    // New key, same user: the per-user limit.
    let again = buy("alice", Some("k2")).await?;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(again.json::<Value>().await?["error"], "limit_reached");
    // Last unit, then sold out (from Redis, then from the local flag).
    assert_eq!(buy("bob", None).await?.status(), StatusCode::ACCEPTED);
    let gone = buy("carol", None).await?;
    assert_eq!(gone.status(), StatusCode::GONE);
    assert_eq!(gone.json::<Value>().await?["error"], "sold_out");
    assert!(gw.gateway.sold_out("item"));
    assert_eq!(buy("dave", None).await?.status(), StatusCode::GONE);
    // The flag answers before the token is checked ("sold out" is public) ...
    let anonymous = http
        .post(&url)
        .body(r#"{"sku":"item","quantity":1}"#)
        .send()
        .await?;
    assert_eq!(anonymous.status(), StatusCode::GONE);
    assert_eq!(anonymous.json::<Value>().await?["error"], "sold_out");
    // ... but a keyed request (a possible winner's retry) is verified first.
    let forged_retry = http
        .post(&url)
        .header("authorization", "Bearer abc.def.ghi")
        .header("idempotency-key", "k1")
        .body(r#"{"sku":"item","quantity":1}"#)
        .send()
        .await?;
    assert_eq!(forged_retry.status(), StatusCode::UNAUTHORIZED);
    // A key no winner used cannot be a retry: once the pod's replay snapshot
    // is loaded (within 500 ms), such a request is answered unverified too.
    let unused_key = eventually(Duration::from_secs(5), || async {
        http.post(&url)
            .header("authorization", "Bearer abc.def.ghi")
            .header("idempotency-key", "never-used")
            .body(r#"{"sku":"item","quantity":1}"#)
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::GONE)
    })
    .await;
    assert!(
        unused_key,
        "an unused key is answered sold out without the token"
    );
    // A retry of a winning request after the sell-out still gets its order.
    let late_replay = buy("alice", Some("k1")).await?;
    assert_eq!(late_replay.status(), StatusCode::ACCEPTED);
    assert_eq!(
        late_replay.json::<Value>().await?["orderId"],
        order_id.as_str()
    );

    // The order's owner sees it; anyone else gets a 404.
    let mine = http
        .get(gw.url(&format!("/v1/orders/{order_id}")))
        .header("authorization", format!("Bearer {}", token("alice")))
        .send()
        .await?;
    assert_eq!(mine.status(), StatusCode::OK);
    let view: Value = mine.json().await?;
    assert_eq!(
        (
            view["status"].as_str(),
            view["sku"].as_str(),
            view["quantity"].as_u64()
        ),
        (Some("accepted"), Some("item"), Some(1))
    );
    let theirs = http
        .get(gw.url(&format!("/v1/orders/{order_id}")))
        .header("authorization", format!("Bearer {}", token("mallory")))
        .send()
        .await?;
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
    gw.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_is_enforced_before_start_and_after_end() -> TestResult {
    let servers = Servers::start()?;
    let now = jiff::Timestamp::now();
    let early = sale_window(
        "early",
        &[("item", 5, 1)],
        now + jiff::SignedDuration::from_secs(3600),
        now + jiff::SignedDuration::from_secs(7200),
    );
    let late = sale_window(
        "late",
        &[("item", 5, 1)],
        now - jiff::SignedDuration::from_secs(7200),
        now - jiff::SignedDuration::from_secs(3600),
    );
    let http = http();
    for (doc, status, code) in [
        (early, StatusCode::TOO_EARLY, "not_started"),
        (late, StatusCode::GONE, "ended"),
    ] {
        warm(&servers, &doc).await?;
        let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw").await?;
        let resp = http
            .post(gw.url(&format!("/v1/sales/{}/purchase", doc.metadata.name)))
            .header("authorization", format!("Bearer {}", token("alice")))
            .body(r#"{"sku":"item","quantity":1}"#)
            .send()
            .await?;
        assert_eq!(resp.status(), status);
        let json: Value = resp.json().await?;
        assert_eq!(json["error"], code);
        gw.stop().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_fast_503_not_a_hang() -> TestResult {
    let mut servers = Servers::start()?;
    let doc = sale("down", &[("item", 5, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw").await?;
    servers.redis.kill();
    let http = http();
    for _ in 0..10 {
        let started = std::time::Instant::now();
        let resp = http
            .post(gw.url("/v1/sales/down/purchase"))
            .header("authorization", format!("Bearer {}", token("alice")))
            .body(r#"{"sku":"item","quantity":1}"#)
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key("retry-after"));
        let json: Value = resp.json().await?;
        assert!(
            json["error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("store_"),
            "{json}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "answered in {:?}",
            started.elapsed()
        );
    }
    let ready = http
        .get(format!("http://{}/readyz", gw.admin))
        .send()
        .await?;
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready without Redis"
    );
    gw.stop().await;
    Ok(())
}

/// A request for more units than are left is 409 insufficient_stock with
/// what is left, not "sold out": the product stays on sale for a smaller
/// request, which still wins (the pod raised no sold-out flag).
#[tokio::test]
async fn more_units_than_are_left_is_insufficient_stock_not_sold_out() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("few", &[("item", 1, 5)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-few").await?;
    let ask = |user, quantity| buy_units(&gw, "few", user, "item", quantity);
    let (status, body) = ask("ann", 2).await?;
    assert_eq!(
        (status, body["error"].as_str(), body["remaining"].as_i64()),
        (409, Some("insufficient_stock"), Some(1)),
        "{body}"
    );
    let (status, body) = ask("bob", 1).await?;
    assert_eq!(status, 202, "{body}");
    let (status, body) = ask("cy", 1).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (410, Some("sold_out")),
        "{body}"
    );
    gw.stop().await;
    Ok(())
}
