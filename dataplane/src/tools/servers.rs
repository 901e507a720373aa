//! Throwaway Redis and PostgreSQL servers run as child processes, on free
//! loopback ports in temp dirs: the test harness and `flashsale local` use them.
//!
//! Modelled on redis-rs's `redis-test` (spawn, retry until ready, dump the log
//! on failure, kill on drop); written here because no maintained crate starts a
//! local PostgreSQL from the installed binaries without downloading its own.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod cluster;
pub use cluster::{ClusterNode, ClusterOptions, KilledMaster, RedisCluster};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{binary} not found on PATH{extra}; install it: {hint}")]
    Missing {
        binary: &'static str,
        extra: &'static str,
        hint: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not become ready in {secs} s; its log:\n{log}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: String,
    },
    #[error("{what} failed: {log}")]
    Failed { what: String, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// A free TCP port on 127.0.0.1 for a child server to bind.
///
/// Drawn from just below the kernel's ephemeral range, never from it: a port
/// the kernel hands out for `bind(0)` is free only until an outgoing
/// connection (the tests open thousands) is given it as its local port, and
/// the child then dies with "address already in use". No port is handed out
/// twice by one process, so parallel tests never race each other for one.
pub fn free_port() -> Result<u16, ServerError> {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Below Kubernetes' NodePort range too (30000-32767): on a node running
    // kube-proxy those ports are redirected without a listening socket, so
    // binding one would succeed and connecting to it would not reach ours.
    let top = ephemeral_start.min(30_000);
    // Too little room below: fall back to the kernel's pick.
    if top > 11_024 {
        let below = (top - 10_000)..top;
        for _ in 0..500 {
            let port = rand::random_range(below.clone());
            if given.contains(&port) {
                continue;
            }
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    loop {
        let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
        let port = l.local_addr().map_err(io("read a free port"))?.port();
        if given.insert(port) {
            return Ok(port);
        }
    }
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn kill(child: &mut Child, signal: libc::c_int) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid; no memory is shared.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Options for a Redis child.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// AOF with `appendfsync everysec`: at most about one second of writes is
    /// lost on a crash of the machine; a crash of the process loses none.
    pub append_only: bool,
    /// Runs the node with `cluster-enabled yes` and this `cluster-node-timeout`
    /// (ms); [`RedisCluster`] joins such nodes into a cluster.
    pub cluster_node_timeout_ms: Option<u64>,
}

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// The cluster bus port, chosen like `port` rather than left at Redis'
    /// default of `port + 10000`, which may lie in the ephemeral range.
    bus_port: Option<u16>,
    dir: TempDir,
    options: RedisOptions,
}

impl RedisServer {
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> Result<Self, ServerError> {
        let dir = tempfile::Builder::new()
            .prefix("flashsale-redis-")
            .tempdir()
            .map_err(io("create a temp dir for redis"))?;
        let mut server = Self {
            child: None,
            port: free_port()?,
            bus_port: options
                .cluster_node_timeout_ms
                .map(|_| free_port())
                .transpose()?,
            dir,
            options,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let binary = find_on_path("redis-server").ok_or(ServerError::Missing {
            binary: "redis-server",
            extra: "",
            hint: "apt-get install -y redis-server",
        })?;
        let log = self.dir.path().join("redis.log");
        let mut cmd = Command::new(binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(["--maxclients", "20000"]);
        if self.options.append_only {
            cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
        }
        if let Some(timeout) = self.options.cluster_node_timeout_ms {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .arg("--cluster-node-timeout")
            .arg(timeout.to_string());
            if let Some(bus) = self.bus_port {
                cmd.arg("--cluster-port").arg(bus.to_string());
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("spawn redis-server"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // A child that died (its port taken) must not pass for ready
            // because something else answers PING there.
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(ServerError::Failed {
                    what: format!("redis-server on port {} exited with {status}", self.port),
                    log: tail(&log, 30),
                });
            }
            // Ready once our child answers: a server that is someone else's
            // (the port taken by another process before ours bound it) says
            // another process id, and ours is about to exit.
            let ours = self.child.as_ref().map(Child::id);
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection()
                && let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut conn)
            {
                let pid = info
                    .lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .and_then(|p| p.trim().parse::<u32>().ok());
                if pid.is_some() && pid == ours {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(ServerError::NotReady {
                    what: "redis-server",
                    secs: 10,
                    log: tail(&log, 30),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// False once killed (and until restarted).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGSTOP: the server holds its connections and data but answers
    /// nothing, as a stalled or partitioned one would, until [`Self::resume`].
    pub fn pause(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill(child, libc::SIGSTOP);
        }
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill(child, libc::SIGCONT);
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data dir (AOF is replayed if on).
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }

    pub fn log(&self) -> String {
        tail(&self.dir.path().join("redis.log"), 40)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server log (port {}) ---\n{}",
                self.port,
                self.log()
            );
        }
        self.kill();
    }
}

/// A PostgreSQL cluster made by `initdb` and run by `postgres` as a child.
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
}

/// PostgreSQL refuses to run as root; as root we run it as the `postgres` user.
fn postgres_user() -> Result<Option<(u32, u32)>, ServerError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy
    // the two ids out before any other call could overwrite it.
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    if pw.is_null() {
        return Err(ServerError::Failed {
            what: "find the postgres user".into(),
            log: "running as root needs a `postgres` system user to run PostgreSQL as \
                  (apt-get install -y postgresql creates it)"
                .into(),
        });
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// `initdb`'s directory: on PATH, else the newest /usr/lib/postgresql/*/bin.
fn postgres_bin_dir() -> Result<PathBuf, ServerError> {
    if let Some(p) = find_on_path("initdb")
        && let Ok(real) = std::fs::canonicalize(&p)
        && let Some(dir) = real.parent()
        && dir.join("postgres").is_file()
    {
        return Ok(dir.to_path_buf());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or(ServerError::Missing {
            binary: "initdb",
            extra: " or under /usr/lib/postgresql/*/bin",
            hint: "apt-get install -y postgresql",
        })
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> Result<(), ServerError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(io(format!("chown {}", path.display())))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io(format!("read {}", path.display())))? {
            let entry = entry.map_err(io("read dir entry"))?;
            chown_recursive(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl PostgresServer {
    pub fn start() -> Result<Self, ServerError> {
        let bin = postgres_bin_dir()?;
        let run_as = postgres_user()?;
        let dir = tempfile::Builder::new()
            .prefix("flashsale-pg-")
            .tempdir()
            .map_err(io("create a temp dir for postgres"))?;
        if let Some((uid, gid)) = run_as {
            chown_recursive(dir.path(), uid, gid)?;
        }
        let server = Self {
            child: None,
            port: free_port()?,
            dir,
            bin,
            run_as,
        };
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(server.data_dir())
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(io("run initdb"))?;
        if !out.status.success() {
            return Err(ServerError::Failed {
                what: "initdb".into(),
                log: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        let mut server = server;
        server.spawn()?;
        Ok(server)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("open the postgres log"))?;
        if let Some((uid, gid)) = self.run_as {
            chown_recursive(&self.log_path(), uid, gid)?;
        }
        let log_err = log.try_clone().map_err(io("clone the postgres log"))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=128MB",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io("spawn postgres"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.accepts_connections() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(ServerError::Failed {
                    what: format!("postgres exited with {status}"),
                    log: tail(&self.log_path(), 30),
                });
            }
            if Instant::now() > deadline {
                return Err(ServerError::NotReady {
                    what: "postgres",
                    secs: 30,
                    log: tail(&self.log_path(), 30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ready once the log says so and the port takes a connection.
    fn accepts_connections(&self) -> bool {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let starts = log
            .matches("database system is ready to accept connections")
            .count();
        let stops = log.matches("database system is shut down").count();
        starts > stops && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Fast shutdown (SIGINT): clients are disconnected, nothing is lost.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc::SIGINT);
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.spawn()
    }

    pub fn log(&self) -> String {
        tail(&self.log_path(), 40)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- postgres log (port {}) ---\n{}", self.port, self.log());
        }
        // Immediate shutdown (SIGQUIT): the cluster is thrown away with its dir.
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc::SIGQUIT);
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another process's server on the port answers PING, but ours exited:
    /// that is a failure to start, not a ready server.
    #[test]
    fn a_redis_whose_port_is_taken_does_not_pass_for_ready() -> Result<(), ServerError> {
        let theirs = RedisServer::start()?;
        let mut ours = RedisServer {
            child: None,
            port: theirs.port(),
            bus_port: None,
            dir: tempfile::tempdir().map_err(io("create a temp dir"))?,
            options: RedisOptions::default(),
        };
        match ours.spawn() {
            Err(ServerError::Failed { log, .. }) => {
                assert!(log.contains("in use"), "{log}");
            }
            other => panic!("expected a failure to start, got {other:?}"),
        }
        assert!(!ours.is_running());
        Ok(())
    }
}
