//! The accept loop: HTTP/1.1 keep-alive connections served by a handler, and a graceful shutdown
//! that stops accepting, lets in-flight requests finish up to a deadline, then closes the rest.
//!
//! Client traffic is served thread-per-core ([`Workers`]): one accept loop, on a thread of its own,
//! hands each connection to the worker thread serving the fewest, and each worker runs its own
//! single-threaded runtime.
//! A request, its upstream connection and both body streams then stay on one thread, so passing
//! bytes along never wakes another thread; only a new connection crosses threads, once.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::log_lines;

use super::client_io::ClientStream;
use super::idle::{Activity, InFlightBody};
use super::server::{self, ClientBody, ConnectionControl};
use super::tls_listener::ListenerTls;

/// How long a client may take to send its first request head; a keep-alive connection without a
/// request in flight for this long (up to half as long again) is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an accept loop waits after `accept` failed (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How a listener serves its connections, besides its handler.
#[derive(Clone)]
pub struct ListenerSettings {
    /// The listener's TLS, if it speaks HTTPS.
    pub tls: Option<ListenerTls>,
    /// Longest a client may take none of an answer before its connection is dropped.
    pub send_timeout: Duration,
    /// On shutdown, how long in-flight requests may drain.
    pub grace: Duration,
}

/// Serves `handler` on `listener` in the current runtime until `shutdown` is cancelled, then
/// drains for up to `settings.grace`.
pub async fn serve<H, F, B>(listener: TcpListener, handler: H, shutdown: CancellationToken, settings: ListenerSettings)
where
    H: Fn(Request<ClientBody>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let connections = Connections::default();
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    while let Some((stream, peer)) = accept(&listener, &local, &shutdown).await {
        connections.spawn(serve_connection(
            stream,
            peer,
            settings.clone(),
            handler.clone(),
            connections.closing.clone(),
        ));
    }
    drop(listener);
    connections.drain(&local, settings.grace).await;
}

/// The next connection, or `None` once `shutdown` is cancelled.
async fn accept(listener: &TcpListener, local: &str, shutdown: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, peer));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, listener = %local, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves one client connection as its listener's `settings` say until it closes (or is closed
/// by `closing`), over TLS when the listener has it: the handshake and the first request head
/// share the first head's timeout.
async fn serve_connection<H, F, B>(
    stream: TcpStream,
    peer: SocketAddr,
    settings: ListenerSettings,
    handler: H,
    closing: CancellationToken,
) where
    H: Fn(Request<ClientBody>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let started = tokio::time::Instant::now();
    let stream = match settings.tls {
        None => ClientStream::Plain(stream),
        Some(tls) => match handshake(tls, stream, peer, closing.clone()).await {
            Some(stream) => stream,
            None => return,
        },
    };
    let first_head_timeout = HEADER_READ_TIMEOUT.saturating_sub(started.elapsed());
    // The first head is timed by the connection; later ones by the idle watch.
    let activity = Arc::new(Activity::default());
    let requests = Arc::clone(&activity);
    // The handler's future (large: the whole request path) is made inside the returned one, on
    // its first poll, where it stays: returned from here, it would be copied on every move.
    let counted = move |request, peer| {
        let in_flight = requests.begin();
        let handler = handler.clone();
        async move { handler(request, peer).await.map(|body| InFlightBody::new(body, in_flight)) }
    };
    // Cancelled when the listener drains, or when this connection goes idle.
    let close = closing.child_token();
    let send_timeout = settings.send_timeout;
    let control = ConnectionControl { close: close.clone(), draining: closing, first_head_timeout, send_timeout };
    let mut connection = pin!(server::serve_connection(stream, peer, counted, control));
    // The watch's timer fires twice a timeout; the connection wakes this task a few times per
    // request. In a `FuturesUnordered` the watch is polled only when its own timer woke it.
    let mut idle: FuturesUnordered<_> = [activity.idle_for(HEADER_READ_TIMEOUT)].into_iter().collect();
    tokio::select! {
        () = connection.as_mut() => return,
        Some(()) = idle.next() => tracing::debug!(%peer, "idle connection closed"),
    }
    // Closed between requests, so that a TLS client gets its close_notify: at once, also with a
    // head begun and never finished; a request that slipped in meanwhile is answered first. What
    // is left to wait for is bounded: the answer's writes by the send timeout, the close by
    // the server's linger time (http/server.rs).
    close.cancel();
    connection.await;
}

