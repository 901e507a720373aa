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
        description = "Buy in a flash sale: one purchase call decides atomically; losers are answered at once, winners get an order id and its updates by push."
    ),
    paths(
        super::sale_page::get_sale,
        super::purchase::purchase,
        super::tickets::issue,
        super::orders::get_order,
        super::push::ws,
        super::payment::callback,
        super::storefront::page
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

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT (HS256, claims sub and exp)")
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

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
