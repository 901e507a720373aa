//! `GET /v1/sales/{sale}`: the sale page's read path, served from memory.
//!
//! One task per pod (`refresh`) reads every product's remaining stock from
//! Redis each 200–300 ms (jittered, so a fleet of pods does not read in
//! step), sets or clears the pod's sold-out flags from it, and publishes a
//! snapshot: the JSON body and its ETag, serialized once. A request loads the
//! snapshot (one pointer) and answers from it. No request reaches Redis,
//! whatever the storm: Redis sees one pipelined `GET` per product per tick
//! per pod, and nothing else from this path.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio_util::sync::CancellationToken as Shutdown;

use super::Gateway;
use super::error::{ApiError, ErrorBody, Segment};
use crate::spec::{Phase, SaleSpec};

/// A CDN (or a browser) may hold an answer this long.
pub const CACHE_CONTROL: &str = "public, max-age=1";

/// How old the stock figures in the answer are, in milliseconds: under one
/// refresh period normally, growing while Redis is unreachable.
pub const STOCK_AGE_HEADER: HeaderName = HeaderName::from_static("stock-age-ms");

/// The refresher's period, drawn anew each tick.
const REFRESH_MS: RangeInclusive<u64> = 200..=300;

/// The sale as its page shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SaleView {
    /// The FlashSale's name.
    pub sale: String,
    pub phase: SalePhase,
    /// RFC 3339, UTC.
    pub start_time: String,
    pub end_time: String,
    /// The same instants in Unix milliseconds, for a countdown.
    pub start_time_ms: i64,
    pub end_time_ms: i64,
    /// The gateway's clock when it made this snapshot (at most ~300 ms
    /// before the answer); behind a CDN add the `Age` header's seconds.
    pub server_time_ms: i64,
    pub purchase_ticket: PurchaseTicketView,
    pub products: Vec<ProductView>,
}

/// The sale's phase at `serverTimeMs` (warming shows as pending).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SalePhase {
    Pending,
    Active,
    Ended,
}

impl From<Phase> for SalePhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Pending | Phase::Warming => Self::Pending,
            Phase::Active => Self::Active,
            Phase::Ended => Self::Ended,
        }
    }
}

/// Whether a purchase needs a ticket from `POST /v1/sales/{sale}/tickets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PurchaseTicketView {
    pub required: bool,
    /// How long a ticket stays valid (0 when none is required).
    pub ttl_seconds: u32,
}

/// The page's ticket block, from the sale's spec.
pub fn purchase_ticket(spec: &SaleSpec) -> PurchaseTicketView {
    let t = spec.purchase_ticket;
    PurchaseTicketView {
        required: t.enabled,
        ttl_seconds: if t.enabled { t.ttl_seconds } else { 0 },
    }
}

/// One product on the page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductView {
    pub sku: String,
    /// Unit price as a decimal string.
    pub price: String,
    pub per_user_limit: u32,
    /// Units for sale in all.
    pub stock: i64,
    /// Units still for sale (stock comes back when an order fails or is cancelled).
    pub remaining: i64,
    pub sold_out: bool,
}

/// A built answer: body, ETag and stock age, shared by every request until
/// the next tick.
#[derive(Debug)]
pub struct Snapshot {
    body: Bytes,
    etag: HeaderValue,
    stock_age: HeaderValue,
}

/// This pod's current snapshot and the refresher's tally.
pub struct SalePage {
    current: ArcSwapOption<Snapshot>,
    refreshes: AtomicU64,
    metrics: SalePageMetrics,
}

impl SalePage {
    pub fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            refreshes: AtomicU64::new(0),
            metrics: SalePageMetrics::new(),
        }
    }

    /// Stock reads the refresher sent to Redis so far (answered or not).
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }
}

