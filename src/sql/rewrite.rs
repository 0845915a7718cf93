//! Writing the proxy's SQL from an occurrence: the replacement of a body (stored windows plus raw
//! sub-ranges, re-aggregated), the INSERT that fills windows in one scan, and the DESCRIBE that
//! learns the body's column types. Pure functions of the original text and plain values; text
//! copied from the query is copied byte for byte, everything else goes through [`quote`].

use std::ops::Range;

use super::matcher::{INNER_PREFIX, IdentityJoin, Keying, Occurrence, OutputColumn, Role};
use super::quote;
use super::splice::{self, Edit, SpliceError};
use super::window::{Edge, RawRange, ReadyJob, Window};

/// Where the rewrite reads preaggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Database of the table.
    pub database: String,
    /// Table name.
    pub table: String,
    /// Cluster mode (the cluster's name): read replicas in the order builds write them, and the
    /// mutations of every replica.
    pub cluster: Option<String>,
}

impl Target {
    fn qualified(&self) -> String {
        quote::qualified(&self.database, &self.table)
    }
}

/// How the body's stored columns come out of a raw sub-range, plus extra projection and GROUP BY
/// items (the build's job-id key).
struct BodyEdit<'a> {
    start: Edge,
    end: Edge,
    prewhere: String,
    extra_select: &'a [String],
    extra_group_by: &'a [String],
}

/// The body text with its bounds moved, a PREWHERE on the raw time column (where ClickHouse can
/// prune even though the join blocks pushdown), derived columns and extras appended. Keyed by
/// identity, the body reads the source alone and groups by the identity columns: its joins, its
/// entity and its filters on joined relations are left to read time.
fn edited_body(text: &str, occ: &Occurrence, edit: &BodyEdit) -> Result<String, SpliceError> {
    let body = occ.body.clone();
    let local = |r: &Range<usize>| r.start - body.start..r.end - body.start;
    let mut edits = Vec::new();
    if let Keying::Identity(join) = &occ.keying {
        let entity = occ.columns.iter().find(|c| c.role == Role::Entity).ok_or(SpliceError::OutOfBounds(0..0))?;
        let keys = identity_keys(join);
        let items: Vec<String> =
            keys.iter().zip(&join.columns).map(|(key, name)| format!("{key} AS {}", quote::identifier(name))).collect();
        edits.push(Edit::new(local(&entity.item), items.join(", ")));
        edits.push(Edit::new(local(&join.joins), ""));
        edits.extend(join.joined_conjuncts.iter().map(|c| Edit::new(local(c), "1")));
        edits.push(Edit::new(local(&join.group_key), keys.join(", ")));
    }
    if let Edge::At(at) = edit.start {
        let conjunct = format!("greaterOrEquals({}, {})", occ.lower.time_expr, quote::datetime64(at));
        edits.push(Edit::new(local(&occ.lower.conjunct), conjunct));
    }
    if let Edge::At(at) = edit.end {
        let conjunct = format!("less({}, {})", occ.upper.time_expr, quote::datetime64(at));
        edits.push(Edit::new(local(&occ.upper.conjunct), conjunct));
    }
    edits.extend(unstored_items(occ).into_iter().map(|r| Edit::new(local(&r), "")));
    edits.push(Edit::insert(occ.where_at - body.start, format!("PREWHERE {} ", edit.prewhere)));
    let mut select: Vec<String> =
        occ.derived.iter().map(|d| format!("{} AS {}", d.expr, quote::identifier(&d.name))).collect();
    select.extend(edit.extra_select.iter().cloned());
    if !select.is_empty() {
        edits.push(Edit::insert(occ.projection_end - body.start, format!(", {}", select.join(", "))));
    }
    if !edit.extra_group_by.is_empty() {
        edits.push(Edit::insert(body.end - body.start, format!(", {}", edit.extra_group_by.join(", "))));
    }
    splice::apply(&text[body], &edits)
}

/// Byte ranges that take the projection items not stored (outputs computed after the merge) out
/// of the body, each with the comma that separates it from the kept items.
fn unstored_items(occ: &Occurrence) -> Vec<Range<usize>> {
    let items = &occ.columns;
    let Some(first_kept) = items.iter().position(OutputColumn::is_stored) else { return Vec::new() };
    let mut cuts = Vec::new();
    if first_kept > 0 {
        cuts.push(items[0].item.start..items[first_kept].item.start);
    }
    for k in first_kept + 1..items.len() {
        if !items[k].is_stored() {
            cuts.push(items[k - 1].item.end..items[k].item.end);
        }
    }
    cuts
}

/// The identity columns as the source's columns (`` `events`.`distinct_id` ``).
fn identity_keys(join: &IdentityJoin) -> Vec<String> {
    let source = quote::identifier(&join.source_name);
    join.columns.iter().map(|c| format!("{source}.{}", quote::identifier(c))).collect()
}

