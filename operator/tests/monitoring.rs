//! The chart's dashboards and alert rules against a REAL Prometheus (Debian's
//! `prometheus`), scraping a running gateway and consumer (the `flashsale`
//! binary on a real Redis and PostgreSQL, a crowd buying through it) and the
//! operator's metrics endpoint. Every query of every dashboard panel and
//! every alert expression is evaluated through the HTTP API: none may fail,
//! and none may name a metric no binary exports.
//!
//! The operator binary needs a Kubernetes API server to run at all, which this
//! test does not have; its endpoint here is `operator::admin::router` over the
//! operator's `Metrics` registry, filled from the same running data plane by
//! the functions the reconciler and the autoscaler use (Redis counters,
//! consumer lag, load reports, the scaling algorithm), recorded through the
//! same `observe_*` calls.

#[path = "monitoring/picture.rs"]
mod picture;
#[path = "monitoring/prometheus.rs"]
mod prometheus;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use dataplane::gateway::load_report;
use dataplane::spec::SaleDocument;
use dataplane::tools::servers::{PostgresServer, RedisServer, free_port};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use operator::autoscaler::{observe, settings};
use operator::metrics::{Metrics, SaleLabels};
use operator::resource::{FlashSaleSpec, FlashSaleStatus, ProductStatus, SalePhase};
use operator::scaling::{GatewayObservation, PodReadiness, ScalingState};
use prometheus::Prometheus;
use serde_json::Value;
use tokio::sync::watch;

const NAMESPACE: &str = "shop";
const SALE: &str = "monitoring";
const SECRET: &str = "monitoring-test-secret";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_file(path: &str) -> anyhow::Result<String> {
    let p = workspace().join("charts/flashsale").join(path);
    std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
}

/// The data plane's binary belongs to another package, so Cargo gives this
/// test no `CARGO_BIN_EXE_flashsale`. Ask Cargo for it the way `cargo test
/// --workspace` builds it (same feature unification, so under that command
/// this is a no-op check) and take the path it reports.
fn flashsale_binary() -> anyhow::Result<PathBuf> {
    let mut cargo = Command::new(env!("CARGO"));
    // Cargo gives this test process the package's CARGO_PKG_*, CARGO_MANIFEST_*
    // and the like; build scripts that track those (ring's) would see them
    // change and rebuild. Keep only the user's own Cargo settings.
    const USER: [&str; 10] = [
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_",
        "CARGO_PROFILE_",
        "CARGO_INCREMENTAL",
        "CARGO_NET_",
        "CARGO_TERM_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && !USER.iter().any(|u| key.starts_with(u)) {
            cargo.env_remove(key.as_ref());
        }
    }
    let out = cargo
        .current_dir(workspace())
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo for the flashsale binary")?;
    ensure!(out.status.success(), "cargo test --no-run failed");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"));
        // Not the bin's own unit-test harness, which shares its name.
        if msg["reason"] == "compiler-artifact"
            && is_bin
            && msg["profile"]["test"] == false
            && msg["target"]["name"] == "flashsale"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo reported no flashsale executable")
}

/// A child process killed on drop; its output goes to a log file.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Self { name, child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sale_yaml() -> String {
    let now = Timestamp::now();
    let start = now - jiff::SignedDuration::from_secs(1);
    let end = now + jiff::SignedDuration::from_secs(600);
    format!(
        r#"apiVersion: flashsale.dev/v1alpha1
kind: FlashSale
metadata: {{ name: {SALE}, namespace: {NAMESPACE} }}
spec:
  startTime: "{start}"
  endTime: "{end}"
  warmupSeconds: 0
  products:
    - {{ sku: tee, stock: 2500, price: "19.99", perUserLimit: 1 }}
    - {{ sku: mug, stock: 1500, price: "9.99", perUserLimit: 2 }}
  rateLimits:
    global: {{ requestsPerSecond: 50000, burst: 10000 }}
    perUser: {{ requestsPerSecond: 2, burst: 3 }}
    perIp: {{ requestsPerSecond: 2000, burst: 4000 }}
  redis: {{ urlSecretRef: {{ name: redis, key: url }} }}
  database: {{ urlSecretRef: {{ name: orders-db, key: url }} }}
  tokenSecretRef: {{ name: shop-login, key: hmac-secret }}
  gateway:
    replicas: {{ min: 1, max: 4, atStart: 1 }}
    targetConnectionsPerPod: 100
    targetRequestsPerSecondPerPod: 200
  consumer:
    replicas: {{ min: 1, max: 4 }}
    targetLagPerPod: 50
"#
    )
}

