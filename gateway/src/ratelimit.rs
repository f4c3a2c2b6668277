//! Rate limiting: the limit arithmetic, an in-memory store, and the response headers.
//!
//! This module owns:
//!
//! - the configuration of a limit ([`LimitConfig`]) and of a policy ([`RateLimitPolicy`]:
//!   what the key is, the default limit and per-tier limits), with validation;
//! - the three algorithms as pure functions over explicit state ([`gcra`],
//!   [`fixed_window`], [`sliding_window`]), so that the same math can be mirrored elsewhere
//!   (a Redis Lua script for a shared store);
//! - [`MemoryStore`], a bounded per-process store that applies them per key;
//! - [`headers`], the response header fields of a [`Decision`].
//!
//! It must not do I/O, read clocks, log keys or build responses: time is passed in by the
//! caller as a `u64` of milliseconds since an arbitrary epoch (use a monotonic clock, for
//! example milliseconds since an `Instant` taken at start; times should not go backwards for
//! a key: that never panics, but a window count may restart). Turning a request into a key
//! ([`KeySource`]) is the caller's job too.
//!
//! # Algorithms
//!
//! With `n = requests`, `P = per` in milliseconds and `b = burst`:
//!
//! - **`token_bucket`** is GCRA (the generic cell rate algorithm). The state is the
//!   theoretical arrival time `TAT`. The emission interval is `T = P / n` and the burst
//!   tolerance `τ = T·(b − 1)`. A request at `now` is allowed iff `max(TAT, now) − now ≤ τ`;
//!   then `TAT' = max(TAT, now) + T`. Denied requests leave `TAT` unchanged. `remaining` is
//!   the number of further requests allowed at `now`: `⌊(now + b·T − TAT') / T⌋`. A fresh key
//!   allows exactly `b` requests at once, then one every `T`. To keep `T` exact when `P` is
//!   not a multiple of `n`, `TAT` is kept in *ticks* of `1/n` ms (so `T = P` ticks and
//!   `now` is `now_ms · n` ticks); a mirror using floating-point milliseconds computes the
//!   same decisions up to rounding.
//! - **`fixed_window`** counts allowed requests per window index `⌊now / P⌋` and allows while
//!   the count is below `n`.
//! - **`sliding_window`** is the two-window weighted approximation (as described by
//!   Cloudflare and Kong): with `e` milliseconds elapsed in the current window, the estimate
//!   is `previous · (1 − e/P) + current`, and a request is allowed iff the estimate is below
//!   `n`. The comparison is done exactly in integers: `previous·(P − e) + current·P < n·P`.
//!
//! In all three, denied requests are not counted. [`Decision::limit`] is `requests`.
//! [`Decision::reset_ms`] is the time until the current window ends for the window
//! algorithms; for GCRA it is the time until one more request is allowed when denied, else
//! the time until the bucket is full again (`TAT' − now`). [`Decision::retry_after_ms`] is
//! exact: the first millisecond at which a request would be allowed (for `sliding_window`
//! that can be later than the window end, as the previous window still weighs). Millisecond
//! results are rounded up, so a client that waits `retry_after_ms` is allowed.
//!
//! # Header fields
//!
//! [`headers`] follows draft-ietf-httpapi-ratelimit-headers (the structured-field form):
//!
//! ```text
//! RateLimit-Policy: "<name>";q=<requests>;w=<window seconds>
//! RateLimit: "<name>";r=<remaining>;t=<seconds until reset>
//! Retry-After: <seconds>                      (only when denied)
//! ```
//!
//! `<name>` is an sf-string: `"` and `\` are escaped with `\`, and any character outside
//! printable ASCII (which [`RateLimitPolicy::validate`] rejects) is replaced by `_`.
//! `w` is `per` in seconds rounded up (at least 1), `t` is [`Decision::reset_ms`] in seconds
//! rounded up, `Retry-After` is [`Decision::retry_after_ms`] in seconds rounded up and at
//! least 1. Integers are capped at 999 999 999 999 999 (the sf-integer maximum). Example for
//! a policy `api` of 100 requests per minute:
//! `RateLimit-Policy: "api";q=100;w=60` and `RateLimit: "api";r=99;t=1`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// Largest integer a structured field may carry.
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// [`MemoryStore::check`] sweeps once the number of checks since the last sweep reaches the
/// number of entries that sweep kept, and at least this many.
const SWEEP_EVERY_MIN: usize = 1024;

/// Which algorithm a limit uses.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// GCRA: a smooth rate of `requests` per `per` with bursts of up to `burst`.
    #[default]
    TokenBucket,
    /// The two-window weighted approximation of a sliding window.
    SlidingWindow,
    /// A counter per fixed window; resets at each window boundary.
    FixedWindow,
}

/// One limit: `requests` per `per`. YAML: `{requests: 100, per: 1m}` or
/// `{requests: 100, per: 1m, burst: 20, algorithm: token_bucket}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// How many requests each window (or, for GCRA, each `per` on average) allows; > 0.
    pub requests: u64,
    /// The window (humantime, e.g. `1m`); at least 1ms.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub per: Duration,
    /// `token_bucket` only: how many requests may arrive at once; > 0. Default: `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// The algorithm. Default: `token_bucket`.
    #[serde(default)]
    pub algorithm: Algorithm,
}

