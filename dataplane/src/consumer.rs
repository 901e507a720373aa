//! The consumer: reads accepted orders from the products' streams with a
//! consumer group, persists them in batches, then confirms and acknowledges.
//!
//! Order of effects per batch: commit in PostgreSQL → mark orders confirmed in
//! Redis → XACK. A crash anywhere leaves the entries pending; whoever reads
//! them next re-inserts (a no-op thanks to the unique keys) and confirms.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};
use tokio_util::sync::CancellationToken;

use crate::durability::{self, Durability, ReplicaWait, WaitPath};
use crate::events::{OrderEvent, Publisher};
use crate::keys::{CONSUMER_GROUP, ProductKeys};
use crate::order::OrderStatus;
use crate::redis_conn::{ConnSettings, RedisConn, RedisConnError, RedisMode, RedisTarget};
use crate::scripts;
use crate::spec::{SaleDocument, SaleId};
use crate::store::{OrderRow, OrderStore, StoreError};

#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub redis_url: String,
    /// `None`: a cluster if `redis_url` lists several seeds (`RedisTarget::parse`).
    pub redis_mode: Option<RedisMode>,
    pub database_url: String,
    /// This consumer's name in the group (the pod name in a cluster).
    pub name: String,
    /// Most entries read and persisted at once.
    pub batch_size: usize,
    /// How long XREADGROUP blocks waiting for new entries.
    pub block: Duration,
    /// Entries pending this long at another consumer are claimed (it died).
    pub claim_idle: Duration,
    /// How often to look for such entries.
    pub claim_every: Duration,
    /// An entry delivered more often than this is persisted on its own, after
    /// its batch (delivery counts rise for reasons that are no fault of the
    /// order, so they never fail one).
    pub max_deliveries: u64,
    /// An entry the database refuses this many times is dead-lettered.
    pub max_data_failures: u32,
    pub db_connections: usize,
    /// The payment timeout sweeper run next to the consumer loop (`None`: not here).
    pub sweeper: Option<crate::payment_timeout::SweeperSettings>,
    /// `replica`: entries are persisted only once a replica holds them, and
    /// confirmations and releases count only once a replica holds them
    /// (default: `replica` in cluster mode, `local` standalone).
    pub durability: Option<crate::durability::Durability>,
    /// Longest one WAIT blocks.
    pub replica_wait: Duration,
}

