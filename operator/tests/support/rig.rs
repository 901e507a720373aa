//! One end-to-end test's world: a real control plane with the FlashSale CRD
//! and the chart's RBAC applied, the operator binary running out of cluster
//! with its ServiceAccount's token, real Redis and PostgreSQL, the shop
//! namespace with the sale's Secrets, and a stand-in kubelet for the pods.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::tools::servers::{PostgresServer, RedisServer, free_port};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::{Client, ResourceExt};
use operator::resource::FlashSale;
use serde_json::{Value, json};

use super::control_plane::{ControlPlane, KUBE_VERSION};
use super::helm;
use super::kubelet::Kubelet;

/// Where the chart installs the operator (the release namespace).
pub const OPERATOR_NS: &str = "flashsale-system";
/// The chart's ServiceAccount for release `flashsale`.
pub const OPERATOR_SA: &str = "flashsale";
/// Where the tests' sales live.
pub const SHOP: &str = "shop";
/// The field manager the tests apply with, as `kubectl apply --server-side` would.
pub const KUBECTL: &str = "kubectl";

pub struct Rig {
    // Dropped first: the data plane and the operators stop before their servers.
    pub kubelet: Option<Kubelet>,
    /// Operator processes, killed with the rig (their logs dumped if a test fails).
    pub operators: Vec<Operator>,
    pub plane: ControlPlane,
    pub admin: Client,
    pub redis: RedisServer,
    pub postgres: PostgresServer,
    /// The operator's kubeconfig: its ServiceAccount's token.
    pub operator_kubeconfig: PathBuf,
    /// Rendered chart objects that were applied.
    pub applied: Vec<String>,
}

/// Runs `scenario` on a fresh rig; an error fails the test with every log dumped.
pub async fn run<F>(scenario: F)
where
    F: AsyncFnOnce(&mut Rig) -> anyhow::Result<()>,
{
    let mut rig = match Rig::start().await {
        Ok(rig) => rig,
        Err(e) => panic!("setting up the rig: {e:#}"),
    };
    if let Err(e) = scenario(&mut rig).await {
        panic!("{e:#}");
    }
}

