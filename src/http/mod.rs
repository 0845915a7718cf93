//! The ClickHouse HTTP side: the request model, forwarding, the accept loop, the access log and
//! where log lines go.

pub mod access;
pub mod client_io;
pub mod forward;
pub mod h1;
pub mod h1_server;
pub mod idle;
pub mod log_lines;
pub mod request;
pub mod server;
pub mod tls;
pub mod tls_listener;
