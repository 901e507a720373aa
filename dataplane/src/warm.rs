//! Warming: writing a sale's catalog and stock into Redis exactly once, and the
//! other sale-wide operations the operator needs (clearing).

use redis::aio::ConnectionLike;

use crate::counters::product_counters;
use crate::keys::{ProductKeys, SaleKeys};
use crate::scripts;
use crate::spec::{SaleId, SaleSpec};

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("sku {sku}: stock {stock} is below the {sold} units already sold")]
    BelowSold { sku: String, stock: i64, sold: i64 },
    #[error("sku {sku}: unexpected answer {answer:?} from warm.lua")]
    Protocol { sku: String, answer: String },
}

/// What warming did to one product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WarmOutcome {
    Created,
    Unchanged,
    /// Stock changed by `delta` (positive: added; negative: lowered, never below sold).
    Resized {
        delta: i64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductWarm {
    pub sku: String,
    pub outcome: WarmOutcome,
    pub remaining: i64,
    pub sold: i64,
}

/// Writes the sale into Redis; safe to call on every reconcile. A product whose
/// new stock is below what is already sold refuses the whole call before
/// anything changes (the script re-checks atomically per product).
pub async fn warm_sale<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<Vec<ProductWarm>, WarmError> {
    let counters = product_counters(conn, sale, spec).await?;
    for (p, c) in spec.products.iter().zip(&counters) {
        if let Some(c) = c
            && p.stock < c.sold()
        {
            return Err(WarmError::BelowSold {
                sku: p.sku.clone(),
                stock: p.stock,
                sold: c.sold(),
            });
        }
    }
    write_products(conn, sale, spec).await
}

/// `warm.lua` for each product, then the sale's meta record, with no check
/// of its own beforehand (the script still refuses a cut below sold
/// atomically): for a caller that already read the counters and checked.
pub(crate) async fn write_products<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<Vec<ProductWarm>, WarmError> {
    let start_ms = spec.start_time.as_millisecond();
    let end_ms = spec.end_time.as_millisecond();
    let mut out = Vec::with_capacity(spec.products.len());
    for p in &spec.products {
        let keys = ProductKeys::new(sale, &p.sku);
        let (outcome, remaining, sold, delta): (String, i64, i64, i64) = scripts::WARM
            .key(keys.info())
            .key(keys.stock())
            .arg(p.stock)
            .arg(p.price.to_string())
            .arg(p.per_user_limit)
            .arg(start_ms)
            .arg(end_ms)
            .arg(crate::keys::LAYOUT)
            .invoke_async(conn)
            .await?;
        let outcome = match outcome.as_str() {
            "created" => WarmOutcome::Created,
            "unchanged" => WarmOutcome::Unchanged,
            "resized" => WarmOutcome::Resized { delta },
            "below_sold" => {
                return Err(WarmError::BelowSold {
                    sku: p.sku.clone(),
                    stock: p.stock,
                    sold,
                });
            }
            other => {
                return Err(WarmError::Protocol {
                    sku: p.sku.clone(),
                    answer: other.to_string(),
                });
            }
        };
        out.push(ProductWarm {
            sku: p.sku.clone(),
            outcome,
            remaining,
            sold,
        });
    }
    let skus: Vec<&str> = spec.products.iter().map(|p| p.sku.as_str()).collect();
    redis::cmd("HSET")
        .arg(SaleKeys::new(sale).meta())
        .arg("skus")
        .arg(skus.join(","))
        .arg("warmed_at_ms")
        .arg(jiff::Timestamp::now().as_millisecond())
        .exec_async(conn)
        .await?;
    Ok(out)
}

/// Deletes every Redis key of the sale (orders in PostgreSQL are untouched).
/// `skus` should include SKUs removed from the spec during the sale; the
/// sale's meta record lists every SKU ever warmed, and is used too.
pub async fn clear_sale<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    skus: &[String],
) -> Result<usize, redis::RedisError> {
    let sale_keys = SaleKeys::new(sale);
    let warmed: Option<String> = redis::cmd("HGET")
        .arg(sale_keys.meta())
        .arg("skus")
        .query_async(conn)
        .await?;
    let mut all: Vec<String> = skus.to_vec();
    for s in warmed.iter().flat_map(|w| w.split(',')) {
        if !s.is_empty() && !all.iter().any(|k| k == s) {
            all.push(s.to_string());
        }
    }
    let mut deleted = 0usize;
    for sku in &all {
        // One DEL per product: its keys share a slot, as Redis Cluster requires.
        let n: usize = redis::cmd("DEL")
            .arg(ProductKeys::new(sale, sku).all())
            .query_async(conn)
            .await?;
        deleted += n;
    }
    let n: usize = redis::cmd("DEL")
        .arg(sale_keys.all())
        .query_async(conn)
        .await?;
    Ok(deleted + n)
}
