//! The upstream side of the wire: an HTTP/1.1 client connection carrying one request at a time.
//!
//! The request head is written in one piece (with the body, when that is complete and small); a
//! streamed body is written while the response head is awaited, so an upstream that answers
//! early is heard. The response head is parsed by `httparse` straight into the `http` types,
//! hop-by-hop headers dropped on the way, and the response body is decoded (by length, chunked, or
//! until close) by whoever polls it. Nothing is spawned: the request that uses a connection drives
//! it, so passing an answer along costs no hand-off between tasks.
//!
//! The pure parts ([`Outgoing::new`]'s encoding, [`parse_response_head`], [`ChunkedDecoder`]) are
//! tested on their own; [`Connection`] and [`ResponseBody`] do the IO.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::ext::ReasonPhrase;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use super::body::{BodyDecoder, BodyPiece, ChunkedDecoder};
use super::common::{
    BoxError, FramingFields, H1Error, MAX_HEADERS, MAX_RESPONSE_HEAD_BYTES, is_hop_by_hop, push_field,
};

/// Room made in the read buffer before a read: at first (most answers fit), and at most (a long
/// answer read after a full read).
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Complete bodies up to this size are copied behind the head and written with it.
const INLINE_BODY_BYTES: usize = 64 * 1024;

/// How a streamed request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamFraming {
    /// Exactly this many bytes still to come (the client's `Content-Length`).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A request on its way out: encoded pieces still to write, then a body still to stream.
pub struct Outgoing<B> {
    pieces: VecDeque<Bytes>,
    stream: Option<(B, StreamFraming)>,
    written: u64,
    finished: bool,
}

/// The body of a request to send.
pub enum RequestBody<B> {
    /// Known whole (possibly empty).
    Full(Bytes),
    /// Streamed as it arrives.
    Stream(B),
}

impl<B> Outgoing<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Encodes the head of a request for `target`: the request line, `headers` in their order
    /// (names lower case, as hyper writes them) and the body's framing. A complete body gets its
    /// `Content-Length`; an empty one (complete, or a stream that has already ended) keeps whatever
    /// the headers say, as hyper does; a streamed one keeps the client's `Content-Length` or is
    /// sent chunked. `Transfer-Encoding` in `headers` is never copied: the framing written is the
    /// one the body is sent with.
    pub fn new(method: &Method, target: &str, headers: &HeaderMap, body: RequestBody<B>) -> Outgoing<B> {
        let empty = match &body {
            RequestBody::Full(bytes) => bytes.is_empty(),
            RequestBody::Stream(stream) => stream.is_end_stream(),
        };
        // The head's size, with a framing field and a small body inline, so that it is written
        // without growing.
        let fields: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
        let inline = match &body {
            RequestBody::Full(bytes) if bytes.len() <= INLINE_BODY_BYTES => bytes.len(),
            _ => 0,
        };
        let mut head = Vec::with_capacity(method.as_str().len() + target.len() + 13 + fields + 48 + inline);
        head.extend_from_slice(method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            if name == header::TRANSFER_ENCODING || (!empty && name == header::CONTENT_LENGTH) {
                continue;
            }
            push_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
        }
        let (stream, complete) = match body {
            _ if empty => (None, None),
            RequestBody::Full(bytes) => {
                push_field(&mut head, b"content-length", itoa::Buffer::new().format(bytes.len()).as_bytes());
                (None, Some(bytes))
            }
            RequestBody::Stream(stream) => {
                let declared = headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let framing = match declared {
                    Some(length) => {
                        push_field(&mut head, b"content-length", itoa::Buffer::new().format(length).as_bytes());
                        StreamFraming::Length(length)
                    }
                    None => {
                        push_field(&mut head, b"transfer-encoding", b"chunked");
                        StreamFraming::Chunked
                    }
                };
                (Some((stream, framing)), None)
            }
        };
        head.extend_from_slice(b"\r\n");
        let mut pieces = VecDeque::with_capacity(2);
        match complete {
            Some(bytes) if bytes.len() <= INLINE_BODY_BYTES => head.extend_from_slice(&bytes),
            Some(bytes) => pieces.push_back(bytes),
            None => {}
        }
        pieces.push_front(Bytes::from(head));
        Outgoing { pieces, stream, written: 0, finished: false }
    }

    /// Whether no byte of it has reached a connection yet (so it can be sent on another).
    pub fn untouched(&self) -> bool {
        self.written == 0
    }

    /// Writes as much as can be written now; ready once all of it is written and flushed.
    fn poll_write<S: AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, io: &mut S) -> Poll<Result<(), H1Error>> {
        loop {
            while let Some(piece) = self.pieces.front_mut() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, piece))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()));
                }
                self.written += n as u64;
                piece.advance(n);
                if piece.is_empty() {
                    self.pieces.pop_front();
                }
            }
            let Some((body, framing)) = &mut self.stream else {
                if !self.finished {
                    ready!(Pin::new(&mut *io).poll_flush(cx))?;
                    self.finished = true;
                }
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    match framing {
                        StreamFraming::Chunked => self.pieces.push_back(Bytes::from_static(b"0\r\n\r\n")),
                        StreamFraming::Length(0) => {}
                        StreamFraming::Length(_) => return Poll::Ready(Err(H1Error::RequestBodyLength)),
                    }
                    self.stream = None;
                }
                Some(Err(error)) => return Poll::Ready(Err(H1Error::RequestBody(error.into()))),
                Some(Ok(frame)) => {
                    // Request trailers are not forwarded.
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    match framing {
                        StreamFraming::Chunked => {
                            self.pieces.push_back(Bytes::from(format!("{:X}\r\n", data.len())));
                            self.pieces.push_back(data);
                            self.pieces.push_back(Bytes::from_static(b"\r\n"));
                        }
                        StreamFraming::Length(left) => {
                            *left = left.checked_sub(data.len() as u64).ok_or(H1Error::RequestBodyLength)?;
                            self.pieces.push_back(data);
                        }
                    }
                }
            }
        }
    }
}

