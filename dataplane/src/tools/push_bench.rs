//! `flashsale bench ws-memory` and `flashsale bench push-latency`: the push
//! figures of docs/BENCHMARKS.md, printed (and returned as JSON), never
//! asserted in tests.
//!
//! ws-memory: a gateway *process* (so its RSS is its own) takes N idle
//! WebSockets from this process, spread over 127.0.0.x source addresses;
//! RSS (VmRSS) before and after gives memory per connection.
//!
//! push-latency: a gateway and two consumers in this process, real Redis and
//! PostgreSQL; buyers connected by WebSocket, purchases paced at a steady
//! rate; for each order the time from sending the purchase to receiving
//! `order.accepted` and `order.confirmed` on the buyer's socket.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Consumer, ConsumerSettings};
use crate::gateway::{self, Gateway, GatewaySettings};
use crate::spec::SaleDocument;
use crate::tools::bench::warmed_redis;
use crate::tools::gateway_process::GatewayProcess;
use crate::tools::serve_on_loopback;
use crate::tools::servers::PostgresServer;

const SECRET: &[u8] = b"bench-secret";

/// The benches share one error type.
pub use crate::tools::bench::BenchError as PushBenchError;
/// Source addresses 127.0.0.2 … used for client sockets (ephemeral ports
/// run out near 28k per source address).
const SOURCE_IPS: u8 = 16;

