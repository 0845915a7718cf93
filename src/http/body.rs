//! Message bodies: decoding one from a connection's buffer (by length, chunked, or until close),
//! for both sides of the wire, and the boxed body type everything the proxy sends travels in.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{StreamExt, stream};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, BodyStream, Full, StreamBody, combinators::BoxBody};

use super::common::{BoxError, H1Error, MAX_HEADERS};

/// Longest chunk-size line or trailer section accepted.
const MAX_CHUNK_LINE_BYTES: usize = 4096;
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// What a [`ChunkedDecoder`] made of the bytes it was given.
#[derive(Debug, PartialEq)]
enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section (the body has ended).
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More bytes are needed.
    NeedMore,
}

/// Decodes a chunked body (RFC 9112 section 7.1) from a buffer that fills as bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkedDecoder {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, before the trailer section.
    Trailers,
    /// The body has ended.
    Done,
}

impl ChunkedDecoder {
    /// Takes what it can from the front of `buffer`.
    fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match *self {
                ChunkedDecoder::Size => match httparse::parse_chunk_size(buffer) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buffer.advance(used);
                        *self = if size == 0 { ChunkedDecoder::Trailers } else { ChunkedDecoder::Data(size) };
                    }
                    Ok(httparse::Status::Partial) if buffer.len() < MAX_CHUNK_LINE_BYTES => {
                        return Ok(Decoded::NeedMore);
                    }
                    Ok(httparse::Status::Partial) | Err(_) => return Err(H1Error::InvalidChunk),
                },
                ChunkedDecoder::Data(left) => {
                    if buffer.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buffer.len());
                    let rest = left - take as u64;
                    *self = if rest == 0 { ChunkedDecoder::DataEnd } else { ChunkedDecoder::Data(rest) };
                    return Ok(Decoded::Data(buffer.split_to(take).freeze()));
                }
                ChunkedDecoder::DataEnd => match buffer.get(..2) {
                    None if buffer.first().is_none_or(|b| *b == b'\r') => return Ok(Decoded::NeedMore),
                    Some(b"\r\n") => {
                        buffer.advance(2);
                        *self = ChunkedDecoder::Size;
                    }
                    _ => return Err(H1Error::InvalidChunk),
                },
                ChunkedDecoder::Trailers => {
                    if buffer.starts_with(b"\r\n") {
                        buffer.advance(2);
                        *self = ChunkedDecoder::Done;
                        return Ok(Decoded::End);
                    }
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    return match httparse::parse_headers(buffer, &mut slots) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields.iter() {
                                let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(field.name.as_bytes()),
                                    HeaderValue::from_bytes(field.value),
                                ) else {
                                    return Err(H1Error::InvalidChunk);
                                };
                                trailers.append(name, value);
                            }
                            buffer.advance(used);
                            *self = ChunkedDecoder::Done;
                            Ok(Decoded::Trailers(trailers))
                        }
                        Ok(httparse::Status::Partial) if buffer.len() < MAX_TRAILER_BYTES => Ok(Decoded::NeedMore),
                        Ok(httparse::Status::Partial) | Err(_) => Err(H1Error::InvalidChunk),
                    };
                }
                ChunkedDecoder::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// Where a message body is in its framing: what is left of it, read from the front of the
/// connection's buffer. Both sides of the wire decode with it (requests from clients, responses
/// from the upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyDecoder {
    /// This many bytes are still to come.
    Length(u64),
    /// A chunked body, as far as decoded.
    Chunked(ChunkedDecoder),
    /// Everything until the connection closes (responses only).
    UntilClose,
    /// Read to its end (or there was none).
    Done,
}

/// What a [`BodyDecoder`] took from its buffer.
#[derive(Debug)]
pub enum BodyPiece {
    /// Data, or the trailers that end a chunked body.
    Frame(Frame<Bytes>),
    /// The body has ended.
    End,
    /// The buffer holds no more of the body: read more. (A body until close ends when the
    /// connection does, which only its reader knows.)
    NeedMore,
}

impl BodyDecoder {
    /// Takes the next piece of the body from the front of `buffer`; once the body has ended the
    /// decoder is [`BodyDecoder::Done`].
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<BodyPiece, H1Error> {
        match self {
            BodyDecoder::Done | BodyDecoder::Length(0) => {
                *self = BodyDecoder::Done;
                Ok(BodyPiece::End)
            }
            BodyDecoder::Length(_) | BodyDecoder::UntilClose if buffer.is_empty() => Ok(BodyPiece::NeedMore),
            BodyDecoder::Length(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buffer.len());
                *left -= take as u64;
                if *left == 0 {
                    *self = BodyDecoder::Done;
                }
                Ok(BodyPiece::Frame(Frame::data(buffer.split_to(take).freeze())))
            }
            BodyDecoder::UntilClose => Ok(BodyPiece::Frame(Frame::data(buffer.split().freeze()))),
            BodyDecoder::Chunked(decoder) => match decoder.decode(buffer)? {
                Decoded::Data(data) => Ok(BodyPiece::Frame(Frame::data(data))),
                Decoded::NeedMore => Ok(BodyPiece::NeedMore),
                Decoded::Trailers(trailers) => {
                    *self = BodyDecoder::Done;
                    Ok(BodyPiece::Frame(Frame::trailers(trailers)))
                }
                Decoded::End => {
                    *self = BodyDecoder::Done;
                    Ok(BodyPiece::End)
                }
            },
        }
    }

    /// What is known of the size of the rest of the body.
    pub fn size_hint(&self) -> SizeHint {
        match self {
            BodyDecoder::Length(left) => SizeHint::with_exact(*left),
            BodyDecoder::Done => SizeHint::with_exact(0),
            BodyDecoder::Chunked(_) | BodyDecoder::UntilClose => SizeHint::default(),
        }
    }
}

