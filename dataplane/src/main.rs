//! `flashsale`: the data plane's one binary — gateway and consumer for pods,
//! and the tools around them (local sale, crowd, audit, tokens, OpenAPI).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use dataplane::consumer::{Consumer, ConsumerSettings};
use dataplane::durability::Durability;
use dataplane::gateway::{self, Gateway, GatewaySettings};
use dataplane::redis_conn::{ConnSettings, RedisConn, RedisMode, RedisTarget};
use dataplane::spec::SaleDocument;
use dataplane::tools::crowd::{CrowdConfig, Target};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "flashsale",
    version,
    about = "flashsale data plane: gateway, consumer and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole flash sale locally (Redis and PostgreSQL started as child
    /// processes unless REDIS_URL / DATABASE_URL are set) and print the report.
    Local(LocalArgs),
    /// Serve the public purchase API (pods run this).
    Gateway(GatewayArgs),
    /// Persist accepted orders from Redis streams into PostgreSQL (pods run this).
    Consumer(ConsumerArgs),
    /// Send a crowd of buyers at running gateways, then optionally audit.
    Crowd(CrowdArgs),
    /// Check a sale's books in Redis and PostgreSQL.
    Audit(AuditArgs),
    /// Write a sale's catalog and stock into Redis (idempotent).
    Warm(WarmArgs),
    /// Print a user token signed with TOKEN_SECRET, as the shop's login would issue.
    Token(TokenArgs),
    /// Print the public API's OpenAPI document.
    Openapi,
    /// Print a signed payment callback as a curl command, as the payment
    /// provider would send it (signed with PAYMENT_PRIVATE_KEY).
    SignCallback(SignCallbackArgs),
    /// Print a user's order events from a gateway's WebSocket (`/v1/ws`), one
    /// JSON line each, as the shop's app would receive them.
    Watch(WatchArgs),
    /// Print a fresh Ed25519 key pair for payment callbacks (base64), as
    /// `export PAYMENT_PRIVATE_KEY=…` and `export PAYMENT_PUBLIC_KEY=…` lines.
    PaymentKeygen,
    /// Start a throwaway Redis (AOF on) and PostgreSQL, print their URLs as an
    /// `export` line, and keep them until this process gets Ctrl-C or SIGTERM
    /// (for the README tour and manual testing).
    Servers(ServersArgs),
    /// Measure side by side on this machine and print figures (and JSON).
    Bench(BenchArgs),
}

#[derive(Args)]
struct ServersArgs {
    /// A Redis Cluster (3 masters, 3 replicas) instead of one Redis server;
    /// the export line then sets REDIS_MODE=cluster too.
    #[arg(long)]
    redis_cluster: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// `accept` (purchase vs trivial endpoint vs redis-benchmark EVALSHA -P 16
    /// of the purchase script and of an empty one; Redis memory per order),
    /// `tickets` (purchases without vs with purchase tickets, switched live
    /// on one gateway, and the script without vs with a ticket key),
    /// `sold-out` (sold-out answers vs trivial endpoint), `read-path` (the
    /// sale page vs trivial GET; Redis commands/s during read storms), `token`
    /// (the gateway's login token check vs `jsonwebtoken`'s), `persist`
    /// (consumer vs raw batched INSERT), `ws-memory` (gateway RSS per idle
    /// WebSocket), `push-latency` (purchase → pushed event at a steady rate)
    /// or `redis-modes` (accept path on one Redis vs a Redis Cluster,
    /// durability local vs replica, decisions/s on one master vs three).
    which: String,
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Paired A/B rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 100_000)]
    orders: u64,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Write the JSON figures to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// ws-memory: idle WebSocket counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    ws_connections: Vec<usize>,
    /// push-latency: purchases per second, steady.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// push-latency: how long to keep the rate.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// push-latency: buyers connected by WebSocket (purchases rotate over them).
    #[arg(long, default_value_t = 2000)]
    buyers: usize,
}

