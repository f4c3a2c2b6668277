//! `Strict-Transport-Security` on every answer sent over TLS (the service's and the gateway's
//! own), never on plain HTTP (RFC 6797 §7.2: browsers ignore it there).

use http::{HeaderValue, request, response};
use meshgate_agent::http::{
    ctx::Ctx,
    filter::{Filter, Step},
};
use serde::{Deserialize, Serialize};

fn default_max_age() -> u64 {
    31_536_000
}

/// `hsts` in gateway.yaml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HstsConfig {
    /// `max-age` in seconds. Default 31536000 (one year).
    #[serde(default = "default_max_age")]
    pub max_age_seconds: u64,
    /// Add `includeSubDomains`. Default false.
    #[serde(default)]
    pub include_subdomains: bool,
    /// Add `preload` (needs `include_subdomains` and a max-age of at least a year, as the
    /// preload list requires). Default false.
    #[serde(default)]
    pub preload: bool,
}

impl HstsConfig {
    /// Checks `preload`'s requirements.
    pub fn validate(&self) -> Result<(), String> {
        if self.preload && (!self.include_subdomains || self.max_age_seconds < 31_536_000) {
            return Err(
                "preload needs include_subdomains: true and max_age_seconds >= 31536000".into(),
            );
        }
        Ok(())
    }
}

/// Adds the header on TLS connections.
#[derive(Debug)]
pub struct Hsts {
    value: HeaderValue,
}

impl Hsts {
    /// The filter for `cfg`.
    pub fn new(cfg: &HstsConfig) -> Self {
        let mut v = format!("max-age={}", cfg.max_age_seconds);
        if cfg.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if cfg.preload {
            v.push_str("; preload");
        }
        Self {
            value: HeaderValue::from_str(&v).expect("invariant: digits and tokens"),
        }
    }
}

impl Filter for Hsts {
    fn name(&self) -> &'static str {
        "hsts"
    }

    fn on_request<'a>(&'a self, _req: &'a mut request::Parts, _ctx: &'a mut Ctx) -> Step<'a> {
        Step::CONTINUE
    }

    fn on_response(&self, ctx: &Ctx, resp: &mut response::Parts) {
        if ctx.conn.tls {
            resp.headers
                .insert(http::header::STRICT_TRANSPORT_SECURITY, self.value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn only_tls_answers_get_the_header() {
        let cfg = HstsConfig {
            max_age_seconds: 600,
            include_subdomains: true,
            preload: false,
        };
        let f = Hsts::new(&cfg);
        let mut info =
            meshgate_agent::http::ctx::ConnInfo::plain("127.0.0.1:1".parse().expect("a"));
        let plain = Ctx::new(Arc::new(info.clone()));
        info.tls = true;
        let tls = Ctx::new(Arc::new(info));
        let (mut r, ()) = http::Response::new(()).into_parts();
        f.on_response(&plain, &mut r);
        assert!(
            !r.headers
                .contains_key(http::header::STRICT_TRANSPORT_SECURITY)
        );
        f.on_response(&tls, &mut r);
        assert_eq!(
            r.headers[http::header::STRICT_TRANSPORT_SECURITY],
            "max-age=600; includeSubDomains"
        );
        assert!(
            HstsConfig {
                preload: true,
                ..cfg
            }
            .validate()
            .is_err()
        );
    }
}
