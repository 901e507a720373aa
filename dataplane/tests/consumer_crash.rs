//! A consumer SIGKILLed in the middle of a batch loses nothing: a new
//! consumer claims its pending entries and every accepted order is persisted
//! exactly once.

mod common;

use std::time::Duration;

use common::*;
use dataplane::tools::audit::{audit, wait_drained};
use dataplane::tools::crowd::{CrowdConfig, Target};

async fn pending_count(
    conn: &mut redis::aio::ConnectionManager,
    stream: &str,
) -> redis::RedisResult<u64> {
    let summary: (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
        .arg(stream)
        .arg("persist")
        .query_async(conn)
        .await?;
    Ok(summary.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_new_consumer_persists_everything_once() -> TestResult {
    let servers = Servers::start()?;
    let doc = sale("crash", &[("item", 3_000, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw").await?;
    let dir = tempfile::tempdir()?;
    let config = write_doc(dir.path(), &doc)?;
    let store = servers.store().await?;
    let mut conn = servers.redis_conn().await?;
    let stream = dataplane::keys::ProductKeys::new(&doc.id(), "item").stream();

    // The first consumer joins the group and creates the inventory row.
    let mut first = spawn_consumer_process(
        &config,
        &servers,
        "consumer-a",
        200,
        &dir.path().join("a.log"),
    )?;
    let joined = eventually(Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            match store.pool().get().await {
                Ok(c) => c
                    .query_one(
                        "SELECT count(*) FROM flashsale_inventory WHERE sale = 'test/crash'",
                        &[],
                    )
                    .await
                    .map(|r| r.get::<_, i64>(0) == 1)
                    .unwrap_or(false),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(
        joined,
        "consumer did not start: {}",
        std::fs::read_to_string(dir.path().join("a.log"))?
    );

    // Hold the inventory row so the consumer's next batch blocks inside its
    // transaction: entries delivered to it, pending, not persisted.
    let pg = store.pool().get().await?;
    pg.batch_execute(
        "BEGIN; SELECT * FROM flashsale_inventory WHERE sale = 'test/crash' FOR UPDATE;",
    )
    .await?;

    let result = dataplane::tools::crowd::run(CrowdConfig {
        gateways: vec![gw.addr],
        sale: "crash".into(),
        skus: vec!["item".into()],
        buyers: dataplane::tools::crowd::Buyers::Random(2_000),
        connections: 32,
        requests: 2_000,
        max_duration: Duration::from_secs(60),
        retry_fraction: 0.0,
        rate: None,
        token_secret: SECRET.to_vec(),
        target: Target::Purchase,
        source_ips: 8,
    })
    .await?;
    assert!(result.accepted > 1_000, "{result:?}");

    let mid_batch = eventually(Duration::from_secs(10), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { pending_count(&mut conn, &stream).await.unwrap_or(0) > 0 }
    })
    .await;
    assert!(mid_batch, "the consumer never took a batch");
    first.kill()?;
    first.wait()?;
    pg.batch_execute("ROLLBACK").await?;
    drop(pg);
    // The killed consumer's statement may still commit once the lock is gone
    // (PostgreSQL finishes it without its client): committed but never
    // acknowledged, the case redelivery must turn into a no-op.
    let (rows_before, _) = order_rows(&store, "test/crash").await?;
    assert!((rows_before as u64) < result.accepted);
    assert!(
        pending_count(&mut conn, &stream).await? > 0,
        "the killed consumer's batch is still pending"
    );

    // A new consumer (another pod) claims the abandoned entries.
    let mut second = spawn_consumer_process(
        &config,
        &servers,
        "consumer-b",
        200,
        &dir.path().join("b.log"),
    )?;
    let drained = wait_drained(
        &mut conn,
        &store,
        &doc.id(),
        &doc.spec,
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        drained,
        "not drained: {}",
        std::fs::read_to_string(dir.path().join("b.log"))?
    );
    let report = audit(&mut conn, &store, &doc.id(), &doc.spec, &result.orders, 0).await?;
    assert!(report.passed(), "{:?}", report.problems());
    let (rows, distinct) = order_rows(&store, "test/crash").await?;
    assert_eq!(
        rows as u64, result.accepted,
        "every accepted order persisted"
    );
    assert_eq!(distinct, rows, "exactly once");
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move { pending_count(&mut conn, &stream).await.unwrap_or(1) == 0 }
        })
        .await,
        "everything acknowledged"
    );
    second.kill()?;
    second.wait()?;
    gw.stop().await;
    Ok(())
}

/// A consumer back from a crash drains what it had read from its history,
/// each entry once: a history read waits for the last batch's confirmation
/// (its entries' XACK), or it would deliver that batch a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_drains_its_history_once() -> TestResult {
    use dataplane::consumer::{Consumer, ConsumerSettings};
    use dataplane::keys::{CONSUMER_GROUP, ProductKeys};
    const ORDERS: usize = 600;
    const BATCH: usize = 100;
    let servers = Servers::start()?;
    let doc = sale("history", &[("item", ORDERS as i64, 1)]);
    warm(&servers, &doc).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw-history").await?;
    let users: Vec<String> = (0..ORDERS).map(|i| format!("u{i}")).collect();
    for chunk in users.chunks(50) {
        let answers =
            futures::future::join_all(chunk.iter().map(|u| buy_one(&gw, "history", u, "item")))
                .await;
        for a in answers {
            assert_eq!(a?.0, 202);
        }
    }
    gw.stop().await;

    // A consumer's earlier life read every entry and died before persisting.
    let stream = ProductKeys::new(&doc.id(), "item").stream();
    let mut conn = servers.redis_conn().await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(CONSUMER_GROUP)
        .arg("0")
        .query_async(&mut conn)
        .await?;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(CONSUMER_GROUP)
        .arg("consumer-h")
        .arg("COUNT")
        .arg(ORDERS)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await?;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut settings = ConsumerSettings::new(servers.redis.url(), servers.pg.url());
    settings.name = "consumer-h".into();
    settings.batch_size = BATCH;
    let consumer = Consumer::start(&doc, settings, &stop)
        .await?
        .ok_or("the consumer did not start")?;
    let task = tokio::spawn(consumer.run(stop.clone()));
    let store = servers.store().await?;
    let sale_id = doc.id().to_string();
    let drained = eventually(Duration::from_secs(30), || async {
        order_rows(&store, &sale_id).await.map(|r| r.0).unwrap_or(0) == ORDERS as i64
    })
    .await;
    stop.cancel();
    let _ = task.await;
    assert!(drained, "the backlog was not persisted");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    let acks: usize = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_xack:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // One XACK per batch of the history (each batch's entries once).
    assert_eq!(acks, ORDERS / BATCH, "{stats}");
    Ok(())
}
