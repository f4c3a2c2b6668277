//! Server-streaming answers as NDJSON or SSE, relayed message by message (each gRPC message is
//! written as soon as it is read; nothing is buffered beyond one message).
//!
//! The HTTP status is decided by the first thing the service sends: a message means 200 and a
//! stream; an error before any message is answered with that error's own HTTP status and
//! `{code, message, details}` body. An error after messages cannot change the status any more,
//! so it is written as a final error record — `{"error": {...}}` on its own NDJSON line, or an
//! SSE `event: error` — and the response body then ends with an error, so the transfer is not
//! a clean success (HTTP/1.1: no terminating chunk; HTTP/2: RST_STREAM).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, header};
use http_body::Frame;
use meshgate_agent::http::{Body, BoxError};
use prost_reflect::{DynamicMessage, MessageDescriptor};

use super::{
    GrpcStatus, Output, StreamFormat, error_body,
    frames::{FrameError, Item, Reader},
    render, status,
};

/// The format a client asked for (`Accept`), or the route's default.
pub fn negotiate(h: &HeaderMap, default: StreamFormat) -> StreamFormat {
    let accept = h
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    if accept.contains("text/event-stream") {
        StreamFormat::Sse
    } else if accept.contains("application/x-ndjson") {
        StreamFormat::Ndjson
    } else {
        default
    }
}

/// How long a failed stream keeps its error record in flight before it is cut off, so the
/// record reaches the client ahead of the reset.
const ERROR_GRACE: Duration = Duration::from_millis(50);

/// Everything [`respond`] needs: the first read, the rest of the stream, how to write it.
pub struct Start {
    /// The first message or end of the stream.
    pub first: Result<Item, FrameError>,
    /// A `grpc-status` in the response head (a trailers-only answer).
    pub head_status: Option<GrpcStatus>,
    /// The rest.
    pub reader: Reader,
    /// The message type.
    pub desc: MessageDescriptor,
    /// NDJSON or SSE.
    pub format: StreamFormat,
    /// JSON options.
    pub out: Output,
}

fn failure(e: &FrameError) -> GrpcStatus {
    let code = match e {
        FrameError::Body(_) => 14,
        _ => 13,
    };
    GrpcStatus::local(code, e.to_string())
}

/// The HTTP answer for a server stream.
pub fn respond(s: Start, mut headers: HeaderMap) -> Response<Body> {
    let end_status = |t: Option<HeaderMap>, head: &Option<GrpcStatus>| {
        t.as_ref()
            .and_then(GrpcStatus::from_headers)
            .or_else(|| head.clone())
            .unwrap_or_else(|| {
                GrpcStatus::local(2, "the service ended the stream without a grpc-status")
            })
    };
    let first = match s.first {
        Ok(Item::Message(m)) => m,
        Ok(Item::End(t)) => {
            let st = end_status(t, &s.head_status);
            if st.code != 0 {
                return super::error_response(&s.out.pool, &st, headers);
            }
            // a stream of no messages: an empty, successful body
            set_type(&mut headers, s.format);
            let mut r = Response::new(meshgate_agent::http::empty());
            *r.headers_mut() = headers;
            return r;
        }
        Err(e) => return super::error_response(&s.out.pool, &failure(&e), headers),
    };
    set_type(&mut headers, s.format);
    let body = JsonStream {
        pending: Some(first),
        reader: s.reader,
        desc: s.desc,
        format: s.format,
        out: s.out,
        head_status: s.head_status,
        state: State::Streaming,
    };
    let mut r = Response::new(http_body_util::BodyExt::boxed(body));
    *r.headers_mut() = headers;
    r
}

fn set_type(h: &mut HeaderMap, f: StreamFormat) {
    let ct = match f {
        StreamFormat::Ndjson => "application/x-ndjson",
        StreamFormat::Sse => "text/event-stream",
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

enum State {
    Streaming,
    Failing(Pin<Box<tokio::time::Sleep>>, String),
    Done,
}

/// The streaming body.
struct JsonStream {
    pending: Option<Bytes>,
    reader: Reader,
    desc: MessageDescriptor,
    format: StreamFormat,
    out: Output,
    head_status: Option<GrpcStatus>,
    state: State,
}

/// Why a stream ended badly (the body's error).
#[derive(Debug, thiserror::Error)]
#[error("the gRPC stream failed: {0}")]
struct StreamFailed(String);

impl JsonStream {
    fn record(&self, json: &[u8], error: bool) -> Bytes {
        let mut out = Vec::with_capacity(json.len() + 24);
        match self.format {
            StreamFormat::Ndjson => {
                out.extend_from_slice(json);
                out.push(b'\n');
            }
            StreamFormat::Sse => {
                if error {
                    out.extend_from_slice(b"event: error\n");
                }
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(json);
                out.extend_from_slice(b"\n\n");
            }
        }
        Bytes::from(out)
    }

    fn message(&self, m: Bytes) -> Result<Bytes, GrpcStatus> {
        let msg = DynamicMessage::decode(self.desc.clone(), m).map_err(|e| {
            GrpcStatus::local(
                13,
                format!("a message is not a valid {}: {e}", self.desc.full_name()),
            )
        })?;
        let json = render(&msg, None, &self.out.ser, self.out.proto_names).map_err(|e| {
            GrpcStatus::local(13, format!("a message cannot be written as JSON: {e}"))
        })?;
        Ok(self.record(&json, false))
    }

    fn fail(&mut self, st: GrpcStatus) -> Bytes {
        #[derive(serde::Serialize)]
        struct Record {
            error: super::ErrorBody,
        }
        let err = error_body(&self.out.pool, &st);
        let bytes = match self.format {
            StreamFormat::Ndjson => serde_json::to_vec(&Record { error: err }),
            StreamFormat::Sse => serde_json::to_vec(&err),
        }
        .expect("invariant: JSON serializes");
        let rec = self.record(&bytes, true);
        self.state = State::Failing(
            Box::pin(tokio::time::sleep(ERROR_GRACE)),
            format!(
                "{} ({})",
                st.message,
                status::CODE_NAMES
                    .get(st.code as usize)
                    .unwrap_or(&"UNKNOWN")
            ),
        );
        rec
    }
}

impl http_body::Body for JsonStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Failing(sleep, why) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let why = std::mem::take(why);
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(Box::new(StreamFailed(why)))));
                }
                State::Streaming => {}
            }
            if let Some(m) = this.pending.take() {
                return Poll::Ready(Some(Ok(Frame::data(match this.message(m) {
                    Ok(b) => b,
                    Err(st) => this.fail(st),
                }))));
            }
            match this.reader.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Item::Message(m))) => this.pending = Some(m),
                Poll::Ready(Ok(Item::End(t))) => {
                    let st = t
                        .as_ref()
                        .and_then(GrpcStatus::from_headers)
                        .or_else(|| this.head_status.clone())
                        .unwrap_or_else(|| {
                            GrpcStatus::local(
                                2,
                                "the service ended the stream without a grpc-status",
                            )
                        });
                    if st.code == 0 {
                        this.state = State::Done;
                        return Poll::Ready(None);
                    }
                    let rec = this.fail(st);
                    return Poll::Ready(Some(Ok(Frame::data(rec))));
                }
                Poll::Ready(Err(e)) => {
                    let rec = this.fail(failure(&e));
                    return Poll::Ready(Some(Ok(Frame::data(rec))));
                }
            }
        }
    }
}
