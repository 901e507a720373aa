//! Connections to the sales' Redis servers, one multiplexed connection per
//! URL, reused across reconciles (sales usually share one Redis).

use std::collections::HashMap;
use std::time::Duration;

use dataplane::keys::{CONSUMER_GROUP, ProductKeys, SaleKeys};
use dataplane::spec::SaleId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamInfoGroupsReply;
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
/// acknowledged by the consumers), over every SKU the spec or Redis knows.
pub async fn unpersisted<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    skus: &[String],
) -> Result<u64, redis::RedisError> {
    let warmed: Option<String> = redis::cmd("HGET")
        .arg(SaleKeys::new(sale).meta())
        .arg("skus")
        .query_async(conn)
        .await?;
    let mut all: Vec<String> = skus.to_vec();
    for s in warmed.iter().flat_map(|w| w.split(',')) {
        if !s.is_empty() && !all.iter().any(|k| k == s) {
            all.push(s.to_string());
        }
    }
    let mut total = 0u64;
    for sku in &all {
        let stream = ProductKeys::new(sale, sku).stream();
        let len: u64 = redis::cmd("XLEN").arg(&stream).query_async(conn).await?;
        if len == 0 {
            continue;
        }
        let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(conn)
            .await?;
        let backlog = match groups.groups.iter().find(|g| g.name == CONSUMER_GROUP) {
            // `lag` is unknown after deletions inside the stream: count every entry then.
            Some(g) => g.pending as u64 + g.lag.map_or(len, |l| l as u64),
            None => len,
        };
        total += backlog;
    }
    Ok(total)
}
