//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager as child processes on free loopback ports in a temp
//! dir, in the style of `dataplane::tools::servers` (spawn, wait until ready, dump the
//! logs when a test panics, kill on drop).
//!
//! The binaries come from `$KUBE_BIN_DIR`, `PATH`, or the cache dir that
//! `scripts/build-kube-v1.20.sh` builds v1.20.2 into from Debian's source
//! package; etcd from Debian's `etcd-server`. There is no scheduler and no
//! kubelet: Pods stay Pending until a test marks them Ready through their
//! status subresource.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::tools::servers::free_port;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Client;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;

/// The version the build script makes; the docs and tests speak of it.
pub const KUBE_VERSION: &str = "v1.20.2";
/// The static token's user: a member of `system:masters`.
pub const ADMIN: &str = "admin";

const BUILD_HINT: &str = "run scripts/build-kube-v1.20.sh (builds kube-apiserver and \
     kube-controller-manager v1.20.2 from Debian bookworm's source package into \
     ~/.cache/flashsale/kube-v1.20.2, about 5 minutes; .ci/run does it), or set KUBE_BIN_DIR";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("{binary} not found in $KUBE_BIN_DIR, on PATH or in {cache}: {hint}")]
    Missing {
        binary: &'static str,
        cache: String,
        hint: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("{what} did not happen in {secs} s; {detail}")]
    Timeout {
        what: String,
        secs: u64,
        detail: String,
    },
    #[error(transparent)]
    Server(#[from] dataplane::tools::servers::ServerError),
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// The cache dir the build script fills.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLASHSALE_KUBE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/flashsale")
        .join(format!("kube-{KUBE_VERSION}"))
}

/// `name` from `$KUBE_BIN_DIR`, then PATH, then the build cache.
fn find_binary(name: &'static str, hint: &'static str) -> Result<PathBuf, ControlPlaneError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("KUBE_BIN_DIR")
        .map(|d| vec![PathBuf::from(d)])
        .unwrap_or_default();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.push(cache_dir());
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ControlPlaneError::Missing {
            binary: name,
            cache: cache_dir().display().to_string(),
            hint,
        })
}

/// One child process and its log file.
struct Process {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Process {
    fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> Result<Self, ControlPlaneError> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let err = out.try_clone().map_err(io("clone a log file"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("spawn {name}")))?;
        Ok(Self {
            name,
            child: Some(child),
            log,
        })
    }

    /// An error when the process has exited.
    fn check_running(&mut self) -> Result<(), ControlPlaneError> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(ControlPlaneError::Failed {
                what: format!("{} exited with {status}", self.name),
                detail: format!("its log:\n{}", self.tail(40)),
            });
        }
        Ok(())
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// etcd + kube-apiserver + kube-controller-manager, killed on drop.
pub struct ControlPlane {
    // Killed in this order: controller-manager, apiserver, etcd.
    processes: Vec<Process>,
    dir: TempDir,
    _etcd_dir: TempDir,
    port: u16,
    client: Client,
}

/// Writes ~every mutating request to the audit log, one JSON line each.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    verbs: ["create", "update", "patch", "delete", "deletecollection"]
  - level: None
"#;

