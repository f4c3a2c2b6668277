//! Request limits a route declares on the head: allowed content types (415), for every body
//! (HTTP/2 bodies without `Content-Length` included); more than one `Content-Type` is refused.
//! The body size limit is the pipeline's (enforced while streaming).

use http::{header, request};
use meshgate_agent::http::{
    ctx::Ctx,
    filter::{Filter, Step},
    respond::Problem,
};

/// `content_types` of a route.
#[derive(Debug)]
pub struct ContentTypes {
    allowed: Vec<String>,
}

impl ContentTypes {
    /// Accepts bodies whose media type is one of `allowed` (`type/subtype`, any case).
    pub fn new(allowed: &[String]) -> Self {
        Self {
            allowed: allowed.iter().map(|c| c.to_ascii_lowercase()).collect(),
        }
    }
}

impl Filter for ContentTypes {
    fn name(&self) -> &'static str {
        "content-types"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        let declared = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if !ctx.has_body && declared.is_none_or(|n| n == 0) {
            return Step::CONTINUE;
        }
        match self.check(&req.headers) {
            Ok(()) => Step::CONTINUE,
            Err(p) => Step::reject(p),
        }
    }
}

impl ContentTypes {
    /// The verdict on a request with a body and these headers: one Content-Type whose media
    /// type is allowed, or 415 (`meshgate why` asks the same).
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), Problem> {
        let mut all = headers.get_all(header::CONTENT_TYPE).iter();
        let (first, second) = (all.next(), all.next());
        if second.is_some() {
            return Err(Problem::UnsupportedMediaType {
                got: "more than one Content-Type".into(),
            });
        }
        let got = first
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        if self.allowed.contains(&got) {
            Ok(())
        } else {
            Err(Problem::UnsupportedMediaType { got })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testing;
    use meshgate_agent::http::filter::Verdict;

    #[tokio::test]
    async fn table() {
        let f = ContentTypes::new(&["application/json".into()]);
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, bool);
        let cases: &[Case<'_>] = &[
            (&[("content-type", "application/json")], true, true),
            (
                &[("content-type", "Application/JSON; charset=utf-8")],
                true,
                true,
            ),
            (&[("content-type", "text/plain")], true, false),
            (&[], true, false),
            // an HTTP/2 body without Content-Length still counts
            (&[("content-type", "text/plain")], true, false),
            (
                &[
                    ("content-type", "application/json"),
                    ("content-type", "text/plain"),
                ],
                true,
                false,
            ),
            // no body: nothing to check
            (&[("content-type", "text/plain")], false, true),
        ];
        for (headers, has_body, ok) in cases {
            let mut ctx = testing::ctx();
            ctx.has_body = *has_body;
            let mut req = testing::head("POST", "/", headers);
            let v = testing::run(&f, &mut req, &mut ctx).await;
            assert_eq!(
                matches!(v, Verdict::Continue),
                *ok,
                "{headers:?} body={has_body}"
            );
        }
    }
}