#[derive(Args)]
struct LocalArgs {
    /// The FlashSale YAML (its window is moved to start a few seconds from now).
    sale: PathBuf,
    /// One URL, or a Redis Cluster's seed node URLs, comma-separated.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Default: `cluster` if REDIS_URL lists several URLs, else `standalone`.
    #[arg(long, env = "REDIS_MODE", value_enum)]
    redis_mode: Option<RedisMode>,
    /// Without REDIS_URL: run the sale on a throwaway Redis Cluster (3
    /// masters, 3 replicas) instead of one Redis server.
    #[arg(long, conflicts_with = "redis_url")]
    redis_cluster: bool,
    /// Default: `replica` in cluster mode (a 202 once a replica holds the
    /// order), `local` standalone.
    #[arg(long, env = "REDIS_DURABILITY", value_enum)]
    redis_durability: Option<Durability>,
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    #[arg(long, default_value_t = 20_000)]
    users: u32,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 60_000)]
    requests: u64,
    #[arg(long, default_value_t = 0.05)]
    retry_fraction: f64,
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Seconds from "everything up" to the sale's start.
    #[arg(long, default_value_t = 2.0)]
    lead_seconds: f64,
    /// How long the sale stays open, in seconds.
    #[arg(long, default_value_t = 60.0)]
    sale_seconds: f64,
    /// Also write the report as JSON to this file (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
}

#[derive(Args)]
struct SaleConfigArgs {
    /// The sale document (the operator mounts it at /etc/flashsale/sale.yaml).
    #[arg(long, env = "SALE_CONFIG", default_value = "/etc/flashsale/sale.yaml")]
    config: PathBuf,
    /// One URL, or a Redis Cluster's seed node URLs, comma-separated.
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// Default: `cluster` if REDIS_URL lists several URLs, else `standalone`.
    #[arg(long, env = "REDIS_MODE", value_enum)]
    redis_mode: Option<RedisMode>,
    /// `replica`: a purchase is answered 202, an entry persisted, a release
    /// applied only once a Redis replica holds it (WAIT 1); `local`: once the
    /// master does.
    /// Default: `replica` in cluster mode, `local` standalone.
    #[arg(long, env = "REDIS_DURABILITY", value_enum)]
    redis_durability: Option<Durability>,
}

impl SaleConfigArgs {
    /// A connection to the sale's Redis, checked now.
    async fn redis(&self) -> Result<RedisConn> {
        let target = RedisTarget::parse(&self.redis_url, self.redis_mode)?;
        Ok(target.connect(&ConnSettings::default()).await?)
    }
}

#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    sale: SaleConfigArgs,
    #[arg(long, env = "TOKEN_SECRET", hide_env_values = true)]
    token_secret: String,
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    #[arg(long, default_value_t = 250)]
    redis_timeout_ms: u64,
    /// Behind a proxy (an ingress, a load balancer), take the client's IP for
    /// the per-IP rate limit from this header's last address, the one the
    /// proxy added (e.g. x-forwarded-for); without it, the peer's address.
    #[arg(long, env = "CLIENT_IP_HEADER")]
    client_ip_header: Option<String>,
    /// The payment provider's Ed25519 public key (base64 or hex); with
    /// DATABASE_URL it enables POST /v1/payments/callback.
    #[arg(long, env = "PAYMENT_PUBLIC_KEY")]
    payment_public_key: Option<String>,
    /// The order store, for payment callbacks.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The currency callbacks must pay in.
    #[arg(long, env = "PAYMENT_CURRENCY", default_value = "USD")]
    payment_currency: String,
    /// WebSocket ping interval; a peer silent for two intervals is dropped.
    #[arg(long, default_value_t = 20)]
    ws_ping_seconds: u64,
    /// Under `--redis-durability replica`: longest a purchase waits for a
    /// replica before it is answered 503 replication_pending (keep it below
    /// --redis-timeout-ms).
    #[arg(long, default_value_t = 100)]
    replica_wait_ms: u64,
    /// Most purchases of one product one replica acknowledgement confirms
    /// (1: one WAIT per purchase; benchmarks compare).
    #[arg(long, default_value_t = dataplane::gateway::commit::DEFAULT_MAX_BATCH, hide = true)]
    commit_batch: usize,
}

#[derive(Args)]
struct ConsumerArgs {
    #[command(flatten)]
    sale: SaleConfigArgs,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Claim entries another consumer left pending this long.
    #[arg(long, default_value_t = 30_000)]
    claim_idle_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    claim_every_ms: u64,
    /// How often this consumer looks for unpaid orders past the payment timeout.
    #[arg(long, default_value_t = 1_000)]
    sweep_every_ms: u64,
    /// Unpaid orders cancelled per transaction.
    #[arg(long, default_value_t = 500)]
    sweep_batch: i64,
    /// Do not run the payment timeout sweeper in this process.
    #[arg(long)]
    no_sweeper: bool,
    /// Pause between a sweep's commit and its Redis apply (fault tests).
    #[arg(long, default_value_t = 0, hide = true)]
    sweep_apply_delay_ms: u64,
    /// Under `--redis-durability replica`: longest one WAIT for a replica blocks.
    #[arg(long, default_value_t = 1_000)]
    replica_wait_ms: u64,
}

