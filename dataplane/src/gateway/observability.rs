//! Metrics, health and readiness, on the admin port; the trivial endpoint and
//! the JSON 404 on the public one.

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::{metrics_response, prometheus};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Gateway;
use super::error::ApiError;

pub fn admin_router(gw: Arc<Gateway>) -> Router {
    crate::metric_catalog::register(crate::metric_catalog::GATEWAY);
    Router::new()
        .route("/metrics", get(metrics_response))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(gw)
}

/// Ready when Redis answers a PING in time (on a Redis Cluster, any master)
/// and not every product's breaker is open: a pod that cannot reach Redis is
/// taken out of the Service rather than failing requests, while one failing
/// cluster master (its products' breakers) leaves the pod selling the rest.
async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    let products = &gw.products;
    if !products.is_empty() && products.values().all(|p| p.breaker.is_open()) {
        return (StatusCode::SERVICE_UNAVAILABLE, "redis circuit open").into_response();
    }
    // The purchases' connection: in a cluster it does not retry, so one
    // stalled master does not hold this PING up (the pod's other connection
    // waits out its retries and topology refreshes behind such a master).
    let mut conn = gw.purchases.clone();
    match tokio::time::timeout(Duration::from_secs(1), conn.ping()).await {
        Ok(Ok(_)) => "ready".into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "redis: timeout").into_response(),
    }
}

/// The trivial endpoint benchmarks compare the purchase path against: a
/// small JSON answer, so the client parses a body as for a purchase.
#[utoipa::path(
    get,
    path = "/v1/ping",
    tag = "meta",
    responses((status = 200, description = "Always `{\"status\":\"ok\"}`", body = Ping))
)]
pub async fn ping() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

/// The trivial endpoint by POST (any body and headers, ignored): the same
/// answer as GET.
#[utoipa::path(
    post,
    path = "/v1/ping",
    tag = "meta",
    responses((status = 200, description = "Always `{\"status\":\"ok\"}`", body = Ping))
)]
pub async fn ping_post() -> Response {
    ping().await
}

/// The purchase path's metric handles, registered once: the hot path only
/// bumps atomics instead of looking labels up in the registry per request.
pub struct PurchaseMetrics {
    by_outcome: std::collections::HashMap<&'static str, metrics::Counter>,
    pub request_duration: metrics::Histogram,
    pub redis_duration: metrics::Histogram,
}

impl PurchaseMetrics {
    pub fn new() -> Self {
        use super::purchase::outcome::*;
        prometheus();
        let by_outcome = [
            ACCEPTED,
            DUPLICATE,
            SOLD_OUT,
            SOLD_OUT_LOCAL,
            LIMIT,
            NOT_STARTED,
            ENDED,
            RATE_LIMITED,
            BAD_REQUEST,
            UNAUTHENTICATED,
            TICKET_REQUIRED,
            TICKET_INVALID,
            UNAVAILABLE,
            REPLICATION_PENDING,
        ]
        .into_iter()
        .map(|o| {
            (
                o,
                metrics::counter!("flashsale_gateway_requests_total", "outcome" => o),
            )
        })
        .collect();
        Self {
            by_outcome,
            request_duration: metrics::histogram!(
                "flashsale_gateway_request_duration_seconds", "route" => "purchase"
            ),
            redis_duration: metrics::histogram!("flashsale_gateway_redis_duration_seconds"),
        }
    }

    pub fn outcome(&self, label: &'static str) {
        if let Some(c) = self.by_outcome.get(label) {
            c.increment(1);
        }
    }
}

impl Default for PurchaseMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The ping's answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Ping {
    /// Always `ok`.
    pub status: String,
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route; see /openapi.json")
}

/// A known path with a method it does not take: JSON like every refusal
/// (axum's `Allow` header is kept).
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}
