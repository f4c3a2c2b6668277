//! The JSON access log: one line per HTTP request (both modes) and per L4 tunnel stream (agents).
//!
//! The request path only moves a plain record into a bounded channel ([`AccessLog::send`], no
//! formatting, no I/O); a dedicated writer thread drains the queue every 50 ms (requests never
//! wake it) and turns records into JSON lines through a buffered writer. When the queue is full
//! the record is dropped and `meshgate_access_log_dropped_total` counts it: the log never slows
//! a request.
//!
//! What a line may carry is fixed here, so no secret can reach it: no header values, no query
//! string unless `include_query` is set, no token, key or cookie.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// Records waiting for the writer; beyond this they are dropped (and counted).
const QUEUE: usize = 8192;

/// `telemetry.access_log`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write access records. Default: on for the gateway, off for node agents.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Where: `-` for stdout (the default) or a file path (appended to, created 0640).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Log the query string with the path. Default false: queries often carry tokens or
    /// personal data.
    #[serde(default)]
    pub include_query: bool,
}

/// Which process kind's default applies when `enabled` is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The gateway: on by default.
    Gateway,
    /// A node agent: off by default.
    Agent,
}

/// Starting the access log failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The log file cannot be opened.
    #[error(
        "telemetry.access_log.path {path}: {source}; check that the directory exists and is writable"
    )]
    Open {
        /// The configured path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the access log writer: {0}")]
    Thread(std::io::Error),
}

/// One HTTP request, as the pipeline saw it.
#[derive(Debug)]
pub struct HttpRecord {
    /// When the request head arrived.
    pub at: SystemTime,
    /// The request id.
    pub request_id: String,
    /// The request's `traceparent` after this hop (trace id and span id are read from it).
    pub traceparent: Option<String>,
    /// The matched route (`-` when none matched).
    pub route: Arc<str>,
    /// The authenticated consumer (API key consumer or JWT subject).
    pub consumer: Option<String>,
    /// The method.
    pub method: http::Method,
    /// `Host` / `:authority`.
    pub authority: String,
    /// The normalized path (with `?query` only when `include_query`).
    pub path: String,
    /// The status sent to the client.
    pub status: u16,
    /// Head arrival to the end of the response body.
    pub duration: Duration,
    /// Where the request went (`service` or an external host).
    pub upstream: Option<Arc<str>>,
    /// The endpoint that answered.
    pub endpoint: Option<SocketAddr>,
    /// The status the upstream answered with (none when meshgate answered itself).
    pub upstream_status: Option<u16>,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The client address (after trusted `X-Forwarded-For`).
    pub client_ip: IpAddr,
    /// The verified SPIFFE ID of a mesh peer.
    pub peer_identity: Option<Arc<str>>,
    /// Why meshgate answered itself (the problem type), if it did.
    pub reason: Option<&'static str>,
}

/// One L4 tunnel stream, as the inbound agent spliced it.
#[derive(Debug)]
pub struct TcpRecord {
    /// When the stream was admitted.
    pub at: SystemTime,
    /// The source's SPIFFE ID.
    pub src_identity: Arc<str>,
    /// The destination service.
    pub dst_service: String,
    /// The destination's SPIFFE ID.
    pub dst_identity: String,
    /// Bytes towards the service.
    pub bytes_sent: u64,
    /// Bytes back from the service.
    pub bytes_received: u64,
    /// How long the stream lasted.
    pub duration: Duration,
    /// How it ended: `closed` (both sides finished) or `error`.
    pub close: &'static str,
}

/// A record for the writer. The HTTP record stays inline (the channel's slots hold it: no
/// allocation per request); the rarer L4 record is boxed.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Record {
    /// An HTTP request.
    Http(HttpRecord),
    /// An L4 stream.
    Tcp(Box<TcpRecord>),
}

/// The sending half of the access log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<Record>,
    dropped: Counter,
    include_query: bool,
}

