//! Endpoint choice for one upstream service: power of two choices over peak-EWMA latency, with
//! passive ejection of endpoints that fail repeatedly.
//!
//! This module owns the per-endpoint state (latency estimate, in-flight count, failure and
//! ejection bookkeeping) and the [`Balancer`] that picks among endpoints. It does no I/O and reads
//! no clock: every method that needs time takes `now`, and randomness comes from the caller, so
//! behaviour is reproducible in tests. The balancer is `Send + Sync` and meant to be shared.
//!
//! * **Cost** of an endpoint is `rtt_estimate * (pending + 1)`. The estimate is a peak EWMA: a
//!   sample above it replaces it at once; lower samples pull it down with weight
//!   `1 - exp(-elapsed / decay)`. When read for a pick, the estimate is also decayed toward zero
//!   by the time since its last sample (as Finagle and tower do), so an endpoint that had one slow
//!   response and then got no traffic is tried again eventually instead of being starved forever.
//! * **Ejection**: `failures_to_eject` consecutive failures eject an endpoint for
//!   `min(base_ejection * 2^k, max_ejection)`, `k` being how often it was ejected before. When the
//!   ejection expires it is eligible again; a success re-admits it and forgets its history.
//! * **Panic mode**: if every (non-excluded) endpoint is ejected, the balancer still picks among
//!   them: trying a probably-bad endpoint beats failing outright.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// Tuning for latency estimation and ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Consecutive failures that eject an endpoint (default 3). `0` disables ejection.
    pub failures_to_eject: u32,
    /// Length of a first ejection; doubled for each earlier ejection (default 5 s).
    pub base_ejection: Duration,
    /// Upper bound on an ejection's length (default 5 min).
    pub max_ejection: Duration,
    /// Time constant of the latency EWMA (default 10 s).
    pub decay: Duration,
    /// Latency assumed for an endpoint before its first sample (default 1 ms).
    pub default_rtt: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            failures_to_eject: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(5 * 60),
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(1),
        }
    }
}

/// Where an endpoint is: the destination agent's inbound address and, when discovery says, the
/// node that must answer there (`meshgate-node` meta in Consul, `node@ip:port` in static
/// discovery, an SRV target `NODE.node.…` in DNS). Without a node, any node the trust
/// bundle's hosting map allows for the service may answer — never any node at all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The agent's inbound address.
    pub addr: SocketAddr,
    /// The node that must answer there, if discovery pins it.
    pub node: Option<Arc<str>>,
}

