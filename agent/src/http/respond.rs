//! The one place errors become HTTP responses: RFC 9457 problem+json with a `type` per cause,
//! the request id, and never a token, key or upstream internal.

use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use super::{Body, full};

/// Base of every problem `type` URI.
pub const TYPE_BASE: &str = "https://meshgate.dev/problems/";

/// Why a request was answered by the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// 400: malformed request.
    BadRequest(String),
    /// 404: no route matches.
    NoRoute,
    /// 408: the request head did not arrive in time.
    RequestTimeout,
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
    /// 403: refused by policy.
    Forbidden(String),
    /// 429: over a rate limit.
    TooManyRequests {
        /// Seconds until a retry can succeed (the `Retry-After` value).
        retry_after_secs: u64,
        /// Extra headers (`RateLimit`, `RateLimit-Policy`).
        headers: Vec<(http::HeaderName, HeaderValue)>,
    },
    /// 502: the upstream failed after the request was sent (reset, bad response).
    UpstreamFailed,
    /// 503: no endpoint of the service could be reached, or it answered 503.
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

impl Problem {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::BadRequest(_) => StatusCode::BAD_REQUEST,
            Problem::NoRoute => StatusCode::NOT_FOUND,
            Problem::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Problem::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Problem::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Problem::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Problem::Forbidden(_) => StatusCode::FORBIDDEN,
            Problem::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Problem::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Problem::UpstreamUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Problem::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The last segment of the `type` URI.
    pub fn slug(&self) -> &'static str {
        match self {
            Problem::BadRequest(_) => "bad-request",
            Problem::NoRoute => "no-route",
            Problem::RequestTimeout => "request-timeout",
            Problem::BodyTooLarge { .. } => "body-too-large",
            Problem::UnsupportedMediaType { .. } => "unsupported-media-type",
            Problem::HeadersTooLarge { .. } => "headers-too-large",
            Problem::Unauthorized { .. } => "unauthorized",
            Problem::Forbidden(_) => "forbidden",
            Problem::TooManyRequests { .. } => "rate-limited",
            Problem::UpstreamFailed => "upstream-failed",
            Problem::UpstreamUnavailable { .. } => "upstream-unavailable",
            Problem::UpstreamTimeout { .. } => "upstream-timeout",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Problem::BadRequest(_) => "Bad request",
            Problem::NoRoute => "No route",
            Problem::RequestTimeout => "Request timeout",
            Problem::BodyTooLarge { .. } => "Request body too large",
            Problem::UnsupportedMediaType { .. } => "Unsupported media type",
            Problem::HeadersTooLarge { .. } => "Request headers too large",
            Problem::Unauthorized { .. } => "Unauthorized",
            Problem::Forbidden(_) => "Forbidden",
            Problem::TooManyRequests { .. } => "Too many requests",
            Problem::UpstreamFailed => "Upstream failed",
            Problem::UpstreamUnavailable { .. } => "Service unavailable",
            Problem::UpstreamTimeout { .. } => "Upstream timeout",
        }
    }

    fn detail(&self) -> String {
        match self {
            Problem::BadRequest(d) | Problem::Forbidden(d) => d.clone(),
            Problem::Unauthorized { reason, .. } => reason.clone(),
            Problem::TooManyRequests {
                retry_after_secs, ..
            } => {
                format!("rate limit exceeded; retry after {retry_after_secs} s")
            }
            Problem::NoRoute => "no route matches this request".into(),
            Problem::RequestTimeout => "the request head did not arrive in time".into(),
            Problem::BodyTooLarge { limit } => format!("the request body exceeds {limit} bytes"),
            Problem::UnsupportedMediaType { got } => {
                format!("content type {got:?} is not accepted by this route")
            }
            Problem::HeadersTooLarge { limit } => {
                format!("the request headers exceed {limit} bytes")
            }
            Problem::UpstreamFailed => "the service failed to answer".into(),
            Problem::UpstreamUnavailable { service } => {
                format!("no instance of {service} is available")
            }
            Problem::UpstreamTimeout { timeout_ms } => {
                format!("the service did not answer within {timeout_ms} ms")
            }
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
        if let Ok(v) = HeaderValue::from_str(request_id) {
            r.headers_mut().insert("x-request-id", v);
        }
        match self {
            Problem::Unauthorized { challenge, .. } => {
                if let Ok(v) = HeaderValue::from_str(challenge) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Problem::TooManyRequests {
                retry_after_secs,
                headers,
            } => {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                for (k, v) in headers {
                    r.headers_mut().insert(k.clone(), v.clone());
                }
            }
            _ => {}
        }
        r
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
        ];
        for (p, status, slug) in cases {
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
    }
}
