//! Leader election on a `coordination.k8s.io/v1` Lease: one replica runs the
//! controller, the others wait and take over when the leader's lease lapses.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// Unique per replica: the pod's name.
    pub identity: String,
    /// Seconds a lease stays valid without renewal; a standby takes over after it.
    pub duration_seconds: u64,
    /// Seconds before expiry the holder renews.
    pub grace_seconds: u64,
}

/// A held lease; `lost()` resolves if another replica takes it over.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Waits until this replica holds the lease, or `None` if `shutdown` comes first.
pub async fn acquire(
    client: Client,
    settings: &LeaseSettings,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Leadership>, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_seconds)
        .with_grace(settings.grace_seconds)
        .build()
        .await?;
    let (mut state, task) = manager.watch().await;
    info!(lease = %settings.name, identity = %settings.identity, "waiting for leadership");
    loop {
        if *state.borrow_and_update() {
            info!(lease = %settings.name, "leading");
            return Ok(Some(Leadership { state, task }));
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    warn!("lease manager stopped before this replica led");
                    return Ok(None);
                }
            }
            _ = shutdown.changed() => return Ok(None),
        }
    }
}

impl Leadership {
    /// Resolves when this replica no longer holds the lease.
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                return;
            }
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the lease up so a standby takes over at once instead of after expiry.
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => info!("lease released"),
            Ok(Ok(Err(e))) => warn!(error = %e, "releasing the lease failed"),
            Ok(Err(e)) => warn!(error = %e, "lease task failed"),
            Err(_) => warn!("releasing the lease timed out; it expires on its own"),
        }
    }
}
