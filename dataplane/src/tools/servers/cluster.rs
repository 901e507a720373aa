//! A Redis Cluster of 3 masters and 3 replicas on loopback, for tests and
//! `flashsale local --redis-cluster`: six `redis-server --cluster-enabled yes`
//! children joined by `redis-cli --cluster create … --cluster-replicas 1`.
//!
//! The blocking waits ([`RedisCluster::start`], [`KilledMaster::wait_promoted`])
//! poll with short sleeps; from async code run them on `spawn_blocking`.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{RedisOptions, RedisServer, ServerError, find_on_path};

/// Options for [`RedisCluster::start_with`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// AOF on every node, as [`RedisOptions::append_only`].
    pub append_only: bool,
    /// `cluster-node-timeout`: how long a master may be unreachable before
    /// its replica takes over. Short here so failover tests stay short.
    pub node_timeout_ms: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            append_only: false,
            node_timeout_ms: 1000,
        }
    }
}

const MASTERS: usize = 3;
const REPLICAS_PER_MASTER: usize = 1;
const READY_SECS: u64 = 30;

/// One node as `CLUSTER NODES` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The master's id, for a replica.
    pub replica_of: Option<String>,
    /// Flagged `fail` or `fail?` by the node asked.
    pub failing: bool,
    /// Inclusive slot ranges served, for a master.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        node_url(self.port)
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot))
    }
}

fn node_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}/")
}

