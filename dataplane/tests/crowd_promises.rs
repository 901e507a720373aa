//! The three promises under a crowd (`common::crowd`) on one Redis server.
//! `crowd_promises_on_cluster.rs` runs the same on a Redis Cluster, in a test
//! binary of its own so the two never compete for the machine.

mod common;

use std::time::Duration;

use common::crowd::crowd_keeps_every_promise;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_attempts_keep_every_promise() -> TestResult {
    let servers = Servers::start()?;
    crowd_keeps_every_promise(&servers, "crowd", Duration::from_millis(250)).await
}
