//! API-key authentication: consumers, their keys stored as SHA-256 hashes, and where a
//! request carries its key.
//!
//! This module owns the configuration ([`ApiKeyConfig`], [`Consumer`], [`KeyLocation`]), the
//! key hash format ([`hash_key`]: `sha256:` followed by 64 lowercase hex digits), the lookup
//! of a presented key ([`KeyStore::lookup`]), and reading ([`extract`]) and removing
//! ([`hide`]) the key in a request.
//!
//! Keys are never stored: configuration holds only their hashes, and a presented key is
//! hashed, then compared with every stored hash in constant time, without stopping at a
//! match, so the time taken reveals neither whether nor which key matched (the cost is linear
//! in the number of keys, a few nanoseconds each).
//!
//! It must not do I/O (`consumers_file`, a JSON list of consumers, is read by `crate::auth`), log, `Display` or `Debug`
//! a key or a key hash: [`KeyStore`]'s and [`Consumer`]'s `Debug` print consumer names and key
//! counts only, and no error message quotes a configured hash (a malformed one may be a
//! plaintext key pasted by mistake). It decides authentication only, not authorisation.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::PathBuf,
};

use aws_lc_rs::{constant_time, digest};
use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// The prefix of a stored key hash.
const HASH_PREFIX: &str = "sha256:";

/// The length of a SHA-256 digest in bytes.
const HASH_LEN: usize = 32;

/// A client of the gateway identified by API keys. YAML:
/// `{name: acme, groups: [partners], tier: gold, keys: ["sha256:…"]}`.
///
/// `Debug` prints the number of keys, not the hashes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// The consumer's name, unique and non-empty; what limits and logs refer to.
    pub name: String,
    /// Groups for authorisation rules. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The rate-limit tier. Default: none (the policy's default limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// The key hashes, each `sha256:` followed by 64 hex digits, as `meshgate apikey hash` makes them
    /// (`meshgate` never needs the keys themselves).
    pub keys: Vec<String>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("groups", &self.groups)
            .field("tier", &self.tier)
            .field("keys", &format_args!("<{} redacted>", self.keys.len()))
            .finish()
    }
}

/// Where a request may carry its key. YAML: `{header: X-Api-Key}` or `{query: api_key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(from = "KeyLocationRepr", into = "KeyLocationRepr")]
pub enum KeyLocation {
    /// A request header (name matched case-insensitively).
    Header {
        /// The header name, e.g. `X-Api-Key`.
        name: String,
    },
    /// A query parameter (name matched exactly, after URL-decoding).
    Query {
        /// The parameter name, e.g. `api_key`.
        name: String,
    },
}

/// The YAML shape of [`KeyLocation`].
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[schemars(rename = "KeyLocation")]
enum KeyLocationRepr {
    /// A request header, e.g. `X-Api-Key`.
    Header(String),
    /// A query parameter, e.g. `api_key`.
    Query(String),
}

impl From<KeyLocationRepr> for KeyLocation {
    fn from(r: KeyLocationRepr) -> Self {
        match r {
            KeyLocationRepr::Header(name) => KeyLocation::Header { name },
            KeyLocationRepr::Query(name) => KeyLocation::Query { name },
        }
    }
}

impl From<KeyLocation> for KeyLocationRepr {
    fn from(l: KeyLocation) -> Self {
        match l {
            KeyLocation::Header { name } => KeyLocationRepr::Header(name),
            KeyLocation::Query { name } => KeyLocationRepr::Query(name),
        }
    }
}

fn default_locations() -> Vec<KeyLocation> {
    vec![KeyLocation::Header {
        name: "X-Api-Key".into(),
    }]
}

fn default_true() -> bool {
    true
}

/// API-key authentication settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Consumers listed inline. Default: none.
    #[serde(default)]
    pub consumers: Vec<Consumer>,
    /// A YAML or JSON file with more consumers (a list of the same shape), read by the
    /// caller, not here. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers_file: Option<PathBuf>,
    /// Where to look for the key, in order; the first location that holds one wins.
    /// Default: `[{header: X-Api-Key}]`.
    #[serde(default = "default_locations")]
    pub locations: Vec<KeyLocation>,
    /// Whether to remove the key (every configured location) before forwarding upstream.
    /// Default: `true`.
    #[serde(default = "default_true")]
    pub hide_from_upstream: bool,
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        Self {
            consumers: Vec::new(),
            consumers_file: None,
            locations: default_locations(),
            hide_from_upstream: true,
        }
    }
}

