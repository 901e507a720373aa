//! Connections to the sales' Redis servers, one multiplexed connection per
//! URL, reused across reconciles (sales usually share one Redis).

use std::collections::HashMap;
use std::time::Duration;

use dataplane::lag;
use dataplane::spec::{SaleId, SaleSpec};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

#[derive(Default)]
pub struct RedisConnections {
    by_url: Mutex<HashMap<String, ConnectionManager>>,
}

impl RedisConnections {
    /// A connection to `url`, opened on first use. Short timeouts: a
    /// reconcile reports an unreachable Redis as a condition instead of hanging.
    pub async fn get(&self, url: &str) -> Result<ConnectionManager, redis::RedisError> {
        let mut by_url = self.by_url.lock().await;
        if let Some(conn) = by_url.get(url) {
            return Ok(conn.clone());
        }
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        by_url.insert(url.to_string(), conn.clone());
        Ok(conn)
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
