//! Builds: windows filled once however many queries ask, queued behind a bounded number of
//! slots, started after the answer that needed them, claimed with renewed leases, and warmed
//! before the first viewer asks.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::task::AbortOnDropHandle;

use super::engine::{Engine, micros};
use super::now_micros;
use super::statements::StatementContext;
use super::store::{self, Built, JobKey, ShapeRecord};
use crate::clickhouse_http::context::QueryContext;
use crate::metrics as m;
use crate::outcome::Reason;
use crate::sql::Found;
use crate::sql::rewrite::{self, BuildWindow};
use crate::sql::window::Window;

/// Builds to start once the query that needed them is done with: a background build started at
/// once would compete with that very query for the same CPUs. They start when this is dropped:
/// once the answer has been sent, or once the client has left without it (the next viewer still
/// finds the windows built).
#[derive(Default)]
pub struct Deferred {
    runtime: Option<tokio::runtime::Handle>,
    builds: Vec<BuildTask>,
}

/// A build waiting to be started.
pub(super) type BuildTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Deferred {
    pub(super) fn push(&mut self, runtime: &tokio::runtime::Handle, build: impl Future<Output = ()> + Send + 'static) {
        self.runtime.get_or_insert_with(|| runtime.clone());
        self.builds.push(Box::pin(build));
    }
}

impl Drop for Deferred {
    /// Starts the builds in the background.
    fn drop(&mut self) {
        if let Some(runtime) = &self.runtime {
            for build in self.builds.drain(..) {
                runtime.spawn(build);
            }
        }
    }
}

/// Errors of a build, recorded on its jobs.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// ClickHouse failed.
    #[error(transparent)]
    ClickHouse(#[from] super::statements::ClickHouseError),
    /// The statement could not be produced.
    #[error("cannot produce the build statement: {0}")]
    Statement(String),
    /// DESCRIBE did not list the stored columns.
    #[error("DESCRIBE returned columns {0:?}, expected the stored columns")]
    Columns(Vec<String>),
    /// A column's type in the body cannot be stored in the rule's type without loss: an identity
    /// column of another type, or a nullable value for a column that is not.
    #[error("column `{column}` is `{found}` in the body, which the rule's stored type cannot hold")]
    StoredType {
        /// The column.
        column: String,
        /// Its type in the source.
        found: String,
    },
}

/// The missing windows of a plan, by what they are waiting for.
#[derive(Debug, Default)]
pub(super) struct Missing {
    /// Nobody holds them: a build can start.
    pub(super) buildable: Vec<Window>,
    /// A build (here or in another proxy) holds them.
    pub(super) building: usize,
    /// Their last build failed recently.
    pub(super) failed: usize,
    /// Buildable, but left alone: `max_queued_builds` builds already wait for a slot.
    pub(super) refused: usize,
}

/// What one in-process build makes: `windows` of a team's query.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct BuildTarget {
    pub(super) team_id: i64,
    pub(super) query_hash: String,
    pub(super) windows: Vec<Window>,
}

/// Key of one in-process build: concurrent identical queries share it. Made once by the query that
/// starts the build; the queue, the build map and the build itself share it, not copies of it.
pub(super) type BuildKey = Arc<BuildTarget>;

/// The key of building `windows` of an occurrence.
pub(super) fn build_key(found: &Found, windows: Vec<Window>) -> BuildKey {
    Arc::new(BuildTarget { team_id: found.occurrence.team_id, query_hash: found.query_hash.clone(), windows })
}

/// Builds waiting for a slot, by key.
pub(super) type BuildQueue = Mutex<HashSet<BuildKey>>;

/// A build's place in the queue, from the moment a query decides to start it until the build gets
/// a slot (or is dropped without one). Taken before the build is started, even when it starts only
/// after the answer (`build = background`): two queries deciding at the same moment cannot both
/// take the last place.
pub(super) struct QueuedBuild {
    queue: Arc<BuildQueue>,
    /// The key, when this place put it in the queue (not when it joined a build already queued).
    key: Option<BuildKey>,
}

