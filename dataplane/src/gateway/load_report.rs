//! Each gateway publishes its load about once a second: the autoscaler reads
//! these reports, and the gateways count each other from them to split the
//! sale's global rate limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Gateway;
use crate::keys::SaleKeys;

/// Reports older than this are stale: the pod is gone or cannot reach Redis.
pub const REPORT_TTL: Duration = Duration::from_secs(5);

/// The live set and the reports expire this long after the last report, so
/// a gateway that reports after its sale's keys were cleared (a pod
/// force-deleted while its process still ran) leaves nothing behind for good.
const KEYS_TTL_MS: u64 = 60_000;

/// One gateway pod's load at one instant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub pod: String,
    /// Unix milliseconds when measured.
    pub at_ms: i64,
    /// Open WebSocket connections.
    pub connections: i64,
    /// Purchase requests per second over the last interval.
    pub requests_per_second: f64,
}

pub(super) async fn run(gw: Arc<Gateway>, shutdown: CancellationToken) {
    let keys = SaleKeys::new(&gw.sale);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = (
        std::time::Instant::now(),
        gw.load.requests.load(Ordering::Relaxed),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let now = std::time::Instant::now();
        let requests = gw.load.requests.load(Ordering::Relaxed);
        let rps = (requests - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(0.001);
        last = (now, requests);
        let report = LoadReport {
            pod: gw.pod.clone(),
            at_ms: jiff::Timestamp::now().as_millisecond(),
            connections: gw.load.connections.load(Ordering::Relaxed),
            requests_per_second: rps,
        };
        match publish(&gw, &keys, &report).await {
            Ok(live) => {
                gw.limits
                    .set_gateway_count(u32::try_from(live).unwrap_or(1));
                // Seconds since the epoch fit an f64 exactly to the millisecond.
                metrics::gauge!("flashsale_gateway_load_report_timestamp_seconds")
                    .set(report.at_ms as f64 / 1000.0);
                metrics::gauge!("flashsale_gateway_live_gateways").set(live as f64);
            }
            Err(e) => tracing::debug!(error = %e, "load report not published"),
        }
    }
    // Leave at once so the others take over this pod's share of the rate limit.
    let mut conn = gw.redis.clone();
    let _: Result<(), _> = redis::pipe()
        .cmd("ZREM")
        .arg(keys.gateways())
        .arg(&gw.pod)
        .ignore()
        .cmd("HDEL")
        .arg(keys.gateway_reports())
        .arg(&gw.pod)
        .ignore()
        .query_async(&mut conn)
        .await;
}

/// Writes the report, drops stale peers, and returns how many gateways are live.
async fn publish(
    gw: &Gateway,
    keys: &SaleKeys,
    report: &LoadReport,
) -> Result<u64, redis::RedisError> {
    let json = serde_json::to_string(report).unwrap_or_default();
    let stale_before = report.at_ms - i64::try_from(REPORT_TTL.as_millis()).unwrap_or(5000);
    let mut conn = gw.redis.clone();
    let (stale, live): (Vec<String>, u64) = redis::pipe()
        .cmd("ZADD")
        .arg(keys.gateways())
        .arg(report.at_ms)
        .arg(&report.pod)
        .ignore()
        .cmd("HSET")
        .arg(keys.gateway_reports())
        .arg(&report.pod)
        .arg(json)
        .ignore()
        .cmd("ZRANGEBYSCORE")
        .arg(keys.gateways())
        .arg("-inf")
        .arg(stale_before)
        .cmd("ZREMRANGEBYSCORE")
        .arg(keys.gateways())
        .arg("-inf")
        .arg(stale_before)
        .ignore()
        .cmd("ZCARD")
        .arg(keys.gateways())
        .cmd("PEXPIRE")
        .arg(keys.gateways())
        .arg(KEYS_TTL_MS)
        .ignore()
        .cmd("PEXPIRE")
        .arg(keys.gateway_reports())
        .arg(KEYS_TTL_MS)
        .ignore()
        .query_async(&mut conn)
        .await?;
    if !stale.is_empty() {
        redis::cmd("HDEL")
            .arg(keys.gateway_reports())
            .arg(&stale)
            .exec_async(&mut conn)
            .await?;
    }
    Ok(live)
}

/// Every live gateway's latest report (the autoscaler's input).
pub async fn read_reports<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    sale: &crate::spec::SaleId,
    now_ms: i64,
) -> Result<Vec<LoadReport>, redis::RedisError> {
    let keys = SaleKeys::new(sale);
    let raw: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.gateway_reports())
        .query_async(conn)
        .await?;
    let stale_before = now_ms - i64::try_from(REPORT_TTL.as_millis()).unwrap_or(5000);
    let mut reports: Vec<LoadReport> = raw
        .values()
        .filter_map(|v| serde_json::from_str::<LoadReport>(v).ok())
        .filter(|r| r.at_ms >= stale_before)
        .collect();
    reports.sort_by(|a, b| a.pod.cmp(&b.pod));
    Ok(reports)
}
