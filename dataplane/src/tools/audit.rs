//! The audit: after a run, read Redis and PostgreSQL directly and check the
//! three promises — nothing oversold, nobody over their limit, every 202 an
//! order row (or an explicit failure), Redis and the database in agreement,
//! down to the status counters.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use serde::Serialize;

use crate::counters::{ProductCounters, product_counters};
use crate::keys::ProductKeys;
use crate::order::{OrderRecord, OrderStatus};
use crate::spec::{SaleId, SaleSpec};
use crate::store::{InventoryRow, OrderStore, StoreError};
use crate::tools::crowd::AcceptedOrder;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("order store: {0}")]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// One product's books.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProductAudit {
    pub sku: String,
    pub stock: i64,
    /// Units still for sale in Redis.
    pub remaining: i64,
    /// Units held by live orders, by Redis (`stock - remaining`).
    pub sold_in_redis: i64,
    /// Order rows in PostgreSQL that count (confirmed or paid).
    pub orders: i64,
    /// Units of those rows.
    pub units: i64,
    /// Units beyond stock (must be 0).
    pub oversold: i64,
    /// `remaining + units == stock`.
    pub consistent: bool,
    /// The Redis status counters (see `counters`): units persisted
    /// (confirmed or paid), paid, cancelled and failed.
    pub persisted: i64,
    pub paid: i64,
    pub cancelled: i64,
    pub failed: i64,
    /// Units of paid and of cancelled rows in PostgreSQL.
    pub paid_units: i64,
    pub cancelled_units: i64,
    /// The counters match PostgreSQL: `persisted == units`,
    /// `paid == paid_units`, `cancelled == cancelled_units`.
    pub counters_agree: bool,
    /// `flashsale_inventory.stock` (absent when PostgreSQL has no row).
    pub database_stock: Option<i64>,
    /// PostgreSQL's stock equals Redis' at rest (a product never sold may lack a row).
    pub stores_agree: bool,
}

#[derive(Debug, Serialize)]
pub struct AuditReport {
    pub products: Vec<ProductAudit>,
    /// (sku, user, units) over the per-user limit.
    pub users_over_limit: Vec<(String, String, i64)>,
    /// Answered 202 but neither persisted nor explicitly failed.
    pub lost_orders: Vec<String>,
    /// Answered 202 and then explicitly failed (dead-lettered, stock returned).
    pub failed_orders: u64,
    /// Answered 202 more than once with different ids for one request, or
    /// two rows for one order id (both must be 0).
    pub duplicates_found: u64,
    /// Rows no 202 was seen for (e.g. the client timed out): not an error.
    /// Absent when auditing without a crowd's answers.
    pub unanswered_rows: Option<i64>,
}

impl AuditReport {
    pub fn oversold(&self) -> i64 {
        self.products.iter().map(|p| p.oversold).sum()
    }

    /// Every promise kept.
    pub fn passed(&self) -> bool {
        self.oversold() == 0
            && self.users_over_limit.is_empty()
            && self.lost_orders.is_empty()
            && self.duplicates_found == 0
            && self
                .products
                .iter()
                .all(|p| p.consistent && p.counters_agree && p.stores_agree)
    }

    /// One line per broken promise, for people.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.products {
            if p.oversold > 0 {
                out.push(format!("{}: oversold by {} units", p.sku, p.oversold));
            }
            if !p.consistent {
                out.push(format!(
                    "{}: remaining {} + persisted units {} != stock {}",
                    p.sku, p.remaining, p.units, p.stock
                ));
            }
            if !p.stores_agree {
                out.push(format!(
                    "{}: stock is {} in Redis but {:?} in PostgreSQL",
                    p.sku, p.stock, p.database_stock
                ));
            }
            if !p.counters_agree {
                out.push(format!(
                    "{}: counters persisted {} / paid {} / cancelled {} != PostgreSQL's {} / {} / {}",
                    p.sku,
                    p.persisted,
                    p.paid,
                    p.cancelled,
                    p.units,
                    p.paid_units,
                    p.cancelled_units
                ));
            }
        }
        for (sku, user, units) in &self.users_over_limit {
            out.push(format!(
                "{user} holds {units} units of {sku}, over the limit"
            ));
        }
        if !self.lost_orders.is_empty() {
            out.push(format!(
                "{} accepted orders lost, e.g. {}",
                self.lost_orders.len(),
                self.lost_orders[0]
            ));
        }
        if self.duplicates_found > 0 {
            out.push(format!("{} duplicate orders", self.duplicates_found));
        }
        out
    }
}

