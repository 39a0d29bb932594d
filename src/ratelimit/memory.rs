//! The in-process token buckets and budgets: the `memory://` backend, and the `local`
//! failure mode's fallback while Redis is down. Same arithmetic as `token_bucket.lua`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::period::Span;
use super::{
    BackendError, BucketPolicy, Decision, Limit, LimiterBackend, Reserve, ScriptReply, SettleBatch,
    Settlement,
};

struct Bucket {
    /// May be below zero in an LLM-token bucket: a debt from a reconciliation.
    tokens: f64,
    last_refill: Instant,
    /// When the bucket is full again; past this instant the entry can be dropped.
    full_at: Instant,
}

impl Bucket {
    /// The tokens of the bucket (a missing one is full) refilled up to `now`.
    fn refilled(bucket: Option<&Bucket>, capacity: f64, rate: f64, now: Instant) -> f64 {
        match bucket {
            None => capacity,
            Some(b) => {
                let elapsed = now.saturating_duration_since(b.last_refill).as_secs_f64();
                (b.tokens + elapsed * rate).min(capacity)
            }
        }
    }

    fn at(tokens: f64, capacity: f64, rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens,
            last_refill: now,
            full_at: now + Duration::from_secs_f64(((capacity - tokens) / rate).max(0.0)),
        }
    }
}

/// A budget's count in its period.
struct Budget {
    period: i64,
    used: u64,
}

#[derive(Default)]
struct State {
    requests: HashMap<String, Bucket>,
    tokens: HashMap<String, Bucket>,
    budgets: HashMap<String, Budget>,
    /// The last batch of settlements applied for each bucket and instance (as the
    /// script's `s:<instance>` fields).
    watermarks: HashMap<(String, Arc<str>), u64>,
}

/// Buckets in maps behind one short-held lock (no await inside it).
pub struct MemoryLimiter {
    state: Mutex<State>,
}

/// Idle entries are swept when the map grows past this many since the last sweep.
const SWEEP_FLOOR: usize = 1024;

fn sweep(map: &mut HashMap<String, Bucket>, now: Instant) {
    if map.len() >= SWEEP_FLOOR && map.len().is_power_of_two() {
        map.retain(|_, b| b.full_at > now);
    }
}

impl MemoryLimiter {
    /// An empty limiter: every bucket starts full.
    pub fn new() -> MemoryLimiter {
        MemoryLimiter {
            state: Mutex::new(State::default()),
        }
    }

