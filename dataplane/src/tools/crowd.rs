//! The crowd generator: many users on many keep-alive connections pressing
//! "buy" against any gateway URL (fetching a purchase ticket first when the
//! sale wants one), with a share of client retries that reuse their
//! Idempotency-Key (and ticket), and a tally of every answer.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper::header::HeaderValue;
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;

/// What to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `POST /v1/sales/{sale}/purchase`, each with a new Idempotency-Key
    /// (as a storefront sends it, so a retry finds its order).
    Purchase,
    /// The same purchase without an Idempotency-Key (a client that never
    /// retries): no key to bind in Redis. Never retried.
    UnkeyedPurchase,
    /// `POST /v1/sales/{sale}/tickets`, then the purchase with that ticket
    /// (for a sale with `purchaseTicket.enabled`). The ticket fetch is not
    /// in the latency figures, only the purchase; throughput counts buys.
    TicketedPurchase,
    /// `POST /v1/ping`, the trivial endpoint, with the same request, for
    /// side-by-side benchmarks.
    Ping,
    /// `GET /v1/sales/{sale}`, the sale page, anonymous.
    SalePage,
    /// `GET /v1/ping`, the trivial endpoint, with the same request as `SalePage`.
    PingGet,
}

impl Target {
    /// Whether this target buys (and so needs SKUs and takes retries).
    pub fn buys(self) -> bool {
        matches!(
            self,
            Self::Purchase | Self::UnkeyedPurchase | Self::TicketedPurchase
        )
    }

    /// Whether this target is an anonymous GET (the sale page, or the
    /// trivial endpoint beside it).
    pub fn reads(self) -> bool {
        matches!(self, Self::SalePage | Self::PingGet)
    }

    /// The purchase target a sale needs: with a ticket when it requires one.
    pub fn purchase_for(spec: &crate::spec::SaleSpec) -> Self {
        if spec.purchase_ticket.enabled {
            Self::TicketedPurchase
        } else {
            Self::Purchase
        }
    }
}

#[derive(Clone, Debug)]
pub struct CrowdConfig {
    /// Gateway addresses; connections are spread over them round-robin.
    pub gateways: Vec<SocketAddr>,
    pub sale: String,
    /// SKUs to buy, each equally likely.
    pub skus: Vec<String>,
    /// Who sends each request.
    pub buyers: Buyers,
    pub connections: usize,
    /// Total requests (first attempts; retries come on top).
    pub requests: u64,
    /// Stop after this long even if `requests` were not all sent.
    pub max_duration: Duration,
    /// Share of answered requests sent again with the same Idempotency-Key.
    pub retry_fraction: f64,
    /// Total request rate to pace at; `None` sends as fast as answers come.
    pub rate: Option<f64>,
    pub token_secret: Vec<u8>,
    pub target: Target,
    /// Spread connections over this many 127.0.0.x source addresses (so a
    /// per-IP limit sees many clients); 0 lets the system choose.
    pub source_ips: u8,
}

/// The buyers a crowd's requests come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buyers {
    /// `user-0` … `user-{n-1}`, one picked at random per request (so buyers
    /// come back: limits and repeat orders are exercised).
    Random(u32),
    /// Request `i` is `user-{first + i}`'s: every request a new buyer, as in
    /// a sale where most buyers try once.
    EachNew { first: u32 },
}

impl Buyers {
    /// The users a run of `requests` names, first to last; `None` when
    /// there are none, or more than user numbers can count.
    fn range(self, requests: u64) -> Option<std::ops::Range<u32>> {
        let range = match self {
            Self::Random(n) => 0..n,
            Self::EachNew { first } => first..first.checked_add(u32::try_from(requests).ok()?)?,
        };
        (!range.is_empty()).then_some(range)
    }
}

/// One order the gateway answered 202 for.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AcceptedOrder {
    pub order_id: String,
    pub user: String,
    pub sku: String,
}

