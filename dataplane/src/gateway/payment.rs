//! `POST /v1/payments/callback`: the payment provider reports a payment.
//!
//! The provider signs the raw body with its Ed25519 private key
//! (`X-Signature: <base64 signature>`); the gateway verifies with the
//! configured public key. PostgreSQL is the source of truth: the order row
//! is locked (`FOR UPDATE`, which the timeout sweeper's `SKIP LOCKED` steps
//! around), the callback is recorded once by payment id with the answer
//! given, and only a confirmed order with the right amount and currency
//! becomes paid. A callback for a cancelled, already paid or unknown order is
//! recorded as `refund_due` and changes no order.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::Gateway;
use super::error::{ApiError, ErrorBody};
use crate::events::OrderEvent;
use crate::keys::ProductKeys;
use crate::order::{OrderRecord, OrderStatus, sku_of};
use crate::scripts;
use crate::store::{OrderStore, StoreError};

/// The header carrying the base64 Ed25519 signature of the raw body.
pub const SIGNATURE_HEADER: &str = "x-signature";
/// Largest callback body accepted.
const MAX_CALLBACK_BYTES: usize = 4096;

/// How the gateway checks payment callbacks.
#[derive(Clone, Debug)]
pub struct PaymentSettings {
    /// The provider's public key.
    pub public_key: VerifyingKey,
    /// The order store (PostgreSQL), the source of truth for paid.
    pub database_url: String,
    /// The currency every amount must be in (ISO 4217 code).
    pub currency: String,
}

/// The gateway's payment side: the verifying key and the order store.
pub struct Payments {
    key: VerifyingKey,
    currency: String,
    store: OrderStore,
    /// Set once the schema is known to be applied.
    schema: tokio::sync::OnceCell<()>,
}

impl Payments {
    pub fn new(settings: &PaymentSettings) -> Result<Self, StoreError> {
        Ok(Self {
            key: settings.public_key,
            currency: settings.currency.clone(),
            store: OrderStore::connect(&settings.database_url, 4)?,
            schema: tokio::sync::OnceCell::new(),
        })
    }

    /// Applies the schema once (a no-op when a consumer already did).
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.schema
            .get_or_try_init(|| self.store.migrate())
            .await
            .map(|_| ())
    }

    pub fn store(&self) -> &OrderStore {
        &self.store
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key is neither base64 nor hex")]
    Encoding,
    #[error("an Ed25519 key is 32 bytes, this one is {0}")]
    Length(usize),
    #[error("not a valid Ed25519 public key")]
    Invalid,
}

fn key_bytes(text: &str) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| KeyError::Encoding)?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| KeyError::Encoding)?
    };
    let len = bytes.len();
    bytes.try_into().map_err(|_| KeyError::Length(len))
}

/// A public key given as base64 or hex.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_bytes(&key_bytes(text)?).map_err(|_| KeyError::Invalid)
}

/// A private key (the 32-byte seed) given as base64 or hex.
pub fn parse_private_key(text: &str) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&key_bytes(text)?))
}

/// A fresh key pair as (private, public), both base64, for tests and the tour.
pub fn keygen() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    let b64 = base64::engine::general_purpose::STANDARD;
    (
        b64.encode(key.to_bytes()),
        b64.encode(key.verifying_key().to_bytes()),
    )
}

/// The `X-Signature` value for a body, as the provider computes it.
pub fn sign(key: &SigningKey, body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.sign(body).to_bytes())
}

/// The provider's report of one payment.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentCallback {
    /// The provider's id of this payment, 1-128 visible ASCII characters; a
    /// repeat with the same id is answered as the first time.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]{1,128}$")]
    pub payment_id: String,
    /// The order paid for, 1-200 visible ASCII characters (an id that names
    /// no order is recorded as refund_due unknown_order).
    #[schema(min_length = 1, max_length = 200, pattern = "^[!-~]{1,200}$")]
    pub order_id: String,
    /// Amount paid as a decimal string, non-negative, below 10^12, at most
    /// 2 places, e.g. "5999.00".
    #[schema(value_type = String, max_length = 15, pattern = "^[0-9]{1,12}(\\.[0-9]{1,2})?$")]
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO 4217 code, 3 capital letters (another currency than the gateway's
    /// is 422 currency_mismatch).
    #[schema(min_length = 3, max_length = 3, pattern = "^[A-Z]{3}$")]
    pub currency: String,
    pub status: ProviderStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderStatus {
    Succeeded,
    Failed,
}

impl ProviderStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// What the gateway made of a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentOutcome {
    /// The order is paid.
    Paid,
    /// Money came in for an order that cannot take it (cancelled, unknown or
    /// already paid): recorded for refund; no order changed.
    RefundDue,
    /// Not accepted (wrong amount or currency, or the provider reports a
    /// failed payment); no order changed.
    Rejected,
}

