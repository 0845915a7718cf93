//! The idle watch of a client connection: a keep-alive connection that goes a whole timeout
//! without a request in flight (an idle client, or one sending its next request head too slowly)
//! is closed.
//!
//! hyper's own `header_read_timeout` does this with a timer created, armed and dropped for every
//! request head; here each connection has one timer that wakes twice per timeout and compares a
//! request counter, so a request only touches two uncontended atomics.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};

/// Requests of one client connection, as the idle watch sees them.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests begun plus requests finished: changes whenever the connection is used.
    events: AtomicUsize,
    /// Requests whose response body is not finished.
    in_flight: AtomicUsize,
}

impl Activity {
    /// Counts a request whose head was just read; it is in flight until the returned guard goes.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { activity: Arc::clone(self) }
    }

    /// Resolves once the connection has had no request in flight, and none begun or finished,
    /// for at least `timeout` (at most one and a half `timeout`).
    pub async fn idle_for(&self, timeout: Duration) {
        let tick = timeout / 2;
        let mut seen = self.events.load(Ordering::Relaxed);
        let mut quiet_ticks = 0;
        loop {
            tokio::time::sleep(tick).await;
            let events = self.events.load(Ordering::Relaxed);
            if events != seen || self.in_flight.load(Ordering::Relaxed) > 0 {
                seen = events;
                quiet_ticks = 0;
                continue;
            }
            quiet_ticks += 1;
            if quiet_ticks == 2 {
                return;
            }
        }
    }
}

/// A request in flight on its connection; finished when dropped.
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.activity.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until the body is done (sent or abandoned).
pub struct InFlightBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> InFlightBody<B> {
    /// Wraps `inner`, holding `in_flight` until it is dropped.
    pub fn new(inner: B, in_flight: InFlight) -> InFlightBody<B> {
        InFlightBody { inner, _in_flight: in_flight }
    }
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// What the idle watch promises: closed after at least one timeout, at most one and a half.
    fn assert_idle_span(idle: Duration) {
        assert!(idle >= TIMEOUT && idle <= TIMEOUT * 3 / 2, "closed after {idle:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_connection_is_idle_after_one_to_one_and_a_half_timeouts() {
        let activity = Arc::new(Activity::default());
        let start = Instant::now();
        activity.idle_for(TIMEOUT).await;
        assert_idle_span(start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_however_long_it_takes() {
        let activity = Arc::new(Activity::default());
        let in_flight = activity.begin();
        let watch = tokio::time::timeout(TIMEOUT * 10, activity.idle_for(TIMEOUT)).await;
        assert!(watch.is_err(), "a long response is not idleness");
        let finished = Instant::now();
        drop(in_flight);
        activity.idle_for(TIMEOUT).await;
        // Counted from the end of the response.
        assert_idle_span(finished.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_now_and_then_keep_the_connection_open() {
        let activity = Arc::new(Activity::default());
        let watch = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move { activity.idle_for(TIMEOUT).await })
        };
        for _ in 0..10 {
            tokio::time::sleep(TIMEOUT * 9 / 10).await;
            drop(activity.begin());
        }
        assert!(!watch.is_finished(), "closed although a request came every 27 s");
        let last = Instant::now();
        watch.await.unwrap();
        assert_idle_span(last.elapsed());
    }
}