/// Tally of a run.
#[derive(Debug, Default, Serialize)]
pub struct CrowdResult {
    pub sent: u64,
    pub retries: u64,
    pub accepted: u64,
    /// Retries answered with the order of their first attempt (as they must be).
    pub idempotent_replays: u64,
    /// Retries answered with a different order or refused after a 202.
    pub idempotency_violations: u64,
    /// Retries of a 202 told to try later (rate limited, unavailable, or the
    /// connection dropped): no answer either way.
    pub unanswered_retries: u64,
    pub sold_out: u64,
    pub limit_reached: u64,
    pub rate_limited: u64,
    pub not_started: u64,
    pub ended: u64,
    /// Purchases refused for their ticket (403 `ticket_required` / `ticket_invalid`).
    pub ticket_refused: u64,
    /// Tickets fetched (`TicketedPurchase`).
    pub tickets_fetched: u64,
    pub other_client_errors: u64,
    /// Every 5xx answer, the 503s below included.
    pub server_errors: u64,
    /// 503 answers that carried Retry-After (a store outage, a failover,
    /// replication_pending): the gateway's "try again shortly".
    pub unavailable: u64,
    /// Seconds from the start to the first and the last such 503.
    pub unavailable_from_s: Option<f64>,
    pub unavailable_until_s: Option<f64>,
    pub transport_errors: u64,
    pub ok: u64,
    pub elapsed_s: f64,
    #[serde(skip)]
    pub orders: Vec<AcceptedOrder>,
    #[serde(skip)]
    pub latency_us: Option<Histogram<u64>>,
}

impl CrowdResult {
    pub fn throughput_rps(&self) -> f64 {
        (self.sent + self.retries) as f64 / self.elapsed_s.max(1e-9)
    }

