//! A client's connection, plain TCP or TLS over it, split into the side the connection reads
//! (request heads and bodies, the hang-up watch) and the side it writes answers to. The plain
//! halves are TCP's own; a TLS stream is split behind tokio's lock, which the connection's one
//! task never contends. TLS buffers what it encrypts: the writer flushes before it waits.
//!
//! The writing side gives up on a client that takes none of its answer for the send timeout (as
//! nginx's `send_timeout`, ClickHouse's `http_send_timeout`): a client that stopped reading
//! would otherwise hold its connection forever. As nginx's, the time counts between writes that
//! do something, and only while a write waits: a long query that sends nothing is not timed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;

/// An accepted client connection.
pub enum ClientStream {
    /// Plain HTTP.
    Plain(TcpStream),
    /// HTTPS, its handshake done (boxed: a TLS session is a few kilobytes).
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The reading and the writing side; a write that waits one to two `send_timeout`s with no
    /// write done meanwhile fails with [`io::ErrorKind::TimedOut`].
    pub fn split(self, send_timeout: Duration) -> (ReadSide, WriteSide) {
        let (read, write) = match self {
            ClientStream::Plain(stream) => {
                let (read, write) = stream.into_split();
                (ReadSide::Plain(read), Writer::Plain(write))
            }
            ClientStream::Tls(stream) => {
                let (read, write) = tokio::io::split(*stream);
                (ReadSide::Tls(read), Writer::Tls(write))
            }
        };
        (read, WriteSide { writer: write, send_timeout, stall: None, progressed: false })
    }
}

/// What a client connection's requests are read from.
pub enum ReadSide {
    /// TCP's read half.
    Plain(OwnedReadHalf),
    /// The TLS stream, read under its lock.
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// What a client connection's answers are written to.
pub struct WriteSide {
    writer: Writer,
    send_timeout: Duration,
    /// The stall timer: made the first time a write waits, then kept and set again.
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether a write did something since the stall timer was last set.
    progressed: bool,
}

/// The connection's writing half.
enum Writer {
    /// TCP's write half.
    Plain(OwnedWriteHalf),
    /// The TLS stream, written under its lock.
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl Writer {
    /// The half itself, to write to.
    fn pinned(&mut self) -> Pin<&mut (dyn AsyncWrite + Send + Unpin)> {
        match self {
            Writer::Plain(write) => Pin::new(write as &mut (dyn AsyncWrite + Send + Unpin)),
            Writer::Tls(write) => Pin::new(write as &mut (dyn AsyncWrite + Send + Unpin)),
        }
    }
}

impl WriteSide {
    /// Passes on what the writer did. A write that waits looks at the stall timer: when it fires
    /// with no write done since it was set, the client has taken nothing for one to two send
    /// timeouts and the write fails; otherwise it is set again. Done writes only note progress,
    /// so an answer that flows costs no timer work.
    fn watch<T>(&mut self, cx: &mut Context<'_>, done: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if done.is_ready() {
            self.progressed = true;
            return done;
        }
        let send_timeout = self.send_timeout;
        if self.stall.is_none() {
            self.progressed = false;
        }
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
        while stall.as_mut().poll(cx).is_ready() {
            if !std::mem::take(&mut self.progressed) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client took none of the answer for {send_timeout:?}"),
                )));
            }
            stall.as_mut().reset(tokio::time::Instant::now() + send_timeout);
        }
        Poll::Pending
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSide::Plain(read) => Pin::new(read).poll_read(cx, buf),
            ReadSide::Tls(read) => Pin::new(read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteSide {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = this.writer.pinned().poll_write(cx, buf);
        this.watch(cx, written)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = this.writer.pinned().poll_flush(cx);
        this.watch(cx, flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let shut = this.writer.pinned().poll_shutdown(cx);
        this.watch(cx, shut)
    }
}
