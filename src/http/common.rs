//! What both sides of an HTTP/1.1 connection share: the errors of the wire, the limits on a
//! head, and the rules that decide how a message is framed and whether its connection stays
//! open (RFC 9112), read the same way for requests from clients and responses from the upstream.

use http::{HeaderMap, HeaderName, Version, header};

/// Boxed error of a body being streamed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most headers a head may have (as hyper), requests and responses alike.
pub const MAX_HEADERS: usize = 100;

/// Longest response head accepted (as hyper's default buffer limit).
pub const MAX_RESPONSE_HEAD_BYTES: usize = 400 * 1024;

/// Longest request head accepted: ClickHouse's own limit on a URI (`http_max_uri_size`), since
/// a GET may carry its query text there.
pub const MAX_REQUEST_HEAD_BYTES: usize = 1024 * 1024;

/// What can go wrong on an upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The connection ended before a response head arrived.
    #[error("connection closed before a response")]
    ClosedBeforeResponse,
    /// The response head is not HTTP/1.x.
    #[error("invalid response head: {0}")]
    InvalidHead(String),
    /// The response head is longer than [`MAX_HEAD_BYTES`].
    #[error("response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// No response head by the deadline of [`Connection::send`].
    #[error("no response head by the deadline")]
    HeadTimeout,
    /// The upstream tried to switch protocols.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedUpgrade,
    /// The chunked response body is malformed.
    #[error("invalid chunked encoding in the response body")]
    InvalidChunk,
    /// The connection ended before the response body did.
    #[error("connection closed before the end of the response body")]
    IncompleteBody,
    /// The request body ended short of, or went past, its `Content-Length`.
    #[error("request body does not match its Content-Length")]
    RequestBodyLength,
    /// Reading the request body from the client failed.
    #[error("request body: {0}")]
    RequestBody(BoxError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Whether a header name (any case) describes one connection, not the message (RFC 9110
/// section 7.6.1).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    NAMES.iter().any(|hop| hop.len() == name.len() && hop.eq_ignore_ascii_case(name))
}

/// Appends `name: value` and its line end to a head being written.
pub(crate) fn push_field(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    head.extend_from_slice(name);
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// One option of a `Connection` header (RFC 9110 section 7.6.1).
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionOption {
    /// `close`: the connection ends after this message.
    Close,
    /// `keep-alive`: it stays open.
    KeepAlive,
    /// A header that describes this connection only.
    Header(HeaderName),
}

/// Whether a message leaves its connection open for another (RFC 9112 section 9.3): HTTP/1.1
/// unless a `Connection` header said `close`, HTTP/1.0 only if one said `keep-alive`; `close`
/// wins over `keep-alive` (section 9.6).
pub fn persistent(version: Version, close: bool, keep_alive: bool) -> bool {
    !close && (version == Version::HTTP_11 || keep_alive)
}

/// Whether a `Transfer-Encoding` value ends in `chunked`, the one coding that delimits a body.
pub fn ends_in_chunked(value: &[u8]) -> bool {
    value.rsplit(|b| *b == b',').next().is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Folds one `Content-Length` value into the length of the fields seen before (`seen`): a list
/// of equal lengths is one length (RFC 9110 section 8.6). `None` for a value that is not
/// 1*DIGIT (no sign) or differs from another.
pub fn content_length(value: &[u8], seen: Option<u64>) -> Option<u64> {
    let mut length = seen;
    for part in value.split(|b| *b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let value = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?;
        if length.is_some_and(|length| length != value) {
            return None;
        }
        length = Some(value);
    }
    length
}

/// The options of one `Connection` header value; tokens that are not header names are skipped.
pub fn connection_options(value: &[u8]) -> impl Iterator<Item = ConnectionOption> + '_ {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii).filter_map(|option| {
        if option.eq_ignore_ascii_case(b"close") {
            Some(ConnectionOption::Close)
        } else if option.eq_ignore_ascii_case(b"keep-alive") {
            Some(ConnectionOption::KeepAlive)
        } else {
            HeaderName::from_bytes(option).ok().map(ConnectionOption::Header)
        }
    })
}

