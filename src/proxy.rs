//! The request path, in phases:
//!
//! 1. **classify**: is this ClickHouse's query endpoint, an INSERT, external data?
//! 2. **read**: buffer the body (up to `max_body_bytes`) and assemble the query text the way
//!    ClickHouse does (`query` parameter, line feed, decoded body);
//! 3. **decide**: ask the engine whether the text can be served from preaggregates;
//! 4. **forward**: send the original bytes, or the rewritten text, to the upstream; a rewritten
//!    query that fails there is retried as the original (unless it timed out: the client has
//!    waited `upstream_timeout` already);
//! 5. **respond**: stream the upstream's answer back unchanged, plus `X-Preagg`.
//!
//! Every failure before forwarding becomes a pass-through with a reason code, except a request
//! that cannot be read (`bad_request`) or whose text is too large to read (`body_too_large`),
//! which the proxy answers itself; failures of the upstream itself become ClickHouse-style
//! 502/504 answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;

use crate::access_log::{AccessRecord, LoggedBody, RequestLog};
use crate::clickhouse_http::answers::{error_response, upstream_failure};
use crate::clickhouse_http::context::QueryContext;
use crate::clickhouse_http::request::{self, QueryText, StatementKind, TextPart, UrlParams};
use crate::config::{Config, Mode};
use crate::http::body::{self, ProxyBody};
use crate::http::client::{self, RequestBody};
use crate::http::pool::{Upstream, UpstreamError, UpstreamRequestBody};
use crate::http::server::{ClientBody, ClientBodyError};
use crate::metrics as m;
use crate::outcome::{Outcome, Reason};
use crate::preagg::{Decision, Deferred, Engine, EngineSlot};
use crate::shadow::{Shadow, ShadowRequest};

/// The response header that tells what the proxy did (see [`Outcome`]).
static X_PREAGG: HeaderName = HeaderName::from_static("x-preagg");

/// Paths ClickHouse serves with static handlers; every other path runs queries.
const STATIC_PATHS: &[&str] = &["/ping", "/replicas_status", "/play", "/dashboard", "/binary", "/merges"];

/// The proxy: one upstream, one engine. Each serving thread has its own copy
/// ([`Proxy::for_worker`]): its own upstream connection pool, everything else shared.
pub struct Proxy {
    upstream: Upstream,
    engine: EngineSlot,
    shadow: Option<Arc<Shadow>>,
    started_off: bool,
    max_body_bytes: Arc<AtomicUsize>,
    /// Longest wait for more of a body read as query text.
    receive_timeout: Duration,
}

/// A request body read as far as needed.
enum ReadBody {
    /// The whole body, within the cap.
    Complete(Bytes),
    /// The cap was passed: what was read, and the rest still arriving.
    Overflow { prefix: Vec<Bytes>, rest: ClientBody },
}

/// How the request will be forwarded.
enum Forward {
    /// The original request, body streaming through.
    Stream(ClientBody),
    /// The original request with a body already read (prefix + rest, or whole).
    Prefixed(Vec<Bytes>, ClientBody),
    /// The original request with its complete body.
    Original(Bytes),
}

impl Proxy {
    /// A proxy forwarding to the configured upstream; the engine is filled in once it connects.
    pub fn new(config: &Config, engine: EngineSlot, shadow: Option<Arc<Shadow>>) -> Proxy {
        Proxy {
            upstream: Upstream::new(
                config.upstream.clone(),
                &config.tls_ca_file,
                config.connect_timeout,
                config.upstream_timeout,
            ),
            engine,
            shadow,
            started_off: config.mode == Mode::Off,
            max_body_bytes: Arc::new(AtomicUsize::new(config.max_body_bytes)),
            receive_timeout: config.client_receive_timeout,
        }
    }

    /// A copy for one of `workers` serving threads: the same engine, shadow and settings (a
    /// reload reaches every copy), and an upstream connection pool of its own.
    pub fn for_worker(&self, workers: usize) -> Proxy {
        Proxy {
            upstream: self.upstream.with_own_pool(workers),
            engine: Arc::clone(&self.engine),
            shadow: self.shadow.clone(),
            started_off: self.started_off,
            max_body_bytes: Arc::clone(&self.max_body_bytes),
            receive_timeout: self.receive_timeout,
        }
    }

