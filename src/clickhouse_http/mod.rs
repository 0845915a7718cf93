//! The ClickHouse HTTP dialect: a request read as ClickHouse's HTTP handler reads it (where the
//! query text is, which database and credentials apply, which settings change what it computes)
//! and answers in ClickHouse's style. Used by the request path, the engine and shadow mode.

pub mod answers;
pub mod context;
pub mod request;
