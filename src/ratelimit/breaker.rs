//! Circuit breaker around the limiter's Redis: after a run of failures it stops calling
//! Redis for a cool-down (so requests stop paying the timeout), then lets one probe
//! through and closes again when the probe succeeds.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// What the breaker allows for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: call Redis.
    Call,
    /// Half-open: this call is the one probe.
    Probe,
    /// Open: do not call Redis; apply the failure mode.
    Skip,
}

/// The breaker's state, as exported in metrics (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go to Redis.
    Closed = 0,
    /// Calls skip Redis.
    Open = 1,
    /// One probe is under way.
    HalfOpen = 2,
}

/// Lock-free breaker state shared by all requests.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` when the breaker opened, plus one; 0 while closed.
    opened_at: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures, probes after `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Decides whether this call may go to Redis.
    pub fn admit(&self) -> Admission {
        let opened = self.opened_at.load(Ordering::Acquire);
        if opened == 0 {
            return Admission::Call;
        }
        if self.now_ms().saturating_sub(opened) < self.cooldown.as_millis() as u64 {
            return Admission::Skip;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Skip,
        }
    }

    /// Records a successful call; returns true when this closed an open breaker.
    pub fn on_success(&self) -> bool {
        self.consecutive_failures.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        self.opened_at.swap(0, Ordering::AcqRel) != 0
    }

    /// Records a failed call (`probe`: whether it was the half-open probe); returns true
    /// when this opened the breaker.
    pub fn on_failure(&self, probe: bool) -> bool {
        if probe {
            self.opened_at.store(self.now_ms(), Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return false;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.threshold {
            return self
                .opened_at
                .compare_exchange(0, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        }
        false
    }

    /// Keeps the breaker open for at least `wait` from now (an upstream's
    /// `Retry-After`): it opens if closed, and of its cool-down's end and now + `wait`,
    /// the later wins.
    pub fn hold_for(&self, wait: Duration) {
        let until = self.now_ms() + wait.as_millis() as u64;
        let opened = until
            .saturating_sub(self.cooldown.as_millis() as u64)
            .max(1);
        self.opened_at.fetch_max(opened, Ordering::AcqRel);
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        if self.opened_at.load(Ordering::Acquire) == 0 {
            BreakerState::Closed
        } else if self.probing.load(Ordering::Acquire) {
            BreakerState::HalfOpen
        } else {
            BreakerState::Open
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_once_after_the_cooldown() {
        let breaker = Breaker::new(3, Duration::from_millis(50));
        assert_eq!(breaker.admit(), Admission::Call);
        assert!(!breaker.on_failure(false));
        assert!(!breaker.on_failure(false));
        assert!(breaker.on_failure(false), "third failure opens");
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.admit(), Admission::Skip);
        tokio::time::advance(Duration::from_millis(49)).await;
        assert_eq!(breaker.admit(), Admission::Skip, "still cooling down");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
        assert_eq!(breaker.admit(), Admission::Skip, "only one probe at a time");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.on_failure(true);
        assert_eq!(breaker.admit(), Admission::Skip, "a failed probe reopens");
        tokio::time::advance(Duration::from_millis(51)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
        assert!(breaker.on_success());
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.admit(), Admission::Call);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_run() {
        let breaker = Breaker::new(2, Duration::from_secs(60));
        breaker.on_failure(false);
        breaker.on_success();
        breaker.on_failure(false);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_keeps_it_open_until_the_later_deadline() {
        let breaker = Breaker::new(5, Duration::from_millis(100));
        breaker.hold_for(Duration::from_millis(300));
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a hold opens a closed breaker"
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(breaker.admit(), Admission::Skip, "held past the cool-down");
        breaker.hold_for(Duration::from_millis(10));
        assert_eq!(
            breaker.admit(),
            Admission::Skip,
            "a shorter hold does not shorten it"
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
    }
}
