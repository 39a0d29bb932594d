//! Settlements waiting for their bucket's next limiter call: the reservations settled
//! after their answers, summed per bucket into one batch that rides with the same
//! client's next request (applied by the same script call, before that request is
//! decided), or is sent on its own after [`SETTLE_WAIT`].
//!
//! Why a sum and not each reservation: a batch costs the script the same whatever it
//! holds, and one call in flight per bucket carries it. Settling each reservation by its
//! own id (a hash field per reservation, written at admission and deleted when settled)
//! cost Redis 149k instructions a call against 122k without (callgrind on redis-server,
//! `scripts/bench.sh`'s token policy, before the token state was packed: 90k now).
//!
//! Why a sequence number: a call that timed out may still have run, so a batch is sent
//! again unchanged, under the same number, until a call carrying it answers; the script
//! applies a batch only when its number is above the last one it applied from this
//! instance (the field `s:<instance>` of the client's hash). New settlements wait for the
//! next batch meanwhile, so a batch never changes once sent. For the same reason a batch
//! a flush is sending may ride with the client's next request all the same: whichever
//! call comes first applies it, and that request is decided with it applied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;

use super::BucketPolicy;

/// How long a settlement waits for a ride before it is sent on its own: short enough that
/// an idle client's refund comes back at once as far as a person can tell, long enough
/// that a busy client's next request almost always takes it.
pub const SETTLE_WAIT: Duration = Duration::from_millis(50);

/// One reservation settled: what goes back to its limits (negative: a debt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// Tokens reserved minus tokens used.
    pub surplus: i64,
    /// Whether the reservation was charged to the token bucket.
    pub bucket: bool,
    /// The budget period it was charged to, if a budget was charged.
    pub period: Option<i64>,
}

/// Settlements summed, to apply at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SettleBatch {
    /// The instance that sends it (random per process).
    pub instance: Arc<str>,
    /// Rises with every batch of the instance; a store applies a batch whose number is
    /// above the last it applied from the instance, and only that.
    pub seq: u64,
    /// Tokens back to the token bucket (negative: a debt).
    pub llm: i64,
    /// Tokens back to the budget, by the period they were charged to.
    pub budget: Vec<(i64, i64)>,
    /// How many reservations it settles (for the failure counter and the gauge).
    pub count: u64,
}

impl SettleBatch {
    /// Adds `settlement` to the sums.
    pub fn add(&mut self, settlement: Settlement) {
        self.count += 1;
        if settlement.bucket {
            self.llm += settlement.surplus;
        }
        let Some(period) = settlement.period else {
            return;
        };
        match self.budget.iter_mut().find(|(p, _)| *p == period) {
            Some((_, surplus)) => *surplus += settlement.surplus,
            None => self.budget.push((period, settlement.surplus)),
        }
    }
}

/// The settlements of one bucket.
#[derive(Debug)]
struct Waiting {
    /// The bucket's limits (the script's arguments when sent on its own).
    policy: BucketPolicy,
    /// Settled since the batch below was made.
    pending: SettleBatch,
    /// The batch sent and not yet answered (or whose call failed, to send again).
    batch: Option<SettleBatch>,
    /// Whether a request's call carrying `batch` is under way (one at a time, so most
    /// calls carry none).
    riding: bool,
    /// Whether a flush is sending `batch`.
    flushing: bool,
}

/// Which kind of call carries a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// A request's own limiter call.
    Ride,
    /// A flush, sending it on its own.
    Flush,
}

#[derive(Debug, Default)]
struct Inner {
    /// By bucket key. FxHash, not SipHash: the keys are digests a client cannot choose,
    /// and three lookups a request with SipHash were ~1.4k of the ~15k instructions token
    /// limits add to a request in the gateway (callgrind).
    by_key: FxHashMap<Arc<str>, Waiting>,
    last_seq: u64,
}

/// The waiting settlements of every bucket.
#[derive(Debug)]
pub struct Settlements {
    instance: Arc<str>,
    inner: Mutex<Inner>,
    /// Whether a flush is already scheduled (one for all buckets).
    flush_scheduled: AtomicBool,
}

impl Default for Settlements {
    fn default() -> Self {
        Settlements {
            instance: Arc::from(format!("{:016x}", rand::random::<u64>())),
            inner: Mutex::default(),
            flush_scheduled: AtomicBool::new(false),
        }
    }
}

/// The next sequence number after `last`: microseconds since the epoch, so a number also
/// says when its instance was last heard of (the script drops watermarks silent for an
/// hour), and above the last one even if the clock steps back.
fn next_seq(last: &mut u64) -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    *last = micros.max(*last + 1);
    *last
}

