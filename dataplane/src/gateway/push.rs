//! `GET /v1/ws`: the WebSocket that pushes a user's order events.
//!
//! Per pod: one Redis subscription to this pod's channel, a map user → open
//! sockets, and a registry entry per connected user (`push:user:<user>` →
//! pod, TTL refreshed in batches). Per connection: one task, a small
//! bounded queue (a client that cannot keep up is disconnected), shrunk
//! tungstenite buffers, a ping every `ping_interval` and a close when no frame
//! came back within two intervals.
//!
//! On (re)connect the client passes what it last saw (`?seen=<order>:<status>,…`
//! or a `{"type":"resume","seen":{…}}` message); the server answers with the
//! current state of each of the user's orders it has not seen, then
//! `{"type":"synced"}`, then live events.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Gateway;
use super::error::{ApiError, ErrorBody};
use crate::events::{self, OrderEvent};
use crate::keys::SaleKeys;
use crate::order::{OrderRecord, OrderStatus};
use crate::redis_conn::RedisTarget;
use crate::scripts;

/// Push tuning, chosen for many idle connections.
#[derive(Clone, Debug)]
pub struct PushSettings {
    /// How often the server pings; a peer silent for two intervals is dropped.
    pub ping_interval: Duration,
    /// Events queued per connection before the client counts as too slow.
    pub queue_capacity: usize,
    /// Longest a single frame write may take before the client is dropped.
    pub send_timeout: Duration,
    /// TTL of a user's registry entry; refreshed every third of it.
    pub registry_ttl: Duration,
}

impl Default for PushSettings {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            queue_capacity: 64,
            send_timeout: Duration::from_secs(10),
            registry_ttl: Duration::from_secs(90),
        }
    }
}

/// tungstenite's read buffer per connection (its default is 128 KiB): client
/// frames here are pongs and a resume message, a few hundred bytes at most.
const READ_BUFFER: usize = 512;
/// Frames are written through at once (no write batching per connection).
const WRITE_BUFFER: usize = 0;
/// Bytes that may sit unwritten for one connection before writes fail.
const MAX_WRITE_BUFFER: usize = 64 * 1024;
/// Largest client message (a resume list of many orders).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

enum Outgoing {
    Event(Arc<str>),
    /// The pod's subscription was re-established: events may have been lost,
    /// so the connection sends a fresh snapshot.
    Resync,
}

/// What the hub shares with one connection's task. Kept small: the queue
/// allocates only when an event is waiting.
struct Connection {
    id: u64,
    queue: Mutex<VecDeque<Outgoing>>,
    notify: Notify,
    /// Set when the queue overflowed: the task closes the socket.
    overflowed: AtomicBool,
}

/// Counters for tests and the bench.
#[derive(Default)]
pub struct PushCounters {
    /// Events received on this pod's channel.
    pub received: AtomicU64,
    /// Events queued to a local socket.
    pub delivered: AtomicU64,
    /// Connections closed because they could not keep up.
    pub slow_disconnects: AtomicU64,
}

/// This pod's side of push routing.
pub struct PushHub {
    keys: SaleKeys,
    pod: String,
    channel: String,
    settings: PushSettings,
    connections: Mutex<HashMap<String, Vec<Arc<Connection>>>>,
    next_id: AtomicU64,
    pub counters: PushCounters,
}

impl PushHub {
    pub fn new(keys: SaleKeys, pod: &str, settings: PushSettings) -> Self {
        Self {
            channel: keys.push_channel(pod),
            keys,
            pod: pod.to_string(),
            settings,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            counters: PushCounters::default(),
        }
    }

    pub fn settings(&self) -> &PushSettings {
        &self.settings
    }

    /// Users with at least one socket on this pod.
    pub fn users(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Connection>>>> {
        // A panic while holding the map cannot leave it half-updated in a
        // way that matters (each operation is one insert/remove): keep going.
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a socket; true if it is the user's first on this pod.
    fn attach(&self, user: &str) -> (Arc<Connection>, bool) {
        let conn = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            overflowed: AtomicBool::new(false),
        });
        let mut map = self.lock();
        let list = map.entry(user.to_string()).or_default();
        list.push(Arc::clone(&conn));
        let first = list.len() == 1;
        (conn, first)
    }

