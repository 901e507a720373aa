//! Live settings: the sale's applied spec, published in Redis, which running
//! gateways and consumers follow within about a second — no pod restart for a
//! new end time, rate limit, per-user limit, price or stock.
//!
//! The spec a pod boots with (its ConfigMap) is only the starting point: once
//! the sale is warmed, the published spec wins. Products are structural (a
//! product's stream, keys and order rows need a process that knows them), so
//! adding or removing one rolls the pods; see docs/architecture.md.

use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::keys::SaleKeys;
use crate::scripts;
use crate::spec::{SaleId, SaleSpec};

/// How often a pod looks for a new spec: one HGET per pod per tick.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the published spec of {sale} is not valid JSON: {source}")]
    Decode {
        sale: String,
        source: serde_json::Error,
    },
    #[error("encode the spec: {0}")]
    Encode(serde_json::Error),
}

/// The applied spec and its version (bumped on every change).
#[derive(Clone, Debug, PartialEq)]
pub struct LiveSpec {
    pub version: i64,
    pub spec: SaleSpec,
}

/// Publishes `spec` as the sale's applied spec; returns whether it changed
/// and the version now in force.
pub async fn publish<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
    spec: &SaleSpec,
) -> Result<(bool, i64), LiveError> {
    let json = serde_json::to_string(spec).map_err(LiveError::Encode)?;
    let (changed, version): (i64, i64) = scripts::PUBLISH_SPEC
        .key(SaleKeys::new(sale).meta())
        .arg(json)
        .invoke_async(conn)
        .await?;
    Ok((changed == 1, version))
}

/// The applied spec, or `None` before the sale was first published.
pub async fn read<C: ConnectionLike + Send>(
    conn: &mut C,
    sale: &SaleId,
) -> Result<Option<LiveSpec>, LiveError> {
    let (json, version): (Option<String>, Option<i64>) = redis::cmd("HMGET")
        .arg(SaleKeys::new(sale).meta())
        .arg("spec")
        .arg("spec_version")
        .query_async(conn)
        .await?;
    let Some(json) = json else {
        return Ok(None);
    };
    let spec = serde_json::from_str(&json).map_err(|source| LiveError::Decode {
        sale: sale.to_string(),
        source,
    })?;
    Ok(Some(LiveSpec {
        version: version.unwrap_or(0),
        spec,
    }))
}

/// Follows one sale's published spec: `poll` answers a new spec only when
/// its version moved, so an unchanged sale costs one HGET per tick.
pub struct Follower {
    sale: SaleId,
    meta: String,
    seen: Option<i64>,
}

impl Follower {
    pub fn new(sale: &SaleId) -> Self {
        Self {
            sale: sale.clone(),
            meta: SaleKeys::new(sale).meta(),
            seen: None,
        }
    }

    pub async fn poll<C: ConnectionLike + Send>(
        &mut self,
        conn: &mut C,
    ) -> Result<Option<LiveSpec>, LiveError> {
        let version: Option<i64> = redis::cmd("HGET")
            .arg(&self.meta)
            .arg("spec_version")
            .query_async(conn)
            .await?;
        if version.is_none() || version == self.seen {
            return Ok(None);
        }
        let live = read(conn, &self.sale).await?;
        if let Some(l) = &live {
            self.seen = Some(l.version);
        }
        Ok(live)
    }
}

/// Polls the sale's published spec every `FOLLOW_INTERVAL` until `shutdown`
/// and hands each new version to `apply` (the first poll answers the spec in
/// force, so a pod booted from an older ConfigMap catches up at once).
pub async fn follow<C, F>(
    mut conn: C,
    sale: SaleId,
    shutdown: tokio_util::sync::CancellationToken,
    mut apply: F,
) where
    C: ConnectionLike + Send,
    F: FnMut(&LiveSpec) + Send,
{
    let mut follower = Follower::new(&sale);
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match follower.poll(&mut conn).await {
            Ok(Some(live)) => {
                tracing::info!(sale = %sale, version = live.version, "live settings applied");
                metrics::gauge!("flashsale_spec_version").set(live.version as f64);
                apply(&live);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "live settings not read; trying again"),
        }
    }
}

/// SKUs of `next` this process cannot serve because it booted without them
/// (a product added mid-sale needs new pods; the operator rolls them).
pub fn unknown_products<'a>(known: &[String], next: &'a SaleSpec) -> Vec<&'a str> {
    next.products
        .iter()
        .map(|p| p.sku.as_str())
        .filter(|s| !known.iter().any(|k| k == s))
        .collect()
}
