//! Header hygiene for every request, before routing: spoofable identity headers stripped in
//! every spelling, request id, W3C traceparent, `X-Forwarded-*` and the client address (see
//! [`crate::hygiene`]). The request id and client address go into the context for every later
//! stage and the access log.

use http::request;
use meshgate_agent::http::{
    ctx::{Ctx, fast_rand},
    filter::{Filter, Step},
};

use crate::hygiene::Hygiene;

/// Request headers meshgate uses between its own processes; a client never sets them.
const INTERNAL_PREFIX: &str = "meshgate-";

/// The pre-route hygiene filter.
#[derive(Debug)]
pub struct HygieneFilter {
    hygiene: Hygiene,
}

impl HygieneFilter {
    /// `hygiene` with the identity headers authentication injects added to its strip list.
    pub fn new(mut hygiene: Hygiene, identity: Vec<http::HeaderName>) -> Self {
        hygiene.also_strip(identity);
        Self { hygiene }
    }
}

impl Filter for HygieneFilter {
    fn name(&self) -> &'static str {
        "hygiene"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        let internal: Vec<http::HeaderName> = req
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with(INTERNAL_PREFIX))
            .cloned()
            .collect();
        for k in internal {
            req.headers.remove(k);
        }
        let scheme = if ctx.conn.tls { "https" } else { "http" };
        let mut rand = fast_rand;
        let ingress = self
            .hygiene
            .ingress(&mut req.headers, ctx.conn.peer.ip(), scheme, &mut rand);
        ctx.request_id = ingress.request_id;
        ctx.traceparent = Some(ingress.traceparent);
        ctx.client_ip = ingress.client_ip;
        Step::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{filters::testing, hygiene::HygieneConfig};

    #[tokio::test]
    async fn identity_headers_go_in_every_spelling() {
        let f = HygieneFilter::new(
            Hygiene::new(&HygieneConfig::default()).expect("hygiene"),
            vec![http::HeaderName::from_static("x-user-id")],
        );
        let mut ctx = testing::ctx();
        let mut req = testing::head(
            "GET",
            "/",
            &[
                ("X-User-Id", "mallory"),
                ("x_user_id", "mallory"),
                ("X_USER_ID", "mallory"),
                ("x-scopes", "admin"),
                ("x_consumer_tier", "gold"),
                ("meshgate-service", "billing"),
                ("x-kept", "1"),
                ("host", "api.example"),
            ],
        );
        testing::run(&f, &mut req, &mut ctx).await;
        for gone in [
            "x-user-id",
            "x_user_id",
            "x-scopes",
            "x_consumer_tier",
            "meshgate-service",
        ] {
            assert!(!req.headers.contains_key(gone), "{gone} survived");
        }
        assert_eq!(req.headers["x-kept"], "1");
        assert_eq!(ctx.request_id.len(), 32);
        assert_eq!(ctx.client_ip.to_string(), "192.0.2.7");
        assert_eq!(req.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(req.headers["x-forwarded-host"], "api.example");
        assert!(req.headers.contains_key("traceparent"));
    }
}
