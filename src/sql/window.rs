//! Windows of time and what covers them: the vocabulary the planner and the rewriter share.

/// A window of time, half-open `[start, end)` in microseconds (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Start (inclusive).
    pub start: i64,
    /// End (exclusive).
    pub end: i64,
}

/// An edge of a raw sub-range: the query's own bound, or an instant chosen by the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Edge {
    /// Keep the original bound conjunct.
    Original,
    /// Cut at this instant (`>=` for a start, `<` for an end).
    At(i64),
}

/// A sub-range of the query's range read from the source table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RawRange {
    /// Where it starts.
    pub start: Edge,
    /// Where it ends.
    pub end: Edge,
}

/// A ready, unexpired job: the window it covers, its id, and the rows its build confirmed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadyJob {
    /// Job id (the rows' `job_id`).
    pub id: String,
    /// Window it covers.
    pub window: Window,
    /// Rows the build wrote and confirmed.
    pub rows: u64,
    /// When its build started reading the source, by ClickHouse's clock (microseconds).
    pub built_at: i64,
}
