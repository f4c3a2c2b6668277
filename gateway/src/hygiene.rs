//! Request-header hygiene: what the gateway does to every incoming request's headers before
//! any other filter sees them.
//!
//! This module owns the spoofable-header strip list, the trusted-proxy set (with its own small
//! CIDR matcher), request ids, W3C Trace Context continuation and the `X-Forwarded-*` chain,
//! from which it derives the client address later filters (rate limits, logs) rely on.
//!
//! It must not authenticate anyone: identity headers are only ever *removed* here, and the
//! authentication filters that run afterwards are the only ones that may set them. It does no
//! I/O and draws no randomness of its own: ids come from the caller's `rand`.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use meshgate_agent::http::ctx::push_hex;
use serde::{Deserialize, Serialize};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Request-header hygiene settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HygieneConfig {
    /// Headers removed from every request, whoever sent it (case-insensitive; a trailing `*`
    /// makes a prefix pattern). Default:
    /// `["X-User-Id", "X-Scopes", "X-Consumer-*", "X-Forwarded-Client-Cert"]`.
    #[serde(default = "default_strip")]
    pub strip: Vec<String>,
    /// Peers whose forwarding headers are believed: CIDRs (`10.0.0.0/8`, `::1/128`) or single
    /// addresses. Default: none (no peer is trusted).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The request-id header. Default: `X-Request-Id`.
    #[serde(default = "default_request_id_header")]
    pub request_id_header: String,
}

fn default_strip() -> Vec<String> {
    [
        "X-User-Id",
        "X-Scopes",
        "X-Consumer-*",
        "X-Forwarded-Client-Cert",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn default_request_id_header() -> String {
    "X-Request-Id".into()
}

impl Default for HygieneConfig {
    fn default() -> Self {
        Self {
            strip: default_strip(),
            trusted_proxies: Vec::new(),
            request_id_header: default_request_id_header(),
        }
    }
}

/// Why a [`HygieneConfig`] cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HygieneError {
    /// A `trusted_proxies` entry that is neither an address nor a CIDR.
    #[error("hygiene: trusted_proxies entry {entry:?} is not an IP address or CIDR ({reason})")]
    InvalidTrustedProxy {
        /// The entry as configured.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `strip` entry that is not a header name, optionally followed by one `*`.
    #[error(
        "hygiene: strip entry {0:?} is not a header name or a prefix ending in a single trailing '*'"
    )]
    InvalidStripPattern(String),
    /// A `request_id_header` that is not a header name.
    #[error("hygiene: request_id_header {0:?} is not a header name")]
    InvalidRequestIdHeader(String),
}

/// An IPv4 or IPv6 network: address and prefix length, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN` or a bare `ADDR` (a host network). Host bits are cleared, and an
    /// IPv4-mapped IPv6 network (`::ffff:a.b.c.d/LEN`, LEN >= 96) becomes its IPv4 form.
    fn parse(entry: &str) -> Result<Cidr, &'static str> {
        let entry = entry.trim();
        let (addr, prefix) = match entry.split_once('/') {
            Some((addr, len)) => {
                if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("bad prefix length");
                }
                let len: u8 = len.parse().map_err(|_| "bad prefix length")?;
                (addr, Some(len))
            }
            None => (entry, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| "bad address")?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err("prefix length too long");
        }
        let (net, prefix) = match net {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (net, prefix),
            },
            _ => (net, prefix),
        };
        let net = match net {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask32(prefix)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask128(prefix)).into()),
        };
        Ok(Cidr { net, prefix })
    }

    /// Whether `ip` (already canonical) lies in this network.
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

/// Compiled, validated request-header hygiene.
#[derive(Debug, Clone)]
pub struct Hygiene {
    strip_exact: Vec<HeaderName>,
    strip_prefixes: Vec<String>,
    trusted: Vec<Cidr>,
    request_id_header: HeaderName,
}