    /// Latency quantile in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us
            .as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .unwrap_or(0.0)
    }

    fn merge(&mut self, o: CrowdResult) {
        self.sent += o.sent;
        self.retries += o.retries;
        self.accepted += o.accepted;
        self.idempotent_replays += o.idempotent_replays;
        self.idempotency_violations += o.idempotency_violations;
        self.unanswered_retries += o.unanswered_retries;
        self.sold_out += o.sold_out;
        self.limit_reached += o.limit_reached;
        self.rate_limited += o.rate_limited;
        self.not_started += o.not_started;
        self.ended += o.ended;
        self.ticket_refused += o.ticket_refused;
        self.tickets_fetched += o.tickets_fetched;
        self.other_client_errors += o.other_client_errors;
        self.server_errors += o.server_errors;
        self.unavailable += o.unavailable;
        self.unavailable_from_s = match (self.unavailable_from_s, o.unavailable_from_s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.unavailable_until_s = match (self.unavailable_until_s, o.unavailable_until_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.transport_errors += o.transport_errors;
        self.ok += o.ok;
        self.orders.extend(o.orders);
        if let Some(h) = o.latency_us {
            match &mut self.latency_us {
                Some(mine) => {
                    let _ = mine.add(&h);
                }
                None => self.latency_us = Some(h),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CrowdError {
    #[error("no gateway address given")]
    NoGateway,
    #[error("no SKU given")]
    NoSku,
    #[error("no buyers: give at least one user, and buyer numbers that fit in 32 bits")]
    NoBuyers,
    #[error("signing user tokens: {0}")]
    Token(#[from] crate::token::SignError),
    #[error("a request header: {0}")]
    Header(#[from] hyper::header::InvalidHeaderValue),
    #[error("latency histogram: {0}")]
    Histogram(String),
}

/// One answer, as the tally needs it.
struct Answer {
    status: u16,
    order_id: Option<String>,
    error: Option<String>,
    /// A ticket endpoint's `ticket`.
    ticket: Option<String>,
    retry_after: bool,
    /// Seconds from the crowd's start to the answer.
    at_s: f64,
}

/// Runs the crowd and returns the tally.
pub async fn run(config: CrowdConfig) -> Result<CrowdResult, CrowdError> {
    if config.gateways.is_empty() {
        return Err(CrowdError::NoGateway);
    }
    if config.skus.is_empty() && config.target.buys() {
        return Err(CrowdError::NoSku);
    }
    // Each buyer's `Authorization` value and each SKU's body are built once,
    // before the clock starts: the crowd stands in for many clients, and
    // what it spends per request is CPU the gateway under test does not get.
    let mut tokens: Vec<HeaderValue> = Vec::new();
    for u in config
        .buyers
        .range(config.requests)
        .ok_or(CrowdError::NoBuyers)?
    {
        let token = crate::token::issue(&config.token_secret, &format!("user-{u}"), 3600)?;
        tokens.push(HeaderValue::try_from(["Bearer ", &token].concat())?);
    }
    // Without SKUs (the trivial endpoint's run) the body names none.
    let skus: Vec<&str> = match config.skus.as_slice() {
        [] => vec![""],
        all => all.iter().map(String::as_str).collect(),
    };
    let bodies = skus
        .iter()
        .map(|sku| Bytes::from(format!(r#"{{"sku":"{sku}","quantity":1}}"#)))
        .collect();
    let prepared = Arc::new(Requests { tokens, bodies });
    let config = Arc::new(config);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(config.connections);
    for c in 0..config.connections {
        let (config, prepared, next) = (
            Arc::clone(&config),
            Arc::clone(&prepared),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            connection(c, config, prepared, next, started).await
        }));
    }
    let mut total = CrowdResult::default();
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => total.merge(r),
            Ok(Err(e)) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "crowd connection task failed"),
        }
    }
    total.elapsed_s = started.elapsed().as_secs_f64();
    Ok(total)
}

type Sender = http1::SendRequest<Full<Bytes>>;

/// What every request is made of, prepared before the run.
struct Requests {
    /// `Bearer <token>`, by the buyer's slot.
    tokens: Vec<HeaderValue>,
    /// The purchase body, by SKU (`CrowdConfig::skus`' order).
    bodies: Vec<Bytes>,
}

async fn connect(config: &CrowdConfig, c: usize) -> Option<Sender> {
    let addr = config.gateways[c % config.gateways.len()];
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .ok()?;
    if config.source_ips > 0 && addr.ip().is_loopback() && addr.is_ipv4() {
        let host = 1 + u8::try_from(c % usize::from(config.source_ips)).unwrap_or(0);
        let _ = socket.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
            0,
        ));
    }
    let _ = socket.set_nodelay(true);
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .ok()?
        .ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

async fn connection(
    c: usize,
    config: Arc<CrowdConfig>,
    prepared: Arc<Requests>,
    next: Arc<AtomicU64>,
    started: Instant,
) -> Result<CrowdResult, CrowdError> {
    let mut out = CrowdResult {
        latency_us: Some(
            Histogram::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| CrowdError::Histogram(e.to_string()))?,
        ),
        ..Default::default()
    };
    let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
    let mut sender = connect(&config, c).await;
    let path = match config.target {
        Target::Ping | Target::PingGet => "/v1/ping".to_string(),
        Target::SalePage => format!("/v1/sales/{}", config.sale),
        Target::Purchase | Target::UnkeyedPurchase | Target::TicketedPurchase => {
            format!("/v1/sales/{}/purchase", config.sale)
        }
    };
    let tickets_path = format!("/v1/sales/{}/tickets", config.sale);
    let per_conn_interval = config
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(config.connections as f64 / r));
    let mut sent_here = 0u32;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= config.requests || started.elapsed() >= config.max_duration {
            break;
        }
        if let Some(iv) = per_conn_interval {
            // Connections are staggered across the interval so the offered
            // load is smooth, not 'connections' requests at once per tick.
            let offset = iv.mul_f64(c as f64 / config.connections.max(1) as f64);
            let due = started + offset + iv * sent_here;
            tokio::time::sleep_until(due.into()).await;
        }
        sent_here += 1;
        // `user` names the buyer; `slot` is their token's index.
        let (user, slot) = match config.buyers {
            Buyers::Random(n) => {
                let u = rng.random_range(0..n.max(1));
                (u, u)
            }
            Buyers::EachNew { first } => {
                let n = u32::try_from(i).unwrap_or(u32::MAX);
                (first.saturating_add(n), n)
            }
        };
        let pick = rng.random_range(0..config.skus.len().max(1));
        let sku = config.skus.get(pick).map(String::as_str).unwrap_or("");
        let body = prepared.bodies.get(pick).cloned().unwrap_or_default();
        let key = match config.target {
            Target::UnkeyedPurchase => String::new(),
            _ => format!("{:032x}", rng.random::<u128>()),
        };
        let all = &prepared.tokens;
        let token = &all[usize::try_from(slot).unwrap_or(0) % all.len().max(1)];
        let ticket = if config.target == Target::TicketedPurchase {
            let t = Call::new(&tickets_path, token, Bytes::new());
            let (answer, _) = send(&mut sender, started, &config, c, &t).await;
            match answer.ticket {
                Some(ticket) if answer.status == 201 => {
                    out.tickets_fetched += 1;
                    Some(ticket)
                }
                // No ticket (too early, ended, ...): that answer is the buy's.
                _ => {
                    out.sent += 1;
                    tally(&mut out, &answer, user, sku);
                    continue;
                }
            }
        } else {
            None
        };
        let call = Call {
            idempotency_key: &key,
            ticket: ticket.as_deref(),
            ..Call::new(&path, token, body)
        };
        let first = timed(&mut sender, started, &config, c, &call, &mut out).await;
        out.sent += 1;
        tally(&mut out, &first, user, sku);
        if config.target.buys()
            && !key.is_empty()
            && first.status != 0
            && rng.random_bool(config.retry_fraction.clamp(0.0, 1.0))
        {
            let again = timed(&mut sender, started, &config, c, &call, &mut out).await;
            out.retries += 1;
            match (&first.order_id, first.status, &again.order_id, again.status) {
                (Some(a), 202, Some(b), 202) if a == b => out.idempotent_replays += 1,
                // A retry told "try later" (429, 503, a dropped connection)
                // was not answered at all; it is neither a replay nor wrong.
                (_, 202, _, 429 | 503 | 0) => out.unanswered_retries += 1,
                // A second order, or a refusal of an order that exists.
                (_, 202, _, _) => out.idempotency_violations += 1,
                (_, _, Some(_), 202) => {
                    // A refused first attempt may pass on retry (stock came
                    // back or a rate limit expired): a new, legitimate order.
                    tally(&mut out, &again, user, sku);
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// One request: the path, the buyer's token, the body and the optional headers.
struct Call<'a> {
    path: &'a str,
    /// The `Authorization` value.
    token: &'a HeaderValue,
    body: Bytes,
    idempotency_key: &'a str,
    ticket: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(path: &'a str, token: &'a HeaderValue, body: Bytes) -> Self {
        Self {
            path,
            token,
            body,
            idempotency_key: "",
            ticket: None,
        }
    }
}

/// `send`, with the answer's latency recorded.
async fn timed(
    sender: &mut Option<Sender>,
    started: Instant,
    config: &CrowdConfig,
    c: usize,
    call: &Call<'_>,
    out: &mut CrowdResult,
) -> Answer {
    let (answer, elapsed) = send(sender, started, config, c, call).await;
    if let (Some(h), Some(e)) = (out.latency_us.as_mut(), elapsed) {
        let _ = h.record(u64::try_from(e.as_micros()).unwrap_or(u64::MAX).max(1));
    }
    answer
}

/// Sends one request on this connection (reconnecting when it dropped);
/// status 0 is no answer. Also returns how long the answer took.
async fn send(
    sender: &mut Option<Sender>,
    started: Instant,
    config: &CrowdConfig,
    c: usize,
    call: &Call<'_>,
) -> (Answer, Option<Duration>) {
    let failed = (
        Answer {
            status: 0,
            order_id: None,
            error: None,
            ticket: None,
            retry_after: false,
            at_s: 0.0,
        },
        None,
    );
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = connect(config, c).await;
    }
    let Some(s) = sender.as_mut() else {
        return failed;
    };
    if s.ready().await.is_err() {
        *sender = None;
        return failed;
    }
    // The trivial endpoint gets the very same request (headers and body), so
    // a side-by-side run differs only in what the server does with it.
    let req = if config.target.reads() {
        Request::get(call.path)
            .header("host", "gateway")
            .body(Full::new(Bytes::new()))
    } else {
        let mut req = Request::post(call.path)
            .header("host", "gateway")
            .header("authorization", call.token.clone())
            .header("content-type", "application/json");
        if !call.idempotency_key.is_empty() {
            req = req.header("idempotency-key", call.idempotency_key);
        }
        if let Some(t) = call.ticket {
            req = req.header("purchase-ticket", t);
        }
        req.body(Full::new(call.body.clone()))
    };
    let Ok(req) = req else {
        return failed;
    };
    let t0 = Instant::now();
    let resp = match tokio::time::timeout(Duration::from_secs(10), s.send_request(req)).await {
        Ok(Ok(r)) => r,
        _ => {
            *sender = None;
            return failed;
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp.headers().contains_key("retry-after");
    let bytes = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            *sender = None;
            return failed;
        }
    };
    let elapsed = t0.elapsed();
    // Parsed for the POST targets, so a side-by-side run costs the client the
    // same; the GET pair returns bodies of different sizes (the page's
    // hundreds of bytes, ping's 15), so neither is parsed: both are read whole.
    let reply: Reply = if config.target.reads() {
        Reply::default()
    } else {
        serde_json::from_slice(&bytes).unwrap_or_default()
    };
    (
        Answer {
            status,
            order_id: reply.order_id.map(Cow::into_owned),
            error: reply.error.map(Cow::into_owned),
            ticket: reply.ticket.map(Cow::into_owned),
            retry_after,
            at_s: started.elapsed().as_secs_f64(),
        },
        Some(elapsed),
    )
}

/// The fields of an answer the tally reads, borrowed from its body.
#[derive(Default, Deserialize)]
struct Reply<'a> {
    #[serde(rename = "orderId", borrow, default)]
    order_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ticket: Option<Cow<'a, str>>,
}

/// Counts `a`, an answer to buyer `user-<user>`.
fn tally(out: &mut CrowdResult, a: &Answer, user: u32, sku: &str) {
    match (a.status, a.error.as_deref()) {
        (0, _) => out.transport_errors += 1,
        (200, _) => out.ok += 1,
        (202, _) => {
            out.accepted += 1;
            if let Some(id) = &a.order_id {
                out.orders.push(AcceptedOrder {
                    order_id: id.clone(),
                    user: format!("user-{user}"),
                    sku: sku.to_string(),
                });
            }
        }
        (410, Some("ended")) => out.ended += 1,
        (403, Some("ticket_required" | "ticket_invalid")) => out.ticket_refused += 1,
        (410, _) => out.sold_out += 1,
        (409, _) => out.limit_reached += 1,
        (429, _) => out.rate_limited += 1,
        (425, _) => out.not_started += 1,
        (503, _) if a.retry_after => {
            out.server_errors += 1;
            out.unavailable += 1;
            out.unavailable_from_s = Some(out.unavailable_from_s.map_or(a.at_s, |f| f.min(a.at_s)));
            out.unavailable_until_s =
                Some(out.unavailable_until_s.map_or(a.at_s, |u| u.max(a.at_s)));
        }
        (s, _) if s >= 500 => out.server_errors += 1,
        _ => out.other_client_errors += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::Buyers;

    #[test]
    fn each_new_buyer_names_one_user_per_request_from_its_first() {
        assert_eq!(Buyers::EachNew { first: 500 }.range(3), Some(500..503));
        assert_eq!(Buyers::Random(7).range(1_000), Some(0..7));
    }

    #[test]
    fn no_buyers_or_more_than_user_numbers_count_is_refused() {
        assert_eq!(Buyers::Random(0).range(10), None);
        assert_eq!(Buyers::EachNew { first: 5 }.range(0), None);
        let last = u32::MAX - 1;
        assert_eq!(Buyers::EachNew { first: last }.range(5), None);
    }
}
