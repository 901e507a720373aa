//! Leader election on a `coordination.k8s.io/v1` Lease: one replica runs the
//! controller, the others wait and take over when the leader's lease lapses,
//! or at once when the leader releases it.
//!
//! `kube-lease-manager` lets a standby sleep until the holder's lease would
//! expire; a leader that releases on shutdown clears `holderIdentity`, which a
//! standby only saw after that sleep (up to the lease duration). So standbys
//! also watch the Lease and, on seeing it free, start their manager afresh: its
//! first look finds the Lease free and takes it.

use std::time::Duration;

use futures::{Stream, StreamExt, future};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

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
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let mut freed = std::pin::pin!(freed(leases, &settings.name));
    info!(lease = %settings.name, identity = %settings.identity, "waiting for leadership");
    loop {
        let (mut state, task) = manager(client.clone(), settings).await?.watch().await;
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
                Some(()) = freed.next() => {
                    // Same identity: had it just taken the Lease, the new manager finds it ours.
                    debug!(lease = %settings.name, "lease free; trying at once");
                    task.abort();
                    break;
                }
                _ = shutdown.changed() => return Ok(None),
            }
        }
    }
}

async fn manager(
    client: Client,
    settings: &LeaseSettings,
) -> Result<LeaseManager, LeaseManagerError> {
    LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_seconds)
        .with_grace(settings.grace_seconds)
        .build()
        .await
}

/// Yields each time the Lease is seen without a holder (released, or not yet
/// taken) or gone; watch errors are retried with backoff.
fn freed(leases: Api<Lease>, name: &str) -> impl Stream<Item = ()> + use<> {
    watcher::watch_object(leases, name)
        .default_backoff()
        .filter_map(|seen| {
            future::ready(match seen {
                Ok(Some(lease)) => is_free(&lease).then_some(()),
                Ok(None) => Some(()),
                Err(e) => {
                    debug!(error = %e, "lease watch interrupted");
                    None
                }
            })
        })
}

/// A Lease nobody holds: released by its leader (`holderIdentity` cleared).
pub fn is_free(lease: &Lease) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .is_none_or(str::is_empty)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Method;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use serde_json::{Value, json};
    use tokio::sync::{Mutex, oneshot};

    use super::*;
    use crate::clock::ManualClock;
    use crate::fixtures::{self, ApiServer, Call};

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

    fn lease(spec: Value, version: u64) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "flashsale-operator", "namespace": "ops",
                         "resourceVersion": version.to_string()},
            "spec": spec,
        })
    }

    /// A Lease API on the mocked server: GET, list, watch and patches of one
    /// Lease. `release` frees it as a leader's release does and tells the
    /// watch. Returns the Lease's spec at the end.
    async fn serve_lease(
        mut server: ApiServer,
        mut spec: Value,
        release: oneshot::Receiver<()>,
        log: Arc<Mutex<Vec<String>>>,
    ) {
        let mut version = 1;
        let mut release = Some(release);
        let mut watches: Vec<Call> = Vec::new();
        loop {
            let freed = async {
                match release.as_mut() {
                    Some(r) => r.await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                call = server.next_call() => {
                    let Some(call) = call else { return };
                    log.lock().await.push(format!("{} {}", call.method, call.uri));
                    let current = lease(spec.clone(), version);
                    if call.uri.contains("watch=true") {
                        watches.push(call);
                    } else if call.method == Method::GET && call.uri.contains("fieldSelector") {
                        call.respond(200, &json!({
                            "apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                            "metadata": {"resourceVersion": version.to_string()},
                            "items": [current],
                        }));
                    } else if call.method == Method::GET {
                        call.respond(200, &current);
                    } else if call.method == Method::PATCH {
                        let patch = call.body["spec"].as_object().cloned().unwrap_or_default();
                        for (field, value) in patch {
                            if value.is_null() {
                                spec.as_object_mut().map(|s| s.remove(&field));
                            } else {
                                spec[field] = value;
                            }
                        }
                        version += 1;
                        call.respond(200, &lease(spec.clone(), version));
                    } else {
                        panic!("unexpected lease request {} {}", call.method, call.uri);
                    }
                }
                released = freed => {
                    release = None;
                    if !released { continue; }
                    spec = json!({"leaseTransitions": spec["leaseTransitions"].clone()});
                    version += 1;
                    let event = json!({"type": "MODIFIED", "object": lease(spec.clone(), version)});
                    let mut line = serde_json::to_vec(&event).unwrap_or_default();
                    line.push(b'\n');
                    for watch in watches.drain(..) {
                        let response = http::Response::builder()
                            .status(200)
                            .body(kube::client::Body::from(line.clone()));
                        if let Ok(r) = response {
                            watch.send_raw(r);
                        }
                    }
                }
            }
        }
    }

    /// A leader renewed the Lease a moment ago (15 s duration) and releases it:
    /// the standby takes it from its watch, long before the lease would have
    /// expired — kube-lease-manager alone sleeps until that expiry.
    #[tokio::test]
    async fn a_standby_takes_a_released_lease_at_once() -> anyhow::Result<()> {
        let (ctx, server) = fixtures::context(Arc::new(ManualClock::new(jiff::Timestamp::now())));
        let now = serde_json::to_value(MicroTime(jiff::Timestamp::now()))?;
        let held = json!({
            "holderIdentity": "old-leader", "acquireTime": now, "renewTime": now,
            "leaseDurationSeconds": 15, "leaseTransitions": 3,
        });
        let (release, released) = oneshot::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let api = tokio::spawn(serve_lease(server, held, released, log.clone()));
        let settings = LeaseSettings {
            name: "flashsale-operator".into(),
            namespace: "ops".into(),
            identity: "standby".into(),
            duration_seconds: 15,
            grace_seconds: 5,
        };
        let (_stop, mut shutdown) = watch::channel(false);
        let client = ctx.client.clone();
        let standby = tokio::spawn(async move {
            acquire(client, &settings, &mut shutdown)
                .await
                .map(|l| l.is_some())
        });

        // Once the standby watches the Lease (and sleeps towards its expiry), release it.
        for _ in 0..100 {
            if log.lock().await.iter().any(|r| r.contains("watch=true")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = release.send(());
        let led = tokio::time::timeout(Duration::from_secs(5), standby)
            .await
            .map_err(|_| anyhow::anyhow!("the standby did not take the released lease"))???;
        assert!(led);
        let requests = log.lock().await.clone();
        let took = requests
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains(LEASES))
            .count();
        assert!(took >= 1, "{requests:#?}");
        api.abort();
        Ok(())
    }

    #[test]
    fn a_lease_without_holder_is_free() {
        let mut lease = Lease::default();
        assert!(is_free(&lease));
        lease.spec = Some(Default::default());
        assert!(is_free(&lease));
        lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("pod-a".into()),
            ..Default::default()
        });
        assert!(!is_free(&lease));
    }
}
