//! Where log lines go. A worker thread collects its lines (the access lines, mostly) in a buffer
//! of its own and writes them to stderr in one go every [`FLUSH_INTERVAL`], or at once when the
//! buffer passes 64 KiB (nginx's `access_log ... buffer=64k flush=1s`): a few writes a second
//! instead of one per request, and no other thread to wake. Every other thread writes each line
//! at once.
//!
//! Lines come from the `tracing` subscriber (through [`Stderr`]) and, for the access log, straight
//! from [`write_line`]: one access line per request is the busiest log there is, and formatting it
//! through the subscriber cost a sixth of a pass-through request's CPU time.

use std::cell::RefCell;
use std::io::{self, Write};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Batched bytes that are written out at once.
const FLUSH_AT: usize = 64 * 1024;

/// The longest a batched line waits to be written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Whether lines are JSON objects (set once with the subscriber; text until then).
static JSON: AtomicBool = AtomicBool::new(false);

/// Sets the format of the lines written with [`write_line`] (the subscriber's own format).
pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

/// The format lines are written in.
pub fn format() -> LogFormat {
    if JSON.load(Ordering::Relaxed) { LogFormat::Json } else { LogFormat::Text }
}

/// Writes one line that `write` appends (with its line feed) to the buffer it is given: the
/// current thread's batch when it batches, else a buffer of its own written out at once.
pub fn write_line(write: impl FnOnce(&mut Vec<u8>)) {
    let mut write = Some(write);
    let _ = BATCH.try_with(|batch| {
        if let Ok(mut batch) = batch.try_borrow_mut()
            && let Some(lines) = batch.as_mut()
            && let Some(write) = write.take()
        {
            write(lines);
            if lines.len() >= FLUSH_AT {
                write_out(lines);
            }
        }
    });
    if let Some(write) = write {
        let mut line = Vec::with_capacity(256);
        write(&mut line);
        let _ = io::stderr().write_all(&line);
    }
}

/// Makes the current thread batch its log lines until the returned guard is dropped, which writes
/// out what is left (also when the thread unwinds from a panic) and lets later lines go out at
/// once. Meanwhile the thread must run [`flush_periodically`].
#[must_use = "lines are batched only while the guard lives"]
pub fn batch_this_thread() -> Batching {
    BATCH.with(|batch| *batch.borrow_mut() = Some(Vec::with_capacity(FLUSH_AT)));
    Batching { _this_thread: PhantomData }
}

/// The current thread batches its log lines while this lives.
pub struct Batching {
    _this_thread: PhantomData<*const ()>,
}

impl Drop for Batching {
    fn drop(&mut self) {
        flush();
        let _ = BATCH.try_with(|batch| {
            if let Ok(mut batch) = batch.try_borrow_mut() {
                *batch = None;
            }
        });
    }
}

/// Writes out the lines the current thread has batched.
pub fn flush() {
    let _ = BATCH.try_with(|batch| {
        if let Ok(mut batch) = batch.try_borrow_mut()
            && let Some(lines) = batch.as_mut()
        {
            write_out(lines);
        }
    });
}

/// Writes out the current thread's batch every [`FLUSH_INTERVAL`], for as long as it is polled
/// (a task on the batching thread's own runtime).
pub async fn flush_periodically() {
    let mut every = tokio::time::interval(FLUSH_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        flush();
    }
}

fn write_out(lines: &mut Vec<u8>) {
    if !lines.is_empty() {
        let _ = io::stderr().write_all(lines);
        lines.clear();
    }
}

/// Standard error, batched on the threads that asked for it (a `tracing_subscriber` writer).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        write_line(|out| out.extend_from_slice(bytes));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batched() -> usize {
        BATCH.with(|batch| batch.borrow().as_ref().map_or(0, Vec::len))
    }

    #[test]
    fn lines_wait_on_a_batching_thread_until_it_flushes() {
        std::thread::spawn(|| {
            Stderr.write_all(b"log_lines test: written at once\n").unwrap();
            assert_eq!(batched(), 0);
            let batching = batch_this_thread();
            let line = b"log_lines test: batched\n";
            Stderr.write_all(line).unwrap();
            Stderr.write_all(line).unwrap();
            assert_eq!(batched(), 2 * line.len());
            flush();
            assert_eq!(batched(), 0);
            write_line(|out| out.extend_from_slice(line));
            assert_eq!(batched(), line.len());
            drop(batching);
            assert_eq!(batched(), 0);
            Stderr.write_all(b"log_lines test: written at once again\n").unwrap();
            assert_eq!(batched(), 0);
        })
        .join()
        .unwrap();
    }
}
