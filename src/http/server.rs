//! The client side of the wire: one HTTP/1.1 connection's requests, read, handed to a handler and
//! answered, one at a time (pipelined requests wait in the read buffer).
//!
//! A request head is parsed by `httparse` straight into the `http` types; its body is read from
//! the connection by whoever polls the [`ClientBody`] (by length or chunked). A head that is not
//! HTTP gets a ClickHouse-style 400 with a text body saying what is wrong. The response head is
//! written from the handler's `http::Response` in one buffer, with the body's first frames when
//! they are ready, so a small answer leaves in one write. While the handler works and the request
//! body has been read, the connection is watched: a client that hangs up cancels its request.
//!
//! Keep-alive follows RFC 9112 (HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
//! `Connection: keep-alive`); a connection is closed after a response whose request body was not
//! read to its end, after a body that failed, when its client takes none of an answer for the
//! send timeout, and when it is told to close (an idle connection at once, a busy one after its
//! response, which then says `Connection: close`).

use std::fmt::Write as _;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::ext::ReasonPhrase;
use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::body::{BodyDecoder, BodyPiece, ChunkedDecoder};
use super::client::UpstreamFields;
use super::client_io::{ClientStream, ReadSide, WriteSide};
use super::common::{
    ConnectionOption, FramingFields, H1Error, MAX_HEADERS, MAX_REQUEST_HEAD_BYTES, connection_options, ends_in_chunked,
};

/// Room made in the read buffer before a read.
const READ_BYTES: usize = 16 * 1024;

/// Response body data up to this size is copied behind the head (or the previous data) and
/// written with it; larger pieces are written on their own.
const INLINE_BYTES: usize = 16 * 1024;

/// Buffered response bytes are written out once they reach this size.
const FLUSH_BYTES: usize = 64 * 1024;

/// How long a closing connection goes on reading (and dropping) what the client still sends.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// What can go wrong reading a request body.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// The connection failed.
    #[error("cannot read the request body: {0}")]
    Io(#[from] io::Error),
    /// The client closed its side before the end of the body.
    #[error("the client closed the connection before the end of the request body")]
    Incomplete,
    /// The chunked encoding is broken.
    #[error("invalid chunked request body: {0}")]
    Chunked(H1Error),
    /// An earlier read failed; the body cannot go on.
    #[error("the request body failed earlier")]
    Failed,
}

/// The reading side of a connection, shared by the connection (heads, hang-up watch) and the
/// body of the request in progress. Both run on the connection's task: the lock is uncontended.
struct Reader {
    io: ReadSide,
    buffer: BytesMut,
    /// The request body in progress; once [`BodyDecoder::Done`], the next bytes are the next
    /// request.
    body: BodyDecoder,
    /// Reading the body failed (it is then never done: the connection carries no other request).
    body_failed: bool,
    /// How much of the buffer was searched for the end of a request head without finding it.
    scanned: usize,
}

