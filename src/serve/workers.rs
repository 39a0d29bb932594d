//! Serving threads: each worker runs the connections it is given on a single-threaded
//! tokio runtime of its own, with its own Redis connection and upstream pool.
//!
//! Why not one work-stealing runtime: there, one request's tasks (its connection, the
//! Redis connection's driver, the pooled upstream connection's task) ran on whichever
//! worker was free, so a request crossed between threads several times, and every
//! crossing woke a parked thread (a futex and an eventfd write) and moved the request's
//! data to the other core's cache. On the 2-core machine of `scripts/bench.sh` that cost
//! a one-connection miss ~37 µs of its ~125 µs, and at 64 connections ~15% of the
//! throughput. Here a connection, the Redis and upstream connections it uses, and the
//! tasks it spawns all stay on one thread.
//!
//! A thread that is not a worker (start-up, tests, the accept loop) uses a slot of
//! [`PerWorker`] of its own, so everything works from any thread; only locality differs.
//! Each value is made by the first `get` on the thread it belongs to, inside that
//! thread's runtime: whatever its maker starts (a Redis connection's driver task, say)
//! runs on that thread, however eagerly the maker connects.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static WORKER_INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The number of workers for a `WORKER_THREADS` setting: the setting, or one per core
/// when it is 0.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
    }
}

/// One value per worker, plus one shared by every other thread, each made on first use by
/// the thread it belongs to.
pub struct PerWorker<T> {
    slots: Box<[OnceLock<T>]>,
    make: Box<dyn Fn() -> T + Send + Sync>,
}

impl<T> PerWorker<T> {
    /// Values for `workers` workers, and for the other threads, each made by `make` on
    /// the first [`PerWorker::get`] of its thread.
    pub fn new(workers: usize, make: impl Fn() -> T + Send + Sync + 'static) -> Self {
        PerWorker {
            slots: std::iter::repeat_with(OnceLock::new)
                .take(workers + 1)
                .collect(),
            make: Box::new(make),
        }
    }

    /// The calling thread's value, made now if this is its first use.
    pub fn get(&self) -> &T {
        let shared = self.slots.len() - 1;
        let index = WORKER_INDEX
            .get()
            .filter(|&index| index < shared)
            .unwrap_or(shared);
        self.slots[index].get_or_init(&self.make)
    }
}

/// The running workers. Dropping this stops them: each drops its runtime, and with it
/// whatever its connections had not finished.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Connections running on this worker, to give the next one to the least busy.
    connections: Arc<AtomicUsize>,
    /// Dropped to stop the worker.
    _stop: oneshot::Sender<()>,
}

impl Workers {
    /// Starts `count` worker threads (at least one).
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let workers = (0..count.max(1))
            .map(start_worker)
            .collect::<std::io::Result<Vec<Worker>>>()?;
        Ok(Workers { workers })
    }

    /// Runs `connection` on the worker with the fewest connections. `connection` is
    /// called on that worker's thread, so the sockets it opens belong to its runtime.
    pub fn run<F, Fut>(&self, connection: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|worker| worker.connections.load(Ordering::Relaxed))
        else {
            return;
        };
        let open = ConnectionCount::new(worker.connections.clone());
        worker.handle.spawn(async move {
            let _open = open;
            connection().await;
        });
    }
}

/// Counts one connection on a worker for as long as it lives.
struct ConnectionCount(Arc<AtomicUsize>);

