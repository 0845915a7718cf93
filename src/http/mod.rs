//! HTTP/1.1 and nothing else: the rules both sides of a connection share, bodies, the upstream
//! client and its pool, the server side of a client connection, the accept loop, and TLS. This
//! module knows no ClickHouse and no configuration file: callers hand it plain values.
//!
//! In the shape of pingora's `protocols/http/v1`: [`common`] (framing and connection rules, read
//! once for requests and responses) and [`body`] below, [`client`] and [`server`] (one connection
//! each way) above them, then [`pool`] (upstream connections) and [`listener`] (accepting).

pub mod body;
pub mod client;
pub mod client_io;
pub mod common;
pub mod idle;
pub mod listener;
pub mod pool;
pub mod server;
pub mod tls;
pub mod tls_listener;
