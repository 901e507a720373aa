//! `flashsale-operator`: reconciles FlashSale resources while it holds the
//! leader Lease; serves `/metrics` and `/healthz` on every replica.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use operator::autoscaler;
use operator::clock::SystemClock;
use operator::leader::{self, LeaseSettings};
use operator::metrics::Metrics;
use operator::reconciler::{self, Context, Settings};
use operator::telemetry::{self, LogFormat};
use tokio::sync::watch;
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where `/metrics` and `/healthz` are served.
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Gateway and consumer image for sales that name none.
    #[arg(long, env = "DATAPLANE_IMAGE", default_value_t = reconciler::default_image())]
    dataplane_image: String,
    /// A Secret, in each sale's namespace, that gateway and consumer pods
    /// pull their image with (a private registry); repeat for several.
    #[arg(long = "dataplane-image-pull-secret")]
    dataplane_image_pull_secrets: Vec<String>,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
    /// Longest pause between reconciles of a live sale, in seconds.
    #[arg(long, default_value_t = 15)]
    refresh_seconds: u64,
    /// Pause before retrying a missing Secret or an unreachable Redis, in seconds.
    #[arg(long, default_value_t = 30)]
    retry_seconds: u64,
    /// How long deletion waits for accepted orders to be persisted, in seconds.
    #[arg(long, default_value_t = 600)]
    drain_timeout_seconds: u64,
    /// Run without a Lease (a single replica, e.g. outside a cluster).
    #[arg(long)]
    no_leader_election: bool,
    #[arg(long, env = "LEASE_NAME", default_value = "flashsale-operator")]
    lease_name: String,
    /// The Lease's namespace: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease: its pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    #[arg(long, default_value_t = 5)]
    lease_grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format)?;
    // With grace ≥ duration the holder would renew in a busy loop, with 0
    // only at expiry (leadership flapping): refuse them, naming the flags.
    if !args.no_leader_election
        && (args.lease_grace_seconds == 0
            || args.lease_grace_seconds >= args.lease_duration_seconds)
    {
        anyhow::bail!(
            "--lease-grace-seconds ({}) must be at least 1 and below --lease-duration-seconds ({}): the holder renews that long before the Lease expires",
            args.lease_grace_seconds,
            args.lease_duration_seconds
        );
    }
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });

    let metrics = Arc::new(Metrics::default());
    let admin = tokio::spawn(operator::admin::serve(
        args.admin_addr,
        metrics.clone(),
        halted(stop.clone()),
    ));
    let result = run(&args, metrics, stop).await;
    if let Err(e) = &result {
        error!(error = format!("{e:#}"), "operator stopped");
    }
    match tokio::time::timeout(Duration::from_secs(5), admin).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "admin server failed"),
        Ok(Err(e)) => warn!(error = %e, "admin server task failed"),
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
    result
}

async fn run(
    args: &Args,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connect to the Kubernetes API")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("flashsale-operator-{}", std::process::id()));
    let reporter = Reporter {
        controller: "flashsale-operator".into(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        clock: Arc::new(SystemClock),
        metrics: metrics.clone(),
        redis: Default::default(),
        stores: Default::default(),
        settings: Settings {
            dataplane: operator::children::PodDefaults {
                image: args.dataplane_image.clone(),
                image_pull_secrets: args.dataplane_image_pull_secrets.clone(),
            },
            refresh: Duration::from_secs(args.refresh_seconds),
            retry: Duration::from_secs(args.retry_seconds),
            drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
        },
        served: Default::default(),
        applied: Default::default(),
    });

    if args.no_leader_election {
        // The only replica leads: the no-leader alert must not fire.
        metrics.leader.set(1);
        return lead(ctx, stop).await;
    }
    let lease = LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity,
        duration_seconds: args.lease_duration_seconds,
        grace_seconds: args.lease_grace_seconds,
    };
    let mut waiting = stop.clone();
    let Some(mut leadership) = leader::acquire(client, &lease, &mut waiting)
        .await
        .context("leader election")?
    else {
        return Ok(());
    };
    metrics.leader.set(1);

    // Leading ends on shutdown, on a lost lease, or when the leader's work fails.
    let (halt_tx, halt) = watch::channel(false);
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    let mut stop_watch = stop.clone();
    let guard = tokio::spawn(async move {
        let lost = tokio::select! {
            _ = stop_watch.wait_for(|s| *s) => false,
            _ = leadership.lost() => true,
            _ = done => false,
        };
        let _ = halt_tx.send(true);
        (leadership, lost)
    });
    let result = lead(ctx, halt).await;
    let _ = done_tx.send(());
    let (leadership, lost) = guard.await.context("leadership task")?;
    metrics.leader.set(0);
    leadership.release().await;
    result?;
    if lost {
        // A fresh process starts as a standby with empty caches.
        anyhow::bail!("lost the leader lease to another replica");
    }
    Ok(())
}

/// Everything that runs on the leading replica only, until `halt` turns true:
/// the reconciler and the autoscaler. The autoscaler also stops when the
/// reconciler returns early (an error), so leading never half-runs.
async fn lead(ctx: Arc<Context>, halt: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (done_tx, done) = watch::channel(false);
    let scaler_halt = halt.clone();
    let scaler = tokio::spawn(autoscaler::run(ctx.clone(), async move {
        tokio::select! {
            _ = halted(scaler_halt) => {}
            _ = halted(done) => {}
        }
    }));
    let result = reconciler::run(ctx, halted(halt)).await;
    let _ = done_tx.send(true);
    if let Err(e) = scaler.await {
        error!(error = %e, "autoscaler task failed");
    }
    result?;
    Ok(())
}

async fn halted(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
