//! The payment timeout sweeper: orders still unpaid `payment.timeoutSeconds`
//! after acceptance are cancelled and their stock and the buyer's limit
//! returned to Redis exactly once. It runs in every consumer process.
//!
//! One PostgreSQL transaction per product and batch picks due orders with
//! `FOR UPDATE SKIP LOCKED` (so several sweepers, and a payment callback
//! holding an order's row, never meet on one order), cancels them, lowers the
//! inventory's `sold`, and writes one outbox row per order. After commit the
//! outbox rows are applied to Redis with `release.lua`, which moves an order
//! only from accepted|confirmed (so applying twice returns nothing twice), and
//! marked applied. A crash between commit and apply leaves the rows
//! unapplied; the next sweep of any consumer applies them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::events::{OrderEvent, Publisher};
use crate::keys::ProductKeys;
use crate::order::OrderStatus;
use crate::redis_conn::RedisConn;
use crate::scripts;
use crate::spec::{SaleDocument, SaleId};
use crate::store::{OrderStore, StoreError};

/// The reason recorded on orders cancelled for want of payment.
pub const REASON: &str = "payment_timeout";

/// How often and how much to sweep.
#[derive(Clone, Debug)]
pub struct SweeperSettings {
    pub every: Duration,
    /// Orders cancelled per transaction.
    pub batch: i64,
    /// Unapplied outbox rows younger than this are left to the sweeper that
    /// wrote them (it applies them right after its commit).
    pub grace: Duration,
    /// An order persisted late (consumer lag, a PostgreSQL outage) stays
    /// payable this long after its row appeared, or its timeout if shorter,
    /// even past its timeout: a payment callback refused while the row was
    /// missing (409 `not_persisted`, or 503 during the outage) is retried by
    /// the provider, and must find the order, not a cancellation.
    pub persisted_grace: Duration,
    /// Pause between commit and apply. Only fault tests set it, to widen the
    /// window in which a crash leaves outbox rows unapplied.
    pub apply_delay: Duration,
    /// Under `redis.durability: replica`: releases count as applied only
    /// once a replica holds them (set by the consumer that runs the sweeper).
    pub replica_wait: Option<crate::durability::ReplicaWait>,
}

impl Default for SweeperSettings {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(1),
            batch: 500,
            grace: Duration::from_secs(2),
            persisted_grace: Duration::from_secs(30),
            apply_delay: Duration::ZERO,
            replica_wait: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("order store: {0}")]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "no replica confirmed {rows} releases in time; their outbox rows stay unapplied and are applied again"
    )]
    Unreplicated { rows: usize },
}

impl From<deadpool_postgres::PoolError> for SweepError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Store(StoreError::Pool(e))
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Orders cancelled in PostgreSQL.
    pub cancelled: u64,
    /// Outbox rows applied to Redis (this sweep's and earlier ones').
    pub applied: u64,
    /// Orders whose stock actually came back (the rest were already released).
    pub released: u64,
}

/// One outbox row: an order whose stock must go back to Redis.
struct Release {
    id: i64,
    sku: String,
    order_id: String,
    user_id: String,
}

pub struct Sweeper {
    sale: SaleId,
    /// The SKUs this pod sweeps (its spec's); releases go by any row's SKU.
    skus: Vec<String>,
    /// `payment.timeoutSeconds`, which follows the sale's live spec.
    timeout_seconds: Arc<AtomicU32>,
    store: OrderStore,
    redis: RedisConn,
    publisher: Publisher,
    settings: SweeperSettings,
}

impl Sweeper {
    pub fn new(
        doc: &SaleDocument,
        store: OrderStore,
        redis: RedisConn,
        settings: SweeperSettings,
    ) -> Self {
        let sale = doc.id();
        Self {
            skus: doc.spec.products.iter().map(|p| p.sku.clone()).collect(),
            timeout_seconds: Arc::new(AtomicU32::new(doc.spec.payment.timeout_seconds)),
            publisher: Publisher::new(&sale),
            sale,
            store,
            redis,
            settings,
        }
    }