fn doc(name: &str, stock: i64) -> Result<SaleDocument, PushBenchError> {
    crate::tools::bench::doc(name, &[("item", stock)])
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> PushBenchError {
    move |source| PushBenchError::Io { what, source }
}

type ClientSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// One client WebSocket from source address `127.0.0.(2 + i % SOURCE_IPS)`,
/// with small buffers (the client's memory is not what is measured, but it
/// shares the machine).
async fn ws_client(addr: SocketAddr, i: usize, token: &str) -> Result<ClientSocket, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    let octet = 2 + u8::try_from(i % usize::from(SOURCE_IPS)).unwrap_or(0);
    socket
        .bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, octet), 0)))
        .map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let url = format!("ws://{addr}/v1/ws?token={token}");
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(url, stream, Some(config)),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    // The session is fully set up once the snapshot marker arrived.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"synced\"") => return Ok(ws),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("closed before synced".into()),
            Err(_) => return Err("no synced message".into()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WsMemoryStep {
    pub target: usize,
    pub reached: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub bytes_per_connection: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct WsMemoryReport {
    pub open_files_limit_client: u64,
    pub open_files_limit_gateway_hard: u64,
    pub steps: Vec<WsMemoryStep>,
}

/// Memory per idle WebSocket in a gateway process, at each count (each
/// count is a fresh gateway, so the figures do not carry over).
pub async fn ws_memory(counts: &[usize]) -> Result<WsMemoryReport, PushBenchError> {
    let limit =
        gateway::push::raise_open_files_limit().map_err(io_err("raise the open file limit"))?;
    let doc = doc("wsmem", 1)?;
    let (redis, _) = warmed_redis(&doc).await?;
    let max_count = counts.iter().copied().max().unwrap_or(0);
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..max_count)
            .map(|i| crate::token::issue(SECRET, &format!("ws-{i}"), 3600).unwrap_or_default())
            .collect(),
    );
    let mut steps = Vec::new();
    for &target in counts {
        let gateway =
            GatewayProcess::start(&doc, &redis.url(), SECRET, &format!("wsmem-{target}")).await?;
        let addr = gateway.addr;
        // Warm the gateway (allocator arenas, script cache) with a few
        // connections that are closed again, then take the baseline.
        let mut warmup = Vec::new();
        for i in 0..200 {
            let mut ready = None;
            for _ in 0..100 {
                match ws_client(addr, i, &tokens[i % tokens.len().max(1)]).await {
                    Ok(ws) => {
                        ready = Some(ws);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            warmup.extend(ready);
        }
        for mut ws in warmup {
            let _ = ws.close(None).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = gateway.rss_kib()?;
        let clients = Arc::new(Mutex::new(Vec::with_capacity(target)));
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers: Vec<_> = (0..128)
            .map(|_| {
                let (clients, failure, next, tokens) = (
                    clients.clone(),
                    failure.clone(),
                    next.clone(),
                    tokens.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                            return;
                        }
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= target {
                            return;
                        }
                        match ws_client(addr, i, &tokens[i]).await {
                            Ok(ws) => {
                                // Read so pings are answered; an idle client otherwise.
                                let reader = tokio::spawn(async move {
                                    let mut ws = ws;
                                    while let Some(Ok(_)) = ws.next().await {}
                                });
                                if let Ok(mut c) = clients.lock() {
                                    c.push(reader);
                                }
                            }
                            Err(e) => {
                                if let Ok(mut f) = failure.lock() {
                                    f.get_or_insert(format!("connection {i}: {e}"));
                                }
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.await;
        }
        let reached = clients.lock().map(|c| c.len()).unwrap_or(0);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = gateway.rss_kib()?;
        let per = if reached > 0 {
            (after.saturating_sub(before) * 1024) as f64 / reached as f64
        } else {
            0.0
        };
        let stopped_by = failure.lock().ok().and_then(|f| f.clone());
        println!(
            "ws-memory: {reached} of {target} idle connections: gateway RSS {before} KiB -> {after} KiB = {per:.0} bytes per connection{}",
            stopped_by
                .as_deref()
                .map(|s| format!(" (stopped: {s})"))
                .unwrap_or_default()
        );
        steps.push(WsMemoryStep {
            target,
            reached,
            rss_before_kib: before,
            rss_after_kib: after,
            bytes_per_connection: per,
            stopped_by,
        });
        let readers = std::mem::take(
            &mut *clients
                .lock()
                .map_err(|_| PushBenchError::Setup("client list poisoned".into()))?,
        );
        for r in readers {
            r.abort();
        }
        drop(gateway);
        // Let the kernel reap the sockets before the next step.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(WsMemoryReport {
        open_files_limit_client: limit,
        open_files_limit_gateway_hard: limit,
        steps,
    })
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct PushLatencyReport {
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub seconds: f64,
    pub buyers_connected: usize,
    pub orders: u64,
    /// Purchase sent → `order.accepted` received on the buyer's socket.
    pub accepted_push: Percentiles,
    /// Purchase sent → `order.confirmed` (persisted in PostgreSQL) received.
    pub confirmed_push: Percentiles,
    /// Purchase sent → 202 received, for comparison.
    pub purchase_answer: Percentiles,
    /// Orders whose `order.confirmed` reached the socket before
    /// `order.accepted`: the socket then drops the older event (an order's
    /// status never goes backwards on a socket).
    pub accepted_push_superseded: u64,
    pub accepted_push_missing: u64,
    pub confirmed_push_missing: u64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

type Times = Arc<Mutex<HashMap<String, Instant>>>;

/// accept→push latency at a steady purchase rate.
pub async fn push_latency(
    rate: f64,
    seconds: f64,
    buyers: usize,
) -> Result<PushLatencyReport, PushBenchError> {
    let _ = gateway::push::raise_open_files_limit();
    let total = (rate * seconds).ceil() as u64;
    let doc = doc("pushlat", i64::try_from(total * 2).unwrap_or(i64::MAX))?;
    let (redis, _) = warmed_redis(&doc).await?;
    let pg = PostgresServer::start()?;
    let gw = Gateway::new(&doc, &GatewaySettings::new(redis.url(), SECRET.to_vec()))?;
    let shutdown = CancellationToken::new();
    let (addr, _) = serve_on_loopback(gw, &shutdown).await?;
    for i in 0..2 {
        let mut settings = ConsumerSettings::new(redis.url(), pg.url());
        settings.name = format!("bench-consumer-{i}");
        settings.sweeper = None;
        if let Some(c) = Consumer::start(&doc, settings, &shutdown).await? {
            tokio::spawn(c.run(shutdown.clone()));
        }
    }

    let tokens: Arc<Vec<String>> = Arc::new(
        (0..buyers)
            .map(|i| crate::token::issue(SECRET, &format!("buyer-{i}"), 3600).unwrap_or_default())
            .collect(),
    );
    let accepted_at: Times = Arc::default();
    let confirmed_at: Times = Arc::default();
    let mut readers = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let ws = ws_client(addr, i, token)
            .await
            .map_err(PushBenchError::Client)?;
        let (acc, conf) = (accepted_at.clone(), confirmed_at.clone());
        readers.push(tokio::spawn(async move {
            let mut ws = ws;
            while let Some(Ok(msg)) = ws.next().await {
                let now = Instant::now();
                let Message::Text(t) = msg else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else {
                    continue;
                };
                let Some(id) = v["orderId"].as_str() else {
                    continue;
                };
                let map = match v["type"].as_str() {
                    Some("order.accepted") => &acc,
                    Some("order.confirmed") => &conf,
                    _ => continue,
                };
                if let Ok(mut m) = map.lock() {
                    m.entry(id.to_string()).or_insert(now);
                }
            }
        }));
    }

    let sent_at: Times = Arc::default();
    let answer_us = Arc::new(Mutex::new(new_histogram()?));
    let connections = 64usize;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let drivers: Vec<_> = (0..connections)
        .map(|c| {
            let (tokens, sent_at, answer_us, next) = (
                tokens.clone(),
                sent_at.clone(),
                answer_us.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let offset = interval.mul_f64(c as f64 / connections as f64);
                let mut k = 0u32;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    tokio::time::sleep_until((started + offset + interval * k).into()).await;
                    k += 1;
                    let token = &tokens[usize::try_from(i).unwrap_or(0) % tokens.len().max(1)];
                    let req = hyper::Request::post("/v1/sales/pushlat/purchase")
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .header("authorization", format!("Bearer {token}"))
                        .body(Full::new(axum::body::Bytes::from_static(
                            br#"{"sku":"item","quantity":1}"#,
                        )));
                    let Ok(req) = req else { return };
                    let t0 = Instant::now();
                    if sender.ready().await.is_err() {
                        return;
                    }
                    let Ok(resp) = sender.send_request(req).await else {
                        return;
                    };
                    let status = resp.status();
                    let Ok(body) = resp.into_body().collect().await else {
                        return;
                    };
                    let elapsed = t0.elapsed();
                    if status != 202 {
                        continue;
                    }
                    if let Ok(mut h) = answer_us.lock() {
                        let _ = h.record(
                            u64::try_from(elapsed.as_micros())
                                .unwrap_or(u64::MAX)
                                .max(1),
                        );
                    }
                    let v: serde_json::Value =
                        serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
                    if let (Some(id), Ok(mut m)) = (v["orderId"].as_str(), sent_at.lock()) {
                        m.insert(id.to_string(), t0);
                    }
                }
            })
        })
        .collect();
    for d in drivers {
        let _ = d.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the last confirmations arrive.
    let sent = sent_at.lock().map(|m| m.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let done = confirmed_at.lock().map(|m| m.len()).unwrap_or(0);
        if done >= sent.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut acc_h = new_histogram()?;
    let mut conf_h = new_histogram()?;
    let (mut acc_missing, mut conf_missing, mut superseded) = (0, 0, 0);
    let acc = accepted_at.lock().map(|m| m.clone()).unwrap_or_default();
    let conf = confirmed_at.lock().map(|m| m.clone()).unwrap_or_default();
    for (id, t0) in &sent {
        let us = |t: &Instant| {
            u64::try_from(t.saturating_duration_since(*t0).as_micros())
                .unwrap_or(u64::MAX)
                .max(1)
        };
        match acc.get(id) {
            Some(t) => {
                let _ = acc_h.record(us(t));
            }
            None if conf.contains_key(id) => superseded += 1,
            None => acc_missing += 1,
        }
        match conf.get(id) {
            Some(t) => {
                let _ = conf_h.record(us(t));
            }
            None => conf_missing += 1,
        }
    }
    shutdown.cancel();
    for r in readers {
        r.abort();
    }
    let answer = answer_us
        .lock()
        .map(|h| percentiles(&h))
        .unwrap_or(Percentiles {
            count: 0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
        });
    let report = PushLatencyReport {
        offered_rate: rate,
        achieved_rate: sent.len() as f64 / elapsed.max(0.001),
        seconds: elapsed,
        buyers_connected: buyers,
        orders: sent.len() as u64,
        accepted_push: percentiles(&acc_h),
        confirmed_push: percentiles(&conf_h),
        purchase_answer: answer,
        accepted_push_superseded: superseded,
        accepted_push_missing: acc_missing,
        confirmed_push_missing: conf_missing,
    };
    println!(
        "push-latency: {} orders at {:.0}/s offered ({:.0}/s achieved) to {} connected buyers: purchase→order.accepted p50 {:.2} ms, p99 {:.2} ms; purchase→order.confirmed p50 {:.2} ms, p99 {:.2} ms; purchase answer p50 {:.2} ms, p99 {:.2} ms; accepted superseded by confirmed {}; missing accepted {}, confirmed {}",
        report.orders,
        rate,
        report.achieved_rate,
        buyers,
        report.accepted_push.p50_ms,
        report.accepted_push.p99_ms,
        report.confirmed_push.p50_ms,
        report.confirmed_push.p99_ms,
        report.purchase_answer.p50_ms,
        report.purchase_answer.p99_ms,
        superseded,
        acc_missing,
        conf_missing
    );
    Ok(report)
}

fn new_histogram() -> Result<Histogram<u64>, PushBenchError> {
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| PushBenchError::Setup(e.to_string()))
}
