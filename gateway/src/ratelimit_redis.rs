//! A Redis-backed rate-limit store, so that several gateway replicas share one limit.
//!
//! This module owns:
//!
//! - [`RedisConfig`] (where Redis is, what to do when it is unreachable, how long to wait,
//!   the key prefix) and [`FailMode`];
//! - [`RedisStore`], which applies a [`LimitConfig`] to a key with one atomic Lua script per
//!   decision, and gives the same [`Decision`]s as [`crate::ratelimit::MemoryStore`] for the
//!   same sequence of `(key, limit, now_ms)` checks;
//! - the Lua mirror of the pure algorithms in [`crate::ratelimit`] ([`gcra`],
//!   [`fixed_window`], [`sliding_window`]).
//!
//! It must not change the limit arithmetic (that lives in [`crate::ratelimit`]; the Lua here
//! only mirrors it, and a test compares the two decision by decision), log or put keys in
//! errors (a key may be a consumer name or an API-key hash), print the Redis password
//! ([`RedisConfig`]'s `Debug` redacts it), build responses, or block: every call is bounded
//! by [`RedisConfig::timeout`].
//!
//! # Clocks
//!
//! The script does not read the Redis server's clock: `now_ms` is passed in by the caller, so
//! that decisions equal the pure functions' exactly. Unlike for a per-process
//! [`MemoryStore`](crate::ratelimit::MemoryStore), `now_ms` must mean the same on every
//! replica: pass milliseconds since the Unix epoch ([`unix_time_ms`]). Replicas' clocks are
//! assumed to be in sync (NTP); a replica whose clock is `s` ms behind sees the shared state
//! as if it were `s` ms early (a window count may be attributed to a neighbouring window, a
//! GCRA request may wait `s` ms longer), which never panics and stays within one window.
//!
//! # Data in Redis
//!
//! One hash per limited key, named `prefix + key`, with a field `sig` (the algorithm,
//! `requests` and `per` the state was computed for; a state for another limit is dropped, as
//! [`MemoryStore`](crate::ratelimit::MemoryStore) starts such a key over) and the state:
//! `t`, `r` for GCRA (see below), `w`, `c`, `p` for the window algorithms
//! ([`WindowState`](crate::ratelimit::WindowState)'s `window`, `current`, `previous`).
//! Every write sets a `PEXPIRE` of the time the state can still affect a decision (GCRA: until
//! `TAT`; fixed window: until the window ends; sliding window: until the next window ends)
//! plus a slack of 2 s for clock skew, so memory is bounded by the keys active recently.
//! A denial writes nothing, except a sliding window's first one after the window changed
//! (which stores the shifted counts, as [`sliding_window`] returns them). A script touches
//! one key only, so it works with Redis Cluster too.
//!
//! # Exact integer arithmetic in Lua
//!
//! Redis's Lua (5.1) has only doubles, which represent every integer up to 2^53 exactly and
//! compute `+`, `−` and `·` of such integers exactly while the result stays below 2^53. So:
//!
//! - every value the script computes with is an integer below 2^53: [`RedisStore::check`]
//!   refuses ([`RedisStoreError::OutOfRange`], before any I/O) a `now_ms` above 2^52 (the
//!   year 142 000) and a limit whose products exceed 2^50 (token bucket: `requests` and
//!   `burst · per_ms`; fixed window: `requests` and `per_ms`; sliding window:
//!   `requests · per_ms`), which leaves room for the sums the script forms
//!   ([`RedisStore::validate_limit`] checks a limit at configuration time). Real limits are
//!   far below: a million requests per day is `10^6 · 8.64·10^7 ≈ 2^46`;
//! - the GCRA state `TAT`, kept by [`gcra`] in ticks of `1/requests` ms, would overflow 2^53
//!   (`now_ms · requests` is `1.7·10^12 · requests` today). It is stored split as
//!   `TAT = t · requests + r` with `t` whole milliseconds and `0 ≤ r < requests`, and the
//!   script only forms `TAT − now = (t − now_ms) · requests + r`, which is at most
//!   `burst · per` when the key is live; the retry time `⌈(TAT − now − τ)/requests⌉` is
//!   computed as `(t − now_ms) + ⌈(r − τ)/requests⌉`, whose terms stay below 2^53 even if
//!   the clock went far back;
//! - division is `⌊a/b⌋` computed as `math.floor(a / b)` and then corrected by the remainder
//!   `a − q·b` (exact, as `|q·b| ≤ |a| + b`), so rounding of the quotient cannot matter;
//!   `⌈a/b⌉` is `−⌊−a/b⌋`;
//! - numbers are written to Redis with `string.format('%d', x)` (not Lua's `tostring`, which
//!   keeps only 14 digits), and come back to Rust as integer replies, which are exact.
//!
//! Values that do not depend on the stored state (`⌊now/per⌋`, `now mod per`, `τ`) are
//! computed in Rust with `u64` and passed to the script.
//!
//! # Connection and failures
//!
//! [`RedisStore::connect`] does not wait for Redis and fails only for a malformed
//! configuration: it builds a lazy [`ConnectionManager`] (one multiplexed connection,
//! reconnecting by itself with a jittered exponential backoff of at most 1 s between
//! attempts) and starts a connection attempt in the background. So a gateway starts while
//! Redis is down, and every check then follows the [`FailMode`] until Redis answers; no
//! restart is needed when it comes back. A connection that stops answering without being closed (a half-open TCP
//! connection after a network partition) is not noticed by the manager, so after 3
//! consecutive timeouts the store replaces the manager (at most once every 2 s).
//!
//! A check that failed with a timeout may still have been counted: the script may have run
//! with its answer arriving too late. So under a slow Redis a client can be charged for a
//! request that was let through (fail open) or denied (fail closed), never the reverse.
//!
//! The script runs by `EVALSHA`; after a Redis restart (an empty script cache) the
//! `NOSCRIPT` error makes [`redis::Script`] load it (`SCRIPT LOAD`) and retry once.
//!
//! [`gcra`]: crate::ratelimit::gcra
//! [`fixed_window`]: crate::ratelimit::fixed_window
//! [`sliding_window`]: crate::ratelimit::sliding_window

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::ratelimit::{Algorithm, Decision, LimitConfig};

/// The largest `now_ms` the script computes with exactly (see the module docs).
const MAX_NOW_MS: u64 = 1 << 52;

/// The largest product of limit parameters the script computes with exactly.
const MAX_PRODUCT: u128 = 1 << 50;

/// Added to every key's expiry, so that replicas whose clocks differ slightly still see it.
const EXPIRY_SLACK_MS: u64 = 2_000;