impl ControlPlane {
    /// Starts the three processes and waits until the API answers `/readyz`
    /// and the controller-manager has made the `default` ServiceAccount.
    pub async fn start() -> Result<Self, ControlPlaneError> {
        let etcd_bin = find_binary("etcd", "apt-get install -y etcd-server")?;
        let apiserver_bin = find_binary("kube-apiserver", BUILD_HINT)?;
        let manager_bin = find_binary("kube-controller-manager", BUILD_HINT)?;
        let dir = tempfile::Builder::new()
            .prefix("flashsale-kube-")
            .tempdir()
            .map_err(io("create a temp dir for the control plane"))?;
        // etcd fsyncs every write; on tmpfs that costs nothing.
        let shm = Path::new("/dev/shm");
        let etcd_dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("flashsale-etcd-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("flashsale-etcd-").tempdir()
        }
        .map_err(io("create a temp dir for etcd"))?;
        let d = &dir.path().to_path_buf();

        let key = d.join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .map_err(io("run openssl genrsa (apt-get install -y openssl)"))?;
        if !out.status.success() {
            return Err(ControlPlaneError::Failed {
                what: "openssl genrsa".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let admin_token = random_token();
        write(
            &d.join("tokens.csv"),
            &format!("{admin_token},{ADMIN},{ADMIN},\"system:masters\"\n"),
        )?;
        write(&d.join("audit-policy.yaml"), AUDIT_POLICY)?;

        let mut processes = Vec::new();
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let peer = format!("http://127.0.0.1:{peer_port}");
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        processes.push(Process::spawn(
            "etcd",
            Command::new(etcd_bin)
                .arg("--data-dir")
                .arg(etcd_dir.path().join("data"))
                .args(["--name", "default"])
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("default={peer}")])
                .args(["--log-level", "warn"]),
            d,
        )?);

        let port = free_port()?;
        let cert_dir = d.join("certs");
        let mut apiserver = Command::new(apiserver_bin);
        apiserver
            .args([
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
            ])
            .args(["--secure-port", &port.to_string(), "--insecure-port", "0"])
            .args(["--etcd-servers", &etcd_url])
            .arg("--cert-dir")
            .arg(&cert_dir)
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-signing-key-file={}",
                key.display()
            ))
            .arg(format!("--service-account-key-file={}", key.display()))
            // Nothing is ever sent there: no kube-proxy, no endpoints.
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--endpoint-reconciler-type=none")
            .arg(format!(
                "--audit-log-path={}",
                d.join("audit.log").display()
            ))
            .arg(format!(
                "--audit-policy-file={}",
                d.join("audit-policy.yaml").display()
            ));
        processes.push(Process::spawn("kube-apiserver", &mut apiserver, d)?);

        let url = format!("https://127.0.0.1:{port}");
        let ca = cert_dir.join("apiserver.crt");
        wait(
            &mut processes,
            "kube-apiserver to write its certificate",
            30,
            || {
                let ready = ca.is_file();
                async move { ready }
            },
        )
        .await?;
        let admin = write_kubeconfig(d, &url, ADMIN, &admin_token)?;
        let client = client_from(&admin).await?;
        wait(&mut processes, "kube-apiserver /readyz", 60, || {
            let client = client.clone();
            async move {
                let request = http::Request::get("/readyz").body(Vec::new());
                match request {
                    Ok(r) => client.request_text(r).await.is_ok_and(|t| t == "ok"),
                    Err(_) => false,
                }
            }
        })
        .await?;

