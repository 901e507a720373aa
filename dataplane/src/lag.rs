//! Consumer lag: how many accepted orders wait in a sale's product streams for
//! the `persist` group. The autoscaler scales consumers on it and the
//! operator's finalizer waits for it to reach zero.
//!
//! Per stream, the exact figure is `XINFO GROUPS` `lag` (Redis ≥ 7: entries not
//! yet delivered to the group) plus the group's pending entries (delivered,
//! not acknowledged). `lag` is null once XDEL/XTRIM removed entries the group
//! has not read past, and absent before Redis 7; then the figure falls back to
//! the stream length and the pending count, as KEDA's redis-streams scaler does.

use std::collections::HashMap;
use std::fmt;

use redis::Value;
use redis::aio::ConnectionLike;

use crate::keys::{CONSUMER_GROUP, ProductKeys};
use crate::spec::{SaleId, SaleSpec};

/// Where an undelivered count came from, from most to least exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LagSource {
    /// `XINFO GROUPS` `lag`: exact.
    GroupLag,
    /// No `persist` group yet (no consumer has started): every entry waits, `XLEN` is exact.
    NoGroup,
    /// `lag` unknown: `XLEN − pending`, an upper bound, since acknowledged entries
    /// stay in the stream; exactly 0 when nothing follows the group's last delivered id.
    Fallback(FallbackCause),
}

/// Why `lag` could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FallbackCause {
    /// Redis reported `lag` as null: entries were deleted (XDEL/XTRIM) after the group's position.
    LagNull,
    /// Redis does not report `lag` at all (before 7.0).
    NoLagField,
}

impl LagSource {
    pub fn is_exact(self) -> bool {
        !matches!(self, LagSource::Fallback(_))
    }
}

impl fmt::Display for LagSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LagSource::GroupLag => "group lag",
            LagSource::NoGroup => "stream length (no consumer group yet)",
            LagSource::Fallback(FallbackCause::LagNull) => {
                "stream length and pending (lag null after deletions)"
            }
            LagSource::Fallback(FallbackCause::NoLagField) => {
                "stream length and pending (Redis without lag)"
            }
        })
    }
}

/// One product stream's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLag {
    pub sku: String,
    /// `XLEN`: entries in the stream, acknowledged ones included.
    pub length: u64,
    /// Entries not yet delivered to the group.
    pub undelivered: u64,
    /// Entries delivered to a consumer and not yet acknowledged.
    pub pending: u64,
    pub source: LagSource,
}

/// The sale's figures over every product stream that exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagReading {
    pub undelivered: u64,
    pub pending: u64,
    /// The least exact source any stream needed ([`LagSource::GroupLag`] when there is no stream).
    pub source: LagSource,
    pub streams: Vec<StreamLag>,
}

impl LagReading {
    /// Accepted orders not yet persisted: undelivered plus pending.
    pub fn backlog(&self) -> u64 {
        self.undelivered.saturating_add(self.pending)
    }
}

/// Reads the lag of the sale's streams: the spec's products plus any product
/// Redis was warmed with earlier (a product removed from the spec mid-sale
/// still has orders to persist).
pub async fn consumer_lag<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<LagReading, redis::RedisError> {
    let skus = crate::warm::warmed_skus(conn, sale, spec).await?;
    let mut reading = LagReading {
        undelivered: 0,
        pending: 0,
        source: LagSource::GroupLag,
        streams: Vec::new(),
    };
    for sku in &skus {
        let Some(stream) = stream_lag(conn, sale, sku).await? else {
            continue;
        };
        reading.undelivered = reading.undelivered.saturating_add(stream.undelivered);
        reading.pending = reading.pending.saturating_add(stream.pending);
        reading.source = reading.source.max(stream.source);
        reading.streams.push(stream);
    }
    Ok(reading)
}

