//! Request-path normalization, done once before routing and before intentions, in both modes;
//! the normalized path is the one forwarded, so what policy matched is what the service sees.
//!
//! A pure function over the raw path: no I/O, no allocation when the path is already in normal
//! form. The steps, in order (Envoy's equivalent options in brackets):
//!
//! 1. percent-escapes are checked (`%` followed by two hex digits, else 400); escapes of
//!    unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3) are decoded, every other
//!    escape is kept with uppercase hex (`%2f` -> `%2F`) [`normalize_path`];
//! 2. `%00` (NUL) is always refused;
//! 3. `%2F` and `%5C` (encoded `/` and `\`) are refused by default, or kept, or decoded to `/`
//!    [`path_with_escaped_slashes_action`: REJECT_REQUEST, KEEP_UNCHANGED, UNESCAPE_AND_FORWARD];
//! 4. a raw `\` is refused by default, or kept;
//! 5. a `;` (path parameters, which Tomcat and Spring strip before matching) is refused by
//!    default, or kept;
//! 6. empty segments (`//`) are merged by default, or refused [`merge_slashes`];
//! 7. dot segments are removed (RFC 3986 §5.2.4): `/a/./b` -> `/a/b`, `/a/../b` -> `/b`, and
//!    `..` never climbs above `/` [`normalize_path`].
//!
//! Decoding happens before dot-segment removal, so `/%2e%2e/admin` is `/admin`. Nothing is
//! decoded twice: `%252e` stays `%252e`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// What to do with one kind of suspicious path spelling.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Spelling {
    /// Answer 400 (the default).
    #[default]
    Reject,
    /// Forward it unchanged.
    Keep,
    /// Decode it (only for escaped slashes: `%2F` and `%5C` become `/`).
    Unescape,
}

fn default_true() -> bool {
    true
}

/// How request paths are normalized; the defaults are the safe choice for every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathOptions {
    /// Merge empty segments (`//a` -> `/a`); false refuses them with 400. Default true
    /// (Envoy `merge_slashes`).
    #[serde(default = "default_true")]
    pub merge_slashes: bool,
    /// `%2F` / `%5C` in a path: `reject` (default), `keep` or `unescape` (Envoy
    /// `path_with_escaped_slashes_action`).
    #[serde(default)]
    pub escaped_slashes: Spelling,
    /// A raw `\`: `reject` (default) or `keep`.
    #[serde(default)]
    pub backslashes: Spelling,
    /// A `;` (path parameters): `reject` (default) or `keep`.
    #[serde(default)]
    pub semicolons: Spelling,
}

impl Default for PathOptions {
    fn default() -> Self {
        Self {
            merge_slashes: true,
            escaped_slashes: Spelling::Reject,
            backslashes: Spelling::Reject,
            semicolons: Spelling::Reject,
        }
    }
}

