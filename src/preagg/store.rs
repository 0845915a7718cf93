//! The job store: which windows of which (team, query hash) are built, being built, or failed.
//!
//! One code path for SQLite (the embedded default) and PostgreSQL (several proxies sharing jobs),
//! through sqlx's `Any` driver. Instants are BIGINT microseconds; statements use `$N`
//! placeholders, which both backends accept. The partial unique index on pending jobs is the
//! lock between proxies: a window is claimed by inserting its pending row.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::sql::window::Window;

/// Store failures; every one means pass-through for the query at hand.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or a statement failed.
    #[error("job store: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("job store migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value is not what the proxy wrote.
    #[error("job store: corrupt value in {0}")]
    Corrupt(&'static str),
}

/// Status of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Claimed; a build is (or was) running.
    Pending,
    /// Built and confirmed.
    Ready,
    /// The build failed (or its owner died, or it was invalidated).
    Failed,
}

impl Status {
    fn parse(s: &str) -> Result<Status, StoreError> {
        match s {
            "pending" => Ok(Status::Pending),
            "ready" => Ok(Status::Ready),
            "failed" => Ok(Status::Failed),
            _ => Err(StoreError::Corrupt("preagg_jobs.status")),
        }
    }
}

/// A job row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Job {
    /// Job id (uuid); the preaggregated rows carry it.
    pub id: String,
    /// Team.
    pub team_id: i64,
    /// Rule name.
    pub rule: String,
    /// Query hash.
    pub query_hash: String,
    /// Window covered.
    pub window: Window,
    /// Status.
    pub status: Status,
    /// Owner of the lease while pending.
    pub lease_owner: Option<String>,
    /// Lease expiry (microseconds).
    pub lease_expires_at: Option<i64>,
    /// Build attempts recorded on this row.
    pub attempts: i64,
    /// When the row was created.
    pub created_at: i64,
    /// When the build was confirmed.
    pub computed_at: Option<i64>,
    /// When the job stops being served (rows expire in ClickHouse).
    pub expires_at: Option<i64>,
    /// Rows the build wrote (confirmed).
    pub rows_written: Option<i64>,
    /// When the build started reading its source, by ClickHouse's clock: rows ingested and
    /// mutations created since are what it did not see. `None` for jobs built before this was
    /// recorded.
    pub source_seen_at: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The columns every job SELECT reads, in [`job_from_row`]'s terms.
macro_rules! job_columns {
    () => {
        "id, team_id, rule, query_hash, window_start, window_end, status, lease_owner, lease_expires_at, \
         attempts, created_at, computed_at, expires_at, rows_written, error, source_seen_at"
    };
}

fn job_from_row(row: &AnyRow) -> Result<Job, StoreError> {
    Ok(Job {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        rule: row.try_get("rule")?,
        query_hash: row.try_get("query_hash")?,
        window: Window { start: row.try_get("window_start")?, end: row.try_get("window_end")? },
        status: Status::parse(&row.try_get::<String, _>("status")?)?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        attempts: row.try_get("attempts")?,
        created_at: row.try_get("created_at")?,
        computed_at: row.try_get("computed_at")?,
        expires_at: row.try_get("expires_at")?,
        rows_written: row.try_get("rows_written")?,
        error: row.try_get("error")?,
        source_seen_at: row.try_get("source_seen_at")?,
    })
}

/// What identifies the jobs of one computation: team, rule and query hash.
#[derive(Debug, Clone, Copy)]
pub struct JobKey<'a> {
    /// Team.
    pub team_id: i64,
    /// Rule name.
    pub rule: &'a str,
    /// Query hash.
    pub query_hash: &'a str,
}

/// A confirmed build of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// Job id.
    pub id: String,
    /// Rows it wrote (confirmed by a count).
    pub rows: u64,
    /// When it expires.
    pub expires_at: i64,
}