async fn wait_ready(http: &reqwest::Client, url: &str, what: &Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} not ready at {url}; its log:\n{}", what.name, what.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything running: servers, data plane, operator endpoint, Prometheus.
struct Rig {
    _redis: RedisServer,
    _pg: PostgresServer,
    redis_url: String,
    dir: tempfile::TempDir,
    bin: PathBuf,
    gateway: Process,
    consumer: Process,
    gateway_http: SocketAddr,
    endpoints: Vec<(&'static str, String)>,
    doc: SaleDocument,
    spec: FlashSaleSpec,
    metrics: Arc<Metrics>,
    stop_admin: watch::Sender<bool>,
    prometheus: Prometheus,
    http: reqwest::Client,
}

impl Rig {
    async fn start() -> anyhow::Result<Self> {
        let bin = flashsale_binary()?;
        let redis = RedisServer::start()?;
        let pg = PostgresServer::start()?;
        let dir = tempfile::Builder::new()
            .prefix("flashsale-monitoring-")
            .tempdir()?;
        let yaml = sale_yaml();
        let config = dir.path().join("sale.yaml");
        std::fs::write(&config, &yaml)?;
        let doc = SaleDocument::parse(&yaml, "monitoring sale")?;
        let resource: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
        let spec: FlashSaleSpec = serde_yaml::from_value(resource["spec"].clone())?;
        let mut conn = redis::Client::open(redis.url())?
            .get_connection_manager()
            .await?;
        dataplane::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let gateway_http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let gateway_admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let gateway = Process::spawn(
            "gateway",
            Command::new(&bin)
                .arg("gateway")
                .arg("--config")
                .arg(&config)
                .args(["--redis-url", &redis.url()])
                .args(["--listen", &gateway_http.to_string()])
                .args(["--admin-listen", &gateway_admin.to_string()])
                .env("TOKEN_SECRET", SECRET)
                .env("POD_NAME", "monitoring-gateway-0"),
            dir.path(),
        )?;
        let consumer_admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let consumer = Process::spawn(
            "consumer",
            Command::new(&bin)
                .arg("consumer")
                .arg("--config")
                .arg(&config)
                .args(["--redis-url", &redis.url()])
                .args(["--admin-listen", &consumer_admin.to_string()])
                .env("DATABASE_URL", pg.url())
                .env("POD_NAME", "monitoring-consumer-0"),
            dir.path(),
        )?;
        wait_ready(&http, &format!("http://{gateway_admin}/readyz"), &gateway).await?;
        wait_ready(&http, &format!("http://{consumer_admin}/readyz"), &consumer).await?;

        // The operator's endpoint: its admin router over its registry.
        let metrics = Arc::new(Metrics::default());
        metrics.leader.set(1);
        let operator_admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (stop_admin, stopped) = watch::channel(false);
        let mut stopped_rx = stopped.clone();
        tokio::spawn(operator::admin::serve(
            operator_admin,
            metrics.clone(),
            async move {
                let _ = stopped_rx.wait_for(|s| *s).await;
            },
        ));

        let rules = chart_file("rules/flashsale.rules.yaml")?;
        let config = scrape_config(gateway_admin, consumer_admin, operator_admin);
        let prometheus =
            Prometheus::start(&config, &[("flashsale.rules.yaml", rules.as_str())]).await?;
        Ok(Self {
            redis_url: redis.url(),
            _redis: redis,
            _pg: pg,
            dir,
            bin,
            gateway,
            consumer,
            gateway_http,
            endpoints: vec![
                ("gateway", format!("http://{gateway_admin}/metrics")),
                ("consumer", format!("http://{consumer_admin}/metrics")),
                ("operator", format!("http://{operator_admin}/metrics")),
            ],
            doc,
            spec,
            metrics,
            stop_admin,
            prometheus,
            http,
        })
    }
}

/// Scrapes as the chart does in a cluster: data-plane pods with `namespace`,
/// `sale`, `component` and `pod` target labels (the PodMonitor's relabelling),
/// the operator with `honor_labels` and its own pod's namespace.
fn scrape_config(gateway: SocketAddr, consumer: SocketAddr, operator: SocketAddr) -> String {
    format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - flashsale.rules.yaml
scrape_configs:
  - job_name: flashsale-dataplane
    static_configs:
      - targets: ["{gateway}"]
        labels: {{ namespace: {NAMESPACE}, sale: {SALE}, component: gateway, pod: {SALE}-gateway-0 }}
      - targets: ["{consumer}"]
        labels: {{ namespace: {NAMESPACE}, sale: {SALE}, component: consumer, pod: {SALE}-consumer-0 }}
  - job_name: flashsale-operator
    honor_labels: true
    static_configs:
      - targets: ["{operator}"]
        labels: {{ namespace: flashsale-system, pod: flashsale-0 }}
"#
    )
}

