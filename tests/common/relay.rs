//! A TCP relay for fault injection: forwards to a target, or drops every connection, or accepts
//! connections and never answers. Switching mode also cuts the connections already open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pass bytes both ways.
    Forward = 0,
    /// Close connections at once.
    Drop = 1,
    /// Accept and hold connections without reading or answering.
    Hang = 2,
}

/// A running relay.
pub struct Relay {
    /// Port on 127.0.0.1.
    pub port: u16,
    mode: Arc<AtomicU8>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts a relay to `target` in `Forward` mode.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(Mode::Forward as u8));
        let (generation, _) = watch::channel(0u64);
        let (m, g) = (Arc::clone(&mode), generation.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = m.load(Ordering::SeqCst);
                let mut cut = g.subscribe();
                tokio::spawn(async move {
                    if mode == Mode::Drop as u8 {
                        return;
                    }
                    if mode == Mode::Hang as u8 {
                        let _held = client;
                        let _ = cut.changed().await;
                        return;
                    }
                    let Ok(upstream) = TcpStream::connect(target).await else { return };
                    let (mut a, mut b) = (client, upstream);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay { port, mode, generation, task }
    }

    /// URL of the relay (`scheme://127.0.0.1:port`).
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Switches mode and cuts every open connection.
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
