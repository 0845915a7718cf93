//! Preaggregation: decide what a query can be served from, keep the windows it needs built, and
//! write the rewritten text.
//!
//! [`engine`] runs the per-query decision; [`builds`] fills missing windows; [`plan`] (pure)
//! tiles a range with stored windows and raw sub-ranges; [`store`] tracks jobs in SQLite or
//! PostgreSQL; [`statements`] are the proxy's own ClickHouse statements.

pub mod builds;
pub mod engine;
pub mod plan;
pub mod statements;
pub mod store;

use std::sync::{Arc, OnceLock};

pub use builds::{BuildError, Deferred, WarmError};
pub use engine::{Decision, Engine, Rewritten};

/// The engine, once the job store is connected (queries pass through until then).
pub type EngineSlot = Arc<OnceLock<Arc<Engine>>>;

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
