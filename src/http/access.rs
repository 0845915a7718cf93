//! One access-log line per request, written when the response body is done (completely sent or
//! dropped because the client went away), so that it can report the bytes actually sent.
//!
//! Only the path is logged, never the URL query string or headers: they carry credentials.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Uri};
use http_body::{Body, Frame, SizeHint};

use crate::http::forward::{BoxError, ProxyBody};
use crate::metrics as m;

/// What is known about a request by the time its response starts.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// HTTP method.
    pub method: Method,
    /// The request URI; only its path is logged.
    pub uri: Uri,
    /// Statement kind, when the query text was read.
    pub kind: &'static str,
    /// Query text size in bytes (0 when not read).
    pub query_bytes: usize,
    /// Response status.
    pub status: u16,
    /// Outcome label: a pass-through reason code or `rewritten`.
    pub outcome: &'static str,
    /// When the request arrived.
    pub started: Instant,
}

/// One request from its arrival to the end of its response: logs the request and releases the
/// in-flight gauge when dropped, whether the response was sent, abandoned mid-body, or never
/// produced because the client hung up first (logged as status 499, outcome `client_closed`, as
/// nginx does).
pub struct RequestLog {
    /// What is known so far; the handler fills it in as the request goes through its phases.
    pub record: AccessRecord,
    bytes: u64,
    complete: bool,
    on_finish: Option<Box<dyn FnOnce() + Send>>,
}

impl RequestLog {
    /// Starts the record of a request that just arrived and counts it in flight.
    pub fn start(method: Method, uri: Uri) -> RequestLog {
        m::request_started();
        let record = AccessRecord {
            method,
            uri,
            kind: "none",
            query_bytes: 0,
            status: 499,
            outcome: "client_closed",
            started: Instant::now(),
        };
        RequestLog { record, bytes: 0, complete: false, on_finish: None }
    }

    /// Wraps the response body `inner`; the log line is written when that body is done.
    pub fn into_body(self, inner: ProxyBody) -> LoggedBody {
        LoggedBody { inner, log: self }
    }

    /// Runs `f` once the request is done (sent, or abandoned by the client).
    pub fn on_finish(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_finish = Some(Box::new(f));
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let r = &self.record;
        let duration_ms = r.started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: "preagg_proxy::access",
            method = %r.method,
            path = %r.uri.path(),
            status = r.status,
            bytes = self.bytes,
            duration_ms = format_args!("{duration_ms:.1}"),
            kind = r.kind,
            query_bytes = r.query_bytes,
            outcome = r.outcome,
            complete = self.complete,
            "request"
        );
        m::request_finished(r.outcome, r.status, r.started.elapsed(), self.complete);
        if let Some(f) = self.on_finish.take() {
            f();
        }
    }
}

/// A response body that counts what it sends; its request is logged when it is dropped.
pub struct LoggedBody {
    inner: ProxyBody,
    log: RequestLog,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.log.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.log.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // A body that reports end-of-stream up front (empty or fully known) may never be polled.
        if self.inner.is_end_stream() {
            self.log.complete = true;
        }
    }
}
