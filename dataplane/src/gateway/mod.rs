//! The gateway: takes the crowd, decides winners in Redis, answers losers at once.

pub mod commit;
pub mod error;
pub mod load_report;
pub mod observability;
pub mod openapi;
pub mod orders;
pub mod payment;
pub mod purchase;
pub mod push;
pub mod sale_page;
pub mod storefront;
pub mod tickets;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::Router;
use axum::http::HeaderName;
use axum::routing::{get, post};
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken as Shutdown;

use crate::breaker::Breaker;
use crate::durability::Durability;
use crate::keys::{ProductKeys, PurchaseKeys};
use crate::ratelimit::RateLimiters;
use crate::redis_conn::{ConnSettings, RedisConn, RedisConnError, RedisMode, RedisTarget};
use crate::spec::{Phase, SaleDocument, SaleId, SaleSpec};
use crate::token::TokenVerifier;

/// How a gateway is run (flags and environment of `flashsale gateway`).
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub redis_url: String,
    /// `None`: a cluster if `redis_url` lists several seeds (`RedisTarget::parse`).
    pub redis_mode: Option<RedisMode>,
    pub token_secret: Vec<u8>,
    /// This pod's name in load reports.
    pub pod: String,
    /// Longest wait for one Redis answer before the request gets a 503.
    pub redis_timeout: Duration,
    /// Take the client IP from this header's first address (behind a proxy).
    pub client_ip_header: Option<HeaderName>,
    /// Tolerated difference between this pod's clock and Redis' (local phase check).
    pub clock_skew: Duration,
    /// WebSocket push tuning.
    pub push: push::PushSettings,
    /// Payment callbacks are taken only with a provider key and an order store.
    pub payment: Option<payment::PaymentSettings>,
    /// `replica`: a purchase is answered 202 only once a replica holds it
    /// (default: `replica` in cluster mode, `local` standalone).
    pub durability: Option<Durability>,
    /// Longest a purchase batch waits for a replica (below `redis_timeout`).
    pub replica_wait: Duration,
    /// Most purchases of one product confirmed by one WAIT.
    pub commit_batch: usize,
}

impl GatewaySettings {
    pub fn new(redis_url: impl Into<String>, token_secret: impl Into<Vec<u8>>) -> Self {
        Self {
            redis_url: redis_url.into(),
            redis_mode: None,
            token_secret: token_secret.into(),
            pod: default_pod_name(),
            redis_timeout: Duration::from_millis(250),
            client_ip_header: None,
            clock_skew: Duration::from_secs(1),
            push: push::PushSettings::default(),
            payment: None,
            durability: None,
            replica_wait: Duration::from_millis(100),
            commit_batch: commit::DEFAULT_MAX_BATCH,
        }
    }
}

/// `POD_NAME`, else host name and pid: unique per process.
pub fn default_pod_name() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "local".into());
        format!("{}-{}", host.trim(), std::process::id())
    })
}

/// One product as the hot path needs it: precomputed keys and the sold-out flag.
pub struct ProductRuntime {
    pub sku: String,
    /// Per-user limit, refreshed from the sale's live spec.
    limit: AtomicU32,
    /// info, stock, buyers, idem, orders, stream, clock (the script's KEYS).
    pub keys: PurchaseKeys,
    pub layout: ProductKeys,
    /// Under `redis.durability: replica`, the product's group committer.
    pub committer: Option<commit::Committer>,
    pub sold_out: AtomicBool,
    /// Removed from the sale's live spec: no longer sold by this pod (it
    /// booted with it; its orders can still be looked up and paid).
    retired: AtomicBool,
    /// Whether this pod already logged the product's Redis key layout as
    /// another version's (logged once: every purchase of it is refused).
    pub layout_refused: AtomicBool,
    /// Once sold out, a snapshot of the product's idempotency records, so a
    /// client retrying a winning request is answered with its order from
    /// memory instead of a false "sold out" (no new record can appear while
    /// the stock is 0).
    pub replays: ArcSwapOption<Replays>,
    /// The product's own circuit breaker: in a cluster each product is in
    /// one slot, so a master that fails opens only its products' breakers
    /// and the others keep selling.
    pub breaker: Breaker,
    /// The sold-out answer, serialized once: the crowd after a sell-out is
    /// answered without building JSON per request.
    sold_out_body: axum::body::Bytes,
}

