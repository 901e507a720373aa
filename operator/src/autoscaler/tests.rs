//! The autoscaler end to end: real `flashsale gateway` processes under a real
//! crowd publish their load into a real Redis, their accepted orders wait in
//! the product streams for a consumer group no consumer reads, and the
//! scaler's step writes scale patches, Events and status to a mocked API
//! server that asserts every request.
//!
//! Determinism: once both gateways have reported load, they are SIGKILLed —
//! like crashed pods, they leave their last reports behind — so the figures the
//! step reads are frozen; the step runs with a clock set just after them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use dataplane::gateway::load_report::{self, LoadReport};
use dataplane::keys::{CONSUMER_GROUP, ProductKeys};
use dataplane::lag;
use dataplane::spec::{DocumentMetadata, SaleDocument, SaleId};
use dataplane::tools::crowd::{self, CrowdConfig, Target};
use dataplane::tools::servers::{self, RedisServer};
use http::Method;
use jiff::{SignedDuration, Timestamp};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use super::*;
use crate::clock::ManualClock;
use crate::fixtures::{self, ApiServer};
use crate::resource::GatewayReplicas;

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/shop/deployments";
const SCALER: &str = "?&force=true&fieldManager=flashsale-scaler";
const STATUS: &str = "/apis/flashsale.dev/v1alpha1/namespaces/shop/flashsales/singles-day/status";
const PODS: &str = "/api/v1/namespaces/shop/pods?&labelSelector=app.kubernetes.io%2Fcomponent%3Dgateway%2Capp.kubernetes.io%2Finstance%3Dsingles-day";
const SELECTOR: &str = "app.kubernetes.io/component=gateway,app.kubernetes.io/instance=singles-day";
const TOKEN_SECRET: &str = "scaler-test-secret";
const TARGET_RPS: u32 = 40;
const TARGET_LAG: u32 = 100;

/// `target/debug/flashsale`, built once per test run (a package's tests only
/// get `CARGO_BIN_EXE_*` for its own binaries).
fn flashsale_binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let output = Command::new(cargo)
            .args(["build", "-p", "flashsale-dataplane", "--bin", "flashsale"])
            .current_dir(&workspace)
            .output()
            .map_err(|e| format!("run cargo build: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "cargo build of the data plane failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        Ok(target.join("debug").join("flashsale"))
    });
    built.clone().map_err(anyhow::Error::msg)
}

