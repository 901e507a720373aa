//! PostgreSQL stops for 10 s in the middle of a sale: the gateway keeps
//! answering (winners are decided in Redis), the consumers retry, and once
//! PostgreSQL is back the backlog drains with nothing lost.

mod common;

use std::time::Duration;

use common::*;
use dataplane::tools::audit::{audit, wait_drained};
use dataplane::tools::crowd::{CrowdConfig, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_after_ten_seconds_without_postgres() -> TestResult {
    let mut servers = Servers::start()?;
    let doc = sale("outage", &[("item", 20_000, 1)]);
    warm(&servers, &doc).await?;
    let consumers = RunningConsumers::start(&doc, &servers, 2).await?;
    let gw = RunningGateway::start(&doc, &servers.redis.url(), "gw").await?;
    let store = servers.store().await?;
    let mut conn = servers.redis_conn().await?;

    // About 16 s of steady buying at 500 requests/s.
    let crowd = tokio::spawn(dataplane::tools::crowd::run(CrowdConfig {
        gateways: vec![gw.addr],
        sale: "outage".into(),
        skus: vec!["item".into()],
        buyers: dataplane::tools::crowd::Buyers::Random(50_000),
        connections: 16,
        requests: 8_000,
        max_duration: Duration::from_secs(40),
        retry_fraction: 0.0,
        rate: Some(500.0),
        token_secret: SECRET.to_vec(),
        target: Target::Purchase,
        source_ips: 4,
    }));

    // The crowd signs its 50,000 tokens first: wait for its orders to land.
    let flowing = eventually(Duration::from_secs(20), || async {
        order_rows(&store, "test/outage")
            .await
            .is_ok_and(|(rows, _)| rows > 0)
    })
    .await;
    assert!(flowing, "orders were being persisted before the outage");
    let (before, _) = order_rows(&store, "test/outage").await?;
    tokio::task::block_in_place(|| servers.pg.stop());
    tokio::time::sleep(Duration::from_secs(10)).await;
    // While PostgreSQL was down the gateway kept accepting into Redis.
    let accepted_in_redis =
        dataplane::counters::product_counters(&mut conn, &doc.id(), &doc.spec).await?;
    let sold = accepted_in_redis
        .iter()
        .flatten()
        .map(|c| c.sold())
        .sum::<i64>();
    assert!(
        sold > before + 2_000,
        "sold {sold}, persisted before {before}"
    );
    tokio::task::block_in_place(|| servers.pg.restart())?;

    let result = crowd.await??;
    assert_eq!(
        result.server_errors + result.transport_errors,
        0,
        "the gateway kept answering: {result:?}"
    );
    assert!(result.accepted > 5_000, "{result:?}");
    let drained = wait_drained(
        &mut conn,
        &store,
        &doc.id(),
        &doc.spec,
        Duration::from_secs(60),
    )
    .await?;
    assert!(drained, "the backlog drained");
    let report = audit(&mut conn, &store, &doc.id(), &doc.spec, &result.orders, 0).await?;
    assert!(report.passed(), "{:?}", report.problems());
    assert_eq!(report.failed_orders, 0, "an outage dead-letters nothing");
    let (rows, distinct) = order_rows(&store, "test/outage").await?;
    assert_eq!(
        (rows as u64, distinct as u64),
        (result.accepted, result.accepted)
    );
    gw.stop().await;
    consumers.stop().await;
    Ok(())
}