#[derive(Args)]
struct SignCallbackArgs {
    #[arg(long)]
    order_id: String,
    /// Amount paid, a decimal string (the order's quantity × unit price).
    #[arg(long)]
    amount: String,
    #[arg(long, default_value = "USD")]
    currency: String,
    /// The provider's payment id (default: a new one).
    #[arg(long)]
    payment_id: Option<String>,
    /// `succeeded` or `failed`.
    #[arg(long, default_value = "succeeded")]
    status: String,
    /// The provider's Ed25519 private key (base64 or hex, 32 bytes).
    #[arg(long, env = "PAYMENT_PRIVATE_KEY", hide_env_values = true)]
    private_key: String,
    /// The gateway the curl command posts to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
}

#[derive(Args)]
struct WatchArgs {
    /// The user's token (`flashsale token --user …`).
    #[arg(long)]
    token: String,
    /// The gateway's base WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    gateway: String,
    /// Stop after this many seconds (default: when the socket closes, or on Ctrl-C).
    #[arg(long)]
    seconds: Option<f64>,
}

#[derive(Args)]
struct CrowdArgs {
    /// Gateway addresses, comma-separated (host:port).
    #[arg(long, value_delimiter = ',', required = true)]
    gateways: Vec<SocketAddr>,
    #[arg(long)]
    sale: String,
    /// SKUs to buy, comma-separated.
    #[arg(long, value_delimiter = ',')]
    skus: Vec<String>,
    #[arg(long, default_value_t = 5_000)]
    users: u32,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    #[arg(long, default_value_t = 60.0)]
    max_seconds: f64,
    #[arg(long, default_value_t = 0.0)]
    retry_fraction: f64,
    /// Pace at this many requests per second in total (default: as fast as answered).
    #[arg(long)]
    rate: Option<f64>,
    /// `purchase` (each with a new Idempotency-Key); `unkeyed` (without one,
    /// never retried); `ticketed` to fetch a purchase ticket before each buy
    /// (a sale with `purchaseTicket.enabled`); or `ping` for the trivial endpoint.
    #[arg(long, default_value = "purchase")]
    target: String,
    #[arg(long, default_value_t = 32)]
    source_ips: u8,
    #[arg(long, env = "TOKEN_SECRET", hide_env_values = true)]
    token_secret: String,
    /// Print the tally as JSON.
    #[arg(long)]
    json: bool,
    /// After the run, wait for the consumers to drain and audit Redis and
    /// PostgreSQL against every 202 this crowd saw (needs REDIS_URL and DATABASE_URL).
    #[arg(long, value_name = "SALE_YAML")]
    audit: Option<PathBuf>,
    /// One URL, or a Redis Cluster's seed node URLs, comma-separated.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Default: `cluster` if REDIS_URL lists several URLs, else `standalone`.
    #[arg(long, env = "REDIS_MODE", value_enum)]
    redis_mode: Option<RedisMode>,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    sale: SaleConfigArgs,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// First wait up to this long for orders in flight to settle (persisted,
    /// counted), so an audit right after a crowd sees the books at rest.
    #[arg(long, default_value_t = 10.0)]
    wait_seconds: f64,
}

#[derive(Args)]
struct WarmArgs {
    #[command(flatten)]
    sale: SaleConfigArgs,
    /// PostgreSQL, whose inventory must cover every unit Redis can sell: a
    /// raise goes there first, a cut after Redis.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// First rebuild, from PostgreSQL's orders, each product Redis lost the
    /// keys of (a restart without AOF): its stock left, its buyers' holdings
    /// and order records. A plain warm refuses such a product (StockMissing),
    /// as warming it anew would sell its sold units twice.
    #[arg(long)]
    restore: bool,
}

