//! gRPC-Web at the edge (`grpc_web: true` on a route): browsers' `application/grpc-web` and
//! `application/grpc-web-text` calls become gRPC calls to the route's backend, and the answers
//! go back in the gRPC-Web form, trailers encoded in the body as a frame with flag `0x80`
//! (gRPC's PROTOCOL-WEB.md).
//!
//! Two pieces, because the filter contract sees heads and whole buffered bodies only while
//! gRPC-Web rewrites streaming bodies both ways and must see the upstream's HTTP/2 trailers,
//! which only an action's response body carries:
//!
//! - [`GrpcWebFilter`] marks the call as gRPC before any policy runs, so every local refusal on
//!   the route (401, 429, 504…) is a gRPC status the browser library understands, and gives
//!   those trailers-only answers the gRPC-Web content type.
//! - [`GrpcWeb`] wraps the route's action: it decodes the request (base64 for `-text`),
//!   forwards it as `application/grpc`, and re-encodes the answer: messages as they come,
//!   then the trailers frame (base64, per frame, for `-text`).
//!
//! Requests that are not gRPC-Web go to the inner action untouched.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, header, request, response};
use http_body::Frame;
use http_body_util::BodyExt;
use meshgate_agent::http::{
    Body, BoxError,
    action::{ActionFuture, RouteAction},
    ctx::Ctx,
    filter::{Filter, Step},
};

/// The kind of gRPC-Web call, left in the context by the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebCall {
    /// `application/grpc-web-text` (base64 bodies).
    pub text: bool,
}

/// The gRPC-Web kind of a request's content type, if it is one.
pub fn web_call(headers: &HeaderMap) -> Option<WebCall> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let ct = ct.split(';').next()?.trim().to_ascii_lowercase();
    let rest = ct.strip_prefix("application/grpc-web")?;
    match rest {
        "" | "+proto" => Some(WebCall { text: false }),
        "-text" | "-text+proto" => Some(WebCall { text: true }),
        _ => None,
    }
}

fn content_type(text: bool) -> HeaderValue {
    HeaderValue::from_static(if text {
        "application/grpc-web-text+proto"
    } else {
        "application/grpc-web+proto"
    })
}

/// Marks gRPC-Web calls so local answers are gRPC statuses in gRPC-Web form.
#[derive(Debug, Default)]
pub struct GrpcWebFilter;

impl Filter for GrpcWebFilter {
    fn name(&self) -> &'static str {
        "grpc-web"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        if let Some(call) = web_call(&req.headers) {
            ctx.grpc = true;
            ctx.extensions.insert(call);
        }
        Step::CONTINUE
    }

    fn on_response(&self, ctx: &Ctx, resp: &mut response::Parts) {
        let Some(call) = ctx.extensions.get::<WebCall>() else {
            return;
        };
        // a trailers-only answer (a local refusal): same head, gRPC-Web type
        let is_grpc = resp
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/grpc");
        if is_grpc {
            resp.headers
                .insert(header::CONTENT_TYPE, content_type(call.text));
        }
        // keep what CORS exposes already; add the gRPC status headers
        const GRPC: &str = "grpc-status, grpc-message, grpc-status-details-bin";
        let merged = match resp
            .headers
            .get("access-control-expose-headers")
            .and_then(|v| v.to_str().ok())
        {
            Some(v) if !v.trim().is_empty() => format!("{v}, {GRPC}"),
            _ => GRPC.to_owned(),
        };
        if let Ok(v) = HeaderValue::from_str(&merged) {
            resp.headers.insert("access-control-expose-headers", v);
        }
    }
}

/// The action wrapper that converts gRPC-Web calls to gRPC and back.
#[derive(Debug)]
pub struct GrpcWeb {
    inner: std::sync::Arc<dyn RouteAction>,
}

impl GrpcWeb {
    /// Wraps `inner` (the route's proxy or transcode action).
    pub fn new(inner: std::sync::Arc<dyn RouteAction>) -> Self {
        Self { inner }
    }
}

impl RouteAction for GrpcWeb {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn call<'a>(&'a self, req: Request<Body>, ctx: &'a mut Ctx) -> ActionFuture<'a> {
        Box::pin(async move {
            let Some(call) =
                web_call(req.headers()).or_else(|| ctx.extensions.get::<WebCall>().copied())
            else {
                return self.inner.call(req, ctx).await;
            };
            ctx.grpc = true;
            let (mut parts, body) = req.into_parts();
            let ct = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_ascii_lowercase();
            let grpc_ct = if ct.contains("+proto") {
                "application/grpc+proto"
            } else {
                "application/grpc"
            };
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(grpc_ct));
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove("x-grpc-web");
            parts.headers.remove("x-user-agent");
            parts.version = http::Version::HTTP_2;
            let body = if call.text {
                Base64Decode {
                    inner: body,
                    carry: Vec::new(),
                }
                .boxed()
            } else {
                body
            };
            let resp = self
                .inner
                .call(Request::from_parts(parts, body), ctx)
                .await?;
            Ok(encode_response(resp, call.text))
        })
    }
}