impl ProductRuntime {
    /// Units one buyer may hold (the script enforces it again in Redis).
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }
    /// Whether the sale's live spec still sells this product.
    pub fn on_sale(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
    }
    pub fn stock_key(&self) -> &str {
        &self.keys[1]
    }
    pub fn buyers_key(&self) -> &str {
        &self.keys[2]
    }
    pub fn idempotency_key(&self) -> &str {
        &self.keys[3]
    }
    pub fn orders_key(&self) -> &str {
        &self.keys[4]
    }

    pub fn sold_out_response(&self) -> axum::response::Response {
        use axum::response::IntoResponse;
        (
            axum::http::StatusCode::GONE,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.sold_out_body.clone(),
        )
            .into_response()
    }
}

/// A sold-out product's idempotency records by key: a request whose key is
/// not here cannot be a winner's retry, whoever sends it.
#[derive(Debug, Default)]
pub struct Replays {
    by_key: HashMap<String, Vec<(String, String)>>,
    /// The records it was read from (the hash's length then).
    records: usize,
}

impl Replays {
    /// From the `idem` hash's fields (`user \x1f key`) and order ids.
    pub fn new(records: HashMap<String, String>) -> Self {
        let count = records.len();
        let mut by_key: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (field, order) in records {
            if let Some((user, key)) = field.split_once('\x1f') {
                by_key
                    .entry(key.to_string())
                    .or_default()
                    .push((user.to_string(), order));
            }
        }
        Self {
            by_key,
            records: count,
        }
    }

