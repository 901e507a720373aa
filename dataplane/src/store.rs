//! The order store in PostgreSQL: schema migrations under an advisory lock,
//! the inventory rows that guard against overselling a second time, and the
//! batched, idempotent insert of accepted orders.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::spec::{SaleId, SaleSpec};

/// Applied in order, once each, recorded in `flashsale_schema_migrations`.
/// Hand-rolled rather than a migration crate because it must run under a
/// PostgreSQL advisory lock so many consumer pods can start at once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE flashsale_inventory (
        sale text NOT NULL,
        sku text NOT NULL,
        stock bigint NOT NULL CHECK (stock >= 0),
        sold bigint NOT NULL DEFAULT 0 CHECK (sold >= 0),
        PRIMARY KEY (sale, sku),
        CONSTRAINT sold_within_stock CHECK (sold <= stock)
    );
    CREATE TABLE flashsale_orders (
        order_id text PRIMARY KEY,
        sale text NOT NULL,
        sku text NOT NULL,
        user_id text NOT NULL,
        seq bigint NOT NULL,
        quantity integer NOT NULL CHECK (quantity > 0),
        unit_price numeric(14, 2) NOT NULL CHECK (unit_price >= 0),
        status text NOT NULL DEFAULT 'confirmed'
            CHECK (status IN ('confirmed', 'paid', 'cancelled')),
        accepted_at timestamptz NOT NULL,
        persisted_at timestamptz NOT NULL DEFAULT now(),
        stream_id text NOT NULL,
        UNIQUE (sale, sku, user_id, seq),
        FOREIGN KEY (sale, sku) REFERENCES flashsale_inventory (sale, sku)
    );
    CREATE INDEX flashsale_orders_user ON flashsale_orders (sale, user_id);",
    ),
    (
        2,
        // Payments and timeouts: every callback recorded once by payment id
        // (its answer stored, so a repeat answers the same), at most one paid
        // payment per order, and the outbox whose rows return a cancelled
        // order's stock to Redis after the cancelling transaction commits.
        "ALTER TABLE flashsale_orders
        ADD COLUMN paid_at timestamptz,
        ADD COLUMN cancelled_at timestamptz;
    CREATE INDEX flashsale_orders_unpaid ON flashsale_orders (sale, sku, accepted_at)
        WHERE status = 'confirmed';
    CREATE TABLE flashsale_payments (
        payment_id text PRIMARY KEY,
        order_id text NOT NULL,
        sale text NOT NULL,
        amount numeric(14, 2) NOT NULL,
        currency text NOT NULL,
        provider_status text NOT NULL,
        outcome text NOT NULL CHECK (outcome IN ('paid', 'refund_due', 'rejected')),
        reason text,
        http_status integer NOT NULL,
        body text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE UNIQUE INDEX flashsale_payments_one_paid ON flashsale_payments (order_id)
        WHERE outcome = 'paid';
    CREATE INDEX flashsale_payments_refund_due ON flashsale_payments (sale)
        WHERE outcome = 'refund_due';
    CREATE TABLE flashsale_outbox (
        id bigserial PRIMARY KEY,
        sale text NOT NULL,
        sku text NOT NULL,
        order_id text NOT NULL,
        user_id text NOT NULL,
        action text NOT NULL CHECK (action IN ('release')),
        created_at timestamptz NOT NULL DEFAULT now(),
        applied_at timestamptz
    );
    CREATE INDEX flashsale_outbox_unapplied ON flashsale_outbox (sale, id)
        WHERE applied_at IS NULL;",
    ),
    // A paid order's move to `paid` in Redis, committed with the payment, so
    // a mark Redis did not take is applied by the sweeper even when the
    // payment provider never calls again.
    (
        3,
        "ALTER TABLE flashsale_outbox DROP CONSTRAINT IF EXISTS flashsale_outbox_action_check;
    ALTER TABLE flashsale_outbox ADD CONSTRAINT flashsale_outbox_action_check
        CHECK (action IN ('release', 'paid'));",
    ),
];