    /// Applies the reloadable settings of a new configuration.
    pub fn reload(&self, config: &Config) {
        self.max_body_bytes.store(config.max_body_bytes, Ordering::Relaxed);
    }

    /// Handles one request from a client.
    pub async fn handle(
        self: Arc<Self>,
        request: http::Request<ClientBody>,
        _peer: SocketAddr,
    ) -> Response<LoggedBody> {
        let (parts, body) = request.into_parts();
        // Logged and counted even if the client hangs up before the response exists.
        let mut log = RequestLog::start(parts.method.clone(), parts.uri.clone());
        let mut deferred = Deferred::default();
        let (mut response, outcome) = self.route(parts, body, &mut log.record, &mut deferred).await;
        if let Some(value) = outcome.header() {
            client::set_header(&mut response, X_PREAGG.clone(), value);
        }
        log.record.status = response.status().as_u16();
        log.record.outcome = outcome.label();
        // The log holds the builds until the request is done; they start when it lets go of them.
        log.on_finish(move || drop(deferred));
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, log.into_body(body))
    }

    async fn route(
        &self,
        parts: Parts,
        body: ClientBody,
        record: &mut AccessRecord,
        deferred: &mut Deferred,
    ) -> (Response<ProxyBody>, Outcome) {
        // Phase 1: classify.
        if STATIC_PATHS.contains(&parts.uri.path()) {
            return self.forward(parts, Forward::Stream(body), Reason::NotQueryEndpoint).await;
        }
        let params = UrlParams::from_uri(&parts.uri);
        // A `query` parameter that is not UTF-8 cannot be edited exactly; ClickHouse reads it as it is.
        let Ok(url_query) = params.query() else {
            return self.forward(parts, Forward::Stream(body), Reason::NotSelect).await;
        };
        if url_query.as_deref().map(request::statement_kind) == Some(StatementKind::Insert) {
            record.kind = StatementKind::Insert.as_str();
            return self.forward(parts, Forward::Stream(body), Reason::Insert).await;
        }
        if request::is_multipart(&parts.headers) {
            return self.forward(parts, Forward::Stream(body), Reason::ExternalData).await;
        }

        // Phase 2: read the query text.
        let encoding = request::content_encoding(&parts.headers);
        let max_body_bytes = self.max_body_bytes.load(Ordering::Relaxed);
        let raw = match read_body(body, max_body_bytes, self.receive_timeout).await {
            Ok(ReadBody::Complete(raw)) => raw,
            Ok(ReadBody::Overflow { prefix, rest }) => {
                let head: Vec<u8> = prefix.iter().flat_map(|b| b.iter().copied()).take(64 * 1024).collect();
                let text = request::decode_prefix(&head, encoding.as_deref(), 4096);
                if request::statement_kind(&String::from_utf8_lossy(&text)) == StatementKind::Insert {
                    record.kind = StatementKind::Insert.as_str();
                    return self.forward(parts, Forward::Prefixed(prefix, rest), Reason::Insert).await;
                }
                let message = format!(
                    "request body is larger than max_body_bytes ({max_body_bytes} bytes); only INSERT data may be larger"
                );
                let response = error_response(StatusCode::PAYLOAD_TOO_LARGE, 1002, "PREAGG_BODY_TOO_LARGE", &message);
                return (response, Outcome::Passthrough(Reason::BodyTooLarge));
            }
            Err(error) => {
                let message = format!("cannot read the request body: {error}");
                let response = error_response(StatusCode::BAD_REQUEST, 1001, "PREAGG_BAD_REQUEST", &message);
                return (response, Outcome::Passthrough(Reason::BadRequest));
            }
        };
        let text = match query_text(url_query, &raw, encoding.as_deref(), max_body_bytes) {
            Ok(text) => text,
            // ClickHouse will answer a body it cannot read; the proxy does not second-guess it.
            Err(_) => return self.forward(parts, Forward::Original(raw), Reason::NotSelect).await,
        };
        let full = text.full();
        let kind = request::statement_kind(&full);
        record.kind = kind.as_str();
        record.query_bytes = full.len();
        match kind {
            StatementKind::Select => {}
            StatementKind::Insert => return self.forward(parts, Forward::Original(raw), Reason::Insert).await,
            StatementKind::Other | StatementKind::Empty => {
                return self.forward(parts, Forward::Original(raw), Reason::NotSelect).await;
            }
        }

        // Phase 3: decide.
        if self.started_off {
            return self.forward(parts, Forward::Original(raw), Reason::ModeOff).await;
        }
        let Some(engine) = self.engine.get() else {
            return self.forward(parts, Forward::Original(raw), Reason::StoreUnavailable).await;
        };
        let context = || QueryContext::from_request(&params, &parts.headers);
        match engine.decide(context, &full, deferred).await {
            Decision::Forward(reason) => self.forward(parts, Forward::Original(raw), reason).await,
            Decision::Rewrite { text: rewritten, summary, shadow: true } => {
                if let Some(shadow) = &self.shadow {
                    let (params, headers, path) = ShadowRequest::capture(&params, &parts.headers, parts.uri.path());
                    shadow.offer(ShadowRequest {
                        rule: summary.rule.clone(),
                        hashes: rewritten.hashes,
                        job_ids: rewritten.job_ids,
                        original: full.to_string(),
                        rewritten: rewritten.text,
                        path,
                        params,
                        headers,
                    });
                }
                self.forward(parts, Forward::Original(raw), Reason::Shadow).await
            }
            Decision::Rewrite { text: rewritten, summary, shadow: false } => {
                let start = rewritten.first_change;
                let end = rewritten.last_change_in_original;
                let part = text.part_of(start, end);
                tracing::debug!(rewritten = %rewritten.text, hashes = ?rewritten.hashes, "rewritten query");
                match text.split_edited(&rewritten.text, part) {
                    Some(edited) => {
                        let (response, outcome) = self
                            .forward_rewritten(Arc::clone(engine), &parts, edited, part, raw, rewritten.job_ids)
                            .await;
                        (response, outcome.unwrap_or(Outcome::Rewritten(summary)))
                    }
                    None => self.forward(parts, Forward::Original(raw), Reason::SplitQuery).await,
                }
            }
        }
    }

    /// Phase 4 for untouched requests.
    async fn forward(&self, parts: Parts, how: Forward, reason: Reason) -> (Response<ProxyBody>, Outcome) {
        let outcome = Outcome::Passthrough(reason);
        let body = match how {
            Forward::Stream(body) => RequestBody::Stream(body::streaming(body)),
            Forward::Prefixed(prefix, rest) => RequestBody::Stream(body::prefixed(prefix, rest)),
            Forward::Original(raw) => RequestBody::Full(raw),
        };
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        (self.send(parts.method, path, parts.headers, body).await, outcome)
    }

    /// Phase 4 for rewritten requests: on an upstream error status the original is sent instead,
    /// so the client sees exactly what ClickHouse says about its own query. A rewritten query that
    /// got no answer within `upstream_timeout` is not sent again: the client has waited that long
    /// already, and gets the 504 rather than a second wait.
    async fn forward_rewritten(
        &self,
        engine: Arc<Engine>,
        parts: &Parts,
        text: QueryText,
        part: TextPart,
        original: Bytes,
        job_ids: Vec<String>,
    ) -> (Response<ProxyBody>, Option<Outcome>) {
        let mut headers = parts.headers.clone();
        let (path, body) = match part {
            TextPart::Url => {
                let params = UrlParams::from_uri(&parts.uri);
                let query = params.with_query(text.url_part.as_deref().unwrap_or(""));
                (format!("{}?{query}", parts.uri.path()), RequestBody::Full(original.clone()))
            }
            _ => {
                let body = Bytes::from(text.body_part.clone().unwrap_or_default());
                headers.remove(header::CONTENT_ENCODING);
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                let path = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
                (path, RequestBody::Full(body))
            }
        };
        let response = match self.send_or_fail(parts.method.clone(), &path, headers, body).await {
            Ok(response) if response.status().is_success() => return (response, None),
            Ok(response) => response,
            Err(error @ UpstreamError::Timeout { .. }) => {
                tracing::warn!(%error, "rewritten query timed out upstream; not sending the original after it");
                return (upstream_failure(&error), Some(Outcome::Passthrough(Reason::RewrittenQueryFailed)));
            }
            Err(error) => upstream_failure(&error),
        };
        let status = response.status();
        let error = error_text(response).await;
        tracing::warn!(%status, error = %error.trim(), "rewritten query failed upstream; sending the original");
        if let Some(guard) = crate::sql::rewrite::guard_fired(&error) {
            engine.expire_jobs(&job_ids, guard).await;
        }
        let (response, _) =
            self.forward(parts.clone(), Forward::Original(original), Reason::RewrittenQueryFailed).await;
        (response, Some(Outcome::Passthrough(Reason::RewrittenQueryFailed)))
    }

    /// Sends to the upstream and turns transport failures into ClickHouse-style answers.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: UpstreamRequestBody,
    ) -> Response<ProxyBody> {
        self.send_or_fail(method, path, headers, body).await.unwrap_or_else(|error| upstream_failure(&error))
    }

    /// Sends to the upstream; a transport failure is logged and returned.
    async fn send_or_fail(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: UpstreamRequestBody,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let started = Instant::now();
        match self.upstream.send(method, path, headers, body).await {
            Ok(response) => {
                m::upstream_latency(started.elapsed());
                Ok(response.map(body::streaming))
            }
            Err(error) => {
                tracing::warn!(%error, "upstream request failed");
                Err(error)
            }
        }
    }
}