        let mut manager = Command::new(manager_bin);
        manager
            .arg(format!("--kubeconfig={}", admin.display()))
            .arg("--use-service-account-credentials=true")
            .arg(format!(
                "--service-account-private-key-file={}",
                key.display()
            ))
            .arg(format!("--root-ca-file={}", ca.display()))
            .arg("--controllers=*,-nodeipam,-nodelifecycle,-service,-route,-cloud-node-lifecycle")
            .args(["--leader-elect=false", "--port=0", "--secure-port=0"]);
        // Stopped first on drop.
        processes.insert(
            0,
            Process::spawn("kube-controller-manager", &mut manager, d)?,
        );
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        wait(
            &mut processes,
            "kube-controller-manager to create the default ServiceAccount",
            60,
            || {
                let accounts = accounts.clone();
                async move { accounts.get_opt("default").await.is_ok_and(|a| a.is_some()) }
            },
        )
        .await?;
        Ok(Self {
            processes,
            dir,
            _etcd_dir: etcd_dir,
            port,
            client,
        })
    }

    /// The admin's client (`system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The audit log: one JSON line per mutating request (`verb`, `user`, `objectRef`, ...).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// A kubeconfig for `user` with a bearer token, trusting the apiserver's certificate.
    pub fn write_kubeconfig(&self, user: &str, token: &str) -> Result<PathBuf, ControlPlaneError> {
        write_kubeconfig(self.dir.path(), &self.url(), user, token)
    }

    /// A kubeconfig with the token of ServiceAccount `ns/name`: v1.20 fills a
    /// legacy `kubernetes.io/service-account-token` Secret for each account.
    pub async fn service_account_kubeconfig(
        &mut self,
        ns: &str,
        name: &str,
    ) -> Result<PathBuf, ControlPlaneError> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(token) = account_token(&accounts, &secrets, name).await {
                return self.write_kubeconfig(&format!("{ns}.{name}"), &token);
            }
            for p in &mut self.processes {
                p.check_running()?;
            }
            if Instant::now() > deadline {
                return Err(ControlPlaneError::Timeout {
                    what: format!("a token Secret for ServiceAccount {ns}/{name}"),
                    secs: 30,
                    detail: format!("logs:\n{}", self.logs(30)),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The tails of the three logs.
    pub fn logs(&self, lines: usize) -> String {
        logs(&self.processes, lines)
    }
}

/// Polls `ready` every 100 ms; fails early, with the logs, when a process exits.
async fn wait<F, Fut>(
    processes: &mut [Process],
    what: &str,
    secs: u64,
    mut ready: F,
) -> Result<(), ControlPlaneError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if ready().await {
            return Ok(());
        }
        for p in processes.iter_mut() {
            p.check_running()?;
        }
        if Instant::now() > deadline {
            return Err(ControlPlaneError::Timeout {
                what: what.into(),
                secs,
                detail: format!("logs:\n{}", logs(processes, 30)),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn logs(processes: &[Process], lines: usize) -> String {
    let mut out = String::new();
    for p in processes.iter().rev() {
        let _ = writeln!(out, "--- {} log ---\n{}", p.name, p.tail(lines));
    }
    out
}

/// A kubeconfig in `dir` for `user` with a bearer token, trusting the
/// apiserver's self-signed certificate.
fn write_kubeconfig(
    dir: &Path,
    url: &str,
    user: &str,
    token: &str,
) -> Result<PathBuf, ControlPlaneError> {
    let path = dir.join(format!("{user}.kubeconfig"));
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": url,
            "certificate-authority": dir.join("certs/apiserver.crt"),
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user, "namespace": "default"}}],
        "current-context": "local",
    });
    write(&path, &config.to_string())?;
    Ok(path)
}

/// The token in the first filled token Secret the ServiceAccount lists.
async fn account_token(
    accounts: &Api<ServiceAccount>,
    secrets: &Api<Secret>,
    name: &str,
) -> Option<String> {
    let account = accounts.get_opt(name).await.ok()??;
    for reference in account.secrets.into_iter().flatten() {
        let Some(secret_name) = reference.name else {
            continue;
        };
        if let Ok(Some(secret)) = secrets.get_opt(&secret_name).await
            && let Some(token) = secret.data.as_ref().and_then(|d| d.get("token"))
        {
            return Some(String::from_utf8_lossy(&token.0).into_owned());
        }
    }
    None
}

/// A client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client, ControlPlaneError> {
    let kube_err = |what: &str| {
        let what = what.to_string();
        move |source| ControlPlaneError::Kube { what, source }
    };
    let file = Kubeconfig::read_from(kubeconfig).map_err(|e| ControlPlaneError::Failed {
        what: format!("read {}", kubeconfig.display()),
        detail: e.to_string(),
    })?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|e| ControlPlaneError::Failed {
            what: format!("load {}", kubeconfig.display()),
            detail: e.to_string(),
        })?;
    Client::try_from(config).map_err(kube_err("make a client"))
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- control plane on port {} ({}) ---\n{}",
                self.port,
                self.dir.path().display(),
                self.logs(60)
            );
        }
        // The processes are killed as they drop, controller-manager first.
    }
}

fn write(path: &Path, text: &str) -> Result<(), ControlPlaneError> {
    std::fs::write(path, text).map_err(io(format!("write {}", path.display())))
}

/// 32 hex characters from the OS's random source.
fn random_token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut bytes);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    bytes[..4]
        .iter_mut()
        .zip(nanos.to_le_bytes())
        .for_each(|(b, n)| *b ^= n);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
