//! One access-log line per request, written when the response body is done (completely sent or
//! dropped because the client went away), so that it can report the bytes actually sent.
//!
//! Only the path is logged, never the URL query string or headers: they carry credentials.
//!
//! The line has the shape of the `tracing` subscriber's lines (text or JSON, target
//! `preagg_proxy::access`, level INFO, message `request`) and obeys the same filter, but is
//! formatted here and goes straight to [`log_lines`]: through the subscriber it cost about a
//! sixth of a pass-through request's CPU time.

use std::cell::Cell;
use std::fmt::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Uri};
use http_body::{Body, Frame, SizeHint};

use crate::http::body::ProxyBody;
use crate::http::common::BoxError;
use crate::log_lines::{self, LogFormat};
use crate::metrics as m;

/// The log target of access lines (`--log-filter preagg_proxy::access=off` turns them off).
pub const TARGET: &str = "preagg_proxy::access";

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
        let elapsed = self.record.started.elapsed();
        // The fields are named so that field directives of the filter see them.
        if tracing::enabled!(
            target: TARGET,
            tracing::Level::INFO,
            method,
            path,
            status,
            bytes,
            duration_ms,
            kind,
            query_bytes,
            outcome,
            complete
        ) {
            let line = AccessLine {
                record: &self.record,
                bytes: self.bytes,
                complete: self.complete,
                elapsed,
                at: SystemTime::now(),
            };
            let format = log_lines::format();
            log_lines::write_line(|out| line.write(format, out));
        }
        m::request_finished(self.record.outcome, self.record.status, elapsed, self.complete);
        if let Some(f) = self.on_finish.take() {
            f();
        }
    }
}

/// The access-log line of one finished request.
struct AccessLine<'a> {
    record: &'a AccessRecord,
    bytes: u64,
    complete: bool,
    elapsed: Duration,
    at: SystemTime,
}

/// The JSON form of an access line: the keys of the subscriber's JSON lines, in its order
/// (`duration_ms` is a number; through the subscriber it was a string).
#[derive(serde::Serialize)]
struct AccessJson<'a> {
    timestamp: &'a str,
    level: &'static str,
    message: &'static str,
    method: &'a str,
    path: &'a str,
    status: u16,
    bytes: u64,
    duration_ms: f64,
    kind: &'static str,
    query_bytes: usize,
    outcome: &'static str,
    complete: bool,
    target: &'static str,
}

impl AccessLine<'_> {
    /// Appends the line, with its line feed, to `out`.
    fn write(&self, format: LogFormat, out: &mut Vec<u8>) {
        let r = self.record;
        // Tenths of a millisecond, rounded.
        let tenths = (self.elapsed.as_micros() + 50) / 100;
        match format {
            LogFormat::Json => {
                let mut timestamp = Vec::with_capacity(32);
                write_timestamp(self.at, &mut timestamp);
                let json = AccessJson {
                    timestamp: std::str::from_utf8(&timestamp).unwrap_or_default(),
                    level: "INFO",
                    message: "request",
                    method: r.method.as_str(),
                    path: r.uri.path(),
                    status: r.status,
                    bytes: self.bytes,
                    duration_ms: tenths as f64 / 10.0,
                    kind: r.kind,
                    query_bytes: r.query_bytes,
                    outcome: r.outcome,
                    complete: self.complete,
                    target: TARGET,
                };
                let start = out.len();
                match serde_json::to_writer(&mut *out, &json) {
                    Ok(()) => out.push(b'\n'),
                    // Nothing half-written runs into the next line.
                    Err(_) => out.truncate(start),
                }
            }
            LogFormat::Text => {
                let mut number = itoa::Buffer::new();
                write_timestamp(self.at, out);
                out.extend_from_slice(b"  INFO ");
                out.extend_from_slice(TARGET.as_bytes());
                out.extend_from_slice(b": request method=");
                out.extend_from_slice(r.method.as_str().as_bytes());
                out.extend_from_slice(b" path=");
                out.extend_from_slice(r.uri.path().as_bytes());
                out.extend_from_slice(b" status=");
                out.extend_from_slice(number.format(r.status).as_bytes());
                out.extend_from_slice(b" bytes=");
                out.extend_from_slice(number.format(self.bytes).as_bytes());
                out.extend_from_slice(b" duration_ms=");
                out.extend_from_slice(number.format(tenths / 10).as_bytes());
                out.push(b'.');
                out.extend_from_slice(number.format(tenths % 10).as_bytes());
                // Codes (snake_case identifiers): quoted as the subscriber quotes strings.
                out.extend_from_slice(b" kind=\"");
                out.extend_from_slice(r.kind.as_bytes());
                out.extend_from_slice(b"\" query_bytes=");
                out.extend_from_slice(number.format(r.query_bytes).as_bytes());
                out.extend_from_slice(b" outcome=\"");
                out.extend_from_slice(r.outcome.as_bytes());
                out.extend_from_slice(if self.complete { b"\" complete=true\n" } else { b"\" complete=false\n" });
            }
        }
    }
}

