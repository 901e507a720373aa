//! `flashsale bench`: side-by-side measurements on this machine, printed as
//! text and JSON (never asserted in tests: absolute numbers on a shared
//! machine are noise; the ratios in one run are the figures to quote).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::consumer::{Consumer, ConsumerSettings};
use crate::gateway;
use crate::keys::ProductKeys;
use crate::spec::SaleDocument;
use crate::store::{OrderRow, OrderStore};
use crate::tools::crowd::{self, CrowdConfig, CrowdResult, Target};
use crate::tools::gateway_process::GatewayProcess;
use crate::tools::servers::{PostgresServer, RedisServer};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Server(#[from] crate::tools::servers::ServerError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error("warming: {0}")]
    Warm(#[from] crate::warm::WarmError),
    #[error("gateway: {0}")]
    Gateway(#[from] gateway::GatewayError),
    #[error("crowd: {0}")]
    Crowd(#[from] crowd::CrowdError),
    #[error("consumer: {0}")]
    Consumer(#[from] crate::consumer::ConsumerError),
    #[error("order store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("redis-benchmark: {0}")]
    RedisBenchmark(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("websocket client: {0}")]
    Client(String),
    #[error("token: {0}")]
    Token(#[from] crate::token::SignError),
    #[error("token key: {0}")]
    TokenKey(#[from] crate::jwt::KeyError),
    #[error("gateway process: {0}")]
    GatewayProcess(#[from] crate::tools::gateway_process::GatewayProcessError),
    #[error("{0}")]
    Setup(String),
}

/// One load run's figures.
#[derive(Debug, Serialize, Clone)]
pub struct LoadFigures {
    pub requests: u64,
    pub throughput_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
}

impl From<&CrowdResult> for LoadFigures {
    fn from(r: &CrowdResult) -> Self {
        Self {
            requests: r.sent + r.retries,
            throughput_rps: r.throughput_rps(),
            p50_ms: r.latency_ms(0.5),
            p90_ms: r.latency_ms(0.9),
            p99_ms: r.latency_ms(0.99),
            max_ms: r.latency_ms(1.0),
            errors: r.server_errors + r.transport_errors,
        }
    }
}

/// A bench sale open from a second ago for an hour, `(sku, stock)` products.
pub(crate) fn doc(name: &str, products: &[(&str, i64)]) -> Result<SaleDocument, BenchError> {
    let now = jiff::Timestamp::now();
    let start = now - jiff::SignedDuration::from_secs(1);
    let end = now + jiff::SignedDuration::from_secs(3600);
    let products: String = products
        .iter()
        .map(|(sku, stock)| {
            format!("    - {{ sku: {sku}, stock: {stock}, price: \"9.99\", perUserLimit: 1000 }}\n")
        })
        .collect();
    let yaml = format!(
        "metadata: {{ name: {name}, namespace: bench }}\nspec:\n  startTime: \"{start}\"\n  endTime: \"{end}\"\n  warmupSeconds: 0\n  products:\n{products}"
    );
    Ok(SaleDocument::parse(&yaml, "bench sale")?)
}

const SECRET: &[u8] = b"bench-secret";

/// A throwaway Redis with `doc`'s sale warmed into it, and a connection to it.
pub(crate) async fn warmed_redis(
    doc: &SaleDocument,
) -> Result<(RedisServer, redis::aio::ConnectionManager), BenchError> {
    let redis = RedisServer::start()?;
    let mut conn = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    crate::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
    Ok((redis, conn))
}

pub(crate) fn crowd_config(
    addr: SocketAddr,
    sale: &str,
    sku: &str,
    target: Target,
    requests: u64,
    connections: usize,
    rate: Option<f64>,
) -> CrowdConfig {
    CrowdConfig {
        gateways: vec![addr],
        sale: sale.into(),
        skus: vec![sku.into()],
        buyers: bench_buyers(requests),
        connections,
        requests,
        max_duration: Duration::from_secs(120),
        retry_fraction: 0.0,
        rate,
        token_secret: SECRET.to_vec(),
        target,
        source_ips: 16,
    }
}

/// A first, unmeasured run: connections, script cache, allocator.
async fn warm_up(
    addr: SocketAddr,
    sale: &str,
    requests: u64,
    connections: usize,
) -> Result<(), BenchError> {
    let config = crowd_config(
        addr,
        sale,
        "item",
        Target::Purchase,
        requests,
        connections,
        None,
    );
    crowd::run(config).await?;
    Ok(())
}

/// Paired runs, A then B, `rounds` times; medians of each.
async fn paired(
    rounds: usize,
    a: impl Fn() -> CrowdConfig,
    b: impl Fn() -> CrowdConfig,
) -> Result<(LoadFigures, LoadFigures, Vec<f64>), BenchError> {
    let mut fa = Vec::new();
    let mut fb = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let ra = LoadFigures::from(&crowd::run(a()).await?);
        let rb = LoadFigures::from(&crowd::run(b()).await?);
        ratios.push(ra.throughput_rps / rb.throughput_rps.max(1e-9));
        fa.push(ra);
        fb.push(rb);
    }
    Ok((median(fa), median(fb), ratios))
}

pub(crate) fn median(mut v: Vec<LoadFigures>) -> LoadFigures {
    v.sort_by(|x, y| x.throughput_rps.total_cmp(&y.throughput_rps));
    v[v.len() / 2].clone()
}

pub(crate) fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[derive(Debug, Serialize)]
pub struct AcceptReport {
    pub connections: usize,
    /// Each purchase with a new Idempotency-Key (on this standalone Redis the
    /// key's binding runs in the purchase call).
    pub purchase: LoadFigures,
    pub trivial: LoadFigures,
    pub purchase_vs_trivial: f64,
    /// What the keyed purchases cost the gateway, the crowd and Redis
    /// (medians of rounds).
    pub purchase_costs: RunCosts,
    /// The same purchases without an Idempotency-Key.
    pub purchase_unkeyed: LoadFigures,
    pub purchase_unkeyed_costs: RunCosts,
    /// What the trivial requests cost (Redis: only the gateway's background reads).
    pub trivial_costs: RunCosts,
    pub purchase_unkeyed_vs_trivial: f64,
    pub redis_benchmark_evalsha_p16_rps: f64,
    pub purchase_vs_redis_benchmark: f64,
    /// `redis-benchmark` of an empty script with the same keys and arguments,
    /// same server, same round: the ceiling of any script call.
    pub redis_benchmark_empty_script_rps: f64,
    /// Purchase script calls/s over empty script calls/s (medians of rounds).
    pub purchase_script_vs_empty_script: f64,
    /// Redis main-thread CPU per call (INFO cpu), the script's cost with less
    /// of the machine's noise than a rate: purchase script, empty script.
    pub redis_cpu_us_per_purchase_call: f64,
    pub redis_cpu_us_per_empty_call: f64,
    /// Redis `used_memory` growth per accepted order, each a new buyer
    /// (measured over the redis-benchmark purchase runs).
    pub redis_memory_bytes_per_order: f64,
    pub half_rate: LoadFigures,
}

/// A purchase's ARGV for `redis-benchmark`: a new buyer and order id per call.
const PURCHASE_ARGS: &[&str] = &["user:__rand_int__", "1", "item.order:__rand_int__", ""];

/// Same keys and arguments as a purchase, no work, and the answer of an
/// accepted one (an integer): what any such script call costs.
const EMPTY_SCRIPT: &str = "return 0";

/// One `redis-benchmark` run of a script.
struct ScriptRun {
    calls_per_s: f64,
    cpu_us_per_call: f64,
    memory_bytes_per_call: f64,
}

/// Accept path: purchase vs the trivial endpoint, vs redis-benchmark running
/// the same script by EVALSHA with 16-deep pipelining beside an empty script
/// (the ceiling), Redis memory per order, and p99 at half the peak. The
/// gateway runs as its own process (as in a pod), so what a request costs it
/// is read apart from what the crowd in this process spends sending it.
pub async fn accept(
    requests: u64,
    connections: usize,
    rounds: usize,
) -> Result<AcceptReport, BenchError> {
    let doc = doc("accept", &[("item", 100_000_000)])?;
    let (redis, mut conn) = warmed_redis(&doc).await?;
    let gateway = GatewayProcess::start(&doc, &redis.url(), SECRET, "bench-accept").await?;
    let addr = gateway.addr;
    warm_up(addr, "accept", requests / 10, connections).await?;
    // Rounds of: purchase, trivial endpoint, redis-benchmark of the purchase
    // script then of an empty one with the same keys and arguments, on the
    // same server; interleaved so machine noise hits all of them alike.
    let mut purchases = Vec::new();
    let mut unkeyed = Vec::new();
    let mut trivials = Vec::new();
    let mut vs_trivial = Vec::new();
    let mut unkeyed_vs_trivial = Vec::new();
    let mut vs_redis = Vec::new();
    let mut redis_rates = Vec::new();
    let mut empty_rates = Vec::new();
    let mut vs_empty = Vec::new();
    let mut cpu_purchase = Vec::new();
    let mut cpu_empty = Vec::new();
    let mut memory = Vec::new();
    let mut costs_keyed = Vec::new();
    let mut costs_unkeyed = Vec::new();
    let mut costs_trivial = Vec::new();
    // One closed-loop run of `requests` at the gateway, and what it cost.
    let mut load = async |target: Target| {
        let config = crowd_config(addr, "accept", "item", target, requests, connections, None);
        costed_run(&gateway, &mut conn, config).await
    };
    for _ in 0..rounds.max(1) {
        let (p, cp) = load(Target::Purchase).await?;
        let (u, cu) = load(Target::UnkeyedPurchase).await?;
        let (t, ct) = load(Target::Ping).await?;
        costs_keyed.push(cp);
        costs_unkeyed.push(cu);
        costs_trivial.push(ct);
        let port = redis.port();
        let keys = ProductKeys::new(&doc.id(), "item").purchase_keys();
        let (r, e) = tokio::task::spawn_blocking(move || {
            let r = redis_benchmark_script(
                port,
                crate::scripts::PURCHASE_SOURCE,
                &keys,
                PURCHASE_ARGS,
                200_000,
            )?;
            let e = redis_benchmark_script(port, EMPTY_SCRIPT, &keys, PURCHASE_ARGS, 200_000)?;
            Ok::<_, BenchError>((r, e))
        })
        .await
        .map_err(|e| BenchError::RedisBenchmark(e.to_string()))??;
        vs_trivial.push(p.throughput_rps / t.throughput_rps.max(1e-9));
        unkeyed_vs_trivial.push(u.throughput_rps / t.throughput_rps.max(1e-9));
        vs_redis.push(p.throughput_rps / r.calls_per_s.max(1e-9));
        vs_empty.push(r.calls_per_s / e.calls_per_s.max(1e-9));
        redis_rates.push(r.calls_per_s);
        empty_rates.push(e.calls_per_s);
        cpu_purchase.push(r.cpu_us_per_call);
        cpu_empty.push(e.cpu_us_per_call);
        memory.push(r.memory_bytes_per_call);
        purchases.push(p);
        unkeyed.push(u);
        trivials.push(t);
    }
    let purchase = median(purchases);
    let trivial = median(trivials);
    let half = purchase.throughput_rps / 2.0;
    let half_rate = LoadFigures::from(
        &crowd::run(crowd_config(
            addr,
            "accept",
            "item",
            Target::Purchase,
            (half * 5.0) as u64,
            connections,
            Some(half),
        ))
        .await?,
    );
    drop(gateway);
    Ok(AcceptReport {
        connections,
        purchase_vs_trivial: median_f(&vs_trivial),
        purchase_vs_redis_benchmark: median_f(&vs_redis),
        purchase,
        trivial,
        purchase_costs: RunCosts::median(&costs_keyed),
        purchase_unkeyed: median(unkeyed),
        purchase_unkeyed_costs: RunCosts::median(&costs_unkeyed),
        trivial_costs: RunCosts::median(&costs_trivial),
        purchase_unkeyed_vs_trivial: median_f(&unkeyed_vs_trivial),
        redis_benchmark_evalsha_p16_rps: median_f(&redis_rates),
        redis_benchmark_empty_script_rps: median_f(&empty_rates),
        purchase_script_vs_empty_script: median_f(&vs_empty),
        redis_cpu_us_per_purchase_call: median_f(&cpu_purchase),
        redis_cpu_us_per_empty_call: median_f(&cpu_empty),
        redis_memory_bytes_per_order: median_f(&memory),
        half_rate,
    })
}

/// `redis-benchmark` calling a script by EVALSHA, 50 clients, `-P 16`, with
/// the purchase's keys and random users and order ids (so every purchase
/// takes the accept path, each for a new buyer). Also reads the Redis main
/// thread's CPU time and `used_memory` around the run.
fn redis_benchmark_script(
    port: u16,
    source: &str,
    keys: &[String],
    args: &[&str],
    n: u64,
) -> Result<ScriptRun, BenchError> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(source)
        .query(&mut conn)?;
    let before = redis_figures(&mut conn)?;
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            "50",
            "-P",
            "16",
            "-q",
            "--csv",
        ])
        .args(["-n", &n.to_string(), "-r", "100000000"])
        .args(["EVALSHA", &sha, &keys.len().to_string()])
        .args(keys)
        .args(args)
        .output()
        .map_err(|e| BenchError::RedisBenchmark(format!("{e} (apt-get install -y redis-tools)")))?;
    let after = redis_figures(&mut conn)?;
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: "test","rps",...; the second field of the last data line.
    let calls_per_s = text
        .lines()
        .filter_map(|l| l.split(',').nth(1))
        .filter_map(|f| f.trim_matches('"').parse::<f64>().ok())
        .next_back()
        .ok_or_else(|| {
            BenchError::RedisBenchmark(format!(
                "no figure in output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })?;
    let calls = (after.calls - before.calls).max(1) as f64;
    Ok(ScriptRun {
        calls_per_s,
        cpu_us_per_call: (after.cpu_s - before.cpu_s) * 1e6 / calls,
        memory_bytes_per_call: (after.used_memory - before.used_memory) as f64 / calls,
    })
}

struct RedisFigures {
    cpu_s: f64,
    used_memory: i64,
    calls: u64,
    /// Commands processed and socket reads that carried them, since start.
    commands: u64,
    reads: u64,
}

/// One `name:value` line of `INFO`.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Calls of `command` (lower case) so far, from `INFO commandstats`.
fn command_calls(info: &str, command: &str) -> u64 {
    info_field(info, &format!("cmdstat_{command}"))
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Main-thread CPU seconds, `used_memory` and EVALSHA calls so far, from INFO.
fn redis_figures(conn: &mut redis::Connection) -> Result<RedisFigures, BenchError> {
    let info: String = redis::cmd("INFO").arg("everything").query(conn)?;
    RedisFigures::parse(&info)
}

impl RedisFigures {
    fn parse(info: &str) -> Result<Self, BenchError> {
        let num = |name: &str| info_field(info, name).and_then(|v| v.parse::<f64>().ok());
        match (
            num("used_cpu_user_main_thread"),
            num("used_cpu_sys_main_thread"),
            num("used_memory"),
        ) {
            (Some(user), Some(sys), Some(mem)) => Ok(Self {
                cpu_s: user + sys,
                used_memory: mem as i64,
                calls: command_calls(info, "evalsha"),
                commands: num("total_commands_processed").unwrap_or(0.0) as u64,
                reads: num("total_reads_processed").unwrap_or(0.0) as u64,
            }),
            _ => Err(BenchError::RedisBenchmark(
                "INFO lacks used_cpu_*_main_thread or used_memory".into(),
            )),
        }
    }

    async fn read<C: redis::aio::ConnectionLike>(conn: &mut C) -> Result<Self, BenchError> {
        let info: String = redis::cmd("INFO")
            .arg("everything")
            .query_async(conn)
            .await?;
        Self::parse(&info)
    }
}

/// One crowd run at a gateway process, and what it cost the gateway, the
/// crowd (this process) and Redis.
async fn costed_run(
    gateway: &GatewayProcess,
    conn: &mut redis::aio::ConnectionManager,
    config: CrowdConfig,
) -> Result<(LoadFigures, RunCosts), BenchError> {
    let (run, costs) = costed_crowd(gateway, conn, config).await?;
    Ok((LoadFigures::from(&run), costs))
}

/// `costed_run` with the crowd's whole tally.
async fn costed_crowd(
    gateway: &GatewayProcess,
    conn: &mut redis::aio::ConnectionManager,
    config: CrowdConfig,
) -> Result<(CrowdResult, RunCosts), BenchError> {
    let before = RedisFigures::read(conn).await?;
    let gateway_before = gateway.cpu_s()?;
    let crowd_before = process_cpu_s();
    let run = crowd::run(config).await?;
    let crowd_after = process_cpu_s();
    let gateway_after = gateway.cpu_s()?;
    let after = RedisFigures::read(conn).await?;
    let costs = RunCosts::between(
        &before,
        &after,
        gateway_after - gateway_before,
        crowd_after - crowd_before,
        run.sent + run.retries,
    );
    Ok((run, costs))
}

/// Where one HTTP load run's CPU went: the gateway process, the crowd (this
/// process) and Redis (INFO around the run), per request answered.
#[derive(Debug, Serialize)]
pub struct RunCosts {
    /// The gateway process's CPU (user + system, all its threads).
    pub gateway_cpu_us_per_request: f64,
    /// This process's: the crowd sending the requests and reading answers.
    pub crowd_cpu_us_per_request: f64,
    /// Redis main-thread CPU (user + system).
    pub redis_cpu_us_per_request: f64,
    /// Commands Redis ran, those inside scripts included (the purchase
    /// call, the push routing batches, the gateway's background reads).
    pub redis_commands_per_request: f64,
    /// Requests per Redis socket read: how many calls the gateway's one
    /// connection packed into each write (0 for a run that sends Redis
    /// nothing per request, such as the trivial endpoint's).
    pub requests_per_redis_read: f64,
}

impl RunCosts {
    /// From INFO before and after the run, and the gateway's and the crowd's
    /// CPU seconds in it.
    fn between(
        before: &RedisFigures,
        after: &RedisFigures,
        gateway_s: f64,
        crowd_s: f64,
        requests: u64,
    ) -> Self {
        let requests = requests.max(1) as f64;
        let commands = after.commands.saturating_sub(before.commands) as f64;
        let reads = after.reads.saturating_sub(before.reads) as f64;
        // Background reads alone (under one command per two requests) say
        // nothing about how requests share a read.
        let sends = commands / requests >= 0.5 && reads > 0.0;
        Self {
            gateway_cpu_us_per_request: gateway_s * 1e6 / requests,
            crowd_cpu_us_per_request: crowd_s * 1e6 / requests,
            redis_cpu_us_per_request: (after.cpu_s - before.cpu_s) * 1e6 / requests,
            redis_commands_per_request: commands / requests,
            requests_per_redis_read: if sends { requests / reads } else { 0.0 },
        }
    }

    /// Each figure's median over rounds.
    fn median(runs: &[Self]) -> Self {
        let of = |f: fn(&Self) -> f64| median_f(&runs.iter().map(f).collect::<Vec<_>>());
        Self {
            gateway_cpu_us_per_request: of(|r| r.gateway_cpu_us_per_request),
            crowd_cpu_us_per_request: of(|r| r.crowd_cpu_us_per_request),
            redis_cpu_us_per_request: of(|r| r.redis_cpu_us_per_request),
            redis_commands_per_request: of(|r| r.redis_commands_per_request),
            requests_per_redis_read: of(|r| r.requests_per_redis_read),
        }
    }
}

/// This process's CPU seconds so far (user + system), 0 if unreadable.
fn process_cpu_s() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: zeroed, then filled by a successful getrusage.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[derive(Debug, Serialize)]
pub struct TicketsReport {
    pub connections: usize,
    /// Purchases on the sale without tickets.
    pub without_ticket: LoadFigures,
    /// Buys on the same sale with tickets switched on (live): each fetches a
    /// ticket, then purchases with it. Throughput counts buys; latency is
    /// the purchase request's alone.
    pub with_ticket: LoadFigures,
    /// What a purchase without a ticket, and a buy with one (its ticket
    /// fetch included: the figures are per buy), cost the gateway, the crowd
    /// and Redis (medians of rounds).
    pub without_ticket_costs: RunCosts,
    pub with_ticket_costs: RunCosts,
    /// HTTP requests/s of the ticket run (ticket fetches and purchases).
    pub with_ticket_http_rps: f64,
    /// Buys/s with tickets over purchases/s without (median of rounds).
    pub with_vs_without: f64,
    /// `redis-benchmark` of `purchase.lua` (as in `accept`) without and with
    /// a ticket key: calls/s and Redis CPU per call.
    pub script_calls_per_s_without: f64,
    pub script_calls_per_s_with: f64,
    pub redis_cpu_us_per_call_without: f64,
    pub redis_cpu_us_per_call_with: f64,
}

/// Accept path without and with purchase tickets, one gateway process and
/// one Redis, tickets switched by the live spec between interleaved runs.
pub async fn tickets(
    requests: u64,
    connections: usize,
    rounds: usize,
) -> Result<TicketsReport, BenchError> {
    let doc = doc("tickets", &[("item", 100_000_000)])?;
    let (redis, mut conn) = warmed_redis(&doc).await?;
    let gateway = GatewayProcess::start(&doc, &redis.url(), SECRET, "bench-tickets").await?;
    let addr = gateway.addr;
    warm_up(addr, "tickets", requests / 10, connections).await?;
    let config =
        |target| crowd_config(addr, "tickets", "item", target, requests, connections, None);
    let keys = ProductKeys::new(&doc.id(), "item");
    let plain_keys = keys.purchase_keys();
    let ticket_keys: Vec<String> = plain_keys
        .iter()
        .cloned()
        .chain([keys.ticket("__rand_int__")])
        .collect();
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut without_costs = Vec::new();
    let mut with_costs = Vec::new();
    let mut http_rps = Vec::new();
    let mut ratios = Vec::new();
    let mut scripts = Vec::new();
    for _ in 0..rounds.max(1) {
        set_tickets(&mut conn, &gateway, &doc, false).await?;
        let (run, costs) = costed_crowd(&gateway, &mut conn, config(Target::Purchase)).await?;
        let plain = LoadFigures::from(&run);
        without_costs.push(costs);
        set_tickets(&mut conn, &gateway, &doc, true).await?;
        let (run, costs) =
            costed_crowd(&gateway, &mut conn, config(Target::TicketedPurchase)).await?;
        let ticketed = LoadFigures::from(&run);
        with_costs.push(costs);
        if run.ticket_refused > 0 || run.tickets_fetched < run.sent {
            return Err(BenchError::Setup(format!(
                "ticket run: {} tickets for {} buys, {} refused for their ticket",
                run.tickets_fetched, run.sent, run.ticket_refused
            )));
        }
        http_rps.push((run.sent + run.retries + run.tickets_fetched) as f64 / run.elapsed_s);
        ratios.push(ticketed.throughput_rps / plain.throughput_rps.max(1e-9));
        without.push(plain);
        with.push(ticketed);
        let port = redis.port();
        let (plain_keys, ticket_keys) = (plain_keys.to_vec(), ticket_keys.clone());
        let far = (jiff::Timestamp::now().as_millisecond() + 3_600_000).to_string();
        scripts.push(
            tokio::task::spawn_blocking(move || {
                let src = crate::scripts::PURCHASE_SOURCE;
                let a = redis_benchmark_script(port, src, &plain_keys, PURCHASE_ARGS, 200_000)?;
                let args: Vec<&str> = PURCHASE_ARGS
                    .iter()
                    .copied()
                    .chain([far.as_str()])
                    .collect();
                let b = redis_benchmark_script(port, src, &ticket_keys, &args, 200_000)?;
                Ok::<_, BenchError>((a, b))
            })
            .await
            .map_err(|e| BenchError::RedisBenchmark(e.to_string()))??,
        );
    }
    drop(gateway);
    drop(redis);
    let pick = |f: fn(&(ScriptRun, ScriptRun)) -> f64| {
        median_f(&scripts.iter().map(f).collect::<Vec<_>>())
    };
    Ok(TicketsReport {
        connections,
        without_ticket: median(without),
        with_ticket: median(with),
        without_ticket_costs: RunCosts::median(&without_costs),
        with_ticket_costs: RunCosts::median(&with_costs),
        with_ticket_http_rps: median_f(&http_rps),
        with_vs_without: median_f(&ratios),
        script_calls_per_s_without: pick(|s| s.0.calls_per_s),
        script_calls_per_s_with: pick(|s| s.1.calls_per_s),
        redis_cpu_us_per_call_without: pick(|s| s.0.cpu_us_per_call),
        redis_cpu_us_per_call_with: pick(|s| s.1.cpu_us_per_call),
    })
}

/// Switches the sale's purchase tickets through its live spec, as the
/// operator would, and waits until the gateway runs that spec version (its
/// `flashsale_spec_version` gauge).
async fn set_tickets(
    conn: &mut redis::aio::ConnectionManager,
    gateway: &GatewayProcess,
    doc: &SaleDocument,
    enabled: bool,
) -> Result<(), BenchError> {
    let mut spec = doc.spec.clone();
    spec.purchase_ticket.enabled = enabled;
    let (_, version) = crate::live::publish(conn, &doc.id(), &spec)
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway
        .metric("flashsale_spec_version")
        .await
        .is_none_or(|v| v < version as f64)
    {
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "the gateway did not take live spec version {version} within 10 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct SoldOutReport {
    pub connections: usize,
    pub sold_out: LoadFigures,
    pub trivial: LoadFigures,
    pub sold_out_vs_trivial: f64,
    /// What the sold-out answers and the trivial requests cost the gateway
    /// and the crowd (medians of rounds).
    pub sold_out_costs: RunCosts,
    pub trivial_costs: RunCosts,
}

/// Sold-out path (answered from the pod's flag) vs the trivial endpoint,
/// interleaved rounds on one gateway. The gateway runs as its own process, as
/// in `accept`: in the crowd's runtime the two would share its two worker
/// threads and one allocator, and the figures would be the pair's.
pub async fn sold_out(
    requests: u64,
    connections: usize,
    rounds: usize,
) -> Result<SoldOutReport, BenchError> {
    let doc = doc("soldout", &[("item", 0)])?;
    let (redis, mut conn) = warmed_redis(&doc).await?;
    let gateway = GatewayProcess::start(&doc, &redis.url(), SECRET, "bench-sold-out").await?;
    let addr = gateway.addr;
    warm_up(addr, "soldout", requests / 10, connections).await?;
    // The replay snapshot loads within 500 ms of the flag flipping.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut load = async |target: Target| {
        let config = crowd_config(addr, "soldout", "item", target, requests, connections, None);
        costed_run(&gateway, &mut conn, config).await
    };
    let (mut sold_out, mut trivial, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sold_out_costs, mut trivial_costs) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let (s, sc) = load(Target::Purchase).await?;
        let (t, tc) = load(Target::Ping).await?;
        ratios.push(s.throughput_rps / t.throughput_rps.max(1e-9));
        sold_out.push(s);
        trivial.push(t);
        sold_out_costs.push(sc);
        trivial_costs.push(tc);
    }
    drop(gateway);
    drop(redis);
    Ok(SoldOutReport {
        connections,
        sold_out: median(sold_out),
        trivial: median(trivial),
        sold_out_vs_trivial: median_f(&ratios),
        sold_out_costs: RunCosts::median(&sold_out_costs),
        trivial_costs: RunCosts::median(&trivial_costs),
    })
}

/// Commands Redis has processed so far: all of them, and `GET`s (the sale
/// page refresher's only command).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RedisCommands {
    pub total: u64,
    pub get: u64,
}

pub async fn redis_commands<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
) -> Result<RedisCommands, redis::RedisError> {
    let info: String = redis::cmd("INFO")
        .arg("everything")
        .query_async(conn)
        .await?;
    Ok(RedisCommands {
        total: info_field(&info, "total_commands_processed")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        get: command_calls(&info, "get"),
    })
}

#[derive(Debug, Serialize)]
pub struct ReadPathReport {
    pub connections: usize,
    pub products: usize,
    pub sale_page: LoadFigures,
    pub trivial: LoadFigures,
    pub sale_page_vs_trivial: f64,
    /// Each round's ratio, in order.
    pub round_ratios: Vec<f64>,
    /// Redis' command rate with no reads at all, for reference.
    pub idle: RedisRate,
    /// Read storms of growing size, and what Redis did meanwhile.
    pub storms: Vec<ReadStorm>,
}

#[derive(Debug, Serialize)]
pub struct RedisRate {
    pub seconds: f64,
    pub commands_per_s: f64,
    pub gets_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ReadStorm {
    pub connections: usize,
    pub load: LoadFigures,
    pub redis: RedisRate,
}

/// Sale products of the read-path bench: a page like a real sale's.
const READ_PATH_PRODUCTS: [(&str, i64); 3] =
    [("phone", 1_000), ("earbuds", 3_000), ("charger", 500)];

/// Read path: the sale page vs the trivial endpoint, both `GET` (paired
/// rounds, medians), then Redis' command rate idle and during read storms
/// on `connections` and 4× as many connections.
pub async fn read_path(
    requests: u64,
    connections: usize,
    rounds: usize,
) -> Result<ReadPathReport, BenchError> {
    let doc = doc("page", &READ_PATH_PRODUCTS)?;
    let (redis, mut conn) = warmed_redis(&doc).await?;
    let gateway = GatewayProcess::start(&doc, &redis.url(), SECRET, "bench-read-path").await?;
    let addr = gateway.addr;
    let page = |n: u64, c: usize| crowd_config(addr, "page", "", Target::SalePage, n, c, None);
    let ping = || {
        crowd_config(
            addr,
            "page",
            "",
            Target::PingGet,
            requests,
            connections,
            None,
        )
    };
    // Until the first snapshot is up (the refresher's first tick is at once).
    for _ in 0..50 {
        if crowd::run(page(100, 4)).await?.ok == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crowd::run(page(requests / 10, connections)).await?;
    let (sale_page, trivial, ratios) =
        paired(rounds.max(1), || page(requests, connections), ping).await?;

    let idle_window = Duration::from_secs(3);
    let before = redis_commands(&mut conn).await?;
    let started = Instant::now();
    tokio::time::sleep(idle_window).await;
    let idle = redis_rate(before, redis_commands(&mut conn).await?, started);
    let mut storms = Vec::new();
    for c in [connections, connections * 4] {
        let before = redis_commands(&mut conn).await?;
        let started = Instant::now();
        let load = LoadFigures::from(&crowd::run(page(requests, c)).await?);
        let redis = redis_rate(before, redis_commands(&mut conn).await?, started);
        storms.push(ReadStorm {
            connections: c,
            load,
            redis,
        });
    }
    drop(gateway);
    drop(redis);
    Ok(ReadPathReport {
        connections,
        products: READ_PATH_PRODUCTS.len(),
        sale_page,
        trivial,
        sale_page_vs_trivial: median_f(&ratios),
        round_ratios: ratios,
        idle,
        storms,
    })
}

fn redis_rate(before: RedisCommands, after: RedisCommands, since: Instant) -> RedisRate {
    let seconds = since.elapsed().as_secs_f64().max(1e-9);
    RedisRate {
        seconds,
        // Less the INFO that read `after`.
        commands_per_s: after.total.saturating_sub(before.total + 1) as f64 / seconds,
        gets_per_s: after.get.saturating_sub(before.get) as f64 / seconds,
    }
}

#[derive(Debug, Serialize)]
pub struct PersistReport {
    pub orders: u64,
    pub consumer_orders_per_s: f64,
    pub raw_insert_rows_per_s: f64,
    pub consumer_vs_raw_insert: f64,
    pub batch_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenReport {
    pub verifications_per_round: u64,
    pub rounds: usize,
    /// `jsonwebtoken::decode` with the validation the gateway used before.
    pub jsonwebtoken_ns_per_token: f64,
    /// `token::TokenVerifier::user`, as the gateway checks a login token now.
    pub gateway_ns_per_token: f64,
    pub gateway_vs_jsonwebtoken: f64,
}

/// One login token verified over and over by the gateway's verifier and by
/// `jsonwebtoken` as the gateway used it before, in interleaved rounds on
/// one thread; the medians per token.
pub fn token(verifications: u64, rounds: usize) -> Result<TokenReport, BenchError> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    #[derive(Deserialize)]
    struct Claims {
        #[allow(dead_code)]
        sub: String,
        #[allow(dead_code)]
        exp: u64,
    }
    let token = crate::token::issue(SECRET, "user-1234567", 3600)?;
    let ours = crate::token::TokenVerifier::new(SECRET)?;
    let mut before = Validation::new(Algorithm::HS256);
    before.leeway = 0;
    before.set_required_spec_claims(&["exp", "sub"]);
    let key = DecodingKey::from_secret(SECRET);
    let n = verifications.max(1);
    let per_token = |f: &dyn Fn() -> bool| {
        let started = Instant::now();
        let ok = (0..n).filter(|_| f()).count();
        (
            started.elapsed().as_nanos() as f64 / n as f64,
            ok as u64 == n,
        )
    };
    let (mut theirs_ns, mut ours_ns) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let (t, t_ok) = per_token(&|| {
            jsonwebtoken::decode::<Claims>(std::hint::black_box(&token), &key, &before).is_ok()
        });
        let (o, o_ok) = per_token(&|| ours.user(std::hint::black_box(&token)).is_ok());
        if !(t_ok && o_ok) {
            return Err(BenchError::Setup("a verifier refused a valid token".into()));
        }
        theirs_ns.push(t);
        ours_ns.push(o);
    }
    let (theirs, ours) = (median_f(&theirs_ns), median_f(&ours_ns));
    Ok(TokenReport {
        verifications_per_round: n,
        rounds: rounds.max(1),
        jsonwebtoken_ns_per_token: theirs,
        gateway_ns_per_token: ours,
        gateway_vs_jsonwebtoken: ours / theirs.max(f64::MIN_POSITIVE),
    })
}

/// Consumer persistence (stream → committed rows, confirmed and acked) vs a
/// raw batched INSERT of the same rows, same batch size, same server.
pub async fn persist(orders: u64, batch_size: usize) -> Result<PersistReport, BenchError> {
    let doc = doc("persist", &[("item", 100_000_000)])?;
    let (redis, mut conn) = warmed_redis(&doc).await?;
    let pg = PostgresServer::start()?;
    let sale = doc.id();
    let k = ProductKeys::new(&sale, "item");
    // Fill the stream through the real purchase script, pipelined.
    let purchase_keys = k.purchase_keys();
    let mut done = 0u64;
    while done < orders {
        let n = (orders - done).min(1000);
        let mut pipe = redis::pipe();
        pipe.load_script(&crate::scripts::PURCHASE).ignore();
        let invs: Vec<_> = (0..n)
            .map(|i| {
                crate::scripts::Purchase::new_buyer(
                    &purchase_keys,
                    &format!("user-{}", done + i),
                    &crate::order::new_order_id("item"),
                )
                .invocation()
            })
            .collect();
        for call in invs {
            pipe.add_command(call.into_cmd()).ignore();
        }
        pipe.exec_async(&mut conn).await?;
        done += n;
    }
    let rows = stream_rows(&mut conn, &k).await?;

    // Raw first: the same rows, same batch size, nothing else; then the
    // table is emptied so the consumer starts from the same state.
    let store = OrderStore::connect(&pg.url(), 2)?;
    store.migrate().await?;
    let raw_sale = crate::spec::SaleId::new("bench", "raw");
    store.ensure_inventory(&raw_sale, &doc.spec).await?;
    let client = store
        .pool()
        .get()
        .await
        .map_err(crate::store::StoreError::from)?;
    let started = Instant::now();
    for chunk in rows.chunks(batch_size) {
        raw_insert(&client, &raw_sale.key(), chunk).await?;
    }
    let raw_s = started.elapsed().as_secs_f64();
    client.batch_execute("TRUNCATE flashsale_orders").await?;
    client
        .batch_execute("VACUUM ANALYZE flashsale_orders")
        .await?;

    // Consumer: from start until PostgreSQL holds every order.
    let shutdown = CancellationToken::new();
    let mut settings = ConsumerSettings::new(redis.url(), pg.url());
    settings.batch_size = batch_size;
    settings.name = "bench".into();
    let consumer = Consumer::start(&doc, settings, &shutdown).await?;
    let started = Instant::now();
    if let Some(c) = consumer {
        tokio::spawn(c.run(shutdown.clone()));
    }
    loop {
        let n: i64 = client
            .query_one("SELECT count(*) FROM flashsale_orders", &[])
            .await?
            .get(0);
        if n as u64 >= orders {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let consumer_s = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let consumer_rate = orders as f64 / consumer_s;
    let raw_rate = rows.len() as f64 / raw_s;
    Ok(PersistReport {
        orders,
        consumer_orders_per_s: consumer_rate,
        raw_insert_rows_per_s: raw_rate,
        consumer_vs_raw_insert: consumer_rate / raw_rate,
        batch_size,
    })
}

async fn stream_rows(
    conn: &mut redis::aio::ConnectionManager,
    k: &ProductKeys,
) -> Result<Vec<OrderRow>, BenchError> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(k.stream())
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await?;
    // The same rows under other ids, so the raw inserts do not collide.
    Ok(reply
        .ids
        .iter()
        .filter_map(|e| crate::consumer::parse_entry("item", e))
        .map(|r| OrderRow {
            order_id: format!("raw-{}", r.order_id),
            ..r
        })
        .collect())
}

/// A plain multi-row INSERT with the same unique keys and ON CONFLICT.
async fn raw_insert(
    client: &tokio_postgres::Client,
    sale: &str,
    rows: &[OrderRow],
) -> Result<(), BenchError> {
    let col = |f: fn(&OrderRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
    let (ids, skus, users, prices, streams) = (
        col(|r| &r.order_id),
        col(|r| &r.sku),
        col(|r| &r.user_id),
        col(|r| &r.unit_price),
        col(|r| &r.stream_id),
    );
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let qtys: Vec<i32> = rows.iter().map(|r| r.quantity).collect();
    let ats: Vec<i64> = rows.iter().map(|r| r.accepted_at_ms).collect();
    client
        .execute(
            "INSERT INTO flashsale_orders
                (order_id, sale, sku, user_id, seq, quantity, unit_price, accepted_at, stream_id)
             SELECT order_id, $1, sku, user_id, seq, quantity, unit_price::numeric,
                    to_timestamp(accepted_ms / 1000.0), stream_id
             FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::int[], $7::text[], $8::bigint[], $9::text[])
                AS t(order_id, sku, user_id, seq, quantity, unit_price, accepted_ms, stream_id)
             ON CONFLICT DO NOTHING",
            &[&sale, &ids, &skus, &users, &seqs, &qtys, &prices, &ats, &streams],
        )
        .await?;
    Ok(())
}

/// Who sends a run's requests: by default every request a new buyer, never
/// seen in an earlier run of this process (a flash sale's crowd mostly tries
/// once, and a buyer's first order is the script's cheaper path);
/// `BENCH_USERS=n` picks from `user-0` … `user-{n-1}` at random instead, so
/// buyers come back.
fn bench_buyers(requests: u64) -> crowd::Buyers {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    match std::env::var("BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) => crowd::Buyers::Random(n),
        None => {
            let n = u32::try_from(requests).unwrap_or(u32::MAX);
            crowd::Buyers::EachNew {
                first: NEXT.fetch_add(n, Ordering::Relaxed),
            }
        }
    }
}