/// Claims one window inside a transaction (see [`Store::claim`]).
async fn claim_window(
    conn: &mut sqlx::AnyConnection,
    key: &JobKey<'_>,
    window: Window,
    owner: &str,
    now: i64,
    lease_until: i64,
) -> Result<Option<String>, StoreError> {
    let JobKey { team_id, rule, query_hash } = *key;
    for _ in 0..2 {
        let id = uuid::Uuid::new_v4().to_string();
        let inserted = sqlx::query(
            "INSERT INTO preagg_jobs (id, team_id, rule, query_hash, window_start, window_end, status, \
             lease_owner, lease_expires_at, attempts, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, 1, $9) ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(team_id)
        .bind(rule)
        .bind(query_hash)
        .bind(window.start)
        .bind(window.end)
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(Some(id));
        }
        let taken_over = sqlx::query(
            "UPDATE preagg_jobs SET status = 'failed', error = 'lease expired: owner stopped before finishing' \
             WHERE team_id = $1 AND query_hash = $2 AND window_start = $3 AND window_end = $4 \
             AND status = 'pending' AND lease_expires_at < $5",
        )
        .bind(team_id)
        .bind(query_hash)
        .bind(window.start)
        .bind(window.end)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if taken_over == 0 {
            return Ok(None);
        }
    }
    Ok(None)
}

/// What a shape record holds: the stored columns' names and ClickHouse types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeRecord {
    /// Stored column names, in order.
    pub names: Vec<String>,
    /// Their types.
    pub types: Vec<String>,
}

/// A shadow-mode mismatch sample.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MismatchSample {
    /// Sample id.
    pub id: String,
    /// When it was recorded (microseconds).
    pub created_at: i64,
    /// Rule of the rewrite.
    pub rule: String,
    /// Query hashes of the rewritten occurrences.
    pub query_hashes: Vec<String>,
    /// Jobs the rewrite read.
    pub job_ids: Vec<String>,
    /// Rows of the original answer.
    pub original_rows: i64,
    /// Rows of the rewritten answer.
    pub rewritten_rows: i64,
    /// The first differing rows, as text.
    pub first_difference: String,
    /// Query id of the original run.
    pub original_query_id: String,
    /// Query id of the rewritten run.
    pub rewritten_query_id: String,
    /// Time of the original (ms).
    pub original_ms: i64,
    /// Time of the rewrite (ms).
    pub rewritten_ms: i64,
}

/// Filter for listing jobs.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this team.
    pub team_id: Option<i64>,
    /// Only this query hash.
    pub query_hash: Option<String>,
    /// Most rows returned.
    pub limit: i64,
}

