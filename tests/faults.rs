//! Faults, proven rather than timed: the upstream killed and started again while an answer streams,
//! the job store cut off and back while traffic flows, a slow upstream (timeouts and connections
//! that never answer), and storms of clients that hang up at random moments. Every answer is
//! compared with the direct one, and the proxy process must still be alive (and must not have
//! panicked) at the end of each test.
//!
//! The tests run one at a time: they kill servers and open hundreds of connections on a small
//! machine, and some claims ("the other requests are unaffected") need it to themselves.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use common::equivalence::{Answer, answer, exec, forms, run, same_rows, until_rewritten};
use common::relay::{Mode, Relay};
use common::{ChServer, ProxyProcess, client, metric, python, read_until, root, wait_for, wait_until};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LO: &str = "2026-10-02 09:57:00.000000";
const HI: &str = "2026-10-12 14:30:00.000000";

/// Queries that are not experiment queries: they pass through.
const PASSTHROUGH: &[&str] = &[
    "SELECT event, count() AS n FROM events GROUP BY event ORDER BY event",
    "SELECT number, toString(number * 7) AS s FROM numbers(50)",
];

/// A long answer that streams: one block of 100 rows every 0.1 s, 1000 blocks.
const STREAMING: &str = "SELECT number, repeat('x', 100) AS pad, sleepEachRow(0.001) AS z FROM numbers(100000) SETTINGS max_block_size = 100";

/// One test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One server with data for the tests that do not kill it.
static SERVER: LazyLock<ChServer> = LazyLock::new(|| {
    let server = ChServer::start();
    server.generate(&["--events", "100000", "--seed", "13", "--start", "2026-10-01", "--days", "14"]);
    server
});

/// The experiment query (the own mean metric shape, exposures inlined) over the test range.
fn query() -> String {
    forms(99999, "test-experiment").remove(0).query(LO, HI)
}

/// Like `run`, but an error is a value: clients under fault injection may legitimately fail.
async fn try_run(base: &str, sql: &str) -> Result<Answer, String> {
    let response = client()
        .post(format!("{base}/?default_format=TSVWithNamesAndTypes"))
        .body(sql.to_string())
        .send()
        .await
        .map_err(|e| format!("request: {e}"))?;
    answer(response).await.map_err(|e| format!("body: {e}"))
}

/// Whether a process is running (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).is_some_and(|s| s != "Z" && s != "X")
    })
}

/// The proxy is still running and never panicked.
fn assert_healthy(proxy: &ProxyProcess) {
    assert!(alive(proxy.pid()), "the proxy process died:\n{}", proxy.log_text());
    assert!(!proxy.log_text().contains("panicked"), "the proxy panicked:\n{}", proxy.log_text());
}

/// Every query through the proxy answers as direct.
async fn assert_answers_as_direct(proxy: &ProxyProcess, direct: &str, sqls: &[String]) {
    for sql in sqls {
        let expected = run(direct, sql).await;
        let proxied = run(&proxy.url(), sql).await;
        same_rows(&expected, &proxied).unwrap_or_else(|e| panic!("{e}\nquery: {sql}"));
    }
}

fn all_queries() -> Vec<String> {
    let mut sqls: Vec<String> = PASSTHROUGH.iter().map(|s| s.to_string()).collect();
    sqls.push(query());
    sqls
}

/// A chdb-backed ClickHouse on a data directory and port of the test's choosing, so that it can
/// be killed and started again where it was.
struct Chdb {
    child: Child,
    port: u16,
}