/// The end-to-end header fields of an upstream response as the upstream wrote them (names in
/// their own case, in their order), one `name: value` line each, passed on to the client without
/// a [`HeaderMap`] in between: building one cost a third of a pass-through request's instructions.
/// Hop-by-hop fields, the fields `Connection` names and `Content-Length` (whose value is kept
/// apart, and written by whoever frames the body) are left out. It travels with the response as an
/// extension; the proxy's own headers are [`set`](UpstreamFields::set) here too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamFields {
    lines: Vec<u8>,
    content_length: Option<u64>,
    dated: bool,
}

impl UpstreamFields {
    /// The fields, each `name: value` and CRLF.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// The body length the upstream's `Content-Length` gave.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// Whether the upstream sent a `Date`.
    pub fn dated(&self) -> bool {
        self.dated
    }

    /// Each field's name and value.
    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines.split(|&b| b == b'\n').filter_map(|line| {
            let line = line.strip_suffix(b"\r")?;
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], &line[colon + 2..]))
        })
    }

    /// The value of the first field named `name` (any case).
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(field, _)| field.eq_ignore_ascii_case(name.as_bytes())).map(|(_, value)| value)
    }

    /// Leaves out the fields named `name` (any case).
    fn remove(&mut self, name: &str) {
        if self.get(name).is_none() {
            return;
        }
        let mut kept = Vec::with_capacity(self.lines.len());
        for (field, value) in self.iter().filter(|(field, _)| !field.eq_ignore_ascii_case(name.as_bytes())) {
            push_field(&mut kept, field, value);
        }
        self.lines = kept;
        if name.eq_ignore_ascii_case("date") {
            self.dated = false;
        }
    }

    /// Sets the field `name` (a header the proxy adds), in place of the upstream's fields of that
    /// name. `Content-Length` and hop-by-hop names are not fields of this kind.
    pub fn set(&mut self, name: &HeaderName, value: &HeaderValue) {
        debug_assert!(name != header::CONTENT_LENGTH && !is_hop_by_hop(name.as_str().as_bytes()));
        self.remove(name.as_str());
        push_field(&mut self.lines, name.as_str().as_bytes(), value.as_bytes());
        self.dated |= name == header::DATE;
    }
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a response to HEAD, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status code.
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The end-to-end header fields, as they came.
    pub fields: UpstreamFields,
    /// The reason phrase, when it is not the status code's usual one.
    pub reason: Option<ReasonPhrase>,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parses a response head at the start of `buffer`, removing it from there; `None` while it is