    /// Takes one token from the bucket at `key` and reserves `reserve.tokens` LLM tokens
    /// when the policy limits them, all or nothing: the arithmetic of `token_bucket.lua`.
    pub fn take(&self, key: &str, policy: &BucketPolicy, reserve: Reserve) -> Decision {
        let now = Instant::now();
        let capacity = policy.capacity as f64;
        let rate = policy.refill_rate;
        // A poisoned lock only means another thread panicked mid-update of plain numbers;
        // the maps are still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        sweep(&mut state.requests, now);
        // An entry past its full time is a full bucket, exactly as an expired Redis key.
        let mut tokens = Bucket::refilled(state.requests.get(key), capacity, rate, now);
        let requests_ok = tokens + 1e-9 >= 1.0;
        let limits = policy.tokens;
        let want = reserve.tokens as f64;

        let (per_minute, llm_rate) = (limits.per_minute as f64, limits.per_minute as f64 / 60.0);
        let mut llm = 0.0;
        let (mut llm_ok, mut too_large) = (true, false);
        if limits.per_minute > 0 {
            sweep(&mut state.tokens, now);
            llm = Bucket::refilled(state.tokens.get(key), per_minute, llm_rate, now);
            too_large = reserve.tokens > limits.per_minute;
            llm_ok = !too_large && llm + 1e-9 >= want;
        }
        let span = Span::now(limits.period);
        let mut used = 0;
        let mut budget_ok = true;
        if limits.budget > 0 {
            if state.budgets.len() >= SWEEP_FLOOR && state.budgets.len().is_power_of_two() {
                state.budgets.retain(|_, b| b.period == span.number);
            }
            used = match state.budgets.get(key) {
                Some(b) if b.period == span.number => b.used,
                _ => 0,
            };
            budget_ok = used.saturating_add(reserve.tokens) <= limits.budget;
        }
        let denied_by = if too_large {
            Some(Limit::TooLarge)
        } else if !budget_ok {
            Some(Limit::Budget)
        } else if !llm_ok {
            Some(Limit::Tokens)
        } else if !requests_ok {
            Some(Limit::Requests)
        } else {
            None
        };
        if denied_by.is_none() {
            tokens = (tokens - 1.0).max(0.0);
            state
                .requests
                .insert(key.to_owned(), Bucket::at(tokens, capacity, rate, now));
            if limits.per_minute > 0 {
                llm -= want;
                let bucket = Bucket::at(llm, per_minute, llm_rate, now);
                state.tokens.insert(key.to_owned(), bucket);
            }
            if limits.budget > 0 {
                used += reserve.tokens;
                let budget = Budget {
                    period: span.number,
                    used,
                };
                state.budgets.insert(key.to_owned(), budget);
            }
        }
        let retry = if requests_ok {
            0.0
        } else {
            (1.0 - tokens) / rate
        };
        let mut decision = Decision::from_millis(
            denied_by.is_none(),
            (tokens * 1000.0).floor() as u64,
            ((capacity - tokens) / rate * 1000.0).ceil() as u64,
            (retry * 1000.0).ceil() as u64,
        );
        if !limits.any() {
            return decision;
        }
        let secs_left = (span.end as f64 - unix_now()).max(0.0);
        let llm_retry = match limits.per_minute > 0 && !llm_ok && !too_large {
            true => (want - llm) / llm_rate,
            false => 0.0,
        };
        let reply = ScriptReply {
            why: denied_by,
            llm_left: llm.max(0.0).floor() as u64,
            llm_to_full_ms: ((per_minute - llm) / llm_rate * 1000.0).ceil() as u64,
            llm_retry_ms: (llm_retry * 1000.0).ceil() as u64,
            budget_left: limits.budget.saturating_sub(used),
            period_left_ms: (secs_left * 1000.0).ceil() as u64,
            period: span.number,
        };
        reply.complete(&mut decision, policy);
        decision
    }

    /// Gives `settlement` back to the limits at `key` (a debt when negative): the
    /// settlement arithmetic of `token_bucket.lua`.
    pub fn settle(&self, key: &str, per_minute: u64, settlement: Settlement) {
        let mut batch = SettleBatch::default();
        batch.add(settlement);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        apply(&mut state, key, per_minute, &batch);
    }

    /// Applies `batch` to the limits at `key`, unless a batch of its instance as new or
    /// newer was applied there already.
    fn apply_once(&self, key: &str, policy: &BucketPolicy, batch: Option<&SettleBatch>) {
        let Some(batch) = batch else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let marks = &mut state.watermarks;
        // Watermarks silent for an hour go, as the script drops them (their numbers are
        // microseconds since the epoch).
        if marks.len() >= SWEEP_FLOOR && marks.len().is_power_of_two() {
            let horizon = ((unix_now() * 1e6) as u64).saturating_sub(3_600_000_000);
            marks.retain(|_, seq| *seq >= horizon);
        }
        let mark = marks
            .entry((key.to_owned(), batch.instance.clone()))
            .or_insert(0);
        if *mark >= batch.seq {
            return;
        }
        *mark = batch.seq;
        apply(&mut state, key, policy.tokens.per_minute, batch);
    }
}

