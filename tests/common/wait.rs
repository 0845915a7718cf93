//! Polling with a deadline, for tests and benchmarks that wait on a process they started. Shared
//! by `benches/e2e.rs` (through `#[path]`), so it depends on nothing but `std`.

use std::time::{Duration, Instant};

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    wait_until(what, timeout, || f().ok_or_else(|| "not yet".to_string()))
}

/// Polls `attempt` until it returns `Ok`, or panics after `timeout` with the last `Err`: what
/// was observed instead.
pub fn wait_until<T>(what: &str, timeout: Duration, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(observed) => {
                assert!(
                    started.elapsed() < timeout,
                    "timed out after {timeout:?} waiting for {what}; last seen: {observed}"
                )
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
