//! Applying a sale's spec to a running sale, with one ordering rule for stock:
//! every unit Redis can sell is already covered by PostgreSQL's inventory row.
//!
//! - a raise (or a new product) goes to PostgreSQL first, then Redis;
//! - a cut goes to Redis first (refused below what is sold), then PostgreSQL.
//!
//! Each step is idempotent and the steps only ever leave PostgreSQL's stock at
//! or above Redis', so a caller that fails halfway calls again until both
//! agree. The operator runs this on every spec generation, the local run and
//! `flashsale warm` run it too: one code path. A spec that cannot apply to the
//! running sale (stock below sold, an end time already past, an invalid
//! limit) changes nothing and says why.

use jiff::Timestamp;
use redis::aio::ConnectionLike;

use crate::counters::ProductCounters;
use crate::keys::SaleKeys;
use crate::live::{self, LiveError};
use crate::scripts;
use crate::spec::{SaleId, SaleSpec, SpecProblem};
use crate::store::{OrderStore, OrderTally, StoreError};
use crate::warm::{self, ProductWarm, WarmError};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("order store: {0}")]
    Store(#[from] StoreError),
    #[error("warm: {0}")]
    Warm(#[from] WarmError),
    #[error("live spec: {0}")]
    Live(#[from] LiveError),
    /// Nothing was changed; the running sale keeps its applied spec.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused(Vec<SpecProblem>),
    /// Another apply of this sale holds its lock; nothing was changed.
    #[error("another apply of this sale is in progress ({holder}); retry shortly")]
    Busy { holder: String },
}

/// How long an apply may hold the sale's lock. An apply takes well under a
/// second; a holder that died frees the sale after this.
pub const APPLY_LOCK_MS: u64 = 30_000;

/// One product's stock as both stores hold it after an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductStock {
    pub sku: String,
    /// Units Redis may sell in all (`info.stock`).
    pub redis: i64,
    /// `flashsale_inventory.stock`.
    pub database: Option<i64>,
}

/// What an apply did.
#[derive(Clone, Debug)]
pub struct Applied {
    pub products: Vec<ProductWarm>,
    pub stock: Vec<ProductStock>,
    /// Whether running pods get a new spec, and its version.
    pub spec_changed: bool,
    pub spec_version: i64,
}

/// Why `next` cannot replace the running sale's spec (`applied`, with
/// Redis' counters in `next`'s product order and the orders PostgreSQL
/// holds); empty when it can.
pub fn change_problems(
    applied: Option<&SaleSpec>,
    next: &SaleSpec,
    counters: &[Option<ProductCounters>],
    persisted: &[OrderTally],
    now: Timestamp,
) -> Vec<SpecProblem> {
    let mut problems = next.validate().err().unwrap_or_default();
    for (p, c) in next.products.iter().zip(counters) {
        match c {
            Some(c) if p.stock < c.sold() => {
                problems.push(below_sold(&WarmError::BelowSold {
                    sku: p.sku.clone(),
                    stock: p.stock,
                    sold: c.sold(),
                }));
            }
            Some(_) => {}
            // No keys in Redis although PostgreSQL holds orders of it: Redis
            // lost what it was warmed with (a restart without AOF). Warming
            // it as new would sell those units a second time, and buyers'
            // order sequences would start again and clash with their rows.
            None => {
                if let Some(t) = persisted.iter().find(|t| t.sku == p.sku) {
                    problems.push(SpecProblem {
                        reason: "StockMissing",
                        message: format!(
                            "Redis has no keys for {} although PostgreSQL holds {} order(s) of it ({} unit(s) sold): Redis lost the sale's keys (a restart without AOF?), and warming it anew would sell them twice. Restore Redis from its AOF/RDB, or rebuild the product from PostgreSQL with `flashsale warm --restore`. (A sale deleted and created again under the same name finds the old sale's orders: give the new one another name.)",
                            p.sku, t.orders, t.units
                        ),
                    });
                }
            }
        }
    }
    if let Some(old) = applied
        && next.end_time != old.end_time
        && next.end_time <= now
        && old.end_time > now
    {
        problems.push(SpecProblem {
            reason: "EndInPast",
            message: format!(
                "endTime {} is already past; the running sale keeps {} (shorten it to a time ahead, or let it end)",
                next.end_time, old.end_time
            ),
        });
    }
    problems
}

/// A cut below what is sold, as a refusal (`WarmError::BelowSold` says it).
fn below_sold(e: &WarmError) -> SpecProblem {
    SpecProblem {
        reason: "StockBelowSold",
        message: e.to_string(),
    }
}

/// Applies `spec` to the sale in PostgreSQL and Redis (see the module doc)
/// and publishes it for running gateways and consumers.
///
/// One apply of a sale at a time: two interleaved (an operator that lost
/// its Lease still finishing one while the new leader starts, or
/// `flashsale warm` run by hand beside the operator) could each raise
/// PostgreSQL and Redis in the other's order and leave Redis able to sell
/// units PostgreSQL does not cover. The second is refused with
/// [`ApplyError::Busy`], having changed nothing, and its caller retries.
pub async fn apply<C: ConnectionLike + Send>(
    conn: &mut C,
    store: &OrderStore,
    sale: &SaleId,
    spec: &SaleSpec,
    now: Timestamp,
) -> Result<Applied, ApplyError> {
    let lock = SaleKeys::new(sale).apply_lock();
    let token = format!(
        "{}/{}/{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown-host".into()),
        std::process::id(),
        ulid::Ulid::new()
    );
    let taken: Option<String> = redis::cmd("SET")
        .arg(&lock)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(APPLY_LOCK_MS)
        .query_async(conn)
        .await?;
    if taken.is_none() {
        let holder: Option<String> = redis::cmd("GET").arg(&lock).query_async(conn).await?;
        return Err(ApplyError::Busy {
            holder: holder.unwrap_or_else(|| "just released".into()),
        });
    }
    let result = apply_locked(conn, store, sale, spec, now).await;
    // Not released (Redis gone, or this future dropped): it lapses.
    if let Err(e) = scripts::UNLOCK
        .key(&lock)
        .arg(&token)
        .invoke_async::<i64>(conn)
        .await
    {
        tracing::warn!(error = %e, sale = %sale.key(), "apply lock not released; it lapses in {APPLY_LOCK_MS} ms");
    }
    result
}

