//! The one place errors become HTTP responses: RFC 9457 problem+json with a `type` per cause,
//! the request id, and never a token, key or upstream internal. gRPC clients get the matching
//! gRPC status as a trailers-only response instead (never a JSON body they cannot read).

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use super::{Body, full, path::PathError};

/// Base of every problem `type` URI.
pub const TYPE_BASE: &str = "https://meshgate.dev/problems/";

/// Why a request was answered by meshgate itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// 400: malformed request.
    BadRequest(String),
    /// 400: the path is refused by normalization (encoded `/`, NUL, `;`…).
    InvalidPath(PathError),
    /// 404: no route matches.
    NoRoute,
    /// 405: the method is not allowed here; `allow` is the `Allow` header value.
    MethodNotAllowed {
        /// Methods that are allowed, comma-separated.
        allow: String,
    },
    /// 408: the request head did not arrive in time.
    RequestTimeout,
    /// 408: the request body stalled (nothing arrived within the body idle timeout).
    BodyTimeout,
    /// 413: the body is larger than the route allows.
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// 415: the content type is not one the route accepts.
    UnsupportedMediaType {
        /// What was sent.
        got: String,
    },
    /// 431: the request headers are too large.
    HeadersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 401: no valid credentials. `challenge` is the `WWW-Authenticate` value; `reason` is a
    /// short description that names no secret.
    Unauthorized {
        /// The `WWW-Authenticate` header value.
        challenge: String,
        /// Why, safe to show.
        reason: String,
    },
    /// 403: refused by edge policy (scopes, claims, groups, CORS).
    Forbidden(String),
    /// 403: refused by an intention at the destination (the rule is logged, not shown).
    DeniedByIntention,
    /// 429: over a rate limit.
    TooManyRequests {
        /// Seconds until a retry can succeed (the `Retry-After` value).
        retry_after_secs: u64,
        /// Extra headers (`RateLimit`, `RateLimit-Policy`).
        headers: Vec<(http::HeaderName, HeaderValue)>,
    },
    /// 502: the upstream failed after the request was sent (reset, bad response).
    UpstreamFailed,
    /// 502: the upstream refused the connection (no endpoint accepted it, or the service
    /// behind the destination agent is down).
    UpstreamRefused {
        /// The service.
        service: String,
    },
    /// 502: the upstream's response cannot be transformed as the route requires (a compressed
    /// or non-JSON body on a route with a JSON response transform).
    ResponseNotTransformable(String),
    /// 503: discovery knows no endpoint of the service.
    NoEndpoints {
        /// The service.
        service: String,
    },
    /// 503: the service's endpoints are there but none can take the request now (draining,
    /// answering 503).
    UpstreamUnavailable {
        /// The service.
        service: String,
    },
    /// 504: the upstream did not answer within the route timeout.
    UpstreamTimeout {
        /// The timeout in milliseconds.
        timeout_ms: u64,
    },
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    r#type: String,
    title: &'a str,
    status: u16,
    detail: String,
    request_id: &'a str,
}

/// gRPC status codes used by [`Problem::grpc_code`].
pub mod grpc_code {
    /// Deadline passed.
    pub const DEADLINE_EXCEEDED: u16 = 4;
    /// Refused by policy.
    pub const PERMISSION_DENIED: u16 = 7;
    /// Over a limit.
    pub const RESOURCE_EXHAUSTED: u16 = 8;
    /// No such method (no route).
    pub const UNIMPLEMENTED: u16 = 12;
    /// Malformed request.
    pub const INTERNAL: u16 = 13;
    /// Not reachable now.
    pub const UNAVAILABLE: u16 = 14;
    /// No valid credentials.
    pub const UNAUTHENTICATED: u16 = 16;
    /// Invalid argument.
    pub const INVALID_ARGUMENT: u16 = 3;
}