/// `column >= start AND column < end` on the raw time column, for one raw sub-range.
fn prewhere_for(occ: &Occurrence, raw: &RawRange) -> String {
    let column = &occ.time_column;
    let start = match raw.start {
        Edge::Original => {
            let op = if occ.lower.bound.inclusive { ">=" } else { ">" };
            format!("{column} {op} {}", quote::datetime64(occ.lower.bound.micros))
        }
        Edge::At(at) => format!("{column} >= {}", quote::datetime64(at)),
    };
    let end = match raw.end {
        Edge::Original => {
            let op = if occ.upper.bound.inclusive { "<=" } else { "<" };
            format!("{column} {op} {}", quote::datetime64(occ.upper.bound.micros))
        }
        Edge::At(at) => format!("{column} < {}", quote::datetime64(at)),
    };
    format!("{start} AND {end}")
}

/// The body restricted to a raw sub-range, producing the stored columns.
pub fn raw_body(text: &str, occ: &Occurrence, raw: &RawRange) -> Result<String, SpliceError> {
    let edit = BodyEdit {
        start: raw.start,
        end: raw.end,
        prewhere: prewhere_for(occ, raw),
        extra_select: &[],
        extra_group_by: &[],
    };
    edited_body(text, occ, &edit)
}

/// The message of the guard that fails a rewritten query whose stored rows are not all there.
pub const ROWS_MISSING: &str = "preagg-proxy: preaggregated rows missing";

/// The message of the guard that fails a rewritten query whose source table was mutated (rows
/// deleted or updated) after the builds it reads, or is being mutated.
pub const SOURCE_MUTATED: &str = "preagg-proxy: source table mutated after the build";

/// Which guard of [`replacement`] an error from ClickHouse says fired, if one did: the jobs read
/// no longer stand for their windows and must be built again.
pub fn guard_fired(error: &str) -> Option<&'static str> {
    [ROWS_MISSING, SOURCE_MUTATED].into_iter().find(|guard| error.contains(guard))
}

/// What keeps a replacement exact when its source table changed after the builds it reads (each
/// job's [`built_at`](ReadyJob::built_at), by ClickHouse's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// How long before a build started a row still counts as possibly unseen by it: inserts in
    /// flight then (microseconds).
    pub margin: i64,
}

/// The scalar subquery that throws while a table of the source has a mutation that is not done,
/// or one created at or after `built` (an expression; `None`: only a mutation not done). ClickHouse
/// records both `ALTER TABLE ... DELETE` and lightweight `DELETE FROM` in `system.mutations`; in
/// cluster mode every replica's are read.
fn mutation_guard(occ: &Occurrence, target: &Target, built: Option<&str>) -> String {
    let recent = built.map_or(String::new(), |built| format!("create_time >= toDateTime({built}) OR "));
    let mutations = match &target.cluster {
        Some(cluster) => format!("clusterAllReplicas({}, system.mutations)", quote::string(cluster)),
        None => "system.mutations".to_string(),
    };
    let database = occ.source_database.as_deref().map_or("currentDatabase()".to_string(), quote::string);
    let tables: Vec<String> = occ.mutation_tables.iter().map(|t| quote::string(t)).collect();
    format!(
        "(SELECT throwIf(count() != 0, {}) FROM {mutations} WHERE database = {database} \
         AND table IN ({}) AND ({recent}is_done = 0)) = 0",
        quote::string(SOURCE_MUTATED),
        tables.join(", ")
    )
}

/// The body over the span of the served windows, restricted to the rows each window's build may
/// not have seen: those ingested since that build started, less `margin`. Each row is held
/// against the build of the window its time falls in, so the rows read are the late ones, however
/// old the oldest build is. (A row between two served windows is held against the next one's
/// build; raw branches read it anyway.) Reading a row twice changes no merge of a rule (min, max,
/// argMin, a set of values), so this may overlap the stored rows.
fn ingested_since_body(
    text: &str,
    occ: &Occurrence,
    jobs: &[ReadyJob],
    margin: i64,
) -> Result<Option<String>, SpliceError> {
    let (Some(ingestion), Some(first), Some(last)) = (&occ.ingestion_column, jobs.first(), jobs.last()) else {
        return Ok(None);
    };
    let column = &occ.time_column;
    let seen = |job: &ReadyJob| quote::datetime64(job.built_at.saturating_sub(margin));
    let mut arms: Vec<String> = jobs[..jobs.len() - 1]
        .iter()
        .map(|job| format!("{column} < {}, {}", quote::datetime64(job.window.end), seen(job)))
        .collect();
    arms.push(seen(last));
    let since = if arms.len() == 1 { arms.remove(0) } else { format!("multiIf({})", arms.join(", ")) };
    let span = RawRange { start: Edge::At(first.window.start), end: Edge::At(last.window.end) };
    let edit = BodyEdit {
        start: span.start,
        end: span.end,
        prewhere: format!("{} AND {ingestion} >= {since}", prewhere_for(occ, &span)),
        extra_select: &[],
        extra_group_by: &[],
    };
    edited_body(text, occ, &edit).map(Some)
}

