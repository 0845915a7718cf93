//! The ClickHouse HTTP request model: where the query text comes from and how to change it.
//!
//! ClickHouse assembles a query from the `query` URL parameter, then a line feed, then the request
//! body. For `INSERT ... FORMAT` the body is data and is never read as text. Bodies under
//! `Content-Encoding` are decoded to read the text; forwarding an untouched request keeps the
//! original bytes.

use std::borrow::Cow;
use std::io::Read;

use http::{HeaderMap, Uri, header};

/// Errors reading a request as ClickHouse would.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body could not be decoded under its `Content-Encoding`.
    #[error("cannot decode request body with Content-Encoding `{encoding}`: {message}")]
    Decode {
        /// The declared encoding.
        encoding: String,
        /// What is wrong.
        message: String,
    },
    /// The `Content-Encoding` is not one ClickHouse accepts.
    #[error("unsupported Content-Encoding `{0}` (supported: gzip, deflate, zstd, br)")]
    UnknownEncoding(String),
    /// The decoded text is larger than the cap.
    #[error("decoded request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The query text is not UTF-8.
    #[error("query text is not valid UTF-8")]
    NotUtf8,
}

impl RequestError {
    /// The body could not be decoded under `encoding`.
    fn decode(encoding: &str, error: std::io::Error) -> RequestError {
        RequestError::Decode { encoding: encoding.to_string(), message: error.to_string() }
    }
}

/// What kind of statement a query text starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    /// `SELECT`, `WITH` or a parenthesised query: a candidate for rewriting.
    Select,
    /// `INSERT`: the rest of the body is data, never touched.
    Insert,
    /// Anything else (DDL, SHOW, SYSTEM, EXPLAIN, ...).
    Other,
    /// No text at all.
    Empty,
}

impl StatementKind {
    /// Stable lowercase name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Insert => "insert",
            StatementKind::Other => "other",
            StatementKind::Empty => "empty",
        }
    }
}

/// Classifies a query by its first keyword, skipping whitespace and comments.
pub fn statement_kind(text: &str) -> StatementKind {
    let rest = skip_space_and_comments(text);
    let word = &rest[..rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len())];
    if rest.is_empty() {
        StatementKind::Empty
    } else if rest.starts_with('(') || word.eq_ignore_ascii_case("select") || word.eq_ignore_ascii_case("with") {
        StatementKind::Select
    } else if word.eq_ignore_ascii_case("insert") {
        StatementKind::Insert
    } else {
        StatementKind::Other
    }
}

fn skip_space_and_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map(|(_, r)| r).unwrap_or("");
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map(|(_, r)| r).unwrap_or("");
        } else {
            return s;
        }
    }
}

/// The raw (percent-encoded) URL query string split into `key=value` segments, so that one
/// parameter can be replaced while every other byte stays as the client sent it.
#[derive(Debug, Clone)]
pub struct UrlParams {
    raw: String,
}

impl UrlParams {
    /// Parameters of a request URI.
    pub fn from_uri(uri: &Uri) -> UrlParams {
        UrlParams { raw: uri.query().unwrap_or("").to_string() }
    }

    /// Decoded `(name, value)` pairs in order.
    pub fn pairs(&self) -> impl Iterator<Item = (String, String)> + '_ {
        form_urlencoded::parse(self.raw.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
    }

    /// The decoded value of the first parameter named `name`: ClickHouse reads parameters with
    /// Poco's `HTMLForm::get`, which returns the first. Bytes that are not UTF-8 become U+FFFD.
    pub fn get(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.raw.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }

    /// The `query` parameter ClickHouse runs (the first), decoded exactly: its text is edited and
    /// encoded again, so a value that does not decode to UTF-8 is an error, not replaced bytes.
    pub fn query(&self) -> Result<Option<String>, RequestError> {
        let Some(segment) = self.query_segment() else { return Ok(None) };
        let value = segment.split_once('=').map_or("", |(_, value)| value).replace('+', " ");
        let decoded = percent_encoding::percent_decode_str(&value).decode_utf8().map_err(|_| RequestError::NotUtf8)?;
        Ok(Some(decoded.into_owned()))
    }

    /// The raw query string with the first `query=` parameter's value replaced by `value`,
    /// percent-encoded; all other segments, later `query=` ones included, keep their exact bytes.
    pub fn with_query(&self, value: &str) -> String {
        let encoded: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
        let first = self.query_segment().map(|segment| segment.as_ptr());
        self.raw
            .split('&')
            .map(
                |segment| {
                    if Some(segment.as_ptr()) == first { format!("query={encoded}") } else { segment.to_string() }
                },
            )
            .collect::<Vec<_>>()
            .join("&")
    }

    /// The raw `name=value` segment of the first `query` parameter.
    fn query_segment(&self) -> Option<&str> {
        self.raw.split('&').find(|segment| {
            let name = segment.split('=').next().unwrap_or("");
            form_urlencoded::parse(name.as_bytes()).next().is_some_and(|(name, _)| name == "query")
        })
    }
}