impl Problem {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::BadRequest(_) | Problem::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Problem::NoRoute => StatusCode::NOT_FOUND,
            Problem::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Problem::RequestTimeout | Problem::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Problem::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Problem::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Problem::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Problem::Forbidden(_) | Problem::DeniedByIntention => StatusCode::FORBIDDEN,
            Problem::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Problem::UpstreamFailed
            | Problem::UpstreamRefused { .. }
            | Problem::ResponseNotTransformable(_) => StatusCode::BAD_GATEWAY,
            Problem::NoEndpoints { .. } | Problem::UpstreamUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Problem::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The last segment of the `type` URI: one per cause.
    pub fn slug(&self) -> &'static str {
        match self {
            Problem::BadRequest(_) => "bad-request",
            Problem::InvalidPath(_) => "invalid-path",
            Problem::NoRoute => "no-route",
            Problem::MethodNotAllowed { .. } => "method-not-allowed",
            Problem::RequestTimeout => "request-timeout",
            Problem::BodyTimeout => "body-timeout",
            Problem::BodyTooLarge { .. } => "body-too-large",
            Problem::UnsupportedMediaType { .. } => "unsupported-media-type",
            Problem::HeadersTooLarge { .. } => "headers-too-large",
            Problem::Unauthorized { .. } => "unauthorized",
            Problem::Forbidden(_) => "forbidden",
            Problem::DeniedByIntention => "denied-by-intention",
            Problem::TooManyRequests { .. } => "rate-limited",
            Problem::UpstreamFailed => "upstream-failed",
            Problem::UpstreamRefused { .. } => "upstream-refused",
            Problem::ResponseNotTransformable(_) => "response-not-transformable",
            Problem::NoEndpoints { .. } => "no-endpoints",
            Problem::UpstreamUnavailable { .. } => "upstream-unavailable",
            Problem::UpstreamTimeout { .. } => "upstream-timeout",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Problem::BadRequest(_) => "Bad request",
            Problem::InvalidPath(_) => "Invalid path",
            Problem::NoRoute => "No route",
            Problem::MethodNotAllowed { .. } => "Method not allowed",
            Problem::RequestTimeout => "Request timeout",
            Problem::BodyTimeout => "Request body timeout",
            Problem::BodyTooLarge { .. } => "Request body too large",
            Problem::UnsupportedMediaType { .. } => "Unsupported media type",
            Problem::HeadersTooLarge { .. } => "Request headers too large",
            Problem::Unauthorized { .. } => "Unauthorized",
            Problem::Forbidden(_) => "Forbidden",
            Problem::DeniedByIntention => "Denied by intention",
            Problem::TooManyRequests { .. } => "Too many requests",
            Problem::UpstreamFailed => "Upstream failed",
            Problem::UpstreamRefused { .. } => "Upstream refused",
            Problem::ResponseNotTransformable(_) => "Response not transformable",
            Problem::NoEndpoints { .. } => "No endpoints",
            Problem::UpstreamUnavailable { .. } => "Service unavailable",
            Problem::UpstreamTimeout { .. } => "Upstream timeout",
        }
    }

    fn detail(&self) -> String {
        match self {
            Problem::BadRequest(d) | Problem::Forbidden(d) => d.clone(),
            Problem::InvalidPath(e) => e.to_string(),
            Problem::Unauthorized { reason, .. } => reason.clone(),
            Problem::TooManyRequests {
                retry_after_secs, ..
            } => {
                format!("rate limit exceeded; retry after {retry_after_secs} s")
            }
            Problem::NoRoute => "no route matches this request".into(),
            Problem::MethodNotAllowed { allow } => {
                format!("this method is not allowed here; allowed: {allow}")
            }
            Problem::RequestTimeout => "the request head did not arrive in time".into(),
            Problem::BodyTimeout => "the request body stopped arriving".into(),
            Problem::BodyTooLarge { limit } => format!("the request body exceeds {limit} bytes"),
            Problem::UnsupportedMediaType { got } => {
                format!("content type {got:?} is not accepted by this route")
            }
            Problem::HeadersTooLarge { limit } => {
                format!("the request headers exceed {limit} bytes")
            }
            Problem::DeniedByIntention => {
                "the destination's intentions do not allow this caller".into()
            }
            Problem::UpstreamFailed => "the service failed to answer".into(),
            Problem::UpstreamRefused { service } => {
                format!("{service} refused the connection")
            }
            Problem::ResponseNotTransformable(why) => why.clone(),
            Problem::NoEndpoints { service } => {
                format!("no endpoint of {service} is known")
            }
            Problem::UpstreamUnavailable { service } => {
                format!("no instance of {service} can take the request now")
            }
            Problem::UpstreamTimeout { timeout_ms } => {
                format!("the service did not answer within {timeout_ms} ms")
            }
        }
    }

    /// The gRPC status a gRPC client gets for this problem (the mapping of gRPC's
    /// "HTTP to gRPC status code mapping", with timeouts as DEADLINE_EXCEEDED and limits as
    /// RESOURCE_EXHAUSTED).
    pub fn grpc_code(&self) -> u16 {
        use grpc_code::*;
        match self {
            Problem::BadRequest(_) | Problem::InvalidPath(_) => INVALID_ARGUMENT,
            Problem::UnsupportedMediaType { .. } => INTERNAL,
            Problem::NoRoute | Problem::MethodNotAllowed { .. } => UNIMPLEMENTED,
            Problem::RequestTimeout | Problem::BodyTimeout | Problem::UpstreamTimeout { .. } => {
                DEADLINE_EXCEEDED
            }
            Problem::BodyTooLarge { .. }
            | Problem::HeadersTooLarge { .. }
            | Problem::TooManyRequests { .. } => RESOURCE_EXHAUSTED,
            Problem::Unauthorized { .. } => UNAUTHENTICATED,
            Problem::Forbidden(_) | Problem::DeniedByIntention => PERMISSION_DENIED,
            Problem::UpstreamFailed
            | Problem::UpstreamRefused { .. }
            | Problem::ResponseNotTransformable(_)
            | Problem::NoEndpoints { .. }
            | Problem::UpstreamUnavailable { .. } => UNAVAILABLE,
        }
    }

    /// The problem+json response, carrying `request_id`.
    pub fn response(&self, request_id: &str) -> Response<Body> {
        let body = ProblemBody {
            r#type: format!("{TYPE_BASE}{}", self.slug()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.detail(),
            request_id,
        };
        let bytes = serde_json::to_vec(&body).expect("invariant: problem serializes");
        let mut r = Response::new(full(bytes));
        *r.status_mut() = self.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        self.extra_headers(request_id, r.headers_mut());
        r
    }

    /// The answer for a gRPC client: HTTP 200 with `grpc-status` and `grpc-message` in the
    /// headers (a trailers-only response) and no body.
    pub fn grpc_response(&self, request_id: &str) -> Response<Body> {
        let mut r = Response::new(super::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(self.grpc_code()));
        if let Ok(v) = HeaderValue::from_str(&grpc_message(&self.detail())) {
            h.insert("grpc-message", v);
        }
        self.extra_headers(request_id, h);
        r
    }

    /// [`Problem::grpc_response`] for gRPC clients, [`Problem::response`] for everyone else.
    pub fn respond(&self, request_id: &str, grpc: bool) -> Response<Body> {
        if grpc {
            self.grpc_response(request_id)
        } else {
            self.response(request_id)
        }
    }

    fn extra_headers(&self, request_id: &str, h: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
        match self {
            Problem::Unauthorized { challenge, .. } => {
                if let Ok(v) = HeaderValue::from_str(challenge) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Problem::TooManyRequests {
                retry_after_secs,
                headers,
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                for (k, v) in headers {
                    h.insert(k.clone(), v.clone());
                }
            }
            Problem::MethodNotAllowed { allow } => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    h.insert(header::ALLOW, v);
                }
            }
            _ => {}
        }
    }

    /// The raw HTTP/1.1 bytes of this problem with `Connection: close`, for answers written
    /// below hyper (the header read timeout).
    pub fn raw_http1(&self, request_id: &str) -> Vec<u8> {
        let body = serde_json::to_vec(&ProblemBody {
            r#type: format!("{TYPE_BASE}{}", self.slug()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.detail(),
            request_id,
        })
        .expect("invariant: problem serializes");
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.status().as_u16(),
            self.status().canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        out.extend(body);
        out
    }
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol says: every byte outside
/// printable ASCII (0x20-0x7E), and `%` itself.
pub fn grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is a gRPC call (its content type is `application/grpc` or
/// `application/grpc+…`); such clients get gRPC statuses for local answers.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim_start();
            v.len() >= 16
                && v[..16].eq_ignore_ascii_case("application/grpc")
                && matches!(v.as_bytes().get(16), None | Some(b'+' | b';'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn problems_are_rfc9457_json_with_distinct_types() {
        let cases = [
            (Problem::NoRoute, 404, "no-route"),
            (Problem::UpstreamFailed, 502, "upstream-failed"),
            (
                Problem::UpstreamRefused {
                    service: "users".into(),
                },
                502,
                "upstream-refused",
            ),
            (
                Problem::NoEndpoints {
                    service: "users".into(),
                },
                503,
                "no-endpoints",
            ),
            (
                Problem::UpstreamUnavailable {
                    service: "users".into(),
                },
                503,
                "upstream-unavailable",
            ),
            (
                Problem::UpstreamTimeout { timeout_ms: 100 },
                504,
                "upstream-timeout",
            ),
            (Problem::DeniedByIntention, 403, "denied-by-intention"),
            (Problem::BodyTooLarge { limit: 10 }, 413, "body-too-large"),
            (
                Problem::UnsupportedMediaType {
                    got: "text/plain".into(),
                },
                415,
                "unsupported-media-type",
            ),
            (
                Problem::HeadersTooLarge { limit: 10 },
                431,
                "headers-too-large",
            ),
            (Problem::RequestTimeout, 408, "request-timeout"),
            (Problem::BodyTimeout, 408, "body-timeout"),
            (
                Problem::InvalidPath(PathError::EscapedSlash),
                400,
                "invalid-path",
            ),
            (
                Problem::MethodNotAllowed {
                    allow: "GET, HEAD".into(),
                },
                405,
                "method-not-allowed",
            ),
        ];
        let mut slugs = std::collections::HashSet::new();
        for (p, status, slug) in cases {
            assert!(slugs.insert(slug), "duplicate slug {slug}");
            let r = p.response("req-1");
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(
                r.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
            let body = r.into_body().collect().await.expect("body").to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["type"], format!("{TYPE_BASE}{slug}"));
            assert_eq!(v["status"], status);
            assert_eq!(v["request_id"], "req-1");
        }
        let raw = String::from_utf8(Problem::RequestTimeout.raw_http1("r")).expect("utf8");
        assert!(raw.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{raw}");
        let r = Problem::MethodNotAllowed {
            allow: "GET".into(),
        }
        .response("r");
        assert_eq!(r.headers()[header::ALLOW], "GET");
    }

    #[tokio::test]
    async fn grpc_clients_get_a_status_not_json() {
        let r = Problem::Unauthorized {
            challenge: "Bearer".into(),
            reason: "missing token".into(),
        }
        .respond("r", true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "16");
        assert_eq!(r.headers()["grpc-message"], "missing token");
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert!(body.is_empty());
        assert_eq!(grpc_message("café 100%"), "caf%C3%A9 100%25");
        let cases = [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC; charset=x", true),
            ("application/grpc-web", false),
            ("application/json", false),
        ];
        for (ct, want) in cases {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), want, "{ct}");
        }
    }
}