/// Gateway processes, killed on drop.
struct Gateways {
    children: Vec<Child>,
    addrs: Vec<SocketAddr>,
    logs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Gateways {
    fn start(doc: &SaleDocument, redis_url: &str, pods: &[&str]) -> anyhow::Result<Self> {
        let binary = flashsale_binary()?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("sale.yaml");
        std::fs::write(&config, serde_yaml::to_string(doc)?)?;
        let mut gateways = Self {
            children: Vec::new(),
            addrs: Vec::new(),
            logs: Vec::new(),
            _dir: dir,
        };
        for pod in pods {
            let addr = SocketAddr::from(([127, 0, 0, 1], servers::free_port()?));
            let log_path = gateways._dir.path().join(format!("{pod}.log"));
            let log = std::fs::File::create(&log_path)?;
            gateways.logs.push(log_path);
            let child = Command::new(&binary)
                .arg("gateway")
                .arg("--config")
                .arg(&config)
                .args([
                    "--listen",
                    &addr.to_string(),
                    "--admin-listen",
                    "127.0.0.1:0",
                ])
                .env("REDIS_URL", redis_url)
                .env("TOKEN_SECRET", TOKEN_SECRET)
                .env("POD_NAME", pod)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawn {}", binary.display()))?;
            gateways.children.push(child);
            gateways.addrs.push(addr);
        }
        Ok(gateways)
    }

    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        for (i, addr) in self.addrs.iter().enumerate() {
            let mut tries = 0;
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                if let Some(status) = self.children[i].try_wait()? {
                    bail!("gateway {addr} exited: {status}; {}", self.log(i));
                }
                tries += 1;
                ensure!(
                    tries < 200,
                    "gateway {addr} did not listen: {}",
                    self.log(i)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.logs[i]).unwrap_or_default()
    }

    /// SIGKILL: no graceful leave, so the last reports stay in Redis.
    fn kill(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Gateways {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The example sale, live around the real clock (the gateways check it), with
/// small targets so a test-sized crowd is several times the target.
fn live_sale(now: Timestamp) -> anyhow::Result<FlashSale> {
    let mut sale = fixtures::sale_with_finalizer();
    sale.spec.sale.start_time = now.checked_sub(SignedDuration::from_secs(60))?;
    sale.spec.sale.end_time = now.checked_add(SignedDuration::from_secs(600))?;
    sale.spec.gateway.replicas = GatewayReplicas {
        min: 2,
        max: 10,
        at_start: None,
    };
    sale.spec.gateway.target_requests_per_second_per_pod = TARGET_RPS;
    sale.spec.consumer.target_lag_per_pod = TARGET_LAG;
    Ok(sale)
}

fn scale(name: &str, replicas: i32, selector: Option<&str>) -> Value {
    json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": selector},
    })
}

fn pod_list(pods: &[(&str, bool)]) -> Value {
    let items: Vec<Value> = pods
        .iter()
        .map(|(name, ready)| {
            json!({
                "metadata": {"name": name, "namespace": "shop"},
                "status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": if *ready { "True" } else { "False" }}
                ]}
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
}

async fn expect_scale_read(server: &mut ApiServer, workload: &str, replicas: i32) {
    let selector = (workload == "singles-day-gateway").then_some(SELECTOR);
    server
        .expect(Method::GET, &format!("{DEPLOYMENTS}/{workload}/scale"))
        .await
        .respond(200, &scale(workload, replicas, selector));
}

/// Asserts the scale patch: method, URL with the scaler's field manager, body.
async fn expect_scale_write(server: &mut ApiServer, workload: &str, replicas: i32) {
    let call = server
        .expect(
            Method::PATCH,
            &format!("{DEPLOYMENTS}/{workload}/scale{SCALER}"),
        )
        .await;
    assert_eq!(
        call.body,
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": replicas}})
    );
    call.respond(200, &scale(workload, replicas, None));
}

async fn expect_scaled_event(server: &mut ApiServer, reason: &str, action: &str, note: &str) {
    let call = server
        .expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/shop/events?",
        )
        .await;
    assert_eq!(call.body["reason"], json!(reason), "{}", call.body);
    assert_eq!(call.body["action"], json!(action), "{}", call.body);
    assert_eq!(call.body["type"], json!("Normal"), "{}", call.body);
    assert_eq!(call.body["regarding"]["name"], json!("singles-day"));
    let got = call.body["note"].as_str().unwrap_or_default().to_string();
    assert!(
        got.starts_with(note),
        "note {got:?} should start with {note:?}"
    );
    call.echo();
}

/// Takes the status apply, asserts it, and stores it on `sale` as the server would.
async fn expect_status(
    server: &mut ApiServer,
    sale: &mut FlashSale,
    status: Value,
) -> anyhow::Result<()> {
    let call = server
        .expect(Method::PATCH, &format!("{STATUS}{SCALER}"))
        .await;
    assert_eq!(
        call.body,
        json!({"apiVersion": "flashsale.dev/v1alpha1", "kind": "FlashSale", "status": status})
    );
    sale.status = Some(serde_json::from_value(status)?);
    call.respond(200, &serde_json::to_value(&*sale)?);
    Ok(())
}

/// [`expect_status`], with whatever `heldBy`/`heldUntil` the step wrote
/// checked to be a hold's name and then left out of the comparison.
async fn expect_status_holding(
    server: &mut ApiServer,
    sale: &mut FlashSale,
    status: Value,
) -> anyhow::Result<()> {
    let call = server
        .expect(Method::PATCH, &format!("{STATUS}{SCALER}"))
        .await;
    let mut written = call.body["status"].clone();
    for workload in ["gateway", "consumer"] {
        if let Some(fields) = written[workload].as_object_mut() {
            if let Some(by) = fields.remove("heldBy") {
                let names = [
                    "scaleUpStabilization",
                    "scaleDownStabilization",
                    "scaleUpPolicy",
                    "scaleDownPolicy",
                ];
                assert!(names.iter().any(|n| by == json!(n)), "{by}");
            }
            fields.remove("heldUntil");
        }
    }
    assert_eq!(written, status);
    sale.status = Some(serde_json::from_value(call.body["status"].clone())?);
    call.respond(200, &serde_json::to_value(&*sale)?);
    Ok(())
}

/// Runs one step in a task, so the test can answer its requests meanwhile.
fn spawn_step(
    mut scaler: Autoscaler,
    ctx: &Arc<crate::reconciler::Context>,
    sale: &FlashSale,
    now: Timestamp,
) -> tokio::task::JoinHandle<(Autoscaler, Result<StepReport, Error>)> {
    let ctx = ctx.clone();
    let sale = sale.clone();
    tokio::spawn(async move {
        let result = scaler.step(&ctx, &sale, now).await;
        (scaler, result)
    })
}

async fn finish(
    task: tokio::task::JoinHandle<(Autoscaler, Result<StepReport, Error>)>,
) -> anyhow::Result<(Autoscaler, StepReport)> {
    let (scaler, result) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .context("the step did not finish (an unexpected API request?)")??;
    Ok((scaler, result?))
}

async fn create_groups(conn: &mut ConnectionManager, sale: &FlashSale) -> anyhow::Result<()> {
    let id = SaleId::new("shop", "singles-day");
    for p in &sale.spec.sale.products {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(ProductKeys::new(&id, &p.sku).stream())
            .arg(CONSUMER_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .exec_async(conn)
            .await?;
    }
    Ok(())
}

/// Polls until every pod has published a report of at least `rps` requests/s.
async fn wait_for_load(
    conn: &mut ConnectionManager,
    id: &SaleId,
    pods: &[&str],
    rps: f64,
) -> anyhow::Result<()> {
    for _ in 0..300 {
        let reports =
            load_report::read_reports(conn, id, Timestamp::now().as_millisecond()).await?;
        let loaded = pods.iter().all(|pod| {
            reports
                .iter()
                .any(|r| r.pod == *pod && r.requests_per_second >= rps)
        });
        if loaded {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateways never reported {rps} requests/s each")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reports_and_stream_lag_drive_scale_patches() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(flashsale_binary).await??;
    let redis = RedisServer::start()?;
    let mut conn = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    let mut sale = live_sale(Timestamp::now())?;
    let id = SaleId::new("shop", "singles-day");
    dataplane::warm::warm_sale(&mut conn, &id, &sale.spec.sale).await?;
    // The group a consumer would create; no consumer runs, so accepted orders wait.
    create_groups(&mut conn, &sale).await?;

    let pods = ["singles-day-gateway-a", "singles-day-gateway-b"];
    let doc = SaleDocument {
        metadata: DocumentMetadata {
            name: "singles-day".into(),
            namespace: "shop".into(),
        },
        spec: sale.spec.sale.clone(),
    };
    let mut gateways = Gateways::start(&doc, &redis.url(), &pods)?;
    gateways.wait_listening().await?;
    let load = tokio::spawn(crowd::run(CrowdConfig {
        gateways: gateways.addrs.clone(),
        sale: "singles-day".into(),
        skus: sale
            .spec
            .sale
            .products
            .iter()
            .map(|p| p.sku.clone())
            .collect(),
        buyers: crowd::Buyers::Random(5_000),
        connections: 8,
        requests: 1_000_000,
        max_duration: Duration::from_secs(60),
        retry_fraction: 0.0,
        rate: Some(f64::from(TARGET_RPS) * 6.0),
        token_secret: TOKEN_SECRET.as_bytes().to_vec(),
        target: Target::Purchase,
        source_ips: 0,
    }));
    // Each pod at well over twice the target, then the picture is frozen.
    wait_for_load(&mut conn, &id, &pods, f64::from(TARGET_RPS) * 2.5).await?;
    gateways.kill();
    load.abort();

    let reports: Vec<LoadReport> =
        load_report::read_reports(&mut conn, &id, Timestamp::now().as_millisecond()).await?;
    assert_eq!(
        reports.iter().map(|r| r.pod.as_str()).collect::<Vec<_>>(),
        pods
    );
    let backlog = lag::consumer_lag(&mut conn, &id, &sale.spec.sale)
        .await?
        .backlog();
    let newest = reports.iter().map(|r| r.at_ms).max().unwrap_or_default();
    let now = Timestamp::from_millisecond(newest + 1_000)?;

    // What the HPA algorithm makes of these figures. Gateway: every pod ready
    // and reporting, so ceil(Σ requests/s ÷ target); from 2 pods the default
    // scale-up policies allow max(2 + 4 pods, 2 × 200 %) = 6; max is 10.
    let rps_sum: f64 = reports.iter().map(|r| r.requests_per_second).sum();
    let gateway_to = ((rps_sum / f64::from(TARGET_RPS)).ceil() as i32).min(6);
    assert!(gateway_to >= 5, "Σ {rps_sum} requests/s");
    // Consumers: ceil(backlog ÷ targetLagPerPod), from 1 pod at most 1 + 4 = 5.
    assert!(backlog > u64::from(TARGET_LAG) * 2, "backlog {backlog}");
    let consumer_to = (backlog.div_ceil(u64::from(TARGET_LAG)) as i32).min(5);
    let rps_status = (rps_sum * 10.0).round() / 10.0;
    // A proposal above what the policies allow is named as held by them.
    let gateway_held = (rps_sum / f64::from(TARGET_RPS)).ceil() as i32 > 6;
    let consumer_held = backlog.div_ceil(u64::from(TARGET_LAG)) > 5;

    let clock = Arc::new(ManualClock::new(now));
    let (ctx, mut server) = fixtures::context(clock);
    let task = spawn_step(Autoscaler::default(), &ctx, &sale, now);
    expect_scale_read(&mut server, "singles-day-gateway", 2).await;
    expect_scale_read(&mut server, "singles-day-consumer", 1).await;
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/redis")
        .await
        .respond(200, &fixtures::secret("redis", "url", &redis.url()));
    server
        .expect(Method::GET, PODS)
        .await
        .respond(200, &pod_list(&[(pods[0], true), (pods[1], true)]));
    expect_scale_write(&mut server, "singles-day-gateway", gateway_to).await;
    expect_scaled_event(
        &mut server,
        "ScaledGateway",
        &format!("Scale2To{gateway_to}"),
        &format!(
            "2 → {gateway_to} replicas (requestsPerSecond; 0 connections, {rps_status} requests/s over 2 report(s)): requestsPerSecond above target"
        ),
    )
    .await;
    expect_scale_write(&mut server, "singles-day-consumer", consumer_to).await;
    expect_scaled_event(
        &mut server,
        "ScaledConsumer",
        &format!("Scale1To{consumer_to}"),
        &format!(
            "1 → {consumer_to} replicas (consumerLag; {backlog} not persisted: {backlog} undelivered, 0 pending, from group lag): consumerLag above target"
        ),
    )
    .await;
    let scaled_at = serde_json::to_value(now)?;
    let mut status = json!({
        "gateway": {"replicas": 2, "desiredReplicas": gateway_to, "connections": 0,
                    "requestsPerSecond": rps_status, "lastScaleTime": scaled_at,
                    "drivingMetric": "requestsPerSecond"},
        "consumer": {"replicas": 1, "desiredReplicas": consumer_to, "lag": backlog,
                     "lastScaleTime": scaled_at},
    });
    if gateway_held {
        status["gateway"]["heldBy"] = json!("scaleUpPolicy");
    }
    if consumer_held {
        status["consumer"]["heldBy"] = json!("scaleUpPolicy");
    }
    expect_status(&mut server, &mut sale, status).await?;
    let (scaler, report) = finish(task).await?;
    assert_eq!(
        report.gateway,
        Some(Change {
            from: 2,
            to: gateway_to,
            driver: "requestsPerSecond".into(),
            hold: gateway_held.then_some(crate::scaling::Hold {
                by: crate::scaling::HeldBy::ScaleUpPolicy,
                until: None,
            }),
        })
    );
    assert!(report.status_written);
    // The same inputs and decisions reach the dashboards' metrics.
    let metrics = ctx.metrics.render()?;
    for line in [
        format!(r#"flashsale_operator_consumer_lag{{namespace="shop",sale="singles-day"}} {backlog}"#),
        r#"flashsale_operator_gateway_load_reports{namespace="shop",sale="singles-day"} 2"#.into(),
        format!(
            r#"flashsale_operator_desired_replicas{{namespace="shop",sale="singles-day",component="gateway"}} {gateway_to}"#
        ),
        r#"flashsale_operator_scale_changes_total{namespace="shop",sale="singles-day",component="consumer",driver="consumerLag"} 1"#.into(),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }

    // A second later the new pods are not ready yet and the figures have not
    // moved: the scale-up already made within the policies' 15 s period caps
    // any further rise, so nothing is written to the scale subresource; the
    // Redis URL is reused; the status records the new counts and keeps
    // lastScaleTime.
    let later = now.checked_add(SignedDuration::from_secs(1))?;
    let task = spawn_step(scaler, &ctx, &sale, later);
    expect_scale_read(&mut server, "singles-day-gateway", gateway_to).await;
    expect_scale_read(&mut server, "singles-day-consumer", consumer_to).await;
    let mut listed: Vec<(String, bool)> = pods.iter().map(|p| (p.to_string(), true)).collect();
    listed.extend((2..gateway_to).map(|i| (format!("singles-day-gateway-new{i}"), false)));
    let listed: Vec<(&str, bool)> = listed.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    server
        .expect(Method::GET, PODS)
        .await
        .respond(200, &pod_list(&listed));
    // Whether a window or policy holds the count now depends on how far the
    // frozen figures sit from the new count; `scaling`'s tables pin that down.
    expect_status_holding(
        &mut server,
        &mut sale,
        json!({
            "gateway": {"replicas": gateway_to, "desiredReplicas": gateway_to, "connections": 0,
                        "requestsPerSecond": rps_status, "lastScaleTime": scaled_at,
                        "drivingMetric": "requestsPerSecond"},
            "consumer": {"replicas": consumer_to, "desiredReplicas": consumer_to, "lag": backlog,
                         "lastScaleTime": scaled_at},
        }),
    )
    .await?;
    let (scaler, report) = finish(task).await?;
    assert_eq!(
        report.gateway.map(|c| (c.from, c.to)),
        Some((gateway_to, gateway_to))
    );
    assert_eq!(
        report.consumer.map(|c| (c.from, c.to)),
        Some((consumer_to, consumer_to))
    );

    // Nothing new: reads only, no write of any kind.
    let task = spawn_step(
        scaler,
        &ctx,
        &sale,
        later.checked_add(SignedDuration::from_secs(1))?,
    );
    expect_scale_read(&mut server, "singles-day-gateway", gateway_to).await;
    expect_scale_read(&mut server, "singles-day-consumer", consumer_to).await;
    server
        .expect(Method::GET, PODS)
        .await
        .respond(200, &pod_list(&listed));
    let (_, report) = finish(task).await?;
    assert!(!report.status_written);
    Ok(())
}

/// A sale created hours before its start: its Deployments come up at the
/// Kubernetes default of 1 (the reconciler leaves `replicas` out) and Redis is
/// not warmed yet — no load report, no order stream. The step still holds both
/// within the spec's bounds, without the `atStart` floor, which only applies
/// from `startTime − warmupSeconds`.
#[tokio::test]
async fn a_pending_sale_is_held_within_its_bounds() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut sale = fixtures::sale_with_finalizer();
    sale.spec.consumer.replicas.min = 2;
    assert_eq!(
        (
            sale.spec.gateway.replicas.min,
            sale.spec.gateway.replicas.at_start
        ),
        (2, Some(10))
    );
    let now = sale
        .spec
        .sale
        .warmup_start()
        .checked_sub(SignedDuration::from_hours(3))?;
    assert_eq!(
        sale.spec.sale.phase_at(now),
        dataplane::spec::Phase::Pending
    );

    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    let task = spawn_step(Autoscaler::default(), &ctx, &sale, now);
    expect_scale_read(&mut server, "singles-day-gateway", 1).await;
    expect_scale_read(&mut server, "singles-day-consumer", 1).await;
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/redis")
        .await
        .respond(200, &fixtures::secret("redis", "url", &redis.url()));
    // No gateway has reported, so no pod list.
    expect_scale_write(&mut server, "singles-day-gateway", 2).await;
    expect_scaled_event(
        &mut server,
        "ScaledGateway",
        "Scale1To2",
        "1 → 2 replicas (replicaBounds; 0 connections, 0 requests/s over 0 report(s)): current replicas 1 below minReplicas 2",
    )
    .await;
    expect_scale_write(&mut server, "singles-day-consumer", 2).await;
    expect_scaled_event(
        &mut server,
        "ScaledConsumer",
        "Scale1To2",
        "1 → 2 replicas (replicaBounds; 0 not persisted: no order stream yet): current replicas 1 below minReplicas 2",
    )
    .await;
    let scaled_at = serde_json::to_value(now)?;
    expect_status(
        &mut server,
        &mut sale,
        json!({
            "gateway": {"replicas": 1, "desiredReplicas": 2, "connections": 0,
                        "requestsPerSecond": 0.0, "lastScaleTime": scaled_at,
                        "drivingMetric": "replicaBounds"},
            "consumer": {"replicas": 1, "desiredReplicas": 2, "lag": 0,
                         "lastScaleTime": scaled_at},
        }),
    )
    .await?;
    let (scaler, report) = finish(task).await?;
    assert_eq!(report.idle, None);
    assert_eq!(
        report.gateway,
        Some(Change {
            from: 1,
            to: 2,
            driver: "replicaBounds".into(),
            hold: None,
        })
    );
    assert_eq!(
        report.consumer,
        Some(Change {
            from: 1,
            to: 2,
            driver: "replicaBounds".into(),
            hold: None,
        })
    );
    assert!(report.status_written);

    // A second before warmup, still Pending: both at min, no metric, so both
    // hold at 2 — no scale write; the status records the new counts.
    let later = sale
        .spec
        .sale
        .warmup_start()
        .checked_sub(SignedDuration::from_secs(1))?;
    let task = spawn_step(scaler, &ctx, &sale, later);
    expect_scale_read(&mut server, "singles-day-gateway", 2).await;
    expect_scale_read(&mut server, "singles-day-consumer", 2).await;
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/secrets/redis")
        .await
        .respond(200, &fixtures::secret("redis", "url", &redis.url()));
    expect_status(
        &mut server,
        &mut sale,
        json!({
            "gateway": {"replicas": 2, "desiredReplicas": 2, "connections": 0,
                        "requestsPerSecond": 0.0, "lastScaleTime": scaled_at,
                        "drivingMetric": "none"},
            "consumer": {"replicas": 2, "desiredReplicas": 2, "lag": 0,
                         "lastScaleTime": scaled_at},
        }),
    )
    .await?;
    let (_, report) = finish(task).await?;
    assert_eq!(report.gateway.map(|c| (c.from, c.to)), Some((2, 2)));
    assert_eq!(report.consumer.map(|c| (c.from, c.to)), Some((2, 2)));
    Ok(())
}

/// A sale whose Service (or another child) the API server refused is not
/// scaled: no request at all until the reconciler reports it whole again, and
/// the scaling history is kept meanwhile.
#[tokio::test]
async fn a_half_made_sale_is_not_scaled() -> anyhow::Result<()> {
    let now = Timestamp::now();
    let mut sale = live_sale(now)?;
    let refused = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: crate::conditions::READY.into(),
        status: "False".into(),
        reason: crate::conditions::APPLY_FAILED.into(),
        message: "cannot apply Service shop/singles-day-gateway: exceeded quota".into(),
        observed_generation: Some(1),
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
    };
    sale.status = Some(crate::resource::FlashSaleStatus {
        phase: Some(crate::resource::SalePhase::Active),
        conditions: vec![refused],
        ..Default::default()
    });
    let (ctx, mut server) = fixtures::context(Arc::new(ManualClock::new(now)));
    // The step finishes without a single request (an unanswered one would time out).
    let (scaler, report) = finish(spawn_step(Autoscaler::default(), &ctx, &sale, now)).await?;
    assert_eq!(report.idle, Some("children not all applied"));
    assert!(!report.status_written);

    // Whole again: the next step looks at the scale subresource.
    sale.status = None;
    let task = spawn_step(scaler, &ctx, &sale, now);
    let call = server.call().await;
    assert_eq!(
        (call.method.clone(), call.uri.clone()),
        (
            Method::GET,
            format!("{DEPLOYMENTS}/singles-day-gateway/scale")
        )
    );
    task.abort();
    Ok(())
}
