//! Streaming bodies. Request bodies pass through [`Guarded`], which enforces the size limit while
//! streaming (the upstream never sees a byte past it) and a minimum rate (no frame within the
//! idle timeout ends the body), and records why it stopped so the pipeline can answer 413 or 408.
//! [`ReplayBody`] keeps a capped copy of what was sent so a failed attempt can be retried
//! (linkerd's ReplayBody idea); [`ResponseBody`] bounds how long a response body may stall,
//! keeps per-request guards alive until the body ends, and closes gRPC calls at their deadline.
//!
//! Nothing here buffers more than its cap.

use std::{
    any::Any,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::{Body, BoxError};

/// Why a request body stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// It crossed the size limit.
    TooLarge,
    /// Nothing arrived within the idle timeout.
    Stalled,
    /// The client's stream failed (reset, connection closed).
    Client,
}

/// Where a [`Guarded`] body records its fault; the pipeline reads it when the upstream exchange
/// fails (and the access log its byte count).
#[derive(Debug, Default)]
pub struct BodyState(AtomicU8, std::sync::atomic::AtomicU64);

impl BodyState {
    fn set(&self, f: BodyFault) {
        let v = match f {
            BodyFault::TooLarge => 1,
            BodyFault::Stalled => 2,
            BodyFault::Client => 3,
        };
        let _ = self
            .0
            .compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Body bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }

    /// The first fault seen, if any.
    pub fn fault(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(BodyFault::TooLarge),
            2 => Some(BodyFault::Stalled),
            3 => Some(BodyFault::Client),
            _ => None,
        }
    }
}

/// The error a guarded body ends with.
#[derive(Debug, thiserror::Error)]
#[error("request body {0:?}")]
pub struct BodyError(pub BodyFault);

pin_project! {
    /// A request body with a size limit and an idle timeout, enforced while it streams.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        limit: u64,
        seen: u64,
        idle: Duration,
        armed: bool,
        #[pin]
        sleep: Option<Sleep>,
        state: Arc<BodyState>,
    }
}

impl<B> Guarded<B> {
    /// `inner` limited to `limit` bytes, ending with an error when no frame arrives for `idle`.
    pub fn new(inner: B, limit: u64, idle: Duration, state: Arc<BodyState>) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            idle,
            armed: false,
            sleep: None,
            state,
        }
    }
}

/// Polls `body` for its next frame, passing over empty DATA frames. They carry nothing, and
/// forwarded, each counts against the peer's lifetime limit of empty non-final DATA frames per
/// connection (h2 closes the whole connection past 100). Every body meshgate relays goes
/// through here.
pub(crate) fn poll_skipping_empty<B>(
    mut body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: HttpBody<Data = Bytes> + ?Sized,
{
    loop {
        match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(Bytes::is_empty) => {}
            other => return other,
        }
    }
}

