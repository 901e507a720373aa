//! What the API server serves among the APIs the operator uses that not every
//! supported Kubernetes version has, asked once per process through discovery.

use kube::Client;
use tokio::sync::OnceCell;

/// The oldest Kubernetes (major, minor) the chart installs on: the CRD's CEL
/// rules (`x-kubernetes-validations`) are a field servers know from 1.23.
pub const MIN_KUBERNETES: (u32, u32) = (1, 23);

/// `policy/v1` (PodDisruptionBudget) is served from Kubernetes 1.21 on.
pub const PDB_API: &str = "policy/v1";

/// Discovery answers, cached for the life of the process (a server upgrade
/// restarts nothing, but the operator's next restart sees it).
#[derive(Debug, Default)]
pub struct ServedApis {
    pdbs: OnceCell<bool>,
}

impl ServedApis {
    /// Answers without asking the server (for a context whose server is known).
    pub fn known(pdbs: bool) -> Self {
        Self {
            pdbs: OnceCell::new_with(Some(pdbs)),
        }
    }

    /// Whether the server serves `policy/v1` PodDisruptionBudgets. A 404 from
    /// discovery is a definite no; any other error is returned and asked again next time.
    pub async fn pod_disruption_budgets(&self, client: &Client) -> Result<bool, kube::Error> {
        self.pdbs
            .get_or_try_init(|| async {
                match client.list_api_group_resources(PDB_API).await {
                    Ok(list) => Ok(list
                        .resources
                        .iter()
                        .any(|r| r.name == "poddisruptionbudgets")),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await
            .copied()
    }
}