/// Where a query's text came from: the parts ClickHouse joins with a line feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryText {
    /// The decoded `query` URL parameter.
    pub url_part: Option<String>,
    /// The decoded request body, when it is query text.
    pub body_part: Option<String>,
}

/// Which part of the request a byte range of the full text falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPart {
    /// Inside the `query` URL parameter.
    Url,
    /// Inside the body.
    Body,
    /// Across both (cannot be edited in place).
    Both,
}

impl QueryText {
    /// The query as ClickHouse sees it: `url_part + "\n" + body_part` (borrowed when one part
    /// is all there is).
    pub fn full(&self) -> Cow<'_, str> {
        match (&self.url_part, &self.body_part) {
            (Some(u), Some(b)) => Cow::Owned(format!("{u}\n{b}")),
            (Some(only), None) | (None, Some(only)) => Cow::Borrowed(only),
            (None, None) => Cow::Borrowed(""),
        }
    }

    /// Which part holds the full-text byte range `start..end`.
    pub fn part_of(&self, start: usize, end: usize) -> TextPart {
        match (&self.url_part, &self.body_part) {
            (Some(u), Some(_)) if end <= u.len() => TextPart::Url,
            (Some(u), Some(_)) if start > u.len() => TextPart::Body,
            (Some(_), Some(_)) => TextPart::Both,
            (Some(_), None) => TextPart::Url,
            _ => TextPart::Body,
        }
    }

    /// Splits an edited full text back into its parts; `None` when the edit moved the separator.
    pub fn split_edited(&self, edited: &str, part: TextPart) -> Option<QueryText> {
        match (part, &self.url_part, &self.body_part) {
            (TextPart::Url, Some(_), Some(b)) => {
                let url = edited.strip_suffix(b.as_str())?.strip_suffix('\n')?;
                Some(QueryText { url_part: Some(url.to_string()), body_part: Some(b.clone()) })
            }
            (TextPart::Body, Some(u), Some(_)) => {
                let body = edited.strip_prefix(u.as_str())?.strip_prefix('\n')?;
                Some(QueryText { url_part: Some(u.clone()), body_part: Some(body.to_string()) })
            }
            (TextPart::Url, Some(_), None) => Some(QueryText { url_part: Some(edited.to_string()), body_part: None }),
            (TextPart::Body, None, Some(_)) => Some(QueryText { url_part: None, body_part: Some(edited.to_string()) }),
            _ => None,
        }
    }
}

/// The `Content-Encoding` of a request body, if any, as ClickHouse's `chooseCompressionMethod`
/// reads it: exactly empty, `none` or `auto` mean none; any other value is a method name, in any
/// case (returned lowercased). Names ClickHouse does not know (`identity`, `x-gzip`) make it
/// refuse the request, so [`decode_body`] refuses them too and the request goes upstream
/// untouched, for ClickHouse to answer.
pub fn content_encoding(headers: &HeaderMap) -> Option<String> {
    let value = String::from_utf8_lossy(headers.get(header::CONTENT_ENCODING)?.as_bytes()).trim().to_string();
    (!matches!(value.as_str(), "" | "none" | "auto")).then(|| value.to_ascii_lowercase())
}

/// Whether the body is `multipart/form-data` (external tables): never query text.
pub fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/"))
}

/// Decodes a complete body under `encoding`, refusing to inflate beyond `cap` bytes.
pub fn decode_body(raw: &[u8], encoding: Option<&str>, cap: usize) -> Result<Vec<u8>, RequestError> {
    let Some(encoding) = encoding else {
        return Ok(raw.to_vec());
    };
    let reader = decoder(raw, encoding)?;
    let mut out = Vec::new();
    reader.take(cap as u64 + 1).read_to_end(&mut out).map_err(|e| RequestError::decode(encoding, e))?;
    if out.len() > cap {
        return Err(RequestError::TooLarge(cap));
    }
    Ok(out)
}

