//! `POST /v1/sales/{sale}/purchase`: the filters, cheapest first, then one
//! Lua script in Redis that decides.
// A refusal is the common answer during a sale; it travels as a ready
// `Response` in `Err` rather than boxed, which would allocate per request.
#![allow(clippy::result_large_err)]

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::Gateway;
use super::commit::Decision;
use super::error::{ApiError, ErrorBody, Segment};
use super::tickets;
use crate::order::new_order_id;
use crate::redis_conn::RedisMode;
use crate::scripts::{self, KeyClaim, PurchaseAnswer};
use crate::spec::Phase;
use crate::ticket::TicketError;

/// Largest request body accepted; a purchase is a few dozen bytes.
pub const MAX_BODY_BYTES: usize = 1024;
const MAX_AUTH_HEADER_BYTES: usize = 4096;
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// The request body as parsed on the hot path: the SKU borrowed from the
/// request bytes (`PurchaseRequest` is the same shape, for the API document
/// and for explaining a parse failure).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurchaseBody<'a> {
    #[serde(borrow)]
    sku: Cow<'a, str>,
    #[serde(deserialize_with = "whole_number")]
    quantity: i64,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    /// The product's SKU, as in the FlashSale spec (a SKU not in this sale is
    /// 404 unknown_sku).
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[a-z0-9][a-z0-9_-]{0,63}$"
    )]
    pub sku: String,
    /// Units to buy: at least 1 (400 invalid_quantity below); above the
    /// product's perUserLimit is 409 limit_reached.
    #[schema(minimum = 1, maximum = 4294967295_i64)]
    #[serde(deserialize_with = "whole_number")]
    pub quantity: i64,
}

/// A whole JSON number as i64: `2`, and `2.0` or `2e0` too, which JSON
/// Schema's `integer` (what the document promises) admits as well.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // Within ±2^63 a whole f64 converts exactly.
            if v.fract() == 0.0 && v.abs() < 9.223_372_036_854_776e18 {
                Ok(v as i64)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(Whole)
}

/// The answer to a winner: the order exists and will be persisted or failed
/// explicitly; its updates are pushed on `pushUrl`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PurchaseAccepted {
    pub order_id: String,
    /// Always `accepted`.
    pub status: Cow<'static, str>,
    pub status_url: String,
    pub push_url: Cow<'static, str>,
}

/// Outcome labels of `flashsale_gateway_requests_total`.
pub mod outcome {
    pub const ACCEPTED: &str = "accepted";
    pub const DUPLICATE: &str = "duplicate";
    pub const SOLD_OUT: &str = "sold_out";
    pub const SOLD_OUT_LOCAL: &str = "sold_out_local";
    pub const INSUFFICIENT_STOCK: &str = "insufficient_stock";
    pub const LIMIT: &str = "limit_reached";
    pub const NOT_STARTED: &str = "not_started";
    pub const ENDED: &str = "ended";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    pub const TICKET_REQUIRED: &str = "ticket_required";
    pub const TICKET_INVALID: &str = "ticket_invalid";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const REPLICATION_PENDING: &str = "replication_pending";
}