impl Inner {
    /// The batch of `key` for `carrier` to send now, if there is one: none for a ride
    /// while another ride carries it, none for a flush while any call does.
    fn sendable(
        &mut self,
        key: &str,
        instance: &Arc<str>,
        carrier: Carrier,
    ) -> Option<SettleBatch> {
        let waiting = self.by_key.get_mut(key)?;
        if waiting.riding || (carrier == Carrier::Flush && waiting.flushing) {
            return None;
        }
        if waiting.batch.is_none() {
            if waiting.pending.count == 0 {
                return None;
            }
            // A batch keeps its number until it is done with; only a new one takes one.
            let mut batch = std::mem::take(&mut waiting.pending);
            batch.instance = instance.clone();
            batch.seq = next_seq(&mut self.last_seq);
            waiting.batch = Some(batch);
        }
        match carrier {
            Carrier::Ride => waiting.riding = true,
            Carrier::Flush => waiting.flushing = true,
        }
        waiting.batch.clone()
    }
}

impl Settlements {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked between plain updates.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch of `settlement` alone, for a store that applies it at once.
    pub fn lone(&self, settlement: Settlement) -> SettleBatch {
        let mut batch = SettleBatch {
            instance: self.instance.clone(),
            seq: next_seq(&mut self.lock().last_seq),
            ..SettleBatch::default()
        };
        batch.add(settlement);
        batch
    }

    /// Adds `settlement` for the bucket at `key` under `policy`. Returns true when the
    /// caller must schedule a flush (none was scheduled).
    pub fn push(&self, key: Arc<str>, policy: &BucketPolicy, settlement: Settlement) -> bool {
        let mut inner = self.lock();
        let waiting = inner.by_key.entry(key).or_insert_with(|| Waiting {
            policy: policy.clone(),
            pending: SettleBatch::default(),
            batch: None,
            riding: false,
            flushing: false,
        });
        waiting.policy = policy.clone();
        waiting.pending.add(settlement);
        drop(inner);
        !self.flush_scheduled.swap(true, Ordering::AcqRel)
    }

    /// The batch to ride with a request's call for the bucket at `key`: none when nothing
    /// waits or another request's call carries it. Every batch taken must be given back
    /// to [`Settlements::done`].
    pub fn take(&self, key: &str) -> Option<SettleBatch> {
        self.lock().sendable(key, &self.instance, Carrier::Ride)
    }

    /// The `carrier` of `batch` for the bucket at `key` ended with `outcome`: once
    /// applied or abandoned the batch is done with (a flush or ride still under way with
    /// it finds it gone), once failed it waits to be sent again, unchanged. Says how many
    /// reservations are done with, and whether the caller must schedule a flush
    /// (something still waits and none is scheduled).
    pub fn done(&self, key: &str, batch: &SettleBatch, carrier: Carrier, outcome: Outcome) -> Done {
        let mut inner = self.lock();
        let nothing = Done {
            finished: 0,
            flush: false,
        };
        let Some(waiting) = inner.by_key.get_mut(key) else {
            return nothing;
        };
        if waiting.batch.as_ref().map(|b| b.seq) != Some(batch.seq) {
            return nothing;
        }
        match carrier {
            Carrier::Ride => waiting.riding = false,
            Carrier::Flush => waiting.flushing = false,
        }
        if outcome == Outcome::Failed {
            let carried = waiting.riding || waiting.flushing;
            drop(inner);
            return Done {
                finished: 0,
                flush: !carried && !self.flush_scheduled.swap(true, Ordering::AcqRel),
            };
        }
        waiting.batch = None;
        (waiting.riding, waiting.flushing) = (false, false);
        let more = waiting.pending.count > 0;
        if !more {
            inner.by_key.remove(key);
        }
        drop(inner);
        Done {
            finished: batch.count,
            flush: more && !self.flush_scheduled.swap(true, Ordering::AcqRel),
        }
    }

    /// Every bucket's batch that no call carries, for a flush, with the bucket's limits;
    /// the next push (or failed call) schedules the next flush. Every batch returned must
    /// be given back to [`Settlements::done`] as [`Carrier::Flush`].
    pub fn due(&self) -> Vec<(Arc<str>, BucketPolicy, SettleBatch)> {
        self.flush_scheduled.store(false, Ordering::Release);
        let mut inner = self.lock();
        let keys: Vec<Arc<str>> = inner.by_key.keys().cloned().collect();
        keys.into_iter()
            .filter_map(|key| {
                let batch = inner.sendable(&key, &self.instance, Carrier::Flush)?;
                let policy = inner.by_key.get(&key)?.policy.clone();
                Some((key, policy, batch))
            })
            .collect()
    }
}