impl Rig {
    /// `flashsale crowd` against the gateway: accepted, sold out, limit
    /// reached and rate-limited answers. `paced`: about a minute at a steady
    /// rate (for the picture), else as fast as answered.
    fn crowd(&self, paced: bool) -> anyhow::Result<Process> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("crowd")
            .args(["--gateways", &self.gateway_http.to_string()])
            .args(["--sale", SALE, "--skus", "tee,mug"])
            .args(["--connections", "8", "--retry-fraction", "0.1"])
            .env("TOKEN_SECRET", SECRET);
        if paced {
            cmd.args(["--users", "2000", "--requests", "6000", "--rate", "100"])
                .args(["--max-seconds", "70"]);
        } else {
            cmd.args(["--users", "300", "--requests", "3000"])
                .args(["--max-seconds", "20"]);
        }
        Process::spawn("crowd", &mut cmd, self.dir.path())
    }

    /// One round of what the operator does for the sale: the reconciler's
    /// status from Redis' counters, and the autoscaler's reading of load
    /// reports and consumer lag, decided by the scaling algorithm.
    async fn operator_round(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        scaler: &mut Scaler,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let id = self.doc.id();
        let counters = dataplane::counters::product_counters(conn, &id, &self.doc.spec).await?;
        let now = Timestamp::now();
        let products: Vec<ProductStatus> = counters
            .into_iter()
            .flatten()
            .map(|c| ProductStatus::from_counters(&c, None))
            .collect();
        let status = FlashSaleStatus {
            phase: Some(SalePhase::Active),
            remaining: Some(products.iter().map(|p| p.remaining).sum()),
            products,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Reconciled".into(),
                message: "the sale closes later".into(),
                last_transition_time: Time(now),
                observed_generation: Some(1),
            }],
            ..Default::default()
        };
        self.metrics.sales.observe_status(NAMESPACE, SALE, &status);
        self.metrics.observe(started.elapsed(), None);

        let sale = SaleLabels::new(NAMESPACE, SALE);
        let published = load_report::read_reports(conn, &id, now.as_millisecond()).await?;
        let connections: i64 = published.iter().map(|r| r.connections).sum();
        let rps: f64 = published.iter().map(|r| r.requests_per_second).sum();
        self.metrics
            .sales
            .observe_gateway_load(&sale, connections, rps, published.len());
        let reports = observe::reports(&published);
        let pods: Vec<PodReadiness> = published
            .iter()
            .map(|r| PodReadiness {
                name: r.pod.clone(),
                ready: true,
            })
            .collect();
        let decision = operator::scaling::decide_gateway(
            &settings::gateway(&self.spec),
            &GatewayObservation {
                current_replicas: scaler.gateways,
                pods: &pods,
                reports: &reports,
            },
            &scaler.gateway,
            now,
        );
        let scaled = decision.desired_replicas != scaler.gateways;
        self.metrics.sales.observe_decision(
            &sale.workload("gateway"),
            scaler.gateways,
            decision.desired_replicas,
            &decision.driver.to_string(),
            scaled,
        );
        scaler.gateways = decision.desired_replicas;
        scaler.gateway = decision.state;

        let lag = dataplane::lag::consumer_lag(conn, &id, &self.doc.spec)
            .await?
            .backlog();
        self.metrics.sales.observe_consumer_lag(&sale, lag);
        let decision = operator::scaling::decide_consumer(
            &settings::consumer(&self.spec),
            scaler.consumers,
            Some(lag),
            &scaler.consumer,
            now,
        );
        let scaled = decision.desired_replicas != scaler.consumers;
        self.metrics.sales.observe_decision(
            &sale.workload("consumer"),
            scaler.consumers,
            decision.desired_replicas,
            &decision.driver.to_string(),
            scaled,
        );
        scaler.consumers = decision.desired_replicas;
        scaler.consumer = decision.state;
        Ok(())
    }

    fn dump_logs(&self) {
        eprintln!("--- gateway log ---\n{}", self.gateway.log());
        eprintln!("--- consumer log ---\n{}", self.consumer.log());
        eprintln!("--- prometheus log ---\n{}", self.prometheus.log());
    }
}