/// Buy units of one product.
///
/// Checks run cheapest first, and the first that fails answers: the body's
/// size (413 `body_too_large`, over 1024 bytes); the `Authorization` and
/// `Idempotency-Key` headers' sizes and characters (400 `bad_header`); the
/// content type (415 `unsupported_media_type` unless `application/json`, with
/// or without parameters, or absent: a body without a type is read as JSON);
/// the sale name (404 `unknown_sale`); the JSON body (400 `invalid_json`); the
/// SKU (404 `unknown_sku`); the quantity (400 `invalid_quantity` below 1, 409
/// `limit_reached` above the product's per-user limit); the sale window by the
/// gateway's clock, with an allowance for clock skew, 1 s by default (425 `not_started`,
/// 410 `ended`); the gateway's sold-out flag for the SKU (410 `sold_out`); the
/// bearer token (401 `unauthenticated`); the purchase ticket, when the sale
/// requires one (403 `ticket_required` without the header, `ticket_invalid`
/// for a bad signature, another buyer's or sale's ticket, or an expired one);
/// rate limits (429 `rate_limited`); the product's circuit breaker, open for
/// 1 s after 5 of its Redis calls failed in a row (503 `store_unavailable`);
/// the Idempotency-Key's first use in this sale (422
/// `idempotency_key_reused`); then the atomic decision in Redis, where an
/// idempotent replay comes first, then the sale window by Redis' clock, then
/// the ticket's single use (403 `ticket_invalid`, reason `used`), then stock
/// and limit (202, or 410 `sold_out`, 409 `insufficient_stock` or
/// `limit_reached`, 425, 410 `ended`, 503). "Sold out" is public, so a
/// request for a product this gateway already knows is sold out is answered
/// before its token and ticket are checked, unless it carries an
/// `Idempotency-Key` that a winner used: that may be a winner's retry,
/// answered with its order, which needs the verified user (and, on a ticket
/// sale, a valid ticket). A ticket is spent by the first stock decision it
/// reaches for a product (won, sold out or limit reached), so it is usable
/// once per product; a retry with the same `Idempotency-Key` and ticket still
/// gets its order. A refused ticket touches no stock.
#[utoipa::path(
    post,
    path = "/v1/sales/{sale}/purchase",
    tag = "purchase",
    params(
        ("sale" = String, Path, max_length = 253, description = "The FlashSale's name (another name: 404 unknown_sale)"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]{1,128}$",
            description = "A retry with the same key and the same request returns the same order, never a second one; the key is the buyer's for the whole sale, and the same key with another SKU or quantity is 422. 1-128 visible ASCII characters (0x21-0x7E); anything else is 400 bad_header"),
        ("Purchase-Ticket" = Option<String>, Header, nullable = false, min_length = 1, max_length = 1024,
            description = "A ticket from POST /v1/sales/{sale}/tickets; required when the sale uses purchase tickets, ignored otherwise (at most 1024 bytes)"),
    ),
    request_body(content = PurchaseRequest, content_type = "application/json",
        description = "At most 1024 bytes (413 body_too_large). Content-Type application/json (parameters such as charset allowed) or none; any other type is 415 unsupported_media_type"),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Won: the order is accepted (or, for a retry with the same Idempotency-Key, the order it won)", body = PurchaseAccepted),
        (status = 400, description = "Malformed request: invalid_json (not JSON, a missing or unknown field, a wrong type), invalid_quantity (below 1), bad_header (Authorization over 4096 bytes, an Idempotency-Key that is not 1-128 visible ASCII, a header that is not text)", body = ErrorBody),
        (status = 401, description = "unauthenticated: missing, malformed, forged or expired token, or a subject that is not a user id (checked after the sold-out flag, see above)", body = ErrorBody),
        (status = 403, description = "ticket_required: the sale requires a Purchase-Ticket header; ticket_invalid: the ticket's signature does not verify, or it is another buyer's or another sale's, expired, or already spent on this product (reason: malformed, bad_signature, other_buyer, other_sale, expired, used). No stock is touched", body = ErrorBody),
        (status = 404, description = "unknown_sale (no sale of that name on this gateway; `sale`), unknown_sku (`sku`), or not_found (an empty sale name: no route)", body = ErrorBody),
        (status = 409, description = "limit_reached: the quantity is above the product's per-user limit, or with what the buyer already holds it would be; the body carries `limit` and `held` or `quantity`. insufficient_stock: fewer units are left than the quantity asked for (the body carries `sku` and `remaining`); a smaller quantity can still win", body = ErrorBody),
        (status = 410, description = "sold_out (the body names the `sku`), or ended (the body carries `endedAt`)", body = ErrorBody),
        (status = 413, description = "body_too_large: the body is over 1024 bytes", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: a Content-Type other than application/json", body = ErrorBody),
        (status = 422, description = "idempotency_key_reused: this buyer's Idempotency-Key was first used in this sale for another request (another SKU or quantity); the body names that request (sku, quantity) and the order it made (orderId, when it won). A key is the buyer's for the whole sale", body = ErrorBody),
        (status = 425, description = "not_started: the sale has not started (the body carries `startsAt`)", body = ErrorBody),
        (status = 429, description = "rate_limited (per user, per IP or global, named in `scope`); retry after Retry-After seconds", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "store_unavailable or store_timeout (Redis unreachable or slow; after store_timeout the decision may still have been taken: a retry with the same Idempotency-Key returns the order if it was), sale_not_ready (not warmed yet), store_protocol, redis_layout (the sale was warmed by a data plane with another Redis key layout: finish it on the version that started it), or, under redis.durability: replica, replication_pending: the order (orderId) is taken on the Redis master but no replica confirmed it in time (a retry with the same Idempotency-Key returns that order, a retry without one may make a second order); retry after Retry-After seconds", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn purchase(
    State(gw): State<Arc<Gateway>>,
    Segment(sale): Segment,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
) -> Response {
    serve(&gw, &sale, peer, request).await
}

/// The same endpoint on this gateway's own sale, routed by its literal path
/// (`Gateway::router`): no path parameter to extract, which costs axum about
/// five allocations per request. Any other spelling of the path (another
/// sale, a percent-encoded name) takes [`purchase`].
pub async fn purchase_this_sale(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
) -> Response {
    serve(&gw, &gw.sale.name, peer, request).await
}

async fn serve(
    gw: &Gateway,
    sale: &str,
    peer: SocketAddr,
    request: axum::extract::Request,
) -> Response {
    let started = Instant::now();
    // The whole request rather than a HeaderMap extractor, which would clone the headers.
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    gw.load.requests.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("purchase", sale = %sale, sku = tracing::field::Empty, user = tracing::field::Empty);
    let result = handle(gw, sale, peer, headers, body).instrument(span).await;
    let (label, response) = match result {
        Ok((label, accepted)) => (
            label,
            (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        ),
        Err(refused) => refused,
    };
    gw.metrics.outcome(label);
    gw.metrics
        .request_duration
        .record(started.elapsed().as_secs_f64());
    response
}

type Outcome<T> = Result<T, (&'static str, Response)>;

fn fail<T>(label: &'static str, err: ApiError) -> Outcome<T> {
    Err((label, err.into_response()))
}

fn refuse(label: &'static str) -> impl FnOnce(ApiError) -> (&'static str, Response) {
    move |e| (label, e.into_response())
}

async fn handle(
    gw: &Gateway,
    sale: &str,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Body,
) -> Outcome<(&'static str, PurchaseAccepted)> {
    use outcome::*;
    // 1. Body and header limits.
    let bytes = read_body(body).await.map_err(refuse(BAD_REQUEST))?;
    let auth = authorization(headers).map_err(refuse(BAD_REQUEST))?;
    let idem = header_str(headers, "idempotency-key", MAX_IDEMPOTENCY_KEY_BYTES)
        .map_err(refuse(BAD_REQUEST))?;
    if let Some(k) = idem
        && (k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()))
    {
        return fail(
            BAD_REQUEST,
            ApiError::bad_request(
                "bad_header",
                "Idempotency-Key must be 1-128 visible ASCII characters",
            ),
        );
    }
    json_body(headers).map_err(refuse(BAD_REQUEST))?;
    // 2. Which sale and what is asked (cheap, local; the body's SKU is
    // borrowed from the request bytes unless it holds escapes).
    if sale != gw.sale.name {
        return fail(BAD_REQUEST, ApiError::unknown_sale(sale));
    }
    let req: PurchaseBody = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return fail(
                BAD_REQUEST,
                ApiError::bad_request("invalid_json", json_problem(&bytes, e)),
            );
        }
    };
    let sku: &str = &req.sku;
    tracing::Span::current().record("sku", sku);
    let Some(product) = gw.products.get(sku).filter(|p| p.on_sale()) else {
        return fail(
            BAD_REQUEST,
            ApiError::not_found("unknown_sku", format!("sku {sku:?} is not on sale"))
                .with("sku", sku),
        );
    };
    if req.quantity < 1 {
        return fail(
            BAD_REQUEST,
            ApiError::bad_request("invalid_quantity", "quantity must be at least 1")
                .with("quantity", req.quantity),
        );
    }
    // Above the per-user limit is not malformed (the limit is the sale's, not
    // the API's): it is the answer the script would give, without asking it.
    if req.quantity > i64::from(product.limit()) {
        return fail(
            LIMIT,
            ApiError::new(
                StatusCode::CONFLICT,
                "limit_reached",
                format!(
                    "quantity {} is above the per-user limit of {} for {sku}",
                    req.quantity,
                    product.limit()
                ),
            )
            .with("quantity", req.quantity)
            .with("limit", product.limit()),
        );
    }
    // 3. Sale phase from local config (Redis' clock has the last word inside
    // the script; the skew allowance keeps a fast local clock from refusing early).
    match gw.local_phase() {
        Phase::Pending | Phase::Warming => {
            return fail(
                NOT_STARTED,
                not_started(gw.spec.load().start_time.to_string()),
            );
        }
        Phase::Ended => return fail(ENDED, ended(gw.spec.load().end_time.to_string())),
        Phase::Active => {}
    }
    // 4. Local sold-out flag: once this pod saw the product sold out, the
    // crowd is answered from memory, before the token's signature is checked:
    // "sold out" is public, and the crowd after a sell-out is most of the
    // traffic. Only a request whose Idempotency-Key some winner used may be a
    // winner's retry, answered with its order: that one needs the verified
    // user. Until the replay snapshot is loaded, keyed requests go to Redis.
    let flagged = product.sold_out.load(Ordering::Relaxed);
    if flagged {
        let answer_now = match idem {
            None => true,
            Some(k) => product
                .replays
                .load()
                .as_deref()
                .is_some_and(|r| !r.has_key(k)),
        };
        if answer_now {
            return Err((SOLD_OUT_LOCAL, product.sold_out_response()));
        }
    }
    // 5. Token.
    let user = gw
        .verifier
        .user_from_header(auth)
        .map_err(|e| refuse(UNAUTHENTICATED)(ApiError::unauthorized(e.to_string())))?;
    tracing::Span::current().record("user", user.as_str());
    // 5b. Purchase ticket, when the sale requires one: signature, buyer,
    // sale and expiry here, single use in the script.
    let ticket = if gw.spec.load().purchase_ticket.enabled {
        let checked = tickets::check(gw, headers, &user).map_err(|e| {
            let label = match e.code {
                "ticket_required" => TICKET_REQUIRED,
                "ticket_invalid" => TICKET_INVALID,
                _ => BAD_REQUEST,
            };
            refuse(label)(e)
        })?;
        Some(checked)
    } else {
        None
    };
    if flagged && let Some(k) = idem {
        let replay = product
            .replays
            .load()
            .as_deref()
            .map(|r| r.order(&user, k).map(str::to_string));
        match replay {
            Some(Some(id)) => return Ok((DUPLICATE, accepted(id))),
            Some(None) => return Err((SOLD_OUT_LOCAL, product.sold_out_response())),
            None => {}
        }
    }
    // `concat` sizes each string once (`format!` grows it while writing).
    let idem_field = idem
        .map(|k| [&user, "\x1f", k].concat())
        .unwrap_or_default();
    // 6. Rate limits.
    let ip = client_ip(headers, gw.client_ip_header.as_ref(), peer.ip());
    if let Err(l) = gw.limits.check(&user, ip) {
        metrics::counter!("flashsale_gateway_rate_limited_total", "scope" => l.scope.as_str())
            .increment(1);
        let secs = l.retry_after.as_secs() + u64::from(l.retry_after.subsec_nanos() > 0);
        return fail(
            RATE_LIMITED,
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests ({} limit)", l.scope.as_str()),
            )
            .with("scope", l.scope.as_str())
            .retry_after(secs),
        );
    }
    // 7. The script (after the key's binding, for a keyed request).
    if !product.breaker.allow() {
        return fail(
            UNAVAILABLE,
            ApiError::unavailable(
                "store_unavailable",
                "the stock store is unavailable; retry shortly",
            ),
        );
    }
    let mut conn = gw.redis.clone();
    let claim_request = idem.map(|_| [sku, " ", itoa::Buffer::new().format(req.quantity)].concat());
    let claim = claim_request.as_deref().map(|request| KeyClaim {
        hash: &gw.idempotency_key,
        request,
        keep_until_ms: keep_bindings_until(gw),
    });
    // On a standalone Redis the key's binding runs inside the purchase call;
    // in a cluster (two slots) and under group commit it is a call of its own.
    let claim_inside = product.committer.is_none() && conn.mode() == RedisMode::Standalone;
    if let (Some(claim), Some(k)) = (&claim, idem)
        && !claim_inside
    {
        let invocation = claim.invocation(&idem_field);
        let call = invocation.invoke_async::<(String, String, String)>(&mut conn);
        let (verdict, first, _) =
            bounded(gw, &product.breaker, "idempotency key binding", call).await?;
        if verdict == "reused" {
            return Err(key_reused(gw, &mut conn, k, &idem_field, &first).await);
        }
    }
    let order_id = new_order_id(sku);
    let redis_started = Instant::now();
    let ticket = ticket.map(|t| (product.layout.ticket(&t.id), t.expires_at_ms));
    let answer = match &product.committer {
        // redis.durability: replica — the script and a WAIT, batched per product.
        Some(committer) => {
            let call = committer.submit(&user, req.quantity, &order_id, &idem_field, ticket);
            bounded(gw, &product.breaker, "purchase script", call).await
        }
        None => {
            let purchase = scripts::Purchase {
                keys: &product.keys,
                user: &user,
                quantity: req.quantity,
                order_id: &order_id,
                idempotency_field: &idem_field,
                ticket: ticket.as_ref(),
            };
            let invocation = match &claim {
                Some(claim) if claim_inside => purchase.claiming(claim),
                _ => purchase.invocation(),
            };
            let mut purchases = gw.purchases.clone();
            let call = invocation.invoke_async::<PurchaseAnswer>(&mut purchases);
            bounded(gw, &product.breaker, "purchase script", call)
                .await
                .map(|answer| Decision {
                    answer,
                    replicated: true,
                })
        }
    };
    gw.metrics
        .redis_duration
        .record(redis_started.elapsed().as_secs_f64());
    let Decision { answer, replicated } = answer?;
    let (verdict, a, b) = match answer {
        PurchaseAnswer::Accepted { remaining } => {
            if remaining == 0 {
                product.sold_out.store(true, Ordering::Relaxed);
            }
            if !replicated {
                return fail(REPLICATION_PENDING, replication_pending(order_id));
            }
            publish_accepted(gw, &user, &order_id, sku);
            return Ok((ACCEPTED, accepted(order_id)));
        }
        PurchaseAnswer::Other(verdict, a, b) => (verdict, a, b),
    };
    match verdict.as_str() {
        "dup" if !replicated => fail(REPLICATION_PENDING, replication_pending(a)),
        "dup" => Ok((DUPLICATE, accepted(a))),
        "reused" => match idem {
            Some(k) => Err(key_reused(gw, &mut conn, k, &idem_field, &a).await),
            None => unexpected_answer(&verdict),
        },
        // Fewer units left than asked for: the product is not sold out (a
        // smaller request can still win), so no flag and no 410.
        "soldout" if a != "0" => fail(
            INSUFFICIENT_STOCK,
            ApiError::new(
                StatusCode::CONFLICT,
                "insufficient_stock",
                format!("only {a} of {sku} left; ask for fewer"),
            )
            .with("sku", sku)
            .with("remaining", a.parse::<i64>().unwrap_or(0)),
        ),
        "soldout" => {
            product.sold_out.store(true, Ordering::Relaxed);
            fail(SOLD_OUT, sold_out(sku).with("remaining", 0))
        }
        "limit" => fail(
            LIMIT,
            ApiError::new(
                StatusCode::CONFLICT,
                "limit_reached",
                format!("you already hold {a} of {} allowed units of {sku}", b),
            )
            .with("held", a.parse::<i64>().unwrap_or(0))
            .with("limit", b.parse::<i64>().unwrap_or(0)),
        ),
        "ticket" => fail(
            TICKET_INVALID,
            tickets::invalid(if a == "used" {
                TicketError::Used
            } else {
                TicketError::Expired
            }),
        ),
        "early" => fail(NOT_STARTED, not_started(ms_to_rfc3339(&a))),
        "ended" => fail(ENDED, ended(ms_to_rfc3339(&a))),
        "nosale" => fail(
            UNAVAILABLE,
            ApiError::unavailable(
                "sale_not_ready",
                "the sale has not been warmed into Redis yet",
            )
            .retry_after(5),
        ),
        "layout" => {
            if !product.layout_refused.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    found = %a,
                    expected = %b,
                    sku,
                    "the product's Redis data has another key layout; it was warmed by another version of the data plane, and this gateway refuses every purchase of it"
                );
            }
            fail(
                UNAVAILABLE,
                ApiError::unavailable(
                    "redis_layout",
                    "this sale was started by another version of the data plane; this gateway cannot sell it",
                ),
            )
        }
        other => unexpected_answer(other),
    }
}

