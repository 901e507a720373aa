//! Shared test harness: real Redis and PostgreSQL servers started per test,
//! sale documents, in-process gateways and consumers, consumer processes.
#![allow(dead_code)]

pub mod crowd;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dataplane::consumer::{Consumer, ConsumerSettings};
use dataplane::gateway::{self, Gateway, GatewaySettings};
use dataplane::redis_conn::{ConnSettings, RedisConn, RedisTarget};
use dataplane::spec::SaleDocument;
use dataplane::store::OrderStore;
use dataplane::tools::servers::{PostgresServer, RedisCluster, RedisServer};
use tokio_util::sync::CancellationToken;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const SECRET: &[u8] = b"test-secret";

/// A Redis and a PostgreSQL of this test's own.
pub struct Servers {
    pub redis: RedisServer,
    pub pg: PostgresServer,
}

impl Servers {
    pub fn start() -> Result<Self, dataplane::tools::servers::ServerError> {
        Ok(Self {
            redis: RedisServer::start()?,
            pg: PostgresServer::start()?,
        })
    }

    pub async fn redis_conn(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        redis::Client::open(self.redis.url())?
            .get_connection_manager()
            .await
    }

    pub async fn store(&self) -> Result<OrderStore, dataplane::store::StoreError> {
        let store = OrderStore::connect(&self.pg.url(), 2)?;
        store.migrate().await?;
        Ok(store)
    }
}

/// Where a test's Redis and PostgreSQL are: [`Servers`] (one Redis server)
/// or [`ClusterServers`] (a Redis Cluster).
pub trait Stores {
    fn redis_target(&self) -> RedisTarget;
    fn database_url(&self) -> String;
}

impl Stores for Servers {
    fn redis_target(&self) -> RedisTarget {
        RedisTarget::standalone(self.redis.url())
    }
    fn database_url(&self) -> String {
        self.pg.url()
    }
}

/// A Redis Cluster (3 masters, 3 replicas) and a PostgreSQL of this test's own.
pub struct ClusterServers {
    pub cluster: RedisCluster,
    pub pg: PostgresServer,
}

impl ClusterServers {
    pub fn start() -> Result<Self, dataplane::tools::servers::ServerError> {
        Ok(Self {
            cluster: RedisCluster::start()?,
            pg: PostgresServer::start()?,
        })
    }
}

impl Stores for ClusterServers {
    fn redis_target(&self) -> RedisTarget {
        RedisTarget {
            mode: dataplane::redis_conn::RedisMode::Cluster,
            urls: self.cluster.seed_urls(),
        }
    }
    fn database_url(&self) -> String {
        self.pg.url()
    }
}

/// A connection to `servers`' Redis, in its mode.
pub async fn redis_conn_of(
    servers: &impl Stores,
) -> Result<RedisConn, dataplane::redis_conn::RedisConnError> {
    servers
        .redis_target()
        .connect(&ConnSettings::default())
        .await
}

/// A Redis of this test's own (no PostgreSQL) and a connection to it, for
/// tests that drive the scripts directly.
pub async fn lone_redis()
-> Result<(RedisServer, redis::aio::ConnectionManager), Box<dyn std::error::Error + Send + Sync>> {
    let redis = RedisServer::start()?;
    let conn = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    Ok((redis, conn))
}

/// `servers`' order store, migrated.
pub async fn store_of(servers: &impl Stores) -> Result<OrderStore, dataplane::store::StoreError> {
    let store = OrderStore::connect(&servers.database_url(), 2)?;
    store.migrate().await?;
    Ok(store)
}

/// A sale open from one second ago for ten minutes, with `(sku, stock, limit)` products.
pub fn sale(name: &str, products: &[(&str, i64, u32)]) -> SaleDocument {
    let now = jiff::Timestamp::now();
    sale_window(
        name,
        products,
        now - jiff::SignedDuration::from_secs(1),
        now + jiff::SignedDuration::from_secs(600),
    )
}

