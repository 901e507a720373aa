//! `flashsale local`: a whole flash sale on one machine, no cluster — Redis
//! and PostgreSQL as child processes (unless URLs are given), the sale warmed
//! from the same YAML the operator reads, gateway and consumers in this
//! process, a simulated crowd, then the audit and a report.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Consumer, ConsumerSettings};
use crate::gateway::{self, Gateway, GatewaySettings};
use crate::redis_conn::{ConnSettings, RedisMode, RedisTarget};
use crate::spec::SaleDocument;
use crate::store::OrderStore;
use crate::tools::audit::{AuditReport, audit, wait_drained};
use crate::tools::crowd::{self, CrowdConfig, CrowdResult, Target};
use crate::tools::serve_on_loopback;
use crate::tools::servers::{
    ClusterOptions, PostgresServer, RedisCluster, RedisOptions, RedisServer,
};

#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub sale_file: PathBuf,
    pub redis_url: Option<String>,
    /// How to read `redis_url` (default: a cluster if it lists several URLs).
    pub redis_mode: Option<RedisMode>,
    /// Without `redis_url`: start a 3-master, 3-replica Redis Cluster
    /// instead of one Redis server.
    pub redis_cluster: bool,
    /// Default: `replica` on a cluster, `local` on one server.
    pub redis_durability: Option<crate::durability::Durability>,
    pub database_url: Option<String>,
    pub users: u32,
    pub connections: usize,
    pub requests: u64,
    pub retry_fraction: f64,
    pub consumers: usize,
    /// The sale opens this long after everything is up.
    pub lead: Duration,
    /// How long the sale stays open (the YAML's own window is moved to now).
    pub sale_length: Duration,
}

