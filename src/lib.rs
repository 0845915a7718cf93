#![warn(missing_docs)]
//! preagg-proxy: a transparent ClickHouse HTTP proxy that serves the exposures subquery of
//! experiment queries from preaggregated windows.
//!
//! Modules import downwards only, leaves first: [`outcome`], [`metrics`], [`error`] and
//! [`log_lines`] (leaves); [`http`] (HTTP/1.1 only); [`sql`] (the pure brain); [`rules`] (rule
//! files); [`config`]; [`clickhouse_http`] (requests read as ClickHouse reads them); [`preagg`]
//! (plan, store, build); [`shadow`]; [`access_log`]; [`proxy`] (the request path); [`admin`];
//! [`explain`]; [`app`] (wiring).

pub mod access_log;
pub mod admin;
pub mod app;
pub mod clickhouse_http;
pub mod config;
pub mod error;
pub mod explain;
pub mod http;
pub mod log_lines;
pub mod metrics;
pub mod outcome;
pub mod preagg;
pub mod proxy;
pub mod rules;
pub mod shadow;
pub mod sql;