thread_local! {
    /// The last second a line was written in, and its `YYYY-MM-DDTHH:MM:SS` (formatted once).
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// Appends `at` in RFC 3339 with microseconds (`2026-11-21T16:45:01.865060Z`), as the subscriber
/// writes its timestamps; the date and time of day are formatted once per second.
fn write_timestamp(at: SystemTime, out: &mut Vec<u8>) {
    let since_epoch = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != seconds {
        let formatted = humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
        let mut text = String::with_capacity(20);
        // humantime refuses years past 9999 (a clock that wrong is shown as that year's end).
        prefix = match write!(text, "{formatted}") {
            Ok(()) if text.len() >= 19 => text.as_bytes()[..19].try_into().unwrap_or(*b"9999-12-31T23:59:59"),
            _ => *b"9999-12-31T23:59:59",
        };
        SECOND.set((seconds, prefix));
    }
    out.extend_from_slice(&prefix);
    out.push(b'.');
    // Six digits, zero-padded: the digits of 1_000_000 + micros after the leading 1.
    let mut number = itoa::Buffer::new();
    out.extend_from_slice(&number.format(1_000_000 + since_epoch.subsec_micros()).as_bytes()[1..]);
    out.push(b'Z');
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: LogFormat) -> String {
        let record = AccessRecord {
            method: Method::POST,
            uri: "/path?password=secret".parse().unwrap(),
            kind: "select",
            query_bytes: 302,
            status: 200,
            outcome: "not_experiment_query",
            started: Instant::now(),
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        let access =
            AccessLine { record: &record, bytes: 2, complete: true, elapsed: Duration::from_micros(12_349), at };
        let mut out = b"earlier line\n".to_vec();
        access.write(format, &mut out);
        String::from_utf8(out).unwrap().strip_prefix("earlier line\n").unwrap().to_string()
    }

    /// The shape of the subscriber's own text lines, without the query string.
    #[test]
    fn text_line() {
        assert_eq!(
            line(LogFormat::Text),
            "2026-11-18T11:06:40.123456Z  INFO preagg_proxy::access: request method=POST path=/path status=200 \
             bytes=2 duration_ms=12.3 kind=\"select\" query_bytes=302 outcome=\"not_experiment_query\" complete=true\n"
        );
    }

    #[test]
    fn timestamps_keep_their_leading_zeros() {
        let mut out = Vec::new();
        write_timestamp(SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_000_042), &mut out);
        write_timestamp(SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_001_500_000), &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "2026-11-18T11:06:40.000042Z2026-11-18T11:06:41.500000Z");
        let mut out = Vec::new();
        write_timestamp(SystemTime::UNIX_EPOCH - Duration::from_secs(1), &mut out);
        write_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000), &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "1970-01-01T00:00:00.000000Z9999-12-31T23:59:59.000000Z");
    }

    #[test]
    fn json_line() {
        let text = line(LogFormat::Json);
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "timestamp": "2026-11-18T11:06:40.123456Z", "level": "INFO", "method": "POST", "path": "/path",
                "status": 200, "bytes": 2, "duration_ms": 12.3, "kind": "select", "query_bytes": 302,
                "outcome": "not_experiment_query", "complete": true, "message": "request",
                "target": "preagg_proxy::access",
            })
        );
    }
}
