//! Replica-acknowledged writes: what `redis.durability: replica` means on the
//! wire.
//!
//! Redis replicates asynchronously, so a failover loses the writes the old
//! master acknowledged but had not yet sent on. Under `replica` a write that
//! carries a promise (a 202, a row persisted, a release applied) is followed
//! by `WAIT 1 <ms>` **in the same pipeline**: WAIT counts the replication
//! offset of the *connection* it runs on, so it must travel behind the write
//! on one TCP connection (a WAIT on a fresh connection, after a reconnect,
//! confirms nothing). From Redis 7.2 a connection's offset moves only when a
//! command on it propagates something, so a pipeline that confirms data other
//! connections wrote (stream entries the consumer read, a replay snapshot)
//! writes the product's `wait` mark first ([`mark_and_wait`]): the mark's
//! offset is after everything the master held when it ran.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How far a write must have travelled before the data plane relies on it.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The master alone: answered as soon as the script ran. A failover can
    /// lose the last acknowledged purchases (asynchronous replication).
    #[default]
    Local,
    /// At least one replica holds the write (WAIT 1) before it is relied on:
    /// a 202 survives a failover. Costs a replication round trip per batch.
    Replica,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Replica => "replica",
        }
    }

    /// Without an explicit choice: `replica` on a Redis Cluster (it has
    /// replicas, and failover is routine there), `local` on a standalone
    /// server (whose replicas, if any, the data plane does not see).
    pub fn default_for(mode: crate::redis_conn::RedisMode) -> Self {
        match mode {
            crate::redis_conn::RedisMode::Cluster => Self::Replica,
            crate::redis_conn::RedisMode::Standalone => Self::Local,
        }
    }

    /// `Some(settings)` when writes must be confirmed by a replica.
    pub fn wait(self, timeout: Duration) -> Option<ReplicaWait> {
        match self {
            Self::Local => None,
            Self::Replica => Some(ReplicaWait { timeout }),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a WAIT was issued (the `path` label of the WAIT metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPath {
    /// A batch of purchases (group commit).
    Purchase,
    /// A sold-out product's replay snapshot.
    Replay,
    /// Stream entries before they are persisted.
    ConsumerRead,
    /// Confirmations and acknowledgements of a persisted batch.
    ConsumerConfirm,
    /// Releases of cancelled orders (payment timeout outbox).
    SweeperRelease,
}

impl WaitPath {
    pub const ALL: [&'static str; 5] = [
        "purchase",
        "replay",
        "consumer_read",
        "consumer_confirm",
        "sweeper_release",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "purchase",
            Self::Replay => "replay",
            Self::ConsumerRead => "consumer_read",
            Self::ConsumerConfirm => "consumer_confirm",
            Self::SweeperRelease => "sweeper_release",
        }
    }
}

/// Outcome labels of `flashsale_redis_replica_wait_total`.
pub const OUTCOMES: [&str; 3] = ["confirmed", "pending", "error"];

/// Replica acknowledgement settings: how long one WAIT may block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaWait {
    pub timeout: Duration,
}

impl ReplicaWait {
    fn timeout_ms(self) -> u64 {
        u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Appends `WAIT 1 <timeout>`; its reply is the pipeline's last value.
    pub fn append(self, pipe: &mut redis::Pipeline) {
        pipe.cmd("WAIT").arg(1).arg(self.timeout_ms());
    }

    /// Appends a write of `mark` (a key in the slot of the data to confirm),
    /// then WAIT: the WAIT then covers everything the master held when the
    /// mark was written, whoever wrote it.
    pub fn mark_and_wait(self, pipe: &mut redis::Pipeline, mark: &str) {
        pipe.cmd("SET").arg(mark).arg(1).ignore();
        self.append(pipe);
    }
}

/// Whether a WAIT reply says a replica holds the writes before it; records
/// the outcome and how long the pipeline carrying it took.
pub fn confirmed(path: WaitPath, reply: &redis::RedisResult<redis::Value>, since: Instant) -> bool {
    let outcome = match reply {
        Ok(redis::Value::Int(n)) if *n >= 1 => "confirmed",
        Ok(_) => "pending",
        Err(_) => "error",
    };
    metrics::counter!("flashsale_redis_replica_wait_total", "path" => path.as_str(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("flashsale_redis_replica_wait_seconds", "path" => path.as_str())
        .record(since.elapsed().as_secs_f64());
    if outcome != "confirmed" {
        tracing::debug!(
            path = path.as_str(),
            ?reply,
            "no replica confirmed the writes in time"
        );
    }
    outcome == "confirmed"
}

/// Splits a pipeline's replies (run with `ignore_errors`) into the replies
/// of the commands before the trailing WAIT and whether it confirmed.
pub fn split_wait(
    path: WaitPath,
    mut replies: Vec<redis::RedisResult<redis::Value>>,
    since: Instant,
) -> (Vec<redis::RedisResult<redis::Value>>, bool) {
    let wait = replies.pop().unwrap_or_else(|| Ok(redis::Value::Nil));
    let ok = confirmed(path, &wait, since);
    (replies, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_reads_and_prints_lowercase() {
        let d: Durability = serde_json::from_str("\"replica\"").unwrap_or_default();
        assert_eq!(d, Durability::Replica);
        assert_eq!(Durability::Local.to_string(), "local");
        assert!(Durability::Local.wait(Duration::from_millis(5)).is_none());
        assert_eq!(
            Durability::Replica.wait(Duration::from_millis(5)),
            Some(ReplicaWait {
                timeout: Duration::from_millis(5)
            })
        );
    }

    #[test]
    fn wait_reply_counts_only_an_acknowledging_replica() {
        let t = Instant::now();
        assert!(confirmed(WaitPath::Purchase, &Ok(redis::Value::Int(1)), t));
        assert!(!confirmed(WaitPath::Purchase, &Ok(redis::Value::Int(0)), t));
        let err = redis::RedisError::from((redis::ErrorKind::Io, "gone"));
        assert!(!confirmed(WaitPath::Purchase, &Err(err), t));
        let (rest, ok) = split_wait(
            WaitPath::Purchase,
            vec![Ok(redis::Value::Okay), Ok(redis::Value::Int(1))],
            t,
        );
        assert!(ok && rest.len() == 1);
    }
}