impl Rig {
    pub async fn start() -> anyhow::Result<Self> {
        let plane = ControlPlane::start().await?;
        let admin = plane.client();
        install_crd(&admin).await?;
        for ns in [OPERATOR_NS, SHOP] {
            apply(
                &admin,
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .await?;
        }
        let applied = install_chart_rbac(&admin).await?;
        let mut plane = plane;
        let operator_kubeconfig = plane
            .service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA)
            .await?;
        let redis = RedisServer::start()?;
        let postgres = tokio::task::spawn_blocking(PostgresServer::start).await??;
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), SHOP);
        for (name, key, value) in [
            ("redis", "url", redis.url()),
            ("orders-db", "url", postgres.url()),
            ("shop-login", "hmac-secret", "e2e-secret".to_string()),
        ] {
            let secret = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": SHOP},
                "stringData": {key: value},
            });
            secrets
                .patch(name, &PatchParams::apply(KUBECTL), &Patch::Apply(&secret))
                .await?;
        }
        Ok(Self {
            plane,
            admin,
            redis,
            postgres,
            operator_kubeconfig,
            applied,
            kubelet: None,
            operators: Vec::new(),
        })
    }

    /// Starts running the shop's Pods as local processes.
    pub fn start_kubelet(&mut self) -> anyhow::Result<()> {
        self.kubelet = Some(Kubelet::start(self.admin.clone(), SHOP)?);
        Ok(())
    }

    /// Starts the operator binary as replica `identity`, leader election on.
    pub fn start_operator(&mut self, identity: &str) -> anyhow::Result<()> {
        let operator = Operator::start(&self.operator_kubeconfig, identity, self.plane.dir())?;
        self.operators.push(operator);
        Ok(())
    }

    /// The operator process started as `identity`.
    pub fn operator(&mut self, identity: &str) -> anyhow::Result<&mut Operator> {
        self.operators
            .iter_mut()
            .find(|o| o.identity == identity)
            .ok_or_else(|| anyhow::anyhow!("no operator {identity}"))
    }

    pub fn sales(&self) -> Api<FlashSale> {
        Api::namespaced(self.admin.clone(), SHOP)
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.admin.clone(), SHOP)
    }

    /// Applies a sale as `kubectl apply --server-side` would.
    pub async fn apply_sale(&self, sale: &Value) -> anyhow::Result<FlashSale> {
        let name = sale["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("sale without a name"))?;
        Ok(self
            .sales()
            .patch(name, &PatchParams::apply(KUBECTL), &Patch::Apply(sale))
            .await?)
    }

    /// Polls `check` every 250 ms until it returns `Some`; panics after `secs`.
    pub async fn eventually<T, F, Fut>(&self, what: &str, secs: u64, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        match poll(secs, check).await {
            Some(v) => v,
            None => panic!("timed out after {secs} s waiting for {what}"),
        }
    }

    /// The sale's Events once `want` holds for them, or as they are after
    /// `secs` (the caller's assertion then shows them). The operator
    /// publishes a reconcile's Events after the status write they go with,
    /// so a test that has just seen the status may list them too early.
    pub async fn events_once(
        &self,
        sale: &str,
        secs: u64,
        want: impl Fn(&[(String, String, String)]) -> bool,
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        let wanted = poll(secs, || async {
            events(&self.admin, sale).await.ok().filter(|l| want(l))
        })
        .await;
        match wanted {
            Some(listed) => Ok(listed),
            None => events(&self.admin, sale).await,
        }
    }
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `secs`.
async fn poll<T, F, Fut>(secs: u64, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A sale in the shop namespace whose window opens at `start`.
pub fn sale(name: &str, start: Timestamp, warmup_seconds: u32, minutes: i64) -> Value {
    let end = start + jiff::SignedDuration::from_mins(minutes);
    json!({
        "apiVersion": "flashsale.dev/v1alpha1",
        "kind": "FlashSale",
        "metadata": {"name": name, "namespace": SHOP},
        "spec": {
            "startTime": start.to_string(),
            "endTime": end.to_string(),
            "warmupSeconds": warmup_seconds,
            "products": [
                {"sku": "phone-17", "stock": 100, "price": "5999.00", "perUserLimit": 1},
                {"sku": "earbuds-pro", "stock": 300, "price": "1299.00", "perUserLimit": 2},
            ],
            "rateLimits": {
                "global": {"requestsPerSecond": 50000, "burst": 10000},
                "perUser": {"requestsPerSecond": 5, "burst": 5},
                "perIp": {"requestsPerSecond": 5000, "burst": 5000},
            },
            "payment": {"timeoutSeconds": 600},
            "redis": {"urlSecretRef": {"name": "redis", "key": "url"}},
            "database": {"urlSecretRef": {"name": "orders-db", "key": "url"}},
            "tokenSecretRef": {"name": "shop-login", "key": "hmac-secret"},
            "gateway": {
                "replicas": {"min": 1, "max": 4, "atStart": 2},
                "targetConnectionsPerPod": 1000,
                "targetRequestsPerSecondPerPod": 1000,
            },
            "consumer": {"replicas": {"min": 1, "max": 2}, "targetLagPerPod": 5000},
        },
    })
}

/// The chart's CRD applied server-side as `kubectl apply --server-side` would;
/// waits until the server says it is Established. v1.20 does not know CEL
/// (`x-kubernetes-validations`, 1.25+) and refuses the unknown field, so those
/// rules, and only they, are stripped: every other part is the shipped file.
pub async fn install_crd(admin: &Client) -> anyhow::Result<()> {
    let path = helm::chart_dir().join("crds/flashsale.dev_flashsales.yaml");
    let mut crd: Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    strip_key(&mut crd, "x-kubernetes-validations");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let name = crd["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("CRD without a name"))?
        .to_string();
    crds.patch(&name, &PatchParams::apply(KUBECTL), &Patch::Apply(&crd))
        .await
        .map_err(|e| anyhow::anyhow!("server-side apply of CRD {name}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let crd = crds.get(&name).await?;
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "CRD {name} not Established: {:?}",
            crd.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn strip_key(value: &mut Value, key: &str) {
    match value {
        Value::Object(map) => {
            map.remove(key);
            map.values_mut().for_each(|v| strip_key(v, key));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| strip_key(v, key)),
        _ => {}
    }
}

/// The RBAC the chart renders (ServiceAccount, roles, bindings), applied as
/// is. The chart's Deployment is not: the operator runs here as a process.
/// Rendered from a copy whose `kubeVersion` admits v1.20 (see
/// [`helm::chart_for_kube`]): the templates are the chart's own.
pub async fn install_chart_rbac(admin: &Client) -> anyhow::Result<Vec<String>> {
    let chart = helm::chart_for_kube(KUBE_VERSION.trim_start_matches('v'))?;
    let path = chart.path().to_path_buf();
    let rendered =
        tokio::task::spawn_blocking(move || helm::render_chart(&path, json!({}))).await??;
    let kinds = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let mut applied = Vec::new();
    for object in rendered
        .objects
        .iter()
        .filter(|o| kinds.iter().any(|k| o["kind"] == json!(k)))
    {
        apply(admin, object).await?;
        applied.push(format!(
            "{}/{}",
            object["kind"].as_str().unwrap_or_default(),
            object["metadata"]["name"].as_str().unwrap_or_default()
        ));
    }
    anyhow::ensure!(applied.len() == kinds.len(), "chart RBAC: {applied:?}");
    Ok(applied)
}

/// Server-side apply of any manifest, its kind found by discovery.
pub async fn apply(client: &Client, object: &Value) -> anyhow::Result<DynamicObject> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = pinned_kind(client, &gvk).await?;
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) if caps.scope == kube::discovery::Scope::Namespaced => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => Api::all_with(client.clone(), &resource),
    };
    let applied = api
        .patch(
            name,
            &PatchParams::apply(KUBECTL).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|e| anyhow::anyhow!("apply {kind} {name}: {e}"))?;
    Ok(applied)
}

/// The `flashsale-operator` binary running out of cluster; killed on drop.
pub struct Operator {
    pub identity: String,
    pub admin_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Operator {
    fn start(kubeconfig: &Path, identity: &str, dir: &Path) -> anyhow::Result<Self> {
        let admin_port = free_port()?;
        let log = dir.join(format!("operator-{identity}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(env!("CARGO_BIN_EXE_flashsale-operator"))
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--log-format", "text"])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", OPERATOR_NS)
            .env("POD_NAME", identity)
            .env("RUST_LOG", "info,kube=warn,kube_lease_manager=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(Self {
            identity: identity.to_string(),
            admin_port,
            child: Some(child),
            log,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&mut self, signal: libc::c_int) {
        if let Some(child) = &self.child
            && let Ok(pid) = i32::try_from(child.id())
        {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Waits for the process to exit (after a signal).
    pub async fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- operator {} log ---\n{}",
                self.identity,
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The sale's events.k8s.io Events: (type, reason, note).
pub async fn events(client: &Client, sale: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), SHOP);
    let list = api.list(&Default::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("FlashSale") && r.name.as_deref() == Some(sale)
            })
        })
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect())
}

/// `kubectl get fs NAME`: the server's Table rendering of the printer columns.
pub async fn table(client: &Client, sale: &str) -> anyhow::Result<Value> {
    let request = http::Request::get(format!(
        "/apis/flashsale.dev/v1alpha1/namespaces/{SHOP}/flashsales/{sale}"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(serde_json::from_str(&text)?)
}

/// The managers of an object's fields, by (manager, operation, subresource).
pub fn managers(meta: &kube::api::ObjectMeta) -> Vec<(String, String, String)> {
    meta.managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
                m.subresource.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// The sale's owner reference on a child.
pub fn owned_by(meta: &kube::api::ObjectMeta, sale: &FlashSale) -> bool {
    meta.owner_references.iter().flatten().any(|o| {
        o.kind == "FlashSale"
            && o.name == sale.name_any()
            && Some(&o.uid) == sale.metadata.uid.as_ref()
            && o.controller == Some(true)
    })
}

/// One mutating request in the audit log.
#[derive(Clone, Debug)]
pub struct Write {
    pub verb: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub name: String,
    /// The request's path and query (`fieldManager=…` among them).
    pub uri: String,
}

/// Mutating requests in the audit log by `user` since `since`.
pub fn writes_by(audit_log: &Path, user: &str, since: Timestamp) -> anyhow::Result<Vec<Write>> {
    let text = std::fs::read_to_string(audit_log)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let entry: Value = serde_json::from_str(line)?;
        if entry["user"]["username"] != json!(user) || entry["stage"] != json!("ResponseComplete") {
            continue;
        }
        let at: Timestamp = entry["stageTimestamp"]
            .as_str()
            .unwrap_or_default()
            .parse()?;
        if at < since {
            continue;
        }
        let r = &entry["objectRef"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let resource = match r["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", text(&r["resource"])),
            None => text(&r["resource"]),
        };
        out.push(Write {
            verb: text(&entry["verb"]),
            resource,
            name: text(&r["name"]),
            uri: text(&entry["requestURI"]),
        });
    }
    Ok(out)
}

/// The operator's user name in the API server.
pub fn operator_user() -> String {
    format!("system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}")
}
