//! Group commit of purchases under `redis.durability: replica`.
//!
//! A 202 must not be sent before a replica holds the purchase, and `WAIT`
//! blocks the connection it runs on until one does. One WAIT per purchase on
//! a shared connection would serialise every purchase behind a replication
//! round trip; instead each product (one Redis slot) has a committer task
//! that takes every purchase queued at that moment (no added delay) and sends
//! them as one pipeline — `EVALSHA purchase …` × n, then `WAIT 1 <ms>` — on
//! its own connection to the slot's master: one packed request, one
//! connection, so the WAIT counts exactly those writes, and one replica
//! acknowledgement confirms the whole batch.

use std::time::Instant;

use redis::aio::ConnectionLike;
use tokio::sync::{mpsc, oneshot};

use crate::durability::{ReplicaWait, WaitPath, split_wait};
use crate::keys::PurchaseKeys;
use crate::scripts;

/// Most purchases one pipeline carries.
pub const DEFAULT_MAX_BATCH: usize = 256;

/// The purchase script's answer, and whether a replica holds what it wrote.
#[derive(Debug)]
pub struct Decision {
    pub answer: scripts::PurchaseAnswer,
    pub replicated: bool,
}

struct Job {
    user: String,
    quantity: i64,
    order_id: String,
    idempotency_field: String,
    /// The spent-ticket key and the ticket's expiry, on a ticket sale.
    ticket: Option<(String, i64)>,
    reply: oneshot::Sender<redis::RedisResult<Decision>>,
}

/// The queue to one product's committer task.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Job>,
}

/// Purchases waiting for a committer at most; beyond it a purchase waits for
/// room (the gateway's Redis timeout bounds the wait).
const QUEUE: usize = 8192;

impl Committer {
    /// The committer of one product and the task that runs it (spawned with
    /// the gateway's background work). `conn` should be the committer's own
    /// connection: each WAIT blocks it for a replication round trip.
    pub fn new<C>(
        keys: PurchaseKeys,
        conn: C,
        wait: ReplicaWait,
        max_batch: usize,
    ) -> (Self, Worker)
    where
        C: ConnectionLike + Send + 'static,
    {
        let (queue, rx) = mpsc::channel(QUEUE);
        let worker = Worker(Box::pin(run(keys, conn, rx, wait, max_batch.max(1))));
        (Self { queue }, worker)
    }

    /// Runs the purchase script in the next batch and answers once the batch's
    /// WAIT has returned.
    pub async fn submit(
        &self,
        user: &str,
        quantity: i64,
        order_id: &str,
        idempotency_field: &str,
        ticket: Option<(String, i64)>,
    ) -> redis::RedisResult<Decision> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            user: user.to_string(),
            quantity,
            order_id: order_id.to_string(),
            idempotency_field: idempotency_field.to_string(),
            ticket,
            reply,
        };
        self.queue.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A product's committer loop, to be spawned on the runtime.
pub struct Worker(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>);

impl Worker {
    pub fn spawn(self) {
        tokio::spawn(self.0);
    }
}

fn stopped() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "the purchase committer stopped"))
}

async fn run<C: ConnectionLike + Send>(
    keys: PurchaseKeys,
    mut conn: C,
    mut rx: mpsc::Receiver<Job>,
    wait: ReplicaWait,
    max_batch: usize,
) {
    let mut jobs = Vec::with_capacity(max_batch);
    let batch_size = metrics::histogram!("flashsale_gateway_commit_batch_size");
    while rx.recv_many(&mut jobs, max_batch).await > 0 {
        batch_size.record(jobs.len() as f64);
        commit(&keys, &mut conn, std::mem::take(&mut jobs), wait).await;
    }
}

