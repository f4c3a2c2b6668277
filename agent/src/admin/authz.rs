//! `/authz/check` on an agent's admin API: the decision of the LIVE intentions for one
//! (source, local service, method, path), with the rule that made it. `meshgate authz check`
//! and `meshgate why` ask it instead of evaluating rules themselves.

use std::{collections::HashMap, sync::Arc};

use crate::{
    config::Protocol,
    policy::authz::{HttpRequest, Peer, Policy, Target},
    proxy::inbound::LocalService,
};

/// The endpoint's state: the policy the inbound side enforces and the local services.
#[derive(Debug)]
pub struct AuthzApi {
    /// The compiled intentions (the same `Arc` the inbound side uses).
    pub policy: Arc<Policy>,
    /// Local services by name.
    pub services: HashMap<String, LocalService>,
    /// `spiffe://TD/ns/NS/svc/` for naming sources by service.
    pub id_prefix: String,
}

fn params(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| {
            let d = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

impl super::AdminExtension for AuthzApi {
    fn get(&self, path: &str, query: &str) -> Option<Result<serde_json::Value, String>> {
        if path != "/authz/check" {
            return None;
        }
        Some(self.check(&params(query)))
    }
}

impl AuthzApi {
    fn check(&self, p: &HashMap<String, String>) -> Result<serde_json::Value, String> {
        let from = p
            .get("from")
            .filter(|s| !s.is_empty())
            .ok_or("give from=SERVICE (the caller)")?;
        let to = p
            .get("to")
            .filter(|s| !s.is_empty())
            .ok_or("give to=SERVICE (a service of this node)")?;
        let Some(local) = self.services.get(to) else {
            let mut names: Vec<&str> = self.services.keys().map(String::as_str).collect();
            names.sort_unstable();
            return Err(format!(
                "{to} does not run on this node (it runs: {}); ask the agent of the node that runs it",
                names.join(", ")
            ));
        };
        let from_id = if from.starts_with("spiffe://") {
            from.clone()
        } else {
            format!("{}{from}", self.id_prefix)
        };
        let from_service = from_id.rsplit('/').next().unwrap_or(from).to_owned();
        let peer = Peer {
            service: &from_service,
            spiffe_id: &from_id,
        };
        let target_id = local.id.to_string();
        let target = Target {
            service: to,
            spiffe_id: &target_id,
        };
        let method = p.get("method").cloned();
        // the inbound side decides on the normalized path (the inbound L7 pipeline's options):
        // `/foo/../admin/x` is decided as `/admin/x`, and a path it refuses is a 400 there
        let path = match p.get("path") {
            None => None,
            Some(raw) => match crate::http::path::normalize(raw, &Default::default()) {
                Ok(n) => Some(n.into_owned()),
                Err(e) => {
                    return Ok(serde_json::json!({
                        "from": from_id,
                        "to": to,
                        "to_identity": local.id.to_string(),
                        "protocol": local.protocol,
                        "layer": "l7",
                        "method": method,
                        "path": raw,
                        "decision": "deny",
                        "rule": null,
                        "status": 400,
                        "problem": "invalid-path",
                        "reason": format!("the agent refuses the path before any rule: {e}"),
                    }));
                }
            },
        };
        let (layer, d) = match local.protocol {
            Protocol::Tcp => ("l4", self.policy.check_connection(&peer, &target)),
            Protocol::Http | Protocol::Grpc => (
                "l7",
                self.policy.check_request(
                    &peer,
                    &target,
                    &HttpRequest {
                        method: method.as_deref().unwrap_or("GET"),
                        path: path.as_deref().unwrap_or("/"),
                    },
                ),
            ),
        };
        Ok(serde_json::json!({
            "from": from_id,
            "to": to,
            "to_identity": target_id,
            "protocol": local.protocol,
            "layer": layer,
            "method": if layer == "l7" { method.or(Some("GET".into())) } else { None },
            "path": if layer == "l7" { path.or(Some("/".into())) } else { None },
            "decision": if d.is_allowed() { "allow" } else { "deny" },
            "rule": d.rule,
            "reason": &*d.reason,
        }))
    }
}
