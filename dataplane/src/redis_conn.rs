//! One connection type for a standalone Redis and a Redis Cluster.
//!
//! [`RedisTarget`] is what `REDIS_URL` and `REDIS_MODE` (`--redis-mode`)
//! name: one URL, or comma-separated seed node URLs of a cluster.
//! [`RedisConn`] is cheap to clone and implements
//! [`redis::aio::ConnectionLike`], so scripts, commands and pipelines run on
//! it as on a `ConnectionManager`. In cluster mode redis-rs's async cluster
//! connection routes each command by its key's slot, follows MOVED/ASK,
//! refreshes the slot map when a node fails (a replica's promotion is picked
//! up without a restart) and splits multi-key DEL/EXISTS/MGET per slot. A
//! pipeline must stay within one slot (every key sharing one hash tag, as
//! `keys.rs` lays them out); one that does not fails with CROSSSLOT.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the data plane reaches Redis.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "camelCase")]
pub enum RedisMode {
    /// One Redis server (with or without replicas the client never sees).
    #[default]
    Standalone,
    /// A Redis Cluster: the URL lists seed nodes; keys are routed by slot.
    Cluster,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Cluster => "cluster",
        }
    }
}

impl fmt::Display for RedisMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RedisMode {
    type Err = RedisConnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "standalone" => Ok(Self::Standalone),
            "cluster" => Ok(Self::Cluster),
            other => Err(RedisConnError::Mode(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisConnError {
    #[error("redis mode {0:?}: expected standalone or cluster")]
    Mode(String),
    #[error("redis url is empty")]
    Empty,
    #[error(
        "redis url lists {0} servers; standalone mode takes one (set REDIS_MODE=cluster for seed nodes)"
    )]
    SeveralStandalone(usize),
    #[error("redis url {url:?}: {source}")]
    Url {
        url: String,
        source: redis::RedisError,
    },
    #[error("connect to redis at {url:?}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
}

/// For callers that report every Redis problem as a `redis::RedisError`.
impl From<RedisConnError> for redis::RedisError {
    fn from(e: RedisConnError) -> Self {
        match e {
            RedisConnError::Url { source, .. } | RedisConnError::Connect { source, .. } => source,
            other => redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "redis url",
                other.to_string(),
            )),
        }
    }
}

/// Where Redis is: the mode and its URL(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisTarget {
    pub mode: RedisMode,
    /// The server's URL, or the cluster's seed nodes.
    pub urls: Vec<String>,
}

impl RedisTarget {
    /// Parses `url` (one URL, or comma-separated seed URLs). Without an
    /// explicit mode, several URLs mean a cluster.
    pub fn parse(url: &str, mode: Option<RedisMode>) -> Result<Self, RedisConnError> {
        let urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if urls.is_empty() {
            return Err(RedisConnError::Empty);
        }
        let mode = mode.unwrap_or(if urls.len() > 1 {
            RedisMode::Cluster
        } else {
            RedisMode::Standalone
        });
        if mode == RedisMode::Standalone && urls.len() > 1 {
            return Err(RedisConnError::SeveralStandalone(urls.len()));
        }
        for u in &urls {
            redis::Client::open(u.as_str()).map_err(|source| RedisConnError::Url {
                url: u.clone(),
                source,
            })?;
        }
        Ok(Self { mode, urls })
    }

    pub fn standalone(url: impl Into<String>) -> Self {
        Self {
            mode: RedisMode::Standalone,
            urls: vec![url.into()],
        }
    }

    /// The URL(s) as `REDIS_URL` takes them.
    pub fn url(&self) -> String {
        self.urls.join(",")
    }

    /// A connection that connects on first use, so a process starts (and its
    /// callers fail fast) while Redis is still down.
    pub fn connect_lazy(&self, settings: &ConnSettings) -> Result<RedisConn, RedisConnError> {
        match self.mode {
            RedisMode::Standalone => {
                let client = self.client()?;
                ConnectionManager::new_lazy_with_config(client, settings.manager_config())
                    .map(RedisConn::Standalone)
                    .map_err(|source| self.connect_error(source))
            }
            RedisMode::Cluster => Ok(RedisConn::Cluster(
                self.cluster_client(settings)?
                    .get_pending_async_connection_with_config(settings.cluster_config()),
            )),
        }
    }

