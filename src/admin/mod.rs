//! The admin listener: health, readiness, Prometheus metrics, the job and shadow API, warm-up, and
//! a server-rendered status page. It listens apart from the proxy (loopback by default) and, when
//! a token is configured, every `/admin` path requires `Authorization: Bearer <token>`. A browser
//! cannot send that header from its address bar, so the read-only status page (`GET /admin`)
//! also takes the token as `?token=...`; no other path does. `/healthz`, `/readyz` and
//! `/metrics` need no token (probes and scrapers).

mod page;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;

use crate::clickhouse_http::context::QueryContext;
use crate::clickhouse_http::request::UrlParams;
use crate::config::{Config, Secret};
use crate::http::body::{self, ProxyBody};
use crate::http::client::RequestBody;
use crate::http::pool::Upstream;
use crate::http::server::ClientBody;
use crate::preagg::EngineSlot;
use crate::preagg::store::{Job, JobFilter, MismatchSample};
use crate::preagg::{Engine, WarmError, now_micros};
use crate::shadow::{RuleStats, Shadow};
use crate::sql::quote;

/// Largest admin request body (a warm-up query).
const MAX_ADMIN_BODY: usize = 4 * 1024 * 1024;

/// The admin service.
pub struct Admin {
    engine: EngineSlot,
    shadow: Option<Arc<Shadow>>,
    metrics: PrometheusHandle,
    upstream: Upstream,
    token: Secret,
}

/// A job as the API shows it.
#[derive(Debug, serde::Serialize)]
pub struct JobView {
    /// The job.
    #[serde(flatten)]
    pub job: Job,
    /// Window start, readable.
    pub window_start_utc: String,
    /// Window end, readable.
    pub window_end_utc: String,
}

impl From<Job> for JobView {
    fn from(job: Job) -> JobView {
        JobView {
            window_start_utc: quote::timestamp_text(job.window.start),
            window_end_utc: quote::timestamp_text(job.window.end),
            job,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    team_id: i64,
    query_hash: Option<String>,
    start: Option<chrono::DateTime<chrono::Utc>>,
    end: Option<chrono::DateTime<chrono::Utc>>,
}

/// The shadow report.
#[derive(Debug, serde::Serialize)]
pub struct ShadowReport {
    /// Whether shadow comparisons run at all.
    pub enabled: bool,
    /// Counters per rule.
    pub rules: BTreeMap<String, RuleStats>,
    /// Newest mismatch samples.
    pub samples: Vec<MismatchSample>,
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ProxyBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<ProxyBody> {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

impl Admin {
    /// The admin service over the proxy's engine, shadow runner and metrics.
    pub fn new(
        config: &Config,
        engine: EngineSlot,
        shadow: Option<Arc<Shadow>>,
        metrics: PrometheusHandle,
    ) -> Arc<Admin> {
        Arc::new(Admin {
            engine,
            shadow,
            metrics,
            upstream: Upstream::new(
                config.upstream.clone(),
                &config.tls_ca_file,
                config.connect_timeout,
                config.connect_timeout,
            ),
            token: config.admin_token.clone(),
        })
    }

    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, request: Request<ClientBody>) -> Response<ProxyBody> {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        match (method.clone(), path.as_str()) {
            (Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n", "text/plain"),
            (Method::GET, "/readyz") => return self.readiness().await,
            (Method::GET, "/metrics") => {
                return text(StatusCode::OK, self.metrics.render(), "text/plain; version=0.0.4");
            }
            _ => {}
        }
        if !path.starts_with("/admin") {
            return error(StatusCode::NOT_FOUND, format!("no such path: {path}"));
        }
        let page = request.method() == Method::GET && (path == "/admin" || path == "/admin/");
        if !self.authorized(&request, page) {
            let mut response = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        let Some(engine) = self.engine.get().cloned() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine is not ready (job store or ClickHouse unreachable)",
            );
        };
        let params = UrlParams::from_uri(request.uri());
        match (method, path.as_str()) {
            (Method::GET, "/admin") | (Method::GET, "/admin/") => self.page(&engine).await,
            (Method::GET, "/admin/jobs") => jobs(&engine, &params).await,
            (Method::POST, "/admin/jobs/invalidate") => match read_body(request).await {
                Ok(body) => invalidate(&engine, &body).await,
                Err(response) => response,
            },
            (Method::GET, "/admin/rules") => json(StatusCode::OK, &rules_view(&engine)),
            (Method::GET, "/admin/shadow") => json(StatusCode::OK, &self.shadow_report(&engine).await),
            (Method::POST, "/admin/warm") => {
                let context = QueryContext::from_request(&params, request.headers());
                match read_body(request).await {
                    Ok(body) => warm(&engine, &context, &body).await,
                    Err(response) => response,
                }
            }
            (_, path) => match allowed_method(path) {
                Some(allow) => {
                    let mut response =
                        error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} accepts {allow} requests only"));
                    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
                    response
                }
                None => error(StatusCode::NOT_FOUND, format!("no such admin endpoint: {path}")),
            },
        }
    }

    /// Whether the request carries the token (always, when none is configured). `page` also
    /// accepts it as the `token` URL parameter.
    fn authorized(&self, request: &Request<ClientBody>, page: bool) -> bool {
        let Some(token) = self.token.expose() else { return true };
        let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
        let param = page.then(|| UrlParams::from_uri(request.uri()).get("token")).flatten();
        header.into_iter().chain(param.as_deref()).any(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
    }

    async fn readiness(&self) -> Response<ProxyBody> {
        let mut problems = Vec::new();
        match self.upstream.send(Method::GET, "/ping", http::HeaderMap::new(), RequestBody::Full(Bytes::new())).await {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => problems.push(format!("upstream: /ping answered {}", response.status())),
            Err(e) => problems.push(format!("upstream: {e}")),
        }
        match self.engine.get() {
            None => problems.push("engine: job store or ClickHouse not connected yet".to_string()),
            Some(engine) => {
                if let Err(e) = engine.readiness().await {
                    problems.push(format!("engine (job store, ClickHouse): {e}"));
                }
            }
        }
        if problems.is_empty() {
            text(StatusCode::OK, "ready\n", "text/plain")
        } else {
            json(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({ "ready": false, "problems": problems }))
        }
    }

    async fn shadow_report(&self, engine: &Engine) -> ShadowReport {
        ShadowReport {
            enabled: self.shadow.is_some(),
            rules: self.shadow.as_ref().map(|s| s.summary()).unwrap_or_default(),
            samples: engine.store().samples(50).await.unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot read shadow samples");
                Vec::new()
            }),
        }
    }

    async fn page(&self, engine: &Engine) -> Response<ProxyBody> {
        let filter = JobFilter { limit: 5000, ..JobFilter::default() };
        let jobs = match engine.store().list(&filter).await {
            Ok(jobs) => jobs,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        };
        let report = self.shadow_report(engine).await;
        let html = page::render(&jobs, &report, now_micros());
        text(StatusCode::OK, html, "text/html; charset=utf-8")
    }
}

/// The method an admin endpoint answers, for a 405 on any other.
fn allowed_method(path: &str) -> Option<&'static str> {
    match path {
        "/admin" | "/admin/" | "/admin/jobs" | "/admin/rules" | "/admin/shadow" => Some("GET"),
        "/admin/jobs/invalidate" | "/admin/warm" => Some("POST"),
        _ => None,
    }
}

