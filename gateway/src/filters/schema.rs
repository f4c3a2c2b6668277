//! `request_schema:` as a filter: asks the pipeline to buffer the body (up to the route's
//! `max_body`), then checks it against the route's JSON Schema. A body that is not JSON, or
//! breaks a rule, is a 400 whose detail names the JSON pointer and the rule; a POST, PUT or
//! PATCH without a body is a 400 too. The upstream is not called in either case.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, header, request};
use meshgate_agent::http::{
    ctx::Ctx,
    filter::{Filter, Step},
    respond::Problem,
};

use crate::schema::RequestSchema;

/// Validates request bodies.
#[derive(Debug)]
pub struct SchemaFilter {
    schema: Arc<RequestSchema>,
    cap: usize,
}

impl SchemaFilter {
    /// Checks bodies up to `max_body` bytes against `schema`.
    pub fn new(schema: Arc<RequestSchema>, max_body: u64) -> Self {
        Self {
            schema,
            cap: usize::try_from(max_body).unwrap_or(usize::MAX),
        }
    }
}

impl Filter for SchemaFilter {
    fn name(&self) -> &'static str {
        "request-schema"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        if ctx.has_body {
            if let Some(ct) = req.headers.get(header::CONTENT_TYPE) {
                let ct = ct.to_str().unwrap_or_default();
                let essence = ct
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase();
                if !(essence == "application/json" || essence.ends_with("+json")) {
                    return Step::reject(Problem::UnsupportedMediaType { got: ct.to_owned() });
                }
            }
            return Step::CONTINUE;
        }
        if matches!(req.method, Method::POST | Method::PUT | Method::PATCH) {
            return Step::reject(Problem::BadRequest(
                "the request body is missing; this route takes a JSON body that matches its schema"
                    .into(),
            ));
        }
        Step::CONTINUE
    }

    fn request_body_cap(&self) -> Option<usize> {
        Some(self.cap)
    }

    fn on_request_body(
        &self,
        _req: &mut request::Parts,
        _ctx: &mut Ctx,
        body: Bytes,
    ) -> Result<Bytes, Problem> {
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Problem::BadRequest(format!("the request body is not valid JSON: {e}")))?;
        let violations = self.schema.check(&value, 5);
        if violations.is_empty() {
            return Ok(body);
        }
        let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
        Err(Problem::BadRequest(format!(
            "the request body does not match the route's schema: {}",
            list.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{filters::testing::ctx, schema::RequestSchemaConfig};
    use meshgate_agent::http::filter::Verdict;

    fn filter() -> SchemaFilter {
        let s = RequestSchema::new(&RequestSchemaConfig {
            file: None,
            schema: Some(serde_json::json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})),
        })
        .expect("schema");
        SchemaFilter::new(Arc::new(s), 1024)
    }

    #[tokio::test]
    async fn bodies_are_checked_and_refusals_name_pointer_and_rule() {
        let f = filter();
        assert_eq!(f.request_body_cap(), Some(1024));
        let (mut parts, ()) = http::Request::post("/x")
            .body(())
            .expect("req")
            .into_parts();
        let mut c = ctx();
        assert!(
            f.on_request_body(&mut parts, &mut c, Bytes::from_static(b"{\"n\": 2}"))
                .is_ok()
        );
        let Err(Problem::BadRequest(d)) =
            f.on_request_body(&mut parts, &mut c, Bytes::from_static(b"{\"n\": 0}"))
        else {
            panic!("refused");
        };
        assert!(
            d.contains("/n") && d.contains("/properties/n/minimum"),
            "{d}"
        );
        let Err(Problem::BadRequest(d)) =
            f.on_request_body(&mut parts, &mut c, Bytes::from_static(b"{\"n\": 1} x"))
        else {
            panic!("refused");
        };
        assert!(d.contains("not valid JSON"), "{d}");
        // no body on a POST
        let v = f.on_request(&mut parts, &mut c).resolve().await;
        assert!(
            matches!(v, Verdict::Reject(Problem::BadRequest(_))),
            "{v:?}"
        );
        // a GET without a body passes
        let (mut get, ()) = http::Request::get("/x").body(()).expect("req").into_parts();
        assert!(matches!(
            f.on_request(&mut get, &mut c).resolve().await,
            Verdict::Continue
        ));
        // a body that is not JSON by type
        c.has_body = true;
        parts
            .headers
            .insert(header::CONTENT_TYPE, "text/plain".parse().expect("v"));
        let v = f.on_request(&mut parts, &mut c).resolve().await;
        assert!(
            matches!(v, Verdict::Reject(Problem::UnsupportedMediaType { .. })),
            "{v:?}"
        );
    }
}