/// The text that replaces an occurrence's body: stored rows of `jobs` and the raw sub-ranges,
/// re-aggregated into the original's columns. `types` are the original types of the stored
/// columns, in [`Occurrence::stored_columns`] order.
///
/// The stored branch carries a guard: a scalar subquery, evaluated before any row is read, that
/// throws unless the jobs hold exactly the rows their builds confirmed. If the store and
/// ClickHouse disagree (a table dropped and recreated, rows deleted early, another cluster), the
/// rewritten query fails and the proxy answers with the original instead of serving wrong rows.
///
/// With `freshness`, changes to the source since the builds are accounted for: a second guard
/// throws if the source table was mutated since (deletions), and a branch reads again the rows
/// ingested since (late events).
///
/// Keyed by identity ([`Keying::Identity`]), every branch holds rows per identity, and the body's
/// joins, entity and filters on joined relations run over their union as written, so that the
/// joined tables (the person overrides) are read as they are now.
pub fn replacement(
    text: &str,
    occ: &Occurrence,
    jobs: &[ReadyJob],
    raw: &[RawRange],
    types: &[String],
    target: &Target,
    freshness: Option<Freshness>,
) -> Result<String, SpliceError> {
    let stored = occ.stored_columns();
    // Identity columns keep their source names: read time refers to them as the source's columns.
    let identity = |name: &str| matches!(&occ.keying, Keying::Identity(join) if join.columns.iter().any(|c| c == name));
    let casts: Vec<String> = stored
        .iter()
        .zip(types)
        .map(|(name, ty)| {
            let inner = if identity(name) { name.to_string() } else { format!("{INNER_PREFIX}{name}") };
            format!("CAST({}, {}) AS {}", quote::identifier(name), quote::string(ty), quote::identifier(&inner))
        })
        .collect();
    let job_list = jobs.iter().map(|j| quote::string(&j.id)).collect::<Vec<_>>().join(", ");
    let expected_rows: u64 = jobs.iter().map(|j| j.rows).sum();
    let read_settings = if target.cluster.is_some() { " SETTINGS load_balancing = 'in_order'" } else { "" };
    let table = target.qualified();
    let selection = format!("team_id = {} AND job_id IN ({job_list})", occ.team_id);
    let guard = format!(
        "(SELECT throwIf(count() != {expected_rows}, {}) FROM {table} WHERE {selection}{read_settings}) = 0",
        quote::string(ROWS_MISSING)
    );
    // Mutations created since the oldest build read started, or not done, fail the stored branch.
    let oldest_build = jobs.iter().map(|job| job.built_at.div_euclid(1_000_000)).min();
    let guards = match (freshness, oldest_build) {
        (Some(_), Some(oldest)) => format!("{guard} AND {}", mutation_guard(occ, target, Some(&oldest.to_string()))),
        _ => guard,
    };
    let mut branches =
        vec![format!("SELECT {} FROM {table} WHERE {selection} AND {guards}{read_settings}", casts.join(", "))];
    for r in raw {
        branches.push(raw_body(text, occ, r)?);
    }
    if let Some(Freshness { margin }) = freshness
        && let Some(body) = ingested_since_body(text, occ, jobs, margin)?
    {
        branches.push(body);
    }
    let outputs: Vec<String> = occ
        .columns
        .iter()
        .map(|c| {
            let value = match (&c.merge, &occ.keying) {
                (Some(merge), _) => merge.clone(),
                (None, Keying::Identity(join)) if c.role == Role::Entity => join.entity_expr.clone(),
                (None, _) => quote::identifier(&format!("{INNER_PREFIX}{}", c.name)),
            };
            format!("{value} AS {}", quote::identifier(&c.name))
        })
        .collect();
    let branches = branches.join(" UNION ALL ");
    // The rule's per-row group keys are grouped by again, beside the entity.
    let group_keys: String = occ
        .columns
        .iter()
        .filter(|c| c.role == Role::GroupKey)
        .map(|c| format!(", {}", quote::identifier(&format!("{INNER_PREFIX}{}", c.name))))
        .collect();
    Ok(match &occ.keying {
        Keying::Entity => {
            let entity =
                occ.columns.iter().find(|c| c.role == Role::Entity).map(|c| c.name.as_str()).unwrap_or_default();
            format!(
                "SELECT {} FROM ({branches}) GROUP BY {}{group_keys}",
                outputs.join(", "),
                quote::identifier(&format!("{INNER_PREFIX}{entity}"))
            )
        }
        // The stored rows (and raw ones, keyed alike) take the source's place under its name; the
        // body's joins, filters on joined relations and grouping follow as written.
        Keying::Identity(join) => {
            let filters: Vec<String> =
                join.joined_conjuncts.iter().map(|c| format!("({})", &text[c.clone()])).collect();
            let filter = if filters.is_empty() { String::new() } else { format!(" WHERE {}", filters.join(" AND ")) };
            format!(
                "SELECT {} FROM ({branches}) AS {} {}{filter} GROUP BY {}{group_keys}",
                outputs.join(", "),
                quote::identifier(&join.source_name),
                &text[join.joins.clone()],
                &text[join.group_key.clone()]
            )
        }
    })
}

