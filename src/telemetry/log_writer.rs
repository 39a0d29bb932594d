//! Batched stdout for log lines: requests append to a buffer, one thread writes it out.
//!
//! Why not a channel per line (tracing-appender): its writer thread woke up for nearly
//! every line, spinning and then sleeping on a futex, and each line was its own
//! allocation; that was about 6% of the gateway's CPU under load. Here a request only
//! appends to a shared buffer under a short lock, and the writer thread wakes on a
//! timer, so its cost does not grow with the request rate.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Lines arriving while this much is waiting are dropped rather than growing memory
/// without bound (stdout blocked by a stalled log collector, say).
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// How long exit waits for the last lines to be written: a stdout nobody reads must not
/// keep the process from exiting.
const FINAL_FLUSH_LIMIT: Duration = Duration::from_secs(2);
/// A buffer that grew past this during a burst is not kept around afterwards.
const KEEP_CAPACITY: usize = 256 * 1024;

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    stopping: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while appending leaves at worst a partial line: keep logging.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `MakeWriter` handed to the tracing subscriber.
#[derive(Clone)]
pub struct BatchedStdout {
    shared: Arc<Shared>,
}

/// Stops the writer thread and writes what is pending when dropped; keep it until exit.
pub struct FlushGuard {
    shared: Arc<Shared>,
    /// Closed by the writer thread when it has written its last batch.
    done: Option<mpsc::Receiver<()>>,
}

/// Starts the writer thread for `out` (stdout in the binary).
pub fn batched(out: impl Write + Send + 'static) -> (BatchedStdout, FlushGuard) {
    let shared = Arc::new(Shared::default());
    let (finished, done) = mpsc::channel::<()>();
    let started = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                write_batches(&shared, out);
                drop(finished);
            })
    };
    (
        BatchedStdout {
            shared: shared.clone(),
        },
        FlushGuard {
            shared,
            done: started.ok().map(|_| done),
        },
    )
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let stopping = {
            let state = shared.lock();
            let (mut state, _) = shared
                .wake
                .wait_timeout_while(state, FLUSH_EVERY, |s| !s.stopping)
                .unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut state.pending, &mut batch);
            state.stopping
        };
        if !batch.is_empty() {
            // Nowhere to report a failed log write; the next batch tries again.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch = Vec::new();
            }
        }
        if stopping {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(done) = self.done.take() {
            // Disconnected (the thread finished) or timed out: either way, go on.
            let _ = done.recv_timeout(FINAL_FLUSH_LIMIT);
        }
    }
}

/// Appends one formatted event (the subscriber writes each event with one call).
pub struct LineSink<'a> {
    shared: &'a Shared,
}

impl Write for LineSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.lock();
        if state.pending.len() + buf.len() <= MAX_PENDING {
            state.pending.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> LineSink<'a> {
        LineSink {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` into memory the test can read.
    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<u8>>>);

    impl Write for Memory {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_and_flushed_on_drop() {
        let out = Memory::default();
        let (writer, guard) = batched(out.clone());
        for i in 0..1000 {
            writer
                .make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(i, l)| *l == format!("line {i}")));
    }

    #[test]
    fn lines_appear_without_a_flush_request() {
        let out = Memory::default();
        let (writer, _guard) = batched(out.clone());
        writer.make_writer().write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
    }

    /// An output whose writes wait until the test lets them through.
    struct Stalled(Arc<Mutex<()>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            drop(self.0.lock().unwrap());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_neither_blocks_logging_nor_grows_memory_without_bound() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (writer, guard) = batched(Stalled(gate.clone()));
        let mut sink = writer.make_writer();
        sink.write_all(b"first\n").unwrap();
        // Let the writer thread take that line and get stuck writing it.
        std::thread::sleep(FLUSH_EVERY * 5);
        let line = vec![b'x'; 64 * 1024];
        for _ in 0..200 {
            sink.write_all(&line).unwrap();
        }
        let pending = writer.shared.lock().pending.len();
        assert!(
            pending > 0 && pending <= MAX_PENDING,
            "{pending} bytes pending"
        );
        // Exit does not wait without bound for an output that never drains.
        let started = std::time::Instant::now();
        drop(guard);
        assert!(started.elapsed() < FINAL_FLUSH_LIMIT * 3);
        drop(held);
    }
}