/// Arbitrary constant identifying flashsale's migration lock.
const MIGRATION_LOCK: i64 = 0x666c_6173_6873_616c;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database url: {0}")]
    Config(String),
    #[error("database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("migration {version}: {source}")]
    Migration {
        version: i32,
        source: tokio_postgres::Error,
    },
}

impl StoreError {
    /// Whether retrying the same work later can succeed, as opposed to the
    /// data being refused. Only a refusal of the data itself (see
    /// [`refuses_the_data`]) is not: anything else (the database down or
    /// restarting, a primary demoted to read-only in a switchover, a revoked
    /// privilege) is the database's state, and an order that got a 202 must
    /// wait for it rather than be failed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Config(_) => false,
            Self::Pool(_) => true,
            Self::Db(e) | Self::Migration { source: e, .. } => {
                e.code().is_none_or(|code| !refuses_the_data(code))
            }
        }
    }
}

/// A refusal of the rows themselves: a data exception (class 22, a value
/// out of range or too long) or an integrity constraint (class 23: a CHECK,
/// a unique key, a foreign key). Retrying the same rows gets the same answer.
fn refuses_the_data(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("22") || c.starts_with("23")
}

impl StoreError {
    /// Whether the inventory's `sold_within_stock` CHECK refused the write
    /// (more units than PostgreSQL's stock covers).
    pub fn is_stock_refusal(&self) -> bool {
        match self {
            Self::Db(e) => e
                .as_db_error()
                .and_then(|d| d.constraint())
                .is_some_and(|c| c == "sold_within_stock"),
            _ => false,
        }
    }
}

/// One accepted order on its way into `flashsale_orders`.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderRow {
    pub order_id: String,
    pub sku: String,
    pub user_id: String,
    pub seq: i64,
    pub quantity: i32,
    /// Decimal string, cast to numeric by the database.
    pub unit_price: String,
    pub accepted_at_ms: i64,
    pub stream_id: String,
}

/// One product's orders in PostgreSQL, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderTally {
    pub sku: String,
    pub orders: i64,
    /// Units of confirmed or paid orders.
    pub units: i64,
}

/// A row of `flashsale_orders`, as a restore reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOrder {
    pub order_id: String,
    pub user_id: String,
    pub seq: i64,
    pub quantity: i32,
    pub unit_price: String,
    /// `confirmed`, `paid` or `cancelled`.
    pub status: String,
    pub accepted_at_ms: i64,
}

/// One product's inventory row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryRow {
    pub sku: String,
    /// Units PostgreSQL lets the orders of this product add up to.
    pub stock: i64,
    /// Units held by confirmed and paid orders.
    pub sold: i64,
}

impl InventoryRow {
    /// From a `SELECT sku, stock, sold` row.
    fn from_row(r: &tokio_postgres::Row) -> Self {
        Self {
            sku: r.get(0),
            stock: r.get(1),
            sold: r.get(2),
        }
    }
}

/// What one batch did.
#[derive(Debug, Default, PartialEq)]
pub struct BatchOutcome {
    /// Rows inserted now (a redelivered row is skipped, not counted).
    pub inserted: u64,
}

#[derive(Clone)]
pub struct OrderStore {
    pool: Pool,
}