    /// A connection, checked now: fails if no server (seed) answers.
    pub async fn connect(&self, settings: &ConnSettings) -> Result<RedisConn, RedisConnError> {
        match self.mode {
            RedisMode::Standalone => {
                let client = self.client()?;
                ConnectionManager::new_with_config(client, settings.manager_config())
                    .await
                    .map(RedisConn::Standalone)
                    .map_err(|source| self.connect_error(source))
            }
            RedisMode::Cluster => self
                .cluster_client(settings)?
                .get_async_connection_with_config(settings.cluster_config())
                .await
                .map(RedisConn::Cluster)
                .map_err(|source| self.connect_error(source)),
        }
    }

    /// The URL a Pub/Sub subscriber should try on its `attempt`th connect:
    /// in a cluster every node delivers every PUBLISH, so a subscriber whose
    /// node died moves on to the next seed.
    pub fn pubsub_url(&self, attempt: usize) -> &str {
        &self.urls[attempt % self.urls.len()]
    }

    fn client(&self) -> Result<redis::Client, RedisConnError> {
        let url = &self.urls[0];
        redis::Client::open(url.as_str()).map_err(|source| RedisConnError::Url {
            url: url.clone(),
            source,
        })
    }

    fn cluster_client(
        &self,
        settings: &ConnSettings,
    ) -> Result<redis::cluster::ClusterClient, RedisConnError> {
        ClusterClientBuilder::new(self.urls.iter().map(String::as_str))
            .connection_timeout(settings.connection_timeout)
            .response_timeout(settings.response_timeout)
            .retries(settings.retries)
            .min_retry_wait(10)
            .max_retry_wait(
                settings
                    .max_delay
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX),
            )
            .build()
            .map_err(|source| RedisConnError::Url {
                url: self.url(),
                source,
            })
    }

    fn connect_error(&self, source: redis::RedisError) -> RedisConnError {
        RedisConnError::Connect {
            url: self.url(),
            source,
        }
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.url(), self.mode)
    }
}

/// Timeouts and retries of one connection, the same in both modes.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    pub connection_timeout: Duration,
    /// Longest wait for one reply from one server.
    pub response_timeout: Duration,
    /// Reconnects (standalone) or re-routed attempts (cluster) per request.
    pub retries: u32,
    /// Longest back-off between those attempts.
    pub max_delay: Duration,
}

impl Default for ConnSettings {
    fn default() -> Self {
        Self {
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            retries: 2,
            max_delay: Duration::from_secs(2),
        }
    }
}

impl ConnSettings {
    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(self.retries.try_into().unwrap_or(usize::MAX))
            .set_max_delay(self.max_delay)
    }

    fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig::new()
            .set_connection_timeout(self.connection_timeout)
            .set_response_timeout(self.response_timeout)
    }
}

/// A connection to a standalone Redis or to a Redis Cluster; clones share
/// the underlying multiplexed connection(s).
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn mode(&self) -> RedisMode {
        match self {
            Self::Standalone(_) => RedisMode::Standalone,
            Self::Cluster(_) => RedisMode::Cluster,
        }
    }

    /// `PING`: answered by the server, or in a cluster by any master. (A
    /// plain `PING` goes to every master of a cluster and fails while one is
    /// down; a process whose other products still sell is not unready.)
    pub async fn ping(&mut self) -> redis::RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            Self::Standalone(c) => ping.exec_async(c).await,
            Self::Cluster(c) => {
                let any_master = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::OneSucceeded),
                ));
                c.route_command(ping, any_master).await.map(drop)
            }
        }
    }

    /// This connection, with every command and pipeline sent to the master
    /// serving `key`'s slot, keyless ones (`WAIT`) included:
    /// `redis::cmd("WAIT").arg(1).arg(100).query_async(&mut conn.on_master_of(key))`.
    /// In cluster mode that is the multiplexed connection to that master the
    /// slot's scripts go over, so a `WAIT` sent after a script counts the
    /// script's writes; standalone it is the one connection. If the slot
    /// moved in between (a failover), the command follows it to the new master.
    pub fn on_master_of<'a>(&'a mut self, key: &'a str) -> OnMasterOf<'a> {
        OnMasterOf { conn: self, key }
    }
}