/// The report `flashsale local` prints (and writes as JSON with `--json`).
#[derive(Debug, Serialize)]
pub struct LocalReport {
    pub sale: String,
    pub stock: i64,
    pub accepted: u64,
    pub persisted: i64,
    pub sold_out_rejections: u64,
    pub limit_rejections: u64,
    pub rate_limited: u64,
    pub not_started: u64,
    pub ended: u64,
    /// Purchase tickets fetched (a sale with `purchaseTicket.enabled`).
    pub tickets_fetched: u64,
    /// Purchases refused for their ticket: the crowd fetches a valid one
    /// before each buy, so any is a problem.
    pub ticket_refused: u64,
    pub errors: u64,
    pub duplicates_found: u64,
    pub idempotent_replays: u64,
    /// Retries of a winning request told to try later (e.g. rate limited).
    pub unanswered_retries: u64,
    pub oversold: i64,
    pub lost_orders: u64,
    pub failed_orders: u64,
    pub users_over_limit: u64,
    pub consistent: bool,
    pub drained: bool,
    pub requests: u64,
    pub throughput_rps: f64,
    pub latency_ms: Latency,
    pub elapsed_s: f64,
    pub drain_s: f64,
    pub products: Vec<crate::tools::audit::ProductAudit>,
    pub passed: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error(transparent)]
    Server(#[from] crate::tools::servers::ServerError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    RedisTarget(#[from] crate::redis_conn::RedisConnError),
    #[error("warming: {0}")]
    Warm(#[from] crate::warm::WarmError),
    #[error("gateway: {0}")]
    Gateway(#[from] gateway::GatewayError),
    #[error("consumer: {0}")]
    Consumer(#[from] crate::consumer::ConsumerError),
    #[error("crowd: {0}")]
    Crowd(#[from] crowd::CrowdError),
    #[error("audit: {0}")]
    Audit(#[from] crate::tools::audit::AuditError),
    #[error("order store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("warming the sale: {0}")]
    Apply(#[from] crate::stock::ApplyError),
    #[error("the sale window moved to now is invalid: {0}")]
    Window(String),
}

/// Runs the sale and returns its report.
pub async fn run(opts: LocalOptions) -> Result<LocalReport, LocalError> {
    let mut doc = SaleDocument::load(&opts.sale_file)?;
    // Keep the file's products and limits; move its window to now.
    let start = jiff::Timestamp::now()
        .checked_add(
            jiff::SignedDuration::try_from(opts.lead)
                .map_err(|e| LocalError::Window(e.to_string()))?,
        )
        .map_err(|e| LocalError::Window(e.to_string()))?;
    doc.spec.start_time = start;
    doc.spec.end_time = start
        .checked_add(
            jiff::SignedDuration::try_from(opts.sale_length)
                .map_err(|e| LocalError::Window(e.to_string()))?,
        )
        .map_err(|e| LocalError::Window(e.to_string()))?;
    let sale = doc.id();

    // Kept until the run ends: dropping them stops the servers.
    let (_redis_server, _redis_cluster, redis) = match &opts.redis_url {
        Some(u) => (None, None, RedisTarget::parse(u, opts.redis_mode)?),
        None if opts.redis_cluster => {
            eprintln!("starting a Redis Cluster (3 masters, 3 replicas, AOF on) ...");
            let c = RedisCluster::start_with(ClusterOptions {
                append_only: true,
                ..ClusterOptions::default()
            })?;
            let target = RedisTarget::parse(&c.url(), Some(RedisMode::Cluster))?;
            (None, Some(c), target)
        }
        None => {
            eprintln!("starting redis-server (AOF on) ...");
            let s = RedisServer::start_with(RedisOptions {
                append_only: true,
                ..Default::default()
            })?;
            let target = RedisTarget::standalone(s.url());
            (Some(s), None, target)
        }
    };
    let redis_url = redis.url();
    let (_pg_server, database_url) = match &opts.database_url {
        Some(u) => (None, u.clone()),
        None => {
            eprintln!("starting a throwaway PostgreSQL ...");
            let s = PostgresServer::start()?;
            let u = s.url();
            (Some(s), u)
        }
    };
    let mut conn = redis.connect(&ConnSettings::default()).await?;
    // A local run is a fresh sale: clear what an earlier run left under the same name.
    let skus: Vec<String> = doc.spec.products.iter().map(|p| p.sku.clone()).collect();
    crate::warm::clear_sale(&mut conn, &sale, &skus).await?;
    let store = OrderStore::connect(&database_url, 4)?;
    store.migrate().await?;
    clear_orders(&store, &sale).await?;
    let warmed =
        crate::stock::apply(&mut conn, &store, &sale, &doc.spec, jiff::Timestamp::now()).await?;
    eprintln!(
        "warmed {} products into PostgreSQL and Redis for sale {sale}",
        warmed.products.len()
    );

    let secret: Vec<u8> = b"local-sale-secret".to_vec();
    let shutdown = CancellationToken::new();
    let mut gateway_settings = GatewaySettings::new(&redis_url, secret.clone());
    gateway_settings.redis_mode = Some(redis.mode);
    gateway_settings.durability = opts.redis_durability;
    let gw = Gateway::new(&doc, &gateway_settings)?;
    let (gw_addr, gateway_task) = serve_on_loopback(gw, &shutdown).await?;

    let mut consumer_tasks = Vec::new();
    for i in 0..opts.consumers.max(1) {
        let mut settings = ConsumerSettings::new(&redis_url, &database_url);
        settings.redis_mode = Some(redis.mode);
        settings.durability = opts.redis_durability;
        settings.name = format!("local-consumer-{i}");
        if let Some(c) = Consumer::start(&doc, settings, &shutdown).await? {
            consumer_tasks.push(tokio::spawn(c.run(shutdown.clone())));
        }
    }

    let wait = start.duration_since(jiff::Timestamp::now());
    if let Ok(w) = Duration::try_from(wait) {
        eprintln!(
            "gateway on http://{gw_addr}; the sale opens in {:.1} s",
            w.as_secs_f64()
        );
        tokio::time::sleep(w).await;
    }
    eprintln!(
        "crowd: {} requests from {} users on {} connections ...",
        opts.requests, opts.users, opts.connections
    );
    let result = crowd::run(CrowdConfig {
        gateways: vec![gw_addr],
        sale: sale.name.clone(),
        skus,
        buyers: crowd::Buyers::Random(opts.users),
        connections: opts.connections,
        requests: opts.requests,
        max_duration: opts.sale_length,
        retry_fraction: opts.retry_fraction,
        rate: None,
        token_secret: secret,
        target: Target::purchase_for(&doc.spec),
        source_ips: 32,
    })
    .await?;
    let drain_started = std::time::Instant::now();
    let drained =
        wait_drained(&mut conn, &store, &sale, &doc.spec, Duration::from_secs(60)).await?;
    let drain_s = drain_started.elapsed().as_secs_f64();
    let report = audit(
        &mut conn,
        &store,
        &sale,
        &doc.spec,
        &result.orders,
        result.idempotency_violations,
    )
    .await?;
    shutdown.cancel();
    let _ = gateway_task.await;
    for t in consumer_tasks {
        let _ = t.await;
    }
    Ok(build_report(&doc, &result, &report, drained, drain_s))
}

async fn clear_orders(store: &OrderStore, sale: &crate::spec::SaleId) -> Result<(), LocalError> {
    let client = store
        .pool()
        .get()
        .await
        .map_err(crate::store::StoreError::from)?;
    client
        .execute(
            "DELETE FROM flashsale_orders WHERE sale = $1",
            &[&sale.key()],
        )
        .await
        .map_err(crate::store::StoreError::from)?;
    client
        .execute(
            "DELETE FROM flashsale_inventory WHERE sale = $1",
            &[&sale.key()],
        )
        .await
        .map_err(crate::store::StoreError::from)?;
    Ok(())
}

fn build_report(
    doc: &SaleDocument,
    r: &CrowdResult,
    a: &AuditReport,
    drained: bool,
    drain_s: f64,
) -> LocalReport {
    let mut problems = a.problems();
    if !drained {
        problems.push("orders still in flight after 60 s".into());
    }
    if r.ticket_refused > 0 {
        problems.push(format!(
            "{} purchases refused for their freshly fetched ticket",
            r.ticket_refused
        ));
    }
    LocalReport {
        sale: doc.id().to_string(),
        stock: doc.spec.products.iter().map(|p| p.stock).sum(),
        accepted: r.accepted,
        persisted: a.products.iter().map(|p| p.orders).sum(),
        sold_out_rejections: r.sold_out,
        limit_rejections: r.limit_reached,
        rate_limited: r.rate_limited,
        not_started: r.not_started,
        ended: r.ended,
        tickets_fetched: r.tickets_fetched,
        ticket_refused: r.ticket_refused,
        errors: r.server_errors + r.transport_errors + r.other_client_errors,
        duplicates_found: a.duplicates_found,
        idempotent_replays: r.idempotent_replays,
        unanswered_retries: r.unanswered_retries,
        oversold: a.oversold(),
        lost_orders: a.lost_orders.len() as u64,
        failed_orders: a.failed_orders,
        users_over_limit: a.users_over_limit.len() as u64,
        consistent: a.products.iter().all(|p| p.consistent && p.counters_agree),
        drained,
        requests: r.sent + r.retries,
        throughput_rps: r.throughput_rps(),
        latency_ms: Latency {
            p50: r.latency_ms(0.5),
            p90: r.latency_ms(0.9),
            p99: r.latency_ms(0.99),
            p999: r.latency_ms(0.999),
            max: r.latency_ms(1.0),
        },
        elapsed_s: r.elapsed_s,
        drain_s,
        passed: a.passed() && drained && r.ticket_refused == 0,
        problems,
        products: a.products.clone(),
    }
}

impl LocalReport {
    /// The human report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        s += &format!("flashsale local sale {} — {verdict}\n\n", self.sale);
        s += &format!(
            "  requests        {:>9}   in {:.2} s = {:.0} req/s\n",
            self.requests, self.elapsed_s, self.throughput_rps
        );
        s += &format!(
            "  latency ms      p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.p999,
            self.latency_ms.max
        );
        s += &format!(
            "  accepted (202)  {:>9}   idempotent replays {}\n",
            self.accepted, self.idempotent_replays
        );
        s += &format!(
            "  refused         sold out {}, limit {}, rate-limited {}, not started {}, ended {}\n",
            self.sold_out_rejections,
            self.limit_rejections,
            self.rate_limited,
            self.not_started,
            self.ended
        );
        if self.tickets_fetched > 0 || self.ticket_refused > 0 {
            s += &format!(
                "  tickets         {:>9}   fetched; purchases refused for their ticket {}\n",
                self.tickets_fetched, self.ticket_refused
            );
        }
        s += &format!("  errors          {:>9}\n", self.errors);
        s += &format!(
            "  persisted       {:>9}   drained in {:.2} s after the crowd\n\n",
            self.persisted, self.drain_s
        );
        s += "  product           stock  remaining  orders  units  oversold\n";
        for p in &self.products {
            s += &format!(
                "  {:<15} {:>7} {:>10} {:>7} {:>6} {:>9}\n",
                p.sku, p.stock, p.remaining, p.orders, p.units, p.oversold
            );
        }
        s += &format!(
            "\n  promises: oversold {} | lost orders {} | users over limit {} | duplicates {} | Redis and PostgreSQL agree: {}\n",
            self.oversold,
            self.lost_orders,
            self.users_over_limit,
            self.duplicates_found,
            if self.consistent { "yes" } else { "NO" }
        );
        for p in &self.problems {
            s += &format!("  PROBLEM: {p}\n");
        }
        s
    }
}
