//! `GET /shop/{sale}`: the reference storefront, one static page built into
//! the binary (plain JS, no build step) that a shop's front end copies. It
//! reads the sale (`GET /v1/sales/{sale}`), counts down by the server's clock,
//! fetches purchase tickets when the sale wants them, buys with an
//! `Idempotency-Key` per press and follows the order on the WebSocket push.

use std::sync::{Arc, LazyLock};

use super::error::Segment;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::Gateway;
use super::error::ApiError;

/// The page, byte for byte as served.
pub const PAGE: &str = include_str!("storefront.html");

/// The Content-Security-Policy of the page: its one inline script and style
/// are allowed by hash (not `'unsafe-inline'`), and it talks to its own
/// origin only (HTTP and WebSocket).
static CONTENT_SECURITY_POLICY: LazyLock<HeaderValue> = LazyLock::new(|| {
    let policy = format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        inline_hash(PAGE, "<script>", "</script>"),
        inline_hash(PAGE, "<style>", "</style>"),
    );
    HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("default-src 'none'"))
});

/// `'sha256-…'` of the text between the first `open` and the next `close`
/// tag, as CSP hashes an inline element; `'none'` when the page has none.
fn inline_hash(page: &str, open: &str, close: &str) -> String {
    let Some(body) = page
        .split_once(open)
        .and_then(|(_, rest)| rest.split_once(close))
        .map(|(body, _)| body)
    else {
        return "'none'".into();
    };
    let digest = Sha256::digest(body.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The reference storefront for this gateway's sale.
///
/// A static HTML page (the same bytes for every buyer, cacheable by a CDN);
/// the buyer's token never reaches it: the page takes it from
/// `sessionStorage['flashsale.token']` or the URL fragment `#token=`.
#[utoipa::path(
    get,
    path = "/shop/{sale}",
    tag = "storefront",
    params(("sale" = String, Path, description = "The FlashSale's name")),
    responses(
        (status = 200, description = "The storefront page", content_type = "text/html"),
        (status = 404, description = "Unknown sale", body = super::error::ErrorBody),
    )
)]
pub async fn page(State(gw): State<Arc<Gateway>>, Segment(sale): Segment) -> Response {
    if sale != gw.sale.name {
        return ApiError::unknown_sale(&sale).into_response();
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=60"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                CONTENT_SECURITY_POLICY.clone(),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_inline_script_and_style_and_no_inline_handlers() {
        assert_eq!(PAGE.matches("<script>").count(), 1);
        assert_eq!(PAGE.matches("<style>").count(), 1);
        // Inline event handlers would be refused by the policy.
        assert!(!PAGE.contains(" onclick="));
        let policy = CONTENT_SECURITY_POLICY.to_str().unwrap_or_default();
        assert!(policy.contains("script-src 'sha256-"), "{policy}");
        assert!(policy.contains("style-src 'sha256-"), "{policy}");
    }

    #[test]
    fn inline_hash_covers_exactly_the_element_text() {
        // echo -n 'x' | sha256sum | xxd -r -p | base64
        assert_eq!(
            inline_hash("<script>x</script>", "<script>", "</script>"),
            "'sha256-LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE='"
        );
        assert_eq!(inline_hash("<p>", "<script>", "</script>"), "'none'");
    }
}
