//! The engine: for one query, what to serve from preaggregated windows, and the rewritten text.
//!
//! Per query: analyze (pure) -> look up jobs (cached) -> plan (pure) -> start builds for sealed
//! windows nobody holds ([`builds`](super::builds)) -> rewrite (pure). Any failure is a
//! pass-through with a reason.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::builds::{BuildKey, BuildQueue, Deferred, Missing, QueuedBuild, build_key};
use super::now_micros;
use super::plan::{self, Plan};
use super::statements::{ClickHouse, StatementContext};
use super::store::{Job, ShapeRecord, Status, Store};
use crate::clickhouse_http::context::{Credentials, QueryContext};
use crate::config::{BuildPolicy, Config, ExpiryBands, Mode};
use crate::metrics as m;
use crate::outcome::{Reason, RewriteSummary};
use crate::sql::rewrite::{self, Freshness, Target};
use crate::sql::rule::Rule;
use crate::sql::splice::{self, Edit};
use crate::sql::window::{ReadyJob, Window};
use crate::sql::{self, Analysis, Found, settings};

/// A rewritten query text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The full new text.
    pub text: String,
    /// First byte of the original that changed.
    pub first_change: usize,
    /// End of the last changed byte range of the original.
    pub last_change_in_original: usize,
    /// Query hashes of the rewritten occurrences.
    pub hashes: Vec<String>,
    /// Job ids read.
    pub job_ids: Vec<String>,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward the original.
    Forward(Reason),
    /// Forward (or, when `shadow`, compare) the rewritten text.
    Rewrite {
        /// The new text.
        text: Rewritten,
        /// Counts for `X-Preagg`.
        summary: RewriteSummary,
        /// Answer with the original and compare the rewrite in the background.
        shadow: bool,
    },
}

/// Engine settings taken from the configuration (replaced on reload).
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) mode: Mode,
    pub(super) seal_after: i64,
    pub(super) expiry_buffer: i64,
    pub(super) expiry_bands: ExpiryBands,
    pub(super) build: BuildPolicy,
    pub(super) build_wait_timeout: Duration,
    pub(super) lease: Duration,
    pub(super) retry_after: i64,
    pub(super) jobs_per_user: bool,
    pub(super) max_parse_time: Duration,
    pub(super) max_queued_builds: usize,
    /// Account for changes to the source after a build (`exact_under_change`).
    pub(super) exact_under_change: bool,
    pub(super) ingestion_margin: Duration,
}

impl Settings {
    fn from_config(config: &Config) -> Settings {
        Settings {
            mode: config.mode,
            seal_after: micros(config.seal_after),
            expiry_buffer: micros(config.expiry_buffer),
            expiry_bands: config.expiry_bands.clone(),
            build: config.build,
            build_wait_timeout: config.build_wait_timeout,
            lease: config.lease_duration,
            retry_after: micros(config.build_retry_after),
            jobs_per_user: config.jobs_per_user,
            max_parse_time: config.max_parse_time,
            max_queued_builds: config.max_queued_builds,
            exact_under_change: config.exact_under_change,
            ingestion_margin: config.ingestion_margin,
        }
    }
}

pub(super) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The preaggregation engine.
pub struct Engine {
    pub(super) rules: RwLock<Arc<Vec<Arc<Rule>>>>,
    pub(super) settings: RwLock<Arc<Settings>>,
    pub(super) store: Store,
    pub(super) clickhouse: ClickHouse,
    pub(super) jobs: moka::future::Cache<(i64, String), Arc<Vec<Job>>>,
    pub(super) shapes: moka::future::Cache<String, Arc<ShapeRecord>>,
    pub(super) builds: moka::future::Cache<BuildKey, usize>,
    pub(super) build_slots: Arc<Semaphore>,
    /// Builds waiting for one of `build_slots`.
    pub(super) build_queue: Arc<BuildQueue>,
    pub(super) tables: tokio::sync::Mutex<HashSet<String>>,
    pub(super) store_down_until: AtomicI64,
    /// Set by [`stop`](Self::stop): builds no longer claim windows.
    pub(super) stopping: AtomicBool,
    pub(super) owner: String,
    pub(super) background: tokio::runtime::Handle,
}

/// After a job store failure, lookups are not tried again for this long: queries pass through at
/// once instead of each waiting for the store.
const STORE_BACKOFF: i64 = 5_000_000;

/// One occurrence being served ([`Engine::serve`]), boxed: its replacement text and plan, or why not.
type Serving<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(String, Plan), Reason>> + Send + 'a>>;