/// incomplete. `method` is the request's (a response to HEAD has no body).
pub fn parse_response_head(buffer: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, H1Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buffer, &mut slots);
    let length = match parsed {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buffer.len() >= MAX_RESPONSE_HEAD_BYTES => return Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(H1Error::InvalidHead(error.to_string())),
    };
    let code = response.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|e| H1Error::InvalidHead(e.to_string()))?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let reason = response
        .reason
        .filter(|reason| Some(*reason) != status.canonical_reason())
        .and_then(|reason| ReasonPhrase::try_from(reason.as_bytes()).ok());
    // First what the fields say about the connection and the body, then the end-to-end ones
    // copied out (the `Connection` header may name fields that came before it).
    let mut framing_fields = FramingFields::default();
    for h in response.headers.iter() {
        framing_fields.note(h.name.as_bytes(), h.value);
    }
    let FramingFields { ref connection_headers, chunked, transfer_encoded, length: body_length, .. } = framing_fields;
    // Room for the proxy's own header (`X-Preagg`) without a reallocation.
    let mut lines = Vec::with_capacity(length + 128);
    let mut dated = false;
    for h in response.headers.iter() {
        let name = h.name.as_bytes();
        let named_by_connection =
            || connection_headers.iter().any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name));
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case(b"content-length") || named_by_connection() {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        push_field(&mut lines, name, h.value);
    }
    buffer.advance(length);
    let framing = if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if transfer_encoded {
        Framing::UntilClose
    } else {
        match body_length {
            Ok(Some(length)) => Framing::Length(length),
            Err(()) => return Err(H1Error::InvalidHead("invalid Content-Length".into())),
            Ok(None) => Framing::UntilClose,
        }
    };
    let keep_alive = framing_fields.persistent(version) && framing != Framing::UntilClose;
    // A length next to a transfer encoding is ignored, and must not reach the client.
    let content_length = if transfer_encoded { None } else { body_length.ok().flatten() };
    let fields = UpstreamFields { lines, content_length, dated };
    Ok(Some(ResponseHead { status, version, fields, reason, framing, keep_alive }))
}

/// One connection to the upstream, between requests or carrying one. Small to move: the stream
/// (with TLS, over a kilobyte) is boxed.
pub struct Connection<S> {
    io: Box<S>,
    buffer: BytesMut,
    read_size: usize,
    /// The deadline of the response head: one timer for the connection's life, created by its
    /// first request and moved later by each next one. While the old deadline has not passed,
    /// tokio only extends the entry it has (an atomic update), where a timer per request was put
    /// into and taken out of the timer wheel under its lock every time; once it has passed (a
    /// connection idle longer than the timeout) the move re-registers it. Between requests the
    /// timer keeps the waker of the last task that waited for a head, and wakes it once, for
    /// nothing, if the old deadline passes first.
    head_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// A connection over an open stream.
    pub fn new(io: S) -> Connection<S> {
        Connection { io: Box::new(io), buffer: BytesMut::new(), read_size: FIRST_READ, head_deadline: None }
    }

