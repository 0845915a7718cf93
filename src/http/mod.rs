//! The ClickHouse HTTP side: the request model, forwarding, the accept loop, the access log and
//! where log lines go.

pub mod access;
pub mod forward;
pub mod h1;
pub mod idle;
pub mod log_lines;
pub mod preface;
pub mod request;
pub mod server;
pub mod tls;
