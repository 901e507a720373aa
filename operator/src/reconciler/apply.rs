//! Applying a sale's children: each on its own (one refused object does not
//! stop the others), none written while its desired state is what this process
//! last applied, PodDisruptionBudgets only where the server serves `policy/v1`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::Context;
use crate::children::{self, Children, Component, MANAGER};

/// An unchanged child is applied again after this long anyway, so an edit or
/// deletion by someone else is undone within it (Deployments are also read on
/// every reconcile and re-applied at once when missing).
pub const RESYNC: Duration = Duration::from_secs(600);

/// What this process last applied successfully, per object: a digest of the
/// desired object and when. A new leader starts empty and applies everything once.
#[derive(Debug, Default)]
pub struct AppliedCache {
    entries: Mutex<HashMap<String, (String, Instant)>>,
}

impl AppliedCache {
    fn unchanged(&self, key: &str, digest: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .is_some_and(|(d, at)| d == digest && at.elapsed() < RESYNC)
    }

    fn record(&self, key: String, digest: String) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.insert(key, (digest, Instant::now()));
    }

    fn forget(&self, key: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.remove(key);
    }

    /// Drops what is remembered of a deleted sale's children.
    pub fn forget_sale(&self, ns: &str, sale: &str) {
        let suffixes: Vec<String> = [
            children::config_map_name(sale),
            children::workload_name(sale, Component::Gateway),
            children::workload_name(sale, Component::Consumer),
        ]
        .iter()
        .map(|name| format!(" {ns}/{name}"))
        .collect();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|key, _| !suffixes.iter().any(|suffix| key.ends_with(suffix)));
    }
}

/// One child the server refused (or that could not be read back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// The API server's message.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// What became of the PodDisruptionBudgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdbs {
    Applied,
    /// The server does not serve `policy/v1`; none are made.
    Unsupported,
    Failed,
}

/// The outcome of applying every child.
#[derive(Debug)]
pub struct Applied {
    /// The Deployments as the server has them (`None`: not there).
    pub gateway: Option<Deployment>,
    pub consumer: Option<Deployment>,
    pub pdbs: Pdbs,
    pub failures: Vec<Failure>,
    /// How many objects were written (the others were unchanged).
    pub writes: usize,
}

enum Outcome<K> {
    Written(K),
    Unchanged,
    Failed,
}

/// Applies every child of a sale. The Deployments wait for their ConfigMap (a
/// pod template whose config checksum is ahead of the ConfigMap would roll
/// pods onto the old config); everything else is independent.
pub async fn children(ctx: &Context, ns: &str, c: &Children) -> Applied {
    let mut out = Applied {
        gateway: None,
        consumer: None,
        pdbs: Pdbs::Applied,
        failures: Vec::new(),
        writes: 0,
    };
    let config_applied = !matches!(out.apply(ctx, ns, &c.config_map).await, Outcome::Failed);
    out.gateway = out.deployment(ctx, ns, &c.gateway, config_applied).await;
    out.apply(ctx, ns, &c.gateway_service).await;
    out.consumer = out.deployment(ctx, ns, &c.consumer, config_applied).await;
    out.pdbs = match ctx.served.pod_disruption_budgets(&ctx.client).await {
        Ok(true) => {
            let gateway = out.apply(ctx, ns, &c.gateway_pdb).await;
            let consumer = out.apply(ctx, ns, &c.consumer_pdb).await;
            if matches!(gateway, Outcome::Failed) || matches!(consumer, Outcome::Failed) {
                Pdbs::Failed
            } else {
                Pdbs::Applied
            }
        }
        Ok(false) => Pdbs::Unsupported,
        Err(e) => {
            let object = format!("discovery of {}", crate::served::PDB_API);
            out.fail("Discovery", object, &e);
            Pdbs::Failed
        }
    };
    out
}

impl Applied {
    fn fail(&mut self, kind: &str, object: String, e: &kube::Error) {
        let message = match e {
            kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
            other => other.to_string(),
        };
        warn!(%object, %message, "child not applied");
        self.failures.push(Failure {
            kind: kind.to_string(),
            object,
            message,
        });
    }

    async fn apply<K>(&mut self, ctx: &Context, ns: &str, obj: &K) -> Outcome<K>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + fmt::Debug
            + DeserializeOwned
            + Serialize,
    {
        let name = obj.name_any();
        let key = format!("{} {ns}/{name}", K::kind(&()));
        let digest = serde_json::to_vec(obj)
            .map(|bytes| format!("{:x}", Sha256::digest(&bytes)))
            .unwrap_or_default();
        if !digest.is_empty() && ctx.applied.unchanged(&key, &digest) {
            debug!(object = %key, "unchanged; not written");
            return Outcome::Unchanged;
        }
        let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
        {
            Ok(live) => {
                self.writes += 1;
                if !digest.is_empty() {
                    ctx.applied.record(key, digest);
                }
                Outcome::Written(live)
            }
            Err(e) => {
                ctx.applied.forget(&key);
                self.fail(&K::kind(&()), key, &e);
                Outcome::Failed
            }
        }
    }

    /// Applies a Deployment (when its ConfigMap is in place) and returns it as
    /// the server has it; an unchanged one is read for its status, and applied
    /// again if it is gone.
    async fn deployment(
        &mut self,
        ctx: &Context,
        ns: &str,
        d: &Deployment,
        config_applied: bool,
    ) -> Option<Deployment> {
        if config_applied {
            match self.apply(ctx, ns, d).await {
                Outcome::Written(live) => return Some(live),
                Outcome::Failed => return None,
                Outcome::Unchanged => {}
            }
        }
        let name = d.name_any();
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        match api.get_opt(&name).await {
            Ok(Some(live)) => Some(live),
            Ok(None) if config_applied => {
                ctx.applied.forget(&format!("Deployment {ns}/{name}"));
                match self.apply(ctx, ns, d).await {
                    Outcome::Written(live) => Some(live),
                    Outcome::Unchanged | Outcome::Failed => None,
                }
            }
            Ok(None) => None,
            Err(e) => {
                self.fail("Deployment", format!("Deployment {ns}/{name}"), &e);
                None
            }
        }
    }
}
