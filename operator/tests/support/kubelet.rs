//! A stand-in kubelet for the data plane: the control plane has no scheduler
//! and no kubelet, so this runs each Pod of a namespace as a local process of
//! the real `flashsale` binary, with the Pod's own args and env (Secrets and
//! the pod name resolved as the kubelet would, the ConfigMap volume written to
//! a dir), waits for its readiness probe and then marks the Pod Ready through
//! its status subresource.
//!
//! Deletion is graceful, as on a real node: each Pod is bound to this node
//! (a Pod bound to none is deleted from the API at once), so a deleted Pod
//! stays Terminating while its process gets SIGTERM, and its deletion is
//! finished (grace 0) only once the process exited, or was SIGKILLed at the
//! end of the Pod's grace period. What waits for Pods to go (a foreground
//! deletion, the operator's cleanup) thus waits for the processes.
//!
//! Ports are the one change: every process binds its own free loopback ports
//! (`--listen`/`--admin-listen`) instead of the container's 8080/9090.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dataplane::tools::servers::free_port;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node as NodeObject, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

/// The `flashsale` binary, built once per test run (a no-op when
/// `cargo test --workspace` has built it already).
pub fn dataplane_binary() -> &'static Path {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BINARY.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(env!("CARGO"))
            .args(["build", "-p", "flashsale-dataplane", "--bin", "flashsale"])
            .current_dir(&workspace)
            .output()
            .map_err(|e| format!("run cargo build: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p flashsale-dataplane failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // This test runs from <target>/debug/deps/; the binary sits in <target>/debug/.
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("no target dir above the test binary")?;
        let binary = profile_dir.join("flashsale");
        if binary.is_file() {
            Ok(binary)
        } else {
            Err(format!("{} missing after cargo build", binary.display()))
        }
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("the data plane binary: {e}"),
    }
}

/// One Pod's process.
pub struct PodProcess {
    pub pod: String,
    uid: Option<String>,
    pub component: String,
    pub http: Option<u16>,
    pub admin: u16,
    pub ready: bool,
    child: Child,
    log: PathBuf,
}

