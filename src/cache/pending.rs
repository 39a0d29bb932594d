//! Cache writes waiting to travel in the limiter's next Redis pipeline.
//!
//! A miss's answer is stored after it has been sent. Written on its own, every store
//! cost Redis a wake-up and the gateway a reply to read, and with a client sending
//! requests back to back that work landed in front of its next request: about 25 µs of
//! a one-connection miss in `scripts/bench.sh`. Queued here instead, a store goes out in
//! the same write as the next limiter call (under load, microseconds later); when none
//! comes within [`RIDE_ALONG_WAIT`], the store writes itself, with whatever else waits.
//! Answers over [`RIDE_ALONG_MAX_BYTES`] do not wait, and one call carries at most
//! [`RIDE_MAX_BYTES`] of them.
//! Redis runs a pipeline in order, so a request that follows a store on the same worker
//! thread always reads it; until the write is done, the chat service answers identical
//! requests on other threads from the finished call (its in-flight map).

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use redis::{RedisResult, Value};
use tokio::sync::oneshot;

use crate::workers::PerWorker;

/// How long a store waits for a limiter call to take it along before writing itself.
/// Only other gateway instances can notice it: this one answers identical requests from
/// the finished call until the write is done.
pub const RIDE_ALONG_WAIT: Duration = Duration::from_millis(1);

/// Larger answers are written at once: packed together, several would grow one pipeline
/// buffer to hundreds of KiB (peak RSS with 64 KiB answers rose by ~4 MiB), and for them
/// the round trip is a small part of the cost anyway.
pub const RIDE_ALONG_MAX_BYTES: usize = 16 * 1024;

/// At most this much answer text rides with one limiter call (at least one store), so
/// the writes it carries add little to the limiter's own deadline; the rest waits for
/// the next call.
pub const RIDE_MAX_BYTES: usize = 64 * 1024;

/// What the writer of a store learns: done, or why not.
pub type StoreOutcome = Result<(), String>;

struct PendingStore {
    key: String,
    body: Bytes,
    ttl_secs: u64,
    done: oneshot::Sender<StoreOutcome>,
}

/// The queues the Redis cache fills and the Redis limiter empties (single node only: on
/// a cluster the store and the limiter's keys live on different nodes). One per worker
/// thread, like the Redis connections: a store waits for the next limiter call of its
/// own thread, which carries it on that thread's connection, so taking it never wakes
/// another thread (at 64 connections a shared queue cost ~0.4 cross-thread wake-ups per
/// request). A store's own timer runs on the thread that queued it, so none is left
/// behind.
pub struct PendingStores {
    queues: PerWorker<Mutex<Vec<PendingStore>>>,
}

impl Default for PendingStores {
    /// One queue shared by every thread.
    fn default() -> Self {
        PendingStores::new(0)
    }
}

impl PendingStores {
    /// Queues for `workers` worker threads, and one for every other thread.
    pub fn new(workers: usize) -> Self {
        PendingStores {
            queues: PerWorker::new(workers, Mutex::default),
        }
    }

    /// Queues `SETEX key ttl_secs body`. The receiver gets the outcome once a pipeline
    /// carrying it has been answered; it is closed unanswered when that call failed or
    /// was abandoned (its timeout), as the write may or may not have happened.
    pub fn push(&self, key: &str, body: Bytes, ttl_secs: u64) -> oneshot::Receiver<StoreOutcome> {
        let (done, outcome) = oneshot::channel();
        self.lock().push(PendingStore {
            key: key.to_owned(),
            body,
            ttl_secs,
            done,
        });
        outcome
    }

    /// Whether no store is waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Takes every queued store; the caller sends them. A store whose wait has ended
    /// uses this, not the budgeted [`PendingStores::take_for_ride`]: it must not be left
    /// queued with no timer of its own to write it.
    pub fn take(&self) -> TakenStores {
        TakenStores(std::mem::take(&mut *self.lock()))
    }

