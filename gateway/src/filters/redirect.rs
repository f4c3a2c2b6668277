//! Plain-HTTP requests redirected to HTTPS (`redirect_https`), before routing.

use http::{HeaderValue, Response, StatusCode, header, request};
use meshgate_agent::http::{
    ctx::Ctx,
    empty,
    filter::{Filter, Step, Verdict},
};

/// Answers plain-HTTP requests with `308` to the same URL on HTTPS.
#[derive(Debug)]
pub struct RedirectHttps {
    /// The HTTPS port (omitted from the URL when 443).
    pub https_port: Option<u16>,
}

impl Filter for RedirectHttps {
    fn name(&self) -> &'static str {
        "redirect-https"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        if ctx.conn.tls {
            return Step::CONTINUE;
        }
        let host = if ctx.authority.is_empty() {
            "localhost"
        } else {
            ctx.authority.as_str()
        };
        let host = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let port = match self.https_port {
            Some(443) | None => String::new(),
            Some(p) => format!(":{p}"),
        };
        let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
        if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{pq}")) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        Step::Now(Verdict::Respond(r))
    }
}