/// What a head's fields say about its connection and how its body is framed, noted field by
/// field: the one reading of `Connection`, `Transfer-Encoding`, `Content-Length` and `Expect`
/// that requests and responses share.
#[derive(Debug)]
pub struct FramingFields {
    /// A `Connection: close` was seen.
    pub close: bool,
    /// A `Connection: keep-alive` was seen.
    pub keep_alive: bool,
    /// The headers `Connection` names (hop-by-hop for this message).
    pub connection_headers: Vec<HeaderName>,
    /// A `Transfer-Encoding` was seen.
    pub transfer_encoded: bool,
    /// The last `Transfer-Encoding` ends in `chunked`.
    pub chunked: bool,
    /// The length the `Content-Length` fields agree on; `Err` once one is invalid or differs.
    pub length: Result<Option<u64>, ()>,
    /// An `Expect: 100-continue` was seen.
    pub expects_continue: bool,
}

impl Default for FramingFields {
    fn default() -> FramingFields {
        FramingFields {
            close: false,
            keep_alive: false,
            connection_headers: Vec::new(),
            transfer_encoded: false,
            chunked: false,
            length: Ok(None),
            expects_continue: false,
        }
    }
}

impl FramingFields {
    /// Takes note of one field.
    pub fn note(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"connection") {
            for option in connection_options(value) {
                match option {
                    ConnectionOption::Close => self.close = true,
                    ConnectionOption::KeepAlive => self.keep_alive = true,
                    ConnectionOption::Header(named) => self.connection_headers.push(named),
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoded = true;
            self.chunked = ends_in_chunked(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            self.length = self.length.and_then(|seen| content_length(value, seen).map(Some).ok_or(()));
        } else if name.eq_ignore_ascii_case(b"expect") {
            self.expects_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }

    /// Whether the connection stays open after this message (see [`persistent`]).
    pub fn persistent(&self, version: Version) -> bool {
        persistent(version, self.close, self.keep_alive)
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none (`Connection` is one of them): one pass over the names tells.
    if !headers.keys().any(|name| is_hop_by_hop(name.as_str().as_bytes())) {
        return;
    }
    if let header::Entry::Occupied(connection) = headers.entry(header::CONNECTION) {
        let (_, values) = connection.remove_entry_mult();
        // Usually just `keep-alive`: nothing is allocated then.
        let mut named = Vec::new();
        for value in values {
            for option in connection_options(value.as_bytes()) {
                if let ConnectionOption::Header(name) = option {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    // The other hop-by-hop names present (on responses, usually `Keep-Alive`), without a copy of
    // the header list.
    while let Some(name) = headers.keys().find(|name| is_hop_by_hop(name.as_str().as_bytes())).cloned() {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn framing_rules_are_the_same_for_requests_and_responses() {
        assert_eq!(content_length(b"5", None), Some(5));
        assert_eq!(content_length(b"5, 5", None), Some(5), "a list of one length");
        assert_eq!(content_length(b"5", Some(5)), Some(5), "a second field, the same");
        assert_eq!(content_length(b"5", Some(6)), None);
        for bad in [&b"+5"[..], b"-1", b"5 5", b"", b"5,", b"0x5"] {
            assert_eq!(content_length(bad, None), None, "{}", String::from_utf8_lossy(bad));
        }
        assert!(ends_in_chunked(b"gzip, Chunked "));
        assert!(!ends_in_chunked(b"chunked, gzip"));
        assert!(persistent(Version::HTTP_11, false, false));
        assert!(!persistent(Version::HTTP_10, false, false));
        assert!(persistent(Version::HTTP_10, false, true));
        assert!(!persistent(Version::HTTP_10, true, true), "close wins");
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_named_by_connection() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-clickhouse-user", HeaderValue::from_static("u"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-clickhouse-user"));
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("x-clickhouse-format", HeaderValue::from_static("TSV"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-clickhouse-format"]);
    }
}
