//! `POST /v1/sales/{sale}/tickets`: purchase tickets (动态令牌), issued by
//! any gateway from its memory and the token secret, no Redis; and the
//! purchase's stateless check of the `Purchase-Ticket` header.

use std::sync::Arc;

use super::error::Segment;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::Gateway;
use super::error::{ApiError, ErrorBody};
use super::purchase::header_str;
use crate::ticket::{MAX_TICKET_BYTES, TicketError, VerifiedTicket, Window};

/// The request header a purchase carries its ticket in.
pub const TICKET_HEADER: &str = "purchase-ticket";

/// Outcome labels of `flashsale_gateway_tickets_total`.
pub mod outcome {
    pub const ISSUED: &str = "issued";
    pub const NOT_ENABLED: &str = "not_enabled";
    pub const NOT_OPEN: &str = "not_open";
    pub const ENDED: &str = "ended";
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const ALL: &[&str] = &[
        ISSUED,
        NOT_ENABLED,
        NOT_OPEN,
        ENDED,
        UNAUTHENTICATED,
        BAD_REQUEST,
        UNAVAILABLE,
    ];
}

/// A ticket for the purchase's `Purchase-Ticket` header.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TicketIssued {
    /// Opaque; send it as the `Purchase-Ticket` header of one purchase.
    pub ticket: String,
    /// When it stops being accepted (Unix milliseconds, server clock).
    pub expires_at_ms: i64,
}

/// Get a purchase ticket, when the sale requires one.
///
/// Checks, in order: the sale name (404 `unknown_sale`), whether the sale
/// uses tickets (404 `ticket_not_enabled`), its window by the gateway's
/// clock (410 `ended`; 425 `tickets_not_open` until 60 s before the start,
/// with `opensAt`/`opensAtMs`), then the bearer token (401). A ticket is bound
/// to the buyer and the sale and valid for the sale's
/// `purchaseTicket.ttlSeconds` from its issue, or from the start when issued
/// before it. It is spent by the first stock decision (won, sold out or limit
/// reached) it reaches for a product: usable once per product. Issuing needs
/// no Redis.
#[utoipa::path(
    post,
    path = "/v1/sales/{sale}/tickets",
    tag = "purchase",
    params(("sale" = String, Path, description = "The FlashSale's name")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "A ticket for this buyer", body = TicketIssued),
        (status = 400, description = "bad_header: an oversized or non-ASCII Authorization header", body = ErrorBody),
        (status = 401, description = "Missing, forged or expired token", body = ErrorBody),
        (status = 404, description = "unknown_sale, or ticket_not_enabled: the sale does not use tickets", body = ErrorBody),
        (status = 410, description = "ended: the sale has ended", body = ErrorBody),
        (status = 425, description = "tickets_not_open: tickets are issued from 60 s before the start (opensAt, opensAtMs; Retry-After)", body = ErrorBody),
        (status = 503, description = "ticket_signing: the ticket could not be signed (a fault of this gateway, logged); retry after Retry-After seconds", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn issue(
    State(gw): State<Arc<Gateway>>,
    Segment(sale): Segment,
    headers: HeaderMap,
) -> Response {
    let span = tracing::debug_span!("ticket", sale = %sale, user = tracing::field::Empty);
    let (label, response) = span.in_scope(|| match decide(&gw, &sale, &headers) {
        Ok(issued) => {
            let mut resp = (StatusCode::CREATED, axum::Json(issued)).into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            (outcome::ISSUED, resp)
        }
        Err((label, e)) => (label, e.into_response()),
    });
    metrics::counter!("flashsale_gateway_tickets_total", "outcome" => label).increment(1);
    response
}

fn decide(
    gw: &Gateway,
    sale: &str,
    headers: &HeaderMap,
) -> Result<TicketIssued, (&'static str, ApiError)> {
    use outcome::*;
    if sale != gw.sale.name {
        return Err((
            BAD_REQUEST,
            ApiError::not_found("unknown_sale", format!("no sale named {sale:?} here"))
                .with("sale", sale),
        ));
    }
    let now = jiff::Timestamp::now();
    let expires_at_ms = match crate::ticket::window(&gw.spec.load(), now) {
        Window::NotEnabled => {
            return Err((
                NOT_ENABLED,
                ApiError::not_found(
                    "ticket_not_enabled",
                    "this sale does not use purchase tickets; buy without one",
                ),
            ));
        }
        Window::Ended { ended_at } => {
            return Err((ENDED, super::purchase::ended(ended_at.to_string())));
        }
        Window::NotOpen { opens_at } => {
            let wait = opens_at.duration_since(now).as_secs_f64().ceil().max(1.0) as u64;
            return Err((
                NOT_OPEN,
                ApiError::new(
                    StatusCode::TOO_EARLY,
                    "tickets_not_open",
                    format!("tickets are issued from {opens_at}"),
                )
                .with("opensAt", opens_at.to_string())
                .with("opensAtMs", opens_at.as_millisecond())
                .retry_after(wait),
            ));
        }
        Window::Open { expires_at_ms } => expires_at_ms,
    };
    let auth =
        header_str(headers, header::AUTHORIZATION.as_str(), 4096).map_err(|e| (BAD_REQUEST, e))?;
    let user = gw
        .verifier
        .user_from_header(auth)
        .map_err(|e| (UNAUTHENTICATED, ApiError::unauthorized(e.to_string())))?;
    tracing::Span::current().record("user", user.as_str());
    let ticket = gw.tickets.issue(&user, expires_at_ms).map_err(|e| {
        tracing::error!(error = %e, "purchase ticket not signed");
        (
            UNAVAILABLE,
            ApiError::unavailable("ticket_signing", "the ticket could not be signed; retry"),
        )
    })?;
    Ok(TicketIssued {
        ticket: ticket.token,
        expires_at_ms: ticket.expires_at_ms,
    })
}

/// The purchase's stateless ticket check for `user`: 403 `ticket_required`
/// without the header, 403 `ticket_invalid` (with a `reason`) for a bad
/// signature, another buyer's or sale's ticket or an expired one. Whether it
/// was used already is the purchase script's to decide.
pub fn check(gw: &Gateway, headers: &HeaderMap, user: &str) -> Result<VerifiedTicket, ApiError> {
    let Some(ticket) = header_str(headers, TICKET_HEADER, MAX_TICKET_BYTES)? else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ticket_required",
            "this sale requires a purchase ticket: POST /v1/sales/{sale}/tickets, then send it as the Purchase-Ticket header",
        ));
    };
    let now_ms = jiff::Timestamp::now().as_millisecond();
    gw.tickets.verify(ticket, user, now_ms).map_err(invalid)
}

/// 403 `ticket_invalid` naming why.
pub fn invalid(e: TicketError) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "ticket_invalid",
        format!("{e}; fetch a new ticket"),
    )
    .with("reason", e.reason())
}