    /// Sweeps the orders of `skus` rather than only the spec's products: a
    /// consumer passes every product the sale was warmed with, so orders of
    /// a product removed mid-sale still time out.
    pub fn with_skus(mut self, skus: Vec<String>) -> Self {
        self.skus = skus;
        self
    }

    /// The payment timeout in force; storing into it applies a new one from
    /// the next sweep on (a live spec change).
    pub fn timeout_seconds(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.timeout_seconds)
    }

    /// Sweeps every `settings.every` until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        use tracing::Instrument;
        let span = tracing::info_span!("payment_timeout", sale = %self.sale);
        async move {
            let mut tick = tokio::time::interval(self.settings.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                match self.sweep().await {
                    Ok(o) if o.cancelled > 0 || o.applied > 0 => {
                        tracing::info!(cancelled = o.cancelled, applied = o.applied, released = o.released, "unpaid orders cancelled");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "payment timeout sweep failed; retrying next tick"),
                }
                if let Err(e) = self.observe_outbox().await {
                    tracing::debug!(error = %e, "outbox rows not counted");
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Exports how many outbox rows wait to be applied and the oldest one's
    /// age: rows that stay are stock that never comes back on sale.
    async fn observe_outbox(&self) -> Result<(), SweepError> {
        let client = self.store.pool().get().await?;
        let row = client
            .query_one(
                "SELECT count(*),
                        coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
                 FROM flashsale_outbox WHERE sale = $1 AND applied_at IS NULL",
                &[&self.sale.key()],
            )
            .await?;
        let unapplied: i64 = row.try_get(0)?;
        let oldest: f64 = row.try_get(1)?;
        metrics::gauge!("flashsale_payment_outbox_unapplied").set(unapplied as f64);
        metrics::gauge!("flashsale_payment_outbox_oldest_unapplied_seconds").set(oldest);
        Ok(())
    }

    /// Applies abandoned outbox rows, then cancels every due order, a batch
    /// per transaction.
    ///
    /// Product by product: one product's trouble in Redis (its shard's
    /// master down, or under `replica` a promoted master with no replica of
    /// its own) must not hold back the others' timeouts; the first error is
    /// returned once every product had its turn.
    pub async fn sweep(&self) -> Result<SweepOutcome, SweepError> {
        let mut out = SweepOutcome::default();
        let mut first_error = None;
        for sku in &self.skus {
            if let Err(e) = self.sweep_product(sku, &mut out).await {
                tracing::warn!(sku, error = %e, "payment timeout sweep of one product failed; the others go on");
                first_error.get_or_insert(e);
            }
        }
        // Rows of products this pod does not know (a newer or older spec's).
        if let Err(e) = self.apply_abandoned(None, &mut out).await {
            first_error.get_or_insert(e);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// [`Self::sweep`] for one product: its abandoned outbox rows, then its
    /// due orders.
    async fn sweep_product(&self, sku: &str, out: &mut SweepOutcome) -> Result<(), SweepError> {
        self.apply_abandoned(Some(sku), out).await?;
        loop {
            let rows = self.cancel_due(sku).await?;
            let n = rows.len();
            out.cancelled += n as u64;
            metrics::counter!("flashsale_orders_cancelled_total", "reason" => REASON)
                .increment(n as u64);
            if n == 0 {
                break;
            }
            if !self.settings.apply_delay.is_zero() {
                tokio::time::sleep(self.settings.apply_delay).await;
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            out.released += self.apply(&rows).await?;
            self.mark_applied(&ids).await?;
            out.applied += n as u64;
            if (n as i64) < self.settings.batch {
                break;
            }
        }
        Ok(())
    }

    /// One transaction: due orders of `sku` → cancelled, `sold` lowered,
    /// one outbox row each.
    async fn cancel_due(&self, sku: &str) -> Result<Vec<Release>, SweepError> {
        let mut client = self.store.pool().get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "WITH due AS (
                    SELECT order_id FROM flashsale_orders
                    WHERE sale = $1 AND sku = $2 AND status = 'confirmed'
                      AND accepted_at < now() - make_interval(secs => $3)
                      AND persisted_at < now() - make_interval(secs => least($3, $5))
                    ORDER BY accepted_at
                    LIMIT $4
                    FOR UPDATE SKIP LOCKED
                 ), cancelled AS (
                    UPDATE flashsale_orders o SET status = 'cancelled', cancelled_at = now()
                    FROM due WHERE o.order_id = due.order_id
                    RETURNING o.order_id, o.user_id, o.quantity
                 ), inventory AS (
                    UPDATE flashsale_inventory
                    SET sold = sold - (SELECT coalesce(sum(quantity), 0) FROM cancelled)
                    WHERE sale = $1 AND sku = $2 AND EXISTS (SELECT 1 FROM cancelled)
                 ), outbox AS (
                    INSERT INTO flashsale_outbox (sale, sku, order_id, user_id, action)
                    SELECT $1, $2, order_id, user_id, 'release' FROM cancelled
                    RETURNING id, order_id, user_id
                 )
                 SELECT id, order_id, user_id FROM outbox",
                &[
                    &self.sale.key(),
                    &sku,
                    &f64::from(self.timeout_seconds.load(Ordering::Relaxed)),
                    &self.settings.batch,
                    &self.settings.persisted_grace.as_secs_f64(),
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| Release {
                id: r.get(0),
                sku: sku.to_string(),
                order_id: r.get(1),
                user_id: r.get(2),
            })
            .collect())
    }

    /// Outbox rows a crashed sweeper committed but never applied. Locked
    /// while applied, so two sweepers do not both pick the same rows up.
    /// Of one product (`Some(sku)`), or of every product not in `self.skus`.
    async fn apply_abandoned(
        &self,
        sku: Option<&str>,
        out: &mut SweepOutcome,
    ) -> Result<(), SweepError> {
        loop {
            let mut client = self.store.pool().get().await?;
            let tx = client.transaction().await?;
            let rows = tx
                .query(
                    "SELECT id, sku, order_id, user_id, action FROM flashsale_outbox
                     WHERE sale = $1 AND applied_at IS NULL
                       AND created_at < now() - make_interval(secs => $2)
                       AND CASE WHEN $4::text IS NULL THEN sku <> ALL($5) ELSE sku = $4 END
                     ORDER BY id
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED",
                    &[
                        &self.sale.key(),
                        &self.settings.grace.as_secs_f64(),
                        &self.settings.batch,
                        &sku,
                        &self.skus,
                    ],
                )
                .await?;
            if rows.is_empty() {
                return Ok(());
            }
            // Releases (payment timeouts) and paid marks (a payment whose
            // gateway could not mark Redis), each applied its own way.
            let (mut releases, mut paid, mut ids) = (Vec::new(), Vec::new(), Vec::new());
            for r in &rows {
                let row = Release {
                    id: r.try_get(0)?,
                    sku: r.try_get(1)?,
                    order_id: r.try_get(2)?,
                    user_id: r.try_get(3)?,
                };
                ids.push(row.id);
                match r.try_get::<_, &str>(4)? {
                    "paid" => paid.push(row),
                    _ => releases.push(row),
                }
            }
            tracing::info!(
                releases = releases.len(),
                paid = paid.len(),
                "applying outbox rows left unapplied"
            );
            out.released += self.apply(&releases).await?;
            self.apply_paid(&paid).await?;
            tx.execute(
                "UPDATE flashsale_outbox SET applied_at = now() WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
            tx.commit().await?;
            out.applied += ids.len() as u64;
            if (ids.len() as i64) < self.settings.batch {
                return Ok(());
            }
        }
    }

    /// Releases each order in Redis (one pipeline per product, since each
    /// product is its own Redis Cluster slot) and tells the users whose order
    /// this call moved. Returns how many moved.
    async fn apply(&self, rows: &[Release]) -> Result<u64, SweepError> {
        let mut redis = self.redis.clone();
        // By the rows' SKUs, not this pod's: a row may name a product of a
        // newer or older spec (a rollout), and marking it applied without
        // releasing would keep its unit out of stock for good.
        let mut by_sku: BTreeMap<&str, Vec<&Release>> = BTreeMap::new();
        for r in rows {
            by_sku.entry(&r.sku).or_default().push(r);
        }
        let per_product: Vec<(Vec<&Release>, redis::Pipeline)> = by_sku
            .into_iter()
            .map(|(sku, mine)| {
                let keys = ProductKeys::new(&self.sale, sku);
                let mut pipe = redis::pipe();
                pipe.load_script(&scripts::RELEASE).ignore();
                for r in &mine {
                    let mut inv = scripts::RELEASE.prepare_invoke();
                    inv.key(keys.orders())
                        .key(keys.stock())
                        .key(keys.buyers())
                        .key(keys.info())
                        .arg(&r.order_id)
                        .arg(OrderStatus::Cancelled.as_str())
                        .arg(REASON);
                    pipe.invoke_script(&inv);
                }
                (mine, pipe)
            })
            .collect();
        if per_product.is_empty() {
            return Ok(0);
        }
        // Under `replica` the outbox rows are marked applied only once a
        // replica holds the releases: a release a failover lost would leave
        // the unit out of Redis' stock for good. Applying again is a no-op
        // (release.lua moves an order once).
        let wait = self.settings.replica_wait;
        let results =
            futures::future::try_join_all(per_product.into_iter().map(|(mine, mut pipe)| {
                let mut redis = redis.clone();
                async move {
                    if let (Some(w), Some(r)) = (wait, mine.first()) {
                        w.mark_and_wait(&mut pipe, &self.wait_mark(&r.sku));
                    }
                    let started = std::time::Instant::now();
                    let mut values: Vec<redis::Value> = pipe.query_async(&mut redis).await?;
                    if wait.is_some() {
                        let waited = values.pop().unwrap_or(redis::Value::Nil);
                        let path = crate::durability::WaitPath::SweeperRelease;
                        if !crate::durability::confirmed(path, &Ok(waited), started) {
                            return Err(SweepError::Unreplicated { rows: mine.len() });
                        }
                    }
                    let results: Vec<(String, String)> = values
                        .into_iter()
                        .map(redis::from_redis_value)
                        .collect::<Result<_, _>>()
                        .map_err(redis::RedisError::from)?;
                    Ok::<_, SweepError>((mine, results))
                }
            }))
            .await?;
        let mut events = Vec::new();
        let applied = results
            .into_iter()
            .flat_map(|(mine, results)| mine.into_iter().zip(results));
        for (r, (outcome, detail)) in applied {
            match outcome.as_str() {
                "released" => events.push((
                    r.user_id.clone(),
                    OrderEvent::new(
                        &r.order_id,
                        &r.sku,
                        OrderStatus::Cancelled,
                        Some(REASON.into()),
                    ),
                )),
                "unknown" => {
                    tracing::warn!(order = %r.order_id, "cancelled order missing from Redis; its stock was not returned there")
                }
                _ => tracing::debug!(order = %r.order_id, status = %detail, "already released"),
            }
        }
        if let Err(e) = self.publisher.publish_many(&mut redis, &events).await {
            tracing::debug!(error = %e, "order.cancelled not pushed");
        }
        Ok(events.len() as u64)
    }

    /// Moves each order's Redis record to paid (from accepted or confirmed
    /// only, so a repeat is a no-op) and tells the users whose order this
    /// call moved: the marks payment callbacks committed and could not make.
    async fn apply_paid(&self, rows: &[Release]) -> Result<(), SweepError> {
        let mut redis = self.redis.clone();
        let mut events = Vec::new();
        for r in rows {
            let keys = ProductKeys::new(&self.sale, &r.sku);
            let before = scripts::mark_paid(&mut redis, &keys, &r.order_id).await?;
            let moved = before == OrderStatus::Accepted.as_str()
                || before == OrderStatus::Confirmed.as_str();
            if moved {
                let event = OrderEvent::new(&r.order_id, &r.sku, OrderStatus::Paid, None);
                events.push((r.user_id.clone(), event));
            }
        }
        if let Err(e) = self.publisher.publish_many(&mut redis, &events).await {
            tracing::debug!(error = %e, "order.paid not pushed");
        }
        Ok(())
    }

    fn wait_mark(&self, sku: &str) -> String {
        ProductKeys::new(&self.sale, sku).wait_mark()
    }

    async fn mark_applied(&self, ids: &[i64]) -> Result<(), SweepError> {
        Ok(self.store.mark_outbox_applied(ids).await?)
    }
}
