//! Connections to the sales' Redis servers (standalone or cluster), one per
//! URL and mode, reused across reconciles (sales usually share one Redis).

use std::collections::HashMap;
use std::sync::Arc;

use dataplane::lag;
use dataplane::redis_conn::{ConnSettings, RedisConn, RedisTarget};
use dataplane::spec::{SaleId, SaleSpec};
use tokio::sync::{Mutex, OnceCell};

use crate::resource::RedisSpec;

type Key = (String, dataplane::redis_conn::RedisMode);

#[derive(Default)]
pub struct RedisConnections {
    /// One cell per target, filled by its first successful connect. The map's
    /// lock is held only to find the cell, never while connecting: a Redis
    /// out of reach (an ended sale's, say) kept every other sale's reconcile
    /// and scaling waiting out its connect timeout behind that lock.
    by_target: Mutex<HashMap<Key, Arc<OnceCell<RedisConn>>>>,
}

impl RedisConnections {
    /// A connection to `target`, opened on first use. Short timeouts (the
    /// defaults of `ConnSettings`): a reconcile reports an unreachable Redis
    /// as a condition instead of hanging.
    pub async fn get(&self, target: &RedisTarget) -> Result<RedisConn, redis::RedisError> {
        let cell = {
            let mut by_target = self.by_target.lock().await;
            Arc::clone(by_target.entry((target.url(), target.mode)).or_default())
        };
        let conn = cell
            .get_or_try_init(|| async { target.connect(&ConnSettings::default()).await })
            .await?;
        Ok(conn.clone())
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use dataplane::redis_conn::RedisTarget;
    use dataplane::tools::servers::RedisServer;

    use super::RedisConnections;

    /// A Redis that takes the connection and never answers (its listener
    /// never accepts) is connecting for its whole timeout; a sale on another
    /// Redis gets its connection meanwhile.
    #[tokio::test]
    async fn a_silent_redis_holds_back_no_other_redis() -> anyhow::Result<()> {
        let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
        let silent_url = format!("redis://{}", silent.local_addr()?);
        let server = RedisServer::start()?;
        let conns = Arc::new(RedisConnections::default());
        let stuck = {
            let conns = Arc::clone(&conns);
            tokio::spawn(async move { conns.get(&RedisTarget::standalone(silent_url)).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        conns.get(&RedisTarget::standalone(server.url())).await?;
        assert!(!stuck.is_finished(), "the silent Redis is still connecting");
        assert!(stuck.await?.is_err(), "and fails at its timeout");
        Ok(())
    }
}
