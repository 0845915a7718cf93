#![warn(missing_docs)]
//! preagg-proxy: a transparent ClickHouse HTTP proxy that serves the exposures subquery of
//! experiment queries from preaggregated windows.

pub mod admin;
pub mod app;
pub mod config;
pub mod explain;
pub mod http;
pub mod metrics;
pub mod outcome;
pub mod preagg;
pub mod proxy;
pub mod rules;
pub mod shadow;
pub mod sql;