/// One stream's figures; `None` when the stream does not exist (no order yet).
async fn stream_lag<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    sku: &str,
) -> Result<Option<StreamLag>, redis::RedisError> {
    let key = ProductKeys::new(sale, sku).stream();
    let (exists, length): (bool, u64) = redis::pipe()
        .cmd("EXISTS")
        .arg(&key)
        .cmd("XLEN")
        .arg(&key)
        .query_async(conn)
        .await?;
    if !exists {
        return Ok(None);
    }
    // Maps rather than redis-rs's typed reply, which cannot tell a null `lag` from an absent one.
    let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&key)
        .query_async(conn)
        .await?;
    let group = groups.iter().find(|g| {
        g.get("name")
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .is_some_and(|name| name == CONSUMER_GROUP)
    });
    let Some(group) = group else {
        return Ok(Some(StreamLag {
            sku: sku.to_string(),
            length,
            undelivered: length,
            pending: 0,
            source: LagSource::NoGroup,
        }));
    };
    let pending = count_field(group, "pending").unwrap_or(0);
    let (undelivered, source) = match group.get("lag") {
        Some(Value::Nil) => (
            fallback_undelivered(conn, &key, group, length, pending).await?,
            LagSource::Fallback(FallbackCause::LagNull),
        ),
        None => (
            fallback_undelivered(conn, &key, group, length, pending).await?,
            LagSource::Fallback(FallbackCause::NoLagField),
        ),
        Some(_) => match count_field(group, "lag") {
            Some(lag) => (lag, LagSource::GroupLag),
            None => (
                fallback_undelivered(conn, &key, group, length, pending).await?,
                LagSource::Fallback(FallbackCause::LagNull),
            ),
        },
    };
    Ok(Some(StreamLag {
        sku: sku.to_string(),
        length,
        undelivered,
        pending,
        source,
    }))
}

/// Undelivered entries without `lag`: none if nothing follows the group's last
/// delivered id (one XRANGE of at most two entries), else the upper bound
/// `XLEN − pending` (acknowledged entries still in the stream count too).
async fn fallback_undelivered<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    group: &HashMap<String, Value>,
    length: u64,
    pending: u64,
) -> Result<u64, redis::RedisError> {
    let last = group
        .get("last-delivered-id")
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        .unwrap_or_else(|| "0-0".to_string());
    // Inclusive start and COUNT 2 instead of an exclusive `(id`, which Redis < 6.2 lacks.
    let after: Vec<(String, Value)> = redis::cmd("XRANGE")
        .arg(key)
        .arg(&last)
        .arg("+")
        .arg("COUNT")
        .arg(2)
        .query_async(conn)
        .await?;
    if after.iter().all(|(id, _)| *id == last) {
        return Ok(0);
    }
    Ok(length.saturating_sub(pending))
}

fn count_field(group: &HashMap<String, Value>, field: &str) -> Option<u64> {
    group
        .get(field)
        .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
}

#[cfg(test)]
mod tests {
    use redis::aio::ConnectionManager;

    use super::*;
    use crate::keys::SaleKeys;
    use crate::spec::SaleDocument;
    use crate::tools::servers::RedisServer;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn doc() -> Result<SaleDocument, Box<dyn std::error::Error + Send + Sync>> {
        let yaml = "metadata: { name: lagged, namespace: test }\nspec:\n  startTime: \"2030-01-01T00:00:00Z\"\n  endTime: \"2030-01-01T01:00:00Z\"\n  products:\n    - { sku: a, stock: 10, price: \"1.00\", perUserLimit: 1 }\n    - { sku: b, stock: 10, price: \"1.00\", perUserLimit: 1 }\n";
        Ok(SaleDocument::parse(yaml, "lag test sale")?)
    }

    async fn conn(redis: &RedisServer) -> redis::RedisResult<ConnectionManager> {
        redis::Client::open(redis.url())?
            .get_connection_manager()
            .await
    }

    async fn add(conn: &mut ConnectionManager, stream: &str, n: usize) -> redis::RedisResult<()> {
        for i in 0..n {
            let _: String = redis::cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("n")
                .arg(i)
                .query_async(conn)
                .await?;
        }
        Ok(())
    }

    async fn create_group(conn: &mut ConnectionManager, stream: &str) -> redis::RedisResult<()> {
        crate::consumer::join_group(conn, stream, true)
            .await
            .map(|_| ())
    }

    /// Delivers `n` entries to a consumer of the group and returns their ids.
    async fn deliver(
        conn: &mut ConnectionManager,
        stream: &str,
        n: usize,
    ) -> redis::RedisResult<Vec<String>> {
        let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(CONSUMER_GROUP)
            .arg("c1")
            .arg("COUNT")
            .arg(n)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(conn)
            .await?;
        Ok(read
            .keys
            .into_iter()
            .flat_map(|k| k.ids.into_iter().map(|e| e.id))
            .collect())
    }

    async fn ack(conn: &mut ConnectionManager, stream: &str, ids: &[String]) -> TestResult {
        let _: u64 = redis::cmd("XACK")
            .arg(stream)
            .arg(CONSUMER_GROUP)
            .arg(ids)
            .query_async(conn)
            .await?;
        Ok(())
    }

    #[tokio::test]
    async fn no_stream_means_no_lag() -> TestResult {
        let redis = RedisServer::start()?;
        let doc = doc()?;
        let reading = consumer_lag(&mut conn(&redis).await?, &doc.id(), &doc.spec).await?;
        assert_eq!(
            reading,
            LagReading {
                undelivered: 0,
                pending: 0,
                source: LagSource::GroupLag,
                streams: vec![],
            }
        );
        Ok(())
    }

