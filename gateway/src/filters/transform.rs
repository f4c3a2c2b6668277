//! A route's transforms: header edits both ways, and JSON body edits. A JSON request transform
//! buffers the request body (up to the route's body limit). A JSON response transform never
//! fails open: it asks the upstream for an uncompressed body, and a response it cannot read
//! (compressed, not JSON, larger than `max_bytes`, not valid JSON) is refused with a 502
//! problem (`response-not-transformable`, counted by reason), never passed through untouched.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header, request, response};
use meshgate_agent::http::{
    ctx::Ctx,
    filter::{Filter, Step},
    respond::Problem,
};

use crate::transform::{self, JsonOutcome, TransformConfig};

/// A route's `transforms`.
#[derive(Debug)]
pub struct TransformFilter {
    cfg: TransformConfig,
    max_body: usize,
}

impl TransformFilter {
    /// `cfg` on a route whose request bodies are at most `max_body` bytes.
    pub fn new(cfg: TransformConfig, max_body: u64) -> Self {
        Self {
            cfg,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        }
    }
}

fn has_body(ctx: &Ctx, resp: &response::Parts) -> bool {
    ctx.method != http::Method::HEAD
        && !resp.status.is_informational()
        && resp.status != StatusCode::NO_CONTENT
        && resp.status != StatusCode::NOT_MODIFIED
}

impl Filter for TransformFilter {
    fn name(&self) -> &'static str {
        "transform"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, _ctx: &'a mut Ctx) -> Step<'a> {
        if let Some(h) = &self.cfg.request_headers {
            transform::apply_headers(h, &mut req.headers);
        }
        if self.cfg.response_json.is_some() {
            req.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        Step::CONTINUE
    }

    fn request_body_cap(&self) -> Option<usize> {
        self.cfg.request_json.as_ref().map(|_| self.max_body)
    }

    fn on_request_body(
        &self,
        req: &mut request::Parts,
        _ctx: &mut Ctx,
        body: Bytes,
    ) -> Result<Bytes, Problem> {
        let Some(j) = &self.cfg.request_json else {
            return Ok(body);
        };
        Ok(
            match transform::apply_json(j, req.headers.get(header::CONTENT_TYPE), &body) {
                JsonOutcome::Rewritten(v) => Bytes::from(v),
                JsonOutcome::Unchanged => body,
            },
        )
    }

    fn on_response(&self, _ctx: &Ctx, resp: &mut response::Parts) {
        if let Some(h) = &self.cfg.response_headers {
            transform::apply_headers(h, &mut resp.headers);
        }
    }

    fn response_body_cap(&self, ctx: &Ctx, resp: &response::Parts) -> Option<usize> {
        let j = self.cfg.response_json.as_ref()?;
        // a local answer (problem+json) is not the service's body
        if ctx.local_reason.is_some() || !has_body(ctx, resp) {
            return None;
        }
        Some(j.max_bytes)
    }

    fn on_response_body(
        &self,
        _ctx: &Ctx,
        resp: &mut response::Parts,
        body: Bytes,
    ) -> Result<Bytes, Problem> {
        let Some(j) = &self.cfg.response_json else {
            return Ok(body);
        };
        if let Some(enc) = resp.headers.get(header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Err(Problem::ResponseNotTransformable(
                "the service answered with a compressed body the route's JSON transform cannot read".into(),
            ));
        }
        let ct = resp.headers.get(header::CONTENT_TYPE);
        if body.is_empty() {
            return Ok(body);
        }
        if !transform::is_json(ct) {
            return Err(Problem::ResponseNotTransformable(
                "the service answered with a body that is not JSON on a route with a JSON transform".into(),
            ));
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return Err(Problem::ResponseNotTransformable(
                "the service answered with invalid JSON on a route with a JSON transform".into(),
            ));
        }
        Ok(match transform::apply_json(j, ct, &body) {
            JsonOutcome::Rewritten(v) => Bytes::from(v),
            JsonOutcome::Unchanged => body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testing;

    fn filter() -> TransformFilter {
        let cfg: TransformConfig = serde_json::from_value(serde_json::json!({
            "response_json": {"remove": ["secret"]}
        }))
        .expect("cfg");
        TransformFilter::new(cfg, 1 << 20)
    }

    fn resp(headers: &[(&str, &str)]) -> response::Parts {
        let mut b = http::Response::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("resp").into_parts().0
    }

    #[tokio::test]
    async fn response_json_transforms_fail_closed() {
        let f = filter();
        let mut ctx = testing::ctx();
        let mut req = testing::head("GET", "/", &[("accept-encoding", "gzip")]);
        testing::run(&f, &mut req, &mut ctx).await;
        assert_eq!(req.headers[header::ACCEPT_ENCODING], "identity");
        let body = Bytes::from_static(br#"{"a":1,"secret":"x"}"#);
        let mut ok = resp(&[("content-type", "application/json")]);
        assert_eq!(f.response_body_cap(&ctx, &ok), Some(1 << 20));
        let out = f
            .on_response_body(&ctx, &mut ok, body.clone())
            .expect("json");
        assert_eq!(out, r#"{"a":1}"#);
        for headers in [
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ][..],
            &[("content-type", "text/html")][..],
        ] {
            let mut r = resp(headers);
            assert!(
                matches!(
                    f.on_response_body(&ctx, &mut r, body.clone()),
                    Err(Problem::ResponseNotTransformable(_))
                ),
                "{headers:?}"
            );
        }
        let mut r = resp(&[("content-type", "application/json")]);
        assert!(
            f.on_response_body(&ctx, &mut r, Bytes::from_static(b"{not json"))
                .is_err()
        );
        let mut no_content = resp(&[]);
        no_content.status = StatusCode::NO_CONTENT;
        assert_eq!(f.response_body_cap(&ctx, &no_content), None);
    }
}