impl Chdb {
    fn start(data: &Path, port: u16) -> Chdb {
        let port_file = data.with_extension(format!("port-{}", uuid::Uuid::new_v4().simple()));
        let child = Command::new(python())
            .arg(root().join("tests/chdb_server/server.py"))
            .arg("--data-dir")
            .arg(data)
            .args(["--port", &port.to_string()])
            .arg("--port-file")
            .arg(&port_file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tests/chdb_server/server.py");
        let port = wait_for("the chdb server", Duration::from_secs(60), || {
            std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok())
        });
        Chdb { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn generate(&self, args: &[&str]) {
        let status = Command::new(python())
            .arg(root().join("tests/data/generate.py"))
            .args(["--url", &self.url()])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("running tests/data/generate.py");
        assert!(status.success(), "generate.py failed");
    }

    /// SIGKILL: no goodbye to the connections.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Chdb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one request ended as (the texts are for failure messages).
#[derive(Debug)]
#[allow(dead_code)]
enum Ending {
    /// An answer with a status whose body ended cleanly.
    Complete(u16, String, Vec<u8>),
    /// The body broke off (an error while reading it).
    Broken(u16, String),
    /// No answer at all.
    Failed(String),
}

async fn ending(response: Result<reqwest::Response, reqwest::Error>) -> Ending {
    match response {
        Err(e) => Ending::Failed(e.to_string()),
        Ok(response) => {
            let status = response.status().as_u16();
            let code =
                response.headers().get("x-clickhouse-exception-code").and_then(|v| v.to_str().ok()).unwrap_or("");
            let code = code.to_string();
            match response.bytes().await {
                Ok(body) => Ending::Complete(status, code, body.to_vec()),
                Err(e) => Ending::Broken(status, e.to_string()),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_killed_mid_stream_breaks_that_answer_and_the_proxy_recovers_when_it_returns() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut upstream = Chdb::start(&data, 0);
    let (port, url) = (upstream.port, upstream.url());
    upstream.generate(&["--events", "60000", "--seed", "21", "--start", "2026-10-01", "--days", "14"]);
    let proxy = ProxyProcess::start(&url, &[("build", "wait")]);
    proxy.wait_engine_ready();
    let expected = run(&url, &query()).await;
    let warm = until_rewritten(&proxy.url(), &query(), Duration::from_secs(60)).await;
    same_rows(&expected, &warm).unwrap();

    // In flight when the upstream dies: an answer streaming, and a query still computing.
    let streaming = client().post(proxy.url()).body(STREAMING).send().await.unwrap();
    assert_eq!(streaming.status(), 200);
    let mut body = streaming.bytes_stream();
    let mut received = body.next().await.expect("a first chunk").expect("a first chunk").len();
    let computing = tokio::spawn({
        let url = proxy.url();
        async move {
            let started = Instant::now();
            let ending = ending(client().post(url).body("SELECT sleep(2.5) AS s").send().await).await;
            (ending, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    upstream.kill();
    let killed = Instant::now();

    // The streaming client sees its answer break off: an error, never a clean end, never a hang.
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => received += chunk.len(),
                Err(error) => return Err(error),
            }
        }
        Ok(())
    })
    .await
    .expect("the streaming client hangs after the upstream died");
    assert!(end.is_err(), "a broken answer must not end cleanly (it would look complete): {received} bytes");
    eprintln!("streaming answer broke off {:?} after the kill, {received} bytes in", killed.elapsed());
    // The computing query gets the proxy's 502 (or a broken body, had headers been sent).
    let (computed, elapsed) = computing.await.unwrap();
    match &computed {
        Ending::Complete(502, code, _) => assert_eq!(code, "210"),
        Ending::Broken(200, _) => {}
        other => panic!("the query in flight ended as {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(10), "the query in flight took {elapsed:?}");

    // While the upstream is down: a prompt 502 (direct, the connection is refused).
    assert!(client().post(&url).body("SELECT 1").send().await.is_err(), "direct is refused");
    for sql in ["SELECT 1".to_string(), query()] {
        let started = Instant::now();
        match ending(client().post(proxy.url()).body(sql).send().await).await {
            Ending::Complete(502, code, body) => {
                assert_eq!(code, "210", "{}", String::from_utf8_lossy(&body));
            }
            other => panic!("with the upstream down: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3), "a down upstream took {:?}", started.elapsed());
    }
    assert_healthy(&proxy);

    // The upstream comes back on the same port with the same data; no proxy restart.
    let upstream = Chdb::start(&data, port);
    assert_eq!(upstream.port, port);
    // At once, sequentially and concurrently: every answer as direct.
    assert_answers_as_direct(&proxy, &url, &all_queries()).await;
    let expected = run(&url, &query()).await;
    let concurrent = futures_util::future::join_all((0..16).map(|i| {
        let (proxy_url, url) = (proxy.url(), url.clone());
        async move {
            let sql = format!("SELECT number * {i} AS n FROM numbers(1000)");
            (run(&url, &sql).await, run(&proxy_url, &sql).await)
        }
    }))
    .await;
    for (direct, proxied) in &concurrent {
        same_rows(direct, proxied).unwrap();
    }
    // The experiment query is right on every try and rewritten again.
    let started = Instant::now();
    loop {
        let answer = run(&proxy.url(), &query()).await;
        same_rows(&expected, &answer).unwrap();
        if answer.preagg.starts_with("rewritten") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not rewritten after the restart: {}", answer.preagg);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_healthy(&proxy);
}

/// One answer seen by the traffic of the store test.
struct Seen {
    at: Duration,
    took: Duration,
    experiment: bool,
    preagg: String,
    error: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_store_restarted_during_traffic_keeps_answers_right_and_rewriting_resumes() {
    let _serial = SERIAL.lock().await;
    let expected: Arc<HashMap<String, Answer>> = Arc::new({
        let mut map = HashMap::new();
        for sql in all_queries() {
            let answer = run(&SERVER.url(), &sql).await;
            map.insert(sql, answer);
        }
        map
    });
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let store = common::postgres_url().replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    // The PostgreSQL store outlives this run: a database of its own keeps its jobs apart.
    let database = format!("faults_store_restart_{}", uuid::Uuid::new_v4().simple());
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let proxy = ProxyProcess::start(
        &SERVER.url(),
        &[("store", &store), ("build", "wait"), ("job_cache_ttl", "100ms"), ("preagg_database", &database)],
    );
    proxy.wait_engine_ready();
    until_rewritten(&proxy.url(), &query(), Duration::from_secs(60)).await;

    // Traffic: four clients, experiment and pass-through queries, until told to stop.
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, seen, expected, url) =
                (Arc::clone(&stop), Arc::clone(&seen), Arc::clone(&expected), proxy.url());
            let sqls = all_queries();
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    let sql = &sqls[i % sqls.len()];
                    i += 1;
                    let started = Instant::now();
                    let (preagg, error) = match try_run(&url, sql).await {
                        Ok(answer) => (answer.preagg.clone(), same_rows(&expected[sql], &answer).err()),
                        Err(e) => (String::new(), Some(e)),
                    };
                    seen.lock().unwrap().push(Seen {
                        at: t0.elapsed(),
                        took: started.elapsed(),
                        experiment: sql.contains("$feature_flag_called"),
                        preagg,
                        error,
                    });
                }
            })
        })
        .collect();
    let rewritten_after = |from: Duration| {
        seen.lock().unwrap().iter().any(|s| s.at > from && s.experiment && s.preagg.starts_with("rewritten"))
    };

    // Two outages: the store's connections cut and new ones refused (a restart), then a store
    // that accepts connections and never answers (one stuck while starting); each followed by
    // the store coming back, until rewriting has resumed.
    let mut outages = Vec::new();
    for mode in [Mode::Drop, Mode::Hang] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let down = t0.elapsed();
        relay.set(mode);
        tokio::time::sleep(Duration::from_secs(4)).await;
        relay.set(Mode::Forward);
        let up = t0.elapsed();
        wait_for("rewriting to resume after the store came back", Duration::from_secs(30), || {
            rewritten_after(up).then_some(())
        });
        eprintln!("{mode:?}: rewriting resumed {:?} after the store came back", t0.elapsed() - up);
        outages.push((mode, down, up));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }

    let seen = seen.lock().unwrap();
    let errors: Vec<&String> = seen.iter().filter_map(|s| s.error.as_ref()).collect();
    assert!(errors.is_empty(), "{} wrong or failed answers of {}: {errors:?}", errors.len(), seen.len());
    for (mode, down, up) in &outages {
        let during: Vec<&Seen> = seen.iter().filter(|s| s.at > *down && s.at - s.took < *up).collect();
        let unavailable = during.iter().filter(|s| s.preagg == "passthrough reason=store_unavailable").count();
        assert!(unavailable > 0, "{mode:?}: no query noticed the store was down");
        for s in &during {
            let expected_reason = if s.experiment {
                s.preagg.starts_with("rewritten") || s.preagg == "passthrough reason=store_unavailable"
            } else {
                s.preagg == "passthrough reason=not_experiment_query"
            };
            assert!(expected_reason, "{mode:?}: unexpected X-Preagg during the outage: {}", s.preagg);
        }
        let slowest = during.iter().map(|s| s.took).max().unwrap_or_default();
        eprintln!(
            "{mode:?}: {} answers during the outage ({unavailable} store_unavailable), slowest {slowest:?}",
            during.len()
        );
    }
    // The store's timeout (1 s) bounds what an outage adds to any query.
    let before: Vec<Duration> = seen.iter().filter(|s| s.at < outages[0].1).map(|s| s.took).collect();
    let slowest_before = before.iter().max().copied().unwrap_or_default();
    let slowest = seen.iter().map(|s| s.took).max().unwrap_or_default();
    assert!(
        slowest < slowest_before + Duration::from_secs(5),
        "an outage stalled a query: {slowest:?} (before: {slowest_before:?})"
    );
    assert_healthy(&proxy);
}

/// A relay that holds every `every`-th connection (reading and discarding what arrives, never
/// answering) and forwards the others. Counts the held connections and those the proxy closed.
struct PartialHang {
    port: u16,
    held: Arc<AtomicUsize>,
    released: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PartialHang {
    async fn start(target: SocketAddr, every: usize) -> PartialHang {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicUsize::new(0));
        let released = Arc::new(AtomicUsize::new(0));
        let (h, r) = (Arc::clone(&held), Arc::clone(&released));
        let task = tokio::spawn(async move {
            let mut accepted = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                accepted += 1;
                if accepted.is_multiple_of(every) {
                    h.fetch_add(1, Ordering::SeqCst);
                    let r = Arc::clone(&r);
                    tokio::spawn(async move {
                        let mut sink = [0u8; 4096];
                        while let Ok(n) = client.read(&mut sink).await {
                            if n == 0 {
                                break;
                            }
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                    });
                } else {
                    tokio::spawn(async move {
                        if let Ok(mut upstream) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                    });
                }
            }
        });
        PartialHang { port, held, released, task }
    }
}

impl Drop for PartialHang {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn server_addr() -> SocketAddr {
    format!("127.0.0.1:{}", SERVER.port).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_upstream_times_out_with_504_and_leaves_other_requests_alone() {
    let _serial = SERIAL.lock().await;
    let fast: Vec<String> = (0..8).map(|i| format!("SELECT number * {i} AS n FROM numbers(100)")).collect();
    let mut expected = HashMap::new();
    let mut sqls = fast.clone();
    sqls.extend(PASSTHROUGH.iter().map(|s| s.to_string()));
    for sql in sqls {
        let answer = run(&SERVER.url(), &sql).await;
        expected.insert(sql, answer);
    }
    let expected = Arc::new(expected);

    // Queries slower than upstream_timeout (2 s) get 504 after it; fast ones keep flowing.
    let proxy = ProxyProcess::start(&SERVER.url(), &[("upstream_timeout", "2s")]);
    proxy.wait_engine_ready();
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let url = proxy.url();
            tokio::spawn(async move {
                let started = Instant::now();
                let ending = ending(client().post(url).body("SELECT sleep(3) AS s").send().await).await;
                (ending, started.elapsed())
            })
        })
        .collect();
    let started = Instant::now();
    let mut fast_answers = 0;
    let mut slowest_fast = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(4) {
        for sql in expected.keys() {
            let t = Instant::now();
            let answer = run(&proxy.url(), sql).await;
            slowest_fast = slowest_fast.max(t.elapsed());
            same_rows(&expected[sql], &answer).unwrap();
            fast_answers += 1;
        }
    }
    for task in slow {
        let (ending, took) = task.await.unwrap();
        match ending {
            Ending::Complete(504, code, _) => assert_eq!(code, "159"),
            other => panic!("a query slower than upstream_timeout ended as {other:?}"),
        }
        assert!(
            took >= Duration::from_millis(1950) && took < Duration::from_millis(2900),
            "504 after {took:?}, upstream_timeout is 2 s"
        );
    }
    eprintln!("{fast_answers} fast answers while 6 queries timed out; slowest {slowest_fast:?}");
    assert!(slowest_fast < Duration::from_secs(1), "a fast query took {slowest_fast:?} next to slow ones");
    assert_healthy(&proxy);

    // An upstream whose every third connection never answers: requests on those get 504 after
    // the timeout and the connection is closed; every other request is answered at once, right.
    let relay = PartialHang::start(server_addr(), 3).await;
    let proxy = ProxyProcess::start(
        &format!("http://127.0.0.1:{}", relay.port),
        &[("upstream_timeout", "2s"), ("clickhouse_url", &SERVER.url())],
    );
    proxy.wait_engine_ready();
    let rounds = futures_util::future::join_all((0..24).map(|i| {
        let (url, sql) = (proxy.url(), fast[i % fast.len()].clone());
        async move {
            let started = Instant::now();
            let answer = try_run(&url, &sql).await;
            (sql, answer, started.elapsed())
        }
    }))
    .await;
    let mut timeouts = 0;
    for (sql, answer, took) in &rounds {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("{sql}: {e}"));
        if answer.status == 504 {
            timeouts += 1;
            assert!(*took >= Duration::from_millis(1950), "504 after {took:?}");
        } else {
            same_rows(&expected[sql], answer).unwrap();
            assert!(*took < Duration::from_millis(1500), "an answered request took {took:?}");
        }
    }
    let held = relay.held.load(Ordering::SeqCst);
    eprintln!("{} concurrent requests: {timeouts} timed out on {held} held connections", rounds.len());
    assert!(held > 0 && timeouts > 0, "no connection was held ({held}) or timed out ({timeouts})");
    assert!(timeouts <= held, "{timeouts} timeouts but only {held} held connections");
    // The proxy gives up the connections it timed out on, instead of keeping them forever.
    wait_for("the proxy to close the held connections", Duration::from_secs(10), || {
        (relay.released.load(Ordering::SeqCst) >= timeouts).then_some(())
    });
    // Later requests: answered right (or 504 if they land on a newly held connection).
    for sql in &fast {
        let answer = try_run(&proxy.url(), sql).await.unwrap();
        if answer.status != 504 {
            same_rows(&expected[sql], &answer).unwrap();
        }
    }
    assert_healthy(&proxy);
}

/// The process's TCP sockets: (local port, remote port, state), from /proc.
fn sockets(pid: u32) -> Vec<(u16, u16, u8)> {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let port = |address: &str| u16::from_str_radix(address.rsplit(':').next().unwrap_or(""), 16).unwrap_or(0);
            let inode: u64 = fields[9].parse().unwrap_or(0);
            if inodes.contains(&inode) {
                out.push((port(fields[1]), port(fields[2]), u8::from_str_radix(fields[3], 16).unwrap_or(0)));
            }
        }
    }
    out
}

/// The process's descriptors by kind (socket, anon_inode:[eventpoll], a path...), for messages.
fn fd_kinds(pid: u32) -> String {
    let mut kinds: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let link = std::fs::read_link(entry.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        let kind = if link.starts_with("socket:") { "socket".to_string() } else { link };
        *kinds.entry(kind).or_default() += 1;
    }
    format!("{kinds:?}")
}

/// The proxy's descriptors by what they are for.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
struct Census {
    total: usize,
    /// Connections from clients (to the proxy's port).
    clients: usize,
    /// Connections to the admin port.
    admin: usize,
    /// Connections to the upstream (the engine's own included).
    upstream: usize,
    /// TCP connections the peer closed and the proxy did not.
    half_closed: usize,
    /// The SQLite job store's files.
    store: usize,
    /// Everything else: listeners, the log, epoll, signal pipes...
    other: usize,
}

impl Census {
    fn of(pid: u32, ports: (u16, u16), upstream_port: u16) -> Census {
        let (port, admin_port) = ports;
        let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_link(e.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default())
            .collect();
        let store = links.iter().filter(|l| l.contains("jobs.db")).count();
        let sockets = sockets(pid);
        let clients = sockets.iter().filter(|(local, _, state)| *local == port && *state != TCP_LISTEN).count();
        let admin = sockets.iter().filter(|(local, _, state)| *local == admin_port && *state != TCP_LISTEN).count();
        let upstream = sockets.iter().filter(|(_, remote, _)| *remote == upstream_port).count();
        let half_closed = sockets.iter().filter(|(_, _, state)| *state == TCP_CLOSE_WAIT).count();
        let total = links.len();
        let other = total - clients - admin - upstream - store;
        Census { total, clients, admin, upstream, half_closed, store, other }
    }
}

const TCP_CLOSE_WAIT: u8 = 0x08;
const TCP_LISTEN: u8 = 0x0A;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn raw_request(sql: &str) -> String {
    format!(
        "POST /?default_format=TSVWithNamesAndTypes HTTP/1.1\r\nHost: storm\r\nContent-Length: {}\r\n\r\n{sql}",
        sql.len()
    )
}

/// Clients that misbehave in every way a client can hang up, and among them well-behaved ones
/// whose answers are checked. Returns the well-behaved clients' failures and their count.
async fn storm(port: u16, checks: Arc<Vec<(String, Answer)>>, clients: usize, seed: u64) -> (Vec<String>, usize) {
    let mut rng = Rng(seed);
    let base = format!("http://127.0.0.1:{port}");
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (kind, delay, amount, pick) = (rng.below(8), rng.below(400), rng.below(300_000), rng.below(1000));
            let (checks, base) = (Arc::clone(&checks), base.clone());
            tokio::spawn(async move {
                let delay = Duration::from_millis(delay);
                let (sql, expected) = &checks[pick as usize % checks.len()];
                if kind >= 6 {
                    // Well-behaved: the whole answer, which must be right.
                    return Some(match try_run(&base, sql).await {
                        Ok(answer) => same_rows(expected, &answer).err(),
                        Err(e) => Some(e),
                    });
                }
                let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else { return None };
                let request = match kind {
                    1 => "POST / HTTP/1.1\r\nHost: storm\r\nContent-Le".to_string(),
                    2 => {
                        let full = raw_request(sql);
                        full[..full.len() - sql.len() / 2].to_string()
                    }
                    3 => raw_request(sql),
                    4 => raw_request(
                        "SELECT number, repeat('x', 200) AS pad FROM numbers(3000000) SETTINGS max_block_size = 1000",
                    ),
                    5 => raw_request("SELECT sleep(1.5) AS s"),
                    _ => String::new(),
                };
                let _ = stream.write_all(request.as_bytes()).await;
                if kind == 4 {
                    // Reads part of a long answer, then hangs up with data unread (a reset).
                    let mut buffer = vec![0u8; 16 * 1024];
                    let mut read = 0u64;
                    while read < amount {
                        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await {
                            Ok(Ok(n)) if n > 0 => read += n as u64,
                            _ => break,
                        }
                    }
                } else {
                    tokio::time::sleep(delay).await;
                }
                drop(stream);
                None
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut well_behaved = 0;
    for task in tasks {
        if let Some(result) = task.await.unwrap() {
            well_behaved += 1;
            failures.extend(result);
        }
    }
    (failures, well_behaved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storms_of_client_disconnects_leave_the_proxy_as_it_was() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyProcess::start(&SERVER.url(), &[("build", "wait")]);
    proxy.wait_engine_ready();
    until_rewritten(&proxy.url(), &query(), Duration::from_secs(60)).await;
    let mut checks = Vec::new();
    for sql in all_queries() {
        let answer = run(&SERVER.url(), &sql).await;
        checks.push((sql, answer));
    }
    let checks = Arc::new(checks);
    assert_answers_as_direct(&proxy, &SERVER.url(), &all_queries()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let census = || Census::of(proxy.pid(), (proxy.port, proxy.admin_port), SERVER.port);
    let baseline = census();
    eprintln!("baseline: {baseline:?} {}", fd_kinds(proxy.pid()));

    // The same storm direct and through the proxy, twice over.
    let mut direct_failures = Vec::new();
    let mut proxy_failures = Vec::new();
    for round in 0..2 {
        let seed = 1000 + round;
        let (failures, _) = storm(SERVER.port, Arc::clone(&checks), 300, seed).await;
        direct_failures.extend(failures);
        let (failures, well_behaved) = storm(proxy.port, Arc::clone(&checks), 300, seed).await;
        proxy_failures.extend(failures);
        assert!(well_behaved > 30, "only {well_behaved} well-behaved clients");
        eprintln!("storm {round}: {well_behaved} well-behaved clients; now {:?}", census());
        assert_healthy(&proxy);
    }
    eprintln!(
        "well-behaved clients that failed: {} direct, {} through the proxy {:?}",
        direct_failures.len(),
        proxy_failures.len(),
        proxy_failures.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        proxy_failures.len() <= direct_failures.len(),
        "well-behaved clients failed through the proxy: {proxy_failures:?} (direct: {direct_failures:?})"
    );

    // Every client connection is gone, none is left half-closed, and apart from idle keep-alive
    // connections to the upstream and the job store's pool (at most 4 SQLite connections) the
    // descriptors are the baseline's.
    let at_rest = |now: Census| {
        if (now.clients, now.half_closed, now.other) == (0, 0, baseline.other) {
            Ok(now)
        } else {
            Err(format!("{now:?} {}", fd_kinds(proxy.pid())))
        }
    };
    let settled = wait_until("the clients' connections to be closed", Duration::from_secs(30), || at_rest(census()));
    eprintln!("after the storms: {settled:?} {}", fd_kinds(proxy.pid()));
    assert!(settled.store <= 9, "the job store holds {} descriptors", settled.store);
    // The upstream closes idle keep-alive connections after 30 s, and the proxy lets them go. (A
    // socket the peer has just reset leaves /proc/net/tcp before the proxy closes its descriptor:
    // for that moment it counts as "other", so the whole census is waited for, not sampled once.)
    let idle = wait_until("the descriptors to return to the baseline", Duration::from_secs(150), || {
        let now = census();
        if now.upstream > baseline.upstream + 1 {
            return Err(format!("{now:?}"));
        }
        at_rest(now)
    });
    eprintln!("after the upstream's keep-alive timeout: {idle:?}");

    // And it answers as before.
    assert_answers_as_direct(&proxy, &SERVER.url(), &all_queries()).await;
    let answer = run(&proxy.url(), &query()).await;
    assert!(answer.preagg.starts_with("rewritten"), "{}", answer.preagg);
    assert_healthy(&proxy);
}

/// The proxy's `preagg_requests_in_flight` gauge.
async fn in_flight(proxy: &ProxyProcess) -> f64 {
    metric(&proxy.metrics().await, "preagg_requests_in_flight", &[])
}

/// A client that hangs up before the response headers (while the proxy waits for the upstream)
/// drops the request handler before any response body exists: the request must still leave the
/// in-flight gauge and get its access-log line (status 499, `client_closed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_before_the_answer_leave_the_in_flight_gauge() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyProcess::start(&SERVER.url(), &[]);
    assert_eq!(in_flight(&proxy).await, 0.0);
    for _ in 0..5 {
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        stream.write_all(raw_request("SELECT sleep(1) AS s").as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(stream);
    }
    // Long after the upstream finished the abandoned queries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(in_flight(&proxy).await, 0.0, "requests counted in flight with no client connected");
    let closed = proxy.log_lines().iter().filter(|l| l["outcome"] == "client_closed").count();
    assert_eq!(closed, 5, "access-log lines of the abandoned requests:\n{}", proxy.log_text());
    assert_healthy(&proxy);
}

/// A client that stops reading its answer holds its connection only for `client_send_timeout`:
/// then the connection is dropped, and the request leaves the in-flight gauge with its access line
/// (not complete), as a client that hangs up does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answer_is_dropped_after_the_send_timeout() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyProcess::start(&SERVER.url(), &[("client_send_timeout", "1s")]);
    let mut stuck = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    // About 40 MB, more than the sockets between the proxy and the client hold.
    stuck.write_all(raw_request("SELECT number FROM numbers(5000000)").as_bytes()).await.unwrap();
    let cut = |lines: &Vec<serde_json::Value>| {
        lines.iter().any(|l| l["complete"] == false && l["bytes"].as_u64().is_some_and(|bytes| bytes > 0))
    };
    let access_lines =
        || async { proxy.log_lines().into_iter().filter(|l| l["target"] == "preagg_proxy::access").collect() };
    read_until("the access line of the answer given up", Duration::from_secs(30), access_lines, cut).await;
    assert_eq!(in_flight(&proxy).await, 0.0, "the request is over");
    drop(stuck);
    assert_answers_as_direct(&proxy, &SERVER.url(), &[query()]).await;
    assert_healthy(&proxy);
}

/// A client that stops sending the query body it announced holds its request only for
/// `client_receive_timeout`: then it is answered 400 and its connection closed, as ClickHouse does
/// after `http_receive_timeout`, instead of holding a task until shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_is_answered_after_the_receive_timeout() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyProcess::start(&SERVER.url(), &[("client_receive_timeout", "1s")]);
    let mut stalled = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    stalled.write_all(b"POST / HTTP/1.1\r\nHost: stall\r\nContent-Length: 100\r\n\r\nSELECT 1").await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut answer))
        .await
        .expect("answered and closed within the timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("client_receive_timeout"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900), "answered after {:?}", started.elapsed());
    assert_eq!(in_flight(&proxy).await, 0.0, "the request is over");
    assert_answers_as_direct(&proxy, &SERVER.url(), &[query()]).await;
    assert_healthy(&proxy);
}

/// A relay to the server that holds, unanswered, every connection once a request on it reads the
/// preaggregate table (a rewritten query); all else passes both ways.
async fn hang_rewritten(target: SocketAddr) -> (u16, tokio::task::JoinHandle<()>) {
    const MARKER: &[u8] = b"experiment_exposures_preaggregated";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(target).await else { return };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut upstream_read, mut upstream_write) = upstream.into_split();
                let answers = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
                });
                // What was seen lately, so that a marker split between two reads is found.
                let mut seen: Vec<u8> = Vec::new();
                let mut buffer = [0u8; 16 * 1024];
                let mut holding = false;
                while let Ok(n) = client_read.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buffer[..n]);
                    holding |= seen.windows(MARKER.len()).any(|w| w == MARKER);
                    seen.drain(..seen.len().saturating_sub(MARKER.len()));
                    if !holding && upstream_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
                answers.abort();
            });
        }
    });
    (port, task)
}