/// What [`Hygiene::ingress`] established about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    /// The request id now in the request-id header.
    pub request_id: String,
    /// The `traceparent` now on the request (version `00`, this hop's span as parent-id).
    pub traceparent: String,
    /// The client address: the right-most untrusted address of the `X-Forwarded-For` chain.
    pub client_ip: IpAddr,
}

impl Hygiene {
    /// Validates and compiles the settings.
    ///
    /// # Errors
    /// A `trusted_proxies` entry that is no address or CIDR (the error names it), a `strip`
    /// entry that is no header name (a lone `*`, or `*` anywhere but at the end, included), or
    /// an invalid `request_id_header`.
    pub fn new(cfg: &HygieneConfig) -> Result<Hygiene, HygieneError> {
        let mut strip_exact = Vec::new();
        let mut strip_prefixes = Vec::new();
        for pattern in &cfg.strip {
            let invalid = || HygieneError::InvalidStripPattern(pattern.clone());
            let trimmed = pattern.trim();
            let (name, is_prefix) = match trimmed.strip_suffix('*') {
                Some(prefix) => (prefix, true),
                None => (trimmed, false),
            };
            if name.contains('*') {
                return Err(invalid());
            }
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
            if is_prefix {
                strip_prefixes.push(name.as_str().replace('_', "-"));
            } else {
                let canon = name.as_str().replace('_', "-");
                strip_exact.push(HeaderName::from_bytes(canon.as_bytes()).map_err(|_| invalid())?);
            }
        }
        let trusted = cfg
            .trusted_proxies
            .iter()
            .map(|entry| {
                Cidr::parse(entry).map_err(|reason| HygieneError::InvalidTrustedProxy {
                    entry: entry.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let request_id_header = HeaderName::from_bytes(cfg.request_id_header.trim().as_bytes())
            .map_err(|_| HygieneError::InvalidRequestIdHeader(cfg.request_id_header.clone()))?;
        Ok(Hygiene {
            strip_exact,
            strip_prefixes,
            trusted,
            request_id_header,
        })
    }

    /// Whether `ip` is a trusted proxy (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|cidr| cidr.contains(ip))
    }

    /// Cleans an incoming request's headers. Applies, in order:
    ///
    /// 1. removes the `strip` headers;
    /// 2. request id: keeps the incoming value only when `peer` is trusted and it is a single
    ///    value of 1..=128 visible ASCII characters, else sets 32 lowercase hex from two `rand`
    ///    draws;
    /// 3. `traceparent` (W3C Trace Context): a valid incoming one is continued (same trace-id
    ///    and flags, new parent-id from `rand`, `tracestate` kept); an invalid or absent one is
    ///    replaced by a new trace (trace-id and parent-id from `rand`, flags `01`) and
    ///    `tracestate` is dropped. Continuation does not depend on `peer`;
    /// 4. `X-Forwarded-For`: from a trusted `peer`, `peer` is appended to the incoming list;
    ///    otherwise the list becomes just `peer`. `client_ip` is then the right-most address of
    ///    the chain that is not a trusted proxy; when every address up to the left end (or up
    ///    to an entry that is no address) is trusted, it is the left-most address reached;
    /// 5. `X-Forwarded-Proto`: the incoming value is kept only from a trusted `peer`, else set
    ///    to `scheme` (`"https"`, compared case-insensitively; anything else means `"http"`);
    /// 6. `X-Forwarded-Host`: the incoming value is kept only from a trusted `peer`, else set
    ///    from `Host` (removed when there is no `Host`; for HTTP/2 the caller should have put
    ///    `:authority` into `Host` first);
    /// 7. from an untrusted `peer`, `Forwarded` and `X-Real-IP` are removed as well: the
    ///    gateway does not produce them, and upstreams must not believe a client's own claim.
    pub fn ingress(
        &self,
        headers: &mut HeaderMap,
        peer: IpAddr,
        scheme: &str,
        rand: &mut dyn FnMut() -> u64,
    ) -> Ingress {
        let peer = peer.to_canonical();
        let trusted = self.is_trusted(peer);

        self.strip(headers);
        let request_id = self.request_id(headers, trusted, rand);
        let traceparent = traceparent(headers, rand);
        let client_ip = self.forwarded_for(headers, peer, trusted);

        if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
            let proto = if scheme.eq_ignore_ascii_case("https") {
                "https"
            } else {
                "http"
            };
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
            match headers.get(header::HOST).cloned() {
                Some(host) => {
                    headers.insert(X_FORWARDED_HOST, host);
                }
                None => {
                    headers.remove(X_FORWARDED_HOST);
                }
            }
        }
        if !trusted {
            headers.remove(header::FORWARDED);
            headers.remove(X_REAL_IP);
        }

        Ingress {
            request_id,
            traceparent,
            client_ip,
        }
    }

    /// Also strips these names (the identity headers authentication injects), in every
    /// spelling.
    pub fn also_strip(&mut self, names: impl IntoIterator<Item = HeaderName>) {
        for n in names {
            if !self.strip_exact.contains(&n) {
                self.strip_exact.push(n);
            }
        }
    }

    /// Removes the strip-list headers. Names are compared case-insensitively and with `_`
    /// read as `-`: CGI-style backends (PHP, WSGI, many frameworks) turn `X_User_Id` into the
    /// same variable as `X-User-Id`, so a client must not get either spelling through.
    fn strip(&self, headers: &mut HeaderMap) {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                let n = name.as_str();
                let canon = if n.contains('_') {
                    std::borrow::Cow::Owned(n.replace('_', "-"))
                } else {
                    std::borrow::Cow::Borrowed(n)
                };
                self.strip_exact.iter().any(|e| e.as_str() == canon)
                    || self
                        .strip_prefixes
                        .iter()
                        .any(|prefix| canon.starts_with(prefix.as_str()))
            })
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }

