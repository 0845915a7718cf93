//! The upstream connection pool: a keep-alive HTTP/1.1 client for one endpoint (plain or TLS),
//! hop-by-hop headers dropped both ways, bodies streaming in both directions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Response, Uri, header};
use http_body::Frame;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service as _;

use super::body::ProxyBody;
use super::client::{self, Connection, Exchange, Outgoing, RequestBody};
use super::common::{H1Error, strip_hop_by_hop};
use super::tls::ClientTls;
use crate::error::error_chain;

/// The upstream or ClickHouse endpoint: scheme, authority and base path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Parsed URI; the path is a prefix for forwarded paths.
    pub uri: http::Uri,
}

impl Endpoint {
    /// The URL without any user:password part, for logs.
    pub fn redacted(&self) -> String {
        let scheme = self.uri.scheme_str().unwrap_or("http");
        let host = self.uri.host().unwrap_or("");
        let port = self.uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{scheme}://{host}{port}{}", self.uri.path())
    }

    /// The URL as the `clickhouse` crate expects it (no userinfo, no trailing slash).
    pub fn base_url(&self) -> String {
        self.redacted().trim_end_matches('/').to_string()
    }
}

/// Failures talking to the upstream, each answered in ClickHouse's style.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made.
    #[error("cannot connect to upstream ClickHouse at {endpoint}: {message}")]
    Unreachable {
        /// The upstream, without credentials.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
    /// No response headers within the timeout.
    #[error("upstream ClickHouse at {endpoint} did not answer within {timeout:?}")]
    Timeout {
        /// The upstream, without credentials.
        endpoint: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The connection failed after it was made.
    #[error("upstream ClickHouse at {endpoint} failed: {message}")]
    Failed {
        /// The upstream, without credentials.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
}
/// Keep-alive connections idle longer than this are closed rather than reused: less than
/// ClickHouse's `keep_alive_timeout` (3 s before 23.11, 10 s since), so that a request is never
/// written to a connection the server is closing at that moment (it would fail, unanswered).
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Idle connections kept by one client, shared out among its own pools; more are closed when
/// their response ends.
const MAX_IDLE: usize = 256;

/// The stream of an upstream connection: TCP, with TLS for `https` endpoints.
type UpstreamStream = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// A connection to the upstream.
type UpstreamConnection = Connection<UpstreamStream>;

/// The HTTP/1.1 client to the upstream ClickHouse: keep-alive connections ([`Connection`]),
/// each carrying one request at a time, reused most-recent first. A connection goes back to the
/// pool when the response body it carried, read to its end, is dropped; a body abandoned half-way
/// closes its connection (ClickHouse stops the query when it next writes to it, or at once for a
/// read-only query with `cancel_http_readonly_queries_on_client_close`).
///
/// Each proxy worker thread has its own pool ([`Upstream::with_own_pool`]): a connection is then
/// driven by the thread whose requests use it.
#[derive(Clone)]
pub struct Upstream {
    connector: hyper_rustls::HttpsConnector<HttpConnector>,
    pool: Arc<Pool>,
    endpoint: Endpoint,
    host: HeaderValue,
    timeout: Duration,
}

/// How often idle connections are looked at, so that those the upstream closed (or that idled
/// too long) are closed here too instead of lingering half-closed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Idle keep-alive connections, most recently used last.
struct Pool {
    idle: Mutex<Idle>,
    max_idle: usize,
}

/// The idle connections, and whether a sweeper is looking after them.
#[derive(Default)]
struct Idle {
    connections: Vec<IdleConnection>,
    swept: bool,
}

/// A connection waiting for its next request.
struct IdleConnection {
    connection: UpstreamConnection,
    since: Instant,
}

impl IdleConnection {
    /// Whether it can carry another request: open, and not idle for too long.
    fn usable(&mut self) -> bool {
        self.since.elapsed() <= IDLE_TIMEOUT && self.connection.is_open()
    }
}

impl Pool {
    fn new(max_idle: usize) -> Arc<Pool> {
        Arc::new(Pool { idle: Mutex::default(), max_idle })
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<UpstreamConnection> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(mut entry) = idle.connections.pop() {
            if entry.usable() {
                return Some(entry.connection);
            }
        }
        None
    }

    /// Puts a connection back (unless `max_idle` are idle already), with a sweeper to look after
    /// it on the current runtime (the one whose reactor drives the connection).
    fn release(self: &Arc<Self>, connection: UpstreamConnection) {
        let Ok(mut idle) = self.idle.lock() else { return };
        if idle.connections.len() >= self.max_idle {
            return;
        }
        idle.connections.push(IdleConnection { connection, since: Instant::now() });
        if !idle.swept
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            idle.swept = true;
            runtime.spawn(Pool::sweep(Arc::downgrade(self)));
        }
    }

    /// Closes idle connections that the upstream closed or that idled too long, every
    /// [`SWEEP_INTERVAL`], until none are left (or the pool is gone).
    async fn sweep(pool: std::sync::Weak<Pool>) {
        loop {
            tokio::time::sleep(SWEEP_INTERVAL).await;
            let Some(pool) = pool.upgrade() else { return };
            let Ok(mut idle) = pool.idle.lock() else { return };
            idle.connections.retain_mut(IdleConnection::usable);
            if idle.connections.is_empty() {
                idle.swept = false;
                return;
            }
        }
    }
}

/// The body of an upstream response; its connection returns to the pool when the body, read to
/// its end, is dropped.
pub struct UpstreamBody {
    body: client::ResponseBody<UpstreamStream>,
    pool: Arc<Pool>,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    /// A body read to its end (or done before anyone polled it: the server drops the body of an
    /// answer that has none, such as HEAD's, unpolled) gives its connection back; one abandoned
    /// half-way closes it.
    fn drop(&mut self) {
        if let Some(connection) = self.body.take_reusable() {
            self.pool.release(connection);
        }
    }
}

/// The body of a request to the upstream.
pub type UpstreamRequestBody = RequestBody<ProxyBody>;

impl Upstream {
    /// A client for `endpoint` with keep-alive pooling, over TLS with `tls` for `https://`.
    pub fn new(endpoint: Endpoint, tls: &ClientTls, connect_timeout: Duration, timeout: Duration) -> Upstream {
        let connector = tls.connector(connect_timeout);
        let host = host_header(&endpoint.uri);
        Upstream { connector, pool: Pool::new(MAX_IDLE), endpoint, host, timeout }
    }

    /// A client to the same endpoint with the same timeouts and a connection pool of its own,
    /// one of `pools` that share out the idle connections this client would keep.
    pub fn with_own_pool(&self, pools: usize) -> Upstream {
        Upstream { pool: Pool::new(MAX_IDLE.div_ceil(pools.max(1))), ..self.clone() }
    }

    /// The endpoint, for logs.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The upstream request target for a client's path and query string: the endpoint's base path
    /// is prepended, everything else is kept byte for byte.
    pub fn target(&self, path_and_query: &str) -> Result<PathAndQuery, http::Error> {
        let base = self.endpoint.uri.path().trim_end_matches('/');
        if base.is_empty() {
            return Ok(PathAndQuery::try_from(path_and_query)?);
        }
        Ok(PathAndQuery::try_from(format!("{base}{path_and_query}"))?)
    }

    /// Sends a request and waits (bounded) for the response head; the body streams later.
    /// Hop-by-hop headers are dropped both ways.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        mut headers: HeaderMap,
        body: UpstreamRequestBody,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let target = self.target(path_and_query).map_err(|e| self.failed(&e))?;
        strip_hop_by_hop(&mut headers);
        headers.insert(header::HOST, self.host.clone());
        let request = Outgoing::new(&method, target.as_str(), &headers, body);
        self.exchange(&method, request, tokio::time::Instant::now() + self.timeout).await
    }

    /// Sends `request` on a pooled connection, or on a new one when none is idle or the pooled
    /// one failed before any of the request was written (the upstream closed it while idle). The
    /// response head must come by `deadline`, a new connection included (DNS, TCP within
    /// `connect_timeout`, TLS); a deadline that passed while connecting sends nothing.
    async fn exchange(
        &self,
        method: &Method,
        mut request: Outgoing<ProxyBody>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        loop {
            let (connection, reused) = match self.pool.checkout() {
                Some(connection) => (connection, true),
                None => match tokio::time::timeout_at(deadline, self.connect()).await {
                    Ok(connection) if tokio::time::Instant::now() < deadline => (connection?, false),
                    _ => return Err(self.timed_out()),
                },
            };
            match connection.send(method, &mut request, deadline).await {
                Ok(Exchange { head, body }) => {
                    let mut response = Response::new(UpstreamBody { body, pool: Arc::clone(&self.pool) });
                    *response.status_mut() = head.status;
                    *response.version_mut() = head.version;
                    response.extensions_mut().insert(head.fields);
                    if let Some(reason) = head.reason {
                        response.extensions_mut().insert(reason);
                    }
                    return Ok(response);
                }
                Err(H1Error::HeadTimeout) => return Err(self.timed_out()),
                Err(_) if reused && request.untouched() => {}
                Err(error) => return Err(self.failed(&error)),
            }
        }
    }

    /// Opens a connection.
    async fn connect(&self) -> Result<UpstreamConnection, UpstreamError> {
        let mut connector = self.connector.clone();
        match connector.call(self.endpoint.uri.clone()).await {
            Ok(stream) => Ok(Connection::new(TokioIo::new(stream))),
            Err(error) => Err(UpstreamError::Unreachable {
                endpoint: self.endpoint.redacted(),
                message: error_chain(error.as_ref()),
            }),
        }
    }

    fn timed_out(&self) -> UpstreamError {
        UpstreamError::Timeout { endpoint: self.endpoint.redacted(), timeout: self.timeout }
    }

    fn failed(&self, error: &dyn std::error::Error) -> UpstreamError {
        UpstreamError::Failed { endpoint: self.endpoint.redacted(), message: error_chain(error) }
    }
}

