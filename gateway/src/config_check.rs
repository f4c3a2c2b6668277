//! What `meshgate config validate` and start-up check in a gateway config beyond its shape,
//! without the network: the compiled policy ([`GatewayConfig::compile`]), the CA reference,
//! TLS files (present, key private, certificate and key a pair), the other files the config
//! names (JWKS, API key consumers, client secrets, CA bundles), URL schemes, listener ports
//! used twice, and route backends that no discovery source can resolve.
//!
//! Also [`GatewayConfig::resolve_paths`]: relative paths are relative to the config file.

use std::{net::SocketAddr, path::Path};

use meshgate_agent::config_check::{
    CheckOptions, FileKind, Finding, check_ca_ref, check_consul, check_data_dir, check_file,
    check_ports, check_resolvable, dedup, resolve_path, split_config_path,
};

use crate::{config::GatewayConfig, routes::BackendConfig};

impl GatewayConfig {
    /// Makes every relative path (data dir, join token, TLS files, JWKS files, API key
    /// consumers, client secrets, CA bundles, Consul files, transcoding include directories and
    /// descriptor sets, request schema files) relative to `base`, the directory of the file the
    /// config was read from. A transcoded route without `include` imports from `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve_path(&mut self.data_dir, base);
        if let Some(p) = &mut self.ca.join_token_file {
            resolve_path(p, base);
        }
        for t in &mut self.tls {
            resolve_path(&mut t.cert_file, base);
            resolve_path(&mut t.key_file, base);
        }
        if let Some(c) = &mut self.client_auth {
            resolve_path(&mut c.ca_file, base);
        }
        let auth = &mut self.auth;
        if let Some(p) = &mut auth.jwks_ca_file {
            resolve_path(p, base);
        }
        for j in &mut auth.jwt {
            if let Some(p) = &mut j.jwks_file {
                resolve_path(p, base);
            }
        }
        if let Some(k) = &mut auth.api_keys
            && let Some(p) = &mut k.consumers_file
        {
            resolve_path(p, base);
        }
        for i in &mut auth.introspection {
            for p in [&mut i.client_secret_file, &mut i.ca_file]
                .into_iter()
                .flatten()
            {
                resolve_path(p, base);
            }
        }
        if let Some(c) = &mut self.discovery.consul {
            c.resolve_paths(base);
        }
        for r in &mut self.routes {
            if let Some(t) = &mut r.transcode {
                // `protos` are import names, found in the include directories
                if t.include.is_empty() && !t.protos.is_empty() {
                    t.include.push(base.to_owned());
                }
                for d in &mut t.include {
                    resolve_path(d, base);
                }
                if let Some(p) = &mut t.descriptor_set {
                    resolve_path(p, base);
                }
            }
            if let Some(sc) = &mut r.request_schema
                && let Some(p) = &mut sc.file
            {
                resolve_path(p, base);
            }
        }
    }

    /// Every check that needs no network, errors first (see the module docs).
    pub fn check(&self, opts: CheckOptions) -> Vec<Finding> {
        let mut out = Vec::new();
        if let Err(e) = self.compile() {
            let (path, message) = split_config_path(&e.0);
            out.push(Finding::error(path, message));
        }
        check_ca_ref(
            &self.ca,
            &self.node,
            &[self.identity.as_str()],
            &self.data_dir,
            opts,
            &mut out,
        );
        if opts.files {
            check_data_dir(&self.data_dir, &mut out);
            self.check_files(&mut out);
        }
        self.check_urls(&mut out);
        if let Some(c) = &self.discovery.consul {
            check_consul("discovery.consul", c, opts, &mut out);
        }
        let mut listeners: Vec<(String, SocketAddr)> = Vec::new();
        if let Some(a) = self.listen.https {
            listeners.push(("listen.https".into(), a));
        }
        if let Some(a) = self.listen.http {
            listeners.push(("listen.http".into(), a));
        }
        listeners.push(("listen.admin".into(), self.listen.admin));
        check_ports(&listeners, &mut out);
        let mut backends = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            match &r.backend {
                BackendConfig::Service(s) => {
                    backends.push((format!("routes[{i}].backend.service"), s.clone()));
                }
                BackendConfig::Split { split, .. } => {
                    for (j, b) in split.iter().enumerate() {
                        backends.push((
                            format!("routes[{i}].backend.split[{j}].service"),
                            b.service.clone(),
                        ));
                    }
                }
                BackendConfig::External(x) => {
                    if let Some(ca) = &x.ca_file {
                        check_file(
                            &format!("routes[{i}].backend.external.ca_file"),
                            ca,
                            FileKind::Public,
                            &mut out,
                        );
                    }
                }
                BackendConfig::Aggregate(a) => {
                    for (j, c) in a.calls.iter().enumerate() {
                        if let Some(s) = &c.service {
                            backends.push((
                                format!("routes[{i}].backend.aggregate.calls[{j}].service"),
                                s.clone(),
                            ));
                        }
                    }
                }
                BackendConfig::OpenApi(_) => {}
            }
            if let Some(t) = &r.transcode
                && let Some(set) = &t.descriptor_set
            {
                check_file(
                    &format!("routes[{i}].transcode.descriptor_set"),
                    set,
                    FileKind::Public,
                    &mut out,
                );
            }
            if let Some(sc) = &r.request_schema
                && let Some(f) = &sc.file
            {
                check_file(
                    &format!("routes[{i}].request_schema.file"),
                    f,
                    FileKind::Public,
                    &mut out,
                );
            }
        }
        check_resolvable(&self.discovery, &backends, &mut out);
        dedup(&mut out);
        out
    }

    fn check_files(&self, out: &mut Vec<Finding>) {
        for (i, t) in self.tls.iter().enumerate() {
            let cert_ok = check_file(
                &format!("tls[{i}].cert_file"),
                &t.cert_file,
                FileKind::Public,
                out,
            );
            let key_ok = check_file(
                &format!("tls[{i}].key_file"),
                &t.key_file,
                FileKind::Secret,
                out,
            );
            if cert_ok && key_ok {
                // exactly what start-up does with the pair: parse both and check they match
                if let Err(meshgate_agent::http::front::FrontError::Cert { path, reason }) =
                    meshgate_agent::http::front::tls_acceptor(
                        std::slice::from_ref(t),
                        None,
                        meshgate_agent::http::front::MinTls::default(),
                    )
                {
                    let key = if Path::new(&path) == t.key_file {
                        "key_file"
                    } else {
                        "cert_file"
                    };
                    let message = if reason.starts_with("does not match the certificate") {
                        format!(
                            "{} is not the private key of {}",
                            t.key_file.display(),
                            t.cert_file.display()
                        )
                    } else {
                        format!("{path}: {reason}")
                    };
                    out.push(Finding::error(format!("tls[{i}].{key}"), message).hint(
                        "cert_file is the PEM chain (leaf first), key_file its PEM private key",
                    ));
                }
            }
        }
        if let Some(c) = &self.client_auth {
            check_file("client_auth.ca_file", &c.ca_file, FileKind::Public, out);
        }
        let auth = &self.auth;
        if let Some(f) = &auth.jwks_ca_file {
            check_file("auth.jwks_ca_file", f, FileKind::Public, out);
        }
        for (i, j) in auth.jwt.iter().enumerate() {
            if let Some(f) = &j.jwks_file {
                check_file(
                    &format!("auth.jwt[{i}].jwks_file"),
                    f,
                    FileKind::Public,
                    out,
                );
            }
        }
        if let Some(f) = auth
            .api_keys
            .as_ref()
            .and_then(|k| k.consumers_file.as_ref())
        {
            check_file("auth.api_keys.consumers_file", f, FileKind::Public, out);
        }
        for (i, p) in auth.introspection.iter().enumerate() {
            if let Some(f) = &p.client_secret_file {
                check_file(
                    &format!("auth.introspection[{i}].client_secret_file"),
                    f,
                    FileKind::Secret,
                    out,
                );
            }
            if let Some(f) = &p.ca_file {
                check_file(
                    &format!("auth.introspection[{i}].ca_file"),
                    f,
                    FileKind::Public,
                    out,
                );
            }
        }
    }

    fn check_urls(&self, out: &mut Vec<Finding>) {
        for (i, j) in self.auth.jwt.iter().enumerate() {
            if let Some(u) = &j.jwks_uri
                && !(u.starts_with("https://") || u.starts_with("http://"))
            {
                out.push(
                    Finding::error(
                        format!("auth.jwt[{i}].jwks_uri"),
                        format!("{u:?} must start with https:// (or http://)"),
                    )
                    .hint("the identity provider's JWKS URL, e.g. https://idp.example/.well-known/jwks.json"),
                );
            }
        }
        if let Some(r) = &self.auth.rate_limit_store {
            let u = r.url.trim();
            if !["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|s| u.starts_with(s))
            {
                out.push(
                    Finding::error(
                        "auth.rate_limit_store.url",
                        "must start with redis://, rediss:// or redis+unix://",
                    )
                    .hint("e.g. redis://127.0.0.1:6379/0"),
                );
            }
        }
    }
}