async fn apply_locked<C: ConnectionLike + Send>(
    conn: &mut C,
    store: &OrderStore,
    sale: &SaleId,
    spec: &SaleSpec,
    now: Timestamp,
) -> Result<Applied, ApplyError> {
    let applied = live::read(conn, sale).await?;
    let counters = crate::counters::product_counters(conn, sale, spec).await?;
    let persisted = if counters.iter().any(Option::is_none) {
        store.order_tallies(sale).await?
    } else {
        Vec::new()
    };
    let problems = change_problems(
        applied.as_ref().map(|l| &l.spec),
        spec,
        &counters,
        &persisted,
        now,
    );
    if !problems.is_empty() {
        return Err(ApplyError::Refused(problems));
    }

    // 1. Raises and new products: PostgreSQL covers them before Redis sells them.
    let (raises, cuts): (Vec<_>, Vec<_>) = spec
        .products
        .iter()
        .zip(&counters)
        .map(|(p, c)| (p.sku.as_str(), p.stock, c.as_ref().map(|c| c.stock)))
        .partition(|(_, stock, redis)| redis.is_none_or(|r| *stock >= r));
    let pairs = |v: &[(&str, i64, Option<i64>)]| -> Vec<(String, i64)> {
        v.iter().map(|(s, n, _)| (s.to_string(), *n)).collect()
    };
    store.set_stock(sale, &pairs(&raises)).await?;

    // 2. Redis: stock by difference (never reset), price, limit, window.
    let previous = applied.as_ref().map(|l| &l.spec);
    let products = match warm::write_products(conn, sale, spec, &counters, previous).await {
        Ok(p) => p,
        // Sold moved between the check and a cut: the cuts before it were
        // put back, and nothing else was written.
        Err(e @ WarmError::BelowSold { .. }) => {
            return Err(ApplyError::Refused(vec![below_sold(&e)]));
        }
        Err(e) => return Err(e.into()),
    };

    // 3. Cuts: Redis sells less now, so PostgreSQL may follow.
    store.set_stock(sale, &pairs(&cuts)).await?;

    // 4. Running pods pick the new settings up within a second.
    let (spec_changed, spec_version) = live::publish(conn, sale, spec).await?;

    let database = store.inventory(sale).await?;
    let stock = spec
        .products
        .iter()
        .map(|p| ProductStock {
            sku: p.sku.clone(),
            redis: p.stock,
            database: database
                .iter()
                .find(|row| row.sku == p.sku)
                .map(|row| row.stock),
        })
        .collect();
    Ok(Applied {
        products,
        stock,
        spec_changed,
        spec_version,
    })
}