impl Engine {
    /// An engine over a connected store and ClickHouse client. Called within the tokio runtime
    /// that runs background builds (not on a proxy worker's).
    pub fn new(config: &Config, rules: Vec<Arc<Rule>>, store: Store, clickhouse: ClickHouse) -> Engine {
        Engine {
            rules: RwLock::new(Arc::new(rules)),
            settings: RwLock::new(Arc::new(Settings::from_config(config))),
            store,
            clickhouse,
            jobs: moka::future::Cache::builder()
                .max_capacity(config.job_cache_capacity)
                .time_to_live(config.job_cache_ttl)
                .build(),
            shapes: moka::future::Cache::builder().max_capacity(config.job_cache_capacity).build(),
            builds: moka::future::Cache::builder().time_to_live(Duration::from_secs(2)).build(),
            build_slots: Arc::new(Semaphore::new(config.max_concurrent_builds)),
            build_queue: Arc::new(Mutex::new(HashSet::new())),
            tables: tokio::sync::Mutex::new(HashSet::new()),
            store_down_until: AtomicI64::new(0),
            stopping: AtomicBool::new(false),
            owner: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4()),
            background: tokio::runtime::Handle::current(),
        }
    }

    pub(super) fn settings(&self) -> Arc<Settings> {
        self.settings.read().map(|s| Arc::clone(&s)).unwrap_or_else(|poisoned| Arc::clone(&poisoned.into_inner()))
    }

    /// Applies the reloadable settings of a new configuration (rules are replaced separately).
    pub fn reload_settings(&self, config: &Config) {
        if let Ok(mut settings) = self.settings.write() {
            *settings = Arc::new(Settings::from_config(config));
        }
    }

    /// The loaded rules.
    pub fn rules(&self) -> Arc<Vec<Arc<Rule>>> {
        self.rules.read().map(|r| Arc::clone(&r)).unwrap_or_default()
    }

    /// Replaces the rules (configuration reload) and creates any new tables.
    pub async fn replace_rules(&self, rules: Vec<Arc<Rule>>) -> Result<(), super::statements::ClickHouseError> {
        for rule in &rules {
            self.ensure_table(rule).await?;
        }
        if let Ok(mut current) = self.rules.write() {
            *current = Arc::new(rules);
        }
        Ok(())
    }

    /// The job store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The ClickHouse client for the proxy's own statements.
    pub fn clickhouse(&self) -> &ClickHouse {
        &self.clickhouse
    }

    /// Creates every rule's table if missing.
    pub async fn ensure_tables(&self) -> Result<(), super::statements::ClickHouseError> {
        for rule in self.rules().iter() {
            self.ensure_table(rule).await?;
        }
        Ok(())
    }

    /// Creates a rule's table if this process has not seen it yet.
    pub(super) async fn ensure_table(&self, rule: &Rule) -> Result<(), super::statements::ClickHouseError> {
        let mut tables = self.tables.lock().await;
        if !tables.contains(&rule.name) {
            self.clickhouse.ensure_table(rule).await?;
            tables.insert(rule.name.clone());
        }
        Ok(())
    }

    /// The credentials a query's builds run as, and its user and roles join its hash with:
    /// the request's, with `jobs_per_user`; none (the proxy's own user, shared jobs) without.
    pub(super) fn per_user<'a>(&self, context: &'a QueryContext) -> Option<&'a Credentials> {
        context.credentials.as_ref().filter(|_| self.settings().jobs_per_user)
    }

    fn sql_context(&self, context: &QueryContext) -> sql::Context {
        let per_user = self.per_user(context);
        sql::Context {
            url_settings: context.url_settings.clone(),
            database: context.database.clone(),
            user: per_user.map(|c| c.user.clone()),
            roles: per_user.map(|c| c.roles.clone()).unwrap_or_default(),
            preagg_database: self.clickhouse.layout().database.clone(),
            exact_under_change: self.settings().exact_under_change,
        }
    }

    /// Analyzes a query: its occurrences, or why there are none.
    pub fn analyze(&self, context: &QueryContext, text: &str) -> Result<Analysis, Reason> {
        let rules = self.rules();
        self.analyze_applicable(&sql::prefilter(&rules, text)?, context, text)
    }

    /// Analyzes a query for the rules the prefilter let through, timed.
    pub(super) fn analyze_applicable(
        &self,
        applicable: &[&Arc<Rule>],
        context: &QueryContext,
        text: &str,
    ) -> Result<Analysis, Reason> {
        // Preaggregates kept per user are built as that user: one whose credentials cannot be
        // read would get windows built with the proxy's rights.
        if self.settings().jobs_per_user && context.credentials.is_none() {
            return Err(Reason::UnknownCredentials);
        }
        let started = Instant::now();
        let budget = self.settings().max_parse_time;
        let result = sql::analyze_applicable(applicable, text, &self.sql_context(context), budget);
        m::analysis_time(started.elapsed());
        result
    }

    /// Decides what to do with a SELECT: the request path's "decide" phase. Background builds it
    /// needs are left in `deferred`, to start once the request is done with. `context` is read
    /// only for a query that one of some rule's prefilter literals occurs in (a memchr scan): most
    /// queries are forwarded before it, and before the analysis is timed.
    pub async fn decide(
        self: &Arc<Self>,
        context: impl FnOnce() -> QueryContext,
        text: &str,
        deferred: &mut Deferred,
    ) -> Decision {
        let settings = self.settings();
        if settings.mode == Mode::Off {
            return Decision::Forward(Reason::ModeOff);
        }
        let all_rules = self.rules();
        let applicable = match sql::prefilter(&all_rules, text) {
            Ok(applicable) => applicable,
            Err(reason) => return Decision::Forward(reason),
        };
        let context = context();
        let analysis = match self.analyze_applicable(&applicable, &context, text) {
            Ok(analysis) => analysis,
            Err(reason) => return Decision::Forward(reason),
        };
        let text: Arc<str> = Arc::from(text);
        let mut edits = Vec::new();
        let mut reasons = Vec::new();
        let mut rules = Vec::new();
        let mut hashes = Vec::new();
        let mut job_ids: Vec<String> = Vec::new();
        let mut raw_ranges = 0;
        let mut shadow = false;
        for found in &analysis.found {
            // A rule's own mode, when it has one, wins over the global mode.
            let mode = found.rule.mode.unwrap_or(settings.mode);
            if mode == Mode::Off {
                reasons.push(Reason::ModeOff);
                continue;
            }
            match self.serve_boxed(found, &analysis, &context, &text, mode == Mode::Shadow, deferred).await {
                Ok((replacement, plan)) => {
                    edits.push(Edit::new(found.occurrence.body.clone(), replacement));
                    if !rules.contains(&found.rule.name) {
                        rules.push(found.rule.name.clone());
                    }
                    hashes.push(found.query_hash.clone());
                    shadow |= mode == Mode::Shadow;
                    raw_ranges += plan.raw.len();
                    for job in plan.served {
                        if !job_ids.contains(&job.id) {
                            job_ids.push(job.id);
                        }
                    }
                }
                Err(reason) => reasons.push(reason),
            }
        }
        let started = Instant::now();
        let Ok(rewritten) = splice::apply(&text, &edits) else { return Decision::Forward(Reason::Unlocatable) };
        m::rewrite_time(started.elapsed());
        let (Some(first), Some(last)) =
            (edits.iter().map(|e| e.range.start).min(), edits.iter().map(|e| e.range.end).max())
        else {
            return Decision::Forward(reasons.first().copied().unwrap_or(Reason::NoWindowsReady));
        };
        let summary =
            RewriteSummary { rule: rules.join(","), occurrences: edits.len(), jobs: job_ids.len(), raw_ranges };
        Decision::Rewrite {
            text: Rewritten { text: rewritten, first_change: first, last_change_in_original: last, hashes, job_ids },
            summary,
            shadow,
        }
    }

    /// [`serve`](Self::serve) in an allocation of its own. Its future is tens of kilobytes (the
    /// plan, the build, the job store's and ClickHouse's calls); held inline it would make every
    /// request's future that large, and the stack frame that creates it would be part of every
    /// poll of every connection, experiment query or not (a frame that size is probed page by
    /// page, 4 KiB apart, on each call). Not inlined, so that the frame stays here.
    #[inline(never)]
    fn serve_boxed<'a>(
        self: &'a Arc<Self>,
        found: &'a Found,
        analysis: &'a Analysis,
        context: &'a QueryContext,
        text: &'a Arc<str>,
        shadowed: bool,
        deferred: &'a mut Deferred,
    ) -> Serving<'a> {
        Box::pin(self.serve(found, analysis, context, text, shadowed, deferred))
    }

    /// Plans one occurrence, starts builds for what is missing, and produces its replacement. A
    /// shadowed query never waits for builds: shadow work must not touch the client's answer.
    async fn serve(
        self: &Arc<Self>,
        found: &Found,
        analysis: &Analysis,
        context: &QueryContext,
        text: &Arc<str>,
        shadowed: bool,
        deferred: &mut Deferred,
    ) -> Result<(String, Plan), Reason> {
        let started = Instant::now();
        let settings = self.settings();
        if settings.exact_under_change && found.occurrence.ingestion_column.is_none() {
            return Err(Reason::NoIngestionColumn);
        }
        if settings.exact_under_change && sql::settings::enabled(&analysis.settings, "use_query_cache") {
            return Err(Reason::QueryCache);
        }
        let (mut plan, mut missing) = self.plan(found, now_micros()).await?;
        let mut build = None;
        if !missing.buildable.is_empty() {
            let key = build_key(found, std::mem::take(&mut missing.buildable));
            match QueuedBuild::take(&self.build_queue, &key, settings.max_queued_builds) {
                Some(place) => {
                    let context = self.statement_context(analysis, context);
                    build = Some(Arc::clone(self).build(found.clone(), Arc::clone(text), context, key, place));
                }
                // ClickHouse is not keeping up with the builds asked of it: more would only wait
                // (and add to its load once they run). A later query asks again.
                None => missing.refused = key.windows.len(),
            }
        }
        let policy = if shadowed { BuildPolicy::Background } else { settings.build };
        match (policy, build) {
            (BuildPolicy::Background, Some(build)) => {
                deferred.push(&self.background, async move {
                    let _ = build.await;
                });
                missing.building += 1;
            }
            (BuildPolicy::Wait, build) if build.is_some() || missing.building > 0 => {
                m::build_waited();
                let deadline = Instant::now() + settings.build_wait_timeout;
                // The build runs on the background runtime: a query that stops waiting for it
                // (its deadline passed, its client left) leaves it running, instead of cancelling
                // it half-way with its windows claimed.
                if let Some(build) = build
                    && let Ok(Err(_) | Ok(Err(_))) =
                        tokio::time::timeout_at(deadline.into(), self.background.spawn(build)).await
                {
                    missing.failed += 1;
                }
                (plan, missing) = self.wait_for_windows(found, deadline).await?;
            }
            _ => {}
        }
        m::plan_time(started.elapsed());
        if !plan.serves_any() {
            return Err(if missing.failed > 0 {
                Reason::BuildFailed
            } else if missing.refused > 0 {
                Reason::BuildQueueFull
            } else if missing.building > 0 || !plan.missing.is_empty() {
                Reason::Building
            } else {
                Reason::NoWindowsReady
            });
        }
        let shape = self.shape(&found.query_hash).await?;
        if shape.names.iter().map(String::as_str).ne(found.occurrence.stored_columns()) {
            return Err(Reason::DescribeFailed);
        }
        let replacement = rewrite::replacement(
            text,
            &found.occurrence,
            &plan.served,
            &plan.raw,
            &shape.types,
            &self.target(&found.rule),
            self.freshness(),
        )
        .map_err(|_| Reason::Unlocatable)?;
        Ok((replacement, plan))
    }

    /// What keeps a rewrite exact under later changes to the source, unless turned off.
    fn freshness(&self) -> Option<Freshness> {
        let settings = self.settings();
        settings.exact_under_change.then(|| Freshness { margin: micros(settings.ingestion_margin) })
    }

    /// The plan at `now`, and what the missing windows are waiting for.
    pub(super) async fn plan(&self, found: &Found, now: i64) -> Result<(Plan, Missing), Reason> {
        let occ = &found.occurrence;
        let settings = self.settings();
        let jobs = self.lookup(occ.team_id, &found.query_hash, now).await?;
        let serve_until = now + settings.expiry_buffer;
        let ready: Vec<ReadyJob> = jobs
            .iter()
            .filter(|j| j.status == Status::Ready && j.expires_at.is_some_and(|e| e > serve_until))
            // Exactness needs to know when a build read its source: jobs built before that was
            // recorded are built again.
            .filter(|j| !settings.exact_under_change || j.source_seen_at.is_some())
            .map(|j| ReadyJob {
                id: j.id.clone(),
                window: j.window,
                rows: j.rows_written.unwrap_or(0).max(0) as u64,
                // Unknown only when exactness is off (else filtered out above), which reads no
                // build time.
                built_at: j.source_seen_at.unwrap_or_default(),
            })
            .collect();
        let plan = plan::plan(occ.range, &ready, now, settings.seal_after);
        let window_set = |keep: &dyn Fn(&Job) -> bool| -> HashSet<Window> {
            jobs.iter().filter(|j| keep(j)).map(|j| j.window).collect()
        };
        let building = window_set(&|j| j.status == Status::Pending && j.lease_expires_at.is_some_and(|l| l > now));
        let failed = window_set(&|j| j.status == Status::Failed && j.created_at > now - settings.retry_after);
        let mut missing = Missing::default();
        for window in &plan.missing {
            if building.contains(window) {
                missing.building += 1;
            } else if failed.contains(window) {
                missing.failed += 1;
            } else {
                missing.buildable.push(*window);
            }
        }
        Ok((plan, missing))
    }

    /// Re-plans until no missing window is being built, or the deadline passes: windows another
    /// query (or another proxy) is building become ready while this query waits.
    pub(super) async fn wait_for_windows(&self, found: &Found, deadline: Instant) -> Result<(Plan, Missing), Reason> {
        loop {
            self.jobs.invalidate(&(found.occurrence.team_id, found.query_hash.clone())).await;
            let (plan, missing) = self.plan(found, now_micros()).await?;
            if missing.building == 0 || Instant::now() >= deadline {
                return Ok((plan, missing));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Jobs of (team, hash), from the cache or the store.
    pub(super) async fn lookup(&self, team_id: i64, query_hash: &str, now: i64) -> Result<Arc<Vec<Job>>, Reason> {
        let key = (team_id, query_hash.to_string());
        if let Some(jobs) = self.jobs.get(&key).await {
            m::job_cache(true);
            return Ok(jobs);
        }
        m::job_cache(false);
        if self.store_down_until.load(Ordering::Relaxed) > now {
            return Err(Reason::StoreUnavailable);
        }
        let failed_since = now - self.settings().retry_after;
        let jobs = self.store.lookup(team_id, query_hash, now, failed_since).await.map_err(|error| {
            tracing::warn!(%error, "job lookup failed; passing queries through for a few seconds");
            self.store_down_until.store(now + STORE_BACKOFF, Ordering::Relaxed);
            Reason::StoreUnavailable
        })?;
        let jobs = Arc::new(jobs);
        self.jobs.insert(key, Arc::clone(&jobs)).await;
        Ok(jobs)
    }

    /// The stored columns' names and original types of a hash.
    pub(super) async fn shape(&self, query_hash: &str) -> Result<Arc<ShapeRecord>, Reason> {
        if let Some(shape) = self.shapes.get(query_hash).await {
            return Ok(shape);
        }
        let record = self.store.shape(query_hash).await.map_err(|_| Reason::StoreUnavailable)?;
        let record = Arc::new(record.ok_or(Reason::DescribeFailed)?);
        self.shapes.insert(query_hash.to_string(), Arc::clone(&record)).await;
        Ok(record)
    }

    pub(super) fn target(&self, rule: &Rule) -> Target {
        Target {
            database: self.clickhouse.layout().database.clone(),
            table: rule.target.table.clone(),
            cluster: self.clickhouse.layout().cluster.clone(),
        }
    }

    /// The context of a query's builds: its database and settings, and with `jobs_per_user` its
    /// credentials, so that the user's grants and row policies apply to what is built for it.
    pub(super) fn statement_context(&self, analysis: &Analysis, context: &QueryContext) -> StatementContext {
        StatementContext {
            database: context.database.clone(),
            settings: settings::for_builds(&analysis.settings),
            credentials: self.per_user(context).cloned(),
        }
    }

    /// Whether the store and ClickHouse answer.
    pub async fn readiness(&self) -> Result<(), String> {
        self.store.ping().await.map_err(|e| e.to_string())?;
        self.clickhouse.ping().await.map_err(|e| e.to_string())
    }

    /// Expires jobs a guard of a rewritten query (`why`: its message) found stale, so the next
    /// query builds them again.
    pub async fn expire_jobs(&self, ids: &[String], why: &str) {
        tracing::warn!(jobs = ids.len(), %why, "expiring the jobs a rewritten query read");
        if let Err(error) = self.store.expire_jobs(ids, now_micros(), why).await {
            tracing::warn!(%error, "cannot expire jobs");
        }
        self.jobs.invalidate_all();
    }

    /// Drops cached lookups (after an invalidation through the admin API).
    pub fn forget_cached_jobs(&self) {
        self.jobs.invalidate_all();
    }
}