fn encode_response(resp: Response<Body>, text: bool) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let is_grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !is_grpc {
        return Response::from_parts(parts, body);
    }
    parts
        .headers
        .insert(header::CONTENT_TYPE, content_type(text));
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRAILER);
    let body = WebEncode {
        inner: body,
        text,
        done: false,
    };
    Response::from_parts(parts, body.boxed())
}

/// The trailers frame of gRPC-Web: flag `0x80`, length, `name: value\r\n` lines.
pub fn trailers_frame(t: &HeaderMap) -> Bytes {
    let mut block = Vec::new();
    for (k, v) in t {
        block.extend_from_slice(k.as_str().as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(v.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut b = BytesMut::with_capacity(5 + block.len());
    b.put_u8(0x80);
    b.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
    b.put_slice(&block);
    b.freeze()
}

/// Re-encodes a gRPC response body: data as is (base64 per chunk for `-text`), trailers as
/// the trailers frame.
struct WebEncode {
    inner: Body,
    text: bool,
    done: bool,
}

impl WebEncode {
    fn out(&self, b: Bytes) -> Bytes {
        if self.text {
            Bytes::from(base64::engine::general_purpose::STANDARD.encode(&b))
        } else {
            b
        }
    }
}

impl http_body::Body for WebEncode {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            let f = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(f)) => f,
            };
            return match f.into_data() {
                Ok(d) => Poll::Ready(Some(Ok(Frame::data(this.out(d))))),
                Err(f) => match f.into_trailers() {
                    Ok(t) => {
                        this.done = true;
                        let frame = this.out(trailers_frame(&t));
                        Poll::Ready(Some(Ok(Frame::data(frame))))
                    }
                    // an unknown frame kind: pass over it (an empty DATA frame instead would
                    // count against the client's limit of empty frames)
                    Err(_) => continue,
                },
            };
        }
    }
}

/// Why a `-text` request body is not base64.
#[derive(Debug, thiserror::Error)]
#[error("the grpc-web-text request body is not valid base64")]
struct NotBase64;

/// Decodes a base64 request body as it streams: whole 4-character groups at a time, padded
/// segments one after another allowed.
struct Base64Decode {
    inner: Body,
    carry: Vec<u8>,
}

fn decode_groups(carry: &mut Vec<u8>, input: &[u8], last: bool) -> Result<Vec<u8>, NotBase64> {
    carry.extend(input.iter().copied().filter(|b| !b.is_ascii_whitespace()));
    let mut out = Vec::with_capacity(carry.len() / 4 * 3);
    let whole = if last {
        carry.len()
    } else {
        carry.len() / 4 * 4
    };
    if last && whole % 4 != 0 {
        return Err(NotBase64);
    }
    for group in carry[..whole].chunks(4) {
        let d = base64::engine::general_purpose::STANDARD
            .decode(group)
            .map_err(|_| NotBase64)?;
        out.extend_from_slice(&d);
    }
    carry.drain(..whole);
    Ok(out)
}

impl http_body::Body for Base64Decode {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if this.carry.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(
                        decode_groups(&mut this.carry, &[], true)
                            .map(|d| Frame::data(Bytes::from(d)))
                            .map_err(|e| Box::new(e) as BoxError),
                    ));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(f))) => {
                    let Ok(d) = f.into_data() else { continue };
                    match decode_groups(&mut this.carry, &d, false) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                        Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).expect("v"));
            web_call(&m)
        };
        assert_eq!(h("application/grpc-web"), Some(WebCall { text: false }));
        assert_eq!(
            h("application/grpc-web+proto"),
            Some(WebCall { text: false })
        );
        assert_eq!(h("application/grpc-web-text"), Some(WebCall { text: true }));
        assert_eq!(
            h("Application/GRPC-Web-Text+proto; charset=x"),
            Some(WebCall { text: true })
        );
        assert_eq!(h("application/grpc"), None);
        assert_eq!(h("application/grpc-webx"), None);
    }

    #[test]
    fn trailers_frames_and_base64_groups() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("grpc-message", HeaderValue::from_static("ok"));
        let f = trailers_frame(&t);
        assert_eq!(f[0], 0x80);
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 5
        );
        assert_eq!(&f[5..], b"grpc-status: 0\r\ngrpc-message: ok\r\n");
        // split anywhere, padded segments back to back
        let enc = "AAAAAAQKAmhp".to_owned() + "gAAAAA8=";
        let mut carry = Vec::new();
        let mut out = Vec::new();
        for chunk in enc.as_bytes().chunks(3) {
            out.extend(decode_groups(&mut carry, chunk, false).expect("b64"));
        }
        out.extend(decode_groups(&mut carry, &[], true).expect("end"));
        assert_eq!(&out[..9], b"\x00\x00\x00\x00\x04\x0a\x02hi");
        assert!(decode_groups(&mut Vec::new(), b"abc", true).is_err());
        assert!(decode_groups(&mut Vec::new(), b"a*c=", false).is_err());
    }
}
