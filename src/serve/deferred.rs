//! Writes waiting to travel in the next Redis round trip of their worker thread.
//!
//! A write that no answer waits for (the cache storing an answer that has been sent) is
//! cheaper in someone else's round trip than in one of its own: written on its own,
//! every cache store cost Redis a wake-up and the gateway a reply to read, and with a
//! client sending requests back to back that work landed in front of its next request
//! (about 25 µs of a one-connection miss in `scripts/bench.sh`). Queued here, a write
//! goes out at the front of the next round trip on its thread (under load, microseconds
//! later); when none comes within [`RIDE_ALONG_WAIT`], it writes itself, with whatever
//! else waits. Redis runs a pipeline in order, so a round trip that follows a write on
//! the same thread always sees it.
//!
//! The commands are opaque here: whoever queues a write knows what it is, whoever sends a
//! round trip does not (the limiter carries the cache's writes without knowing the cache).

use std::sync::Mutex;
use std::time::Duration;

use redis::{Cmd, RedisResult, Value};
use tokio::sync::oneshot;

use crate::serve::workers::PerWorker;

/// How long a write waits for a round trip to take it along before writing itself. Only
/// other gateway instances can notice it: this one answers identical requests from the
/// finished call until the cache write is done.
pub const RIDE_ALONG_WAIT: Duration = Duration::from_millis(1);

/// Larger writes go out at once: packed together, several would grow one pipeline
/// buffer to hundreds of KiB (peak RSS with 64 KiB answers rose by ~4 MiB), and for them
/// the round trip is a small part of the cost anyway.
pub const RIDE_ALONG_MAX_BYTES: usize = 16 * 1024;

/// At most this many bytes of writes ride with one round trip (at least one write), so
/// the writes it carries add little to its own deadline; the rest waits for the next.
pub const RIDE_MAX_BYTES: usize = 64 * 1024;

/// What the writer of a deferred write learns: done, or why not.
pub type WriteOutcome = Result<(), String>;

struct DeferredWrite {
    cmd: Cmd,
    bytes: usize,
    done: oneshot::Sender<WriteOutcome>,
}

/// The queues of deferred writes, one per worker thread like the Redis connections: a
/// write waits for the next round trip of its own thread, which carries it on that
/// thread's connection, so taking it never wakes another thread (at 64 connections a
/// shared queue cost ~0.4 cross-thread wake-ups per request). A write's own timer runs on
/// the thread that queued it, so none is left behind.
pub struct DeferredWrites {
    queues: PerWorker<Mutex<Vec<DeferredWrite>>>,
}

impl Default for DeferredWrites {
    /// One queue shared by every thread.
    fn default() -> Self {
        DeferredWrites::new(0)
    }
}

impl DeferredWrites {
    /// Queues for `workers` worker threads, and one for every other thread.
    pub fn new(workers: usize) -> Self {
        DeferredWrites {
            queues: PerWorker::new(workers, Mutex::default),
        }
    }

    /// Queues `cmd`, which carries about `bytes` of data. The receiver gets the outcome
    /// once a round trip carrying it has been answered; it is closed unanswered when that
    /// round trip failed or was abandoned (its timeout), as the write may or may not have
    /// happened.
    pub fn push(&self, cmd: Cmd, bytes: usize) -> oneshot::Receiver<WriteOutcome> {
        let (done, outcome) = oneshot::channel();
        self.lock().push(DeferredWrite { cmd, bytes, done });
        outcome
    }

    /// How many writes wait on the calling thread.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no write waits on the calling thread.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Takes every queued write; the caller sends them. A write whose wait has ended
    /// uses this, not the budgeted [`DeferredWrites::take_for_ride`]: it must not be left
    /// queued with no timer of its own to write it.
    pub fn take(&self) -> TakenWrites {
        TakenWrites::from(std::mem::take(&mut *self.lock()))
    }