/// The autoscaler's memory for the one sale.
struct Scaler {
    gateways: i32,
    consumers: i32,
    gateway: ScalingState,
    consumer: ScalingState,
}

/// One query to evaluate, and where it comes from (for the failure message).
#[derive(Debug)]
struct Query {
    origin: String,
    expr: String,
    /// A sale dashboard query: its series must carry the sale's labels.
    per_sale: bool,
}

/// Every target of every panel (rows' nested panels included) and every
/// templating query of the chart's dashboards.
fn dashboard_queries() -> anyhow::Result<Vec<Query>> {
    let mut out = Vec::new();
    for name in ["sale", "operator"] {
        let board: Value = serde_json::from_str(&chart_file(&format!("dashboards/{name}.json"))?)?;
        let mut panels: Vec<&Value> = Vec::new();
        for p in board["panels"].as_array().into_iter().flatten() {
            panels.push(p);
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().context("a target without expr")?;
                out.push(Query {
                    origin: format!("{name}.json panel {:?} target {}", p["title"], t["refId"]),
                    expr: expr.to_string(),
                    per_sale: name == "sale",
                });
            }
        }
        for v in board["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] != "query" {
                continue;
            }
            let q = v["query"]["query"]
                .as_str()
                .context("a variable without query")?;
            // Grafana's label_values(selector, label): the selector is PromQL.
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(selector, _)| selector.trim())
                .with_context(|| format!("variable {}: only label_values() is used", v["name"]))?;
            out.push(Query {
                origin: format!("{name}.json variable {}", v["name"]),
                expr: inner.to_string(),
                per_sale: false,
            });
        }
    }
    Ok(out)
}

fn rule_queries() -> anyhow::Result<Vec<Query>> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&chart_file("rules/flashsale.rules.yaml")?)?;
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            out.push(Query {
                origin: format!("alert {:?}", rule["alert"].as_str().unwrap_or("?")),
                expr: rule["expr"]
                    .as_str()
                    .context("a rule without expr")?
                    .to_string(),
                per_sale: false,
            });
        }
    }
    Ok(out)
}

/// Grafana's variables as the dashboard would have them for this sale.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$namespace", NAMESPACE)
        .replace("$sale", SALE)
}

