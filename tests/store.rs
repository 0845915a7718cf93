//! The job store on both backends: SQLite (embedded default) and PostgreSQL (shared by replicas).

mod common;

use std::time::Duration;

use preagg_proxy::preagg::store::{Built, JobFilter, JobKey, MismatchSample, ShapeRecord, Status, Store};
use preagg_proxy::sql::window::Window;

const HOUR: i64 = 3_600_000_000;

async fn stores() -> Vec<(&'static str, Store, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&format!("sqlite://{}", dir.path().join("jobs.db").display()), Duration::from_secs(5))
        .await
        .expect("sqlite store");
    let postgres = Store::connect(&common::postgres_url(), Duration::from_secs(5))
        .await
        .expect("PostgreSQL must be running (scripts/ensure-postgres.sh)");
    vec![("sqlite", sqlite, dir), ("postgres", postgres, tempfile::tempdir().unwrap())]
}

fn unique_hash() -> String {
    format!("test-{}", uuid::Uuid::new_v4())
}

#[tokio::test]
async fn claims_are_exclusive_and_expired_leases_are_taken_over() {
    for (name, store, _dir) in stores().await {
        let hash = unique_hash();
        let w = Window { start: 0, end: HOUR };
        let now = 10 * HOUR;
        let claim = |owner: &'static str, at: i64| {
            let store = store.clone();
            let hash = hash.clone();
            async move {
                let key = JobKey { team_id: 7, rule: "r", query_hash: &hash };
                store.claim(&key, &[w], owner, at, Duration::from_secs(60)).await.unwrap().pop().map(|(_, id)| id)
            }
        };
        let first = claim("a", now).await;
        assert!(first.is_some(), "{name}: first claim");
        assert_eq!(claim("b", now).await, None, "{name}: held");
        // Two minutes later the lease has expired: b takes the window over with a new job.
        let later = now + 120_000_000;
        let second = claim("b", later).await;
        assert!(second.is_some() && second != first, "{name}: takeover");
        // The dead owner can no longer mark its job ready.
        let built = |id: &Option<String>, rows| vec![Built { id: id.clone().unwrap(), rows, expires_at: later + HOUR }];
        assert_eq!(store.mark_ready(&built(&first, 1), "a", later, later).await.unwrap(), 0, "{name}");
        assert_eq!(store.mark_ready(&built(&second, 42), "b", later, later).await.unwrap(), 1, "{name}");
        let jobs = store.lookup(7, &hash, later, later - HOUR).await.unwrap();
        let statuses: Vec<(Status, Option<i64>)> = jobs.iter().map(|j| (j.status, j.rows_written)).collect();
        assert!(statuses.contains(&(Status::Ready, Some(42))), "{name}: {statuses:?}");
        assert!(jobs.iter().any(|j| j.status == Status::Failed && j.error.as_deref().unwrap_or("").contains("lease")));
    }
}

#[tokio::test]
async fn leases_are_renewed_until_taken_over_or_released() {
    const SECOND: i64 = 1_000_000;
    for (name, store, _dir) in stores().await {
        let hash = unique_hash();
        // Owners of this test only: the PostgreSQL database is shared with the other tests.
        let [a, b, c] = ["a", "b", "c"].map(|owner| format!("{owner}-{hash}"));
        let window = |hour: i64| Window { start: hour * HOUR, end: (hour + 1) * HOUR };
        let (mine, theirs, forgotten) = (window(0), window(1), window(2));
        let now = 10 * HOUR;
        let claim = |owner: &str, window: Window, at: i64| {
            let (store, hash, owner) = (store.clone(), hash.clone(), owner.to_string());
            async move {
                let key = JobKey { team_id: 7, rule: "r", query_hash: &hash };
                store.claim(&key, &[window], &owner, at, Duration::from_secs(60)).await.unwrap().pop().map(|(_, id)| id)
            }
        };
        let job = |id: String| {
            let (store, hash) = (store.clone(), hash.clone());
            async move {
                let filter = JobFilter { query_hash: Some(hash), limit: 10, ..JobFilter::default() };
                store.list(&filter).await.unwrap().into_iter().find(|job| job.id == id).unwrap()
            }
        };
        let a_mine = claim(&a, mine, now).await.unwrap();
        let a_forgotten = claim(&a, forgotten, now).await.unwrap();
        let c_theirs = claim(&c, theirs, now + 80 * SECOND).await.unwrap();
        // a's renewal comes late, after its lease ran out, but before anyone took the window
        // over: the build goes on and nobody builds the window a second time.
        store.renew(std::slice::from_ref(&a_mine), &a, now + 190 * SECOND).await.unwrap();
        assert_eq!(claim(&b, mine, now + 90 * SECOND).await, None, "{name}: a renewed lease holds");
        // a stops: its leases end now (one already over stays over), and a renewal racing with
        // the release (its clock read before the release) does not revive them.
        assert_eq!(store.release(&a, now + 100 * SECOND).await.unwrap(), 2, "{name}: a's pending jobs");
        let given_up = job(a_forgotten.clone()).await;
        assert_eq!((given_up.lease_owner, given_up.lease_expires_at), (None, Some(now + 60 * SECOND)), "{name}");
        store.renew(&[a_mine, a_forgotten], &a, now + 300 * SECOND).await.unwrap();
        assert!(claim(&b, mine, now + 101 * SECOND).await.is_some(), "{name}: taken over at once");
        assert!(claim(&b, forgotten, now + 101 * SECOND).await.is_some(), "{name}: taken over at once");
        assert_eq!(claim(&b, theirs, now + 101 * SECOND).await, None, "{name}: c's lease is untouched");
        assert_eq!(store.release(&a, now + 102 * SECOND).await.unwrap(), 0, "{name}");
        // c's lease runs out and b takes its window over: c's renewal no longer touches its job.
        assert!(claim(&b, theirs, now + 150 * SECOND).await.is_some(), "{name}: taken over after the lease");
        store.renew(std::slice::from_ref(&c_theirs), &c, now + 400 * SECOND).await.unwrap();
        let taken_over = job(c_theirs).await;
        assert_eq!(
            (taken_over.status, taken_over.lease_expires_at),
            (Status::Failed, Some(now + 140 * SECOND)),
            "{name}"
        );
    }
}