/// A rewritten query that gets no answer within `upstream_timeout` is answered 504 then, and the
/// original is not sent after it (which would make the client wait twice as long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_query_that_times_out_is_not_sent_again_as_the_original() {
    let _serial = SERIAL.lock().await;
    let (port, relay) = hang_rewritten(server_addr()).await;
    let proxy = ProxyProcess::start(
        &format!("http://127.0.0.1:{port}"),
        &[("upstream_timeout", "2s"), ("clickhouse_url", &SERVER.url()), ("build", "wait")],
    );
    proxy.wait_engine_ready();
    // Built on the first ask (straight to the server), then rewritten, and the relay holds it;
    // the second ask finds its windows built, and is timed.
    for ask in ["built and asked", "asked"] {
        let started = Instant::now();
        let answer = try_run(&proxy.url(), &query()).await.unwrap();
        let took = started.elapsed();
        assert_eq!(answer.status, 504, "{ask}: {answer:?}");
        assert_eq!(answer.preagg, "passthrough reason=rewritten_query_failed", "{ask}");
        assert!(took >= Duration::from_secs(2), "{ask}: answered after {took:?}");
        if ask == "asked" {
            assert!(took < Duration::from_secs(4), "{ask}: answered after {took:?}");
        }
    }
    // The original still flows through the same relay.
    let plain = try_run(&proxy.url(), PASSTHROUGH[0]).await.unwrap();
    assert_eq!(plain.status, 200, "{plain:?}");
    relay.abort();
    assert_healthy(&proxy);
}