impl ConnectionCount {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        ConnectionCount(count)
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn start_worker(index: usize) -> std::io::Result<Worker> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("gateway-worker".to_owned())
        .spawn(move || {
            WORKER_INDEX.set(Some(index));
            // Returns when the sender is dropped; dropping the runtime then cancels
            // what is left on it.
            let _ = runtime.block_on(stopped);
        })?;
    Ok(Worker {
        handle,
        connections: Arc::new(AtomicUsize::new(0)),
        _stop: stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Values numbered in the order they are made, so each slot can be told apart.
    fn numbered(workers: usize) -> PerWorker<usize> {
        let next = AtomicUsize::new(0);
        PerWorker::new(workers, move || next.fetch_add(1, Ordering::Relaxed))
    }

    #[test]
    fn a_thread_that_is_not_a_worker_gets_the_shared_slot() {
        let values = Arc::new(numbered(2));
        assert_eq!(*values.get(), 0, "made by its first use");
        let other = {
            let values = values.clone();
            std::thread::spawn(move || *values.get())
        };
        assert_eq!(other.join().unwrap(), 0, "the same shared value");
    }

    #[test]
    fn each_value_is_made_on_its_worker_thread_and_what_it_starts_runs_there() {
        use std::thread::ThreadId;
        // An eager maker, as a Redis connection made at once would be: it starts a task
        // (the connection's driver) on the runtime it is made in.
        let (ran, ran_on) = mpsc::channel::<(ThreadId, ThreadId)>();
        let ran = std::sync::Mutex::new(ran);
        let values = Arc::new(PerWorker::new(2, move || {
            let made_on = std::thread::current().id();
            let ran = ran.lock().unwrap().clone();
            tokio::spawn(async move {
                let _ = ran.send((made_on, std::thread::current().id()));
            });
            made_on
        }));
        let workers = Workers::start(2).unwrap();
        let (used, used_on) = mpsc::channel();
        let (hold, held) = oneshot::channel::<()>();
        // The first connection stays open, so the second goes to the other worker.
        for hold in [Some(held), None] {
            let (values, used) = (values.clone(), used.clone());
            workers.run(move || async move {
                used.send((*values.get(), std::thread::current().id()))
                    .unwrap();
                if let Some(hold) = hold {
                    let _ = hold.await;
                }
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        let test_thread = std::thread::current().id();
        let mut workers_seen = std::collections::HashSet::new();
        for _ in 0..2 {
            let (value, user) = used_on.recv().unwrap();
            assert_eq!(value, user, "each worker's value was made on that worker");
            let (made_on, task_ran_on) = ran_on.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(
                made_on, task_ran_on,
                "what the maker started runs there too"
            );
            assert_ne!(made_on, test_thread);
            workers_seen.insert(user);
        }
        assert_eq!(workers_seen.len(), 2, "two workers, two values");
        drop(hold);
    }

    #[test]
    fn each_worker_gets_its_own_slot_and_a_connection_goes_to_the_least_busy() {
        let values = Arc::new(numbered(2));
        let workers = Workers::start(2).unwrap();
        let (seen, seen_by) = mpsc::channel();
        // The first connection stays open, so the second and the third (each closed by
        // the time the next comes) go to the other worker.
        let (hold, held) = oneshot::channel::<()>();
        for hold in [Some(held), None, None] {
            let (values, seen) = (values.clone(), seen.clone());
            workers.run(move || async move {
                seen.send((
                    *values.get(),
                    std::thread::current().name().map(str::to_owned),
                ))
                .unwrap();
                if let Some(hold) = hold {
                    let _ = hold.await;
                }
            });
            // The next choice reads the counts this one left.
            std::thread::sleep(Duration::from_millis(50));
        }
        let slots: Vec<_> = (0..3).map(|_| seen_by.recv().unwrap()).collect();
        assert_eq!(slots[0].0, 0);
        assert_eq!(slots[1].0, 1, "not the busy worker");
        assert_eq!(slots[2].0, 1, "still not the busy worker");
        assert!(slots
            .iter()
            .all(|(_, name)| name.as_deref() == Some("gateway-worker")));
        drop(hold);
    }

    #[test]
    fn dropping_the_workers_stops_their_threads() {
        let workers = Workers::start(1).unwrap();
        let (alive, ended) = mpsc::channel::<()>();
        // Holds the sender until its runtime is dropped with the task.
        workers.run(move || async move {
            let _alive = alive;
            std::future::pending::<()>().await;
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ended.try_recv(), Err(mpsc::TryRecvError::Empty));
        drop(workers);
        assert_eq!(
            ended.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn zero_means_one_worker_per_core() {
        assert_eq!(count(3), 3);
        assert_eq!(
            count(0),
            std::thread::available_parallelism().unwrap().get()
        );
    }
}
