//! Test harness: the chdb-backed ClickHouse server (tests/chdb_server) and the proxy binary, each
//! as a real process on ephemeral ports. Nothing here skips: a missing Python environment or
//! PostgreSQL fails the test that needs it.

#![allow(dead_code)]

pub mod corpus;
pub mod equivalence;
pub mod relay;
mod wait;

pub use wait::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Sum of the samples of `name` whose labels include every pair of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            (series_name == name && labels.iter().all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The proxy binary the tests run: cargo's build of this crate, or the one `PREAGG_TEST_PROXY_BIN`
/// names (a release or profile-guided build, to test the binary that ships).
pub fn proxy_binary() -> PathBuf {
    std::env::var_os("PREAGG_TEST_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_preagg-proxy")))
}

/// The project's Python (from `scripts/python-env.sh`, or `PREAGG_TEST_PYTHON`).
pub fn python() -> String {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Ok(p) = std::env::var("PREAGG_TEST_PYTHON") {
                return p;
            }
            let out = Command::new(root().join("scripts/python-env.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("running scripts/python-env.sh");
            assert!(out.status.success(), "scripts/python-env.sh failed: the tests need chdb-core");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .clone()
}

/// PostgreSQL for store tests (`PREAGG_TEST_POSTGRES_URL`, default the local `test` database).
pub fn postgres_url() -> String {
    std::env::var("PREAGG_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Reads with `read` every 50 ms until `done` holds for what it read, and returns that; panics
/// after `timeout` with `what` and what was read last. The async counterpart of [`wait_for`], for
/// what a test reads through the proxy's own API.
pub async fn read_until<T: std::fmt::Debug, F: Future<Output = T>>(
    what: &str,
    timeout: Duration,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let started = Instant::now();
    loop {
        let value = read().await;
        if done(&value) {
            return value;
        }
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}: {value:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The chdb-backed ClickHouse HTTP server.
pub struct ChServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Data directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// JSON-lines request log.
    pub request_log: PathBuf,
}

impl ChServer {
    /// Starts a server with an empty data directory.
    pub fn start() -> ChServer {
        ChServer::start_with(&[])
    }

    /// Starts a server with extra arguments (e.g. `--auth u:p`).
    pub fn start_with(extra: &[&str]) -> ChServer {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let request_log = dir.path().join("requests.jsonl");
        let data = dir.path().join("data");
        let child = Command::new(python())
            .arg(root().join("tests/chdb_server/server.py"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--request-log")
            .arg(&request_log)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tests/chdb_server/server.py");
        let port = wait_for("the chdb server", Duration::from_secs(60), || {
            std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok())
        });
        ChServer { child, port, dir, request_log }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs the data generator against it; returns the generator's JSON summary.
    pub fn generate(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(python())
            .arg(root().join("tests/data/generate.py"))
            .arg("--url")
            .arg(self.url())
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("running tests/data/generate.py");
        assert!(out.status.success(), "generate.py failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("{}");
        serde_json::from_str(last).unwrap_or(serde_json::Value::Null)
    }

    /// The request log so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.request_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for ChServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy binary, running.
pub struct ProxyProcess {
    child: Child,
    /// Proxy port.
    pub port: u16,
    /// Admin port.
    pub admin_port: u16,
    /// Its log (JSON lines).
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts the proxy in front of `upstream` with extra `--key value` settings. Listens on
    /// ephemeral ports; the job store defaults to a fresh SQLite file.
    pub fn start(upstream: &str, settings: &[(&str, &str)]) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("proxy.log");
        let store = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let mut command = Command::new(proxy_binary());
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--upstream", upstream]);
        if !settings.iter().any(|(k, _)| *k == "rules" || *k == "config") {
            command.arg("--rules").arg(root().join("rules"));
        }
        if !settings.iter().any(|(k, _)| *k == "store") {
            command.args(["--store", &store]);
        }
        if !settings.iter().any(|(k, _)| *k == "log_filter") {
            command.args(["--log-filter", "info"]);
        }
        if !settings.iter().any(|(k, _)| *k == "max_parse_time" || *k == "config") {
            // The production budget (50 ms of CPU time) is sized for release builds; this debug
            // build analyzes many times slower.
            command.args(["--max-parse-time", "2s"]);
        }
        for (key, value) in settings {
            command.arg(format!("--{}", key.replace('_', "-"))).arg(value);
        }
        let child = command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting preagg-proxy");
        let (port, admin_port) = wait_for("the proxy to listen", Duration::from_secs(30), || {
            let line = read_json_lines(&log).into_iter().find(|l| l["message"] == "serving")?;
            let port = |k: &str| line[k].as_str()?.rsplit(':').next()?.parse::<u16>().ok();
            Some((port("listen")?, port("admin")?))
        });
        kill_at_exit(child.id());
        ProxyProcess { child, port, admin_port, log, _dir: dir }
    }

    /// Proxy base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Admin base URL.
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The `/metrics` text of the admin listener (no admin token).
    pub async fn metrics(&self) -> String {
        let response = client().get(format!("{}/metrics", self.admin_url())).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.log)
    }

    /// The raw log text.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the engine (store and tables) is ready.
    pub fn wait_engine_ready(&self) {
        wait_for("the engine", Duration::from_secs(60), || {
            self.log_lines()
                .iter()
                .any(|l| l["message"].as_str().is_some_and(|m| m.starts_with("engine ready")))
                .then_some(())
        });
    }

    /// Sends a signal (`TERM`, `KILL`, `HUP`).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
    }

    /// Waits for the process to exit and returns whether it exited successfully.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<bool> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident memory of the process, from /proc (kilobytes).
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failed test shows what the proxy said besides its access lines: the build, store
            // and ClickHouse events that explain a pass-through seen where a rewrite was expected.
            let said: Vec<String> = self
                .log_lines()
                .iter()
                .filter(|l| l["target"] != "preagg_proxy::access")
                .map(|l| l.to_string())
                .collect();
            eprintln!("the proxy's log, without access lines ({} lines):", said.len());
            for line in &said[said.len().saturating_sub(60)..] {
                eprintln!("  {line}");
            }
        }
        if let Ok(mut running) = RUNNING.lock() {
            running.retain(|pid| *pid != self.child.id());
        }
    }
}

/// Proxies still running: a proxy held by a `static` is never dropped, so it is killed when the
/// test binary exits instead of outliving it.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn kill_at_exit(pid: u32) {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // SAFETY: registers a plain `extern "C"` function with no arguments, as atexit expects.
        unsafe { libc::atexit(kill_running) };
    });
    RUNNING.lock().unwrap().push(pid);
}

extern "C" fn kill_running() {
    if let Ok(running) = RUNNING.lock() {
        for pid in running.iter() {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    let Ok(file) = std::fs::File::open(path) else { return Vec::new() };
    BufReader::new(file).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
}

/// A plain HTTP client (no automatic decompression: the tests compare raw bytes).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}