/// Runs a new connection's TLS handshake within the first head's timeout; `None` when it fails,
/// times out or the listener closes meanwhile. Boxed: plain connections never carry its state.
fn handshake(
    tls: ListenerTls,
    stream: TcpStream,
    peer: SocketAddr,
    closing: CancellationToken,
) -> std::pin::Pin<Box<dyn Future<Output = Option<ClientStream>> + Send>> {
    Box::pin(async move {
        let handshake = tokio::time::timeout(HEADER_READ_TIMEOUT, tls.acceptor().accept(stream));
        let handshake = tokio::select! {
            handshake = handshake => handshake,
            () = closing.cancelled() => return None,
        };
        match handshake {
            Ok(Ok(stream)) => Some(ClientStream::Tls(Box::new(stream))),
            Ok(Err(error)) => {
                tracing::info!(%peer, %error, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                None
            }
        }
    })
}

/// The connections of a listener or a worker, and the signal that closes them.
#[derive(Default)]
struct Connections {
    tracker: TaskTracker,
    /// Cancelled when draining starts: idle connections close, busy ones after their response.
    closing: CancellationToken,
}

impl Connections {
    /// Runs `connection` on the current runtime, tracked.
    fn spawn(&self, connection: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(self.tracker.track_future(connection));
    }

    /// Lets the in-flight requests of `serving` (a listener, a worker) finish, for up to `grace`.
    async fn drain(self, serving: &str, grace: Duration) {
        tracing::info!(%serving, grace = ?grace, "no new connections; draining in-flight requests");
        self.closing.cancel();
        self.tracker.close();
        tokio::select! {
            () = self.tracker.wait() => tracing::info!(%serving, "all connections drained"),
            () = tokio::time::sleep(grace) => tracing::warn!(%serving, "drain deadline passed; closing the rest"),
        }
    }
}

/// Worker threads serving the connections of one listener; see the module documentation.
pub struct Workers {
    handoff: Handoff,
    threads: Vec<std::thread::JoinHandle<()>>,
    drained: Vec<oneshot::Receiver<()>>,
    release: CancellationToken,
}

/// Where accepted connections go: each worker's inbox, and how many connections each serves.
#[derive(Clone)]
struct Handoff {
    inboxes: Vec<mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
    open: Arc<[AtomicUsize]>,
}

/// The open-connection count that marks a worker whose thread has ended.
const GONE: usize = usize::MAX / 2;

/// Counts a connection as open on its worker until dropped.
struct OpenConnection {
    open: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one worker thread needs besides its connections and handler.
struct Worker {
    index: usize,
    settings: ListenerSettings,
    open: Arc<[AtomicUsize]>,
    release: CancellationToken,
}

impl Worker {
    /// The worker's event loop: serves every connection the accept loop hands over until the
    /// accept loop is gone, drains, reports on `drained`, then waits for the release.
    async fn run<H, F, B>(
        self,
        mut connections: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
        handler: H,
        drained: oneshot::Sender<()>,
    ) where
        H: Fn(Request<ClientBody>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let log_flush = tokio::spawn(log_lines::flush_periodically());
        let served = Connections::default();
        while let Some((stream, peer)) = connections.recv().await {
            let counted = OpenConnection { open: Arc::clone(&self.open), worker: self.index };
            // Made non-blocking here, not on the accept thread, which every connection passes.
            let Ok(stream) = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream)) else { continue };
            let _ = stream.set_nodelay(true);
            let settings = self.settings.clone();
            let connection = serve_connection(stream, peer, settings, handler.clone(), served.closing.clone());
            served.spawn(async move {
                connection.await;
                drop(counted);
            });
        }
        served.drain(&format!("worker {}", self.index), self.settings.grace).await;
        let _ = drained.send(());
        // Connections this runtime opened (pooled, shared with other workers) stay usable until
        // every worker has drained.
        self.release.cancelled().await;
        log_flush.abort();
    }
}