#[tokio::test]
async fn lookups_skip_expired_jobs_and_old_failures() {
    for (name, store, _dir) in stores().await {
        let hash = unique_hash();
        let now = 100 * HOUR;
        let key = JobKey { team_id: 8, rule: "r", query_hash: &hash };
        let windows: Vec<Window> = (0..3).map(|i| Window { start: i * HOUR, end: (i + 1) * HOUR }).collect();
        let ids: Vec<String> = store
            .claim(&key, &windows, "o", now, Duration::from_secs(60))
            .await
            .unwrap()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(ids.len(), 3, "{name}");
        let built = vec![
            Built { id: ids[0].clone(), rows: 1, expires_at: now + 10 * HOUR },
            Built { id: ids[1].clone(), rows: 1, expires_at: now + HOUR / 2 },
        ];
        assert_eq!(store.mark_ready(&built, "o", now, now - 1).await.unwrap(), 2, "{name}");
        store.mark_failed(&ids[2..], "o", "boom").await.unwrap();
        let served = store.lookup(8, &hash, now + HOUR, now - HOUR).await.unwrap();
        let ready: Vec<&str> = served.iter().filter(|j| j.status == Status::Ready).map(|j| j.id.as_str()).collect();
        assert_eq!(ready, vec![ids[0].as_str()], "{name}: the job expiring within the buffer is not served");
        let seen = served.iter().find(|j| j.status == Status::Ready).and_then(|j| j.source_seen_at);
        assert_eq!(seen, Some(now - 1), "{name}: when the build started reading, by ClickHouse's clock, is kept");
        assert!(served.iter().any(|j| j.status == Status::Failed), "{name}: recent failure reported");
        let later = store.lookup(8, &hash, now + HOUR, now + HOUR).await.unwrap();
        assert!(!later.iter().any(|j| j.status == Status::Failed), "{name}: old failure forgotten");
        // Invalidation expires ready jobs now.
        assert_eq!(store.invalidate(8, Some(&hash), None, now).await.unwrap(), 2, "{name}");
        let after = store.lookup(8, &hash, now, now).await.unwrap();
        assert!(!after.iter().any(|j| j.status == Status::Ready), "{name}");
        let listed =
            store.list(&JobFilter { team_id: Some(8), query_hash: Some(hash.clone()), limit: 10 }).await.unwrap();
        assert_eq!(listed.len(), 3, "{name}");
    }
}

#[tokio::test]
async fn shapes_and_mismatch_samples_round_trip() {
    for (name, store, _dir) in stores().await {
        let hash = unique_hash();
        let record = ShapeRecord {
            names: vec!["a".into(), "b".into()],
            types: vec!["UUID".into(), "DateTime64(6, 'UTC')".into()],
        };
        store.put_shape(&hash, "r", "SELECT ...", &record, 1).await.unwrap();
        store.put_shape(&hash, "r", "other", &ShapeRecord { names: vec![], types: vec![] }, 2).await.unwrap();
        assert_eq!(store.shape(&hash).await.unwrap(), Some(record), "{name}: first writer wins");
        for i in 0..5 {
            let sample = MismatchSample {
                id: uuid::Uuid::new_v4().to_string(),
                created_at: 1_000_000_000_000_000 + i,
                rule: format!("rule-{name}"),
                query_hashes: vec![hash.clone()],
                job_ids: vec!["j".into()],
                original_rows: 3,
                rewritten_rows: 2,
                first_difference: "row 0 differs".into(),
                original_query_id: "o".into(),
                rewritten_query_id: "r".into(),
                original_ms: 10,
                rewritten_ms: 1,
            };
            store.add_sample(&sample, 3).await.unwrap();
        }
        let samples = store.samples(10).await.unwrap();
        assert!(samples.len() <= 3, "{name}: capped at 3, got {}", samples.len());
    }
}
