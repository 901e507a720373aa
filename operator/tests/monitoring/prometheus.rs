//! A real `prometheus` server (Debian's package) as a child process on a free
//! loopback port, with a generated config, its own TSDB in a temp dir, killed
//! on drop and its log printed when the test failed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    pub url: String,
    http: reqwest::Client,
}

/// The binary, or an error that says how to install it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found on PATH; install it: apt-get install -y prometheus")
        })
}

impl Prometheus {
    /// Starts with `config` (YAML) as prometheus.yml; `files` are written
    /// beside it first (rule files the config names).
    pub async fn start(config: &str, files: &[(&str, &str)]) -> anyhow::Result<Self> {
        let binary = binary("prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("flashsale-prometheus-")
            .tempdir()?;
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text)?;
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = dataplane::tools::servers::free_port()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle")
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn prometheus")?;
        let server = Self {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = server
                .http
                .get(format!("{}/-/ready", server.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready in 30 s; its log:\n{}", server.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with query parameters; the `data` of a success,
    /// else the server's error (type and message) as an error.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        let reply: Value = self
            .http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await?
            .json()
            .await?;
        if reply["status"] != "success" {
            bail!("{}: {}", reply["errorType"], reply["error"]);
        }
        if let Some(w) = reply.get("warnings") {
            bail!("warnings: {w}");
        }
        Ok(reply["data"].clone())
    }

    /// An instant query's result vector (or scalar) at the server's now.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Value> {
        self.api("query", &[("query", promql)]).await
    }

    /// A range query over the last `seconds`, one point per `step` seconds.
    pub async fn query_range(
        &self,
        promql: &str,
        seconds: i64,
        step: u32,
    ) -> anyhow::Result<Value> {
        let end = jiff::Timestamp::now().as_second();
        let start = (end - seconds).to_string();
        let end = end.to_string();
        let step = step.to_string();
        self.api(
            "query_range",
            &[
                ("query", promql),
                ("start", &start),
                ("end", &end),
                ("step", &step),
            ],
        )
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- prometheus log ({}) ---\n{}", self.url, self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