/// What [`FailMode::Closed`] tells a client to wait.
const FAIL_CLOSED_RETRY_MS: u64 = 1_000;

/// Consecutive timeouts after which the connection is replaced.
const REPLACE_AFTER_TIMEOUTS: u32 = 3;

/// The connection is replaced at most this often.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(2);

/// The longest pause between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How long one connection attempt may take, at least.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The script behind [`RedisStore::check`]; the module docs explain its arithmetic.
///
/// `KEYS[1]` is the state hash. `ARGV`: 1 the algorithm (`g`, `f` or `s`), 2 the signature of
/// the limit, 3 `requests` (at least 1), 4 `per` in ms (at least 1), then for `g`: 5
/// `now_ms`, 6 `τ = per · (burst − 1)`; for `f` and `s`: 5 the window `⌊now/per⌋`, 6 the
/// milliseconds until it ends, 7 the milliseconds elapsed in it; 8 the expiry slack in ms; 9
/// `1` for a dry run that decides without writing (`meshgate why`). Returns `{allowed (0 or 1), remaining, reset_ms, retry_after_ms or −1}`.
const SCRIPT: &str = r"
local key = KEYS[1]
local algo = ARGV[1]
local sig = ARGV[2]
local n = tonumber(ARGV[3])
local per = tonumber(ARGV[4])
local slack = tonumber(ARGV[8])
local dry = ARGV[9] == '1'

-- Every number below is an integer under 2^53, so + - * are exact.
local function int(x)
  return string.format('%d', x)
end

-- floor(a / b) for b > 0, corrected by the (exact) remainder.
local function fdiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then
    q = q - 1
  elseif r >= b then
    q = q + 1
  end
  return q
end

-- ceil(a / b) for b > 0.
local function cdiv(a, b)
  return -fdiv(-a, b)
end

-- Writes the state; a state of another limit is dropped first.
local function save(fresh, ttl, ...)
  if dry then
    return
  end
  if fresh then
    redis.call('DEL', key)
  end
  redis.call('HSET', key, 'sig', sig, ...)
  redis.call('PEXPIRE', key, int(ttl))
end

if algo == 'g' then
  local now = tonumber(ARGV[5])
  local tau = tonumber(ARGV[6])
  local h = redis.call('HMGET', key, 'sig', 't', 'r')
  local fresh = h[1] ~= sig
  -- TAT - now = k * n + rem (ticks of 1/n ms); a TAT at or before now is a fresh key.
  local k, rem = 0, 0
  if not fresh then
    local t, r = tonumber(h[2]), tonumber(h[3])
    if t and r and t >= now then
      k, rem = t - now, r
    end
  end
  if k * n + rem <= tau then
    local d = k * n + rem + per
    local whole = fdiv(d, n)
    local reset = cdiv(d, n)
    save(fresh, reset + slack, 't', int(now + whole), 'r', int(d - whole * n))
    return {1, fdiv(tau + per - d, per), reset, -1}
  end
  local retry = k + cdiv(rem - tau, n)
  if retry < 1 then
    retry = 1
  end
  return {0, 0, retry, retry}
end

local window = tonumber(ARGV[5])
local reset = tonumber(ARGV[6])
local elapsed = tonumber(ARGV[7])

if algo == 'f' then
  local h = redis.call('HMGET', key, 'sig', 'w', 'c')
  local fresh = h[1] ~= sig
  local count = 0
  if not fresh and tonumber(h[2]) == window then
    count = tonumber(h[3]) or 0
  end
  if count < n then
    count = count + 1
    save(fresh, reset + slack, 'w', int(window), 'c', int(count))
    return {1, n - count, reset, -1}
  end
  return {0, 0, reset, reset}
end

if algo == 's' then
  local h = redis.call('HMGET', key, 'sig', 'w', 'c', 'p')
  local fresh = h[1] ~= sig
  local previous, current = 0, 0
  -- Whether the stored counts moved to this window (then a denial stores them too).
  local shifted = false
  if not fresh then
    local w = tonumber(h[2])
    local c, p = tonumber(h[3]) or 0, tonumber(h[4]) or 0
    if w == window then
      previous, current = p, c
    elseif w ~= nil and w + 1 == window then
      previous, current, shifted = c, 0, true
    end
  end
  local quota = n * per
  local carried = previous * reset
  if carried + current * per < quota then
    current = current + 1
    local left = quota - (carried + current * per)
    if left < 0 then
      left = 0
    end
    save(fresh, reset + per + slack, 'w', int(window), 'c', int(current), 'p', int(previous))
    return {1, cdiv(left, per), reset, -1}
  end
  if shifted then
    save(false, reset + per + slack, 'w', int(window), 'c', int(current), 'p', int(previous))
  end
  local retry
  if current < n then
    retry = fdiv((previous + current - n) * per, previous) + 1 - elapsed
  else
    retry = reset + fdiv((current - n) * per, current) + 1
  end
  if retry < 1 then
    retry = 1
  end
  return {0, 0, reset, retry}
end

return redis.error_reply('meshgate rate limit: unknown algorithm')
";

/// What [`RedisStore::check_or_fail_mode`] decides when Redis cannot be asked (unreachable,
/// too slow, or an out-of-range limit). YAML: `open` or `closed`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Allow the request (availability first): `remaining` is the full `requests`.
    #[default]
    Open,
    /// Deny the request as if limited (429-like), with a `retry_after_ms` of 1 s.
    Closed,
}