    /// How many records it was read from.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Whether some winner used this key.
    pub fn has_key(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    /// The order `user` won with this key, if any.
    pub fn order(&self, user: &str, key: &str) -> Option<&str> {
        self.by_key
            .get(key)?
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, order)| order.as_str())
    }

    pub fn len(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Above this many records a product's replay snapshot is not taken; keyed
/// requests then go to Redis, which answers them correctly anyway.
const MAX_REPLAY_SNAPSHOT: usize = 200_000;

/// Figures the load report publishes.
#[derive(Default)]
pub struct LoadCounters {
    pub requests: AtomicU64,
    pub connections: AtomicI64,
}

pub struct Gateway {
    pub sale: SaleId,
    /// The sale's settings in force: the boot config, then each spec the
    /// operator publishes (`live`), without a restart.
    pub spec: ArcSwap<SaleSpec>,
    pub products: HashMap<String, ProductRuntime>,
    pub redis: RedisConn,
    /// What carries purchase scripts outside group commit: in a cluster a
    /// connection without re-routed retries (see the committers'), on one
    /// Redis the same as `redis` (its retries reconnect, never resend).
    pub purchases: RedisConn,
    pub verifier: TokenVerifier,
    /// Issues and checks this sale's purchase tickets.
    pub tickets: crate::ticket::TicketSigner,
    pub limits: RateLimiters,
    pub redis_timeout: Duration,
    pub client_ip_header: Option<HeaderName>,
    pub clock_skew: Duration,
    pub pod: String,
    pub load: LoadCounters,
    pub metrics: observability::PurchaseMetrics,
    /// This pod's WebSocket connections and its push channel.
    pub push: push::PushHub,
    /// Routes order events to the pod holding the user's socket.
    pub events: crate::events::Publisher,
    /// `order.accepted` events waiting to be routed in batches.
    pub accepted: tokio::sync::mpsc::Sender<(String, crate::events::OrderEvent)>,
    accepted_rx:
        std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<(String, crate::events::OrderEvent)>>>,
    /// Cancelled when the gateway stops (closes open WebSockets).
    pub shutdown: Shutdown,
    /// The payment callback's key and order store, when configured.
    pub payments: Option<payment::Payments>,
    /// The sale's Idempotency-Key records (`SaleKeys::idempotency`).
    pub idempotency_key: String,
    /// The sale page's snapshot, rebuilt by `sale_page::refresh`.
    pub sale_page: sale_page::SalePage,
    /// Replica acknowledgement of writes that carry a promise (`None`: local).
    pub replica_wait: Option<crate::durability::ReplicaWait>,
    /// The committers' loops, spawned with the background work.
    committers: std::sync::Mutex<Vec<commit::Worker>>,
    redis_target: RedisTarget,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Redis(#[from] RedisConnError),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serve: {0}")]
    Serve(std::io::Error),
    #[error("the token secret is empty; set TOKEN_SECRET")]
    EmptySecret,
    #[error(transparent)]
    TicketKey(#[from] crate::ticket::KeyError),
    #[error("login token key: {0}")]
    TokenKey(#[from] crate::jwt::KeyError),
    #[error("payment order store: {0}")]
    PaymentStore(#[from] crate::store::StoreError),
}

impl Gateway {
    /// Builds the gateway; Redis is connected lazily, so a gateway starts (and
    /// answers 503) while Redis is still down.
    pub fn new(doc: &SaleDocument, settings: &GatewaySettings) -> Result<Arc<Self>, GatewayError> {
        if settings.token_secret.is_empty() {
            return Err(GatewayError::EmptySecret);
        }
        let sale = doc.id();
        let redis_target = RedisTarget::parse(&settings.redis_url, settings.redis_mode)?;
        let conn_settings = ConnSettings {
            response_timeout: settings.redis_timeout,
            connection_timeout: settings.redis_timeout.max(Duration::from_millis(500)),
            retries: 1,
            max_delay: Duration::from_secs(1),
        };
        let replica_wait = settings
            .durability
            .unwrap_or_else(|| Durability::default_for(redis_target.mode))
            .wait(settings.replica_wait);
        // Committers' own connections: a WAIT blocks the connection it runs
        // on, so each product's batch confirms in parallel with the others'
        // (products beyond COMMIT_CONNECTIONS share them round-robin).
        // No re-routed retries on them: a purchase pipeline retried after its
        // node failed mid-way may already have run (and replicated), and a
        // second run would make a second order for a request without an
        // Idempotency-Key. A failure is a 503; the client's retry decides.
        let commit_settings = ConnSettings {
            retries: 0,
            ..conn_settings.clone()
        };
        let commit_conns = match replica_wait {
            Some(_) => (0..doc.spec.products.len().min(COMMIT_CONNECTIONS))
                .map(|_| redis_target.connect_lazy(&commit_settings))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let redis = redis_target.connect_lazy(&conn_settings)?;
        let purchases = match redis_target.mode {
            RedisMode::Cluster => redis_target.connect_lazy(&commit_settings)?,
            RedisMode::Standalone => redis.clone(),
        };
        let mut committers = Vec::new();
        let products = doc
            .spec
            .products
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let k = ProductKeys::new(&sale, &p.sku);
                let committer = replica_wait.map(|wait| {
                    let conn = commit_conns[i % commit_conns.len()].clone();
                    let (c, worker) = commit::Committer::new(
                        k.purchase_keys(),
                        conn,
                        wait,
                        settings.commit_batch,
                    );
                    committers.push(worker);
                    c
                });
                let runtime = ProductRuntime {
                    sku: p.sku.clone(),
                    limit: AtomicU32::new(p.per_user_limit),
                    keys: k.purchase_keys(),
                    layout: k,
                    committer,
                    sold_out: AtomicBool::new(false),
                    layout_refused: AtomicBool::new(false),
                    retired: AtomicBool::new(false),
                    replays: ArcSwapOption::empty(),
                    breaker: Breaker::new(5, Duration::from_secs(1)),
                    sold_out_body: axum::body::to_bytes(
                        axum::response::IntoResponse::into_response(purchase::sold_out(&p.sku))
                            .into_body(),
                        4096,
                    )
                    .now_or_never()
                    .and_then(Result::ok)
                    .unwrap_or_default(),
                };
                (p.sku.clone(), runtime)
            })
            .collect();
        let (accepted, accepted_rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
        Ok(Arc::new(Self {
            limits: RateLimiters::new(&doc.spec.rate_limits),
            spec: ArcSwap::from_pointee(doc.spec.clone()),
            products,
            redis,
            purchases,
            verifier: TokenVerifier::new(&settings.token_secret)?,
            tickets: crate::ticket::TicketSigner::new(&settings.token_secret, &sale)?,
            redis_timeout: settings.redis_timeout,
            client_ip_header: settings.client_ip_header.clone(),
            clock_skew: settings.clock_skew,
            pod: settings.pod.clone(),
            load: LoadCounters::default(),
            metrics: observability::PurchaseMetrics::new(),
            push: push::PushHub::new(
                crate::keys::SaleKeys::new(&sale),
                &settings.pod,
                settings.push.clone(),
            ),
            events: crate::events::Publisher::new(&sale),
            accepted,
            accepted_rx: std::sync::Mutex::new(Some(accepted_rx)),
            shutdown: Shutdown::new(),
            payments: settings
                .payment
                .as_ref()
                .map(payment::Payments::new)
                .transpose()?,
            redis_target,
            idempotency_key: crate::keys::SaleKeys::new(&sale).idempotency(),
            sale_page: sale_page::SalePage::new(),
            replica_wait,
            committers: std::sync::Mutex::new(committers),
            sale,
        }))
    }

    /// The phase by this pod's clock, widened by the skew allowance so only
    /// requests clearly outside the window are refused without asking Redis.
    pub fn local_phase(&self) -> Phase {
        let now = jiff::Timestamp::now();
        let skew = jiff::SignedDuration::try_from(self.clock_skew).unwrap_or_default();
        let early = now.checked_add(skew).unwrap_or(now);
        let late = now.checked_sub(skew).unwrap_or(now);
        let spec = self.spec.load();
        match (spec.phase_at(early), spec.phase_at(late)) {
            (Phase::Pending | Phase::Warming, _) => Phase::Pending,
            (_, Phase::Ended) => Phase::Ended,
            _ => Phase::Active,
        }
    }

    /// The public API.
    pub fn router(self: &Arc<Self>) -> Router {
        let mut router = Router::new();
        // This gateway's own sale by its literal path first: the router
        // prefers a static segment to a parameter, and a handler without a
        // path parameter saves axum its per-request allocations. A sale's
        // name is a Kubernetes name, so it never holds the router's `{`, `}`,
        // `*`, `:` or a `/`; a name that did (a local config is not checked
        // by the API server) is left to the parameter routes.
        // Other names, or this one percent-encoded, take the routes below,
        // which answer the same (404 unknown_sale unless it decodes to it).
        let name = &self.sale.name;
        if !name.is_empty() && !name.contains(['{', '}', '*', ':', '/']) {
            let own = format!("/v1/sales/{name}");
            router = router.route(&own, get(sale_page::get_this_sale)).route(
                &format!("{own}/purchase"),
                post(purchase::purchase_this_sale),
            );
        }
        router
            .route("/v1/sales/{sale}", get(sale_page::get_sale))
            .route("/v1/sales/{sale}/purchase", post(purchase::purchase))
            .route("/v1/sales/{sale}/tickets", post(tickets::issue))
            .route("/v1/orders/{id}", get(orders::get_order))
            .route("/v1/ws", get(push::ws))
            .route("/v1/payments/callback", post(payment::callback))
            .route(
                "/v1/ping",
                get(observability::ping).post(observability::ping_post),
            )
            .route("/shop/{sale}", get(storefront::page))
            .route("/openapi.json", get(openapi::serve))
            .fallback(observability::not_found)
            .method_not_allowed_fallback(observability::method_not_allowed)
            .with_state(Arc::clone(self))
    }

    /// `/metrics`, `/healthz`, `/readyz`, on their own port.
    pub fn admin_router(self: &Arc<Self>) -> Router {
        observability::admin_router(Arc::clone(self))
    }

    /// Background work: load reports (which also re-split the global rate
    /// limit), the sale page's snapshot (which also moves the sold-out
    /// flags), replay snapshots and rate-limiter housekeeping, the push
    /// channel subscription and registry refresh. Returns the load reporter,
    /// whose last act on shutdown is to take this pod out of the live set.
    pub fn spawn_background(self: &Arc<Self>, shutdown: Shutdown) -> JoinHandle<()> {
        let reporter = tokio::spawn(load_report::run(Arc::clone(self), shutdown.clone()));
        let gw = Arc::clone(self);
        tokio::spawn(crate::live::follow(
            self.redis.clone(),
            self.sale.clone(),
            shutdown.clone(),
            move |live| gw.apply_live(&live.spec),
        ));
        tokio::spawn(sale_page::refresh(Arc::clone(self), shutdown.clone()));
        tokio::spawn(load_replay_snapshots(Arc::clone(self), shutdown.clone()));
        tokio::spawn(push::subscribe(
            Arc::clone(self),
            self.redis_target.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(push::refresh_registry(Arc::clone(self), shutdown.clone()));
        let workers = self
            .committers
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        for worker in workers {
            worker.spawn();
        }
        let queued = self.accepted_rx.lock().ok().and_then(|mut rx| rx.take());
        if let Some(rx) = queued {
            tokio::spawn(route_accepted(Arc::clone(self), rx));
        }
        tokio::spawn(payment::migrate(Arc::clone(self), shutdown.clone()));
        let own = self.shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            own.cancel();
        });
        reporter
    }

    /// Takes a new spec from the operator: window, rate limits, per-user
    /// limits and purchase tickets change in place (stock and price live in
    /// Redis already).
    pub fn apply_live(&self, next: &SaleSpec) {
        for p in &next.products {
            if let Some(runtime) = self.products.get(&p.sku) {
                runtime.limit.store(p.per_user_limit, Ordering::Relaxed);
            }
        }
        for (sku, runtime) in &self.products {
            let removed = !next.products.iter().any(|p| &p.sku == sku);
            if runtime.retired.swap(removed, Ordering::Relaxed) != removed {
                tracing::warn!(sku, removed, "product removed from or returned to the sale");
            }
        }
        let known: Vec<String> = self.products.keys().cloned().collect();
        let added = crate::live::unknown_products(&known, next);
        if !added.is_empty() {
            tracing::warn!(
                ?added,
                "products added to the sale; new gateway pods sell them (the operator rolls them)"
            );
        }
        if self.limits.reconfigure(&next.rate_limits) {
            tracing::info!(limits = ?next.rate_limits, "rate limits changed");
        }
        self.spec.store(Arc::new(next.clone()));
    }

    pub fn sold_out(&self, sku: &str) -> bool {
        self.products
            .get(sku)
            .is_some_and(|p| p.sold_out.load(Ordering::Relaxed))
    }
}

/// Connections the purchase committers of one gateway use at most.
const COMMIT_CONNECTIONS: usize = 8;

/// Queued `order.accepted` events at most; beyond it they are dropped (a
/// push is best effort: the 202 told the buyer, and a resume shows the order).
const ACCEPTED_QUEUE: usize = 10_000;

/// Routes `order.accepted` events in batches of up to 500 per script call,
/// so a burst of winners costs Redis a few calls instead of one each.
async fn route_accepted(
    gw: Arc<Gateway>,
    mut rx: tokio::sync::mpsc::Receiver<(String, crate::events::OrderEvent)>,
) {
    let mut batch = Vec::with_capacity(500);
    while rx.recv_many(&mut batch, 500).await > 0 {
        let mut conn = gw.redis.clone();
        if let Err(e) = gw.events.publish_many(&mut conn, &batch).await {
            tracing::debug!(error = %e, events = batch.len(), "order.accepted not pushed");
        }
        batch.clear();
    }
}

/// A flagged product's replay snapshot is loaded here, once per flag (the
/// flags themselves follow the sale page's stock reads, `sale_page::refresh`,
/// which drops the snapshot when stock comes back); and the rate limiters'
/// housekeeping runs every 10 s.
async fn load_replay_snapshots(gw: Arc<Gateway>, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut housekeeping = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        housekeeping += 1;
        if housekeeping.is_multiple_of(20) {
            gw.limits.housekeeping();
        }
        for p in gw.products.values() {
            if !p.sold_out.load(Ordering::Relaxed) {
                continue;
            }
            // One HLEN per tick: a snapshot is (re)read when there is none,
            // or when the records' count moved. A unit that came back (a
            // payment timeout) and was sold again between two of this pod's
            // stock readings leaves it sold out: the new winner's key is read
            // in, or their retry here would be answered sold out.
            let mut conn = gw.redis.clone();
            let len: Result<usize, _> = redis::cmd("HLEN")
                .arg(p.idempotency_key())
                .query_async(&mut conn)
                .await;
            let n = match len {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "replay snapshot not checked");
                    continue;
                }
            };
            let held = p.replays.load().as_deref().map(Replays::records);
            if held != Some(n) {
                // Until the reload succeeds, keyed requests go to Redis
                // rather than to a snapshot known to be missing a winner.
                p.replays.store(None);
                load_replays(p, n, &mut conn, gw.replica_wait).await;
            }
        }
    }
}

/// Loads a sold-out product's replay snapshot. Under `replica` the records
/// are read in a pipeline that ends in the product's wait mark and WAIT, and
/// the snapshot is used only if a replica holds them: it answers retries 202
/// from memory, and a 202 is a promise.
async fn load_replays(
    p: &ProductRuntime,
    records: usize,
    conn: &mut RedisConn,
    replica_wait: Option<crate::durability::ReplicaWait>,
) {
    // Too many for memory: keyed requests go to Redis (the caller dropped
    // any older snapshot).
    if records > MAX_REPLAY_SNAPSHOT {
        tracing::debug!(sku = %p.sku, records, "too many records for a replay snapshot");
        return;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("HGETALL").arg(p.idempotency_key());
    let all: Result<HashMap<String, String>, _> = match replica_wait {
        None => pipe
            .query_async::<(HashMap<String, String>,)>(conn)
            .await
            .map(|(m,)| m),
        Some(wait) => {
            pipe.ignore_errors();
            wait.mark_and_wait(&mut pipe, &p.layout.wait_mark());
            let started = std::time::Instant::now();
            let key = p.idempotency_key();
            match pipe.query_async(&mut conn.on_master_of(key)).await {
                Ok(replies) => {
                    let (mut replies, held) = crate::durability::split_wait(
                        crate::durability::WaitPath::Replay,
                        replies,
                        started,
                    );
                    match (held, replies.pop()) {
                        (true, Some(Ok(v))) => {
                            redis::from_redis_value(v).map_err(redis::RedisError::from)
                        }
                        (true, Some(Err(e))) => Err(e),
                        _ => Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "no replica confirmed the replay snapshot",
                        ))),
                    }
                }
                Err(e) => Err(e),
            }
        }
    };
    match all {
        Ok(map) => {
            tracing::debug!(sku = %p.sku, records = map.len(), "replay snapshot loaded");
            p.replays.store(Some(Arc::new(Replays::new(map))));
            // Stock came back while this was read: the refresher cleared the
            // flag, then the snapshot, and this one may have landed after it.
            // Kept, it would answer the next sell-out's winners sold out.
            if !p.sold_out.load(Ordering::SeqCst) {
                p.replays.store(None);
            }
        }
        Err(e) => tracing::debug!(error = %e, "replay snapshot not loaded"),
    }
}