/// See [`RedisConn::on_master_of`].
pub struct OnMasterOf<'a> {
    conn: &'a mut RedisConn,
    key: &'a str,
}

impl ConnectionLike for OnMasterOf<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut *self.conn {
            RedisConn::Cluster(c) => {
                Box::pin(c.route_command(cmd.clone(), RoutingInfo::SingleNode(master_of(self.key))))
            }
            standalone => standalone.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut *self.conn {
            RedisConn::Cluster(c) => {
                Box::pin(c.route_pipeline(pipeline.clone(), offset, count, master_of(self.key)))
            }
            standalone => standalone.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

fn master_of(key: &str) -> SingleNodeRoutingInfo {
    SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_urls_mean_a_cluster_unless_told_otherwise() -> Result<(), RedisConnError> {
        let one = RedisTarget::parse("redis://127.0.0.1:7000/", None)?;
        assert_eq!(one.mode, RedisMode::Standalone);
        let seeds = RedisTarget::parse("redis://a:7000/, redis://b:7001/", None)?;
        assert_eq!(seeds.mode, RedisMode::Cluster);
        assert_eq!(seeds.url(), "redis://a:7000/,redis://b:7001/");
        let one_seed = RedisTarget::parse("redis://a:7000/", Some(RedisMode::Cluster))?;
        assert_eq!(one_seed.mode, RedisMode::Cluster);
        assert!(matches!(
            RedisTarget::parse("redis://a/,redis://b/", Some(RedisMode::Standalone)),
            Err(RedisConnError::SeveralStandalone(2))
        ));
        assert!(matches!(
            RedisTarget::parse(" , ", None),
            Err(RedisConnError::Empty)
        ));
        assert!(matches!(
            "sentinel".parse::<RedisMode>(),
            Err(RedisConnError::Mode(_))
        ));
        Ok(())
    }

    /// A cluster connection keeps working across a master's crash: requests
    /// for the dead master's slot fail (bounded by the caller's timeout)
    /// until its replica is promoted, then succeed on the same connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_connection_follows_a_failover() -> anyhow::Result<()> {
        use crate::tools::servers::RedisCluster;
        let mut cluster = tokio::task::spawn_blocking(RedisCluster::start).await??;
        let target = RedisTarget::parse(&cluster.url(), None)?;
        let settings = ConnSettings {
            response_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_millis(500),
            ..ConnSettings::default()
        };
        let mut conn = target.connect(&settings).await?;
        let key = "{fs/test/sku}:stock";
        redis::cmd("SET")
            .arg(key)
            .arg(10)
            .exec_async(&mut conn)
            .await?;
        // WAIT on the slot's master, on the connection the write went over:
        // its replica acknowledges.
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(2000)
            .query_async(&mut conn.on_master_of(key))
            .await?;
        assert_eq!(acked, 1);

        let killed = cluster.kill_master_of(key)?;
        // Another master still answers: the process is not unready.
        tokio::time::timeout(Duration::from_secs(2), conn.ping()).await??;
        let promoted = tokio::task::spawn_blocking(move || killed.wait_promoted(20)).await??;
        let mut value = None;
        for _ in 0..100 {
            let cmd = redis::cmd("GET").arg(key).clone();
            let get = cmd.query_async::<i64>(&mut conn);
            if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_millis(500), get).await {
                value = Some(v);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(value, Some(10), "promoted {promoted:?}");
        Ok(())
    }
}
