//! Connections to the sales' Redis servers (standalone or cluster), one per
//! URL and mode, reused across reconciles (sales usually share one Redis).

use std::collections::HashMap;

use dataplane::lag;
use dataplane::redis_conn::{ConnSettings, RedisConn, RedisTarget};
use dataplane::spec::{SaleId, SaleSpec};
use tokio::sync::Mutex;

use crate::resource::RedisSpec;

#[derive(Default)]
pub struct RedisConnections {
    by_target: Mutex<HashMap<(String, dataplane::redis_conn::RedisMode), RedisConn>>,
}

impl RedisConnections {
    /// A connection to `target`, opened on first use. Short timeouts (the
    /// defaults of `ConnSettings`): a reconcile reports an unreachable Redis
    /// as a condition instead of hanging.
    pub async fn get(&self, target: &RedisTarget) -> Result<RedisConn, redis::RedisError> {
        let key = (target.url(), target.mode);
        let mut by_target = self.by_target.lock().await;
        if let Some(conn) = by_target.get(&key) {
            return Ok(conn.clone());
        }
        let conn = target.connect(&ConnSettings::default()).await?;
        by_target.insert(key, conn.clone());
        Ok(conn)
    }

    /// The connection for a sale's Redis spec and the URL its Secret holds.
    pub async fn for_sale(
        &self,
        spec: &RedisSpec,
        url: &str,
    ) -> Result<RedisConn, redis::RedisError> {
        self.get(&spec.target(url)?).await
    }
}

/// Accepted orders still waiting in the sale's streams (not yet persisted and
/// acknowledged by the consumers), over every SKU the spec or Redis knows: the
/// backlog the autoscaler scales consumers on.
pub async fn unpersisted<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<u64, redis::RedisError> {
    Ok(lag::consumer_lag(conn, sale, spec).await?.backlog())
}