impl LimitConfig {
    /// Checks `requests > 0`, `per >= 1ms`, and that `burst` is > 0 and only set for
    /// `token_bucket`.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        self.problem().map_or(Ok(()), |reason| {
            Err(RateLimitError::InvalidLimit {
                scope: "limit".into(),
                reason,
            })
        })
    }

    fn problem(&self) -> Option<&'static str> {
        if self.requests == 0 {
            Some("`requests` must be greater than zero")
        } else if self.per < Duration::from_millis(1) {
            Some("`per` must be at least 1ms")
        } else if self.burst == Some(0) {
            Some("`burst` must be greater than zero")
        } else if self.burst.is_some() && self.algorithm != Algorithm::TokenBucket {
            Some("`burst` only applies to the token_bucket algorithm")
        } else {
            None
        }
    }

    /// `per` in milliseconds, at least 1 (an unvalidated zero is treated as 1).
    fn per_ms(&self) -> u64 {
        u64::try_from(self.per.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// `requests`, at least 1 (an unvalidated zero is treated as 1).
    fn requests_n(&self) -> u64 {
        self.requests.max(1)
    }

    /// The GCRA burst, at least 1.
    fn burst_n(&self) -> u64 {
        self.burst.unwrap_or(self.requests).max(1)
    }
}

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The configured `requests`.
    pub limit: u64,
    /// How many more requests would be allowed right now (after this one, if allowed).
    pub remaining: u64,
    /// Milliseconds until the quota is restored: for the window algorithms, until the
    /// current window ends; for GCRA, until one more request is allowed when denied, else
    /// until the bucket is full.
    pub reset_ms: u64,
    /// When denied: milliseconds until a request would be allowed. `None` when allowed.
    pub retry_after_ms: Option<u64>,
}

/// The state of a window algorithm for one key. The default is a fresh key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowState {
    /// The window index `⌊now / per⌋` the counts belong to.
    pub window: u64,
    /// Requests allowed in `window`.
    pub current: u64,
    /// Requests allowed in `window − 1` (sliding window only; always 0 for a fixed window).
    pub previous: u64,
}

fn ceil_div(a: u128, b: u128) -> u128 {
    a.div_ceil(b.max(1))
}

fn to_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// GCRA (`token_bucket`). `tat` is the theoretical arrival time in ticks of `1/requests`
/// milliseconds (see the module docs); `0`, or any value at or before `now`, is a fresh
/// key. Returns the decision and the new `tat` (unchanged when denied).
pub fn gcra(cfg: &LimitConfig, tat: u128, now_ms: u64) -> (Decision, u128) {
    let n = u128::from(cfg.requests_n());
    let t = u128::from(cfg.per_ms());
    let burst = u128::from(cfg.burst_n());
    let tau = t.saturating_mul(burst - 1);
    let now = u128::from(now_ms).saturating_mul(n);
    let tat = tat.max(now);
    if tat - now <= tau {
        let new_tat = tat.saturating_add(t);
        // new_tat − now ≤ τ + T = b·T, so this does not underflow.
        let remaining = (now.saturating_add(tau).saturating_add(t) - new_tat) / t;
        let reset = ceil_div(new_tat, n).saturating_sub(u128::from(now_ms));
        let decision = Decision {
            allowed: true,
            limit: cfg.requests,
            remaining: to_u64(remaining),
            reset_ms: to_u64(reset),
            retry_after_ms: None,
        };
        (decision, new_tat)
    } else {
        // The first whole millisecond m with m·n ≥ TAT − τ.
        let retry = ceil_div(tat - tau, n).saturating_sub(u128::from(now_ms));
        let retry = to_u64(retry).max(1);
        let decision = Decision {
            allowed: false,
            limit: cfg.requests,
            remaining: 0,
            reset_ms: retry,
            retry_after_ms: Some(retry),
        };
        (decision, tat)
    }
}

/// A fixed window: at most `requests` per window `⌊now / per⌋`. Returns the decision and
/// the new state.
pub fn fixed_window(cfg: &LimitConfig, state: WindowState, now_ms: u64) -> (Decision, WindowState) {
    let n = cfg.requests_n();
    let per = cfg.per_ms();
    let window = now_ms / per;
    let reset = per - now_ms % per;
    let count = if state.window == window {
        state.current
    } else {
        0
    };
    let new_state = |current| WindowState {
        window,
        current,
        previous: 0,
    };
    if count < n {
        let count = count + 1;
        let decision = Decision {
            allowed: true,
            limit: cfg.requests,
            remaining: n - count,
            reset_ms: reset,
            retry_after_ms: None,
        };
        (decision, new_state(count))
    } else {
        let decision = Decision {
            allowed: false,
            limit: cfg.requests,
            remaining: 0,
            reset_ms: reset,
            retry_after_ms: Some(reset),
        };
        (decision, new_state(count))
    }
}