impl Reader {
    /// Reads more bytes into the buffer; `Ok(0)` when the client closed its side.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buffer.capacity() - self.buffer.len() < READ_BYTES / 4 {
            self.buffer.reserve(READ_BYTES);
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buffer)
    }

    /// The next piece of the request body.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        if self.body_failed {
            return Poll::Ready(Some(Err(ClientBodyError::Failed)));
        }
        loop {
            match self.body.decode(&mut self.buffer) {
                Ok(BodyPiece::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(BodyPiece::End) => return Poll::Ready(None),
                Ok(BodyPiece::NeedMore) => {}
                Err(error) => {
                    self.body_failed = true;
                    return Poll::Ready(Some(Err(ClientBodyError::Chunked(error))));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    self.body_failed = true;
                    return Poll::Ready(Some(Err(ClientBodyError::Incomplete)));
                }
                Ok(_) => {}
                Err(error) => {
                    self.body_failed = true;
                    return Poll::Ready(Some(Err(ClientBodyError::Io(error))));
                }
            }
        }
    }

    /// Watches for the client hanging up while its request is handled: `Ready` once it has (or
    /// the connection failed). Only once the body is read (until then, reading is the body's
    /// business) and until the next request begins to arrive: a client that pipelines requests
    /// and then closes its sending side is still answered, as hyper did.
    fn poll_hang_up(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.body != BodyDecoder::Done {
            return Poll::Pending;
        }
        while self.buffer.is_empty() {
            match ready!(self.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
        Poll::Pending
    }
}

/// Locks the reader; a panic while it was held (there is no such code path) leaves bytes that
/// are still consistent, so the guard is taken anyway.
fn lock(reader: &Mutex<Reader>) -> MutexGuard<'_, Reader> {
    reader.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The body of a client's request, read from its connection as it is polled.
pub struct ClientBody {
    /// `None` when the request has no body.
    reader: Option<Arc<Mutex<Reader>>>,
}

impl ClientBody {
    /// A body with nothing in it.
    pub(crate) fn empty() -> ClientBody {
        ClientBody { reader: None }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match &self.reader {
            None => Poll::Ready(None),
            Some(reader) => lock(reader).poll_body(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.as_ref().is_none_or(|reader| lock(reader).body == BodyDecoder::Done)
    }

    fn size_hint(&self) -> SizeHint {
        let Some(reader) = self.reader.as_ref() else { return SizeHint::with_exact(0) };
        let reader = lock(reader);
        if reader.body_failed { SizeHint::default() } else { reader.body.size_hint() }
    }
}

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// Not HTTP, or HTTP this server does not take (answered 400).
    Malformed(String),
    /// Longer than [`MAX_REQUEST_HEAD_BYTES`], or more than [`MAX_HEADERS`] headers (answered 431).
    TooLarge,
}

/// A parsed request head.
#[derive(Debug)]
struct RequestHead {
    request: Request<()>,
    body: BodyDecoder,
    keep_alive: bool,
    expects_continue: bool,
}

/// Parses a request head at the start of `buffer`, removing it from there; `None` while it is
/// incomplete.
fn parse_request_head(buffer: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let head_length = match parsed.parse_with_uninit_headers(buffer, &mut slots) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buffer.len() >= MAX_REQUEST_HEAD_BYTES => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(error) => return Err(HeadError::Malformed(error.to_string())),
    };
    let malformed = |what: &str| HeadError::Malformed(what.to_string());
    let method =
        Method::from_bytes(parsed.method.unwrap_or_default().as_bytes()).map_err(|_| malformed("invalid method"))?;
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Where the target and each header sit in the head, so that they can share its bytes.
    let base = buffer.as_ptr() as usize;
    let offset = |part: &[u8]| part.as_ptr() as usize - base;
    let target = parsed.path.unwrap_or_default().as_bytes();
    let target = (offset(target), target.len());
    let mut spans = Vec::with_capacity(parsed.headers.len());
    let mut framing = FramingFields::default();
    for h in parsed.headers.iter() {
        let name = h.name.as_bytes();
        framing.note(name, h.value);
        spans.push((offset(name), name.len(), offset(h.value), h.value.len()));
    }
    let length = framing.length.map_err(|()| malformed("invalid Content-Length"))?;
    let FramingFields { transfer_encoded, chunked, expects_continue, .. } = framing;
    // RFC 9112 section 6.3: a chunked body, or a length, or none; anything else could be read
    // differently by the upstream (request smuggling), so it is refused.
    let body = match (transfer_encoded, length) {
        (true, Some(_)) => return Err(malformed("both Transfer-Encoding and Content-Length")),
        (true, None) if version == Version::HTTP_10 => return Err(malformed("Transfer-Encoding in HTTP/1.0")),
        (true, None) if !chunked => return Err(malformed("Transfer-Encoding does not end in chunked")),
        (true, None) => BodyDecoder::Chunked(ChunkedDecoder::default()),
        (false, Some(0) | None) => BodyDecoder::Done,
        (false, Some(length)) => BodyDecoder::Length(length),
    };
    if head_length > MAX_REQUEST_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let keep_alive = framing.persistent(version);
    let head = buffer.split_to(head_length).freeze();
    let uri =
        Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1)).map_err(|e| malformed(&e.to_string()))?;
    // Room for one more: forwarding sets `Host`, and a map filled to its capacity grows on any
    // insert, even one that replaces a value.
    let mut headers = HeaderMap::with_capacity(spans.len() + 1);
    for (name_at, name_len, value_at, value_len) in spans {
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len]).map_err(|e| malformed(&e.to_string()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|e| malformed(&e.to_string()))?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let expects_continue = expects_continue && version == Version::HTTP_11 && body != BodyDecoder::Done;
    Ok(Some(RequestHead { request, body, keep_alive, expects_continue }))
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFraming {
    /// No body is written (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    UntilClose,
}

/// Writes the status line and headers of `response` into `out`, adding what the wire needs
/// (framing, `Date`, `Connection`), and says how the body follows. `keep_alive` is cleared when
/// the response ends the connection.
fn encode_response_head<B: Body>(
    out: &mut BytesMut,
    response: &Response<B>,
    request_method: &Method,
    request_version: Version,
    keep_alive: &mut bool,
) -> ResponseFraming {
    let status = response.status();
    out.put_slice(if request_version == Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    match response.extensions().get::<ReasonPhrase>() {
        Some(reason) => out.put_slice(reason.as_bytes()),
        None => out.put_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.put_slice(b"\r\n");
    let headers = response.headers();
    let upstream = response.extensions().get::<UpstreamFields>();
    let (mut length, mut transfer_encoded, mut dated) = (None, false, false);
    if let Some(fields) = upstream {
        out.put_slice(fields.lines());
        dated = fields.dated();
    }
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            length = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoded = true;
        } else if name == header::DATE {
            dated = true;
        } else if name == header::CONNECTION
            && connection_options(value.as_bytes()).any(|option| matches!(option, ConnectionOption::Close))
        {
            *keep_alive = false;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !dated {
        out.put_slice(b"date: ");
        put_date(out);
        out.put_slice(b"\r\n");
    }
    if let Some(upstream_length) = upstream.and_then(UpstreamFields::content_length)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        out.put_slice(b"content-length: ");
        out.put_slice(itoa::Buffer::new().format(upstream_length).as_bytes());
        out.put_slice(b"\r\n");
        length = Some(upstream_length);
    }
    let bodyless = request_method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodyless {
        ResponseFraming::None
    } else if transfer_encoded {
        let chunked = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .is_some_and(|v| ends_in_chunked(v.as_bytes()));
        if chunked { ResponseFraming::Chunked } else { ResponseFraming::UntilClose }
    } else if let Some(length) = length {
        ResponseFraming::Length(length)
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        // A length that does not parse: passed on as it is, the body delimited by closing.
        ResponseFraming::UntilClose
    } else if let Some(exact) = response.body().size_hint().exact() {
        out.put_slice(b"content-length: ");
        out.put_slice(itoa::Buffer::new().format(exact).as_bytes());
        out.put_slice(b"\r\n");
        ResponseFraming::Length(exact)
    } else if request_version == Version::HTTP_11 {
        out.put_slice(b"transfer-encoding: chunked\r\n");
        ResponseFraming::Chunked
    } else {
        ResponseFraming::UntilClose
    };
    if framing == ResponseFraming::UntilClose {
        *keep_alive = false;
    }
    if !*keep_alive && !headers.contains_key(header::CONNECTION) {
        out.put_slice(b"connection: close\r\n");
    } else if *keep_alive && request_version == Version::HTTP_10 {
        out.put_slice(b"connection: keep-alive\r\n");
    }
    out.put_slice(b"\r\n");
    framing
}

thread_local! {
    /// The `Date` value of the current second, formatted once per second per thread.
    static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
}

/// Appends the current time as an HTTP date (RFC 9110 section 5.6.7).
fn put_date(out: &mut BytesMut) {
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    DATE.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            let formatted = httpdate::fmt_http_date(now);
            if formatted.len() == text.len() {
                text.copy_from_slice(formatted.as_bytes());
                *cached = second;
            } else {
                // Not the fixed-width form (years past 9999): written as it is, not cached.
                out.put_slice(formatted.as_bytes());
                return;
            }
        }
        out.put_slice(&text[..]);
    });
}