/// The metric names a PromQL expression selects: identifiers left once
/// strings, label matchers, ranges and grouping clauses (`by (..)`, `on (..)`)
/// are removed, that are not functions, aggregations, keywords or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 8] = [
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    ];
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Strings, {matchers} and [ranges] out.
    let mut clean = String::new();
    let mut chars = expr.chars();
    let mut nested = 0;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' if nested == 0 => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                clean.push(' ');
            }
            '"' | '\'' | '`' => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
            }
            '{' | '[' => nested += 1,
            '}' | ']' => {
                nested -= 1;
                clean.push(' ');
            }
            _ if nested > 0 => {}
            _ => clean.push(c),
        }
    }
    let bytes = clean.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let next_char = |from: usize| clean[from..].trim_start().as_bytes().first().copied();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_ident(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let token = &clean[start..i];
        let lower = token.to_ascii_lowercase();
        if GROUPING.contains(&lower.as_str()) {
            if next_char(i) == Some(b'(') {
                // Skip the label list up to its closing parenthesis.
                if let Some(close) = clean[i..].find(')') {
                    i += close + 1;
                }
            }
            continue;
        }
        // An aggregation: `sum(`, or `sum by (..) (`.
        let rest = clean[i..].trim_start();
        let aggregates = ["by", "without"].iter().any(|g| {
            rest.strip_prefix(g)
                .is_some_and(|r| r.trim_start().starts_with('('))
        });
        if KEYWORDS.contains(&lower.as_str())
            || token.starts_with(|c: char| c.is_ascii_digit())
            || next_char(i) == Some(b'(')
            || aggregates
        {
            continue;
        }
        names.insert(token.to_string());
    }
    names
}

/// Metric names in a Prometheus text exposition (`_bucket`, `_sum`,
/// `_count` samples included, as Prometheus stores them).
fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_runs_on_real_metrics() -> anyhow::Result<()> {
    let rig = Rig::start().await?;
    let outcome = exercise_and_check(&rig).await;
    if outcome.is_err() {
        rig.dump_logs();
    }
    let _ = rig.stop_admin.send(true);
    outcome
}

