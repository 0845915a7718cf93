//! The ClickHouse HTTP side: the request model, forwarding, the accept loop and the access log.

pub mod access;
pub mod forward;
pub mod preface;
pub mod request;
pub mod server;
