//! End-to-end benchmark on the chdb-backed ClickHouse (a benchmark, not a test): the same
//! experiment query direct, through the proxy cold (background builds, and waiting for builds),
//! and warm with `exact_under_change` on (the default) and off; for the exposures subquery alone
//! and for the whole experiment query; over a finished range and over a running range that ends
//! at the moment of measuring. Then the rewritten query run directly against ClickHouse with and
//! without each correction for changes after a build (the mutation guard, the late-rows branch).
//! Side by side in one run, on one machine.
//!
//! Run: `cargo bench --bench e2e` (BENCH_EVENTS, default 20000000; BENCH_RUNS, default 5;
//! BENCH_RUNNING_COLD, fresh proxies measured cold on the running range, default 1, 0 skips).
//! The generated data is kept in .work/bench/ and reused while its parameters match: the finished
//! range's 28 days from 2026-10-01 in the database `default`, the running range's 28 days ending
//! today (UTC) in a database `running_YYYYMMDD` (generated again on another day).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const LO: &str = "2026-10-01 09:57:00.000000";
const HI: &str = "2026-10-28 14:30:00.000000";
/// The running range's length: the finished range's whole days (27 days 4 h 33 min), as much as
/// a dataset starting at midnight 27 days ago holds at any time of today.
const RUNNING_DAYS: i64 = 27;
/// The proxy's default `ingestion_margin`, in seconds.
const INGESTION_MARGIN: u64 = 300;

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

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

fn wait_file(path: &Path) -> String {
    wait::wait_for(&format!("{} to appear", path.display()), Duration::from_secs(60), || {
        let text = std::fs::read_to_string(path).ok()?;
        (!text.trim().is_empty()).then(|| text.trim().to_string())
    })
}

/// Fills `database` with `events` events over 28 days from `start`.
fn generate(python: &str, url: &str, events: u64, start: &str, database: &str) {
    eprintln!("generating {events} events (28 days from {start}) in database {database}...");
    let started = Instant::now();
    let status = Command::new(python)
        .arg(format!("{ROOT}/tests/data/generate.py"))
        .args(["--url", url, "--events", &events.to_string(), "--seed", "2026", "--start", start, "--days", "28"])
        .args(["--database", database])
        .stdout(Stdio::null())
        .status()
        .expect("generate.py");
    assert!(status.success());
    eprintln!("generated in {:.0} s", started.elapsed().as_secs_f64());
}

