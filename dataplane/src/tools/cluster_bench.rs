//! `flashsale bench redis-modes`: the accept path on one Redis server vs a
//! Redis Cluster, `redis.durability: local` vs `replica` (group commit, and
//! one WAIT per purchase for comparison), and decisions per second of a
//! three-product sale on one master vs three. Side by side in one run,
//! interleaved per round so the machine's noise hits every variant alike.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::durability::Durability;
use crate::gateway::{Gateway, GatewaySettings};
use crate::keys::ProductKeys;
use crate::redis_conn::{ConnSettings, RedisConn, RedisMode, RedisTarget};
use crate::spec::SaleDocument;
use crate::tools::bench::{BenchError, LoadFigures, crowd_config, doc, median, median_f};
use crate::tools::crowd::{self, Target};
use crate::tools::serve_on_loopback;
use crate::tools::servers::{RedisCluster, RedisServer};

/// One gateway variant: where Redis is and how durable an accept is.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Variant {
    pub mode: RedisMode,
    pub durability: Durability,
    /// Purchases one WAIT confirms at most (1: one WAIT per purchase).
    pub commit_batch: usize,
}

#[derive(Debug, Serialize)]
pub struct VariantFigures {
    pub variant: Variant,
    pub load: LoadFigures,
    /// Throughput over the standalone/local variant's, median of rounds.
    pub vs_standalone_local: f64,
}

#[derive(Debug, Serialize)]
pub struct ModesReport {
    pub connections: usize,
    pub variants: Vec<VariantFigures>,
    /// Purchase script calls per second for three products, pipelined
    /// straight to Redis (no gateway): one master, then three.
    pub decisions_one_master: f64,
    pub decisions_three_masters: f64,
    pub three_vs_one_master: f64,
}

struct Rig {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

const SECRET: &[u8] = b"bench-secret";

async fn gateway_on(
    target: &RedisTarget,
    doc: &SaleDocument,
    variant: Variant,
) -> Result<Rig, BenchError> {
    let mut settings = GatewaySettings::new(target.url(), SECRET.to_vec());
    settings.redis_mode = Some(target.mode);
    settings.durability = Some(variant.durability);
    settings.commit_batch = variant.commit_batch;
    settings.pod = format!(
        "bench-{}-{}-{}",
        variant.mode, variant.durability, variant.commit_batch
    );
    let gw = Gateway::new(doc, &settings)?;
    let shutdown = CancellationToken::new();
    let (addr, _) = serve_on_loopback(gw, &shutdown).await?;
    Ok(Rig { addr, shutdown })
}

async fn connect(target: &RedisTarget) -> Result<RedisConn, BenchError> {
    target
        .connect(&ConnSettings::default())
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))
}

