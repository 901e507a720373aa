//! Every non-2xx answer of the public API: a status and a JSON body
//! `{"error": <code>, "message": <sentence>, ...details}` naming the problem.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
    pub retry_after_secs: Option<u64>,
}

/// The JSON error body, as documented in the OpenAPI document: `error` and
/// `message` always, and the details a code carries (each route's responses
/// name which).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `sold_out`, `limit_reached`, `invalid_json`.
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
    /// unknown_sale: the sale asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sale: Option<String>,
    /// unknown_sku, sold_out, idempotency_key_reused: the SKU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// invalid_quantity, limit_reached (above the limit), idempotency_key_reused: the quantity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<i64>,
    /// limit_reached: the per-user limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// limit_reached (decided in Redis): units the buyer already holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<i64>,
    /// sold_out (decided in Redis): units left (0); insufficient_stock: the
    /// units left, fewer than the quantity asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<i64>,
    /// idempotency_key_reused: the order the key's first request made, if it won.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// payment_id_reused: the payment id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// not_started: the sale's start, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
    /// ended: the sale's end, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// rate_limited: which limit, `user`, `ip` or `global`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// unsupported_media_type: the Content-Type sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
            retry_after_secs: None,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// A sale this gateway does not serve (it serves one).
    pub fn unknown_sale(sale: &str) -> Self {
        Self::not_found("unknown_sale", format!("no sale named {sale:?} here")).with("sale", sale)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message).retry_after(1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.details;
        body.insert("error".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        let mut resp = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// One path parameter, percent-decoded. axum's `Path` answers a segment that
/// does not decode to UTF-8 (`%FF`) with a plain-text 400; this keeps such a
/// segment as sent instead (found by the matched route's template), so the
/// handler answers its JSON 404 naming it (no sale name or order id is
/// anything but ASCII).
pub struct Segment(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Segment {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        use axum::extract::{MatchedPath, Path};
        if let Ok(Path(decoded)) = Path::<String>::from_request_parts(parts, state).await {
            return Ok(Self(decoded));
        }
        let raw = parts.extensions.get::<MatchedPath>().and_then(|m| {
            m.as_str()
                .split('/')
                .zip(parts.uri.path().split('/'))
                .find(|(template, _)| template.starts_with('{'))
                .map(|(_, sent)| sent.to_string())
        });
        Ok(Self(raw.unwrap_or_default()))
    }
}