    /// Whether an idle connection can still carry a request: nothing unread, not closed by the
    /// upstream. Never waits (a socket with nothing to read is open).
    pub fn is_open(&mut self) -> bool {
        if !self.buffer.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut *self.io).poll_read(&mut cx, &mut probe).is_pending()
    }

    /// Writes `request` (its body streaming) and reads the response head, which must have come
    /// by `deadline`; interim (1xx) responses are skipped. A response that comes before the
    /// request is all written ends the writing, and the connection is not reused after it.
    pub async fn send<B>(
        mut self,
        method: &Method,
        request: &mut Outgoing<B>,
        deadline: Instant,
    ) -> Result<Exchange<S>, H1Error>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut head_deadline = match self.head_deadline.take() {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let mut write_failed = None;
        let head = poll_fn(|cx| {
            if !request.finished && write_failed.is_none() {
                match request.poll_write(cx, &mut *self.io) {
                    // A socket that failed mid-request may still hold the upstream's answer (an
                    // error it sent before closing): read on. Nothing written, or a request body
                    // that failed, gets no answer.
                    Poll::Ready(Err(error @ H1Error::Io(_))) if !request.untouched() => write_failed = Some(error),
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            loop {
                match parse_response_head(&mut self.buffer, method)? {
                    Some(head) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        return Poll::Ready(Err(H1Error::UnexpectedUpgrade));
                    }
                    Some(head) if head.status.is_informational() => continue,
                    Some(head) => return Poll::Ready(Ok(head)),
                    None => {}
                }
                let read = match self.poll_read(cx) {
                    Poll::Ready(read) => read?,
                    Poll::Pending => {
                        ready!(head_deadline.as_mut().poll(cx));
                        return Poll::Ready(Err(H1Error::HeadTimeout));
                    }
                };
                if read == 0 {
                    return Poll::Ready(Err(write_failed.take().unwrap_or(H1Error::ClosedBeforeResponse)));
                }
            }
        })
        .await?;
        self.head_deadline = Some(head_deadline);
        let reusable = head.keep_alive && request.finished;
        let decoder = match head.framing {
            Framing::Empty | Framing::Length(0) => BodyDecoder::Done,
            Framing::Length(length) => BodyDecoder::Length(length),
            Framing::Chunked => BodyDecoder::Chunked(ChunkedDecoder::Size),
            Framing::UntilClose => BodyDecoder::UntilClose,
        };
        Ok(Exchange { head, body: ResponseBody { connection: Some(self), decoder, reusable } })
    }
}

impl<S: AsyncRead + Unpin> Connection<S> {
    /// Reads what has arrived into the buffer; 0 at the end of the stream. The next read gets
    /// more room after one that filled all it had.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.buffer.reserve(self.read_size);
        let room = self.buffer.capacity() - self.buffer.len();
        let read = ready!(poll_read_buf(Pin::new(&mut *self.io), cx, &mut self.buffer))?;
        if read == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Poll::Ready(Ok(read))
    }
}

/// A response head and the body that follows it on the connection.
pub struct Exchange<S> {
    /// The response head.
    pub head: ResponseHead,
    /// The response body, read from the connection as it is polled.
    pub body: ResponseBody<S>,
}

/// A response body read from its connection as it is polled.
pub struct ResponseBody<S> {
    connection: Option<Connection<S>>,
    decoder: BodyDecoder,
    reusable: bool,
}

impl<S> ResponseBody<S> {
    /// The connection, once the body has ended and the connection can carry another request
    /// (kept alive, the request all written, nothing more sent after the response).
    pub fn take_reusable(&mut self) -> Option<Connection<S>> {
        let reusable = self.reusable
            && self.decoder == BodyDecoder::Done
            && self.connection.as_ref().is_some_and(|c| c.buffer.is_empty());
        if reusable { self.connection.take() } else { None }
    }
}