pub fn sale_window(
    name: &str,
    products: &[(&str, i64, u32)],
    start: jiff::Timestamp,
    end: jiff::Timestamp,
) -> SaleDocument {
    let products: String = products
        .iter()
        .map(|(sku, stock, limit)| {
            format!(
                "    - {{ sku: {sku}, stock: {stock}, price: \"19.99\", perUserLimit: {limit} }}\n"
            )
        })
        .collect();
    let yaml = format!(
        "metadata: {{ name: {name}, namespace: test }}\nspec:\n  startTime: \"{start}\"\n  endTime: \"{end}\"\n  warmupSeconds: 0\n  products:\n{products}"
    );
    match SaleDocument::parse(&yaml, "test sale") {
        Ok(d) => d,
        Err(e) => panic!("test sale must parse: {e}\n{yaml}"),
    }
}

pub async fn warm(servers: &impl Stores, doc: &SaleDocument) -> TestResult {
    let mut conn = redis_conn_of(servers).await?;
    dataplane::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
    Ok(())
}

/// A gateway served in this process on free loopback ports.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), gateway::GatewayError>>,
}

impl RunningGateway {
    pub async fn start(
        doc: &SaleDocument,
        redis_url: &str,
        pod: &str,
    ) -> Result<Self, gateway::GatewayError> {
        let mut settings = GatewaySettings::new(redis_url, SECRET.to_vec());
        settings.pod = pod.to_string();
        Self::start_with(doc, &settings).await
    }

    /// A gateway on `servers`' Redis, in its mode.
    pub async fn start_on(
        doc: &SaleDocument,
        servers: &impl Stores,
        pod: &str,
    ) -> Result<Self, gateway::GatewayError> {
        Self::start_with(doc, &gateway_settings(servers, pod)).await
    }