/// The job store.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://...`) and runs the migrations. A SQLite
    /// file is created if missing.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .acquire_timeout(timeout)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                        // With WAL, NORMAL never corrupts; a power cut may lose the last marks,
                        // which only means those windows are built again.
                        sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        // A store migrated by a newer proxy (replicas upgraded one by one, or a rollback) is still
        // used: its migrations only add.
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        Ok(Store { pool })
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Jobs of (team, hash) overlapping `range` that matter for planning: ready ones that are
    /// served until after `serve_until`, pending ones, and failures since `failed_since`.
    pub async fn lookup(
        &self,
        team_id: i64,
        query_hash: &str,
        serve_until: i64,
        failed_since: i64,
    ) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM preagg_jobs WHERE team_id = $1 AND query_hash = $2 AND \
             ((status = 'ready' AND expires_at > $3) OR status = 'pending' OR (status = 'failed' AND created_at > $4)) \
             ORDER BY window_start, window_end"
        ))
        .bind(team_id)
        .bind(query_hash)
        .bind(serve_until)
        .bind(failed_since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Claims `windows` for a build, in one transaction, by inserting their pending rows with a
    /// lease. A window whose pending row has an expired lease (its owner died) is taken over: that
    /// row is marked failed and the window claimed anew. Returns the windows claimed, with their
    /// new job ids; windows someone else holds are left out.
    pub async fn claim(
        &self,
        key: &JobKey<'_>,
        windows: &[Window],
        owner: &str,
        now: i64,
        lease: Duration,
    ) -> Result<Vec<(Window, String)>, StoreError> {
        let lease_until = now + lease.as_micros() as i64;
        let mut tx = self.pool.begin().await?;
        let mut claimed = Vec::new();
        for &window in windows {
            if let Some(id) = claim_window(&mut tx, key, window, owner, now, lease_until).await? {
                claimed.push((window, id));
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Extends the leases of `owner`'s pending jobs to `until`. A lease that expired while nobody
    /// took its window over is extended too (the build goes on; nobody builds the window twice).
    /// A job taken over is failed, and a released one has no owner: neither is touched.
    pub async fn renew(&self, ids: &[String], owner: &str, until: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query(
                "UPDATE preagg_jobs SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 AND status = 'pending'",
            )
            .bind(until)
            .bind(id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ends at `now` the leases of `owner`'s pending jobs (one already over stays over) and takes
    /// `owner` off them, so that their windows are taken over at once (by another proxy, or by
    /// this one restarted) instead of after the lease, and no renewal or build still running
    /// under `owner` touches them again. Returns how many jobs it gave up.
    pub async fn release(&self, owner: &str, now: i64) -> Result<u64, StoreError> {
        let released = sqlx::query(
            "UPDATE preagg_jobs SET lease_owner = NULL, \
             lease_expires_at = CASE WHEN lease_expires_at > $1 THEN $1 ELSE lease_expires_at END \
             WHERE lease_owner = $2 AND status = 'pending'",
        )
        .bind(now)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(released)
    }

    /// Marks confirmed builds ready, in one transaction. Returns how many were still ours (a job
    /// taken over by another proxy is not marked).
    pub async fn mark_ready(
        &self,
        builds: &[Built],
        owner: &str,
        computed_at: i64,
        source_seen_at: i64,
    ) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut marked = 0;
        for built in builds {
            let changed = sqlx::query(
                "UPDATE preagg_jobs SET status = 'ready', rows_written = $1, computed_at = $2, expires_at = $3, \
                 lease_owner = NULL, lease_expires_at = NULL, source_seen_at = $6 \
                 WHERE id = $4 AND lease_owner = $5 AND status = 'pending'",
            )
            .bind(built.rows as i64)
            .bind(computed_at)
            .bind(built.expires_at)
            .bind(&built.id)
            .bind(owner)
            .bind(source_seen_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            marked += changed as usize;
        }
        tx.commit().await?;
        Ok(marked)
    }

    /// Marks jobs failed with an error.
    pub async fn mark_failed(&self, ids: &[String], owner: &str, error: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query(
                "UPDATE preagg_jobs SET status = 'failed', error = $1, lease_owner = NULL, lease_expires_at = NULL \
                 WHERE id = $2 AND lease_owner = $3 AND status = 'pending'",
            )
            .bind(error)
            .bind(id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Expires ready jobs of a team (optionally one hash, optionally windows overlapping a range)
    /// now, so they are rebuilt on the next query. Returns how many were invalidated.
    pub async fn invalidate(
        &self,
        team_id: i64,
        query_hash: Option<&str>,
        range: Option<(i64, i64)>,
        now: i64,
    ) -> Result<u64, StoreError> {
        let (start, end) = range.unwrap_or((i64::MIN, i64::MAX));
        let changed = sqlx::query(
            "UPDATE preagg_jobs SET expires_at = $1, error = 'invalidated' WHERE team_id = $2 \
             AND ($3 = '' OR query_hash = $3) AND status = 'ready' AND window_end > $4 AND window_start < $5 \
             AND expires_at > $1",
        )
        .bind(now)
        .bind(team_id)
        .bind(query_hash.unwrap_or(""))
        .bind(start)
        .bind(end)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed)
    }

    /// Expires the given jobs now (their rows are not all in ClickHouse), so they are rebuilt.
    pub async fn expire_jobs(&self, ids: &[String], now: i64, why: &str) -> Result<(), StoreError> {
        for id in ids {
            sqlx::query("UPDATE preagg_jobs SET expires_at = $1, error = $2 WHERE id = $3 AND status = 'ready'")
                .bind(now)
                .bind(why)
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Jobs, newest windows first.
    pub async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM preagg_jobs WHERE ($1 = 0 OR team_id = $2) AND ($3 = '' OR query_hash = $3) \
             ORDER BY query_hash, window_start DESC, created_at DESC LIMIT $4"
        ))
        .bind(i64::from(filter.team_id.is_some()))
        .bind(filter.team_id.unwrap_or(0))
        .bind(filter.query_hash.as_deref().unwrap_or(""))
        .bind(filter.limit.max(1))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Records a mismatch sample and keeps only the newest `cap`.
    pub async fn add_sample(&self, sample: &MismatchSample, cap: usize) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO preagg_shadow_samples (id, created_at, rule, query_hashes, job_ids, original_rows, \
             rewritten_rows, first_difference, original_query_id, rewritten_query_id, original_ms, rewritten_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&sample.id)
        .bind(sample.created_at)
        .bind(&sample.rule)
        .bind(serde_json::to_string(&sample.query_hashes).unwrap_or_default())
        .bind(serde_json::to_string(&sample.job_ids).unwrap_or_default())
        .bind(sample.original_rows)
        .bind(sample.rewritten_rows)
        .bind(&sample.first_difference)
        .bind(&sample.original_query_id)
        .bind(&sample.rewritten_query_id)
        .bind(sample.original_ms)
        .bind(sample.rewritten_ms)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "DELETE FROM preagg_shadow_samples WHERE id NOT IN \
             (SELECT id FROM preagg_shadow_samples ORDER BY created_at DESC LIMIT $1)",
        )
        .bind(cap as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest mismatch samples.
    pub async fn samples(&self, limit: i64) -> Result<Vec<MismatchSample>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at, rule, query_hashes, job_ids, original_rows, rewritten_rows, first_difference, \
             original_query_id, rewritten_query_id, original_ms, rewritten_ms FROM preagg_shadow_samples \
             ORDER BY created_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let list = |text: String| {
            serde_json::from_str::<Vec<String>>(&text).map_err(|_| StoreError::Corrupt("preagg_shadow_samples"))
        };
        rows.iter()
            .map(|row| {
                Ok(MismatchSample {
                    id: row.try_get("id")?,
                    created_at: row.try_get("created_at")?,
                    rule: row.try_get("rule")?,
                    query_hashes: list(row.try_get("query_hashes")?)?,
                    job_ids: list(row.try_get("job_ids")?)?,
                    original_rows: row.try_get("original_rows")?,
                    rewritten_rows: row.try_get("rewritten_rows")?,
                    first_difference: row.try_get("first_difference")?,
                    original_query_id: row.try_get("original_query_id")?,
                    rewritten_query_id: row.try_get("rewritten_query_id")?,
                    original_ms: row.try_get("original_ms")?,
                    rewritten_ms: row.try_get("rewritten_ms")?,
                })
            })
            .collect()
    }

    /// The shape record of a hash, if known.
    pub async fn shape(&self, query_hash: &str) -> Result<Option<ShapeRecord>, StoreError> {
        let row = sqlx::query("SELECT column_names, column_types FROM preagg_shapes WHERE query_hash = $1")
            .bind(query_hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let names: String = row.try_get("column_names")?;
        let types: String = row.try_get("column_types")?;
        let names = serde_json::from_str(&names).map_err(|_| StoreError::Corrupt("preagg_shapes.column_names"))?;
        let types = serde_json::from_str(&types).map_err(|_| StoreError::Corrupt("preagg_shapes.column_types"))?;
        Ok(Some(ShapeRecord { names, types }))
    }

    /// Records a shape (first writer wins).
    pub async fn put_shape(
        &self,
        query_hash: &str,
        rule: &str,
        shape: &str,
        record: &ShapeRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO preagg_shapes (query_hash, rule, shape, column_names, column_types, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(query_hash)
        .bind(rule)
        .bind(shape)
        .bind(serde_json::to_string(&record.names).unwrap_or_default())
        .bind(serde_json::to_string(&record.types).unwrap_or_default())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