    /// Removes a socket; true if it was the user's last on this pod.
    fn detach(&self, user: &str, id: u64) -> bool {
        let mut map = self.lock();
        let Some(list) = map.get_mut(user) else {
            return false;
        };
        list.retain(|c| c.id != id);
        if list.is_empty() {
            map.remove(user);
            true
        } else {
            false
        }
    }

    /// Queues a message for every socket of `user` here.
    fn dispatch(&self, user: &str, message: Outgoing) {
        let map = self.lock();
        let Some(list) = map.get(user) else {
            return;
        };
        let shared: Option<Arc<str>> = match &message {
            Outgoing::Event(json) => Some(Arc::clone(json)),
            Outgoing::Resync => None,
        };
        for c in list {
            let item = match &shared {
                Some(json) => Outgoing::Event(Arc::clone(json)),
                None => Outgoing::Resync,
            };
            c.push(item, self.settings.queue_capacity);
            self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn resync_all(&self) {
        let map = self.lock();
        for c in map.values().flatten() {
            c.push(Outgoing::Resync, self.settings.queue_capacity);
        }
    }
}

impl Connection {
    fn push(&self, item: Outgoing, capacity: usize) {
        let mut q = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.len() >= capacity {
            self.overflowed.store(true, Ordering::Relaxed);
        } else {
            q.push_back(item);
        }
        drop(q);
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Outgoing> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }
}

/// Query of `GET /v1/ws`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// The user token, for browsers (which cannot set headers on a
    /// WebSocket); `Authorization: Bearer` takes precedence.
    pub token: Option<String>,
    /// What the client last saw: `<orderId>:<status>` pairs, comma-separated.
    /// Orders listed with their current status are not sent again.
    pub seen: Option<String>,
}

/// The push socket. Checks, in order: the query (400 `bad_query`), the
/// `Authorization` header's size (400 `bad_header`), the token (401
/// `unauthenticated`: from `Authorization: Bearer`, else `?token=`), then the
/// WebSocket handshake (400 `not_websocket` for a plain GET or a handshake
/// axum refuses). A valid handshake is answered 101 Switching Protocols with
/// `Upgrade: websocket`, `Connection: upgrade` and `Sec-WebSocket-Accept`.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "push",
    params(
        WsQuery,
        ("Upgrade" = String, Header, pattern = "^websocket$", description = "The WebSocket handshake (RFC 6455): `websocket` (any letter case)"),
        ("Connection" = String, Header, pattern = "^Upgrade$", description = "The WebSocket handshake: a list holding the `Upgrade` token"),
        ("Sec-WebSocket-Version" = String, Header, pattern = "^13$", description = "The WebSocket handshake: `13`"),
        ("Sec-WebSocket-Key" = String, Header, pattern = "^[A-Za-z0-9+/]{22}==$", description = "The WebSocket handshake: 16 random bytes, base64"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket is open. The server sends `order.*` events (see OrderEvent) after a snapshot of the user's orders ended by `{\"type\":\"synced\",\"orders\":n}`; the client may send `{\"type\":\"resume\",\"seen\":{\"<orderId>\":\"<status>\"}}` to get the snapshot again",
            headers(
                ("Upgrade" = String, description = "websocket"),
                ("Connection" = String, description = "upgrade"),
                ("Sec-WebSocket-Accept" = String, description = "The handshake's answer to Sec-WebSocket-Key"),
            )),
        (status = 400, description = "bad_query (an unreadable query string), bad_header (Authorization over 4096 bytes or not text), or not_websocket: a plain GET, or a handshake header missing or wrong (checked after the token)", body = ErrorBody),
        (status = 401, description = "unauthenticated: missing, malformed, forged or expired token (checked before the handshake)", body = ErrorBody),
    )
)]
pub async fn ws(
    State(gw): State<Arc<Gateway>>,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::bad_request("bad_query", e.body_text()).into_response(),
    };
    let auth = match super::purchase::authorization(&headers) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let user = match auth {
        Some(h) => gw.verifier.user_from_header(Some(h)),
        None => match query.token.as_deref() {
            Some(t) => gw.verifier.user(t),
            None => gw.verifier.user_from_header(None),
        },
    };
    let user = match user {
        Ok(u) => u,
        Err(e) => return ApiError::unauthorized(e.to_string()).into_response(),
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return ApiError::bad_request("not_websocket", e.body_text()).into_response();
        }
    };
    let seen = parse_seen(query.seen.as_deref().unwrap_or(""));
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| {
            let span = tracing::debug_span!("ws", user = %user);
            session(gw, user, seen, socket).instrument(span)
        })
}