    pub async fn start_with(
        doc: &SaleDocument,
        settings: &GatewaySettings,
    ) -> Result<Self, gateway::GatewayError> {
        Self::start_at(doc, settings, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// On a given public address: a restarted gateway where its clients were.
    pub async fn start_at(
        doc: &SaleDocument,
        settings: &GatewaySettings,
        public: SocketAddr,
    ) -> Result<Self, gateway::GatewayError> {
        let gw = Gateway::new(doc, settings)?;
        let public = gateway::bind(public).await?;
        let admin = gateway::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = public.local_addr().map_err(gateway::GatewayError::Serve)?;
        let admin_addr = admin.local_addr().map_err(gateway::GatewayError::Serve)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway::serve(gw.clone(), public, admin, shutdown.clone()));
        Ok(Self {
            addr,
            admin: admin_addr,
            gateway: gw,
            shutdown,
            task,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A gateway's settings for `servers`' Redis, in its mode.
pub fn gateway_settings(servers: &impl Stores, pod: &str) -> GatewaySettings {
    let target = servers.redis_target();
    let mut settings = GatewaySettings::new(target.url(), SECRET.to_vec());
    settings.redis_mode = Some(target.mode);
    settings.pod = pod.to_string();
    settings
}

/// Consumers run in this process.
pub struct RunningConsumers {
    pub shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningConsumers {
    pub async fn start(
        doc: &SaleDocument,
        servers: &impl Stores,
        n: usize,
    ) -> Result<Self, dataplane::consumer::ConsumerError> {
        let shutdown = CancellationToken::new();
        let target = servers.redis_target();
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut settings = ConsumerSettings::new(target.url(), servers.database_url());
            settings.redis_mode = Some(target.mode);
            settings.name = format!("test-consumer-{i}");
            settings.claim_idle = Duration::from_secs(2);
            settings.claim_every = Duration::from_millis(500);
            if let Some(c) = Consumer::start(doc, settings, &shutdown).await? {
                tasks.push(tokio::spawn(c.run(shutdown.clone())));
            }
        }
        Ok(Self { shutdown, tasks })
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Writes the sale document where a consumer process can read it.
pub fn write_doc(dir: &Path, doc: &SaleDocument) -> std::io::Result<PathBuf> {
    let path = dir.join("sale.yaml");
    let yaml = serde_yaml::to_string(doc).map_err(std::io::Error::other)?;
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// `flashsale consumer` as a child process (so it can be SIGKILLed).
pub fn spawn_consumer_process(
    config: &Path,
    servers: &Servers,
    name: &str,
    batch: usize,
    log: &Path,
) -> std::io::Result<Child> {
    spawn_consumer_process_with(config, servers, name, batch, &[], log)
}

/// `flashsale consumer` with extra flags.
pub fn spawn_consumer_process_with(
    config: &Path,
    servers: &Servers,
    name: &str,
    batch: usize,
    extra: &[&str],
    log: &Path,
) -> std::io::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("consumer")
        .arg("--config")
        .arg(config)
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--claim-idle-ms",
            "1000",
            "--claim-every-ms",
            "300",
        ])
        .arg("--batch-size")
        .arg(batch.to_string())
        .args(extra)
        .env("REDIS_URL", servers.redis.url())
        .env("DATABASE_URL", servers.pg.url())
        .env("POD_NAME", name)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

/// The currency of the test gateways' payments.
pub const CURRENCY: &str = "USD";

/// Gateway settings (pod `gw`) with payments on, in [`CURRENCY`], and the
/// payment provider's private key (base64) to sign callbacks with.
pub fn settings_with_payments(
    servers: &Servers,
) -> Result<(GatewaySettings, String), dataplane::gateway::payment::KeyError> {
    use dataplane::gateway::payment;
    let (private, public) = payment::keygen();
    let mut settings = GatewaySettings::new(servers.redis.url(), SECRET.to_vec());
    settings.pod = "gw".into();
    settings.payment = Some(payment::PaymentSettings {
        public_key: payment::parse_public_key(&public)?,
        database_url: servers.pg.url(),
        currency: CURRENCY.into(),
    });
    Ok((settings, private))
}

pub fn token(user: &str) -> String {
    match dataplane::token::issue(SECRET, user, 3600) {
        Ok(t) => t,
        Err(e) => panic!("signing a test token: {e}"),
    }
}

pub fn http() -> reqwest::Client {
    match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => panic!("http client: {e}"),
    }
}

/// One purchase of a unit of `sku` by `user`: the status and the JSON body.
pub async fn buy_one(
    gw: &RunningGateway,
    sale: &str,
    user: &str,
    sku: &str,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    buy_units(gw, sale, user, sku, 1).await
}

/// One purchase of `quantity` units of `sku` by `user`.
pub async fn buy_units(
    gw: &RunningGateway,
    sale: &str,
    user: &str,
    sku: &str,
    quantity: i64,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let resp = http()
        .post(gw.url(&format!("/v1/sales/{sale}/purchase")))
        .bearer_auth(token(user))
        .json(&serde_json::json!({"sku": sku, "quantity": quantity}))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

/// Rows in flashsale_orders for the sale and their distinct ids.
pub async fn order_rows(
    store: &OrderStore,
    sale: &str,
) -> Result<(i64, i64), Box<dyn std::error::Error + Send + Sync>> {
    let client = store.pool().get().await?;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT order_id) FROM flashsale_orders WHERE sale = $1",
            &[&sale],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether order `id`'s record in `orders` (a product's orders hash) reaches
/// `status` within `timeout`.
pub async fn order_reaches<C>(
    conn: &C,
    orders: &str,
    id: &str,
    status: dataplane::order::OrderStatus,
    timeout: Duration,
) -> bool
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync,
{
    eventually(timeout, || {
        let mut conn = conn.clone();
        async move {
            let raw: Option<String> = redis::cmd("HGET")
                .arg(orders)
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap_or(None);
            raw.and_then(|r| dataplane::order::OrderRecord::decode(id, &r))
                .is_some_and(|r| r.status == status)
        }
    })
    .await
}