/// The `Host` header for `uri`: the host, and the port unless it is the scheme's default.
fn host_header(uri: &Uri) -> HeaderValue {
    let host = uri.host().unwrap_or_default();
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let text = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering::SeqCst;

    use http_body_util::BodyExt;

    use super::*;
    use crate::http::body::full;

    #[test]
    fn target_keeps_the_path_and_query_bytes() {
        let endpoint = Endpoint { uri: "http://ch:8123/prefix/".parse().unwrap() };
        let up = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(1));
        let target = up.target("/?query=SELECT%201&user=a%2Bb").unwrap();
        assert_eq!(target.as_str(), "/prefix/?query=SELECT%201&user=a%2Bb");
        let plain = Endpoint { uri: "http://ch:8123".parse().unwrap() };
        let up = Upstream::new(plain, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(up.target("/ping").unwrap().as_str(), "/ping");
    }

    #[test]
    fn host_header_names_the_port_unless_it_is_the_default() {
        assert_eq!(host_header(&"http://ch:8123/".parse().unwrap()), "ch:8123");
        assert_eq!(host_header(&"https://ch.example.com/".parse().unwrap()), "ch.example.com");
        assert_eq!(host_header(&"http://ch:80".parse().unwrap()), "ch");
    }

    /// A local HTTP/1.1 server answering with the `Host` header it got; counts its connections.
    async fn counting_server(keep_alive: bool) -> (Endpoint, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, SeqCst);
                let service = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                    let host = request.headers().get(header::HOST).cloned();
                    let text = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
                    Ok::<_, std::convert::Infallible>(Response::new(full(text)))
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::spawn(connection);
            }
        });
        (Endpoint { uri: format!("http://{address}").parse().unwrap() }, accepted)
    }

    async fn get(up: &Upstream) -> Response<UpstreamBody> {
        up.send(Method::GET, "/", HeaderMap::new(), RequestBody::Full(Bytes::new())).await.unwrap()
    }

    async fn text(response: Response<UpstreamBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_ends_is_bounded_by_the_upstream_timeout() {
        // Accepts TCP, then says nothing: the handshake waits for a server hello forever.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                streams.push(stream);
            }
        });
        let endpoint = Endpoint { uri: format!("https://{address}").parse().unwrap() };
        let timeout = Duration::from_millis(300);
        let up = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(5), timeout);
        let send = up.send(Method::GET, "/", HeaderMap::new(), RequestBody::Full(Bytes::new()));
        let result = tokio::time::timeout(Duration::from_secs(3), send).await.expect("the handshake hung");
        assert!(matches!(result, Err(UpstreamError::Timeout { .. })), "a 504");
        held.abort();
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_body_is_done() {
        let (endpoint, accepted) = counting_server(true).await;
        let authority = endpoint.uri.authority().unwrap().to_string();
        let up = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(5));
        for _ in 0..5 {
            assert_eq!(text(get(&up).await).await, authority, "the Host header names the upstream");
        }
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_whose_answer_has_no_body_is_reused_without_reading_it() {
        let (endpoint, accepted) = counting_server(true).await;
        let up = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(5));
        for _ in 0..3 {
            let response = up.send(Method::HEAD, "/", HeaderMap::new(), RequestBody::Full(Bytes::new())).await;
            assert!(http_body::Body::is_end_stream(response.unwrap().body()));
        }
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_still_being_read_keeps_its_connection_to_itself() {
        let (endpoint, accepted) = counting_server(true).await;
        let up = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(5));
        let unread = get(&up).await;
        let second = get(&up).await;
        assert_eq!(accepted.load(SeqCst), 2);
        drop((text(unread).await, text(second).await));
        get(&up).await;
        assert_eq!(accepted.load(SeqCst), 2, "both went back to the pool");
    }

    #[tokio::test]
    async fn idle_connections_the_upstream_closes_are_closed_here_too() {
        // Answers one request with keep-alive, then closes the connection a moment later.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint { uri: format!("http://{}", listener.local_addr().unwrap()).parse().unwrap() };
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await.unwrap();
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let up = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(text(get(&up).await).await, "ok");
        let idle = || up.pool.idle.lock().unwrap().connections.len();
        assert_eq!(idle(), 1, "pooled once its answer was read");
        tokio::time::sleep(SWEEP_INTERVAL * 2).await;
        assert_eq!(idle(), 0, "closed here once the upstream closed it");
        assert!(!up.pool.idle.lock().unwrap().swept, "the sweeper stops once the pool is empty");
    }

    #[tokio::test]
    async fn connections_the_upstream_closes_are_not_reused() {
        let (endpoint, accepted) = counting_server(false).await;
        let up = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(5));
        for _ in 0..3 {
            text(get(&up).await).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(SeqCst), 3);
    }

    #[tokio::test]
    async fn own_pools_do_not_share_connections() {
        let (endpoint, accepted) = counting_server(true).await;
        let first = Upstream::new(endpoint, &ClientTls::default(), Duration::from_secs(1), Duration::from_secs(5));
        let second = first.with_own_pool(2);
        text(get(&first).await).await;
        text(get(&second).await).await;
        text(get(&first).await).await;
        assert_eq!(accepted.load(SeqCst), 2);
    }
}