impl ConsumerSettings {
    pub fn new(redis_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            redis_mode: None,
            database_url: database_url.into(),
            name: crate::gateway::default_pod_name(),
            batch_size: 500,
            block: Duration::from_millis(500),
            claim_idle: Duration::from_secs(30),
            claim_every: Duration::from_secs(5),
            max_deliveries: 10,
            max_data_failures: 3,
            db_connections: 4,
            sweeper: Some(crate::payment_timeout::SweeperSettings::default()),
            durability: None,
            replica_wait: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    RedisTarget(#[from] RedisConnError),
    #[error("order store: {0}")]
    Store(#[from] StoreError),
    #[error("no replica confirmed {entries} entries in time; they stay pending and are read again")]
    Unreplicated { entries: usize },
}

/// One product stream and the keys its entries touch.
struct Stream {
    sku: String,
    keys: ProductKeys,
    name: String,
}

/// An entry read from a stream, parsed or not.
struct Entry {
    stream: usize,
    id: String,
    row: Option<OrderRow>,
}

/// Reads batches with XREADGROUP on its own connection(s); cheap to clone,
/// so the next batch can be read while the current one is being inserted.
///
/// Standalone, one XREADGROUP reads every stream. In a cluster each stream
/// is in its own slot and one XREADGROUP cannot span slots, so each stream
/// is read on its own connection (a blocked read holds its connection): all
/// of them without blocking first, and only when every stream is empty, all
/// of them blocking at once. Every call reads every stream, so a busy
/// product never starves a quiet one.
#[derive(Clone)]
struct Reader {
    /// One connection (standalone), or one per stream (cluster).
    conns: std::sync::Arc<Vec<RedisConn>>,
    names: std::sync::Arc<Vec<String>>,
    skus: std::sync::Arc<Vec<String>>,
    consumer: String,
    batch: usize,
    block_ms: usize,
    /// Under `replica`: the WAIT that closes each read.
    wait: Option<ReplicaWait>,
    /// Per stream, the product's wait mark written before that WAIT.
    marks: std::sync::Arc<Vec<String>>,
    /// The sale's meta record (`rejoin.lua` checks it).
    meta: String,
    /// Per stream (cluster): its last read failed, or read history and found
    /// some, so what it delivered is pending here and it is read from history
    /// until that comes back empty. Per stream, so a stream whose master
    /// keeps failing (a promoted master with no replica yet) holds back no
    /// other product's new orders.
    behind: std::sync::Arc<Vec<std::sync::atomic::AtomicBool>>,
    /// Per stream (cluster): whether it is read in the next round.
    health: std::sync::Arc<Vec<StreamHealth>>,
    epoch: Instant,
}

/// Per stream (cluster): whether its last call failed, and when it may be
/// tried again.
#[derive(Default)]
struct StreamHealth {
    /// Its last read or probe failed: it sits rounds out until a probe answers.
    failed: std::sync::atomic::AtomicBool,
    /// When the next probe may go, in milliseconds since `Reader::epoch`.
    retry_at: std::sync::atomic::AtomicU64,
    /// A probe is under way (one at a time per stream).
    probing: std::sync::atomic::AtomicBool,
}

impl Reader {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether stream `i` sits this round out: its last read failed, so it
    /// is read again only once a probe (`PING` to its master) has answered,
    /// and a probe goes only when twice as long as the failed call took (at
    /// least a second) has passed. The probe runs beside the rounds: a
    /// stalled master, whose calls fail only at the response timeout, holds
    /// the other products' reads for that long once, when it stalls, not
    /// each time it is tried again.
    fn sits_out(&self, i: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(h) = self.health.get(i) else {
            return false;
        };
        if !h.failed.load(Relaxed) {
            return false;
        }
        if h.retry_at.load(Relaxed) <= self.now_ms() && !h.probing.swap(true, Relaxed) {
            let reader = self.clone();
            tokio::spawn(async move { reader.probe(i).await });
        }
        true
    }

    async fn probe(self, i: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let (Some(conn), Some(name), Some(h)) =
            (self.conns.get(i), self.names.get(i), self.health.get(i))
        else {
            return;
        };
        let started = Instant::now();
        let mut conn = conn.clone();
        let answered = redis::cmd("PING")
            .query_async::<()>(&mut conn.on_master_of(name))
            .await;
        if let Err(e) = &answered {
            tracing::debug!(stream = %name, error = %e, "stream's master still not answering");
        }
        self.after_call(i, answered.is_ok(), started.elapsed());
        h.probing.store(false, Relaxed);
    }

    fn after_call(&self, i: usize, ok: bool, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(h) = self.health.get(i) else {
            return;
        };
        if ok {
            h.failed.store(false, Relaxed);
            return;
        }
        let wait = u64::try_from(took.as_millis().saturating_mul(2)).unwrap_or(u64::MAX);
        h.retry_at
            .store(self.now_ms().saturating_add(wait.max(1_000)), Relaxed);
        h.failed.store(true, Relaxed);
    }

    /// Whether some stream is read from history (no read ahead meanwhile:
    /// it would deliver the batch being processed a second time).
    fn any_behind(&self) -> bool {
        self.behind
            .iter()
            .any(|b| b.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Reader {
    /// New entries (`>`, blocking) or this consumer's own pending ones (`0`).
    async fn read(self, history: bool) -> Result<Vec<Entry>, ConsumerError> {
        if let [conn] = self.conns.as_slice() {
            let all = 0..self.names.len();
            return self
                .read_streams(conn.clone(), all, history, !history)
                .await;
        }
        let each = |block: bool| {
            let reader = &self;
            let sitting_out: Vec<bool> = (0..reader.conns.len())
                .map(|i| reader.sits_out(i))
                .collect();
            // A round of nothing but streams sitting out waits as long as a
            // blocking read would, so it is no spin; one with any stream to
            // read waits for those reads only.
            let idle = block && sitting_out.iter().all(|s| *s);
            futures::future::join_all(reader.conns.iter().enumerate().map(move |(i, conn)| {
                let from_history = history
                    || reader
                        .behind
                        .get(i)
                        .is_some_and(|b| b.load(std::sync::atomic::Ordering::Relaxed));
                let sits_out = sitting_out.get(i).copied().unwrap_or(false);
                async move {
                    if sits_out {
                        if idle {
                            tokio::time::sleep(Duration::from_millis(reader.block_ms as u64)).await;
                        }
                        return (from_history, None);
                    }
                    let started = Instant::now();
                    let read = reader
                        .read_streams(conn.clone(), i..i + 1, from_history, block && !from_history)
                        .await;
                    reader.after_call(i, read.is_ok(), started.elapsed());
                    (from_history, Some(read))
                }
            }))
        };
        let entries = merge(each(false).await, &self.behind)?;
        if !entries.is_empty() || history {
            return Ok(entries);
        }
        merge(each(true).await, &self.behind)
    }

    /// One XREADGROUP over the streams at `streams` (indexes into `names`).
    ///
    /// Under `replica` the read, the wait mark and `WAIT` go in one pipeline
    /// on the reader's connection to the slot's master, and entries no
    /// replica holds yet are not returned (they stay pending here and are
    /// read again from history): a row in PostgreSQL whose Redis purchase a
    /// failover then loses would let Redis sell the unit twice.
    async fn read_streams(
        &self,
        conn: RedisConn,
        streams: std::ops::Range<usize>,
        history: bool,
        block: bool,
    ) -> Result<Vec<Entry>, ConsumerError> {
        match self
            .read_group(conn.clone(), streams.clone(), history, block)
            .await
        {
            Err(ConsumerError::Redis(e)) if e.code() == Some("NOGROUP") => {
                self.rejoin(conn, &self.names[streams]).await?;
                Ok(Vec::new())
            }
            other => other,
        }
    }

    /// A stream without the consumer group: Redis lost its data (a restart
    /// without AOF), or the sale is being cleared. The group is created again
    /// from the stream's start. On one Redis (one read covers every stream,
    /// so one missing stream stops them all) `rejoin.lua` also creates a
    /// stream no purchase wrote since, but only while the sale's meta record
    /// exists, so a cleared sale is not written again. In a cluster only an
    /// existing stream gets its group (a missing one fails its own read
    /// only, until a purchase writes it). With nothing created the read
    /// waits its block time, so a missing stream does not spin the loop.
    async fn rejoin(&self, mut conn: RedisConn, names: &[String]) -> Result<(), ConsumerError> {
        let mut created = 0;
        match conn.mode() {
            RedisMode::Standalone => {
                let mut call = crate::scripts::REJOIN.key(&self.meta);
                for name in names {
                    call.key(name);
                }
                created = call
                    .arg(CONSUMER_GROUP)
                    .invoke_async::<usize>(&mut conn)
                    .await?;
            }
            RedisMode::Cluster => {
                for name in names {
                    match join_group(&mut conn, name, false).await {
                        Ok(made) => created += usize::from(made),
                        // The stream is not (yet) there.
                        Err(e) if e.code() == Some("ERR") => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        if created > 0 {
            tracing::warn!(streams = ?names, created, "streams had lost their consumer group (Redis lost data?); created again");
        } else {
            tokio::time::sleep(Duration::from_millis(self.block_ms as u64)).await;
        }
        Ok(())
    }

    async fn read_group(
        &self,
        mut conn: RedisConn,
        streams: std::ops::Range<usize>,
        history: bool,
        block: bool,
    ) -> Result<Vec<Entry>, ConsumerError> {
        let mark = &self.marks[streams.start];
        let id = if history { "0" } else { ">" };
        let ids = vec![id; streams.len()];
        let names = &self.names[streams];
        let per_stream = self.batch.div_ceil(self.conns.len()).max(1);
        let mut opts = StreamReadOptions::default()
            .group(CONSUMER_GROUP, &self.consumer)
            .count(per_stream);
        if block {
            opts = opts.block(self.block_ms);
        }
        let mut read = redis::cmd("XREADGROUP");
        read.arg(&opts).arg("STREAMS").arg(names).arg(&ids);
        let reply: Option<StreamReadReply> = match self.wait {
            None => read.query_async(&mut conn).await?,
            Some(wait) => {
                let mut pipe = redis::pipe();
                pipe.add_command(read);
                wait.mark_and_wait(&mut pipe, mark);
                let started = Instant::now();
                let (read, waited): (redis::Value, redis::Value) =
                    pipe.query_async(&mut conn.on_master_of(mark)).await?;
                let held = durability::confirmed(WaitPath::ConsumerRead, &Ok(waited), started);
                let reply: Option<StreamReadReply> =
                    redis::from_redis_value(read).map_err(redis::RedisError::from)?;
                let entries = reply
                    .as_ref()
                    .map_or(0, |r| r.keys.iter().map(|k| k.ids.len()).sum());
                if !held && entries > 0 {
                    return Err(ConsumerError::Unreplicated { entries });
                }
                reply
            }
        };
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(stream) = self.names.iter().position(|n| *n == key.key) else {
                continue;
            };
            for entry in key.ids {
                let row = parse_entry(&self.skus[stream], &entry);
                out.push(Entry {
                    stream,
                    id: entry.id,
                    row,
                });
            }
        }
        Ok(out)
    }
}

/// Creates the `persist` group on `stream` (and, with `make_stream`, the
/// stream if need be; without, a missing stream is an `ERR`), reading from
/// its start; false if it was there already.
pub(crate) async fn join_group<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    stream: &str,
    make_stream: bool,
) -> redis::RedisResult<bool> {
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(stream)
        .arg(CONSUMER_GROUP)
        .arg("0");
    if make_stream {
        create.arg("MKSTREAM");
    }
    let created: redis::RedisResult<()> = create.exec_async(conn).await;
    match created {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) => Err(e),
    }
}

/// One stream's read in a round: whether it read history, and what it got
/// (`None`: not read, backing off).
type StreamRead<E> = (bool, Option<Result<Vec<Entry>, E>>);

/// The entries of per-stream reads, each with whether it read history. A
/// stream whose read failed (its master is failing over) is read from its
/// history until that comes back empty, and does not hold back the others;
/// a stream not read this round stays as it was; only when every read
/// failed is it an error.
fn merge<E: std::fmt::Display>(
    reads: Vec<StreamRead<E>>,
    behind: &[std::sync::atomic::AtomicBool],
) -> Result<Vec<Entry>, E> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut entries = Vec::new();
    let mut failed = None;
    let mut succeeded = false;
    for (i, (from_history, read)) in reads.into_iter().enumerate() {
        let flag = behind.get(i);
        // Not read this round (backing off): it stays as it was.
        let Some(read) = read else {
            continue;
        };
        match read {
            Ok(mut e) => {
                succeeded = true;
                // History found empty: the stream is caught up.
                if let Some(b) = flag.filter(|_| from_history && e.is_empty()) {
                    b.store(false, Relaxed);
                }
                entries.append(&mut e);
            }
            Err(e) => {
                // What the failed read delivered (or left unconfirmed) is
                // pending here: this stream's next read goes through history.
                if let Some(b) = flag {
                    b.store(true, Relaxed);
                }
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) if !succeeded => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, "reading one stream failed; the others go on");
            Ok(entries)
        }
        None => Ok(entries),
    }
}

pub struct Consumer {
    sale: SaleId,
    streams: Vec<Stream>,
    redis: RedisConn,
    reader: Reader,
    store: OrderStore,
    settings: ConsumerSettings,
    /// Refusals per entry, by stream and entry id: products' streams hand
    /// out the same ids (`<ms>-<seq>`) at the same moments.
    data_failures: HashMap<(usize, String), u32>,
    publisher: Publisher,
    sweeper: Option<crate::payment_timeout::Sweeper>,
}

impl Consumer {
    /// Connects (lazily), migrates the schema, syncs inventory rows and joins
    /// the consumer group; retries while PostgreSQL or Redis are not up yet.
    pub async fn start(
        doc: &SaleDocument,
        settings: ConsumerSettings,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, ConsumerError> {
        let sale = doc.id();
        let target = RedisTarget::parse(&settings.redis_url, settings.redis_mode)?;
        let base = ConnSettings {
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            retries: 6,
            max_delay: Duration::from_secs(2),
        };
        let mut redis = target.connect_lazy(&base)?;
        // The spec's products and every product removed from it mid-sale:
        // orders accepted for a removed one before the gateways stopped
        // selling it still wait in its stream.
        let mut backoff = Backoff::new();
        let skus = loop {
            match crate::warm::warmed_skus(&mut redis, &sale, &doc.spec).await {
                Ok(skus) => break skus,
                Err(e) => {
                    tracing::warn!(error = %e, "the sale's products not read from Redis; retrying");
                    if !backoff.wait(shutdown).await {
                        return Ok(None);
                    }
                }
            }
        };
        backoff.reset();
        // Blocking reads get their own connection(s) so they never stall the
        // acks and status updates queued behind them.
        let reading = ConnSettings {
            response_timeout: settings.block + Duration::from_secs(5),
            ..base
        };
        let readers = match target.mode {
            RedisMode::Standalone => 1,
            RedisMode::Cluster => skus.len().max(1),
        };
        let reader_conns = (0..readers)
            .map(|_| target.connect_lazy(&reading))
            .collect::<Result<Vec<_>, _>>()?;
        let store = OrderStore::connect(&settings.database_url, settings.db_connections)?;
        let streams: Vec<Stream> = skus
            .into_iter()
            .map(|sku| {
                let keys = ProductKeys::new(&sale, &sku);
                Stream {
                    sku,
                    name: keys.stream(),
                    keys,
                }
            })
            .collect();
        let reader = Reader {
            conns: std::sync::Arc::new(reader_conns),
            names: std::sync::Arc::new(streams.iter().map(|s: &Stream| s.name.clone()).collect()),
            skus: std::sync::Arc::new(streams.iter().map(|s: &Stream| s.sku.clone()).collect()),
            consumer: settings.name.clone(),
            batch: settings.batch_size,
            block_ms: usize::try_from(settings.block.as_millis()).unwrap_or(500),
            wait: settings
                .durability
                .unwrap_or_else(|| Durability::default_for(target.mode))
                .wait(settings.replica_wait),
            marks: std::sync::Arc::new(streams.iter().map(|s| s.keys.wait_mark()).collect()),
            meta: crate::keys::SaleKeys::new(&sale).meta(),
            behind: std::sync::Arc::new(
                streams
                    .iter()
                    .map(|_| std::sync::atomic::AtomicBool::new(false))
                    .collect(),
            ),
            health: std::sync::Arc::new(streams.iter().map(|_| StreamHealth::default()).collect()),
            epoch: Instant::now(),
        };
        let mut consumer = Self {
            sale,
            streams,
            redis,
            reader,
            store,
            settings,
            data_failures: HashMap::new(),
            publisher: Publisher::new(&doc.id()),
            sweeper: None,
        };
        let replica_wait = consumer.reader.wait;
        consumer.sweeper = consumer.settings.sweeper.clone().map(|mut s| {
            s.replica_wait = replica_wait;
            crate::payment_timeout::Sweeper::new(
                doc,
                consumer.store.clone(),
                consumer.redis.clone(),
                s,
            )
            .with_skus(consumer.streams.iter().map(|s| s.sku.clone()).collect())
        });
        loop {
            match consumer.prepare(doc).await {
                Ok(()) => return Ok(Some(consumer)),
                Err(e) => {
                    tracing::warn!(error = %e, "consumer not ready; retrying");
                    if !backoff.wait(shutdown).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn prepare(&mut self, doc: &SaleDocument) -> Result<(), ConsumerError> {
        self.store.migrate().await?;
        self.store.ensure_inventory(&self.sale, &doc.spec).await?;
        for s in &self.streams {
            join_group(&mut self.redis, &s.name, true).await?;
        }
        Ok(())
    }

    pub fn store(&self) -> &OrderStore {
        &self.store
    }

    /// Runs until `shutdown`; entries in flight are finished or left pending
    /// for the next consumer, never lost.
    pub async fn run(mut self, shutdown: CancellationToken) {
        use tracing::Instrument;
        let span =
            tracing::info_span!("consumer", sale = %self.sale, consumer = %self.settings.name);
        // Live settings: the payment timeout follows the sale's applied spec.
        let timeout = self.sweeper.as_ref().map(|s| s.timeout_seconds());
        let known: Vec<String> = self.streams.iter().map(|s| s.sku.clone()).collect();
        let follower = tokio::spawn(
            crate::live::follow(
                self.redis.clone(),
                self.sale.clone(),
                shutdown.clone(),
                move |live| {
                    if let Some(t) = &timeout {
                        t.store(
                            live.spec.payment.timeout_seconds,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    let added = crate::live::unknown_products(&known, &live.spec);
                    if !added.is_empty() {
                        tracing::warn!(?added, "products added to the sale; new consumer pods read their streams (the operator rolls them)");
                    }
                },
            )
            .instrument(span.clone()),
        );
        let sweeper = self
            .sweeper
            .take()
            .map(|s| tokio::spawn(s.run(shutdown.clone()).instrument(span.clone())));
        self.run_loop(shutdown).instrument(span).await;
        follower.abort();
        if let Some(task) = sweeper {
            let _ = task.await;
        }
    }

    async fn run_loop(mut self, shutdown: CancellationToken) {
        tracing::info!(streams = self.streams.len(), "consumer running");
        // First our own pending entries (a previous life of this consumer).
        let mut history = true;
        let mut last_claim = Instant::now();
        let mut backoff = Backoff::new();
        let mut finishing: Option<tokio::task::JoinHandle<redis::RedisResult<()>>> = None;
        let mut prefetch: Option<tokio::task::JoinHandle<Result<Vec<Entry>, ConsumerError>>> = None;
        // Claims run beside the loop, one task per stream: a stalled master
        // would otherwise hold every product's batches (and claims) for its
        // response timeout on each round.
        let mut claiming: Vec<Option<tokio::task::JoinHandle<usize>>> = Vec::new();
        while !shutdown.is_cancelled() {
            for slot in &mut claiming {
                if slot.as_ref().is_some_and(|c| c.is_finished())
                    && let Some(done) = slot.take()
                    && done.await.unwrap_or(0) > 0
                {
                    history = true;
                }
            }
            if last_claim.elapsed() >= self.settings.claim_every {
                last_claim = Instant::now();
                claiming.resize_with(self.streams.len(), || None);
                for (i, slot) in claiming.iter_mut().enumerate() {
                    if slot.is_none() {
                        *slot = Some(tokio::spawn(self.claim_abandoned(i)));
                    }
                }
            }
            let read = match prefetch.take() {
                Some(next) if !history => match next.await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "read task failed");
                        history = true;
                        continue;
                    }
                },
                other => {
                    // Whatever a pending prefetch got is in our history now.
                    if let Some(next) = other {
                        let _ = next.await;
                    }
                    // A read of history must not overtake the last batch's
                    // confirmation: its entries are acknowledged only there,
                    // so the read would deliver (and insert) them again.
                    if (history || self.reader.any_behind())
                        && let Some(previous) = finishing.take()
                        && !finished_ok(previous).await
                    {
                        history = true;
                    }
                    tokio::select! {
                        r = self.reader.clone().read(history) => r,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            let entries = match read {
                Ok(e) => {
                    backoff.reset();
                    e
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading streams failed");
                    // What the failed read delivered (a reply lost to a
                    // timeout) or left unconfirmed is pending here: read it
                    // again from history.
                    history = true;
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            if entries.is_empty() {
                history = false;
                continue;
            }
            // No read ahead while a stream is read from history (its read
            // failed while the others delivered): it would deliver this batch again.
            if !history && !self.reader.any_behind() {
                prefetch = Some(tokio::spawn(self.reader.clone().read(false)));
            }
            let mut committed = Vec::new();
            let result = self
                .process(entries, history, &shutdown, &mut committed)
                .await;
            // The Redis half of the previous batch must be done before this
            // one's starts; it ran while this batch was read and inserted.
            if let Some(previous) = finishing.take()
                && !finished_ok(previous).await
            {
                history = true;
            }
            if !committed.is_empty() {
                let mut redis = self.redis.clone();
                let publisher = self.publisher.clone();
                finishing = Some(tokio::spawn(async move {
                    for finish in committed {
                        finish.run(&mut redis, &publisher).await?;
                    }
                    Ok(())
                }));
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, "batch left pending; it will be read again");
                history = true;
                if !backoff.wait(&shutdown).await {
                    break;
                }
            }
        }
        if let Some(next) = prefetch.take() {
            // Entries it read stay pending for this consumer's next life or a claim.
            next.abort();
        }
        // Whatever they claimed already is this consumer's, claimed again later.
        for claim in claiming.into_iter().flatten() {
            claim.abort();
        }
        if let Some(previous) = finishing.take() {
            finished_ok(previous).await;
        }
        tracing::info!("consumer stopped");
    }

    /// Persists, confirms and acknowledges one batch. Transient database
    /// errors are retried here, with the batch in memory, until they pass or
    /// shutdown; entries the database refuses are retried alone, then
    /// dead-lettered.
    async fn process(
        &mut self,
        entries: Vec<Entry>,
        history: bool,
        shutdown: &CancellationToken,
        committed: &mut Vec<Finish>,
    ) -> Result<(), ConsumerError> {
        let started = Instant::now();
        let mut good = Vec::with_capacity(entries.len());
        let mut alone = Vec::new();
        // Delivered many times is no fault of the order: re-reads while no
        // replica confirmed, claims after a consumer died, reads whose reply
        // was lost all count. Such an entry is persisted on its own after the
        // batch (a redelivered one is a no-op, then confirmed), so an entry
        // that somehow breaks a batch cannot keep the others from being
        // persisted; only the database refusing it fails it.
        let over_delivered = if history {
            self.over_delivered(&entries).await?
        } else {
            Vec::new()
        };
        if !over_delivered.is_empty() {
            tracing::warn!(entries = ?over_delivered, "entries delivered many times; persisting each alone");
        }
        for e in entries {
            if e.row.is_none() {
                self.dead_letter(&e, "malformed stream entry").await?;
            } else if over_delivered
                .iter()
                .any(|(s, id)| *s == e.stream && *id == e.id)
            {
                alone.push(e);
            } else {
                good.push(e);
            }
        }

        let mut backoff = Backoff::new();
        let mut pending = good;
        while !pending.is_empty() {
            let rows: Vec<OrderRow> = pending.iter().filter_map(|e| e.row.clone()).collect();
            match self.store.persist_batch(&self.sale, &rows).await {
                Ok(outcome) => {
                    committed.push(self.finish_pipeline(&pending));
                    metrics::counter!("flashsale_consumer_orders_persisted_total")
                        .increment(outcome.inserted);
                    metrics::histogram!("flashsale_consumer_batch_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    tracing::debug!(
                        entries = pending.len(),
                        inserted = outcome.inserted,
                        "batch persisted"
                    );
                    break;
                }
                Err(e) if e.is_transient() => {
                    metrics::counter!("flashsale_consumer_store_errors_total", "kind" => "transient").increment(1);
                    tracing::warn!(error = %e, entries = pending.len(), "database unavailable; retrying batch");
                    if !backoff.wait(shutdown).await {
                        return Err(e.into());
                    }
                }
                Err(e) if pending.len() > 1 => {
                    metrics::counter!("flashsale_consumer_store_errors_total", "kind" => "refused")
                        .increment(1);
                    tracing::warn!(error = %e, "batch refused; persisting its entries one by one");
                    for entry in std::mem::take(&mut pending) {
                        Box::pin(self.process(vec![entry], false, shutdown, committed)).await?;
                    }
                }
                Err(e) => {
                    if e.is_stock_refusal() && self.stock_covers_after_all(&pending[0]).await {
                        // A newer stock covers this order (or is on its way
                        // to PostgreSQL): never the order's fault, so never
                        // counted towards dead-lettering.
                        if !backoff.wait(shutdown).await {
                            return Err(e.into());
                        }
                        continue;
                    }
                    let key = (pending[0].stream, pending[0].id.clone());
                    let n = self.data_failures.entry(key.clone()).or_insert(0);
                    *n += 1;
                    tracing::warn!(error = %e, entry = %key.1, failures = *n, "entry refused by the database");
                    if *n >= self.settings.max_data_failures {
                        self.data_failures.remove(&key);
                        let entry = pending.remove(0);
                        self.dead_letter(&entry, "refused by the database").await?;
                    } else if !backoff.wait(shutdown).await {
                        return Err(e.into());
                    }
                }
            }
        }
        for entry in alone {
            Box::pin(self.process(vec![entry], false, shutdown, committed)).await?;
        }
        Ok(())
    }

    /// Re-checks the current stock after the database refused one order.
    /// Redis only sells what PostgreSQL already covers (`stock::apply`), so a
    /// refusal is an oversell alarm; but if PostgreSQL's stock now has room
    /// for the order, or Redis' stock is above PostgreSQL's (a stock raise
    /// applied out of order, still to reach PostgreSQL), a newer stock covers
    /// it and the order must wait, not fail.
    async fn stock_covers_after_all(&mut self, entry: &Entry) -> bool {
        let Some(row) = &entry.row else {
            return false;
        };
        let s = &self.streams[entry.stream];
        let redis_stock: Result<Option<i64>, _> = redis::cmd("HGET")
            .arg(s.keys.info())
            .arg("stock")
            .query_async(&mut self.redis)
            .await;
        let db = self.store.inventory_row(&self.sale, &row.sku).await;
        match (redis_stock, db) {
            (Ok(redis_stock), Ok(Some(db))) => {
                let room = db.stock - db.sold >= i64::from(row.quantity);
                let behind = redis_stock.is_some_and(|r| r > db.stock);
                if behind {
                    metrics::counter!("flashsale_consumer_stock_behind_total").increment(1);
                    tracing::error!(
                        sku = %row.sku,
                        redis_stock = ?redis_stock,
                        database_stock = db.stock,
                        "PostgreSQL's stock is below Redis'; the order waits for the stock change to reach PostgreSQL"
                    );
                } else if !room {
                    metrics::counter!("flashsale_consumer_oversell_refusals_total").increment(1);
                    tracing::error!(
                        sku = %row.sku,
                        order = %row.order_id,
                        database_stock = db.stock,
                        database_sold = db.sold,
                        "oversell alarm: the database refused an order Redis accepted, and no newer stock covers it"
                    );
                }
                room || behind
            }
            // Cannot tell now: treat as transient, look again after the backoff.
            (Err(e), _) => {
                tracing::warn!(error = %e, "cannot re-check the stock in Redis");
                true
            }
            (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot re-check the stock in PostgreSQL");
                true
            }
            (Ok(_), Ok(None)) => false,
        }
    }

    /// The Redis half of a committed batch: confirm each order (accepted →
    /// confirmed, never over a later state; the script counts the units as
    /// persisted), then acknowledge; the orders that moved are then pushed as
    /// `order.confirmed`. One pipeline per stream: its keys share one slot.
    fn finish_pipeline(&self, entries: &[Entry]) -> Finish {
        let slots = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                // Entries without a row never get here (they are dead-lettered).
                let mine: Vec<&Entry> = entries
                    .iter()
                    .filter(|e| e.stream == i && e.row.is_some())
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                let rows: Vec<&OrderRow> = mine.iter().filter_map(|e| e.row.as_ref()).collect();
                let mut pipe = redis::pipe();
                pipe.load_script(&scripts::CONFIRM).ignore();
                let ids: Vec<&str> = rows.iter().map(|r| r.order_id.as_str()).collect();
                let acks: Vec<&str> = mine.iter().map(|e| e.id.as_str()).collect();
                // The confirmation and the XACK in one script: a refused
                // write (OOM) leaves the entries pending, not acknowledged.
                let mut inv = scripts::CONFIRM.prepare_invoke();
                inv.key(s.keys.orders())
                    .key(s.keys.info())
                    .key(&s.name)
                    .arg(CONSUMER_GROUP)
                    .arg(ids.len())
                    .arg(OrderStatus::Confirmed.as_str())
                    .arg(OrderStatus::Accepted.as_str())
                    .arg(ids)
                    .arg(acks);
                // Not ignored: it answers the statuses its orders had before.
                pipe.invoke_script(&inv);
                // A confirmation no replica holds is not relied on: the batch
                // is read again from history (re-insert is a no-op) and
                // confirmed again, and its orders are not announced yet.
                if let Some(wait) = self.reader.wait {
                    wait.mark_and_wait(&mut pipe, &s.keys.wait_mark());
                }
                let confirming = rows
                    .iter()
                    .map(|r| (r.order_id.clone(), r.user_id.clone(), r.sku.clone()))
                    .collect();
                Some(SlotFinish { pipe, confirming })
            })
            .collect();
        Finish {
            slots,
            waited: self.reader.wait.is_some(),
        }
    }

    /// Gives up on an entry: copy it to the dead-letter stream, fail its order
    /// and return its stock (release.lua moves an order once, so a repeat
    /// after a crash returns nothing twice), then acknowledge it.
    async fn dead_letter(&mut self, entry: &Entry, reason: &str) -> Result<(), ConsumerError> {
        let s = &self.streams[entry.stream];
        tracing::error!(entry = %entry.id, stream = %s.name, reason, "dead-lettering entry");
        let order_id = entry.row.as_ref().map(|r| r.order_id.clone());
        // Copy, release and XACK in one script: Redis runs an XACK even out
        // of memory, so pipelined after a refused release it acknowledged an
        // order never ended.
        let mut inv = scripts::DEAD_LETTER.prepare_invoke();
        inv.key(&s.name).key(s.keys.dead_letter());
        if order_id.is_some() {
            inv.key(s.keys.orders())
                .key(s.keys.stock())
                .key(s.keys.buyers())
                .key(s.keys.info());
        }
        let released: (String, String) = inv
            .arg(CONSUMER_GROUP)
            .arg(&entry.id)
            .arg(order_id.as_deref().unwrap_or(""))
            .arg(reason)
            .invoke_async(&mut self.redis)
            .await?;
        metrics::counter!("flashsale_consumer_dead_lettered_total").increment(1);
        // Told once: only the call that moved the order pushes.
        if let (Some(id), Some(row)) = (&order_id, entry.row.as_ref())
            && released.0 == "released"
        {
            let event = OrderEvent::new(id, &s.sku, OrderStatus::Failed, Some(reason.to_string()));
            if let Err(e) = self
                .publisher
                .publish(&mut self.redis, &row.user_id, &event)
                .await
            {
                tracing::debug!(error = %e, "order.failed not pushed");
            }
        }
        Ok(())
    }

    /// Entries among `entries` delivered more than `max_deliveries` times,
    /// by stream and id.
    async fn over_delivered(
        &mut self,
        entries: &[Entry],
    ) -> Result<Vec<(usize, String)>, ConsumerError> {
        let mut out = Vec::new();
        for (i, s) in self.streams.iter().enumerate() {
            let ids: Vec<&str> = entries
                .iter()
                .filter(|e| e.stream == i)
                .map(|e| e.id.as_str())
                .collect();
            let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
                continue;
            };
            let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(&s.name)
                .arg(CONSUMER_GROUP)
                .arg(*first)
                .arg(*last)
                .arg(ids.len())
                .arg(&self.settings.name)
                .query_async(&mut self.redis)
                .await?;
            out.extend(
                pending
                    .into_iter()
                    .filter(|(_, _, _, delivered)| *delivered > self.settings.max_deliveries)
                    .map(|(id, ..)| (i, id)),
            );
        }
        Ok(out)
    }

    /// Takes over the entries another consumer left pending on stream `i`
    /// for `claim_idle`.
    fn claim_abandoned(
        &self,
        i: usize,
    ) -> impl std::future::Future<Output = usize> + Send + 'static {
        let idle = u64::try_from(self.settings.claim_idle.as_millis()).unwrap_or(30_000);
        // In a cluster, the stream's own reading connection: a stalled
        // master's requests hold up no other product's. On one Redis the
        // reader's single connection blocks in its reads; claims keep theirs.
        let own = match self.redis.mode() {
            RedisMode::Cluster => self.reader.conns.get(i),
            RedisMode::Standalone => None,
        };
        let mut redis = own.unwrap_or(&self.redis).clone();
        let stream = self
            .streams
            .get(i)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let (name, count) = (self.settings.name.clone(), self.settings.batch_size);
        async move {
            match claim_stream(&mut redis, &stream, &name, idle, count).await {
                Ok(0) => 0,
                Ok(claimed) => {
                    tracing::info!(%stream, claimed, "claimed entries abandoned by another consumer");
                    metrics::counter!("flashsale_consumer_claimed_total").increment(claimed as u64);
                    claimed
                }
                Err(e) => {
                    tracing::warn!(%stream, error = %e, "claiming abandoned entries failed");
                    0
                }
            }
        }
    }
}

/// `XAUTOCLAIM` over one stream's whole pending list, for `consumer`.
async fn claim_stream(
    redis: &mut RedisConn,
    stream: &str,
    consumer: &str,
    idle_ms: u64,
    count: usize,
) -> redis::RedisResult<usize> {
    let mut claimed = 0;
    let mut cursor = "0-0".to_string();
    loop {
        let (next, ids, _deleted): (String, Vec<String>, Vec<String>) = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(CONSUMER_GROUP)
            .arg(consumer)
            .arg(idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(count)
            .arg("JUSTID")
            .query_async(redis)
            .await?;
        claimed += ids.len();
        // Not on an empty answer: Redis scans at most ten times COUNT
        // pending entries per call, so a page may claim nothing with idle
        // entries further on; the cursor says when it is done.
        if next == "0-0" {
            return Ok(claimed);
        }
        cursor = next;
    }
}

/// The Redis half of one committed batch, and who to tell.
struct Finish {
    slots: Vec<SlotFinish>,
    /// Each pipeline ends in the wait mark and WAIT (`replica`).
    waited: bool,
}

/// One stream's part of a [`Finish`].
struct SlotFinish {
    /// SCRIPT LOAD, then one call that confirms and acknowledges.
    pipe: redis::Pipeline,
    /// (order id, user, sku) in the transition call's argument order.
    confirming: Vec<(String, String, String)>,
}

impl Finish {
    async fn run(self, redis: &mut RedisConn, publisher: &Publisher) -> redis::RedisResult<()> {
        let runs = self.slots.iter().map(|slot| {
            let mut redis = redis.clone();
            async move {
                let started = Instant::now();
                let mut values: Vec<redis::Value> = slot.pipe.query_async(&mut redis).await?;
                if self.waited {
                    let waited = values.pop().unwrap_or(redis::Value::Nil);
                    let path = WaitPath::ConsumerConfirm;
                    if !durability::confirmed(path, &Ok(waited), started) {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "no replica confirmed the batch's confirmations in time",
                        )));
                    }
                }
                let before: Vec<String> = match values.pop() {
                    Some(v) => redis::from_redis_value(v).map_err(redis::RedisError::from)?,
                    None => Vec::new(),
                };
                Ok(before)
            }
        });
        let before = futures::future::try_join_all(runs).await?;
        let events: Vec<(String, OrderEvent)> = self
            .slots
            .into_iter()
            .zip(before)
            .flat_map(|(slot, before)| slot.confirming.into_iter().zip(before))
            .filter(|(_, prev)| prev == OrderStatus::Accepted.as_str())
            .map(|((id, user, sku), _)| {
                let event = OrderEvent::new(&id, &sku, OrderStatus::Confirmed, None);
                (user, event)
            })
            .collect();
        // Pushes are best effort and off the batch chain: a push that fails
        // is not a reason to re-persist (the client's resume snapshot shows
        // the order confirmed), and the next batch need not wait for it.
        if !events.is_empty() {
            let (mut redis, publisher) = (redis.clone(), publisher.clone());
            tokio::spawn(async move {
                if let Err(e) = publisher.publish_many(&mut redis, &events).await {
                    tracing::debug!(error = %e, "order.confirmed not pushed");
                }
            });
        }
        Ok(())
    }
}

/// Waits for a batch's Redis half; a failure leaves its entries pending, to
/// be read again from this consumer's history (re-insert is a no-op).
async fn finished_ok(task: tokio::task::JoinHandle<redis::RedisResult<()>>) -> bool {
    match task.await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "confirming a persisted batch failed; it will be read again");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "confirming task failed");
            false
        }
    }
}

/// The order row a stream entry (written by purchase.lua) stands for: one
/// field `o`, `"<order id> <user> <qty> <seq> <price> <at ms>"`, or the six
/// fields of key layout 1, so entries a previous version's gateway left in
/// the stream are still persisted.
pub fn parse_entry(sku: &str, e: &StreamId) -> Option<OrderRow> {
    let row = |order_id, user_id, seq, quantity, unit_price, accepted_at_ms| OrderRow {
        order_id,
        sku: sku.to_string(),
        user_id,
        seq,
        quantity,
        unit_price,
        accepted_at_ms,
        stream_id: e.id.clone(),
    };
    if let Some(packed) = e.get::<String>("o") {
        let mut w = packed.split(' ');
        let mut next = || w.next().filter(|s| !s.is_empty());
        let (id, user) = (next()?.to_string(), next()?.to_string());
        let (quantity, seq) = (next()?.parse().ok()?, next()?.parse().ok()?);
        let (price, at) = (next()?.parse().ok()?, next()?.parse().ok()?);
        if next().is_some() {
            return None;
        }
        return Some(row(id, user, seq, quantity, price, at));
    }
    Some(row(
        e.get("id")?,
        e.get("user")?,
        e.get("seq")?,
        e.get("qty")?,
        e.get("price")?,
        e.get("at")?,
    ))
}

/// Exponential backoff, 50 ms to 2 s, that gives up when shutdown comes.
struct Backoff {
    delay: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            delay: Duration::from_millis(50),
        }
    }

    fn reset(&mut self) {
        self.delay = Duration::from_millis(50);
    }

    /// Sleeps; false if shutdown came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.delay;
        self.delay = (self.delay * 2).min(Duration::from_secs(2));
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose read keeps failing (a promoted master with no replica
    /// yet) is read from history alone: the others go back to new entries
    /// once theirs is empty, and the read is an error only when all failed.
    #[test]
    fn a_failing_stream_keeps_only_itself_in_history() {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let behind = [AtomicBool::new(false), AtomicBool::new(false)];
        let flags = || behind.iter().map(|b| b.load(Relaxed)).collect::<Vec<_>>();
        let pending = || {
            vec![Entry {
                stream: 0,
                id: "1-0".into(),
                row: None,
            }]
        };

        // New entries from the first stream, the second's master down.
        let read = merge::<&str>(
            vec![(false, Some(Ok(pending()))), (false, Some(Err("down")))],
            &behind,
        );
        assert_eq!(read.map(|e| e.len()), Ok(1));
        assert_eq!(flags(), [false, true]);
        // The first is empty, the second still down: no error, and only
        // the second stays behind.
        let read = merge(
            vec![(false, Some(Ok(Vec::new()))), (true, Some(Err("down")))],
            &behind,
        );
        assert_eq!(read.map(|e| e.len()), Ok(0));
        assert_eq!(flags(), [false, true]);
        // Back: its history delivers, then comes back empty.
        let read = merge::<&str>(
            vec![(false, Some(Ok(Vec::new()))), (true, Some(Ok(pending())))],
            &behind,
        );
        assert_eq!(read.map(|e| e.len()), Ok(1));
        assert_eq!(flags(), [false, true]);
        let read = merge::<&str>(
            vec![(false, Some(Ok(Vec::new()))), (true, Some(Ok(Vec::new())))],
            &behind,
        );
        assert_eq!(read.map(|e| e.len()), Ok(0));
        assert_eq!(flags(), [false, false]);
        // Failing again, then backing off: not read, it stays behind, and
        // the round is no error.
        let read = merge::<&str>(
            vec![(false, Some(Ok(Vec::new()))), (false, Some(Err("down")))],
            &behind,
        );
        assert_eq!(read.map(|e| e.len()), Ok(0));
        let read = merge::<&str>(vec![(false, Some(Ok(pending()))), (true, None)], &behind);
        assert_eq!(read.map(|e| e.len()), Ok(1));
        assert_eq!(flags(), [false, true]);
        // Every read failed: an error.
        let read = merge(
            vec![(false, Some(Err("down"))), (false, Some(Err("down")))],
            &behind,
        );
        assert_eq!(read.map(|e| e.len()), Err("down"));
    }

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        redis::Value::BulkString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn packed_and_layout_1_entries_give_the_same_row() {
        let packed = entry(&[("o", "tv.01J 4ZL 2 3 19.99 1763700000000")]);
        let six = entry(&[
            ("id", "tv.01J"),
            ("user", "4ZL"),
            ("qty", "2"),
            ("seq", "3"),
            ("price", "19.99"),
            ("at", "1763700000000"),
        ]);
        let row = parse_entry("tv", &packed);
        assert_eq!(row, parse_entry("tv", &six));
        let row = row.map(|r| (r.order_id, r.user_id, r.quantity, r.seq, r.unit_price));
        assert_eq!(
            row,
            Some(("tv.01J".into(), "4ZL".into(), 2, 3, "19.99".into()))
        );
    }

    #[test]
    fn a_short_long_or_garbled_entry_is_no_row() {
        for bad in [
            "tv.01J 4ZL 2 3 19.99",
            "tv.01J 4ZL 2 3 19.99 1763700000000 x",
            "tv.01J 4ZL two 3 19.99 1763700000000",
            "tv.01J  2 3 19.99 1763700000000",
        ] {
            assert_eq!(parse_entry("tv", &entry(&[("o", bad)])), None, "{bad}");
        }
        assert_eq!(parse_entry("tv", &entry(&[("garbage", "1")])), None);
    }
}