    /// Takes the oldest stores, up to [`RIDE_MAX_BYTES`] of answers (at least one), for a
    /// limiter call to carry.
    pub fn take_for_ride(&self) -> TakenStores {
        let mut queue = self.lock();
        let mut bytes = 0;
        let count = queue
            .iter()
            .take_while(|store| {
                bytes += store.body.len();
                bytes <= RIDE_MAX_BYTES
            })
            .count()
            .max(1)
            .min(queue.len());
        TakenStores(queue.drain(..count).collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PendingStore>> {
        self.queues.get().lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stores taken from the queue by one pipeline. Dropping them unanswered closes their
/// receivers.
#[derive(Default)]
pub struct TakenStores(Vec<PendingStore>);

impl TakenStores {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds one `SETEX` per store to `pipe`, in queue order. The pipeline must use
    /// `ignore_errors`, so that each reply comes back on its own.
    pub fn add_to(&self, pipe: &mut redis::Pipeline) {
        for store in &self.0 {
            pipe.cmd("SETEX")
                .arg(&store.key)
                .arg(store.ttl_secs)
                .arg(store.body.as_ref());
        }
    }

    /// Hands each store its reply, taking one reply per store from the front of `replies`.
    pub fn finish(self, replies: &mut impl Iterator<Item = RedisResult<Value>>) {
        for store in self.0 {
            let outcome = match replies.next() {
                Some(Ok(_)) => Ok(()),
                Some(Err(error)) => Err(error.to_string()),
                None => Err("no reply from Redis".to_owned()),
            };
            // The writer may have stopped waiting; nothing to do then.
            let _ = store.done.send(outcome);
        }
    }

    /// Reports `error` to every store: the pipeline carrying them failed as a whole.
    pub fn fail(self, error: &str) {
        for store in self.0 {
            let _ = store.done.send(Err(error.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn queue_of_two() -> (
        PendingStores,
        oneshot::Receiver<StoreOutcome>,
        oneshot::Receiver<StoreOutcome>,
    ) {
        let pending = PendingStores::default();
        let first = pending.push("cache:a", Bytes::from_static(b"1"), 5);
        let second = pending.push("cache:b", Bytes::from_static(b"2"), 5);
        (pending, first, second)
    }

    #[test]
    fn a_worker_thread_takes_only_the_stores_queued_on_it() {
        let pending = Arc::new(PendingStores::new(1));
        let _queued_here = pending.push("cache:main", Bytes::from_static(b"1"), 5);
        let workers = crate::workers::Workers::start(1).unwrap();
        let (seen, seen_by) = std::sync::mpsc::channel();
        let on_worker = pending.clone();
        workers.run(move || async move {
            let empty_before = on_worker.is_empty();
            let _queued_there = on_worker.push("cache:worker", Bytes::from_static(b"2"), 5);
            let taken = on_worker.take();
            seen.send((empty_before, taken.0.len(), taken.0[0].key.clone()))
                .unwrap();
        });
        let (empty_before, count, key) = seen_by.recv().unwrap();
        assert!(empty_before, "the worker does not see this thread's store");
        assert_eq!((count, key.as_str()), (1, "cache:worker"));
        let here = pending.take();
        assert_eq!(here.0.len(), 1);
        assert_eq!(here.0[0].key, "cache:main");
    }

    #[test]
    fn taking_empties_the_queue_and_keeps_the_order() {
        let (pending, _first, _second) = queue_of_two();
        let taken = pending.take();
        assert!(pending.take().is_empty());
        let mut pipe = redis::pipe();
        taken.add_to(&mut pipe);
        let packed = String::from_utf8(pipe.get_packed_pipeline()).unwrap();
        let a = packed.find("cache:a").unwrap();
        let b = packed.find("cache:b").unwrap();
        assert!(a < b, "{packed}");
        assert_eq!(packed.matches("SETEX").count(), 2);
    }

    #[test]
    fn a_ride_carries_the_oldest_stores_up_to_its_byte_budget_and_at_least_one() {
        let pending = PendingStores::default();
        let half = Bytes::from(vec![b'x'; RIDE_MAX_BYTES / 2]);
        let _receivers: Vec<_> = ["cache:1", "cache:2", "cache:3"]
            .iter()
            .map(|key| pending.push(key, half.clone(), 5))
            .collect();
        assert_eq!(pending.take_for_ride().0.len(), 2);
        let left = pending.take_for_ride();
        assert_eq!(left.0.len(), 1);
        assert_eq!(left.0[0].key, "cache:3");
        assert!(pending.is_empty());

        let _big = pending.push("cache:big", Bytes::from(vec![b'x'; RIDE_MAX_BYTES + 1]), 5);
        assert_eq!(
            pending.take_for_ride().0.len(),
            1,
            "never stuck behind its budget"
        );
        assert!(pending.take_for_ride().is_empty());
    }

    #[test]
    fn each_store_gets_its_own_reply_and_later_replies_stay_for_the_caller() {
        let (pending, mut first, mut second) = queue_of_two();
        let error = redis::RedisError::from((redis::ErrorKind::Io, "broken"));
        let mut replies = vec![Ok(Value::Okay), Err(error), Ok(Value::Int(7))].into_iter();
        pending.take().finish(&mut replies);
        assert_eq!(first.try_recv().unwrap(), Ok(()));
        assert!(second.try_recv().unwrap().unwrap_err().contains("broken"));
        assert!(matches!(replies.next(), Some(Ok(Value::Int(7)))));
    }

    #[test]
    fn a_failed_or_dropped_pipeline_reaches_every_waiting_writer() {
        let (pending, mut first, mut second) = queue_of_two();
        pending.take().fail("timed out");
        assert_eq!(first.try_recv().unwrap(), Err("timed out".to_owned()));
        assert_eq!(second.try_recv().unwrap(), Err("timed out".to_owned()));

        let (pending, mut first, _second) = queue_of_two();
        drop(pending.take());
        assert!(first.try_recv().is_err(), "closed without an outcome");
    }
}
