//! Preaggregation: the engine that decides, for one query, what to serve from preaggregated
//! windows, builds what is missing, and produces the rewritten text.
//!
//! Per query: analyze (pure) -> look up jobs (cached) -> plan (pure) -> start builds for sealed
//! windows nobody holds -> rewrite (pure). Any failure is a pass-through with a reason.

pub mod clickhouse;
pub mod plan;
pub mod store;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderMap;
use tokio::sync::Semaphore;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{BuildPolicy, Config, ExpiryBands, Mode};
use crate::http::request::UrlParams;
use crate::metrics as m;
use crate::outcome::{Reason, RewriteSummary};
use crate::rules::Rule;
use crate::sql::rewrite::{self, BuildWindow, Target, Window};
use crate::sql::splice::{self, Edit};
use crate::sql::{self, Analysis, Found, settings};
use clickhouse::{ClickHouse, StatementContext};
use plan::{Plan, ReadyJob};
use store::{Built, Job, JobKey, ShapeRecord, Status, Store};

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The request context that changes what a query computes, read from the request.
#[derive(Debug, Clone, Default)]
pub struct QueryContext {
    /// Settings given as URL parameters.
    pub url_settings: BTreeMap<String, String>,
    /// The `X-ClickHouse-Database` header, else the first non-empty `database` parameter (as
    /// ClickHouse's HTTP handler picks it); empty for the user's default database.
    pub database: String,
    /// The credentials the request authenticates with; `None` when ClickHouse would take them
    /// from where the proxy cannot (an `Authorization` scheme other than Basic, a client
    /// certificate).
    pub credentials: Option<Credentials>,
}

/// A ClickHouse user and password, and the roles it asks for, as a request gives them. The
/// password is never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user: String,
    password: String,
    /// The `role` parameters, in order (none: the user's default roles).
    pub roles: Vec<String>,
}

impl Credentials {
    /// The password, for use (never for logging).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The credentials of a request, read as ClickHouse's HTTP handler reads them: the
    /// `X-ClickHouse-User`/`X-ClickHouse-Key` headers when either is set, else a Basic
    /// `Authorization` header unless `user` or `password` parameters are given (they win over it
    /// in current ClickHouse; older releases refuse the mix) or it says `never`, else the first
    /// `user` (default `default`) and `password` parameters; and every `role` parameter.
    fn from_request(params: &UrlParams, headers: &HeaderMap) -> Option<Credentials> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if header("x-clickhouse-ssl-certificate-auth") == "on" {
            return None;
        }
        let roles: Vec<String> = params.pairs().filter(|(name, _)| name == "role").map(|(_, role)| role).collect();
        let (user, key) = (header("x-clickhouse-user"), header("x-clickhouse-key"));
        if !user.is_empty() || !key.is_empty() {
            return Some(Credentials { user: user.to_string(), password: key.to_string(), roles });
        }
        let (param_user, param_password) = (params.get("user"), params.get("password"));
        let authorization = headers.get(http::header::AUTHORIZATION).map(|_| header("authorization"));
        if let Some(authorization) =
            authorization.filter(|a| *a != "never" && param_user.is_none() && param_password.is_none())
        {
            // The scheme is compared as ClickHouse does: case-insensitively.
            let (scheme, encoded) = authorization.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("basic") {
                return None;
            }
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, password) = text.split_once(':').unwrap_or((&text, ""));
            return Some(Credentials { user: user.to_string(), password: password.to_string(), roles });
        }
        Some(Credentials {
            user: param_user.unwrap_or_else(|| "default".to_string()),
            password: param_password.unwrap_or_default(),
            roles,
        })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .field("roles", &self.roles)
            .finish()
    }
}

