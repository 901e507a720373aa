//! A product's status counters, as `status.products`, the audit and the
//! warm step read them. All come from Redis, read in one MULTI so they
//! describe one instant:
//!
//! - `stock` (`info.stock`) and `remaining` (`stock` key) are the stock
//!   warming wrote and what purchases and releases left of it;
//! - `persisted`, `paid`, `cancelled`, `failed` (fields of `info`) count
//!   units by the state their orders are in now, moved by the same script
//!   call that moves an order (`counters.lua`, prepended to `transition.lua`
//!   and `release.lua`), so no writer can leave them stale.
//!
//! At rest (no order between PostgreSQL's commit and its Redis step)
//! `persisted`, `paid` and `cancelled` equal what `flashsale_orders` holds
//! in those states, and `sold()` equals `persisted`.

use redis::aio::ConnectionLike;
use serde::Serialize;

use crate::keys::ProductKeys;
use crate::spec::{SaleId, SaleSpec};

/// The info hash fields the scripts count in.
const FIELDS: [&str; 5] = ["stock", "persisted", "paid", "cancelled", "failed"];

/// One product's counters, in units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProductCounters {
    pub sku: String,
    /// The stock Redis was warmed with (raised or cut by later warms).
    pub stock: i64,
    /// Units still for sale.
    pub remaining: i64,
    /// Units of orders persisted to PostgreSQL that count: confirmed or paid.
    pub persisted: i64,
    /// Units of paid orders.
    pub paid: i64,
    /// Units of orders cancelled for want of payment (stock returned).
    pub cancelled: i64,
    /// Units of orders that failed to persist (dead-lettered, stock returned).
    pub failed: i64,
}

impl ProductCounters {
    /// Units held by live orders: accepted (not yet persisted), confirmed or paid.
    pub fn sold(&self) -> i64 {
        self.stock - self.remaining
    }

    /// Units ever accepted: the live ones plus those given back.
    pub fn accepted(&self) -> i64 {
        self.sold() + self.cancelled + self.failed
    }
}

/// Counters per product, in spec order; `None` for a product not warmed yet.
pub async fn product_counters<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<Vec<Option<ProductCounters>>, redis::RedisError> {
    let mut out = Vec::with_capacity(spec.products.len());
    for p in &spec.products {
        let keys = ProductKeys::new(sale, &p.sku);
        // One slot per product, so one MULTI per product.
        let (fields, remaining): (Vec<Option<i64>>, Option<i64>) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(keys.info())
            .arg(&FIELDS)
            .cmd("GET")
            .arg(keys.stock())
            .query_async(conn)
            .await?;
        let field = |i: usize| fields.get(i).copied().flatten();
        out.push(field(0).map(|stock| ProductCounters {
            sku: p.sku.clone(),
            stock,
            remaining: remaining.unwrap_or(0),
            persisted: field(1).unwrap_or(0),
            paid: field(2).unwrap_or(0),
            cancelled: field(3).unwrap_or(0),
            failed: field(4).unwrap_or(0),
        }));
    }
    Ok(out)
}