/// The sliding-window approximation: allowed iff
/// `previous · (1 − elapsed/per) + current < requests`. Returns the decision and the new
/// state.
pub fn sliding_window(
    cfg: &LimitConfig,
    state: WindowState,
    now_ms: u64,
) -> (Decision, WindowState) {
    let n = cfg.requests_n();
    let per64 = cfg.per_ms();
    let window = now_ms / per64;
    let elapsed = now_ms % per64;
    let reset = per64 - elapsed;
    let (previous, current) = if state.window == window {
        (state.previous, state.current)
    } else if state.window.checked_add(1) == Some(window) {
        (state.current, 0)
    } else {
        (0, 0)
    };

    let per = u128::from(per64);
    let quota = u128::from(n) * per;
    // previous · (per − elapsed): the weighted previous count, scaled by `per`.
    let carried = u128::from(previous) * u128::from(reset);
    let used = |current: u64| carried + u128::from(current) * per;

    if used(current) < quota {
        let current = current + 1;
        // Each further request needs `used + k·per < quota`.
        let remaining = ceil_div(quota.saturating_sub(used(current)), per);
        let decision = Decision {
            allowed: true,
            limit: cfg.requests,
            remaining: to_u64(remaining),
            reset_ms: reset,
            retry_after_ms: None,
        };
        let state = WindowState {
            window,
            current,
            previous,
        };
        (decision, state)
    } else {
        let retry = if current < n {
            // Still in this window, once previous·(per − e) < (n − current)·per, i.e. at the
            // first e with previous·e > (previous + current − n)·per. Here previous > 0.
            let e = (u128::from(previous) + u128::from(current) - u128::from(n)) * per
                / u128::from(previous)
                + 1;
            to_u64(e).saturating_sub(elapsed)
        } else {
            // In the next window, `current` becomes the previous count: allowed at the first
            // e with current·e > (current − n)·per.
            let e = (u128::from(current) - u128::from(n)) * per / u128::from(current) + 1;
            reset.saturating_add(to_u64(e))
        };
        let retry = retry.max(1);
        let decision = Decision {
            allowed: false,
            limit: cfg.requests,
            remaining: 0,
            reset_ms: reset,
            retry_after_ms: Some(retry),
        };
        let state = WindowState {
            window,
            current,
            previous,
        };
        (decision, state)
    }
}

/// A key's algorithm state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Gcra(u128),
    Window(WindowState),
}

/// One key's state and the parameters it was computed with.
#[derive(Debug, Clone, Copy)]
struct Entry {
    algorithm: Algorithm,
    requests: u64,
    per_ms: u64,
    state: State,
}

impl Entry {
    fn fresh(cfg: &LimitConfig) -> Self {
        Entry {
            algorithm: cfg.algorithm,
            requests: cfg.requests_n(),
            per_ms: cfg.per_ms(),
            state: match cfg.algorithm {
                Algorithm::TokenBucket => State::Gcra(0),
                Algorithm::SlidingWindow | Algorithm::FixedWindow => {
                    State::Window(WindowState::default())
                }
            },
        }
    }

    /// Whether the state was computed for `cfg` (a changed limit starts over).
    fn matches(&self, cfg: &LimitConfig) -> bool {
        self.algorithm == cfg.algorithm
            && self.requests == cfg.requests_n()
            && self.per_ms == cfg.per_ms()
    }

    /// Whether the state can no longer affect a decision at `now_ms` or later.
    fn expired(&self, now_ms: u64) -> bool {
        match (self.algorithm, self.state) {
            (_, State::Gcra(tat)) => {
                tat <= u128::from(now_ms).saturating_mul(u128::from(self.requests))
            }
            (Algorithm::FixedWindow, State::Window(w)) => w.window < now_ms / self.per_ms,
            (_, State::Window(w)) => w.window.saturating_add(1) < now_ms / self.per_ms,
        }
    }

    fn check(&mut self, cfg: &LimitConfig, now_ms: u64) -> Decision {
        let (decision, state) = match self.state {
            State::Gcra(tat) => {
                let (d, tat) = gcra(cfg, tat, now_ms);
                (d, State::Gcra(tat))
            }
            State::Window(w) if cfg.algorithm == Algorithm::FixedWindow => {
                let (d, w) = fixed_window(cfg, w, now_ms);
                (d, State::Window(w))
            }
            State::Window(w) => {
                let (d, w) = sliding_window(cfg, w, now_ms);
                (d, State::Window(w))
            }
        };
        self.state = state;
        decision
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Checks since the last sweep.
    checks: usize,
    /// How many entries the last sweep left (so the next sweep is due after as many checks).
    kept: usize,
}

impl Inner {
    fn sweep(&mut self, now_ms: u64) {
        self.entries.retain(|_, e| !e.expired(now_ms));
        self.checks = 0;
        self.kept = self.entries.len();
    }
}

/// Per-key limit state in this process's memory.
///
/// Memory is bounded: an entry expires once its state can no longer affect a decision (GCRA:
/// `TAT ≤ now`; fixed window: its window has ended; sliding window: two windows have ended).
/// [`MemoryStore::sweep`] drops expired entries, and [`MemoryStore::check`] sweeps on its own
/// once the number of checks since the last sweep reaches the number of entries that sweep
/// kept (at least 1024), so sweeping costs O(1) per check amortised and the store holds at
/// most about twice the live keys plus 1024. A key whose limit changed (another
/// algorithm, `requests` or `per`) starts over.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is plain data updated in one step, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one request for `key` under `cfg` at `now_ms` and returns the verdict.
    pub fn check(&self, key: &str, cfg: &LimitConfig, now_ms: u64) -> Decision {
        let mut inner = self.lock();
        inner.checks += 1;
        if inner.checks >= inner.kept.max(SWEEP_EVERY_MIN) {
            inner.sweep(now_ms);
        }
        match inner.entries.get_mut(key) {
            Some(entry) => {
                if !entry.matches(cfg) {
                    *entry = Entry::fresh(cfg);
                }
                entry.check(cfg, now_ms)
            }
            None => {
                let mut entry = Entry::fresh(cfg);
                let decision = entry.check(cfg, now_ms);
                inner.entries.insert(key.to_owned(), entry);
                decision
            }
        }
    }

    /// What [`MemoryStore::check`] would decide for `key` now, without counting the request.
    pub fn peek(&self, key: &str, cfg: &LimitConfig, now_ms: u64) -> Decision {
        let inner = self.lock();
        let mut entry = match inner.entries.get(key) {
            Some(e) if e.matches(cfg) => *e,
            _ => Entry::fresh(cfg),
        };
        entry.check(cfg, now_ms)
    }