/// The start (64 KiB at most) of an error answer's body.
async fn error_text(response: Response<ProxyBody>) -> String {
    let mut body = response.into_body();
    let mut text = Vec::new();
    while text.len() < 64 * 1024 {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Why a body could not be read as query text.
#[derive(Debug, thiserror::Error)]
enum ReadBodyError {
    /// The body's framing broke, or the client went away.
    #[error(transparent)]
    Client(#[from] ClientBodyError),
    /// The client sent nothing more for the receive timeout.
    #[error("no data for {0:?} (client_receive_timeout)")]
    Stalled(Duration),
}

/// Reads the body whole if it fits under `cap`, waiting no longer than `timeout` for each piece.
async fn read_body(mut body: ClientBody, cap: usize, timeout: Duration) -> Result<ReadBody, ReadBodyError> {
    let mut chunks = Vec::new();
    let mut total = 0usize;
    while let Some(frame) =
        tokio::time::timeout(timeout, body.frame()).await.map_err(|_| ReadBodyError::Stalled(timeout))?
    {
        if let Ok(data) = frame?.into_data() {
            total += data.len();
            chunks.push(data);
            if total > cap {
                return Ok(ReadBody::Overflow { prefix: chunks, rest: body });
            }
        }
    }
    if chunks.len() == 1 {
        return Ok(ReadBody::Complete(chunks.swap_remove(0)));
    }
    let mut all = BytesMut::with_capacity(total);
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    Ok(ReadBody::Complete(all.freeze()))
}

/// The query text of a buffered request.
fn query_text(
    url_query: Option<String>,
    raw: &Bytes,
    encoding: Option<&str>,
    cap: usize,
) -> Result<QueryText, request::RequestError> {
    let body_part = if raw.is_empty() {
        None
    } else {
        let decoded = request::decode_body(raw, encoding, cap)?;
        Some(String::from_utf8(decoded).map_err(|_| request::RequestError::NotUtf8)?)
    };
    Ok(QueryText { url_part: url_query, body_part })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SettingsArgs;

    /// A request's future lives in its connection's task, and the stack frame that creates it is
    /// part of every poll of that task. The rare, large step (planning and building preaggregates,
    /// `Engine::serve`: about 30 KiB of future) is boxed apart, so that what every request carries
    /// stays small: inline it made this future 32 KiB (in a debug build), boxed 4 KiB.
    #[test]
    fn a_requests_future_leaves_the_preaggregate_work_in_a_box_of_its_own() {
        let config = Config::load(&SettingsArgs::default(), None).expect("the defaults load");
        let proxy = Arc::new(Proxy::new(&config, EngineSlot::default(), None));
        let handling = proxy.handle(http::Request::new(ClientBody::empty()), SocketAddr::from(([127, 0, 0, 1], 9)));
        let size = std::mem::size_of_val(&handling);
        assert!(size <= 8 * 1024, "Proxy::handle's future is {size} bytes");
    }
}
