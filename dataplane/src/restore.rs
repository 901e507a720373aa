//! Rebuilding a product's Redis state from PostgreSQL after Redis lost it (a
//! restart without AOF), run by a person with `flashsale warm --restore`: the
//! stock left is the stock less the units PostgreSQL holds, each buyer's entry
//! (units held, orders placed, newest order) and the order records buyers
//! look their orders up by. What went with Redis cannot come back: orders it
//! had accepted but not yet handed to PostgreSQL, and idempotency records.
//!
//! Only products Redis has no keys for and PostgreSQL has orders of are
//! touched; everything is written before the product's rules, so no gateway
//! sells it until its buyers' holdings are back.

use redis::aio::ConnectionLike;

use crate::keys::ProductKeys;
use crate::spec::{SaleId, SaleSpec};
use crate::store::{OrderStore, StoreError, StoredOrder};
use crate::warm::{self, WarmError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("order store: {0}")]
    Store(#[from] StoreError),
    #[error("warm: {0}")]
    Warm(#[from] WarmError),
    #[error("sku {sku}: stock {stock} is below the {sold} units PostgreSQL holds")]
    BelowSold { sku: String, stock: i64, sold: i64 },
}

/// What a restore wrote for one product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredProduct {
    pub sku: String,
    pub orders: usize,
    pub buyers: usize,
    /// Units PostgreSQL holds (confirmed or paid), now sold in Redis too.
    pub sold: i64,
    pub remaining: i64,
}

/// Field-value pairs per HSET: large enough to be few calls, small enough
/// not to hold Redis up.
const CHUNK: usize = 500;