/// One window to build, with its job id and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildWindow {
    /// The window.
    pub window: Window,
    /// Job id its rows carry.
    pub job_id: String,
    /// Expiry instant (microseconds).
    pub expires_at: i64,
}

/// The INSERT that fills `windows` (sorted, non-overlapping) in one scan: the body grouped by
/// entity and by window, each window's rows tagged with its job id. It fails (writing nothing)
/// while a mutation of the source is not done: parts the mutation has not reached yet would still
/// show the rows it removes.
pub fn insert_statement(
    text: &str,
    occ: &Occurrence,
    windows: &[BuildWindow],
    target: &Target,
) -> Result<String, SpliceError> {
    let (Some(first), Some(last)) = (windows.first(), windows.last()) else {
        return Err(SpliceError::OutOfBounds(0..0));
    };
    let column = &occ.time_column;
    // Rows are grouped by window number (cheap to hash) and tagged with job ids afterwards.
    let window_key = if windows.len() == 1 {
        "toUInt16(1)".to_string()
    } else {
        let mut arms: Vec<String> = windows[..windows.len() - 1]
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{column} < {}, {}", quote::datetime64(w.window.end), i + 1))
            .collect();
        arms.push(windows.len().to_string());
        format!("toUInt16(multiIf({}))", arms.join(", "))
    };
    let window_alias = quote::identifier(&format!("{INNER_PREFIX}window"));
    let extra_select = [format!("{window_key} AS {window_alias}")];
    let extra_group_by = [window_alias.clone()];
    let runs: Vec<String> = contiguous_runs(windows)
        .into_iter()
        .map(|w| format!("({column} >= {} AND {column} < {})", quote::datetime64(w.start), quote::datetime64(w.end)))
        .collect();
    let edit = BodyEdit {
        start: Edge::At(first.window.start),
        end: Edge::At(last.window.end),
        prewhere: runs.join(" OR "),
        extra_select: &extra_select,
        extra_group_by: &extra_group_by,
    };
    let body = edited_body(text, occ, &edit)?;
    let stored = occ.stored_columns();
    let stored_list: Vec<String> = stored.iter().map(|c| quote::identifier(c)).collect();
    let numbers: Vec<String> = (1..=windows.len()).map(|i| i.to_string()).collect();
    let job_ids: Vec<String> = windows.iter().map(|w| quote::string(&w.job_id)).collect();
    let expiries: Vec<String> = windows.iter().map(|w| quote::datetime64(w.expires_at)).collect();
    let numbers = numbers.join(", ");
    let guard = mutation_guard(occ, target, None);
    Ok(format!(
        "INSERT INTO {} (team_id, job_id, {}, computed_at, expires_at) SELECT {}, \
         transform({window_alias}, [{numbers}], [{}], ''), {}, now64(6, 'UTC'), \
         transform({window_alias}, [{numbers}], [{}], {}) FROM ({}) WHERE {guard}",
        target.qualified(),
        stored_list.join(", "),
        occ.team_id,
        job_ids.join(", "),
        stored_list.join(", "),
        expiries.join(", "),
        quote::datetime64(last.expires_at),
        body
    ))
}

/// The statement that learns the original types of the stored columns.
pub fn describe_statement(text: &str, occ: &Occurrence) -> Result<String, SpliceError> {
    let whole = RawRange { start: Edge::Original, end: Edge::Original };
    Ok(format!("DESCRIBE TABLE ({})", raw_body(text, occ, &whole)?))
}

/// Sorted windows merged where one ends exactly where the next starts.
pub fn contiguous_runs(windows: &[BuildWindow]) -> Vec<Window> {
    let mut runs: Vec<Window> = Vec::new();
    for w in windows {
        match runs.last_mut() {
            Some(run) if run.end == w.window.start => run.end = w.window.end,
            _ => runs.push(w.window),
        }
    }
    runs
}