impl ApiKeyConfig {
    /// Checks the locations: at least one, header names valid, query names non-empty. The
    /// consumers are checked by [`KeyStore::new`].
    pub fn validate(&self) -> Result<(), ApiKeyError> {
        if self.locations.is_empty() {
            return Err(ApiKeyError::NoLocations);
        }
        for location in &self.locations {
            match location {
                KeyLocation::Header { name } => {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return Err(ApiKeyError::InvalidHeader(name.clone()));
                    }
                }
                KeyLocation::Query { name } => {
                    if name.is_empty() {
                        return Err(ApiKeyError::EmptyQueryName);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why an API-key configuration is invalid. No message quotes a key hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    /// A consumer without a name.
    #[error("api_key: consumers[{index}] has an empty name")]
    EmptyName {
        /// The consumer's position in the list.
        index: usize,
    },
    /// Two consumers with one name.
    #[error("api_key: consumer {0:?} is listed more than once")]
    DuplicateConsumer(String),
    /// A key entry that is not `sha256:` and 64 hex digits.
    #[error(
        "api_key: consumer {consumer:?}: keys[{index}] is not \"sha256:\" followed by 64 hex digits (configure the hash of a key, never the key itself)"
    )]
    InvalidHash {
        /// The consumer's name.
        consumer: String,
        /// The entry's position in `keys`.
        index: usize,
    },
    /// One key hash listed twice (by two consumers, or twice by one).
    #[error("api_key: consumers {first:?} and {second:?} list the same key")]
    DuplicateKey {
        /// The consumer that listed it first.
        first: String,
        /// The consumer that listed it again (may be `first`).
        second: String,
    },
    /// `locations` is empty.
    #[error("api_key: `locations` must not be empty")]
    NoLocations,
    /// A header location that is not a header name.
    #[error("api_key: location header {0:?} is not a valid header name")]
    InvalidHeader(String),
    /// A query location with an empty name.
    #[error("api_key: a location query parameter name is empty")]
    EmptyQueryName,
}

/// The stored form of a key: `sha256:` followed by the lowercase hex SHA-256 of its UTF-8
/// bytes.
pub fn hash_key(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = digest::digest(&digest::SHA256, key.as_bytes());
    let mut out = String::with_capacity(HASH_PREFIX.len() + 2 * HASH_LEN);
    out.push_str(HASH_PREFIX);
    for b in digest.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// Parses `sha256:` and 64 hex digits (either case) into the digest.
fn parse_hash(s: &str) -> Option<[u8; HASH_LEN]> {
    let hex = s.strip_prefix(HASH_PREFIX)?.as_bytes();
    if hex.len() != 2 * HASH_LEN {
        return None;
    }
    let nibble = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; HASH_LEN];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// The consumers and their key hashes, ready for lookups.
///
/// `Debug` prints consumer names and the number of keys, never hashes.
#[derive(Clone)]
pub struct KeyStore {
    consumers: Vec<Consumer>,
    /// Every key digest and the index of its consumer.
    hashes: Vec<([u8; HASH_LEN], usize)>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.consumers.iter().map(|c| c.name.as_str()).collect();
        f.debug_struct("KeyStore")
            .field("consumers", &names)
            .field("keys", &self.hashes.len())
            .finish()
    }
}

impl KeyStore {
    /// Checks and indexes `consumers`: names non-empty and unique, every key a well-formed
    /// hash, no key listed twice.
    pub fn new(consumers: &[Consumer]) -> Result<KeyStore, ApiKeyError> {
        let mut names = HashSet::new();
        let mut owners: HashMap<[u8; HASH_LEN], usize> = HashMap::new();
        let mut hashes = Vec::new();
        for (index, consumer) in consumers.iter().enumerate() {
            if consumer.name.is_empty() {
                return Err(ApiKeyError::EmptyName { index });
            }
            if !names.insert(consumer.name.as_str()) {
                return Err(ApiKeyError::DuplicateConsumer(consumer.name.clone()));
            }
            for (key_index, key) in consumer.keys.iter().enumerate() {
                let hash = parse_hash(key).ok_or_else(|| ApiKeyError::InvalidHash {
                    consumer: consumer.name.clone(),
                    index: key_index,
                })?;
                if let Some(&first) = owners.get(&hash) {
                    return Err(ApiKeyError::DuplicateKey {
                        first: consumers[first].name.clone(),
                        second: consumer.name.clone(),
                    });
                }
                owners.insert(hash, index);
                hashes.push((hash, index));
            }
        }
        Ok(KeyStore {
            consumers: consumers.to_vec(),
            hashes,
        })
    }

    /// The consumer named `name` (not a secret lookup: for client-certificate consumers).
    pub fn consumer(&self, name: &str) -> Option<&Consumer> {
        self.consumers.iter().find(|c| c.name == name)
    }

    /// The consumer owning `presented_key`, if any.
    ///
    /// The key is hashed, then compared with every stored hash in constant time; the match is
    /// selected without branching and the loop never stops early.
    pub fn lookup(&self, presented_key: &str) -> Option<&Consumer> {
        let digest = digest::digest(&digest::SHA256, presented_key.as_bytes());
        let presented = digest.as_ref();
        // The matching consumer's index + 1, or 0. Keys are unique, so at most one matches.
        let mut found = 0usize;
        for (hash, consumer) in &self.hashes {
            let equal = constant_time::verify_slices_are_equal(hash, presented).is_ok();
            // All ones when equal, else zero.
            let mask = usize::from(equal).wrapping_neg();
            found |= mask & (consumer + 1);
        }
        let found = std::hint::black_box(found);
        found.checked_sub(1).and_then(|i| self.consumers.get(i))
    }
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte; a `%`
/// not followed by two hex digits stays as it is. `None` if the result is not UTF-8.
fn url_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let hex = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push((hi << 4) | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The `&`-separated parameters of `query` (a leading `?` is ignored).
fn query_params(query: &str) -> impl Iterator<Item = &str> {
    query.strip_prefix('?').unwrap_or(query).split('&')
}

/// A parameter's name and value, URL-decoded.
fn decode_param(param: &str) -> Option<(String, String)> {
    let (name, value) = param.split_once('=').unwrap_or((param, ""));
    Some((url_decode(name)?, url_decode(value)?))
}

/// The key a request presents: the first of `locations` (in order) that holds a non-empty
/// one. Header values are trimmed and must be visible ASCII; of several values of one header,
/// the first counts. Query parameters (`query` without the `?`) are URL-decoded, names
/// compared exactly; of several parameters of one name, the first non-empty counts.
pub fn extract(locations: &[KeyLocation], headers: &HeaderMap, query: &str) -> Option<String> {
    locations.iter().find_map(|location| match location {
        KeyLocation::Header { name } => headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
        KeyLocation::Query { name } => query_params(query)
            .filter_map(decode_param)
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v),
    })
}

/// Removes the key from the request before it goes upstream: every header location (all its
/// values) from `headers`, and returns `query` without the parameters named by a query
/// location (compared after URL-decoding). Other parameters keep their order and encoding.
pub fn hide(locations: &[KeyLocation], headers: &mut HeaderMap, query: &str) -> String {
    let mut query_names = Vec::new();
    for location in locations {
        match location {
            KeyLocation::Header { name } => {
                headers.remove(name.as_str());
            }
            KeyLocation::Query { name } => query_names.push(name.as_str()),
        }
    }
    let query = query.strip_prefix('?').unwrap_or(query);
    if query_names.is_empty() {
        return query.to_owned();
    }
    query_params(query)
        .filter(|param| {
            let name = param.split_once('=').map_or(*param, |(n, _)| n);
            !url_decode(name).is_some_and(|n| query_names.contains(&n.as_str()))
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, header::HeaderName};

    use super::*;

    fn consumer(name: &str, tier: Option<&str>, keys: &[&str]) -> Consumer {
        Consumer {
            name: name.into(),
            groups: vec!["partners".into()],
            tier: tier.map(String::from),
            keys: keys.iter().map(|k| hash_key(k)).collect(),
        }
    }

    fn store() -> KeyStore {
        KeyStore::new(&[
            consumer("acme", Some("gold"), &["acme-key-1", "acme-key-2"]),
            consumer("globex", None, &["globex-key"]),
            consumer("initech", None, &[]),
        ])
        .expect("test consumers are valid")
    }

    #[test]
    fn hash_key_known_vectors() {
        assert_eq!(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hash_key(""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            parse_hash(&hash_key("abc")).map(|h| h[0]),
            Some(0xba),
            "round trip"
        );
    }

    #[test]
    fn lookup_finds_the_owner() {
        let s = store();
        let cases = [
            ("acme-key-1", Some("acme")),
            ("acme-key-2", Some("acme")),
            ("globex-key", Some("globex")),
            ("wrong", None),
            ("", None),
            ("acme-key-1 ", None),
            ("ACME-KEY-1", None),
        ];
        for (key, owner) in cases {
            assert_eq!(s.lookup(key).map(|c| c.name.as_str()), owner, "{key}");
        }
        assert_eq!(
            s.lookup("acme-key-1").and_then(|c| c.tier.as_deref()),
            Some("gold")
        );
        assert!(
            KeyStore::new(&[])
                .expect("an empty store is valid")
                .lookup("x")
                .is_none()
        );
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let mut c = consumer("acme", None, &[]);
        c.keys = vec![format!(
            "sha256:{}",
            hash_key("k")[HASH_PREFIX.len()..].to_uppercase()
        )];
        let s = KeyStore::new(&[c]).expect("uppercase hex is valid");
        assert_eq!(s.lookup("k").map(|c| c.name.as_str()), Some("acme"));
    }

    #[test]
    fn invalid_stores() {
        let good = hash_key("k");
        let bad_hashes = [
            "plaintext-key".to_owned(),
            good[HASH_PREFIX.len()..].to_owned(),
            format!("sha512:{}", &good[HASH_PREFIX.len()..]),
            good[..good.len() - 1].to_owned(),
            format!("{good}0"),
            format!("{}g", &good[..good.len() - 1]),
            format!("SHA256:{}", &good[HASH_PREFIX.len()..]),
        ];
        for bad in bad_hashes {
            let mut c = consumer("acme", None, &["other"]);
            c.keys.push(bad.clone());
            let err = KeyStore::new(&[c]).expect_err("malformed hash");
            assert_eq!(
                err,
                ApiKeyError::InvalidHash {
                    consumer: "acme".into(),
                    index: 1
                },
                "{bad}"
            );
            assert!(!err.to_string().contains(&bad), "{err}");
        }
        // (consumers, error)
        let cases = [
            (
                vec![
                    consumer("a", None, &["k1"]),
                    consumer("b", None, &["k2", "k1"]),
                ],
                ApiKeyError::DuplicateKey {
                    first: "a".into(),
                    second: "b".into(),
                },
            ),
            (
                vec![consumer("a", None, &["k1", "k1"])],
                ApiKeyError::DuplicateKey {
                    first: "a".into(),
                    second: "a".into(),
                },
            ),
            (
                vec![consumer("a", None, &["k1"]), consumer("", None, &["k2"])],
                ApiKeyError::EmptyName { index: 1 },
            ),
            (
                vec![consumer("a", None, &["k1"]), consumer("a", None, &["k2"])],
                ApiKeyError::DuplicateConsumer("a".into()),
            ),
        ];
        for (consumers, expected) in cases {
            assert_eq!(
                KeyStore::new(&consumers).expect_err("invalid consumers"),
                expected
            );
        }
        // Same key, different hex case: still a duplicate.
        let mut upper = consumer("b", None, &[]);
        upper.keys = vec![hash_key("k1").to_uppercase().replace("SHA256:", "sha256:")];
        assert!(matches!(
            KeyStore::new(&[consumer("a", None, &["k1"]), upper]),
            Err(ApiKeyError::DuplicateKey { .. })
        ));
    }

    #[test]
    fn debug_prints_no_hash() {
        let s = store();
        let config = ApiKeyConfig {
            consumers: vec![consumer("acme", None, &["acme-key-1"])],
            ..ApiKeyConfig::default()
        };
        for text in [
            format!("{s:?}"),
            format!("{s:#?}"),
            format!("{config:?}"),
            format!("{:?}", s.lookup("globex-key")),
        ] {
            assert!(!text.contains("sha256"), "{text}");
            for key in ["acme-key-1", "acme-key-2", "globex-key"] {
                let hex = &hash_key(key)[HASH_PREFIX.len()..];
                assert!(!text.contains(&hex[..16]), "{text}");
            }
        }
        assert_eq!(
            format!("{s:?}"),
            r#"KeyStore { consumers: ["acme", "globex", "initech"], keys: 3 }"#
        );
        assert!(format!("{config:?}").contains("keys: <1 redacted>"));
    }

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).expect("test header name"),
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        map
    }

    fn locations() -> Vec<KeyLocation> {
        vec![
            KeyLocation::Header {
                name: "X-Api-Key".into(),
            },
            KeyLocation::Query {
                name: "api_key".into(),
            },
        ]
    }

    #[test]
    fn extract_from_header_or_query() {
        // (headers, query, expected)
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Pairs<'_>, &str, Option<&str>); 12] = [
            (&[("x-api-key", "k1")], "", Some("k1")),
            (&[("X-API-KEY", "  k1 ")], "", Some("k1")),
            (&[("x-api-key", "k1")], "api_key=k2", Some("k1")),
            (&[("x-api-key", "")], "api_key=k2", Some("k2")),
            (&[], "a=1&api_key=k2&b=2", Some("k2")),
            (&[], "?api_key=k2", Some("k2")),
            (&[], "api_key=a%2Bb%3D%2F+c", Some("a+b=/ c")),
            (&[], "api%5Fkey=k3", Some("k3")),
            (&[], "api_key=&api_key=k4", Some("k4")),
            (&[], "api_key=%ff", None),
            (&[("authorization", "k1")], "apikey=k2&api_key", None),
            (&[], "", None),
        ];
        for (headers, query, expected) in cases {
            let got = extract(&locations(), &header_map(headers), query);
            assert_eq!(got.as_deref(), expected, "{headers:?} {query:?}");
        }
        // Location order decides.
        let reversed: Vec<KeyLocation> = locations().into_iter().rev().collect();
        let got = extract(&reversed, &header_map(&[("x-api-key", "k1")]), "api_key=k2");
        assert_eq!(got.as_deref(), Some("k2"));
    }

    #[test]
    fn hide_removes_the_key_and_keeps_the_rest() {
        // (query, expected query)
        let cases = [
            ("a=1&api_key=k&b=2", "a=1&b=2"),
            ("api_key=k", ""),
            ("?z=9&api_key=k&a=%20x&api%5Fkey=k2&api_key", "z=9&a=%20x"),
            ("a=1&b=2&a=3", "a=1&b=2&a=3"),
            ("api_keys=1&xapi_key=2", "api_keys=1&xapi_key=2"),
            ("", ""),
        ];
        for (query, expected) in cases {
            let mut headers = header_map(&[
                ("x-api-key", "k1"),
                ("X-Api-Key", "k2"),
                ("accept", "*/*"),
                ("x-other", "v"),
            ]);
            assert_eq!(hide(&locations(), &mut headers, query), expected, "{query}");
            assert!(!headers.contains_key("x-api-key"));
            assert_eq!(headers.len(), 2);
            assert_eq!(headers["x-other"], "v");
        }
        // Header-only locations leave the query alone.
        let mut headers = HeaderMap::new();
        let header_only = &locations()[..1];
        assert_eq!(hide(header_only, &mut headers, "api_key=k"), "api_key=k");
    }

    #[test]
    fn config_serde() {
        let config: ApiKeyConfig = serde_json::from_value(serde_json::json!({
            "consumers": [{"name": "acme", "keys": [hash_key("k")]}],
        }))
        .expect("config parses");
        assert_eq!(config.locations, locations()[..1]);
        assert!(config.hide_from_upstream);
        assert_eq!(config.consumers[0].tier, None);
        config.validate().expect("config is valid");

        let config: ApiKeyConfig = serde_json::from_value(serde_json::json!({
            "consumers_file": "/etc/meshgate/consumers.yaml",
            "locations": [{"header": "X-Api-Key"}, {"query": "api_key"}],
            "hide_from_upstream": false,
        }))
        .expect("config parses");
        assert_eq!(config.locations, locations());
        assert!(!config.hide_from_upstream);
        let back: ApiKeyConfig =
            serde_json::from_value(serde_json::to_value(&config).expect("serializes"))
                .expect("round trip");
        assert_eq!(back, config);

        for bad in [
            serde_json::json!({"consumer": []}),
            serde_json::json!({"locations": [{"cookie": "k"}]}),
            serde_json::json!({"locations": [{"header": "a", "query": "b"}]}),
            serde_json::json!({"consumers": [{"name": "a", "keys": [], "key": "x"}]}),
        ] {
            assert!(
                serde_json::from_value::<ApiKeyConfig>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let schema =
            serde_json::to_string(&schemars::schema_for!(ApiKeyConfig)).expect("schema serializes");
        for word in ["consumers_file", "hide_from_upstream", "query", "tier"] {
            assert!(schema.contains(word), "{word}: {schema}");
        }
    }

    #[test]
    fn location_validation() {
        let cases = [
            (vec![], ApiKeyError::NoLocations),
            (
                vec![KeyLocation::Header {
                    name: "bad name".into(),
                }],
                ApiKeyError::InvalidHeader("bad name".into()),
            ),
            (
                vec![KeyLocation::Query { name: "".into() }],
                ApiKeyError::EmptyQueryName,
            ),
        ];
        for (locations, expected) in cases {
            let config = ApiKeyConfig {
                locations,
                ..ApiKeyConfig::default()
            };
            assert_eq!(config.validate(), Err(expected));
        }
    }
}