impl QueuedBuild {
    /// Takes a place for the build `key`: joins it when it is already queued, else puts it in the
    /// queue unless the queue holds `limit` builds (then `None`: the build must not start).
    pub(super) fn take(queue: &Arc<BuildQueue>, key: &BuildKey, limit: usize) -> Option<QueuedBuild> {
        let place = |key| Some(QueuedBuild { queue: Arc::clone(queue), key });
        let Ok(mut keys) = queue.lock() else { return place(None) };
        if keys.contains(key) {
            return place(None);
        }
        if keys.len() >= limit {
            return None;
        }
        keys.insert(Arc::clone(key));
        m::build_queued(true);
        place(Some(Arc::clone(key)))
    }

    /// Leaves the queue: the build got its slot.
    pub(super) fn leave(self) {}
}

impl Drop for QueuedBuild {
    fn drop(&mut self) {
        if let Some(key) = &self.key
            && let Ok(mut keys) = self.queue.lock()
        {
            keys.remove(key);
            m::build_queued(false);
        }
    }
}

/// Longest a stopping proxy waits for the job store to release its leases: past it, they run out
/// on their own after `lease_duration`.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Engine {
    /// Builds the windows of `key` once, however many queries ask at the same time, holding
    /// `place` in the queue until a slot is free. Returns how many windows this call saw built.
    pub(super) async fn build(
        self: Arc<Self>,
        found: Found,
        text: Arc<str>,
        context: StatementContext,
        key: BuildKey,
        place: QueuedBuild,
    ) -> Result<usize, Arc<BuildError>> {
        let engine = Arc::clone(&self);
        let target = Arc::clone(&key);
        // A caller that joins a build already running drops its init future, and its place with it.
        let result = self
            .builds
            .try_get_with(key, async move { engine.run_build(&found, &text, &context, &target.windows, place).await })
            .await;
        if let Err(error) = &result {
            tracing::warn!(%error, "build failed; queries fall back to the original");
        }
        result
    }

    pub(super) async fn run_build(
        &self,
        found: &Found,
        text: &str,
        context: &StatementContext,
        windows: &[Window],
        place: QueuedBuild,
    ) -> Result<usize, BuildError> {
        let Ok(_slot) = self.build_slots.acquire().await else { return Ok(0) };
        place.leave();
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let occ = &found.occurrence;
        let rule = &found.rule;
        let now = now_micros();
        let key = JobKey { team_id: occ.team_id, rule: &rule.name, query_hash: &found.query_hash };
        let claimed = self.store.claim(&key, windows, &self.owner, now, self.settings().lease).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        if self.stopping.load(Ordering::SeqCst) {
            // Claimed while the proxy stops, perhaps after `stop` released what it found.
            self.release_leases().await;
            return Ok(0);
        }
        self.jobs.invalidate(&(occ.team_id, found.query_hash.clone())).await;
        let ids: Vec<String> = claimed.iter().map(|(_, id)| id.clone()).collect();
        let lease = self.renew_leases(ids.clone());
        m::build_started(&rule.name);
        let started = Instant::now();
        let result = self.fill(found, text, context, &claimed, now).await;
        drop(lease);
        let elapsed = started.elapsed();
        m::build_finished(&rule.name, elapsed, result.as_ref().ok().copied());
        match &result {
            Ok(rows) => tracing::info!(
                rule = %rule.name,
                team_id = occ.team_id,
                query_hash = %found.query_hash,
                windows = claimed.len(),
                rows,
                duration_ms = elapsed.as_millis() as u64,
                "build finished"
            ),
            Err(error) => {
                let message = crate::error::error_chain(error);
                // The table may be gone (dropped, or a new node): create it again before the next
                // build; a build refused while the source is mutated says nothing about the table.
                if rewrite::guard_fired(&message) != Some(rewrite::SOURCE_MUTATED) {
                    self.tables.lock().await.remove(&rule.name);
                }
                if let Err(store_error) = self.store.mark_failed(&ids, &self.owner, &message).await {
                    tracing::warn!(%store_error, "cannot record a failed build");
                }
            }
        }
        self.jobs.invalidate(&(occ.team_id, found.query_hash.clone())).await;
        result.map(|_| claimed.len())
    }

    /// Learns the types if needed, runs the INSERT, confirms what it wrote, marks jobs ready.
    /// Returns the rows written.
    pub(super) async fn fill(
        &self,
        found: &Found,
        text: &str,
        context: &StatementContext,
        claimed: &[(Window, String)],
        now: i64,
    ) -> Result<u64, BuildError> {
        let occ = &found.occurrence;
        self.ensure_table(&found.rule).await?;
        if self.store.shape(&found.query_hash).await?.is_none() {
            let describe = rewrite::describe_statement(text, occ).map_err(|e| BuildError::Statement(e.to_string()))?;
            let described = self.clickhouse.describe(&describe, context).await?;
            let names: Vec<String> = described.iter().map(|(n, _)| n.clone()).collect();
            if names.iter().map(String::as_str).ne(occ.stored_columns()) {
                return Err(BuildError::Columns(names));
            }
            // Identity columns are stored in the rule's type: the source's must be that type, or
            // read time would join on converted values. No column may lose its NULLs.
            for (name, ty) in &described {
                if let Some(column) = found.rule.source.identity_columns.iter().find(|c| &c.name == name)
                    && ty != &column.stored_type
                    && *ty != format!("LowCardinality({})", column.stored_type)
                {
                    return Err(BuildError::StoredType { column: name.clone(), found: ty.clone() });
                }
                let stored_type =
                    found.rule.column(name).map(|c| &c.stored_type).or(found.rule.key(name).map(|k| &k.stored_type));
                if let Some(stored_type) = stored_type
                    && ty.contains("Nullable(")
                    && !stored_type.contains("Nullable(")
                {
                    return Err(BuildError::StoredType { column: name.clone(), found: ty.clone() });
                }
            }
            let types = described.into_iter().map(|(_, t)| t).collect();
            let record = ShapeRecord { names, types };
            self.store.put_shape(&found.query_hash, &found.rule.name, &found.shape, &record, now).await?;
        }
        let builds: Vec<BuildWindow> = claimed
            .iter()
            .map(|(window, id)| {
                let age = Duration::from_micros(u64::try_from(now - window.end).unwrap_or(0));
                BuildWindow {
                    window: *window,
                    job_id: id.clone(),
                    expires_at: now + micros(self.settings().expiry_bands.lifetime(age)),
                }
            })
            .collect();
        let insert = rewrite::insert_statement(text, occ, &builds, &self.target(&found.rule))
            .map_err(|e| BuildError::Statement(e.to_string()))?;
        // ClickHouse's clock just before the INSERT reads: what is ingested or mutated from here on,
        // the build may not see.
        let source_seen_at = self.clickhouse.now_micros().await?;
        self.clickhouse.insert(&insert, context).await?;
        let ids: Vec<String> = builds.iter().map(|b| b.job_id.clone()).collect();
        let counts = self.clickhouse.count_by_job(&found.rule, occ.team_id, &ids).await?;
        let computed_at = now_micros();
        let built: Vec<Built> = builds
            .iter()
            .map(|b| Built {
                id: b.job_id.clone(),
                rows: counts.get(&b.job_id).copied().unwrap_or(0),
                expires_at: b.expires_at,
            })
            .collect();
        let marked = self.store.mark_ready(&built, &self.owner, computed_at, source_seen_at).await?;
        if marked < built.len() {
            tracing::warn!(taken_over = built.len() - marked, "jobs were taken over before they were marked ready");
        }
        let total = built.iter().map(|b| b.rows).sum();
        Ok(total)
    }

    /// Renews the leases of `ids` until the returned handle is dropped (the build is over, or was
    /// cancelled with the runtime).
    pub(super) fn renew_leases(&self, ids: Vec<String>) -> AbortOnDropHandle<()> {
        let store = self.store.clone();
        let owner = self.owner.clone();
        let lease = self.settings().lease;
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(error) = store.renew(&ids, &owner, now_micros() + micros(lease)).await {
                    tracing::warn!(%error, "cannot renew build leases");
                }
            }
        }))
    }

    /// Builds every sealed, missing window of a query's occurrences and waits for them (the
    /// warm-up of seed 004: build before the first viewer asks). Returns windows built per
    /// occurrence.
    pub async fn warm(self: &Arc<Self>, context: &QueryContext, text: &str) -> Result<Vec<usize>, WarmError> {
        let analysis = self.analyze(context, text).map_err(WarmError::NotRewritable)?;
        let text: Arc<str> = Arc::from(text);
        let mut built = Vec::new();
        for found in &analysis.found {
            let (_, missing) = self.plan(found, now_micros()).await.map_err(WarmError::NotRewritable)?;
            if missing.buildable.is_empty() {
                built.push(0);
                continue;
            }
            let key = build_key(found, missing.buildable);
            let settings = self.settings();
            let place = QueuedBuild::take(&self.build_queue, &key, settings.max_queued_builds)
                .ok_or(WarmError::QueueFull(settings.max_queued_builds))?;
            let build = Arc::clone(self).build(
                found.clone(),
                Arc::clone(&text),
                self.statement_context(&analysis, context),
                key,
                place,
            );
            // On the background runtime, as a waiting query's: a caller that goes away leaves it running.
            let count = match self.background.spawn(build).await {
                Ok(built) => built.map_err(|e| WarmError::Build(e.to_string()))?,
                Err(stopped) => return Err(WarmError::Build(stopped.to_string())),
            };
            built.push(count);
        }
        Ok(built)
    }

    /// Stops building, at shutdown: no build claims windows any more, and the leases of this
    /// proxy's unfinished builds end, so that their windows are taken over by the next query that
    /// needs them (in another proxy, or in this one restarted) instead of passing through as
    /// `building` until the leases run out.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.release_leases().await;
    }

    /// Ends the leases of this proxy's pending jobs, within [`RELEASE_TIMEOUT`].
    pub(super) async fn release_leases(&self) {
        match tokio::time::timeout(RELEASE_TIMEOUT, self.store.release(&self.owner, now_micros())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(jobs)) => tracing::info!(jobs, "released the leases of unfinished builds"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot release the leases of unfinished builds"),
            Err(_) => tracing::warn!(?RELEASE_TIMEOUT, "the job store did not release the leases in time"),
        }
    }
}

