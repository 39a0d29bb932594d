//! The in-process token bucket: the `memory://` backend, and the `local` failure mode's
//! fallback while Redis is down. Same arithmetic as `token_bucket.lua`.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{BackendError, BucketPolicy, Decision, LimiterBackend};

struct Bucket {
    tokens: f64,
    last_refill: Instant,
    /// When the bucket is full again; past this instant the entry can be dropped.
    full_at: Instant,
}

/// Buckets in a map behind one short-held lock (no await inside it).
pub struct MemoryLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Idle entries are swept when the map grows past this many since the last sweep.
const SWEEP_FLOOR: usize = 1024;

impl MemoryLimiter {
    /// An empty limiter: every bucket starts full.
    pub fn new() -> MemoryLimiter {
        MemoryLimiter {
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from the bucket at `key` if there is one.
    pub fn take(&self, key: &str, policy: &BucketPolicy) -> Decision {
        let now = Instant::now();
        let capacity = policy.capacity as f64;
        let rate = policy.refill_rate;
        // A poisoned lock only means another thread panicked mid-update of plain numbers;
        // the map is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= SWEEP_FLOOR && buckets.len().is_power_of_two() {
            buckets.retain(|_, b| b.full_at > now);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            last_refill: now,
            full_at: now,
        });
        // An entry past its full time is a full bucket, exactly as an expired Redis key.
        let elapsed = now
            .saturating_duration_since(bucket.last_refill)
            .as_secs_f64();
        let mut tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.last_refill = now;
        let allowed = tokens + 1e-9 >= 1.0;
        let mut retry = 0.0;
        if allowed {
            tokens = (tokens - 1.0).max(0.0);
        } else {
            retry = (1.0 - tokens) / rate;
        }
        bucket.tokens = tokens;
        let to_full = (capacity - tokens) / rate;
        bucket.full_at = now + std::time::Duration::from_secs_f64(to_full);
        Decision::from_millis(
            allowed,
            (tokens * 1000.0).floor() as u64,
            (to_full * 1000.0).ceil() as u64,
            (retry * 1000.0).ceil() as u64,
        )
    }
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        MemoryLimiter::new()
    }
}

#[async_trait]
impl LimiterBackend for MemoryLimiter {
    async fn check(&self, key: &str, policy: &BucketPolicy) -> Result<Decision, BackendError> {
        Ok(self.take(key, policy))
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(capacity: u64, refill_rate: f64) -> BucketPolicy {
        BucketPolicy {
            tier: "default".into(),
            capacity,
            refill_rate,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_bucket_is_full_and_refills_fractionally() {
        let limiter = MemoryLimiter::new();
        let p = policy(3, 0.5);
        for left in [2, 1, 0] {
            let d = limiter.take("k", &p);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let denied = limiter.take("k", &p);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_ms, 2000);
        assert_eq!(denied.reset_ms, 6000);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!limiter.take("k", &p).allowed);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(limiter.take("k", &p).allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_are_per_key_and_never_exceed_capacity() {
        let limiter = MemoryLimiter::new();
        let p = policy(2, 1.0);
        assert!(limiter.take("a", &p).allowed);
        assert!(limiter.take("a", &p).allowed);
        assert!(!limiter.take("a", &p).allowed);
        assert!(limiter.take("b", &p).allowed);
        tokio::time::advance(Duration::from_secs(100)).await;
        let d = limiter.take("a", &p);
        assert_eq!(d.remaining, 1, "refill is capped at capacity");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_full_buckets_are_swept() {
        let limiter = MemoryLimiter::new();
        let p = policy(1, 1000.0);
        for i in 0..=SWEEP_FLOOR * 2 {
            limiter.take(&format!("k{i}"), &p);
            if i == SWEEP_FLOOR {
                tokio::time::advance(Duration::from_secs(1)).await;
            }
        }
        assert!(limiter.buckets.lock().unwrap().len() < SWEEP_FLOOR * 2);
    }
}
