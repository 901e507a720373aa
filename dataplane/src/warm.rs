//! Warming: writing a sale's catalog and stock into Redis exactly once, and the
//! other sale-wide operations the operator needs (clearing).

use redis::aio::ConnectionLike;

use crate::counters::{ProductCounters, product_counters};
use crate::keys::{ProductKeys, SaleKeys};
use crate::scripts;
use crate::spec::{ProductSpec, SaleId, SaleSpec};

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
    write_products(conn, sale, spec, &counters, None).await
}

/// `warm.lua` for each product, then the sale's meta record, for a caller
/// that already read `counters` (Redis' counters in `spec`'s product order)
/// and checked them. Sales go on meanwhile, so the script still refuses a
/// cut below sold, atomically: cuts are written first, and when one is
/// refused the cuts written before it are put back (to the stock `counters`
/// read and the rules of `previous`, the spec the sale ran with, or of
/// `spec` without one), so a refusal leaves every product as it was.
pub async fn write_products<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
    counters: &[Option<ProductCounters>],
    previous: Option<&SaleSpec>,
) -> Result<Vec<ProductWarm>, WarmError> {
    let stock_before = |i: usize| counters.get(i).and_then(Option::as_ref).map(|c| c.stock);
    let is_cut = |i: usize| stock_before(i).is_some_and(|s| spec.products[i].stock < s);
    let (cuts, others): (Vec<usize>, Vec<usize>) =
        (0..spec.products.len()).partition(|&i| is_cut(i));
    let mut written: Vec<Option<ProductWarm>> = vec![None; spec.products.len()];
    for (n, &i) in cuts.iter().enumerate() {
        match warm_product(conn, sale, spec, &spec.products[i], 0).await {
            Ok(w) => written[i] = Some(w),
            Err(e) => {
                for &j in &cuts[..n] {
                    let p = &spec.products[j];
                    let found = previous
                        .and_then(|s| s.products.iter().find(|q| q.sku == p.sku).map(|q| (s, q)));
                    let (rules, was) = found.unwrap_or((spec, p));
                    let back = ProductSpec {
                        stock: stock_before(j).unwrap_or(was.stock),
                        ..was.clone()
                    };
                    warm_product(conn, sale, rules, &back, 0).await?;
                }
                return Err(e);
            }
        }
    }
    for i in others {
        written[i] = Some(warm_product(conn, sale, spec, &spec.products[i], 0).await?);
    }
    // Every SKU ever warmed stays listed: a product removed from the spec
    // still has accepted orders in its stream for consumers to persist.
    let skus = warmed_skus(conn, sale, spec).await?;
    redis::cmd("HSET")
        .arg(SaleKeys::new(sale).meta())
        .arg("skus")
        .arg(skus.join(","))
        .arg("warmed_at_ms")
        .arg(jiff::Timestamp::now().as_millisecond())
        .exec_async(conn)
        .await?;
    Ok(written.into_iter().flatten().collect())
}

/// The SKUs `skus` names, then every other SKU the sale's meta record says
/// was ever warmed (products removed from the spec mid-sale): the products
/// whose streams may hold orders and whose keys a clear must delete.
pub async fn known_skus<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    skus: impl IntoIterator<Item = String>,
) -> Result<Vec<String>, redis::RedisError> {
    let warmed: Option<String> = redis::cmd("HGET")
        .arg(SaleKeys::new(sale).meta())
        .arg("skus")
        .query_async(conn)
        .await?;
    let mut all: Vec<String> = skus.into_iter().collect();
    for s in warmed.iter().flat_map(|w| w.split(',')) {
        if !s.is_empty() && !all.iter().any(|k| k == s) {
            all.push(s.to_string());
        }
    }
    Ok(all)
}

/// [`known_skus`] for `spec`'s products: the spec's SKUs first.
pub async fn warmed_skus<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<Vec<String>, redis::RedisError> {
    known_skus(conn, sale, spec.products.iter().map(|p| p.sku.clone())).await
}

/// `warm.lua` for one product of `spec`; `sold_before` units count as sold
/// if the script creates the product (a restore from PostgreSQL).
pub(crate) async fn warm_product<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
    p: &ProductSpec,
    sold_before: i64,
) -> Result<ProductWarm, WarmError> {
    let keys = ProductKeys::new(sale, &p.sku);
    let (outcome, remaining, sold, delta): (String, i64, i64, i64) = scripts::WARM
        .key(keys.info())
        .key(keys.stock())
        .arg(p.stock)
        .arg(p.price.to_string())
        .arg(p.per_user_limit)
        .arg(spec.start_time.as_millisecond())
        .arg(spec.end_time.as_millisecond())
        .arg(crate::keys::LAYOUT)
        .arg(sold_before)
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
    Ok(ProductWarm {
        sku: p.sku.clone(),
        outcome,
        remaining,
        sold,
    })
}

/// Deletes every Redis key of the sale (orders in PostgreSQL are untouched):
/// the products `skus` names and every product the sale was ever warmed with.
pub async fn clear_sale<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    skus: &[String],
) -> Result<usize, redis::RedisError> {
    let sale_keys = SaleKeys::new(sale);
    let all = known_skus(conn, sale, skus.iter().cloned()).await?;
    // The sale's keys (its meta record) first: a consumer still shutting
    // down re-creates a lost stream group only while the meta record exists.
    let n: usize = redis::cmd("DEL")
        .arg(sale_keys.all())
        .query_async(conn)
        .await?;
    let mut deleted = 0usize;
    for sku in &all {
        // One DEL per product: its keys share a slot, as Redis Cluster requires.
        let n: usize = redis::cmd("DEL")
            .arg(ProductKeys::new(sale, sku).all())
            .query_async(conn)
            .await?;
        deleted += n;
    }
    Ok(deleted + n)
}