fn unexpected_answer<T>(answer: &str) -> Outcome<T> {
    tracing::error!(answer, "unexpected answer from purchase.lua");
    fail(
        outcome::UNAVAILABLE,
        ApiError::unavailable("store_protocol", "unexpected answer from the stock store"),
    )
}

/// One Redis call on the purchase path, bounded by the gateway's timeout:
/// the breaker learns its outcome, and a failure or a timeout is a fast 503.
async fn bounded<T>(
    gw: &Gateway,
    breaker: &crate::breaker::Breaker,
    what: &'static str,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Outcome<T> {
    use outcome::UNAVAILABLE;
    match tokio::time::timeout(gw.redis_timeout, call).await {
        Ok(Ok(v)) => {
            breaker.success();
            Ok(v)
        }
        Ok(Err(e)) => {
            breaker.failure();
            tracing::warn!(error = %e, what, "redis call failed");
            fail(
                UNAVAILABLE,
                ApiError::unavailable("store_unavailable", "the stock store failed; retry shortly"),
            )
        }
        Err(_) => {
            breaker.failure();
            tracing::warn!(
                timeout_ms = gw.redis_timeout.as_millis(),
                what,
                "redis call timed out"
            );
            fail(
                UNAVAILABLE,
                ApiError::unavailable(
                    "store_timeout",
                    "the stock store is slow and may still decide this purchase; retry shortly with the same Idempotency-Key to get its order if it was taken",
                ),
            )
        }
    }
}

