//! gRPC over HTTP/2 framing as the transcoder needs it: a length-prefixed message out, and
//! messages and trailers read back one at a time from a streaming response body (a message
//! split across DATA frames, or several in one, either way). Only uncompressed messages: the
//! transcoder never offers the service an encoding.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body as _;
use meshgate_agent::http::{Body, BoxError};

/// One length-prefixed gRPC message (flag 0, big-endian length, bytes).
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    b.put_slice(message);
    b.freeze()
}

/// What the next read of a gRPC body gave.
#[derive(Debug)]
pub enum Item {
    /// One whole message.
    Message(Bytes),
    /// The body ended; its trailers, if any.
    End(Option<HeaderMap>),
}

/// Why a gRPC body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A compressed message (none was asked for).
    #[error("the service sent a compressed message, which the transcoder did not ask for")]
    Compressed,
    /// A message larger than allowed.
    #[error("the service sent a message of {size} bytes, more than the {limit} allowed")]
    TooLarge {
        /// Its declared size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The body ended inside a message.
    #[error("the service's response ended inside a message")]
    Truncated,
    /// The body failed (reset, idle timeout).
    #[error("the service's response failed: {0}")]
    Body(BoxError),
}

/// Reads messages from a gRPC response body.
pub struct Reader {
    body: Body,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    done: bool,
    limit: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("buffered", &self.buf.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// A reader of `body`, refusing messages over `limit` bytes.
    pub fn new(body: Body, limit: usize) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            trailers: None,
            done: false,
            limit,
        }
    }

    /// The next message, or the end.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Item, FrameError>> {
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] & 1 == 1 {
                    return Poll::Ready(Err(FrameError::Compressed));
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > self.limit {
                    return Poll::Ready(Err(FrameError::TooLarge {
                        size: len,
                        limit: self.limit,
                    }));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    return Poll::Ready(Ok(Item::Message(self.buf.split_to(len).freeze())));
                }
            }
            if self.done {
                return Poll::Ready(if self.buf.is_empty() {
                    Ok(Item::End(self.trailers.take()))
                } else {
                    Err(FrameError::Truncated)
                });
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => self.done = true,
                Some(Err(e)) => return Poll::Ready(Err(FrameError::Body(e))),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => self.buf.extend_from_slice(&d),
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.trailers = Some(t);
                        }
                    }
                },
            }
        }
    }

    /// [`Reader::poll_next`] as a future.
    pub async fn next(&mut self) -> Result<Item, FrameError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body(parts: Vec<Result<http_body::Frame<Bytes>, BoxError>>) -> Body {
        StreamBody::new(futures_util::stream::iter(parts)).boxed()
    }

    #[tokio::test]
    async fn messages_split_or_joined_across_data_frames_come_out_whole() {
        let a = frame(b"hello");
        let b = frame(b"");
        let c = frame(&[7u8; 300]);
        let mut all = Vec::new();
        all.extend_from_slice(&a);
        all.extend_from_slice(&b);
        all.extend_from_slice(&c);
        // cut at awkward places: inside a header, inside a message
        let cuts = [3, 9, 12, 100];
        let mut parts = Vec::new();
        let mut at = 0;
        for c in cuts {
            parts.push(Ok(http_body::Frame::data(Bytes::copy_from_slice(
                &all[at..c],
            ))));
            at = c;
        }
        parts.push(Ok(http_body::Frame::data(Bytes::copy_from_slice(
            &all[at..],
        ))));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().expect("v"));
        parts.push(Ok(http_body::Frame::trailers(t)));
        let mut r = Reader::new(body(parts), 1024);
        let mut got = Vec::new();
        loop {
            match r.next().await.expect("reads") {
                Item::Message(m) => got.push(m.len()),
                Item::End(t) => {
                    assert_eq!(t.expect("trailers")["grpc-status"], "0");
                    break;
                }
            }
        }
        assert_eq!(got, [5, 0, 300]);
    }

    #[tokio::test]
    async fn bad_bodies_are_errors() {
        let mut big = Reader::new(body(vec![Ok(http_body::Frame::data(frame(&[0; 10])))]), 9);
        assert!(matches!(
            big.next().await,
            Err(FrameError::TooLarge { size: 10, limit: 9 })
        ));
        let mut cut = Reader::new(
            body(vec![Ok(http_body::Frame::data(frame(b"abc").slice(..6)))]),
            9,
        );
        assert!(matches!(cut.next().await, Err(FrameError::Truncated)));
        let mut z = frame(b"abc").to_vec();
        z[0] = 1;
        let mut comp = Reader::new(body(vec![Ok(http_body::Frame::data(z.into()))]), 9);
        assert!(matches!(comp.next().await, Err(FrameError::Compressed)));
    }
}