/// Why a warm-up did not build.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The query has no rewritable occurrence.
    #[error("the query is not rewritable: {0}")]
    NotRewritable(Reason),
    /// `max_queued_builds` builds already wait for a slot: warming would queue one more.
    #[error("{0} builds already wait for a slot (max_queued_builds); try again later")]
    QueueFull(usize),
    /// A build failed.
    #[error("build failed: {0}")]
    Build(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(day: i64) -> BuildKey {
        let windows = vec![Window { start: day * 86_400_000_000, end: (day + 1) * 86_400_000_000 }];
        Arc::new(BuildTarget { team_id: 1, query_hash: "hash".to_string(), windows })
    }

    #[test]
    fn the_build_queue_holds_no_more_than_its_limit_and_a_queued_build_is_joined() {
        let queue = Arc::new(BuildQueue::default());
        let first = QueuedBuild::take(&queue, &key(1), 2).unwrap();
        let second = QueuedBuild::take(&queue, &key(2), 2).unwrap();
        assert!(QueuedBuild::take(&queue, &key(3), 2).is_none(), "a third build is refused");
        let joined = QueuedBuild::take(&queue, &key(1), 2).unwrap();
        assert_eq!(queue.lock().unwrap().len(), 2, "joining the first build adds no place");
        drop(joined);
        assert!(queue.lock().unwrap().contains(&key(1)), "a joiner leaving does not take the build's place");
        first.leave();
        assert!(QueuedBuild::take(&queue, &key(3), 2).is_some(), "the place the first build left is free");
        drop(second);
        assert!(queue.lock().unwrap().is_empty());
    }
}