/// How long a sale's Idempotency-Key bindings are kept: its end, its payment
/// timeout and a day.
fn keep_bindings_until(gw: &Gateway) -> i64 {
    let spec = gw.spec.load();
    let keep_until = spec.end_time
        + jiff::SignedDuration::from_secs(i64::from(spec.payment.timeout_seconds) + 86_400);
    keep_until.as_millisecond()
}

/// The answer when the buyer's Idempotency-Key was first used with another
/// request in this sale (`claim.lua` said `reused`, `first` being that
/// request). A key is the buyer's for the whole sale, like a payment API's: a
/// retry of the same request goes on (the purchase script answers it with its
/// order); the same key with another request is 422 `idempotency_key_reused`,
/// naming the request and the order it made. On a Redis Cluster the binding
/// (the sale's hash tag) and the purchase (the product's) are two calls; a
/// crash between them leaves a binding without an order, which a retry
/// completes.
async fn key_reused(
    gw: &Gateway,
    conn: &mut crate::redis_conn::RedisConn,
    key: &str,
    field: &str,
    first: &str,
) -> (&'static str, Response) {
    let (first_sku, first_quantity) = first.split_once(' ').unwrap_or((first, ""));
    // The order the key's first request made, if it made one.
    let order: Option<String> = match gw.products.get(first_sku) {
        Some(p) => redis::cmd("HGET")
            .arg(p.idempotency_key())
            .arg(field)
            .query_async(conn)
            .await
            .unwrap_or(None),
        None => None,
    };
    let message = format!(
        "Idempotency-Key {key:?} was first used for {first_quantity} × {first_sku}{}; a new request needs a new key",
        order
            .as_deref()
            .map(|o| format!(" (order {o})"))
            .unwrap_or_default()
    );
    let mut error = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        message,
    )
    .with("sku", first_sku)
    .with("quantity", first_quantity.parse::<i64>().unwrap_or(0));
    if let Some(o) = order {
        error = error.with("orderId", o);
    }
    (outcome::BAD_REQUEST, error.into_response())
}

