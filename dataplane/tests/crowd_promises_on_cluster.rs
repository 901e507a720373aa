//! The three promises under a crowd (`common::crowd`) on a Redis Cluster of
//! three masters and three replicas, each product on its own master.

mod common;

use std::time::Duration;

use common::crowd::{SKUS, crowd_keeps_every_promise};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_attempts_keep_every_promise_on_a_redis_cluster() -> TestResult {
    let servers = tokio::task::spawn_blocking(ClusterServers::start).await??;
    // This sale's three products hash to slots served by three different masters.
    let sale = "crowd-cluster";
    let mut masters = Vec::new();
    for sku in SKUS {
        let key =
            dataplane::keys::ProductKeys::new(&dataplane::spec::SaleId::new("test", sale), sku)
                .stock();
        masters.push(servers.cluster.master_of(&key)?.port);
    }
    masters.sort_unstable();
    masters.dedup();
    assert_eq!(masters.len(), 3, "one master per product");
    // Six Redis processes (every write also replayed on a replica) share
    // the test machine's cores with the crowd, gateways and consumers: a
    // wider Redis timeout keeps a slow test machine from turning into 503s.
    // The promises checked are the same.
    crowd_keeps_every_promise(&servers, sale, Duration::from_secs(2)).await
}
