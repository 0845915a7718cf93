//! End-to-end benchmark on the chdb-backed ClickHouse (a benchmark, not a test): the same
//! experiment query direct, through the proxy cold (background builds, and waiting for builds),
//! and warm; for the exposures subquery alone and for the whole experiment query. Side by side in
//! one run, on one machine.
//!
//! Run: `cargo bench --bench e2e` (BENCH_EVENTS, default 20000000; BENCH_RUNS, default 5).
//! The generated data is kept in .work/bench/ and reused while its parameters match.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const LO: &str = "2026-10-01 09:57:00.000000";
const HI: &str = "2026-10-28 14:30:00.000000";

#[path = "../tests/common/wait.rs"]
mod wait;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> String {
    let out = Command::new(format!("{ROOT}/scripts/python-env.sh")).output().expect("python-env.sh");
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

fn wait_file(path: &Path) -> String {
    wait::wait_for(&format!("{} to appear", path.display()), Duration::from_secs(60), || {
        let text = std::fs::read_to_string(path).ok()?;
        (!text.trim().is_empty()).then(|| text.trim().to_string())
    })
}

/// Starts the chdb server on the kept data directory, generating data if needed.
fn clickhouse(python: &str, events: u64) -> (Process, String) {
    let dir = PathBuf::from(ROOT).join(format!(".work/bench/events-{events}"));
    let fresh = !dir.join("generated").exists();
    if fresh {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench dir");
    }
    let port_file = dir.join("port");
    let _ = std::fs::remove_file(&port_file);
    let child = Command::new(python)
        .arg(format!("{ROOT}/tests/chdb_server/server.py"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--port-file")
        .arg(&port_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chdb server");
    let url = format!("http://127.0.0.1:{}", wait_file(&port_file));
    if fresh {
        eprintln!("generating {events} events (28 days)...");
        let status = Command::new(python)
            .arg(format!("{ROOT}/tests/data/generate.py"))
            .args([
                "--url",
                &url,
                "--events",
                &events.to_string(),
                "--seed",
                "2026",
                "--start",
                "2026-10-01",
                "--days",
                "28",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("generate.py");
        assert!(status.success());
        std::fs::write(dir.join("generated"), "").expect("marker");
    }
    (Process(child), url)
}

/// Starts a proxy with a fresh job store and preaggregate database.
fn proxy(upstream: &str, build: &str, tag: &str) -> (Process, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("proxy.log");
    let database = format!("bench_{tag}_{}", std::process::id());
    curl(upstream, &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let child = Process(
        Command::new(env!("CARGO_BIN_EXE_preagg-proxy"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args([
                "--upstream",
                upstream,
                "--build",
                build,
                "--build-wait-timeout",
                "600s",
                "--preagg-database",
                &database,
            ])
            .arg("--rules")
            .arg(format!("{ROOT}/rules"))
            .arg("--store")
            .arg(format!("sqlite://{}", dir.path().join("jobs.db").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("preagg-proxy"),
    );
    let url = wait::wait_until("the proxy to start", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let serving = text.lines().find(|l| l.contains("\"serving\""));
        let Some(line) = serving.filter(|_| text.contains("engine ready")) else { return Err(text) };
        let value: serde_json::Value = serde_json::from_str(line).expect("json log");
        Ok(format!("http://{}", value["listen"].as_str().expect("listen")))
    });
    (child, url, dir)
}

fn curl(url: &str, body: &str) -> (f64, String, String) {
    let started = Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/stderr", "--data-binary", "@-", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(body.as_bytes())?;
            c.wait_with_output()
        })
        .expect("curl");
    let seconds = started.elapsed().as_secs_f64();
    let headers = String::from_utf8_lossy(&out.stdout).to_string();
    let preagg = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-preagg:"))
        .map(|l| l[9..].trim().to_string())
        .unwrap_or_else(|| "-".into());
    assert!(headers.starts_with("HTTP/1.1 200"), "{url}: {headers}{}", String::from_utf8_lossy(&out.stderr));
    (seconds, preagg, String::from_utf8_lossy(&out.stderr).to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    what: &'static str,
    direct: f64,
    cold_background: f64,
    background_build: f64,
    cold_wait: f64,
    warm: f64,
    preagg: String,
}

/// Waits for the proxy's "build finished" log line; returns the seconds since `since`.
fn build_finished(log: &Path, since: Instant) -> f64 {
    wait::wait_until(&format!("a build to finish in {}", log.display()), Duration::from_secs(600), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("build finished") { Ok(since.elapsed()) } else { Err(text) }
    })
    .as_secs_f64()
}

fn measure(upstream: &str, what: &'static str, sql: &str, runs: usize) -> Row {
    let direct = median((0..runs).map(|_| curl(upstream, sql).0).collect());
    let answer = curl(upstream, sql).2;
    let mut cold_background = Vec::new();
    let mut background_build = Vec::new();
    let mut cold_wait = Vec::new();
    let mut warm = Vec::new();
    let mut preagg = String::new();
    for run in 0..runs.clamp(1, 3) {
        // Each proxy alone on the machine: the background one is gone once its build is done.
        {
            let (_p, url, dir) = proxy(upstream, "background", &format!("bg{run}"));
            let started = Instant::now();
            let (seconds, header, body) = curl(&url, sql);
            assert!(header.contains("building"), "{header}");
            assert_eq!(sorted(&body), sorted(&answer), "cold answer differs");
            cold_background.push(seconds);
            background_build.push(build_finished(&dir.path().join("proxy.log"), started));
        }
        let (_p, url, _dir) = proxy(upstream, "wait", &format!("wait{run}"));
        let (seconds, header, body) = curl(&url, sql);
        assert!(header.starts_with("rewritten"), "{header}");
        assert_eq!(sorted(&body), sorted(&answer), "cold (wait) answer differs");
        cold_wait.push(seconds);
        if run == 0 {
            for _ in 0..runs {
                let (seconds, header, body) = curl(&url, sql);
                assert!(header.starts_with("rewritten"), "{header}");
                assert_eq!(sorted(&body), sorted(&answer), "warm answer differs");
                warm.push(seconds);
                preagg = header;
            }
        }
    }
    Row {
        what,
        direct,
        cold_background: median(cold_background),
        background_build: median(background_build),
        cold_wait: median(cold_wait),
        warm: median(warm),
        preagg,
    }
}

fn sorted(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to check here, and
    // the benchmark takes minutes.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let events: u64 = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000_000);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let python = python();
    let (_clickhouse, upstream) = clickhouse(&python, events);
    // Preaggregate databases of earlier runs (every proxy here gets its own).
    for database in curl(&upstream, "SELECT name FROM system.databases WHERE name LIKE 'bench\\_%'").2.lines() {
        curl(&upstream, &format!("DROP DATABASE IF EXISTS {database}"));
    }
    let whole = std::fs::read_to_string(format!("{ROOT}/scripts/demo/experiment.sql"))
        .expect("demo query")
        .replace("2026-10-27 14:30:00.000000", HI);
    let exposures =
        std::fs::read_to_string(format!("{ROOT}/fixtures/standalone_exposures_with_settings_and_format.sql"))
            .expect("fixture")
            .replace("2026-10-03 07:15:00.000000", LO)
            .replace("2026-10-20 16:40:00.250000", HI)
            .replace("'checkout-redesign'", "'test-experiment'")
            .replace("['control', 'test', 'test-2']", "['control', 'test']")
            .replace("events.team_id, 2)", "events.team_id, 99999)")
            .replace("FORMAT JSONEachRow", "FORMAT TabSeparated");
    // The exposures subquery consumed inside ClickHouse, as experiment queries consume it.
    let body_start = exposures.find("\nSELECT").expect("SELECT") + 1;
    let body_end = exposures.rfind("SETTINGS").expect("SETTINGS");
    let consumed = format!(
        "SELECT variant, count(), min(first_exposure_time), max(last_exposure_time) FROM ({}) \
         GROUP BY variant ORDER BY variant SETTINGS transform_null_in=1",
        &exposures[body_start..body_end]
    );
    let rows = [
        measure(&upstream, "exposures subquery, rows consumed in ClickHouse", &consumed, runs),
        measure(&upstream, "exposures subquery, every entity row sent to the client", &exposures, runs),
        measure(&upstream, "whole experiment query (mean metric)", &whole, runs),
    ];
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut table = format!(
        "{events} events over 28 days, range {LO} .. {HI}; {cpus} CPUs; medians of {runs} runs (cold: of up to 3 \
         fresh proxies)\n\n\
         | query | direct | cold, background build | background build ready after | cold, build=wait | warm | warm \
         speedup |\n|---|---|---|---|---|---|---|\n"
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.3} s | {:.3} s ({:.2}× direct) | {:.3} s | {:.3} s ({:.2}× direct) | {:.3} s | {:.1}× |\n",
            r.what,
            r.direct,
            r.cold_background,
            r.cold_background / r.direct,
            r.background_build,
            r.cold_wait,
            r.cold_wait / r.direct,
            r.warm,
            r.direct / r.warm
        ));
    }
    table.push_str(&format!("\nwarm X-Preagg: `{}`\n", rows[0].preagg));
    println!("{table}");
    let _ = std::fs::create_dir_all(format!("{ROOT}/target"));
    let _ = std::fs::write(format!("{ROOT}/target/bench-e2e.md"), table);
}
