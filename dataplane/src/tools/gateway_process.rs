//! A `flashsale gateway` process started from this very binary, for
//! benchmarks that measure the gateway apart from the load they put on it:
//! its CPU time and memory are then its own, as in a pod, not shared with
//! the crowd's tasks in one runtime.

use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::spec::SaleDocument;
use crate::tools::servers::free_port;

#[derive(Debug, thiserror::Error)]
pub enum GatewayProcessError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("writing the sale for the gateway: {0}")]
    Sale(String),
    #[error("free port: {0}")]
    Port(#[from] crate::tools::servers::ServerError),
    #[error("the gateway process exited before it was ready ({status}); its log ends: {log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the gateway process was not ready within {0:?} (its /readyz never answered 200)")]
    NotReady(Duration),
    #[error("the gateway process's {0} is unreadable (/proc/<pid>)")]
    Unreadable(&'static str),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> GatewayProcessError {
    move |source| GatewayProcessError::Io { what, source }
}

/// How long a gateway may take to answer `/readyz` (it binds its listeners,
/// then Redis must answer a PING).
const READY_WITHIN: Duration = Duration::from_secs(15);

/// A running gateway child; killed (and reaped) on drop.
pub struct GatewayProcess {
    child: std::process::Child,
    /// The public listener (purchases, `/v1/ping`).
    pub addr: SocketAddr,
    /// The admin listener (`/readyz`, `/metrics`).
    admin: SocketAddr,
    /// Holds the sale file the gateway was started with, and its log.
    dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts `flashsale gateway` for `doc` on free loopback ports, with the
    /// given Redis and token secret and nothing else from this process's
    /// environment (a `REDIS_MODE` or `DATABASE_URL` exported for other work
    /// would change what it runs), logging errors to a file, and waits until
    /// its admin `/readyz` answers 200.
    pub async fn start(
        doc: &SaleDocument,
        redis_url: &str,
        token_secret: &[u8],
        pod: &str,
    ) -> Result<Self, GatewayProcessError> {
        let dir = tempfile::tempdir().map_err(io("temp dir"))?;
        let config = dir.path().join("sale.yaml");
        let yaml =
            serde_yaml::to_string(doc).map_err(|e| GatewayProcessError::Sale(e.to_string()))?;
        std::fs::write(&config, yaml).map_err(io("write the sale"))?;
        let exe: PathBuf = std::env::current_exe().map_err(io("find this binary"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = std::fs::File::create(dir.path().join("gateway.log"))
            .map_err(io("create the gateway's log"))?;
        let child = std::process::Command::new(exe)
            .args(["gateway", "--config"])
            .arg(&config)
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .env_clear()
            .env("REDIS_URL", redis_url)
            .env("TOKEN_SECRET", std::ffi::OsStr::from_bytes(token_secret))
            .env("POD_NAME", pod)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("start the gateway"))?;
        let mut gateway = Self {
            child,
            addr,
            admin,
            dir,
        };
        let started = Instant::now();
        while !ready(admin).await {
            if let Some(status) = gateway.child.try_wait().map_err(io("check the gateway"))? {
                return Err(GatewayProcessError::Exited {
                    status,
                    log: gateway.log_tail(),
                });
            }
            if started.elapsed() > READY_WITHIN {
                return Err(GatewayProcessError::NotReady(READY_WITHIN));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(gateway)
    }

    /// An unlabelled sample of the gateway's `/metrics` (a gauge such as
    /// `flashsale_spec_version`), if it is exported yet.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (status, body) = admin_get(self.admin, "/metrics").await?;
        if status != hyper::StatusCode::OK {
            return None;
        }
        std::str::from_utf8(&body)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the gateway logged (errors only).
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// The process's CPU seconds so far (user + system, all its threads),
    /// from `/proc/<pid>/stat`.
    pub fn cpu_s(&self) -> Result<f64, GatewayProcessError> {
        let cpu = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
            // SAFETY: sysconf only reads a configuration value.
            let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            (per_s > 0).then_some(cpu_ticks(&stat)? as f64 / per_s as f64)
        };
        cpu().ok_or(GatewayProcessError::Unreadable("CPU time"))
    }

    /// Resident memory (`VmRSS`) in KiB.
    pub fn rss_kib(&self) -> Result<u64, GatewayProcessError> {
        let rss = || {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        rss().ok_or(GatewayProcessError::Unreadable("resident memory"))
    }
}

/// utime + stime, in clock ticks, of a `/proc/<pid>/stat` line. The command
/// name (field 2) is in parentheses and may hold spaces and parentheses, so
/// fields are counted from its last ')': utime and stime (fields 14 and 15)
/// are then the 12th and 13th.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(utime + stime)
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /readyz` on the admin listener answers 200.
async fn ready(admin: SocketAddr) -> bool {
    admin_get(admin, "/readyz")
        .await
        .is_some_and(|(status, _)| status == hyper::StatusCode::OK)
}

/// `GET path` on the admin listener: the status and the whole body, or
/// nothing if it did not answer within a second.
async fn admin_get(admin: SocketAddr, path: &str) -> Option<(hyper::StatusCode, Bytes)> {
    let probe = async {
        let stream = tokio::net::TcpStream::connect(admin).await.ok()?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", "gateway")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::cpu_ticks;

    #[test]
    fn cpu_ticks_are_user_plus_system_whatever_the_command_name() {
        let stat = "4242 (flash sale) gw) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1500 250 0 0 20 0 9 0 1234 567890 1200 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(1750));
        assert_eq!(cpu_ticks("4242 (gw) S 1 2"), None);
        assert_eq!(cpu_ticks("no name"), None);
    }
}