/// Body type of everything the proxy sends, in either direction.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A streaming body passed along as it arrives.
pub fn streaming<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// Chunks already read, followed by the rest of a body still arriving.
pub fn prefixed<B>(prefix: Vec<Bytes>, rest: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let head = stream::iter(prefix.into_iter().map(|b| Ok::<_, BoxError>(Frame::data(b))));
    let tail = BodyStream::new(rest).map(|frame| frame.map_err(|e| Box::new(e) as BoxError));
    BoxBody::new(StreamBody::new(head.chain(tail)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Decodes `wire` fed in pieces of the given sizes; the body, and trailers if any.
    fn decode_in_pieces(wire: &[u8], sizes: &[usize]) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::new();
        let (mut body, mut trailers, mut fed) = (Vec::new(), None, 0);
        let mut sizes = sizes.iter().copied().cycle();
        loop {
            match decoder.decode(&mut buffer)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Trailers(map) => trailers = Some(map),
                Decoded::End => return Ok((body, trailers)),
                Decoded::NeedMore if fed == wire.len() => return Err(H1Error::IncompleteBody),
                Decoded::NeedMore => {
                    let next = (fed + sizes.next().unwrap_or(1).max(1)).min(wire.len());
                    buffer.extend_from_slice(&wire[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn body_decoders_take_their_body_and_no_more_then_are_done() {
        let data = |piece: BodyPiece| match piece {
            BodyPiece::Frame(frame) => frame.into_data().unwrap(),
            other => panic!("{other:?}"),
        };
        let mut buffer = BytesMut::from("hel");
        let mut length = BodyDecoder::Length(5);
        assert_eq!(data(length.decode(&mut buffer).unwrap()), "hel");
        assert!(matches!(length.decode(&mut buffer), Ok(BodyPiece::NeedMore)));
        assert_eq!(length.size_hint().exact(), Some(2));
        buffer.extend_from_slice(b"loNEXT");
        assert_eq!(data(length.decode(&mut buffer).unwrap()), "lo");
        assert_eq!((length, &buffer[..]), (BodyDecoder::Done, &b"NEXT"[..]), "the next message stays");
        assert!(matches!(length.decode(&mut buffer), Ok(BodyPiece::End)));

        let mut until_close = BodyDecoder::UntilClose;
        assert_eq!(data(until_close.decode(&mut buffer).unwrap()), "NEXT");
        assert!(matches!(until_close.decode(&mut buffer), Ok(BodyPiece::NeedMore)));

        let mut chunked = BodyDecoder::Chunked(ChunkedDecoder::default());
        let mut buffer = BytesMut::from("2\r\nab\r\n0\r\nX-T: 1\r\n\r\n");
        assert_eq!(data(chunked.decode(&mut buffer).unwrap()), "ab");
        match chunked.decode(&mut buffer).unwrap() {
            BodyPiece::Frame(frame) => assert_eq!(frame.into_trailers().unwrap()["x-t"], "1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(chunked, BodyDecoder::Done, "trailers end the body");
        assert!(BodyDecoder::Chunked(ChunkedDecoder::default()).decode(&mut BytesMut::from("zz\r\n")).is_err());
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n";
        let (body, trailers) = decode_in_pieces(wire, &[1]).unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.unwrap()["x-checksum"], "1");
        assert!(matches!(decode_in_pieces(b"5\r\nhelloXX", &[100]), Err(H1Error::InvalidChunk)));
        assert!(matches!(decode_in_pieces(b"zz\r\n", &[100]), Err(H1Error::InvalidChunk)));
        assert!(matches!(decode_in_pieces(b"5\r\nhel", &[100]), Err(H1Error::IncompleteBody)));
    }

    proptest! {
        #[test]
        fn chunked_bodies_decode_however_they_are_cut(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            cuts in proptest::collection::vec(1usize..64, 1..8),
            upper in any::<bool>(),
        ) {
            let mut wire = Vec::new();
            for chunk in &chunks {
                let size = if upper { format!("{:X}", chunk.len()) } else { format!("{:x}", chunk.len()) };
                wire.extend_from_slice(size.as_bytes());
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let (body, trailers) = decode_in_pieces(&wire, &cuts).unwrap();
            prop_assert_eq!(body, chunks.concat());
            prop_assert!(trailers.is_none());
        }
    }
}