impl QueryContext {
    /// Reads the context from a request's URL parameters and headers.
    pub fn from_request(params: &UrlParams, headers: &HeaderMap) -> QueryContext {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        QueryContext {
            url_settings: settings::url_settings(params.pairs()),
            database: header("x-clickhouse-database")
                .filter(|database| !database.is_empty())
                .or_else(|| {
                    params.pairs().find(|(name, value)| name == "database" && !value.is_empty()).map(|(_, v)| v)
                })
                .unwrap_or_default(),
            credentials: Credentials::from_request(params, headers),
        }
    }
}

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
struct Settings {
    mode: Mode,
    seal_after: i64,
    expiry_buffer: i64,
    expiry_bands: ExpiryBands,
    build: BuildPolicy,
    build_wait_timeout: Duration,
    lease: Duration,
    retry_after: i64,
    jobs_per_user: bool,
    max_parse_time: Duration,
    max_queued_builds: usize,
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
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

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
type BuildTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Deferred {
    fn push(&mut self, runtime: &tokio::runtime::Handle, build: impl Future<Output = ()> + Send + 'static) {
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
    ClickHouse(#[from] clickhouse::ClickHouseError),
    /// The statement could not be produced.
    #[error("cannot produce the build statement: {0}")]
    Statement(String),
    /// DESCRIBE did not list the stored columns.
    #[error("DESCRIBE returned columns {0:?}, expected the stored columns")]
    Columns(Vec<String>),
}

/// The missing windows of a plan, by what they are waiting for.
#[derive(Debug, Default)]
struct Missing {
    /// Nobody holds them: a build can start.
    buildable: Vec<Window>,
    /// A build (here or in another proxy) holds them.
    building: usize,
    /// Their last build failed recently.
    failed: usize,
    /// Buildable, but left alone: `max_queued_builds` builds already wait for a slot.
    refused: usize,
}

/// What one in-process build makes: `windows` of a team's query.
#[derive(Debug, PartialEq, Eq, Hash)]
struct BuildTarget {
    team_id: i64,
    query_hash: String,
    windows: Vec<Window>,
}

/// Key of one in-process build: concurrent identical queries share it. Made once by the query that
/// starts the build; the queue, the build map and the build itself share it, not copies of it.
type BuildKey = Arc<BuildTarget>;

/// The key of building `windows` of an occurrence.
fn build_key(found: &Found, windows: Vec<Window>) -> BuildKey {
    Arc::new(BuildTarget { team_id: found.occurrence.team_id, query_hash: found.query_hash.clone(), windows })
}

/// Builds waiting for a slot, by key.
type BuildQueue = Mutex<HashSet<BuildKey>>;

/// A build's place in the queue, from the moment a query decides to start it until the build gets
/// a slot (or is dropped without one). Taken before the build is started, even when it starts only
/// after the answer (`build = background`): two queries deciding at the same moment cannot both
/// take the last place.
struct QueuedBuild {
    queue: Arc<BuildQueue>,
    /// The key, when this place put it in the queue (not when it joined a build already queued).
    key: Option<BuildKey>,
}

impl QueuedBuild {
    /// Takes a place for the build `key`: joins it when it is already queued, else puts it in the
    /// queue unless the queue holds `limit` builds (then `None`: the build must not start).
    fn take(queue: &Arc<BuildQueue>, key: &BuildKey, limit: usize) -> Option<QueuedBuild> {
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
    fn leave(self) {}
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

/// The preaggregation engine.
pub struct Engine {
    rules: RwLock<Arc<Vec<Arc<Rule>>>>,
    settings: RwLock<Arc<Settings>>,
    store: Store,
    clickhouse: ClickHouse,
    jobs: moka::future::Cache<(i64, String), Arc<Vec<Job>>>,
    shapes: moka::future::Cache<String, Arc<ShapeRecord>>,
    builds: moka::future::Cache<BuildKey, usize>,
    build_slots: Arc<Semaphore>,
    /// Builds waiting for one of `build_slots`.
    build_queue: Arc<BuildQueue>,
    tables: tokio::sync::Mutex<HashSet<String>>,
    store_down_until: AtomicI64,
    /// Set by [`stop`](Self::stop): builds no longer claim windows.
    stopping: AtomicBool,
    owner: String,
    background: tokio::runtime::Handle,
}

/// After a job store failure, lookups are not tried again for this long: queries pass through at
/// once instead of each waiting for the store.
const STORE_BACKOFF: i64 = 5_000_000;

/// Longest a stopping proxy waits for the job store to release its leases: past it, they run out
/// on their own after `lease_duration`.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

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

    fn settings(&self) -> Arc<Settings> {
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
    pub async fn replace_rules(&self, rules: Vec<Arc<Rule>>) -> Result<(), clickhouse::ClickHouseError> {
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
    pub async fn ensure_tables(&self) -> Result<(), clickhouse::ClickHouseError> {
        for rule in self.rules().iter() {
            self.ensure_table(rule).await?;
        }
        Ok(())
    }

    /// Creates a rule's table if this process has not seen it yet.
    async fn ensure_table(&self, rule: &Rule) -> Result<(), clickhouse::ClickHouseError> {
        let mut tables = self.tables.lock().await;
        if !tables.contains(&rule.name) {
            self.clickhouse.ensure_table(rule).await?;
            tables.insert(rule.name.clone());
        }
        Ok(())
    }

    /// The credentials a query's builds run as, and its user and roles join its hash with:
    /// the request's, with `jobs_per_user`; none (the proxy's own user, shared jobs) without.
    fn per_user<'a>(&self, context: &'a QueryContext) -> Option<&'a Credentials> {
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
        }
    }

    /// Analyzes a query: its occurrences, or why there are none.
    pub fn analyze(&self, context: &QueryContext, text: &str) -> Result<Analysis, Reason> {
        let rules = self.rules();
        self.analyze_applicable(&sql::prefilter(&rules, text)?, context, text)
    }

    /// Analyzes a query for the rules the prefilter let through, timed.
    fn analyze_applicable(
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
    /// only for a query that some rule's prefilter literals all occur in (a memchr scan): most
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
        )
        .map_err(|_| Reason::Unlocatable)?;
        Ok((replacement, plan))
    }

    /// The plan at `now`, and what the missing windows are waiting for.
    async fn plan(&self, found: &Found, now: i64) -> Result<(Plan, Missing), Reason> {
        let occ = &found.occurrence;
        let settings = self.settings();
        let jobs = self.lookup(occ.team_id, &found.query_hash, now).await?;
        let serve_until = now + settings.expiry_buffer;
        let ready: Vec<ReadyJob> = jobs
            .iter()
            .filter(|j| j.status == Status::Ready && j.expires_at.is_some_and(|e| e > serve_until))
            .map(|j| ReadyJob { id: j.id.clone(), window: j.window, rows: j.rows_written.unwrap_or(0).max(0) as u64 })
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
    async fn wait_for_windows(&self, found: &Found, deadline: Instant) -> Result<(Plan, Missing), Reason> {
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
    async fn lookup(&self, team_id: i64, query_hash: &str, now: i64) -> Result<Arc<Vec<Job>>, Reason> {
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
    async fn shape(&self, query_hash: &str) -> Result<Arc<ShapeRecord>, Reason> {
        if let Some(shape) = self.shapes.get(query_hash).await {
            return Ok(shape);
        }
        let record = self.store.shape(query_hash).await.map_err(|_| Reason::StoreUnavailable)?;
        let record = Arc::new(record.ok_or(Reason::DescribeFailed)?);
        self.shapes.insert(query_hash.to_string(), Arc::clone(&record)).await;
        Ok(record)
    }

    fn target(&self, rule: &Rule) -> Target {
        Target {
            database: self.clickhouse.layout().database.clone(),
            table: rule.target.table.clone(),
            cluster: self.clickhouse.layout().cluster.is_some(),
        }
    }

    /// The context of a query's builds: its database and settings, and with `jobs_per_user` its
    /// credentials, so that the user's grants and row policies apply to what is built for it.
    fn statement_context(&self, analysis: &Analysis, context: &QueryContext) -> StatementContext {
        StatementContext {
            database: context.database.clone(),
            settings: settings::for_builds(&analysis.settings),
            credentials: self.per_user(context).cloned(),
        }
    }

    /// Builds the windows of `key` once, however many queries ask at the same time, holding
    /// `place` in the queue until a slot is free. Returns how many windows this call saw built.
    async fn build(
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

    async fn run_build(
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
                // The table may be gone (dropped, or a new node): create it again before the next build.
                self.tables.lock().await.remove(&rule.name);
                let message = crate::http::forward::error_chain(error);
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
    async fn fill(
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
        let marked = self.store.mark_ready(&built, &self.owner, computed_at).await?;
        if marked < built.len() {
            tracing::warn!(taken_over = built.len() - marked, "jobs were taken over before they were marked ready");
        }
        let total = built.iter().map(|b| b.rows).sum();
        Ok(total)
    }

    /// Renews the leases of `ids` until the returned handle is dropped (the build is over, or was
    /// cancelled with the runtime).
    fn renew_leases(&self, ids: Vec<String>) -> AbortOnDropHandle<()> {
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

    /// Whether the store and ClickHouse answer.
    pub async fn readiness(&self) -> Result<(), String> {
        self.store.ping().await.map_err(|e| e.to_string())?;
        self.clickhouse.ping().await.map_err(|e| e.to_string())
    }

    /// Expires jobs whose rows a rewritten query found missing, so the next query rebuilds them.
    pub async fn expire_jobs(&self, ids: &[String]) {
        tracing::warn!(jobs = ids.len(), "preaggregated rows missing in ClickHouse; expiring the jobs");
        if let Err(error) = self.store.expire_jobs(ids, now_micros(), "rows missing in ClickHouse").await {
            tracing::warn!(%error, "cannot expire jobs");
        }
        self.jobs.invalidate_all();
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
    async fn release_leases(&self) {
        match tokio::time::timeout(RELEASE_TIMEOUT, self.store.release(&self.owner, now_micros())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(jobs)) => tracing::info!(jobs, "released the leases of unfinished builds"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot release the leases of unfinished builds"),
            Err(_) => tracing::warn!(?RELEASE_TIMEOUT, "the job store did not release the leases in time"),
        }
    }

    /// Drops cached lookups (after an invalidation through the admin API).
    pub fn forget_cached_jobs(&self) {
        self.jobs.invalidate_all();
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
    fn the_database_and_user_are_the_ones_clickhouse_picks() {
        let context = |uri: &str, headers: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            }
            QueryContext::from_request(&UrlParams::from_uri(&uri.parse().unwrap()), &map)
        };
        assert_eq!(context("/?database=a", &[("x-clickhouse-database", "b")]).database, "b");
        assert_eq!(context("/?database=a", &[("x-clickhouse-database", "")]).database, "a");
        assert_eq!(context("/?database=&database=c&database=d", &[]).database, "c");
        assert_eq!(context("/", &[]).database, "");
        let user = |uri: &str, headers: &[(&str, &str)]| context(uri, headers).credentials.map(|c| c.user);
        // "u:p" and "v:p" in base64.
        assert_eq!(user("/", &[("authorization", "basic dTpw")]).as_deref(), Some("u"));
        assert_eq!(context("/", &[("authorization", "Basic dTpw")]).credentials.unwrap().password(), "p");
        assert_eq!(user("/?user=w&user=x", &[]).as_deref(), Some("w"));
        assert_eq!(user("/", &[]).as_deref(), Some("default"));
        assert_eq!(user("/", &[("x-clickhouse-user", "v"), ("authorization", "Basic djpw")]).as_deref(), Some("v"));
        assert_eq!(user("/", &[("authorization", "Bearer dTpw")]), None);
        assert_eq!(user("/", &[("x-clickhouse-ssl-certificate-auth", "on"), ("x-clickhouse-user", "v")]), None);
        assert_eq!(user("/?user=w", &[("authorization", "Basic dTpw")]).as_deref(), Some("w"));
        assert_eq!(user("/", &[("authorization", "never")]).as_deref(), Some("default"));
        // A quota key alone is not a login: the Basic user stands.
        assert_eq!(user("/", &[("x-clickhouse-quota", "k"), ("authorization", "Basic dTpw")]).as_deref(), Some("u"));
        let roles = context("/?role=a&user=u&role=b", &[]).credentials.unwrap().roles;
        assert_eq!(roles, ["a", "b"]);
        let shown = format!("{:?}", context("/?user=u&password=s3cret", &[]));
        assert!(shown.contains("\"u\"") && !shown.contains("s3cret"), "{shown}");
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