/// How long a stopping gateway waits to leave the live set: a Redis that
/// does not answer in this time must not hold the pod's exit.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the public and admin routers until `shutdown` fires; in-flight
/// requests finish first, then the pod leaves the live set, so it is gone
/// from Redis before the process exits: the other gateways take its share
/// of the rate limit at once, and a deleted sale's cleared keys stay cleared.
pub async fn serve(
    gw: Arc<Gateway>,
    public: TcpListener,
    admin: TcpListener,
    shutdown: Shutdown,
) -> Result<(), GatewayError> {
    let reporter = gw.spawn_background(shutdown.clone());
    let public_app = gw
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    let admin_app = gw.admin_router();
    let s1 = shutdown.clone();
    let s2 = shutdown.clone();
    let public_task =
        axum::serve(public, public_app).with_graceful_shutdown(async move { s1.cancelled().await });
    let admin_task =
        axum::serve(admin, admin_app).with_graceful_shutdown(async move { s2.cancelled().await });
    let (a, b) = tokio::join!(public_task, admin_task);
    if tokio::time::timeout(LEAVE_TIMEOUT, reporter).await.is_err() {
        tracing::warn!("left the live set unannounced: Redis did not answer in time");
    }
    a.map_err(GatewayError::Serve)?;
    b.map_err(GatewayError::Serve)?;
    Ok(())
}