impl Target {
    /// An endpoint pinned to `node`.
    pub fn pinned(addr: SocketAddr, node: &str) -> Self {
        Self {
            addr,
            node: Some(Arc::from(node)),
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, node: None }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.node {
            Some(n) => write!(f, "{n}@{}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// One upstream endpoint and what the balancer knows about it. Shared as `Arc<Endpoint>`; the
/// state survives [`Balancer::update`] as long as the target stays in the set.
#[derive(Debug)]
pub struct Endpoint {
    target: Target,
    addr: SocketAddr,
    cfg: BalanceConfig,
    pending: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Peak-EWMA latency estimate, in nanoseconds.
    rtt_ns: f64,
    /// When `rtt_ns` was last updated from a sample; `None` until the first one.
    updated_at: Option<Instant>,
    consecutive_failures: u32,
    times_ejected: u32,
    /// The current (or last) ejection: start and length. Stored this way so no `Instant`
    /// arithmetic can overflow, whatever the config says.
    ejection: Option<(Instant, Duration)>,
}

impl State {
    /// Time left in the current ejection at `now`, or `None` if not ejected.
    fn ejected_for(&self, now: Instant) -> Option<Duration> {
        let (at, len) = self.ejection?;
        let left = len.saturating_sub(now.saturating_duration_since(at));
        (!left.is_zero()).then_some(left)
    }
}

/// A snapshot of an endpoint, for the admin API and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointStatus {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// The node that must answer there, when discovery pins it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The latency estimate as of the last sample, in milliseconds.
    pub rtt_ewma_ms: f64,
    /// Requests in flight.
    pub pending: usize,
    /// Failures since the last success or ejection.
    pub consecutive_failures: u32,
    /// Whether the endpoint is ejected at the snapshot's `now`.
    pub ejected: bool,
    /// Time left in the ejection, in milliseconds (0 if not ejected).
    pub ejected_for_ms: u64,
    /// Ejections since the last success.
    pub times_ejected: u32,
}

/// Marks a request in flight on an endpoint; the endpoint's pending count drops when it is
/// dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    /// The endpoint this request is on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `exp(-elapsed / decay)`: how much of the old estimate survives `elapsed`.
fn weight(elapsed: Duration, decay: Duration) -> f64 {
    if decay.is_zero() {
        return 0.0;
    }
    (-elapsed.as_secs_f64() / decay.as_secs_f64()).exp()
}

/// `min(base * 2^times_before, max)`, saturating.
fn ejection_length(cfg: &BalanceConfig, times_before: u32) -> Duration {
    cfg.base_ejection
        .saturating_mul(2u32.saturating_pow(times_before))
        .min(cfg.max_ejection)
}

impl Endpoint {
    fn new(target: Target, cfg: BalanceConfig) -> Self {
        Endpoint {
            addr: target.addr,
            target,
            cfg,
            pending: AtomicUsize::new(0),
            state: Mutex::new(State {
                rtt_ns: cfg.default_rtt.as_secs_f64() * 1e9,
                updated_at: None,
                consecutive_failures: 0,
                times_ejected: 0,
                ejection: None,
            }),
        }
    }

    /// The state; a poisoned lock is still usable (every update leaves it consistent).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address and the node that must answer there.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Counts a request as in flight until the returned guard is dropped.
    #[must_use = "the request counts as in flight only while the guard lives"]
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Records a successful request that took `rtt`: clears failures and any ejection (and the
    /// ejection history), and updates the peak-EWMA estimate. The first sample replaces the
    /// configured default.
    pub fn record_success(&self, now: Instant, rtt: Duration) {
        let mut s = self.state();
        s.consecutive_failures = 0;
        s.times_ejected = 0;
        s.ejection = None;
        let sample = rtt.as_secs_f64() * 1e9;
        s.rtt_ns = match s.updated_at {
            Some(at) if sample <= s.rtt_ns => {
                let w = weight(now.saturating_duration_since(at), self.cfg.decay);
                s.rtt_ns * w + sample * (1.0 - w)
            }
            _ => sample,
        };
        // A clock that goes backwards must not make later elapsed times look longer.
        s.updated_at = Some(s.updated_at.map_or(now, |at| at.max(now)));
    }

    /// Records a failed request. After `failures_to_eject` consecutive failures the endpoint is
    /// ejected until `now + min(base_ejection * 2^k, max_ejection)` (`k`: earlier ejections).
    /// Failures reported while the endpoint is ejected (requests that were already in flight, or
    /// sent in panic mode) are ignored, so one burst does not escalate the ejection.
    pub fn record_failure(&self, now: Instant) {
        let mut s = self.state();
        if self.cfg.failures_to_eject == 0 || s.ejected_for(now).is_some() {
            return;
        }
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        if s.consecutive_failures >= self.cfg.failures_to_eject {
            s.ejection = Some((now, ejection_length(&self.cfg, s.times_ejected)));
            s.times_ejected = s.times_ejected.saturating_add(1);
            s.consecutive_failures = 0;
        }
    }

    /// Whether the endpoint is ejected at `now`.
    fn is_ejected(&self, now: Instant) -> bool {
        self.state().ejected_for(now).is_some()
    }

    /// `rtt_estimate * (pending + 1)`, the estimate decayed toward zero by the time since its
    /// last sample.
    fn cost(&self, now: Instant) -> f64 {
        let rtt = {
            let s = self.state();
            match s.updated_at {
                Some(at) => s.rtt_ns * weight(now.saturating_duration_since(at), self.cfg.decay),
                None => s.rtt_ns,
            }
        };
        let pending = self.pending.load(Ordering::Acquire);
        rtt * (pending as f64 + 1.0)
    }

    /// A snapshot of the endpoint at `now`.
    pub fn status(&self, now: Instant) -> EndpointStatus {
        let s = self.state();
        let left = s.ejected_for(now);
        EndpointStatus {
            addr: self.addr,
            node: self.target.node.as_deref().map(str::to_owned),
            rtt_ewma_ms: s.rtt_ns / 1e6,
            pending: self.pending.load(Ordering::Acquire),
            consecutive_failures: s.consecutive_failures,
            ejected: left.is_some(),
            ejected_for_ms: left.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            times_ejected: s.times_ejected,
        }
    }
}

/// The endpoints of one upstream service and the choice among them.
#[derive(Debug)]
pub struct Balancer {
    cfg: BalanceConfig,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
}

impl Balancer {
    /// A balancer over `addrs` (duplicates dropped, order kept).
    pub fn new<T: Into<Target>>(addrs: Vec<T>, cfg: BalanceConfig) -> Self {
        let b = Balancer {
            cfg,
            endpoints: RwLock::new(Vec::new()),
        };
        b.update(addrs);
        b
    }

    /// Replaces the endpoint set with `addrs` (duplicates dropped, order kept). Targets already
    /// present keep their state (the same `Arc<Endpoint>`); new ones start fresh. An address
    /// that is now pinned to another node is a new endpoint.
    pub fn update<T: Into<Target>>(&self, addrs: Vec<T>) {
        let mut eps = self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut old: HashMap<Target, Arc<Endpoint>> =
            eps.drain(..).map(|e| (e.target.clone(), e)).collect();
        let mut seen = HashSet::with_capacity(addrs.len());
        for t in addrs {
            let t: Target = t.into();
            if seen.insert(t.clone()) {
                let ep = old
                    .remove(&t)
                    .unwrap_or_else(|| Arc::new(Endpoint::new(t, self.cfg)));
                eps.push(ep);
            }
        }
    }

    /// The current endpoints, in order.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Picks an endpoint for a request at `now`, skipping `exclude` (e.g. endpoints already tried
    /// for this request). Candidates are the endpoints not excluded and not ejected; if there are
    /// none, the excluded-free ejected ones (panic mode). With two or more candidates, two
    /// distinct ones are drawn with `rand` and the cheaper wins (the first drawn on a tie).
    /// `None` only when every endpoint is excluded (or there are none).
    pub fn pick(
        &self,
        now: Instant,
        exclude: &[SocketAddr],
        rand: &mut dyn FnMut() -> u64,
    ) -> Option<Arc<Endpoint>> {
        let eps = self
            .endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let allowed = |e: &&Arc<Endpoint>| !exclude.contains(&e.addr);
        let mut cands: Vec<&Arc<Endpoint>> = eps
            .iter()
            .filter(allowed)
            .filter(|e| !e.is_ejected(now))
            .collect();
        if cands.is_empty() {
            cands = eps.iter().filter(allowed).collect();
        }
        let chosen = match cands.len() {
            0 => return None,
            1 => cands[0],
            n => {
                // Both results are below `n`, so the casts back to usize are lossless.
                let i = (rand() % n as u64) as usize;
                let mut j = (rand() % (n as u64 - 1)) as usize;
                if j >= i {
                    j += 1;
                }
                let (a, b) = (cands[i], cands[j]);
                if b.cost(now) < a.cost(now) { b } else { a }
            }
        };
        Some(Arc::clone(chosen))
    }

    /// Snapshots of all endpoints at `now`, in order.
    pub fn statuses(&self, now: Instant) -> Vec<EndpointStatus> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|e| e.status(now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// xorshift64: deterministic, good enough to spread picks.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Picks `n` times at `now` and counts picks per port, in endpoint order.
    fn count_picks(b: &Balancer, now: Instant, exclude: &[SocketAddr], n: usize) -> Vec<usize> {
        let eps = b.endpoints();
        let mut counts = vec![0; eps.len()];
        let mut r = rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..n {
            if let Some(e) = b.pick(now, exclude, &mut r) {
                let i = eps
                    .iter()
                    .position(|x| Arc::ptr_eq(x, &e))
                    .expect("invariant: picked endpoint is in the set");
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Balancer>();
        check::<Endpoint>();
        check::<InFlight>();
    }

    #[test]
    fn default_config() {
        let c = BalanceConfig::default();
        assert_eq!(
            (
                c.failures_to_eject,
                c.base_ejection,
                c.max_ejection,
                c.decay,
                c.default_rtt
            ),
            (
                3,
                Duration::from_secs(5),
                Duration::from_secs(300),
                Duration::from_secs(10),
                ms(1)
            )
        );
    }

    #[test]
    fn p2c_prefers_low_cost() {
        // (per-endpoint rtt sample, per-endpoint requests in flight, minimum share of picks per
        // endpoint in percent, maximum share in percent)
        type Case = (
            &'static [u64],
            &'static [usize],
            &'static [usize],
            &'static [usize],
        );
        let cases: &[Case] = &[
            // Two endpoints: the faster one wins every draw.
            (&[1, 50], &[0, 0], &[100, 0], &[100, 0]),
            // Three: the fastest wins every draw it is in (2/3), the slowest none.
            (&[1, 10, 100], &[0, 0, 0], &[60, 25, 0], &[73, 40, 0]),
            // Equal latency: pending load shifts picks away.
            (&[1, 1], &[3, 0], &[0, 100], &[0, 100]),
            // Load outweighs latency: 1ms * 4 > 2ms * 1.
            (&[1, 2], &[3, 0], &[0, 100], &[0, 100]),
            // ...but not a large latency gap: 1ms * 4 < 10ms * 1.
            (&[1, 10], &[3, 0], &[100, 0], &[100, 0]),
        ];
        let t0 = Instant::now();
        for (i, &(rtts, pending, min, max)) in cases.iter().enumerate() {
            let b = Balancer::new(
                (0..rtts.len() as u16).map(addr).collect(),
                BalanceConfig::default(),
            );
            let mut guards = Vec::new();
            for ((e, &rtt), &p) in b.endpoints().iter().zip(rtts).zip(pending) {
                e.record_success(t0, ms(rtt));
                guards.extend((0..p).map(|_| e.start()));
            }
            let counts = count_picks(&b, t0, &[], 3000);
            for (k, &c) in counts.iter().enumerate() {
                let pct = c * 100 / 3000;
                assert!(
                    (min[k]..=max[k]).contains(&pct),
                    "case {i}: endpoint {k} got {pct}% ({counts:?})"
                );
            }
        }
    }

    #[test]
    fn in_flight_guard_counts() {
        let t0 = Instant::now();
        let b = Balancer::new(vec![addr(1)], BalanceConfig::default());
        let e = b.pick(t0, &[], &mut rng(1)).expect("one endpoint");
        let g1 = e.start();
        let g2 = e.start();
        assert!(Arc::ptr_eq(g1.endpoint(), &e));
        assert_eq!(e.status(t0).pending, 2);
        drop(g1);
        assert_eq!(e.status(t0).pending, 1);
        drop(g2);
        assert_eq!(e.status(t0).pending, 0);
    }

    #[derive(Debug, Clone, Copy)]
    enum Ev {
        Fail,
        Ok,
        /// No event: only look at the status.
        Look,
    }

    #[test]
    fn ejection_schedule() {
        use Ev::{Fail, Look, Ok};
        // (time in ms, event, expected: ejected_for_ms, times_ejected, consecutive_failures)
        let steps: &[(u64, Ev, u64, u32, u32)] = &[
            (0, Fail, 0, 0, 1),
            (0, Fail, 0, 0, 2),
            (0, Fail, 5_000, 1, 0), // third consecutive failure: ejected for base
            (1, Fail, 4_999, 1, 0), // failures while ejected are ignored
            (4_999, Look, 1, 1, 0),
            (5_000, Look, 0, 1, 0), // expired at now + base: eligible again
            (5_000, Fail, 0, 1, 1),
            (5_000, Fail, 0, 1, 2),
            (5_000, Fail, 10_000, 2, 0), // second ejection doubles
            (15_000, Fail, 0, 2, 1),
            (15_000, Fail, 0, 2, 2),
            (15_000, Fail, 20_000, 3, 0),
            (35_000, Ok, 0, 0, 0), // success resets the history
            (35_000, Fail, 0, 0, 1),
            (35_000, Ok, 0, 0, 0), // and breaks a run of failures
            (35_000, Fail, 0, 0, 1),
            (35_000, Fail, 0, 0, 2),
            (35_000, Fail, 5_000, 1, 0), // back to base
            (36_000, Ok, 0, 0, 0),       // success while ejected re-admits at once
        ];
        let t0 = Instant::now();
        let b = Balancer::new(vec![addr(1)], BalanceConfig::default());
        let e = &b.endpoints()[0];
        for (i, &(at, ev, for_ms, times, consecutive)) in steps.iter().enumerate() {
            let now = t0 + ms(at);
            match ev {
                Fail => e.record_failure(now),
                Ok => e.record_success(now, ms(1)),
                Look => {}
            }
            let s = e.status(now);
            assert_eq!(
                (
                    s.ejected,
                    s.ejected_for_ms,
                    s.times_ejected,
                    s.consecutive_failures
                ),
                (for_ms > 0, for_ms, times, consecutive),
                "step {i}: {ev:?} at {at}ms"
            );
        }
    }

    #[test]
    fn ejection_lengths_are_capped() {
        // (times ejected before, expected length in seconds)
        let cases: &[(u32, u64)] = &[
            (0, 5),
            (1, 10),
            (2, 20),
            (5, 160),
            (6, 300),
            (7, 300),
            (31, 300),
            (32, 300),
            (u32::MAX, 300),
        ];
        let cfg = BalanceConfig::default();
        for &(before, secs) in cases {
            assert_eq!(
                ejection_length(&cfg, before),
                Duration::from_secs(secs),
                "{before}"
            );
        }

        // Through the endpoint: eight ejections in a row, each after the previous expired.
        let t0 = Instant::now();
        let e = Endpoint::new(addr(1).into(), cfg);
        let mut now = t0;
        let mut lengths = Vec::new();
        for _ in 0..8 {
            for _ in 0..3 {
                e.record_failure(now);
            }
            let left = e.status(now).ejected_for_ms;
            lengths.push(left / 1000);
            now += ms(left);
        }
        assert_eq!(lengths, [5, 10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn zero_failures_to_eject_disables_ejection() {
        let t0 = Instant::now();
        let cfg = BalanceConfig {
            failures_to_eject: 0,
            ..BalanceConfig::default()
        };
        let e = Endpoint::new(addr(1).into(), cfg);
        for _ in 0..10 {
            e.record_failure(t0);
        }
        let s = e.status(t0);
        assert_eq!((s.ejected, s.times_ejected), (false, 0));
    }

    #[test]
    fn pick_candidates() {
        // (ejected endpoints, excluded endpoints, time in s after the ejections, endpoints that
        // may be picked)
        type Case = (&'static [u16], &'static [u16], u64, &'static [u16]);
        let cases: &[Case] = &[
            (&[], &[], 0, &[0, 1, 2]),
            (&[0], &[], 0, &[1, 2]), // ejected not picked while others exist
            (&[0], &[], 5, &[0, 1, 2]), // ...until the ejection expires
            (&[0, 1], &[], 0, &[2]),
            (&[0, 1, 2], &[], 0, &[0, 1, 2]), // all ejected: panic mode
            (&[], &[1], 0, &[0, 2]),          // exclude
            (&[], &[0, 1], 0, &[2]),
            (&[0], &[1, 2], 0, &[0]), // only an ejected one left: still tried
            (&[0, 1, 2], &[2], 0, &[0, 1]),
            (&[], &[0, 1, 2], 0, &[]), // everything excluded: None
        ];
        let t0 = Instant::now();
        for (i, &(ejected, excluded, after, allowed)) in cases.iter().enumerate() {
            let b = Balancer::new(vec![addr(0), addr(1), addr(2)], BalanceConfig::default());
            for e in b.endpoints() {
                e.record_success(t0, ms(1));
                if ejected.contains(&e.addr().port()) {
                    for _ in 0..3 {
                        e.record_failure(t0);
                    }
                }
            }
            let exclude: Vec<SocketAddr> = excluded.iter().copied().map(addr).collect();
            // Same time for all samples, so decay does not change the ranking.
            let counts = count_picks(&b, t0 + Duration::from_secs(after), &exclude, 600);
            let picked: Vec<u16> = (0..3u16).filter(|&p| counts[p as usize] > 0).collect();
            assert_eq!(picked, allowed, "case {i}: {counts:?}");
            if allowed.is_empty() {
                assert!(b.pick(t0, &exclude, &mut rng(7)).is_none(), "case {i}");
            }
        }
        let empty = Balancer::new(Vec::<SocketAddr>::new(), BalanceConfig::default());
        assert!(empty.pick(t0, &[], &mut rng(7)).is_none());
    }

    #[test]
    fn update_keeps_state() {
        let t0 = Instant::now();
        let b = Balancer::new(vec![addr(1), addr(2), addr(1)], BalanceConfig::default());
        let before = b.endpoints();
        assert_eq!(
            before.iter().map(|e| e.addr()).collect::<Vec<_>>(),
            [addr(1), addr(2)]
        );
        before[0].record_failure(t0);
        before[0].record_success(t0, ms(7));
        before[1].record_failure(t0);

        b.update(vec![addr(3), addr(2), addr(3), addr(1)]);
        let after = b.endpoints();
        assert_eq!(
            after.iter().map(|e| e.addr()).collect::<Vec<_>>(),
            [addr(3), addr(2), addr(1)]
        );
        assert!(Arc::ptr_eq(&after[1], &before[1]));
        assert!(Arc::ptr_eq(&after[2], &before[0]));
        assert_eq!(after[1].status(t0).consecutive_failures, 1);
        assert_eq!(after[2].status(t0).rtt_ewma_ms, 7.0);
        assert_eq!(after[0].status(t0).rtt_ewma_ms, 1.0); // new: default_rtt

        // A removed and re-added address starts fresh.
        b.update(vec![addr(3)]);
        b.update(vec![addr(3), addr(2)]);
        let again = b.endpoints();
        assert!(!Arc::ptr_eq(&again[1], &before[1]));
        assert_eq!(again[1].status(t0).consecutive_failures, 0);
    }

    #[test]
    fn peak_ewma() {
        // (time in s, sample in ms, expected estimate in ms); decay is 10 s.
        let e1 = (-1.0f64).exp();
        let steps: &[(u64, u64, f64)] = &[
            (0, 5, 5.0),     // first sample replaces the 1ms default
            (0, 100, 100.0), // a slow sample raises the estimate at once
            (0, 1, 100.0),   // no time has passed: a fast sample has no weight yet
            (10, 1, 100.0 * e1 + (1.0 - e1)),
            (20, 1, (100.0 * e1 + (1.0 - e1)) * e1 + (1.0 - e1)),
            (20, 50, 50.0), // peak again
            (80, 1, 50.0 * (-6.0f64).exp() + (1.0 - (-6.0f64).exp())),
        ];
        let t0 = Instant::now();
        let e = Endpoint::new(addr(1).into(), BalanceConfig::default());
        assert_eq!(e.status(t0).rtt_ewma_ms, 1.0);
        let mut last = f64::INFINITY;
        for (i, &(at, sample, want)) in steps.iter().enumerate() {
            e.record_success(t0 + Duration::from_secs(at), ms(sample));
            let got = e.status(t0).rtt_ewma_ms;
            assert!(
                (got - want).abs() < 1e-6,
                "step {i}: got {got}, want {want}"
            );
            if i >= 3 && sample == 1 {
                assert!(
                    got < last && got > 1.0,
                    "step {i}: fast samples decay gradually"
                );
            }
            last = got;
        }
    }

    #[test]
    fn idle_slow_endpoint_is_retried() {
        let t0 = Instant::now();
        let b = Balancer::new(vec![addr(0), addr(1)], BalanceConfig::default());
        let eps = b.endpoints();
        eps[0].record_success(t0, ms(1));
        eps[1].record_success(t0, ms(100));
        assert_eq!(count_picks(&b, t0, &[], 100), [100, 0]);
        // Endpoint 0 keeps answering in 1ms; endpoint 1's old sample decays toward zero.
        let later = t0 + Duration::from_secs(60);
        eps[0].record_success(later, ms(1));
        assert_eq!(count_picks(&b, later, &[], 100), [0, 100]);
    }

    #[test]
    fn status_serializes() {
        let t0 = Instant::now();
        let b = Balancer::new(vec![addr(8080)], BalanceConfig::default());
        for _ in 0..3 {
            b.endpoints()[0].record_failure(t0);
        }
        let v = serde_json::to_value(b.statuses(t0 + ms(1500))).expect("serializes");
        assert_eq!(
            v,
            serde_json::json!([{
                "addr": "10.0.0.1:8080",
                "rtt_ewma_ms": 1.0,
                "pending": 0,
                "consecutive_failures": 0,
                "ejected": true,
                "ejected_for_ms": 3500,
                "times_ejected": 1,
            }])
        );
    }
}