    /// Takes the oldest writes, up to [`RIDE_MAX_BYTES`] (at least one), for a round trip
    /// to carry.
    pub fn take_for_ride(&self) -> TakenWrites {
        let mut queue = self.lock();
        let mut bytes = 0;
        let count = queue
            .iter()
            .take_while(|write| {
                bytes += write.bytes;
                bytes <= RIDE_MAX_BYTES
            })
            .count()
            .max(1)
            .min(queue.len());
        TakenWrites::from(queue.drain(..count).collect::<Vec<_>>())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<DeferredWrite>> {
        self.queues.get().lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes taken from the queue by one round trip. Dropping them unanswered closes their
/// receivers.
#[derive(Default)]
pub struct TakenWrites {
    cmds: Vec<Cmd>,
    done: Vec<oneshot::Sender<WriteOutcome>>,
}

impl From<Vec<DeferredWrite>> for TakenWrites {
    fn from(writes: Vec<DeferredWrite>) -> Self {
        let (cmds, done) = writes.into_iter().map(|w| (w.cmd, w.done)).unzip();
        TakenWrites { cmds, done }
    }
}

impl TakenWrites {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Moves the writes into `pipe`, in queue order. The pipeline must use
    /// `ignore_errors`, so that each reply comes back on its own.
    pub fn add_to(&mut self, pipe: &mut redis::Pipeline) {
        for cmd in self.cmds.drain(..) {
            pipe.add_command(cmd);
        }
    }

    /// Hands each write its reply, taking one reply per write from the front of `replies`.
    pub fn finish(self, replies: &mut impl Iterator<Item = RedisResult<Value>>) {
        for done in self.done {
            let outcome = match replies.next() {
                Some(Ok(_)) => Ok(()),
                Some(Err(error)) => Err(error.to_string()),
                None => Err("no reply from Redis".to_owned()),
            };
            // The writer may have stopped waiting; nothing to do then.
            let _ = done.send(outcome);
        }
    }

    /// Reports `error` to every write: the round trip carrying them failed as a whole.
    pub fn fail(self, error: &str) {
        for done in self.done {
            let _ = done.send(Err(error.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn setex(key: &str, body: &[u8]) -> Cmd {
        let mut cmd = redis::cmd("SETEX");
        cmd.arg(key).arg(5).arg(body);
        cmd
    }

    fn queue_of_two() -> (
        DeferredWrites,
        oneshot::Receiver<WriteOutcome>,
        oneshot::Receiver<WriteOutcome>,
    ) {
        let writes = DeferredWrites::default();
        let first = writes.push(setex("cache:a", b"1"), 1);
        let second = writes.push(setex("cache:b", b"2"), 1);
        (writes, first, second)
    }

    #[test]
    fn a_worker_thread_takes_only_the_writes_queued_on_it() {
        let writes = Arc::new(DeferredWrites::new(1));
        let _queued_here = writes.push(setex("cache:main", b"1"), 1);
        let workers = crate::serve::workers::Workers::start(1).unwrap();
        let (seen, seen_by) = std::sync::mpsc::channel();
        let on_worker = writes.clone();
        workers.run(move || async move {
            let empty_before = on_worker.is_empty();
            let _queued_there = on_worker.push(setex("cache:worker", b"2"), 1);
            let mut taken = on_worker.take();
            let mut pipe = redis::pipe();
            taken.add_to(&mut pipe);
            let packed = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
            seen.send((empty_before, taken.done.len(), packed)).unwrap();
        });
        let (empty_before, count, packed) = seen_by.recv().unwrap();
        assert!(empty_before, "the worker does not see this thread's write");
        assert_eq!(count, 1);
        assert!(packed.contains("cache:worker") && !packed.contains("cache:main"));
        assert_eq!(
            writes.take().done.len(),
            1,
            "this thread's write is still here"
        );
    }

    #[test]
    fn taking_empties_the_queue_and_keeps_the_order() {
        let (writes, _first, _second) = queue_of_two();
        let mut taken = writes.take();
        assert!(writes.take().is_empty());
        let mut pipe = redis::pipe();
        taken.add_to(&mut pipe);
        let packed = String::from_utf8(pipe.get_packed_pipeline()).unwrap();
        let a = packed.find("cache:a").unwrap();
        let b = packed.find("cache:b").unwrap();
        assert!(a < b, "{packed}");
        assert_eq!(packed.matches("SETEX").count(), 2);
    }

    #[test]
    fn a_ride_carries_the_oldest_writes_up_to_its_byte_budget_and_at_least_one() {
        let writes = DeferredWrites::default();
        let half = vec![b'x'; RIDE_MAX_BYTES / 2];
        let _receivers: Vec<_> = ["cache:1", "cache:2", "cache:3"]
            .iter()
            .map(|key| writes.push(setex(key, &half), half.len()))
            .collect();
        assert_eq!(writes.take_for_ride().done.len(), 2);
        let left = writes.take_for_ride();
        assert_eq!(left.done.len(), 1);
        assert!(writes.is_empty());

        let big = vec![b'x'; RIDE_MAX_BYTES + 1];
        let _big = writes.push(setex("cache:big", &big), big.len());
        assert_eq!(
            writes.take_for_ride().done.len(),
            1,
            "never stuck behind its budget"
        );
        assert!(writes.take_for_ride().is_empty());
    }

    #[test]
    fn each_write_gets_its_own_reply_and_later_replies_stay_for_the_caller() {
        let (writes, mut first, mut second) = queue_of_two();
        let error = redis::RedisError::from((redis::ErrorKind::Io, "broken"));
        let mut replies = vec![Ok(Value::Okay), Err(error), Ok(Value::Int(7))].into_iter();
        writes.take().finish(&mut replies);
        assert_eq!(first.try_recv().unwrap(), Ok(()));
        assert!(second.try_recv().unwrap().unwrap_err().contains("broken"));
        assert!(matches!(replies.next(), Some(Ok(Value::Int(7)))));
    }

    #[test]
    fn a_failed_or_dropped_round_trip_reaches_every_waiting_writer() {
        let (writes, mut first, mut second) = queue_of_two();
        writes.take().fail("timed out");
        assert_eq!(first.try_recv().unwrap(), Err("timed out".to_owned()));
        assert_eq!(second.try_recv().unwrap(), Err("timed out".to_owned()));

        let (writes, mut first, _second) = queue_of_two();
        drop(writes.take());
        assert!(first.try_recv().is_err(), "closed without an outcome");
    }
}
