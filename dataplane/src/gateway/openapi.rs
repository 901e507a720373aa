//! The public API's OpenAPI document, generated from the handlers' annotations
//! (served at `/openapi.json`, printed by `flashsale openapi`, checked into
//! docs/openapi.json where a test keeps it current).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "flashsale gateway",
        description = "Buy in a flash sale: one purchase call decides atomically; losers are answered at once, winners get an order id and its updates by push.\n\nEvery refusal is a 4xx or 5xx with a JSON body `{\"error\": <code>, \"message\": <sentence>, ...details}`. A path no route serves is 404 `not_found`; a method a route does not take is 405 `method_not_allowed` (with `Allow`). Metrics, health and readiness (`/metrics`, `/healthz`, `/readyz`) are served on the gateway's separate admin port, not here."
    ),
    paths(
        super::sale_page::get_sale,
        super::purchase::purchase,
        super::tickets::issue,
        super::orders::get_order,
        super::push::ws,
        super::payment::callback,
        super::storefront::page,
        super::observability::ping,
        super::observability::ping_post,
        serve
    ),
    components(schemas(
        super::sale_page::SaleView,
        super::sale_page::SalePhase,
        super::sale_page::PurchaseTicketView,
        super::sale_page::ProductView,
        super::purchase::PurchaseRequest,
        super::purchase::PurchaseAccepted,
        super::tickets::TicketIssued,
        super::orders::OrderView,
        super::error::ErrorBody,
        crate::events::OrderEvent,
        super::payment::PaymentCallback,
        super::payment::ProviderStatus,
        super::payment::PaymentOutcome,
        super::payment::PaymentAnswer,
        crate::order::OrderStatus
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

/// What the gateway checks of a bearer token (`crate::token`).
const TOKEN_RULES: &str = "`Authorization: Bearer <token>`, the whole header at most 4096 bytes of text (else 400 bad_header). The token is an HS256 JWT signed with the sale's token secret, with `sub` (the user id: 1-128 visible ASCII characters, no comma) and `exp` (Unix seconds). `exp` is honoured exactly, with no leeway: the token is accepted while the gateway's clock in whole Unix seconds is at or before `exp`, and refused (401 unauthenticated, \"the token has expired\") from the next second on. Anything else wrong (missing, not a JWT, another algorithm, a bad signature, a bad subject) is 401 unauthenticated too.";

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT (HS256, claims sub and exp)")
                        .description(Some(TOKEN_RULES))
                        .build(),
                ),
            );
        }
    }
}

/// The document as pretty JSON.
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