/// What [`Settlements::done`] leaves to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Reservations settled for good (applied, or given up on).
    pub finished: u64,
    /// Whether to schedule a flush.
    pub flush: bool,
}

/// How a call carrying a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The store answered: the batch is applied (by this call or an earlier one).
    Applied,
    /// The call failed: it may or may not have run; the batch is sent again.
    Failed,
    /// Every retry failed: the batch is dropped, its reservations stay charged.
    Abandoned,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::TokenLimits;

    fn policy() -> BucketPolicy {
        BucketPolicy {
            tier: "gold".into(),
            capacity: 10,
            refill_rate: 1.0,
            tokens: TokenLimits::default(),
        }
    }

    fn refund(surplus: i64) -> Settlement {
        Settlement {
            surplus,
            bucket: true,
            period: Some(7),
        }
    }

    #[test]
    fn settlements_are_summed_by_limit_and_period() {
        let mut batch = SettleBatch::default();
        batch.add(refund(5));
        batch.add(refund(-2));
        batch.add(Settlement {
            surplus: 4,
            bucket: false,
            period: Some(8),
        });
        batch.add(Settlement {
            surplus: 9,
            bucket: false,
            period: None,
        });
        assert_eq!(batch.llm, 3);
        assert_eq!(batch.budget, vec![(7, 3), (8, 4)]);
        assert_eq!(batch.count, 4);
    }

    #[test]
    fn one_batch_per_bucket_is_out_at_a_time_and_is_resent_unchanged_after_a_failure() {
        let waiting = Settlements::default();
        let key: Arc<str> = Arc::from("k");
        assert!(waiting.push(key.clone(), &policy(), refund(5)));
        let first = waiting.take("k").expect("a batch");
        assert_eq!((first.llm, first.count), (5, 1));
        assert_eq!(first.instance, waiting.instance);
        assert!(!waiting.push(key.clone(), &policy(), refund(1)));
        assert_eq!(waiting.take("k"), None, "a call carries the batch");

        let failed = waiting.done("k", &first, Carrier::Ride, Outcome::Failed);
        assert_eq!(failed.finished, 0);
        assert!(
            !failed.flush,
            "the flush the first push scheduled is still to come, and will send it"
        );
        let again = waiting.take("k").expect("sent again");
        assert_eq!(again, first, "unchanged, under the same number");

        let applied = waiting.done("k", &again, Carrier::Ride, Outcome::Applied);
        assert_eq!(applied.finished, 1);
        assert_eq!(
            waiting
                .done("k", &again, Carrier::Ride, Outcome::Applied)
                .finished,
            0,
            "done with once"
        );
        let next = waiting.take("k").expect("what waited meanwhile");
        assert!(next.seq > first.seq);
        assert_eq!((next.llm, next.count), (1, 1));
        waiting.done("k", &next, Carrier::Ride, Outcome::Applied);
        assert_eq!(waiting.take("k"), None);
    }

    #[test]
    fn a_flush_takes_what_no_call_carries_and_is_scheduled_once_until_then() {
        let waiting = Settlements::default();
        assert!(waiting.push(Arc::from("a"), &policy(), refund(1)));
        assert!(!waiting.push(Arc::from("b"), &policy(), refund(2)));
        let riding = waiting.take("a").expect("a rides");
        let due = waiting.due();
        assert_eq!(due.len(), 1, "only b: a's batch is out");
        assert_eq!(&*due[0].0, "b");
        assert_eq!(due[0].1.capacity, 10);
        assert!(
            waiting.push(Arc::from("a"), &policy(), refund(3)),
            "scheduled again after the flush"
        );
        assert_eq!(
            waiting
                .done("a", &riding, Carrier::Ride, Outcome::Abandoned)
                .finished,
            1
        );
        assert_eq!(
            waiting.take("a").map(|b| b.llm),
            Some(3),
            "dropped; the next one"
        );
    }

    #[test]
    fn a_request_carries_the_batch_a_flush_is_sending_and_whichever_answers_first_ends_it() {
        let waiting = Settlements::default();
        waiting.push(Arc::from("k"), &policy(), refund(5));
        let due = waiting.due();
        let flushed = due[0].2.clone();
        let riding = waiting
            .take("k")
            .expect("a flush does not hold a request back");
        assert_eq!(riding, flushed, "the same batch, under the same number");
        assert_eq!(waiting.take("k"), None, "one request at a time");
        assert!(waiting.due().is_empty(), "nor a second flush");
        let applied = waiting.done("k", &riding, Carrier::Ride, Outcome::Applied);
        assert_eq!(applied.finished, 1);
        let late = waiting.done("k", &flushed, Carrier::Flush, Outcome::Applied);
        assert_eq!(late.finished, 0, "the flush finds it done with");
    }
}