#[derive(Args)]
struct TokenArgs {
    #[arg(long)]
    user: String,
    #[arg(long, default_value_t = 3600)]
    ttl_seconds: u64,
    #[arg(long, env = "TOKEN_SECRET", hide_env_values = true)]
    token_secret: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The local run prints a report; its servers' chatter would bury it.
    let default_filter = match cli.command {
        Command::Local(_) | Command::Crowd(_) | Command::Bench(_) => "warn",
        _ => "info,tokio_postgres=warn",
    };
    dataplane::telemetry::init_logging(default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (Kubernetes) or Ctrl-C cancels the token.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Local(a) => local(a).await,
        Command::Gateway(a) => {
            let doc = load(&a.sale.config)?;
            let mut settings = GatewaySettings::new(&a.sale.redis_url, a.token_secret.into_bytes());
            settings.redis_mode = a.sale.redis_mode;
            settings.redis_timeout = Duration::from_millis(a.redis_timeout_ms);
            settings.client_ip_header = a
                .client_ip_header
                .map(|h| h.parse())
                .transpose()
                .context("--client-ip-header is not a header name")?;
            settings.push.ping_interval = Duration::from_secs(a.ws_ping_seconds.max(1));
            settings.durability = a.sale.redis_durability;
            settings.replica_wait = Duration::from_millis(a.replica_wait_ms.max(1));
            settings.commit_batch = a.commit_batch.max(1);
            settings.payment = match (a.payment_public_key, a.database_url) {
                (Some(key), Some(database_url)) => Some(gateway::payment::PaymentSettings {
                    public_key: gateway::payment::parse_public_key(&key)
                        .context("--payment-public-key")?,
                    database_url,
                    currency: a.payment_currency,
                }),
                (Some(_), None) => {
                    bail!("--payment-public-key needs --database-url (DATABASE_URL)")
                }
                _ => None,
            };
            match dataplane::gateway::push::raise_open_files_limit() {
                Ok(n) => {
                    tracing::debug!(open_files = n, "open file limit raised to the hard limit")
                }
                Err(e) => tracing::warn!(error = %e, "open file limit not raised"),
            }
            let gw = Gateway::new(&doc, &settings)?;
            let public = gateway::bind(a.listen).await?;
            let admin = gateway::bind(a.admin_listen).await?;
            tracing::info!(sale = %doc.id(), listen = %a.listen, admin = %a.admin_listen, "gateway up");
            gateway::serve(gw, public, admin, shutdown_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Consumer(a) => {
            let doc = load(&a.sale.config)?;
            let mut settings = ConsumerSettings::new(&a.sale.redis_url, &a.database_url);
            settings.redis_mode = a.sale.redis_mode;
            settings.batch_size = a.batch_size;
            settings.claim_idle = Duration::from_millis(a.claim_idle_ms);
            settings.claim_every = Duration::from_millis(a.claim_every_ms);
            settings.durability = a.sale.redis_durability;
            settings.replica_wait = Duration::from_millis(a.replica_wait_ms.max(1));
            settings.sweeper =
                (!a.no_sweeper).then(|| dataplane::payment_timeout::SweeperSettings {
                    every: Duration::from_millis(a.sweep_every_ms.max(10)),
                    batch: a.sweep_batch.max(1),
                    apply_delay: Duration::from_millis(a.sweep_apply_delay_ms),
                    ..Default::default()
                });
            let shutdown = shutdown_on_signal();
            let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let admin = gateway::bind(a.admin_listen).await?;
            tokio::spawn(consumer_admin(admin, ready.clone(), shutdown.clone()));
            let Some(consumer) = Consumer::start(&doc, settings, &shutdown).await? else {
                return Ok(ExitCode::SUCCESS);
            };
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
            consumer.run(shutdown).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crowd(a) => crowd(a).await,
        Command::Audit(a) => {
            let doc = load(&a.sale.config)?;
            let mut conn = a.sale.redis().await?;
            let store = dataplane::store::OrderStore::connect(&a.database_url, 2)?;
            let wait = Duration::from_secs_f64(a.wait_seconds.max(0.0));
            if !dataplane::tools::audit::wait_drained(&mut conn, &store, &doc.id(), &doc.spec, wait)
                .await?
            {
                eprintln!(
                    "warning: the books did not settle within {:.0} s; auditing anyway",
                    wait.as_secs_f64()
                );
            }
            let report =
                dataplane::tools::audit::audit(&mut conn, &store, &doc.id(), &doc.spec, &[], 0)
                    .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Warm(a) => {
            let doc = load(&a.sale.config)?;
            let mut conn = a.sale.redis().await?;
            let store = dataplane::store::OrderStore::connect(&a.database_url, 2)?;
            store.migrate().await?;
            if a.restore {
                let restored =
                    dataplane::restore::restore_lost(&mut conn, &store, &doc.id(), &doc.spec)
                        .await?;
                if restored.is_empty() {
                    println!(
                        "no product to restore: Redis holds every product PostgreSQL has orders of"
                    );
                }
                for r in &restored {
                    println!(
                        "{}: restored from PostgreSQL, {} order(s) of {} buyer(s), sold {}, remaining {}",
                        r.sku, r.orders, r.buyers, r.sold, r.remaining
                    );
                }
            }
            let now = jiff::Timestamp::now();
            match dataplane::stock::apply(&mut conn, &store, &doc.id(), &doc.spec, now).await {
                Ok(applied) => {
                    for (p, s) in applied.products.iter().zip(&applied.stock) {
                        println!(
                            "{}: {:?}, remaining {}, sold {}, stock in Redis {}, in PostgreSQL {}",
                            p.sku,
                            p.outcome,
                            p.remaining,
                            p.sold,
                            s.redis,
                            s.database.map_or("-".to_string(), |n| n.to_string())
                        );
                    }
                    if applied.spec_changed {
                        println!(
                            "running gateways and consumers take settings version {} within a second",
                            applied.spec_version
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(dataplane::stock::ApplyError::Refused(problems)) => {
                    for p in problems {
                        eprintln!("refused ({}): {}", p.reason, p.message);
                    }
                    eprintln!("nothing changed; the running sale keeps its settings");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Token(a) => {
            println!(
                "{}",
                dataplane::token::issue(a.token_secret.as_bytes(), &a.user, a.ttl_seconds)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(a) => bench(a).await,
        Command::Servers(a) => {
            use dataplane::tools::servers::{
                ClusterOptions, RedisCluster, RedisOptions, RedisServer,
            };
            // Kept until the signal: dropping them stops the servers.
            let (_server, _cluster, redis) = if a.redis_cluster {
                let c = RedisCluster::start_with(ClusterOptions {
                    append_only: true,
                    ..ClusterOptions::default()
                })?;
                let env = format!("{} REDIS_MODE=cluster", c.url());
                (None, Some(c), env)
            } else {
                let s = RedisServer::start_with(RedisOptions {
                    append_only: true,
                    ..RedisOptions::default()
                })?;
                let url = s.url();
                (Some(s), None, url)
            };
            let pg = dataplane::tools::servers::PostgresServer::start()?;
            println!("export REDIS_URL={redis} DATABASE_URL={}", pg.url());
            println!(
                "# Redis and PostgreSQL are up; stopping this process (Ctrl-C, or kill {}) stops and removes them.",
                std::process::id()
            );
            shutdown_on_signal().cancelled().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Openapi => {
            println!("{}", dataplane::gateway::openapi::document());
            Ok(ExitCode::SUCCESS)
        }
        Command::SignCallback(a) => {
            use dataplane::gateway::payment;
            let key = payment::parse_private_key(&a.private_key).context("PAYMENT_PRIVATE_KEY")?;
            let body = serde_json::to_string(&serde_json::json!({
                "paymentId": a.payment_id.unwrap_or_else(|| format!("pay-{}", ulid::Ulid::new())),
                "orderId": a.order_id,
                "amount": a.amount,
                "currency": a.currency,
                "status": a.status,
            }))?;
            let signature = payment::sign(&key, body.as_bytes());
            println!(
                "curl -sS --fail-with-body -w '\\n' -X POST {}/v1/payments/callback -H 'content-type: application/json' -H 'X-Signature: {signature}' -d '{body}'",
                a.gateway.trim_end_matches('/')
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch(a) => watch(a).await,
        Command::PaymentKeygen => {
            let (private, public) = dataplane::gateway::payment::keygen();
            // Shell lines, so `eval "$(flashsale payment-keygen)"` sets both.
            println!("export PAYMENT_PRIVATE_KEY={private}");
            println!("export PAYMENT_PUBLIC_KEY={public}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn bench(a: BenchArgs) -> Result<ExitCode> {
    use dataplane::tools::bench;
    let json = match a.which.as_str() {
        "accept" => {
            let r = bench::accept(a.requests, a.connections, a.rounds).await?;
            println!(
                "accept path, {} connections: purchase {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms) vs trivial {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms): ratio {:.2}",
                r.connections,
                r.purchase.throughput_rps,
                r.purchase.p50_ms,
                r.purchase.p99_ms,
                r.trivial.throughput_rps,
                r.trivial.p50_ms,
                r.trivial.p99_ms,
                r.purchase_vs_trivial
            );
            println!(
                "without an Idempotency-Key: purchase {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms): ratio {:.2}",
                r.purchase_unkeyed.throughput_rps,
                r.purchase_unkeyed.p50_ms,
                r.purchase_unkeyed.p99_ms,
                r.purchase_unkeyed_vs_trivial
            );
            for (which, c) in [
                ("keyed purchase", &r.purchase_costs),
                ("unkeyed purchase", &r.purchase_unkeyed_costs),
                ("trivial request", &r.trivial_costs),
            ] {
                print_costs(which, c);
            }
            println!(
                "redis-benchmark EVALSHA purchase.lua -c 50 -P 16: {:.0} calls/s; purchase endpoint / that = {:.2}",
                r.redis_benchmark_evalsha_p16_rps, r.purchase_vs_redis_benchmark
            );
            println!(
                "redis-benchmark EVALSHA empty script, same keys and arguments: {:.0} calls/s; purchase script / empty = {:.2}; Redis CPU per call {:.2} us vs {:.2} us",
                r.redis_benchmark_empty_script_rps,
                r.purchase_script_vs_empty_script,
                r.redis_cpu_us_per_purchase_call,
                r.redis_cpu_us_per_empty_call
            );
            println!(
                "Redis memory per accepted order (each a new buyer): {:.0} B",
                r.redis_memory_bytes_per_order
            );
            println!(
                "at half the peak ({:.0} req/s offered): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                r.half_rate.throughput_rps,
                r.half_rate.p50_ms,
                r.half_rate.p99_ms,
                r.half_rate.max_ms
            );
            serde_json::to_string_pretty(&r)?
        }
        "tickets" => {
            let r = bench::tickets(a.requests, a.connections, a.rounds).await?;
            println!(
                "accept path, {} connections: without tickets {:.0} purchases/s (p50 {:.2} ms, p99 {:.2} ms); with tickets {:.0} buys/s = {:.0} HTTP req/s with the ticket fetches (purchase p50 {:.2} ms, p99 {:.2} ms): ratio {:.2}",
                r.connections,
                r.without_ticket.throughput_rps,
                r.without_ticket.p50_ms,
                r.without_ticket.p99_ms,
                r.with_ticket.throughput_rps,
                r.with_ticket_http_rps,
                r.with_ticket.p50_ms,
                r.with_ticket.p99_ms,
                r.with_vs_without
            );
            print_costs("purchase without a ticket", &r.without_ticket_costs);
            print_costs(
                "buy with a ticket (its fetch included)",
                &r.with_ticket_costs,
            );
            println!(
                "redis-benchmark EVALSHA purchase.lua -c 50 -P 16: without a ticket {:.0} calls/s, {:.2} us Redis CPU per call; with a ticket key {:.0} calls/s, {:.2} us",
                r.script_calls_per_s_without,
                r.redis_cpu_us_per_call_without,
                r.script_calls_per_s_with,
                r.redis_cpu_us_per_call_with
            );
            serde_json::to_string_pretty(&r)?
        }
        "sold-out" => {
            let r = bench::sold_out(a.requests, a.connections, a.rounds).await?;
            println!(
                "sold-out path, {} connections: {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms) vs trivial {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms): ratio {:.2}",
                r.connections,
                r.sold_out.throughput_rps,
                r.sold_out.p50_ms,
                r.sold_out.p99_ms,
                r.trivial.throughput_rps,
                r.trivial.p50_ms,
                r.trivial.p99_ms,
                r.sold_out_vs_trivial
            );
            print_costs("sold-out answer", &r.sold_out_costs);
            print_costs("trivial request", &r.trivial_costs);
            serde_json::to_string_pretty(&r)?
        }
        "read-path" => {
            let r = bench::read_path(a.requests, a.connections, a.rounds).await?;
            println!(
                "read path, {} connections, {} products: sale page {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms) vs trivial GET {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms): ratio {:.2}",
                r.connections,
                r.products,
                r.sale_page.throughput_rps,
                r.sale_page.p50_ms,
                r.sale_page.p99_ms,
                r.trivial.throughput_rps,
                r.trivial.p50_ms,
                r.trivial.p99_ms,
                r.sale_page_vs_trivial
            );
            println!("per round: {:.2?}", r.round_ratios);
            println!(
                "Redis idle: {:.1} commands/s ({:.1} GET/s)",
                r.idle.commands_per_s, r.idle.gets_per_s
            );
            for s in &r.storms {
                println!(
                    "read storm, {} connections: {:.0} req/s for {:.1} s; Redis {:.1} commands/s ({:.1} GET/s)",
                    s.connections,
                    s.load.throughput_rps,
                    s.redis.seconds,
                    s.redis.commands_per_s,
                    s.redis.gets_per_s
                );
            }
            serde_json::to_string_pretty(&r)?
        }
        "token" => {
            let r = bench::token(a.requests, a.rounds)?;
            println!(
                "login token check, {} verifications x {} rounds: gateway {:.0} ns vs jsonwebtoken {:.0} ns per token: ratio {:.2}",
                r.verifications_per_round,
                r.rounds,
                r.gateway_ns_per_token,
                r.jsonwebtoken_ns_per_token,
                r.gateway_vs_jsonwebtoken
            );
            serde_json::to_string_pretty(&r)?
        }
        "persist" => {
            let r = bench::persist(a.orders, a.batch_size).await?;
            println!(
                "persistence, {} orders, batches of {}: consumer {:.0} orders/s vs raw batched INSERT {:.0} rows/s: ratio {:.2}",
                r.orders,
                r.batch_size,
                r.consumer_orders_per_s,
                r.raw_insert_rows_per_s,
                r.consumer_vs_raw_insert
            );
            serde_json::to_string_pretty(&r)?
        }
        "redis-modes" => {
            let r =
                dataplane::tools::cluster_bench::redis_modes(a.requests, a.connections, a.rounds)
                    .await?;
            for v in &r.variants {
                println!(
                    "accept path, {} connections, {} / durability {} / WAIT batch {}: {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms), {:.2}× standalone local",
                    r.connections,
                    v.variant.mode,
                    v.variant.durability,
                    v.variant.commit_batch,
                    v.load.throughput_rps,
                    v.load.p50_ms,
                    v.load.p99_ms,
                    v.vs_standalone_local
                );
            }
            println!(
                "decisions/s, three products, pipelined purchase scripts: one master {:.0}, three masters {:.0}: {:.2}×",
                r.decisions_one_master, r.decisions_three_masters, r.three_vs_one_master
            );
            serde_json::to_string_pretty(&r)?
        }
        "ws-memory" => serde_json::to_string_pretty(
            &dataplane::tools::push_bench::ws_memory(&a.ws_connections).await?,
        )?,
        "push-latency" => serde_json::to_string_pretty(
            &dataplane::tools::push_bench::push_latency(
                a.rate,
                a.seconds.max(1.0),
                a.buyers.max(1),
            )
            .await?,
        )?,
        other => {
            bail!(
                "bench takes accept, tickets, sold-out, read-path, token, persist, ws-memory, push-latency or redis-modes, not {other:?}"
            )
        }
    };
    println!("{json}");
    if let Some(path) = a.json {
        std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn load(path: &std::path::Path) -> Result<SaleDocument> {
    Ok(SaleDocument::load(path)?)
}

async fn local(a: LocalArgs) -> Result<ExitCode> {
    let report = dataplane::tools::local::run(dataplane::tools::local::LocalOptions {
        sale_file: a.sale,
        redis_url: a.redis_url,
        redis_mode: a.redis_mode,
        redis_cluster: a.redis_cluster,
        redis_durability: a.redis_durability,
        database_url: a.database_url,
        users: a.users,
        connections: a.connections,
        requests: a.requests,
        retry_fraction: a.retry_fraction,
        consumers: a.consumers,
        lead: Duration::from_secs_f64(a.lead_seconds.max(0.0)),
        sale_length: Duration::from_secs_f64(a.sale_seconds.max(1.0)),
    })
    .await?;
    println!("{}", report.render());
    if let Some(path) = a.json {
        let json = serde_json::to_string_pretty(&report)?;
        if path == "-" {
            println!("{json}");
        } else {
            std::fs::write(&path, json).with_context(|| format!("writing {path}"))?;
        }
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn crowd(a: CrowdArgs) -> Result<ExitCode> {
    let target = match a.target.as_str() {
        "purchase" => Target::Purchase,
        "unkeyed" => Target::UnkeyedPurchase,
        "ticketed" => Target::TicketedPurchase,
        "ping" => Target::Ping,
        other => bail!("--target must be purchase, unkeyed, ticketed or ping, not {other:?}"),
    };
    let r = dataplane::tools::crowd::run(CrowdConfig {
        gateways: a.gateways,
        sale: a.sale,
        skus: a.skus,
        buyers: dataplane::tools::crowd::Buyers::Random(a.users),
        connections: a.connections,
        requests: a.requests,
        max_duration: Duration::from_secs_f64(a.max_seconds.max(0.1)),
        retry_fraction: a.retry_fraction,
        rate: a.rate,
        token_secret: a.token_secret.into_bytes(),
        target,
        source_ips: a.source_ips,
    })
    .await?;
    let audit = match &a.audit {
        Some(path) => {
            let redis = a
                .redis_url
                .as_deref()
                .map(|u| RedisTarget::parse(u, a.redis_mode))
                .transpose()?;
            Some(audit_crowd(path, redis, a.database_url.as_deref(), &r).await?)
        }
        None => None,
    };
    let summary = serde_json::json!({
        "audit": &audit,
        "tally": &r,
        "throughput_rps": r.throughput_rps(),
        "latency_ms": {
            "p50": r.latency_ms(0.5), "p90": r.latency_ms(0.9),
            "p99": r.latency_ms(0.99), "p999": r.latency_ms(0.999), "max": r.latency_ms(1.0),
        },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} requests in {:.2} s = {:.0} req/s; p50 {:.2} ms, p99 {:.2} ms; accepted {}, sold out {}, limit {}, rate-limited {}, errors {}",
            r.sent + r.retries,
            r.elapsed_s,
            r.throughput_rps(),
            r.latency_ms(0.5),
            r.latency_ms(0.99),
            r.accepted,
            r.sold_out,
            r.limit_reached,
            r.rate_limited,
            r.server_errors + r.transport_errors
        );
        if let Some(report) = &audit {
            println!("{}", serde_json::to_string_pretty(report)?);
        }
    }
    Ok(match audit {
        Some(report) if !report.passed() => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Prints the text frames of a user's WebSocket until it closes, the
/// deadline passes or a signal comes.
async fn watch(a: WatchArgs) -> Result<ExitCode> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/v1/ws", a.gateway.trim_end_matches('/'));
    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("--gateway {url}"))?;
    request.headers_mut().insert(
        axum::http::header::AUTHORIZATION,
        format!("Bearer {}", a.token)
            .parse()
            .context("--token is not a header value")?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let shutdown = shutdown_on_signal();
    let deadline = a
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    loop {
        let until = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            f = socket.next() => f,
            _ = until => break,
            _ = shutdown.cancelled() => break,
        };
        match frame {
            Some(Ok(Message::Text(text))) => println!("{}", text.as_str()),
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("the socket failed: {e}"),
        }
    }
    let _ = socket.close(None).await;
    Ok(ExitCode::SUCCESS)
}

/// Waits for the backlog to drain, then audits the sale against the 202s seen.
async fn audit_crowd(
    path: &std::path::Path,
    redis: Option<RedisTarget>,
    database_url: Option<&str>,
    r: &dataplane::tools::crowd::CrowdResult,
) -> Result<dataplane::tools::audit::AuditReport> {
    let doc = load(path)?;
    let (Some(redis), Some(database_url)) = (redis, database_url) else {
        bail!("--audit needs --redis-url/REDIS_URL and --database-url/DATABASE_URL");
    };
    let mut conn = redis.connect(&ConnSettings::default()).await?;
    let store = dataplane::store::OrderStore::connect(database_url, 2)?;
    let drained = dataplane::tools::audit::wait_drained(
        &mut conn,
        &store,
        &doc.id(),
        &doc.spec,
        Duration::from_secs(60),
    )
    .await?;
    if !drained {
        eprintln!("warning: orders still in flight after 60 s; auditing anyway");
    }
    Ok(dataplane::tools::audit::audit(
        &mut conn,
        &store,
        &doc.id(),
        &doc.spec,
        &r.orders,
        r.idempotency_violations,
    )
    .await?)
}

/// The consumer's admin port: `/metrics`, `/healthz`, and `/readyz` once the
/// schema is migrated and the group joined.
async fn consumer_admin(
    listener: tokio::net::TcpListener,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    dataplane::metric_catalog::register(dataplane::metric_catalog::CONSUMER);
    let app = axum::Router::new()
        .route("/metrics", get(dataplane::telemetry::metrics_response))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(std::sync::atomic::Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

/// One line of what a load run's requests cost: the gateway, Redis, the crowd.
fn print_costs(which: &str, c: &dataplane::tools::bench::RunCosts) {
    // A run that sends Redis nothing per request (the trivial endpoint, a
    // sold-out answer) shows only background reads: no per-request figures.
    let calls = if c.requests_per_redis_read > 0.0 {
        format!(
            " ({:.1} commands, {:.1} requests per Redis read)",
            c.redis_commands_per_request, c.requests_per_redis_read
        )
    } else {
        String::new()
    };
    println!(
        "CPU per {which}: {:.1} us in the gateway, {:.1} us in Redis{calls}, {:.1} us in the crowd",
        c.gateway_cpu_us_per_request, c.redis_cpu_us_per_request, c.crowd_cpu_us_per_request,
    );
}