/// The credentials of an `Authorization: Bearer ...` value (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(request: Request<ClientBody>) -> Result<Bytes, Response<ProxyBody>> {
    Limited::new(request.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}")))
}

async fn jobs(engine: &Engine, params: &UrlParams) -> Response<ProxyBody> {
    let team_id = match params.get("team_id").map(|t| t.parse::<i64>()) {
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "team_id must be an integer"),
        Some(Ok(t)) => Some(t),
        None => None,
    };
    let limit = params.get("limit").and_then(|l| l.parse().ok()).unwrap_or(1000);
    let filter = JobFilter { team_id, query_hash: params.get("query_hash"), limit };
    match engine.store().list(&filter).await {
        Ok(list) => {
            let views: Vec<JobView> = list.into_iter().map(JobView::from).collect();
            json(StatusCode::OK, &serde_json::json!({ "jobs": views }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn invalidate(engine: &Engine, body: &[u8]) -> Response<ProxyBody> {
    let request: InvalidateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("expected {{team_id, query_hash?, start?, end?}}: {e}"));
        }
    };
    let range = match (request.start, request.end) {
        (None, None) => None,
        (start, end) => Some((
            start.map(|s| s.timestamp_micros()).unwrap_or(i64::MIN),
            end.map(|e| e.timestamp_micros()).unwrap_or(i64::MAX),
        )),
    };
    match engine.store().invalidate(request.team_id, request.query_hash.as_deref(), range, now_micros()).await {
        Ok(count) => {
            engine.forget_cached_jobs();
            json(StatusCode::OK, &serde_json::json!({ "invalidated": count }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

fn rules_view(engine: &Engine) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = engine
        .rules()
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "version": r.version,
                "description": r.description,
                "file": r.file.display().to_string(),
                "mode": r.mode,
                "prefilter": r.prefilter,
                "source_table": r.source.table,
                "target_table": r.target.table,
                "columns": r.columns.iter().map(|c| serde_json::json!({
                    "name": c.name,
                    "type": c.stored_type,
                    "forms": c.forms.iter().map(|f| serde_json::json!({"query": f.query.text, "merge": f.merge.text})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({ "rules": rules })
}

async fn warm(engine: &Arc<Engine>, context: &QueryContext, body: &[u8]) -> Response<ProxyBody> {
    let Ok(text) = std::str::from_utf8(body) else { return error(StatusCode::BAD_REQUEST, "the query is not UTF-8") };
    match engine.warm(context, text).await {
        Ok(built) => json(StatusCode::OK, &serde_json::json!({ "occurrences": built.len(), "windows_built": built })),
        Err(e @ WarmError::QueueFull(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials_with_any_case_of_the_scheme() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic YWJj"), None);
        assert_eq!(bearer("Bearer"), None);
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"a", b"ab")
        );
    }

    #[test]
    fn known_endpoints_name_their_method() {
        assert_eq!(allowed_method("/admin/warm"), Some("POST"));
        assert_eq!(allowed_method("/admin/jobs"), Some("GET"));
        assert_eq!(allowed_method("/admin/nope"), None);
    }
}