    fn request_id(
        &self,
        headers: &mut HeaderMap,
        trusted: bool,
        rand: &mut dyn FnMut() -> u64,
    ) -> String {
        if trusted {
            let mut values = headers.get_all(&self.request_id_header).iter();
            if let (Some(value), None) = (values.next(), values.next()) {
                let bytes = value.as_bytes();
                if (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic()) {
                    return String::from_utf8_lossy(bytes).into_owned();
                }
            }
        }
        let mut id = String::with_capacity(32);
        push_hex(&mut id, rand());
        push_hex(&mut id, rand());
        headers.insert(
            self.request_id_header.clone(),
            HeaderValue::from_str(&id).expect("invariant: hex is a valid header value"),
        );
        id
    }

    /// Rewrites `X-Forwarded-For` and returns the client address.
    fn forwarded_for(&self, headers: &mut HeaderMap, peer: IpAddr, trusted: bool) -> IpAddr {
        let mut chain: Vec<String> = Vec::new();
        if trusted {
            chain = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(String::from)
                .collect();
        }
        chain.push(peer.to_string());
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_str(&chain.join(", "))
                .expect("invariant: entries come from valid header text or an address"),
        );

        let mut client = peer;
        for entry in chain.iter().rev() {
            let Some(ip) = parse_forwarded_ip(entry) else {
                break;
            };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry as an address: `ip`, `ip:port`, `[v6]` or `[v6]:port`;
/// canonical (IPv4-mapped IPv6 becomes IPv4).
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

/// Continues or starts a trace; returns the new `traceparent`.
fn traceparent(headers: &mut HeaderMap, rand: &mut dyn FnMut() -> u64) -> String {
    let mut value = String::with_capacity(55);
    value.push_str("00-");
    match parse_traceparent(headers) {
        Some((trace_id, flags)) => {
            value.push_str(&trace_id);
            value.push('-');
            push_hex(&mut value, nonzero(rand));
            value.push('-');
            value.push_str(&flags);
        }
        None => {
            headers.remove(TRACESTATE);
            let hi = rand();
            let lo = if hi == 0 { nonzero(rand) } else { rand() };
            push_hex(&mut value, hi);
            push_hex(&mut value, lo);
            value.push('-');
            push_hex(&mut value, nonzero(rand));
            value.push_str("-01");
        }
    }
    headers.insert(
        TRACEPARENT,
        HeaderValue::from_str(&value).expect("invariant: traceparent is hex and dashes"),
    );
    value
}

/// A non-zero draw (W3C ids must not be all zeros): one retry, then 1.
fn nonzero(rand: &mut dyn FnMut() -> u64) -> u64 {
    match rand() {
        0 => match rand() {
            0 => 1,
            n => n,
        },
        n => n,
    }
}

/// The trace-id and flags of a single valid incoming `traceparent`.
///
/// Version `00` must be exactly `00-<32 hex>-<16 hex>-<2 hex>`; later versions (not `ff`) are
/// read by the same layout when followed by nothing or by `-…`, and continued as `00`. Hex must
/// be lowercase; all-zero trace-id or parent-id is invalid.
fn parse_traceparent(headers: &HeaderMap) -> Option<(String, String)> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let s = value.to_str().ok()?.trim();
    let b = s.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let is_hex = |part: &str| part.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let (version, trace_id, parent_id, flags) = (&s[0..2], &s[3..35], &s[36..52], &s[53..55]);
    if !(is_hex(version) && is_hex(trace_id) && is_hex(parent_id) && is_hex(flags)) {
        return None;
    }
    let length_ok = match version {
        "ff" => false,
        "00" => b.len() == 55,
        _ => b.len() == 55 || b[55] == b'-',
    };
    let all_zero = |part: &str| part.bytes().all(|c| c == b'0');
    if !length_ok || all_zero(trace_id) || all_zero(parent_id) {
        return None;
    }
    Some((trace_id.to_owned(), flags.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header name/value pairs of a test request.
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    /// Plain string lists.
    type Names<'a> = &'a [&'a str];

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn map(pairs: Pairs<'_>) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
                HeaderValue::from_bytes(v.as_bytes()).expect("test header value"),
            );
        }
        m
    }

    fn values(m: &HeaderMap, name: &str) -> Vec<String> {
        m.get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// Draws 1, 2, 3, …
    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    fn hygiene(trusted: Names<'_>) -> Hygiene {
        Hygiene::new(&HygieneConfig {
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            ..HygieneConfig::default()
        })
        .expect("valid config")
    }

    const PROXIES: Names<'static> = &["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1/128"];
    const UNTRUSTED: &str = "203.0.113.9";
    const TRUSTED: &str = "10.0.0.1";

    #[test]
    fn config_defaults_and_deny_unknown_fields() {
        let parsed: HygieneConfig = serde_json::from_str("{}").expect("empty parses");
        assert_eq!(parsed, HygieneConfig::default());
        assert_eq!(
            parsed.strip,
            [
                "X-User-Id",
                "X-Scopes",
                "X-Consumer-*",
                "X-Forwarded-Client-Cert"
            ]
        );
        assert_eq!(parsed.request_id_header, "X-Request-Id");
        assert!(parsed.trusted_proxies.is_empty());
        assert!(serde_json::from_str::<HygieneConfig>(r#"{"trusted": []}"#).is_err());
    }

    #[test]
    fn config_errors() {
        let proxy = |entry: &str, reason| {
            Err(HygieneError::InvalidTrustedProxy {
                entry: entry.into(),
                reason,
            })
        };
        let strip = |p: &str| Err(HygieneError::InvalidStripPattern(p.into()));
        const RID: &str = "X-Request-Id";
        // (strip, trusted_proxies, request_id_header, want)
        #[rustfmt::skip]
        let cases: &[(Names<'_>, Names<'_>, &str, Result<(), HygieneError>)] = &[
            (&[], PROXIES, RID, Ok(())),
            (&["X-A", "x-b-*"], &["0.0.0.0/0", "::/0", "10.1.2.3/8", " 10.0.0.1 "], "x-rid", Ok(())),
            (&[], &["10.0.0.0/33"], RID, proxy("10.0.0.0/33", "prefix length too long")),
            (&[], &["::1/129"], RID, proxy("::1/129", "prefix length too long")),
            (&[], &["10.0.0/8"], RID, proxy("10.0.0/8", "bad address")),
            (&[], &["10.0.0.0/"], RID, proxy("10.0.0.0/", "bad prefix length")),
            (&[], &["10.0.0.0/+8"], RID, proxy("10.0.0.0/+8", "bad prefix length")),
            (&[], &["10.0.0.0/8/8"], RID, proxy("10.0.0.0/8/8", "bad prefix length")),
            (&[], &["proxy.internal"], RID, proxy("proxy.internal", "bad address")),
            (&["*"], &[], RID, strip("*")),
            (&["X-*-Id"], &[], RID, strip("X-*-Id")),
            (&["X-A**"], &[], RID, strip("X-A**")),
            (&["X Bad"], &[], RID, strip("X Bad")),
            (&[], &[], "Bad Header", Err(HygieneError::InvalidRequestIdHeader("Bad Header".into()))),
        ];
        for (strip, trusted, rid, want) in cases {
            let cfg = HygieneConfig {
                strip: strip.iter().map(|s| s.to_string()).collect(),
                trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
                request_id_header: rid.to_string(),
            };
            assert_eq!(&Hygiene::new(&cfg).map(|_| ()), want, "{cfg:?}");
        }
        let message = Hygiene::new(&HygieneConfig {
            trusted_proxies: vec!["10.0.0.0/33".into()],
            ..HygieneConfig::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(message.contains("\"10.0.0.0/33\""), "{message}");
    }

    #[test]
    fn cidr_matching() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3/8", "10.9.9.9", true),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("172.16.0.0/12", "172.31.255.255", true),
            ("172.16.0.0/12", "172.32.0.0", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("0.0.0.0/0", "::1", false),
            ("::/0", "2001:db8::1", true),
            ("::/0", "8.8.8.8", false),
            ("::1/128", "::1", true),
            ("::1/128", "::2", false),
            ("fd00::/8", "fdab::1", true),
            ("fd00::/8", "fe80::1", false),
            ("2001:db8::/33", "2001:db8:7fff::1", true),
            ("2001:db8::/33", "2001:db8:8000::1", false),
            ("10.0.0.0/8", "::ffff:10.1.1.1", true),
            ("::ffff:10.0.0.0/104", "10.2.3.4", true),
            ("::ffff:10.0.0.0/104", "11.2.3.4", false),
        ];
        for (cidr, addr, want) in cases {
            assert_eq!(
                hygiene(&[cidr]).is_trusted(ip(addr)),
                want,
                "{cidr} contains {addr}"
            );
        }
    }

    #[test]
    fn strip_table() {
        let h = hygiene(PROXIES);
        let request = [
            ("X-User-Id", "admin"),
            ("x-user-id", "root"),
            ("X-Scopes", "admin:*"),
            ("X-Consumer-Custom-ID", "c-1"),
            ("X-Consumer-Username", "alice"),
            ("X-Forwarded-Client-Cert", "Hash=abc"),
            ("X-Consumer", "not a prefix match"),
            ("X-User-Identity", "not an exact match"),
            ("Authorization", "Bearer t"),
        ];
        let cases = [
            ("x-user-id", false),
            ("x-scopes", false),
            ("x-consumer-custom-id", false),
            ("x-consumer-username", false),
            ("x-forwarded-client-cert", false),
            ("x-consumer", true),
            ("x-user-identity", true),
            ("authorization", true),
        ];
        // Stripped whoever sends them, trusted proxy or not.
        for peer in [UNTRUSTED, TRUSTED] {
            let mut headers = map(&request);
            h.ingress(&mut headers, ip(peer), "https", &mut counter());
            for (name, kept) in cases {
                assert_eq!(headers.contains_key(name), kept, "{peer}: {name}");
            }
        }
    }

    #[test]
    fn request_id_table() {
        let h = hygiene(PROXIES);
        const GENERATED: &str = "00000000000000010000000000000002";
        let long = "a".repeat(128);
        let too_long = "a".repeat(129);
        let rid = |v| ("x-request-id", v);
        // (name, peer, request, want)
        #[rustfmt::skip]
        let cases: &[(&str, &str, Pairs<'_>, &str)] = &[
            ("trusted, valid: kept", TRUSTED, &[rid("abc-123")], "abc-123"),
            ("trusted, 128 chars: kept", TRUSTED, &[rid(&long)], &long),
            ("untrusted: replaced", UNTRUSTED, &[rid("abc-123")], GENERATED),
            ("trusted, absent: generated", TRUSTED, &[], GENERATED),
            ("trusted, 129 chars: replaced", TRUSTED, &[rid(&too_long)], GENERATED),
            ("trusted, empty: replaced", TRUSTED, &[rid("")], GENERATED),
            ("trusted, space: replaced", TRUSTED, &[rid("a b")], GENERATED),
            ("trusted, tab: replaced", TRUSTED, &[rid("a\tb")], GENERATED),
            ("trusted, non-ASCII: replaced", TRUSTED, &[rid("caf\u{e9}")], GENERATED),
            ("trusted, two values: replaced", TRUSTED, &[rid("a"), rid("b")], GENERATED),
        ];
        for (name, peer, request, want) in cases {
            let mut headers = map(request);
            let ingress = h.ingress(&mut headers, ip(peer), "http", &mut counter());
            assert_eq!(ingress.request_id, *want, "{name}");
            assert_eq!(values(&headers, "x-request-id"), [*want], "{name}");
        }

        let custom = Hygiene::new(&HygieneConfig {
            request_id_header: "X-Correlation-Id".into(),
            trusted_proxies: vec!["10.0.0.0/8".into()],
            ..HygieneConfig::default()
        })
        .expect("valid");
        let mut headers = map(&[("x-correlation-id", "corr-1"), ("x-request-id", "other")]);
        let ingress = custom.ingress(&mut headers, ip(TRUSTED), "http", &mut counter());
        assert_eq!(ingress.request_id, "corr-1");
        assert_eq!(values(&headers, "x-request-id"), ["other"]);
    }

    #[test]
    fn traceparent_table() {
        let h = hygiene(PROXIES);
        const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
        // The counter's first two draws make the request id; trace ids come after.
        let continued = |flags: &str| format!("00-{TRACE}-0000000000000003-{flags}");
        let fresh = "00-00000000000000030000000000000004-0000000000000005-01".to_string();
        let tp = |v: String| vec![v];
        let with = |version: &str, trace: &str, parent: &str, flags: &str| {
            tp(format!("{version}-{trace}-{parent}-{flags}"))
        };
        const PARENT: &str = "00f067aa0ba902b7";
        const ZERO_TRACE: &str = "00000000000000000000000000000000";
        let valid = format!("00-{TRACE}-{PARENT}-01");
        // (name, incoming traceparent values, want, tracestate kept)
        #[rustfmt::skip]
        let cases: [(&str, Vec<String>, String, bool); 15] = [
            ("valid: continued", tp(valid.clone()), continued("01"), true),
            ("unsampled flags kept", with("00", TRACE, PARENT, "00"), continued("00"), true),
            ("other flag bits kept", with("00", TRACE, PARENT, "03"), continued("03"), true),
            ("future version continued as 00", tp(format!("cc-{TRACE}-{PARENT}-01-extra")),
                continued("01"), true),
            ("absent: new", vec![], fresh.clone(), false),
            ("version ff", with("ff", TRACE, PARENT, "01"), fresh.clone(), false),
            ("00 with trailing data", tp(format!("{valid}-x")), fresh.clone(), false),
            ("zero trace id", with("00", ZERO_TRACE, PARENT, "01"), fresh.clone(), false),
            ("zero parent id", with("00", TRACE, "0000000000000000", "01"), fresh.clone(), false),
            ("uppercase hex", with("00", &TRACE.to_uppercase(), PARENT, "01"), fresh.clone(), false),
            ("short trace id", with("00", &TRACE[1..], PARENT, "01"), fresh.clone(), false),
            ("not hex", with("00", TRACE, "00f067aa0ba902bz", "01"), fresh.clone(), false),
            ("bad flags", with("00", TRACE, PARENT, "0x"), fresh.clone(), false),
            ("garbage", tp("hello".into()), fresh.clone(), false),
            ("two headers", vec![valid.clone(), valid.clone()], fresh.clone(), false),
        ];
        for (name, incoming, want, tracestate_kept) in cases {
            let mut pairs: Vec<(&str, &str)> = incoming
                .iter()
                .map(|v| ("traceparent", v.as_str()))
                .collect();
            pairs.push(("tracestate", "vendor=abc"));
            let mut headers = map(&pairs);
            let ingress = h.ingress(&mut headers, ip(UNTRUSTED), "https", &mut counter());
            assert_eq!(ingress.traceparent, want, "{name}");
            assert_eq!(values(&headers, "traceparent"), [want.as_str()], "{name}");
            let state: Names<'_> = if tracestate_kept {
                &["vendor=abc"]
            } else {
                &[]
            };
            assert_eq!(values(&headers, "tracestate"), state, "{name}");
        }
    }

    #[test]
    fn zero_draws_never_make_zero_ids() {
        let h = hygiene(&[]);
        let mut headers = HeaderMap::new();
        let ingress = h.ingress(&mut headers, ip(UNTRUSTED), "https", &mut || 0);
        assert_eq!(
            ingress.traceparent,
            "00-00000000000000000000000000000001-0000000000000001-01"
        );
    }

    #[test]
    fn forwarded_for_table() {
        let h = hygiene(PROXIES);
        // (name, peer, incoming X-Forwarded-For values, want X-Forwarded-For, want client_ip)
        #[rustfmt::skip]
        let cases: &[(&str, &str, Names<'_>, &str, &str)] = &[
            ("untrusted peer, no XFF", UNTRUSTED, &[], UNTRUSTED, UNTRUSTED),
            ("untrusted peer: spoofed XFF replaced", UNTRUSTED, &["1.2.3.4, 10.0.0.1"],
                UNTRUSTED, UNTRUSTED),
            ("trusted peer appends", TRUSTED, &["198.51.100.7"],
                "198.51.100.7, 10.0.0.1", "198.51.100.7"),
            ("trusted peer, no XFF: the peer", TRUSTED, &[], TRUSTED, TRUSTED),
            ("chain of trusted proxies", TRUSTED, &["6.6.6.6, 198.51.100.7, 192.168.1.7", "10.2.2.2"],
                "6.6.6.6, 198.51.100.7, 192.168.1.7, 10.2.2.2, 10.0.0.1", "198.51.100.7"),
            ("all trusted: left-most", TRUSTED, &["10.9.9.9, 10.2.2.2"],
                "10.9.9.9, 10.2.2.2, 10.0.0.1", "10.9.9.9"),
            ("junk stops the walk", TRUSTED, &["1.1.1.1, unknown, 10.2.2.2"],
                "1.1.1.1, unknown, 10.2.2.2, 10.0.0.1", "10.2.2.2"),
            ("ports and brackets", TRUSTED, &["[2001:db8::5]:4711, 10.2.2.2:80"],
                "[2001:db8::5]:4711, 10.2.2.2:80, 10.0.0.1", "2001:db8::5"),
            ("IPv6 trusted peer", "::1", &["2001:db8::9"], "2001:db8::9, ::1", "2001:db8::9"),
            ("IPv4-mapped peer is canonical", "::ffff:10.0.0.1", &["198.51.100.7"],
                "198.51.100.7, 10.0.0.1", "198.51.100.7"),
            ("empty entries dropped", TRUSTED, &[" , 198.51.100.7 ,"],
                "198.51.100.7, 10.0.0.1", "198.51.100.7"),
        ];
        for (name, peer, incoming, want_xff, want_client) in cases {
            let pairs: Vec<(&str, &str)> =
                incoming.iter().map(|v| ("x-forwarded-for", *v)).collect();
            let mut headers = map(&pairs);
            let ingress = h.ingress(&mut headers, ip(peer), "https", &mut counter());
            assert_eq!(values(&headers, "x-forwarded-for"), [*want_xff], "{name}");
            assert_eq!(ingress.client_ip, ip(want_client), "{name}");
        }
    }

    struct ProtoHostCase {
        name: &'static str,
        peer: &'static str,
        scheme: &'static str,
        request: Pairs<'static>,
        proto: Names<'static>,
        host: Names<'static>,
    }

    #[test]
    fn forwarded_proto_host_table() {
        let h = hygiene(PROXIES);
        let cases = [
            ProtoHostCase {
                name: "untrusted: XFP from scheme, XFH from Host",
                peer: UNTRUSTED,
                scheme: "https",
                request: &[("x-forwarded-proto", "http"), ("host", "api.example")],
                proto: &["https"],
                host: &["api.example"],
            },
            ProtoHostCase {
                name: "untrusted: spoofed XFH replaced",
                peer: UNTRUSTED,
                scheme: "http",
                request: &[
                    ("x-forwarded-host", "evil.example"),
                    ("host", "api.example"),
                ],
                proto: &["http"],
                host: &["api.example"],
            },
            ProtoHostCase {
                name: "untrusted, no Host: spoofed XFH removed",
                peer: UNTRUSTED,
                scheme: "http",
                request: &[("x-forwarded-host", "evil.example")],
                proto: &["http"],
                host: &[],
            },
            ProtoHostCase {
                name: "trusted: incoming kept",
                peer: TRUSTED,
                scheme: "http",
                request: &[
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "public.example"),
                    ("host", "internal"),
                ],
                proto: &["https"],
                host: &["public.example"],
            },
            ProtoHostCase {
                name: "trusted, absent: set",
                peer: TRUSTED,
                scheme: "HTTPS",
                request: &[("host", "api.example")],
                proto: &["https"],
                host: &["api.example"],
            },
            ProtoHostCase {
                name: "unknown scheme means http",
                peer: UNTRUSTED,
                scheme: "h3",
                request: &[],
                proto: &["http"],
                host: &[],
            },
        ];
        for case in cases {
            let mut headers = map(case.request);
            h.ingress(&mut headers, ip(case.peer), case.scheme, &mut counter());
            let name = case.name;
            assert_eq!(values(&headers, "x-forwarded-proto"), case.proto, "{name}");
            assert_eq!(values(&headers, "x-forwarded-host"), case.host, "{name}");
        }
    }

    #[test]
    fn client_claims_dropped_from_untrusted_peers() {
        let h = hygiene(PROXIES);
        let request = [("forwarded", "for=1.2.3.4"), ("x-real-ip", "1.2.3.4")];
        for (peer, kept) in [(UNTRUSTED, false), (TRUSTED, true)] {
            let mut headers = map(&request);
            h.ingress(&mut headers, ip(peer), "https", &mut counter());
            assert_eq!(headers.contains_key("forwarded"), kept, "{peer}");
            assert_eq!(headers.contains_key("x-real-ip"), kept, "{peer}");
        }
    }
}