/// Restores every product of `spec` whose Redis keys are gone while
/// PostgreSQL holds orders of it; products it restores are listed.
pub async fn restore_lost<C: ConnectionLike + Send>(
    conn: &mut C,
    store: &OrderStore,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<Vec<RestoredProduct>, RestoreError> {
    let counters = crate::counters::product_counters(conn, sale, spec).await?;
    let mut out = Vec::new();
    for (p, c) in spec.products.iter().zip(&counters) {
        if c.is_some() {
            continue;
        }
        let orders = store.product_orders(sale, &p.sku).await?;
        if orders.is_empty() {
            continue; // Never sold: a plain warm creates it.
        }
        let state = ProductState::of(&orders);
        let database_sold = store
            .inventory_row(sale, &p.sku)
            .await?
            .map_or(0, |r| r.sold);
        // The two agree; should they not, the larger never oversells.
        let sold = state.held.max(database_sold);
        if p.stock < sold {
            return Err(RestoreError::BelowSold {
                sku: p.sku.clone(),
                stock: p.stock,
                sold,
            });
        }
        // PostgreSQL covers what Redis will sell (the stock module's rule).
        store.set_stock(sale, &[(p.sku.clone(), p.stock)]).await?;
        let keys = ProductKeys::new(sale, &p.sku);
        write_state(conn, &keys, &state).await?;
        let warmed = warm::warm_product(conn, sale, spec, p, sold).await?;
        tracing::warn!(sku = %p.sku, orders = orders.len(), buyers = state.buyers.len(), sold, remaining = warmed.remaining, "product restored from PostgreSQL");
        out.push(RestoredProduct {
            sku: p.sku.clone(),
            orders: orders.len(),
            buyers: state.buyers.len(),
            sold,
            remaining: warmed.remaining,
        });
    }
    Ok(out)
}

/// A product's Redis state derived from its persisted orders.
#[derive(Debug, Default, PartialEq)]
struct ProductState {
    /// Per buyer: `<units held> <orders placed> <newest order id>`.
    buyers: Vec<(String, String)>,
    /// Per order: its record (`order::OrderRecord`), `since` left for the write.
    records: Vec<(String, Record)>,
    /// Units of confirmed or paid orders.
    held: i64,
    paid: i64,
    cancelled: i64,
}

#[derive(Debug, PartialEq)]
struct Record {
    status: String,
    rest: String,
}

impl ProductState {
    /// `orders` sorted by buyer, then sequence (as `product_orders` reads them).
    fn of(orders: &[StoredOrder]) -> Self {
        let mut state = Self::default();
        let mut buyer_holds = 0;
        for (i, o) in orders.iter().enumerate() {
            let prev = match i.checked_sub(1).map(|j| &orders[j]) {
                Some(p) if p.user_id == o.user_id => p.order_id.as_str(),
                _ => {
                    buyer_holds = 0;
                    ""
                }
            };
            let qty = i64::from(o.quantity);
            match o.status.as_str() {
                "cancelled" => state.cancelled += qty,
                status => {
                    buyer_holds += qty;
                    state.held += qty;
                    if status == "paid" {
                        state.paid += qty;
                    }
                }
            }
            state.records.push((
                o.order_id.clone(),
                Record {
                    status: o.status.clone(),
                    rest: format!(
                        "{} {} {} {} {prev}",
                        o.quantity, o.accepted_at_ms, o.unit_price, o.user_id
                    ),
                },
            ));
            if orders.get(i + 1).is_none_or(|n| n.user_id != o.user_id) {
                state.buyers.push((
                    o.user_id.clone(),
                    format!("{buyer_holds} {} {}", o.seq, o.order_id),
                ));
            }
        }
        state
    }
}

/// Buyers, records, the status counters and the stream's consumer group;
/// not yet the stock or the rules (`warm.lua` writes those last).
async fn write_state<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &ProductKeys,
    state: &ProductState,
) -> Result<(), redis::RedisError> {
    let now = jiff::Timestamp::now().as_millisecond();
    for chunk in state.buyers.chunks(CHUNK) {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(keys.buyers());
        for (user, entry) in chunk {
            cmd.arg(user).arg(entry);
        }
        cmd.exec_async(conn).await?;
    }
    for chunk in state.records.chunks(CHUNK) {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(keys.orders());
        for (id, r) in chunk {
            cmd.arg(id).arg(format!("{}:{now} {}", r.status, r.rest));
        }
        cmd.exec_async(conn).await?;
    }
    // The counters `counters.lua` moves: persisted counts confirmed and paid.
    redis::cmd("HSET")
        .arg(keys.info())
        .arg("persisted")
        .arg(state.held)
        .arg("paid")
        .arg(state.paid)
        .arg("cancelled")
        .arg(state.cancelled)
        .arg("failed")
        .arg(0)
        .exec_async(conn)
        .await?;
    crate::consumer::join_group(conn, &keys.stream(), true).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, user: &str, seq: i64, qty: i32, status: &str) -> StoredOrder {
        StoredOrder {
            order_id: id.into(),
            user_id: user.into(),
            seq,
            quantity: qty,
            unit_price: "9.50".into(),
            status: status.into(),
            accepted_at_ms: 1_000 + seq,
        }
    }

    #[test]
    fn buyers_hold_their_live_orders_and_chain_them() {
        let state = ProductState::of(&[
            order("a1", "alice", 1, 2, "paid"),
            order("a2", "alice", 2, 1, "cancelled"),
            order("a3", "alice", 3, 1, "confirmed"),
            order("b1", "bob", 1, 1, "confirmed"),
        ]);
        assert_eq!(
            state.buyers,
            vec![
                ("alice".to_string(), "3 3 a3".to_string()),
                ("bob".to_string(), "1 1 b1".to_string()),
            ]
        );
        let rest: Vec<&str> = state.records.iter().map(|(_, r)| r.rest.as_str()).collect();
        assert_eq!(
            rest,
            vec![
                "2 1001 9.50 alice ",
                "1 1002 9.50 alice a1",
                "1 1003 9.50 alice a2",
                "1 1001 9.50 bob ",
            ]
        );
        assert_eq!((state.held, state.paid, state.cancelled), (4, 2, 1));
    }
}