impl PodProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, signal: i32) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// A process told to stop, and what its Pod's deletion still needs.
struct Stopping {
    process: PodProcess,
    /// SIGKILL after this (the Pod's grace period).
    kill_at: std::time::Instant,
    /// The Pod's deletion was finished (or the Pod was gone already).
    finished: bool,
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Running = Arc<Mutex<HashMap<String, PodProcess>>>;

/// Runs the Pods of one namespace until dropped.
pub struct Kubelet {
    running: Running,
    stopped: Arc<Mutex<Vec<Stopping>>>,
    task: JoinHandle<()>,
    dir: tempfile::TempDir,
}

/// The node the Pods are bound to.
const NODE: &str = "flashsale-e2e-node";

impl Kubelet {
    pub fn start(client: Client, namespace: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("flashsale-pods-")
            .tempdir()?;
        let running: Running = Arc::default();
        let stopped = Arc::new(Mutex::new(Vec::new()));
        let nodes: Api<NodeObject> = Api::all(client.clone());
        let node = Node {
            pods: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
            dir: dir.path().to_path_buf(),
            running: running.clone(),
            stopped: stopped.clone(),
        };
        let task = tokio::spawn(async move {
            // The node must exist before a Pod is bound to it: the pod
            // garbage collector deletes Pods bound to a node it does not know.
            while let Err(e) = register(&nodes).await {
                eprintln!("kubelet: register node {NODE}: {e:#}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            loop {
                if let Err(e) = node.sync().await {
                    eprintln!("kubelet: {e:#}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Ok(Self {
            running,
            stopped,
            task,
            dir,
        })
    }

    /// (pod, component, http port, admin port) of the processes running now.
    pub fn processes(&self) -> Vec<(String, String, Option<u16>, u16)> {
        let running = self.running.lock().map(|r| {
            r.values()
                .map(|p| (p.pod.clone(), p.component.clone(), p.http, p.admin))
                .collect::<Vec<_>>()
        });
        running.unwrap_or_default()
    }

    /// Exit status of processes stopped because their Pod went away.
    pub fn stopped(&self) -> Vec<(String, Option<i32>)> {
        let Ok(mut stopped) = self.stopped.lock() else {
            return Vec::new();
        };
        stopped
            .iter_mut()
            .map(|s| {
                let p = &mut s.process;
                let code = p.child.try_wait().ok().flatten().and_then(|s| s.code());
                (p.pod.clone(), code)
            })
            .collect()
    }

    /// The logs of every process, for a failing test.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(running) = self.running.lock() {
            for p in running.values() {
                out.push_str(&format!("--- pod {} ---\n{}\n", p.pod, tail(&p.log(), 30)));
            }
        }
        out
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        if std::thread::panicking() {
            eprintln!(
                "--- data plane processes ({}) ---\n{}",
                self.dir.path().display(),
                self.logs()
            );
        }
        if let Ok(mut running) = self.running.lock() {
            running.clear();
        }
        if let Ok(mut stopped) = self.stopped.lock() {
            stopped.clear();
        }
    }
}

async fn register(nodes: &Api<NodeObject>) -> anyhow::Result<()> {
    let node = serde_json::from_value(json!({"metadata": {"name": NODE}}))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct Node {
    pods: Api<Pod>,
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
    dir: PathBuf,
    running: Running,
    stopped: Arc<Mutex<Vec<Stopping>>>,
}

impl Node {
    async fn sync(&self) -> anyhow::Result<()> {
        let pods = self.pods.list(&ListParams::default()).await?;
        let live: BTreeMap<String, &Pod> = pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (p.name_any(), p))
            .collect();
        let grace: HashMap<String, u64> = pods
            .items
            .iter()
            .map(|p| {
                let seconds = p.metadata.deletion_grace_period_seconds.unwrap_or(30);
                (p.name_any(), u64::try_from(seconds).unwrap_or(0))
            })
            .collect();
        // Pods gone or terminating: SIGTERM, as the kubelet does.
        let gone: Vec<PodProcess> = {
            let mut running = self
                .running
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            let names: Vec<String> = running
                .keys()
                .filter(|n| !live.contains_key(*n))
                .cloned()
                .collect();
            names.iter().filter_map(|n| running.remove(n)).collect()
        };
        for mut p in gone {
            p.signal(libc::SIGTERM);
            let seconds = grace.get(&p.pod).copied().unwrap_or(0);
            let stopping = Stopping {
                // A Pod already gone from the API was force-deleted.
                finished: !grace.contains_key(&p.pod),
                kill_at: std::time::Instant::now() + Duration::from_secs(seconds),
                process: p,
            };
            if let Ok(mut stopped) = self.stopped.lock() {
                stopped.push(stopping);
            }
        }
        self.finish_deletions().await?;
        for (name, pod) in &live {
            let known = self
                .running
                .lock()
                .map(|r| r.contains_key(name))
                .unwrap_or(true);
            if !known {
                let process = self.start(pod).await?;
                if let Ok(mut running) = self.running.lock() {
                    running.insert(name.clone(), process);
                }
            }
        }
        // Readiness: the probe's path on the process's admin port, then the Pod's status.
        let unready: Vec<(String, u16)> = self
            .running
            .lock()
            .map(|r| {
                r.values()
                    .filter(|p| !p.ready)
                    .map(|p| (p.pod.clone(), p.admin))
                    .collect()
            })
            .unwrap_or_default();
        for (pod, admin) in unready {
            if probe(admin).await {
                self.mark_ready(&pod).await?;
                if let Ok(mut running) = self.running.lock()
                    && let Some(p) = running.get_mut(&pod)
                {
                    p.ready = true;
                }
            }
        }
        Ok(())
    }

    /// Finishes the deletion of each Pod whose process exited, after
    /// SIGKILL for one past its grace period.
    async fn finish_deletions(&self) -> anyhow::Result<()> {
        let done: Vec<(String, Option<String>)> = {
            let mut stopped = self
                .stopped
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            let now = std::time::Instant::now();
            stopped
                .iter_mut()
                .filter(|s| !s.finished)
                .filter_map(|s| {
                    if !s.process.exited() && now >= s.kill_at {
                        s.process.signal(libc::SIGKILL);
                        let _ = s.process.child.wait();
                    }
                    s.process
                        .exited()
                        .then(|| (s.process.pod.clone(), s.process.uid.clone()))
                })
                .collect()
        };
        for (pod, uid) in done {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match self.pods.delete(&pod, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            if let Ok(mut stopped) = self.stopped.lock() {
                for s in stopped.iter_mut().filter(|s| s.process.pod == pod) {
                    s.finished = true;
                }
            }
        }
        Ok(())
    }

    /// Binds a Pod to this node, as the scheduler would.
    async fn bind(&self, pod: &Pod) -> anyhow::Result<()> {
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some()
        {
            return Ok(());
        }
        let name = pod.name_any();
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        });
        let _: serde_json::Value = self
            .pods
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await?;
        Ok(())
    }

    async fn start(&self, pod: &Pod) -> anyhow::Result<PodProcess> {
        let name = pod.name_any();
        self.bind(pod).await?;
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("pod {name} has no spec"))?;
        let container: &Container = spec
            .containers
            .first()
            .ok_or_else(|| anyhow::anyhow!("pod {name} has no container"))?;
        let pod_dir = self.dir.join(&name);
        std::fs::create_dir_all(&pod_dir)?;

        // ConfigMap volumes become local dirs; args naming a mount path follow.
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .and_then(|v| v.config_map.as_ref());
            if let Some(source) = volume {
                let cm = self.config_maps.get(&source.name).await?;
                let local = pod_dir.join(&mount.name);
                std::fs::create_dir_all(&local)?;
                for (key, value) in cm.data.iter().flatten() {
                    std::fs::write(local.join(key), value)?;
                }
                mounts.push((mount.mount_path.clone(), local));
            }
        }
        let mut args: Vec<String> = container
            .args
            .iter()
            .flatten()
            .map(|a| {
                mounts
                    .iter()
                    .find_map(|(path, local)| {
                        a.strip_prefix(path.as_str())
                            .map(|rest| format!("{}{rest}", local.display()))
                    })
                    .unwrap_or_else(|| a.clone())
            })
            .collect();