impl<S: AsyncRead + Unpin> Body for ResponseBody<S> {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else { return Poll::Ready(None) };
            match this.decoder.decode(&mut connection.buffer) {
                Ok(BodyPiece::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(BodyPiece::End) => return Poll::Ready(None),
                Ok(BodyPiece::NeedMore) => {}
                Err(error) => {
                    this.connection = None;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            match ready!(connection.poll_read(cx)) {
                Ok(0) if this.decoder == BodyDecoder::UntilClose => {
                    this.decoder = BodyDecoder::Done;
                    this.connection = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.connection = None;
                    return Poll::Ready(Some(Err(H1Error::IncompleteBody)));
                }
                Ok(_) => {}
                Err(error) => {
                    this.connection = None;
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == BodyDecoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

/// it is an upstream answer, else in its header map.
pub fn set_header<B>(response: &mut Response<B>, name: HeaderName, value: HeaderValue) {
    match response.extensions_mut().get_mut::<UpstreamFields>() {
        Some(fields) => fields.set(&name, &value),
        None => {
            response.headers_mut().insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    type TestBody = Full<Bytes>;

    fn encoded(method: Method, headers: &[(&str, &str)], body: RequestBody<TestBody>) -> String {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        let outgoing = Outgoing::new(&method, "/?query=SELECT%201", &map, body);
        let bytes: Vec<u8> = outgoing.pieces.iter().flat_map(|p| p.iter().copied()).collect();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn request_heads_keep_header_order_and_frame_the_body_they_carry() {
        let get = encoded(
            Method::GET,
            &[("host", "ch:8123"), ("x-clickhouse-user", "u"), ("accept", "*/*")],
            RequestBody::Full(Bytes::new()),
        );
        assert_eq!(
            get,
            "GET /?query=SELECT%201 HTTP/1.1\r\nhost: ch:8123\r\nx-clickhouse-user: u\r\naccept: */*\r\n\r\n"
        );
        let post = encoded(
            Method::POST,
            &[("content-length", "99"), ("transfer-encoding", "chunked")],
            RequestBody::Full(Bytes::from_static(b"SELECT 1")),
        );
        assert_eq!(post, "POST /?query=SELECT%201 HTTP/1.1\r\ncontent-length: 8\r\n\r\nSELECT 1");
        // An empty body keeps the length the client declared, as hyper does.
        let empty = encoded(Method::POST, &[("content-length", "0")], RequestBody::Full(Bytes::new()));
        assert_eq!(empty, "POST /?query=SELECT%201 HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        // A stream still to come (its bytes are not part of the head).
        let pending = || RequestBody::Stream(Full::new(Bytes::from_static(b"twelve bytes")));
        let streamed = encoded(Method::POST, &[("content-length", "12")], pending());
        assert_eq!(streamed, "POST /?query=SELECT%201 HTTP/1.1\r\ncontent-length: 12\r\n\r\n");
        let chunked = encoded(Method::POST, &[("x-a", "1")], pending());
        assert_eq!(chunked, "POST /?query=SELECT%201 HTTP/1.1\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        // A stream that has already ended (a GET's) is sent like an empty body: no framing added.
        let ended = encoded(Method::GET, &[("x-a", "1")], RequestBody::Stream(Full::new(Bytes::new())));
        assert_eq!(ended, "GET /?query=SELECT%201 HTTP/1.1\r\nx-a: 1\r\n\r\n");
    }

    #[test]
    fn large_complete_bodies_are_written_after_the_head_without_a_copy() {
        let body = Bytes::from(vec![b'x'; INLINE_BODY_BYTES + 1]);
        let outgoing =
            Outgoing::<TestBody>::new(&Method::POST, "/", &HeaderMap::new(), RequestBody::Full(body.clone()));
        assert_eq!(outgoing.pieces.len(), 2);
        assert_eq!(outgoing.pieces[1].as_ptr(), body.as_ptr());
    }

    fn head(text: &str, method: &Method) -> Result<Option<ResponseHead>, H1Error> {
        parse_response_head(&mut BytesMut::from(text.as_bytes()), method)
    }

    #[test]
    fn response_heads_give_their_framing_and_lose_their_hop_by_hop_headers() {
        let text = "HTTP/1.1 200 OK\r\nX-ClickHouse-Query-Id: q1\r\nConnection: Keep-Alive, X-Private\r\nX-Private: 1\r\n\
                    Keep-Alive: timeout=10\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nX-ClickHouse-Format: TSV\r\n\r\nrest";
        let mut buffer = BytesMut::from(text.as_bytes());
        let parsed = parse_response_head(&mut buffer, &Method::POST).unwrap().unwrap();
        assert_eq!(&buffer[..], b"rest", "only the head is taken");
        assert_eq!(parsed.framing, Framing::Chunked);
        assert!(parsed.keep_alive);
        assert_eq!(parsed.reason, None);
        assert_eq!(parsed.fields.lines(), b"X-ClickHouse-Query-Id: q1\r\nX-ClickHouse-Format: TSV\r\n");
        assert_eq!(parsed.fields.content_length(), None, "a length next to chunked is dropped");
        assert!(!parsed.fields.dated());

        let length =
            head("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 7, 7\r\n\r\n", &Method::POST).unwrap().unwrap();
        assert_eq!((length.status.as_u16(), length.framing), (500, Framing::Length(7)));
        assert_eq!((length.fields.lines(), length.fields.content_length()), (&b""[..], Some(7)));
        let close =
            head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", &Method::GET).unwrap().unwrap();
        assert!(!close.keep_alive);
        let until_close = head("HTTP/1.1 200 OK\r\n\r\n", &Method::GET).unwrap().unwrap();
        assert_eq!((until_close.framing, until_close.keep_alive), (Framing::UntilClose, false));
        let old = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", &Method::GET).unwrap().unwrap();
        assert_eq!((old.version, old.keep_alive), (Version::HTTP_10, false));
        let old_kept = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n", &Method::GET)
            .unwrap()
            .unwrap();
        assert!(old_kept.keep_alive);
        let to_head = head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", &Method::HEAD).unwrap().unwrap();
        assert_eq!(to_head.framing, Framing::Empty);
        assert_eq!(to_head.fields.content_length(), Some(10));
        let not_modified =
            head("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", &Method::GET).unwrap().unwrap();
        assert_eq!(not_modified.framing, Framing::Empty);
        let reason = head("HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n", &Method::GET).unwrap().unwrap();
        assert_eq!(reason.reason.unwrap().as_bytes(), b"Fine");
    }

    #[test]
    fn upstream_fields_keep_their_spelling_and_order_and_can_be_replaced() {
        let text = "HTTP/1.1 200 OK\r\nDate: Sun, 22 Nov 2026 03:00:00 GMT\r\nx-preagg: forged\r\n\
                    X-ClickHouse-Summary: {\"read_rows\":\"1\"}\r\nEmpty:\r\nX-Preagg: again\r\nContent-Length: 2\r\n\r\n";
        let mut fields = head(text, &Method::GET).unwrap().unwrap().fields;
        assert!(fields.dated());
        assert_eq!(fields.get("x-clickhouse-summary"), Some(&b"{\"read_rows\":\"1\"}"[..]));
        assert_eq!(fields.get("empty"), Some(&b""[..]));
        let names: Vec<_> = fields.iter().map(|(name, _)| String::from_utf8_lossy(name).into_owned()).collect();
        assert_eq!(names, ["Date", "x-preagg", "X-ClickHouse-Summary", "Empty", "X-Preagg"]);
        fields.remove("X-PREAGG");
        assert_eq!(
            fields.lines(),
            b"Date: Sun, 22 Nov 2026 03:00:00 GMT\r\nX-ClickHouse-Summary: {\"read_rows\":\"1\"}\r\nEmpty: \r\n"
        );
        fields.remove("date");
        assert!(!fields.dated());
        assert_eq!(fields.content_length(), Some(2));
        fields.set(&HeaderName::from_static("empty"), &HeaderValue::from_static("set"));
        fields.set(&header::DATE, &HeaderValue::from_static("now"));
        assert_eq!(fields.lines(), b"X-ClickHouse-Summary: {\"read_rows\":\"1\"}\r\nempty: set\r\ndate: now\r\n");
        assert!(fields.dated());
    }

    #[test]
    fn responses_follow_the_shared_framing_rules() {
        let keep = |text: &str| head(text, &Method::GET).unwrap().unwrap().keep_alive;
        assert!(!keep("HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n"));
        assert!(keep("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"));
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", &Method::GET).is_err());
    }

    #[test]
    fn bad_or_unfinished_response_heads_are_told_apart() {
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le", &Method::GET).unwrap().is_none());
        assert!(head("", &Method::GET).unwrap().is_none());
        assert!(matches!(head("SSH-2.0-OpenSSH\r\n\r\n", &Method::GET), Err(H1Error::InvalidHead(_))));
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", &Method::GET),
            Err(H1Error::InvalidHead(_))
        ));
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", &Method::GET),
            Err(H1Error::InvalidHead(_))
        ));
        let endless = format!("HTTP/1.1 200 OK\r\nX-Long: {}", "a".repeat(MAX_RESPONSE_HEAD_BYTES));
        assert!(matches!(head(&endless, &Method::GET), Err(H1Error::HeadTooLarge)));
    }

    /// A deadline no test reaches.
    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(3600)
    }

    /// A connection over an in-memory pipe, and the upstream's end of it.
    fn pipe() -> (Connection<DuplexStream>, DuplexStream) {
        let (client, upstream) = duplex(1 << 20);
        (Connection::new(client), upstream)
    }

    /// A GET sent on a fresh pipe whose upstream has already written `answer`: the exchange, and
    /// the upstream's end.
    async fn answered(answer: &[u8]) -> (Exchange<DuplexStream>, DuplexStream) {
        let (connection, mut upstream) = pipe();
        let mut request =
            Outgoing::<TestBody>::new(&Method::GET, "/", &HeaderMap::new(), RequestBody::Full(Bytes::new()));
        upstream.write_all(answer).await.unwrap();
        (connection.send(&Method::GET, &mut request, later()).await.unwrap(), upstream)
    }

    async fn read_request(upstream: &mut DuplexStream, until: &[u8]) -> Vec<u8> {
        let mut seen = Vec::new();
        while !seen.ends_with(until) {
            let mut byte = [0u8; 1];
            assert_eq!(upstream.read(&mut byte).await.unwrap(), 1, "request ended early: {seen:?}");
            seen.push(byte[0]);
        }
        seen
    }

    #[tokio::test]
    async fn a_response_is_read_past_interim_ones_and_its_connection_comes_back() {
        let (connection, mut upstream) = pipe();
        let mut request =
            Outgoing::<TestBody>::new(&Method::GET, "/ping", &HeaderMap::new(), RequestBody::Full(Bytes::new()));
        upstream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nOk.\n")
            .await
            .unwrap();
        let Exchange { head, mut body } = connection.send(&Method::GET, &mut request, later()).await.unwrap();
        assert_eq!(read_request(&mut upstream, b"\r\n\r\n").await, b"GET /ping HTTP/1.1\r\n\r\n");
        assert_eq!(head.status, 200);
        assert!(body.take_reusable().is_none(), "not before the body is read");
        assert_eq!(body.size_hint().exact(), Some(4));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "Ok.\n");
        assert!(body.is_end_stream());
        let mut again = body.take_reusable().expect("reusable once the body ended");
        assert!(again.is_open());
        drop(upstream);
        assert!(!again.is_open(), "the upstream closed it");
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies_stream_to_their_end() {
        let (Exchange { mut body, .. }, mut upstream) =
            answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n").await;
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "abc");
        upstream.write_all(b"2\r\nde\r\n0\r\n\r\n").await.unwrap();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "de");
        assert!(body.frame().await.is_none());
        assert!(body.take_reusable().is_some());

        let (Exchange { body, .. }, mut upstream) = answered(b"HTTP/1.0 200 OK\r\n\r\nall of it").await;
        let reader = tokio::spawn(async move {
            let mut body = body;
            let collected = (&mut body).collect().await.unwrap().to_bytes();
            (collected, body.take_reusable().is_some())
        });
        upstream.write_all(b", until close").await.unwrap();
        drop(upstream);
        let (collected, reusable) = reader.await.unwrap();
        assert_eq!(collected, "all of it, until close");
        assert!(!reusable);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_an_end() {
        let (Exchange { mut body, .. }, upstream) = answered(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").await;
        drop(upstream);
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "abc");
        assert!(matches!(body.frame().await, Some(Err(H1Error::IncompleteBody))));
        assert!(body.take_reusable().is_none());
    }

    #[tokio::test]
    async fn a_streamed_body_is_sent_chunked_and_an_early_answer_ends_the_writing() {
        let (connection, mut upstream) = pipe();
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stream = StreamBody::new(tokio_stream_from(receiver));
        let mut request = Outgoing::new(&Method::POST, "/", &HeaderMap::new(), RequestBody::Stream(stream));
        sender.send(Ok(Frame::data(Bytes::from_static(b"INSERT ")))).await.unwrap();
        let exchange = tokio::spawn(async move {
            let result = connection.send(&Method::POST, &mut request, later()).await;
            (result.map(|e| e.body.take_reusable_after_end()), request.untouched())
        });
        let head = read_request(&mut upstream, b"\r\n\r\n").await;
        assert!(String::from_utf8(head).unwrap().ends_with("transfer-encoding: chunked\r\n\r\n"));
        assert_eq!(read_request(&mut upstream, b"INSERT \r\n").await, b"7\r\nINSERT \r\n");
        // The upstream answers before the body is done: the answer is heard.
        upstream.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n").await.unwrap();
        let (reusable, untouched) = exchange.await.unwrap();
        assert!(!reusable.unwrap(), "a connection whose request was cut off is not reused");
        assert!(!untouched);
        drop(sender);
    }

    #[tokio::test]
    async fn a_request_that_never_left_can_be_sent_again() {
        let (connection, upstream) = pipe();
        drop(upstream);
        let mut request =
            Outgoing::<TestBody>::new(&Method::GET, "/", &HeaderMap::new(), RequestBody::Full(Bytes::new()));
        assert!(connection.send(&Method::GET, &mut request, later()).await.is_err());
        assert!(request.untouched());
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_does_not_come_by_the_deadline_is_a_timeout_each_request_its_own() {
        let (connection, mut upstream) = pipe();
        let get = || Outgoing::<TestBody>::new(&Method::GET, "/", &HeaderMap::new(), RequestBody::Full(Bytes::new()));
        upstream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.unwrap();
        let soon = Instant::now() + std::time::Duration::from_secs(5);
        let Exchange { mut body, .. } = connection.send(&Method::GET, &mut get(), soon).await.unwrap();
        let connection = body.take_reusable().expect("an empty answer leaves it reusable");
        // The next request comes before the first one's deadline (the timer is moved later),
        // and its head does not come at the first deadline but at its own.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        upstream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let answer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(20)).await;
            upstream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
            upstream
        });
        let Exchange { head, mut body } = connection.send(&Method::GET, &mut get(), deadline).await.unwrap();
        assert_eq!(head.status, 200, "the answer that was waiting");
        let connection = body.take_reusable().unwrap();
        let Exchange { head, mut body } = connection.send(&Method::GET, &mut get(), deadline).await.unwrap();
        assert_eq!(head.status, 204, "came 20 s later, past the first deadline, before its own");
        let connection = body.take_reusable().unwrap();
        let _upstream = answer.await.unwrap();
        // Past every deadline so far (the timer has fired): a new deadline still holds.
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_secs(30);
        let result = connection.send(&Method::GET, &mut get(), deadline).await;
        assert!(matches!(result, Err(H1Error::HeadTimeout)), "no answer came");
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(30));
    }

    /// A stream of the frames sent on `receiver`.
    fn tokio_stream_from(
        mut receiver: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx)))
    }

    impl<S> ResponseBody<S> {
        /// Whether the connection would be reused once this (empty) body is done.
        fn take_reusable_after_end(mut self) -> bool {
            self.take_reusable().is_some()
        }
    }

    #[test]
    fn the_proxys_headers_replace_the_upstreams_own() {
        let head = "HTTP/1.1 200 OK\r\nX-Preagg: forged\r\nContent-Length: 0\r\n\r\n";
        let fields = parse_response_head(&mut bytes::BytesMut::from(head), &Method::GET).unwrap().unwrap().fields;
        let mut upstream = Response::new(());
        upstream.extensions_mut().insert(fields);
        set_header(&mut upstream, HeaderName::from_static("x-preagg"), HeaderValue::from_static("rewritten"));
        assert!(upstream.headers().is_empty());
        assert_eq!(upstream.extensions().get::<UpstreamFields>().unwrap().lines(), b"x-preagg: rewritten\r\n");
        let mut own = Response::new(());
        set_header(&mut own, HeaderName::from_static("x-preagg"), HeaderValue::from_static("passthrough"));
        assert_eq!(own.headers()["x-preagg"], "passthrough");
    }
}