impl AccessLog {
    /// Starts the writer for `cfg` when the log is on for `mode`; `dropped` counts records the
    /// full queue refused. `None` when the log is off.
    pub fn start(
        cfg: &AccessLogConfig,
        mode: Mode,
        dropped: Counter,
    ) -> Result<Option<Self>, AccessLogError> {
        if !cfg.enabled.unwrap_or(mode == Mode::Gateway) {
            return Ok(None);
        }
        let out: Box<dyn Write + Send> = match &cfg.path {
            None => Box::new(std::io::stdout()),
            Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdout()),
            Some(p) => {
                let mut o = std::fs::OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o640);
                Box::new(o.open(p).map_err(|source| AccessLogError::Open {
                    path: p.clone(),
                    source,
                })?)
            }
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out))
            .map_err(AccessLogError::Thread)?;
        Ok(Some(Self {
            tx,
            dropped,
            include_query: cfg.include_query,
        }))
    }

    /// Whether paths are logged with their query.
    pub fn include_query(&self) -> bool {
        self.include_query
    }

    /// Queues a record; never blocks (a full queue drops it and counts the drop).
    pub fn send(&self, r: Record) {
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// A response body that sends its request's record when it ends (or is dropped): the
/// duration then covers the whole response and `bytes_out` counts what was sent.
#[derive(Debug)]
pub struct LoggedBody<B> {
    inner: B,
    log: AccessLog,
    rec: Option<HttpRecord>,
    started: std::time::Instant,
    body_in: Option<Arc<crate::http::body::BodyState>>,
}

impl<B> LoggedBody<B> {
    /// Wraps `inner`; `started` is when the request head arrived, `body_in` the request body's
    /// byte counter (when it had a body).
    pub fn new(
        inner: B,
        log: AccessLog,
        rec: HttpRecord,
        started: std::time::Instant,
        body_in: Option<Arc<crate::http::body::BodyState>>,
    ) -> Self {
        Self {
            inner,
            log,
            rec: Some(rec),
            started,
            body_in,
        }
    }

    fn finish(&mut self) {
        if let Some(mut r) = self.rec.take() {
            r.duration = self.started.elapsed();
            if let Some(b) = &self.body_in {
                r.bytes_in = b.received();
            }
            self.log.send(Record::Http(r));
        }
    }
}

impl<B> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> http_body::Body for LoggedBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(r)) = (f.data_ref(), this.rec.as_mut()) {
                    r.bytes_out += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            std::task::Poll::Ready(_) => this.finish(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How often the writer wakes to drain the queue. Requests only push onto the queue and never
/// wake the writer (a blocked receiver would cost a futex wake and a context switch per
/// request); a line reaches the file within this long.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

fn writer(rx: Receiver<Record>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(512);
    let mut failed = false;
    loop {
        let mut wrote = false;
        let ended = loop {
            match rx.try_recv() {
                Ok(r) => {
                    line.clear();
                    encode(&r, &mut line);
                    if let Err(e) = out.write_all(&line)
                        && !failed
                    {
                        failed = true;
                        tracing::warn!(error = %e, "cannot write the access log; records are lost until it works again");
                    }
                    wrote = true;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break false,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break true,
            }
        };
        if wrote && out.flush().is_ok() {
            failed = false;
        }
        if ended {
            break;
        }
        std::thread::sleep(DRAIN_EVERY);
    }
    let _ = out.flush();
}

#[derive(Serialize)]
struct HttpLine<'a> {
    ts: Ts,
    kind: &'static str,
    request_id: &'a str,
    trace_id: Option<&'a str>,
    span_id: Option<&'a str>,
    route: &'a str,
    consumer: Option<&'a str>,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    status: u16,
    duration_ms: f64,
    upstream: Option<&'a str>,
    endpoint: Option<SocketAddr>,
    upstream_status: Option<u16>,
    bytes_in: u64,
    bytes_out: u64,
    client_ip: IpAddr,
    peer_identity: Option<&'a str>,
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct TcpLine<'a> {
    ts: Ts,
    kind: &'static str,
    src_identity: &'a str,
    dst_service: &'a str,
    dst_identity: &'a str,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: f64,
    close: &'a str,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// The trace id and span id of a `traceparent` (`00-<32>-<16>-<2>`).
fn trace_ids(tp: Option<&str>) -> (Option<&str>, Option<&str>) {
    match tp {
        Some(t) if t.len() >= 55 && t.is_char_boundary(3) && t.is_ascii() => {
            (Some(&t[3..35]), Some(&t[36..52]))
        }
        _ => (None, None),
    }
}

fn encode(r: &Record, out: &mut Vec<u8>) {
    let res = match r {
        Record::Http(h) => {
            let (trace_id, span_id) = trace_ids(h.traceparent.as_deref());
            serde_json::to_writer(
                &mut *out,
                &HttpLine {
                    ts: Ts(h.at),
                    kind: "http",
                    request_id: &h.request_id,
                    trace_id,
                    span_id,
                    route: &h.route,
                    consumer: h.consumer.as_deref(),
                    method: h.method.as_str(),
                    authority: &h.authority,
                    path: &h.path,
                    status: h.status,
                    duration_ms: ms(h.duration),
                    upstream: h.upstream.as_deref(),
                    endpoint: h.endpoint,
                    upstream_status: h.upstream_status,
                    bytes_in: h.bytes_in,
                    bytes_out: h.bytes_out,
                    client_ip: h.client_ip,
                    peer_identity: h.peer_identity.as_deref(),
                    reason: h.reason,
                },
            )
        }
        Record::Tcp(t) => serde_json::to_writer(
            &mut *out,
            &TcpLine {
                ts: Ts(t.at),
                kind: "tcp",
                src_identity: &t.src_identity,
                dst_service: &t.dst_service,
                dst_identity: &t.dst_identity,
                bytes_sent: t.bytes_sent,
                bytes_received: t.bytes_received,
                duration_ms: ms(t.duration),
                close: t.close,
            },
        ),
    };
    if res.is_ok() {
        out.push(b'\n');
    } else {
        out.clear();
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-12-01T12:00:00.123Z`.
struct Ts(SystemTime);

impl Serialize for Ts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}", TsDisplay(self.0)))
    }
}

struct TsDisplay(SystemTime);

impl std::fmt::Display for TsDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, day) = civil(i64::try_from(days).unwrap_or(0));
        write!(
            f,
            "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's civil_from_days).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_590_400_123);
        assert_eq!(TsDisplay(t).to_string(), "2025-12-01T12:00:00.123Z");
        assert_eq!(
            TsDisplay(UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(TsDisplay(leap).to_string(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_line_carries_the_fields_and_trace_ids() {
        let r = Record::Http(HttpRecord {
            at: UNIX_EPOCH,
            request_id: "r1".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            route: Arc::from("users"),
            consumer: Some("acme".into()),
            method: http::Method::POST,
            authority: "api.example".into(),
            path: "/users/1".into(),
            status: 201,
            duration: Duration::from_micros(1500),
            upstream: Some(Arc::from("users")),
            endpoint: None,
            upstream_status: Some(201),
            bytes_in: 3,
            bytes_out: 7,
            client_ip: IpAddr::from([192, 0, 2, 1]),
            peer_identity: None,
            reason: None,
        });
        let mut out = Vec::new();
        encode(&r, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(v["span_id"], "b7ad6b7169203331");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["method"], "POST");
        assert_eq!(v["status"], 201);
        assert_eq!(v["consumer"], "acme");
        assert_eq!(v["kind"], "http");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, rx) = sync_channel(1);
        let log = AccessLog {
            tx,
            dropped: Counter::default(),
            include_query: false,
        };
        let tcp = || {
            Record::Tcp(Box::new(TcpRecord {
                at: UNIX_EPOCH,
                src_identity: Arc::from("a"),
                dst_service: "b".into(),
                dst_identity: "c".into(),
                bytes_sent: 0,
                bytes_received: 0,
                duration: Duration::ZERO,
                close: "closed",
            }))
        };
        log.send(tcp());
        log.send(tcp());
        assert_eq!(log.dropped.get(), 1);
        drop(rx);
    }
}