impl FailMode {
    /// The decision for a request under `cfg` when Redis cannot be asked. `Open`: allowed,
    /// `remaining = limit = requests`, `reset_ms = 0`. `Closed`: denied, `remaining = 0`,
    /// `reset_ms` and `retry_after_ms` 1000.
    pub fn decision(self, cfg: &LimitConfig) -> Decision {
        match self {
            FailMode::Open => Decision {
                allowed: true,
                limit: cfg.requests,
                remaining: cfg.requests,
                reset_ms: 0,
                retry_after_ms: None,
            },
            FailMode::Closed => Decision {
                allowed: false,
                limit: cfg.requests,
                remaining: 0,
                reset_ms: FAIL_CLOSED_RETRY_MS,
                retry_after_ms: Some(FAIL_CLOSED_RETRY_MS),
            },
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_millis(200)
}

fn default_prefix() -> String {
    "meshgate:rl:".to_owned()
}

/// Where the shared rate-limit state lives. YAML:
/// `{url: "redis://127.0.0.1:6379/0"}` or
/// `{url: "redis://:secret@redis:6379/0", fail: closed, timeout: 100ms, prefix: "gw:rl:"}`.
///
/// `Debug` shows the URL with its user and password (and a `pass`/`password` query
/// parameter) replaced by `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// The Redis URL, e.g. `redis://127.0.0.1:6379/0` or `redis://:password@host:6379/0`
    /// (`redis+unix:///path/to/socket` for a Unix socket).
    pub url: String,
    /// What to decide while Redis cannot be asked. Default: `open`.
    #[serde(default)]
    pub fail: FailMode,
    /// How long one check may wait for Redis (humantime, e.g. `200ms`); at least 1ms.
    /// Default: `200ms`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Prepended to every key in Redis. Default: `meshgate:rl:`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

impl RedisConfig {
    /// Checks that the URL parses as a Redis URL and that `timeout` is at least 1ms.
    pub fn validate(&self) -> Result<(), RedisStoreError> {
        self.client().map(|_| ())
    }

    fn client(&self) -> Result<redis::Client, RedisStoreError> {
        if self.timeout < Duration::from_millis(1) {
            return Err(RedisStoreError::InvalidConfig(
                "`timeout` must be at least 1ms".into(),
            ));
        }
        redis::Client::open(self.url.as_str())
            .map_err(|e| RedisStoreError::InvalidConfig(format!("`url`: {e}")))
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("fail", &self.fail)
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// `url` with the user information (`user:password@`) and the value of a `pass` or
/// `password` query parameter replaced by `***`.
fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let start = base.find("://").map_or(0, |i| i + 3);
    // The last `@` before the query ends the user information, even if the password holds an
    // unescaped `/` or `@`.
    let mut out = match base[start..].rfind('@') {
        Some(at) => format!("{}***{}", &base[..start], &base[start + at..]),
        None => base.to_owned(),
    };
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _))
                    if name.eq_ignore_ascii_case("pass")
                        || name.eq_ignore_ascii_case("password") =>
                {
                    format!("{name}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

/// Why a check could not be answered by Redis. None of them carries the key or the password.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The configuration cannot work (a malformed URL, a zero timeout).
    #[error("invalid redis rate-limit configuration: {0}")]
    InvalidConfig(String),
    /// Redis did not answer within [`RedisConfig::timeout`].
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The limit or `now_ms` is outside the range the script computes with exactly (see the
    /// module docs); no request was sent.
    #[error("rate limit outside the range the redis store computes exactly: {0}")]
    OutOfRange(&'static str),
    /// The script answered with something other than its four integers.
    #[error("unexpected reply from the rate-limit script: {0}")]
    BadReply(String),
}

impl RedisStoreError {
    /// A short stable name for metrics labels: `invalid_config`, `timeout`, `redis`,
    /// `out_of_range` or `bad_reply`.
    pub fn kind(&self) -> &'static str {
        match self {
            RedisStoreError::InvalidConfig(_) => "invalid_config",
            RedisStoreError::Timeout(_) => "timeout",
            RedisStoreError::Redis(_) => "redis",
            RedisStoreError::OutOfRange(_) => "out_of_range",
            RedisStoreError::BadReply(_) => "bad_reply",
        }
    }
}

/// Milliseconds since the Unix epoch by this machine's clock: the `now_ms` to pass to
/// [`RedisStore::check`], as it must mean the same on every replica. 0 if the clock is
/// before 1970.
pub fn unix_time_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `per` in milliseconds, at least 1 (as [`crate::ratelimit`] treats it).
fn per_ms(cfg: &LimitConfig) -> u64 {
    u64::try_from(cfg.per.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// `requests`, at least 1.
fn requests_n(cfg: &LimitConfig) -> u64 {
    cfg.requests.max(1)
}

/// The GCRA burst, at least 1.
fn burst_n(cfg: &LimitConfig) -> u64 {
    cfg.burst.unwrap_or(cfg.requests).max(1)
}

/// The script's `ARGV` for one check.
#[derive(Debug)]
struct ScriptArgs {
    algorithm: &'static str,
    signature: String,
    requests: u64,
    per: u64,
    /// `now_ms` (GCRA) or the window index.
    a: u64,
    /// `τ` (GCRA) or the milliseconds until the window ends.
    b: u64,
    /// The milliseconds elapsed in the window (0 for GCRA).
    c: u64,
}

impl ScriptArgs {
    /// The arguments for `cfg` at `now_ms`, or why the script could not compute them exactly.
    fn new(cfg: &LimitConfig, now_ms: u64) -> Result<Self, RedisStoreError> {
        RedisStore::validate_limit(cfg)?;
        if now_ms > MAX_NOW_MS {
            return Err(RedisStoreError::OutOfRange("`now_ms` must be at most 2^52"));
        }
        let requests = requests_n(cfg);
        let per = per_ms(cfg);
        let (algorithm, a, b, c) = match cfg.algorithm {
            // burst · per ≤ 2^50 was checked, so this does not overflow.
            Algorithm::TokenBucket => ("g", now_ms, per * (burst_n(cfg) - 1), 0),
            Algorithm::FixedWindow => ("f", now_ms / per, per - now_ms % per, now_ms % per),
            Algorithm::SlidingWindow => ("s", now_ms / per, per - now_ms % per, now_ms % per),
        };
        Ok(ScriptArgs {
            algorithm,
            signature: format!("{algorithm}:{requests}:{per}"),
            requests,
            per,
            a,
            b,
            c,
        })
    }
}

/// The shared part of a [`RedisStore`].
struct Inner {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    /// Replaced after repeated timeouts; cloning it is cheap.
    manager: RwLock<ConnectionManager>,
    script: redis::Script,
    /// Consecutive checks that timed out.
    timeouts: AtomicU32,
    /// When the manager was last replaced.
    replaced_at: Mutex<Option<Instant>>,
    fail: FailMode,
    timeout: Duration,
    prefix: String,
    redacted_url: String,
}

/// Rate-limit state in Redis, shared by every replica that uses the same Redis and prefix.
///
/// Cheap to clone (clones share one connection). See the module docs for the data layout,
/// the clock and the connection behaviour.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.redacted_url)
            .field("fail", &self.inner.fail)
            .field("timeout", &self.inner.timeout)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for `cfg`. Does not wait for Redis and does not fail when it is down: it only
    /// checks the configuration ([`RedisStoreError::InvalidConfig`]), builds a lazy
    /// connection manager and starts connecting in a background task; checks follow the
    /// fail mode until Redis answers. Must be called within a Tokio runtime.
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisStore, RedisStoreError> {
        let client = cfg.client()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout.max(MIN_CONNECT_TIMEOUT)))
            .set_response_timeout(Some(cfg.timeout))
            .set_max_delay(MAX_RECONNECT_DELAY);
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map_err(|e| RedisStoreError::InvalidConfig(e.to_string()))?;
        // Connect now rather than on the first request; a failure is the first check's to
        // report.
        let mut warm = manager.clone();
        tokio::spawn(async move {
            let _: Result<(), _> = redis::cmd("PING").query_async(&mut warm).await;
        });
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                manager_config,
                manager: RwLock::new(manager),
                script: redis::Script::new(SCRIPT),
                timeouts: AtomicU32::new(0),
                replaced_at: Mutex::new(None),
                fail: cfg.fail,
                timeout: cfg.timeout,
                prefix: cfg.prefix.clone(),
                redacted_url: redact_url(&cfg.url),
            }),
        })
    }

    /// Whether the script computes `cfg` exactly (see the module docs):
    /// [`RedisStoreError::OutOfRange`] if not. [`RedisStore::check`] checks this too; call it
    /// when loading the configuration to reject such a limit early.
    pub fn validate_limit(cfg: &LimitConfig) -> Result<(), RedisStoreError> {
        let n = u128::from(requests_n(cfg));
        let per = u128::from(per_ms(cfg));
        let problem = match cfg.algorithm {
            Algorithm::TokenBucket if n > MAX_PRODUCT => Some("`requests` must be at most 2^50"),
            Algorithm::TokenBucket if u128::from(burst_n(cfg)) * per > MAX_PRODUCT => {
                Some("`burst` · `per` (in ms) must be at most 2^50")
            }
            Algorithm::FixedWindow if n > MAX_PRODUCT => Some("`requests` must be at most 2^50"),
            Algorithm::FixedWindow if per > MAX_PRODUCT => {
                Some("`per` (in ms) must be at most 2^50")
            }
            Algorithm::SlidingWindow if n * per > MAX_PRODUCT => {
                Some("`requests` · `per` (in ms) must be at most 2^50")
            }
            _ => None,
        };
        problem.map_or(Ok(()), |p| Err(RedisStoreError::OutOfRange(p)))
    }

    /// The fail mode this store was configured with.
    pub fn fail_mode(&self) -> FailMode {
        self.inner.fail
    }

    /// Counts one request for `key` under `cfg` at `now_ms` (milliseconds since the Unix
    /// epoch, see [`unix_time_ms`]) and returns the verdict: one atomic script run, the same
    /// decision [`crate::ratelimit::MemoryStore::check`] would give for the same sequence of
    /// checks. Waits at most [`RedisConfig::timeout`].
    pub async fn check(
        &self,
        key: &str,
        cfg: &LimitConfig,
        now_ms: u64,
    ) -> Result<Decision, RedisStoreError> {
        self.run(key, cfg, now_ms, false).await
    }

    /// What [`RedisStore::check`] would decide now, without counting the request (the same
    /// script, writing nothing).
    pub async fn peek(
        &self,
        key: &str,
        cfg: &LimitConfig,
        now_ms: u64,
    ) -> Result<Decision, RedisStoreError> {
        self.run(key, cfg, now_ms, true).await
    }

    async fn run(
        &self,
        key: &str,
        cfg: &LimitConfig,
        now_ms: u64,
        dry: bool,
    ) -> Result<Decision, RedisStoreError> {
        let args = ScriptArgs::new(cfg, now_ms)?;
        let inner = &self.inner;
        let mut invocation = inner.script.key(format!("{}{key}", inner.prefix));
        invocation
            .arg(args.algorithm)
            .arg(&args.signature)
            .arg(args.requests)
            .arg(args.per)
            .arg(args.a)
            .arg(args.b)
            .arg(args.c)
            .arg(EXPIRY_SLACK_MS)
            .arg(if dry { "1" } else { "0" });
        let mut manager = self.manager();
        let reply = tokio::time::timeout(
            inner.timeout,
            invocation.invoke_async::<Vec<i64>>(&mut manager),
        )
        .await;
        match reply {
            Ok(Ok(reply)) => {
                inner.timeouts.store(0, Ordering::Relaxed);
                decision(cfg, &reply)
            }
            // The connection's own response timeout (also `timeout`) may fire first.
            Ok(Err(e)) if e.is_timeout() => {
                self.note_timeout();
                Err(RedisStoreError::Timeout(inner.timeout))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_elapsed) => {
                self.note_timeout();
                Err(RedisStoreError::Timeout(inner.timeout))
            }
        }
    }

    /// [`RedisStore::check`], or, when it fails, the [`FailMode`]'s decision
    /// ([`FailMode::decision`]) together with the error, for the caller to log or count.
    pub async fn check_or_fail_mode(
        &self,
        key: &str,
        cfg: &LimitConfig,
        now_ms: u64,
    ) -> (Decision, Option<RedisStoreError>) {
        match self.check(key, cfg, now_ms).await {
            Ok(d) => (d, None),
            Err(e) => (self.inner.fail.decision(cfg), Some(e)),
        }
    }

    fn manager(&self) -> ConnectionManager {
        self.inner
            .manager
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counts a timeout; after [`REPLACE_AFTER_TIMEOUTS`] in a row, replaces the connection
    /// manager (a half-open connection never fails by itself).
    fn note_timeout(&self) {
        let inner = &self.inner;
        if inner.timeouts.fetch_add(1, Ordering::Relaxed) + 1 < REPLACE_AFTER_TIMEOUTS {
            return;
        }
        let mut replaced_at = inner
            .replaced_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if replaced_at.is_some_and(|at| at.elapsed() < REPLACE_AT_MOST_EVERY) {
            return;
        }
        if let Ok(manager) = ConnectionManager::new_lazy_with_config(
            inner.client.clone(),
            inner.manager_config.clone(),
        ) {
            *inner
                .manager
                .write()
                .unwrap_or_else(PoisonError::into_inner) = manager;
            *replaced_at = Some(Instant::now());
            inner.timeouts.store(0, Ordering::Relaxed);
            tracing::debug!(
                url = %inner.redacted_url,
                "redis rate-limit store: replaced the connection after repeated timeouts"
            );
        }
    }
}