        let mut env: Vec<(String, String)> = Vec::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    if let Some(key) = &from.secret_key_ref {
                        let secret = self.secrets.get(&key.name).await?;
                        let bytes = secret
                            .data
                            .as_ref()
                            .and_then(|d| d.get(&key.key))
                            .ok_or_else(|| {
                                anyhow::anyhow!("Secret {} has no key {}", key.name, key.key)
                            })?;
                        String::from_utf8_lossy(&bytes.0).into_owned()
                    } else if from
                        .field_ref
                        .as_ref()
                        .is_some_and(|f| f.field_path == "metadata.name")
                    {
                        name.clone()
                    } else {
                        anyhow::bail!(
                            "pod {name}: env {} has a source this kubelet lacks",
                            var.name
                        )
                    }
                }
                (None, None) => String::new(),
            };
            env.push((var.name.clone(), value));
        }

        let ports: Vec<&str> = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.as_deref())
            .collect();
        let http = if ports.contains(&"http") {
            let port = free_port()?;
            args.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
            Some(port)
        } else {
            None
        };
        let admin = free_port()?;
        args.extend(["--admin-listen".to_string(), format!("127.0.0.1:{admin}")]);

        let log = pod_dir.join("log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(dataplane_binary())
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(PodProcess {
            pod: name,
            uid: pod.metadata.uid.clone(),
            component: container.name.clone(),
            http,
            admin,
            ready: false,
            child,
            log,
        })
    }

    async fn mark_ready(&self, pod: &str) -> anyhow::Result<()> {
        let now = jiff::Timestamp::now().to_string();
        let status = json!({
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "startTime": now,
                "conditions": [
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                ],
            }
        });
        self.pods
            .patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }
}

/// The readiness probe: `GET /readyz` on the admin port answers 200.
async fn probe(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let request = "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut head)).await,
        Ok(Ok(_))
    ) && head.starts_with(b"HTTP/1.1 200")
}
