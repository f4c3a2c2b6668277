//! A route's filters, in order, compiled once when the config loads: per request there is no
//! lookup by name and no allocation beyond what the filters themselves do.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, request, response};

use super::{
    Body,
    ctx::Ctx,
    filter::{Filter, Verdict},
    respond::Problem,
};

/// How a chain stopped a request.
#[derive(Debug)]
pub enum Stop {
    /// A filter answered with this response.
    Respond(Response<Body>),
    /// A filter refused with this problem.
    Reject(Problem),
}

/// An ordered list of filters.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    filters: Vec<Arc<dyn Filter>>,
    request_body_cap: Option<usize>,
}

impl Chain {
    /// A chain of `filters`, run in this order on the request and in reverse on the response.
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        let request_body_cap = filters.iter().filter_map(|f| f.request_body_cap()).max();
        Self {
            filters,
            request_body_cap,
        }
    }

    /// The filters' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    /// Whether the chain has no filter.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The largest request body a filter of this chain needs buffered; `None` when every filter
    /// lets the body stream.
    pub fn request_body_cap(&self) -> Option<usize> {
        self.request_body_cap
    }

    /// Runs every filter's `on_request` in order until one answers. While tracing is on, a
    /// filter that did work (it had to wait, or it answered) leaves a child span of the
    /// request's span: filters that only looked cost no span.
    pub async fn on_request(&self, req: &mut request::Parts, ctx: &mut Ctx) -> Result<(), Stop> {
        if ctx.otel.is_some() {
            return self.on_request_traced(req, ctx).await;
        }
        for f in &self.filters {
            match f.on_request(req, ctx).resolve().await {
                Verdict::Continue => {}
                Verdict::Respond(r) => return Err(Stop::Respond(r)),
                Verdict::Reject(p) => return Err(Stop::Reject(p)),
            }
        }
        Ok(())
    }

    async fn on_request_traced(&self, req: &mut request::Parts, ctx: &mut Ctx) -> Result<(), Stop> {
        use opentelemetry::KeyValue;
        for f in &self.filters {
            let start = std::time::SystemTime::now();
            let step = f.on_request(req, ctx);
            let waited = matches!(step, super::filter::Step::Later(_));
            let verdict = step.resolve().await;
            let outcome = match &verdict {
                Verdict::Continue => "continue",
                Verdict::Respond(_) => "respond",
                Verdict::Reject(_) => "reject",
            };
            if (waited || outcome != "continue")
                && let Some(t) = &ctx.otel
            {
                let mut attrs = vec![
                    KeyValue::new("meshgate.filter", f.name()),
                    KeyValue::new("meshgate.filter.outcome", outcome),
                ];
                if let Verdict::Reject(p) = &verdict {
                    attrs.push(KeyValue::new("meshgate.problem", p.slug()));
                }
                t.finished_child(f.name(), start, attrs);
            }
            match verdict {
                Verdict::Continue => {}
                Verdict::Respond(r) => return Err(Stop::Respond(r)),
                Verdict::Reject(p) => return Err(Stop::Reject(p)),
            }
        }
        Ok(())
    }

    /// Hands the buffered request body to the filters that asked for it, in order.
    pub fn on_request_body(
        &self,
        req: &mut request::Parts,
        ctx: &mut Ctx,
        mut body: Bytes,
    ) -> Result<Bytes, Problem> {
        for f in &self.filters {
            if f.request_body_cap().is_some() {
                body = f.on_request_body(req, ctx, body)?;
            }
        }
        Ok(body)
    }

    /// Every filter's `on_response`, last filter first.
    pub fn on_response(&self, ctx: &Ctx, resp: &mut response::Parts) {
        for f in self.filters.iter().rev() {
            f.on_response(ctx, resp);
        }
    }

    /// The largest response body a filter wants buffered for this response; `None` when the
    /// body streams through.
    pub fn response_body_cap(&self, ctx: &Ctx, resp: &response::Parts) -> Option<usize> {
        self.filters
            .iter()
            .filter_map(|f| f.response_body_cap(ctx, resp))
            .max()
    }

    /// Hands a buffered response body to the filters that asked for it, last filter first.
    pub fn on_response_body(
        &self,
        ctx: &Ctx,
        resp: &mut response::Parts,
        mut body: Bytes,
    ) -> Result<Bytes, Problem> {
        for f in self.filters.iter().rev() {
            if f.response_body_cap(ctx, resp).is_some() {
                body = f.on_response_body(ctx, resp, body)?;
            }
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{ctx::ConnInfo, filter::Step};
    use http::{HeaderValue, Request, StatusCode};

    /// Records its name into a header on the way in and out.
    #[derive(Debug)]
    struct Mark(&'static str, Option<Problem>);

    impl Filter for Mark {
        fn name(&self) -> &'static str {
            self.0
        }
        fn on_request<'a>(&'a self, req: &'a mut request::Parts, _ctx: &'a mut Ctx) -> Step<'a> {
            req.headers.append("x-in", HeaderValue::from_static(self.0));
            match &self.1 {
                None => Step::CONTINUE,
                Some(p) => Step::Later(Box::pin(async move { Verdict::Reject(p.clone()) })),
            }
        }
        fn on_response(&self, _ctx: &Ctx, resp: &mut response::Parts) {
            resp.headers
                .append("x-out", HeaderValue::from_static(self.0));
        }
    }

    fn ctx() -> Ctx {
        Ctx::new(Arc::new(ConnInfo::plain(
            "127.0.0.1:1".parse().expect("addr"),
        )))
    }

    #[tokio::test]
    async fn filters_run_in_order_and_responses_in_reverse() {
        let chain = Chain::new(vec![
            Arc::new(Mark("a", None)),
            Arc::new(Mark("b", Some(Problem::NoRoute))),
            Arc::new(Mark("c", None)),
        ]);
        assert_eq!(chain.names(), ["a", "b", "c"]);
        let (mut parts, ()) = Request::new(()).into_parts();
        let mut c = ctx();
        let stop = chain.on_request(&mut parts, &mut c).await;
        assert!(matches!(stop, Err(Stop::Reject(Problem::NoRoute))));
        let ins: Vec<_> = parts.headers.get_all("x-in").iter().collect();
        assert_eq!(ins, ["a", "b"], "c never ran");
        let (mut resp, ()) = Response::new(()).into_parts();
        resp.status = StatusCode::NOT_FOUND;
        chain.on_response(&c, &mut resp);
        let outs: Vec<_> = resp.headers.get_all("x-out").iter().collect();
        assert_eq!(outs, ["c", "b", "a"]);
        assert_eq!(chain.request_body_cap(), None);
    }
}