/// Starts the chdb server on the kept data directory, generating data if needed: the finished
/// dataset in `default`, the running one (28 days ending today) in the returned database.
fn clickhouse(python: &str, events: u64, running_start: &str) -> (Process, String, String) {
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
        generate(python, &url, events, "2026-10-01", "default");
        std::fs::write(dir.join("generated"), unix_now().to_string()).expect("marker");
    }
    let running = format!("running_{}", running_start.replace('-', ""));
    let marker = dir.join(format!("generated-{running}"));
    if !marker.exists() {
        // Another day's running dataset, or one whose generation broke off.
        for database in curl(&url, "SELECT name FROM system.databases WHERE name LIKE 'running\\_%'").2.lines() {
            curl(&url, &format!("DROP DATABASE IF EXISTS {database}"));
        }
        for entry in std::fs::read_dir(&dir).expect("bench dir").flatten() {
            if entry.file_name().to_string_lossy().starts_with("generated-running_") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        generate(python, &url, events, running_start, &running);
        std::fs::write(&marker, unix_now().to_string()).expect("marker");
    }
    // Rows ingested less than `ingestion_margin` (5 minutes) before a build count as possibly
    // unseen by it: builds right after the generation would have the late-rows branch read every
    // row again, which no real deployment's old data does. Wait until the data is older.
    let generated = [dir.join("generated"), marker]
        .iter()
        .filter_map(|m| std::fs::read_to_string(m).ok()?.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let ready = generated + INGESTION_MARGIN + 10;
    if ready > unix_now() {
        eprintln!("waiting {} s for the data to be older than the ingestion margin...", ready - unix_now());
        std::thread::sleep(Duration::from_secs(ready - unix_now()));
    }
    (Process(child), url, running)
}

/// A proxy started by [`proxy`].
struct Proxy {
    _process: Process,
    url: String,
    admin: String,
    log: PathBuf,
}

/// Starts a proxy on the job store in `store` (a directory) and the preaggregate database
/// `database`: a fresh pair is a fresh proxy; another proxy on the same pair serves what the
/// first built. It logs every rewritten query (`preagg_proxy::proxy=debug`).
fn proxy(upstream: &str, build: &str, store: &Path, database: &str, name: &str, extra: &[&str]) -> Proxy {
    let log = store.join(format!("proxy-{name}.log"));
    curl(upstream, &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let process = Process(
        Command::new(env!("CARGO_BIN_EXE_preagg-proxy"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--log-filter", "info,preagg_proxy::proxy=debug"])
            .args([
                "--upstream",
                upstream,
                "--build",
                build,
                "--build-wait-timeout",
                "600s",
                "--preagg-database",
                database,
            ])
            .args(extra)
            .arg("--rules")
            .arg(format!("{ROOT}/rules"))
            .arg("--store")
            .arg(format!("sqlite://{}", store.join("jobs.db").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("preagg-proxy"),
    );
    let (url, admin) = wait::wait_until("the proxy to start", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let serving = text.lines().find(|l| l.contains("\"serving\""));
        let Some(line) = serving.filter(|_| text.contains("engine ready")) else { return Err(text) };
        let value: serde_json::Value = serde_json::from_str(line).expect("json log");
        let address = |field: &str| format!("http://{}", value[field].as_str().expect("address"));
        Ok((address("listen"), address("admin")))
    });
    Proxy { _process: process, url, admin, log }
}

/// `url` with the query's database, if it is not the default one.
fn with_database(url: &str, database: Option<&str>) -> String {
    match database {
        Some(database) => format!("{url}/?database={database}"),
        None => url.to_string(),
    }
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
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The sum of a Prometheus metric's samples on a proxy's admin listener.
fn metric(proxy: &Proxy, name: &str) -> f64 {
    let out = Command::new("curl").args(["-sS", &format!("{}/metrics", proxy.admin)]).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until no build is queued or runs in `proxy` (a warm query on a running range starts one
/// in the background: see the report), so that no build overlaps the next measured query.
/// Returns the builds it has started so far.
fn settle(proxy: &Proxy) -> f64 {
    let idle = || {
        let started = metric(proxy, "preagg_builds_started_total");
        let finished = metric(proxy, "preagg_build_duration_seconds_count");
        let queued = metric(proxy, "preagg_builds_queued");
        if started <= finished && queued == 0.0 {
            Ok(started)
        } else {
            Err(format!("{started} started, {finished} finished, {queued} queued"))
        }
    };
    std::thread::sleep(Duration::from_millis(200));
    loop {
        let started = wait::wait_until("the proxy's builds to finish", Duration::from_secs(600), idle);
        // A build leaves the queue just before it claims its windows and counts as started.
        std::thread::sleep(Duration::from_millis(200));
        if idle() == Ok(started) {
            return started;
        }
    }
}

/// Waits for the proxy's "build finished" log line; returns the seconds since `since`.
fn build_finished(log: &Path, since: Instant) -> f64 {
    wait::wait_until(&format!("a build to finish in {}", log.display()), Duration::from_secs(600), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("build finished") { Ok(since.elapsed()) } else { Err(text) }
    })
    .as_secs_f64()
}

/// The last query a proxy sent upstream in place of a client's (from its debug log).
fn last_rewritten(log: &Path) -> String {
    let text = std::fs::read_to_string(log).expect("proxy log");
    let line = text.lines().rfind(|l| l.contains("\"rewritten query\"")).expect("a rewritten query in the log");
    let value: serde_json::Value = serde_json::from_str(line).expect("json log");
    value["rewritten"].as_str().expect("rewritten").to_string()
}

/// `jobs=` and `raw_ranges=` of an X-Preagg value.
fn served(preagg: &str) -> String {
    let field = |name: &str| {
        preagg.split(' ').find_map(|f| f.strip_prefix(name)).map(str::to_string).unwrap_or_else(|| "?".into())
    };
    format!("{} / {}", field("jobs="), field("raw_ranges="))
}

/// One range the queries are measured over.
struct Range {
    name: &'static str,
    lo: String,
    hi: String,
    /// The query's database (`None`: the default one).
    database: Option<String>,
    /// Fresh proxies measured cold (at least one builds the windows for the warm proxies).
    cold_runs: usize,
}

/// Warm proxies: name, and arguments past the defaults.
const WARM: [(&str, &[&str]); 3] = [
    ("exact", &[]),
    ("not exact", &["--exact-under-change", "false"]),
    // The running range only: see `measure`.
    ("exact, expiry_buffer 30m", &["--expiry-buffer", "30m"]),
];

/// What one warm proxy measured.
#[derive(Default)]
struct Warm {
    seconds: f64,
    preagg: String,
    builds_per_query: f64,
}

impl Warm {
    /// Its time and its speedup over `direct`, as two cells of a table.
    fn cells(&self, direct: f64) -> String {
        format!("{:.3} s | {:.1}×", self.seconds, direct / self.seconds)
    }
}

#[derive(Default)]
struct Row {
    what: &'static str,
    direct: f64,
    cold_background: Option<f64>,
    background_build: Option<f64>,
    cold_wait: f64,
    /// By [`WARM`], the last one on the running range only.
    warm: Vec<Warm>,
    /// The rewritten query (exact) run directly: see [`PARTS`].
    parts: Option<[f64; 7]>,
}

const PARTS: [&str; 7] = [
    "rewritten, exact (as sent)",
    "without the mutation guard",
    "without the late-rows branch",
    "without both",
    "late-rows branch alone",
    "mutation guard alone",
    "`SELECT 1` (a round trip's floor)",
];

/// The mutation guard of a rewritten query, with its leading ` AND `, and its span in `sql`.
fn mutation_guard(sql: &str) -> Option<(usize, usize)> {
    let start = sql.find(" AND (SELECT throwIf(count() != 0, 'preagg-proxy: source table mutated")?;
    let end = start + sql[start..].find("is_done = 0)) = 0")? + "is_done = 0)) = 0".len();
    Some((start, end))
}

/// The late-rows branch of a rewritten query, with its leading ` UNION ALL `, and its span in
/// `sql`: the last branch of the replacement, the one whose PREWHERE reads the ingestion column.
fn late_branch(sql: &str) -> Option<(usize, usize)> {
    let at = sql.find(" >= multiIf(").or_else(|| sql.find("`inserted_at` >= "))?;
    let start = sql[..at].rfind(" UNION ALL ")?;
    // The branches end before the re-aggregation: grouped by the stored entity, or (keyed by
    // identity) joined under the source's name.
    let ends = [") GROUP BY `__preagg_", ") AS `"];
    let end = at + ends.iter().filter_map(|e| sql[at..].find(e)).min()?;
    Some((start, end))
}

/// `sql` without every span `find` locates.
fn without(sql: &str, find: fn(&str) -> Option<(usize, usize)>) -> String {
    let mut sql = sql.to_string();
    while let Some((start, end)) = find(&sql) {
        sql.replace_range(start..end, "");
    }
    sql
}

/// The variants of [`PARTS`], in order.
fn parts(rewritten: &str) -> Option<[String; 7]> {
    let (guard_start, guard_end) = mutation_guard(rewritten)?;
    let (late_start, late_end) = late_branch(rewritten)?;
    // The query's own settings (transform_null_in), without its FORMAT.
    let tail = &rewritten[late_end..];
    let settings = tail.rfind("SETTINGS").map_or("", |s| tail[s..].split("FORMAT").next().unwrap_or_default().trim());
    Some([
        rewritten.to_string(),
        without(rewritten, mutation_guard),
        without(rewritten, late_branch),
        without(&without(rewritten, mutation_guard), late_branch),
        format!("SELECT count() FROM ({}) {settings}", &rewritten[late_start + " UNION ALL ".len()..late_end]),
        format!("SELECT {}", &rewritten[guard_start + " AND ".len()..guard_end]),
        "SELECT 1".to_string(),
    ])
}

fn measure(upstream: &str, range: &Range, what: &'static str, sql: &str, runs: usize) -> Row {
    let database = range.database.as_deref();
    let direct_url = with_database(upstream, database);
    let answer = curl(&direct_url, sql).2;
    let mut row = Row { what, ..Row::default() };
    let (mut cold_background, mut background_build, mut cold_wait) = (Vec::new(), Vec::new(), Vec::new());
    let mut warm: Option<(Vec<Proxy>, tempfile::TempDir)> = None;
    for run in 0..range.cold_runs.max(1) {
        // Each proxy alone on the machine: the background one is gone once its build is done.
        if range.cold_runs > 0 {
            let dir = tempfile::tempdir().expect("tempdir");
            let database_name = format!("bench_bg{run}_{}", std::process::id());
            let p = proxy(upstream, "background", dir.path(), &database_name, "bg", &[]);
            let started = Instant::now();
            let (seconds, header, body) = curl(&with_database(&p.url, database), sql);
            assert!(header.contains("building"), "{header}");
            assert_eq!(sorted(&body), sorted(&answer), "cold answer differs");
            cold_background.push(seconds);
            background_build.push(build_finished(&p.log, started));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let preagg_database = format!("bench_wait{run}_{}", std::process::id());
        let p = proxy(upstream, "wait", dir.path(), &preagg_database, "wait", &[]);
        let (seconds, header, body) = curl(&with_database(&p.url, database), sql);
        assert!(header.starts_with("rewritten"), "{header}");
        assert_eq!(sorted(&body), sorted(&answer), "cold (wait) answer differs");
        if range.cold_runs > 0 {
            cold_wait.push(seconds);
        }
        if run == 0 {
            // Warm: more proxies on what this one built, with the default build policy (a
            // missing window is built in the background after the answer). On the running range
            // also one with a shorter expiry_buffer: windows that ended less than a day before
            // their build live 1 h (expiry_bands), and the default expiry_buffer (1 h) serves no
            // job that expires within the hour, so by default the last day is read raw.
            settle(&p);
            drop(p);
            let count = if range.database.is_some() { WARM.len() } else { WARM.len() - 1 };
            let proxies = WARM[..count]
                .iter()
                .enumerate()
                .map(|(i, (_, extra))| {
                    proxy(upstream, "background", dir.path(), &preagg_database, &format!("warm{i}"), extra)
                })
                .collect();
            warm = Some((proxies, dir));
        }
    }
    let (proxies, _dir) = warm.expect("warm proxies");
    let urls: Vec<String> = proxies.iter().map(|p| with_database(&p.url, database)).collect();
    // One query each before measuring: new upstream connections, job lookups. A proxy with
    // exactness off stores bodies with joins per entity, not per identity: other jobs, built here.
    for (p, url) in proxies.iter().zip(&urls) {
        let (mut header, mut body) = (String::new(), String::new());
        for _ in 0..3 {
            (_, header, body) = curl(url, sql);
            if !header.contains("building") {
                break;
            }
            settle(p);
        }
        assert!(header.starts_with("rewritten"), "{header}");
        assert_eq!(sorted(&body), sorted(&answer), "warm answer differs");
        settle(p);
    }
    let builds_before: Vec<f64> = proxies.iter().map(settle).collect();
    let mut direct = Vec::new();
    let mut times = vec![Vec::new(); proxies.len()];
    row.warm = proxies.iter().map(|_| Warm::default()).collect();
    // Interleaved, so that what the machine's neighbours do falls on all alike.
    for _ in 0..runs {
        direct.push(curl(&direct_url, sql).0);
        for (i, (p, url)) in proxies.iter().zip(&urls).enumerate() {
            let (seconds, header, body) = curl(url, sql);
            assert!(header.starts_with("rewritten"), "{header}");
            assert_eq!(sorted(&body), sorted(&answer), "warm answer differs ({})", WARM[i].0);
            times[i].push(seconds);
            row.warm[i].preagg = header;
            settle(p);
        }
    }
    for (i, p) in proxies.iter().enumerate() {
        row.warm[i].builds_per_query = (settle(p) - builds_before[i]) / runs as f64;
        row.warm[i].seconds = median(std::mem::take(&mut times[i]));
    }
    // The rewritten query's parts, run directly.
    if let Some(variants) = parts(&last_rewritten(&proxies[0].log)) {
        let mut times: [Vec<f64>; 7] = Default::default();
        for _ in 0..runs {
            for (i, variant) in variants.iter().enumerate() {
                let (seconds, _, body) = curl(&direct_url, variant);
                if i < 4 {
                    assert_eq!(sorted(&body), sorted(&answer), "{}: answer differs", PARTS[i]);
                }
                times[i].push(seconds);
            }
        }
        row.parts = Some(times.map(median));
    }
    row.direct = median(direct);
    row.cold_background = (!cold_background.is_empty()).then(|| median(cold_background));
    row.background_build = (!background_build.is_empty()).then(|| median(background_build));
    row.cold_wait = median(cold_wait);
    row
}

fn sorted(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// The three queries over `[lo, hi]`.
fn queries(lo: &str, hi: &str) -> [(&'static str, String); 3] {
    let whole = std::fs::read_to_string(format!("{ROOT}/scripts/demo/experiment.sql"))
        .expect("demo query")
        .replace("2026-10-01 09:57:00.000000", lo)
        .replace("2026-10-27 14:30:00.000000", hi);
    let exposures =
        std::fs::read_to_string(format!("{ROOT}/fixtures/standalone_exposures_with_settings_and_format.sql"))
            .expect("fixture")
            .replace("2026-10-03 07:15:00.000000", lo)
            .replace("2026-10-20 16:40:00.250000", hi)
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
    [
        ("exposures subquery, rows consumed in ClickHouse", consumed),
        ("exposures subquery, every entity row sent to the client", exposures),
        ("whole experiment query (mean metric)", whole),
    ]
}

fn seconds(s: Option<f64>) -> String {
    s.map_or("—".into(), |s| format!("{s:.3} s"))
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to check here, and
    // the benchmark takes minutes.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let started = Instant::now();
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let events = env("BENCH_EVENTS", 20_000_000) as u64;
    let runs = env("BENCH_RUNS", 5);
    let running_cold = env("BENCH_RUNNING_COLD", 1);
    let python = python();
    let today = chrono::Utc::now();
    let running_start = (today - chrono::Duration::days(RUNNING_DAYS)).format("%Y-%m-%d").to_string();
    let (_clickhouse, upstream, running_database) = clickhouse(&python, events, &running_start);
    // Preaggregate databases of earlier runs (every proxy here gets its own).
    for database in curl(&upstream, "SELECT name FROM system.databases WHERE name LIKE 'bench\\_%'").2.lines() {
        curl(&upstream, &format!("DROP DATABASE IF EXISTS {database}"));
    }
    let finished =
        Range { name: "finished", lo: LO.into(), hi: HI.into(), database: None, cold_runs: runs.clamp(1, 3) };
    let mut rows: Vec<(String, Row)> = Vec::new();
    for (what, sql) in queries(LO, HI) {
        rows.push((finished.name.to_string(), measure(&upstream, &finished, what, &sql, runs)));
    }
    for i in 0..3 {
        // Each query's range ends when it is measured.
        let now = chrono::Utc::now();
        let format = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S.000000").to_string();
        let running = Range {
            name: "running",
            lo: format(now - chrono::Duration::days(RUNNING_DAYS)),
            hi: format(now),
            database: Some(running_database.clone()),
            cold_runs: running_cold,
        };
        let (what, sql) = queries(&running.lo, &running.hi).into_iter().nth(i).expect("query");
        rows.push((
            format!("running, {} .. {}", running.lo, running.hi),
            measure(&upstream, &running, what, &sql, runs),
        ));
    }

    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut table = format!(
        "{events} events over 28 days in each of two datasets; {cpus} CPUs; medians of {runs} runs.\n\
         Finished range: {LO} .. {HI} over 28 days from 2026-10-01 (database `default`).\n\
         Running range: the {RUNNING_DAYS} days up to the moment each query's measurements began (its upper bound \
         is that instant), over 28 days from {running_start} (database `{running_database}`).\n\n\
         Cold (fresh proxies: {} for the finished range, {running_cold} for the running range):\n\n\
         | range | query | direct | cold, background build | background build ready after | cold, build=wait |\n\
         |---|---|---|---|---|---|\n",
        finished.cold_runs
    );
    for (range, r) in &rows {
        table.push_str(&format!(
            "| {range} | {} | {:.3} s | {} | {} | {} |\n",
            r.what,
            r.direct,
            r.cold_background.map_or("skipped".into(), |c| format!("{c:.3} s ({:.2}× direct)", c / r.direct)),
            seconds(r.background_build),
            if r.cold_wait.is_nan() {
                "skipped".into()
            } else {
                format!("{:.3} s ({:.2}× direct)", r.cold_wait, r.cold_wait / r.direct)
            },
        ));
    }
    table.push_str(
        "\nWarm (windows built; direct and every proxy interleaved, each proxy with `build = background`, \
         the default; exact: `exact_under_change = true`, the default; not exact: \
         `--exact-under-change false`, which stores rows per entity (its own jobs) and adds no \
         correction; jobs / raw_ranges from X-Preagg; builds: started in the background per warm query):\n\n\
         | range | query | direct | warm, exact | speedup | warm, not exact | speedup | exact / not exact | jobs / \
         raw_ranges (exact) | jobs / raw_ranges (not exact) | builds (exact, not exact) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (range, r) in &rows {
        let (exact, inexact) = (&r.warm[0], &r.warm[1]);
        table.push_str(&format!(
            "| {range} | {} | {:.3} s | {} | {} | {:.2} | {} | {} | {:.1}, {:.1} |\n",
            r.what,
            r.direct,
            exact.cells(r.direct),
            inexact.cells(r.direct),
            exact.seconds / inexact.seconds,
            served(&exact.preagg),
            served(&inexact.preagg),
            exact.builds_per_query,
            inexact.builds_per_query
        ));
    }
    let half = rows.len() / 2;
    table.push_str("\nRunning against finished, warm, exact (running / finished): ");
    let ratios: Vec<String> = (0..half)
        .map(|i| format!("{} {:.2}", rows[i].1.what, rows[half + i].1.warm[0].seconds / rows[i].1.warm[0].seconds))
        .collect();
    table.push_str(&ratios.join("; "));
    table.push_str(&format!(
        ".\n\nThe running range with `--expiry-buffer 30m` (else the defaults, exact; the windows of the last day, built \
         with a lifetime of 1 h by `expiry_bands`, are served for their first half hour):\n\n\
         | range | query | direct | warm, {} | speedup | against the finished range's warm, exact | jobs / raw_ranges | \
         builds |\n|---|---|---|---|---|---|---|---|\n",
        WARM[2].0
    ));
    for (i, (range, r)) in rows.iter().enumerate().skip(half) {
        let Some(short) = r.warm.get(2) else { continue };
        let finished = rows[i - half].1.warm[0].seconds;
        table.push_str(&format!(
            "| {range} | {} | {:.3} s | {} | {:.2} | {} | {:.1} |\n",
            r.what,
            r.direct,
            short.cells(r.direct),
            short.seconds / finished,
            served(&short.preagg),
            short.builds_per_query
        ));
    }
    table.push_str(
        "\nThe rewritten query (exact, as the proxy sent it last) run directly against ClickHouse, with and \
         without each correction for changes after a build (answers of the first four checked equal to direct):\n\n\
         | range | query |",
    );
    for part in PARTS {
        table.push_str(&format!(" {part} |"));
    }
    table.push_str(&format!("\n|---|---|{}\n", "---|".repeat(PARTS.len())));
    for (range, r) in &rows {
        let cells: Vec<String> = match r.parts {
            Some(parts) => parts.iter().map(|s| format!("{s:.3} s")).collect(),
            None => vec!["not found in the rewritten query".into(); PARTS.len()],
        };
        table.push_str(&format!("| {range} | {} | {} |\n", r.what, cells.join(" | ")));
    }
    table.push_str("\nX-Preagg of the last warm answer:\n\n");
    for (range, r) in &rows {
        let headers: Vec<String> =
            r.warm.iter().zip(WARM).map(|(w, (name, _))| format!("{name} `{}`", w.preagg)).collect();
        table.push_str(&format!("- {range}, {}: {}\n", r.what, headers.join("; ")));
    }
    table.push_str(&format!("\nThe whole run took {:.0} s.\n", started.elapsed().as_secs_f64()));
    println!("{table}");
    let _ = std::fs::create_dir_all(format!("{ROOT}/target"));
    let _ = std::fs::write(format!("{ROOT}/target/bench-e2e.md"), table);
}
