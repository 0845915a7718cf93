//! The first request head of each connection, checked before hyper sees it: a head that is not
//! HTTP gets a ClickHouse-style 400 with a text body saying what is wrong (hyper's own answer to a
//! parse error has no body). A head that parses is handed to hyper untouched, bytes and all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Heads longer than this are left to hyper (which answers 431).
const MAX_HEAD: usize = 64 * 1024;

/// A stream whose first bytes were already read: they are read again first.
pub struct Prefaced<S> {
    preface: Bytes,
    inner: S,
}

/// Reads the first request head of `stream`, all of it within `timeout`. Returns the stream to
/// serve, or `None` when the client sent something that is not HTTP (after answering it), went
/// away, or was too slow.
pub async fn first_head<S>(mut stream: S, timeout: Duration) -> Option<Prefaced<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer)).await;
        match read {
            Ok(Ok(0)) if buffer.is_empty() => return None,
            Ok(Ok(0)) => return Some(Prefaced { preface: buffer.freeze(), inner: stream }),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        match httparse::Request::new(&mut headers).parse(&buffer) {
            Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => continue,
            // Complete, too long, or more headers than fit here: hyper decides.
            Ok(_) | Err(httparse::Error::TooManyHeaders) => {
                return Some(Prefaced { preface: buffer.freeze(), inner: stream });
            }
            Err(error) => {
                let body = format!(
                    "Code: 1001. DB::Exception: preagg-proxy: malformed HTTP request: {error}. (PREAGG_BAD_REQUEST)\n"
                );
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=UTF-8\r\n\
                     X-ClickHouse-Exception-Code: 1001\r\nX-Preagg: passthrough reason=not_query_endpoint\r\n\
                     Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
                tracing::info!(target: "preagg_proxy::access", status = 400, %error, "malformed HTTP request");
                return None;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefaced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.preface.has_remaining() {
            let n = self.preface.len().min(buf.remaining());
            buf.put_slice(&self.preface[..n]);
            self.preface.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefaced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn valid_heads_are_replayed_and_garbage_is_answered() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\nrest").await.unwrap();
        let mut prefaced = first_head(server, Duration::from_secs(1)).await.unwrap();
        let mut replay = vec![0u8; 35];
        prefaced.read_exact(&mut replay).await.unwrap();
        assert_eq!(&replay, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\nrest");

        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
        assert!(first_head(server, Duration::from_secs(1)).await.is_none());
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
        assert!(answer.contains("Code: 1001. DB::Exception: preagg-proxy: malformed HTTP request"), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_trickling_in_gets_the_timeout_for_all_of_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let trickle = tokio::spawn(async move {
            for byte in b"GET /ping HTTP/1.1\r\nHost: x\r\n" {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(&[*byte]).await.is_err() {
                    return;
                }
            }
        });
        assert!(first_head(server, Duration::from_secs(10)).await.is_none(), "a slow head is given up");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        trickle.abort();
    }
}