/// Queues `order.accepted` for the pod holding the buyer's socket, off the
/// answer's path (routed in batches): the 202 already tells this client; the
/// push is for its other tabs and for clients that only listen.
fn publish_accepted(gw: &Gateway, user: &str, order_id: &str, sku: &str) {
    let event =
        crate::events::OrderEvent::new(order_id, sku, crate::order::OrderStatus::Accepted, None);
    if gw.accepted.try_send((user.to_string(), event)).is_err() {
        tracing::debug!("push queue full; order.accepted not pushed");
    }
}

/// The parse error with the offending field named ("quantity: invalid type
/// ..."): serde_path_to_error tracks the path, so it is only run to explain a
/// failure, never on the accept path.
fn json_problem(bytes: &[u8], plain: serde_json::Error) -> String {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, PurchaseRequest>(&mut de) {
        Err(e) if e.path().to_string() != "." => {
            format!("request body: {}: {}", e.path(), e.inner())
        }
        _ => format!("request body: {plain}"),
    }
}

fn accepted(id: String) -> PurchaseAccepted {
    PurchaseAccepted {
        status_url: ["/v1/orders/", &id].concat(),
        push_url: Cow::Borrowed("/v1/ws"),
        order_id: id,
        status: Cow::Borrowed("accepted"),
    }
}