/// Six cluster-enabled `redis-server` children; all are killed on drop and
/// their logs printed if the thread is panicking.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(options: ClusterOptions) -> Result<Self, ServerError> {
        let redis_cli = find_on_path("redis-cli").ok_or(ServerError::Missing {
            binary: "redis-cli",
            extra: "",
            hint: "apt-get install -y redis-tools",
        })?;
        let node_options = RedisOptions {
            append_only: options.append_only,
            cluster_node_timeout_ms: Some(options.node_timeout_ms),
        };
        let nodes = (0..MASTERS * (1 + REPLICAS_PER_MASTER))
            .map(|_| RedisServer::start_with(node_options.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster = Self { nodes };
        let out = Command::new(redis_cli)
            .args(["--cluster", "create"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port())),
            )
            .args(["--cluster-replicas", &REPLICAS_PER_MASTER.to_string()])
            .arg("--cluster-yes")
            .output()
            .map_err(super::io("run redis-cli --cluster create"))?;
        if !out.status.success() {
            return Err(ServerError::Failed {
                what: "redis-cli --cluster create".into(),
                log: format!(
                    "{}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    cluster.logs()
                ),
            });
        }
        cluster.wait_until(READY_SECS, "redis cluster", |c| c.is_healthy())?;
        Ok(cluster)
    }

    /// Every node's URL: what a cluster client is seeded with.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// The seed URLs joined by commas: the form `REDIS_URL` takes in cluster mode.
    pub fn url(&self) -> String {
        self.seed_urls().join(",")
    }

    /// The topology as a live node sees it now.
    pub fn nodes(&self) -> Result<Vec<ClusterNode>, ServerError> {
        let mut last = None;
        for port in self.live_ports() {
            match cluster_nodes(port) {
                Ok(nodes) => return Ok(nodes),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ServerError::Failed {
            what: "read CLUSTER NODES".into(),
            log: "no node of the cluster is running".into(),
        }))
    }

    /// The slot `key` hashes to (its `{hash tag}` if it has one), as the
    /// cluster computes it (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> Result<u16, ServerError> {
        let port = self
            .live_ports()
            .first()
            .copied()
            .ok_or(ServerError::Failed {
                what: format!("CLUSTER KEYSLOT {key}"),
                log: "no node of the cluster is running".into(),
            })?;
        query(
            port,
            &format!("CLUSTER KEYSLOT {key}"),
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key),
        )
    }

    /// The master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> Result<ClusterNode, ServerError> {
        let slot = self.slot_of(key)?;
        self.nodes()?
            .into_iter()
            .find(|n| n.master && !n.failing && n.serves(slot))
            .ok_or_else(|| ServerError::Failed {
                what: format!("find the master of slot {slot}"),
                log: self.logs(),
            })
    }

    /// SIGKILLs the master serving `key`'s slot, as a crash would. Wait for
    /// its replica to take over with [`KilledMaster::wait_promoted`].
    pub fn kill_master_of(&mut self, key: &str) -> Result<KilledMaster, ServerError> {
        let master = self.master_of(key)?;
        let slot = self.slot_of(key)?;
        let Some(server) = self.nodes.iter_mut().find(|n| n.port() == master.port) else {
            return Err(ServerError::Failed {
                what: format!("find the process of node 127.0.0.1:{}", master.port),
                log: String::new(),
            });
        };
        server.kill();
        Ok(KilledMaster {
            killed: master,
            slot,
            live_ports: self.live_ports(),
        })
    }

    /// SIGSTOPs the replica of the master serving `key`'s slot: the master
    /// stays up, but no replica acknowledges its writes (`WAIT` returns 0).
    /// Returns the replica's port, for [`Self::resume`].
    pub fn pause_replica_of(&mut self, key: &str) -> Result<u16, ServerError> {
        let master = self.master_of(key)?;
        let replica = self
            .nodes()?
            .into_iter()
            .find(|n| n.replica_of.as_deref() == Some(master.id.as_str()))
            .map(|n| n.port);
        let Some(port) = replica else {
            return Err(ServerError::Failed {
                what: format!("find the replica of node 127.0.0.1:{}", master.port),
                log: self.logs(),
            });
        };
        self.pause(port)
    }

    /// SIGSTOPs the master serving `key`'s slot: its clients' calls hang
    /// until they time out (and, after `cluster-node-timeout`, its replica
    /// takes over). Returns its port, for [`Self::resume`].
    pub fn pause_master_of(&mut self, key: &str) -> Result<u16, ServerError> {
        let port = self.master_of(key)?.port;
        self.pause(port)
    }

    fn pause(&mut self, port: u16) -> Result<u16, ServerError> {
        let Some(server) = self.nodes.iter_mut().find(|n| n.port() == port) else {
            return Err(ServerError::Failed {
                what: format!("pause node 127.0.0.1:{port}"),
                log: "no such node in this cluster".into(),
            });
        };
        server.pause();
        Ok(port)
    }

    /// SIGCONT after [`Self::pause_replica_of`] or [`Self::pause_master_of`].
    pub fn resume(&mut self, port: u16) {
        if let Some(server) = self.nodes.iter_mut().find(|n| n.port() == port) {
            server.resume();
        }
    }

    /// Starts a killed node again on its port and data dir; it rejoins the
    /// cluster (as a replica of whoever took its slots over).
    pub fn restart(&mut self, port: u16) -> Result<(), ServerError> {
        let Some(server) = self.nodes.iter_mut().find(|n| n.port() == port) else {
            return Err(ServerError::Failed {
                what: format!("restart node 127.0.0.1:{port}"),
                log: "no such node in this cluster".into(),
            });
        };
        server.restart()?;
        self.wait_until(READY_SECS, "redis cluster after a restart", |c| {
            c.is_healthy()
        })
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.port())
            .collect()
    }

    /// Every running node says `cluster_state:ok` and knows every other,
    /// every slot is served, and every replica's link to its master is up.
    fn is_healthy(&self) -> bool {
        let ports = self.live_ports();
        ports.iter().all(|&port| {
            let Ok(info) = query_info(port, "CLUSTER", &["INFO"]) else {
                return false;
            };
            let ok = info.contains("cluster_state:ok")
                && info.contains("cluster_slots_ok:16384")
                && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()));
            ok && match query_info(port, "INFO", &["replication"]) {
                Ok(repl) => repl.contains("role:master") || repl.contains("master_link_status:up"),
                Err(_) => false,
            }
        }) && ports.len() >= MASTERS
    }

    fn wait_until(
        &self,
        secs: u64,
        what: &'static str,
        ready: impl Fn(&Self) -> bool,
    ) -> Result<(), ServerError> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !ready(self) {
            if Instant::now() > deadline {
                return Err(ServerError::NotReady {
                    what,
                    secs,
                    log: self.logs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The tail of every node's log.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- redis node 127.0.0.1:{} ---\n{}", n.port(), n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A master killed by [`RedisCluster::kill_master_of`]; owns what waiting for
/// its replica needs, so the wait can run on another thread.
#[derive(Clone, Debug)]
pub struct KilledMaster {
    pub killed: ClusterNode,
    /// The slot of the key it was killed for.
    pub slot: u16,
    live_ports: Vec<u16>,
}

impl KilledMaster {
    /// Blocks until another node serves the slot as master and every live
    /// node says `cluster_state:ok`; returns the new master.
    pub fn wait_promoted(&self, secs: u64) -> Result<ClusterNode, ServerError> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(master) = self.promoted() {
                return Ok(master);
            }
            if Instant::now() > deadline {
                return Err(ServerError::Failed {
                    what: format!(
                        "failover of slot {} away from 127.0.0.1:{} within {secs} s",
                        self.slot, self.killed.port
                    ),
                    log: self
                        .live_ports
                        .first()
                        .and_then(|&p| query_info(p, "CLUSTER", &["NODES"]).ok())
                        .unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn promoted(&self) -> Option<ClusterNode> {
        let all_ok = self.live_ports.iter().all(|&p| {
            query_info(p, "CLUSTER", &["INFO"]).is_ok_and(|i| i.contains("cluster_state:ok"))
        });
        if !all_ok {
            return None;
        }
        let port = *self.live_ports.first()?;
        cluster_nodes(port)
            .ok()?
            .into_iter()
            .find(|n| n.master && !n.failing && n.port != self.killed.port && n.serves(self.slot))
    }
}

fn query_info(port: u16, command: &str, args: &[&str]) -> Result<String, ServerError> {
    let what = format!("{command} {}", args.join(" "));
    query(port, &what, redis::cmd(command).arg(args))
}

fn query<T: redis::FromRedisValue>(
    port: u16,
    what: &str,
    cmd: &redis::Cmd,
) -> Result<T, ServerError> {
    let what = || format!("{what} on 127.0.0.1:{port}");
    let client = redis::Client::open(node_url(port)).map_err(|e| ServerError::Failed {
        what: what(),
        log: e.to_string(),
    })?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .map_err(|e| ServerError::Failed {
            what: what(),
            log: e.to_string(),
        })?;
    cmd.query::<T>(&mut conn).map_err(|e| ServerError::Failed {
        what: what(),
        log: e.to_string(),
    })
}

fn cluster_nodes(port: u16) -> Result<Vec<ClusterNode>, ServerError> {
    let text = query_info(port, "CLUSTER", &["NODES"])?;
    Ok(text.lines().filter_map(parse_node).collect())
}

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot>…`.
fn parse_node(line: &str) -> Option<ClusterNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [id, addr, flags, master, _, _, _, _, slots @ ..] = fields.as_slice() else {
        return None;
    };
    let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
    let flags: Vec<&str> = flags.split(',').collect();
    let slots = slots
        .iter()
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
            None => s.parse().ok().map(|one| (one, one)),
        })
        .collect();
    Some(ClusterNode {
        id: (*id).to_string(),
        port,
        master: flags.contains(&"master"),
        replica_of: (*master != "-").then(|| (*master).to_string()),
        failing: flags.iter().any(|f| *f == "fail" || *f == "fail?"),
        slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes_lines() {
        let master =
            parse_node("07c3 127.0.0.1:30004@40004 myself,master - 0 0 1 connected 0-5460 5500");
        assert_eq!(
            master.map(|n| (n.port, n.master, n.slots)),
            Some((30004, true, vec![(0, 5460), (5500, 5500)]))
        );
        let replica = parse_node("e7d1 127.0.0.1:30002@40002 slave,fail 07c3 0 0 1 disconnected");
        assert_eq!(
            replica.map(|n| (n.master, n.replica_of, n.failing)),
            Some((false, Some("07c3".to_string()), true))
        );
    }

    #[test]
    fn three_masters_with_a_replica_each_and_a_failover() -> Result<(), ServerError> {
        let mut cluster = RedisCluster::start()?;
        let nodes = cluster.nodes()?;
        let masters: Vec<&ClusterNode> = nodes.iter().filter(|n| n.master).collect();
        assert_eq!(masters.len(), 3, "{nodes:?}");
        for master in &masters {
            let replicas = nodes
                .iter()
                .filter(|n| n.replica_of.as_deref() == Some(master.id.as_str()))
                .count();
            assert_eq!(replicas, 1, "{nodes:?}");
        }
        let key = "{fs/sale/sku-1}:stock";
        let before = cluster.master_of(key)?;
        let killed = cluster.kill_master_of(key)?;
        assert_eq!(killed.killed, before);
        let after = killed.wait_promoted(20)?;
        assert_ne!(after.port, before.port);
        assert_eq!(cluster.master_of(key)?.port, after.port);
        cluster.restart(before.port)?;
        Ok(())
    }
}