/// `id:status,id:status` → map; malformed pairs are ignored (the client then
/// simply gets that order's state again).
fn parse_seen(raw: &str) -> HashMap<String, OrderStatus> {
    raw.split(',')
        .filter_map(|pair| {
            let (id, status) = pair.trim().split_once(':')?;
            let status: OrderStatus =
                serde_json::from_value(serde_json::Value::from(status)).ok()?;
            Some((id.to_string(), status))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMessage {
    Resume {
        #[serde(default)]
        seen: HashMap<String, OrderStatus>,
    },
}

/// Why a session ended (for the log).
#[derive(Debug)]
enum Ended {
    ClientClosed,
    Shutdown,
    MissedPong,
    TooSlow,
    SendFailed,
}

async fn session(
    gw: Arc<Gateway>,
    user: String,
    seen: HashMap<String, OrderStatus>,
    socket: WebSocket,
) {
    gw.load.connections.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!("flashsale_push_connections").increment(1.0);
    let hub = &gw.push;
    let (conn, first) = hub.attach(&user);
    if first && let Err(e) = register(&gw, &user).await {
        // The socket still gets its snapshot and later resyncs; live events
        // reach it once the periodic refresh writes the entry.
        tracing::warn!(error = %e, "push registry entry not written");
    }
    let ended = run(&gw, &user, seen, &conn, socket).await;
    tracing::debug!(reason = ?ended, "websocket closed");
    if matches!(ended, Ended::TooSlow) {
        hub.counters
            .slow_disconnects
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("flashsale_push_slow_disconnects_total").increment(1);
    }
    if hub.detach(&user, conn.id) {
        let mut redis = gw.redis.clone();
        let removed: Result<i64, _> = scripts::UNREGISTER
            .key(hub.keys.push_user(&user))
            .arg(&hub.pod)
            .invoke_async(&mut redis)
            .await;
        if let Err(e) = removed {
            tracing::debug!(error = %e, "push registry entry left to expire");
        }
    }
    gw.load.connections.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!("flashsale_push_connections").decrement(1.0);
}

async fn register(gw: &Gateway, user: &str) -> Result<(), redis::RedisError> {
    let mut redis = gw.redis.clone();
    redis::cmd("SET")
        .arg(gw.push.keys.push_user(user))
        .arg(&gw.push.pod)
        .arg("EX")
        .arg(gw.push.settings.registry_ttl.as_secs().max(1))
        .exec_async(&mut redis)
        .await
}

/// Per-connection state of what was sent, so an order's status never goes
/// backwards on this socket and nothing is sent twice.
#[derive(Default)]
struct Sent(HashMap<String, u8>);

impl Sent {
    /// True if `status` is news for `order` (and records it).
    fn admit(&mut self, order: &str, status: OrderStatus) -> bool {
        let r = events::rank(status);
        match self.0.get(order) {
            Some(&prev) if prev >= r => false,
            _ => {
                self.0.insert(order.to_string(), r);
                true
            }
        }
    }
}

async fn run(
    gw: &Gateway,
    user: &str,
    seen: HashMap<String, OrderStatus>,
    conn: &Connection,
    mut socket: WebSocket,
) -> Ended {
    let settings = &gw.push.settings;
    let mut sent = Sent::default();
    for (id, status) in &seen {
        sent.admit(id, *status);
    }
    if let Err(e) = send_snapshot(gw, user, &mut sent, &mut socket).await {
        return e;
    }
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.ping_interval,
        settings.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let shutdown = gw.shutdown.clone();
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let Some(Ok(msg)) = incoming else { return Ended::ClientClosed };
                last_heard = Instant::now();
                match msg {
                    Message::Text(text) => {
                        if let Ok(ClientMessage::Resume { seen }) = serde_json::from_str(text.as_str()) {
                            sent = Sent::default();
                            for (id, status) in &seen {
                                sent.admit(id, *status);
                            }
                            if let Err(e) = send_snapshot(gw, user, &mut sent, &mut socket).await {
                                return e;
                            }
                        }
                    }
                    Message::Close(_) => return Ended::ClientClosed,
                    // Pings are answered by tungstenite; pongs only prove life.
                    _ => {}
                }
            }
            _ = conn.notify.notified() => {
                if conn.overflowed.load(Ordering::Relaxed) {
                    let _ = socket.send(Message::Close(None)).await;
                    return Ended::TooSlow;
                }
                while let Some(item) = conn.pop() {
                    let result = match item {
                        Outgoing::Event(json) => match news(&mut sent, &json) {
                            Admit::Skip => continue,
                            Admit::Send => {
                                send(settings, &mut socket, Message::Text(Utf8Bytes::from(&*json))).await
                            }
                            Admit::AcceptedFirst(accepted) => {
                                match send(settings, &mut socket, Message::Text(accepted.into())).await {
                                    Ok(()) => {
                                        send(settings, &mut socket, Message::Text(Utf8Bytes::from(&*json)))
                                            .await
                                    }
                                    Err(e) => Err(e),
                                }
                            }
                        },
                        Outgoing::Resync => send_snapshot(gw, user, &mut sent, &mut socket).await,
                    };
                    if let Err(e) = result {
                        return e;
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > settings.ping_interval * 2 {
                    let _ = socket.send(Message::Close(None)).await;
                    return Ended::MissedPong;
                }
                if let Err(e) = send(settings, &mut socket, Message::Ping(Default::default())).await {
                    return e;
                }
            }
            _ = shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return Ended::Shutdown;
            }
        }
    }
}

/// What to do with a live event on this socket.
enum Admit {
    Skip,
    Send,
    /// Send this `order.accepted` first, then the event.
    AcceptedFirst(String),
}

/// Whether a live event's order/status is news on this socket. The first
/// event of an order that is not `accepted` is preceded by its
/// `order.accepted`: that push may still be on its way (the gateway routes
/// it in batches, a consumer confirms within milliseconds), and a client sees
/// every order start at accepted; the late original is then dropped as old.
fn news(sent: &mut Sent, json: &str) -> Admit {
    let Ok(event) = serde_json::from_str::<events::OrderEvent>(json) else {
        return Admit::Skip;
    };
    let first_sight = !sent.0.contains_key(&event.order_id);
    if !sent.admit(&event.order_id, event.status) {
        return Admit::Skip;
    }
    if first_sight && event.status != OrderStatus::Accepted {
        let accepted =
            events::OrderEvent::new(&event.order_id, &event.sku, OrderStatus::Accepted, None);
        if let Ok(json) = serde_json::to_string(&accepted) {
            return Admit::AcceptedFirst(json);
        }
    }
    Admit::Send
}

async fn send(settings: &PushSettings, socket: &mut WebSocket, msg: Message) -> Result<(), Ended> {
    match tokio::time::timeout(settings.send_timeout, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ended::SendFailed),
        Err(_) => Err(Ended::TooSlow),
    }
}