/// Why a path was refused (the 400's detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path.
    #[error("the path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    /// `%00`.
    #[error("the path contains an encoded NUL")]
    Nul,
    /// `%2F` or `%5C`.
    #[error("the path contains an encoded '/' or '\\'")]
    EscapedSlash,
    /// A raw backslash.
    #[error("the path contains '\\'")]
    Backslash,
    /// A `;`.
    #[error("the path contains ';' (path parameters)")]
    Semicolon,
    /// `//` with `merge_slashes: false`.
    #[error("the path contains an empty segment ('//')")]
    EmptySegment,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` can be returned as is: no escapes, no dot or empty segments, nothing refused.
fn is_plain(path: &[u8]) -> bool {
    let mut prev = b'/';
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        match b {
            b'%' | b'\\' | b';' => return false,
            b'/' if prev == b'/' && i > 0 => return false,
            b'.' if prev == b'/' => {
                // a segment starting with '.': "." or ".." are dot segments
                let rest = &path[i..];
                let seg = rest.split(|c| *c == b'/').next().unwrap_or_default();
                if seg == b"." || seg == b".." {
                    return false;
                }
            }
            _ => {}
        }
        prev = b;
        i += 1;
    }
    true
}

/// Normalizes `path` (the request target's path, without the query) under `opts`.
/// Returns the path unchanged (borrowed) when it already is in normal form.
pub fn normalize<'a>(path: &'a str, opts: &PathOptions) -> Result<Cow<'a, str>, PathError> {
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_plain(raw) {
        return Ok(Cow::Borrowed(path));
    }
    // 1-5: escapes and refused characters, into `decoded` (still a valid path string)
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = h << 4 | l;
                match c {
                    0 => return Err(PathError::Nul),
                    b'/' | b'\\' => match opts.escaped_slashes {
                        Spelling::Reject => return Err(PathError::EscapedSlash),
                        Spelling::Unescape => decoded.push(b'/'),
                        Spelling::Keep => push_escape(&mut decoded, c),
                    },
                    c if is_unreserved(c) => decoded.push(c),
                    c => push_escape(&mut decoded, c),
                }
                i += 3;
                continue;
            }
            b'\\' => match opts.backslashes {
                Spelling::Keep | Spelling::Unescape => decoded.push(b),
                Spelling::Reject => return Err(PathError::Backslash),
            },
            b';' => match opts.semicolons {
                Spelling::Keep | Spelling::Unescape => decoded.push(b),
                Spelling::Reject => return Err(PathError::Semicolon),
            },
            _ => decoded.push(b),
        }
        i += 1;
    }
    // 6-7: segments
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = decoded[1..].split(|c| *c == b'/').collect();
    let last = segments.len() - 1;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            b"." => {
                if n == last {
                    out.push(b"");
                }
            }
            b".." => {
                out.pop();
                if n == last {
                    out.push(b"");
                }
            }
            b"" if n != last => {
                if !opts.merge_slashes {
                    return Err(PathError::EmptySegment);
                }
            }
            s => out.push(s),
        }
    }
    let mut norm = Vec::with_capacity(decoded.len());
    for seg in &out {
        norm.push(b'/');
        norm.extend_from_slice(seg);
    }
    if norm.is_empty() {
        norm.push(b'/');
    }
    // every byte came from a valid path string or is an ASCII escape
    Ok(Cow::Owned(String::from_utf8(norm).expect(
        "invariant: normalized path is ASCII from a valid path",
    )))
}

fn push_escape(out: &mut Vec<u8>, c: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push(b'%');
    out.push(HEX[usize::from(c >> 4)]);
    out.push(HEX[usize::from(c & 15)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, &PathOptions::default()).map(Cow::into_owned)
    }

    #[test]
    fn already_normal_paths_are_borrowed() {
        for p in ["/", "/users/1", "/a.b/c..d/.e", "/admin/", "/x-y_z~"] {
            let got = normalize(p, &PathOptions::default()).expect(p);
            assert!(matches!(got, Cow::Borrowed(_)), "{p}");
            assert_eq!(got, p);
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/public/../admin/x", Ok("/admin/x")),
            ("/%61dmin/x", Ok("/admin/x")),
            ("/%2e%2e/admin", Ok("/admin")),
            ("/%2E%2e/%2e/admin", Ok("/admin")),
            ("//admin/x", Ok("/admin/x")),
            ("/./admin", Ok("/admin")),
            ("/a/./b/../c", Ok("/a/c")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("/..", Ok("/")),
            ("/../../etc", Ok("/etc")),
            ("/a//b///c", Ok("/a/b/c")),
            ("/a/", Ok("/a/")),
            ("/%7euser", Ok("/~user")),
            ("/caf%c3%a9", Ok("/caf%C3%A9")),
            ("/%252e%252e/admin", Ok("/%252e%252e/admin")),
            ("/a%20b", Ok("/a%20b")),
            ("/admin%2fx", Err(PathError::EscapedSlash)),
            ("/admin%2Fx", Err(PathError::EscapedSlash)),
            ("/admin%5cx", Err(PathError::EscapedSlash)),
            ("/admin\\x", Err(PathError::Backslash)),
            ("/a%00b", Err(PathError::Nul)),
            ("/admin;x=1/y", Err(PathError::Semicolon)),
            ("/a%zz", Err(PathError::BadEscape)),
            ("/a%2", Err(PathError::BadEscape)),
            ("admin", Err(PathError::NotAbsolute)),
            ("", Err(PathError::NotAbsolute)),
        ];
        for (input, want) in cases {
            let got = n(input);
            assert_eq!(got.as_deref(), want.as_deref(), "{input}");
        }
    }

    #[test]
    fn options_change_the_outcome() {
        let keep = PathOptions {
            merge_slashes: false,
            escaped_slashes: Spelling::Keep,
            backslashes: Spelling::Keep,
            semicolons: Spelling::Keep,
        };
        assert_eq!(normalize("/a%2fb", &keep).as_deref(), Ok("/a%2Fb"));
        assert_eq!(normalize("/a\\b", &keep).as_deref(), Ok("/a\\b"));
        assert_eq!(normalize("/a;b", &keep).as_deref(), Ok("/a;b"));
        assert_eq!(normalize("/a//b", &keep), Err(PathError::EmptySegment));
        let unescape = PathOptions {
            escaped_slashes: Spelling::Unescape,
            ..PathOptions::default()
        };
        assert_eq!(
            normalize("/public%2f..%2fadmin", &unescape).as_deref(),
            Ok("/admin")
        );
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in [
            "/public/../admin/x",
            "/%2e%2e/%61dmin",
            "/a//b/./c/..",
            "/caf%c3%a9/%252e",
        ] {
            let once = n(p).expect(p);
            assert_eq!(n(&once).expect("again"), once, "{p}");
        }
    }
}