/// A ClickHouse-style answer to a request head that cannot be served; the connection closes.
fn refusal(error: &HeadError) -> (Vec<u8>, u16) {
    let (status, message) = match error {
        HeadError::Malformed(error) => (StatusCode::BAD_REQUEST, format!("malformed HTTP request: {error}")),
        HeadError::TooLarge => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request head longer than {MAX_REQUEST_HEAD_BYTES} bytes or with more than {MAX_HEADERS} headers"),
        ),
    };
    let body = format!("Code: 1001. DB::Exception: preagg-proxy: {message}. (PREAGG_BAD_REQUEST)\n");
    let answer = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=UTF-8\r\nX-ClickHouse-Exception-Code: 1001\r\n\
         X-Preagg: passthrough reason=bad_request\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    (answer.into_bytes(), status.as_u16())
}

/// Whether `buffer` holds the empty line that ends a head (CRLF or bare LF line ends, as
/// `httparse` takes them), looking only at what follows the first `scanned` bytes.
fn ends_head(buffer: &[u8], scanned: usize) -> bool {
    let from = scanned.saturating_sub(2);
    memchr::memchr_iter(b'\n', &buffer[from..]).any(|at| {
        let next = &buffer[from + at + 1..];
        next.starts_with(b"\n") || next.starts_with(b"\r\n")
    })
}

/// What waiting for a request head came to.
#[expect(clippy::large_enum_variant, reason = "one per request, moved once; a box would allocate")]
enum NextHead {
    Head(RequestHead),
    Refused(HeadError),
    /// The client closed its side, or the read failed: nothing is left to say.
    ClientGone,
    /// The first head's deadline passed, or the connection is being closed (the server shuts
    /// down, or the connection went idle): the client is told, over TLS by a close_notify.
    Closing,
}