    #[tokio::test]
    async fn group_lag_and_pending_are_summed_over_products() -> TestResult {
        let redis = RedisServer::start()?;
        let mut conn = conn(&redis).await?;
        let doc = doc()?;
        let id = doc.id();
        let a = ProductKeys::new(&id, "a").stream();
        let b = ProductKeys::new(&id, "b").stream();
        create_group(&mut conn, &a).await?;
        create_group(&mut conn, &b).await?;
        add(&mut conn, &a, 10).await?;
        add(&mut conn, &b, 4).await?;
        // a: 3 delivered of which 1 acknowledged → 7 undelivered, 2 pending.
        let ids = deliver(&mut conn, &a, 3).await?;
        ack(&mut conn, &a, &ids[..1]).await?;

        let reading = consumer_lag(&mut conn, &id, &doc.spec).await?;
        assert_eq!(reading.source, LagSource::GroupLag);
        assert_eq!((reading.undelivered, reading.pending), (7 + 4, 2));
        assert_eq!(reading.backlog(), 13);
        assert_eq!(
            reading.streams[0],
            StreamLag {
                sku: "a".into(),
                length: 10,
                undelivered: 7,
                pending: 2,
                source: LagSource::GroupLag,
            }
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_stream_without_group_counts_whole() -> TestResult {
        let redis = RedisServer::start()?;
        let mut conn = conn(&redis).await?;
        let doc = doc()?;
        add(&mut conn, &ProductKeys::new(&doc.id(), "b").stream(), 5).await?;
        let reading = consumer_lag(&mut conn, &doc.id(), &doc.spec).await?;
        assert_eq!(
            (reading.undelivered, reading.pending, reading.source),
            (5, 0, LagSource::NoGroup)
        );
        Ok(())
    }

    // XDEL of an entry the group has not read past makes Redis report `lag` as
    // null: the figure falls back to XLEN − pending, and to an exact 0 once the
    // group has read everything that is left.
    #[tokio::test]
    async fn deletion_makes_lag_null_and_falls_back() -> TestResult {
        let redis = RedisServer::start()?;
        let mut conn = conn(&redis).await?;
        let doc = doc()?;
        let id = doc.id();
        let a = ProductKeys::new(&id, "a").stream();
        create_group(&mut conn, &a).await?;
        add(&mut conn, &a, 6).await?;
        let delivered = deliver(&mut conn, &a, 2).await?;
        let all: Vec<(String, Value)> = redis::cmd("XRANGE")
            .arg(&a)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        let _: u64 = redis::cmd("XDEL")
            .arg(&a)
            .arg(&all[4].0)
            .query_async(&mut conn)
            .await?;

        let reading = consumer_lag(&mut conn, &id, &doc.spec).await?;
        let fallback = LagSource::Fallback(FallbackCause::LagNull);
        assert_eq!(reading.source, fallback, "{reading:?}");
        assert!(!reading.source.is_exact());
        // 5 entries left, 2 pending: at most 3 undelivered (exactly 3 here).
        assert_eq!((reading.undelivered, reading.pending), (3, 2));
        assert_eq!(reading.backlog(), 5);

        // The group reads the rest and acknowledges everything: nothing waits.
        let rest = deliver(&mut conn, &a, 10).await?;
        ack(&mut conn, &a, &delivered).await?;
        ack(&mut conn, &a, &rest).await?;
        let reading = consumer_lag(&mut conn, &id, &doc.spec).await?;
        assert_eq!(reading.backlog(), 0, "{reading:?}");
        Ok(())
    }

    #[tokio::test]
    async fn products_warmed_earlier_are_counted() -> TestResult {
        let redis = RedisServer::start()?;
        let mut conn = conn(&redis).await?;
        let doc = doc()?;
        let id = doc.id();
        let _: () = redis::cmd("HSET")
            .arg(SaleKeys::new(&id).meta())
            .arg("skus")
            .arg("a,b,gone")
            .query_async(&mut conn)
            .await?;
        let gone = ProductKeys::new(&id, "gone").stream();
        create_group(&mut conn, &gone).await?;
        add(&mut conn, &gone, 2).await?;
        let reading = consumer_lag(&mut conn, &id, &doc.spec).await?;
        assert_eq!(reading.backlog(), 2);
        assert_eq!(reading.streams.len(), 1);
        assert_eq!(reading.streams[0].sku, "gone");
        Ok(())
    }
}
