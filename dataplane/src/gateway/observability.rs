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
    prometheus();
    Router::new()
        .route("/metrics", get(metrics_response))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(gw)
}

/// Ready when Redis answers a PING in time and the breaker is closed: a pod
/// that cannot reach Redis is taken out of the Service rather than failing requests.
async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.breaker.is_open() {
        return (StatusCode::SERVICE_UNAVAILABLE, "redis circuit open").into_response();
    }
    let mut conn = gw.redis.clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut conn);
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => "ready".into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "redis: timeout").into_response(),
    }
}

/// The trivial endpoint benchmarks compare the purchase path against.
pub async fn ping() -> &'static str {
    "pong"
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route; see /openapi.json")
}