/// The order exists on the Redis master, but no replica confirmed it in
/// time: not a 202 (a 202 survives a failover). If the master survives, the
/// order is persisted like any other; a retry with the same Idempotency-Key
/// returns this order (202 once a replica holds it) and never makes a second.
fn replication_pending(order_id: String) -> ApiError {
    ApiError::unavailable(
        "replication_pending",
        "the order is taken but not yet held by a replica; retry with the same Idempotency-Key to confirm it",
    )
    .with("orderId", order_id)
    .retry_after(1)
}

pub(super) fn sold_out(sku: &str) -> ApiError {
    ApiError::new(StatusCode::GONE, "sold_out", format!("{sku} is sold out")).with("sku", sku)
}

fn not_started(starts_at: String) -> ApiError {
    ApiError::new(
        StatusCode::TOO_EARLY,
        "not_started",
        format!("the sale starts at {starts_at}"),
    )
    .with("startsAt", starts_at)
}

pub(super) fn ended(ended_at: String) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "ended",
        format!("the sale ended at {ended_at}"),
    )
    .with("endedAt", ended_at)
}

fn ms_to_rfc3339(ms: &str) -> String {
    ms.parse::<i64>()
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// Reads at most `MAX_BODY_BYTES`; a larger body is refused without reading it all.
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body must be at most {MAX_BODY_BYTES} bytes"),
            )
        })
}