impl Workers {
    /// Starts `count` worker threads, each serving the connections it is handed with its own
    /// handler from `make_handler` as `settings` say, until the accept loop ends; each then
    /// drains for up to `settings.grace`.
    pub fn start<H, F, B>(
        count: usize,
        mut make_handler: impl FnMut() -> H,
        settings: ListenerSettings,
    ) -> std::io::Result<Workers>
    where
        H: Fn(Request<ClientBody>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let open: Arc<[AtomicUsize]> = (0..count).map(|_| AtomicUsize::new(0)).collect();
        let mut workers = Workers {
            handoff: Handoff { inboxes: Vec::with_capacity(count), open: Arc::clone(&open) },
            threads: Vec::with_capacity(count),
            drained: Vec::with_capacity(count),
            release: CancellationToken::new(),
        };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (inbox, connections) = mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
            let (drained, drained_receiver) = oneshot::channel();
            let settings = settings.clone();
            let worker = Worker { index, settings, open: Arc::clone(&open), release: workers.release.clone() };
            let handler = make_handler();
            let thread = std::thread::Builder::new().name(format!("preagg-worker-{index}")).spawn(move || {
                // Written out when the thread ends, after the runtime (and what it logs as it
                // drops the requests cut off at the deadline), or when it panics.
                let _batching = log_lines::batch_this_thread();
                runtime.block_on(worker.run(connections, handler, drained));
                // Requests cut off at the deadline are logged as their tasks are dropped.
                drop(runtime);
            })?;
            workers.handoff.inboxes.push(inbox);
            workers.threads.push(thread);
            workers.drained.push(drained_receiver);
        }
        Ok(workers)
    }

    /// Accepts connections on `listener` and hands each to the worker serving the fewest, until
    /// `shutdown` is cancelled. The loop runs on a thread of its own that waits in the kernel's
    /// `accept`: a new connection costs that call and the wake-up of its worker, with no poller
    /// (an async listener adds a readiness wait, registering the connection in this thread's
    /// poller and taking it out again, and the `accept` that finds the queue empty). When
    /// `shutdown` is cancelled the listener is shut down, which ends the waiting `accept`.
    /// Fails when the loop cannot be set up (its thread, the listener made blocking).
    pub async fn accept(&self, listener: TcpListener, shutdown: &CancellationToken) -> std::io::Result<()> {
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let listener = Arc::new(listener.into_std()?);
        listener.set_nonblocking(false)?;
        let (handoff, accepting, stop) = (self.handoff.clone(), Arc::clone(&listener), shutdown.clone());
        let (ended, accept_ended) = oneshot::channel::<()>();
        std::thread::Builder::new().name("preagg-accept".to_string()).spawn(move || {
            handoff.accept_until(&accepting, &local, &stop);
            // The workers end once every sender of their inboxes is gone: this one goes first.
            drop(handoff);
            let _ = ended.send(());
        })?;
        // A task of its own, so that the listener is shut down also when this future is dropped.
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if let Err(error) = socket2::SockRef::from(&*listener).shutdown(std::net::Shutdown::Read) {
                tracing::warn!(%error, "cannot shut the listener down; the accept loop ends at its next connection");
            }
        });
        accept_ended.await.map_err(|_| std::io::Error::other("the accept thread panicked"))
    }

    /// Waits until every worker has drained, then lets the threads end.
    pub async fn join(self) {
        drop(self.handoff);
        for drained in self.drained {
            let _ = drained.await;
        }
        self.release.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Handoff {
    /// The accept loop: hands every connection the blocking `listener` accepts to a worker until
    /// `shutdown` is cancelled (and the listener shut down, to end the `accept` waiting then).
    fn accept_until(&self, listener: &std::net::TcpListener, local: &str, shutdown: &CancellationToken) {
        loop {
            let accepted = listener.accept();
            if shutdown.is_cancelled() {
                return;
            }
            match accepted {
                Ok((stream, peer)) => self.hand_over(stream, peer),
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, listener = %local, "accept failed");
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Gives a connection to the live worker serving the fewest.
    fn hand_over(&self, mut stream: std::net::TcpStream, peer: SocketAddr) {
        loop {
            let Some(worker) = (0..self.open.len())
                .filter(|&i| self.open[i].load(Ordering::Relaxed) < GONE)
                .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            else {
                tracing::error!(%peer, "no worker thread is left to serve the connection");
                return;
            };
            self.open[worker].fetch_add(1, Ordering::Relaxed);
            match self.inboxes[worker].send((stream, peer)) {
                Ok(()) => return,
                Err(mpsc::error::SendError((returned, _))) => {
                    // The thread ended (it panicked): never choose it again.
                    tracing::error!(worker, "worker thread is gone; its connections go to the others");
                    self.open[worker].store(GONE, Ordering::Relaxed);
                    stream = returned;
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use http_body_util::{BodyExt, Full};

    use super::*;

    /// A handler answering with the name of the thread that serves the request.
    fn thread_name() -> impl Fn(Request<ClientBody>, SocketAddr) -> std::future::Ready<Response<Full<bytes::Bytes>>>
    + Clone
    + Send
    + Sync
    + 'static {
        |_, _| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            std::future::ready(Response::new(Full::new(name.into())))
        }
    }

    /// A plain listener's settings, draining for `grace`.
    fn plain(grace: Duration) -> ListenerSettings {
        ListenerSettings { tls: None, send_timeout: Duration::from_secs(60), grace }
    }

    /// Has a fresh server answer one request on a plain connection, sends `then` on it, and
    /// returns how long the server took to close the connection after that.
    async fn closed_after_an_answer_and(then: &[u8]) -> Duration {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, thread_name(), CancellationToken::new(), plain(Duration::from_secs(1))));
        let mut client = TcpStream::connect(address).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
        let mut answer = vec![0; 4096];
        let n = client.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
        client.write_all(then).await.unwrap();
        // The clock runs ahead whenever everything waits: only the idle watch can end this read.
        let sent = tokio::time::Instant::now();
        let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 4, client.read(&mut answer)).await;
        assert_eq!(closed.expect("the server closed the connection").unwrap(), 0);
        sent.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_left_idle_is_closed_after_the_header_read_timeout() {
        let idle = closed_after_an_answer_and(b"").await;
        assert!(idle >= HEADER_READ_TIMEOUT && idle <= HEADER_READ_TIMEOUT * 3 / 2, "closed after {idle:?}");
        // A head begun and never finished is closed as well.
        let stalled = closed_after_an_answer_and(b"GET / HT").await;
        assert!(stalled >= HEADER_READ_TIMEOUT && stalled <= HEADER_READ_TIMEOUT * 3 / 2, "closed after {stalled:?}");
    }

    /// Serves `ok` over TLS on a free port until `closing` is cancelled; returns the address, a
    /// connector that trusts the server, and the directory of its certificate.
    async fn tls_server(closing: CancellationToken) -> (SocketAddr, tokio_rustls::TlsConnector, tempfile::TempDir) {
        use super::super::tls::ClientTls;
        use super::super::tls_listener::{ListenerCert, self_signed};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "server");
        let tls = ListenerTls::new(&ListenerCert::load(&cert, &key).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let ok = |_, _| std::future::ready(Response::new(Full::new(bytes::Bytes::from_static(b"ok"))));
        tokio::spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                let settings = ListenerSettings { tls: Some(tls.clone()), ..plain(Duration::from_secs(1)) };
                tokio::spawn(serve_connection(stream, peer, settings, ok, closing.clone()));
            }
        });
        let connector = tokio_rustls::TlsConnector::from(ClientTls::from_ca_file(&cert).unwrap().rustls_config());
        (address, connector, dir)
    }

    #[tokio::test(start_paused = true)]
    async fn connections_the_server_closes_over_tls_end_with_a_close_notify() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        type Client = tokio_rustls::client::TlsStream<TcpStream>;
        let closing = CancellationToken::new();
        let (address, connector, _dir) = tls_server(closing.clone()).await;
        let connect = async || -> Client {
            let tcp = TcpStream::connect(address).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await.unwrap()
        };
        let answered = async |client: &mut Client| {
            client.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\nok") {
                let mut piece = [0; 4096];
                let n = client.read(&mut piece).await.unwrap();
                assert!(n > 0, "closed before the answer");
                answer.extend_from_slice(&piece[..n]);
            }
        };
        // The read ends in Ok(0) only after a close_notify: a bare end of the stream is an error.
        let closed_cleanly = async |client: &mut Client| {
            let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 4, client.read(&mut [0; 64])).await;
            assert_eq!(closed.expect("the server closed the connection").unwrap(), 0);
        };

        // No request head within the first head's timeout.
        let mut silent = connect().await;
        let connected = tokio::time::Instant::now();
        closed_cleanly(&mut silent).await;
        assert!(connected.elapsed() <= HEADER_READ_TIMEOUT, "closed after {:?}", connected.elapsed());

        // Idle after an answer.
        let mut idle = connect().await;
        answered(&mut idle).await;
        let quiet = tokio::time::Instant::now();
        closed_cleanly(&mut idle).await;
        assert!(quiet.elapsed() >= HEADER_READ_TIMEOUT, "closed after {:?}", quiet.elapsed());

        // Idle when the listener drains.
        let mut kept = connect().await;
        answered(&mut kept).await;
        let drained = tokio::time::Instant::now();
        closing.cancel();
        closed_cleanly(&mut kept).await;
        assert!(drained.elapsed() < HEADER_READ_TIMEOUT, "closed after {:?}", drained.elapsed());
    }

    /// An HTTP/1 client on a new connection to `address`, its connection driven by a spawned task.
    async fn http_client(address: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>> {
        let stream = TcpStream::connect(address).await.unwrap();
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    /// Sends `GET /` and returns the body, which the test service makes its worker thread's name.
    async fn get_root(sender: &mut hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>) -> String {
        let request = Request::builder().uri("/").header("host", "test").body(Full::<bytes::Bytes>::default());
        let response = sender.send_request(request.unwrap()).await.unwrap();
        assert!(response.status().is_success(), "{response:?}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn connections_are_spread_over_the_workers_and_drained_on_shutdown() {
        let shutdown = CancellationToken::new();
        let workers = Workers::start(2, thread_name, plain(Duration::from_secs(5))).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepting = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                workers.accept(listener, &shutdown).await.unwrap();
                workers
            })
        };
        let mut senders = Vec::new();
        for _ in 0..4 {
            senders.push(http_client(address).await);
        }
        let mut names = BTreeSet::new();
        for sender in &mut senders {
            names.insert(get_root(sender).await);
        }
        assert_eq!(names, BTreeSet::from(["preagg-worker-0".to_string(), "preagg-worker-1".to_string()]));
        shutdown.cancel();
        let workers = tokio::time::timeout(Duration::from_secs(10), accepting).await.expect("the accept loop ends");
        drop(senders);
        tokio::time::timeout(Duration::from_secs(10), workers.unwrap().join()).await.expect("workers drain and end");
    }

    #[tokio::test]
    async fn the_accept_thread_ends_on_shutdown_also_when_its_future_was_dropped() {
        let shutdown = CancellationToken::new();
        let workers = Workers::start(1, thread_name, plain(Duration::from_secs(5))).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // As the proxy's main loop does when a signal arrives first.
        let waited = tokio::time::timeout(Duration::from_millis(100), workers.accept(listener, &shutdown)).await;
        assert!(waited.is_err(), "the accept loop ended before shutdown: {waited:?}");
        let mut sender = http_client(address).await;
        assert_eq!(get_root(&mut sender).await, "preagg-worker-0");
        shutdown.cancel();
        drop(sender);
        // The workers end only once the accept thread has let go of their inboxes.
        tokio::time::timeout(Duration::from_secs(10), workers.join()).await.expect("the accept thread and workers end");
        assert!(TcpStream::connect(address).await.is_err(), "the listener still accepts");
    }
}