impl PaymentOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Paid => "paid",
            Self::RefundDue => "refund_due",
            Self::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "paid" => Some(Self::Paid),
            "refund_due" => Some(Self::RefundDue),
            "rejected" => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// The answer to a recorded callback (the same on every repeat).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentAnswer {
    pub payment_id: String,
    pub order_id: String,
    pub outcome: PaymentOutcome,
    /// Why, for refund_due and rejected: `order_cancelled`, `unknown_order`,
    /// `already_paid`, `order_failed`, `amount_mismatch`, `currency_mismatch`,
    /// `payment_failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The payment provider's callback. Checks, in order: payments configured
/// (503 `payments_disabled`); the body's size (413 `body_too_large`, over
/// 4096 bytes); the content type (415 `unsupported_media_type` unless
/// `application/json` or absent); the signature (401 `unauthenticated`); the
/// JSON body (400 `invalid_json`) and its fields (400 `invalid_callback`);
/// then the decision in PostgreSQL.
#[utoipa::path(
    post,
    path = "/v1/payments/callback",
    tag = "payments",
    params(("X-Signature" = String, Header, min_length = 1, max_length = 88, pattern = "^[A-Za-z0-9+/]{86}==$",
        description = "Base64 Ed25519 signature (64 bytes) of the raw body by the provider's private key")),
    request_body(content = PaymentCallback, content_type = "application/json",
        description = "At most 4096 bytes (413 body_too_large). Content-Type application/json (parameters allowed) or none; any other type is 415 unsupported_media_type"),
    responses(
        (status = 200, description = "Recorded: paid, refund_due (cancelled, unknown, failed or already paid order), or rejected with reason payment_failed. A repeat answers the same", body = PaymentAnswer),
        (status = 400, description = "invalid_json (not JSON, a missing or unknown field, a wrong type) or invalid_callback (a field outside its stated bounds)", body = ErrorBody),
        (status = 401, description = "unauthenticated: missing or forged signature; nothing recorded", body = ErrorBody),
        (status = 409, description = "not_persisted: the order is not in the order store yet, retry after Retry-After seconds; or payment_id_reused: the payment id was recorded with a different body (`paymentId`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait (not_persisted)"))),
        (status = 413, description = "body_too_large: the body is over 4096 bytes", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: a Content-Type other than application/json", body = ErrorBody),
        (status = 422, description = "Rejected: amount_mismatch or currency_mismatch; recorded, the order is unchanged", body = PaymentAnswer),
        (status = 503, description = "payments_disabled (no payment key or order store configured), or store_unavailable (the order store, or Redis for an order not yet persisted, is unavailable: nothing recorded; or the payment is recorded but the order's Redis record could not be marked paid: the retry is answered as recorded and marks it); retry after Retry-After seconds", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn callback(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let span = tracing::info_span!(
        "payment_callback",
        payment = tracing::field::Empty,
        order = tracing::field::Empty
    );
    match handle(&gw, &headers, body).instrument(span).await {
        Ok((status, answer)) => (status, axum::Json(answer)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handle(
    gw: &Gateway,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, PaymentAnswer), ApiError> {
    let Some(payments) = gw.payments.as_ref() else {
        return Err(ApiError::unavailable(
            "payments_disabled",
            "this gateway has no payment key or order store configured",
        ));
    };
    // Read at most the limit: a larger body is refused without reading it all.
    let body = axum::body::to_bytes(body, MAX_CALLBACK_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("a callback must be at most {MAX_CALLBACK_BYTES} bytes"),
            )
        })?;
    super::purchase::json_body(headers)?;
    verify(&payments.key, headers, &body)?;
    let cb: PaymentCallback = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("callback body: {e}")))?;
    let span = tracing::Span::current();
    span.record("payment", cb.payment_id.as_str());
    span.record("order", cb.order_id.as_str());
    check_fields(&cb)?;
    let raw = String::from_utf8_lossy(&body).into_owned();
    let decided = decide(gw, payments, &cb, &raw).await.map_err(|e| {
        tracing::warn!(error = %e, "payment callback not recorded");
        ApiError::unavailable("store_unavailable", "the order store is unavailable; retry")
    })?;
    let (status, answer, fresh) = match decided {
        Decision::Recorded {
            status,
            answer,
            fresh,
        } => (status, answer, fresh),
        Decision::Refused(e) => return Err(e),
    };
    tracing::info!(outcome = answer.outcome.as_str(), reason = ?answer.reason, fresh, "payment callback answered");
    metrics::counter!("flashsale_payment_callbacks_total", "outcome" => answer.outcome.as_str(), "repeat" => if fresh { "no" } else { "yes" }).increment(1);
    if answer.outcome == PaymentOutcome::Paid && !fresh {
        // Redis follows PostgreSQL; a repeat heals a mark the first answer's
        // 503 (or a crash) left undone, and tells the buyer then. Told on
        // every repeat: a mark whose answer timed out may have moved the
        // record all the same, and a socket drops a status it already sent.
        match mark_paid_in_redis(gw, &cb.order_id).await {
            Ok(true) => tell_paid(gw, &cb.order_id, None).await,
            Ok(false) => {}
            Err(e) => return Err(paid_not_marked(&e)),
        }
    }
    Ok((status, answer))
}

/// The callback's fields within what the order store takes: ids of visible
/// ASCII (PostgreSQL text refuses a NUL, which must be a 400, not a 503), an
/// ISO 4217 currency code, a non-negative amount with at most 2 places.
fn check_fields(cb: &PaymentCallback) -> Result<(), ApiError> {
    let id = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
    };
    let currency = cb.currency.len() == 3 && cb.currency.bytes().all(|b| b.is_ascii_uppercase());
    if id(&cb.payment_id, 128)
        && id(&cb.order_id, 200)
        && currency
        && !cb.amount.is_sign_negative()
        && cb.amount.scale() <= 2
        && cb.amount < Decimal::from(1_000_000_000_000i64)
    {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "invalid_callback",
        "paymentId must be 1-128 and orderId 1-200 visible ASCII characters, currency 3 capital letters, and amount a non-negative decimal below 10^12 with at most 2 places",
    ))
}

