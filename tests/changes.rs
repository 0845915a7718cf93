//! Exactness under change, on the real engine: windows are built and served, then the source
//! changes the way production data does after a build (late events, identity merges and
//! unmerges, deletions), and the answer through the proxy is the direct one at once. Late events
//! are served rewritten (the rows ingested since the build are read again), and so are identity
//! changes (stored rows are per distinct id and the overrides join runs at read time); a deletion
//! fails the rewrite over to the original until the windows are built again.

mod common;

use std::time::Duration;

use common::equivalence::{Answer, exec, forms, run, same_rows, until_rewritten};
use common::{ChServer, ProxyProcess};

const TEAM: i64 = 99999;
const FLAG: &str = "test-experiment";
const LO: &str = "2026-10-01 00:00:00.000000";
const HI: &str = "2026-10-13 00:00:00.000000";

/// A server with seeded data: 14 days from 2026-10-01.
fn seeded_server(events: u32, seed: u32) -> ChServer {
    let server = ChServer::start();
    let (events, seed) = (events.to_string(), seed.to_string());
    server.generate(&["--events", &events, "--seed", &seed, "--start", "2026-10-01", "--days", "14"]);
    server
}

/// A proxy in front of `server` with `settings`, its engine ready.
fn proxy_for(server: &ChServer, settings: &[(&str, &str)]) -> ProxyProcess {
    let proxy = ProxyProcess::start(&server.url(), settings);
    proxy.wait_engine_ready();
    proxy
}

/// A server with seeded data and a proxy in front of it whose windows for `sql` are built.
async fn built(sql: &str) -> (ChServer, ProxyProcess) {
    let server = seeded_server(60_000, 7);
    let proxy = proxy_for(&server, &[]);
    let warm = until_rewritten(&proxy.url(), sql, Duration::from_secs(60)).await;
    assert_same(&run(&server.url(), sql).await, &warm, "before any change");
    (server, proxy)
}

fn assert_same(direct: &Answer, through: &Answer, what: &str) {
    assert_eq!(direct.status, 200, "{what}: direct failed: {:?}", direct.lines);
    if let Err(e) = same_rows(direct, through) {
        panic!("{what} ({}): {e}", through.preagg);
    }
}

/// Asks directly and through the proxy: the same rows, and rewritten.
async fn served_exactly(server: &ChServer, proxy: &ProxyProcess, sql: &str, what: &str) -> Answer {
    let direct = run(&server.url(), sql).await;
    let through = run(&proxy.url(), sql).await;
    assert_same(&direct, &through, what);
    assert!(through.preagg.starts_with("rewritten"), "{what}: {}", through.preagg);
    direct
}

/// An exposure event of `person` (a number) under `distinct_id`, inserted now.
fn exposure(at: &str, person: u32, distinct_id: &str, variant: &str) -> String {
    format!(
        "INSERT INTO events (uuid, event, properties, timestamp, team_id, distinct_id, person_id, `$session_id`, \
         elements_chain, created_at, _timestamp) VALUES (generateUUIDv4(), '$feature_flag_called', \
         '{{\"$feature_flag\": \"{FLAG}\", \"$feature_flag_response\": \"{variant}\"}}', \
         toDateTime64('{at}', 6, 'UTC'), {TEAM}, '{distinct_id}', toUUID('00000000-0000-4000-8000-{person:012}'), \
         'late-session-{person}', '', now64(), now())"
    )
}

/// An override row: `distinct_id` belongs to `person_id` from `version` on (or no longer to
/// anyone, `deleted`), as PostHog writes when persons merge or a merge is undone.
fn override_row(distinct_id: &str, person_id: &str, deleted: bool, version: u32) -> String {
    format!(
        "INSERT INTO person_distinct_id_overrides (team_id, distinct_id, person_id, is_deleted, version) \
         VALUES ({TEAM}, '{distinct_id}', toUUID('{person_id}'), {}, {version})",
        u8::from(deleted)
    )
}