/// Binds a listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router takes any sale name a local config may hold: one the
    /// router could not hold as a literal path is served by the `{sale}`
    /// routes alone (axum refuses, by panicking, a path with `{`, `}`, `*`
    /// where it does not expect them, or a segment starting with `:`).
    #[tokio::test]
    async fn the_router_builds_for_any_sale_name() -> Result<(), Box<dyn std::error::Error>> {
        for name in [
            "tour",
            "singles-day.2026",
            ":x",
            "a{b}",
            "x*",
            "a/b",
            "sp ace",
        ] {
            let mut doc = crate::tools::bench::doc("tour", &[("item", 1)])?;
            doc.metadata.name = name.to_string();
            let gw = Gateway::new(
                &doc,
                &GatewaySettings::new("redis://127.0.0.1:1/", b"secret".to_vec()),
            )?;
            let _ = gw.router();
        }
        Ok(())
    }

    #[test]
    fn replays_find_a_winner_by_key_then_user() {
        let records = HashMap::from([
            ("alice\x1fk1".to_string(), "item.A".to_string()),
            ("bob\x1fk1".to_string(), "item.B".to_string()),
            ("bob\x1fk2".to_string(), "item.C".to_string()),
        ]);
        let r = Replays::new(records);
        assert_eq!(r.len(), 3);
        assert!(r.has_key("k1") && r.has_key("k2") && !r.has_key("k3"));
        assert_eq!(r.order("alice", "k1"), Some("item.A"));
        assert_eq!(r.order("bob", "k1"), Some("item.B"));
        assert_eq!(r.order("alice", "k2"), None);
    }
}