/// One batch: the scripts and a WAIT in one pipeline. A script that found
/// the server without it (NOSCRIPT: a restarted or promoted node) did not
/// run; it is loaded and those purchases go again, with a WAIT of their own.
async fn commit<C: ConnectionLike>(
    keys: &PurchaseKeys,
    conn: &mut C,
    mut jobs: Vec<Job>,
    wait: ReplicaWait,
) {
    for _ in 0..2 {
        // A caller that stopped waiting was answered 503 (the gateway's
        // Redis timeout ran out while the queue was long): its purchase must
        // not run, or it would hold a unit for an order its buyer was told
        // failed. Dropping it here also sheds stale work at the peak.
        let queued = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.len() < queued {
            metrics::counter!("flashsale_gateway_commit_abandoned_total")
                .increment((queued - jobs.len()) as u64);
        }
        if jobs.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for j in &jobs {
            pipe.add_command(
                scripts::Purchase {
                    keys,
                    user: &j.user,
                    quantity: j.quantity,
                    order_id: &j.order_id,
                    idempotency_field: &j.idempotency_field,
                    ticket: j.ticket.as_ref(),
                }
                .invocation()
                .into_cmd(),
            );
        }
        wait.append(&mut pipe);
        let started = Instant::now();
        let replies: Vec<redis::RedisResult<redis::Value>> = match pipe.query_async(conn).await {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!("flashsale_redis_replica_wait_total", "path" => WaitPath::Purchase.as_str(), "outcome" => "error")
                    .increment(1);
                for j in jobs {
                    let _ = j.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        let (replies, replicated) = split_wait(WaitPath::Purchase, replies, started);
        let mut again = Vec::new();
        for (j, reply) in jobs.into_iter().zip(replies) {
            match reply {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    again.push(j)
                }
                Err(e) => {
                    let _ = j.reply.send(Err(e));
                }
                Ok(v) => {
                    let answer = redis::from_redis_value(v)
                        .map(|answer| Decision { answer, replicated })
                        .map_err(redis::RedisError::from);
                    let _ = j.reply.send(answer);
                }
            }
        }
        if again.is_empty() {
            return;
        }
        if let Err(e) = scripts::PURCHASE.load_async(conn).await {
            for j in again {
                let _ = j.reply.send(Err(e.clone()));
            }
            return;
        }
        jobs = again;
    }
    for j in jobs {
        let _ = j.reply.send(Err(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoScript),
            "the purchase script could not be loaded",
        ))));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::keys::ProductKeys;
    use crate::tools::servers::RedisServer;

    fn job(user: &str, reply: oneshot::Sender<redis::RedisResult<Decision>>) -> Job {
        Job {
            user: user.to_string(),
            quantity: 1,
            order_id: format!("item.{user}"),
            idempotency_field: String::new(),
            ticket: None,
            reply,
        }
    }

    /// A purchase whose caller stopped waiting before its batch went out
    /// (answered 503 store_timeout) is not run: no unit is held for it.
    #[tokio::test]
    async fn a_purchase_nobody_waits_for_any_more_is_not_run()
    -> Result<(), Box<dyn std::error::Error>> {
        let redis = RedisServer::start()?;
        let mut conn = redis::Client::open(redis.url())?
            .get_multiplexed_async_connection()
            .await?;
        let doc = crate::tools::bench::doc("commit", &[("item", 10)])?;
        crate::warm::warm_sale(&mut conn, &doc.id(), &doc.spec).await?;
        let keys = ProductKeys::new(&doc.id(), "item");

        let (gone, answer) = oneshot::channel();
        drop(answer);
        let (waiting, answer) = oneshot::channel();
        let wait = ReplicaWait {
            timeout: Duration::from_millis(10),
        };
        let jobs = vec![job("gone", gone), job("waiting", waiting)];
        commit(&keys.purchase_keys(), &mut conn, jobs, wait).await;

        let decision = answer.await??;
        assert!(matches!(
            decision.answer,
            scripts::PurchaseAnswer::Accepted { remaining: 9 }
        ));
        let stock: i64 = redis::cmd("GET")
            .arg(keys.stock())
            .query_async(&mut conn)
            .await?;
        let gone: bool = redis::cmd("HEXISTS")
            .arg(keys.buyers())
            .arg("gone")
            .query_async(&mut conn)
            .await?;
        assert_eq!((stock, gone), (9, false));
        Ok(())
    }
}