/// Sends the current state of each of the user's orders not yet sent on
/// this socket, then `{"type":"synced","orders":n}`.
async fn send_snapshot(
    gw: &Gateway,
    user: &str,
    sent: &mut Sent,
    socket: &mut WebSocket,
) -> Result<(), Ended> {
    let settings = &gw.push.settings;
    let orders = match user_orders(gw, user).await {
        Ok(o) => o,
        Err(e) => {
            // Live events still flow; the client can ask again with a resume message.
            tracing::warn!(error = %e, "order snapshot unavailable");
            let body = r#"{"type":"snapshot_unavailable"}"#;
            return send(settings, socket, Message::Text(body.into())).await;
        }
    };
    let total = orders.len();
    for (sku, rec) in orders {
        if !sent.admit(&rec.id, rec.status) {
            continue;
        }
        let at = rec.status_since();
        let mut event = OrderEvent::new(&rec.id, &sku, rec.status, rec.reason);
        // The change's time, not the snapshot's.
        event.at = at;
        event.resumed = true;
        let json = serde_json::to_string(&event).unwrap_or_default();
        send(settings, socket, Message::Text(json.into())).await?;
    }
    let synced = format!(r#"{{"type":"synced","orders":{total}}}"#);
    send(settings, socket, Message::Text(synced.into())).await
}

/// Most orders of one product a snapshot walks (a user's chain is as long as
/// the orders they ever placed there; this only bounds a pathological one).
const MAX_SNAPSHOT_ORDERS: usize = 1000;

/// The user's orders across the sale's SKUs: `orders_of.lua` per product
/// (the user's chain of records, newest first). Every product the sale ever
/// warmed counts (the `meta` record's list), not only those this pod sells:
/// a product added after it booted, or removed since, keeps its orders in
/// the snapshot. This pod's products and that list are read in one round
/// trip; a second one only for products the pod does not know.
async fn user_orders(
    gw: &Gateway,
    user: &str,
) -> Result<Vec<(String, OrderRecord)>, redis::RedisError> {
    let mine: Vec<String> = gw.products.keys().cloned().collect();
    let read = async {
        let mut redis = gw.redis.clone();
        let (chains, all) = futures::future::try_join(
            chains_of(gw, user, &mine),
            crate::warm::known_skus(&mut redis, &gw.sale, mine.iter().cloned()),
        )
        .await?;
        let others: Vec<String> = all.into_iter().filter(|s| !mine.contains(s)).collect();
        let more = chains_of(gw, user, &others).await?;
        Ok::<_, redis::RedisError>(
            mine.iter()
                .zip(chains)
                .chain(others.iter().zip(more))
                .map(|(sku, chain)| (sku.clone(), chain))
                .collect::<Vec<_>>(),
        )
    };
    let chains = tokio::time::timeout(gw.redis_timeout * 4, read)
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
        })??;
    let mut out = Vec::new();
    for (sku, chain) in chains {
        for pair in chain.chunks_exact(2) {
            if let Some(rec) = OrderRecord::decode(&pair[0], &pair[1]) {
                out.push((sku.clone(), rec));
            }
        }
    }
    out.sort_by(|a, b| a.1.at.cmp(&b.1.at).then_with(|| a.1.id.cmp(&b.1.id)));
    Ok(out)
}

