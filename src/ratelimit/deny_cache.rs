//! The local deny cache: once Redis denies a key, further requests for it are denied in
//! process until the next token is due, without a Redis round trip (as Envoy's limiter
//! does). It only ever denies, and only while Redis would deny too, so exactness holds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so tests can pause and advance it.
use tokio::time::Instant;

use super::Decision;

struct Denial {
    /// When the next token is due in Redis.
    until: Instant,
    /// When the bucket is full again, for the reset headers.
    full_at: Instant,
}

/// Denied keys and when they may ask Redis again.
pub struct DenyCache {
    entries: Mutex<HashMap<String, Denial>>,
}

/// Expired entries are swept once the map reaches this size.
const SWEEP_AT: usize = 4096;

impl DenyCache {
    /// An empty cache.
    pub fn new() -> DenyCache {
        DenyCache {
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A denial for `key` if one is still in force.
    pub fn check(&self, key: &str) -> Option<Decision> {
        let now = Instant::now();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let denial = entries.get(key).filter(|d| d.until > now)?;
        let ms = |d: Duration| d.as_millis() as u64;
        Some(Decision {
            allowed: false,
            remaining: 0,
            reset_ms: ms(denial.full_at.saturating_duration_since(now)),
            retry_after_ms: ms(denial.until.saturating_duration_since(now)).max(1),
            denied_by: Some(super::Limit::Requests),
            tokens: None,
            budget: None,
            budget_period: None,
        })
    }

    /// Remembers a denial made by Redis.
    pub fn record(&self, key: &str, decision: &Decision) {
        if decision.allowed || decision.retry_after_ms == 0 {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= SWEEP_AT {
            entries.retain(|_, d| d.until > now);
        }
        entries.insert(
            key.to_owned(),
            Denial {
                until: now + Duration::from_millis(decision.retry_after_ms),
                full_at: now + Duration::from_millis(decision.reset_ms),
            },
        );
    }

    /// Forgets every denial (policies changed).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Default for DenyCache {
    fn default() -> Self {
        DenyCache::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn denials_hold_until_the_next_token_is_due() {
        let cache = DenyCache::new();
        assert!(cache.check("k").is_none());
        cache.record("k", &Decision::from_millis(true, 0, 1000, 0));
        assert!(cache.check("k").is_none(), "admissions are never cached");
        cache.record("k", &Decision::from_millis(false, 0, 2000, 40));
        let denied = cache.check("k").unwrap();
        assert!(!denied.allowed);
        assert!(denied.retry_after_ms <= 40 && denied.reset_ms <= 2000);
        assert!(cache.check("other").is_none());
        tokio::time::advance(Duration::from_millis(39)).await;
        assert!(cache.check("k").is_some(), "not due yet");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(cache.check("k").is_none());
        cache.record("k", &Decision::from_millis(false, 0, 2000, 1000));
        cache.clear();
        assert!(cache.check("k").is_none());
    }
}