fn verify(key: &VerifyingKey, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let forged = || ApiError::unauthorized("the callback's X-Signature does not verify");
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("missing X-Signature"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .map_err(|_| forged())?;
    let sig = Signature::from_slice(&bytes).map_err(|_| forged())?;
    key.verify(body, &sig).map_err(|_| forged())?;
    // verify_strict also refuses weak keys and malleable signatures.
    key.verify_strict(body, &sig).map_err(|_| forged())
}

enum Decision {
    Recorded {
        status: StatusCode,
        answer: PaymentAnswer,
        /// False when this is a repeat answered from the record.
        fresh: bool,
    },
    Refused(ApiError),
}

/// The callback decided in one transaction.
async fn decide(
    gw: &Gateway,
    payments: &Payments,
    cb: &PaymentCallback,
    raw: &str,
) -> Result<Decision, StoreError> {
    let sale = gw.sale.key();
    payments.ensure_schema().await?;
    let mut client = payments.store.pool().get().await?;
    let tx = client.transaction().await?;
    if let Some(prior) = recorded(&tx, cb).await? {
        return Ok(prior);
    }
    let order = tx
        .query_opt(
            "SELECT sale, user_id, status, (quantity * unit_price)::text
             FROM flashsale_orders WHERE order_id = $1 FOR UPDATE",
            &[&cb.order_id],
        )
        .await?;
    let mut paid_user = None;
    let (outcome, reason, status) = if cb.status == ProviderStatus::Failed {
        (
            PaymentOutcome::Rejected,
            Some("payment_failed"),
            StatusCode::OK,
        )
    } else {
        match order {
            Some(row) if row.get::<_, String>(0) == sale => {
                let user: String = row.get(1);
                let order_status: String = row.get(2);
                let total: Decimal = row.get::<_, String>(3).parse().unwrap_or_default();
                match order_status.as_str() {
                    "cancelled" => (
                        PaymentOutcome::RefundDue,
                        Some("order_cancelled"),
                        StatusCode::OK,
                    ),
                    "paid" => (
                        PaymentOutcome::RefundDue,
                        Some("already_paid"),
                        StatusCode::OK,
                    ),
                    _ if cb.currency != payments.currency => (
                        PaymentOutcome::Rejected,
                        Some("currency_mismatch"),
                        StatusCode::UNPROCESSABLE_ENTITY,
                    ),
                    _ if cb.amount != total => (
                        PaymentOutcome::Rejected,
                        Some("amount_mismatch"),
                        StatusCode::UNPROCESSABLE_ENTITY,
                    ),
                    _ => {
                        tx.execute(
                            "UPDATE flashsale_orders SET status = 'paid', paid_at = now()
                             WHERE order_id = $1 AND status = 'confirmed'",
                            &[&cb.order_id],
                        )
                        .await?;
                        paid_user = Some(user);
                        (PaymentOutcome::Paid, None, StatusCode::OK)
                    }
                }
            }
            _ => match redis_status(gw, &cb.order_id).await {
                // Redis did not answer: whether the order exists is unknown,
                // so nothing is recorded (a recorded refund would be the
                // answer to every retry of a payment for a won order).
                Err(unreachable) => return Ok(Decision::Refused(unreachable)),
                // Accepted but not persisted yet: answer "retry" and record
                // nothing, so the retry is decided on the persisted order.
                Ok(Some(OrderStatus::Accepted | OrderStatus::Confirmed)) => {
                    return Ok(Decision::Refused(
                        ApiError::new(
                            StatusCode::CONFLICT,
                            "not_persisted",
                            "the order is not in the order store yet; retry",
                        )
                        .retry_after(1),
                    ));
                }
                Ok(Some(OrderStatus::Failed)) => (
                    PaymentOutcome::RefundDue,
                    Some("order_failed"),
                    StatusCode::OK,
                ),
                _ => (
                    PaymentOutcome::RefundDue,
                    Some("unknown_order"),
                    StatusCode::OK,
                ),
            },
        }
    };
    let inserted = tx
        .execute(
            "INSERT INTO flashsale_payments
                (payment_id, order_id, sale, amount, currency, provider_status, outcome, reason, http_status, body)
             VALUES ($1, $2, $3, $4::text::numeric, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (payment_id) DO NOTHING",
            &[
                &cb.payment_id,
                &cb.order_id,
                &sale,
                &cb.amount.to_string(),
                &cb.currency,
                &cb.status.as_str(),
                &outcome.as_str(),
                &reason,
                &i32::from(status.as_u16()),
                &raw,
            ],
        )
        .await?;
    if inserted == 0 {
        // The same payment id raced in on another connection and won: answer
        // as it was answered.
        drop(tx);
        let tx = client.transaction().await?;
        return Ok(recorded(&tx, cb)
            .await?
            .unwrap_or(Decision::Refused(ApiError::unavailable(
                "store_conflict",
                "the callback is being recorded; retry",
            ))));
    }
    // The Redis mark is owed with the payment: an outbox row in the same
    // transaction, which the payment-timeout sweeper applies if this gateway
    // does not (Redis down, a crash) and no callback comes again.
    let outbox = match (&paid_user, sku_of(&cb.order_id)) {
        (Some(user), Some(sku)) => Some(
            tx.query_one(
                "INSERT INTO flashsale_outbox (sale, sku, order_id, user_id, action)
                 VALUES ($1, $2, $3, $4, 'paid') RETURNING id",
                &[&sale, &sku, &cb.order_id, user],
            )
            .await?
            .try_get::<_, i64>(0)?,
        ),
        _ => None,
    };
    tx.commit().await?;
    let answer = PaymentAnswer {
        payment_id: cb.payment_id.clone(),
        order_id: cb.order_id.clone(),
        outcome,
        reason: reason.map(str::to_string),
    };
    if let Some(user) = paid_user {
        // Order matters: the record moves to paid before the push, so a
        // client's resume after the push never sees it older. A record not
        // marked is a 503 with the payment recorded: the provider's retry
        // is answered from the record and marks it (above), the sweeper
        // applies the outbox row if none comes, and until then no buyer is
        // told "paid" while the order's page says otherwise.
        if let Err(e) = mark_paid_in_redis(gw, &cb.order_id).await {
            return Ok(Decision::Refused(paid_not_marked(&e)));
        }
        tell_paid(gw, &cb.order_id, Some(user)).await;
        if let Some(id) = outbox {
            applied(payments, id).await;
        }
    }
    Ok(Decision::Recorded {
        status,
        answer,
        fresh: true,
    })
}

/// The stored answer for this payment id, if any. A different body under a
/// known payment id is refused (a provider bug or an attack), never applied.
async fn recorded(
    tx: &tokio_postgres::Transaction<'_>,
    cb: &PaymentCallback,
) -> Result<Option<Decision>, StoreError> {
    let Some(row) = tx
        .query_opt(
            "SELECT order_id, amount::text, currency, provider_status, outcome, reason, http_status
             FROM flashsale_payments WHERE payment_id = $1",
            &[&cb.payment_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let amount: Decimal = row.get::<_, String>(1).parse().unwrap_or_default();
    let same = row.get::<_, String>(0) == cb.order_id
        && amount == cb.amount
        && row.get::<_, String>(2) == cb.currency
        && row.get::<_, String>(3) == cb.status.as_str();
    if !same {
        return Ok(Some(Decision::Refused(
            ApiError::new(
                StatusCode::CONFLICT,
                "payment_id_reused",
                "this paymentId was recorded with a different body",
            )
            .with("paymentId", cb.payment_id.as_str()),
        )));
    }
    let outcome =
        PaymentOutcome::parse(&row.get::<_, String>(4)).unwrap_or(PaymentOutcome::Rejected);
    let status = u16::try_from(row.get::<_, i32>(6))
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    Ok(Some(Decision::Recorded {
        status,
        answer: PaymentAnswer {
            payment_id: cb.payment_id.clone(),
            order_id: cb.order_id.clone(),
            outcome,
            reason: row.get(5),
        },
        fresh: false,
    }))
}

/// The order's status in Redis: `None` if this sale has no such order (an
/// id that names no SKU, or no record under its SKU); a 503 to answer if
/// Redis did not answer within the gateway's Redis timeout, or holds a
/// record this gateway cannot read. The key comes from the sale and the
/// id's SKU, not from this pod's products: during a rollout that adds a
/// product, a pod of the old spec still finds the new product's orders.
async fn redis_status(gw: &Gateway, order_id: &str) -> Result<Option<OrderStatus>, ApiError> {
    let Some(sku) = sku_of(order_id) else {
        return Ok(None);
    };
    let key = ProductKeys::new(&gw.sale, sku).orders();
    let mut redis = gw.redis.clone();
    let read = tokio::time::timeout(
        gw.redis_timeout,
        redis::cmd("HGET")
            .arg(key)
            .arg(order_id)
            .query_async::<Option<String>>(&mut redis),
    )
    .await;
    let problem = match read {
        Ok(Ok(None)) => return Ok(None),
        Ok(Ok(Some(raw))) => match OrderRecord::decode(order_id, &raw) {
            Some(record) => return Ok(Some(record.status)),
            None => "a record this gateway does not read".to_string(),
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {:?}", gw.redis_timeout),
    };
    tracing::warn!(order_id, %problem, "payment callback: the order's Redis record could not be read; nothing recorded");
    Err(ApiError::unavailable(
        "store_unavailable",
        "the order's record could not be read; nothing was recorded, retry",
    ))
}

/// Moves the Redis record to paid (from accepted or confirmed only), and
/// the product's counters with it; whether it is paid now (moved by this
/// call, or by an earlier one whose answer timed out).
async fn mark_paid_in_redis(gw: &Gateway, order_id: &str) -> redis::RedisResult<bool> {
    // Keys from the sale and the SKU: a product this pod does not sell
    // (added after it booted, or removed since) is marked too.
    let Some(keys) = sku_of(order_id).map(|s| ProductKeys::new(&gw.sale, s)) else {
        return Ok(false);
    };
    let mut redis = gw.redis.clone();
    let before = tokio::time::timeout(
        gw.redis_timeout,
        scripts::mark_paid(&mut redis, &keys, order_id),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))??;
    let paid_now = [
        OrderStatus::Accepted,
        OrderStatus::Confirmed,
        OrderStatus::Paid,
    ];
    Ok(paid_now.iter().any(|p| p.as_str() == before))
}

/// Marks a `paid` outbox row applied. Best effort: a row left unapplied is
/// applied again by the sweeper, a no-op on a record already paid.
async fn applied(payments: &Payments, id: i64) {
    if let Err(e) = payments.store.mark_outbox_applied(&[id]).await {
        tracing::debug!(error = %e, "paid outbox row not marked applied; the sweeper will");
    }
}

/// Pushes `order.paid` to the buyer (read from the record when not given).
async fn tell_paid(gw: &Gateway, order_id: &str, user: Option<String>) {
    let Some(sku) = sku_of(order_id) else {
        return;
    };
    let mut redis = gw.redis.clone();
    let user = match user {
        Some(u) => u,
        None => {
            let orders = ProductKeys::new(&gw.sale, sku).orders();
            let raw: redis::RedisResult<Option<String>> = redis::cmd("HGET")
                .arg(&orders)
                .arg(order_id)
                .query_async(&mut redis)
                .await;
            match raw
                .ok()
                .flatten()
                .and_then(|r| OrderRecord::decode(order_id, &r))
            {
                Some(rec) => rec.user,
                None => return,
            }
        }
    };
    let event = OrderEvent::new(order_id, sku, OrderStatus::Paid, None);
    if let Err(e) = gw.events.publish(&mut redis, &user, &event).await {
        tracing::debug!(error = %e, "order.paid not pushed");
    }
}

/// The answer to a payment recorded in PostgreSQL whose Redis record could
/// not be marked paid: retry, and the retry marks it.
fn paid_not_marked(e: &redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "payment recorded, the order's Redis record not marked paid; answered 503 so the provider retries");
    ApiError::unavailable(
        "store_unavailable",
        "the payment is recorded, but the order's record could not be marked paid; retry",
    )
}

/// Applies the schema (payments tables) in the background so a gateway can
/// take callbacks before any consumer has started.
pub(super) async fn migrate(gw: Arc<Gateway>, shutdown: tokio_util::sync::CancellationToken) {
    let Some(payments) = gw.payments.as_ref() else {
        return;
    };
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match payments.ensure_schema().await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "order store schema not applied yet; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_from_base64_and_hex() -> Result<(), KeyError> {
        let (private, public) = keygen();
        let signing = parse_private_key(&private)?;
        let verifying = parse_public_key(&public)?;
        assert_eq!(signing.verifying_key(), verifying);
        let hex: String = verifying
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(parse_public_key(&hex)?, verifying);
        assert!(matches!(parse_public_key("AAAA"), Err(KeyError::Length(3))));
        assert!(matches!(
            parse_public_key("not base64!"),
            Err(KeyError::Encoding)
        ));
        Ok(())
    }

    #[test]
    fn signatures_verify_only_for_their_body_and_key() -> Result<(), KeyError> {
        let (private, public) = keygen();
        let key = parse_private_key(&private)?;
        let public = parse_public_key(&public)?;
        let body = br#"{"paymentId":"p1"}"#;
        let mut headers = HeaderMap::new();
        let sig = sign(&key, body);
        headers.insert(
            SIGNATURE_HEADER,
            sig.parse().map_err(|_| KeyError::Encoding)?,
        );
        assert!(verify(&public, &headers, body).is_ok());
        assert!(verify(&public, &headers, br#"{"paymentId":"p2"}"#).is_err());
        let (_, other) = keygen();
        assert!(verify(&parse_public_key(&other)?, &headers, body).is_err());
        assert!(verify(&public, &HeaderMap::new(), body).is_err());
        Ok(())
    }
}
