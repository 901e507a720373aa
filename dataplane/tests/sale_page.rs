//! `GET /v1/sales/{sale}` against a real Redis: the page shows the sale as
//! Redis holds it, revalidates by ETag, answers unknown sales from memory,
//! outlives a Redis outage on its last snapshot, and a read storm costs
//! Redis only the refresher's reads, whatever its size.

mod common;

use std::time::Duration;

use common::*;
use dataplane::gateway::sale_page::{STOCK_AGE_HEADER, SaleView};
use dataplane::tools::bench::redis_commands;
use dataplane::tools::servers::RedisServer;
use futures::StreamExt;
use reqwest::StatusCode;

/// The page once the gateway has a snapshot matching `ready`.
async fn page_when(
    http: &reqwest::Client,
    url: &str,
    ready: impl Fn(&SaleView) -> bool,
) -> Option<(SaleView, reqwest::header::HeaderMap)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if let Ok(resp) = http.get(url).send().await
            && resp.status() == StatusCode::OK
        {
            let headers = resp.headers().clone();
            if let Ok(view) = resp.json::<SaleView>().await
                && ready(&view)
            {
                return Some((view, headers));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn buy(http: &reqwest::Client, gw: &RunningGateway, user: &str, sku: &str) -> u16 {
    http.post(gw.url("/v1/sales/page/purchase"))
        .bearer_auth(token(user))
        .json(&serde_json::json!({"sku": sku, "quantity": 1}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_page_shows_the_sale_and_follows_its_stock() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("page", &[("phone", 3, 1), ("case", 5, 2)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "page-1").await?;
    let http = http();
    let url = gw.url("/v1/sales/page");

    let (view, headers) = page_when(&http, &url, |_| true)
        .await
        .ok_or("no sale page")?;
    assert_eq!(view.sale, "page");
    assert_eq!(serde_json::to_value(view.phase)?, "active");
    assert_eq!(view.start_time_ms, doc.spec.start_time.as_millisecond());
    assert_eq!(view.end_time_ms, doc.spec.end_time.as_millisecond());
    assert_eq!(view.start_time, doc.spec.start_time.to_string());
    assert!(view.server_time_ms >= view.start_time_ms && view.server_time_ms < view.end_time_ms);
    assert!(!view.purchase_ticket.required);
    let shown: Vec<_> = view
        .products
        .iter()
        .map(|p| {
            (
                p.sku.as_str(),
                p.price.as_str(),
                p.per_user_limit,
                p.stock,
                p.remaining,
                p.sold_out,
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("phone", "19.99", 1, 3, 3, false),
            ("case", "19.99", 2, 5, 5, false)
        ]
    );
    assert_eq!(header(&headers, "cache-control"), "public, max-age=1");
    assert_eq!(header(&headers, "content-type"), "application/json");
    let etag = header(&headers, "etag").to_string();
    assert!(etag.starts_with("W/\""), "{etag}");

    // Unchanged sale: 304 with the same validator, whichever snapshot answers.
    let again = http.get(&url).header("if-none-match", &etag).send().await?;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(again.headers(), "etag"), etag);
    assert_eq!(
        header(again.headers(), "cache-control"),
        "public, max-age=1"
    );

    // Two phones sold: the page follows, under a new validator.
    assert_eq!(buy(&http, &gw, "ann", "phone").await, 202);
    assert_eq!(buy(&http, &gw, "bob", "phone").await, 202);
    let (view, headers) = page_when(&http, &url, |v| v.products[0].remaining == 1)
        .await
        .ok_or("remaining never went to 1")?;
    assert!(!view.products[0].sold_out);
    assert_eq!(view.products[1].remaining, 5);
    assert_ne!(header(&headers, "etag"), etag);
    let stale = http.get(&url).header("if-none-match", &etag).send().await?;
    assert_eq!(stale.status(), StatusCode::OK);

    // The last one: sold out on the page, and the pod's flag is set.
    assert_eq!(buy(&http, &gw, "cid", "phone").await, 202);
    let (view, _) = page_when(&http, &url, |v| v.products[0].sold_out)
        .await
        .ok_or("never shown sold out")?;
    assert_eq!(view.products[0].remaining, 0);
    assert!(gw.gateway.sold_out("phone"));
    assert!(!gw.gateway.sold_out("case"));

    // Stock back in Redis (as a failed order gives it back): flag and page clear.
    let mut conn = servers.redis_conn().await?;
    let stock_key = dataplane::keys::ProductKeys::new(&doc.id(), "phone").stock();
    redis::cmd("INCRBY")
        .arg(&stock_key)
        .arg(1)
        .exec_async(&mut conn)
        .await?;
    let (view, _) = page_when(&http, &url, |v| !v.products[0].sold_out)
        .await
        .ok_or("stock returned but still sold out")?;
    assert_eq!(view.products[0].remaining, 1);
    assert!(!gw.gateway.sold_out("phone"));
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_unknown_sale_is_a_404_from_memory() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("page", &[("phone", 3, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "page-1").await?;
    let http = http();
    page_when(&http, &gw.url("/v1/sales/page"), |_| true)
        .await
        .ok_or("no sale page")?;
    let resp = http.get(gw.url("/v1/sales/no-such-sale")).send().await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(resp.headers(), "cache-control"), "public, max-age=1");
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"], "unknown_sale");
    assert_eq!(body["sale"], "no-such-sale");
    gw.stop().await;
    Ok(())
}

/// The gateway routes its own sale by the literal path (no path parameter
/// to extract); any other spelling of the same name, percent-encoded here,
/// takes the parameter route and gets the same answers: the page, a
/// purchase, and the same refusal of a second one over the limit.
#[tokio::test]
async fn the_sale_answers_alike_on_any_spelling_of_its_path() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("page", &[("phone", 3, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "page-1").await?;
    let http = http();
    let (literal, _) = page_when(&http, &gw.url("/v1/sales/page"), |_| true)
        .await
        .ok_or("no sale page")?;
    let (encoded, _) = page_when(&http, &gw.url("/v1/sales/p%61ge"), |_| true)
        .await
        .ok_or("no sale page by the encoded name")?;
    assert_eq!(encoded.sale, literal.sale);
    let buy = async |path: &str, user: &str| -> Result<(u16, serde_json::Value), reqwest::Error> {
        let resp = http
            .post(gw.url(path))
            .bearer_auth(token(user))
            .json(&serde_json::json!({"sku": "phone", "quantity": 1}))
            .send()
            .await?;
        Ok((resp.status().as_u16(), resp.json().await?))
    };
    let (status, body) = buy("/v1/sales/page/purchase", "alice").await?;
    assert_eq!(status, 202, "{body}");
    let (status, body) = buy("/v1/sales/p%61ge/purchase", "bob").await?;
    assert_eq!(status, 202, "{body}");
    // Each buyer's second unit is over the limit of 1, on either path.
    for (path, user) in [
        ("/v1/sales/p%61ge/purchase", "alice"),
        ("/v1/sales/page/purchase", "bob"),
    ] {
        let (status, body) = buy(path, user).await?;
        assert_eq!((status, &body["error"]), (409, &"limit_reached".into()));
    }
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_phase_follows_the_window() -> TestResult {
    let servers = Servers::start()?;
    let now = jiff::Timestamp::now();
    let hour = jiff::SignedDuration::from_secs(3600);
    let http = http();
    for (start, end, phase) in [
        (now + hour, now + hour * 2, "pending"),
        (now - hour * 2, now - hour, "ended"),
    ] {
        let doc = sale_window("page", &[("phone", 3, 1)], start, end);
        let gw = RunningGateway::start(&doc, &servers.redis.url(), "page-1").await?;
        // Not warmed: nothing sold yet, the page shows the spec's stock.
        let (view, _) = page_when(&http, &gw.url("/v1/sales/page"), |_| true)
            .await
            .ok_or("no sale page")?;
        assert_eq!(serde_json::to_value(view.phase)?, phase);
        assert_eq!(view.start_time_ms, start.as_millisecond());
        assert_eq!((view.products[0].stock, view.products[0].remaining), (3, 3));
        gw.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn redis_down_serves_the_last_snapshot_and_says_how_old() -> TestResult {
    let mut redis = RedisServer::start()?;
    let doc = sale("page", &[("phone", 3, 1)]);
    redis.kill();
    let gw = RunningGateway::start(&doc, &redis.url(), "page-1").await?;
    let http = http();
    let url = gw.url("/v1/sales/page");

    // No snapshot yet: 503, told when to come back, not cached.
    let resp = http.get(&url).send().await?;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(resp.headers(), "retry-after"), "1");
    assert_eq!(header(resp.headers(), "cache-control"), "no-store");
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"], "sale_page_not_ready");

    redis.restart()?;
    let mut conn = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
    assert_eq!(buy(&http, &gw, "ann", "phone").await, 202);
    let (before, _) = page_when(&http, &url, |v| v.products[0].remaining == 2)
        .await
        .ok_or("page never showed the sale")?;

    redis.kill();
    let age = |h: &reqwest::header::HeaderMap| {
        header(h, STOCK_AGE_HEADER.as_str())
            .parse::<i64>()
            .unwrap_or(-1)
    };
    let (during, headers) = page_when(&http, &url, |v| {
        v.server_time_ms > before.server_time_ms + 1500
    })
    .await
    .ok_or("no answer while Redis is down")?;
    assert_eq!(during.products, before.products);
    assert!(age(&headers) > 1000, "stock age {}", age(&headers));

    redis.restart()?;
    let fresh = common::eventually(Duration::from_secs(10), || async {
        match http.get(&url).send().await {
            Ok(r) => r.status() == StatusCode::OK && (0..1000).contains(&age(r.headers())),
            Err(_) => false,
        }
    })
    .await;
    assert!(fresh, "stock age never came back down");
    gw.stop().await;
    Ok(())
}

struct Storm {
    requests: u64,
    ok: u64,
    refreshes: u64,
    gets: u64,
    commands: u64,
}

/// `requests` GETs of the page, `concurrency` at a time, and what Redis saw meanwhile.
async fn storm(
    gw: &RunningGateway,
    conn: &mut redis::aio::ConnectionManager,
    requests: u64,
    concurrency: usize,
) -> Result<Storm, Box<dyn std::error::Error + Send + Sync>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let url = gw.url("/v1/sales/page");
    let before = redis_commands(conn).await?;
    let refreshes0 = gw.gateway.sale_page.refreshes();
    let ok = futures::stream::iter(0..requests)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                match http.get(&url).send().await {
                    Ok(r) => r.status() == StatusCode::OK && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .buffer_unordered(concurrency)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await as u64;
    let refreshes = gw.gateway.sale_page.refreshes() - refreshes0;
    let after = redis_commands(conn).await?;
    Ok(Storm {
        requests,
        ok,
        refreshes,
        gets: after.get - before.get,
        // Less this INFO itself.
        commands: (after.total - before.total).saturating_sub(1),
    })
}

#[tokio::test]
async fn a_read_storm_costs_redis_only_the_refreshers_reads() -> TestResult {
    let servers = Servers::start()?;
    let products = [("phone", 100, 1), ("case", 100, 1), ("charger", 100, 1)];
    let doc = sale("page", &products);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "page-1").await?;
    page_when(&http(), &gw.url("/v1/sales/page"), |_| true)
        .await
        .ok_or("no sale page")?;
    let mut conn = servers.redis_conn().await?;
    let p = products.len() as u64;

    let small = storm(&gw, &mut conn, 2_000, 250).await?;
    let big = storm(&gw, &mut conn, 8_000, 1_000).await?;
    for s in [&small, &big] {
        eprintln!(
            "{} reads: {} refresher ticks, {} GETs, {} Redis commands in all",
            s.requests, s.refreshes, s.gets, s.commands
        );
        assert_eq!(s.ok, s.requests, "every read answered 200");
        // Every GET Redis saw is the refresher's: one per product per tick
        // (give or take the tick in flight at either end).
        assert!(
            s.gets + p >= s.refreshes * p && s.gets <= (s.refreshes + 1) * p,
            "{} GETs for {} refresher ticks of {p} products",
            s.gets,
            s.refreshes
        );
        // And all commands together are a small fraction of the reads.
        assert!(
            s.commands * 10 < s.requests,
            "{} Redis commands for {} page reads",
            s.commands,
            s.requests
        );
    }
    // Four times the storm: per refresher tick, Redis does the same work.
    let per_tick = |s: &Storm| s.gets as f64 / s.refreshes.max(1) as f64;
    assert!(
        per_tick(&big) <= per_tick(&small) + 1.0,
        "{} vs {} GETs per tick",
        per_tick(&big),
        per_tick(&small)
    );
    gw.stop().await;
    Ok(())
}