    /// Drops every entry that can no longer affect a decision at `now_ms` or later.
    pub fn sweep(&self, now_ms: u64) {
        self.lock().sweep(now_ms);
    }

    /// The number of keys held (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `name` as an sf-string: quoted, `"` and `\` escaped, non-printable-ASCII replaced by `_`.
fn sf_string(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// Milliseconds to whole seconds, rounded up, capped at the sf-integer maximum.
fn ms_to_secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000).min(SF_INTEGER_MAX)
}

/// The response header fields for `d` under the policy `policy_name` with limit `cfg`:
/// `RateLimit-Policy`, `RateLimit` and, when denied, `Retry-After` (formats in the module
/// docs).
pub fn headers(
    policy_name: &str,
    cfg: &LimitConfig,
    d: &Decision,
) -> Vec<(HeaderName, HeaderValue)> {
    let name = sf_string(policy_name);
    let window = ms_to_secs_ceil(cfg.per_ms()).max(1);
    let policy = format!("{name};q={};w={window}", cfg.requests.min(SF_INTEGER_MAX));
    let limit = format!(
        "{name};r={};t={}",
        d.remaining.min(SF_INTEGER_MAX),
        ms_to_secs_ceil(d.reset_ms)
    );
    let mut out = Vec::with_capacity(3);
    // The values are printable ASCII by construction, so conversion does not fail.
    let mut push = |name: HeaderName, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            out.push((name, value));
        }
    };
    push(HeaderName::from_static("ratelimit-policy"), policy);
    push(HeaderName::from_static("ratelimit"), limit);
    if let Some(retry) = d.retry_after_ms {
        push(
            http::header::RETRY_AFTER,
            ms_to_secs_ceil(retry).max(1).to_string(),
        );
    }
    out
}

/// What identifies the client a limit counts for. YAML: `consumer`, `api_key`, `client_ip`,
/// `route`, `{claim: sub}` or `{header: X-Tenant}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(from = "KeySourceRepr", into = "KeySourceRepr")]
pub enum KeySource {
    /// The authenticated consumer's name.
    Consumer,
    /// The API key presented (the caller should key by its hash, never the key itself).
    ApiKey,
    /// The client IP address (after trusted-proxy handling).
    ClientIp,
    /// The matched route: one shared limit for all clients.
    Route,
    /// A claim of the verified token.
    Claim {
        /// The claim name, e.g. `sub` or `tenant`.
        claim: String,
    },
    /// A request header's value.
    Header {
        /// The header name, e.g. `X-Tenant`.
        header: String,
    },
}

/// The YAML shape of [`KeySource`]: a bare name, `{claim: NAME}` or `{header: NAME}`.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[schemars(rename = "KeySource")]
enum KeySourceRepr {
    /// The authenticated consumer's name.
    Consumer,
    /// The API key presented.
    ApiKey,
    /// The client IP address.
    ClientIp,
    /// The matched route.
    Route,
    /// A claim of the verified token, e.g. `sub` or `tenant`.
    Claim(String),
    /// A request header's value, e.g. `X-Tenant`.
    Header(String),
}

impl From<KeySourceRepr> for KeySource {
    fn from(r: KeySourceRepr) -> Self {
        match r {
            KeySourceRepr::Consumer => KeySource::Consumer,
            KeySourceRepr::ApiKey => KeySource::ApiKey,
            KeySourceRepr::ClientIp => KeySource::ClientIp,
            KeySourceRepr::Route => KeySource::Route,
            KeySourceRepr::Claim(claim) => KeySource::Claim { claim },
            KeySourceRepr::Header(header) => KeySource::Header { header },
        }
    }
}

impl From<KeySource> for KeySourceRepr {
    fn from(k: KeySource) -> Self {
        match k {
            KeySource::Consumer => KeySourceRepr::Consumer,
            KeySource::ApiKey => KeySourceRepr::ApiKey,
            KeySource::ClientIp => KeySourceRepr::ClientIp,
            KeySource::Route => KeySourceRepr::Route,
            KeySource::Claim { claim } => KeySourceRepr::Claim(claim),
            KeySource::Header { header } => KeySourceRepr::Header(header),
        }
    }
}

/// A named rate-limit policy. YAML:
/// `{name: api, key: consumer, limit: {requests: 100, per: 1m}, tiers: {gold: {requests: 1000, per: 1m}}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    /// The policy name, shown to clients in the `RateLimit` header fields; non-empty
    /// printable ASCII.
    pub name: String,
    /// What the limit counts per.
    pub key: KeySource,
    /// The limit for consumers without a tier, or whose tier is not listed.
    pub limit: LimitConfig,
    /// Consumer tier name to that tier's own limit. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tiers: BTreeMap<String, LimitConfig>,
}

