//! `GET /v1/orders/{id}`: an order's status, for its owner only.

use std::sync::Arc;

use super::error::Segment;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::Gateway;
use super::error::{ApiError, ErrorBody};
use crate::order::{OrderRecord, OrderStatus, sku_of};

/// An order as its owner sees it.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: String,
    pub sku: String,
    pub quantity: u32,
    /// Unit price as a decimal string.
    pub unit_price: String,
    pub status: OrderStatus,
    /// RFC 3339 time the gateway accepted it (Redis clock).
    pub accepted_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl OrderView {
    pub fn new(sku: &str, rec: OrderRecord) -> Self {
        Self {
            accepted_at: jiff::Timestamp::from_millisecond(rec.at)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            order_id: rec.id,
            sku: sku.to_string(),
            quantity: rec.qty,
            unit_price: rec.price,
            status: rec.status,
            reason: rec.reason,
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    tag = "orders",
    params(("id" = String, Path, description = "The order id from the 202 answer (`<sku>.<ULID>`)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 400, description = "bad_header: Authorization over 4096 bytes or not text", body = ErrorBody),
        (status = 401, description = "unauthenticated: missing, malformed, forged or expired token", body = ErrorBody),
        (status = 404, description = "unknown_order: no such order for this user (another user's order is reported the same way)", body = ErrorBody),
        (status = 503, description = "store_unavailable or store_timeout: Redis unreachable or slow; retry after Retry-After seconds", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn get_order(
    State(gw): State<Arc<Gateway>>,
    Segment(id): Segment,
    headers: HeaderMap,
) -> Response {
    match lookup(&gw, &id, &headers).await {
        Ok(view) => axum::Json(view).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn lookup(gw: &Gateway, id: &str, headers: &HeaderMap) -> Result<OrderView, ApiError> {
    let auth = super::purchase::authorization(headers)?;
    let user = gw
        .verifier
        .user_from_header(auth)
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let missing = || ApiError::not_found("unknown_order", format!("no order {id:?} for you"));
    let sku = sku_of(id).ok_or_else(missing)?;
    // Keys from the sale and the SKU, not this pod's products: an order of a
    // product added after this pod booted, or removed since, is found too.
    let orders = crate::keys::ProductKeys::new(&gw.sale, sku).orders();
    let mut conn = gw.redis.clone();
    let raw = tokio::time::timeout(
        gw.redis_timeout,
        redis::cmd("HGET")
            .arg(&orders)
            .arg(id)
            .query_async::<Option<String>>(&mut conn),
    )
    .await
    .map_err(|_| ApiError::unavailable("store_timeout", "the order store is slow; retry shortly"))?
    .map_err(|_| ApiError::unavailable("store_unavailable", "the order store is unavailable"))?;
    let rec = raw
        .and_then(|r| OrderRecord::decode(id, &r))
        .ok_or_else(missing)?;
    // Someone else's order is reported as absent, not forbidden: ids leak nothing.
    if rec.user != user {
        return Err(missing());
    }
    Ok(OrderView::new(sku, rec))
}