/// Gives `batch` back to the token bucket (up to its capacity) and the budget of each
/// period it names, if that is the period counted; a negative sum is a debt.
fn apply(state: &mut State, key: &str, per_minute: u64, batch: &SettleBatch) {
    let now = Instant::now();
    if per_minute > 0 && batch.llm != 0 {
        let (capacity, rate) = (per_minute as f64, per_minute as f64 / 60.0);
        let tokens = Bucket::refilled(state.tokens.get(key), capacity, rate, now);
        let tokens = (tokens + batch.llm as f64).min(capacity);
        state
            .tokens
            .insert(key.to_owned(), Bucket::at(tokens, capacity, rate, now));
    }
    if let Some(budget) = state.budgets.get_mut(key) {
        for (period, surplus) in &batch.budget {
            if budget.period == *period {
                budget.used = (budget.used as i64 - surplus).max(0) as u64;
            }
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        MemoryLimiter::new()
    }
}

#[async_trait]
impl LimiterBackend for MemoryLimiter {
    async fn check(
        &self,
        key: &str,
        policy: &BucketPolicy,
        reserve: Reserve,
        settles: Option<&SettleBatch>,
    ) -> Result<Decision, BackendError> {
        self.apply_once(key, policy, settles);
        Ok(self.take(key, policy, reserve))
    }

    async fn settle(
        &self,
        key: &str,
        policy: &BucketPolicy,
        settles: &SettleBatch,
        _timeout: Duration,
    ) -> Result<(), BackendError> {
        self.apply_once(key, policy, Some(settles));
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::TokenLimits;

    fn policy(capacity: u64, refill_rate: f64) -> BucketPolicy {
        BucketPolicy {
            tier: "default".into(),
            capacity,
            refill_rate,
            tokens: TokenLimits::default(),
        }
    }

    fn token_policy(per_minute: u64, budget: u64) -> BucketPolicy {
        BucketPolicy {
            tokens: TokenLimits {
                per_minute,
                budget,
                period: crate::settings::BudgetPeriod::Day,
                default_max_tokens: 100,
            },
            ..policy(1000, 1000.0)
        }
    }

    fn reserve(tokens: u64) -> Reserve {
        Reserve { tokens }
    }

    /// The settlement of a reservation of `reserved` tokens admitted as `admitted`, to
    /// `used` tokens.
    fn settled(admitted: &Decision, reserved: u64, used: u64) -> Settlement {
        Settlement {
            surplus: reserved as i64 - used as i64,
            bucket: admitted.tokens.is_some(),
            period: admitted.budget_period,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_bucket_is_full_and_refills_fractionally() {
        let limiter = MemoryLimiter::new();
        let p = policy(3, 0.5);
        for left in [2, 1, 0] {
            let d = limiter.take("k", &p, Reserve::default());
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let denied = limiter.take("k", &p, Reserve::default());
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_ms, 2000);
        assert_eq!(denied.reset_ms, 6000);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!limiter.take("k", &p, Reserve::default()).allowed);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(limiter.take("k", &p, Reserve::default()).allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_are_per_key_and_never_exceed_capacity() {
        let limiter = MemoryLimiter::new();
        let p = policy(2, 1.0);
        assert!(limiter.take("a", &p, Reserve::default()).allowed);
        assert!(limiter.take("a", &p, Reserve::default()).allowed);
        assert!(!limiter.take("a", &p, Reserve::default()).allowed);
        assert!(limiter.take("b", &p, Reserve::default()).allowed);
        tokio::time::advance(Duration::from_secs(100)).await;
        let d = limiter.take("a", &p, Reserve::default());
        assert_eq!(d.remaining, 1, "refill is capped at capacity");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_full_buckets_are_swept() {
        let limiter = MemoryLimiter::new();
        let p = policy(1, 1000.0);
        for i in 0..=SWEEP_FLOOR * 2 {
            limiter.take(&format!("k{i}"), &p, Reserve::default());
            if i == SWEEP_FLOOR {
                tokio::time::advance(Duration::from_secs(1)).await;
            }
        }
        assert!(limiter.state.lock().unwrap().requests.len() < SWEEP_FLOOR * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_needs_every_limit_and_charges_all_or_none() {
        let limiter = MemoryLimiter::new();
        let p = token_policy(600, 1000);
        let first = limiter.take("k", &p, reserve(500));
        assert!(first.allowed);
        assert_eq!(first.tokens.unwrap().remaining, 100);
        assert_eq!(first.budget.unwrap().remaining, 500);
        // 200 more do not fit the bucket (100 left): refused, and nothing is charged.
        let refused = limiter.take("k", &p, reserve(200));
        assert_eq!(refused.denied_by, Some(Limit::Tokens));
        assert_eq!(refused.retry_after_ms, 10_000, "100 tokens at 10/s");
        assert_eq!(refused.budget.unwrap().remaining, 500);
        let small = limiter.take("k", &p, reserve(100));
        assert!(small.allowed);
        assert_eq!(small.tokens.unwrap().remaining, 0);
        // More than the bucket's capacity can never pass.
        let huge = limiter.take("other", &p, reserve(601));
        assert_eq!(huge.denied_by, Some(Limit::TooLarge));
        assert!(!Limit::TooLarge.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn settling_refunds_up_to_capacity_and_charges_debt() {
        let limiter = MemoryLimiter::new();
        let p = token_policy(600, 1000);
        let first = limiter.take("k", &p, reserve(500));
        assert!(first.allowed);
        assert!(first.budget_period.is_some());
        // Used 50 of 500: 450 come back, to the bucket and the budget.
        limiter.settle("k", 600, settled(&first, 500, 50));
        let next = limiter.take("k", &p, reserve(10));
        assert_eq!(next.tokens.unwrap().remaining, 540);
        assert_eq!(next.budget.unwrap().remaining, 940);
        // Used 310 of 10: a debt of 300 beyond the reservation.
        limiter.settle("k", 600, settled(&next, 10, 310));
        let after = limiter.take("k", &p, reserve(1));
        assert_eq!(after.tokens.unwrap().remaining, 239);
        assert_eq!(after.budget.unwrap().remaining, 639);
        // A refund never fills the bucket past its capacity.
        tokio::time::advance(Duration::from_secs(60)).await;
        limiter.settle("k", 600, settled(&after, 1, 0));
        let full = limiter.take("k", &p, reserve(0));
        assert_eq!(full.tokens.unwrap().remaining, 600);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_applied_once_per_instance_and_number() {
        let limiter = MemoryLimiter::new();
        let p = token_policy(600, 1000);
        let first = limiter.take("k", &p, reserve(500));
        let mut batch = SettleBatch {
            instance: Arc::from("a"),
            seq: 10,
            ..SettleBatch::default()
        };
        batch.add(settled(&first, 500, 50));
        limiter.apply_once("k", &p, Some(&batch));
        limiter.apply_once("k", &p, Some(&batch));
        let other = SettleBatch {
            instance: Arc::from("b"),
            ..batch.clone()
        };
        let older = SettleBatch {
            seq: 9,
            ..batch.clone()
        };
        limiter.apply_once("k", &p, Some(&older));
        assert_eq!(
            limiter.take("k", &p, reserve(0)).budget.unwrap().remaining,
            950,
            "applied once; an older batch of the same instance is not applied"
        );
        limiter.apply_once("k", &p, Some(&other));
        assert_eq!(
            limiter.take("k", &p, reserve(0)).budget.unwrap().remaining,
            1000,
            "another instance's batch of the same number is its own"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_refuses_until_its_period_ends() {
        let limiter = MemoryLimiter::new();
        let p = token_policy(0, 300);
        assert!(limiter.take("k", &p, reserve(200)).allowed);
        let spent = limiter.take("k", &p, reserve(200));
        assert_eq!(spent.denied_by, Some(Limit::Budget));
        assert!(spent.tokens.is_none());
        let left = Span::now(crate::settings::BudgetPeriod::Day).end as f64 - unix_now();
        let retry_s = spent.retry_after_ms as f64 / 1000.0;
        assert!((retry_s - left).abs() < 2.0, "{retry_s} vs {left}");
        assert!(limiter.take("k", &p, reserve(100)).allowed);
    }
}