impl Default for SalePage {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles registered once, so a request bumps an atomic only.
struct SalePageMetrics {
    ok: metrics::Counter,
    not_modified: metrics::Counter,
    unknown_sale: metrics::Counter,
    not_ready: metrics::Counter,
    refreshed: metrics::Counter,
    refresh_failed: metrics::Counter,
    stock_age: metrics::Gauge,
}

impl SalePageMetrics {
    fn new() -> Self {
        crate::telemetry::prometheus();
        let answer = |o: &'static str| metrics::counter!("flashsale_gateway_sale_page_requests_total", "outcome" => o);
        let refresh = |r: &'static str| metrics::counter!("flashsale_gateway_sale_page_refreshes_total", "result" => r);
        Self {
            ok: answer("ok"),
            not_modified: answer("not_modified"),
            unknown_sale: answer("unknown_sale"),
            not_ready: answer("not_ready"),
            refreshed: refresh("ok"),
            refresh_failed: refresh("failed"),
            stock_age: metrics::gauge!("flashsale_gateway_sale_page_stock_age_seconds"),
        }
    }
}

/// The sale page: products, prices, limits, remaining stock, phase and the
/// server's clock.
///
/// Answered from the pod's memory, never from Redis: a snapshot each pod
/// rebuilds every 200–300 ms. `ETag` is weak: it covers everything but
/// `serverTimeMs`, so `If-None-Match` gets 304 while the sale is unchanged.
/// While Redis is unreachable the last stock figures are served, with their
/// age in `Stock-Age-Ms`.
#[utoipa::path(
    get,
    path = "/v1/sales/{sale}",
    tag = "sale",
    params(
        ("sale" = String, Path, description = "The FlashSale's name"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer: 304 if the sale is unchanged"),
    ),
    responses(
        (status = 200, description = "The sale", body = SaleView, headers(
            ("ETag" = String, description = "Weak validator of everything but serverTimeMs"),
            ("Cache-Control" = String, description = "public, max-age=1"),
            ("Stock-Age-Ms" = i64, description = "How old the stock figures are (ms); grows while Redis is unreachable"),
        )),
        (status = 304, description = "Unchanged since the ETag given in If-None-Match"),
        (status = 404, description = "unknown_sale: no such sale on this gateway", body = ErrorBody),
        (status = 503, description = "sale_page_not_ready: the pod has not read the sale's stock yet; see Retry-After", body = ErrorBody),
    )
)]
pub async fn get_sale(
    State(gw): State<Arc<Gateway>>,
    Segment(sale): Segment,
    request: Request,
) -> Response {
    let span = tracing::debug_span!("sale_page", sale = %sale);
    span.in_scope(|| answer(&gw, &sale, request.headers()))
}

/// The same page on this gateway's own sale, routed by its literal path
/// (`Gateway::router`), without a path parameter to extract.
pub async fn get_this_sale(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let span = tracing::debug_span!("sale_page", sale = %gw.sale.name);
    span.in_scope(|| answer(&gw, &gw.sale.name, request.headers()))
}

fn answer(gw: &Gateway, sale: &str, headers: &HeaderMap) -> Response {
    let page = &gw.sale_page;
    if sale != gw.sale.name {
        page.metrics.unknown_sale.increment(1);
        let mut resp = ApiError::unknown_sale(sale).into_response();
        // Misses are cacheable too: a CDN absorbs a storm of them.
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        );
        return resp;
    }
    let current = page.current.load();
    let Some(snap) = current.as_deref() else {
        page.metrics.not_ready.increment(1);
        let mut resp = ApiError::unavailable(
            "sale_page_not_ready",
            "this gateway has not read the sale's stock yet; retry shortly",
        )
        .into_response();
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return resp;
    };
    let cache = [
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        ),
        (header::ETAG, snap.etag.clone()),
        (STOCK_AGE_HEADER, snap.stock_age.clone()),
    ];
    if headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .any(|v| etag_matches(v, &snap.etag))
    {
        page.metrics.not_modified.increment(1);
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    page.metrics.ok.increment(1);
    (
        cache,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        snap.body.clone(),
    )
        .into_response()
}