/// The script's reply as a decision for `cfg`.
fn decision(cfg: &LimitConfig, reply: &[i64]) -> Result<Decision, RedisStoreError> {
    let bad = || RedisStoreError::BadReply(format!("{reply:?}"));
    let &[allowed, remaining, reset_ms, retry] = reply else {
        return Err(bad());
    };
    let allowed = match allowed {
        0 => false,
        1 => true,
        _ => return Err(bad()),
    };
    let retry_after_ms = match retry {
        -1 if allowed => None,
        r if !allowed => Some(u64::try_from(r).map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    Ok(Decision {
        allowed,
        limit: cfg.requests,
        remaining: u64::try_from(remaining).map_err(|_| bad())?,
        reset_ms: u64::try_from(reset_ms).map_err(|_| bad())?,
        retry_after_ms,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        net::TcpListener as StdListener,
        process::{Child, Command, Stdio},
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::ratelimit::MemoryStore;

    const MINUTE: u64 = 60_000;
    /// A Unix time in ms at the start of a minute.
    const BASE: u64 = 28_333_334 * MINUTE;
    /// How long a test waits for something to happen (Redis starting, reconnecting).
    const PATIENCE: Duration = Duration::from_secs(20);

    fn limit(requests: u64, per_ms: u64, algorithm: Algorithm) -> LimitConfig {
        LimitConfig {
            requests,
            per: Duration::from_millis(per_ms),
            burst: None,
            algorithm,
        }
    }

    fn burst(requests: u64, per_ms: u64, burst: u64) -> LimitConfig {
        LimitConfig {
            burst: Some(burst),
            ..limit(requests, per_ms, Algorithm::TokenBucket)
        }
    }

    fn free_port() -> u16 {
        StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port()
    }

    /// A `redis-server` child process on a loopback port, killed when dropped.
    struct RedisServer {
        child: Option<Child>,
        port: u16,
    }

    /// Whether `redis-server` answers `PING` on `port`.
    async fn answers_ping(port: u16) -> bool {
        let ping = async {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf).await.ok()?;
            Some(&buf == b"+PONG\r\n")
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Some(true))
        )
    }

    fn spawn_server(port: u16) -> std::io::Result<Child> {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }

    /// Reports `test` as skipped for want of `redis-server`, or fails it when `CI` is set.
    fn skip_without_redis(test: &str) {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: redis-server not installed (required when CI is set)");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: redis-server not installed"
        );
    }

    impl RedisServer {
        /// Starts a server on a free port; `None` (the test is skipped) if `redis-server` is
        /// not installed, which fails the test when `CI` is set.
        async fn start(test: &str) -> Option<RedisServer> {
            for _ in 0..3 {
                let mut server = RedisServer {
                    child: None,
                    port: free_port(),
                };
                match server.start_again().await {
                    Ok(true) => return Some(server),
                    Ok(false) => continue, // The port was taken meanwhile: another one.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        skip_without_redis(test);
                        return None;
                    }
                    Err(e) => panic!("{test}: cannot start redis-server: {e}"),
                }
            }
            panic!("{test}: redis-server did not start on three ports");
        }

        /// Starts the server (again) on its port; false if it exited or never answered.
        async fn start_again(&mut self) -> std::io::Result<bool> {
            self.stop();
            let mut child = spawn_server(self.port)?;
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline {
                if answers_ping(self.port).await {
                    self.child = Some(child);
                    return Ok(true);
                }
                if child.try_wait()?.is_some() {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            Ok(false)
        }

        fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn config(url: String, fail: FailMode, prefix: &str) -> RedisConfig {
        RedisConfig {
            url,
            fail,
            timeout: Duration::from_millis(200),
            prefix: prefix.to_owned(),
        }
    }

    async fn store(url: String, prefix: &str) -> RedisStore {
        RedisStore::connect(&config(url, FailMode::Closed, prefix))
            .await
            .expect("connect")
    }

    /// Polls `store` (with checks of a key of its own) until a check succeeds; panics after
    /// [`PATIENCE`]. A check that timed out may still have been counted, so tests count
    /// exactly only on other keys.
    async fn until_answering(store: &RedisStore) {
        let cfg = limit(1_000_000, MINUTE, Algorithm::FixedWindow);
        let deadline = Instant::now() + PATIENCE;
        loop {
            match store.check("probe", &cfg, BASE).await {
                Ok(_) => return,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("redis did not answer again within {PATIENCE:?}: {e}"),
            }
        }
    }

    /// A small deterministic generator (an LCG), so sequences are the same on every run.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % bound.max(1)
        }
    }

    /// The time steps a sequence draws from for `cfg`: bursts, steps around the emission
    /// interval and around the window, and a step back in time.
    fn step(rng: &mut Lcg, cfg: &LimitConfig, t: u64) -> u64 {
        let per = per_ms(cfg);
        let gap = per / requests_n(cfg);
        // Most steps keep the time, more so for larger limits, so that limits (of
        // three keys) are reached.
        let burst = requests_n(cfg).saturating_mul(3).min(30);
        if rng.next(burst + 2) < burst {
            return t;
        }
        let forward = [
            1,
            gap / 2,
            gap,
            gap + 1,
            per / 3,
            per / 2,
            per - 1,
            per,
            2 * per + 1,
        ];
        let i = rng.next(forward.len() as u64 + 1);
        match forward.get(i as usize) {
            Some(dt) => t + dt,
            None => t.saturating_sub(per / 3).max(BASE),
        }
    }

    #[tokio::test]
    async fn decisions_equal_the_memory_store() {
        let Some(server) = RedisServer::start("decisions_equal_the_memory_store").await else {
            return;
        };
        let big_per = 1 << 47;
        // (label, limit, checks)
        let cases = [
            ("gcra 5/min", limit(5, MINUTE, Algorithm::TokenBucket), 400),
            ("gcra 7/s burst 3", burst(7, 1_000, 3), 400),
            ("gcra 1/ms", limit(1, 1, Algorithm::TokenBucket), 200),
            // now · requests is far above 2^53.
            (
                "gcra 1000003/h burst 3",
                burst(1_000_003, 3_600_000, 3),
                400,
            ),
            (
                "gcra 3/2^47ms",
                limit(3, big_per, Algorithm::TokenBucket),
                25,
            ),
            (
                "gcra burst·per = 2^50",
                burst(1_000_003, 1 << 30, 1 << 20),
                50,
            ),
            ("fixed 5/min", limit(5, MINUTE, Algorithm::FixedWindow), 400),
            ("fixed 3/s", limit(3, 1_000, Algorithm::FixedWindow), 400),
            (
                "fixed 4/2^47ms",
                limit(4, big_per, Algorithm::FixedWindow),
                25,
            ),
            (
                "sliding 10/min",
                limit(10, MINUTE, Algorithm::SlidingWindow),
                400,
            ),
            (
                "sliding 7/s",
                limit(7, 1_000, Algorithm::SlidingWindow),
                400,
            ),
            ("sliding 1/7ms", limit(1, 7, Algorithm::SlidingWindow), 200),
            (
                "sliding 5/2^47ms",
                limit(5, big_per, Algorithm::SlidingWindow),
                25,
            ),
        ];
        let redis = store(server.url(), "table:").await;
        for (case, (label, cfg, checks)) in cases.iter().enumerate() {
            let memory = MemoryStore::new();
            let mut rng = Lcg(case as u64 + 1);
            let mut t = BASE;
            let (mut allowed, mut denied) = (0, 0);
            for i in 0..*checks {
                let key = format!("{case}:{}", ["a", "b", "c"][rng.next(3) as usize]);
                let want = memory.check(&key, cfg, t);
                let got = redis.check(&key, cfg, t).await.expect("redis check");
                assert_eq!(got, want, "{label}: check {i} of {key} at {t}");
                if got.allowed {
                    allowed += 1;
                } else {
                    denied += 1;
                }
                t = step(&mut rng, cfg, t);
            }
            if *checks >= 200 {
                assert!(allowed > 20 && denied > 20, "{label}: {allowed}/{denied}");
            }
        }

        // One key whose limit keeps changing starts over like in the memory store.
        let configs = [
            limit(3, 1_000, Algorithm::SlidingWindow),
            limit(3, 1_000, Algorithm::FixedWindow),
            limit(3, 1_000, Algorithm::TokenBucket),
            burst(3, 1_000, 1),
            limit(4, 1_000, Algorithm::SlidingWindow),
            limit(3, 2_000, Algorithm::SlidingWindow),
        ];
        let memory = MemoryStore::new();
        let mut rng = Lcg(99);
        let mut t = BASE;
        for i in 0..600 {
            let cfg = &configs[rng.next(configs.len() as u64) as usize];
            let key = ["mixed:a", "mixed:b"][rng.next(2) as usize];
            let want = memory.check(key, cfg, t);
            let got = redis.check(key, cfg, t).await.expect("redis check");
            assert_eq!(got, want, "mixed: check {i} of {key} at {t} under {cfg:?}");
            t += rng.next(400);
        }
    }

    /// A peek (`meshgate why`) answers what a check would, for every algorithm, and counts
    /// nothing: the same as the memory store's peek.
    #[tokio::test]
    async fn a_peek_decides_like_a_check_and_counts_nothing() {
        let Some(server) =
            RedisServer::start("a_peek_decides_like_a_check_and_counts_nothing").await
        else {
            return;
        };
        let redis = store(server.url(), "peek:").await;
        until_answering(&redis).await;
        for algorithm in [
            Algorithm::TokenBucket,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
        ] {
            let cfg = limit(2, MINUTE, algorithm);
            let memory = MemoryStore::new();
            let key = format!("k-{algorithm:?}");
            for step in 0..4 {
                let peek = redis.peek(&key, &cfg, BASE).await.expect("peek");
                assert_eq!(peek, memory.peek(&key, &cfg, BASE), "{algorithm:?} {step}");
                // peeking twice changes nothing
                assert_eq!(redis.peek(&key, &cfg, BASE).await.expect("peek"), peek);
                let check = redis.check(&key, &cfg, BASE).await.expect("check");
                assert_eq!(
                    check, peek,
                    "{algorithm:?} {step}: the peek foretold the check"
                );
                assert_eq!(
                    check,
                    memory.check(&key, &cfg, BASE),
                    "{algorithm:?} {step}"
                );
                assert_eq!(check.allowed, step < 2, "{algorithm:?} {step}");
            }
        }
    }

    #[tokio::test]
    async fn two_replicas_share_one_limit() {
        let Some(server) = RedisServer::start("two_replicas_share_one_limit").await else {
            return;
        };
        let a = store(server.url(), "replicas:").await;
        let b = store(server.url(), "replicas:").await;
        for algorithm in [
            Algorithm::TokenBucket,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
        ] {
            let cfg = limit(50, MINUTE, algorithm);
            // Alternating, one millisecond apart.
            let mut allowed = 0;
            for i in 0..200 {
                let replica = if i % 2 == 0 { &a } else { &b };
                let d = replica
                    .check(&format!("{algorithm:?}"), &cfg, BASE + i)
                    .await
                    .expect("check");
                allowed += usize::from(d.allowed);
            }
            assert_eq!(allowed, 50, "{algorithm:?} alternating");
            // All at once from both replicas.
            let tasks: Vec<_> = (0..200)
                .map(|i| {
                    let replica = if i % 2 == 0 { a.clone() } else { b.clone() };
                    let cfg = cfg.clone();
                    let key = format!("{algorithm:?}-concurrent");
                    tokio::spawn(async move { replica.check(&key, &cfg, BASE).await })
                })
                .collect();
            let mut allowed = 0;
            for task in tasks {
                let d = task.await.expect("task").expect("check");
                allowed += usize::from(d.allowed);
            }
            assert_eq!(allowed, 50, "{algorithm:?} concurrent");
        }
    }

    #[tokio::test]
    async fn fail_modes_while_redis_is_down_then_recovers() {
        let Some(mut server) =
            RedisServer::start("fail_modes_while_redis_is_down_then_recovers").await
        else {
            return;
        };
        let open = RedisStore::connect(&config(server.url(), FailMode::Open, "down:"))
            .await
            .expect("connect");
        let closed = RedisStore::connect(&config(server.url(), FailMode::Closed, "down:"))
            .await
            .expect("connect");
        let cfg = limit(10, MINUTE, Algorithm::TokenBucket);
        for store in [&open, &closed] {
            let (d, err) = store.check_or_fail_mode("k", &cfg, BASE).await;
            assert!(err.is_none(), "{err:?}");
            assert!(d.allowed);
        }

        server.stop();
        for _ in 0..5 {
            let started = Instant::now();
            let (d, err) = open.check_or_fail_mode("k", &cfg, BASE).await;
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(err.is_some());
            assert_eq!(
                d,
                Decision {
                    allowed: true,
                    limit: 10,
                    remaining: 10,
                    reset_ms: 0,
                    retry_after_ms: None
                }
            );
            let started = Instant::now();
            let (d, err) = closed.check_or_fail_mode("k", &cfg, BASE).await;
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(err.is_some());
            assert_eq!(
                (d.allowed, d.remaining, d.retry_after_ms),
                (false, 0, Some(1_000))
            );
        }

        // Back on the same port (with an empty script cache and no data).
        assert!(server.start_again().await.expect("restart"), "restarted");
        for (store, remaining) in [(&open, 9), (&closed, 8)] {
            until_answering(store).await;
            let (d, err) = store.check_or_fail_mode("after-restart", &cfg, BASE).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!((d.allowed, d.remaining), (true, remaining));
        }
    }

    #[tokio::test]
    async fn connect_does_not_need_redis() {
        let port = free_port();
        let store = RedisStore::connect(&config(
            format!("redis://127.0.0.1:{port}/0"),
            FailMode::Closed,
            "late:",
        ))
        .await
        .expect("connect without redis");
        let cfg = limit(3, MINUTE, Algorithm::FixedWindow);
        let (d, err) = store.check_or_fail_mode("k", &cfg, BASE).await;
        assert!(!d.allowed);
        assert!(err.is_some());

        let mut server = RedisServer { child: None, port };
        match server.start_again().await {
            Ok(true) => {}
            Ok(false) => panic!("redis-server did not start on port {port}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return skip_without_redis("connect_does_not_need_redis");
            }
            Err(e) => panic!("cannot start redis-server: {e}"),
        }
        until_answering(&store).await;
        let d = store.check("k", &cfg, BASE).await.expect("check");
        assert_eq!((d.allowed, d.remaining), (true, 2));
    }

    #[tokio::test]
    async fn keys_expire() {
        let Some(server) = RedisServer::start("keys_expire").await else {
            return;
        };
        let redis = store(server.url(), "ttl:").await;
        let mut raw = redis::Client::open(server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        // (algorithm, now, the longest the state can matter in ms)
        let cases = [
            // GCRA 10/min: one request at 0 → TAT = 6 s.
            (Algorithm::TokenBucket, BASE, 6_000),
            (Algorithm::FixedWindow, BASE + 15_000, 45_000),
            (Algorithm::SlidingWindow, BASE + 15_000, 45_000 + MINUTE),
        ];
        for (algorithm, now, life) in cases {
            let key = format!("{algorithm:?}");
            let cfg = limit(10, MINUTE, algorithm);
            assert!(redis.check(&key, &cfg, now).await.expect("check").allowed);
            let pttl: i64 = redis::cmd("PTTL")
                .arg(format!("ttl:{key}"))
                .query_async(&mut raw)
                .await
                .expect("PTTL");
            let max = i64::try_from(life + EXPIRY_SLACK_MS).expect("small");
            assert!(pttl > max - 1_000 && pttl <= max, "{algorithm:?}: {pttl}");
        }
        // A short window: the key is gone soon after it ends.
        let cfg = limit(1, 5, Algorithm::FixedWindow);
        redis.check("short", &cfg, BASE).await.expect("check");
        let deadline = Instant::now() + Duration::from_millis(EXPIRY_SLACK_MS) + PATIENCE;
        loop {
            let exists: bool = redis::cmd("EXISTS")
                .arg("ttl:short")
                .query_async(&mut raw)
                .await
                .expect("EXISTS");
            if !exists {
                break;
            }
            assert!(Instant::now() < deadline, "the key did not expire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Denials write nothing.
        let cfg = limit(1, MINUTE, Algorithm::FixedWindow);
        assert!(
            redis
                .check("deny", &cfg, BASE)
                .await
                .expect("check")
                .allowed
        );
        let before: i64 = redis::cmd("PTTL")
            .arg("ttl:deny")
            .query_async(&mut raw)
            .await
            .expect("PTTL");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !redis
                .check("deny", &cfg, BASE)
                .await
                .expect("check")
                .allowed
        );
        let after: i64 = redis::cmd("PTTL")
            .arg("ttl:deny")
            .query_async(&mut raw)
            .await
            .expect("PTTL");
        assert!(after < before, "{after} < {before}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts connections (in the kernel) and never answers.
        let silent = StdListener::bind("127.0.0.1:0").expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let mut cfg = config(format!("redis://127.0.0.1:{port}"), FailMode::Open, "x:");
        cfg.timeout = Duration::from_millis(100);
        let store = RedisStore::connect(&cfg).await.expect("connect");
        let limit = limit(5, MINUTE, Algorithm::SlidingWindow);
        for _ in 0..5 {
            let started = Instant::now();
            let (d, err) = store.check_or_fail_mode("k", &limit, BASE).await;
            let waited = started.elapsed();
            assert!(waited >= Duration::from_millis(90), "{waited:?}");
            assert!(waited < Duration::from_millis(1_000), "{waited:?}");
            assert!(d.allowed);
            let err = err.expect("an error");
            assert_eq!(err.kind(), "timeout", "{err}");
        }
        drop(silent);
    }

    /// A TCP proxy to `upstream` whose existing connections can be frozen (kept open, never
    /// forwarding again), like connections through a network partition.
    async fn freezable_proxy(upstream: u16) -> (u16, tokio::sync::watch::Sender<u64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (freeze, frozen) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut frozen = frozen.clone();
                frozen.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = frozen.changed() => {
                            // Hold both ends open, silently, until the test ends.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        (port, freeze)
    }

    #[tokio::test]
    async fn a_half_open_connection_is_replaced() {
        let Some(server) = RedisServer::start("a_half_open_connection_is_replaced").await else {
            return;
        };
        let (port, freeze) = freezable_proxy(server.port).await;
        let mut cfg = config(format!("redis://127.0.0.1:{port}/0"), FailMode::Open, "ho:");
        cfg.timeout = Duration::from_millis(100);
        let store = RedisStore::connect(&cfg).await.expect("connect");
        let limit = limit(100, MINUTE, Algorithm::FixedWindow);
        until_answering(&store).await;
        let d = store.check("k", &limit, BASE).await.expect("check");
        assert_eq!(d.remaining, 99);

        freeze.send_modify(|generation| *generation += 1);
        let (d, err) = store.check_or_fail_mode("k", &limit, BASE).await;
        assert_eq!(err.map(|e| e.kind()), Some("timeout"));
        assert_eq!(d.remaining, 100);
        // Frozen requests never reached Redis; the replaced connection goes through.
        until_answering(&store).await;
        let d = store.check("k", &limit, BASE).await.expect("check");
        assert_eq!(d.remaining, 98);
    }

    #[tokio::test]
    async fn out_of_range_limits_are_refused_before_any_io() {
        // Nothing listens there; an out-of-range check must not even try.
        let store = RedisStore::connect(&config(
            format!("redis://127.0.0.1:{}/0", free_port()),
            FailMode::Closed,
            "r:",
        ))
        .await
        .expect("connect");
        let at_limit = [
            burst(1 << 50, 1, 1),
            burst(1, 1 << 30, 1 << 20),
            limit(1 << 50, 1 << 50, Algorithm::FixedWindow),
            limit(1 << 25, 1 << 25, Algorithm::SlidingWindow),
        ];
        let beyond = [
            burst((1 << 50) + 1, 1, 1),
            burst(1, (1 << 30) + 1, 1 << 20),
            limit(1, (1 << 50) + 1, Algorithm::FixedWindow),
            limit((1 << 25) + 1, 1 << 25, Algorithm::SlidingWindow),
            LimitConfig {
                requests: u64::MAX,
                per: Duration::MAX,
                burst: Some(u64::MAX),
                algorithm: Algorithm::TokenBucket,
            },
        ];
        for cfg in &at_limit {
            RedisStore::validate_limit(cfg).expect("within range");
        }
        for cfg in &beyond {
            assert!(RedisStore::validate_limit(cfg).is_err(), "{cfg:?}");
            let (d, err) = store.check_or_fail_mode("k", cfg, BASE).await;
            assert!(!d.allowed);
            assert_eq!(err.map(|e| e.kind()), Some("out_of_range"));
        }
        let ok = limit(1, MINUTE, Algorithm::FixedWindow);
        let err = store
            .check("k", &ok, MAX_NOW_MS + 1)
            .await
            .expect_err("now too late");
        assert_eq!(err.kind(), "out_of_range");
        // Unvalidated zeros are treated as 1, like the memory store does.
        let zero = LimitConfig {
            requests: 0,
            per: Duration::ZERO,
            burst: Some(0),
            algorithm: Algorithm::TokenBucket,
        };
        RedisStore::validate_limit(&zero).expect("zeros are in range");
    }

    #[test]
    fn fail_mode_decisions() {
        let cfg = limit(7, MINUTE, Algorithm::TokenBucket);
        assert_eq!(
            FailMode::Open.decision(&cfg),
            Decision {
                allowed: true,
                limit: 7,
                remaining: 7,
                reset_ms: 0,
                retry_after_ms: None
            }
        );
        assert_eq!(
            FailMode::Closed.decision(&cfg),
            Decision {
                allowed: false,
                limit: 7,
                remaining: 0,
                reset_ms: 1_000,
                retry_after_ms: Some(1_000)
            }
        );
    }

    #[test]
    fn config_serde_defaults_and_schema() {
        let cfg: RedisConfig =
            serde_json::from_value(serde_json::json!({"url": "redis://127.0.0.1:6379/0"}))
                .expect("parses");
        assert_eq!(cfg.fail, FailMode::Open);
        assert_eq!(cfg.timeout, Duration::from_millis(200));
        assert_eq!(cfg.prefix, "meshgate:rl:");
        cfg.validate().expect("valid");

        let cfg: RedisConfig = serde_json::from_value(serde_json::json!({
            "url": "redis://redis:6379/2", "fail": "closed", "timeout": "1s 500ms", "prefix": "p:"
        }))
        .expect("parses");
        assert_eq!(cfg.fail, FailMode::Closed);
        assert_eq!(cfg.timeout, Duration::from_millis(1_500));
        let back: RedisConfig =
            serde_json::from_value(serde_json::to_value(&cfg).expect("serializes"))
                .expect("round trip");
        assert_eq!(back, cfg);

        for bad in [
            serde_json::json!({"url": "redis://x", "fail": "Open"}),
            serde_json::json!({"url": "redis://x", "timeout": 200}),
            serde_json::json!({"url": "redis://x", "password": "x"}),
            serde_json::json!({"fail": "open"}),
        ] {
            assert!(
                serde_json::from_value::<RedisConfig>(bad.clone()).is_err(),
                "{bad}"
            );
        }

        let schema =
            serde_json::to_string(&schemars::schema_for!(RedisConfig)).expect("schema serializes");
        for word in [
            "\"url\"",
            "\"closed\"",
            "\"timeout\"",
            "\"prefix\"",
            "200ms",
        ] {
            assert!(schema.contains(word), "{word}: {schema}");
        }
    }

    #[tokio::test]
    async fn invalid_configs_are_refused() {
        let zero = RedisConfig {
            timeout: Duration::ZERO,
            ..config("redis://127.0.0.1/0".into(), FailMode::Open, "")
        };
        for cfg in [
            config("http://127.0.0.1/".into(), FailMode::Open, ""),
            config("not a url".into(), FailMode::Open, ""),
            zero,
        ] {
            let err = RedisStore::connect(&cfg).await.expect_err("invalid");
            assert_eq!(err.kind(), "invalid_config", "{err}");
            assert!(cfg.validate().is_err());
        }
    }

    #[tokio::test]
    async fn debug_never_shows_the_password() {
        let cases = [
            (
                "redis://user:s3cret@redis:6379/0",
                "redis://***@redis:6379/0",
            ),
            ("redis://:s3cret@redis", "redis://***@redis"),
            ("redis://:s3c/r@t@redis:6379/1", "redis://***@redis:6379/1"),
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "unix:///run/redis.sock?password=s3cret",
                "unix:///run/redis.sock?password=***",
            ),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact_url(url), redacted);
            let cfg = config(url.into(), FailMode::Open, "p:");
            let shown = format!("{cfg:?}");
            assert!(!shown.contains("s3c"), "{shown}");
            assert!(shown.contains(redacted), "{shown}");
            // (A password with a raw `/` does not parse as a URL.)
            if let Ok(store) = RedisStore::connect(&cfg).await {
                let shown = format!("{store:?}");
                assert!(
                    !shown.contains("s3c") && shown.contains(redacted),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn replies_are_checked() {
        let cfg = limit(5, MINUTE, Algorithm::FixedWindow);
        assert_eq!(
            decision(&cfg, &[1, 4, 10, -1]).expect("allowed"),
            Decision {
                allowed: true,
                limit: 5,
                remaining: 4,
                reset_ms: 10,
                retry_after_ms: None
            }
        );
        assert_eq!(
            decision(&cfg, &[0, 0, 10, 10])
                .expect("denied")
                .retry_after_ms,
            Some(10)
        );
        for bad in [
            &[1, 4, 10][..],
            &[2, 4, 10, -1],
            &[1, -4, 10, -1],
            &[1, 4, 10, 3],
            &[0, 0, 10, -1],
        ] {
            assert_eq!(decision(&cfg, bad).expect_err("bad").kind(), "bad_reply");
        }
    }

    #[test]
    fn unix_time_is_plausible() {
        // After 2024-01-01 and within the exact range.
        let now = unix_time_ms();
        assert!(now > 1_704_067_200_000 && now < MAX_NOW_MS, "{now}");
    }
}
