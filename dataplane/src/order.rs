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

    /// The status named by its lowercase word (as records and events spell it).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "accepted" => Self::Accepted,
            "confirmed" => Self::Confirmed,
            "paid" => Self::Paid,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// The record `purchase.lua` writes into the product's `orders` hash, under
/// the order id. Stored as space-separated words, cheap to write and to
/// rewrite in Lua: `status[:since] qty at price user prev [reason]`. The
/// first word is the status, followed, once a script moved the order, by
/// `:` and when it did (Unix ms, Redis clock); `prev` is the user's previous
/// order of the product ('' for the first) and `reason`, added when an order
/// is released, is the rest of the line. User ids and prices hold no spaces.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderRecord {
    pub id: String,
    pub user: String,
    pub qty: u32,
    pub price: String,
    /// Acceptance time, Unix milliseconds (Redis clock).
    pub at: i64,
    pub status: OrderStatus,
    /// The same user's previous order of this product, if any.
    pub prev: Option<String>,
    pub reason: Option<String>,
    /// When the order entered its current status, Unix milliseconds (Redis
    /// clock), stamped by the script that moved it; absent while `accepted`
    /// (then it is `at`).
    pub status_at: Option<i64>,
}

impl OrderRecord {
    /// When the order entered its current status.
    pub fn status_since(&self) -> i64 {
        self.status_at.unwrap_or(self.at)
    }
}

impl OrderRecord {
    /// The record stored under `id`; `None` if `raw` is not one.
    pub fn decode(id: &str, raw: &str) -> Option<Self> {
        let mut words = raw.splitn(7, ' ');
        let first = words.next()?;
        let (status, status_at) = match first.split_once(':') {
            Some((status, since)) => (status, Some(since.parse().ok()?)),
            None => (first, None),
        };
        let status = OrderStatus::parse(status)?;
        let qty = words.next()?.parse().ok()?;
        let at = words.next()?.parse().ok()?;
        let price = words.next()?.to_string();
        let user = words.next()?.to_string();
        let prev = words.next()?;
        let reason = words.next().filter(|r| !r.is_empty());
        Some(Self {
            id: id.to_string(),
            user,
            qty,
            price,
            at,
            status,
            prev: (!prev.is_empty()).then(|| prev.to_string()),
            reason: reason.map(str::to_string),
            status_at,
        })
    }
}

/// Order ids are `<sku>.<ulid>`: unique without coordination, sortable by time,
/// and they name the product, so a lookup goes straight to the right Redis slot.
pub fn new_order_id(sku: &str) -> String {
    // `concat` sizes the id once (`format!` grows it while writing the ULID).
    let mut buf = [0; ulid::ULID_LEN];
    [sku, ".", ulid::Ulid::new().array_to_str(&mut buf)].concat()
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
    fn records_decode_as_the_scripts_write_them() {
        let id = "a.01ARZ3NDEKTSV4RRFFQ69G5FAV";
        let first = OrderRecord::decode(id, "accepted 2 1763700000000 19.99 u1 ");
        assert_eq!(
            first,
            Some(OrderRecord {
                id: id.into(),
                user: "u1".into(),
                qty: 2,
                price: "19.99".into(),
                at: 1763700000000,
                status: OrderStatus::Accepted,
                prev: None,
                reason: None,
                status_at: None,
            })
        );
        // transition.lua stamps the move on the first word.
        let confirmed =
            OrderRecord::decode(id, "confirmed:1763700001234 2 1763700000000 19.99 u1 ");
        assert!(
            matches!(confirmed, Some(r) if r.status == OrderStatus::Confirmed
            && r.status_at == Some(1763700001234)
            && r.status_since() == 1763700001234)
        );
        assert_eq!(OrderRecord::decode(id, "confirmed:soon 2 1 1.00 u1 "), None);
        // release.lua swaps the first word and appends the reason.
        let failed = OrderRecord::decode(
            id,
            "failed 1 1763700000000 1.00 u1 a.01ARZ3NDEKTSV4RRFFQ69G5FAW refused by the database",
        );
        assert!(matches!(failed, Some(r) if r.status == OrderStatus::Failed
            && r.prev.as_deref() == Some("a.01ARZ3NDEKTSV4RRFFQ69G5FAW")
            && r.reason.as_deref() == Some("refused by the database")));
        let cancelled =
            OrderRecord::decode(id, "cancelled 1 1763700000000 1.00 u1  payment timeout");
        assert!(matches!(cancelled, Some(r) if r.prev.is_none()
            && r.reason.as_deref() == Some("payment timeout")));
        assert_eq!(OrderRecord::decode(id, "shipped 1 1 1.00 u1 "), None);
        assert_eq!(OrderRecord::decode(id, "accepted 1 1 1.00 u1"), None);
        assert_eq!(OrderRecord::decode(id, r#"{"id":"a"}"#), None);
    }
}