/// Runs every variant `rounds` times, interleaved, then the decision rate
/// of a three-product sale on one master and on three.
pub async fn redis_modes(
    requests: u64,
    connections: usize,
    rounds: usize,
) -> Result<ModesReport, BenchError> {
    let server = RedisServer::start()?;
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))??;
    let standalone = RedisTarget::standalone(server.url());
    let clustered = RedisTarget {
        mode: RedisMode::Cluster,
        urls: cluster.seed_urls(),
    };
    let variants = [
        Variant {
            mode: RedisMode::Standalone,
            durability: Durability::Local,
            commit_batch: 1,
        },
        Variant {
            mode: RedisMode::Cluster,
            durability: Durability::Local,
            commit_batch: 1,
        },
        Variant {
            mode: RedisMode::Cluster,
            durability: Durability::Replica,
            commit_batch: crate::gateway::commit::DEFAULT_MAX_BATCH,
        },
        Variant {
            mode: RedisMode::Cluster,
            durability: Durability::Replica,
            commit_batch: 1,
        },
    ];
    let doc = doc("modes", &[("item", 100_000_000)])?;
    for target in [&standalone, &clustered] {
        crate::warm::warm_sale(&mut connect(target).await?, &doc.id(), &doc.spec).await?;
    }
    let mut rigs = Vec::new();
    for v in variants {
        let target = match v.mode {
            RedisMode::Standalone => &standalone,
            RedisMode::Cluster => &clustered,
        };
        let rig = gateway_on(target, &doc, v).await?;
        // Unmeasured: connections, script cache, allocator.
        crowd::run(crowd_config(
            rig.addr,
            "modes",
            "item",
            Target::Purchase,
            requests / 10,
            connections,
            None,
        ))
        .await?;
        rigs.push(rig);
    }
    let mut runs: Vec<Vec<LoadFigures>> = vec![Vec::new(); rigs.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); rigs.len()];
    for _ in 0..rounds.max(1) {
        let mut this_round = Vec::new();
        for rig in &rigs {
            let config = crowd_config(
                rig.addr,
                "modes",
                "item",
                Target::Purchase,
                requests,
                connections,
                None,
            );
            this_round.push(LoadFigures::from(&crowd::run(config).await?));
        }
        let base = this_round[0].throughput_rps.max(1e-9);
        for (i, f) in this_round.into_iter().enumerate() {
            ratios[i].push(f.throughput_rps / base);
            runs[i].push(f);
        }
    }
    for rig in &rigs {
        rig.shutdown.cancel();
    }
    let variants = variants
        .into_iter()
        .zip(runs.into_iter().zip(ratios))
        .map(|(variant, (loads, ratios))| VariantFigures {
            variant,
            load: median(loads),
            vs_standalone_local: median_f(&ratios),
        })
        .collect();

    let three = doc_three(&cluster)?;
    let mut one = Vec::new();
    let mut many = Vec::new();
    for target in [&standalone, &clustered] {
        crate::warm::warm_sale(&mut connect(target).await?, &three.id(), &three.spec).await?;
    }
    for _ in 0..rounds.max(1) {
        one.push(decisions(&standalone, &three, Duration::from_secs(3)).await?);
        many.push(decisions(&clustered, &three, Duration::from_secs(3)).await?);
    }
    let (one, many) = (median_f(&one), median_f(&many));
    drop(cluster);
    drop(server);
    Ok(ModesReport {
        connections,
        variants,
        decisions_one_master: one,
        decisions_three_masters: many,
        three_vs_one_master: many / one.max(1e-9),
    })
}

/// A three-product sale whose products sit on three different masters.
fn doc_three(cluster: &RedisCluster) -> Result<SaleDocument, BenchError> {
    let probe = doc("three", &[("probe", 1)])?;
    let mut picked: Vec<(String, u16)> = Vec::new();
    for i in 0..500 {
        let sku = format!("p-{i}");
        let port = cluster
            .master_of(&ProductKeys::new(&probe.id(), &sku).stock())?
            .port;
        if picked.iter().all(|(_, p)| *p != port) {
            picked.push((sku, port));
        }
        if picked.len() == 3 {
            break;
        }
    }
    if picked.len() < 3 {
        return Err(BenchError::Setup("no three SKUs on three masters".into()));
    }
    let products: Vec<(&str, i64)> = picked
        .iter()
        .map(|(s, _)| (s.as_str(), 1_000_000_000))
        .collect();
    doc("three", &products)
}

/// Purchase script calls per second for `seconds`: per product, four
/// connections each sending pipelines of 32 purchases (each a new buyer).
async fn decisions(
    target: &RedisTarget,
    sale: &SaleDocument,
    seconds: Duration,
) -> Result<f64, BenchError> {
    const PER_PRODUCT: usize = 4;
    const DEPTH: usize = 32;
    // On every node (SCRIPT LOAD goes to all of a cluster's nodes).
    crate::scripts::PURCHASE
        .load_async(&mut connect(target).await?)
        .await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in &sale.spec.products {
        let keys = ProductKeys::new(&sale.id(), &p.sku).purchase_keys();
        for c in 0..PER_PRODUCT {
            let mut conn = connect(target).await?;
            let keys = keys.clone();
            let sku = p.sku.clone();
            tasks.push(tokio::spawn(async move {
                let mut calls = 0u64;
                let mut n = 0u64;
                while started.elapsed() < seconds {
                    let mut pipe = redis::pipe();
                    for _ in 0..DEPTH {
                        n += 1;
                        let user = format!("u{c}-{n}");
                        let order = crate::order::new_order_id(&sku);
                        pipe.add_command(
                            crate::scripts::Purchase::new_buyer(&keys, &user, &order)
                                .invocation()
                                .into_cmd(),
                        );
                    }
                    let _: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
                    calls += DEPTH as u64;
                }
                Ok::<u64, redis::RedisError>(calls)
            }));
        }
    }
    let mut calls = 0u64;
    for t in tasks {
        calls += t.await.map_err(|e| BenchError::Setup(e.to_string()))??;
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}
