//! The per-IP rate limit behind a proxy: with a client IP header the
//! gateway counts the address the proxy added (the header's last), not the
//! proxy's own nor one the client wrote in front of it.

mod common;

use common::*;
use dataplane::spec::RateLimit;
use serde_json::{Value, json};
use std::time::Duration;

async fn buy(gw: &RunningGateway, user: &str, forwarded_for: Option<&str>) -> (u16, Value) {
    let mut request = http()
        .post(gw.url("/v1/sales/ip/purchase"))
        .bearer_auth(token(user))
        .json(&json!({"sku": "item", "quantity": 1}));
    if let Some(addresses) = forwarded_for {
        request = request.header("x-forwarded-for", addresses);
    }
    match request.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        }
        Err(e) => panic!("the gateway did not answer: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_each_client_address_has_its_own_bucket() -> TestResult {
    let servers = Servers::start()?;
    let mut doc = sale("ip", &[("item", 100, 1)]);
    // One request per client address per minute, near enough.
    doc.spec.rate_limits.per_ip = Some(RateLimit {
        requests_per_second: 1,
        burst: 1,
    });
    warm(&servers, &doc).await?;
    let mut settings = gateway_settings(&servers, "gw-ip");
    settings.client_ip_header = Some("x-forwarded-for".parse()?);
    let gw = RunningGateway::start_with(&doc, &settings).await?;

    // Every request comes from 127.0.0.1, the "proxy".
    let (status, body) = buy(&gw, "u1", Some("203.0.113.7")).await;
    assert_eq!(status, 202, "{body}");
    // The same client with a made-up address in front of the proxy's entry.
    let (status, body) = buy(&gw, "u2", Some("198.51.100.1, 203.0.113.7")).await;
    assert_eq!(
        (status, body["error"].as_str(), body["scope"].as_str()),
        (429, Some("rate_limited"), Some("ip")),
        "{body}"
    );
    // Another client behind the same proxy has its own bucket.
    let (status, body) = buy(&gw, "u3", Some("203.0.113.7, 192.0.2.44")).await;
    assert_eq!(status, 202, "{body}");
    // No header: the peer's address, a bucket of its own.
    let (status, body) = buy(&gw, "u4", None).await;
    assert_eq!(status, 202, "{body}");
    gw.stop().await;
    Ok(())
}

/// A gateway stopped by SIGTERM leaves the live set before its process
/// exits, so the others take its share of the global rate limit at once
/// rather than after its last report goes stale, and a deleted sale's
/// cleared keys stay cleared once its pods are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopped_by_sigterm_has_left_the_live_set() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("leave", &[("item", 10, 1)]);
    warm(&servers, &doc).await?;
    let dir = tempfile::tempdir()?;
    let config = write_doc(dir.path(), &doc)?;
    let log = std::fs::File::create(dir.path().join("gateway.log"))?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("gateway")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("REDIS_URL", servers.redis.url())
        .env("TOKEN_SECRET", String::from_utf8_lossy(SECRET).as_ref())
        .env("POD_NAME", "gw-leaving")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let keys = dataplane::keys::SaleKeys::new(&doc.id());
    let conn = servers.redis_conn().await?;
    let live = |mut conn: redis::aio::ConnectionManager| {
        let (members, reports) = (keys.gateways(), keys.gateway_reports());
        async move {
            let live: redis::RedisResult<(Vec<String>, Vec<String>)> = redis::pipe()
                .cmd("ZRANGE")
                .arg(members)
                .arg(0)
                .arg(-1)
                .cmd("HKEYS")
                .arg(reports)
                .query_async(&mut conn)
                .await;
            live.unwrap_or_default()
        }
    };
    let reported = eventually(Duration::from_secs(15), || {
        let live = live(conn.clone());
        async move { !live.await.0.is_empty() }
    })
    .await;
    let gateway_log =
        || std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    assert!(reported, "the gateway never reported:\n{}", gateway_log());

    let pid = i32::try_from(child.id())?;
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = child.wait()?;
    assert!(status.success(), "{status}:\n{}", gateway_log());
    assert_eq!(
        live(conn.clone()).await,
        (vec![], vec![]),
        "{}",
        gateway_log()
    );
    Ok(())
}