async fn exercise_and_check(rig: &Rig) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(rig.redis_url.as_str())?
        .get_connection_manager()
        .await?;
    let mut scaler = Scaler {
        gateways: 1,
        consumers: 1,
        gateway: ScalingState::default(),
        consumer: ScalingState::default(),
    };
    let picture = std::env::var_os("FLASHSALE_DASHBOARD_SVG").map(|p| workspace().join(p));
    rig.operator_round(&mut conn, &mut scaler).await?;
    // The operator follows along every second while the crowd buys, and for
    // a few scrapes after it, so rate() over 1m has points on both sides.
    let mut crowd = rig.crowd(picture.is_some())?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut after = 0;
    while after < 4 {
        rig.operator_round(&mut conn, &mut scaler).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(status) = crowd.child.try_wait()? {
            ensure!(status.success(), "crowd failed:\n{}", crowd.log());
            after += 1;
        }
        ensure!(Instant::now() < deadline, "crowd did not finish in 90 s");
    }

    // What the binaries export, from their own endpoints.
    let mut exported = BTreeSet::new();
    for (what, url) in &rig.endpoints {
        let text = rig.http.get(url).send().await?.text().await?;
        let names = exposition_names(&text);
        ensure!(!names.is_empty(), "{what} exports nothing at {url}");
        exported.extend(names);
    }
    // And what Prometheus stored from them, once every target is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored: BTreeSet<String> = loop {
        let up = rig.prometheus.query("up == 1").await?;
        let names: BTreeSet<String> =
            serde_json::from_value(rig.prometheus.api("label/__name__/values", &[]).await?)?;
        let all_up = up
            .get("result")
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
            == 3;
        if all_up && exported.iter().all(|n| names.contains(n)) {
            break names;
        }
        ensure!(
            Instant::now() < deadline,
            "Prometheus did not scrape all three targets: up = {up}; missing: {:?}",
            exported.difference(&names).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut queries = dashboard_queries()?;
    let dashboards = queries.len();
    queries.extend(rule_queries()?);
    ensure!(
        dashboards >= 30,
        "only {dashboards} dashboard queries found"
    );
    let mut failures = Vec::new();
    for q in &queries {
        let expr = substitute(&q.expr);
        if let Err(e) = rig.prometheus.query(&expr).await {
            failures.push(format!("{}: {expr}\n    error: {e:#}", q.origin));
            continue;
        }
        let names = metric_names(&expr);
        if names.is_empty() {
            failures.push(format!("{}: {expr}\n    names no metric", q.origin));
        }
        for name in &names {
            // `up` is Prometheus' own per-target series.
            let from_binary = exported.contains(name) || name == "up";
            if !from_binary || !stored.contains(name) {
                failures.push(format!(
                    "{}: {expr}\n    names {name}, which no binary exports",
                    q.origin
                ));
            } else if q.per_sale {
                let selector =
                    format!("count({name}{{namespace=\"{NAMESPACE}\", sale=\"{SALE}\"}})");
                let found = rig.prometheus.query(&selector).await?;
                if found["result"].as_array().is_none_or(Vec::is_empty) {
                    failures.push(format!(
                        "{}: {expr}\n    {name} has no series labelled namespace={NAMESPACE}, sale={SALE}",
                        q.origin
                    ));
                }
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} queries are wrong:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );

    // The data got through, labels and all: answers, phase, stock.
    let accepted = rig
        .prometheus
        .query(&format!(
            "sum(flashsale_gateway_requests_total{{namespace=\"{NAMESPACE}\", sale=\"{SALE}\", outcome=\"accepted\"}})"
        ))
        .await?;
    let accepted: f64 = accepted["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .context("no accepted count")?;
    ensure!(accepted > 0.0, "the crowd bought nothing");
    let phase = rig
        .prometheus
        .query(&substitute(
            "max by (phase) (flashsale_operator_sale_phase{namespace=\"$namespace\", sale=\"$sale\"}) == 1",
        ))
        .await?;
    ensure!(
        phase["result"][0]["metric"]["phase"] == "Active",
        "phase: {phase}"
    );

    // Prometheus loaded every rule and evaluates each without error.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rules = rig.prometheus.api("rules", &[]).await?;
        let all: Vec<&Value> = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        ensure!(
            all.len() == rule_queries()?.len(),
            "rules loaded: {}",
            all.len()
        );
        let bad: Vec<String> = all
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if bad.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "rules not healthy: {bad:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every flashsale metric a binary exports is documented.
    let ops = std::fs::read_to_string(workspace().join("docs/operations.md"))?;
    let undocumented: BTreeSet<&str> = exported
        .iter()
        .filter(|n| n.starts_with("flashsale_"))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .filter(|base| !ops.contains(&format!("`{base}`")) && !ops.contains(&format!("`{base}{{")))
        .collect();
    ensure!(
        undocumented.is_empty(),
        "not in docs/operations.md: {undocumented:?}"
    );

    if let Some(path) = picture {
        let board: Value = serde_json::from_str(&chart_file("dashboards/sale.json")?)?;
        let substitute = |e: &str| substitute(e).replace("[1m]", "[10s]");
        picture::draw(&rig.prometheus, &board, substitute, 90, 2, &path).await?;
        eprintln!("sale dashboard drawn to {}", path.display());
    }
    Ok(())
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names = metric_names(
        r#"sum by (namespace, sale) (rate(flashsale_a_total{outcome="x y", sale=~"a.*"}[2m])) / on (sale) group_left (pod) flashsale_b > 0.01 and up offset 5m"#,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "flashsale_a_total".to_string(),
            "flashsale_b".into(),
            "up".into()
        ])
    );
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m]))) > 0.05 or vector(0)",
    );
    assert_eq!(names, BTreeSet::from(["x_bucket".to_string()]));
    assert_eq!(
        metric_names("(sum(flashsale_operator_leader) or vector(0)) < 1"),
        BTreeSet::from(["flashsale_operator_leader".to_string()])
    );
}
