//! What runs around the product rather than in a pod: throwaway Redis and
//! PostgreSQL servers, the crowd generator, the audit of every promise, the
//! local end-to-end sale, the benchmarks, and the Python tools the tests drive.

pub mod audit;
pub mod bench;
pub mod cluster_bench;
pub mod crowd;
pub mod gateway_process;
pub mod local;
pub mod push_bench;
pub mod pyenv;
pub mod servers;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gateway::{self, Gateway, GatewayError};

/// Serves `gw` in this process on free loopback ports (public and admin),
/// as the local sale and the benches run it, until `shutdown`: the public
/// address and the serving task.
pub async fn serve_on_loopback(
    gw: Arc<Gateway>,
    shutdown: &CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<(), GatewayError>>), GatewayError> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let public = gateway::bind(loopback).await?;
    let admin = gateway::bind(loopback).await?;
    let addr = public.local_addr().map_err(GatewayError::Serve)?;
    let task = tokio::spawn(gateway::serve(gw, public, admin, shutdown.clone()));
    Ok((addr, task))
}