/// `orders_of.lua` for each of `skus`, concurrently: calls on the
/// multiplexed connection travel together (one round trip); each is an
/// EVALSHA that loads the script only on NOSCRIPT.
async fn chains_of(
    gw: &Gateway,
    user: &str,
    skus: &[String],
) -> Result<Vec<Vec<String>>, redis::RedisError> {
    let calls = skus.iter().map(|sku| {
        let keys = crate::keys::ProductKeys::new(&gw.sale, sku);
        let mut redis = gw.redis.clone();
        async move {
            scripts::ORDERS_OF
                .key(keys.buyers())
                .key(keys.orders())
                .arg(user)
                .arg(MAX_SNAPSHOT_ORDERS)
                .invoke_async::<Vec<String>>(&mut redis)
                .await
        }
    });
    futures::future::try_join_all(calls).await
}

/// Keeps this pod subscribed to its channel and routes what arrives to
/// local sockets. After a re-subscription every socket resyncs, since
/// events sent while unsubscribed are gone.
///
/// In a Redis Cluster a PUBLISH reaches every node, so any node will do:
/// each attempt takes the next seed, and a subscriber whose node died
/// moves on to another.
pub(super) async fn subscribe(gw: Arc<Gateway>, redis: RedisTarget, shutdown: CancellationToken) {
    let hub = &gw.push;
    let mut delay = Duration::from_millis(100);
    let mut subscribed_before = false;
    let mut attempts = 0usize;
    loop {
        let url = redis.pubsub_url(attempts);
        attempts = attempts.wrapping_add(1);
        let attempt = async {
            let client = redis::Client::open(url)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&hub.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), attempt) => r,
            _ = shutdown.cancelled() => return,
        };
        match pubsub {
            Ok(Ok(pubsub)) => {
                tracing::info!(channel = %hub.channel, url, "push channel subscribed");
                delay = Duration::from_millis(100);
                if subscribed_before {
                    hub.resync_all();
                }
                subscribed_before = true;
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        m = messages.next() => m,
                        _ = shutdown.cancelled() => return,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    hub.counters.received.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("flashsale_push_received_total").increment(1);
                    if let Some((user, json)) = events::decode(&payload) {
                        hub.dispatch(user, Outgoing::Event(Arc::from(json)));
                    }
                }
                tracing::warn!(channel = %hub.channel, "push subscription lost; resubscribing");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "push channel not subscribed; retrying"),
            Err(_) => tracing::warn!("push channel subscription timed out; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Refreshes the registry entries of every user connected here, in
/// pipelined batches, every third of the TTL (so an entry written by a pod
/// that died expires within one TTL).
pub(super) async fn refresh_registry(gw: Arc<Gateway>, shutdown: CancellationToken) {
    let hub = &gw.push;
    let every = hub.settings.registry_ttl / 3;
    let ttl = hub.settings.registry_ttl.as_secs().max(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let users: Vec<String> = hub.lock().keys().cloned().collect();
        let mut redis = gw.redis.clone();
        for chunk in users.chunks(1000) {
            // Not a plain SET: that took a user back from the pod they
            // reconnected to while this pod still held their dead socket,
            // and their events went nowhere until it noticed.
            let mut refresh = scripts::REFRESH_PUSH.prepare_invoke();
            for u in chunk {
                refresh.key(hub.keys.push_user(u));
            }
            refresh.arg(&hub.pod).arg(ttl);
            if let Err(e) = refresh.invoke_async::<i64>(&mut redis).await {
                tracing::warn!(error = %e, "push registry refresh failed");
                break;
            }
        }
    }
}

/// Raises this process's soft open-file limit to its hard limit (every
/// WebSocket is a descriptor); returns the new limit.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(status: OrderStatus) -> String {
        serde_json::to_string(&events::OrderEvent::new("item.1", "item", status, None))
            .unwrap_or_default()
    }

    #[test]
    fn every_order_starts_at_accepted_and_never_goes_back() {
        let mut sent = Sent::default();
        // Confirmed overtook its accepted push: accepted is sent first.
        match news(&mut sent, &live(OrderStatus::Confirmed)) {
            Admit::AcceptedFirst(json) => {
                let e: events::OrderEvent = serde_json::from_str(&json)
                    .unwrap_or_else(|_| events::OrderEvent::new("", "", OrderStatus::Failed, None));
                assert_eq!(
                    (e.kind.as_ref(), e.order_id.as_str()),
                    ("order.accepted", "item.1")
                );
            }
            _ => panic!("expected accepted first"),
        }
        // The late accepted and a repeat are dropped; a later status passes.
        assert!(matches!(
            news(&mut sent, &live(OrderStatus::Accepted)),
            Admit::Skip
        ));
        assert!(matches!(
            news(&mut sent, &live(OrderStatus::Confirmed)),
            Admit::Skip
        ));
        assert!(matches!(
            news(&mut sent, &live(OrderStatus::Paid)),
            Admit::Send
        ));
        // In order, nothing is added.
        let mut sent = Sent::default();
        assert!(matches!(
            news(&mut sent, &live(OrderStatus::Accepted)),
            Admit::Send
        ));
        assert!(matches!(
            news(&mut sent, &live(OrderStatus::Confirmed)),
            Admit::Send
        ));
    }

    #[test]
    fn seen_list_parses_and_skips_junk() {
        let m = parse_seen("a.1:confirmed, b.2:paid,junk,c.3:nonsense,");
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("a.1"), Some(&OrderStatus::Confirmed));
        assert_eq!(m.get("b.2"), Some(&OrderStatus::Paid));
    }

    #[test]
    fn a_socket_never_goes_backwards_or_repeats() {
        let mut s = Sent::default();
        assert!(s.admit("o", OrderStatus::Accepted));
        assert!(s.admit("o", OrderStatus::Confirmed));
        assert!(!s.admit("o", OrderStatus::Accepted));
        assert!(!s.admit("o", OrderStatus::Confirmed));
        assert!(s.admit("o", OrderStatus::Cancelled));
        assert!(!s.admit("o", OrderStatus::Paid));
    }

    #[test]
    fn a_full_queue_flags_the_connection() {
        let hub = PushHub::new(
            SaleKeys::new(&crate::spec::SaleId::new("ns", "s")),
            "pod-a",
            PushSettings {
                queue_capacity: 2,
                ..PushSettings::default()
            },
        );
        let (conn, first) = hub.attach("alice");
        assert!(first);
        for _ in 0..3 {
            hub.dispatch("alice", Outgoing::Event(Arc::from("{}")));
        }
        assert!(conn.overflowed.load(Ordering::Relaxed));
        assert!(hub.detach("alice", conn.id));
        assert_eq!(hub.users(), 0);
    }
}