/// The `Authorization` header's value, at most 4096 bytes of text; absent is `None`.
pub(super) fn authorization(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    header_str(
        headers,
        header::AUTHORIZATION.as_str(),
        MAX_AUTH_HEADER_BYTES,
    )
}

/// A body is JSON: `Content-Type: application/json` (any parameters, e.g.
/// charset), or no Content-Type at all (the API has no other format, so an
/// untyped body is read as what it must be). Anything else is 415 rather
/// than a guess: `text/plain` or a form is not silently parsed as JSON.
pub(super) fn json_body(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(t) if t.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body must be JSON (Content-Type: application/json), not {:?}",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )
        .with("contentType", String::from_utf8_lossy(value.as_bytes()))),
    }
}

/// A header's value as text, within a size bound; absent is `None`.
pub(super) fn header_str<'h>(
    headers: &'h HeaderMap,
    name: &str,
    max: usize,
) -> Result<Option<&'h str>, ApiError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    if v.len() > max {
        return Err(ApiError::bad_request(
            "bad_header",
            format!("header {name} is longer than {max} bytes"),
        ));
    }
    v.to_str().map(Some).map_err(|_| {
        ApiError::bad_request("bad_header", format!("header {name} is not visible ASCII"))
    })
}

/// The client's address for the per-IP limit: with `--client-ip-header`,
/// the header's last address, the one the proxy in front of the gateway
/// added (a proxy appends what it saw to `X-Forwarded-For`; anything before
/// it came from the client and may be made up, so taking the first would
/// let anyone pick their own bucket); else the peer's.
fn client_ip(
    headers: &HeaderMap,
    from_header: Option<&header::HeaderName>,
    peer: IpAddr,
) -> IpAddr {
    from_header
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantity(body: &str) -> Result<i64, serde_json::Error> {
        serde_json::from_str::<PurchaseBody>(body).map(|b| b.quantity)
    }

    #[test]
    fn the_client_ip_is_the_last_address_the_proxy_added() {
        let xff = header::HeaderName::from_static("x-forwarded-for");
        let peer: IpAddr = [10, 0, 0, 9].into();
        let ip = |value: &str| {
            let mut headers = HeaderMap::new();
            if let Ok(v) = header::HeaderValue::from_str(value) {
                headers.insert(&xff, v);
            }
            client_ip(&headers, Some(&xff), peer).to_string()
        };
        assert_eq!(ip("203.0.113.7"), "203.0.113.7");
        assert_eq!(ip("1.1.1.1, 203.0.113.7"), "203.0.113.7");
        assert_eq!(ip("1.1.1.1,2001:db8::1"), "2001:db8::1");
        // Unreadable or absent: the peer.
        assert_eq!(ip("203.0.113.7, not-an-ip"), "10.0.0.9");
        assert_eq!(ip(""), "10.0.0.9");
        assert_eq!(
            client_ip(&HeaderMap::new(), None, peer).to_string(),
            "10.0.0.9"
        );
    }

    #[test]
    fn a_quantity_is_any_whole_json_number() {
        assert_eq!(quantity(r#"{"sku":"a","quantity":2}"#).ok(), Some(2));
        assert_eq!(quantity(r#"{"sku":"a","quantity":2.0}"#).ok(), Some(2));
        assert_eq!(quantity(r#"{"sku":"a","quantity":2e0}"#).ok(), Some(2));
        assert_eq!(quantity(r#"{"sku":"a","quantity":-1}"#).ok(), Some(-1));
        assert!(quantity(r#"{"sku":"a","quantity":1.5}"#).is_err());
        assert!(quantity(r#"{"sku":"a","quantity":1e300}"#).is_err());
        assert!(quantity(r#"{"sku":"a","quantity":18446744073709551615}"#).is_err());
        assert!(quantity(r#"{"sku":"a","quantity":"1"}"#).is_err());
    }

    #[test]
    fn json_and_untyped_bodies_pass_other_types_are_415() {
        let with = |ct: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct
                && let Ok(v) = header::HeaderValue::from_str(ct)
            {
                h.insert(header::CONTENT_TYPE, v);
            }
            json_body(&h).map_err(|e| (e.status, e.code))
        };
        assert!(with(None).is_ok());
        assert!(with(Some("application/json")).is_ok());
        assert!(with(Some("Application/JSON; charset=utf-8")).is_ok());
        for other in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
            "",
        ] {
            assert_eq!(
                with(Some(other)),
                Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")),
                "{other}"
            );
        }
    }
}
