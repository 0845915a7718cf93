//! A client's connection, plain TCP or TLS over it, split into the side the connection reads
//! (request heads and bodies, the hang-up watch) and the side it writes answers to. The plain
//! halves are TCP's own; a TLS stream is split behind tokio's lock, which the connection's one
//! task never contends. TLS buffers what it encrypts: the writer flushes before it waits.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

/// An accepted client connection.
pub enum ClientStream {
    /// Plain HTTP.
    Plain(TcpStream),
    /// HTTPS, its handshake done (boxed: a TLS session is a few kilobytes).
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The reading and the writing side.
    pub fn split(self) -> (ReadSide, WriteSide) {
        match self {
            ClientStream::Plain(stream) => {
                let (read, write) = stream.into_split();
                (ReadSide::Plain(read), WriteSide::Plain(write))
            }
            ClientStream::Tls(stream) => {
                let (read, write) = tokio::io::split(*stream);
                (ReadSide::Tls(read), WriteSide::Tls(write))
            }
        }
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
pub enum WriteSide {
    /// TCP's write half.
    Plain(OwnedWriteHalf),
    /// The TLS stream, written under its lock.
    Tls(WriteHalf<TlsStream<TcpStream>>),
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
        match self.get_mut() {
            WriteSide::Plain(write) => Pin::new(write).poll_write(cx, buf),
            WriteSide::Tls(write) => Pin::new(write).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(write) => Pin::new(write).poll_flush(cx),
            WriteSide::Tls(write) => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(write) => Pin::new(write).poll_shutdown(cx),
            WriteSide::Tls(write) => Pin::new(write).poll_shutdown(cx),
        }
    }
}
