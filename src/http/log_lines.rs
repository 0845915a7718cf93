//! Where log lines go. A worker thread collects its lines (the access lines, mostly) in a buffer
//! of its own and writes them to stderr in one go when its runtime is about to wait for IO, or
//! once the buffer passes 64 KiB: one write per turn of the event loop instead of one per request,
//! and no other thread to wake. Every other thread writes each line at once.

use std::cell::RefCell;
use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Batched bytes that are written out even while the event loop stays busy.
const FLUSH_AT: usize = 64 * 1024;

thread_local! {
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Makes the current thread batch its log lines; it must call [`flush`] whenever it goes idle
/// and before it ends.
pub fn batch_this_thread() {
    BATCH.with(|batch| *batch.borrow_mut() = Some(Vec::with_capacity(FLUSH_AT)));
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
        let batched = BATCH
            .try_with(|batch| {
                let Ok(mut batch) = batch.try_borrow_mut() else { return false };
                let Some(lines) = batch.as_mut() else { return false };
                lines.extend_from_slice(bytes);
                if lines.len() >= FLUSH_AT {
                    write_out(lines);
                }
                true
            })
            .unwrap_or(false);
        if !batched {
            io::stderr().write_all(bytes)?;
        }
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
            batch_this_thread();
            let line = b"log_lines test: batched\n";
            Stderr.write_all(line).unwrap();
            Stderr.write_all(line).unwrap();
            assert_eq!(batched(), 2 * line.len());
            flush();
            assert_eq!(batched(), 0);
        })
        .join()
        .unwrap();
    }
}