/// The first exposed entity of the range: its distinct id, person id and variant.
async fn first_exposed(server: &ChServer) -> (String, String, String) {
    let answer = run(
        &server.url(),
        &format!(
            "SELECT distinct_id, toString(person_id), JSONExtractString(properties, '$feature_flag_response') \
             FROM events WHERE team_id = {TEAM} AND event = '$feature_flag_called' \
             AND JSONExtractString(properties, '$feature_flag') = '{FLAG}' \
             AND timestamp >= '{LO}' AND timestamp < '{HI}' ORDER BY timestamp LIMIT 1"
        ),
    )
    .await;
    let fields: Vec<String> = answer.lines[2].split('\t').map(str::to_string).collect();
    (fields[0].clone(), fields[1].clone(), fields[2].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_after_a_build_are_served_exactly_at_once() {
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let (server, proxy) = built(&sql).await;
    let before = run(&server.url(), &sql).await;

    // A new person, exposed ten days back.
    exec(&server.url(), &exposure("2026-10-03 10:00:00.000001", 9001, "late-9001", "test"));
    let after = served_exactly(&server, &proxy, &sql, "a late exposure of a new person").await;
    assert_ne!(before.lines, after.lines, "the late exposure changes the direct answer");

    // An exposed person sees the other variant twelve days back: it becomes `$multiple`.
    let (distinct_id, person_id, variant) = first_exposed(&server).await;
    let other = if variant == "control" { "test" } else { "control" };
    let person = format!("toUUID('{person_id}')");
    let other_variant = exposure("2026-10-01 06:00:00.000000", 0, &distinct_id, other)
        .replace("toUUID('00000000-0000-4000-8000-000000000000')", &person);
    exec(&server.url(), &other_variant);
    let multiple = served_exactly(&server, &proxy, &sql, "a person in a second variant, late").await;
    assert_ne!(after.lines, multiple.lines, "the second variant changes the direct answer");

    // The same person exposed earlier than its first exposure.
    let earlier = exposure("2026-10-01 00:00:00.000001", 0, &distinct_id, other)
        .replace("toUUID('00000000-0000-4000-8000-000000000000')", &person);
    exec(&server.url(), &earlier);
    served_exactly(&server, &proxy, &sql, "an exposure earlier than the first").await;

    // Every form of the query, not only the one built first.
    for form in forms(TEAM, FLAG) {
        let sql = form.query(LO, HI);
        let direct = run(&server.url(), &sql).await;
        let cold = run(&proxy.url(), &sql).await;
        assert_same(&direct, &cold, &format!("{} cold", form.name));
        let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
        assert_same(&direct, &warm, &format!("{} warm", form.name));
        exec(&server.url(), &exposure("2026-10-05 12:00:00.000000", 9002, "late-9002", "control"));
        served_exactly(&server, &proxy, &sql, &format!("{}, after another late exposure", form.name)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_changes_after_a_build_are_served_exactly_at_once() {
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let (server, proxy) = built(&sql).await;
    let before = run(&server.url(), &sql).await;
    let (first_distinct_id, _) = nth_exposed(&server, 0).await;
    let (_, other_person) = nth_exposed(&server, 7).await;

    // The first exposed distinct id is merged into another exposed person.
    exec(&server.url(), &override_row(&first_distinct_id, &other_person, false, 1000));
    let merged = served_exactly(&server, &proxy, &sql, "a merge after the build").await;
    assert_ne!(before.lines, merged.lines, "the merge changes the direct answer");

    // The merge is undone: the override is deleted in a newer version.
    exec(&server.url(), &override_row(&first_distinct_id, &other_person, true, 1001));
    let unmerged = served_exactly(&server, &proxy, &sql, "an override deleted after the build").await;
    assert!(same_rows(&before, &unmerged).is_ok(), "undoing the merge gives the first answer back");

    // Merged back, and an override of a person merged at generation time deleted.
    exec(&server.url(), &override_row(&first_distinct_id, &other_person, false, 1002));
    served_exactly(&server, &proxy, &sql, "merged back").await;
    let merged_at_start = run(
        &server.url(),
        &format!(
            "SELECT distinct_id, toString(argMax(person_id, version)) FROM person_distinct_id_overrides \
             WHERE team_id = {TEAM} GROUP BY distinct_id HAVING argMax(is_deleted, version) = 0 \
             ORDER BY distinct_id LIMIT 1"
        ),
    )
    .await;
    let fields: Vec<&str> = merged_at_start.lines[2].split('\t').collect();
    exec(&server.url(), &override_row(fields[0], fields[1], true, 1003));
    served_exactly(&server, &proxy, &sql, "an override of the generated data deleted").await;

    // Every form, cold and warm, then after one more merge.
    for form in forms(TEAM, FLAG) {
        let sql = form.query(LO, HI);
        let direct = run(&server.url(), &sql).await;
        assert_same(&direct, &run(&proxy.url(), &sql).await, &format!("{} cold", form.name));
        let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
        assert_same(&direct, &warm, &format!("{} warm", form.name));
    }
    let (distinct_id, _) = nth_exposed(&server, 3).await;
    exec(&server.url(), &override_row(&distinct_id, &other_person, false, 1004));
    for form in forms(TEAM, FLAG) {
        served_exactly(&server, &proxy, &form.query(LO, HI), &format!("{}, after another merge", form.name)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_made_before_identity_columns_is_upgraded_and_served() {
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let server = seeded_server(20_000, 3);
    // The table as versions before identity keying created it.
    exec(
        &server.url(),
        "CREATE TABLE experiment_exposures_preaggregated (team_id Int64, job_id String, `entity_id` String, \
         `variant` Nullable(String), `first_exposure_time` DateTime64(6, 'UTC'), \
         `last_exposure_time` DateTime64(6, 'UTC'), `exposure_event_uuid` UUID, \
         `exposure_session_id` Nullable(String), computed_at DateTime64(6, 'UTC'), \
         expires_at DateTime64(6, 'UTC')) ENGINE = ReplacingMergeTree(computed_at) \
         ORDER BY (team_id, job_id, `entity_id`) TTL toDateTime(expires_at)",
    );
    let proxy = proxy_for(&server, &[]);
    let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
    assert_same(&run(&server.url(), &sql).await, &warm, "served from the upgraded table");
    let key = run(
        &server.url(),
        "SELECT sorting_key FROM system.tables WHERE database = currentDatabase() \
         AND name = 'experiment_exposures_preaggregated'",
    )
    .await;
    assert_eq!(
        key.lines[2],
        "team_id, job_id, entity_id, distinct_id, person_id, isNull(exposure_identifier), \
         assumeNotNull(exposure_identifier)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_events_are_never_served_and_the_windows_are_built_again() {
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let (server, proxy) = built(&sql).await;
    let before = run(&server.url(), &sql).await;
    let (_, person_id, _) = first_exposed(&server).await;

    // A person's events deleted on request, as PostHog does: an ALTER TABLE ... DELETE mutation.
    exec(
        &server.url(),
        &format!("ALTER TABLE events DELETE WHERE person_id = toUUID('{person_id}') SETTINGS mutations_sync = 2"),
    );
    let direct = run(&server.url(), &sql).await;
    assert_ne!(before.lines, direct.lines, "the deletion changes the direct answer");
    let through = run(&proxy.url(), &sql).await;
    assert_same(&direct, &through, "right after the deletion");
    assert_eq!(through.preagg, "passthrough reason=rewritten_query_failed", "the mutation guard fails over");

    // The windows are built again after the mutation, and served.
    let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
    assert_same(&direct, &warm, "rebuilt after the deletion");

    // A lightweight delete of the next person works the same way.
    let (_, person_id, _) = first_exposed(&server).await;
    exec(&server.url(), &format!("DELETE FROM events WHERE person_id = toUUID('{person_id}')"));
    let direct = run(&server.url(), &sql).await;
    let through = run(&proxy.url(), &sql).await;
    assert_same(&direct, &through, "right after a lightweight delete");
    let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
    assert_same(&direct, &warm, "rebuilt after the lightweight delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_exactness_off_stored_windows_are_served_as_built() {
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let server = seeded_server(60_000, 7);
    let proxy = proxy_for(&server, &[("exact_under_change", "false")]);
    let built = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
    exec(&server.url(), &exposure("2026-10-03 10:00:00.000001", 9001, "late-9001", "test"));
    let direct = run(&server.url(), &sql).await;
    let through = run(&proxy.url(), &sql).await;
    assert!(through.preagg.starts_with("rewritten"), "{}", through.preagg);
    assert!(same_rows(&direct, &through).is_err(), "the late exposure is not seen: the switch does what it says");
    assert!(same_rows(&built, &through).is_ok(), "the answer is the one built");
}

/// Shadow comparisons of `result` so far.
async fn shadowed(proxy: &ProxyProcess, result: &str) -> f64 {
    common::metric(&proxy.metrics().await, "preagg_shadow_total", &[("result", result)])
}

/// Shadow comparisons that ended so far (matched, mismatched, failed or noisy), from one scrape.
async fn comparisons_ended(proxy: &ProxyProcess) -> f64 {
    let metrics = proxy.metrics().await;
    ["match", "mismatch", "error", "noise"]
        .into_iter()
        .map(|result| common::metric(&metrics, "preagg_shadow_total", &[("result", result)]))
        .sum()
}

/// Asks through the shadowing proxy until one more comparison than `before` has ended; the client
/// always gets the direct rows.
async fn one_more_comparison(server: &ChServer, proxy: &ProxyProcess, sql: &str, before: f64, what: &str) {
    let started = std::time::Instant::now();
    loop {
        let direct = run(&server.url(), sql).await;
        let through = run(&proxy.url(), sql).await;
        assert_same(&direct, &through, what);
        tokio::time::sleep(Duration::from_millis(200)).await;
        if comparisons_ended(proxy).await > before {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{what}: no comparison ended");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_during_changes_counts_no_mismatch() {
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let server = seeded_server(60_000, 11);
    let proxy = proxy_for(&server, &[("mode", "shadow")]);
    one_more_comparison(&server, &proxy, &sql, 0.0, "before any change").await;
    let (distinct_id, person_id, variant) = first_exposed(&server).await;
    let other = if variant == "control" { "test" } else { "control" };
    let (merged_distinct_id, _) = nth_exposed(&server, 5).await;
    let changes = [
        exposure("2026-10-04 10:00:00.000001", 9003, "late-9003", "test"),
        exposure("2026-10-02 06:00:00.000000", 0, &distinct_id, other)
            .replace("toUUID('00000000-0000-4000-8000-000000000000')", &format!("toUUID('{person_id}')")),
        override_row(&merged_distinct_id, &person_id, false, 1000),
        override_row(&merged_distinct_id, &person_id, true, 1001),
        format!("ALTER TABLE events DELETE WHERE person_id = toUUID('{person_id}') SETTINGS mutations_sync = 2"),
    ];
    for (i, change) in changes.iter().enumerate() {
        let before = comparisons_ended(&proxy).await;
        exec(&server.url(), change);
        one_more_comparison(&server, &proxy, &sql, before, &format!("change {i}")).await;
    }
    assert_eq!(shadowed(&proxy, "mismatch").await, 0.0, "no comparison during the changes found a difference");
    assert!(shadowed(&proxy, "match").await >= 5.0, "the late events and the merges were compared and matched");
}

/// Runs `sql` in `database` (the `X-ClickHouse-Database` header).
async fn run_in(base: &str, database: &str, sql: &str) -> Answer {
    let response = common::client()
        .post(format!("{base}/?default_format=TSVWithNamesAndTypes"))
        .header("X-ClickHouse-Database", database)
        .body(sql.to_string())
        .send()
        .await
        .expect("query");
    common::equivalence::answer(response).await.unwrap()
}

/// Until `sql`, run in `database` through the proxy, is rewritten; then direct and proxied rows
/// must be equal.
async fn rewritten_in(server: &ChServer, proxy: &ProxyProcess, database: &str, sql: &str, what: &str) {
    let url = proxy.url();
    let answer = common::equivalence::until_rewritten_by(Duration::from_secs(60), || run_in(&url, database, sql)).await;
    assert_same(&run_in(&server.url(), database, sql).await, &answer, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_of_a_table_under_the_source_is_seen() {
    // PostHog's `events` is a Distributed table over `sharded_events`, where deletions run. Here
    // a Merge table stands for it (chdb has no cluster): the rule names both in mutation_tables.
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let server = seeded_server(60_000, 7);
    exec(
        &server.url(),
        "CREATE DATABASE layered;\n\
         CREATE TABLE layered.sharded_events AS default.events ENGINE = MergeTree \
         ORDER BY (team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(uuid));\n\
         INSERT INTO layered.sharded_events SELECT * FROM default.events;\n\
         CREATE TABLE layered.events AS layered.sharded_events ENGINE = Merge('layered', '^sharded_events$');\n\
         CREATE TABLE layered.person_distinct_id_overrides AS default.person_distinct_id_overrides;\n\
         INSERT INTO layered.person_distinct_id_overrides SELECT * FROM default.person_distinct_id_overrides",
    );
    let proxy = proxy_for(&server, &[]);
    rewritten_in(&server, &proxy, "layered", &sql, "over the Merge table").await;
    let (_, person_id, _) = first_exposed(&server).await;
    exec(
        &server.url(),
        &format!(
            "ALTER TABLE layered.sharded_events DELETE WHERE person_id = toUUID('{person_id}') \
             SETTINGS mutations_sync = 2"
        ),
    );
    let direct = run_in(&server.url(), "layered", &sql).await;
    let through = run_in(&proxy.url(), "layered", &sql).await;
    assert_same(&direct, &through, "right after a deletion in the table under the source");
    assert_eq!(through.preagg, "passthrough reason=rewritten_query_failed");
    rewritten_in(&server, &proxy, "layered", &sql, "rebuilt after the deletion").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_named_with_its_database_is_guarded_in_that_database() {
    // The query runs in another database and names `default.events`: the guard must look there.
    let sql = forms(TEAM, FLAG)[0].query(LO, HI).replace("FROM events", "FROM default.events");
    let server = seeded_server(60_000, 7);
    exec(
        &server.url(),
        "CREATE DATABASE elsewhere;\n\
         CREATE TABLE elsewhere.person_distinct_id_overrides AS default.person_distinct_id_overrides;\n\
         INSERT INTO elsewhere.person_distinct_id_overrides SELECT * FROM default.person_distinct_id_overrides",
    );
    let proxy = proxy_for(&server, &[]);
    rewritten_in(&server, &proxy, "elsewhere", &sql, "qualified source").await;
    let (_, person_id, _) = first_exposed(&server).await;
    exec(
        &server.url(),
        &format!(
            "ALTER TABLE default.events DELETE WHERE person_id = toUUID('{person_id}') SETTINGS mutations_sync = 2"
        ),
    );
    let direct = run_in(&server.url(), "elsewhere", &sql).await;
    let through = run_in(&proxy.url(), "elsewhere", &sql).await;
    assert_same(&direct, &through, "right after a deletion in the named database");
    assert_eq!(through.preagg, "passthrough reason=rewritten_query_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_asks_for_the_query_cache_is_not_rewritten() {
    let sql =
        forms(TEAM, FLAG)[0].query(LO, HI).replace("SETTINGS readonly=2,", "SETTINGS use_query_cache=1, readonly=2,");
    assert!(sql.contains("use_query_cache=1"));
    let server = seeded_server(20_000, 7);
    let proxy = proxy_for(&server, &[]);
    let through = run(&proxy.url(), &sql).await;
    assert_same(&run(&server.url(), &sql).await, &through, "query cache");
    assert_eq!(through.preagg, "passthrough reason=query_cache");
}

/// One change to the source after a build, as generated.
#[derive(Debug, Clone)]
enum Change {
    /// An exposure at `day` days and `hour` hours after LO, `delta` microseconds off that edge, of
    /// a new person (`None`) or of the `n`th exposed one, in `variant`.
    Late { day: i64, hour: i64, delta: i64, existing: Option<u8>, variant: &'static str },
    /// All events of the `n`th exposed person deleted.
    Delete(u8),
    /// The distinct id of the `n`th exposed event's person merged into the `m`th's person.
    Merge(u8, u8),
    /// The override of the `n`th exposed event's distinct id deleted (a merge undone).
    Unmerge(u8),
}

fn change() -> impl proptest::strategy::Strategy<Value = Change> {
    use proptest::prelude::*;
    let variant = prop_oneof![Just("control"), Just("test")];
    prop_oneof![
        4 => (0..12i64, 0..24i64, -1..=1i64, proptest::option::of(0..20u8), variant).prop_map(
            |(day, hour, delta, existing, variant)| Change::Late { day, hour, delta, existing, variant }
        ),
        1 => (0..20u8).prop_map(Change::Delete),
        2 => (0..20u8, 0..20u8).prop_map(|(n, m)| Change::Merge(n, m)),
        1 => (0..20u8).prop_map(Change::Unmerge),
    ]
}

/// The `n`th exposed entity of the range (by first exposure): distinct id and person id.
async fn nth_exposed(server: &ChServer, n: u8) -> (String, String) {
    let answer = run(
        &server.url(),
        &format!(
            "SELECT distinct_id, toString(person_id) FROM events WHERE team_id = {TEAM} \
             AND event = '$feature_flag_called' AND JSONExtractString(properties, '$feature_flag') = '{FLAG}' \
             AND timestamp >= '{LO}' AND timestamp < '{HI}' ORDER BY timestamp, uuid LIMIT 1 OFFSET {n}"
        ),
    )
    .await;
    let fields: Vec<String> = answer.lines[2].split('\t').map(str::to_string).collect();
    (fields[0].clone(), fields[1].clone())
}

/// The statement that makes `change`; `serial` keeps new persons apart.
async fn statement(server: &ChServer, change: &Change, serial: u32) -> String {
    match change {
        Change::Late { day, hour, delta, existing, variant } => {
            let edge = common::equivalence::shift(LO, (day * 24 + hour) * 3_600_000_000);
            let at = common::equivalence::shift(&edge, *delta);
            match existing {
                None => exposure(&at, 10_000 + serial, &format!("late-{serial}"), variant),
                Some(n) => {
                    let (distinct_id, person_id) = nth_exposed(server, *n).await;
                    exposure(&at, 0, &distinct_id, variant)
                        .replace("toUUID('00000000-0000-4000-8000-000000000000')", &format!("toUUID('{person_id}')"))
                }
            }
        }
        Change::Delete(n) => {
            let (_, person_id) = nth_exposed(server, *n).await;
            format!("ALTER TABLE events DELETE WHERE person_id = toUUID('{person_id}') SETTINGS mutations_sync = 2")
        }
        Change::Merge(n, m) => {
            let (distinct_id, _) = nth_exposed(server, *n).await;
            let (_, person_id) = nth_exposed(server, *m).await;
            override_row(&distinct_id, &person_id, false, 1000 + serial)
        }
        Change::Unmerge(n) => {
            let (distinct_id, person_id) = nth_exposed(server, *n).await;
            override_row(&distinct_id, &person_id, true, 1000 + serial)
        }
    }
}

#[test]
fn generated_sequences_of_late_events_merges_and_deletions_stay_exact() {
    use proptest::test_runner::{Config, TestRunner, contextualize_config};
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sql = forms(TEAM, FLAG)[0].query(LO, HI);
    let (server, proxy) = runtime.block_on(built(&sql));
    let serial = std::sync::atomic::AtomicU32::new(0);
    let mut runner = TestRunner::new(contextualize_config(Config { cases: 6, ..Config::default() }));
    let result = runner.run(&proptest::collection::vec(change(), 1..4), |changes| {
        runtime.block_on(async {
            for change in &changes {
                let n = serial.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                exec(&server.url(), &statement(&server, change, n).await);
            }
            // At once: rewritten and exact after late events and merges, the original after a
            // deletion.
            let direct = run(&server.url(), &sql).await;
            let through = run(&proxy.url(), &sql).await;
            assert_same(&direct, &through, &format!("right after {changes:?}"));
            // And once the windows are built again.
            let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
            assert_same(&direct, &warm, &format!("rewritten after {changes:?}"));
        });
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