impl OrderStore {
    /// A pool of at most `max_connections`; connects lazily.
    pub fn connect(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        let mut config = config;
        config.connect_timeout(Duration::from_secs(2));
        // A database host that vanishes without a reset (a lost node, a
        // partition) must fail a call in seconds, not hang every consumer
        // until TCP gives up (about 15 min with data in flight, 2 h idle).
        // What the URL sets wins (`tcp_user_timeout`, `keepalives_idle`, …).
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(Duration::from_secs(10));
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(Duration::from_secs(5));
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(3);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(3)))
            // Recycling a pooled connection runs a query (`Verified`).
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Applies pending migrations; concurrent callers wait on the advisory lock
    /// and then find nothing to do.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS flashsale_schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let done: Vec<i32> = tx
            .query("SELECT version FROM flashsale_schema_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (version, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(|source| StoreError::Migration {
                    version: *version,
                    source,
                })?;
            tx.execute(
                "INSERT INTO flashsale_schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "schema migration applied");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Creates the inventory rows a sale lacks, with the spec's stock; never
    /// changes an existing row (stock changes follow `stock::apply`'s order,
    /// and a pod booting with an older spec must not undo them).
    pub async fn ensure_inventory(&self, sale: &SaleId, spec: &SaleSpec) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let skus: Vec<&str> = spec.products.iter().map(|p| p.sku.as_str()).collect();
        let stocks: Vec<i64> = spec.products.iter().map(|p| p.stock).collect();
        client
            .execute(
                "INSERT INTO flashsale_inventory (sale, sku, stock)
                 SELECT $1, sku, stock FROM unnest($2::text[], $3::bigint[]) AS t(sku, stock)
                 ON CONFLICT (sale, sku) DO NOTHING",
                &[&sale.key(), &skus, &stocks],
            )
            .await?;
        Ok(())
    }

    /// Sets products' stock, creating rows that are missing. A stock below
    /// what is persisted fails on the CHECK, as it must.
    pub async fn set_stock(
        &self,
        sale: &SaleId,
        stock: &[(String, i64)],
    ) -> Result<(), StoreError> {
        if stock.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let skus: Vec<&str> = stock.iter().map(|(s, _)| s.as_str()).collect();
        let stocks: Vec<i64> = stock.iter().map(|(_, n)| *n).collect();
        client
            .execute(
                "INSERT INTO flashsale_inventory (sale, sku, stock)
                 SELECT $1, sku, stock FROM unnest($2::text[], $3::bigint[]) AS t(sku, stock)
                 ON CONFLICT (sale, sku) DO UPDATE SET stock = EXCLUDED.stock
                 WHERE flashsale_inventory.stock <> EXCLUDED.stock",
                &[&sale.key(), &skus, &stocks],
            )
            .await?;
        Ok(())
    }

    /// One product's inventory row.
    pub async fn inventory_row(
        &self,
        sale: &SaleId,
        sku: &str,
    ) -> Result<Option<InventoryRow>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT sku, stock, sold FROM flashsale_inventory WHERE sale = $1 AND sku = $2",
                &[&sale.key(), &sku],
            )
            .await?;
        Ok(row.as_ref().map(InventoryRow::from_row))
    }

    /// Marks outbox rows applied (their Redis side is done).
    pub async fn mark_outbox_applied(&self, ids: &[i64]) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE flashsale_outbox SET applied_at = now() WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(())
    }

    /// The sale's inventory rows.
    pub async fn inventory(&self, sale: &SaleId) -> Result<Vec<InventoryRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT sku, stock, sold FROM flashsale_inventory WHERE sale = $1 ORDER BY sku",
                &[&sale.key()],
            )
            .await?;
        Ok(rows.iter().map(InventoryRow::from_row).collect())
    }

    /// Inserts a batch in one statement (so one transaction): rows already
    /// present (a redelivery: the same order id) are skipped, and only newly
    /// inserted rows add to the inventory's `sold`, whose CHECK refuses an
    /// oversell. Another order with a persisted one's buyer, product and
    /// sequence (Redis lost the buyer's entry) is refused, not skipped: a
    /// skipped row would be confirmed in Redis without being persisted.
    pub async fn persist_batch(
        &self,
        sale: &SaleId,
        rows: &[OrderRow],
    ) -> Result<BatchOutcome, StoreError> {
        if rows.is_empty() {
            return Ok(BatchOutcome::default());
        }
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "WITH input AS (
                    SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[],
                                         $6::int[], $7::text[], $8::bigint[], $9::text[])
                        AS t(order_id, sku, user_id, seq, quantity, unit_price, accepted_ms, stream_id)
                 ), inserted AS (
                    INSERT INTO flashsale_orders
                        (order_id, sale, sku, user_id, seq, quantity, unit_price, accepted_at, stream_id)
                    SELECT order_id, $1, sku, user_id, seq, quantity, unit_price::numeric,
                           to_timestamp(accepted_ms / 1000.0), stream_id
                    FROM input
                    ON CONFLICT (order_id) DO NOTHING
                    RETURNING sku, quantity
                 ), per_sku AS (
                    SELECT sku, sum(quantity)::bigint AS units, count(*)::bigint AS n
                    FROM inserted GROUP BY sku
                 ), updated AS (
                    UPDATE flashsale_inventory i SET sold = i.sold + p.units
                    FROM per_sku p WHERE i.sale = $1 AND i.sku = p.sku
                    RETURNING p.n
                 )
                 SELECT n FROM updated",
            )
            .await?;
        let col = |f: fn(&OrderRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let ids = col(|r| &r.order_id);
        let skus = col(|r| &r.sku);
        let users = col(|r| &r.user_id);
        let prices = col(|r| &r.unit_price);
        let streams = col(|r| &r.stream_id);
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let qtys: Vec<i32> = rows.iter().map(|r| r.quantity).collect();
        let ats: Vec<i64> = rows.iter().map(|r| r.accepted_at_ms).collect();
        let result = client
            .query(
                &stmt,
                &[
                    &sale.key(),
                    &ids,
                    &skus,
                    &users,
                    &seqs,
                    &qtys,
                    &prices,
                    &ats,
                    &streams,
                ],
            )
            .await?;
        let mut out = BatchOutcome::default();
        for row in result {
            let n: i64 = row.get(0);
            out.inserted += u64::try_from(n).unwrap_or(0);
        }
        Ok(out)
    }

    /// Per product of the sale with orders in PostgreSQL: how many, and the
    /// units they hold (cancelled ones hold none).
    pub async fn order_tallies(&self, sale: &SaleId) -> Result<Vec<OrderTally>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT sku, count(*),
                        coalesce(sum(quantity) FILTER (WHERE status <> 'cancelled'), 0)::bigint
                 FROM flashsale_orders WHERE sale = $1 GROUP BY sku ORDER BY sku",
                &[&sale.key()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| OrderTally {
                sku: r.get(0),
                orders: r.get(1),
                units: r.get(2),
            })
            .collect())
    }

    /// One product's persisted orders, by buyer and sequence (a restore
    /// rebuilds Redis' buyer entries and order records from them).
    pub async fn product_orders(
        &self,
        sale: &SaleId,
        sku: &str,
    ) -> Result<Vec<StoredOrder>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT order_id, user_id, seq, quantity, unit_price::text, status,
                        (extract(epoch FROM accepted_at) * 1000)::bigint
                 FROM flashsale_orders WHERE sale = $1 AND sku = $2
                 ORDER BY user_id, seq",
                &[&sale.key(), &sku],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StoredOrder {
                order_id: r.get(0),
                user_id: r.get(1),
                seq: r.get(2),
                quantity: r.get(3),
                unit_price: r.get(4),
                status: r.get(5),
                accepted_at_ms: r.get(6),
            })
            .collect())
    }

    /// Ids among `ids` that have a row (for audits).
    pub async fn existing_order_ids(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT order_id FROM flashsale_orders WHERE order_id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_of_the_rows_counts_against_an_order() {
        for refusal in ["23514", "23505", "22001", "22003"] {
            assert!(refuses_the_data(&SqlState::from_code(refusal)), "{refusal}");
        }
        // The database's state: read-only after a switchover, a revoked
        // privilege, a lost connection, shutdown, serialization, deadlock.
        for state in [
            "25006", "42501", "08006", "57P01", "53300", "40001", "40P01", "XX000",
        ] {
            assert!(!refuses_the_data(&SqlState::from_code(state)), "{state}");
        }
    }
}
