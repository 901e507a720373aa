//! Orders as Redis records them and as the API shows them.

use serde::{Deserialize, Serialize};

/// An order's life: accepted by the gateway, confirmed once persisted, then
/// paid, or failed (persistence gave up) / cancelled (unpaid in time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Accepted,
    Confirmed,
    Paid,
    Failed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Confirmed => "confirmed",
            Self::Paid => "paid",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The record `purchase.lua` writes into the product's `orders` hash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OrderRecord {
    pub id: String,
    pub user: String,
    pub qty: u32,
    pub seq: u64,
    pub price: String,
    /// Acceptance time, Unix milliseconds (Redis clock).
    pub at: i64,
    pub status: OrderStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the order entered its current status, Unix milliseconds (Redis
    /// clock), stamped by the script that moved it; absent while `accepted`
    /// (then it is `at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_at: Option<i64>,
}

impl OrderRecord {
    /// When the order entered its current status.
    pub fn status_since(&self) -> i64 {
        self.status_at.unwrap_or(self.at)
    }
}

/// Order ids are `<sku>.<ulid>`: unique without coordination, sortable by time,
/// and they name the product, so a lookup goes straight to the right Redis slot.
pub fn new_order_id(sku: &str) -> String {
    format!("{sku}.{}", ulid::Ulid::new())
}

/// The SKU inside an order id, if the id is well formed.
pub fn sku_of(order_id: &str) -> Option<&str> {
    let (sku, ulid) = order_id.rsplit_once('.')?;
    (crate::spec::valid_sku(sku) && ulid::Ulid::from_string(ulid).is_ok()).then_some(sku)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_ids_name_their_sku() {
        let id = new_order_id("phone-17");
        assert_eq!(sku_of(&id), Some("phone-17"));
        assert_eq!(sku_of("phone-17"), None);
        assert_eq!(sku_of("Bad.01ARZ3NDEKTSV4RRFFQ69G5FAV"), None);
        assert_eq!(sku_of("ok.notaulid"), None);
    }

    #[test]
    fn record_matches_lua_json() {
        let raw = r#"{"id":"a.01ARZ3NDEKTSV4RRFFQ69G5FAV","user":"u1","qty":1,"seq":1,"price":"1.00","at":1763700000000,"status":"accepted"}"#;
        let rec: Result<OrderRecord, _> = serde_json::from_str(raw);
        assert!(matches!(rec, Ok(r) if r.status == OrderStatus::Accepted && r.at == 1763700000000));
    }
}