/// Waits for the next request head: the one already buffered, or bytes from the client until one
/// is complete. `deadline` bounds the whole head; `close` ends the wait, unless a head has begun
/// and the server is `draining` (it is then answered, within the drain's grace). Both futures
/// are created once per connection: polled here only, they cost a request nothing unless it has
/// to wait.
async fn next_head(
    reader: &Mutex<Reader>,
    mut deadline: Option<Pin<&mut Sleep>>,
    mut close: Pin<&mut WaitForCancellationFutureOwned>,
    draining: &CancellationToken,
) -> NextHead {
    poll_fn(|cx| {
        let mut reader = lock(reader);
        loop {
            // Parsed only once the bytes that end a head have come, each byte searched once: a
            // head trickling in costs no more than one arriving whole.
            if reader.buffer.len() > reader.scanned {
                if ends_head(&reader.buffer, reader.scanned) {
                    match parse_request_head(&mut reader.buffer) {
                        Ok(Some(head)) => {
                            reader.scanned = 0;
                            return Poll::Ready(NextHead::Head(head));
                        }
                        Ok(None) => {}
                        Err(error) => return Poll::Ready(NextHead::Refused(error)),
                    }
                } else if reader.buffer.len() >= MAX_REQUEST_HEAD_BYTES {
                    return Poll::Ready(NextHead::Refused(HeadError::TooLarge));
                }
                reader.scanned = reader.buffer.len();
            }
            match reader.poll_fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(NextHead::ClientGone),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        let timed_out = deadline.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
        let closed = close.as_mut().poll(cx).is_ready() && (reader.buffer.is_empty() || !draining.is_cancelled());
        if timed_out || closed { Poll::Ready(NextHead::Closing) } else { Poll::Pending }
    })
    .await
}

/// Closes the connection the way that keeps a response just written from being lost: the
/// writing side first, then what the client still sends (a body that was not read) is read
/// and dropped for a while, since closing a socket with unread bytes resets the connection, and
/// a reset can overtake the response (nginx's lingering close).
async fn close_lingering(mut write: WriteSide, reader: &Mutex<Reader>) {
    shut_down(&mut write).await;
    let drained = poll_fn(|cx| {
        let mut reader = lock(reader);
        loop {
            reader.buffer.clear();
            match ready!(reader.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
    });
    let _ = tokio::time::timeout(LINGER, drained).await;
}

/// Shuts the writing side down, which over TLS writes a close_notify (the client then knows that
/// nothing was cut off); bounded by [`LINGER`], since a client that reads nothing holds it up.
async fn shut_down(write: &mut WriteSide) {
    let _ = tokio::time::timeout(LINGER, write.shutdown()).await;
}

/// What ends a connection besides its client, and what bounds it.
#[derive(Debug, Clone)]
pub struct ConnectionControl {
    /// Cancelled when the connection is to close (the server drains, or the connection went
    /// idle): at once between requests, else after the answer.
    pub close: CancellationToken,
    /// Cancelled when the server drains: a request head already begun is then still read and
    /// answered. (A connection closed for idleness drops it.)
    pub draining: CancellationToken,
    /// The first request head must arrive whole within this; later ones are left to the
    /// caller's idle watch.
    pub first_head_timeout: std::time::Duration,
    /// Longest the client may take none of an answer before the connection is dropped.
    pub send_timeout: std::time::Duration,
}

/// Serves the requests of one client connection with `handler` until the connection closes or
/// is closed by `control`. A connection this side closes is shut down, not just dropped: a TLS
/// client is sent a close_notify, which tells it that nothing was cut off.
pub async fn serve_connection<H, F, B>(stream: ClientStream, peer: SocketAddr, handler: H, control: ConnectionControl)
where
    H: Fn(Request<ClientBody>, SocketAddr) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let ConnectionControl { close, draining, first_head_timeout, send_timeout } = control;
    let (read, mut write) = stream.split(send_timeout);
    let buffer = BytesMut::with_capacity(READ_BYTES);
    let reader = Mutex::new(Reader { io: read, buffer, body: BodyDecoder::Done, body_failed: false, scanned: 0 });
    let reader = Arc::new(reader);
    let mut first_head_deadline = pin!(tokio::time::sleep(first_head_timeout));
    let mut close_requested = pin!(close.clone().cancelled_owned());
    let mut out = BytesMut::with_capacity(1024);
    let mut first = true;
    loop {
        let deadline = first.then_some(first_head_deadline.as_mut());
        let head = match next_head(&reader, deadline, close_requested.as_mut(), &draining).await {
            NextHead::Head(head) => head,
            NextHead::ClientGone => return,
            NextHead::Closing => return shut_down(&mut write).await,
            NextHead::Refused(error) => {
                let (answer, status) = refusal(&error);
                tracing::info!(target: "preagg_proxy::access", status, error = ?error, %peer, "request head refused");
                let _ = write.write_all(&answer).await;
                close_lingering(write, &reader).await;
                return;
            }
        };
        first = false;
        let RequestHead { request, body, mut keep_alive, expects_continue } = head;
        lock(&reader).body = body;
        if expects_continue && send(&mut write, b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            return;
        }
        let method = request.method().clone();
        let version = request.version();
        let body = match body {
            BodyDecoder::Done => ClientBody::empty(),
            _ => ClientBody { reader: Some(Arc::clone(&reader)) },
        };
        let mut answer = pin!(handler(request.map(|()| body), peer));
        let handled = poll_fn(|cx| {
            if let Poll::Ready(response) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            lock(&reader).poll_hang_up(cx).map(|()| None)
        })
        .await;
        let Some(response) = handled else {
            tracing::debug!(%peer, "client closed the connection while its request was handled");
            return;
        };
        if close.is_cancelled() || body_left_unread(&reader) {
            keep_alive = false;
        }
        out.clear();
        let framing = encode_response_head(&mut out, &response, &method, version, &mut keep_alive);
        if let Err(error) = write_body(&mut write, &reader, &mut out, response.into_body(), framing).await {
            tracing::debug!(%error, %peer, "response not sent whole; closing the connection");
            return;
        }
        // A request body not read to its end leaves the connection mid-request.
        let body_read = lock(&reader).body == BodyDecoder::Done;
        if !keep_alive || !body_read {
            close_lingering(write, &reader).await;
            return;
        }
    }
}

/// Most of an abandoned request body read and dropped to keep its connection (what has come
/// already, as hyper does); a longer one closes the connection.
const DRAIN_BYTES: usize = 256 * 1024;

/// Whether the request body was left unread where nobody can read it any more (its
/// [`ClientBody`] is gone), after what of it has already arrived (up to [`DRAIN_BYTES`]) was
/// read and dropped. The answer then says `Connection: close`: the connection is mid-request.
fn body_left_unread(reader: &Arc<Mutex<Reader>>) -> bool {
    let mut guard = lock(reader);
    if guard.body == BodyDecoder::Done || Arc::strong_count(reader) > 1 {
        return false;
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut drained = 0;
    while drained < DRAIN_BYTES {
        match guard.poll_body(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => drained += frame.data_ref().map_or(0, Bytes::len),
            _ => break,
        }
    }
    guard.body != BodyDecoder::Done
}

/// Why a response body could not be sent whole.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("writing to the client: {0}")]
    Io(#[from] io::Error),
    #[error("the response body failed: {0}")]
    Body(String),
    #[error("the response body does not match its Content-Length")]
    Length,
    #[error("the client closed the connection")]
    HungUp,
}

/// Writes `out` (the head) and the body after it, framed as `framing`; the body's frames that are
/// ready go out with the head. `reader` is watched for the client hanging up.
async fn write_body<B>(
    write: &mut WriteSide,
    reader: &Mutex<Reader>,
    out: &mut BytesMut,
    mut body: B,
    framing: ResponseFraming,
) -> Result<(), SendError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if framing == ResponseFraming::None {
        drop(body);
        send(write, out).await?;
        return Ok(());
    }
    let mut left = match framing {
        ResponseFraming::Length(length) => Some(length),
        _ => None,
    };
    loop {
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                send(write, out).await?;
                out.clear();
                // Waiting for the body (a long query's next block): a client that hangs up
                // meanwhile ends it, instead of the next write.
                let next = poll_fn(|cx| {
                    if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                        return Poll::Ready(Some(frame));
                    }
                    lock(reader).poll_hang_up(cx).map(|()| None)
                });
                next.await.ok_or(SendError::HungUp)?
            }
        };
        let data = match frame {
            None => break,
            Some(Err(error)) => {
                // What was sent stays incomplete: the client sees a body cut short, not an end.
                write.write_all(out).await?;
                return Err(SendError::Body(error.to_string()));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        if let Some(left) = left.as_mut() {
            let Some(rest) = left.checked_sub(data.len() as u64) else {
                // Longer than announced: what fits was sent, the rest is not.
                write.write_all(out).await?;
                return Err(SendError::Length);
            };
            *left = rest;
        }
        if framing == ResponseFraming::Chunked {
            put_chunk_size(out, data.len());
        }
        if data.len() <= INLINE_BYTES {
            out.put_slice(&data);
        } else {
            write.write_all(out).await?;
            out.clear();
            write.write_all(&data).await?;
        }
        if framing == ResponseFraming::Chunked {
            out.put_slice(b"\r\n");
        }
        if out.len() >= FLUSH_BYTES {
            write.write_all(out).await?;
            out.clear();
        }
    }
    // The body has ended: dropped before its last bytes go out, so that what its end records
    // (the access line, the in-flight gauge) is done by the time the client has the whole answer.
    drop(body);
    if framing == ResponseFraming::Chunked {
        out.put_slice(b"0\r\n\r\n");
    }
    send(write, out).await?;
    out.clear();
    match left {
        Some(0) | None => Ok(()),
        Some(_) => Err(SendError::Length),
    }
}

/// Writes `bytes` and flushes: what a TLS connection has encrypted but not yet sent goes out
/// before the connection waits (on plain TCP the flush does nothing).
async fn send(write: &mut WriteSide, bytes: &[u8]) -> io::Result<()> {
    if !bytes.is_empty() {
        write.write_all(bytes).await?;
    }
    write.flush().await
}

/// Appends a chunk-size line: the size in hexadecimal, CRLF.
fn put_chunk_size(out: &mut BytesMut, size: usize) {
    // Writing to a `BytesMut` cannot fail.
    let _ = write!(out, "{size:x}\r\n");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use http_body_util::{Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    fn parse(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request_head(&mut BytesMut::from(text))
    }

    fn malformed(text: &str) -> String {
        match parse(text) {
            Err(HeadError::Malformed(why)) => why,
            other => panic!("{text:?} was not refused as malformed: {other:?}"),
        }
    }

    #[test]
    fn request_heads_give_their_parts_framing_and_keep_alive() {
        let mut buffer = BytesMut::from(
            "POST /?query=SELECT%201 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 5\r\n\r\nhello",
        );
        let head = parse_request_head(&mut buffer).unwrap().unwrap();
        assert_eq!(&buffer[..], b"hello", "the body stays in the buffer");
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri(), "/?query=SELECT%201");
        let values: Vec<_> = head.request.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!((head.body, head.keep_alive, head.expects_continue), (BodyDecoder::Length(5), true, false));
        // Forwarding sets `Host` without growing the map (a reallocation and a rehash).
        let mut wrk =
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Type: t\r\nContent-Length: 0\r\n\r\n").unwrap().unwrap();
        let headers = wrk.request.headers_mut();
        let capacity = headers.capacity();
        headers.insert(header::HOST, HeaderValue::from_static("upstream"));
        assert_eq!(headers.capacity(), capacity);

        let head = parse("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nExpect: 100-continue\r\n\r\n");
        let head = head.unwrap().unwrap();
        assert_eq!(head.body, BodyDecoder::Chunked(ChunkedDecoder::default()));
        assert!(head.expects_continue);
        // No body: nothing to continue with.
        assert!(!parse("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap().expects_continue);

        // A zero length is no body: nothing to wait for, nothing to continue with.
        let head = parse("POST / HTTP/1.1\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n");
        let head = head.unwrap().unwrap();
        assert_eq!((head.body, head.expects_continue), (BodyDecoder::Done, false));

        let keep = |text: &str| parse(text).unwrap().unwrap().keep_alive;
        assert!(!keep("GET / HTTP/1.1\r\nConnection: close, keep-alive\r\n\r\n"), "close wins");
        assert!(!keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none(), "incomplete");
    }

    #[test]
    fn request_heads_that_could_be_read_two_ways_are_refused() {
        assert!(malformed("THIS IS NOT HTTP\r\n\r\n").contains("invalid"));
        malformed("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        malformed("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        malformed("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n");
        malformed("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n");
        malformed("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        malformed("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        // The same length twice is one length.
        let head = parse("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.body, BodyDecoder::Length(5));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(), Some(HeadError::TooLarge));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_HEAD_BYTES));
        assert_eq!(parse(&long).err(), Some(HeadError::TooLarge));
    }

    fn encoded<B: Body>(
        response: &Response<B>,
        method: Method,
        version: Version,
        keep_alive: bool,
    ) -> (String, ResponseFraming, bool) {
        let mut out = BytesMut::new();
        let mut keep_alive = keep_alive;
        let framing = encode_response_head(&mut out, response, &method, version, &mut keep_alive);
        (String::from_utf8(out.to_vec()).unwrap(), framing, keep_alive)
    }

    #[test]
    fn response_heads_say_how_their_body_is_framed() {
        let known = Response::builder().header("date", "then").body(Full::new(Bytes::from("1\n"))).unwrap();
        let (head, framing, keep) = encoded(&known, Method::POST, Version::HTTP_11, true);
        assert_eq!(head, "HTTP/1.1 200 OK\r\ndate: then\r\ncontent-length: 2\r\n\r\n");
        assert_eq!((framing, keep), (ResponseFraming::Length(2), true));

        let stream = || StreamBody::new(futures_util::stream::empty::<Result<Frame<Bytes>, io::Error>>());
        let mut unknown = Response::new(stream());
        unknown.headers_mut().insert("date", HeaderValue::from_static("then"));
        let (head, framing, _) = encoded(&unknown, Method::POST, Version::HTTP_11, true);
        assert!(head.ends_with("transfer-encoding: chunked\r\n\r\n"), "{head}");
        assert_eq!(framing, ResponseFraming::Chunked);
        // An HTTP/1.0 client cannot take chunks: the body ends with the connection.
        let (head, framing, keep) = encoded(&unknown, Method::POST, Version::HTTP_10, true);
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n") && head.ends_with("connection: close\r\n\r\n"), "{head}");
        assert_eq!((framing, keep), (ResponseFraming::UntilClose, false));

        // A HEAD answer keeps the length it was given and writes no body; a reason phrase of
        // the upstream's own is kept; a missing date is added.
        let mut head_answer =
            Response::builder().status(599).header("content-length", "10").body(Full::new(Bytes::new())).unwrap();
        head_answer.extensions_mut().insert(ReasonPhrase::from_static(b"Upstream Says"));
        let (head, framing, _) = encoded(&head_answer, Method::HEAD, Version::HTTP_11, false);
        assert!(head.starts_with("HTTP/1.1 599 Upstream Says\r\ncontent-length: 10\r\ndate: "), "{head}");
        assert!(head.ends_with(" GMT\r\nconnection: close\r\n\r\n"), "{head}");
        assert_eq!(framing, ResponseFraming::None);
    }

    fn upstream_fields(head: &str) -> UpstreamFields {
        let head = crate::http::client::parse_response_head(&mut BytesMut::from(head), &Method::POST);
        head.unwrap().unwrap().fields
    }

    #[test]
    fn upstream_fields_go_out_as_they_came_before_the_proxys_own_headers() {
        let fields = upstream_fields(
            "HTTP/1.1 200 OK\r\nX-ClickHouse-Query-Id: q1\r\nContent-Length: 2\r\nDate: then\r\nKeep-Alive: timeout=10\r\n\r\n",
        );
        let mut answer = Response::new(Full::new(Bytes::from("1\n")));
        answer.extensions_mut().insert(fields);
        answer.headers_mut().insert("x-preagg", HeaderValue::from_static("passthrough"));
        let (head, framing, keep) = encoded(&answer, Method::POST, Version::HTTP_11, true);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nX-ClickHouse-Query-Id: q1\r\nDate: then\r\nx-preagg: passthrough\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!((framing, keep), (ResponseFraming::Length(2), true));
        // The upstream's length is the answer's also to HEAD; a chunked upstream body is passed
        // on chunked, and a date is added when the upstream sent none.
        let mut to_head = Response::new(Full::new(Bytes::new()));
        to_head.extensions_mut().insert(upstream_fields("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"));
        let (head, framing, _) = encoded(&to_head, Method::HEAD, Version::HTTP_11, true);
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\ndate: ") && head.ends_with(" GMT\r\ncontent-length: 10\r\n\r\n"),
            "{head}"
        );
        assert_eq!(framing, ResponseFraming::None);
        let mut chunked =
            Response::new(StreamBody::new(futures_util::stream::empty::<Result<Frame<Bytes>, io::Error>>()));
        chunked.extensions_mut().insert(upstream_fields(
            "HTTP/1.1 200 OK\r\nDate: then\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ));
        let (head, framing, _) = encoded(&chunked, Method::POST, Version::HTTP_11, true);
        assert_eq!(head, "HTTP/1.1 200 OK\r\nDate: then\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(framing, ResponseFraming::Chunked);
    }

    #[test]
    fn chunk_sizes_are_hexadecimal() {
        let mut out = BytesMut::new();
        for size in [1, 15, 16, 4096, 0x12ab] {
            put_chunk_size(&mut out, size);
        }
        assert_eq!(&out[..], b"1\r\nf\r\n10\r\n1000\r\n12ab\r\n");
    }

    /// Sends on its channel when dropped.
    struct Report(tokio::sync::mpsc::UnboundedSender<()>);

    impl Drop for Report {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    /// The send timeout of the tests' servers.
    const SEND_TIMEOUT: Duration = Duration::from_secs(10);

    /// What closes the tests' connections: `closing`, a first head within 10 s, the send timeout.
    fn test_control(closing: &CancellationToken) -> ConnectionControl {
        ConnectionControl {
            close: closing.clone(),
            draining: closing.clone(),
            first_head_timeout: Duration::from_secs(10),
            send_timeout: SEND_TIMEOUT,
        }
    }

    /// The length of `/large`'s answer.
    const LARGE: usize = 8 * 1024 * 1024;

    /// The size asked for the echo server's send buffers and small client receive buffers.
    const SOCKET_BUFFER: u32 = 64 * 1024;

    /// A server on a free port whose handler echoes the method, path and body; `/never` never
    /// answers and `/stalls` never ends its body, `/large` answers [`LARGE`] bytes (each reports
    /// its handler or body being dropped, see [`EchoServer`]), `/broken` answers with a chunked
    /// body that fails after its first piece, `/ignores` answers without reading the request
    /// body, `/slow` echoes after 50 ms.
    async fn echo_server() -> EchoServer {
        let (dropped, reports) = tokio::sync::mpsc::unbounded_channel();
        // Small send buffers, so that `/large` fills them whatever the system's defaults.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(SOCKET_BUFFER).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let closing = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                let dropped = dropped.clone();
                let handler = move |request: Request<ClientBody>, _| {
                    let dropped = dropped.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        if path == "/never" {
                            let _report = Report(dropped.clone());
                            std::future::pending::<()>().await;
                        }
                        if path == "/stalls" {
                            let report = Report(dropped);
                            let first = futures_util::stream::iter([Ok(Frame::data(Bytes::from("first")))]);
                            let stalled = futures_util::stream::poll_fn(move |_| {
                                let _reported_on_drop = &report;
                                Poll::<Option<Result<Frame<Bytes>, io::Error>>>::Pending
                            });
                            return Response::new(StreamBody::new(first.chain(stalled)).boxed_unsync());
                        }
                        if path == "/large" {
                            let report = Report(dropped);
                            let data =
                                futures_util::stream::iter([Ok::<_, io::Error>(Frame::data(Bytes::from(vec![
                                    b'x';
                                    LARGE
                                ])))]);
                            let reported = data.inspect(move |_| {
                                let _reported_on_drop = &report;
                            });
                            return Response::new(StreamBody::new(reported).boxed_unsync());
                        }
                        if path == "/slow" {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if path == "/ignores" {
                            return Response::new(
                                Full::new(Bytes::from("ignored")).map_err(|never| match never {}).boxed_unsync(),
                            );
                        }
                        if path == "/broken" {
                            let pieces = vec![Ok(Frame::data(Bytes::from("first"))), Err(io::Error::other("broken"))];
                            let body = StreamBody::new(futures_util::stream::iter(pieces)).boxed_unsync();
                            return Response::new(body);
                        }
                        let method = request.method().to_string();
                        let body = match request.into_body().collect().await {
                            Ok(body) => body.to_bytes(),
                            Err(error) => Bytes::from(error.to_string()),
                        };
                        let text = format!("{method} {path} {}", String::from_utf8_lossy(&body));
                        Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed_unsync())
                    }
                };
                let stream = ClientStream::Plain(stream);
                tokio::spawn(serve_connection(stream, peer, handler, test_control(&closing)));
            }
        });
        EchoServer { address, shutdown, reports }
    }

    /// A running [`echo_server`].
    struct EchoServer {
        address: SocketAddr,
        /// Cancelled: the server shuts down gracefully.
        shutdown: CancellationToken,
        /// One message per handler or body of `/never`, `/stalls` and `/large` dropped.
        reports: tokio::sync::mpsc::UnboundedReceiver<()>,
    }

    impl EchoServer {
        async fn connect(&self) -> TcpStream {
            TcpStream::connect(self.address).await.unwrap()
        }

        /// A connection whose receive buffer is small (as the server's send buffers).
        async fn connect_small(&self) -> TcpStream {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
            socket.connect(self.address).await.unwrap()
        }
    }

    async fn read_until(stream: &mut TcpStream, end: &str) -> String {
        let mut text = Vec::new();
        let mut piece = [0u8; 4096];
        while !String::from_utf8_lossy(&text).contains(end) {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut piece)).await.unwrap().unwrap();
            if n == 0 {
                break;
            }
            text.extend_from_slice(&piece[..n]);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    #[tokio::test]
    async fn pipelined_chunked_and_continued_requests_are_answered_in_order() {
        let server = echo_server().await;
        let mut client = server.connect().await;
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nonePOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3;ext=1\r\ntwo\r\n0\r\nX-Trailer: t\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
            )
            .await
            .unwrap();
        let answers = read_until(&mut client, "GET /c ").await;
        let bodies: Vec<_> =
            answers.split("\r\n\r\n").skip(1).map(|part| part.split("HTTP/1.1").next().unwrap()).collect();
        assert_eq!(bodies, ["POST /a one", "POST /b two", "GET /c "], "{answers}");

        client.write_all(b"POST /d HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n").await.unwrap();
        let interim = read_until(&mut client, "\r\n\r\n").await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"four").await.unwrap();
        assert!(read_until(&mut client, "POST /d four").await.starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_cancels_its_request() {
        let mut server = echo_server().await;
        let mut client = server.connect().await;
        client.write_all(b"GET /never HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(server.reports.try_recv().is_err(), "the request is still being handled");
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), server.reports.recv()).await.expect("the handler was dropped");

        // The same while the body is awaited after the head went out.
        let mut client = server.connect().await;
        client.write_all(b"GET /stalls HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_until(&mut client, "first").await.starts_with("HTTP/1.1 200 OK\r\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(server.reports.try_recv().is_err(), "the body is still awaited");
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), server.reports.recv()).await.expect("the body was dropped");
    }

    #[tokio::test]
    async fn a_failed_body_is_cut_short_and_an_unread_one_is_dropped_or_closes_the_connection() {
        let server = echo_server().await;
        let mut client = server.connect().await;
        client.write_all(b"GET /broken HTTP/1.1\r\n\r\n").await.unwrap();
        let answer = read_until(&mut client, "\u{0}never").await;
        assert!(answer.ends_with("5\r\nfirst\r\n"), "no last chunk after a failure: {answer:?}");

        // A body the handler left unread: what has come is dropped and the connection kept...
        let mut client = server.connect().await;
        client.write_all(b"POST /ignores HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").await.unwrap();
        let answer = read_until(&mut client, "ignored").await;
        assert!(!answer.contains("connection: close"), "{answer}");
        client.write_all(b"GET /next HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_until(&mut client, "GET /next ").await.starts_with("HTTP/1.1 200 OK\r\n"));
        // ...unless more is still to come: then the answer says so and the connection ends,
        // the answer whole although the client is still sending.
        let mut client = server.connect().await;
        client.write_all(b"POST /ignores HTTP/1.1\r\nContent-Length: 100000\r\n\r\npartial").await.unwrap();
        let answer = read_until(&mut client, "\u{0}never").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(answer.contains("connection: close\r\n") && answer.ends_with("ignored"), "{answer:?}");
    }

    #[tokio::test]
    async fn pipelined_requests_sent_before_a_half_close_are_all_answered() {
        let server = echo_server().await;
        let mut client = server.connect().await;
        client.write_all(b"GET /slow HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let answers = read_until(&mut client, "\u{0}never").await;
        assert!(answers.contains("GET /slow ") && answers.ends_with("GET /b "), "{answers}");
    }

    #[tokio::test]
    async fn garbage_gets_a_clickhouse_style_400_and_graceful_shutdown_closes_idle_connections() {
        let server = echo_server().await;
        let mut client = server.connect().await;
        client.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
        let answer = read_until(&mut client, "\u{0}never").await;
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
        assert!(answer.contains("Code: 1001. DB::Exception: preagg-proxy: malformed HTTP request"), "{answer}");

        let mut idle = server.connect().await;
        idle.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_until(&mut idle, "GET /a ").await.starts_with("HTTP/1.1 200"));
        server.shutdown.cancel();
        assert_eq!(read_until(&mut idle, "\u{0}never").await, "", "closed without another answer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_trickling_in_gets_the_timeout_for_all_of_it() {
        let server = echo_server().await;
        let mut client = server.connect().await;
        let started = tokio::time::Instant::now();
        let mut piece = [0u8; 64];
        for byte in b"GET /ping HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if client.write_all(&[*byte]).await.is_err() {
                break;
            }
            // Closed by the server: the read ends at once.
            if let Ok(read) = tokio::time::timeout(Duration::from_millis(1), client.read(&mut piece)).await {
                assert_eq!(read.unwrap_or(0), 0);
                break;
            }
        }
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(10) && waited <= Duration::from_secs(12), "closed after {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_none_of_its_answer_for_the_send_timeout_is_cut_off() {
        let mut server = echo_server().await;
        let mut stuck = server.connect_small().await;
        stuck.write_all(b"GET /large HTTP/1.1\r\n\r\n").await.unwrap();
        let asked = tokio::time::Instant::now();
        let given_up = tokio::time::timeout(SEND_TIMEOUT * 10, server.reports.recv()).await;
        given_up.expect("the answer was given up");
        let waited = asked.elapsed();
        assert!(waited >= SEND_TIMEOUT && waited <= SEND_TIMEOUT * 2, "given up after {waited:?}");

        // A client that reads, however slowly, is not cut off: the timeout is for one wait.
        let mut slow = server.connect_small().await;
        slow.write_all(b"GET /large HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut received, mut piece) = (0, vec![0; 1024 * 1024]);
        let started = tokio::time::Instant::now();
        while received < LARGE {
            tokio::time::sleep(SEND_TIMEOUT / 4).await;
            let n = slow.read(&mut piece).await.unwrap();
            assert!(n > 0, "closed after {received} bytes");
            received += n;
        }
        assert!(started.elapsed() > SEND_TIMEOUT * 2, "the answer took {:?}", started.elapsed());

        // Nor is an answer whose body keeps it waiting (a long query): no write waits meanwhile.
        let mut waiting = server.connect().await;
        waiting.write_all(b"GET /stalls HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_until(&mut waiting, "first").await.starts_with("HTTP/1.1 200 OK\r\n"));
        tokio::time::sleep(SEND_TIMEOUT * 10).await;
        let still_open = tokio::time::timeout(Duration::from_millis(1), waiting.read(&mut piece)).await;
        assert!(still_open.is_err(), "the connection of an answer waiting for its body was closed");
    }

    /// A TLS server over a socket with a small send buffer, serving one connection whose every
    /// answer is `length` bytes of `x` (at `/pending`, in a body that then never ends); and a
    /// client trusting it, with a small receive buffer.
    async fn tls_pair(length: usize) -> tokio_rustls::client::TlsStream<TcpStream> {
        use crate::http::tls::ClientTls;
        use crate::http::tls_listener::{ListenerCert, ListenerTls, self_signed};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "server");
        let tls = ListenerTls::new(&ListenerCert::load(&cert, &key).unwrap());
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(8 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let stream = ClientStream::Tls(Box::new(tls.acceptor().accept(stream).await.unwrap()));
            let handler = move |request: Request<ClientBody>, _| async move {
                let data = Bytes::from(vec![b'x'; length]);
                if request.uri().path() != "/pending" {
                    return Response::new(Full::new(data).map_err(|never| match never {}).boxed_unsync());
                }
                let first = futures_util::stream::iter([Ok::<_, io::Error>(Frame::data(data))]);
                let body = StreamBody::new(first.chain(futures_util::stream::pending()));
                Response::new(body.boxed_unsync())
            };
            serve_connection(stream, peer, handler, test_control(&CancellationToken::new())).await;
        });
        let trusting = ClientTls::from_ca_file(&cert).unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        let tcp = socket.connect(address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(trusting.rustls_config()).connect(name, tcp).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_client_that_sends_no_head_in_time_is_sent_a_close_notify() {
        let mut client = tls_pair(1).await;
        let connected = tokio::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(60), client.read(&mut [0; 64])).await;
        // Ok(0) only after a close_notify: a bare end of the stream is an error.
        assert_eq!(read.expect("the server closed the connection").unwrap(), 0);
        let waited = connected.elapsed();
        assert!(waited <= Duration::from_secs(10), "closed after {waited:?}");
    }

    /// Reads slowly from `client` until the bytes after the response head hold `length` bytes
    /// of `x`; returns the head and what followed it.
    async fn read_slowly<R: tokio::io::AsyncRead + Unpin>(client: &mut R, length: usize) -> (String, Vec<u8>) {
        let mut received = Vec::new();
        let mut piece = vec![0u8; 16 * 1024];
        // Where the head ends, and how many `x` follow it.
        let (mut head_end, mut xs) = (None, 0);
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut piece)).await;
            let n = read.unwrap_or_else(|_| panic!("stalled after {} bytes", received.len())).unwrap();
            assert!(n > 0, "closed");
            let searched = received.len().saturating_sub(3);
            received.extend_from_slice(&piece[..n]);
            if head_end.is_none()
                && let Some(at) = received[searched..].windows(4).position(|w| w == b"\r\n\r\n")
            {
                head_end = Some(searched + at + 4);
                xs = received[searched + at + 4..].iter().filter(|&&b| b == b'x').count();
            } else if head_end.is_some() {
                xs += piece[..n].iter().filter(|&&b| b == b'x').count();
            }
            if let Some(end) = head_end
                && xs >= length
            {
                let rest = received.split_off(end);
                return (String::from_utf8_lossy(&received).into_owned(), rest);
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    #[tokio::test]
    async fn answers_over_tls_to_a_slow_reader_arrive_whole_on_a_kept_connection() {
        const LENGTH: usize = 2 * 1024 * 1024;
        let mut client = tls_pair(LENGTH).await;
        // The answer fills the socket, so its last piece is still being encrypted and sent when
        // the server is done writing, or waits for the body's next frame: it must reach the
        // client all the same.
        for request in 0..2 {
            client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let (head, body) = read_slowly(&mut client, LENGTH).await;
            assert!(head.contains(&format!("content-length: {LENGTH}")), "{head}");
            assert!(body.len() == LENGTH, "answer {request} intact");
        }
        client.write_all(b"GET /pending HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (head, _) = read_slowly(&mut client, LENGTH).await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
    }
}