impl RateLimitPolicy {
    /// Checks the name, the key source and every limit.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        if self.name.is_empty() || !self.name.chars().all(|c| matches!(c, ' '..='~')) {
            return Err(RateLimitError::InvalidName(self.name.clone()));
        }
        let key_problem = match &self.key {
            KeySource::Claim { claim } if claim.is_empty() => Some("`claim` must not be empty"),
            KeySource::Header { header } if HeaderName::from_bytes(header.as_bytes()).is_err() => {
                Some("`header` is not a valid header name")
            }
            _ => None,
        };
        if let Some(reason) = key_problem {
            return Err(RateLimitError::InvalidKey {
                policy: self.name.clone(),
                reason,
            });
        }
        if let Some(reason) = self.limit.problem() {
            return Err(RateLimitError::InvalidLimit {
                scope: format!("rate-limit policy {:?}: limit", self.name),
                reason,
            });
        }
        for (tier, limit) in &self.tiers {
            let reason = if tier.is_empty() {
                Some("tier names must not be empty")
            } else {
                limit.problem()
            };
            if let Some(reason) = reason {
                return Err(RateLimitError::InvalidLimit {
                    scope: format!("rate-limit policy {:?}: tier {tier:?}", self.name),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// The limit for a consumer of `tier`: that tier's limit if listed, else `limit`.
    pub fn limit_for(&self, tier: Option<&str>) -> &LimitConfig {
        tier.and_then(|t| self.tiers.get(t)).unwrap_or(&self.limit)
    }
}

/// Why a rate-limit configuration is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    /// A policy name that is empty or not printable ASCII.
    #[error("rate-limit policy name {0:?} must be non-empty printable ASCII")]
    InvalidName(String),
    /// A key source that cannot work.
    #[error("rate-limit policy {policy:?}: key: {reason}")]
    InvalidKey {
        /// The policy name.
        policy: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A limit that cannot work.
    #[error("{scope}: {reason}")]
    InvalidLimit {
        /// Where: `limit`, or the policy and `limit` / tier.
        scope: String,
        /// What is wrong.
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;

    fn limit(requests: u64, per_ms: u64, algorithm: Algorithm) -> LimitConfig {
        LimitConfig {
            requests,
            per: Duration::from_millis(per_ms),
            burst: None,
            algorithm,
        }
    }

    const ALL: [Algorithm; 3] = [
        Algorithm::TokenBucket,
        Algorithm::SlidingWindow,
        Algorithm::FixedWindow,
    ];

    fn header_strings(h: &[(HeaderName, HeaderValue)]) -> Vec<(String, String)> {
        h.iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    v.to_str().expect("ascii header value").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn n_per_minute_then_denied_with_retry_and_reset() {
        // (algorithm, time of the burst, reset and retry-after of request N+1 in ms)
        let cases = [
            // GCRA 5/min: T = 12s; after 5 at t=0 the 6th is allowed at t=12s.
            (Algorithm::TokenBucket, 0, 12_000, 12_000),
            (Algorithm::TokenBucket, 1_000_000, 12_000, 12_000),
            // Fixed window: allowed again when the window ends.
            (Algorithm::FixedWindow, 10_000, 50_000, 50_000),
            (Algorithm::FixedWindow, 0, 60_000, 60_000),
            // Sliding window: at the next window's first millisecond the estimate is still
            // 5·1 + 0 = 5, so one millisecond later.
            (Algorithm::SlidingWindow, 10_000, 50_000, 50_001),
        ];
        for (algorithm, t, reset, retry) in cases {
            let cfg = limit(5, MINUTE, algorithm);
            let store = MemoryStore::new();
            for i in 1..=5 {
                let d = store.check("k", &cfg, t);
                assert!(d.allowed, "{algorithm:?} request {i}");
                assert_eq!(d.limit, 5);
                assert_eq!(d.remaining, 5 - i, "{algorithm:?} request {i}");
                assert_eq!(d.retry_after_ms, None);
            }
            let d = store.check("k", &cfg, t);
            assert_eq!(
                d,
                Decision {
                    allowed: false,
                    limit: 5,
                    remaining: 0,
                    reset_ms: reset,
                    retry_after_ms: Some(retry),
                },
                "{algorithm:?} at {t}"
            );
            // Waiting exactly retry_after is enough; 1ms less is not.
            let early = store.check("k", &cfg, t + retry - 1);
            assert!(!early.allowed, "{algorithm:?}");
            assert_eq!(early.retry_after_ms, Some(1), "{algorithm:?}");
            assert!(store.check("k", &cfg, t + retry).allowed, "{algorithm:?}");
        }
    }

    #[test]
    fn headers_count_down() {
        for algorithm in ALL {
            let cfg = limit(3, MINUTE, algorithm);
            let store = MemoryStore::new();
            let got: Vec<String> = (0..4)
                .map(|_| {
                    let d = store.check("k", &cfg, 0);
                    let h = header_strings(&headers("api", &cfg, &d));
                    h.iter()
                        .map(|(n, v)| format!("{n}: {v}"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                })
                .collect();
            let reset = match algorithm {
                // Until the bucket is full: k requests at t=0 → k·20s.
                Algorithm::TokenBucket => [20, 40, 60],
                _ => [60, 60, 60],
            };
            let (t, retry) = match algorithm {
                Algorithm::TokenBucket => (20, 20),
                // The sliding estimate is 3 until 1ms into the next window.
                Algorithm::SlidingWindow => (60, 61),
                Algorithm::FixedWindow => (60, 60),
            };
            assert_eq!(
                got,
                [
                    format!(
                        "ratelimit-policy: \"api\";q=3;w=60 | ratelimit: \"api\";r=2;t={}",
                        reset[0]
                    ),
                    format!(
                        "ratelimit-policy: \"api\";q=3;w=60 | ratelimit: \"api\";r=1;t={}",
                        reset[1]
                    ),
                    format!(
                        "ratelimit-policy: \"api\";q=3;w=60 | ratelimit: \"api\";r=0;t={}",
                        reset[2]
                    ),
                    format!(
                        "ratelimit-policy: \"api\";q=3;w=60 | ratelimit: \"api\";r=0;t={t} | retry-after: {retry}"
                    ),
                ],
                "{algorithm:?}"
            );
        }
    }

    #[test]
    fn gcra_burst_then_steady_rate() {
        // 5/min, burst 5: T = 12s.
        let cfg = limit(5, MINUTE, Algorithm::TokenBucket);
        let mut tat = 0;
        let mut allowed_at = |now: u64| {
            let (d, t) = gcra(&cfg, tat, now);
            tat = t;
            d
        };
        for _ in 0..5 {
            assert!(allowed_at(0).allowed);
        }
        // (time, allowed, remaining, reset_ms, retry_after_ms)
        let steps = [
            (0, false, 0, 12_000, Some(12_000)),
            (11_999, false, 0, 1, Some(1)),
            (12_000, true, 0, 60_000, None),
            (12_001, false, 0, 11_999, Some(11_999)),
            (24_000, true, 0, 60_000, None),
            (36_000, true, 0, 60_000, None),
            // TAT is 96s, 30s ahead of now: room for two more within τ = 48s.
            (66_000, true, 1, 42_000, None),
            (66_000, true, 0, 54_000, None),
            (66_000, false, 0, 6_000, Some(6_000)),
            // Idle for a full minute after the bucket was full: a whole burst again.
            (180_000, true, 4, 12_000, None),
        ];
        for (now, allowed, remaining, reset_ms, retry_after_ms) in steps {
            let d = allowed_at(now);
            assert_eq!(
                d,
                Decision {
                    allowed,
                    limit: 5,
                    remaining,
                    reset_ms,
                    retry_after_ms
                },
                "at {now}"
            );
        }
    }

    #[test]
    fn gcra_exact_when_per_is_not_a_multiple_of_requests() {
        // 7/min: T = 8571.43ms; after the burst, the k-th request is allowed at ⌈k·60000/7⌉.
        let cfg = limit(7, MINUTE, Algorithm::TokenBucket);
        let mut tat = 0;
        for i in 0..7 {
            let (d, t) = gcra(&cfg, tat, 0);
            assert!(d.allowed, "burst {i}");
            assert_eq!(d.remaining, 6 - i);
            tat = t;
        }
        for k in 1..=70u64 {
            let at = (k * MINUTE).div_ceil(7);
            let (d, _) = gcra(&cfg, tat, at - 1);
            assert!(!d.allowed, "k={k}");
            assert_eq!(d.retry_after_ms, Some(1));
            let (d, t) = gcra(&cfg, tat, at);
            assert!(d.allowed, "k={k}");
            tat = t;
        }
        // Exactly 7 + 70 requests in the first 10 minutes.
        assert_eq!(tat, 77 * MINUTE as u128);
    }

    #[test]
    fn gcra_custom_burst() {
        // 60/min (T = 1s) with burst 10: 10 at once, then one per second.
        let cfg = LimitConfig {
            burst: Some(10),
            ..limit(60, MINUTE, Algorithm::TokenBucket)
        };
        let store = MemoryStore::new();
        let allowed = (0..20)
            .filter(|_| store.check("k", &cfg, 0).allowed)
            .count();
        assert_eq!(allowed, 10);
        let d = store.check("k", &cfg, 0);
        assert_eq!(d.retry_after_ms, Some(1_000));
        assert!(store.check("k", &cfg, 1_000).allowed);
        assert!(!store.check("k", &cfg, 1_000).allowed);
        // Burst 1: strictly one per T.
        let cfg = LimitConfig {
            burst: Some(1),
            ..limit(2, 1_000, Algorithm::TokenBucket)
        };
        let (d, tat) = gcra(&cfg, 0, 0);
        assert_eq!((d.allowed, d.remaining, d.reset_ms), (true, 0, 500));
        let (d, _) = gcra(&cfg, tat, 499);
        assert_eq!(d.retry_after_ms, Some(1));
    }

    #[test]
    fn fixed_window_resets_at_the_boundary() {
        let cfg = limit(3, MINUTE, Algorithm::FixedWindow);
        let store = MemoryStore::new();
        for remaining in [2, 1, 0] {
            let d = store.check("k", &cfg, 59_000);
            assert_eq!(
                (d.allowed, d.remaining, d.reset_ms),
                (true, remaining, 1_000)
            );
        }
        let d = store.check("k", &cfg, 59_999);
        assert_eq!(
            (d.allowed, d.reset_ms, d.retry_after_ms),
            (false, 1, Some(1))
        );
        let h = header_strings(&headers("api", &cfg, &d));
        assert_eq!(h[2], ("retry-after".into(), "1".into()));
        let d = store.check("k", &cfg, 60_000);
        assert_eq!((d.allowed, d.remaining, d.reset_ms), (true, 2, 60_000));
        // A window later with no traffic in between: a fresh count.
        let d = store.check("k", &cfg, 180_001);
        assert_eq!((d.allowed, d.remaining, d.reset_ms), (true, 2, 59_999));
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        // 10/min; 10 requests in window 0, then probe window 1 at 25/50/75%.
        // (elapsed, weighted previous, allowed, remaining after the first, retry after)
        let cases = [
            // 7.5 + k < 10 for k = 0, 1, 2; the denial clears at 7 + 3 = 10 → just after 18s.
            (15_000, 3, 2, 3_001),
            (30_000, 5, 4, 1),
            (45_000, 8, 7, 3_001),
        ];
        let cfg = limit(10, MINUTE, Algorithm::SlidingWindow);
        for (elapsed, allowed, first_remaining, retry) in cases {
            let store = MemoryStore::new();
            for _ in 0..10 {
                assert!(store.check("k", &cfg, 59_000).allowed);
            }
            assert!(!store.check("k", &cfg, 59_000).allowed);
            let now = MINUTE + elapsed;
            let decisions: Vec<Decision> = (0..12).map(|_| store.check("k", &cfg, now)).collect();
            let n = decisions.iter().filter(|d| d.allowed).count();
            assert_eq!(n, allowed, "at {elapsed}");
            assert!(decisions[..n].iter().all(|d| d.allowed));
            assert_eq!(decisions[0].remaining, first_remaining, "at {elapsed}");
            assert_eq!(decisions[n - 1].remaining, 0, "at {elapsed}");
            let denied = decisions[n];
            assert_eq!(denied.reset_ms, MINUTE - elapsed);
            assert_eq!(denied.retry_after_ms, Some(retry), "at {elapsed}");
            assert!(!store.check("k", &cfg, now + retry - 1).allowed);
            assert!(store.check("k", &cfg, now + retry).allowed);
        }
    }

    #[test]
    fn sliding_window_full_current_waits_into_the_next_window() {
        // 4/min, all 4 used at 30s of window 0 (no previous): the next window starts with a
        // weighted 4, which is below 4 from its first millisecond on.
        let cfg = limit(4, MINUTE, Algorithm::SlidingWindow);
        let mut s = WindowState::default();
        for _ in 0..4 {
            let (d, next) = sliding_window(&cfg, s, 30_000);
            assert!(d.allowed);
            s = next;
        }
        let (d, _) = sliding_window(&cfg, s, 30_000);
        assert_eq!(d.retry_after_ms, Some(30_001));
        assert!(!sliding_window(&cfg, s, MINUTE).0.allowed);
        let (d, _) = sliding_window(&cfg, s, MINUTE + 1);
        assert!(d.allowed);
        // Weighted 4·(59999/60000) = 3.99993: one allowed, then 4.99993 ≥ 4.
        assert_eq!(d.remaining, 0);
        // Two windows later the count is gone.
        let (d, _) = sliding_window(&cfg, s, 2 * MINUTE);
        assert_eq!((d.allowed, d.remaining), (true, 3));
    }

    #[test]
    fn sweeping_bounds_memory() {
        let store = MemoryStore::new();
        // (algorithm, time at which entries from t=0 must still be there, time they're gone)
        let cases = [
            // 10/min GCRA: one request at t=0 → TAT = 6s.
            (Algorithm::TokenBucket, 5_999, 6_000),
            (Algorithm::FixedWindow, 59_999, 60_000),
            (Algorithm::SlidingWindow, 119_999, 120_000),
        ];
        for (algorithm, kept, gone) in cases {
            let cfg = limit(10, MINUTE, algorithm);
            for i in 0..10_000 {
                assert!(store.check(&format!("key-{i}"), &cfg, 0).allowed);
            }
            assert_eq!(store.len(), 10_000);
            store.sweep(kept);
            assert_eq!(store.len(), 10_000, "{algorithm:?}");
            store.sweep(gone);
            assert_eq!(store.len(), 0, "{algorithm:?}");
            assert!(store.is_empty());
        }
    }

    #[test]
    fn check_sweeps_on_its_own() {
        let store = MemoryStore::new();
        let cfg = limit(10, MINUTE, Algorithm::TokenBucket);
        for i in 0..10_000 {
            store.check(&format!("old-{i}"), &cfg, 0);
        }
        // Later traffic on a few keys: within len() checks the old entries are swept.
        for i in 0..10_000 {
            store.check(&format!("new-{}", i % 10), &cfg, MINUTE + i);
        }
        assert!(store.len() <= 10, "{}", store.len());
    }

    #[test]
    fn changed_limit_starts_over() {
        let store = MemoryStore::new();
        let one = limit(1, MINUTE, Algorithm::FixedWindow);
        assert!(store.check("k", &one, 0).allowed);
        assert!(!store.check("k", &one, 0).allowed);
        let two = limit(2, MINUTE, Algorithm::TokenBucket);
        assert!(store.check("k", &two, 0).allowed);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<MemoryStore>();
    }

    #[test]
    fn header_formatting() {
        let cfg = limit(100, MINUTE, Algorithm::TokenBucket);
        let allowed = Decision {
            allowed: true,
            limit: 100,
            remaining: 99,
            reset_ms: 600,
            retry_after_ms: None,
        };
        let denied = Decision {
            allowed: false,
            limit: 100,
            remaining: 0,
            reset_ms: 12_001,
            retry_after_ms: Some(12_001),
        };
        let tiny = Decision {
            reset_ms: 0,
            retry_after_ms: Some(0),
            ..denied
        };
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        // (name, per in ms, decision, expected header fields)
        let cases: [(&str, u64, Decision, Pairs<'_>); 5] = [
            (
                "api",
                MINUTE,
                allowed,
                &[
                    ("ratelimit-policy", "\"api\";q=100;w=60"),
                    ("ratelimit", "\"api\";r=99;t=1"),
                ],
            ),
            (
                "api",
                MINUTE,
                denied,
                &[
                    ("ratelimit-policy", "\"api\";q=100;w=60"),
                    ("ratelimit", "\"api\";r=0;t=13"),
                    ("retry-after", "13"),
                ],
            ),
            (
                "api",
                500,
                tiny,
                &[
                    ("ratelimit-policy", "\"api\";q=100;w=1"),
                    ("ratelimit", "\"api\";r=0;t=0"),
                    ("retry-after", "1"),
                ],
            ),
            (
                "a \"b\" \\c",
                3_600_000,
                allowed,
                &[
                    ("ratelimit-policy", "\"a \\\"b\\\" \\\\c\";q=100;w=3600"),
                    ("ratelimit", "\"a \\\"b\\\" \\\\c\";r=99;t=1"),
                ],
            ),
            (
                "tier\u{e9}\n",
                1_500,
                allowed,
                &[
                    ("ratelimit-policy", "\"tier__\";q=100;w=2"),
                    ("ratelimit", "\"tier__\";r=99;t=1"),
                ],
            ),
        ];
        for (name, per, d, expected) in cases {
            let cfg = LimitConfig {
                per: Duration::from_millis(per),
                ..cfg.clone()
            };
            let got = header_strings(&headers(name, &cfg, &d));
            let expected: Vec<(String, String)> = expected
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            assert_eq!(got, expected, "{name:?}");
        }
    }

    fn policy() -> RateLimitPolicy {
        serde_json::from_value(serde_json::json!({
            "name": "api",
            "key": "consumer",
            "limit": {"requests": 100, "per": "1m"},
            "tiers": {
                "gold": {"requests": 1000, "per": "1m", "burst": 50},
                "bronze": {"requests": 10, "per": "1h", "algorithm": "fixed_window"},
            }
        }))
        .expect("policy parses")
    }

    #[test]
    fn tiers_pick_the_right_limit() {
        let p = policy();
        p.validate().expect("policy is valid");
        // (tier, requests, per)
        let cases = [
            (None, 100, 60),
            (Some("gold"), 1000, 60),
            (Some("bronze"), 10, 3600),
            (Some("platinum"), 100, 60),
            (Some("GOLD"), 100, 60),
        ];
        for (tier, requests, per) in cases {
            let l = p.limit_for(tier);
            assert_eq!((l.requests, l.per.as_secs()), (requests, per), "{tier:?}");
        }
        assert_eq!(p.limit_for(Some("gold")).burst, Some(50));
        assert_eq!(
            p.limit_for(Some("bronze")).algorithm,
            Algorithm::FixedWindow
        );
        assert_eq!(p.limit.algorithm, Algorithm::TokenBucket);
    }

    #[test]
    fn key_source_yaml_shapes() {
        let cases = [
            (serde_json::json!("consumer"), KeySource::Consumer),
            (serde_json::json!("api_key"), KeySource::ApiKey),
            (serde_json::json!("client_ip"), KeySource::ClientIp),
            (serde_json::json!("route"), KeySource::Route),
            (
                serde_json::json!({"claim": "sub"}),
                KeySource::Claim {
                    claim: "sub".into(),
                },
            ),
            (
                serde_json::json!({"header": "X-Tenant"}),
                KeySource::Header {
                    header: "X-Tenant".into(),
                },
            ),
        ];
        for (json, key) in cases {
            assert_eq!(
                serde_json::from_value::<KeySource>(json.clone()).expect("key source parses"),
                key
            );
            assert_eq!(
                serde_json::to_value(&key).expect("key source serializes"),
                json
            );
        }
        for bad in [
            serde_json::json!("ip"),
            serde_json::json!({"claim": "sub", "header": "x"}),
            serde_json::json!({"cookie": "x"}),
        ] {
            assert!(serde_json::from_value::<KeySource>(bad).is_err());
        }
    }

    #[test]
    fn config_serde_and_schema() {
        let p = policy();
        let back: RateLimitPolicy =
            serde_json::from_value(serde_json::to_value(&p).expect("serializes"))
                .expect("round trip");
        assert_eq!(back, p);
        let err = serde_json::from_value::<LimitConfig>(
            serde_json::json!({"requests": 1, "per": "1s", "rate": 2}),
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let schema = serde_json::to_string(&schemars::schema_for!(RateLimitPolicy))
            .expect("schema serializes");
        for word in ["sliding_window", "client_ip", "claim", "tiers"] {
            assert!(schema.contains(word), "{word}: {schema}");
        }
    }

    #[test]
    fn validation_errors() {
        let ok = policy();
        type Break = fn(&mut RateLimitPolicy);
        let cases: [(&str, Break); 9] = [
            ("name", |p| p.name.clear()),
            ("name", |p| p.name = "caf\u{e9}".into()),
            ("`claim`", |p| p.key = KeySource::Claim { claim: "".into() }),
            ("`header`", |p| {
                p.key = KeySource::Header {
                    header: "bad header".into(),
                }
            }),
            ("limit: `requests`", |p| p.limit.requests = 0),
            ("limit: `per`", |p| p.limit.per = Duration::from_micros(999)),
            ("limit: `burst` must", |p| p.limit.burst = Some(0)),
            ("tier \"bronze\": `burst` only", |p| {
                if let Some(l) = p.tiers.get_mut("bronze") {
                    l.burst = Some(3);
                }
            }),
            ("tier \"\": tier names", |p| {
                p.tiers.insert(String::new(), p.limit.clone());
            }),
        ];
        for (expected, break_it) in cases {
            let mut p = ok.clone();
            break_it(&mut p);
            let err = p.validate().expect_err("broken policy").to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        assert!(limit(0, 1, Algorithm::FixedWindow).validate().is_err());
        limit(1, 1, Algorithm::FixedWindow)
            .validate()
            .expect("valid limit");
    }

    #[test]
    fn unvalidated_config_does_not_panic() {
        for algorithm in ALL {
            let cfg = LimitConfig {
                requests: 0,
                per: Duration::ZERO,
                burst: Some(0),
                algorithm,
            };
            let store = MemoryStore::new();
            assert!(store.check("k", &cfg, 0).allowed);
            assert!(!store.check("k", &cfg, 0).allowed);
            let huge = LimitConfig {
                requests: u64::MAX,
                per: Duration::MAX,
                burst: Some(u64::MAX),
                algorithm,
            };
            let d = store.check("k", &huge, u64::MAX);
            assert!(d.allowed);
            store.sweep(u64::MAX);
            let _ = headers("x", &huge, &d);
        }
    }
}