/// `If-None-Match` by weak comparison (RFC 9110 13.1.2): `*`, or any listed
/// tag equal to ours ignoring `W/`.
fn etag_matches(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    fn opaque(t: &str) -> &str {
        let t = t.trim();
        t.strip_prefix("W/").unwrap_or(t)
    }
    let (Ok(list), Ok(ours)) = (if_none_match.to_str(), etag.to_str()) else {
        return false;
    };
    list.split(',')
        .any(|t| t.trim() == "*" || opaque(t) == opaque(ours))
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("reading remaining stock from redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("serializing the sale page: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Remaining units per SKU as Redis last answered (`None`: not warmed yet)
/// and when, by this pod's clock.
struct StockReading {
    at_ms: i64,
    remaining: HashMap<String, Option<i64>>,
}

/// The pod's one refresher: reads stock, updates the sold-out flags,
/// publishes the snapshot, sleeps 200–300 ms; until `shutdown`. When Redis
/// does not answer, the snapshot is rebuilt from the last reading (the clock
/// and phase move on, the stock figures' age shows).
pub async fn refresh(gw: Arc<Gateway>, shutdown: Shutdown) {
    let mut last: Option<StockReading> = None;
    let mut failing = false;
    loop {
        gw.sale_page.refreshes.fetch_add(1, Ordering::Relaxed);
        match read_stock(&gw).await {
            Ok(reading) => {
                if failing {
                    tracing::info!("sale page: stock readable again");
                    failing = false;
                }
                gw.sale_page.metrics.refreshed.increment(1);
                update_sold_out_flags(&gw, &reading);
                last = Some(reading);
            }
            Err(e) => {
                gw.sale_page.metrics.refresh_failed.increment(1);
                if !failing {
                    tracing::warn!(error = %e, "sale page: serving the last stock figures");
                    failing = true;
                }
            }
        }
        if let Some(reading) = &last {
            publish(&gw, reading);
        }
        let pause = Duration::from_millis(rand::random_range(REFRESH_MS));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn publish(gw: &Gateway, reading: &StockReading) {
    let now = jiff::Timestamp::now();
    match snapshot(gw, &gw.spec.load(), reading, now) {
        Ok(snap) => {
            let age_ms = (now.as_millisecond() - reading.at_ms).max(0);
            gw.sale_page.metrics.stock_age.set(age_ms as f64 / 1000.0);
            gw.sale_page.current.store(Some(Arc::new(snap)));
        }
        Err(e) => tracing::error!(error = %e, "sale page not rebuilt"),
    }
}

/// One pipelined `GET` of every product's remaining stock: one round trip.
async fn read_stock(gw: &Gateway) -> Result<StockReading, RefreshError> {
    let skus: Vec<(&str, &str)> = gw
        .products
        .values()
        .map(|p| (p.sku.as_str(), p.stock_key()))
        .collect();
    let mut pipe = redis::pipe();
    for (_, key) in &skus {
        pipe.cmd("GET").arg(*key);
    }
    let mut conn = gw.redis.clone();
    let values: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
    Ok(StockReading {
        at_ms: jiff::Timestamp::now().as_millisecond(),
        remaining: skus
            .iter()
            .map(|(sku, _)| sku.to_string())
            .zip(values)
            .collect(),
    })
}

/// The purchase path's sold-out flags follow the reading: set at zero (the
/// crowd is then answered from memory, as after a sold-out answer), cleared
/// with the replay snapshot when stock came back (a failed or cancelled order).
fn update_sold_out_flags(gw: &Gateway, reading: &StockReading) {
    for p in gw.products.values() {
        let Some(Some(remaining)) = reading.remaining.get(&p.sku) else {
            continue;
        };
        let flagged = p.sold_out.load(Ordering::Relaxed);
        if *remaining <= 0 && !flagged {
            tracing::debug!(sku = %p.sku, "sold out; flag set");
            p.sold_out.store(true, Ordering::Relaxed);
        } else if *remaining > 0 && flagged {
            tracing::info!(sku = %p.sku, remaining, "stock returned; sold-out flag cleared");
            // Flag first (SeqCst), then the snapshot: a snapshot loader
            // that stores after this sees the flag down and drops its own.
            p.sold_out.store(false, Ordering::SeqCst);
            p.replays.store(None);
        }
    }
}

/// The body and ETag for `spec` and `reading` at `now`. Products are the
/// spec's this pod sells (a product added mid-sale shows on the new pods the
/// operator rolls out).
fn snapshot(
    gw: &Gateway,
    spec: &SaleSpec,
    reading: &StockReading,
    now: jiff::Timestamp,
) -> Result<Snapshot, RefreshError> {
    let products = spec
        .products
        .iter()
        .filter(|p| gw.products.contains_key(&p.sku))
        .map(|p| {
            // Not warmed yet: nothing is sold.
            let remaining = reading
                .remaining
                .get(&p.sku)
                .copied()
                .flatten()
                .unwrap_or(p.stock);
            ProductView {
                sku: p.sku.clone(),
                price: p.price.to_string(),
                per_user_limit: p.per_user_limit,
                stock: p.stock,
                remaining: remaining.max(0),
                sold_out: remaining <= 0,
            }
        })
        .collect();
    let mut view = SaleView {
        sale: gw.sale.name.clone(),
        phase: spec.phase_at(now).into(),
        start_time: spec.start_time.to_string(),
        end_time: spec.end_time.to_string(),
        start_time_ms: spec.start_time.as_millisecond(),
        end_time_ms: spec.end_time.as_millisecond(),
        server_time_ms: 0,
        purchase_ticket: purchase_ticket(spec),
        products,
    };
    // The validator covers the content, not the clock.
    let digest = sha2::Sha256::digest(serde_json::to_vec(&view)?);
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..15]);
    view.server_time_ms = now.as_millisecond();
    let age_ms = (now.as_millisecond() - reading.at_ms).max(0);
    Ok(Snapshot {
        body: Bytes::from(serde_json::to_vec(&view)?),
        etag: HeaderValue::from_str(&format!("W/\"{tag}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("W/\"\"")),
        stock_age: HeaderValue::from(age_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let ours = hv("W/\"abc\"");
        assert!(etag_matches(&hv("W/\"abc\""), &ours));
        assert!(etag_matches(&hv("\"abc\""), &ours));
        assert!(etag_matches(&hv("\"x\", W/\"abc\""), &ours));
        assert!(etag_matches(&hv("*"), &ours));
        assert!(!etag_matches(&hv("W/\"abd\""), &ours));
        assert!(!etag_matches(&hv(""), &ours));
    }

    #[test]
    fn warming_shows_as_pending() {
        assert_eq!(SalePhase::from(Phase::Warming), SalePhase::Pending);
        assert_eq!(
            serde_json::to_string(&SalePhase::Active).ok().as_deref(),
            Some("\"active\"")
        );
    }
}