impl<B> HttpBody for Guarded<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match poll_skipping_empty(this.inner.as_mut(), cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.armed = false;
                if let Some(d) = frame.data_ref() {
                    *this.seen += d.len() as u64;
                    this.state.1.store(*this.seen, Ordering::Relaxed);
                    if *this.seen > *this.limit {
                        this.state.set(BodyFault::TooLarge);
                        return Poll::Ready(Some(Err(BodyError(BodyFault::TooLarge).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.set(BodyFault::Client);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = Instant::now() + *this.idle;
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep_until(deadline)));
                    *this.armed = true;
                } else if !*this.armed {
                    if let Some(s) = this.sleep.as_mut().as_pin_mut() {
                        s.reset(deadline);
                    }
                    *this.armed = true;
                }
                if let Some(s) = this.sleep.as_pin_mut()
                    && s.poll(cx).is_ready()
                {
                    this.state.set(BodyFault::Stalled);
                    return Poll::Ready(Some(Err(BodyError(BodyFault::Stalled).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug)]
struct ReplayState {
    source: Option<Body>,
    chunks: Vec<Bytes>,
    buffered: usize,
    cap: usize,
    overflowed: bool,
    done: bool,
    trailers: Option<HeaderMap>,
    readers: u32,
}

/// A request body that keeps a copy of what it sent, up to a cap, so another attempt can send
/// it again. One reader at a time: a retry takes a new reader with [`ReplayBody::replay`]
/// after the failed attempt dropped its own.
#[derive(Debug)]
pub struct ReplayBody {
    state: Arc<Mutex<ReplayState>>,
    pos: usize,
    hint: SizeHint,
}

impl ReplayBody {
    /// Wraps `body`, keeping up to `cap` bytes for replays.
    pub fn new(body: Body, cap: usize) -> Self {
        let hint = body.size_hint();
        let done = body.is_end_stream();
        Self {
            state: Arc::new(Mutex::new(ReplayState {
                source: Some(body),
                chunks: Vec::new(),
                buffered: 0,
                cap,
                overflowed: false,
                done,
                trailers: None,
                readers: 1,
            })),
            pos: 0,
            hint,
        }
    }

    /// A new reader that sends the body again from the start, or `None` when more than the cap
    /// was already sent (the body can no longer be reproduced).
    pub fn replay(&self) -> Option<ReplayBody> {
        let mut s = self
            .state
            .lock()
            .expect("invariant: replay lock not poisoned");
        if s.overflowed {
            return None;
        }
        s.readers += 1;
        Some(ReplayBody {
            state: self.state.clone(),
            pos: 0,
            hint: self.hint,
        })
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.readers = s.readers.saturating_sub(1);
        }
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this
            .state
            .lock()
            .expect("invariant: replay lock not poisoned");
        if this.pos < s.chunks.len() {
            let c = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if s.done {
            if this.pos != usize::MAX {
                // this reader has sent every chunk: the trailers (once), then the end
                this.pos = usize::MAX;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(poll_skipping_empty(Pin::new(&mut *source), cx));
        let ended = source.is_end_stream();
        match frame {
            None => {
                s.done = true;
                s.source = None;
                this.pos = usize::MAX;
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if !s.overflowed && s.buffered + data.len() <= s.cap {
                        s.buffered += data.len();
                        s.chunks.push(data.clone());
                        this.pos = s.chunks.len();
                    } else if !s.overflowed {
                        s.overflowed = true;
                        s.chunks = Vec::new();
                        s.buffered = 0;
                        this.pos = 0;
                    }
                    if ended {
                        // so the last chunk goes out with END_STREAM, not followed by an empty
                        // frame
                        s.done = true;
                        s.source = None;
                        this.pos = s.chunks.len();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    if let Some(t) = frame.trailers_ref() {
                        s.trailers = Some(t.clone());
                    }
                    s.done = true;
                    s.source = None;
                    this.pos = usize::MAX;
                    Poll::Ready(Some(Ok(frame)))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self
            .state
            .lock()
            .expect("invariant: replay lock not poisoned");
        s.done && (self.pos == usize::MAX || (self.pos >= s.chunks.len() && s.trailers.is_none()))
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// Something to keep alive until a response body ends (an in-flight count, a drain guard).
pub type Guard = Box<dyn Any + Send + Sync>;

pin_project! {
    /// A response body that errors when it stalls for longer than `idle`, holds `guards` until
    /// it ends, and (for gRPC) ends with `grpc-status: 4` trailers at `deadline`.
    pub struct ResponseBody {
        #[pin]
        inner: Body,
        idle: Option<Duration>,
        #[pin]
        sleep: Option<Sleep>,
        armed: bool,
        grpc_deadline: Option<Instant>,
        #[pin]
        deadline: Option<Sleep>,
        finished: bool,
        guards: Vec<Guard>,
    }
}

impl ResponseBody {
    /// `inner` with no timeouts and no guards yet.
    pub fn new(inner: Body) -> Self {
        Self {
            inner,
            idle: None,
            sleep: None,
            armed: false,
            grpc_deadline: None,
            deadline: None,
            finished: false,
            guards: Vec::new(),
        }
    }

    /// Ends the body with an error when no frame arrives for `idle`.
    pub fn idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.idle = idle;
        self
    }

    /// Ends a gRPC response with DEADLINE_EXCEEDED trailers at `at`.
    pub fn grpc_deadline(mut self, at: Option<Instant>) -> Self {
        self.grpc_deadline = at;
        self
    }

    /// Keeps `g` alive until the body ends or is dropped.
    pub fn guard(mut self, g: Guard) -> Self {
        self.guards.push(g);
        self
    }
}

/// The error of a response body that stalled.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response body stalled for longer than the route's idle timeout")]
pub struct ResponseStalled;

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.finished {
            return Poll::Ready(None);
        }
        if let Some(at) = *this.grpc_deadline {
            if this.deadline.is_none() {
                this.deadline.set(Some(tokio::time::sleep_until(at)));
            }
            if let Some(d) = this.deadline.as_mut().as_pin_mut()
                && d.poll(cx).is_ready()
            {
                *this.finished = true;
                this.guards.clear();
                let mut t = HeaderMap::new();
                t.insert(
                    "grpc-status",
                    http::HeaderValue::from(super::respond::grpc_code::DEADLINE_EXCEEDED),
                );
                t.insert(
                    "grpc-message",
                    http::HeaderValue::from_static("deadline exceeded at the gateway"),
                );
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
        }
        match poll_skipping_empty(this.inner.as_mut(), cx) {
            Poll::Ready(None) => {
                *this.finished = true;
                this.guards.clear();
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => {
                *this.armed = false;
                if r.is_err() {
                    this.guards.clear();
                }
                Poll::Ready(Some(r))
            }
            Poll::Pending => {
                if let Some(idle) = *this.idle {
                    let deadline = Instant::now() + idle;
                    if this.sleep.is_none() {
                        this.sleep.set(Some(tokio::time::sleep_until(deadline)));
                        *this.armed = true;
                    } else if !*this.armed {
                        if let Some(s) = this.sleep.as_mut().as_pin_mut() {
                            s.reset(deadline);
                        }
                        *this.armed = true;
                    }
                    if let Some(s) = this.sleep.as_pin_mut()
                        && s.poll(cx).is_ready()
                    {
                        *this.finished = true;
                        this.guards.clear();
                        return Poll::Ready(Some(Err(ResponseStalled.into())));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // an inner body that has ended has nothing left for the deadline to cut short: a gRPC
        // trailers-only answer must stay one HEADERS frame with END_STREAM
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why [`collect_capped`] failed.
#[derive(Debug)]
pub enum CollectError {
    /// More than the cap.
    TooLarge,
    /// The body failed.
    Failed(BoxError),
}

/// Reads all of `body`, refusing more than `cap` bytes.
pub async fn collect_capped<B>(body: B, cap: usize) -> Result<Bytes, CollectError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin,
    B::Error: Into<BoxError>,
{
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Failed(e.into()))?;
        if let Ok(d) = frame.into_data() {
            if out.len() + d.len() > cap {
                return Err(CollectError::TooLarge);
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::full;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn an_empty_grpc_answer_stays_ended_under_a_deadline() {
        let b = ResponseBody::new(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|e| match e {})
                .boxed(),
        )
        .grpc_deadline(Some(Instant::now() + Duration::from_secs(60)));
        assert!(
            b.is_end_stream(),
            "a trailers-only gRPC answer is sent as one HEADERS frame, not HEADERS + empty DATA"
        );
    }

    #[tokio::test]
    async fn guarded_refuses_past_the_limit_and_records_why() {
        let state = Arc::new(BodyState::default());
        let b = Guarded::new(
            chunks(&["abc", "def", "ghi"]),
            7,
            Duration::from_secs(5),
            state.clone(),
        );
        let r = b.collect().await;
        assert!(r.is_err());
        assert_eq!(state.fault(), Some(BodyFault::TooLarge));
        let state = Arc::new(BodyState::default());
        let b = Guarded::new(chunks(&["abc"]), 3, Duration::from_secs(5), state.clone());
        assert_eq!(b.collect().await.expect("ok").to_bytes(), "abc");
        assert_eq!(state.fault(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn guarded_times_out_a_stalled_body() {
        let (mut tx, rx) = futures_channel_like();
        let state = Arc::new(BodyState::default());
        let b = Guarded::new(rx, 100, Duration::from_secs(2), state.clone());
        tx.send(Bytes::from_static(b"x"));
        let r = b.collect().await;
        assert!(r.is_err());
        assert_eq!(state.fault(), Some(BodyFault::Stalled));
        drop(tx);
    }

    /// A body fed by hand that never ends while the sender lives.
    fn futures_channel_like() -> (Feeder, Body) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        (Feeder(tx), StreamBody::new(stream).boxed())
    }

    struct Feeder(tokio::sync::mpsc::UnboundedSender<Bytes>);
    impl Feeder {
        fn send(&mut self, b: Bytes) {
            let _ = self.0.send(b);
        }
    }

    #[tokio::test]
    async fn replay_sends_the_same_bytes_again() {
        let first = ReplayBody::new(chunks(&["ab", "cd"]), 16);
        let second = first.replay().expect("replayable before reading");
        let got = first.collect().await.expect("first").to_bytes();
        assert_eq!(got, "abcd");
        let again = second.collect().await.expect("second").to_bytes();
        assert_eq!(again, "abcd");
    }

    #[tokio::test]
    async fn replay_gives_up_past_the_cap() {
        let first = ReplayBody::new(chunks(&["abcdef", "ghij"]), 8);
        let mut reader = first;
        let mut n = 0;
        while let Some(f) = reader.frame().await {
            n += f.expect("frame").into_data().map(|d| d.len()).unwrap_or(0);
        }
        assert_eq!(n, 10, "the first reader still gets everything");
        assert!(reader.replay().is_none(), "more than the cap was sent");
        let empty = ReplayBody::new(full(Bytes::new()), 8);
        assert!(empty.is_end_stream());
        assert!(empty.replay().is_some());
    }

    #[tokio::test]
    async fn collect_capped_refuses_more() {
        assert!(matches!(
            collect_capped(chunks(&["abc", "def"]), 5).await,
            Err(CollectError::TooLarge)
        ));
        assert_eq!(
            collect_capped(chunks(&["abc", "de"]), 5).await.expect("ok"),
            "abcde"
        );
    }
}