/// Waits until every accepted order has been persisted or failed and the
/// books agree: Redis' sold units and counters equal the database's for
/// every product. False on timeout.
pub async fn wait_drained<C: ConnectionLike + Send>(
    conn: &mut C,
    store: &OrderStore,
    sale: &SaleId,
    spec: &SaleSpec,
    timeout: Duration,
) -> Result<bool, AuditError> {
    let deadline = Instant::now() + timeout;
    loop {
        let drained = match products(conn, store, sale, spec).await {
            Ok((_, books)) => books.iter().all(|p| p.consistent && p.counters_agree),
            Err(AuditError::Redis(e)) => return Err(AuditError::Redis(e)),
            // The database may be restarting; keep waiting.
            Err(_) => false,
        };
        if drained {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Units per SKU in PostgreSQL, by order status.
#[derive(Clone, Copy, Debug, Default)]
struct Rows {
    /// Confirmed or paid: the orders that count.
    orders: i64,
    units: i64,
    paid_units: i64,
    cancelled_units: i64,
}

async fn rows_per_sku(
    store: &OrderStore,
    sale: &SaleId,
) -> Result<HashMap<String, Rows>, AuditError> {
    let client = store.pool().get().await.map_err(StoreError::from)?;
    let rows = client
        .query(
            "SELECT sku, status, count(*), coalesce(sum(quantity), 0)::bigint FROM flashsale_orders
             WHERE sale = $1 GROUP BY sku, status",
            &[&sale.key()],
        )
        .await?;
    let mut out: HashMap<String, Rows> = HashMap::new();
    for r in &rows {
        let e = out.entry(r.get::<_, String>(0)).or_default();
        let (n, units): (i64, i64) = (r.get(2), r.get(3));
        match r.get::<_, &str>(1) {
            "confirmed" => {
                e.orders += n;
                e.units += units;
            }
            "paid" => {
                e.orders += n;
                e.units += units;
                e.paid_units += units;
            }
            "cancelled" => e.cancelled_units += units,
            _ => {}
        }
    }
    Ok(out)
}

/// `spec` and every product the sale ever warmed or holds orders of: a
/// product removed mid-sale keeps its stream, orders and books, and its
/// promises are audited too, with the stock in Redis (or the database's) and
/// the per-user limit its rules in Redis carry (none known: not checked).
async fn audited_spec<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
    inventory: &[InventoryRow],
) -> Result<SaleSpec, AuditError> {
    let known = crate::warm::known_skus(
        conn,
        sale,
        spec.products
            .iter()
            .map(|p| p.sku.clone())
            .chain(inventory.iter().map(|row| row.sku.clone())),
    )
    .await?;
    let mut out = spec.clone();
    for sku in known {
        if out.products.iter().any(|p| p.sku == sku) {
            continue;
        }
        let rules: Option<String> = redis::cmd("HGET")
            .arg(ProductKeys::new(sale, &sku).info())
            .arg("rules")
            .query_async(conn)
            .await?;
        // "<layout> <start_ms> <end_ms> <limit> <price>" (purchase.lua).
        let limit = rules
            .as_deref()
            .and_then(|r| r.split(' ').nth(3))
            .and_then(|l| l.parse().ok())
            .unwrap_or(u32::MAX);
        let stock = inventory
            .iter()
            .find(|row| row.sku == sku)
            .map_or(0, |row| row.stock);
        out.products.push(crate::spec::ProductSpec {
            sku,
            stock,
            price: rust_decimal::Decimal::ZERO,
            per_user_limit: limit,
        });
    }
    Ok(out)
}

/// Each product's books, of [`audited_spec`]'s products (returned with
/// them): Redis' stock and counters beside PostgreSQL's rows.
async fn products<C: ConnectionLike + Send>(
    conn: &mut C,
    store: &OrderStore,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<(SaleSpec, Vec<ProductAudit>), AuditError> {
    let inventory = store.inventory(sale).await?;
    let spec = audited_spec(conn, sale, spec, &inventory).await?;
    let counters = product_counters(conn, sale, &spec).await?;
    let rows = rows_per_sku(store, sale).await?;
    let books = spec
        .products
        .iter()
        .zip(counters)
        .map(|(p, c)| {
            let remaining = c.as_ref().map(|c| c.remaining).unwrap_or(p.stock);
            let stock = c.as_ref().map(|c| c.stock).unwrap_or(p.stock);
            let r = rows.get(&p.sku).copied().unwrap_or_default();
            let database_stock = inventory
                .iter()
                .find(|row| row.sku == p.sku)
                .map(|row| row.stock);
            let count = |f: fn(&ProductCounters) -> i64| c.as_ref().map(f).unwrap_or(0);
            let (persisted, paid, cancelled) = (
                count(|c| c.persisted),
                count(|c| c.paid),
                count(|c| c.cancelled),
            );
            ProductAudit {
                sku: p.sku.clone(),
                stock,
                remaining,
                sold_in_redis: stock - remaining,
                orders: r.orders,
                units: r.units,
                oversold: (r.units - stock).max(0),
                consistent: remaining + r.units == stock && remaining >= 0,
                persisted,
                paid,
                cancelled,
                failed: count(|c| c.failed),
                paid_units: r.paid_units,
                cancelled_units: r.cancelled_units,
                counters_agree: persisted == r.units
                    && paid == r.paid_units
                    && cancelled == r.cancelled_units,
                database_stock,
                stores_agree: database_stock.map_or(stock == remaining, |d| d == stock),
            }
        })
        .collect();
    Ok((spec, books))
}

/// Audits the sale. `answered` are the 202s a crowd saw (may be empty when
/// auditing a sale someone else drove); `idempotency_violations` comes from it too.
pub async fn audit<C: ConnectionLike + Send>(
    conn: &mut C,
    store: &OrderStore,
    sale: &SaleId,
    spec: &SaleSpec,
    answered: &[AcceptedOrder],
    idempotency_violations: u64,
) -> Result<AuditReport, AuditError> {
    // The limits of every audited product, removed ones' included.
    let (audited, products) = products(conn, store, sale, spec).await?;

    let client = store.pool().get().await.map_err(StoreError::from)?;
    let limits: HashMap<&str, i64> = audited
        .products
        .iter()
        .map(|p| (p.sku.as_str(), i64::from(p.per_user_limit)))
        .collect();
    let held = client
        .query(
            "SELECT sku, user_id, sum(quantity)::bigint FROM flashsale_orders
             WHERE sale = $1 AND status IN ('confirmed', 'paid') GROUP BY sku, user_id",
            &[&sale.key()],
        )
        .await?;
    let users_over_limit = held
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i64>(2),
            )
        })
        .filter(|(sku, _, units)| limits.get(sku.as_str()).is_some_and(|l| units > l))
        .collect();

    let ids: Vec<String> = answered.iter().map(|o| o.order_id.clone()).collect();
    let distinct: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let present: HashSet<String> = store.existing_order_ids(&ids).await?.into_iter().collect();
    let mut lost_orders = Vec::new();
    let mut failed_orders = 0;
    for o in answered {
        if present.contains(&o.order_id) {
            continue;
        }
        match order_status(conn, sale, &o.sku, &o.order_id).await? {
            Some(OrderStatus::Failed) => failed_orders += 1,
            _ => lost_orders.push(o.order_id.clone()),
        }
    }
    let total_rows: i64 = client
        .query_one(
            "SELECT count(*) FROM flashsale_orders WHERE sale = $1",
            &[&sale.key()],
        )
        .await?
        .get(0);
    let answered_present =
        i64::try_from(distinct.iter().filter(|id| present.contains(**id)).count()).unwrap_or(0);
    Ok(AuditReport {
        products,
        users_over_limit,
        lost_orders,
        failed_orders,
        duplicates_found: idempotency_violations + (ids.len() - distinct.len()) as u64,
        unanswered_rows: (!answered.is_empty()).then_some(total_rows - answered_present),
    })
}

async fn order_status<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    sku: &str,
    id: &str,
) -> Result<Option<OrderStatus>, AuditError> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(ProductKeys::new(sale, sku).orders())
        .arg(id)
        .query_async(conn)
        .await?;
    Ok(raw
        .and_then(|r| OrderRecord::decode(id, &r))
        .map(|r| r.status))
}