/// Decodes as much of a body prefix as possible (for a body too large to read whole), to see
/// whether it starts an INSERT. Errors from the truncated stream are expected and ignored.
pub fn decode_prefix(raw: &[u8], encoding: Option<&str>, limit: usize) -> Vec<u8> {
    let Some(encoding) = encoding else {
        return raw[..raw.len().min(limit)].to_vec();
    };
    let mut out = Vec::new();
    if let Ok(mut reader) = decoder(raw, encoding) {
        let mut buf = [0u8; 4096];
        while out.len() < limit {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }
    out.truncate(limit);
    out
}

/// A reader of `raw` decoded under `encoding`. Never inlined: the decoders' states are built on
/// the stack before they are boxed (brotli's alone is tens of kilobytes), and a caller that
/// inlined this would carry that frame, and touch its pages, on every request, compressed or not.
#[inline(never)]
fn decoder<'a>(raw: &'a [u8], encoding: &str) -> Result<Box<dyn Read + 'a>, RequestError> {
    Ok(match encoding {
        "gzip" | "gz" => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(raw)),
        "zstd" | "zst" => {
            Box::new(zstd::stream::read::Decoder::new(raw).map_err(|e| RequestError::decode(encoding, e))?)
        }
        "br" | "brotli" => Box::new(brotli::Decompressor::new(raw, 64 * 1024)),
        other => return Err(RequestError::UnknownEncoding(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn kinds() {
        assert_eq!(statement_kind("  -- c\n/* x */ select 1"), StatementKind::Select);
        assert_eq!(statement_kind("WITH x AS (SELECT 1) SELECT * FROM x"), StatementKind::Select);
        assert_eq!(statement_kind("(SELECT 1)"), StatementKind::Select);
        assert_eq!(statement_kind("insert into t format CSV\n1"), StatementKind::Insert);
        assert_eq!(statement_kind("CREATE TABLE t"), StatementKind::Other);
        assert_eq!(statement_kind("  "), StatementKind::Empty);
    }

    #[test]
    fn the_first_query_parameter_is_read_exactly_and_is_the_only_one_replaced() {
        let p = UrlParams::from_uri(&"/?query=SELECT+1&database=a&query=SELECT%202&database=b".parse().unwrap());
        assert_eq!(p.query().unwrap().as_deref(), Some("SELECT 1"));
        assert_eq!(p.get("database").as_deref(), Some("a"));
        assert_eq!(p.with_query("SELECT 3"), "query=SELECT+3&database=a&query=SELECT%202&database=b");
        let invalid = UrlParams::from_uri(&"/?query=SELECT+%27%FF%27".parse().unwrap());
        assert!(matches!(invalid.query(), Err(RequestError::NotUtf8)));
        assert_eq!(UrlParams::from_uri(&"/?query".parse().unwrap()).query().unwrap().as_deref(), Some(""));
        assert_eq!(UrlParams::from_uri(&"/?user=a".parse().unwrap()).query().unwrap(), None);
    }

    #[test]
    fn content_encodings_are_named_as_clickhouse_names_them() {
        let encoding = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_ENCODING, http::HeaderValue::from_str(value).unwrap());
            content_encoding(&headers)
        };
        assert_eq!(encoding("none"), None);
        assert_eq!(encoding("auto"), None);
        assert_eq!(encoding(" GZip ").as_deref(), Some("gzip"));
        assert_eq!(encoding("NONE").as_deref(), Some("none"));
        for unknown in ["identity", "x-gzip", "NONE", "xz"] {
            let name = encoding(unknown).unwrap();
            assert!(matches!(decode_body(b"SELECT 1", Some(&name), 1024), Err(RequestError::UnknownEncoding(_))));
        }
    }

    #[test]
    fn url_params_replace_only_query() {
        let uri: Uri = "/?user=a%20b&query=SELECT%201&query_id=x%2By&param_p=%27q%27".parse().unwrap();
        let p = UrlParams::from_uri(&uri);
        assert_eq!(p.get("query").as_deref(), Some("SELECT 1"));
        assert_eq!(p.get("query_id").as_deref(), Some("x+y"));
        assert_eq!(
            p.with_query("SELECT 'é'&2"),
            "user=a%20b&query=SELECT+%27%C3%A9%27%262&query_id=x%2By&param_p=%27q%27"
        );
    }

    #[test]
    fn full_text_and_parts() {
        let q = QueryText { url_part: Some("SELECT a".into()), body_part: Some("FROM t".into()) };
        assert_eq!(q.full(), "SELECT a\nFROM t");
        assert_eq!(q.part_of(0, 8), TextPart::Url);
        assert_eq!(q.part_of(9, 15), TextPart::Body);
        assert_eq!(q.part_of(5, 12), TextPart::Both);
        let edited = "SELECT a\nFROM u";
        assert_eq!(q.split_edited(edited, TextPart::Body).unwrap().body_part.as_deref(), Some("FROM u"));
    }

    #[test]
    fn decodes_every_encoding() {
        let text = b"SELECT 1";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(&decode_body(&gz, Some("gzip"), 100).unwrap()[..], text);
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(text).unwrap();
        assert_eq!(&decode_body(&zl.finish().unwrap(), Some("deflate"), 100).unwrap()[..], text);
        let zs = zstd::encode_all(&text[..], 3).unwrap();
        assert_eq!(&decode_body(&zs, Some("zstd"), 100).unwrap()[..], text);
        let mut br = Vec::new();
        brotli::CompressorWriter::new(&mut br, 4096, 5, 22).write_all(text).unwrap();
        assert_eq!(&decode_body(&br, Some("br"), 100).unwrap()[..], text);
        assert!(matches!(decode_body(&gz, Some("gzip"), 4), Err(RequestError::TooLarge(4))));
        assert!(matches!(decode_body(b"xx", Some("lzma"), 4), Err(RequestError::UnknownEncoding(_))));
        assert!(decode_body(b"not gzip", Some("gzip"), 100).is_err());
        assert_eq!(&decode_prefix(&gz[..gz.len() - 4], Some("gzip"), 6), b"SELECT");
    }
}
